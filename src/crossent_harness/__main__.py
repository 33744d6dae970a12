"""``python -m crossent_harness`` is the ``crossent`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
