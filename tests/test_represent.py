"""represent family: ima_score and IMACollector vs the reference loops, the O(N d) all-pairs mean vs an
explicit loop, NaN handling for examples without a modality, padding, bf16, the hook collector on a tiny
model, bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alignops import represent
from alignops.reference import represent as ref

PER_EXAMPLE = ("cross", "cross_fixed", "token_pair", "change_perceptual", "change_textual")
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def make_batch(L=3, B=4, T=13, H=17, dtype=torch.float32):
    """Hidden states with a random perceptual span per example (example 0 has none, example 1 is all
    perceptual) and random left / right padding (never padding all of an example)."""
    h = torch.randn(L, B, T, H, dtype=torch.float64).to(dtype)
    perceptual = torch.zeros(B, T, dtype=torch.bool)
    attention = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        pad = int(torch.randint(0, T // 3 + 1, ()))
        lo, hi = (pad, T) if b % 2 else (0, T - pad)
        attention[b, :lo] = 0
        attention[b, hi:] = 0
        if b == 1:
            perceptual[b] = True
        elif b >= 2:  # a span of 1 .. n-1 of the n real tokens
            length = int(torch.randint(1, hi - lo, ()))
            start = lo + int(torch.randint(0, hi - lo - length + 1, ()))
            perceptual[b, start : start + length] = True
    return h, perceptual, attention


def assert_matches_reference(out, expected, dtype):
    for name in PER_EXAMPLE:
        torch.testing.assert_close(getattr(out, name), expected[name], equal_nan=True, **TOL[dtype])
        torch.testing.assert_close(
            getattr(out.dataset, name), expected["dataset_" + name], equal_nan=True, **TOL[dtype]
        )
    for name in ("cross_all_pairs", "cross_fixed_all_pairs"):
        torch.testing.assert_close(
            getattr(out.dataset, name), expected["dataset_" + name], equal_nan=True, **TOL[dtype]
        )


# ---- ima_score vs the reference -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", represent.TOKEN_PAIR_MODES)
@pytest.mark.parametrize("layer_offset,fixed", [(1, 0), (2, -1)])
def test_ima_score_matches_reference(mode, layer_offset, fixed, dtype):
    h, perceptual, attention = make_batch(dtype=dtype)
    out = represent.ima_score(
        h, perceptual, attention_mask=attention, mode=mode, layer_offset=layer_offset, fixed_perceptual_layer=fixed
    )
    expected = ref.ima_score(h, perceptual, attention, mode, layer_offset, fixed)
    assert out.cross.shape == out.cross_fixed.shape == out.token_pair.shape == (3, 4)
    assert out.change_perceptual.shape == out.change_textual.shape == (3 - layer_offset, 4)
    assert out.cross.dtype == dtype
    assert_matches_reference(out, expected, dtype)


def test_median_even_and_odd_pair_counts():
    """numpy's median: 2 x 3 = 6 pairs (even: mean of the middle two) and 1 x 3 = 3 pairs (odd)."""
    h = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    perceptual = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = represent.ima_score(h, perceptual, mode="median")
    for b in range(2):
        u = F.normalize(h[0, b], dim=-1)
        pairs = (u[perceptual[b]] @ u[~perceptual[b]].T).flatten()
        torch.testing.assert_close(out.token_pair[0, b], torch.quantile(pairs, 0.5))


def test_hf_tuple_equals_stacked_tensor():
    h, perceptual, attention = make_batch()
    stacked = represent.ima_score(h, perceptual, attention_mask=attention, mode="max")
    as_tuple = represent.ima_score(tuple(h.unbind(0)), perceptual, attention_mask=attention.bool(), mode="max")
    for a, b in zip(stacked[:5] + tuple(stacked.dataset), as_tuple[:5] + tuple(as_tuple.dataset)):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


def test_all_pairs_mean_equals_explicit_pair_loop():
    """cross_all_pairs = mean over all (i, j) of cos(mean perceptual_i, mean textual_j), O(N d)."""
    L, B, T, H = 2, 23, 6, 5
    h = torch.randn(L, B, T, H, dtype=torch.float64)
    perceptual = torch.rand(B, T) < 0.4
    perceptual[0] = False  # no perceptual token: only its textual mean takes part
    perceptual[1] = True  # no textual token: only its perceptual mean takes part
    out = represent.ima_score(h, perceptual, fixed_perceptual_layer=1)
    for l in range(L):
        means_p = [h[l, i][perceptual[i]].mean(0) for i in range(B) if perceptual[i].any()]
        means_t = [h[l, j][~perceptual[j]].mean(0) for j in range(B) if (~perceptual[j]).any()]
        fixed_p = [h[1, i][perceptual[i]].mean(0) for i in range(B) if perceptual[i].any()]
        pairs = torch.stack([F.cosine_similarity(p, t, dim=0) for p in means_p for t in means_t])
        fixed = torch.stack([F.cosine_similarity(p, t, dim=0) for p in fixed_p for t in means_t])
        assert pairs.numel() == int(perceptual.any(1).sum()) * int((~perceptual).any(1).sum())
        torch.testing.assert_close(out.dataset.cross_all_pairs[l], pairs.mean())
        torch.testing.assert_close(out.dataset.cross_fixed_all_pairs[l], fixed.mean())


# ---- NaN for a missing modality, padding, empty input ---------------------------------------------


def test_missing_modality_is_nan_per_example_and_excluded():
    h, perceptual, attention = make_batch(L=3, B=5)
    perceptual[2] = ~attention[2].bool()  # only padding is "perceptual": example 2 has no perceptual token
    out = represent.ima_score(h, perceptual, attention_mask=attention)
    for name in ("cross", "cross_fixed", "token_pair"):
        values = getattr(out, name)
        assert values[:, [0, 1, 2]].isnan().all()  # 0, 2: no perceptual token; 1: no textual token
        assert not values[:, [3, 4]].isnan().any()
        torch.testing.assert_close(getattr(out.dataset, name), values[:, [3, 4]].mean(1))
    assert out.change_perceptual[:, [0, 2]].isnan().all() and not out.change_perceptual[:, [1, 3, 4]].isnan().any()
    assert out.change_textual[:, 1].isnan().all() and not out.change_textual[:, [0, 2, 3, 4]].isnan().any()
    torch.testing.assert_close(out.dataset.change_textual, out.change_textual[:, [0, 2, 3, 4]].mean(1))
    assert [int(out.dataset[i]) for i in range(7, 11)] == [5, 3, 4, 2]  # examples, perceptual, textual, both
    assert not out.dataset.cross_all_pairs.isnan().any()


def test_no_example_defined_gives_nan_dataset_terms():
    h = torch.randn(3, 2, 4, 8)
    out = represent.ima_score(h, torch.ones(2, 4, dtype=torch.bool))  # nothing textual
    assert out.cross.isnan().all() and out.change_textual.isnan().all()
    for name in ("cross", "cross_fixed", "token_pair", "change_textual", "cross_all_pairs"):
        assert getattr(out.dataset, name).isnan().all()
    assert not out.dataset.change_perceptual.isnan().any()


def test_padding_is_ignored_even_when_it_holds_nan():
    h, perceptual, _ = make_batch(L=3, B=3, T=9)
    padded = torch.cat([h, torch.full((3, 3, 4, 17), float("nan"))], dim=2)
    perceptual_padded = torch.cat([perceptual, torch.ones(3, 4, dtype=torch.bool)], dim=1)
    attention = torch.cat([torch.ones(3, 9), torch.zeros(3, 4)], dim=1).long()
    for mode in represent.TOKEN_PAIR_MODES:
        a = represent.ima_score(h, perceptual, mode=mode)
        b = represent.ima_score(padded, perceptual_padded, attention_mask=attention, mode=mode)
        for x, y in zip(a[:5] + tuple(a.dataset), b[:5] + tuple(b.dataset)):
            torch.testing.assert_close(x, y, equal_nan=True)


@pytest.mark.parametrize("B,T", [(0, 5), (3, 0)])
def test_empty_batch(B, T):
    out = represent.ima_score(torch.randn(3, B, T, 4), torch.zeros(B, T, dtype=torch.bool), mode="median")
    assert out.cross.shape == (3, B) and out.change_textual.shape == (2, B)
    assert out.dataset.cross.isnan().all() and out.dataset.cross_all_pairs.isnan().all()


# ---- dtypes and gradients -------------------------------------------------------------------------


def test_bf16_accumulates_in_fp32():
    h, perceptual, attention = make_batch()
    for mode in represent.TOKEN_PAIR_MODES:
        low = represent.ima_score(h.bfloat16(), perceptual, attention_mask=attention, mode=mode)
        same_values = represent.ima_score(h.bfloat16().float(), perceptual, attention_mask=attention, mode=mode)
        exact = represent.ima_score(h, perceptual, attention_mask=attention, mode=mode)
        assert low.cross.dtype == low.dataset.cross_all_pairs.dtype == torch.float32
        for a, b, c in zip(
            low[:5] + tuple(low.dataset)[:7],
            same_values[:5] + tuple(same_values.dataset)[:7],
            exact[:5] + tuple(exact.dataset)[:7],
        ):
            torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a, c, equal_nan=True, rtol=0, atol=2e-2)  # bf16 rounding of the input


def test_gradcheck_fp64():
    h, perceptual, attention = make_batch(L=2, B=3, T=5, H=3, dtype=torch.float64)
    perceptual[0, 0] = True
    h.requires_grad_(True)

    def f(x):
        out = represent.ima_score(x, perceptual, attention_mask=attention, fixed_perceptual_layer=1)
        d = out.dataset
        return d.cross, d.cross_fixed, d.token_pair, d.change_perceptual, d.change_textual, d.cross_all_pairs

    assert torch.autograd.gradcheck(f, (h,))


# ---- the hook collector ---------------------------------------------------------------------------


class TinyDecoderLayer(nn.Module):
    """Returns a tuple, as HF decoder layers do."""

    def __init__(self, H):
        super().__init__()
        self.proj = nn.Linear(H, H)

    def forward(self, x):
        return x + torch.tanh(self.proj(x)), None


class TinyLM(nn.Module):
    def __init__(self, V=11, H=16, n_layers=4):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.layers = nn.ModuleList(TinyDecoderLayer(H) for _ in range(n_layers))

    def forward(self, ids):
        h = self.embed(ids)
        states = [h]
        for layer in self.layers:
            h = layer(h)[0]
            states.append(h)
        return torch.stack(states)


def batches():
    """Two batches with different B and T, perceptual spans, right padding."""
    out = []
    for B, T in ((2, 9), (3, 13)):
        ids = torch.randint(0, 11, (B, T))
        perceptual = torch.zeros(B, T, dtype=torch.bool)
        perceptual[:, 1:4] = True
        perceptual[-1] = False  # an example without perceptual tokens
        attention = torch.ones(B, T, dtype=torch.long)
        attention[0, T - 2 :] = 0
        out.append((ids, perceptual, attention))
    return out


@pytest.mark.parametrize("mode,layer_offset,fixed", [("mean", 1, 0), ("median", 2, 2), ("max", 3, -1)])
def test_collector_equals_ima_score_on_concatenated_batches(mode, layer_offset, fixed):
    model = TinyLM().eval()
    data = batches()
    opts = dict(mode=mode, layer_offset=layer_offset, fixed_perceptual_layer=fixed)
    hooked = [model.embed, *model.layers]
    with torch.no_grad(), represent.IMACollector(model, hooked, **opts) as col:
        for ids, perceptual, attention in data:
            col.set_masks(perceptual, attention)
            model(ids)
    assert all(not m._forward_hooks for m in hooked)
    got = col.result()

    T = max(ids.shape[1] for ids, _, _ in data)

    def pad(x, dim):  # zeros up to T along dim
        shape = list(x.shape)
        shape[dim] = T - x.shape[dim]
        return torch.cat([x, x.new_zeros(shape)], dim=dim)

    with torch.no_grad():
        states = torch.cat([pad(model(ids), 2) for ids, _, _ in data], dim=1)
    perceptual = torch.cat([pad(p, 1) for _, p, _ in data])
    attention = torch.cat([pad(a, 1) for _, _, a in data])
    expected = represent.ima_score(states, perceptual, attention_mask=attention, **opts).dataset
    for name, a, b in zip(represent.IMADatasetScore._fields, got, expected):
        torch.testing.assert_close(a, b, equal_nan=True, msg=name)


def test_collector_by_name_with_constructor_masks():
    model = TinyLM(n_layers=2).eval()
    ids, perceptual, attention = batches()[1]
    names = ["embed", "layers.0", "layers.1"]
    with (
        torch.no_grad(),
        represent.IMACollector(model, names, perceptual_mask=perceptual, attention_mask=attention) as col,
    ):
        states = model(ids)
    expected = represent.ima_score(states, perceptual, attention_mask=attention).dataset
    for name, a, b in zip(represent.IMADatasetScore._fields, col.result(), expected):
        torch.testing.assert_close(a, b, equal_nan=True, msg=name)


def test_collector_misuse():
    model = TinyLM(n_layers=2).eval()
    ids, perceptual, attention = batches()[0]
    with pytest.raises(ValueError, match=r"layers\[1\] \(Linear\) is not a submodule of model"):
        represent.IMACollector(model, [model.embed, nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"layers\[0\] = 'nope' is not a submodule"):
        represent.IMACollector(model, ["nope"])
    with pytest.raises(ValueError, match=r"at least one module"):
        represent.IMACollector(model, [])
    with pytest.raises(ValueError, match="valid modes: mean, max, median"):
        represent.IMACollector(model, [model.embed, *model.layers], mode="min")
    with pytest.raises(ValueError, match=r"1 <= layer_offset < L = 3"):
        represent.IMACollector(model, [model.embed, *model.layers], layer_offset=3)
    col = represent.IMACollector(model, [model.embed, *model.layers])
    with pytest.raises(RuntimeError, match="no complete forward pass"):
        col.result()
    with torch.no_grad(), col:
        with pytest.raises(RuntimeError, match="without masks"):
            model(ids)
        col.set_masks(perceptual[:, :5], attention[:, :5])
        with pytest.raises(ValueError, match=r"perceptual_mask must have shape \[B, T\] = \(2, 9\)"):
            model(ids)
    backwards = represent.IMACollector(model, [model.layers[1], model.layers[0]], perceptual_mask=perceptual)
    with torch.no_grad(), backwards, pytest.raises(RuntimeError, match=r"expected the output of layers\[0\], got"):
        model(ids)
    partial = represent.IMACollector(model, [model.embed, model.layers[0]], perceptual_mask=perceptual)
    with torch.no_grad(), partial:
        model.embed(ids)  # a pass that stops after its first layer
        with pytest.raises(RuntimeError, match=r"in the middle of a forward pass \(after layers\[0\] of 2\)"):
            partial.result()
        with pytest.warns(UserWarning, match=r"stopped after layers\[0\] of 2"):
            partial.set_masks(perceptual, attention)
        model(ids)
    assert int(partial.result().num_examples) == 2
    mlp = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"layers\[0\] must output a float tensor \[B, T, H\].*got shape \(2, 4\)"):
        with torch.no_grad(), represent.IMACollector(mlp, [mlp[0], mlp[1]], perceptual_mask=perceptual):
            mlp(torch.randn(2, 4))


# ---- bad input ------------------------------------------------------------------------------------


def _bad_inputs():
    h = torch.randn(3, 2, 5, 4)
    pm = torch.zeros(2, 5, dtype=torch.bool)
    return [
        (dict(hidden_states=h[0], perceptual_mask=pm), r"4-D tensor \[L, B, T, H\].*shape \(2, 5, 4\)"),
        (dict(hidden_states=(h[0], h[1, :, :4]), perceptual_mask=pm), r"hidden_states\[1\] must match"),
        (dict(hidden_states=(h[0], h[1, 0]), perceptual_mask=pm), r"hidden_states\[1\] must be a 3-D tensor"),
        (dict(hidden_states=(), perceptual_mask=pm), r"at least one layer \(L >= 1\), got L = 0"),
        (dict(hidden_states=h[:0], perceptual_mask=pm), r"at least one layer \(L >= 1\), got L = 0"),
        (dict(hidden_states=h.long(), perceptual_mask=pm), "hidden_states must be float32"),
        (dict(hidden_states=h, perceptual_mask=pm.long()), r"perceptual_mask must be a bool tensor.*int64"),
        (dict(hidden_states=h, perceptual_mask=pm[0]), r"perceptual_mask must be a 2-D bool tensor \[B, T\]"),
        (dict(hidden_states=h, perceptual_mask=pm[:, :4]), r"perceptual_mask must have shape \[B, T\] = \(2, 5\)"),
        (
            dict(hidden_states=h, perceptual_mask=pm, attention_mask=torch.ones(2, 4)),
            r"attention_mask must have the shape of perceptual_mask \[B, T\] = \(2, 5\), got shape \(2, 4\)",
        ),
        (
            dict(hidden_states=h, perceptual_mask=pm, attention_mask=torch.ones(2, 5)),
            "attention_mask must be a bool or integer tensor",
        ),
        (
            dict(hidden_states=h, perceptual_mask=pm, mode="mean_cosine"),
            "unknown mode 'mean_cosine'; valid modes: mean, max, median",
        ),
        (dict(hidden_states=h, perceptual_mask=pm, layer_offset=3), r"1 <= layer_offset < L = 3.*got 3"),
        (dict(hidden_states=h, perceptual_mask=pm, layer_offset=0), r"1 <= layer_offset < L = 3.*got 0"),
        (dict(hidden_states=h[:1], perceptual_mask=pm), r"1 <= layer_offset < L = 1"),
        (dict(hidden_states=h, perceptual_mask=pm, fixed_perceptual_layer=3), r"-L <= fixed_perceptual_layer < L = 3"),
        (dict(hidden_states=h, perceptual_mask=pm, fixed_perceptual_layer=-4), r"-L <= fixed_perceptual_layer < L"),
    ]


@pytest.mark.parametrize("kwargs,match", _bad_inputs())
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        represent.ima_score(kwargs.pop("hidden_states"), kwargs.pop("perceptual_mask"), **kwargs)
