"""ppo_baseline.py — not implemented yet (see the open issues)."""
import sys

if __name__ == "__main__":
    sys.exit("ppo_baseline.py: not implemented yet")
