"""Offline throughput, loom vs HF transformers: the same as `loom bench throughput` (loom/bench/throughput.py)."""

import sys

from loom.bench.throughput import main

if __name__ == "__main__":
    sys.exit(main())
