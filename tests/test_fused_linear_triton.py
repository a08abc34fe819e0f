"""The Triton fused_linear_logprobs ops against the reference (python/alignops/reference/preference.py). Without a
GPU they run in the Triton interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 before triton
is imported); shapes are small because the interpreter is slow, and ``VOCAB_TILE`` is forced small so that
the vocabulary loop runs over several tiles, the last one partial."""

import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="needs the triton package")
tl = triton.language
from torch.library import wrap_triton

import alignops
import alignops.kernels.fused_linear as fl_kernels
from alignops.ops import preference  # noqa: F401  (registers the ops)
from alignops.reference import preference as ref

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not alignops._backend.triton_available(), reason="needs the triton package"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACC = {
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
}
# fp32 / fp64 inputs against the reference in the same dtype. Half-precision inputs: the forward outputs are
# held to the fp32 reference of the same values (the GEMM products are exact in fp32); their gradients, which
# go through dz rounded to the input dtype, to twice the error of the same computation done by PyTorch in that
# dtype (see _torch_in_dtype).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-5, atol=1e-5),
}
# The interpreter's fp32 -> bf16 cast truncates (a GPU rounds to nearest even), so the bf16 dz it hands to the
# GEMMs is biased towards 0 by up to one ulp: up to one more bf16 ulp of the largest gradient entry.
INTERPRETER_SLACK = 2.0**-7 if DEVICE == "cpu" else 0.0
IGNORE = -100
# (temperature, logit_scale, softcap): softcap 30 keeps most logits in tanh's near-linear range (|x| < 1/4, the
# series branch of the kernel), softcap 2 saturates it.
TRANSFORMS = {"plain": (1.0, 1.0, 0.0), "softcap30": (0.7, 0.5, 30.0), "softcap2": (0.7, 0.5, 2.0)}


@pytest.fixture
def vocab_tile(monkeypatch):
    """Sets the forced tile width of kernels/fused_linear.py for one test."""
    return lambda vt: monkeypatch.setattr(fl_kernels, "VOCAB_TILE", vt)


def _data(N, H, V, dtype, bias=True):
    """Raw logits of standard deviation ~8, so that rows range from peaked to flat; rows 2 and N - 1 ignored."""
    h = torch.randn(N, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) * (8 / math.sqrt(H))
    b = torch.randn(V, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, (N,))
    if N > 3:
        y[2] = IGNORE
        y[N - 1] = IGNORE

    def cast(t):
        return None if t is None else t.to(dtype).to(DEVICE)

    return cast(h), cast(w), y.to(DEVICE), cast(b)


def _upstream(N, acc):
    """d loss / d logp, representable in bf16 so that every run sees the same values; row 0 has g = 0."""
    g = torch.randn(N, dtype=torch.float64).to(torch.bfloat16).to(acc).to(DEVICE)
    if N > 0:
        g[0] = 0.0
    return g


def _grads(fn, h, w, y, b, g):
    """(logp, entropy, lse or None) and the gradients of sum(g * logp) with respect to hidden, weight, bias."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (h, w, b)]
    out = fn(leaves[0], leaves[1], y, leaves[2])
    (out[0] * g.to(out[0].dtype)).sum().backward()
    return [t.detach() if t is not None else None for t in out], [None if t is None else t.grad for t in leaves]


def _triton(T, ls, sc):
    def fn(h, w, y, b):
        logp, lse, entropy = torch.ops.alignops.fused_linear_logprobs_triton(h, w, y, b, IGNORE, T, ls, sc, True)
        return logp, entropy, lse

    return fn


def _reference(T, ls, sc, acc):
    def fn(h, w, y, b):
        hh, ww, bb = h.to(acc), w.to(acc), None if b is None else b.to(acc)
        logp, entropy = ref.fused_linear_logprobs(
            hh, ww, y, bb, ignore_index=IGNORE, temperature=T, logit_scale=ls, softcap=sc or None, return_entropy=True
        )
        z = ref.lm_head_logits(hh, ww, bb, temperature=T, logit_scale=ls, softcap=sc or None)
        lse = torch.where(y != IGNORE, torch.logsumexp(z, -1), 0.0)
        return logp, entropy, lse

    return fn


def _torch_in_dtype(T, ls, sc):
    """The TRL path computed by PyTorch in the input dtype (logits, softmax and gradients all half precision)."""

    def fn(h, w, y, b):
        z = h @ w.t()
        if b is not None:
            z = z + b
        z = ls * z
        if sc > 0:
            z = sc * torch.tanh(z / sc)
        logp_all = torch.log_softmax(z / T, -1)
        keep = y != IGNORE
        logp = logp_all.gather(-1, torch.where(keep, y, 0).unsqueeze(-1)).squeeze(-1)
        return torch.where(keep, logp, 0), None, None

    return fn


def _max_err(got, want):
    return (got.double() - want.double()).abs().max().item() if got.numel() else 0.0


@pytest.mark.parametrize("tile", [None, 64], ids=["one_tile", "tiles_of_64"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_matches_reference(dtype, transform, bias, tile, vocab_tile):
    # V = 300 = 4 * 64 + 44: with tiles of 64 the last tile is partial; every row takes several BLOCK_V steps.
    vocab_tile(tile)
    acc = ACC[dtype]
    T, ls, sc = TRANSFORMS[transform]
    h, w, y, b = _data(13, 24, 300, dtype, bias)
    g = _upstream(13, acc)
    (logp, entropy, lse), grads = _grads(_triton(T, ls, sc), h, w, y, b, g)
    (r_logp, r_entropy, r_lse), r_grads = _grads(_reference(T, ls, sc, acc), h, w, y, b, g)
    assert logp.dtype == entropy.dtype == lse.dtype == acc
    for got, want in ((logp, r_logp), (entropy, r_entropy), (lse, r_lse)):
        torch.testing.assert_close(got, want, **TOL[dtype])
    ignored = y == IGNORE
    assert (logp[ignored] == 0).all() and (lse[ignored] == 0).all() and (entropy[ignored] == 0).all()
    assert (grads[0][ignored] == 0).all() and (grads[0][0] == 0).all()  # ignored rows and the g = 0 row
    assert all(t.dtype == dtype for t in grads if t is not None)
    if dtype in (torch.float32, torch.float64):
        for got, want in zip(grads, r_grads):
            if want is not None:
                torch.testing.assert_close(got, want, **TOL[dtype])
    else:
        _, half_grads = _grads(_torch_in_dtype(T, ls, sc), h, w, y, b, g)
        for got, half, want in zip(grads, half_grads, r_grads):
            if want is not None:
                assert _max_err(got, want) <= 2 * _max_err(half, want) + INTERPRETER_SLACK * want.abs().max().item()


def test_fp16_and_bf16_forward_within_twice_torch_error(vocab_tile):
    vocab_tile(96)
    T, ls, sc = TRANSFORMS["softcap30"]
    for dtype in (torch.float16, torch.bfloat16):
        h, w, y, b = _data(11, 32, 200, dtype)
        logp, _, _ = torch.ops.alignops.fused_linear_logprobs_triton(h, w, y, b, IGNORE, T, ls, sc, False)
        want = _reference(T, ls, sc, torch.float32)(h, w, y, b)[0]
        half = _torch_in_dtype(T, ls, sc)(h, w, y, b)[0]
        assert _max_err(logp, want) <= 2 * _max_err(half, want)
        torch.testing.assert_close(logp, want, **TOL[dtype])


def test_largest_shape_many_tiles_public_api(vocab_tile):
    # N = 64, H = 64, V = 700 = 5 * 128 + 60, int32 targets, through alignops.fused_linear_logprobs.
    vocab_tile(128)
    T, ls, sc = TRANSFORMS["softcap30"]
    h, w, y, b = _data(64, 64, 700, torch.float32)
    y = y.to(torch.int32)
    g = _upstream(64, torch.float32)

    def public(h_, w_, y_, b_):
        out = alignops.fused_linear_logprobs(
            h_, w_, y_, b_, temperature=T, logit_scale=ls, softcap=sc, return_entropy=True, backend="triton"
        )
        return out.logp, out.entropy

    (logp, entropy), grads = _grads(public, h, w, y, b, g)
    (r_logp, r_entropy, _), r_grads = _grads(_reference(T, ls, sc, torch.float32), h, w, y, b, g)
    torch.testing.assert_close(logp, r_logp, **TOL[torch.float32])
    torch.testing.assert_close(entropy, r_entropy, **TOL[torch.float32])
    for got, want in zip(grads, r_grads):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("transform", ["plain", "softcap2"])
def test_entropy_gradient_matches_reference_and_native(vocab_tile, transform):
    """The entropy's gradient (an entropy bonus) in the Triton backward, with and without the log-probs' term."""
    vocab_tile(64)
    T, ls, sc = TRANSFORMS[transform]
    h, w, y, b = _data(9, 16, 150, torch.float64)
    g = _upstream(9, torch.float64)
    ge = torch.randn(9, dtype=torch.float64, device=DEVICE)
    ge[1] = 0.0
    grads = {}
    for name, backend in (("triton", "triton"), ("native", "native"), ("ref", "torch")):
        leaves = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
        out = alignops.fused_linear_logprobs(
            *leaves[:2],
            y,
            leaves[2],
            temperature=T,
            logit_scale=ls,
            softcap=sc or None,
            return_entropy=True,
            backend=backend,
        )
        both = torch.autograd.grad((out.logp * g).sum() + (out.entropy * ge).sum(), leaves, retain_graph=True)
        alone = torch.autograd.grad((out.entropy * ge).sum(), leaves)
        grads[name] = both + alone
    for got, want, nat in zip(grads["triton"], grads["ref"], grads["native"]):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
        torch.testing.assert_close(got, nat, **TOL[torch.float64])


def test_non_contiguous_inputs_and_no_bias_grad():
    h, w, y, b = _data(9, 20, 150, torch.float32)
    h_nc = h.t().contiguous().t()  # column-major
    w_nc = torch.stack([w, -w], 2).flatten(1)[:, ::2]  # row stride 2H, column stride 2
    assert not h_nc.is_contiguous() and not w_nc.is_contiguous()
    out = torch.ops.alignops.fused_linear_logprobs_triton(h_nc, w_nc, y, b, IGNORE, 0.7, 0.5, 30.0, True)
    want = torch.ops.alignops.fused_linear_logprobs_triton(h, w, y, b, IGNORE, 0.7, 0.5, 30.0, True)
    # Bit-identical in the interpreter; on a GPU cuBLAS picks other GEMM kernels for the transposed layouts
    # (seen on an H200: 3.8e-6 absolute, 3.6e-7 relative), so there the contract is fp32 GEMM rounding.
    exact = dict(rtol=0, atol=0) if DEVICE == "cpu" else dict(rtol=2e-6, atol=1e-5)
    for got, exp in zip(out, want):
        torch.testing.assert_close(got, exp, **exact)
    g = torch.randn(9, device=DEVICE)
    gh, gw, gb = torch.ops.alignops.fused_linear_logprobs_backward_triton(
        g, h_nc, w_nc, y, b, out[1], IGNORE, 0.7, 0.5, 30.0, False
    )
    assert gh.is_contiguous() and gw.is_contiguous() and gb.shape == (0,)
    # Autograd asks for no bias gradient when the bias does not require grad.
    hh = h.clone().requires_grad_(True)
    logp = torch.ops.alignops.fused_linear_logprobs_triton(hh, w, y, b, IGNORE, 0.7, 0.5, 30.0, False)[0]
    (logp * g).sum().backward()
    torch.testing.assert_close(hh.grad, gh, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_empty_batch(dtype):
    h, w, y, b = _data(0, 16, 50, dtype)
    leaves = [t.requires_grad_(True) for t in (h, w, b)]
    logp, lse, entropy = torch.ops.alignops.fused_linear_logprobs_triton(
        *leaves[:2], y, leaves[2], IGNORE, 1.0, 1.0, 0.0, True
    )
    assert logp.shape == lse.shape == entropy.shape == (0,) and logp.dtype == ACC[dtype]
    logp.sum().backward()
    assert leaves[0].grad.shape == (0, 16)
    assert leaves[1].grad.shape == (50, 16) and (leaves[1].grad == 0).all()
    assert leaves[2].grad.shape == (50,) and (leaves[2].grad == 0).all()


def test_all_rows_ignored_give_zeros(vocab_tile):
    vocab_tile(32)
    h, w, _, b = _data(6, 16, 100, torch.float32)
    y = torch.full((6,), IGNORE, device=DEVICE)
    logp, lse, entropy = torch.ops.alignops.fused_linear_logprobs_triton(h, w, y, b, IGNORE, 1.0, 1.0, 2.0, True)
    assert (logp == 0).all() and (lse == 0).all() and (entropy == 0).all()
    grads = torch.ops.alignops.fused_linear_logprobs_backward_triton(
        torch.ones(6, device=DEVICE), h, w, y, b, lse, IGNORE, 1.0, 1.0, 2.0, True
    )
    assert all((t == 0).all() for t in grads)


def test_out_of_range_target_gives_nan(vocab_tile):
    # The op does not sync to check targets (the public function does): such a row gives NaN, the others are
    # unaffected in the forward.
    vocab_tile(32)
    h, w, y, b = _data(6, 16, 100, torch.float32)
    y[1] = 100
    y[3] = -7
    logp, lse, entropy = torch.ops.alignops.fused_linear_logprobs_triton(h, w, y, b, IGNORE, 1.0, 1.0, 0.0, True)
    assert torch.isnan(logp[[1, 3]]).all() and torch.isfinite(lse[[1, 3]]).all()
    keep = torch.tensor([0, 4])
    want = _reference(1.0, 1.0, 0.0, torch.float32)(h, w, y.clamp(0, 99), b)[0]
    torch.testing.assert_close(logp[keep], want[keep], **TOL[torch.float32])
    with pytest.raises(ValueError, match=r"targets\[1\] = 100 is out of range"):
        alignops.fused_linear_logprobs(h, w, y, b, backend="triton")


@pytest.mark.skipif(DEVICE != "cpu", reason="compares with the native CPU op")
def test_matches_native_cpu_op(vocab_tile):
    vocab_tile(64)
    h, w, y, b = _data(10, 24, 250, torch.float32)
    args = (IGNORE, 0.7, 0.5, 2.0)
    out = torch.ops.alignops.fused_linear_logprobs_triton(h, w, y, b, *args, True)
    nat = torch.ops.alignops.fused_linear_logprobs(h, w, y, b, *args, True)
    for got, want in zip(out, nat):
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    g = torch.randn(10)
    grads = torch.ops.alignops.fused_linear_logprobs_backward_triton(g, h, w, y, b, out[1], *args, True)
    nat_grads = torch.ops.alignops.fused_linear_logprobs_backward(g, h, w, y, b, nat[1], *args, True)
    for got, want in zip(grads, nat_grads):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_vocab_tile_bounds_the_tile_memory():
    f32 = torch.float32
    assert fl_kernels.vocab_tile(8192, 4096, 262144, f32) == 2048  # [8192, 2048] fp32 = 64 MiB
    assert fl_kernels.vocab_tile(16, 8192, 262144, f32) == 2048  # the [Vt, H] grad_weight tile bounds it
    assert fl_kernels.vocab_tile(10**6, 64, 262144, f32) == 128  # never below one aligned block
    assert fl_kernels.vocab_tile(4, 64, 300, torch.float64) == 300  # never beyond V
    assert fl_kernels.vocab_tile(8192, 4096, 262144, torch.float64) == 1024


def test_bad_arguments():
    h, w, y, b = _data(5, 8, 20, torch.float32)
    op = torch.ops.alignops.fused_linear_logprobs_triton
    bwd = torch.ops.alignops.fused_linear_logprobs_backward_triton
    common = (IGNORE, 1.0, 1.0, 0.0, False)
    cases = [
        ((h[0], w, y, b), r"hidden must be a 2-D tensor of shape \[N, H\], got shape \[8\]"),
        ((h.long(), w.long(), y, b), "hidden must be float32, float64, float16 or bfloat16, got torch.int64"),
        ((h, w[:, :4], y, b), r"weight must have shape \[V, H\] with H = 8 \(hidden's last dimension\), got \[20, 4\]"),
        ((h, w[:0], y, None), r"weight must have at least one row \(V >= 1\)"),
        ((h, w.double(), y, b), r"weight must have the dtype of hidden \(torch.float32\), got torch.float64"),
        ((h, w, y.float(), b), "targets must be int64 or int32, got torch.float32"),
        ((h, w, y[:4], b), r"targets must have one entry per row of hidden \[N=5\], got 4"),
        ((h, w, y.view(5, 1), b), r"targets must be a 1-D tensor of shape \[N\]"),
        ((h, w, y, b[:19]), r"bias must have shape \[V\] = \[20\], got \[19\]"),
        ((h, w, y, b.double()), r"bias must have the dtype of hidden \(torch.float32\), got torch.float64"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            op(*args, *common)
    with pytest.raises(ValueError, match=r"temperature must be a finite value > 0, got 0\b"):
        op(h, w, y, b, IGNORE, 0.0, 1.0, 0.0, False)
    with pytest.raises(ValueError, match="logit_scale must be finite, got inf"):
        op(h, w, y, b, IGNORE, 1.0, float("inf"), 0.0, False)
    lse = torch.zeros(5, device=DEVICE)
    with pytest.raises(
        ValueError,
        match=r"lse must be a torch.float32 tensor of shape \[N\] = \[5\], got "
        r"torch.float64 \[5\]",
    ):
        bwd(lse, h, w, y, b, lse.double(), IGNORE, 1.0, 1.0, 0.0, True)
    with pytest.raises(
        ValueError,
        match=r"grad_logp must be a torch.float32 tensor of shape \[N\] = \[5\], got "
        r"torch.float32 \[4\]",
    ):
        bwd(lse[:4], h, w, y, b, lse, IGNORE, 1.0, 1.0, 0.0, True)


# ---- opcheck ----------------------------------------------------------------------------------------------

# In the interpreter, wrap_triton hands back the plain interpreted kernel, so under FakeTensorMode it would run
# on fake tensors: the fake-tensor and AOT-dispatch checks need a GPU. On a GPU every check of opcheck runs.
OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration")
    if DEVICE == "cpu"
    else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
)


def _opcheck_samples():
    h, w, y, b = _data(7, 16, 90, torch.float32)
    logp, lse, _ = torch.ops.alignops.fused_linear_logprobs_triton(h, w, y, b, IGNORE, 0.7, 0.5, 2.0, False)
    return [
        (
            torch.ops.alignops.fused_linear_logprobs_triton,
            (
                h.clone().requires_grad_(True),
                w.clone().requires_grad_(True),
                y,
                b.clone().requires_grad_(True),
                IGNORE,
                0.7,
                0.5,
                2.0,
                True,
            ),
        ),
        (torch.ops.alignops.fused_linear_logprobs_triton, (h, w, y, None, IGNORE, 1.0, 1.0, 0.0, False)),
        (
            torch.ops.alignops.fused_linear_logprobs_backward_triton,
            (torch.randn(7, device=DEVICE), h, w, y, b, lse, IGNORE, 0.7, 0.5, 2.0, True),
        ),
    ]


@pytest.mark.parametrize("case", range(3))
def test_opcheck(case, vocab_tile):
    vocab_tile(32)
    op, args = _opcheck_samples()[case]
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)


@triton.jit
def _tanh_kernel(x_ptr, th_ptr, sech2_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    th, sech2 = fl_kernels._tanh_sech2(tl.load(x_ptr + offs, mask=mask, other=0))
    tl.store(th_ptr + offs, th, mask=mask)
    tl.store(sech2_ptr + offs, sech2, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_tanh_is_accurate_on_both_branches(dtype):
    # Both sides of the series / exp switch at |x| = 1/4, tiny and saturated arguments, and the signs.
    mag = torch.cat(
        [torch.logspace(-30, 2, 200, dtype=torch.float64), torch.linspace(0.2, 0.3, 56, dtype=torch.float64)]
    )
    x = torch.cat([mag, -mag, torch.zeros(1, dtype=torch.float64)]).to(dtype).to(DEVICE)
    th, sech2 = torch.empty_like(x), torch.empty_like(x)
    wrap_triton(_tanh_kernel)[(1,)](x, th, sech2, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    # A few ulp in the interpreter; on a GPU tl.exp is ex2.approx of 2|x| log2(e), whose rounding adds a relative
    # error growing with |x|, hence the (1 + |x|). The series branch keeps tanh(x) ~ x exact to a few ulp: the
    # exp form alone would be off by eps / |x| relative. sech^2 underflows for |x| beyond ~44 in fp32.
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    bound = 8 * eps * (1 + x.double().abs())
    want = torch.tanh(x.double())
    assert ((th.double() - want).abs() <= bound * want.abs()).all()
    want_sech2 = 1 / torch.cosh(x.double()) ** 2
    assert ((sech2.double() - want_sech2).abs() <= bound * want_sech2 + tiny).all()
