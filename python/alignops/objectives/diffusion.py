"""Objectives on per-sample denoising losses: Diffusion-DPO and DSO's DRO."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._api import keyword_only
from .._errors import AlignopsError
from ._common import _acc_dtype, _check_float, _check_like, _check_positive, _check_reduction, _reduce


class DiffusionDPOLossOutput(NamedTuple):
    """``loss``; per pair the logit ``inside = -beta/2 ((mse_w - mse_l) - (ref_w - ref_l))``, the
    ``implicit_accuracy`` (inside > 0) and the model's and reference's ``model_diff`` / ``ref_diff``."""

    loss: torch.Tensor
    inside: torch.Tensor
    implicit_accuracy: torch.Tensor
    model_diff: torch.Tensor
    ref_diff: torch.Tensor


@keyword_only("beta")
def diffusion_dpo_loss(
    model_mse_w: torch.Tensor,
    model_mse_l: torch.Tensor,
    ref_mse_w: torch.Tensor,
    ref_mse_l: torch.Tensor,
    *,
    beta: float,
    reduction: str = "mean",
) -> DiffusionDPOLossOutput:
    r"""Diffusion-DPO (Wallace et al. 2024) from per-sample denoising MSEs (flow matching alike).

    ``model_mse_*`` [B]: ``||eps - eps_theta(x_t, t)||^2`` (or the flow-matching velocity error) of the
    winning (w) and losing (l) sample under the model, averaged over its elements, at the same ``t`` and
    noise; ``ref_mse_*`` the same under the frozen reference::

        inside = -beta / 2 * ((mse_w - mse_l) - (ref_w - ref_l))
        loss   = -logsigmoid(inside)

    As diffusers' ``train_diffusion_dpo.py`` (``beta_dpo``, e.g. 2500-5000 for SD 1.5; the paper's
    ``T * omega(lambda_t)`` is folded into it) and DSO's ``forward_dpo_loss`` for flow models (beta ~ 1).
    Gradients flow to all four inputs (pass detached reference MSEs).
    """
    _check_float("model_mse_w", model_mse_w, 1, "[B]")
    for name, t in (("model_mse_l", model_mse_l), ("ref_mse_w", ref_mse_w), ("ref_mse_l", ref_mse_l)):
        _check_like(name, t, model_mse_w, "model_mse_w")
    _check_positive("beta", beta)
    _check_reduction(reduction)
    acc = _acc_dtype(model_mse_w, model_mse_l, ref_mse_w, ref_mse_l)
    model_diff = model_mse_w.to(acc) - model_mse_l.to(acc)
    ref_diff = ref_mse_w.to(acc) - ref_mse_l.to(acc)
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = _reduce(-F.logsigmoid(inside), reduction)
    return DiffusionDPOLossOutput(
        loss, inside.detach(), (inside > 0).to(acc).detach(), model_diff.detach(), ref_diff.detach()
    )


class DROLossOutput(NamedTuple):
    """``loss`` and per sample the ``advantage`` ``mse - ref_mse`` it weighs by the reward."""

    loss: torch.Tensor
    advantage: torch.Tensor


@keyword_only("beta")
def dro_loss(
    model_mse: torch.Tensor,
    ref_mse: torch.Tensor | None,
    reward: torch.Tensor,
    *,
    beta: float = 1.0,
    reduction: str = "mean",
) -> DROLossOutput:
    r"""DSO's direct reward optimisation (DRO, Li et al. 2025) for diffusion / flow models, unpaired.

    ``model_mse`` [B] per-sample denoising (flow-matching) losses, ``reward`` [B] the feedback:
    ``+1`` for a desirable (e.g. simulator-stable) sample, ``-1`` for an undesirable one, or any real
    weight. Per sample::

        loss_i = beta * reward_i * (model_mse_i - ref_mse_i)      (ref_mse None: 0)

    i.e. lower the denoising loss (raise the likelihood) of desirable samples and raise it on undesirable
    ones, with no pairing. Source: the DSO abstract (seeds) names DRO but gives no formula; this is the
    objective of the authors' released code (``RuiningLi/dso``, ``finetune.py``, ``forward_dro_loss``:
    ``mean(mse_win - mse_loss)``, no reference, no beta), written per sample: on B desirable + B
    undesirable samples with ``beta=1``, their loss is ``2 * dro_loss(...).loss`` (mean) and equals it
    with ``reduction="sum"`` divided by B. ``ref_mse`` (detached) only shifts the value to 0 at the
    reference and ``beta`` only scales it: neither changes the direction of the gradient. The paper
    text's exact form (any sigmoid / reference) could not be checked here. Gradients flow to
    ``model_mse`` (and ``ref_mse`` if it requires grad).
    """
    _check_float("model_mse", model_mse, 1, "[B]")
    if ref_mse is not None:
        _check_like("ref_mse", ref_mse, model_mse, "model_mse")
    _check_like("reward", reward, model_mse, "model_mse", floating=False)
    if reward.dtype == torch.bool:
        raise AlignopsError("reward must be a float or integer tensor (+1 desirable, -1 undesirable), got torch.bool")
    _check_positive("beta", beta)
    _check_reduction(reduction)
    acc = _acc_dtype(model_mse, ref_mse)
    adv = model_mse.to(acc) if ref_mse is None else model_mse.to(acc) - ref_mse.to(acc)
    loss = _reduce(beta * reward.to(acc) * adv, reduction)
    return DROLossOutput(loss, adv.detach())
