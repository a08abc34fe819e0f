"""Pure-PyTorch preference losses and selective log-probs: the spec, the CPU fallback, the test oracle.

Written the way TRL's ``DPOTrainer`` (1.x) and the papers write them, one torch expression per loss
type, differentiated by autograd; the kernels' closed-form gradients are tested against this file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._errors import AlignopsError

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def _f_score(x: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """TRL's f-divergence scores of a log-ratio x = log(pi / pi_ref)."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return x
    if kind == "forward_kl":
        return 1 - torch.exp(-x)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(x)
    if kind == "alpha_divergence":
        return (torch.exp(torch.clamp((alpha - 1.0) * x, max=80.0)) - 1.0) / (alpha - 1.0)
    raise AlignopsError(f"unknown f_divergence_type {kind!r}")


def _smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    loss_type: str | list[str] = "sigmoid",
    beta: float | torch.Tensor = 0.1,
    label_smoothing: float = 0.0,
    *,
    loss_weights: list[float] | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    gamma: float = 0.5,
    reduction: str = "mean",
):
    """Reference of :func:`alignops.preference_loss`; returns (loss, chosen_rewards, rejected_rewards).

    Computed in the accumulation dtype (fp32, or fp64 for fp64 inputs).
    """
    acc = torch.float64 if policy_chosen_logps.dtype == torch.float64 else torch.float32
    pc = policy_chosen_logps.to(acc)
    pr = policy_rejected_logps.to(acc)
    rc = torch.zeros_like(pc) if ref_chosen_logps is None else ref_chosen_logps.to(acc)
    rr = torch.zeros_like(pr) if ref_rejected_logps is None else ref_rejected_logps.to(acc)
    b = beta.to(acc) if isinstance(beta, torch.Tensor) else beta
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    nc = torch.ones_like(pc) if chosen_lengths is None else chosen_lengths.to(acc).clamp(min=1.0)
    nr = torch.ones_like(pr) if rejected_lengths is None else rejected_lengths.to(acc).clamp(min=1.0)
    eps = label_smoothing

    xc, xr = pc - rc, pr - rr
    sc = _f_score(xc, f_divergence_type, f_alpha_divergence_coef)
    sr = _f_score(xr, f_divergence_type, f_alpha_divergence_coef)
    delta = sc - sr

    total = torch.zeros_like(pc)
    for t, w in zip(types, weights, strict=True):
        if t == "sigmoid":
            loss = _smoothed_logistic(b * delta, eps)
        elif t == "hinge":
            loss = torch.relu(1 - b * delta)
        elif t == "ipo":
            loss = (sc / nc - sr / nr - 1 / (2 * b)) ** 2
        elif t == "exo_pair":
            e = torch.tensor(eps, dtype=acc)
            z = b * delta
            loss = torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-e)) + torch.sigmoid(-z) * (
                F.logsigmoid(-z) - torch.log(e)
            )
        elif t == "nca_pair":
            loss = -F.logsigmoid(b * xc) - 0.5 * F.logsigmoid(-b * xc) - 0.5 * F.logsigmoid(-b * xr)
        elif t == "robust":
            loss = (-(1 - eps) * F.logsigmoid(b * delta) + eps * F.logsigmoid(-b * delta)) / (1 - 2 * eps)
        elif t == "bco_pair":
            loss = -F.logsigmoid(b * xc) - F.logsigmoid(-b * xr)
        elif t == "sppo_hard":
            loss = (xc - 0.5 / b) ** 2 + (xr + 0.5 / b) ** 2
        elif t == "aot":
            d = torch.sort(pc - pr, stable=True).values - torch.sort(rc - rr, stable=True).values
            loss = _smoothed_logistic(b * d, eps)
        elif t == "aot_unpaired":
            d = torch.sort(xc, stable=True).values - torch.sort(xr, stable=True).values
            loss = _smoothed_logistic(b * d, eps)
        elif t == "apo_zero":
            loss = 1 - torch.sigmoid(b * xc) + torch.sigmoid(b * xr)
        elif t == "apo_down":
            loss = torch.sigmoid(b * xc) + 1 - torch.sigmoid(b * (xc - xr))
        elif t == "discopop":
            z = b * delta
            m = torch.sigmoid(z / discopop_tau)
            loss = -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m
        elif t in ("sigmoid_norm", "ln_dpo"):
            loss = -F.logsigmoid(b * (sc / nc - sr / nr))
        elif t == "simpo":
            loss = _smoothed_logistic(b * (pc / nc - pr / nr) - gamma, eps)
        elif t == "cpo":
            loss = _smoothed_logistic(b * (pc - pr), eps)
        else:
            raise AlignopsError(f"unknown loss_type {t!r}")
        total = total + w * loss

    chosen_rewards = (b * xc).detach()
    rejected_rewards = (b * xr).detach()
    if reduction == "mean":
        total = total.mean()
    elif reduction == "sum":
        total = total.sum()
    return total, chosen_rewards, rejected_rewards


def selective_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / T)[target] per row, 0 where target == ignore_index (materialises [N, V])."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets)).long()
    logp = torch.log_softmax(logits.to(acc) / temperature, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, logp, torch.zeros_like(logp))


def lm_head_logits(hidden, weight, bias=None, *, temperature=1.0, logit_scale=1.0, softcap=None):
    """The materialised [N, V] logits of :func:`fused_linear_logprobs` (fp32; fp64 for fp64 inputs)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    z = hidden.to(acc) @ weight.to(acc).t()
    if bias is not None:
        z = z + bias.to(acc)
    z = logit_scale * z
    if softcap is not None and softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def fused_linear_logprobs(
    hidden,
    weight,
    targets,
    bias=None,
    *,
    ignore_index=-100,
    temperature=1.0,
    logit_scale=1.0,
    softcap=None,
    return_entropy=False,
):
    """TRL's path: materialise the logits, log_softmax, gather (and the entropy -sum p log p)."""
    z = lm_head_logits(hidden, weight, bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    keep = targets != ignore_index
    logp_all = torch.log_softmax(z, dim=-1)
    logp = selective_logprobs(z, targets, ignore_index)
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, torch.where(keep, entropy, torch.zeros_like(entropy))


def fused_linear_preference_loss(
    hidden, weight, targets, ref_hidden, loss_type="sigmoid", beta=0.1, ignore_index=-100, **loss_options
):
    """TRL's DPO step, padded layout ([2B, T, H], chosen rows first): full logits for the policy and (without
    grad) the reference, per-sequence sums over the completion, then :func:`preference_loss` (mean)."""
    rows, T, H = hidden.shape
    keep = targets != ignore_index

    def seq(h):
        tok = fused_linear_logprobs(h.reshape(-1, H), weight, targets.reshape(-1), ignore_index=ignore_index)
        return (tok.view(rows, T) * keep).sum(-1)

    s = seq(hidden)
    with torch.no_grad():
        r = seq(ref_hidden)
    B = rows // 2
    n = keep.sum(-1)
    return preference_loss(
        s[:B], s[B:], r[:B], r[B:], loss_type, beta, chosen_lengths=n[:B], rejected_lengths=n[B:], **loss_options
    )[0]


def sequence_logprobs(
    per_token_logps: torch.Tensor,
    *,
    completion_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
):
    """Per-sequence sum, mean and token count of per-token log-probs (mask [B, T] or cu_seqlens [S+1])."""
    if completion_mask is not None:
        m = completion_mask.to(per_token_logps.dtype)
        total = (per_token_logps * m).sum(-1)
        count = completion_mask.sum(-1)
    else:
        bounds = cu_seqlens.tolist()
        total = (
            torch.stack([per_token_logps[s:e].sum() for s, e in zip(bounds[:-1], bounds[1:])])
            if len(bounds) > 1
            else per_token_logps.new_zeros(0)
        )
        count = cu_seqlens[1:] - cu_seqlens[:-1]
    return total, total / count.clamp(min=1).to(total.dtype), count
