"""``python -m kandinsky.server [options]`` is ``kandinsky serve [options]``."""

import sys

from . import main

sys.exit(main())
