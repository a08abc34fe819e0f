"""The Triton utterance-score op against the native op and the reference. Without a GPU it runs in the
Triton interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1); shapes are small."""

import pytest
import torch

import alignops
from alignops.reference import ctc_segmentation as ref

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not alignops._backend.triton_available(), reason="needs the triton package"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("window", [1, 5, 30])
def test_utterance_score_triton_matches_native_and_reference(dtype, window):
    cp = (torch.randn(3, 97, dtype=torch.float64) - 1).to(dtype)
    starts = torch.randint(0, 97, (3, 7))
    ends = (starts + torch.randint(-4, 60, (3, 7))).clamp(max=97)
    starts[0, 0], ends[0, 0] = 10, 10  # empty span
    starts[1, 0], ends[1, 0] = 0, 97  # the whole row
    native = alignops.ctc.utterance_score(cp, starts, ends, window=window)
    got = alignops.ctc.utterance_score(
        cp.to(DEVICE), starts.to(DEVICE), ends.to(DEVICE), window=window, backend="triton"
    )
    assert got.dtype == torch.float64 and got.shape == (3, 7)
    torch.testing.assert_close(got.cpu(), native, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.cpu(), ref.utterance_score(cp, starts, ends, window), rtol=1e-12, atol=1e-12)
    assert got[0, 0] == -1e10


def test_utterance_score_triton_1d_and_window_edges():
    cp = torch.arange(40, dtype=torch.float64).neg().to(DEVICE)
    s, e = torch.tensor([0, 0, 5], device=DEVICE), torch.tensor([30, 31, 40], device=DEVICE)
    got = alignops.ctc.utterance_score(cp, s, e, window=30, backend="triton").cpu()
    # e - s = 30: the span's mean; 31: only the window starting at s; 35 > 30: windows 5..9, last one left out.
    want = torch.tensor([cp[:30].mean(), cp[:30].mean(), cp[9:39].mean()], dtype=torch.float64).cpu()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_utterance_score_triton_bad_input():
    op = torch.ops.alignops.ctc_segmentation_utterance_score_triton
    cp = torch.zeros(2, 10, device=DEVICE)
    s = torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="frame_logprobs must be float32 or float64"):
        op(cp.to(torch.int32), s, s, 30)
    with pytest.raises(ValueError, match="ends must have the shape of starts"):
        op(cp, s, s[:, :2], 30)
    with pytest.raises(ValueError, match="starts must be int64"):
        op(cp, s.int(), s.int(), 30)
    with pytest.raises(ValueError, match="window must be >= 1"):
        op(cp, s, s, 0)
    with pytest.raises(ValueError, match=r"utterance 1, 2: a non-empty span \[start, end\) must lie in \[0, T\]"):
        ends = s.clone()
        ends[1, 2] = 11
        alignops.ctc.utterance_score(cp, s, ends, backend="triton")


# The interpreter cannot run on fake tensors, so on CPU the fake-tensor checks are left to the GPU run.
OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration")
    if DEVICE == "cpu"
    else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
)


def test_utterance_score_triton_opcheck():
    cp = torch.randn(2, 50, dtype=torch.float64, device=DEVICE)
    s = torch.tensor([[0, 3], [10, 5]], device=DEVICE)
    e = torch.tensor([[40, 20], [50, 2]], device=DEVICE)
    torch.library.opcheck(
        torch.ops.alignops.ctc_segmentation_utterance_score_triton.default, (cp, s, e, 30), test_utils=OPCHECK_UTILS
    )


def test_utterance_score_triton_nan_frame_as_the_package():
    from test_ctc_segmentation import check_nan_frame_as_the_package

    check_nan_frame_as_the_package("triton", DEVICE, seed=4, trials=12, T=30, max_window=8)
