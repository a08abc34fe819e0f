"""Preference optimisation straight from LM-head inputs: the [N, V] logits are never materialised.

:func:`fused_linear_logprobs` is the kernel (per-token log-probs from ``hidden`` and the LM head);
:func:`fused_linear_preference_loss` chains it with per-sequence sums and any
:func:`alignops.preference_loss` type, for the policy and the reference, in the padded layout of TRL /
Liger-Kernel or the packed (padding-free) layout with ``cu_seqlens``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _backend
from ._api import renamed
from ._checks import check_finite
from ._distributed import gathered_weight, refuse_dtensor
from ._errors import AlignopsError
from .ops._registration import run_checks
from .preference import (
    PreferenceLossOutput,
    SequenceLogprobs,
    check_cu_seqlens,
    check_targets_in_range,
    preference_loss,
    segment_sums,
)
from .reference import preference as _ref


class FusedLinearLogprobs(NamedTuple):
    """``logp`` [N] (0 on ignored rows) and, when asked for, the ``entropy`` [N] of each row's distribution."""

    logp: torch.Tensor
    entropy: torch.Tensor | None


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
    check_values: bool = True,
) -> FusedLinearLogprobs:
    r"""Per-token ``log p(target)`` straight from LM-head inputs, never materialising the [N, V] logits.

    ``hidden`` [N, H], ``weight`` [V, H] (the LM head, same dtype), ``targets`` [N] int (``ignore_index``
    rows give 0 and are dropped before any GEMM), optional ``bias`` [V]. Logits
    ``z = logit_scale (hidden W^T + b)``, then ``z = softcap tanh(z / softcap)`` when ``softcap`` is set
    (Gemma-2), then ``z / temperature``; ``logp = z_y - logsumexp(z)``; ``entropy = lse - sum p z``
    (differentiable too, ``dH/dz_v = -p_v (log p_v + H)``: an entropy bonus; its gradient is added in the same
    backward pass over the recomputed tiles).

    The vocabulary is walked in tiles (one GEMM over all kept rows per tile, fp32 accumulation, fp64 for
    fp64) with an online logsumexp: the extra memory is one [K, Vt] tile (~8 MB on the CPU) whatever V
    and the number of tokens. Backward recomputes each tile and writes ``grad_weight[v0:v1]`` once
    (deterministic), ``grad_hidden`` accumulated in fp32. Outputs are fp32 (fp64 for fp64 inputs).

    Raises ValueError for shape / dtype / device mismatches, targets outside [0, V) and bad
    temperature / logit_scale / softcap. The targets' range is read on the host (one sync on a GPU);
    ``check_values=False`` skips the checks that read tensor values on the device, so the call neither syncs
    nor breaks CUDA-graph capture; a target outside [0, V) then gives NaN.

    A ``DTensor`` weight / bias (FSDP2, HSDP, tensor parallel) is all-gathered once, before the tiles, and its
    gradient reduce-scattered back averaged over the ranks (``alignops._distributed.gathered_weight``).
    """
    refuse_dtensor("fused_linear_logprobs", hidden=hidden, targets=targets)
    weight, bias = gathered_weight(weight, "weight"), gathered_weight(bias, "bias")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        # softcap = inf would compute inf * tanh(z / inf) = inf * 0 = NaN; None is the way to say "no softcap"
        raise AlignopsError(f"softcap must be > 0 and finite (or None for no softcap), got {softcap}")
    args = (hidden, weight, targets, bias, ignore_index, float(temperature), float(logit_scale), float(softcap or 0.0))
    run_checks("alignops::fused_linear_logprobs", *args, return_entropy)  # the op's own, whichever backend runs
    impl = _backend.resolve(backend, hidden.device, "fused_linear_logprobs", native_cuda=False)
    if impl == "torch":
        out = _ref.fused_linear_logprobs(
            hidden,
            weight,
            targets,
            bias,
            ignore_index=ignore_index,
            temperature=temperature,
            logit_scale=logit_scale,
            softcap=softcap,
            return_entropy=return_entropy,
        )
        return FusedLinearLogprobs(*out) if return_entropy else FusedLinearLogprobs(out, None)
    if impl == "triton" and check_values:
        check_targets_in_range(targets, weight.shape[0], ignore_index)
    op = (
        torch.ops.alignops.fused_linear_logprobs
        if impl == "native"
        else torch.ops.alignops.fused_linear_logprobs_triton
    )
    logp, _, entropy = op(*args, return_entropy)
    return FusedLinearLogprobs(logp, entropy if return_entropy else None)


class FusedLinearPreferenceOutput(NamedTuple):
    """``loss`` (reduced as asked; includes ``alpha * nll``), per-pair sequence log-probs and rewards."""

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    nll: torch.Tensor

    # The same fields, the same metrics.
    margins = PreferenceLossOutput.margins
    accuracy = PreferenceLossOutput.accuracy


def _sequence_sums(values: torch.Tensor, cu_seqlens: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """Per-sequence sums of per-token values (already zero outside the completion), padded or packed."""
    if cu_seqlens is None:
        return values.view(shape[:2]).sum(-1)
    return segment_sums(values, cu_seqlens)


def _token_weights(targets, token_weights, ignore_index):
    """1 on completion tokens (times ``token_weights``: Mask-DPO), 0 on prompt and padding; flat, fp32."""
    weights = (targets.reshape(-1) != ignore_index).to(torch.float32)
    if token_weights is not None:
        if token_weights.shape != targets.shape:
            raise AlignopsError(
                f"token_weights must have the shape of targets {tuple(targets.shape)}, got {tuple(token_weights.shape)}"
            )
        weights = weights * token_weights.reshape(-1).to(torch.float32)
    return weights


def fused_linear_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    backend: str = "auto",
    check_values: bool = True,
):
    """Per-sequence ``sum``, ``mean``, ``num_tokens`` and ``per_token`` log-probs from LM-head inputs.

    Padded: ``hidden`` [R, T, H], ``targets`` [R, T]; packed: ``hidden`` [N, H], ``targets`` [N] and
    ``cu_seqlens`` [S+1]. Prompt and padding tokens carry ``ignore_index``; ``token_weights`` (the layout
    of ``targets``) weight each token inside the sums. Returns :class:`alignops.preference.SequenceLogprobs`.
    ``check_values``: as :func:`fused_linear_logprobs`.
    """
    if hidden.dim() == 3:
        if cu_seqlens is not None:
            raise AlignopsError("cu_seqlens is for packed [N, H] hidden states; padded ones are [R, T, H]")
        if targets.shape != hidden.shape[:2]:
            raise AlignopsError(
                f"targets must have shape [R, T] = {tuple(hidden.shape[:2])}, got {tuple(targets.shape)}"
            )
    elif hidden.dim() == 2:
        if cu_seqlens is None:
            raise AlignopsError("packed [N, H] hidden states need cu_seqlens")
        if targets.shape != hidden.shape[:1]:
            raise AlignopsError(f"targets must have shape [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
        check_cu_seqlens(cu_seqlens, hidden.shape[0], hidden.device, check_values)
    else:
        raise AlignopsError(f"hidden must be [R, T, H] (padded) or [N, H] (packed), got shape {tuple(hidden.shape)}")
    weights = _token_weights(targets, token_weights, ignore_index)
    per_token = fused_linear_logprobs(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets.reshape(-1),
        bias,
        ignore_index=ignore_index,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        backend=backend,
        check_values=check_values,
    ).logp
    total = _sequence_sums(per_token * weights.to(per_token.dtype), cu_seqlens, targets.shape)
    count = _sequence_sums((targets.reshape(-1) != ignore_index).long(), cu_seqlens, targets.shape)
    per_token = per_token.view(targets.shape)
    return SequenceLogprobs(total, total / count.clamp(min=1).to(total.dtype), count, per_token)


def _segment_ids(index: torch.Tensor, name: str, S: int | None, check_values: bool) -> torch.Tensor:
    """``index`` as int64 segment ids in [0, S): a negative id would silently pick a segment from the end
    and a float id would be truncated."""
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise AlignopsError(f"{name} must be an integer tensor of segment ids, got dtype {index.dtype}")
    if check_values and S is not None and index.numel():
        bad = (index < 0) | (index >= S)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise AlignopsError(
                f"{name}[{i}] = {int(index[i])} is out of range: segment ids must lie in [0, {S}) "
                f"(S = len(cu_seqlens) - 1)"
            )
    return index.long()


@renamed(nll_weight="alpha")
def fused_linear_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ref_per_token_logps: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chosen_index: torch.Tensor | None = None,
    rejected_index: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    average_log_prob: bool = False,
    alpha: float = 0.0,
    loss_type: str | list[str] = "sigmoid",
    beta: float | torch.Tensor = 0.1,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    check_values: bool = True,
    **loss_options,
) -> FusedLinearPreferenceOutput:
    r"""LM head -> per-token log-probs -> per-sequence sums -> :func:`alignops.preference_loss`, fused.

    Layouts:

    - padded (TRL, Liger-Kernel): ``hidden`` [2B, T, H], ``targets`` [2B, T], the first B rows the
      chosen responses and the last B the rejected ones; prompt and padding targets are ``ignore_index``;
    - packed (padding-free): ``hidden`` [N, H], ``targets`` [N], ``cu_seqlens`` [S+1] and the segment
      ids ``chosen_index`` [B], ``rejected_index`` [B] (integer, in [0, S); chosen and rejected of
      different lengths, K responses per prompt each computed once).

    The reference comes from ``ref_hidden`` (+ ``ref_weight``, default ``weight``; computed without
    grad through the same kernel), or precomputed ``ref_chosen_logps`` / ``ref_rejected_logps`` [B], or
    ``ref_per_token_logps`` (the layout of ``targets``); with none of them the loss is reference-free
    (SimPO, CPO). The same hidden states and weights give a log-ratio of exactly 0 (the kernel is
    deterministic). ``token_weights`` (layout of ``targets``) weights each token inside the sums
    (Mask-DPO). ``average_log_prob`` divides the sums by the token counts (SimPO / ORPO convention).
    ``alpha > 0`` adds ``alpha * NLL`` of the chosen tokens (CPO, RPO: TRL's ``cpo_alpha`` / ``rpo_alpha``, Liger's
    ``alpha``; ``nll_weight=`` is its deprecated alias). Length-normalised loss
    types (ipo, sigmoid_norm, simpo) receive the token counts. Remaining keyword arguments go to
    :func:`alignops.preference_loss` (``loss_weights``, ``f_divergence_type``, ``gamma``, ...).

    Extra memory: one [K, Vt] logits tile per call, independent of T and V (the per-token and
    per-sequence vectors aside). Raises ValueError for layouts that do not fit together, for segment ids
    that are not integers or lie outside [0, S) and for a non-finite ``alpha``.
    ``check_values=False`` skips the checks that read tensor values on the device (targets in range,
    ``cu_seqlens``, the segment ids' range), so the call neither syncs nor breaks CUDA-graph capture (see
    :func:`fused_linear_logprobs`). DTensor weights and biases (FSDP2): gathered once for the policy and the
    reference, as :func:`fused_linear_logprobs` says.
    """
    refuse_dtensor("fused_linear_preference_loss", hidden=hidden, ref_hidden=ref_hidden, targets=targets)
    weight, bias = gathered_weight(weight, "weight"), gathered_weight(bias, "bias")
    ref_weight, ref_bias = gathered_weight(ref_weight, "ref_weight"), gathered_weight(ref_bias, "ref_bias")
    check_finite(alpha, "alpha")
    if hidden.dim() == 3:
        if hidden.shape[0] % 2:
            raise AlignopsError(
                f"padded hidden must stack B chosen then B rejected rows ([2B, T, H]); got {hidden.shape[0]} rows"
            )
        B = hidden.shape[0] // 2
        chosen, rejected = slice(0, B), slice(B, 2 * B)
    else:
        if hidden.dim() == 2 and (cu_seqlens is None or chosen_index is None or rejected_index is None):
            raise AlignopsError("packed [N, H] hidden states need cu_seqlens, chosen_index and rejected_index")
        if chosen_index is not None and (chosen_index.shape != rejected_index.shape or chosen_index.dim() != 1):
            raise AlignopsError(
                f"chosen_index and rejected_index must be [B] segment ids of the same shape, got "
                f"{tuple(chosen_index.shape)} and {tuple(rejected_index.shape)}"
            )
        chosen, rejected = None, None
        if chosen_index is not None:
            S = cu_seqlens.shape[0] - 1 if cu_seqlens is not None and cu_seqlens.dim() == 1 else None
            chosen = _segment_ids(chosen_index, "chosen_index", S, check_values)
            rejected = _segment_ids(rejected_index, "rejected_index", S, check_values)
    kernel_opts = dict(
        cu_seqlens=cu_seqlens,
        token_weights=token_weights,
        ignore_index=ignore_index,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        backend=backend,
        check_values=check_values,
    )
    seq = fused_linear_sequence_logprobs(hidden, weight, targets, bias, **kernel_opts)
    pc, pr = seq.sum[chosen], seq.sum[rejected]
    nc, nr = seq.num_tokens[chosen], seq.num_tokens[rejected]

    if ref_hidden is not None:
        if ref_hidden.shape != hidden.shape:
            raise AlignopsError(
                f"ref_hidden must have the shape of hidden {tuple(hidden.shape)}, got {tuple(ref_hidden.shape)}"
            )
        with torch.no_grad():
            ref_seq = fused_linear_sequence_logprobs(
                ref_hidden, weight if ref_weight is None else ref_weight, targets, ref_bias, **kernel_opts
            ).sum
        rc, rr = ref_seq[chosen], ref_seq[rejected]
    elif ref_per_token_logps is not None:
        if ref_per_token_logps.shape != targets.shape:
            raise AlignopsError(
                f"ref_per_token_logps must have the shape of targets {tuple(targets.shape)}, "
                f"got {tuple(ref_per_token_logps.shape)}"
            )
        weights = _token_weights(targets, token_weights, ignore_index).to(pc.dtype)
        ref_seq = _sequence_sums(ref_per_token_logps.reshape(-1).to(pc.dtype) * weights, cu_seqlens, targets.shape)
        rc, rr = ref_seq[chosen], ref_seq[rejected]
    else:
        rc, rr = ref_chosen_logps, ref_rejected_logps
        if (rc is None) != (rr is None):
            raise AlignopsError("give both ref_chosen_logps and ref_rejected_logps, or neither")
        if rc is not None:
            rc, rr = rc.to(pc.dtype), rr.to(pc.dtype)

    if average_log_prob:
        pc, pr = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
        if rc is not None:
            rc, rr = rc / nc.clamp(min=1), rr / nr.clamp(min=1)
        lengths = {}
    else:
        lengths = {"chosen_lengths": nc, "rejected_lengths": nr}
    # the caller's backend for the pair loss too (it was "auto" whatever the caller chose)
    out: PreferenceLossOutput = preference_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        reduction=reduction,
        backend=backend,
        **lengths,
        **loss_options,
    )
    nll = -pc.sum() / nc.sum().clamp(min=1) if not average_log_prob else -(pc * nc).sum() / nc.sum().clamp(min=1)
    loss = out.loss + alpha * nll if alpha else out.loss
    return FusedLinearPreferenceOutput(
        loss, pc.detach(), pr.detach(), out.chosen_rewards, out.rejected_rewards, nll.detach()
    )
