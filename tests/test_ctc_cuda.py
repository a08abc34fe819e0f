"""ctc family on a CUDA device: the CUDA kernel gives the CPU kernel's paths and scores bit for bit."""

import pytest
import torch
from test_ctc import random_batch

from alignops import ctc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory", ["full", "checkpointed"])
@pytest.mark.parametrize("shape", [(6, 57, 7, 19), (3, 400, 40, 150), (2, 2400, 12, 1100)])
def test_cuda_equals_cpu(dtype, memory, shape):
    B, T, C, L = shape
    if 2 * L > T:
        L = T // 3
    lp, tg, il, tl = random_batch(B, T, C, L, dtype=dtype, repeat_rate=0.2, seed=B + T)
    cpu = ctc.forced_align(lp, tg, il, tl, memory=memory, checkpoint_interval=13)
    gpu = ctc.forced_align(lp.cuda(), tg.cuda(), il.cuda(), tl.cuda(), memory=memory, checkpoint_interval=13)
    assert torch.equal(cpu[0], gpu[0].cpu())
    assert torch.equal(cpu[1], gpu[1].cpu())


def test_cuda_star_infeasible_and_bad_input():
    lp, tg, il, tl = random_batch(4, 60, 6, 12, seed=5)
    tg[:, 0] = 6
    cpu = ctc.forced_align(lp, tg, il, tl, star_token=6, star_penalty=-0.5)
    gpu = ctc.forced_align(lp.cuda(), tg.cuda(), il, tl, star_token=6, star_penalty=-0.5)
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
    short = torch.randn(2, 4, 4, device="cuda").log_softmax(-1)
    tgt = torch.tensor([[1, 2, 3], [1, 1, 1]], device="cuda")
    with pytest.raises(ValueError, match=r"no alignment fits rows \[1\]"):
        ctc.forced_align(short, tgt)
    with pytest.raises(ValueError, match=r"targets\[0, 1\] = 9 is outside \[0, 4\)"):
        ctc.forced_align(short, torch.tensor([[1, 9]], device="cuda").expand(2, 2))
