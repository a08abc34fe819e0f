r"""TRL's trainers with their LM-head work done by alignops: one import, the same constructor and config.

``DPOTrainer``, ``GRPOTrainer`` and ``DistillationTrainer`` subclass TRL's and keep what TRL does (data
preparation, generation, the metrics and their names) except the step that turns the last hidden state into
per-token numbers over the vocabulary, and GRPO's policy loss:

- DPO and GRPO call ``model(..., labels=labels, fused_lm_head=True)``, a forward TRL adds to the model
  (``trl.trainer.utils.add_fused_lm_head``). These trainers replace it by :func:`add_fused_lm_head`, which runs
  the model body and hands the last hidden state of the scored tokens and ``lm_head.weight`` to
  :func:`alignops.fused_linear_logprobs` (``log p(label)`` and the entropy, both differentiable; the [N, V]
  logits never stored). The metric-only fields TRL's DPO logs (``mean_logits``, ``is_top1``, and WPO's
  ``log_sum_sq_probs``) come from one more pass over vocabulary tiles without gradient.
- GRPO's policy loss (TRL's ``_compute_loss``) is :func:`alignops.policy_loss` on those log-probabilities. DPO's
  loss epilogue (loss types, ``loss_weights``, f-divergences, ``ld_alpha``, WPO) stays TRL's code.
- DistillationTrainer's loss, TRL's ``_chunked_divergence_loss``, is replaced by
  :func:`alignops.fused_linear_distillation_loss` (generalised JSD from both LM heads).

Usage: replace ``from trl import DPOTrainer`` by ``from alignops.integrations.trl import DPOTrainer``; configs
stay TRL's (``trl.DPOConfig``, ...).

Supported: TRL 1.16.x (:data:`SUPPORTED_TRL`); importing this module with another TRL raises ImportError, since
the override points are TRL-internal.
"""

from __future__ import annotations

import functools
import types
from contextlib import nullcontext

import torch

from .._api import keyword_only
from ..distillation import fused_linear_distillation_loss
from ..fused_linear import fused_linear_logprobs
from ..policy import policy_loss

SUPPORTED_TRL = ("1.16",)
"""The TRL minor versions whose trainers these subclasses are tested against."""


def check_trl_version(version: str) -> None:
    """Raise ImportError unless ``version`` (a TRL version string) is one of :data:`SUPPORTED_TRL`'s minors."""
    minor = ".".join(version.split("+")[0].split(".")[:2])
    if minor not in SUPPORTED_TRL:
        supported = ", ".join(f"{v}.x" for v in SUPPORTED_TRL)
        raise ImportError(
            f"alignops.integrations.trl supports TRL {supported}, found trl {version}: its trainers override "
            f"TRL-internal methods that change between minor versions. Install a supported one "
            f"(pip install 'trl=={SUPPORTED_TRL[-1]}.*') or use alignops' functions directly."
        )


try:
    import trl as _trl
except ImportError as _e:
    raise ImportError(
        f"alignops.integrations.trl needs TRL ({', '.join(v + '.x' for v in SUPPORTED_TRL)}): "
        f"pip install 'trl=={SUPPORTED_TRL[-1]}.*'"
    ) from _e
check_trl_version(_trl.__version__)

import transformers  # noqa: E402  (after the version check, so an unsupported TRL fails with its own message)
from packaging.version import Version  # noqa: E402
from trl.trainer import distillation_trainer as _trl_distillation  # noqa: E402
from trl.trainer import grpo_trainer as _trl_grpo  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402

__all__ = [
    "SUPPORTED_TRL",
    "DPOTrainer",
    "DistillationTrainer",
    "GRPOTrainer",
    "add_fused_lm_head",
    "check_trl_version",
]

# Extra memory of the metric pass: one [K, Vt] fp32 tile of at most this many elements (16 MB).
_STATS_TILE_ELEMENTS = 1 << 22


def _logit_scale(text_config) -> float:
    """The multiplier a model applies to its logits, looked up as TRL 1.16 does (``add_fused_lm_head``)."""
    scale = getattr(text_config, "logit_scale", None)  # Cohere; None (MPT) means unscaled
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)  # Falcon-H1
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        # Granite and MiniCPM3 divide by logits_scaling, HyperCLOVA X multiplies by it
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return 1.0 if scale is None else scale


@torch.no_grad()
def _vocab_statistics(hidden, weight, bias, targets, logit_scale, softcap, temperature, outputs):
    """Metric fields of TRL's fused head for K rows, in one pass over vocabulary tiles (no gradient):
    ``mean_logits`` (mean over v of the scaled, capped, tempered logit), ``is_top1`` (the label is the first
    argmax) and ``log_sum_sq_probs`` (log sum_v p_v^2 = logsumexp(2z) - 2 logsumexp(z)). fp32 accumulation."""
    K, V = hidden.shape[0], weight.shape[0]
    h = hidden.float()
    step = max(1, min(V, _STATS_TILE_ELEMENTS // max(K, 1)))
    z_sum = h.new_zeros(K)
    best = h.new_full((K,), float("-inf"))
    best_index = torch.zeros(K, dtype=torch.long, device=h.device)
    sum_exp = h.new_zeros(K)
    sum_exp2 = h.new_zeros(K)
    for v0 in range(0, V, step):
        z = h @ weight[v0 : v0 + step].float().T
        if bias is not None:
            z += bias[v0 : v0 + step].float()
        z *= logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z /= temperature
        z_sum += z.sum(1)
        tile_max, tile_arg = z.max(1)
        # strictly greater: ties keep the earlier index, so best_index is the first argmax over the vocabulary
        better = tile_max > best
        new_best = torch.maximum(best, tile_max)
        if "log_sum_sq_probs" in outputs:
            shift = torch.where(torch.isfinite(best), best - new_best, best.new_zeros(()))
            sum_exp = sum_exp * shift.exp() + (z - new_best[:, None]).exp().sum(1)
            sum_exp2 = sum_exp2 * (2 * shift).exp() + (2 * (z - new_best[:, None])).exp().sum(1)
        best_index = torch.where(better, tile_arg + v0, best_index)
        best = new_best
    return {
        "mean_logits": z_sum / V if "mean_logits" in outputs else None,
        "is_top1": best_index == targets if "is_top1" in outputs else None,
        "log_sum_sq_probs": sum_exp2.log() - 2 * sum_exp.log() if "log_sum_sq_probs" in outputs else None,
    }


def _moe_aux_loss(text_config, num_experts_holder, router_logits, attention_mask):
    """The MoE load-balancing loss TRL's fused head adds (Mixtral's, which every MoE family reuses)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    if Version(transformers.__version__) < Version("5.0.0"):
        num_experts, top_k = num_experts_holder.num_experts, num_experts_holder.num_experts_per_tok
    else:
        num_experts, top_k = text_config.num_experts, text_config.num_experts_per_tok
    return load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)


@keyword_only("temperature", "cast_lm_head_to_fp32", "outputs")
def add_fused_lm_head(
    model,
    *,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
    backend: str = "auto",
) -> None:
    r"""Give ``model`` TRL 1.16's ``fused_lm_head=True`` forward, computed by :func:`alignops.fused_linear_logprobs`.

    ``model(..., labels=labels, fused_lm_head=True)`` runs the body, keeps the K positions whose next-token label
    is not -100 and returns ``trl.trainer.utils.FusedCausalLMOutput``: ``log_probs`` [B, T-1] (differentiable,
    0 at ignored positions), ``entropy`` (differentiable: GRPO's entropy bonus), ``mean_logits``, ``is_top1`` and
    ``log_sum_sq_probs`` when in ``outputs`` (no gradient), ``loss = -sum log_probs / num_items_in_batch`` (the
    label count by default) and the MoE ``aux_loss``. Logits
    ``z = softcap tanh(logit_scale (h W^T + b) / softcap) / temperature`` with the model's ``logit_scale`` and
    ``final_logit_softcapping``. Under autocast the head runs in the autocast dtype, with
    ``cast_lm_head_to_fp32`` in fp32 (as TRL). Extra memory: the kernel's logits tile plus, for the metric
    fields, one [K, Vt] fp32 tile of at most 16 MB. Without ``fused_lm_head`` the forward is the previous one.
    ``backend`` is :func:`alignops.fused_linear_logprobs`'s.
    """
    previous_forward = model.forward
    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    logit_scale = _logit_scale(text_config)
    # Before transformers 5, vision-language models expose their language backbone as `model`
    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"
    stats_outputs = tuple(o for o in outputs if o in ("mean_logits", "is_top1", "log_sum_sq_probs"))

    # `generate` validates its model kwargs against the signature, hence wraps
    @functools.wraps(type(model).forward)
    def _fused_forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs
    ):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return previous_forward(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        # looked up per call: FSDP and PEFT replace the body and the head after patching
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        body = getattr(self, backbone_attr)(*args, **kwargs)
        if shift_labels is None:
            hidden, labels = body.last_hidden_state[:, :-1], labels[:, 1:]
        else:
            hidden, labels = body.last_hidden_state, shift_labels
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if isinstance(weight, torch.distributed.tensor.DTensor):
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        kept, targets = hidden[mask], labels[mask]
        autocast = nullcontext()
        if cast_lm_head_to_fp32:
            dtype = torch.float32
            autocast = torch.autocast(kept.device.type, enabled=False)
        elif torch.is_autocast_enabled(kept.device.type):
            dtype = torch.get_autocast_dtype(kept.device.type)
        else:
            dtype = weight.dtype
        with autocast:
            kept, w = kept.to(dtype), weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            logp, entropy = fused_linear_logprobs(
                kept,
                w,
                targets,
                b,
                temperature=temperature,
                logit_scale=logit_scale,
                softcap=softcap,
                return_entropy="entropy" in outputs,
                backend=backend,
            )
            stats = (
                _vocab_statistics(kept, w, b, targets, logit_scale, softcap, temperature, stats_outputs)
                if stats_outputs
                else {}
            )

        def spread(x):
            # masked_scatter keeps an all-ignored micro-batch connected to the graph (a differentiable zero)
            return None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)

        log_probs = spread(logp)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _moe_aux_loss(text_config, self, body.router_logits, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(
            loss=loss,
            log_probs=log_probs,
            entropy=spread(entropy),
            log_sum_sq_probs=spread(stats.get("log_sum_sq_probs")),
            mean_logits=spread(stats.get("mean_logits")),
            is_top1=spread(stats.get("is_top1")),
            label_mask=mask,
            aux_loss=aux_loss,
        )

    model.forward = types.MethodType(_fused_forward, model)


def _patch_target(trainer, model):
    """The module TRL patched: the PEFT base model, or the model itself (unwrapped from DDP and the like)."""
    model = trainer.accelerator.unwrap_model(model)
    return model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model


class DPOTrainer(_trl.DPOTrainer):
    """TRL's ``DPOTrainer`` (same arguments, config, losses and logged metrics) with the policy's and the
    reference's per-token log-probabilities, entropies and logit metrics from :func:`add_fused_lm_head`
    (alignops' fused kernel), the precomputed reference log-probs (``precompute_ref_log_probs``) included.
    Every loss type, ``loss_weights``, ``ld_alpha``, the f-divergences and WPO weighting run as in TRL."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._use_alignops_heads()

    def _use_alignops_heads(self):
        # Called from inside TRL's __init__ too (the reference log-probs are precomputed there), so idempotent
        if getattr(self, "_alignops_heads", False):
            return
        outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
        if self.use_weighting:
            outputs += ("log_sum_sq_probs",)
        add_fused_lm_head(_patch_target(self, self.model), outputs=outputs)
        if self.ref_model is not None:
            add_fused_lm_head(self.accelerator.unwrap_model(self.ref_model))
        self._alignops_heads = True

    def _precompute_ref_logps(self, dataset, name, batch_size):
        self._use_alignops_heads()
        return super()._precompute_ref_logps(dataset, name, batch_size)


class GRPOTrainer(_trl.GRPOTrainer):
    """TRL's ``GRPOTrainer`` (same arguments, config, rewards, generation, loss types and logged metrics) with the
    per-token log-probabilities and entropies of the policy, the old policy and the reference from
    :func:`add_fused_lm_head` (alignops' fused kernel, at ``args.temperature``; the entropy differentiable for
    the entropy bonus) and the policy loss from :func:`alignops.policy_loss` (every TRL loss type, token or
    sequence importance sampling, the KL term, delta, the off-policy and entropy masks, vLLM's importance
    ratios), normalised for gradient accumulation and logged as TRL does. With ``use_adaptive_entropy`` or a
    MoE load-balancing loss the loss is TRL's own ``_compute_loss`` (on alignops' log-probabilities)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        add_fused_lm_head(
            _patch_target(self, self.model),
            temperature=self.temperature,
            cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
            outputs=("log_probs", "entropy"),
        )
        if self.ref_model is not None:
            add_fused_lm_head(
                self.accelerator.unwrap_model(self.ref_model),
                temperature=self.temperature,
                cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
            )

    def _compute_loss(self, model, inputs):
        if self.use_adaptive_entropy or self.aux_loss_enabled:
            return super()._compute_loss(model, inputs)
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        multimodal = (
            "pixel_values",
            "image_grid_thw",
            "num_images",
            "pixel_attention_mask",
            "spatial_shapes",
            "num_tiles",
            "image_sizes",
            "token_type_ids",
            "mm_token_type_ids",
            "image_position_ids",
        )
        per_token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            **{k: inputs.get(k) for k in multimodal},
        )
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        num_items = None
        if self.loss_type in ("dapo", "cispo", "vespo"):
            # TRL's normaliser: `num_items_in_batch` spans the generation batch, rescaled to one accumulation window
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        importance_ratio = None
        if (self.use_vllm and self.vllm_importance_sampling_correction) or self.loss_type == "vespo":
            importance_ratio = inputs.get("importance_sampling_ratio")
        out = policy_loss(
            per_token_logps,
            advantages,
            mask,
            old_per_token_logps=inputs.get("old_per_token_logps"),
            ref_per_token_logps=inputs["ref_per_token_logps"] if self.beta != 0.0 else None,
            loss_type=self.loss_type,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=self.args.delta,
            importance_sampling_level=self.importance_sampling_level,
            beta=self.beta,
            use_bias_correction_kl=self.args.use_bias_correction_kl,
            importance_sampling_ratio=importance_ratio,
            num_items_in_batch=num_items,
            max_completion_length=self.max_completion_length,
            sapo_temperature_pos=self.args.sapo_temperature_pos,
            sapo_temperature_neg=self.args.sapo_temperature_neg,
            vespo_k_pos=self.args.vespo_k_pos,
            vespo_lambda_pos=self.args.vespo_lambda_pos,
            vespo_k_neg=self.args.vespo_k_neg,
            vespo_lambda_neg=self.args.vespo_lambda_neg,
            off_policy_mask_threshold=self.off_policy_mask_threshold,
            sampling_per_token_logps=inputs.get("sampling_per_token_logps"),
            entropy_mask=entropy_mask,
        )
        # dapo / cispo / vespo carry the accumulation in their normaliser; the others are divided here, as TRL
        loss = out.loss if num_items is not None else out.loss / accumulation
        if self._entropy_bonus_enabled:
            effective_mask = mask if entropy_mask is None else mask * entropy_mask
            entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation
            loss = loss - self.entropy_coef * entropy_loss
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(out.loss.detach()).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        self._log_policy_metrics(mode, out, per_token_logps, inputs, advantages, mask, entropies)
        return loss

    def _log_policy_metrics(self, mode, out, per_token_logps, inputs, advantages, mask, entropies):
        """TRL's metrics: policy_loss's masked means summed over processes (weighted by their counts), the
        entropy, and the per-sequence extremes of the clipped fractions, which need the ratios per row."""
        sequence = self.importance_sampling_level == "sequence"
        tokens = mask.sum().float()

        def global_mean(local_mean, count):
            totals = self.accelerator.reduce(torch.stack([local_mean * count, count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        rows = torch.tensor(float(mask.shape[0]), device=mask.device)
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(global_mean(out.kl, tokens))
        entropy_sum = self.accelerator.reduce(torch.stack([(entropies * mask).sum(), tokens]), reduction="sum")
        self._metrics[mode]["entropy"].append((entropy_sum[0] / entropy_sum[1].clamp(min=1.0)).item())
        count = rows if sequence else tokens
        if self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            self._metrics[mode]["clip_ratio/low_mean"].append(global_mean(out.clip_ratio_low, count))
            self._metrics[mode]["clip_ratio/high_mean"].append(global_mean(out.clip_ratio_high, count))
            self._metrics[mode]["clip_ratio/region_mean"].append(global_mean(out.clip_ratio_region, count))
            with torch.no_grad():
                old = inputs.get("old_per_token_logps")
                log_ratio = per_token_logps - (per_token_logps if old is None else old)
                if sequence:
                    log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
                coef = log_ratio.exp()
                if self.args.delta is not None:
                    coef = coef.clamp(max=self.args.delta)
                low = ((coef < 1 - self.epsilon_low) & (advantages < 0)).float()
                high = ((coef > 1 + self.epsilon_high) & (advantages > 0)).float()

                def per_row(x):
                    return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

                self._metrics[mode]["clip_ratio/low_min"].append(
                    _trl_grpo.nanmin(self.accelerator.gather(per_row(low))).item()
                )
                self._metrics[mode]["clip_ratio/high_max"].append(
                    _trl_grpo.nanmax(self.accelerator.gather(per_row(high))).item()
                )
        elif self.loss_type == "cispo":
            self._metrics[mode]["cispo_clip_ratio"].append(global_mean(out.clip_ratio_high, count))
        elif self.loss_type == "vespo":
            phi_rows = advantages.shape[1] == 1
            self._metrics[mode]["vespo/phi_seq_mean"].append(global_mean(out.phi_mean, rows if phi_rows else tokens))


def _alignops_divergence_loss(
    student_hidden_states,
    teacher_hidden_states,
    student_lm_head_weight,
    teacher_lm_head_weight,
    completion_mask,
    beta,
    num_items_in_batch=None,
    student_lm_head_bias=None,
    teacher_lm_head_bias=None,
    student_logit_scale=1.0,
    teacher_logit_scale=1.0,
    student_final_logit_softcapping=None,
    teacher_final_logit_softcapping=None,
    temperature=1.0,
):
    """TRL 1.16's ``_chunked_divergence_loss`` contract (loss, entropy sum, valid-token count) computed by
    :func:`alignops.fused_linear_distillation_loss`."""
    if isinstance(student_lm_head_weight, torch.distributed.tensor.DTensor):
        student_lm_head_weight = student_lm_head_weight.full_tensor().to(student_hidden_states.dtype)
        student_lm_head_bias = student_lm_head_bias.full_tensor() if student_lm_head_bias is not None else None
    if isinstance(teacher_lm_head_weight, torch.distributed.tensor.DTensor):
        teacher_lm_head_weight = teacher_lm_head_weight.full_tensor().to(teacher_hidden_states.dtype)
        teacher_lm_head_bias = teacher_lm_head_bias.full_tensor() if teacher_lm_head_bias is not None else None
    out = fused_linear_distillation_loss(
        student_hidden_states,
        student_lm_head_weight,
        teacher_hidden_states,
        teacher_lm_head_weight,
        completion_mask,
        beta=beta,
        temperature=temperature,
        divergence="jsd",
        student_bias=student_lm_head_bias,
        teacher_bias=teacher_lm_head_bias,
        student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_final_logit_softcapping,
        teacher_softcap=teacher_final_logit_softcapping,
        num_items_in_batch=num_items_in_batch,
    )
    return out.loss, out.entropy.sum(), (completion_mask != 0).sum()


class DistillationTrainer(_trl.DistillationTrainer):
    """TRL's ``DistillationTrainer`` (same arguments, config, generation and logged metrics) whose loss, TRL's
    chunked generalised JSD from the student's and the teacher's last hidden states, is computed by
    :func:`alignops.fused_linear_distillation_loss`.

    The override is TRL 1.16's own ``_compute_loss`` (the backbones, the logit scales, the loss mask, the
    device checks), run with ``_chunked_divergence_loss`` bound to the alignops loss."""

    _compute_loss = types.FunctionType(
        _trl_distillation.DistillationTrainer._compute_loss.__code__,
        {**vars(_trl_distillation), "_chunked_divergence_loss": _alignops_divergence_loss},
        "_compute_loss",
        _trl_distillation.DistillationTrainer._compute_loss.__defaults__,
        _trl_distillation.DistillationTrainer._compute_loss.__closure__,
    )
