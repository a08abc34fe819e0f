"""Pure-PyTorch CTC forward-backward in fp64 log space (the spec, ``backend="torch"`` and the test oracle).

The standard 2L+1 trellis: state s of utterance b has label ``blank`` for even s and ``targets[b, (s-1)/2]``
for odd s. With ``e_t(s) = log_probs[b, t, label(s)]``:

    alpha_0(0) = e_0(0), alpha_0(1) = e_0(1)
    alpha_t(s) = logsumexp(alpha_{t-1}(s), alpha_{t-1}(s-1), [alpha_{t-1}(s-2) if label(s) != blank and
                 label(s) != label(s-2)]) + e_t(s)
    beta_{T-1}(S-1) = beta_{T-1}(S-2) = 0,  beta_t(s) = logsumexp over the successors s' of
                 (beta_{t+1}(s') + e_{t+1}(s'))
    log Z = logsumexp(alpha_{T-1}(S-1), alpha_{T-1}(S-2)),  loss = -log Z
    gamma_t(s) = exp(alpha_t(s) + beta_t(s) - log Z)   (rows sum to 1 over s)

with T = input_lengths[b], S = 2 * target_lengths[b] + 1. The scores need not be normalised: the loss is
-log of the sum over alignments of exp(sum of the aligned scores), and its exact gradient is
d loss / d log_probs[b, t, c] = -sum_{s: label(s) = c} gamma_t(s).

Unreachable states carry a large finite negative number instead of -inf, so that autograd through this
reference stays NaN-free (it is the gradcheck oracle); a log Z below half of it means "no alignment".
"""

from __future__ import annotations

import torch

_NEG = -1e30  # "log 0": finite, so that logsumexp's backward never forms -inf - -inf


def _labels(targets: torch.Tensor, target_lengths: torch.Tensor, blank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [B, S] int64, skip [B, S] bool): the state labels and the states that may be entered from s-2."""
    B, L = targets.shape
    S = 2 * L + 1
    tok = targets.long()
    tok = torch.where(torch.arange(L, device=tok.device) < target_lengths[:, None].long(), tok, blank)
    labels = torch.full((B, S), blank, dtype=torch.long, device=tok.device)
    labels[:, 1::2] = tok
    skip = torch.zeros(B, S, dtype=torch.bool, device=tok.device)
    if L > 1:
        skip[:, 3::2] = tok[:, 1:] != tok[:, :-1]
    return labels, skip


def _shift(x: torch.Tensor, k: int) -> torch.Tensor:
    """x[..., s - k] (k > 0) or x[..., s + |k|] (k < 0), filled with "log 0"."""
    pad = torch.full_like(x[..., : abs(k)], _NEG)
    return torch.cat([pad, x[..., :-k]], -1) if k > 0 else torch.cat([x[..., -k:], pad], -1)


def forward_backward(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [B] fp64, gamma [B, T, 2L+1] fp64): -log p(targets | scores) and the state occupancy.

    ``log_probs`` [B, T, C] (any float dtype; computed in fp64), ``targets`` [B, L] padded. Infeasible
    utterances get loss inf and gamma 0; frames past ``input_lengths`` and states past 2 * target_lengths + 1
    get gamma 0. Differentiable in ``log_probs`` through autograd (the gradcheck oracle).
    """
    lp = log_probs.double().clamp(min=_NEG)
    B, T, C = lp.shape
    S = 2 * targets.shape[1] + 1
    labels, skip = _labels(targets, target_lengths, blank)
    Tb = input_lengths.long().to(lp.device)
    Sb = 2 * target_lengths.long().to(lp.device) + 1
    s_idx = torch.arange(S, device=lp.device)
    live = s_idx < Sb[:, None]  # [B, S]
    em = lp.gather(2, labels[:, None, :].expand(B, T, S))  # [B, T, S]
    em = torch.where(live[:, None, :], em, _NEG)
    skip_add = torch.where(skip, 0.0, _NEG).to(lp)

    alphas = [torch.where(s_idx < 2, em[:, 0], _NEG)]
    for t in range(1, T):
        prev = alphas[-1]
        step = torch.stack([prev, _shift(prev, 1), _shift(prev, 2) + skip_add]).logsumexp(0) + em[:, t]
        alphas.append(torch.where((t < Tb)[:, None], step, prev))
    alpha = torch.stack(alphas, 1)  # [B, T, S]; frames past Tb repeat the last row

    last = alpha[torch.arange(B), (Tb - 1).clamp(min=0)]  # [B, S]
    end = (s_idx == Sb[:, None] - 1) | (s_idx == Sb[:, None] - 2)
    log_z = torch.where(end, last, _NEG).logsumexp(-1)
    log_z = torch.where(Tb > 0, log_z, torch.where(Sb == 1, 0.0, _NEG).to(lp))

    init = torch.where(end, 0.0, _NEG).to(lp)
    betas = [init.expand(B, S)]
    for t in range(T - 2, -1, -1):
        nxt = betas[-1] + em[:, t + 1]
        step = torch.stack([nxt, _shift(nxt, -1), _shift(nxt + skip_add, -2)]).logsumexp(0)
        betas.append(torch.where((t < Tb - 1)[:, None], step, init))
    beta = torch.stack(betas[::-1], 1)

    feasible = log_z > _NEG / 2
    frames = torch.arange(T, device=lp.device)[None, :, None] < Tb[:, None, None]
    gamma = torch.exp(alpha + beta - torch.where(feasible, log_z, 0.0)[:, None, None])
    gamma = torch.where(frames & live[:, None, :] & feasible[:, None, None], gamma, 0.0)
    loss = torch.where(feasible, -log_z, float("inf"))
    return loss, gamma


def token_occupancy(gamma: torch.Tensor) -> torch.Tensor:
    """[B, T, L]: the occupancy of each target token's state (the odd states); blank = 1 - the row's sum."""
    return gamma[..., 1::2]


def class_occupancy(
    gamma: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor, blank: int, num_classes: int
) -> torch.Tensor:
    """[B, T, C]: sum of gamma over the states labelled c, i.e. -d loss / d log_probs."""
    labels, _ = _labels(targets, target_lengths, blank)
    B, T, S = gamma.shape
    out = gamma.new_zeros(B, T, num_classes)
    return out.scatter_add_(2, labels[:, None, :].expand(B, T, S), gamma)


def ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="mean", zero_infinity=False):
    """torch.nn.functional.ctc_loss's semantics on batch-first [B, T, C] scores, in fp64 (autograd-capable)."""
    loss, _ = forward_backward(log_probs, targets, input_lengths, target_lengths, blank)
    if zero_infinity:
        loss = torch.where(torch.isinf(loss), 0.0, loss)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return (loss / target_lengths.to(loss).clamp(min=1)).mean()
