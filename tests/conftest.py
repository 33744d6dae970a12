"""Test-suite settings: under CI, hypothesis runs a fixed set of examples (reproducible runs)."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
