"""Pure-PyTorch references of :mod:`alignops.objectives`: the test oracle.

Each objective is written the way TRL, the papers or the authors' code write it, in fp64, with loops
where a loop is the obvious statement (RRHF's pairs, PRO's suffixes, Curry-DPO's pairs, LD-DPO's token
positions). Losses come back as the trainers compute them (a batch mean, or per-sample terms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._errors import AlignopsError

f64 = torch.float64


def _d(t):
    return None if t is None else t.to(f64)


def orpo_loss(pc, pr, beta=0.1, chosen_lengths=None, rejected_lengths=None):
    """TRL's ORPO total ``nll - mean(beta * logsigmoid(log_odds))``; nll = token-mean CE of the chosen.

    Returns (loss, per_pair_odds_ratio_loss, log_odds, chosen_rewards, rejected_rewards). In fp64
    ``log(-expm1(x))`` is exact for every x < 0.
    """
    pc, pr = _d(pc), _d(pr)
    nc = torch.ones_like(pc) if chosen_lengths is None else _d(chosen_lengths).clamp(min=1)
    nr = torch.ones_like(pr) if rejected_lengths is None else _d(rejected_lengths).clamp(min=1)
    a, b = pc / nc, pr / nr
    log_odds = (a - b) - (torch.log(-torch.expm1(a)) - torch.log(-torch.expm1(b)))
    or_loss = -beta * F.logsigmoid(log_odds)
    nll = -pc.sum() / nc.sum()
    return nll + or_loss.mean(), or_loss, log_odds, beta * a, beta * b


def kto_kl(policy_kl_logps, ref_kl_logps):
    """TRL's z0 on one process: ``mean(policy_KL - ref_KL)`` clamped at 0."""
    return (_d(policy_kl_logps) - _d(ref_kl_logps)).mean().clamp(min=0)


def kto_loss(policy_logps, ref_logps, is_desirable, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, kl=0.0):
    """Per-sample KTO losses in the input order (Eq. 7 of the KTO paper, TRL's ``1 - sigmoid`` form)."""
    x = _d(policy_logps) - (0.0 if ref_logps is None else _d(ref_logps))
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        if bool(is_desirable[i]):
            out[i] = desirable_weight * (1 - torch.sigmoid(beta * (x[i] - kl)))
        else:
            out[i] = undesirable_weight * (1 - torch.sigmoid(beta * (kl - x[i])))
    return out, beta * x


def running_moments(batches):
    """What TRL's RunningMoments converges to after seeing ``batches``: the mean, the population variance
    and the unbiased std of all values seen (its 1e-24 initial count weighs nothing)."""
    allv = torch.cat([_d(b).reshape(-1) for b in batches])
    return allv.mean(), allv.var(unbiased=False), allv.std(unbiased=True)


def bco_loss(policy_logps, ref_logps, is_desirable, beta, delta, udm_weights=None):
    """Per-sample BCO losses for a given shift delta (TRL 0.19 ``BCOTrainer.bco_loss``)."""
    r = beta * (_d(policy_logps) - (0.0 if ref_logps is None else _d(ref_logps)))
    out = torch.empty_like(r)
    for i in range(r.shape[0]):
        if bool(is_desirable[i]):
            out[i] = -F.logsigmoid(r[i] - delta)
        else:
            w = 1.0 if udm_weights is None else _d(udm_weights)[i]
            out[i] = w * -F.logsigmoid(-(r[i] - delta))
    return out, r


def _ref_free_scores(pc, pr, chosen_lengths, rejected_lengths, average):
    pc, pr = _d(pc), _d(pr)
    if average:
        if chosen_lengths is not None:
            pc = pc / _d(chosen_lengths).clamp(min=1)
        if rejected_lengths is not None:
            pr = pr / _d(rejected_lengths).clamp(min=1)
    return pc, pr


def _ref_free_losses(logits, loss_type, beta, eps, gamma):
    if loss_type in ("simpo", "tpo-l"):
        logits = logits - gamma / beta
    if loss_type in ("sigmoid", "simpo", "tpo-l"):
        return -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise AlignopsError(loss_type)


def cpo_loss(
    pc,
    pr,
    beta=0.1,
    cpo_alpha=1.0,
    loss_type="sigmoid",
    label_smoothing=0.0,
    simpo_gamma=0.5,
    alpha=0.0,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """TRL's ``CPOTrainer``: ``losses.mean() + cpo_alpha * CE(chosen)`` (AlphaPO through ``alpha``).

    Returns (loss, per_pair_losses, chosen_rewards, rejected_rewards).
    """
    nll = -_d(pc).sum() / (_d(chosen_lengths).clamp(min=1).sum() if chosen_lengths is not None else pc.shape[0])
    sc, sr = _ref_free_scores(pc, pr, chosen_lengths, rejected_lengths, loss_type in ("ipo", "simpo"))
    if alpha != 0.0:
        sc = (1 - torch.exp(sc).pow(-alpha)) / alpha
        sr = (1 - torch.exp(sr).pow(-alpha)) / alpha
    losses = _ref_free_losses(sc - sr, loss_type, beta, label_smoothing, simpo_gamma)
    return losses.mean() + cpo_alpha * nll, losses, beta * sc, beta * sr


def tpo_loss(
    pc,
    pr,
    gold,
    beta=0.01,
    tpo_alpha=1.0,
    loss_type="sigmoid",
    label_smoothing=0.0,
    tpo_l_gamma=0.5,
    chosen_lengths=None,
    rejected_lengths=None,
    gold_lengths=None,
):
    """TRL's ``TPOTrainer``: ``per_sequence_loss.mean() + tpo_alpha * CE(gold)``; (loss, per_pair_losses)."""
    sc, sr = _ref_free_scores(pc, pr, chosen_lengths, rejected_lengths, loss_type in ("ipo", "tpo-l"))
    losses = _ref_free_losses(sc - sr, loss_type, beta, label_smoothing, tpo_l_gamma)
    n_gold = _d(gold_lengths).clamp(min=1).sum() if gold_lengths is not None else gold.shape[0]
    return losses.mean() + tpo_alpha * (-_d(gold).sum() / n_gold), losses


def rrhf_loss(logps, rewards, lengths, rank_weight=1.0, length_penalty=1.0):
    """Per-prompt RRHF losses: the authors' pair loop, and the best response's token-mean NLL."""
    logps, rewards, lengths = _d(logps), _d(rewards), _d(lengths).clamp(min=1)
    B, K = logps.shape
    out = []
    for b in range(B):
        p = logps[b] / lengths[b] ** length_penalty
        rank = logps.new_zeros(())
        for i in range(K):
            for j in range(K):
                if rewards[b, i] < rewards[b, j] and p[i] > p[j]:
                    rank = rank + (p[i] - p[j])
        best = max(range(K), key=lambda k: (float(rewards[b, k]), -k))
        out.append(rank_weight * rank - logps[b, best] / lengths[b, best])
    return torch.stack(out)


def pro_loss(scores):
    """Per-prompt PRO losses: ``-sum_k log_softmax(s[k:])[0]``."""
    s = _d(scores)
    K = s.shape[1]
    terms = [-torch.log_softmax(s[:, k:], dim=1)[:, 0] for k in range(K - 1)]
    return torch.stack(terms, dim=1).sum(1) if terms else s.new_zeros(s.shape[0])


def curry_pairs(rewards, mode="best_vs_rest"):
    """Per prompt, the list of (chosen, rejected, gap) sorted by gap descending (stable)."""
    rows = []
    for r in rewards.tolist():
        K = len(r)
        if mode == "best_vs_rest":
            best = max(range(K), key=lambda k: (r[k], -k))
            pairs = [(best, j, r[best] - r[j]) for j in range(K) if j != best]
        else:
            pairs = []
            for i in range(K):
                for j in range(i + 1, K):
                    pairs.append((i, j, r[i] - r[j]) if r[i] >= r[j] else (j, i, r[j] - r[i]))
        rows.append(sorted(pairs, key=lambda p: -p[2]))
    return rows


def ld_logps(per_token_logps, completion_mask, ld_alpha):
    """LD-DPO log-probs by walking each row's completion tokens: the first min(l_c, l_r) count fully."""
    lp = _d(per_token_logps)
    m = completion_mask.bool()
    n = lp.shape[0] // 2
    lens = m.sum(1).tolist()
    out = []
    for row in range(lp.shape[0]):
        pair = row % n
        shared = min(lens[pair], lens[pair + n])
        seen, total = 0, lp.new_zeros(())
        for t in range(lp.shape[1]):
            if m[row, t]:
                seen += 1
                total = total + (lp[row, t] if seen <= shared else ld_alpha * lp[row, t])
        out.append(total)
    out = torch.stack(out)
    return out[:n], out[n:]


def wpo_weights(per_token_logps, log_sum_sq_probs, completion_mask):
    """WPO weights exp(mean_t (logp_t - log sum_v p_v^2)) of each row; (chosen, rejected)."""
    m = completion_mask.to(f64)
    w = torch.exp(((_d(per_token_logps) - _d(log_sum_sq_probs)) * m).sum(1) / m.sum(1).clamp(min=1))
    return w.chunk(2)


def diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta):
    """diffusers' train_diffusion_dpo.py: per-pair ``-logsigmoid(-beta/2 (model_diff - ref_diff))``."""
    inside = -0.5 * beta * ((_d(model_w) - _d(model_l)) - (_d(ref_w) - _d(ref_l)))
    return -F.logsigmoid(inside), inside


def dro_loss_paired(mse_win, mse_loss):
    """The DSO authors' ``forward_dro_loss`` on the two halves of a batch: ``mean(mse_win - mse_loss)``."""
    return (_d(mse_win) - _d(mse_loss)).mean()


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None, center_rewards_coefficient=None):
    """Per-pair ``log(1 + exp(-(r_c - r_r - m)))`` plus ``c * (r_c + r_r)^2``, one pair at a time (Llama 2's Eq. 2;
    TRL's centring). Returns the per-pair losses [B] in fp64; their mean is TRL's RewardTrainer loss."""
    rc, rr = _d(chosen_rewards), _d(rejected_rewards)
    out = []
    for i in range(rc.shape[0]):
        z = rc[i] - rr[i] - (0.0 if margin is None else _d(margin)[i])
        nll = torch.log1p(torch.exp(-z)) if z > -30 else -z + torch.log1p(torch.exp(z))
        centre = 0.0 if center_rewards_coefficient is None else center_rewards_coefficient * (rc[i] + rr[i]) ** 2
        out.append(nll + centre)
    return torch.stack(out) if out else rc.new_zeros(0)


def rating_regression_loss(predicted, ratings, rating_mask=None):
    """Mean squared error over the rated entries, a double loop; 0 when nothing is rated. Returns (mean, sum)."""
    p, y = _d(predicted), _d(ratings)
    total, count = p.new_zeros(()), 0
    for n in range(p.shape[0]):
        for a in range(p.shape[1]):
            if rating_mask is None or bool(rating_mask[n, a]):
                total = total + (p[n, a] - y[n, a]) ** 2
                count += 1
    return total / max(count, 1), total


def scaled_bradley_terry_loss(chosen_rewards, rejected_rewards, preference_strength=None):
    """HelpSteer2-Preference's Scaled BT per pair: the pair's BT negative log-likelihood repeated ``m`` times
    (``m`` the preference magnitude), i.e. ``m * log(1 + exp(-(r_c - r_r)))``."""
    nll = bradley_terry_loss(chosen_rewards, rejected_rewards)
    return nll if preference_strength is None else _d(preference_strength) * nll
