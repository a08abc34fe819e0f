"""skip family, CPU inference with oneDNN-prepacked weights (alignops.skip.prepack): values vs the unpacked
path and the reference at any row count, skipped rows untouched, repacking after in-place updates, the
gradient path never uses the packed copy, the patcher's prepack=True, bad input."""

import contextlib
import gc

import pytest
import torch
from test_skip import TinyLlama, make_ffn

import alignops
from alignops.reference import skip as ref
from alignops.skip import SkipSchedule, is_prepacked, patch_ffn_skipping, prepack, unprepack

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@contextlib.contextmanager
def packed(*weights, **kwargs):
    prepack(*weights, **kwargs)
    try:
        yield
    finally:
        unprepack(*weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 65, 200, 450])  # 450: bf16 in two blocks, fp32 on MKL's GEMMs
@pytest.mark.parametrize("batch_size", [None, 64])
def test_prepacked_matches_unpacked_and_reference(dtype, rows, batch_size):
    torch.manual_seed(rows)
    H, I = 96, 160
    w1, w2, nw, _, _ = make_ffn(H, I, dtype=dtype)
    p1, p2 = w1.clone(), w2.clone()  # the same values, registered: the others stay unpacked
    with packed(p1, p2, batch_size=batch_size):
        assert is_prepacked(p1) and is_prepacked(p2) and not is_prepacked(w1)
        x = torch.randn(rows + 5, H).to(dtype)
        keep = torch.ones(rows + 5, dtype=torch.bool)
        keep[2:7] = False  # rows kept: `rows`
        with torch.no_grad():
            got = alignops.skip_ffn(x, p1, p2, nw, keep=keep)
            plain = alignops.skip_ffn(x, w1, w2, nw, keep=keep)
        exact = ref.skip_ffn(x.double(), w1.double(), w2.double(), nw.double(), keep)
        assert torch.equal(got[~keep], x[~keep])
        torch.testing.assert_close(got.float(), plain.float(), **TOL[dtype])
        # no worse than the unpacked path against the fp64 result (bf16: within twice its error)
        err_got = (got.double() - exact).abs().max()
        err_plain = (plain.double() - exact).abs().max()
        assert err_got <= 2 * err_plain + 1e-6, (err_got, err_plain)
    assert not is_prepacked(p1) and not is_prepacked(p2)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_prepacked_with_biases_in_place_and_keep_all(activation):
    torch.manual_seed(0)
    H, I = 64, 80
    w1, w2, nw, b1, b2 = make_ffn(H, I, activation=activation, dtype=torch.bfloat16, bias=True)
    p1, p2 = w1.clone(), w2.clone()
    with packed(p1, p2):
        x = torch.randn(3, 21, H).to(torch.bfloat16)
        for keep in (torch.rand(3, 21) > 0.5, torch.ones(3, 21, dtype=torch.bool)):
            kw = dict(keep=keep, b_gate_up=b1, b_down=b2, activation=activation)
            with torch.no_grad():
                plain = alignops.skip_ffn(x, w1, w2, nw, **kw)
                buf = x.clone()
                alignops.skip_ffn(buf, p1, p2, nw, inplace=True, **kw)
            assert torch.equal(buf[~keep], x[~keep])
            torch.testing.assert_close(buf.float(), plain.float(), **TOL[torch.bfloat16])


def test_one_weight_packed_and_many_blocks_in_place():
    torch.manual_seed(5)
    H, I = 64, 96
    w1, w2, nw, b1, b2 = make_ffn(H, I, dtype=torch.bfloat16, bias=True)
    x = torch.randn(1000, H).to(torch.bfloat16)
    keep = torch.rand(1000) > 0.1  # about 900 rows: five blocks
    with torch.no_grad():
        plain = alignops.skip_ffn(x, w1, w2, nw, keep=keep, b_gate_up=b1, b_down=b2)
        for packed_ones in ((w1,), (w2,)):
            with packed(*packed_ones):
                buf = x.clone()
                alignops.skip_ffn(buf, w1, w2, nw, keep=keep, b_gate_up=b1, b_down=b2, inplace=True)
            assert torch.equal(buf[~keep], x[~keep])
            torch.testing.assert_close(buf.float(), plain.float(), **TOL[torch.bfloat16])


def test_weight_changed_in_place_is_repacked():
    torch.manual_seed(1)
    H, I = 48, 64
    w1, w2, nw, _, _ = make_ffn(H, I)
    with packed(w1, w2):
        x = torch.randn(9, H)
        keep = torch.ones(9, dtype=torch.bool)
        with torch.no_grad():
            alignops.skip_ffn(x, w1, w2, nw, keep=keep)
            w2.mul_(-2.0)  # a new version of the same tensor
            got = alignops.skip_ffn(x, w1, w2, nw, keep=keep)
        exp = ref.skip_ffn(x.double(), w1.double(), w2.double(), nw.double(), keep)
        torch.testing.assert_close(got.double(), exp, **TOL[torch.float32])
        assert is_prepacked(w2)


def test_new_storage_is_repacked_and_version_free_changes_need_a_new_registration():
    torch.manual_seed(6)
    H, I = 32, 40
    w1, w2, nw, _, _ = make_ffn(H, I)
    x = torch.randn(5, H)
    keep = torch.ones(5, dtype=torch.bool)

    def exact():
        return ref.skip_ffn(x.double(), w1.double(), w2.double(), nw.double(), keep)

    with packed(w1, w2), torch.no_grad():
        w2.data = -w2.data.clone()  # a new storage under the same tensor object
        torch.testing.assert_close(alignops.skip_ffn(x, w1, w2, nw, keep=keep).double(), exact(), **TOL[torch.float32])
        w2.data.mul_(3.0)  # bumps no version: not seen until registered again (documented)
        prepack(w2)
        torch.testing.assert_close(alignops.skip_ffn(x, w1, w2, nw, keep=keep).double(), exact(), **TOL[torch.float32])


def test_gradient_path_uses_the_plain_weights():
    torch.manual_seed(2)
    H, I = 40, 56
    w1, w2, nw, _, _ = make_ffn(H, I)
    p1, p2 = w1.clone().requires_grad_(True), w2.clone().requires_grad_(True)
    with packed(p1, p2):
        x = torch.randn(11, H, requires_grad=True)
        keep = torch.rand(11) > 0.4
        got = alignops.skip_ffn(x, p1, p2, nw, keep=keep)
        plain = alignops.skip_ffn(x, w1, w2, nw, keep=keep)
        assert torch.equal(got, plain)  # the same GEMMs, bit for bit: the packed copy is for inference
        got.sum().backward()
        assert p1.grad is not None and p2.grad is not None


def test_a_freed_weight_is_not_matched_by_a_new_tensor():
    w = torch.randn(32, 16)
    prepack(w)
    del w
    gc.collect()
    fresh = torch.randn(32, 16)
    assert not is_prepacked(fresh)
    prepack(fresh)  # registering also drops the dead entry
    assert is_prepacked(fresh)
    unprepack(fresh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patcher_with_prepack_equals_the_plain_patcher(dtype):
    torch.manual_seed(3)
    model = TinyLlama().to(dtype)
    h = torch.randn(2, 15, 32).to(dtype)
    perceptual = torch.zeros(2, 15, dtype=torch.bool)
    perceptual[:, 1:9] = True
    with torch.no_grad():
        plain = patch_ffn_skipping(model.layers, SkipSchedule(start=1))
        with plain.skipping(~perceptual):
            exp = model(h)
        plain.remove()
        skipper = patch_ffn_skipping(model.layers, SkipSchedule(start=1), prepack=True)
        with skipper.skipping(~perceptual):
            got = model(h)
        layer = model.layers[1]
        assert is_prepacked(layer.mlp.mlp.down_proj.weight) and is_prepacked(layer.mlp._gate_up())
        skipper.remove()
        assert not is_prepacked(model.layers[1].mlp.down_proj.weight)
    torch.testing.assert_close(got.float(), exp.float(), **TOL[dtype])


def test_patcher_registers_nothing_once_the_model_left_the_cpu():
    model = TinyLlama(L=2)
    skipper = patch_ffn_skipping(model.layers, prepack=True)
    with torch.no_grad():
        model(torch.randn(1, 4, 32))
        model.to("meta")  # stands in for a GPU: the fused copy is rebuilt there and not registered
        model.layers[0].mlp._gate_up()
    assert not model.layers[0].mlp._fused[2]
    assert not is_prepacked(model.layers[0].mlp.mlp.down_proj.weight)  # its CPU copy was dropped on the way
    skipper.remove()


def test_bad_input():
    with pytest.raises(ValueError, match="give at least one weight"):
        prepack()
    with pytest.raises(ValueError, match="weights must be tensors, got int"):
        prepack(3)
    with torch.inference_mode():
        frozen = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="an inference tensor keeps no version counter"):
        prepack(frozen)
    with pytest.raises(ValueError, match="prepacked weights live on the CPU; got meta"):
        prepack(torch.empty(4, 4, device="meta"))
    with pytest.raises(ValueError, match="prepacked weights must be bfloat16 or float32, got torch.float16"):
        prepack(torch.zeros(4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"each weight must be a 2-D tensor of shape \[out_features, in_features\]"):
        prepack(torch.zeros(4))
    with pytest.raises(ValueError, match="batch_size must be > 0, got 0"):
        prepack(torch.zeros(4, 4), batch_size=0)
    model = TinyLlama()
    model.layers[3].to(torch.float16)
    with pytest.raises(ValueError, match="prepack=True needs layer 3's FFN weights on the CPU in bfloat16 or float32"):
        patch_ffn_skipping(model.layers, prepack=True)
    assert not any(isinstance(layer.mlp, alignops.skip._SkippingMLP) for layer in model.layers)  # none patched
