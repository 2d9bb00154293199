"""``python -m pixsigma``: the one front door (generate, convert)."""

import sys

from pixsigma.cli import main

if __name__ == "__main__":
    sys.exit(main())
