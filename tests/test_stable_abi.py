"""The LibTorch stable-ABI build of preference_loss (csrc/stable/preference_stable.cpp, docs/stable-abi.md).

``alignops_stable::preference_loss`` is built once, against torch 2.14 headers with TORCH_TARGET_VERSION = 2.10,
and .ci/stable_abi.sh runs this file with that one .so under torch 2.14.1 and under torch 2.13.0+cpu. Under
2.14 (the main venv) it is compared with ``alignops.preference_loss`` and the native ``alignops::preference_loss``
op; under every torch it is compared with the pure-PyTorch reference (python/alignops/reference/preference.py),
which is loaded without alignops/__init__.py where alignops has no build for the running torch (2.13: run with
``pytest --noconftest``, the suite's conftest imports alignops).

Skips, with the reason, only when the .so has not been built.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT / "build_tools"))
import stable_abi  # noqa: E402

if not stable_abi.so_path().exists():
    pytest.skip(f"stable-ABI .so not built ({stable_abi.so_path()}): run .ci/stable_abi.sh", allow_module_level=True)

# Before stable_abi.load(), which leaves a stand-in alignops package where the import fails.
try:
    import alignops

    HAVE_ALIGNOPS = True
except (ImportError, RuntimeError, OSError):  # no alignops build for this torch (the 2.13 leg of stable_abi.sh)
    HAVE_ALIGNOPS = False

OP = stable_abi.load()


# Both import only torch and alignops._errors: stable_abi loads them without alignops's build where it has none.
ref = stable_abi.alignops_module("alignops.reference.preference")
_codes = stable_abi.alignops_module("alignops._codes")
LossType, FDivergence = _codes.LossType, _codes.FDivergence
needs_alignops = pytest.mark.skipif(not HAVE_ALIGNOPS, reason=f"no alignops build for torch {torch.__version__}")

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}
# The reference's name of each code; AOT is compared with the native op only (the reference sorts its inputs).
REF_NAME = {code: code.name.lower() for code in LossType if code is not LossType.AOT}
NEEDS_LENGTHS = {LossType.IPO, LossType.SIGMOID_NORM, LossType.SIMPO}


@pytest.fixture(autouse=True)
def _seed():  # the suite's conftest seeds too, but it is off (--noconftest) under torch 2.13
    torch.manual_seed(0)


def _inputs(B=37, dtype=torch.float32, grad=True):
    # Log-probs of whole sequences: negative, tens of nats apart.
    xs = [(-torch.rand(B, dtype=torch.float64) * 30).to(dtype) for _ in range(4)]
    return [x.requires_grad_(grad) for x in xs]


def _call(
    pc,
    pr,
    rc,
    rr,
    codes,
    weights=None,
    *,
    beta=None,
    lc=None,
    lr=None,
    beta_value=0.1,
    eps=0.0,
    gamma=0.5,
    tau=0.05,
    fdiv=0,
    alpha=0.5,
    compute_grad=True,
    op=None,
):
    op = op or OP
    weights = [1.0] * len(codes) if weights is None else weights
    return op(
        pc,
        pr,
        rc,
        rr,
        beta,
        lc,
        lr,
        [int(c) for c in codes],
        weights,
        beta_value,
        eps,
        gamma,
        tau,
        fdiv,
        alpha,
        compute_grad,
    )


def _lengths(B):
    return torch.randint(0, 40, (B,)).float(), torch.randint(1, 40, (B,)).float()  # 0 is clamped to 1


# ---- against the reference (every torch) ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("code", list(REF_NAME))
def test_matches_reference_each_loss_type(code, dtype):
    pc, pr, rc, rr = _inputs(dtype=dtype)
    B = pc.shape[0]
    lc, lr = _lengths(B) if code in NEEDS_LENGTHS else (None, None)
    eps = 0.1 if code in (LossType.SIGMOID, LossType.EXO_PAIR, LossType.ROBUST, LossType.SIMPO, LossType.CPO) else 0.0
    loss, cr, rj, _ = _call(pc, pr, rc, rr, [code], lc=lc, lr=lr, eps=eps, beta_value=0.2)
    assert loss.dtype == dtype and loss.shape == (B,)
    want, want_cr, want_rj = ref.preference_loss(
        pc, pr, rc, rr, REF_NAME[code], 0.2, eps, chosen_lengths=lc, rejected_lengths=lr, reduction="none"
    )
    torch.testing.assert_close(loss, want, **TOL[dtype])
    torch.testing.assert_close(cr, want_cr, **TOL[dtype])
    torch.testing.assert_close(rj, want_rj, **TOL[dtype])
    w = torch.randn(B, dtype=dtype)
    got = torch.autograd.grad((loss * w).sum(), (pc, pr, rc, rr))
    # Reference-free types (simpo, cpo) leave the reference log-probs out of the reference's graph: zero gradient.
    expected = torch.autograd.grad((want * w).sum(), (pc, pr, rc, rr), allow_unused=True)
    for g, e, x in zip(got, expected, (pc, pr, rc, rr)):
        torch.testing.assert_close(g, torch.zeros_like(x) if e is None else e, **TOL[dtype])


@pytest.mark.parametrize("fdiv", list(FDivergence))
def test_matches_reference_f_divergences_and_per_pair_beta(fdiv):
    pc, pr, rc, rr = _inputs(dtype=torch.float64)
    # Small log-ratios: forward KL's exp(-x) would overflow on the tens-of-nats ones.
    pc, pr = (pc.detach() * 0.01 + rc.detach()).requires_grad_(), (pr.detach() * 0.01 + rr.detach()).requires_grad_()
    beta = torch.rand(pc.shape[0], dtype=torch.float64) + 0.05
    codes = [LossType.SIGMOID, LossType.HINGE, LossType.IPO]
    loss, *_ = _call(pc, pr, rc, rr, codes, [1.0, 0.5, 0.25], beta=beta, fdiv=int(fdiv), alpha=0.7)
    want, *_ = ref.preference_loss(
        pc,
        pr,
        rc,
        rr,
        ["sigmoid", "hinge", "ipo"],
        beta,
        loss_weights=[1.0, 0.5, 0.25],
        f_divergence_type=fdiv.name.lower(),
        f_alpha_divergence_coef=0.7,
        reduction="none",
    )
    torch.testing.assert_close(loss, want, **TOL[torch.float64])
    got = torch.autograd.grad(loss.sum(), (pc, pr, rc, rr))
    expected = torch.autograd.grad(want.sum(), (pc, pr, rc, rr))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    pc, pr, rc, rr = _inputs(dtype=dtype)
    loss, cr, _, _ = _call(pc, pr, rc, rr, [LossType.SIGMOID])
    assert loss.dtype == torch.float32 and cr.dtype == torch.float32
    want, want_cr, _ = ref.preference_loss(pc, pr, rc, rr, "sigmoid", 0.1, reduction="none")  # upcasts the same way
    torch.testing.assert_close(loss, want, **TOL[torch.float32])
    torch.testing.assert_close(cr, want_cr, **TOL[torch.float32])
    (g_pc,) = torch.autograd.grad(loss.sum(), pc)
    assert g_pc.dtype == dtype  # gradients come back in the input dtype, as for the native op


def test_non_contiguous_inputs_and_integer_lengths():
    big = [(-torch.rand(2 * 29, dtype=torch.float64) * 30) for _ in range(4)]
    pc, pr, rc, rr = (x[::2] for x in big)
    assert not pc.is_contiguous()
    lc, lr = torch.randint(1, 30, (29,)), torch.randint(1, 30, (29,))  # int64: converted to fp64 by the op
    loss, *_ = _call(pc, pr, rc, rr, [LossType.SIGMOID_NORM], lc=lc, lr=lr)
    want, *_ = ref.preference_loss(
        pc, pr, rc, rr, "sigmoid_norm", 0.1, chosen_lengths=lc, rejected_lengths=lr, reduction="none"
    )
    torch.testing.assert_close(loss, want, **TOL[torch.float64])


def test_gradcheck_fp64():
    pc, pr, rc, rr = _inputs(B=6, dtype=torch.float64)
    codes, weights = [LossType.SIGMOID, LossType.DISCOPOP, LossType.APO_DOWN], [1.0, 0.3, 0.2]
    assert torch.autograd.gradcheck(lambda *x: _call(*x, codes, weights, beta_value=0.5)[0], (pc, pr, rc, rr))


def test_opcheck():
    pc, pr, rc, rr = _inputs(B=9)
    args = (pc, pr, rc, rr, None, None, None, [0, 2], [1.0, 0.5], 0.1, 0.0, 0.5, 0.05, 0, 0.5, True)
    torch.library.opcheck(OP, args)


def test_backward_without_compute_grad_raises():
    pc, pr, rc, rr = _inputs(B=4)
    loss, *_ = _call(pc, pr, rc, rr, [LossType.SIGMOID], compute_grad=False)
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss.sum().backward()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(pr=torch.zeros(3)), r"policy_rejected_logps must have the shape of policy_chosen_logps"),
        (
            lambda a: a.update(rc=torch.zeros(5, dtype=torch.float64)),
            r"ref_chosen_logps must have the dtype of "
            r"policy_chosen_logps \(torch\.float32\), got torch\.float64",
        ),
        (
            lambda a: a.update(pc=torch.zeros(5, 2)),
            r"policy_chosen_logps must be a 1-D tensor of shape \[B\], got "
            r"shape \[5, 2\]",
        ),
        (
            lambda a: a.update(pc=torch.zeros(5, dtype=torch.int64)),
            "policy_chosen_logps must be float32, float64, float16 or bfloat16, got torch.int64",
        ),
        (
            lambda a: a.update(weights=[1.0, 2.0]),
            "loss_weights must have one weight per loss type: got 2 weights for 1 loss types",
        ),
        (lambda a: a.update(codes=[15], weights=[1.0]), r"loss type code must be in \[0, 15\), got 15"),
        (lambda a: a.update(fdiv=4), r"f_divergence code must be in \[0, 3\], got 4"),
        (lambda a: a.update(beta=torch.ones(4)), r"beta must have the shape of policy_chosen_logps \[5\]"),
        (
            lambda a: a.update(beta=torch.ones(5, dtype=torch.bool)),
            "beta must be a real numeric tensor, got torch.bool",
        ),
    ],
)
def test_bad_inputs(mutate, match):
    a = dict(
        pc=torch.zeros(5),
        pr=torch.zeros(5),
        rc=torch.zeros(5),
        rr=torch.zeros(5),
        codes=[0],
        weights=[1.0],
        beta=None,
        fdiv=0,
    )
    mutate(a)
    # RuntimeError, not the native op's ValueError: STD_TORCH_CHECK throws std::runtime_error (docs/stable-abi.md).
    with pytest.raises(RuntimeError, match=match):
        _call(a["pc"], a["pr"], a["rc"], a["rr"], a["codes"], a["weights"], beta=a["beta"], fdiv=a["fdiv"])


# ---- against today's alignops (where alignops is built for this torch) -----------------------------------------


@needs_alignops
@pytest.mark.parametrize("name", ["preference_loss", "selective_logprobs", "selective_logprobs_backward"])
def test_schema_matches_native_op(name):
    # The stable library declares its ops again, in its own namespace (csrc/stable/preference_stable.cpp: the .so
    # and _C load together); this keeps the two declarations from drifting apart.
    stable = getattr(torch.ops.alignops_stable, name).default._schema
    native = getattr(torch.ops.alignops, name).default._schema
    assert str(stable).replace("alignops_stable::", "alignops::", 1) == str(native)


@needs_alignops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("code", list(LossType))
def test_matches_native_op(code, dtype):
    pc, pr, rc, rr = _inputs(B=53, dtype=dtype, grad=False)
    B = pc.shape[0]
    lc, lr = _lengths(B)
    beta = torch.rand(B) + 0.05
    kw = dict(beta=beta, lc=lc, lr=lr, eps=0.1 if code not in (LossType.ROBUST,) else 0.2, gamma=0.3)
    got = _call(pc, pr, rc, rr, [code, LossType.SIGMOID], [0.7, 0.3], **kw)
    want = _call(pc, pr, rc, rr, [code, LossType.SIGMOID], [0.7, 0.3], op=torch.ops.alignops.preference_loss, **kw)
    # The native kernel evaluates the same formulas on Vectorized lanes (SLEEF exp / log1p): not bit-equal.
    tol = TOL[torch.float64 if dtype == torch.float64 else torch.float32]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, **tol)


@needs_alignops
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "bco_pair", "discopop"])
def test_matches_public_preference_loss_and_its_gradients(loss_type):
    pc, pr, rc, rr = _inputs(B=64)
    lc, lr = _lengths(64)
    out = alignops.preference_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type=loss_type,
        beta=0.1,
        chosen_lengths=lc,
        rejected_lengths=lr,
        reduction="none",
        backend="native",
    )
    loss, cr, rj, _ = _call(pc, pr, rc, rr, [LossType[loss_type.upper()]], lc=lc, lr=lr)
    torch.testing.assert_close(loss, out.loss, **TOL[torch.float32])
    torch.testing.assert_close(cr, out.chosen_rewards, **TOL[torch.float32])
    torch.testing.assert_close(rj, out.rejected_rewards, **TOL[torch.float32])
    got = torch.autograd.grad(loss.mean(), (pc, pr, rc, rr))
    expected = torch.autograd.grad(out.loss.mean(), (pc, pr, rc, rr))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL[torch.float32])


# ---- selective_logprobs ----------------------------------------------------------------------------------------

SEL = torch.ops.alignops_stable.selective_logprobs
SEL_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-5),  # logp in fp32 from the same bf16 logits
}


def _logits(N=13, V=301, dtype=torch.float32, grad=True):
    x = (torch.randn(N, V, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, V, (N,))
    y[3] = -100  # one ignored row
    return x.requires_grad_(grad), y


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1e-3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_selective_logprobs_matches_reference(dtype, temperature):
    x, y = _logits(dtype=dtype)
    logp, lse = SEL(x, y, -100, temperature)
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = ref.selective_logprobs(x, y, -100, temperature)
    torch.testing.assert_close(logp, want, **SEL_TOL[dtype])
    keep = y != -100
    torch.testing.assert_close(
        lse[keep], torch.logsumexp(x.detach()[keep].to(lse.dtype) / temperature, -1), **SEL_TOL[dtype]
    )
    w = torch.randn(x.shape[0], dtype=logp.dtype)
    (got,) = torch.autograd.grad((logp * w).sum(), x)
    (expected,) = torch.autograd.grad((want * w).sum(), x)
    assert got.dtype == dtype
    # bf16 gradients: both round the same fp32 values to bf16, at most one bf16 ulp apart.
    tol = dict(rtol=1e-2, atol=1e-5) if dtype == torch.bfloat16 else SEL_TOL[dtype]
    torch.testing.assert_close(got, expected, **tol)


def test_selective_logprobs_int32_targets_and_non_contiguous_logits():
    x = torch.randn(40, 17, dtype=torch.float64).t()  # [17, 40], not contiguous
    y = torch.randint(0, 40, (17,), dtype=torch.int32)
    logp, _ = SEL(x, y, -1, 1.0)
    torch.testing.assert_close(logp, ref.selective_logprobs(x, y, -1, 1.0), **SEL_TOL[torch.float64])


def test_selective_logprobs_gradcheck_and_opcheck():
    x, y = _logits(N=4, V=9, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: SEL(z, y, -100, 0.5)[0], (x,))
    torch.library.opcheck(SEL, (x, y, -100, 0.5))
    torch.library.opcheck(
        torch.ops.alignops_stable.selective_logprobs_backward,
        (torch.randn(4, dtype=torch.float64), x.detach(), y, torch.randn(4, dtype=torch.float64), -100, 0.5),
    )


@pytest.mark.parametrize(
    "args, match",
    [
        (
            (torch.zeros(3, 4), torch.tensor([0, 4, 1]), -100, 1.0),
            r"targets\[1\] = 4 is out of range: targets must "
            r"lie in \[0, 4\) or equal ignore_index",
        ),
        (
            (torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), -100, 1.0),
            r"targets must have one entry per row of "
            r"logits \[N=3\], got 2",
        ),
        ((torch.zeros(3, 4), torch.zeros(3), -100, 1.0), "targets must be int64 or int32, got torch.float32"),
        (
            (torch.zeros(3), torch.zeros(3, dtype=torch.long), -100, 1.0),
            r"logits must be a 2-D tensor of shape "
            r"\[N, V\], got shape \[3\]",
        ),
        ((torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), -100, 0.0), "temperature must be a finite value > 0"),
    ],
)
def test_selective_logprobs_bad_inputs(args, match):
    with pytest.raises(RuntimeError, match=match):
        SEL(*args)


@needs_alignops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_selective_logprobs_matches_native_op(dtype):
    x, y = _logits(N=33, V=1000, dtype=dtype, grad=False)
    got = SEL(x, y, -100, 0.9)
    want = torch.ops.alignops.selective_logprobs(x, y, -100, 0.9)
    tol = SEL_TOL.get(dtype, SEL_TOL[torch.float32])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)
    grad = torch.randn(33, dtype=got[0].dtype)
    g_stable = torch.ops.alignops_stable.selective_logprobs_backward(grad, x, y, got[1], -100, 0.9)
    g_native = torch.ops.alignops.selective_logprobs_backward(grad, x, y, want[1], -100, 0.9)
    low = dtype in (torch.float16, torch.bfloat16)  # one ulp of the output dtype apart at most
    torch.testing.assert_close(g_stable, g_native, **(dict(rtol=1e-2, atol=1e-5) if low else tol))
