"""GRPO-family policy losses straight from LM-head inputs: the [N, V] logits are never materialised.

:func:`fused_linear_policy_loss` chains :func:`alignops.fused_linear_logprobs` (the policy's per-token log-probs and
entropies from the same vocabulary tiles, and the reference model's log-probs under ``no_grad``) with the
policy-gradient epilogue of TRL 1.16 ``GRPOTrainer._compute_loss`` (:func:`alignops.policy_loss`), in the padded
layout of TRL / Liger-Kernel or the packed (padding-free) layout with ``cu_seqlens``. The gradients reach ``hidden``
and ``weight`` (and ``bias``) through the fused kernel's backward, which recomputes the logits tile by tile.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._checks import check_finite, check_same_device
from ._distributed import gathered_weight, refuse_dtensor
from ._errors import AlignopsError
from .fused_linear import fused_linear_logprobs
from .policy import policy_loss
from .preference import check_cu_seqlens

# Per-token options of the epilogue: in the packed layout they come as [N] and are padded like the log-probs.
_PER_TOKEN_OPTIONS = ("sampling_per_token_logps",)


class FusedLinearPolicyOutput(NamedTuple):
    """``loss`` [] and, in the layout of ``completion_ids`` ([B, T] padded, [N] packed), the policy's
    ``per_token_logps`` and ``entropies`` (both detached, 0 where ``completion_mask`` is 0), the ``entropy_mask``
    of ``top_entropy_quantile`` (None when it is 1), and the ``metrics`` TRL logs (clip ratios, kl, mean_ratio...)."""

    loss: torch.Tensor
    per_token_logps: torch.Tensor
    entropies: torch.Tensor
    entropy_mask: torch.Tensor | None
    metrics: dict


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, *, quantile: float) -> torch.Tensor:
    """TRL's ``get_high_entropy_mask``: ``entropy >= torch.quantile(completion entropies, quantile)`` on completion
    tokens. Under ``torch.distributed`` the quantile is taken over every rank's completion tokens (all_gather), as
    TRL does through accelerate. ``entropies`` [B, T] float and ``mask`` [B, T] on one device, ``quantile`` in [0, 1];
    returns a bool [B, T] mask."""
    if not 0.0 <= quantile <= 1.0:
        raise AlignopsError(f"quantile must lie in [0, 1], got {quantile}")
    if mask.shape != entropies.shape:
        raise AlignopsError(f"mask must have the shape of entropies {tuple(entropies.shape)}, got {tuple(mask.shape)}")
    check_same_device([("entropies", entropies), ("mask", mask)])
    local = entropies[mask.bool()].float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        count = torch.tensor([local.numel()], device=local.device)
        counts = [torch.empty_like(count) for _ in range(world)]
        torch.distributed.all_gather(counts, count)
        longest = int(max(int(c) for c in counts))
        padded = local.new_full((longest,), -1e9)  # entropies are >= 0: the sentinel cannot collide
        padded[: local.numel()] = local
        parts = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(parts, padded)
        gathered = torch.cat(parts)
        local = gathered[gathered != -1e9]
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    threshold = torch.quantile(local, quantile)
    return ((entropies * mask.to(entropies.dtype)) >= threshold) & mask.bool()


def _packed_index(cu_seqlens: torch.Tensor, n: int):
    """(segment id, position in its segment) of each packed token, and the longest segment (one host read)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    pos = torch.arange(n, device=cu_seqlens.device) - cu_seqlens.long()[seg]
    return seg, pos, int(lengths.max()) if lengths.numel() else 0


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_per_token_logps: torch.Tensor | None = None,
    old_per_token_logps: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    entropy_coef: float = 0.0,
    top_entropy_quantile: float = 1.0,
    loss_type: str = "dapo",
    beta: float = 0.0,
    backend: str = "auto",
    check_values: bool = True,
    **policy_options,
) -> FusedLinearPolicyOutput:
    r"""GRPO / DAPO / Dr. GRPO / CISPO / SAPO / LUSPO / VESPO loss from hidden states and the LM head, fused.

    Per completion token: ``z = logit_scale (h W^T + b)`` (``softcap tanh(z / softcap)`` when set), ``z /=
    temperature``, ``logp_t = z_y - logsumexp(z)`` and ``H_t = logsumexp(z) - sum_v p_v z_v`` from the same vocabulary
    tiles (TRL's ``selective_log_softmax`` and ``entropy_from_logits`` of ``logits / temperature``), then
    :func:`alignops.policy_loss` (TRL 1.16 ``GRPOTrainer._compute_loss``) on ``logp``:
    ``ratio = exp(logp - old)``, the clipped / soft / sequence-weighted surrogate of ``loss_type``, ``+ beta KL_k3``
    to the reference, masked and normalised as ``loss_type`` says (dapo / cispo / vespo divide by
    ``num_items_in_batch``: pass the global completion-token count of the step, a number or a tensor, and each
    rank's loss is DDP-correct). ``top_entropy_quantile < 1`` keeps only tokens whose entropy is at least the
    ``1 - top_entropy_quantile`` quantile of the completion tokens' entropies (taken over all ranks under
    ``torch.distributed``, as TRL does).

    Layouts:

    - padded (TRL, Liger-Kernel): ``hidden`` [B, T, H] (the completion positions only, TRL's ``logits_to_keep``),
      ``completion_ids`` [B, T], ``completion_mask`` [B, T] (default all ones), ``advantages`` [B];
    - packed: ``hidden`` [N, H], ``completion_ids`` [N], ``completion_mask`` [N] (default all ones), ``cu_seqlens``
      [S+1] and ``advantages`` [S]; the epilogue sees the sequences padded to the longest one (``dr_grpo``
      divides by ``max_completion_length``, default that length: pass it).

    Tokens with ``completion_mask == 0`` (prompt, padding) are dropped before any GEMM: their log-prob and entropy
    are 0, and so are ``old_per_token_logps`` / ``ref_per_token_logps`` there, so they add nothing, not even a NaN.
    ``old_per_token_logps`` (layout of ``completion_ids``; default: the current log-probs, detached — one update per
    generation) and the reference from ``ref_hidden`` (+ ``ref_weight`` / ``ref_bias``, default ``weight`` /
    ``bias``; computed without grad through the same kernel) or ``ref_per_token_logps``; ``beta != 0`` needs one of
    them. Remaining keyword arguments go to :func:`alignops.policy_loss` (``epsilon_low``, ``epsilon_high``,
    ``delta``, ``importance_sampling_level``, ``num_items_in_batch``, ``importance_sampling_ratio``, ...).

    ``entropy_coef`` (not in TRL's GRPO; veRL's ``entropy_coeff`` with token-mean aggregation) subtracts an entropy
    bonus ``entropy_coef * sum_t m_t H_t / n`` (n = ``num_items_in_batch`` when given, else the completion-token
    count: DDP-correct like dapo); its gradient ``dH/dz_v = -p_v (log p_v + H)`` is added in the same backward pass
    over the recomputed tiles. With ``entropy_coef = 0`` the entropies are a metric (``metrics["entropy"]``, the
    completion-token mean TRL logs) and the input of the ``top_entropy_quantile`` mask, never differentiated.

    Dtypes: ``hidden``, ``weight``, ``bias`` fp32 / bf16 / fp16 / fp64 (one dtype); the log-probs, entropies and loss
    are fp32 (fp64 for fp64 inputs), accumulated in fp32 inside the GEMMs. Extra memory: one [K, Vt] logits tile
    (K = completion tokens), independent of V, plus [B, T] vectors. ``backend`` picks the fused kernel of
    :func:`alignops.fused_linear_logprobs` (C++ on the CPU, Triton on CUDA, or the torch reference) and of the
    epilogue :func:`alignops.policy_loss`: both run the backend the caller names.

    Raises AlignopsError for layouts that do not fit together, a non-finite ``entropy_coef``, a
    ``top_entropy_quantile`` outside (0, 1], ``beta != 0`` without a reference, and what
    :func:`alignops.fused_linear_logprobs` and :func:`alignops.policy_loss` reject. ``check_values=False``: as
    :func:`alignops.fused_linear_logprobs` (the packed layout still reads the longest segment on the host).
    DTensor weights and biases (FSDP2): gathered once for the policy and the reference, as
    :func:`alignops.fused_linear_logprobs` says.
    """
    refuse_dtensor("fused_linear_policy_loss", hidden=hidden, ref_hidden=ref_hidden, completion_ids=completion_ids)
    weight, bias = gathered_weight(weight, "weight"), gathered_weight(bias, "bias")
    ref_weight, ref_bias = gathered_weight(ref_weight, "ref_weight"), gathered_weight(ref_bias, "ref_bias")
    check_finite(entropy_coef, "entropy_coef")
    if not (0.0 < top_entropy_quantile <= 1.0) or math.isnan(top_entropy_quantile):
        raise AlignopsError(f"top_entropy_quantile must lie in (0, 1], got {top_entropy_quantile}")
    if completion_mask is None:
        completion_mask = torch.ones(completion_ids.shape, dtype=torch.bool, device=completion_ids.device)
    if completion_mask.shape != completion_ids.shape:
        raise AlignopsError(
            f"completion_mask must have the shape of completion_ids {tuple(completion_ids.shape)}, "
            f"got {tuple(completion_mask.shape)}"
        )
    if hidden.dim() == 3:
        if cu_seqlens is not None:
            raise AlignopsError("cu_seqlens is for packed [N, H] hidden states; padded ones are [B, T, H]")
        if completion_ids.shape != hidden.shape[:2]:
            raise AlignopsError(
                f"completion_ids must have shape [B, T] = {tuple(hidden.shape[:2])}, got {tuple(completion_ids.shape)}"
            )
        num_seqs = hidden.shape[0]
    elif hidden.dim() == 2:
        if cu_seqlens is None:
            raise AlignopsError("packed [N, H] hidden states need cu_seqlens")
        if completion_ids.shape != hidden.shape[:1]:
            raise AlignopsError(
                f"completion_ids must have shape [N] = [{hidden.shape[0]}], got {tuple(completion_ids.shape)}"
            )
        check_cu_seqlens(cu_seqlens, hidden.shape[0], hidden.device, check_values)
        num_seqs = cu_seqlens.shape[0] - 1
    else:
        raise AlignopsError(f"hidden must be [B, T, H] (padded) or [N, H] (packed), got shape {tuple(hidden.shape)}")
    if advantages.shape not in ((num_seqs,), (num_seqs, 1)) and not (
        hidden.dim() == 3 and advantages.shape == completion_ids.shape
    ):
        raise AlignopsError(
            f"advantages must have shape [{num_seqs}] (one per sequence), got {tuple(advantages.shape)}"
        )
    if completion_ids.dtype.is_floating_point or completion_ids.dtype == torch.bool:
        raise AlignopsError(f"completion_ids must be an integer tensor, got dtype {completion_ids.dtype}")
    for name, t in (("ref_per_token_logps", ref_per_token_logps), ("old_per_token_logps", old_per_token_logps)):
        if t is not None and t.shape != completion_ids.shape:
            raise AlignopsError(
                f"{name} must have the shape of completion_ids {tuple(completion_ids.shape)}, got {tuple(t.shape)}"
            )
    if ref_hidden is not None and ref_hidden.shape != hidden.shape:
        raise AlignopsError(
            f"ref_hidden must have the shape of hidden {tuple(hidden.shape)}, got {tuple(ref_hidden.shape)}"
        )
    if beta != 0.0 and ref_hidden is None and ref_per_token_logps is None:
        raise AlignopsError(
            f"beta = {beta} needs the reference model: give ref_hidden (and ref_weight) or ref_per_token_logps"
        )

    keep = completion_mask.bool()
    # Masked tokens carry ignore_index: the kernel drops them before any GEMM.
    targets = torch.where(keep, completion_ids, torch.full_like(completion_ids, -100)).reshape(-1)
    kernel = dict(
        ignore_index=-100,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        backend=backend,
        check_values=check_values,
    )
    H = hidden.shape[-1]
    out = fused_linear_logprobs(hidden.reshape(-1, H), weight, targets, bias, return_entropy=True, **kernel)
    logp, entropy = out.logp, out.entropy
    if entropy_coef == 0.0:
        entropy = entropy.detach()  # a metric and the entropy mask's input: the backward skips its gradient

    ref = None
    if ref_hidden is not None:
        with torch.no_grad():
            ref = fused_linear_logprobs(
                ref_hidden.reshape(-1, H),
                weight if ref_weight is None else ref_weight,
                targets,
                bias if ref_weight is None and ref_bias is None else ref_bias,
                **kernel,
            ).logp
    elif ref_per_token_logps is not None:
        ref = ref_per_token_logps.reshape(-1).to(logp.dtype).masked_fill(~keep.reshape(-1), 0.0)
    old = None
    if old_per_token_logps is not None:
        old = old_per_token_logps.reshape(-1).to(logp.dtype).masked_fill(~keep.reshape(-1), 0.0)
    extra = {k: policy_options.pop(k) for k in _PER_TOKEN_OPTIONS if policy_options.get(k) is not None}

    if hidden.dim() == 3:
        shape = completion_ids.shape

        def to_padded(x):
            return None if x is None else x.reshape(shape)

        mask_p = keep
    else:
        seg, pos, longest = _packed_index(cu_seqlens, hidden.shape[0])

        def to_padded(x):
            if x is None:
                return None
            padded = x.new_zeros(num_seqs, longest)
            return padded.index_put((seg, pos), x.reshape(-1))

        mask_p = to_padded(keep.reshape(-1))
        isr = policy_options.get("importance_sampling_ratio")
        if isr is not None and isr.shape == completion_ids.shape:
            policy_options["importance_sampling_ratio"] = to_padded(isr)

    logp_p, entropy_p = to_padded(logp), to_padded(entropy)
    entropy_mask = None
    if top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropy_p.detach(), mask_p, quantile=1.0 - top_entropy_quantile)
    extra = {k: to_padded(v.reshape(-1).to(logp.dtype).masked_fill(~keep.reshape(-1), 0.0)) for k, v in extra.items()}
    result = policy_loss(
        logp_p,
        advantages,
        mask_p,
        old_per_token_logps=to_padded(old),
        ref_per_token_logps=to_padded(ref),
        loss_type=loss_type,
        beta=beta,
        entropy_mask=entropy_mask,
        backend=backend,
        **extra,
        **policy_options,
    )
    loss, metrics = result.loss, {k: v for k, v in result._asdict().items() if k != "loss"}
    num_items = policy_options.get("num_items_in_batch")
    tokens = keep.sum().clamp(min=1).to(entropy.dtype)
    metrics["entropy"] = entropy.detach().sum() / tokens
    if entropy_coef != 0.0:
        # entropy is 0 off the mask; the bonus is normalised like dapo (the global token count when given)
        count = tokens if num_items is None else torch.as_tensor(num_items, dtype=entropy.dtype).clamp(min=1)
        loss = loss - entropy_coef * entropy.sum() / count
    if hidden.dim() == 2 and entropy_mask is not None:
        entropy_mask = entropy_mask[seg, pos]
    return FusedLinearPolicyOutput(
        loss,
        logp.detach().reshape(completion_ids.shape),
        entropy.detach().reshape(completion_ids.shape),
        entropy_mask,
        metrics,
    )
