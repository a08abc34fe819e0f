import os

import pytest
import torch

# The Triton kernels run in the interpreter on CPU tensors when there is no GPU. The variable must be set
# before triton is first imported (alignops imports it), hence here, at collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import alignops  # noqa: F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # the property tests skip themselves without hypothesis
    pass
else:
    # Reproducible CI: the same examples every run, no example database, no deadline (first calls load kernels).
    _hypothesis_settings.register_profile("alignops", derandomize=True, database=None, deadline=None,
                                          print_blob=True)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "alignops"))
