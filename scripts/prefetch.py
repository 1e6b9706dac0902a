"""Kept for old instructions: ``python -m qeval.prefetch`` is the command (it ships in the wheel)."""

import sys

from qeval.prefetch import main

if __name__ == "__main__":
    sys.exit(main())
