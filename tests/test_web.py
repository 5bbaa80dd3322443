"""The web page in a real browser: Debian's chromium driven by Playwright (no browser download), against a real
uvicorn serving the bundled model. Type a prompt and generate (the progress bar moves, a preview and the image
appear), mix an uploaded and a dropped image with a prompt, paint a mask and inpaint.

Screenshots go to ``out/test-artifacts/`` (or ``$KANDINSKY_TEST_ARTIFACTS``); with ``KANDINSKY_DOCS_SCREENSHOT=1``
the README's ``docs/server.png`` is rewritten too.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import PIL.Image
import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); the browser tests need it",
                allow_module_level=True)
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api")

from test_server import GateEngine, running, wait_for  # noqa: E402

from kandinsky.server import ServerConfig, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("KANDINSKY_TEST_ARTIFACTS", ROOT / "out" / "test-artifacts"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    app = create_app(ServerConfig(log_level="warning", threads=1))
    with running(app) as url:
        with httpx.Client(base_url=url, timeout=60) as c:
            wait_for(lambda: c.get("/healthz").json()["model"] != "loading", what="the model to load")
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture()
def page(browser: Any, server: str) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}") if "/static/" in r.url else None)
    external: list[str] = []
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith((server, "data:")) else None)
    page.goto(server)
    page.wait_for_selector("#status.ready")
    yield page
    assert not errors, errors
    assert not external, f"the page fetched something from elsewhere: {external}"
    context.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("document.getElementById('controls').scrollTop = 0; window.scrollTo(0, 0)")
    page.wait_for_timeout(300)  # let the progress bar's transition end
    page.screenshot(path=str(ARTIFACTS / name))


def png_file(tmp_path: Path, name: str, colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> Path:
    img = PIL.Image.new("RGB", size, colour)
    img.paste((240, 220, 40), (size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4))
    path = tmp_path / name
    img.save(path)
    return path


def set_fast(page: Any, steps: int = 8) -> None:
    page.fill("#steps", str(steps))
    page.click("details.advanced summary")
    page.fill("#prior-steps", "2")


def wait_cards(page: Any, mode: str, count: int = 1) -> Any:
    page.wait_for_function(f"document.querySelectorAll('#gallery .card[data-mode={mode}]').length >= {count}")
    return page.locator(f"#gallery .card[data-mode={mode}]").first


def test_type_prompt_generate_progress_and_gallery(page: Any) -> None:
    page.fill("#prompt", "a red circle on a blue background")
    set_fast(page, steps=10)
    page.click("#dice")
    seed = page.input_value("#seed")
    assert seed.isdigit()
    page.click("#generate")
    page.wait_for_function("document.getElementById('generate').disabled === false && "
                           "document.querySelectorAll('#gallery .card').length === 1")
    card = wait_cards(page, "txt2img")
    log = page.evaluate("window.kandinskyStudio.progressLog")
    moving = [f for f in log if 0 < f < 1]
    assert len(set(moving)) >= 3, log  # the bar moved through the steps...
    assert moving == sorted(moving) and log[-1] == 1  # ...forwards, and ended full
    assert page.get_attribute("#progress", "aria-valuenow") == "100"
    assert page.evaluate("window.kandinskyStudio.previews") >= 1  # live previews were shown
    assert card.get_attribute("data-seed") == seed
    assert page.evaluate("document.querySelector('#gallery .card img').naturalWidth") == 64
    meta = card.locator(".card-meta").inner_text()
    assert f"seed {seed}" in meta and "10 steps" in meta
    assert card.locator("a.download").get_attribute("download").endswith(".png")
    # the image is a PNG with its parameters
    href = card.locator("a.download").get_attribute("href")
    img = PIL.Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1])))
    assert f"Seed: {seed}" in img.info["parameters"]
    # reuse: the seed comes back after a new random one
    page.click("#dice")
    page.click("#reuse-seed")
    assert page.input_value("#seed") == seed
    shot(page, "web-generate.png")
    if os.environ.get("KANDINSKY_DOCS_SCREENSHOT"):  # the README's picture: a fuller gallery
        page.fill("#num", "3")
        page.fill("#steps", "30")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#gallery .card').length === 4")
        shot(page, "web-docs.png")
        (ROOT / "docs" / "server.png").write_bytes((ARTIFACTS / "web-docs.png").read_bytes())
    # laptop and narrow widths: no horizontal scrolling
    for width in (1366, 1024, 800):
        page.set_viewport_size({"width": width, "height": 800})
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), width
    shot(page, "web-narrow.png")


def test_mix_uploaded_image_with_prompt(page: Any, tmp_path: Path) -> None:
    page.click(".tab[data-mode=mix]")
    page.set_input_files("#mix-file", str(png_file(tmp_path, "blue.png", (30, 60, 220))))
    data = base64.b64encode(png_file(tmp_path, "red.png", (220, 30, 30)).read_bytes()).decode()
    page.evaluate("""(data) => {  // drag and drop a file onto the panel
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "red.png", {type: "image/png"}));
        document.getElementById("mix-drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
    }""", data)
    page.click("#mix-add-prompt")
    page.fill(".mix-item[data-kind=text] input.mix-text", "a yellow star")
    page.wait_for_function("document.querySelectorAll('.mix-item[data-kind=image]').length === 2")
    page.evaluate("""() => {
        const r = document.querySelector('.mix-item[data-kind=image] input.mix-weight');
        r.value = '0.8'; r.dispatchEvent(new Event('input', {bubbles: true}));
    }""")
    set_fast(page)
    page.fill("#seed", "5")
    page.click("#generate")
    card = wait_cards(page, "mix")
    body = page.evaluate("window.kandinskyStudio.requests.at(-1)")
    assert body["mode"] == "mix"
    items = body["body"]["items"]
    assert [("image" in it, it.get("text"), it["weight"]) for it in items] == [
        (True, None, 0.8), (True, None, 0.5), (False, "a yellow star", 0.5)]
    assert items[0]["image"].startswith("data:image/png;base64,")
    assert card.get_attribute("data-seed") == "5"
    shot(page, "web-mix.png")
    # send a result on to img2img
    card.locator("button[data-action=img2img]").click()
    page.wait_for_selector("#img2img-preview:not([hidden])")
    assert page.locator("#panel-img2img").is_visible() and page.locator("#panel-mix").is_hidden()


def test_paint_mask_and_inpaint(page: Any, tmp_path: Path) -> None:
    page.click(".tab[data-mode=inpaint]")
    page.set_input_files("#inpaint-file", str(png_file(tmp_path, "green.png", (40, 170, 60))))
    page.wait_for_selector("#inpaint-stage:not([hidden])")
    page.fill("#prompt", "a blue square")
    set_fast(page)
    page.click("#generate")  # nothing painted yet: a clear message, no request
    assert "paint" in page.inner_text("#error")
    box = page.locator("#inpaint-mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + box["height"] * 0.5, steps=10)
    page.mouse.up()
    with page.expect_request(lambda r: "/v1/inpaint" in r.url) as req:
        page.click("#generate")
    sent = req.value.post_data_json
    mask = PIL.Image.open(io.BytesIO(base64.b64decode(sent["mask"].split(",", 1)[1]))).convert("L")
    assert mask.size == (64, 64)
    assert mask.getpixel((32, 32)) == 255 and mask.getpixel((32, 5)) == 0 and mask.getpixel((5, 32)) == 0
    assert 0 < sum(v == 255 for v in mask.getdata()) < 64 * 64 // 2
    card = wait_cards(page, "inpaint")
    assert "inpaint" in card.locator(".card-meta").inner_text()
    assert page.inner_text("#error") == ""
    shot(page, "web-inpaint.png")


def test_api_key_prompt_and_cancel(browser: Any) -> None:
    """With --api-key the page asks for the key once; Cancel stops a running job."""
    engine = GateEngine(steps=3)
    app = create_app(ServerConfig(api_key="s3cret", log_level="warning"), engine)
    with running(app) as url:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", "s3cret")
        page.click("#key-save")
        page.wait_for_selector("#status.ready")
        page.fill("#prompt", "a red circle")
        page.click("#generate")
        assert engine.running.wait(30)
        engine.step(1)
        page.wait_for_function("document.getElementById('progress-text').textContent.startsWith('decoder 1/3')")
        page.click("#cancel")
        page.wait_for_function("document.getElementById('progress-text').textContent === 'cancelled'")
        assert page.is_enabled("#generate") and page.inner_text("#error") == ""
        assert page.evaluate("localStorage.getItem('kandinsky.apiKey')") == "s3cret"
        context.close()
        engine.step(100)


def test_lora_picker(browser: Any, tmp_path: Path) -> None:
    """A server with --lora-dir shows a LoRA picker; the chosen adapter and scale reach the image's parameters."""
    from test_lora import _random_adapter

    library = tmp_path / "loras"
    library.mkdir()
    _random_adapter(library, "style")
    app = create_app(ServerConfig(log_level="warning", threads=1, lora_dir=str(library)))
    with running(app) as url:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector("#status.ready")
        assert page.is_visible("#lora-row")
        assert page.locator("#lora option").all_inner_texts() == ["none", "style"]
        page.select_option("#lora", "style")
        page.fill("#lora-scale", "0.9")
        page.fill("#prompt", "a red circle")
        set_fast(page, steps=4)
        page.click("#generate")
        card = wait_cards(page, "txt2img")
        href = card.locator("a.download").get_attribute("href")
        img = PIL.Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1])))
        assert img.info["parameters"].splitlines()[0] == "a red circle <lora:style:0.9>"
        assert not errors, errors
        context.close()
