"""FFN skipping and IMA on real transformers models (issue 15 §2): tiny LLaMA, Qwen2, Qwen2-VL and LLaVA built
from configs with random weights (fp32, eval mode; nothing is downloaded).

The oracle of the skip schedule is independent of alignops: the *unpatched* HF model with forward hooks that
zero the FFN output (``mlp``) of the scheduled layers on the rows whose input id is a perceptual token, so that
the decoder layer's own residual add leaves those rows as they were. The patched model must give the same
logits (prefill) and the same generated ids (``generate()`` with the KV cache), and with no mask set, the
unpatched model's logits bit for bit."""

import pytest
import torch
from conftest import import_without_repo_kernels

import alignops
from alignops.ima import IMACollector, InputOf, ima_score
from alignops.skip import SkipSchedule, decoder_layers, patch_ffn_skipping, perceptual_token_ids

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: skip_ffn's fused GEMMs against HF's three nn.Linear
VOCAB = 128
IMAGE, VIDEO, VISION_START, VISION_END = 100, 101, 102, 103  # Qwen2-VL's placeholder ids, moved into VOCAB
PLACEHOLDER = 120  # the "perceptual" token id of the text-only models (a stand-in for an image span)


VLMS = ("qwen2_vl", "llava")


def _import_transformers():
    """transformers and the modeling modules used here (they import the Hub's ``kernels`` package) through
    conftest's helper, which keeps this checkout's kernels/ folder from shadowing it."""
    tf = import_without_repo_kernels("transformers")
    for name in ("llama", "qwen2", "qwen2_vl", "gemma", "gemma2", "llava"):
        import_without_repo_kernels(f"transformers.models.{name}.modeling_{name}")
    return tf


tf = _import_transformers()

TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


class Case:
    """A tiny model and one batch of its inputs; ``skip_ids`` are the ids whose rows skip."""

    def __init__(self, name):
        torch.manual_seed(0)
        self.name = name
        ids = torch.randint(3, 90, (2, 12))
        if name in ("llama", "llama_bias", "qwen2"):
            config = {
                "llama": lambda: tf.LlamaConfig(**TEXT),
                "llama_bias": lambda: tf.LlamaConfig(**TEXT, mlp_bias=True),
                "qwen2": lambda: tf.Qwen2Config(**TEXT),
            }[name]()
            self.model = (tf.Qwen2ForCausalLM if name == "qwen2" else tf.LlamaForCausalLM)(config).eval()
            ids[0, 2:7] = PLACEHOLDER  # a span of placeholders, at another place in each sequence
            ids[1, 5:11] = PLACEHOLDER
            self.skip_ids = [PLACEHOLDER]
            self.inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
            if name == "llama_bias":  # HF initialises biases to zero: make them matter
                with torch.no_grad():
                    for layer in self.model.model.layers:
                        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                            proj.bias.normal_()
        elif name == "llava":
            config = tf.LlavaConfig(
                text_config=dict(model_type="llama", **TEXT),
                vision_config=dict(
                    model_type="clip_vision_model",
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    image_size=8,
                    patch_size=4,
                ),
                image_token_index=IMAGE,
            )
            self.model = tf.LlavaForConditionalGeneration(config).eval()
            ids[0, 2:6] = IMAGE  # one 8x8 image per sequence: 2x2 patches of 4 pixels (CLS dropped) = 4 tokens
            ids[1, 5:9] = IMAGE
            self.skip_ids = perceptual_token_ids(config)
            self.inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2, 3, 8, 8))
        else:
            config = tf.Qwen2VLConfig(
                text_config=dict(
                    **TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}
                ),
                vision_config=dict(
                    depth=1,
                    embed_dim=16,
                    hidden_size=32,
                    num_heads=2,
                    mlp_ratio=2,
                    patch_size=4,
                    spatial_merge_size=2,
                    temporal_patch_size=2,
                ),
                image_token_id=IMAGE,
                video_token_id=VIDEO,
                vision_start_token_id=VISION_START,
                vision_end_token_id=VISION_END,
            )
            self.model = tf.Qwen2VLForConditionalGeneration(config).eval()
            # one 8x8 image per sequence: 2x2 patches of 4 pixels after the 2x2 merge = 4 image tokens
            for b, at in ((0, 2), (1, 5)):
                ids[b, at] = VISION_START
                ids[b, at + 1 : at + 5] = IMAGE
                ids[b, at + 5] = VISION_END
            self.skip_ids = perceptual_token_ids(config)
            self.inputs = dict(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=torch.randn(2 * 16, 3 * 2 * 4 * 4),
                image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]),
                mm_token_type_ids=(ids == IMAGE).int(),
            )
        with torch.no_grad():  # HF's init (std 0.02) leaves the FFNs too small to change a greedy token
            for p in self.model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, p[0].numel() ** -0.5)
        self.layers = decoder_layers(self.model)
        self.perceptual = torch.isin(ids, torch.tensor(self.skip_ids))

    def logits(self, **kw):
        with torch.no_grad():
            return self.model(**self.inputs, **kw).logits

    def generate(self, new_tokens=6):
        with torch.no_grad():
            out = self.model.generate(
                **self.inputs,
                max_new_tokens=new_tokens,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
        return out.sequences, torch.stack(out.logits)


_CASES = {}


@pytest.fixture(params=["llama", "qwen2", "qwen2_vl", "llava"])
def case(request):
    if request.param not in _CASES:
        _CASES[request.param] = Case(request.param)
    return _CASES[request.param]


class ReferenceSchedule:
    """The skip schedule on the unpatched model: hooks zero the scheduled layers' FFN output on the rows whose
    input id is in ``skip_ids``, read from each forward call's input_ids (prefill and every decode step)."""

    def __init__(self, case, layer_ids):
        self.keep = None
        model = case.model
        skip_ids = torch.tensor(case.skip_ids)

        def read_ids(module, args, kwargs):
            self.keep = ~torch.isin(kwargs["input_ids"], skip_ids)

        def zero_skipped(module, args, output):
            return torch.where(self.keep[..., None], output, torch.zeros_like(output))

        self.handles = [model.register_forward_pre_hook(read_ids, with_kwargs=True)]
        self.handles += [case.layers[i].mlp.register_forward_hook(zero_skipped) for i in layer_ids]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _mlp_calls(skipper):
    """Counts the patched FFN calls that ran with a mask, and checks each skipped row's update is exactly 0."""
    calls = []

    def hook(module, args, output):
        keep = module.skipper.keep
        if keep is not None:
            calls.append(int(keep.numel()))
            assert torch.equal(output[~keep], torch.zeros_like(output[~keep]))

    return calls, [layer.mlp.register_forward_hook(hook) for layer in skipper.patched_layers]


def test_decoder_layers_and_token_ids(case):
    assert case.layers is (case.model.model.language_model.layers if case.name in VLMS else case.model.model.layers)
    if case.name in VLMS:
        assert case.skip_ids == ([IMAGE, VIDEO] if case.name == "qwen2_vl" else [IMAGE])
    llava = tf.LlavaConfig(text_config=dict(model_type="llama"), image_token_index=7)
    assert perceptual_token_ids(llava) == [7]
    with pytest.raises(ValueError, match="names no perceptual token id"):
        perceptual_token_ids(tf.LlamaConfig(**TEXT))


def test_nothing_skipped_is_bit_identical_and_remove_restores(case):
    dense = case.logits()
    originals = [(layer.mlp, layer.post_attention_layernorm) for layer in case.layers]
    skipper = patch_ffn_skipping(case.model, SkipSchedule(start=0, interval=2))
    try:
        assert [list(case.layers).index(layer) for layer in skipper.patched_layers] == [0, 2]
        assert isinstance(case.layers[0].mlp, alignops.skip._SkippingMLP)
        assert torch.equal(case.logits(), dense)  # no mask: the layers' own modules
        # every row kept, through skip_ffn's fused kernel on the real weights: equal up to the GEMMs' rounding
        calls, handles = _mlp_calls(skipper)
        with skipper.skipping(torch.ones(case.perceptual.shape, dtype=torch.bool)):
            torch.testing.assert_close(case.logits(), dense, **TOL)
        assert calls == [case.perceptual.numel()] * 2
        for h in handles:
            h.remove()
    finally:
        skipper.remove()
    assert [(layer.mlp, layer.post_attention_layernorm) for layer in case.layers] == originals
    assert torch.equal(case.logits(), dense)


@pytest.mark.parametrize("schedule,layer_ids", [(SkipSchedule(start=1), [1, 2]), (SkipSchedule(end=2), [0, 1])])
def test_prefill_skipping_equals_the_reference_schedule(case, schedule, layer_ids):
    dense = case.logits()
    with ReferenceSchedule(case, layer_ids):
        expected = case.logits()
    skipper = patch_ffn_skipping(case.layers, schedule)
    try:
        calls, handles = _mlp_calls(skipper)
        with skipper.skipping_tokens(case.model, case.skip_ids):
            got = case.logits()
        with skipper.skipping(~case.perceptual):  # the same mask, given directly
            torch.testing.assert_close(case.logits(), got, rtol=0, atol=0)
        for h in handles:
            h.remove()
    finally:
        skipper.remove()
    assert len(calls) == 2 * len(layer_ids)
    text = ~case.perceptual
    torch.testing.assert_close(got[text], expected[text], **TOL)  # the text-token outputs
    torch.testing.assert_close(got, expected, **TOL)
    assert not torch.allclose(got[text], dense[text], rtol=1e-3, atol=1e-3)  # skipping changed the text tokens


def test_generate_with_kv_cache(case):
    schedule, layer_ids = SkipSchedule(start=0, interval=2), [0, 2]
    dense_ids, dense_logits = case.generate()
    with ReferenceSchedule(case, layer_ids):
        ref_ids, ref_logits = case.generate()
    skipper = patch_ffn_skipping(case.model, schedule)
    try:
        plain_ids, plain_logits = case.generate()  # patched, nothing skipped
        calls, handles = _mlp_calls(skipper)
        with skipper.skipping_tokens(case.model, case.skip_ids):
            ids, logits = case.generate()
        assert skipper.keep is None  # the hooks clear the mask after each call
        for h in handles:
            h.remove()
    finally:
        skipper.remove()
    assert torch.equal(plain_ids, dense_ids) and torch.equal(plain_logits, dense_logits)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    assert not torch.allclose(logits[0], dense_logits[0], rtol=1e-3, atol=1e-3)  # the prefill skipped
    # the prefill sees the prompt, each of the 5 decode steps one new token per sequence (the KV cache)
    T = case.perceptual.shape[1]
    assert calls == [2 * T] * 2 + [2] * 2 * 5


def test_mlp_biases():
    case = Case("llama_bias")
    with ReferenceSchedule(case, [1, 2]):
        expected = case.logits()
    skipper = patch_ffn_skipping(case.model, SkipSchedule(start=1))
    with skipper.skipping_tokens(case.model, case.skip_ids):
        got = case.logits()
    skipper.remove()
    torch.testing.assert_close(got, expected, **TOL)


def test_training_gradients_equal_the_reference():
    case = _CASES.get("llama") or Case("llama")
    weight = case.layers[1].mlp.gate_proj.weight
    with ReferenceSchedule(case, [1]):
        case.model(**case.inputs).logits.square().mean().backward()
    expected, weight.grad = weight.grad.clone(), None
    skipper = patch_ffn_skipping(case.model, SkipSchedule(start=1, end=2))
    with skipper.skipping_tokens(case.model, case.skip_ids):
        case.model(**case.inputs).logits.square().mean().backward()
    skipper.remove()
    got = weight.grad.clone()
    case.model.zero_grad(set_to_none=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_bf16_prepacked_within_twice_the_reference_error():
    """CPU inference in bf16 with oneDNN-prepacked weights: against the fp32 reference schedule, the patched
    model's error is at most twice that of the reference schedule run in bf16."""
    case = Case("llama")
    with ReferenceSchedule(case, [0, 1, 2]):
        exact = case.logits()
        case.model.to(torch.bfloat16)
        theirs = case.logits()
    skipper = patch_ffn_skipping(case.model, SkipSchedule(), prepack=True)
    with skipper.skipping_tokens(case.model, case.skip_ids):
        ours = case.logits()
    assert alignops.skip.is_prepacked(case.layers[0].mlp.mlp.down_proj.weight)
    skipper.remove()
    assert not alignops.skip.is_prepacked(case.layers[0].mlp.down_proj.weight)
    err_ours, err_theirs = (ours.float() - exact).abs().max(), (theirs.float() - exact).abs().max()
    assert err_ours <= 2 * err_theirs, (err_ours, err_theirs)


def test_gradient_checkpointing_with_a_fixed_mask():
    """Checkpointing re-runs the layers in the backward: skipping(keep) spans both, and the gradients equal the
    reference's (skipping_tokens' mask is gone by then, which torch.utils.checkpoint reports as a CheckpointError)."""
    case = Case("llama")
    model, weight = case.model, case.layers[1].mlp.gate_proj.weight
    with ReferenceSchedule(case, [0, 1, 2]):
        model(**case.inputs).logits.square().mean().backward()
    expected, weight.grad = weight.grad.clone(), None
    model.activation_checkpointing_enable()
    model.train()
    skipper = patch_ffn_skipping(model, SkipSchedule())
    with skipper.skipping(~case.perceptual):
        model(**case.inputs).logits.square().mean().backward()
    skipper.remove()
    torch.testing.assert_close(weight.grad, expected, rtol=1e-4, atol=1e-6)


def test_refuses_layers_it_cannot_fuse():
    small = dict(TEXT, num_hidden_layers=2)
    gelu = tf.LlamaForCausalLM(tf.LlamaConfig(**small, hidden_act="gelu"))
    with pytest.raises(ValueError, match="layer 0's mlp.act_fn must be SiLU"):
        patch_ffn_skipping(gelu)
    gemma = tf.GemmaForCausalLM(tf.GemmaConfig(**small, head_dim=8, hidden_act="silu"))  # RMSNorm with (1 + w)
    with pytest.raises(ValueError, match=r"layer 0's post_attention_layernorm \(GemmaRMSNorm\) does not compute"):
        patch_ffn_skipping(gemma)
    gemma2 = tf.Gemma2ForCausalLM(tf.Gemma2Config(**small, head_dim=8))
    with pytest.raises(ValueError, match="layer 0 has a `pre_feedforward_layernorm`"):
        patch_ffn_skipping(gemma2)
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(**small))
    llama.model.layers[1].post_attention_layernorm = torch.nn.LayerNorm(32)
    with pytest.raises(ValueError, match=r"layer 1's post_attention_layernorm \(LayerNorm\) does not compute"):
        patch_ffn_skipping(llama)
    assert not any(isinstance(layer.mlp, alignops.skip._SkippingMLP) for layer in llama.model.layers)
    with pytest.raises(ValueError, match="found 0"):
        decoder_layers(torch.nn.Linear(2, 2))
    fine = tf.LlamaForCausalLM(tf.LlamaConfig(**small)).eval()
    skipper = patch_ffn_skipping(fine)
    with pytest.raises(ValueError, match=r"input_ids \[B, T\] \(int64\) at each forward call, got NoneType"):
        with skipper.skipping_tokens(fine, [PLACEHOLDER]), torch.no_grad():
            fine(inputs_embeds=torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match=r"keep mask .* shape \[1, 5\], .* use skipper.skipping_tokens"):
        with skipper.skipping(torch.ones(1, 5, dtype=torch.bool)), torch.no_grad():
            fine(input_ids=torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="token_ids must name at least one token id"):
        skipper.skipping_tokens(fine, [])
    skipper.remove()


@pytest.mark.triton
def test_triton_backend_on_a_real_model():
    pytest.importorskip("triton")
    import alignops.ops.skip  # noqa: F401  (registers alignops::skip_ffn_triton)

    case = _CASES.get("qwen2_vl") or Case("qwen2_vl")
    with ReferenceSchedule(case, [1]):
        expected = case.logits()
    skipper = patch_ffn_skipping(case.model, SkipSchedule(start=1, end=2), backend="triton")
    with skipper.skipping_tokens(case.model, case.skip_ids):
        got = case.logits()
    skipper.remove()
    torch.testing.assert_close(got, expected, **TOL)


# ---- IMA on the same models: IMACollector's hooks on the real module names ------------------------------


def test_ima_collector_on_real_module_names(case):
    """HF's output_hidden_states is (input of layers.0, layers.0, ..., layers.L-2, norm(layers.L-1)): the
    collector hooked on those modules gives ima_score's dataset terms on that tuple. Entry 0 is embed_tokens'
    output on a text model; on a VLM (image features merged in) no module outputs it: InputOf(layers.0)."""
    prefix = "model.language_model" if case.name in VLMS else "model"
    first = InputOf(f"{prefix}.layers.0") if case.name in VLMS else f"{prefix}.embed_tokens"
    names = [first] + [f"{prefix}.layers.{i}" for i in range(len(case.layers) - 1)] + [f"{prefix}.norm"]
    with torch.no_grad():
        states = case.model(**case.inputs, output_hidden_states=True).hidden_states
        assert len(states) == len(names)
        with IMACollector(case.model, names, layer_offset=1) as col:
            for b in range(2):  # one sequence per pass: the dataset means must add up across passes
                col.set_masks(case.perceptual[b : b + 1], case.inputs["attention_mask"][b : b + 1].bool())
                case.model(**_row(case, b))
    expected = ima_score(list(states), case.perceptual, attention_mask=case.inputs["attention_mask"]).dataset
    got = col.result()
    for name in expected._fields:
        torch.testing.assert_close(
            getattr(got, name), getattr(expected, name), rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )
    assert got.num_perceptual.item() == 2 and got.num_textual.item() == 2
    if case.name == "llama":  # embed_tokens' input is the token ids
        with IMACollector(case.model, [InputOf("model.embed_tokens"), "model.norm"]) as col:
            col.set_masks(case.perceptual, case.inputs["attention_mask"])
            with pytest.raises(ValueError, match=r"layers\[0\] must take a float tensor \[B, T, H\] as its first"):
                case.model(**case.inputs)


def _row(case, b):
    row = {k: v[b : b + 1] for k, v in case.inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    if case.name == "qwen2_vl":  # 16 patches per image, flattened
        row["pixel_values"] = case.inputs["pixel_values"][16 * b : 16 * (b + 1)]
        row["image_grid_thw"] = case.inputs["image_grid_thw"][b : b + 1]
    elif case.name == "llava":
        row["pixel_values"] = case.inputs["pixel_values"][b : b + 1]
    return row


def test_readme_example_skipping_a_vlms_image_tokens():
    """The README's worked example, verbatim (with the tiny Qwen2-VL of these tests standing in)."""
    case = _CASES.get("qwen2_vl") or Case("qwen2_vl")
    model, inputs = case.model, case.inputs
    dense = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    with ReferenceSchedule(case, [0, 1, 2]):
        expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert not torch.equal(expected, dense)  # skipping the image tokens changes the greedy answer here
    # ---- README begins
    from alignops.skip import SkipSchedule, patch_ffn_skipping, perceptual_token_ids

    # model: a Qwen2-VL / LLaVA ...ForConditionalGeneration; inputs: its processor's output (ids, pixel values)
    skipper = patch_ffn_skipping(model, SkipSchedule())  # every layer of model.model.language_model
    with torch.no_grad(), skipper.skipping_tokens(model, perceptual_token_ids(model.config)):
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)  # image tokens skip the FFN
    skipper.remove()  # the original modules are back
    # ---- README ends
    assert torch.equal(out, expected)


def test_readme_example_ima_of_a_vlm():
    """The README's IMA example, verbatim; it must equal ima_score on the model's own output_hidden_states."""
    case = _CASES.get("qwen2_vl") or Case("qwen2_vl")
    model = case.model
    batches = [_row(case, 0), _row(case, 1)]
    # ---- README begins
    from alignops.ima import IMACollector, InputOf

    lm = "model.language_model"  # the decoder of a Qwen2-VL / LLaVA; "model" for a text-only LLM
    L = model.config.text_config.num_hidden_layers
    layers = [InputOf(f"{lm}.layers.0"), *(f"{lm}.layers.{i}" for i in range(L))]  # LLM input, every layer
    with torch.no_grad(), IMACollector(model, layers) as col:
        for inputs in batches:  # processor outputs, any number
            col.set_masks(inputs["input_ids"] == model.config.image_token_id, inputs["attention_mask"])
            model(**inputs)
    score = col.result()  # IMADatasetScore: cross, token_pair [L + 1], change_perceptual / _textual [L], ...
    # ---- README ends
    last = []  # the last layer's own output: HF's last hidden state is after the final norm
    handle = case.layers[-1].register_forward_hook(lambda module, args, output: last.append(output))
    with torch.no_grad():
        states = list(model(**case.inputs, output_hidden_states=True).hidden_states)
    handle.remove()
    states[-1] = last[0]
    expected = ima_score(states, case.inputs["input_ids"] == IMAGE).dataset
    for name in expected._fields:
        torch.testing.assert_close(getattr(score, name), getattr(expected, name), rtol=1e-5, atol=1e-6)
