"""alignops.integrations.trl: the trainers against TRL 1.16's own, on the same seed, data and tiny models.

Each parity test trains TRL's trainer and ours for a few optimizer steps from the same weights (tiny random
LlamaForCausalLM / Qwen2ForCausalLM built from a config, fp32, a word-level tokenizer built here) and compares
every logged number: the loss and the gradient norm at rtol 1e-5, the metrics TRL logs under the same names.
"""

import copy
import hashlib
import importlib.util
import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(157)]  # V = 160
# Logged values that are timings, not numbers of the model
TIMINGS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


@pytest.fixture(scope="module")
def env(import_peer):
    """TRL, our integration, a tokenizer, data and two saved tiny models (Llama, Qwen2)."""
    trl = import_peer("trl")
    ours = import_peer("alignops.integrations.trl")
    transformers = import_peer("transformers")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    g = torch.Generator().manual_seed(0)

    def text(lo, hi):
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 157, (n,), generator=g))

    pref = Dataset.from_dict(
        {
            "prompt": [text(2, 6) for _ in range(8)],
            "chosen": [text(1, 6) for _ in range(8)],
            "rejected": [text(1, 6) for _ in range(8)],
        }
    )
    prompts = Dataset.from_dict({"prompt": [text(2, 5) for _ in range(8)]})
    common = dict(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    root = tempfile.mkdtemp(prefix="alignops-trl-")
    paths = {}
    for name, config, model_cls in [
        ("llama", transformers.LlamaConfig, transformers.LlamaForCausalLM),
        ("qwen2", transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    ]:
        torch.manual_seed(0)
        paths[name] = os.path.join(root, name)
        model_cls(config(**common)).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return dict(
        trl=trl, ours=ours, transformers=transformers, tokenizer=tokenizer, pref=pref, prompts=prompts, paths=paths
    )


def _args(env, config_cls, **kw):
    # bf16=False: TRL's configs default to bf16 autocast where the device has it (the CPU too); parity is fp32
    return config_cls(
        output_dir=tempfile.mkdtemp(),
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-2,
        seed=0,
        disable_tqdm=True,
        bf16=False,
        **kw,
    )


def _logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]


def _assert_same_logs(theirs, ours):
    assert len(theirs) == len(ours) > 0
    for step, (a, b) in enumerate(zip(theirs, ours, strict=True)):
        assert set(a) == set(b), f"step {step}: logged names differ: {set(a) ^ set(b)}"
        for key, value in a.items():
            if key in TIMINGS or not isinstance(value, float):
                continue
            # the loss and the gradient norm at rtol 1e-5; metrics built from differences of log-probs (rewards,
            # margins, KL) lose digits to cancellation, hence their absolute floor
            rtol, atol = (1e-5, 1e-7) if key in ("loss", "grad_norm", "eval_loss") else (1e-4, 1e-6)
            assert math.isclose(b[key], value, rel_tol=rtol, abs_tol=atol), f"step {step} {key}: {b[key]} vs {value}"


def _dpo(env, cls, model, **kw):
    transformers = env["transformers"]
    path = env["paths"][model]
    policy = transformers.AutoModelForCausalLM.from_pretrained(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path)
    args = _args(env, env["trl"].DPOConfig, per_device_train_batch_size=2, max_steps=3, **kw)
    # TRL caches precomputed reference log-probs under (dataset fingerprint, model hash): a fingerprint of each
    # trainer's own, so that each computes them with its own head instead of reading the other's cache
    key = hashlib.sha1(f"{cls.__module__} {model} {sorted(kw.items())}".encode()).hexdigest()
    data = env["pref"].map(lambda example: example, new_fingerprint=key)
    trainer = cls(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=env["tokenizer"])
    trainer.train()
    return trainer


def test_dpo_sigmoid_matches_trl(env):
    theirs = _dpo(env, env["trl"].DPOTrainer, "llama")
    ours = _dpo(env, env["ours"].DPOTrainer, "llama")
    _assert_same_logs(_logs(theirs), _logs(ours))
    # the model moved: later steps saw different weights, so the comparison covers training, not just step 1
    assert _logs(ours)[0]["loss"] != _logs(ours)[-1]["loss"]


def test_dpo_several_loss_types_with_weights_matches_trl(env):
    kw = dict(loss_type=["sigmoid", "bco_pair", "ipo"], loss_weights=[0.6, 0.3, 0.1])
    _assert_same_logs(
        _logs(_dpo(env, env["trl"].DPOTrainer, "qwen2", **kw)), _logs(_dpo(env, env["ours"].DPOTrainer, "qwen2", **kw))
    )


def test_dpo_precomputed_reference_matches_trl(env):
    kw = dict(precompute_ref_log_probs=True, loss_type=["sigmoid", "hinge"], loss_weights=[1.0, 0.5])
    theirs = _dpo(env, env["trl"].DPOTrainer, "llama", **kw)
    ours = _dpo(env, env["ours"].DPOTrainer, "llama", **kw)
    _assert_same_logs(_logs(theirs), _logs(ours))
    # the precomputed columns are there and agree with TRL's
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(
            torch.tensor(ours.train_dataset[column]), torch.tensor(theirs.train_dataset[column]), rtol=1e-5, atol=1e-5
        )


def test_dpo_evaluate_with_compute_metrics_matches_trl(env):
    seen = {}

    def compute_metrics(pred):
        seen[len(seen)] = pred.predictions
        return {"mean_logit": float(torch.as_tensor(pred.predictions).float().mean())}

    def run(cls):
        transformers = env["transformers"]
        path = env["paths"]["llama"]
        args = _args(
            env, env["trl"].DPOConfig, per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=1
        )
        trainer = cls(
            model=transformers.AutoModelForCausalLM.from_pretrained(path),
            ref_model=transformers.AutoModelForCausalLM.from_pretrained(path),
            args=args,
            train_dataset=env["pref"],
            eval_dataset=env["pref"].select(range(4)),
            processing_class=env["tokenizer"],
            compute_metrics=compute_metrics,
        )
        return trainer.evaluate()

    theirs, ours = run(env["trl"].DPOTrainer), run(env["ours"].DPOTrainer)
    assert "eval_mean_logit" in ours and "eval_rewards/margins" in ours
    _assert_same_logs(
        [{k: v for k, v in theirs.items() if "runtime" not in k and "per_second" not in k}],
        [{k: v for k, v in ours.items() if "runtime" not in k and "per_second" not in k}],
    )


def _reward(completions, **kwargs):
    return [len(c) / 10 for c in completions]


def _grpo(env, cls, model, **kw):
    args = _args(
        env,
        env["trl"].GRPOConfig,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=4,
        max_steps=2,
        **kw,
    )
    trainer = cls(
        model=env["paths"][model],
        reward_funcs=_reward,
        args=args,
        train_dataset=env["prompts"],
        processing_class=env["tokenizer"],
    )
    trainer.train()
    return trainer


def test_grpo_dapo_with_kl_matches_trl(env):
    kw = dict(loss_type="dapo", beta=0.1)
    theirs, ours = _grpo(env, env["trl"].GRPOTrainer, "llama", **kw), _grpo(env, env["ours"].GRPOTrainer, "llama", **kw)
    _assert_same_logs(_logs(theirs), _logs(ours))
    assert _logs(ours)[-1]["kl"] > 0  # the reference went through our head and differs from the trained policy


def test_grpo_sequence_level_importance_sampling_matches_trl(env):
    kw = dict(importance_sampling_level="sequence", loss_type="grpo", beta=0.05, num_iterations=2)
    _assert_same_logs(
        _logs(_grpo(env, env["trl"].GRPOTrainer, "qwen2", **kw)),
        _logs(_grpo(env, env["ours"].GRPOTrainer, "qwen2", **kw)),
    )


def test_grpo_entropy_bonus_matches_trl(env):
    # the bonus differentiates the head's entropy: the gradient goes through the kernel's entropy backward
    kw = dict(loss_type="dapo", beta=0.0, entropy_coef=0.5)
    _assert_same_logs(
        _logs(_grpo(env, env["trl"].GRPOTrainer, "llama", **kw)),
        _logs(_grpo(env, env["ours"].GRPOTrainer, "llama", **kw)),
    )


def test_grpo_accumulation_delta_entropy_mask_matches_trl(env):
    # bnpo's accumulation divisor, two-sided clipping (delta) and the high-entropy token mask
    kw = dict(loss_type="bnpo", beta=0.0, delta=1.5, top_entropy_quantile=0.5, gradient_accumulation_steps=2)
    _assert_same_logs(
        _logs(_grpo(env, env["trl"].GRPOTrainer, "qwen2", **kw)),
        _logs(_grpo(env, env["ours"].GRPOTrainer, "qwen2", **kw)),
    )


def test_distillation_matches_trl(env):
    def run(cls):
        args = _args(
            env,
            env["trl"].DistillationConfig,
            per_device_train_batch_size=2,
            max_completion_length=4,
            max_steps=2,
            beta=0.5,
        )
        trainer = cls(
            model=env["paths"]["llama"],
            teacher_model=env["paths"]["qwen2"],
            args=args,
            train_dataset=env["prompts"],
            processing_class=env["tokenizer"],
        )
        trainer.train()
        return trainer

    _assert_same_logs(_logs(run(env["trl"].DistillationTrainer)), _logs(run(env["ours"].DistillationTrainer)))


def test_fused_head_fields_match_trl_and_fp64(env):
    """Every field of the fused head (softcap and logit scale on, a bias, ignored labels) against TRL's head
    and an fp64 softmax over the full logits."""
    transformers, trl_utils = env["transformers"], sys.modules["trl.trainer.utils"]
    config = transformers.LlamaConfig(
        vocab_size=160,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    config.final_logit_softcapping, config.logit_scale = 3.0, 2.5
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.lm_head.bias = torch.nn.Parameter(torch.randn(160) * 0.1)
    theirs = copy.deepcopy(model)
    fields = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    env["ours"].add_fused_lm_head(model, temperature=0.7, outputs=fields)
    trl_utils.add_fused_lm_head(theirs, temperature=0.7, outputs=fields)
    ids = torch.randint(0, 160, (3, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, -2:] = -100
    a = model(input_ids=ids, labels=labels, fused_lm_head=True)
    b = theirs(input_ids=ids, labels=labels, fused_lm_head=True)
    for name in fields:
        if name == "is_top1":
            assert torch.equal(getattr(a, name), getattr(b, name))
        else:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5, msg=name)
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state[:, :-1].double()
        z = (h @ model.lm_head.weight.double().T + model.lm_head.bias.double()) * 2.5
        z = 3.0 * torch.tanh(z / 3.0) / 0.7
    mask = labels[:, 1:] != -100
    logp = torch.log_softmax(z, -1)
    target = labels[:, 1:].clamp(min=0)
    torch.testing.assert_close(
        a.log_probs.double(), logp.gather(-1, target[..., None]).squeeze(-1) * mask, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(a.mean_logits.double(), z.mean(-1) * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.log_sum_sq_probs.double(), torch.logsumexp(2 * logp, -1) * mask, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.is_top1, (z.argmax(-1) == target) & mask)
    # the gradient reaches the LM head and the body
    a.log_probs.sum().backward()
    assert model.lm_head.weight.grad.abs().sum() > 0 and model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_unsupported_trl_version_message(env):
    with pytest.raises(ImportError, match=r"supports TRL 1\.16\.x, found trl 1\.15\.2"):
        env["ours"].check_trl_version("1.15.2")
    with pytest.raises(ImportError, match=r"supports TRL 1\.16\.x, found trl 2\.0\.0"):
        env["ours"].check_trl_version("2.0.0")
    env["ours"].check_trl_version("1.16.3")
    # the module itself refuses at import: a fresh copy of it, executed with trl reporting another version
    spec = importlib.util.find_spec("alignops.integrations.trl")
    module = importlib.util.module_from_spec(spec)
    trl = env["trl"]
    saved = trl.__version__
    trl.__version__ = "1.17.0"
    try:
        with pytest.raises(
            ImportError, match=r"supports TRL 1\.16\.x, found trl 1\.17\.0.*pip install 'trl==1\.16\.\*'"
        ):
            spec.loader.exec_module(module)
    finally:
        trl.__version__ = saved


def test_import_alignops_does_not_import_trl():
    code = "import sys, alignops, alignops.integrations; assert 'trl' not in sys.modules, 'trl imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tempfile.gettempdir(), timeout=120)
