"""bench.py — not implemented yet (see the open issues)."""
import sys

if __name__ == "__main__":
    sys.exit("bench.py: not implemented yet")
