"""``python -m qeval.prefetch [overrides] [--data-dir DIR] [--dry-run]``."""

import sys

from qeval.prefetch import main

sys.exit(main())
