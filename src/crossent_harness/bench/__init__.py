"""The benchmarks of ``crossent bench``; each module exposes ``add_arguments`` and ``run``."""
