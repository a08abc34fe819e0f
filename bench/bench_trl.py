"""trl family: one DPO training step (forward + backward of the policy, the reference forward, the loss and every
logged metric; no optimizer step) through TRL 1.16's own DPOTrainer, TRL with ``use_liger_kernel=True`` and
alignops.integrations.trl.DPOTrainer, on the same tiny-bodied Llama with a large vocabulary.

The body is small on purpose (the vocabulary dominates: embeddings and LM head are V x H), so the peak extra
memory of the step is mostly the LM head's logits tiles: TRL's chunked head works on [<= 4096 tokens, 32768 vocab]
tiles in the compute dtype, alignops' kernel on ~32 MB tiles. TRL 1.16 keeps Liger to the layer kernels (RMSNorm,
RoPE, SwiGLU; its fused linear cross-entropy is refused by the trainer), so its row measures those layers, and
Liger's Triton kernels need a GPU (the row records the error on a CPU).

Baseline: TRL. Full plan: V = 128256 (Llama 3), H = 256, 2 layers, 4 pairs x (16 prompt + 112 completion)
tokens, fp32, sigmoid loss. Quick plan: V = 8000, H = 64, 2 pairs x (8 + 24) tokens.
"""

from __future__ import annotations

import tempfile

import torch

from .common import Case, annotate, import_peer

FAMILY = "trl"
# The subject of the family is TRL's trainer: without these there is nothing to measure (run.py says so).
REQUIRES = ("trl", "transformers", "datasets")


def _tokenizer(transformers):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>", "<unk>", "a", "b"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _groups(device: str, quick: bool):
    trl = import_peer("trl")
    transformers = import_peer("transformers")
    ours = import_peer("alignops.integrations.trl")
    from datasets import Dataset

    V, H, layers, pairs, prompt_len, completion_len = (8000, 64, 2, 2, 8, 24) if quick else (128256, 256, 2, 4, 16, 112)
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=2 * H,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=prompt_len + completion_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    state = transformers.LlamaForCausalLM(config).state_dict()
    tokenizer = _tokenizer(transformers)
    text = Dataset.from_dict({"prompt": ["a b"] * 2, "chosen": ["a"] * 2, "rejected": ["b"] * 2})
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, V, (n,), generator=g).tolist()

    examples = [
        {"prompt_ids": ids(prompt_len), "chosen_ids": ids(completion_len), "rejected_ids": ids(completion_len)}
        for _ in range(pairs)
    ]

    def trainer(cls, **kw):
        def model():
            m = transformers.LlamaForCausalLM(config)
            m.load_state_dict(state)
            return m.to(device)

        args = trl.DPOConfig(
            output_dir=tempfile.mkdtemp(),
            per_device_train_batch_size=pairs,
            report_to="none",
            use_cpu=device == "cpu",
            save_strategy="no",
            bf16=False,
            disable_tqdm=True,
            gradient_checkpointing=False,
            **kw,
        )
        t = cls(model=model(), ref_model=model(), args=args, train_dataset=text, processing_class=tokenizer)
        t.model.train()
        t.current_gradient_accumulation_steps = 1  # set by Trainer's loop, read by training_step
        batch = t._prepare_inputs(t.data_collator(examples))

        def step():
            return t.training_step(t.model, batch)

        def reset():
            t.model.zero_grad(set_to_none=True)

        return step, reset

    shape = f"V={V} H={H} L={layers} pairs={pairs} T={prompt_len}+{completion_len}"
    providers = [
        ("trl", trl.DPOTrainer, {}),
        ("trl+liger", trl.DPOTrainer, {"use_liger_kernel": True}),
        ("alignops", ours.DPOTrainer, {}),
    ]
    cases = []
    for name, cls, kw in providers:
        try:
            step, reset = trainer(cls, **kw)
        except Exception as err:  # noqa: BLE001  (a provider that cannot be built here is a row with its error)
            message = f"{type(err).__name__}: {err}"

            def step(message=message):
                raise RuntimeError(message)

            reset = None
        cases.append(
            Case(
                FAMILY,
                "dpo_training_step",
                shape,
                "float32",
                name,
                "fwd+bwd",
                step,
                baseline=name == "trl",
                reset=reset,
            )
        )
    scored = 2 * pairs * completion_len
    # The LM head read and its gradient written (fp32); per scored token three [V, H] GEMMs for the policy
    # (forward, grad_hidden, grad_weight) and one for the reference.
    yield annotate(cases, 2 * 4 * V * H, 4 * 2 * scored * H * V)


def groups(device: str, quick: bool):
    yield from _groups(device, quick)
