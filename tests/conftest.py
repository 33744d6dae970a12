"""Test-suite settings.

* Under CI, hypothesis runs a fixed set of examples (reproducible runs).
* ``one_thread``: modules of tiny tensors ask for it (``pytestmark = pytest.mark.usefixtures("one_thread")``);
  a second intra-op thread only adds synchronisation there, which is slow when the cores are shared.
* Without a GPU, the Triton kernels run in Triton's interpreter (NumPy on CPU tensors). Triton reads
  ``TRITON_INTERPRET`` when it is first imported (its own library functions are defined then), so it
  is set here, before any test imports it.
"""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
