"""preference family on a GPU: the CUDA C++ and the Triton kernels against the reference and the CPU
kernel. Needs a CUDA device (run by bench/gpu_check.sh on the GPU machine); on a CPU-only machine
these tests do not apply, and the Triton kernels are covered in the interpreter instead
(tests/test_preference_triton.py)."""

import pytest
import torch

import alignops
from alignops.reference import preference as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1}


def backends():
    out = []
    if torch.cuda.is_available() and torch.ops.alignops.cuda_archs():
        out.append("native")
    out.append("triton")
    return out


def make_logps(B, dtype):
    base = -60 + 10 * torch.randn(B, dtype=torch.float64)
    return [
        (base + off + torch.randn(B, dtype=torch.float64)).to(dtype).cuda().requires_grad_(True)
        for off in (0.0, -3.0, 0.5, -2.0)
    ]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", alignops.LOSS_TYPES)
def test_preference_loss_cuda(backend, dtype, loss_type):
    B = 1031
    inputs = make_logps(B, dtype)
    lc = torch.randint(1, 100, (B,), device="cuda")
    lr = torch.randint(1, 100, (B,), device="cuda")
    kw = dict(
        loss_type=loss_type,
        beta=0.2,
        label_smoothing=SMOOTHING.get(loss_type, 0.0),
        chosen_lengths=lc,
        rejected_lengths=lr,
        reduction="none",
    )
    out = alignops.preference_loss(*inputs, **kw, backend=backend)
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    exp, cr, rj = ref.preference_loss(*ref_inputs, **kw)
    torch.testing.assert_close(out.loss, exp, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out.chosen_rewards, cr, rtol=2e-5, atol=2e-5)
    w = torch.rand(B, device="cuda")
    (out.loss * w).sum().backward()
    (exp * w).sum().backward()
    for got, want in zip(inputs, ref_inputs):
        want_grad = torch.zeros_like(got) if want.grad is None else want.grad
        tol = (1e-2, 1e-5) if dtype == torch.bfloat16 else (2e-5, 2e-5)
        torch.testing.assert_close(got.grad.float(), want_grad.float(), rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("backend", backends())
def test_preference_loss_cuda_matches_cpu_kernel_fp64(backend):
    inputs = [t.double() for t in make_logps(513, torch.float32)]
    beta = torch.rand(513, device="cuda", dtype=torch.float64) + 0.05
    kw = dict(
        loss_type=["sigmoid", "ipo", "discopop"],
        loss_weights=[1, 0.1, 0.5],
        beta=beta,
        chosen_lengths=torch.full((513,), 7.0, device="cuda", dtype=torch.float64),
        rejected_lengths=torch.full((513,), 9.0, device="cuda", dtype=torch.float64),
        reduction="none",
    )
    gpu = alignops.preference_loss(*inputs, **kw, backend=backend).loss
    cpu_kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    cpu = alignops.preference_loss(*[t.detach().cpu() for t in inputs], **cpu_kw, backend="native").loss
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 1000), (64, 32000), (33, 128256), (3, 1)])
def test_selective_logprobs_cuda(backend, dtype, shape):
    N, V = shape
    logits = (3 * torch.randn(N, V, device="cuda")).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[N // 2] = -100
    got = alignops.selective_logprobs(logits, targets, temperature=0.7, backend=backend)
    ref_logits = logits.detach().clone().requires_grad_(True)
    exp = ref.selective_logprobs(ref_logits, targets, temperature=0.7)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=5e-5)
    g = torch.randn(N, device="cuda")
    (got * g).sum().backward()
    (exp * g).sum().backward()
    tol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-2, 1e-5), torch.float16: (1e-3, 1e-6)}[dtype]
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad.float(), rtol=tol[0], atol=tol[1])
    assert torch.all(logits.grad[N // 2] == 0)


@pytest.mark.parametrize("backend", backends())
def test_selective_logprobs_cuda_masked_and_bad_targets(backend):
    logits = torch.randn(4, 300, device="cuda")
    logits[:, :150] = float("-inf")
    targets = torch.tensor([160, 200, 299, -100], device="cuda")
    got = alignops.selective_logprobs(logits, targets, backend=backend)
    torch.testing.assert_close(got, ref.selective_logprobs(logits, targets))
    with pytest.raises(ValueError, match=r"targets\[2\] = 300 is out of range"):
        alignops.selective_logprobs(logits, torch.tensor([0, 1, 300, 3], device="cuda"), backend=backend)


def test_selective_logprobs_cuda_no_vocab_sized_temporary():
    N, V = 2048, 128256
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, V, (N,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    alignops.selective_logprobs(logits, targets)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < N * V  # well under one bf16 [N, V] copy


def test_opcheck_cuda():
    inputs = make_logps(9, torch.float32)
    torch.library.opcheck(
        torch.ops.alignops.preference_loss.default,
        (*inputs, None, None, None, [0, 2], [1.0, 0.5], 0.1, 0.0, 0.5, 0.05, 0, 0.5, True),
    )
    logits = torch.randn(6, 33, device="cuda", requires_grad=True)
    torch.library.opcheck(
        torch.ops.alignops.selective_logprobs.default, (logits, torch.randint(0, 33, (6,), device="cuda"), -100, 1.0)
    )


def test_compile_inductor_cuda():
    logits = torch.randn(64, 1000, device="cuda", requires_grad=True)
    targets = torch.randint(0, 1000, (64,), device="cuda")
    fn = torch.compile(lambda x, y: alignops.selective_logprobs(x, y).sum(), fullgraph=True)
    fn(logits, targets).backward()
    exp_logits = logits.detach().clone().requires_grad_(True)
    ref.selective_logprobs(exp_logits, targets).sum().backward()
    torch.testing.assert_close(logits.grad, exp_logits.grad)
