"""bootstrap_confusion_triton vs the native op and the reference (Triton interpreter on CPU tensors when there is
no GPU; small shapes)."""

import pytest
import torch

pytest.importorskip("triton", reason="needs the triton package")

import alignops  # noqa: F401
from alignops import metrics as M
from alignops.reference import metrics as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("P,N,C,R,shared", [(3, 47, 2, 5, False), (2, 300, 4, 3, True), (1, 1, 1, 2, False)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_triton_matches_reference(P, N, C, R, shared, dtype):
    a = torch.randint(0, C, (P, N), dtype=dtype)
    b = torch.randint(0, C, (1 if shared else P, N), dtype=dtype)
    out = torch.ops.alignops.bootstrap_confusion_triton(a.to(DEVICE), b.to(DEVICE), C, R, 77).cpu()
    assert torch.equal(out, ref.bootstrap_confusion(a, b, C, R, 77))
    assert torch.equal(out, torch.ops.alignops.bootstrap_confusion(a, b, C, R, 77))


def test_triton_kappa_public_api():
    a, b = torch.randint(0, 3, (4, 60)), torch.randint(0, 3, (60,))
    got = M.cohen_kappa(a.to(DEVICE), b.to(DEVICE), 3, weights="quadratic", n_bootstrap=8, seed=5, backend="triton")
    exp = M.cohen_kappa(a, b, 3, weights="quadratic", n_bootstrap=8, seed=5, backend="native")
    # The counts are bit-identical (test above); the kappas are fp64 arithmetic on them, which a GPU rounds
    # in its own order (seen on an H200: last-bit differences).
    torch.testing.assert_close(got.resamples.cpu(), exp.resamples, rtol=1e-13, atol=1e-15)


def test_triton_empty_and_bad_input():
    e = torch.zeros(0, 5, dtype=torch.int64, device=DEVICE)
    assert torch.ops.alignops.bootstrap_confusion_triton(e, e, 2, 1, 0).shape == (0, 2, 2, 2)
    a = torch.randint(0, 3, (2, 10), device=DEVICE)
    with pytest.raises(ValueError, match=r"num_classes must be in \[1, 16\] for the Triton kernel"):
        torch.ops.alignops.bootstrap_confusion_triton(a, a, 17, 0, 0)
    # The op reads nothing back; the public function checks the labels.
    with pytest.raises(ValueError, match=r"b must hold class labels in \[0, num_classes\) = \[0, 3\)"):
        M.confusion_matrices(a, a + 1, 3, backend="triton")
    with pytest.raises(ValueError, match="a must be int64 or int32"):
        torch.ops.alignops.bootstrap_confusion_triton(a.float(), a.float(), 3, 0, 0)
