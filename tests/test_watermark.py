"""watermark family on the CPU: the fused C++ kernels vs the PyTorch reference (bit-identical words and
selections), green fraction, Gumbel sampling's distribution, detector simulations (z > 4 with, ~0 without the
watermark), Alignment Resampling, autograd, opcheck, compile, bad input."""

import math

import pytest
import torch

from alignops import watermark as W
from alignops.reference import watermark as ref

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(params=["avx2", "default"])
def cpu_capability(request, monkeypatch):
    monkeypatch.setenv("ALIGNOPS_CPU_CAPABILITY", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,V,h", [(3, 1037, 1), (2, 5000, 3), (4, 7, 0), (1, 513, 2)])
def test_native_matches_reference(cpu_capability, dtype, B, V, h):
    x = (torch.randn(B, V) * 3).to(dtype)
    ctx = torch.randint(0, 128256, (B, h))
    for key in (0, 15485863, -7, 2**62 + 3):
        assert torch.equal(W.kgw_process(x, ctx, key, gamma=0.3, delta=1.7), ref.kgw_logits(x, ctx, key, 0.3, 1.7))
        assert torch.equal(W.kgw_greedy(x, ctx, key, gamma=0.3, delta=1.7), ref.kgw_argmax(x, ctx, key, 0.3, 1.7))
        assert torch.equal(W.gumbel_sample(x, ctx, key, temperature=0.8), ref.gumbel_argmax(x, ctx, key, 0.8))


def test_torch_backend_is_the_reference():
    x, ctx = torch.randn(2, 300), torch.randint(0, 300, (2, 1))
    assert torch.equal(W.kgw_process(x, ctx, 5, backend="torch"), W.kgw_process(x, ctx, 5, backend="native"))
    assert torch.equal(W.gumbel_sample(x, ctx, 5, backend="torch"), W.gumbel_sample(x, ctx, 5, backend="native"))


def test_kgw_adds_delta_on_a_gamma_fraction_and_depends_on_key_and_context():
    x = torch.zeros(2, 50000)
    ctx = torch.tensor([[11], [12]])
    y = W.kgw_process(x, ctx, 1, gamma=0.25, delta=2.0)
    assert set(y.unique().tolist()) == {0.0, 2.0}
    frac = (y == 2.0).double().mean(-1)
    assert ((frac - 0.25).abs() < 0.01).all()  # sd of the fraction: 0.002
    assert ((y[0] == 2) != (y[1] == 2)).double().mean() > 0.3  # different contexts, different lists
    y2 = W.kgw_process(x, ctx, 2, gamma=0.25, delta=2.0)
    assert ((y == 2) != (y2 == 2)).double().mean() > 0.3
    assert torch.equal(W.kgw_process(x, ctx, 1, gamma=0.0, delta=2.0), x)
    assert (W.kgw_process(x, ctx, 1, gamma=1.0, delta=2.0) == 2).all()


def test_argmax_ties_and_infinities_follow_torch():
    x = torch.full((2, 100), -math.inf)
    ctx = torch.zeros(2, 1, dtype=torch.int64)
    assert W.kgw_greedy(x, ctx, 3, gamma=0.0).tolist() == [0, 0]
    x = torch.zeros(1, 2000)
    x[0, 700] = x[0, 1500] = 5.0
    assert W.kgw_greedy(x, ctx[:1], 3, gamma=0.0).tolist() == [700]  # first of equal maxima


def nan_rows(V: int) -> torch.Tensor:
    """Rows whose first NaN sits at the start, in a vector tail, behind a larger value / +inf, in a later
    chunk than another NaN's duplicate, and a row without NaN (the control)."""
    x = torch.randn(6, V) * 3
    x[0, 0] = math.nan
    x[1, V - 1] = math.nan
    x[2, 5], x[2, V // 2] = 100.0, math.nan
    x[3, 3], x[3, V - 2], x[3, V - 1] = math.inf, math.nan, math.nan
    x[4, V // 3], x[4, 2 * V // 3] = math.nan, math.nan
    return x


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("V", [7, 1037, 5000])
def test_argmax_first_nan_wins_as_in_torch(cpu_capability, backend, V):
    x = nan_rows(V)
    ctx = torch.randint(0, 1000, (6, 1))
    for dtype in DTYPES:
        xd = x.to(dtype)
        # gamma = 0: nothing green, so kgw_greedy is torch.argmax of the logits themselves.
        assert torch.equal(W.kgw_greedy(xd, ctx, 3, gamma=0.0, backend=backend), xd.argmax(-1))
        nan = xd.isnan().any(-1)
        got = W.gumbel_sample(xd, ctx, 3, temperature=0.7, backend=backend)
        assert torch.equal(got[nan], xd.argmax(-1)[nan])  # a NaN beats any noise
        assert torch.equal(W.kgw_greedy(xd, ctx, 3, gamma=0.5, backend=backend)[nan], xd.argmax(-1)[nan])


def test_gumbel_sampling_follows_softmax():
    # Over many contexts the keyed Gumbel-max samples are draws from softmax(logits / T).
    V, T = 6, 0.7
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0, 0.3, -2.0]]).expand(20000, V).contiguous()
    ctx = torch.arange(20000)[:, None]
    tok = W.gumbel_sample(logits, ctx, 99, temperature=T)
    freq = torch.bincount(tok, minlength=V).double() / 20000
    p = torch.softmax(logits[0].double() / T, -1)
    chi2 = (20000 * (freq - p) ** 2 / p).sum().item()
    assert chi2 < 25  # chi-square with 5 dof: P(> 25) < 2e-4


# ---- detection on a seeded simulated language model ----------------------------------------------------------


class Bigram:
    """A random bigram LM over V tokens: next-token logits depend on the previous token."""

    def __init__(self, V=2000, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(V, V, generator=g) * 1.5
        self.V = V

    def generate(self, B, T, step, seed):
        g = torch.Generator().manual_seed(seed)
        toks = torch.randint(0, self.V, (B, 4), generator=g)
        for _ in range(T):
            logits = self.table[toks[:, -1]]
            toks = torch.cat([toks, step(logits, toks, g)[:, None]], dim=1)
        return toks


def _sample(logits, g):
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]


@pytest.fixture(scope="module")
def lm():
    return Bigram()


def test_kgw_detector_separates_watermarked_text(lm):
    key, gamma = 424242, 0.25
    marked = lm.generate(8, 200, lambda x, t, g: _sample(W.kgw_process(x, t[:, -1:], key, gamma=gamma), g), 1)
    plain = lm.generate(8, 200, lambda x, t, g: _sample(x, g), 2)
    mask = torch.ones_like(marked, dtype=torch.bool)
    mask[:, :4] = False  # the prompt
    zm = W.kgw_detect(marked, key, gamma=gamma, mask=mask)
    zp = W.kgw_detect(plain, key, gamma=gamma, mask=mask)
    assert (zm.num_scored == 200).all()
    assert (zm.z > 4).all(), zm.z
    assert (zp.z.abs() < 3.5).all() and abs(zp.z.mean().item()) < 1.5, zp.z
    assert (zm.p_value < 1e-4).all()
    # the wrong key sees nothing
    assert (W.kgw_detect(marked, key + 1, gamma=gamma, mask=mask).z.abs() < 3.5).all()


def test_gumbel_detector_separates_watermarked_text(lm):
    key, h = 777, 4
    marked = lm.generate(8, 200, lambda x, t, g: W.gumbel_sample(x, t[:, -h:], key), 3)
    plain = lm.generate(8, 200, lambda x, t, g: _sample(x, g), 4)
    zm = W.gumbel_detect(marked, key, context_width=h)
    zp = W.gumbel_detect(plain, key, context_width=h)
    assert (zm.num_scored == 200).all()
    assert (zm.z > 4).all(), zm.z
    assert (zp.z.abs() < 3.5).all() and abs(zp.z.mean().item()) < 1.5, zp.z
    assert (zm.p_value < 1e-4).all() and (zp.p_value > 1e-3).all()


def test_detector_z_by_hand():
    # gamma = 0.5, one context token: count greens directly from the processor's output
    toks = torch.randint(0, 500, (1, 41))
    green = (
        torch.stack(
            [
                W.kgw_process(torch.zeros(1, 500), toks[:, t - 1 : t], 9, gamma=0.5, delta=1.0)[0, toks[0, t]]
                for t in range(1, 41)
            ]
        )
        == 1.0
    )
    det = W.kgw_detect(toks, 9, gamma=0.5)
    G = green.sum().item()
    assert det.score.item() == G and det.num_scored.item() == 40
    assert det.z.item() == pytest.approx((G - 20) / math.sqrt(10))
    empty = W.kgw_detect(toks[:, :1], 9)
    assert empty.num_scored.item() == 0 and empty.z.item() == 0 and empty.p_value.item() == 1.0


def test_alignment_resampling_raises_reward_and_keeps_the_watermark(lm):
    key, n = 31337, 4
    good = torch.randn(lm.V)  # a per-token "reward model"
    cands = torch.stack(
        [lm.generate(16, 200, lambda x, t, g: _sample(W.kgw_process(x, t[:, -1:], key), g), 10 + s) for s in range(n)],
        dim=1,
    )  # [B, n, T]
    rewards = good[cands].mean(-1)
    chosen, idx = W.alignment_resampling(cands, rewards)
    assert torch.equal(chosen, cands[torch.arange(16), rewards.argmax(-1)])
    assert good[chosen].mean() > good[cands[:, 0]].mean()
    mask = torch.ones_like(chosen, dtype=torch.bool)
    mask[:, :4] = False
    assert (W.kgw_detect(chosen, key, mask=mask).z > 4).all()


def test_logits_processor_uses_the_last_tokens():
    proc = W.KGWLogitsProcessor(key=5, gamma=0.5, delta=3.0, context_width=2)
    ids, scores = torch.randint(0, 100, (3, 9)), torch.randn(3, 100)
    assert torch.equal(proc(ids, scores), W.kgw_process(scores, ids[:, -2:], 5, gamma=0.5, delta=3.0))


# ---- autograd, opcheck, compile, bad input -----------------------------------------------------------------


def test_kgw_gradient_is_identity():
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    ctx = torch.randint(0, 40, (3, 1))
    torch.autograd.gradcheck(lambda x: W.kgw_process(x, ctx, 1, delta=0.5), (x,))


def test_opcheck_and_compile():
    x, ctx = torch.randn(3, 70), torch.randint(0, 70, (3, 2))
    torch.library.opcheck(torch.ops.alignops.kgw_logits.default, (x, ctx, 3, 0.25, 2.0))
    torch.library.opcheck(torch.ops.alignops.kgw_argmax.default, (x, ctx, 3, 0.25, 2.0))
    torch.library.opcheck(torch.ops.alignops.gumbel_argmax.default, (x, ctx, 3, 1.0))
    f = torch.compile(lambda x, c: W.kgw_process(x, c, 3), fullgraph=True)
    assert torch.equal(f(x, ctx), W.kgw_process(x, ctx, 3))


def test_empty_batch():
    x, ctx = torch.randn(0, 10), torch.zeros(0, 1, dtype=torch.int64)
    assert W.kgw_process(x, ctx, 1).shape == (0, 10)
    assert W.gumbel_sample(x, ctx, 1).shape == (0,)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_bad_input_messages(backend):
    x, ctx = torch.randn(2, 10), torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"gamma \(the green fraction\) must be in \[0, 1\]"):
        W.kgw_process(x, ctx, 1, gamma=1.5, backend=backend)
    with pytest.raises(ValueError, match="delta must be finite"):
        W.kgw_greedy(x, ctx, 1, delta=math.inf, backend=backend)
    with pytest.raises(ValueError, match="temperature must be a finite value > 0"):
        W.gumbel_sample(x, ctx, 1, temperature=0.0, backend=backend)
    with pytest.raises(ValueError, match="context must"):
        W.kgw_process(x, ctx[:1], 1, backend=backend)
    with pytest.raises(ValueError, match="context must"):
        W.kgw_process(x, ctx.float(), 1, backend=backend)
    with pytest.raises(ValueError, match=r"logits must be a 2-D tensor of shape \[B, V\]"):
        W.gumbel_sample(x[0], ctx, 1, backend=backend)
    with pytest.raises(ValueError, match="vocabulary of V >= 1"):
        W.kgw_greedy(torch.randn(2, 0), ctx, 1, backend=backend)
    with pytest.raises(ValueError, match="key must be a Python int"):
        W.kgw_process(x, ctx, 2**64, backend=backend)


def test_processor_checks_its_parameters_at_construction():
    with pytest.raises(ValueError, match=r"gamma \(the green fraction\) must be in \[0, 1\], got nan"):
        W.KGWLogitsProcessor(1, gamma=math.nan)
    with pytest.raises(ValueError, match="delta must be finite, got -inf"):
        W.KGWLogitsProcessor(1, delta=-math.inf)
    with pytest.raises(ValueError, match="context_width must be >= 0"):
        W.KGWLogitsProcessor(1, context_width=-1)


def test_detector_bad_input():
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\) for detection"):
        W.kgw_detect(torch.zeros(1, 5, dtype=torch.int64), 1, gamma=0.0)
    with pytest.raises(ValueError, match="tokens must be an int64/int32 tensor"):
        W.gumbel_detect(torch.zeros(1, 5), 1)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        W.kgw_detect(torch.zeros(1, 5, dtype=torch.int64), 1, mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"candidates must have shape \[B, n, ...\]"):
        W.alignment_resampling(torch.zeros(2, 3, 5), torch.zeros(2, 4))


def test_detectors_can_ignore_repeated_pairs():
    # row 0 pairs (h = 1) at positions 1..9: (5,6) (6,5) (5,6) (6,5) (5,6) (6,5) (5,7) (7,5) (5,6): four distinct,
    # first seen at positions 1, 2, 7, 8; row 1: nine distinct pairs
    toks = torch.tensor([[5, 6, 5, 6, 5, 6, 5, 7, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    for detect in (W.kgw_detect, W.gumbel_detect):
        assert detect(toks, 4).num_scored.tolist() == [9, 9]
        assert detect(toks, 4, ignore_repeated=True).num_scored.tolist() == [4, 9]
        mask = torch.ones_like(toks, dtype=torch.bool)
        mask[0, 1] = False  # a masked first occurrence lets the next (5, 6) count
        assert detect(toks, 4, ignore_repeated=True, mask=mask).num_scored.tolist() == [4, 9]
        mask[0, [3, 5, 9]] = False  # no (5, 6) left
        assert detect(toks, 4, ignore_repeated=True, mask=mask).num_scored.tolist() == [3, 9]
    green = [
        W.kgw_process(torch.zeros(1, 11), toks[:1, t - 1 : t], 4, gamma=0.25, delta=1.0)[0, toks[0, t]].item()
        for t in (1, 2, 7, 8)
    ]
    assert W.kgw_detect(toks, 4, ignore_repeated=True).score[0].item() == sum(green)


def test_gumbel_skips_hopeless_chunks_without_changing_the_result(cpu_capability):
    # Peaked logits (an LLM-like spread of ~60 nats): most 512-entry chunks cannot beat the running best and
    # the kernel skips their noise; the samples must still equal the dense reference.
    x = torch.randn(16, 20000) * 10
    x[:, 7] = 40.0  # an early leader makes every later chunk hopeless unless it holds a comparable logit
    x[3, 19990] = 45.0
    ctx = torch.randint(0, 20000, (16, 2))
    for T in (0.5, 1.0, 3.0):
        assert torch.equal(W.gumbel_sample(x, ctx, 12, temperature=T), ref.gumbel_argmax(x, ctx, 12, T))
