"""`python -m loom ...`: the `loom` command without the console script (which lives in the venv's bin)."""

import sys

from loom.entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main())
