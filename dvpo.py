"""dvpo.py — not implemented yet (see the open issues)."""
import sys

if __name__ == "__main__":
    sys.exit("dvpo.py: not implemented yet")
