"""The research harness of crossent: the ``crossent`` command (``losses``, ``bench``, ``compare``), its
benchmarks (:mod:`crossent_harness.bench`) and its experiments (:mod:`crossent_harness.experiments`).

The harness uses the library through its public API; the library never imports the harness, so
``import crossent`` pays for none of this. ``python -m crossent_harness`` is the ``crossent`` command.
"""
