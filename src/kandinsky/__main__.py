"""``python -m kandinsky``: the same command line as the ``kandinsky`` script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
