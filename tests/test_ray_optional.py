"""kandinsky.ray without a Ray cluster: the package imports (and says how to install Ray) when Ray is missing, and
the options of `kandinsky ray ...` and of serve configs become the right ServeOptions."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kandinsky.cli import build_parser, main
from kandinsky.ray.app import ServeOptions

NO_RAY = textwrap.dedent("""
    import sys
    sys.modules["ray"] = None  # as if Ray were not installed
    import kandinsky.ray
    from kandinsky.ray import app, batching, data, ingress, model, remote, store  # all import without Ray
    from kandinsky.ray import RayUnavailable, ServeOptions, generate_dataset
    for call in (lambda: kandinsky.ray.build_app(), lambda: generate_dataset("p.txt", "out")):
        try:
            call()
        except RayUnavailable as exc:
            print(exc)
        else:
            raise SystemExit("no error")
    from kandinsky.cli import main
    sys.exit(main(["ray", "status"]))
""")


@pytest.mark.timeout(120)
def test_imports_and_clear_error_without_ray(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-c", NO_RAY], capture_output=True, text=True, cwd=tmp_path, timeout=100)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all("pip install 'kandinsky[ray]'" in line for line in lines), r.stdout + r.stderr
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "kandinsky: error: kandinsky ray status needs Ray with Serve and Data (the 'ray' package is missing): "
        "pip install 'kandinsky[ray]'")
    assert not (tmp_path / "out").exists()  # nothing was started or written


def _serve_options(argv: list[str]) -> ServeOptions:
    from kandinsky.cli.ray import serve_options

    return serve_options(build_parser(["ray"]).parse_args(["ray", "serve", *argv]))


@pytest.mark.timeout(60)
def test_serve_cli_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KANDINSKY_API_KEY", "from-env")
    o = _serve_options(["--replicas", "3", "--threads-per-replica", "2", "--num-cpus-per-replica", "0.5",
                        "--max-steps", "40", "--max-pixels", "4096", "--queue-size", "5", "--port", "8001",
                        "--host", "0.0.0.0", "--model", "some/folder", "--dtype", "fp32", "--max-batch-size", "3"])
    assert (o.replicas, o.threads(), o.num_cpus_per_replica, o.batch_size(), o.slots()) == (3, 2, 0.5, 3, 9)
    assert o.server.limits.max_steps == 40 and o.server.limits.max_pixels == 4096 and o.server.queue_size == 5
    assert (o.server.host, o.server.port, o.server.api_key) == ("0.0.0.0", 8001, "from-env")
    assert o.model.model == "some/folder" and o.model.dtype == "fp32"
    deployment = o.model_deployment_options()
    assert deployment["num_replicas"] == 3 and deployment["max_ongoing_requests"] == 3
    assert deployment["ray_actor_options"] == {"num_cpus": 0.5}

    o = _serve_options(["--min-replicas", "1", "--max-replicas", "4", "--num-gpus-per-replica", "1",
                        "--api-key", "k"])
    assert o.autoscaling and o.batch_size() == 4 and o.slots() == 16 and o.server.api_key == "k"  # GPU: batching on
    scaling = o.model_deployment_options()
    assert "num_replicas" not in scaling and scaling["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert scaling["autoscaling_config"]["min_replicas"] == 1 and scaling["autoscaling_config"]["max_replicas"] == 4
    assert _serve_options([]).batch_size() == 1 and _serve_options([]).threads() == 1  # CPU: no batching


@pytest.mark.timeout(60)
def test_bad_options_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ray", "serve", "--min-replicas", "2"]) == 2
    assert "give both --min-replicas and --max-replicas" in capsys.readouterr().err
    assert main(["ray", "serve", "--min-replicas", "3", "--max-replicas", "2"]) == 2
    assert "min-replicas <= max-replicas" in capsys.readouterr().err
    assert main(["ray", "serve", "--model", "/no/such/folder"]) == 2  # refused before a cluster is started
    assert "decoder model folder not found: /no/such/folder" in capsys.readouterr().err
    assert main(["ray"]) == 2
    assert "choose a ray command: serve, status or batch" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown option replica;"):
        ServeOptions.from_mapping({"replica": 2})


@pytest.mark.timeout(60)
def test_serve_config_args() -> None:
    o = ServeOptions.from_mapping({"replicas": 2, "threads_per_replica": 1, "max_steps": 50, "api_key": "x",
                                   "queue_size": 3, "dtype": "float32", "max_batch_size": 2, "lora_dir": "/loras"})
    assert o.server.lora_dir == "/loras"
    assert (o.replicas, o.threads(), o.server.limits.max_steps, o.server.api_key, o.server.queue_size) == (
        2, 1, 50, "x", 3)
    assert o.model.dtype == "float32" and o.batch_size() == 2
