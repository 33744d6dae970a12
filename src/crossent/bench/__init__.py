"""Benchmarks that ship with the library (``crossent bench``); each module exposes ``add_arguments`` and ``run``."""
