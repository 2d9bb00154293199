"""``python -m pixsigma``: the one front door (generate, convert, space, app)."""

import sys

from pixsigma.cli import main

if __name__ == "__main__":
    sys.exit(main())
