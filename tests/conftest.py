import os

import pytest
import torch

# The Triton kernels run in the interpreter on CPU tensors when there is no GPU. The variable must be set
# before triton is first imported (alignops imports it), hence here, at collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import alignops  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
