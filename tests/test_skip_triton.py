"""The Triton skip op (alignops::skip_ffn_triton) against the reference (python/alignops/reference/skip.py).
Without a GPU it runs in the Triton interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported), with 16-wide tiles (kernels/skip.py), so these small shapes span several tiles
in every dimension of every kernel, ragged edges included."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="needs the triton package")

import alignops
import alignops.ops.skip  # registers alignops::skip_ffn_triton
from alignops.reference import skip as ref

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not alignops._backend.triton_available(), reason="needs the triton package"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACT_CODES = {name: code for code, name in enumerate(ref.ACTIVATIONS)}
# fp32 / fp64: the reference in the same dtype. bf16 / fp16: at most 2x the error of the reference run in
# that dtype, both measured against the reference in fp64 (plus a few ulp of slack at 0).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
EPS = 1e-6


@pytest.fixture
def bf16_rounds_to_nearest(monkeypatch):
    """The interpreter casts fp32 to bf16 by truncation, a GPU (and PyTorch) rounds to nearest even: the
    kernels round six times along the way, so truncation alone would triple their error. Here the
    interpreter rounds like the GPU, which the 2x bound can then hold to. No effect on a GPU."""
    if DEVICE != "cpu":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def rounding_cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.asarray(src.data, dtype=np.float32)
            bits = torch.from_numpy(data.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits.reshape(data.shape), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", rounding_cast_impl)


def _params(N, H, I, activation, dtype, norm=True, bias=True):
    """x, keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down with O(1) pre-activations."""
    G = 2 * I if activation == "swiglu" else I
    x = torch.randn(N, H, dtype=torch.float64)
    keep = torch.rand(N) < 0.6
    w_gate_up = torch.randn(G, H, dtype=torch.float64) / H**0.5
    w_down = torch.randn(H, I, dtype=torch.float64) / I**0.5
    norm_weight = 1 + 0.1 * torch.randn(H, dtype=torch.float64) if norm else None
    b_gate_up = 0.1 * torch.randn(G, dtype=torch.float64) if bias else None
    b_down = 0.1 * torch.randn(H, dtype=torch.float64) if bias else None
    return [
        None if t is None else t.to(DEVICE) if t.dtype == torch.bool else t.to(dtype).to(DEVICE)
        for t in (x, keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down)
    ]


def _triton(params, activation, save=True):
    x, keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down = params
    return torch.ops.alignops.skip_ffn_triton(
        x, keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down, ACT_CODES[activation], EPS, save
    )


def _reference(params, activation, dtype=None):
    x, keep, w_gate_up, w_down, norm_weight, b_gate_up, b_down = [
        None if t is None else t if dtype is None or t.dtype == torch.bool else t.to(dtype) for t in params
    ]
    return ref.skip_ffn(x, w_gate_up, w_down, norm_weight, keep, b_gate_up, b_down, activation, EPS)


def _reference_pre_act(params, activation):
    x, _, w_gate_up, _, norm_weight, b_gate_up, _ = params
    return F.linear(ref.rms_norm(x, norm_weight, EPS), w_gate_up, b_gate_up)


def _assert_close_to_reference(got, want, params, activation):
    """Same-dtype tolerance for fp32 / fp64; for bf16 / fp16 the 2x rule against the fp64 reference."""
    dtype = got.dtype
    if dtype in TOL:
        torch.testing.assert_close(got, want, **TOL[dtype])
        return
    exact = _reference(params, activation, torch.float64)
    err = (got.double() - exact).abs().max().item()
    ref_err = (want.double() - exact).abs().max().item()
    ulp = torch.finfo(dtype).eps
    assert err <= 2 * ref_err + ulp, f"{dtype}: error {err:.3g} vs the reference's {ref_err:.3g}"


def _check_outputs(params, activation, outputs, save=True):
    """Shapes and contents of (y, index, count, rstd, pre_act) against the reference."""
    x, keep, w_gate_up, _, norm_weight, _, _ = params
    y, index, count, rstd, pre_act = outputs
    N, H = x.shape
    G = w_gate_up.shape[0]
    assert y.shape == (N, H) and y.dtype == x.dtype
    assert index.shape == (N,) and index.dtype == torch.int64
    assert count.shape == (1,) and count.dtype == torch.int64
    k = int(keep.sum())
    assert count.item() == k
    # Kept rows ascending, then -1 (the native op's fill).
    want_index = torch.full((N,), -1, dtype=torch.int64, device=x.device)
    want_index[:k] = keep.nonzero().squeeze(1)
    assert torch.equal(index, want_index)
    assert torch.equal(y[~keep], x[~keep])
    _assert_close_to_reference(y, _reference(params, activation), params, activation)

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    kept = index[:k]
    if save and norm_weight is not None:
        assert rstd.shape == (N,) and rstd.dtype == acc
        xf = x[kept].to(acc)
        torch.testing.assert_close(rstd[:k], torch.rsqrt(xf.pow(2).mean(-1) + EPS), **TOL[acc])
        assert (rstd[k:] == 0).all()
    else:
        assert rstd.shape == (0,) and rstd.dtype == acc
    if save:
        assert pre_act.shape == (N, G) and pre_act.dtype == x.dtype
        assert (pre_act[k:] == 0).all()
        want = _reference_pre_act(params, activation)[kept]
        if x.dtype in TOL:
            torch.testing.assert_close(pre_act[:k], want, **TOL[x.dtype])
        else:  # one rounding of the same fp32 sums, in another order
            torch.testing.assert_close(
                pre_act[:k].double(), want.double(), rtol=2 * torch.finfo(x.dtype).eps, atol=torch.finfo(x.dtype).eps
            )
    else:
        assert pre_act.shape == (0, G) and pre_act.dtype == x.dtype


VARIANTS = {
    "norm_bias": dict(norm=True, bias=True),
    "norm": dict(norm=True, bias=False),
    "bias": dict(norm=False, bias=True),
    "plain": dict(norm=False, bias=False),
}


@pytest.mark.usefixtures("bf16_rounds_to_nearest")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_matches_reference(activation, dtype, variant):
    # 37 rows, H = 40, I = 24: ragged in every dimension of every tile.
    params = _params(37, 40, 24, activation, dtype, **VARIANTS[variant])
    _check_outputs(params, activation, _triton(params, activation))


@pytest.mark.usefixtures("bf16_rounds_to_nearest")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fp16_fp64(activation, dtype):
    params = _params(23, 40, 24, activation, dtype)
    _check_outputs(params, activation, _triton(params, activation))


@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_keep_all_is_the_dense_ffn(activation):
    params = _params(33, 32, 48, activation, torch.float32)
    params[1] = torch.ones(33, dtype=torch.bool, device=DEVICE)
    outputs = _triton(params, activation)
    _check_outputs(params, activation, outputs)
    x, _, w_gate_up, w_down, norm_weight, b_gate_up, b_down = params
    torch.testing.assert_close(
        outputs[0], ref.ffn(x, w_gate_up, w_down, norm_weight, b_gate_up, b_down, activation, EPS), **TOL[torch.float32]
    )
    assert torch.equal(outputs[1], torch.arange(33, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_keep_none_returns_x_bit_for_bit(dtype):
    params = _params(29, 40, 24, "swiglu", dtype)
    params[1] = torch.zeros(29, dtype=torch.bool, device=DEVICE)
    x = params[0]
    y, index, count, rstd, pre_act = _triton(params, "swiglu")
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    assert count.item() == 0 and (index == -1).all()
    assert rstd.shape == (29,) and pre_act.shape == (29, 48) and (rstd == 0).all() and (pre_act == 0).all()


@pytest.mark.parametrize("norm", [True, False])
def test_without_save_for_backward(norm):
    params = _params(19, 24, 16, "gelu_tanh", torch.float32, norm=norm)
    _check_outputs(params, "gelu_tanh", _triton(params, "gelu_tanh", save=False), save=False)


def test_many_compaction_blocks_and_row_tiles():
    # 300 rows: 19 compaction blocks and ~12 live row tiles (GROUP_M grouping across several groups) in the
    # interpreter; a single sparse mask with runs of kept and skipped rows.
    params = _params(300, 16, 16, "swiglu", torch.float32, norm=False)
    keep = torch.zeros(300, dtype=torch.bool)
    keep[5:70] = True
    keep[100:101] = True
    keep[150:299:3] = True
    params[1] = keep.to(DEVICE)
    _check_outputs(params, "swiglu", _triton(params, "swiglu"))


def test_strided_inputs_and_no_rows():
    params = _params(21, 40, 24, "gelu", torch.float32)
    x_t = params[0].t().contiguous().t()  # column-major x
    params_t = [x_t, *params[1:]]
    torch.testing.assert_close(_triton(params_t, "gelu")[0], _triton(params, "gelu")[0], rtol=0, atol=0)

    empty = _params(0, 40, 24, "gelu", torch.float32)
    y, index, count, rstd, pre_act = _triton(empty, "gelu")
    assert y.shape == (0, 40) and index.shape == (0,) and count.tolist() == [0]
    assert rstd.shape == (0,) and pre_act.shape == (0, 24)


def test_rejects_bad_arguments():
    # The messages of the native op (csrc/skip/skip_ffn_cpu.cpp).
    x, keep, wgu, wd, nw, bgu, bd = _params(6, 16, 8, "swiglu", torch.float32)

    def call(*args, activation=0, eps=EPS):
        return torch.ops.alignops.skip_ffn_triton(*args, activation, eps, False)

    with pytest.raises(ValueError, match=r"x must be a 2-D tensor of shape \[N, H\], got shape \[6\]"):
        call(x[:, 0], keep, wgu, wd, nw, bgu, bd)
    with pytest.raises(ValueError, match="x must be float32, float64, float16 or bfloat16, got torch.int64"):
        call(x.long(), keep, wgu, wd, nw, bgu, bd)
    with pytest.raises(ValueError, match=r"keep must be a bool tensor of shape \[N\] = \[6\], got torch.float32 \[6\]"):
        call(x, keep.float(), wgu, wd, nw, bgu, bd)
    with pytest.raises(ValueError, match=r"keep must be a bool tensor of shape \[N\] = \[6\], got torch.bool \[5\]"):
        call(x, keep[:5], wgu, wd, nw, bgu, bd)
    with pytest.raises(
        ValueError,
        match=r"activation code must be 0 \(swiglu\), 1 \(gelu\) or 2 \(gelu_tanh\), "
        r"got 3",
    ):
        call(x, keep, wgu, wd, nw, bgu, bd, activation=3)
    with pytest.raises(ValueError, match=r"eps must be a finite value > 0, got 0\b"):
        call(x, keep, wgu, wd, nw, bgu, bd, eps=0.0)
    with pytest.raises(ValueError, match=r"w_down must be a 2-D tensor of shape \[H, I\], got shape \[16\]"):
        call(x, keep, wgu, wd[:, 0], nw, bgu, bd)
    with pytest.raises(ValueError, match=r"w_down must have shape \[H, I\] with H = 16, got \[15, 8\]"):
        call(x, keep, wgu, wd[:15], nw, bgu, bd)
    with pytest.raises(ValueError, match=r"w_gate_up must have shape \[2I, H\] = \[16, 16\], got \[16, 15\]"):
        call(x, keep, wgu[:, :15], wd, nw, bgu, bd)
    with pytest.raises(ValueError, match=r"w_gate_up must have shape \[I, H\] = \[8, 16\], got \[16, 16\]"):
        call(x, keep, wgu, wd, nw, None, bd, activation=1)
    with pytest.raises(ValueError, match=r"norm_weight must have shape \[H\] = \[16\], got \[15\]"):
        call(x, keep, wgu, wd, nw[:15], bgu, bd)
    with pytest.raises(ValueError, match=r"b_gate_up must have shape \[2I\] = \[16\], got \[8\]"):
        call(x, keep, wgu, wd, nw, bgu[:8], bd)
    with pytest.raises(ValueError, match=r"b_down must have shape \[H\] = \[16\], got \[16, 1\]"):
        call(x, keep, wgu, wd, nw, bgu, bd[:, None])
    with pytest.raises(ValueError, match=r"w_down must have the dtype of x \(torch.float32\), got torch.bfloat16"):
        call(x, keep, wgu, wd.bfloat16(), nw, bgu, bd)
    with pytest.raises(
        ValueError,
        match=r"norm_weight must have the dtype of x \(torch.float32\), got "
        r"torch.float64",
    ):
        call(x, keep, wgu, wd, nw.double(), bgu, bd)
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match=r"w_down must be on the device of x \(cuda:0\), got cpu"):
            call(x, keep, wgu, wd.cpu(), nw, bgu, bd)
        with pytest.raises(ValueError, match=r"keep must be on the device of x \(cuda:0\), got cpu"):
            call(x, keep.cpu(), wgu, wd, nw, bgu, bd)
    else:
        with pytest.raises(ValueError, match=r"w_down must be on the device of x \(cpu\), got meta"):
            call(x, keep, wgu, wd.to("meta"), nw, bgu, bd)


@pytest.mark.skipif(DEVICE != "cpu", reason="compares with the native CPU op")
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_matches_native(activation):
    # Same outputs as alignops::skip_ffn: index (with its -1 fill), count and the zero tails exactly.
    params = _params(37, 40, 24, activation, torch.float32)
    x, keep, wgu, wd, nw, bgu, bd = params
    for save in (True, False):
        args = (x, keep, wgu, wd, nw, bgu, bd, ACT_CODES[activation], EPS, save)
        got = torch.ops.alignops.skip_ffn_triton(*args)
        want = torch.ops.alignops.skip_ffn(*args)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        for g, w in zip((got[0], got[3], got[4]), (want[0], want[3], want[4])):
            torch.testing.assert_close(g, w, **TOL[torch.float32])


# ---- opcheck ----------------------------------------------------------------------------------------------


def _opcheck_samples():
    full = _params(13, 16, 8, "swiglu", torch.float32)
    plain = _params(11, 16, 16, "gelu", torch.float32, norm=False, bias=False)
    return [
        (*full, 0, EPS, True),
        (*full, 0, EPS, False),
        (*plain, 1, EPS, True),
        (*plain, 2, 1e-5, False),
    ]


# As for the preference ops: in the interpreter wrap_triton hands back the plain interpreted kernel, so the
# fake-tensor and AOT-dispatch checks need a GPU. Autograd is registered elsewhere (one backward for the native
# and the Triton op), so the samples do not require grad.
OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration")
    if DEVICE == "cpu"
    else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
)


@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    torch.library.opcheck(torch.ops.alignops.skip_ffn_triton, _opcheck_samples()[case], test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("criterion", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_score_matches_reference(criterion, dtype):
    r = torch.randn(21, 37, dtype=dtype, device=DEVICE)
    d = 0.3 * torch.randn(21, 37, dtype=dtype, device=DEVICE)
    h, score = torch.ops.alignops.skip_add_score_triton(r, d, criterion)
    exp_h, exp_score = ref.add_score(r, d, ref.CRITERIA[criterion])
    assert torch.equal(h, exp_h)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(score, exp_score, rtol=tol, atol=tol)


def test_inplace_skipped_rows_untouched():
    x = torch.randn(29, 40, device=DEVICE)
    w1 = torch.randn(48, 40, device=DEVICE) / 7
    w2 = torch.randn(40, 24, device=DEVICE) / 5
    nw = torch.rand(40, device=DEVICE) + 0.5
    keep = torch.rand(29, device=DEVICE) > 0.5
    target = x.clone()
    torch.ops.alignops.skip_ffn_triton_(target, keep, w1, w2, nw, None, None, 0, EPS)
    assert torch.equal(target[~keep], x[~keep])
    torch.testing.assert_close(target, ref.skip_ffn(x, w1, w2, nw, keep), **TOL[torch.float32])
    torch.library.opcheck(
        torch.ops.alignops.skip_ffn_triton_, (x.clone(), keep, w1, w2, nw, None, None, 0, EPS), test_utils=OPCHECK_UTILS
    )
    torch.library.opcheck(
        torch.ops.alignops.skip_add_score_triton, (x, 0.1 * torch.randn_like(x), 1), test_utils=OPCHECK_UTILS
    )


@pytest.mark.parametrize("arg", ["x", "w_gate_up", "norm_weight"])
def test_inplace_op_refuses_inputs_that_require_grad(arg):
    x = torch.randn(9, 40, device=DEVICE)
    args = dict(
        x=x.clone(), w_gate_up=torch.randn(48, 40, device=DEVICE) / 7, norm_weight=torch.rand(40, device=DEVICE) + 0.5
    )
    w2 = torch.randn(40, 24, device=DEVICE) / 5
    keep = torch.rand(9, device=DEVICE) > 0.5
    args[arg] = args[arg].clone().requires_grad_() * 1
    call = (args["x"], keep, args["w_gate_up"], w2, args["norm_weight"], None, None, 0, EPS)
    with pytest.raises(
        RuntimeError,
        match=rf"alignops::skip_ffn_triton_ updates x in place and records no "
        rf"gradient, but {arg} requires grad: use the out-of-place",
    ):
        torch.ops.alignops.skip_ffn_triton_(*call)
    with torch.no_grad():
        torch.ops.alignops.skip_ffn_triton_(*call)
    torch.testing.assert_close(
        call[0],
        ref.skip_ffn(x, args["w_gate_up"].detach(), w2, args["norm_weight"].detach(), keep),
        **TOL[torch.float32],
    )
