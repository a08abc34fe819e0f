"""CUDA-graph capture of GPU paths run with ``check_values=False`` (README "Which ops synchronise"): each call is
warmed up, captured, replayed on new inputs written into the captured buffers, and compared with an eager
call on those inputs. Needs a GPU (bench/gpu_check.sh runs it there)."""

import pytest
import torch

import alignops
from alignops import _backend
from alignops import metrics as M

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
triton_only = pytest.mark.skipif(not _backend.triton_available(), reason="needs the triton package")
native_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _backend.cuda_compiled()), reason="needs alignops built with its CUDA kernels"
)


def _captured(fn):
    """(graph, outputs of the captured call); the warm-up on a side stream compiles the Triton kernels and
    settles the allocator, as torch.cuda.graphs asks."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _replay_matches(fn, inputs, fresh):
    """Capture fn, copy ``fresh`` into ``inputs``, replay, compare with an eager call."""
    graph, out = _captured(fn)
    for buf, new in zip(inputs, fresh):
        buf.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    expected = fn()
    for got, exp in zip(
        out if isinstance(out, (tuple, list)) else (out,),
        expected if isinstance(expected, (tuple, list)) else (expected,),
    ):
        if got is not None:
            torch.testing.assert_close(got, exp, equal_nan=True)


def test_pinned_copy_survives_replay():
    """alignops._backend.to_device: the host buffer a captured copy reads is kept, whatever is pinned later."""
    graph, out = _captured(lambda: _backend.to_device(torch.tensor([1.0, 2.0, 3.0]), "cuda") * 2)
    for _ in range(8):
        torch.full((3,), 7.0).pin_memory()
    graph.replay()
    torch.testing.assert_close(out.cpu(), torch.tensor([2.0, 4.0, 6.0]))


@pytest.mark.parametrize(
    "backend", [pytest.param("triton", marks=triton_only), pytest.param("native", marks=native_cuda)]
)
def test_selective_logprobs(backend):
    logits = torch.randn(64, 1000, device="cuda")
    targets = torch.randint(0, 1000, (64,), device="cuda")
    _replay_matches(
        lambda: alignops.selective_logprobs(logits, targets, backend=backend, check_values=False),
        (logits, targets),
        (torch.randn_like(logits), torch.randint_like(targets, 0, 1000)),
    )


@triton_only
def test_fused_linear_logprobs():
    hidden, weight = torch.randn(32, 64, device="cuda"), torch.randn(500, 64, device="cuda")
    targets = torch.randint(0, 500, (32,), device="cuda")
    _replay_matches(
        lambda: alignops.fused_linear_logprobs(hidden, weight, targets, backend="triton", check_values=False).logp,
        (hidden, targets),
        (torch.randn_like(hidden), torch.randint_like(targets, 0, 500)),
    )


@triton_only
def test_ctc_loss():
    lp = torch.randn(4, 50, 20, device="cuda").log_softmax(-1)
    targets = torch.randint(1, 20, (4, 12), device="cuda")
    il = torch.tensor([50, 45, 40, 50], device="cuda")
    tl = torch.tensor([12, 10, 8, 5], device="cuda")
    _replay_matches(
        lambda: alignops.ctc_loss(lp, targets, il, tl, reduction="none", backend="triton", check_values=False),
        (lp,),
        (torch.randn_like(lp).log_softmax(-1),),
    )


@native_cuda
def test_forced_align():
    lp = torch.randn(3, 60, 16, device="cuda").log_softmax(-1)
    targets = torch.randint(1, 16, (3, 10), device="cuda")
    tl = torch.tensor([10, 8, 6], device="cuda")
    _replay_matches(
        lambda: alignops.ctc.forced_align(lp, targets, target_lengths=tl, check_values=False, on_infeasible="skip"),
        (lp,),
        (torch.randn_like(lp).log_softmax(-1),),
    )


@triton_only
def test_cohen_kappa_bootstrap():
    a = torch.randint(0, 3, (5, 200), device="cuda")
    b = torch.randint(0, 3, (200,), device="cuda")
    _replay_matches(
        lambda: M.cohen_kappa(a, b, 3, n_bootstrap=16, backend="triton", check_values=False),
        (a,),
        (torch.randint_like(a, 0, 3),),
    )


@triton_only
@pytest.mark.parametrize("shape", [(8, 24, 20), (1, 300, 280)])  # one tile per problem; the split path
def test_sinkhorn_with_eps_scaling(shape):
    cost = torch.rand(*shape, device="cuda")
    _replay_matches(
        lambda: alignops.ot.sinkhorn(
            cost, eps=0.05, n_iters=30, eps_scaling=0.5, cost_range=1.0, backend="triton", check_values=False
        )[:2],
        (cost,),
        (torch.rand_like(cost),),
    )


@triton_only
def test_compile_fullgraph_inductor():
    """The epsilon schedule of a compiled call is a constant of the graph; nothing reads the cost range."""
    cost = torch.rand(4, 24, 20, device="cuda")

    def ot(c):
        return alignops.ot.sinkhorn(
            c, eps=0.05, n_iters=30, eps_scaling=0.5, cost_range=1.0, backend="triton", check_values=False
        ).f

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(ot, fullgraph=True)(cost), ot(cost))
