"""ADPA and DCKD (Gao et al., "Advantage-Guided Distillation for Preference Alignment in Small Language Models",
ICLR 2025): preference alignment of a small student distilled from a DPO-aligned teacher, from the LM-head inputs
of every model (no [N, V] logits of any model are materialised).

What was followed: the paper's released training code (the ``DistillTrainer`` of its ``run_distill_dpo.py``, its
``get_kl_loss`` / ``get_reverse_ce`` and ``utils/merge_logits_adpa_dataset.py``), read for the signs and the
normalisation and rewritten here; the differences are listed in each function's docstring.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _backend
from ._checks import check_finite, check_same_device
from ._distributed import gathered_frozen, gathered_weight, refuse_dtensor
from ._errors import AlignopsError
from .distillation import _check_head, fused_linear_distillation_loss
from .ops import adpa as _ops  # noqa: F401  (registers alignops::fused_linear_adpa)
from .reference import adpa as _ref

REDUCTIONS = ("mean", "sum")


class ADPAOutput(NamedTuple):
    """``loss`` (differentiable w.r.t. the student), ``expected_advantage`` ``E = sum_v p_s(v) A(v)`` per token
    (in the layout of ``completion_mask``, 0 on masked tokens; a metric, not differentiated) and ``num_tokens``."""

    loss: torch.Tensor
    expected_advantage: torch.Tensor
    num_tokens: torch.Tensor


class DCKDOutput(NamedTuple):
    """``loss`` (differentiable w.r.t. the student), the mean forward KL over the chosen tokens ``chosen_kl`` and
    over the rejected tokens ``rejected_kl`` (metrics, detached), and the two token counts."""

    loss: torch.Tensor
    chosen_kl: torch.Tensor
    rejected_kl: torch.Tensor
    num_chosen: torch.Tensor
    num_rejected: torch.Tensor


def _check_layout(layout, named) -> None:
    """Every ``(name, shape)`` equal to the student's token layout (its hidden states' leading dimensions)."""
    for name, shape in named:
        if shape != layout:
            raise AlignopsError(
                f"{name} must have the token layout of student_hidden {tuple(layout)}, got {tuple(shape)}"
            )


def _check_vocab(student_weight, named) -> None:
    for name, w in named:
        if w.shape[0] != student_weight.shape[0]:
            raise AlignopsError(
                f"{name} must have the vocabulary of student_weight (V = {student_weight.shape[0]}), got "
                f"{tuple(w.shape)}"
            )


def adpa_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    advantage_clip: tuple[float, float] | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> ADPAOutput:
    r"""ADPA's advantage-guided distillation loss from three LM heads' inputs.

    Heads: the student ``s`` (trained), the preference-aligned teacher ``d`` (the DPO teacher) and the teacher's
    reference ``r`` (the SFT model the DPO teacher started from), both frozen; ``z = h W^T + b``, ``p =
    softmax(z)``. Per token, over the whole vocabulary::

        A(v) = log p_d(v) - log p_r(v)            (clipped to advantage_clip = (lo, hi) when given)
        E    = sum_v p_s(v) A(v)
        loss = -sum_masked E / num_tokens         (or / num_items_in_batch; the plain sum for reduction="sum")

    so ``d loss / d z_s(v) = -p_s(v) (A(v) - E) / num_tokens``: a policy gradient whose reward is the teacher's
    distribution-level advantage. In the paper the tokens are those of responses sampled from the student (the
    "rejected" slot of its data); the mask says which tokens count.

    Shapes: ``*_hidden`` [N, H*] or [B, T, H*] (the widths may differ), ``*_weight`` [V, H*] (one vocabulary),
    ``completion_mask`` [N] or [B, T] (nonzero = the token counts), optional biases [V]. Each model has one
    floating dtype (fp32, fp64, bf16, fp16); arithmetic in fp32 (fp64 for fp64 students). Gradients flow to the
    student's hidden states, weight and bias only.

    Followed: the released code's ``get_reverse_ce`` (``-(p_s * advantage).sum(-1)``, averaged over the masked
    tokens) and ``merge_logits_adpa_dataset.py`` (``advantage = log(p_dpo / p_ref)``). Differences: the released
    code stores each teacher's top-k probabilities offline and scores only the DPO teacher's top-k tokens (the
    rest of the vocabulary carries no advantage), and its loader clamps the advantages to ``[1e-8, 1 - 1e-8]``
    (the probability clamp of ``load_input_and_target_probs_fast``, applied to log-ratios); here ``A`` covers the
    whole vocabulary, unclipped unless ``advantage_clip`` is given (``advantage_clip=(1e-8, 1 - 1e-8)`` gives that
    clamp). Its optional sequence importance weight ``exp(logp_s - logp_ref)`` and the ADPA+ schedule (DCKD
    first) are left to the caller.

    The fused op (``alignops::fused_linear_adpa``, torch GEMMs on blocks of rows) keeps a few [R, V] fp32 blocks
    (~16 MB each on the CPU) and the student's fp32 weight gradient, computed with the loss and scaled in
    backward: five GEMMs per block, as the materialised loss. ``backend``: "auto" / "native" (that op, on any
    device; the CPU drops masked rows first), "torch" (the reference, which materialises the three [N, V]
    logits). There is no Triton kernel.

    Raises AlignopsError for shape / dtype / device mismatches, a vocabulary mismatch, a bad ``advantage_clip``
    (NaN, or lo > hi), an unknown reduction.

    DTensor weights and biases (FSDP2, HSDP, tensor parallel) are all-gathered once per call and the student's
    gradient reduce-scattered back, as :func:`alignops.fused_linear_distillation_loss` does
    (``alignops._distributed.gathered_weight``); the hidden states and the mask are this rank's plain tensors.
    """
    refuse_dtensor(
        "adpa_loss",
        student_hidden=student_hidden,
        teacher_hidden=teacher_hidden,
        ref_hidden=ref_hidden,
        completion_mask=completion_mask,
    )
    student_weight = gathered_weight(student_weight, "student_weight")
    student_bias = gathered_weight(student_bias, "student_bias")
    teacher_weight, teacher_bias, ref_weight, ref_bias = gathered_frozen(
        teacher_weight=teacher_weight, teacher_bias=teacher_bias, ref_weight=ref_weight, ref_bias=ref_bias
    )
    check_same_device(
        [
            ("student_hidden", student_hidden),
            ("teacher_hidden", teacher_hidden),
            ("ref_hidden", ref_hidden),
            ("completion_mask", completion_mask),
            ("num_items_in_batch", num_items_in_batch),
        ]
    )
    _check_head(student_hidden, student_weight, student_bias, "student_hidden", "student_weight", "student_bias")
    _check_head(teacher_hidden, teacher_weight, teacher_bias, "teacher_hidden", "teacher_weight", "teacher_bias")
    _check_head(ref_hidden, ref_weight, ref_bias, "ref_hidden", "ref_weight", "ref_bias")
    _check_vocab(student_weight, [("teacher_weight", teacher_weight), ("ref_weight", ref_weight)])
    layout = student_hidden.shape[:-1]
    _check_layout(
        layout,
        [
            ("teacher_hidden's leading dimensions", teacher_hidden.shape[:-1]),
            ("ref_hidden's leading dimensions", ref_hidden.shape[:-1]),
            ("completion_mask", completion_mask.shape),
        ],
    )
    if reduction not in REDUCTIONS:
        raise AlignopsError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    lo, hi = float("-inf"), float("inf")
    if advantage_clip is not None:
        if len(advantage_clip) != 2:
            raise AlignopsError(f"advantage_clip must be a pair (lo, hi) or None, got {advantage_clip!r}")
        lo, hi = float(advantage_clip[0]), float(advantage_clip[1])
        if lo != lo or hi != hi or lo > hi:
            raise AlignopsError(f"advantage_clip must be (lo, hi) with lo <= hi and no NaN, got {advantage_clip!r}")
    impl = _backend.resolve(backend, student_hidden.device, "adpa_loss")
    if impl == "triton":
        raise RuntimeError(
            "adpa_loss has no Triton kernel (its fused op is torch GEMMs on blocks of rows); use backend='auto'"
        )
    if impl == "torch":
        loss, e, count = _ref.adpa_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            ref_hidden,
            ref_weight,
            completion_mask,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            ref_bias=ref_bias,
            advantage_clip=advantage_clip,
            num_items_in_batch=num_items_in_batch,
            reduction=reduction,
        )
        e = torch.where(completion_mask.reshape(-1) != 0, e.detach(), torch.zeros_like(e))
        return ADPAOutput(loss, e.view(layout), count)
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
    weights = (completion_mask.reshape(-1) != 0).to(acc)
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias)
    )
    count = weights.sum().to(torch.int64)
    # The mean's denominator goes into the row weights, so that the op's summed loss is the loss itself and
    # loss.backward() hands it a gradient of exactly 1: its backward then returns the weight gradient it computed
    # without a second [V, H] product (ops/_closed_form_grad.py).
    if reduction == "sum":
        row_weights = weights
    else:
        row_weights = weights / (num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1))
    loss, e, *_ = torch.ops.alignops.fused_linear_adpa(
        hs,
        student_weight,
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach(),
        teacher_weight.detach(),
        ref_hidden.reshape(-1, ref_hidden.shape[-1]).detach(),
        ref_weight.detach(),
        student_bias,
        None if teacher_bias is None else teacher_bias.detach(),
        None if ref_bias is None else ref_bias.detach(),
        row_weights,
        lo,
        hi,
        compute_grad,
    )
    e = e * weights  # the GPU path computes every row: masked ones read 0 like the CPU's dropped rows
    return ADPAOutput(loss, e.detach().view(layout), count)


def dckd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    chosen_weight: float = 1.0,
    rejected_weight: float = 1.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> DCKDOutput:
    r"""DCKD (dual-constrained knowledge distillation): forward KL to the aligned teacher on both responses of a
    preference pair, each averaged over its own tokens::

        KL_n = sum_v p_t(v) (log p_t(v) - log p_s(v))
        loss = chosen_weight * mean_{n in chosen} KL_n + rejected_weight * mean_{n in rejected} KL_n

    (a mean over no token is 0). ``p_t`` is the preference-aligned (DPO) teacher's softmax, ``p_s`` the
    student's. The chosen and the rejected responses share one token layout (a DPO trainer's concatenated
    batch, chosen rows then rejected rows): ``chosen_mask`` / ``rejected_mask`` say which tokens are which and
    should not overlap.

    Shapes as :func:`alignops.fused_linear_distillation_loss` (``student_hidden`` [N, Hs] or [B, T, Hs],
    ``student_weight`` [V, Hs], ``teacher_hidden`` [N, Ht] or [B, T, Ht], ``teacher_weight`` [V, Ht], the masks
    [N] or [B, T], optional biases [V]); fp32 arithmetic (fp64 for fp64 students). It is two calls of that
    fused loss with ``divergence="jsd", beta=0`` (forward KL), one per mask, so no [N, V] logits are
    materialised and ``backend`` ("auto" | "native" | "triton" | "torch") is forwarded to it.

    Followed: the released code's ``get_kl_loss`` (``F.kl_div(log p_s, p_t)`` summed over the vocabulary, mean
    over the masked tokens) weighted by ``chosen_distil_weight`` / ``rejected_distil_weight`` (its outer
    ``distillation_weight`` multiplies both: fold it into the two weights). Differences: the released code
    distils from the teacher's stored top-k probabilities plus one "rest" bucket and floors the student's
    probabilities at 1e-7; here the whole vocabulary is used, unfloored. Its SFT term on the chosen response is
    left to the caller (e.g. :func:`alignops.fused_linear_logprobs`).

    Raises AlignopsError as :func:`alignops.fused_linear_distillation_loss` does, and for a mask that does not
    have the student's token layout or a non-finite weight.
    """
    check_finite(chosen_weight, "chosen_weight")
    check_finite(rejected_weight, "rejected_weight")
    for name, mask in (("chosen_mask", chosen_mask), ("rejected_mask", rejected_mask)):
        if not isinstance(mask, torch.Tensor):
            raise AlignopsError(f"{name} must be a tensor, got {type(mask).__name__}")
    check_same_device(
        [("student_hidden", student_hidden), ("chosen_mask", chosen_mask), ("rejected_mask", rejected_mask)]
    )
    _check_layout(
        student_hidden.shape[:-1], [("chosen_mask", chosen_mask.shape), ("rejected_mask", rejected_mask.shape)]
    )
    parts = [
        fused_linear_distillation_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            mask,
            beta=0.0,
            divergence="jsd",
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            backend=backend,
        )
        for mask in (chosen_mask, rejected_mask)
    ]
    loss = chosen_weight * parts[0].loss + rejected_weight * parts[1].loss
    return DCKDOutput(loss, parts[0].loss.detach(), parts[1].loss.detach(), parts[0].num_tokens, parts[1].num_tokens)


__all__ = ["ADPAOutput", "DCKDOutput", "adpa_loss", "dckd_loss"]
