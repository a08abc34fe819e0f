"""Teacher-student distillation straight from both models' LM-head inputs: the [N, V] logits of neither model
are materialised."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _backend
from ._checks import check_finite, check_positive, check_same_device
from ._distributed import gathered_frozen, gathered_weight, refuse_dtensor
from ._errors import AlignopsError
from .fused_linear import fused_linear_logprobs
from .ops._registration import run_checks, run_op_checks
from .reference import distillation as _ref

DIVERGENCES = _ref.DIVERGENCES
SUPPORTS = _ref.SUPPORTS
REDUCTIONS = ("mean", "sum", "none")


class DistillationOutput(NamedTuple):
    """``loss`` (differentiable w.r.t. the student), ``per_token`` divergence and student ``entropy`` (in the
    layout of ``completion_mask``, 0 on masked tokens; metrics, not differentiated) and ``num_tokens``."""

    loss: torch.Tensor
    per_token: torch.Tensor
    entropy: torch.Tensor
    num_tokens: torch.Tensor


def _rows(hidden, name: str) -> torch.Tensor:
    """The [N, H] rows of a public [N, H] or [B, T, H] ``hidden``: the op's form, whose checks do the rest."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        raise AlignopsError(
            f"{name} must be a tensor of shape [N, H] or [B, T, H], got "
            f"{list(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}"
        )
    return hidden.reshape(-1, hidden.shape[-1])


def _check_head(hidden, weight, bias, h: str, w: str, b: str) -> None:
    """An LM head's checks, those of every fused-linear op (``alignops::check_lm_head``, csrc/common/checks.h),
    for the ops that take a head without a native op of their own: the top-k student, adpa's three models."""
    run_op_checks(torch.ops.alignops.check_lm_head.default, _rows(hidden, h), weight, bias, h, w, b)


def _check_softcap(softcap, name: str) -> None:
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise AlignopsError(f"{name} must be > 0 and finite (or None for no softcap), got {softcap}")


def fused_linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "jsd",
    skew: float = 0.1,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    hard_label_weight: float = 0.0,
    soft_label_weight: float = 1.0,
    targets: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> DistillationOutput:
    r"""Teacher-student divergence from LM-head inputs, the loss of TRL 1.16's ``DistillationTrainer``.

    Shapes: ``student_hidden`` [N, Hs] or [B, T, Hs], ``student_weight`` [V, Hs], ``teacher_hidden`` [N, Ht] or
    [B, T, Ht], ``teacher_weight`` [V, Ht] (the widths may differ, the vocabulary may not), ``completion_mask``
    [N] or [B, T] (nonzero = the token counts), optional biases [V]. Each model has one floating dtype (fp32,
    fp64, bf16, fp16); arithmetic in fp32 (fp64 for fp64 students).

    Logits ``z = transform(h W^T + b) / temperature``, ``transform(u) = softcap tanh(logit_scale u / softcap)``
    (``logit_scale u`` without softcap); ``p_s``, ``p_t`` their softmaxes. Per token ``d``:

    - ``divergence="jsd"``: ``beta = 0`` forward KL(p_t || p_s), ``beta = 1`` reverse KL(p_s || p_t), otherwise
      ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``, ``m = (1 - beta) p_s + beta p_t`` (TRL's convention);
    - ``"tv"``: ``0.5 sum_v |p_s - p_t|``;
    - ``"skew_kl"``: ``KL(p_t || skew p_t + (1 - skew) p_s)``; ``"skew_reverse_kl"``:
      ``KL(p_s || skew p_s + (1 - skew) p_t)`` (DistiLLM's skewed KLs).

    Per token ``l = soft_label_weight d + hard_label_weight ce`` with ``ce = -log softmax(transform(h_s W_s^T +
    b_s))[target]`` the cross-entropy of the student's logits *before* the temperature on ``targets`` ([N] or
    [B, T] int64, the ground-truth tokens; -100 or a masked token adds no cross-entropy): Liger's
    ``LigerFusedLinearJSDLoss(weight_hard_loss, weight_soft_loss)`` mix (TRL's DistillationTrainer has no hard
    term). ``hard_label_weight != 0`` needs ``targets`` and costs one more tiled pass over the student's head
    (``fused_linear_logprobs``). ``loss = sum_masked l / num_tokens`` (at least 1), or ``/ num_items_in_batch``
    when given (TRL's gradient-accumulation-correct reduction), the plain sum for ``reduction="sum"``, or the
    per-token ``l`` ([N] or [B, T], 0 on masked tokens, differentiable) for ``reduction="none"``: its backward
    runs the kernel again with the incoming per-token gradients as row weights (one more forward's cost, no
    [N, V] tensor kept). Gradients flow to the student's hidden states, weight and bias only.

    The CPU kernel drops masked rows before any GEMM and walks the kept rows in blocks of R rows: one GEMM per
    model and block, then one vectorised pass set over the two [R, V] blocks, in place (softmaxes, divergence,
    entropy, the student's closed-form gradient), so the extra memory is one [R, V] fp32 block (~16 MB) per
    model plus the fp32 gradient of the student's weight, computed with the loss (backward hands it to autograd
    as is when the incoming gradient is 1, scales it otherwise). ``backend``: "auto" / "native" (C++, CPU),
    "torch" (the reference, which materialises both [N, V] logits).

    Raises AlignopsError for shape / dtype / device mismatches (the meta device included), a vocabulary
    mismatch, an unknown divergence, the divergence's ``beta`` (jsd) or ``skew`` (skew_kl, skew_reverse_kl)
    outside [0, 1], temperature <= 0, NaN / inf hyper-parameters: the op's own checks
    (``alignops::fused_linear_distillation_check``) on every backend, after those of the public layout.

    DTensor weights and biases (FSDP2, HSDP, tensor parallel) are all-gathered once per call and the student's
    gradient reduce-scattered back, averaged over the ranks (``alignops._distributed.gathered_weight``); the hidden
    states and the mask are this rank's plain tensors.
    """
    refuse_dtensor(
        "fused_linear_distillation_loss",
        student_hidden=student_hidden,
        teacher_hidden=teacher_hidden,
        completion_mask=completion_mask,
    )
    student_weight = gathered_weight(student_weight, "student_weight")
    student_bias = gathered_weight(student_bias, "student_bias")
    teacher_weight, teacher_bias = gathered_frozen(teacher_weight=teacher_weight, teacher_bias=teacher_bias)
    hs, ht = _rows(student_hidden, "student_hidden"), _rows(teacher_hidden, "teacher_hidden")
    # the public arguments the op does not take as they are; the op's own checks cover the heads
    check_same_device(
        [
            ("student_hidden", student_hidden),
            ("completion_mask", completion_mask),
            ("num_items_in_batch", num_items_in_batch),
        ]
    )
    layout = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != layout or completion_mask.shape != layout:
        raise AlignopsError(
            f"teacher_hidden and completion_mask must have the token layout of student_hidden "
            f"{tuple(layout)}, got {tuple(teacher_hidden.shape[:-1])} and "
            f"{tuple(completion_mask.shape)}"
        )
    if reduction not in REDUCTIONS:
        raise AlignopsError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_softcap(student_softcap, "student_softcap")
    _check_softcap(teacher_softcap, "teacher_softcap")
    _check_hard_labels(hard_label_weight, soft_label_weight, targets, layout, student_hidden)
    acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
    weights = (completion_mask.reshape(-1) != 0).to(acc)
    options = (
        divergence,
        float(beta if divergence == "jsd" else skew),
        float(temperature),
        float(student_logit_scale),
        float(teacher_logit_scale),
        float(student_softcap or 0.0),
        float(teacher_softcap or 0.0),
    )
    # the op's checks on whichever backend serves the call: heads, vocabulary, divergence, beta / skew (the one
    # the divergence uses), temperature, logit scales
    run_checks(
        "alignops::fused_linear_distillation",
        hs,
        student_weight,
        ht,
        teacher_weight,
        student_bias,
        teacher_bias,
        weights,
        *options,
        False,
    )
    impl = _backend.resolve(backend, student_hidden.device, "fused_linear_distillation_loss", native_cuda=False)
    if impl == "torch":
        loss, per_token, entropy, count = _ref.fused_linear_distillation_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            completion_mask,
            beta=beta,
            skew=skew,
            temperature=temperature,
            divergence=divergence,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            student_logit_scale=student_logit_scale,
            teacher_logit_scale=teacher_logit_scale,
            student_softcap=student_softcap,
            teacher_softcap=teacher_softcap,
            num_items_in_batch=num_items_in_batch,
            reduction=reduction,
            hard_label_weight=hard_label_weight,
            soft_label_weight=soft_label_weight,
            targets=targets,
        )
        if reduction == "none":
            loss = loss.view(layout)
        return DistillationOutput(loss, per_token.detach().view(layout), entropy.view(layout), count)
    op = (
        torch.ops.alignops.fused_linear_distillation
        if impl == "native"
        else torch.ops.alignops.fused_linear_distillation_triton
    )
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias)
    )
    teacher = (ht.detach(), teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach())
    count = weights.sum().to(torch.int64)
    if reduction == "none":
        per_token, entropy = _PerTokenDistillation.apply(
            op, options, hs, student_weight, student_bias, *teacher, weights, compute_grad
        )
        d = per_token.detach()
        loss = per_token * soft_label_weight
    else:
        # The reduction's scale (soft_label_weight / denominator) goes into the row weights, so that the op's
        # summed loss is the loss itself and loss.backward() hands it a gradient of exactly 1: its backward then
        # returns the weight gradient it computed without a second [V, H] product (ops/_closed_form_grad.py).
        denom = None
        if reduction == "mean":
            denom = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
        row_weights = weights * soft_label_weight if soft_label_weight not in (0.0, 1.0) else weights
        if denom is not None and soft_label_weight != 0.0:
            row_weights = row_weights / denom  # in the weights' dtype (an int64 count would give fp32 via 1 / count)
        total, d, entropy, *_ = op(
            hs, student_weight, teacher[0], teacher[1], student_bias, teacher[2], row_weights, *options, compute_grad
        )
        loss = total if soft_label_weight != 0.0 else total * 0.0
    if hard_label_weight != 0.0:
        ce = _cross_entropy(
            hs, student_weight, student_bias, targets, weights != 0, student_logit_scale, student_softcap, impl
        )
        if reduction == "none":
            loss = loss + hard_label_weight * ce
        else:
            loss = loss + hard_label_weight * (ce.sum() if denom is None else ce.sum() / denom)
    if reduction == "none":
        loss = loss.view(layout)
    return DistillationOutput(loss, d.detach().view(layout), entropy.detach().view(layout), count)


def topk_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    support: str = "teacher",
    student_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    hard_label_weight: float = 0.0,
    soft_label_weight: float = 1.0,
    targets: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> DistillationOutput:
    r"""Offline distillation: the teacher given as its top-k (log-probs + token ids), the student from its LM-head
    inputs; no [N, V] tensor and no teacher head.

    Shapes: ``student_hidden`` [N, H] or [B, T, H], ``student_weight`` [V, H], ``teacher_topk_logprobs`` and
    ``teacher_topk_ids`` (int64 in [0, V)) [N, k] or [B, T, k], ``completion_mask`` [N] or [B, T], optional
    ``student_bias`` [V], ``targets`` [N] or [B, T] int64. Padding entries of the top-k are marked by a log-prob
    of ``-inf`` (their id is ignored), the usual vLLM / TRL layout; masked tokens may hold anything.

    The teacher's values are log-probabilities **at the distillation temperature**, as a vLLM server returns them
    (TRL's ``ServerDistillationTrainer`` asks for them with ``temperature``): they are not divided again. The
    student's logits are ``transform(h W^T + b) / temperature`` as in :func:`fused_linear_distillation_loss`,
    ``log p_s`` their full log-softmax. Per token, with ``t_j`` the teacher's values and ``s_j = log p_s(id_j)``:

    - ``support="teacher"`` (default): ``q = softmax(t)`` (the teacher renormalised over its top-k, so raw teacher
      logits / temperature work as well), ``d = KL(q || p_s) = sum_j q_j (log q_j - s_j)``. A true divergence
      between the truncated teacher and the student's *full* distribution (zero only when the student puts all
      its mass on the top-k in the teacher's proportions), the sparse-soft-target cross-entropy of offline KD
      minus the teacher's entropy; its logit gradient is ``p_s - q``: mass outside the top-k is pushed down.
    - ``"tail"``: TRL's ``ServerDistillationTrainer`` with ``loss_add_tail=True`` (its default, forward KL path):
      K + 1 buckets, the top-k and the rest ``log(1 - sum_j exp(.))``, for both models; forward KL over them.
    - ``"renormalize"``: TRL's ``loss_add_tail=False``: both models renormalised over the top-k ids (the student's
      mass outside them gets no gradient).

    Plus ``hard_label_weight * ce`` (the student's cross-entropy on ``targets`` before the temperature, as in
    :func:`fused_linear_distillation_loss`), times ``soft_label_weight`` for ``d``; reductions as there.

    Composition, not a new kernel: ``s_j = log p_s(a) + z_j - z_a`` with ``a`` an anchor token (the target when
    there is one, else the teacher's first id), ``log p_s(a)`` (and the entropy) from ``fused_linear_logprobs``'s
    tiled online logsumexp (one pass over V, gradient ``p_s - onehot(a)`` recomputed tile by tile), and the k + 1
    logits ``z`` gathered by a row-chunked dot product that recomputes its [R, k + 1, H] weight rows in backward
    (``grad_weight`` by ``index_add``). Extra memory: one vocabulary tile, one [R, k + 1, H] chunk (~16 MB) and
    the [V, H] fp32 gradient of the weight. ``support="renormalize"`` needs no logsumexp for the loss (the entropy
    metric still walks V, without gradient).

    Raises AlignopsError for shape / dtype / device mismatches, ids outside [0, V) on kept tokens, an unknown
    support or reduction, temperature <= 0, NaN / inf hyper-parameters.
    """
    refuse_dtensor(
        "topk_distillation_loss",
        student_hidden=student_hidden,
        teacher_topk_logprobs=teacher_topk_logprobs,
        teacher_topk_ids=teacher_topk_ids,
        completion_mask=completion_mask,
    )
    student_weight = gathered_weight(student_weight, "student_weight")
    student_bias = gathered_weight(student_bias, "student_bias")
    check_same_device(  # the head's own devices: _check_head
        [
            ("student_hidden", student_hidden),
            ("teacher_topk_logprobs", teacher_topk_logprobs),
            ("teacher_topk_ids", teacher_topk_ids),
            ("completion_mask", completion_mask),
            ("num_items_in_batch", num_items_in_batch),
        ]
    )
    _check_head(student_hidden, student_weight, student_bias, "student_hidden", "student_weight", "student_bias")
    layout = student_hidden.shape[:-1]
    if completion_mask.shape != layout:
        raise AlignopsError(
            f"completion_mask must have the token layout of student_hidden {tuple(layout)}, got "
            f"{tuple(completion_mask.shape)}"
        )
    if (
        teacher_topk_ids.dim() != len(layout) + 1
        or teacher_topk_ids.shape[:-1] != layout
        or teacher_topk_ids.shape[-1] < 1
        or teacher_topk_logprobs.shape != teacher_topk_ids.shape
    ):
        raise AlignopsError(
            f"teacher_topk_logprobs and teacher_topk_ids must both have shape {tuple(layout) + ('k',)} (k >= 1), got "
            f"{tuple(teacher_topk_logprobs.shape)} and {tuple(teacher_topk_ids.shape)}"
        )
    if teacher_topk_ids.dtype != torch.int64 or not teacher_topk_logprobs.is_floating_point():
        raise AlignopsError(
            f"teacher_topk_ids must be int64 and teacher_topk_logprobs floating, got {teacher_topk_ids.dtype} and "
            f"{teacher_topk_logprobs.dtype}"
        )
    if support not in SUPPORTS:
        raise AlignopsError(f"support must be one of {SUPPORTS}, got {support!r}")
    if reduction not in REDUCTIONS:
        raise AlignopsError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_positive(temperature, "temperature")
    check_finite(student_logit_scale, "student_logit_scale")
    _check_softcap(student_softcap, "student_softcap")
    _check_hard_labels(hard_label_weight, soft_label_weight, targets, layout, student_hidden)
    impl = _backend.resolve(backend, student_hidden.device, "topk_distillation_loss", native_cuda=False)
    kw = dict(
        temperature=temperature,
        support=support,
        student_bias=student_bias,
        student_logit_scale=student_logit_scale,
        student_softcap=student_softcap,
        num_items_in_batch=num_items_in_batch,
        reduction=reduction,
        hard_label_weight=hard_label_weight,
        soft_label_weight=soft_label_weight,
        targets=targets,
    )
    if impl == "torch":
        loss, d, entropy, count = _ref.topk_distillation_loss(
            student_hidden, student_weight, teacher_topk_logprobs, teacher_topk_ids, completion_mask, **kw
        )
        loss = loss.view(layout) if reduction == "none" else loss
        return DistillationOutput(loss, d.detach().view(layout), entropy.view(layout), count)

    H, V, k = student_hidden.shape[-1], student_weight.shape[0], teacher_topk_ids.shape[-1]
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    keep = completion_mask.reshape(-1) != 0
    rows = keep.nonzero().view(-1)  # dropped before anything: masked rows may hold padding
    K = rows.numel()
    hs = student_hidden.reshape(-1, H).index_select(0, rows)
    # The teacher is not trained: no gradient to its values (as the teacher head gets none).
    t = teacher_topk_logprobs.detach().reshape(-1, k).index_select(0, rows).to(acc)
    ids = teacher_topk_ids.reshape(-1, k).index_select(0, rows)
    valid = t > float("-inf")
    if K and bool(((ids < 0) | (ids >= V)).logical_and(valid).any()):
        raise AlignopsError(f"teacher_topk_ids must lie in [0, V) = [0, {V}) on kept tokens")
    ids = torch.where(valid, ids, torch.zeros_like(ids))
    has_targets = targets is not None
    tgt = targets.reshape(-1).index_select(0, rows) if has_targets else None
    if has_targets and K and bool(((tgt < 0) | (tgt >= V)).logical_and(tgt != -100).any()):
        raise AlignopsError(f"targets must lie in [0, V) = [0, {V}) (or be -100) on kept tokens")
    # The anchor: at temperature 1 the target where there is one (its log-prob is then the cross-entropy too, one
    # pass over V for both), else the teacher's first id.
    reuse = hard_label_weight != 0.0 and temperature == 1.0
    anchor = torch.where(tgt != -100, tgt, ids[:, 0]) if reuse else ids[:, 0]
    need_lse = support != "renormalize" or reuse
    with torch.set_grad_enabled(torch.is_grad_enabled() and need_lse):
        logp_a, entropy_k = fused_linear_logprobs(
            hs,
            student_weight,
            anchor,
            student_bias,
            temperature=float(temperature),
            logit_scale=float(student_logit_scale),
            softcap=student_softcap,
            return_entropy=True,
            backend=impl,
        )
    u = _GatherLogits.apply(hs, student_weight, student_bias, torch.cat([ids, anchor.unsqueeze(1)], 1))
    z = u * student_logit_scale
    if student_softcap is not None:
        z = student_softcap * torch.tanh(z / student_softcap)
    z = z / temperature
    s = (z[:, :k] - z[:, k:]) + logp_a.to(acc).unsqueeze(1)
    d = _topk_divergence_rows(s, t, valid, support)
    per_row = soft_label_weight * d
    if hard_label_weight != 0.0:
        if reuse:
            ce = torch.where(tgt != -100, -logp_a.to(acc), torch.zeros_like(d))
        else:  # the cross-entropy is at temperature 1, the divergence's logsumexp at `temperature`: a second pass
            ce = _cross_entropy(
                hs,
                student_weight,
                student_bias,
                tgt,
                torch.ones_like(valid[:, 0]),
                student_logit_scale,
                student_softcap,
                impl,
            ).to(acc)
        per_row = per_row + hard_label_weight * ce
    count = keep.sum()
    n = keep.numel()
    full = per_row.new_zeros(n).index_put((rows,), per_row)
    d_full = d.detach().new_zeros(n).index_put((rows,), d.detach())
    entropy = entropy_k.detach().to(acc).new_zeros(n).index_put((rows,), entropy_k.detach().to(acc))
    if reduction == "none":
        loss = full.view(layout)
    elif reduction == "sum":
        loss = per_row.sum()
    elif num_items_in_batch is not None:
        loss = per_row.sum() / num_items_in_batch
    else:
        loss = per_row.sum() / count.clamp(min=1)
    return DistillationOutput(loss, d_full.view(layout), entropy.view(layout), count)


def _check_hard_labels(hard_label_weight, soft_label_weight, targets, layout, student_hidden) -> None:
    check_finite(hard_label_weight, "hard_label_weight")
    check_finite(soft_label_weight, "soft_label_weight")
    if hard_label_weight != 0.0 and targets is None:
        raise AlignopsError("hard_label_weight != 0 needs targets (the ground-truth token of every position)")
    if targets is not None:
        if targets.dtype != torch.int64 or targets.shape != layout:
            raise AlignopsError(
                f"targets must be an int64 tensor in the token layout of student_hidden {tuple(layout)}, got "
                f"{targets.dtype} {tuple(targets.shape)}"
            )
        check_same_device([("student_hidden", student_hidden), ("targets", targets)])


def _cross_entropy(hidden, weight, bias, targets, keep, logit_scale, softcap, impl) -> torch.Tensor:
    """[N] ``-log p_student(target)`` at temperature 1 (0 where ``keep`` is false or the target is -100), from the
    tiled logsumexp of ``fused_linear_logprobs``: no [N, V] tensor."""
    t = torch.where(keep, targets.reshape(-1), torch.full_like(targets.reshape(-1), -100))
    logp = fused_linear_logprobs(
        hidden,
        weight,
        t,
        bias,
        ignore_index=-100,
        logit_scale=float(logit_scale),
        softcap=softcap,
        backend=impl,
    ).logp
    return -logp


def _topk_divergence_rows(s, t, valid, support: str) -> torch.Tensor:
    """[K] divergence of the kept rows: ``s`` the student's log-probs at the teacher's ids, ``t`` the teacher's
    values, ``valid`` the non-padding entries ([K, k] each); see :func:`topk_distillation_loss`."""
    zero = torch.zeros_like(s)
    neg_inf = torch.full_like(s, float("-inf"))
    t = torch.where(valid, t, neg_inf)
    if support == "tail":
        # TRL's _add_tail_bucket: log(1 - sum exp), the sum kept below 1 so that the log stays finite.
        def tail(x):
            mass = torch.where(valid, x, neg_inf).logsumexp(-1, keepdim=True).clamp(max=-1e-7)
            return torch.log(-torch.expm1(mass))

        s, t = torch.cat([s, tail(s)], -1), torch.cat([t, tail(t)], -1)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], -1)
        zero = torch.zeros_like(s)
        log_q = t
    else:
        log_q = torch.log_softmax(t, -1)
        if support == "renormalize":
            s = torch.log_softmax(torch.where(valid, s, torch.full_like(s, float("-inf"))), -1)
    q = torch.where(valid, log_q.exp(), zero)
    # where() before the product: 0 * (-inf) on padding would be NaN, in the value and in the gradient.
    return (q * (torch.where(valid, log_q, zero) - torch.where(valid, s, zero))).sum(-1)


class _GatherLogits(torch.autograd.Function):
    """``u[n, j] = hidden[n] . weight[ids[n, j]] (+ bias[ids[n, j]])`` in fp32 (fp64 for fp64), [K, m], by chunks of
    rows so that the gathered [R, m, H] weight rows stay ~16 MB; backward gathers them again (nothing saved but
    the inputs) and scatters ``grad_weight`` with ``index_add_``."""

    @staticmethod
    def _chunk(m: int, H: int) -> int:
        return max(1, (4 << 20) // max(1, m * H))

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        K, m = ids.shape
        out = hidden.new_empty((K, m), dtype=acc)
        R = _GatherLogits._chunk(m, hidden.shape[1])
        for r0 in range(0, K, R):
            i = ids[r0 : r0 + R]
            u = torch.einsum("nh,nmh->nm", hidden[r0 : r0 + R].to(acc), weight[i].to(acc))
            out[r0 : r0 + R] = u + bias[i].to(acc) if bias is not None else u
        ctx.save_for_backward(hidden, weight, ids)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, ids = ctx.saved_tensors
        needs = ctx.needs_input_grad
        acc = grad.dtype
        K, m = ids.shape
        H = hidden.shape[1]
        grad_hidden = torch.zeros_like(hidden, dtype=acc) if needs[0] else None
        grad_weight = weight.new_zeros(weight.shape, dtype=acc) if needs[1] else None
        grad_bias = weight.new_zeros(weight.shape[0], dtype=acc) if needs[2] and ctx.has_bias else None
        R = _GatherLogits._chunk(m, H)
        for r0 in range(0, K, R):
            i, g = ids[r0 : r0 + R], grad[r0 : r0 + R]
            if grad_hidden is not None:
                grad_hidden[r0 : r0 + R] = torch.einsum("nm,nmh->nh", g, weight[i].to(acc))
            if grad_weight is not None:
                h = hidden[r0 : r0 + R].to(acc)
                grad_weight.index_add_(0, i.reshape(-1), (g.unsqueeze(2) * h.unsqueeze(1)).reshape(-1, H))
            if grad_bias is not None:
                grad_bias.index_add_(0, i.reshape(-1), g.reshape(-1))
        return (
            grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(ctx.bias_dtype) if grad_bias is not None else None,
            None,
        )


class _PerTokenDistillation(torch.autograd.Function):
    """reduction="none": the kernels return the gradient of ``sum_n w_n d_n`` for the row weights ``w`` they are
    given, so backward calls them again with ``w = mask * incoming per-token gradient`` (a gradient of any
    per-token weighting, and no [N, V] tensor held between forward and backward)."""

    @staticmethod
    def forward(ctx, op, options, hs, sw, sb, ht, tw, tb, weights, compute_grad):
        _, per_token, entropy, *_ = op(hs, sw, ht, tw, sb, tb, weights, *options, False)
        ctx.op, ctx.options, ctx.has_bias = op, options, sb is not None
        ctx.save_for_backward(
            hs,
            sw,
            sb if sb is not None else hs.new_empty(0),
            ht,
            tw,
            tb if tb is not None else ht.new_empty(0),
            weights,
        )
        ctx.mark_non_differentiable(entropy)
        return per_token, entropy

    @staticmethod
    def backward(ctx, grad_per_token, _grad_entropy):
        hs, sw, sb, ht, tw, tb, weights = ctx.saved_tensors
        sb = sb if ctx.has_bias else None
        tb = tb if tb.numel() else None
        if grad_per_token is None:
            return (None,) * 10
        w = weights * grad_per_token.to(weights.dtype)
        _, _, _, gh, gw, gb = ctx.op(hs, sw, ht, tw, sb, tb, w, *ctx.options, True)
        needs = ctx.needs_input_grad
        return (
            None,
            None,
            gh if needs[2] else None,
            gw if needs[3] else None,
            gb if needs[4] and sb is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


__all__ = ["DistillationOutput", "fused_linear_distillation_loss", "topk_distillation_loss"]
