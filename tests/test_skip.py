"""skip family on the CPU: skip_ffn vs the dense reference and the naive nonzero/index_add path, keep modes,
gradients, opcheck, compile, bad input, and the HF-style patcher on a small LLaMA-style model."""

import pytest
import torch
import torch.nn.functional as F

import alignops
from alignops.reference import skip as ref
from alignops.skip import SkipSchedule, change_score, keep_from_spans, patch_ffn_skipping


def make_ffn(H, I, activation="swiglu", dtype=torch.float32, bias=False, norm=True):
    G = 2 * I if activation == "swiglu" else I
    w_gate_up = (torch.randn(G, H, dtype=torch.float64) / H**0.5).to(dtype)
    w_down = (torch.randn(H, I, dtype=torch.float64) / I**0.5).to(dtype)
    norm_weight = (torch.rand(H, dtype=torch.float64) + 0.5).to(dtype) if norm else None
    b1 = torch.randn(G, dtype=torch.float64).to(dtype) if bias else None
    b2 = torch.randn(H, dtype=torch.float64).to(dtype) if bias else None
    return w_gate_up, w_down, norm_weight, b1, b2


@pytest.fixture(params=["avx2", "default"])
def cpu_capability(request, monkeypatch):
    monkeypatch.setenv("ALIGNOPS_CPU_CAPABILITY", request.param)
    return request.param


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias,norm", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("shape", [(3, 47, 40), (1, 5, 123)])
def test_matches_dense_reference_fp32(cpu_capability, activation, bias, norm, shape):
    B, T, H = shape
    x = torch.randn(B, T, H)
    w1, w2, nw, b1, b2 = make_ffn(H, 37, activation, bias=bias, norm=norm)
    keep = torch.rand(B, T) > 0.5
    y = alignops.skip_ffn(x, w1, w2, nw, keep=keep, b_gate_up=b1, b_down=b2, activation=activation)
    exp = ref.skip_ffn(x, w1, w2, nw, keep, b1, b2, activation)
    torch.testing.assert_close(y, exp, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[~keep], x[~keep])  # bit-identical skipped rows


def test_keep_all_is_dense_and_keep_none_is_identity():
    x = torch.randn(2, 9, 32)
    w1, w2, nw, _, _ = make_ffn(32, 24)
    dense = ref.ffn(x, w1, w2, nw)
    torch.testing.assert_close(alignops.skip_ffn(x, w1, w2, nw), dense, rtol=1e-5, atol=1e-5)
    none = alignops.skip_ffn(x, w1, w2, nw, keep=torch.zeros(2, 9, dtype=torch.bool))
    assert torch.equal(none, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(dtype):
    H, I = 64, 96
    x = torch.randn(4, 33, H)
    w1, w2, nw, _, _ = make_ffn(H, I)
    keep = torch.rand(4, 33) > 0.3
    exact = ref.skip_ffn(x.double(), w1.double(), w2.double(), nw.double(), keep)
    ours = alignops.skip_ffn(x.to(dtype), w1.to(dtype), w2.to(dtype), nw.to(dtype), keep=keep)
    theirs = ref.skip_ffn(x.to(dtype), w1.to(dtype), w2.to(dtype), nw.to(dtype), keep)
    err_ours = (ours.double() - exact).abs().max()
    err_torch = (theirs.double() - exact).abs().max()
    assert err_ours <= 2 * err_torch + 1e-6, (err_ours, err_torch)
    assert torch.equal(ours[~keep], x.to(dtype)[~keep])


def test_flat_rows_and_naive_path_agree():
    x = torch.randn(50, 32)
    w1, w2, nw, _, _ = make_ffn(32, 16)
    keep = torch.rand(50) > 0.5
    torch.testing.assert_close(
        alignops.skip_ffn(x, w1, w2, nw, keep=keep), ref.naive_skip_ffn(x, w1, w2, nw, keep), rtol=1e-5, atol=1e-5
    )


def test_skip_spans():
    x = torch.randn(2, 10, 16)
    w1, w2, nw, _, _ = make_ffn(16, 8)
    spans = torch.tensor([[[1, 4], [6, 7]], [[0, 0], [5, 10]]])
    keep = keep_from_spans(spans, 10)
    assert keep[0].tolist() == [True, False, False, False, True, True, False, True, True, True]
    assert keep[1].tolist() == [True] * 5 + [False] * 5
    torch.testing.assert_close(
        alignops.skip_ffn(x, w1, w2, nw, skip_spans=spans), ref.skip_ffn(x, w1, w2, nw, keep), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("criterion", ["cosine", "norm_ratio"])
def test_threshold_and_capacity(criterion):
    prev = torch.randn(2, 12, 16)
    delta = torch.randn(2, 12, 16) * torch.linspace(0.01, 2, 12)[None, :, None]
    x = prev + delta
    w1, w2, nw, _, _ = make_ffn(16, 8)
    score = change_score(x, prev, criterion=criterion)
    if criterion == "cosine":
        exp_score = 1 - (x * prev).sum(-1) / (x.norm(dim=-1) * prev.norm(dim=-1))
    else:
        exp_score = delta.norm(dim=-1) / prev.norm(dim=-1)
    torch.testing.assert_close(score, exp_score, rtol=1e-5, atol=1e-6)
    y = alignops.skip_ffn(x, w1, w2, nw, threshold=0.2, previous=prev, criterion=criterion)
    torch.testing.assert_close(y, ref.skip_ffn(x, w1, w2, nw, score > 0.2), rtol=1e-5, atol=1e-5)
    y = alignops.skip_ffn(x, w1, w2, nw, capacity=5, previous=prev, criterion=criterion)
    keep = torch.zeros(2, 12, dtype=torch.bool).scatter_(1, score.topk(5, dim=1).indices, True)
    assert keep.sum(1).tolist() == [5, 5]
    torch.testing.assert_close(y, ref.skip_ffn(x, w1, w2, nw, keep), rtol=1e-5, atol=1e-5)
    y_frac = alignops.skip_ffn(x, w1, w2, nw, capacity=5 / 12, previous=prev, criterion=criterion)
    torch.testing.assert_close(y_frac, y, rtol=0, atol=0)


@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh"])
def test_gradients_match_reference(activation):
    H, I = 24, 20
    x = torch.randn(3, 11, H, requires_grad=True)
    params = [t.requires_grad_(True) for t in make_ffn(H, I, activation, bias=True)]
    keep = torch.rand(3, 11) > 0.4
    y = alignops.skip_ffn(
        x, params[0], params[1], params[2], keep=keep, b_gate_up=params[3], b_down=params[4], activation=activation
    )
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, *params])
    xr = x.detach().clone().requires_grad_(True)
    pr = [p.detach().clone().requires_grad_(True) for p in params]
    yr = ref.skip_ffn(xr, pr[0], pr[1], pr[2], keep, pr[3], pr[4], activation)
    exp = torch.autograd.grad((yr * g).sum(), [xr, *pr])
    for a, b in zip(grads, exp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.equal(grads[0][~keep], g[~keep])  # skipped rows pass the gradient through


def test_gradcheck_fp64():
    H, I = 6, 5
    x = torch.randn(2, 4, H, dtype=torch.float64, requires_grad=True)
    w1, w2, nw, b1, b2 = (t.requires_grad_(True) for t in make_ffn(H, I, dtype=torch.float64, bias=True))
    keep = torch.tensor([[True, False, True, True], [False, True, True, False]])
    assert torch.autograd.gradcheck(
        lambda *a: alignops.skip_ffn(a[0], a[1], a[2], a[3], keep=keep, b_gate_up=a[4], b_down=a[5]),
        (x, w1, w2, nw, b1, b2),
    )


def test_opcheck():
    x = torch.randn(9, 16, requires_grad=True)
    w1, w2, nw, _, _ = make_ffn(16, 8)
    keep = torch.tensor([True, False] * 4 + [True])
    for save in (True, False):
        args = (x if save else x.detach(), keep, w1, w2, nw, None, None, 0, 1e-6, save)
        torch.library.opcheck(torch.ops.alignops.skip_ffn.default, args)


def test_compile_fullgraph():
    x = torch.randn(2, 7, 16, requires_grad=True)
    w1, w2, nw, _, _ = make_ffn(16, 8)
    keep = torch.rand(2, 7) > 0.5
    fn = torch.compile(lambda x: alignops.skip_ffn(x, w1, w2, nw, keep=keep).sum(), fullgraph=True, backend="aot_eager")
    fn(x).backward()
    xr = x.detach().clone().requires_grad_(True)
    ref.skip_ffn(xr, w1, w2, nw, keep).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_empty_and_degenerate():
    w1, w2, nw, _, _ = make_ffn(8, 4)
    assert alignops.skip_ffn(torch.zeros(0, 8), w1, w2, nw).shape == (0, 8)
    x = torch.randn(1, 1, 8)
    torch.testing.assert_close(alignops.skip_ffn(x, w1, w2, nw), ref.ffn(x, w1, w2, nw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_bad_input_messages(backend):
    x = torch.randn(2, 5, 16)
    w1, w2, nw, _, _ = make_ffn(16, 8)
    call = lambda *a, **kw: alignops.skip_ffn(*a, backend=backend, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"w_down must have shape \[H, I\] with H = 16, got \[15, 8\]"):
        call(x, w1, w2[:15], nw)
    with pytest.raises(ValueError, match=r"w_gate_up must have shape \[2I, H\] = \[16, 16\], got \[8, 16\]"):
        call(x, w1[:8], w2, nw)
    with pytest.raises(ValueError, match=r"w_gate_up must have shape \[I, H\] = \[8, 16\]"):
        call(x, w1, w2, nw, activation="gelu")
    with pytest.raises(ValueError, match=r"norm_weight must have shape \[H\] = \[16\], got \[4\]"):
        call(x, w1, w2, nw[:4])
    with pytest.raises(ValueError, match="norm_weight must have the dtype of x"):
        call(x, w1, w2, nw.double())
    with pytest.raises(ValueError, match=r"keep must be a bool tensor of shape \[2, 5\] \(the rows of x\)"):
        call(x, w1, w2, nw, keep=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"keep must be a bool tensor of shape \[2, 5\]"):
        call(x, w1, w2, nw, keep=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"skip_spans must satisfy 0 <= start <= end <= T = 5"):
        call(x, w1, w2, nw, skip_spans=torch.tensor([[[2, 9]], [[0, 1]]]))
    with pytest.raises(ValueError, match=r"skip_spans must have shape \[B, S, 2\]"):
        call(x, w1, w2, nw, skip_spans=torch.tensor([[2, 3]]))
    with pytest.raises(ValueError, match="give one of keep, skip_spans, threshold, capacity"):
        call(x, w1, w2, nw, keep=torch.ones(2, 5, dtype=torch.bool), threshold=0.1)
    with pytest.raises(ValueError, match="threshold and capacity rank tokens by their change in this layer"):
        call(x, w1, w2, nw, threshold=0.1)
    with pytest.raises(ValueError, match="eps must be a finite value > 0, got inf"):
        call(x, w1, w2, nw, eps=float("inf"))
    with pytest.raises(ValueError, match="eps must be a finite value > 0, got -1"):
        call(x, w1, w2, nw, eps=-1.0)
    with pytest.raises(ValueError, match="activation must be one of"):
        call(x, w1, w2, nw, activation="relu")
    with pytest.raises(ValueError, match=r"capacity must give 0 <= k <= T = 5"):
        call(x, w1, w2, nw, capacity=9, previous=x)


def test_raw_op_checks():
    x = torch.randn(4, 8)
    w1, w2, nw, _, _ = make_ffn(8, 4)
    op = torch.ops.alignops.skip_ffn
    with pytest.raises(ValueError, match=r"keep must be a bool tensor of shape \[N\] = \[4\]"):
        op(x, torch.ones(3, dtype=torch.bool), w1, w2, nw, None, None, 0, 1e-6, False)
    with pytest.raises(ValueError, match=r"activation code must be 0 \(swiglu\), 1 \(gelu\) or 2 \(gelu_tanh\)"):
        op(x, torch.ones(4, dtype=torch.bool), w1, w2, nw, None, None, 7, 1e-6, False)
    with pytest.raises(ValueError, match=r"w_gate_up must have shape \[2I, H\] = \[8, 8\]"):
        op(x, torch.ones(4, dtype=torch.bool), w1[:3], w2, nw, None, None, 0, 1e-6, False)
    out = op(x, torch.tensor([False, True, False, True]), w1, w2, nw, None, None, 0, 1e-6, True)
    assert out[2].item() == 2 and out[1][:2].tolist() == [1, 3]
    assert out[3].shape == (4,) and out[4].shape == (4, 8)


# ---- the patcher on a small LLaMA-style model (HF module layout, random weights) -----------------------


class RMSNorm(torch.nn.Module):
    def __init__(self, H, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(H) + 0.5)
        self.variance_epsilon = eps

    def forward(self, x):
        return ref.rms_norm(x, self.weight, self.variance_epsilon)


class MLP(torch.nn.Module):
    def __init__(self, H, I):
        super().__init__()
        self.gate_proj = torch.nn.Linear(H, I, bias=False)
        self.up_proj = torch.nn.Linear(H, I, bias=False)
        self.down_proj = torch.nn.Linear(I, H, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(torch.nn.Module):
    """The structure of HF's LlamaDecoderLayer.forward (attention simplified to causal single-head)."""

    def __init__(self, H, I):
        super().__init__()
        self.input_layernorm = RMSNorm(H)
        self.qkv = torch.nn.Linear(H, 3 * H, bias=False)
        self.o_proj = torch.nn.Linear(H, H, bias=False)
        self.post_attention_layernorm = RMSNorm(H)
        self.mlp = MLP(H, I)

    def forward(self, hidden_states):
        residual = hidden_states
        q, k, v = self.qkv(self.input_layernorm(hidden_states)).chunk(3, -1)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        hidden_states = residual + self.o_proj(attn)
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class TinyLlama(torch.nn.Module):
    def __init__(self, H=32, I=48, L=6):
        super().__init__()
        self.layers = torch.nn.ModuleList(DecoderLayer(H, I) for _ in range(L))

    def forward(self, h, record=None):
        for layer in self.layers:
            h = layer(h)
            if record is not None:
                record.append(h)
        return h


def test_patcher_equals_dense_when_nothing_skipped_and_skips_when_asked():
    model = TinyLlama()
    h = torch.randn(2, 15, 32)
    with torch.no_grad():
        dense = model(h)
        skipper = patch_ffn_skipping(model.layers, SkipSchedule(start=2, end=6, interval=2))
        assert isinstance(model.layers[2].mlp, alignops.skip._SkippingMLP)
        assert not isinstance(model.layers[3].mlp, alignops.skip._SkippingMLP)
        torch.testing.assert_close(model(h), dense, rtol=1e-5, atol=1e-5)
        perceptual = torch.zeros(2, 15, dtype=torch.bool)
        perceptual[:, 1:9] = True
        with skipper.skipping(~perceptual):
            skipped = model(h)
        # The same computation by hand: the FFN of layers 2 and 4 leaves perceptual rows unchanged.
        x = h
        for i, layer in enumerate(model.layers):
            mlp, norm = (
                skipper._patched[[2, 4].index(i)][1:] if i in (2, 4) else (layer.mlp, layer.post_attention_layernorm)
            )
            residual = x
            q, k, v = layer.qkv(layer.input_layernorm(x)).chunk(3, -1)
            x = residual + layer.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
            delta = mlp(norm(x))
            if i in (2, 4):
                delta = torch.where(perceptual[..., None], torch.zeros_like(delta), delta)
            x = x + delta
        torch.testing.assert_close(skipped, x, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(skipped, dense)
        skipper.remove()
        assert isinstance(model.layers[2].mlp, MLP)
        torch.testing.assert_close(model(h), dense, rtol=0, atol=0)


def test_patcher_trains():
    model = TinyLlama(L=2)
    skipper = patch_ffn_skipping(model.layers, SkipSchedule())
    h = torch.randn(1, 7, 32)
    keep = torch.tensor([[True, False, False, True, True, False, True]])
    with skipper.skipping(keep):
        model(h).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["layers.0.mlp.mlp.gate_proj.weight"] is not None
    assert grads["layers.0.mlp.norm.weight"] is not None


def test_patcher_rejects_foreign_layers():
    with pytest.raises(ValueError, match="layer 0 has no `mlp`"):
        patch_ffn_skipping([torch.nn.Linear(2, 2)], SkipSchedule())
    with pytest.raises(ValueError, match="SkipSchedule needs 0 <= start <= end and interval >= 1"):
        SkipSchedule(start=3, end=1)


# ---- the fused residual add + criterion (delta=) and in-place skipping ---------------------------------


@pytest.mark.parametrize("criterion", ["cosine", "norm_ratio"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_add_score_op_matches_reference(cpu_capability, criterion, dtype):
    r = torch.randn(37, 75, dtype=torch.float64).to(dtype)
    d = (0.3 * torch.randn(37, 75, dtype=torch.float64)).to(dtype)
    code = ref.CRITERIA.index(criterion)
    h, score = torch.ops.alignops.skip_add_score(r, d, code)
    exp_h, exp_score = ref.add_score(r, d, criterion)
    assert torch.equal(h, exp_h)  # the add rounds exactly as torch's
    assert score.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # the score is summed over the rounded h in fp32: compare with the fp64 value of the same h
    exact = ref.change_score(h.double(), r.double(), criterion)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(score.double(), exact, rtol=tol, atol=tol)
    torch.testing.assert_close(score, exp_score.to(score.dtype), rtol=tol, atol=tol)


@pytest.mark.parametrize("criterion", ["cosine", "norm_ratio"])
@pytest.mark.parametrize("mode", ["threshold", "capacity", "keep"])
def test_delta_path_equals_add_then_skip(criterion, mode):
    B, T, H = 2, 23, 48
    x = torch.randn(B, T, H)
    d = 0.4 * torch.randn(B, T, H)
    w1, w2, nw, _, _ = make_ffn(H, 40)
    h = x + d
    score = alignops.skip.change_score(h, x, criterion=criterion)
    kwargs = {
        "threshold": dict(threshold=float(score.median())),
        "capacity": dict(capacity=0.4),
        "keep": dict(keep=torch.rand(B, T) > 0.5),
    }[mode]
    if mode == "threshold":
        keep = score > kwargs["threshold"]
    elif mode == "capacity":
        keep = alignops.skip.keep_top_k(score, capacity=0.4)
    else:
        keep = kwargs["keep"]
    y = alignops.skip_ffn(x, w1, w2, nw, delta=d, criterion=criterion, **kwargs)
    exp = ref.skip_ffn(h, w1, w2, nw, keep)
    torch.testing.assert_close(y, exp, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[~keep], h[~keep])
    y_ref = alignops.skip_ffn(x, w1, w2, nw, delta=d, criterion=criterion, backend="torch", **kwargs)
    torch.testing.assert_close(y_ref, exp, rtol=1e-5, atol=1e-5)


def test_delta_path_gradients_fp64():
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    d = (0.5 * torch.randn(2, 7, 12, dtype=torch.float64)).requires_grad_()
    w1, w2, nw, _, _ = make_ffn(12, 9, dtype=torch.float64)
    w1.requires_grad_()
    keep = torch.rand(2, 7) > 0.4
    torch.autograd.gradcheck(lambda x, d, w1: alignops.skip_ffn(x, w1, w2, nw, keep=keep, delta=d), (x, d, w1))


def test_inplace_leaves_skipped_rows_untouched():
    x = torch.randn(3, 17, 40)
    w1, w2, nw, b1, b2 = make_ffn(40, 24, bias=True)
    keep = torch.rand(3, 17) > 0.5
    exp = ref.skip_ffn(x, w1, w2, nw, keep, b1, b2)
    for backend in ("native", "torch"):
        target = x.clone()
        ptr = target.data_ptr()
        with torch.no_grad():
            out = alignops.skip_ffn(
                target, w1, w2, nw, keep=keep, b_gate_up=b1, b_down=b2, inplace=True, backend=backend
            )
        assert out.data_ptr() == ptr and out is target
        assert torch.equal(target[~keep], x[~keep])
        torch.testing.assert_close(target, exp, rtol=1e-5, atol=1e-5)
    everything = x.clone()
    with torch.no_grad():
        alignops.skip_ffn(everything, w1, w2, nw, b_gate_up=b1, b_down=b2, inplace=True)
    torch.testing.assert_close(everything, ref.ffn(x, w1, w2, nw, b1, b2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arg", ["x", "w_gate_up", "w_down", "norm_weight"])
def test_raw_inplace_op_refuses_inputs_that_require_grad(arg):
    x = torch.randn(6, 16)
    w1, w2, nw, _, _ = make_ffn(16, 8)
    keep = torch.rand(6) > 0.5
    args = dict(x=x.clone(), w_gate_up=w1, w_down=w2, norm_weight=nw)
    args[arg] = args[arg].clone().requires_grad_() * 1  # a non-leaf: a leaf refuses in-place writes anyway
    call = (args["x"], keep, args["w_gate_up"], args["w_down"], args["norm_weight"], None, None, 0, 1e-6)
    with pytest.raises(
        RuntimeError,
        match=rf"alignops::skip_ffn_ updates x in place and records no gradient, "
        rf"but {arg} requires grad: use the out-of-place alignops.skip_ffn",
    ):
        torch.ops.alignops.skip_ffn_(*call)
    with torch.no_grad():  # no graph, nothing to refuse
        torch.ops.alignops.skip_ffn_(*call)
    torch.testing.assert_close(call[0], ref.skip_ffn(x, w1, w2, nw, keep), rtol=1e-5, atol=1e-5)


def test_inplace_and_delta_bad_input():
    x = torch.randn(2, 5, 16, requires_grad=True)
    w1, w2, nw, _, _ = make_ffn(16, 8)
    with pytest.raises(ValueError, match="inplace=True overwrites x and records no gradient"):
        alignops.skip_ffn(x, w1, w2, nw, inplace=True)
    with torch.no_grad():
        with pytest.raises(ValueError, match="inplace=True needs a contiguous x"):
            alignops.skip_ffn(torch.randn(5, 2, 16).transpose(0, 1), w1, w2, nw, inplace=True)
        with pytest.raises(ValueError, match="give previous .* or delta .*, not both"):
            alignops.skip_ffn(x, w1, w2, nw, delta=x, previous=x, threshold=0.1)
        with pytest.raises(ValueError, match="delta must match x"):
            alignops.skip_ffn(x, w1, w2, nw, delta=x[:, :3], threshold=0.1)
        for backend in ("native", "torch"):  # dtype and device: the op's checks, whichever backend runs
            with pytest.raises(ValueError, match=r"delta must have the dtype of residual \(torch.float32\)"):
                alignops.skip_ffn(x, w1, w2, nw, delta=x.double(), threshold=0.1, backend=backend)
            with pytest.raises(ValueError, match=r"delta must be on the device of residual"):
                alignops.skip_ffn(x, w1, w2, nw, delta=x.to("meta"), threshold=0.1, backend=backend)
    with pytest.raises(ValueError, match="x must be contiguous to be updated in place"):
        torch.ops.alignops.skip_ffn_(
            torch.randn(5, 2, 16).transpose(0, 1)[0], torch.ones(5, dtype=torch.bool), w1, w2, nw, None, None, 0, 1e-6
        )
    with pytest.raises(ValueError, match=r"delta must have the shape of residual"):
        torch.ops.alignops.skip_add_score(torch.randn(4, 8), torch.randn(4, 9), 0)
    with pytest.raises(ValueError, match="criterion code must be 0 \\(cosine\\) or 1 \\(norm_ratio\\), got 2"):
        torch.ops.alignops.skip_add_score(torch.randn(4, 8), torch.randn(4, 8), 2)


def test_opcheck_inplace_and_add_score():
    x = torch.randn(9, 16)
    w1, w2, nw, _, _ = make_ffn(16, 8)
    keep = torch.rand(9) > 0.5
    torch.library.opcheck(torch.ops.alignops.skip_ffn_, (x.clone(), keep, w1, w2, nw, None, None, 0, 1e-6))
    for code in (0, 1):
        torch.library.opcheck(torch.ops.alignops.skip_add_score, (x, 0.1 * torch.randn(9, 16), code))
    d = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    r = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda r, d: torch.ops.alignops.skip_add_score(r, d, 0)[0], (r, d))
