import os

import pytest
import torch

# The Triton kernels run in the interpreter on CPU tensors when there is no GPU. The variable must be set
# before triton is first imported (alignops does when a Triton backend is first asked for), hence here, at
# collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import alignops  # noqa: F401


def import_without_repo_kernels(name: str):
    """Import module ``name`` (TRL, transformers, ...) with this checkout's root off sys.path (the bench's
    ``import_peer``: transformers imports the Hub's ``kernels`` package, which the repository's own ``kernels/``
    folder would shadow). Skips the test when the module's package is missing."""
    pytest.importorskip(name.split(".")[0])
    from alignops.bench.common import import_peer

    return import_peer(name)


@pytest.fixture(scope="session")
def import_peer():
    """:func:`import_without_repo_kernels` as a fixture: ``trl = import_peer("trl.trainer.dpo_trainer")``."""
    return import_without_repo_kernels


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # the property tests skip themselves without hypothesis
    pass
else:
    # Reproducible CI: the same examples every run, no example database, no deadline (first calls load kernels).
    _hypothesis_settings.register_profile("alignops", derandomize=True, database=None, deadline=None, print_blob=True)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "alignops"))
