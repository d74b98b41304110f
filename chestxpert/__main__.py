"""`python -m chestxpert`: the same entry point as the `chestxpert` console script."""

import sys

from chestxpert.cli import main

sys.exit(main())
