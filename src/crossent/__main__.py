"""``python -m crossent`` names the command; the library itself has none (it never imports the harness)."""

import sys

if __name__ == "__main__":
    print("crossent is a library; its command is `crossent` (or `python -m crossent_harness`)", file=sys.stderr)
    raise SystemExit(2)
