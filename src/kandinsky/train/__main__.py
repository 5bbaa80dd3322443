"""``python -m kandinsky.train STAGE --out DIR``."""

import sys

from .cli import main

sys.exit(main())
