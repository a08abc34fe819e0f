"""Watermark Triton ops vs the PyTorch reference (Triton interpreter on CPU tensors when there is no GPU; small
shapes). The words are bit-identical; bf16 / fp16 outputs of kgw_logits_triton are compared within one ulp,
because the interpreter's fp32 -> bf16 cast rounds ties away from zero where the GPU rounds them to even."""

import math

import pytest
import torch

pytest.importorskip("triton", reason="needs the triton package")

import alignops  # noqa: F401
from alignops import watermark as W
from alignops.reference import watermark as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,V,h", [(3, 1037, 1), (2, 77, 0), (1, 2100, 3)])
def test_triton_matches_reference(dtype, B, V, h):
    x = (torch.randn(B, V) * 3).to(dtype)
    ctx = torch.randint(0, 128256, (B, h))
    xd, cd = x.to(DEVICE), ctx.to(DEVICE)
    for key in (1, 2**40 + 5):
        got = W.kgw_process(xd, cd, key, gamma=0.4, delta=1.3, backend="triton").cpu()
        exp = ref.kgw_logits(x, ctx, key, 0.4, 1.3)
        if dtype in (torch.float32, torch.float64):
            assert torch.equal(got, exp)
        else:
            ulp = torch.finfo(dtype).eps * exp.float().abs().clamp_min(1)
            assert ((got.float() - exp.float()).abs() <= ulp).all()
        assert torch.equal(
            W.kgw_greedy(xd, cd, key, gamma=0.4, delta=1.3, backend="triton").cpu(),
            ref.kgw_argmax(x, ctx, key, 0.4, 1.3),
        )
        assert torch.equal(
            W.gumbel_sample(xd, cd, key, temperature=1.3, backend="triton").cpu(), ref.gumbel_argmax(x, ctx, key, 1.3)
        )


def test_triton_first_of_equal_maxima_and_infinities():
    x = torch.zeros(2, 3000, device=DEVICE)
    x[:, 2500] = 5.0
    x[:, 1700] = 5.0
    x[1] = -math.inf
    ctx = torch.zeros(2, 1, dtype=torch.int64, device=DEVICE)
    assert W.kgw_greedy(x, ctx, 3, gamma=0.0, backend="triton").tolist() == [1700, 0]


@pytest.mark.parametrize("V", [77, 2100, 17000])  # 17000: three programs per row
def test_triton_first_nan_wins_as_in_torch(V):
    from test_watermark import nan_rows

    x = nan_rows(V)
    ctx = torch.randint(0, 1000, (6, 1))
    xd, cd = x.to(DEVICE), ctx.to(DEVICE)
    assert torch.equal(W.kgw_greedy(xd, cd, 3, gamma=0.0, backend="triton").cpu(), x.argmax(-1))
    nan = x.isnan().any(-1)
    for got in (
        W.kgw_greedy(xd, cd, 3, gamma=0.5, backend="triton"),
        W.gumbel_sample(xd, cd, 3, temperature=0.7, backend="triton"),
    ):
        assert torch.equal(got.cpu()[nan], x.argmax(-1)[nan])


def test_triton_gradient_and_bad_input():
    x = torch.randn(2, 40, device=DEVICE, requires_grad=True)
    ctx = torch.zeros(2, 1, dtype=torch.int64, device=DEVICE)
    W.kgw_process(x, ctx, 1, backend="triton").sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match=r"gamma \(the green fraction\) must be in \[0, 1\]"):
        W.kgw_process(x.detach(), ctx, 1, gamma=-0.1, backend="triton")
    with pytest.raises(ValueError, match="context must have one row per row of logits"):
        W.kgw_greedy(x.detach(), ctx[:1], 1, backend="triton")
    with pytest.raises(ValueError, match="temperature must be a finite value > 0"):
        W.gumbel_sample(x.detach(), ctx, 1, temperature=-1.0, backend="triton")


def test_triton_argmax_over_several_programs_per_row():
    # V = 20000 spans three programs per row: maxima in different programs, equal maxima across programs.
    x = torch.randn(3, 20000)
    x[0, 19999] = 50.0
    x[1, 100] = x[1, 15000] = 50.0
    ctx = torch.randint(0, 20000, (3, 2))
    xd, cd = x.to(DEVICE), ctx.to(DEVICE)
    got = W.kgw_greedy(xd, cd, 8, gamma=0.0, backend="triton").cpu()
    assert got[:2].tolist() == [19999, 100]
    assert torch.equal(got, x.argmax(-1))
    assert torch.equal(W.gumbel_sample(xd, cd, 8, backend="triton").cpu(), ref.gumbel_argmax(x, ctx, 8, 1.0))
    assert torch.equal(W.kgw_greedy(xd, cd, 8, backend="triton").cpu(), ref.kgw_argmax(x, ctx, 8, 0.25, 2.0))
