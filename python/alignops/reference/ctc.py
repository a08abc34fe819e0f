"""Pure-PyTorch CTC forced alignment: the spec and the oracle of ``alignops.ctc.forced_align``.

The standard 2L+1 CTC trellis (blank, y_1, blank, y_2, ..., y_L, blank), max-plus over frames,
batched over utterances of different lengths (one Python step per frame, vectorised over batch and
states, full int8 backpointers: O(B T S) memory — a reference, not a fast path).
"""

from __future__ import annotations

import torch


def repeats(targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """[B] number of j in [1, L_b) with targets[b, j] == targets[b, j - 1] (each needs an extra frame)."""
    L = targets.shape[1]
    if L < 2:
        return torch.zeros(targets.shape[0], dtype=torch.long, device=targets.device)
    j = torch.arange(1, L, device=targets.device)
    same = (targets[:, 1:] == targets[:, :-1]) & (j < target_lengths[:, None])
    return same.sum(1)


def forced_align(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = 0,
    star_scores: torch.Tensor | None = None,
    star_id: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Viterbi paths of the CTC trellis: (paths [B, T] int64, scores [B, T], feasible [B] bool).

    alpha_t(s) = max(alpha_{t-1}(s), alpha_{t-1}(s-1), alpha_{t-1}(s-2) [s a token differing from
    token s-2]) + log_probs[t, label(s)], accumulated in fp32 (fp64 for fp64 input). Ties go to the
    earlier candidate in that order; the path ends on the last token unless the trailing blank is
    strictly better. scores[b, t] = the emission score of the aligned label. Targets equal to ``star_id``
    score ``star_scores[b, t]`` (when given). Frames past input_lengths: path -1, score 0; rows with
    T_b < L_b + repeats or no finite path: path -1, score -inf.
    """
    B, T, C = log_probs.shape
    L = targets.shape[1]
    S = 2 * L + 1
    dev = log_probs.device
    acc = torch.float64 if log_probs.dtype == torch.float64 else torch.float32
    lp = log_probs.to(acc)
    targets = targets.long()
    input_lengths = input_lengths.long().to(dev)
    target_lengths = target_lengths.long().to(dev)
    is_star = (targets == star_id) if star_scores is not None else torch.zeros_like(targets, dtype=torch.bool)
    labels = torch.full((B, S), blank, dtype=torch.long, device=dev)
    inside = torch.arange(L, device=dev)[None, :] < target_lengths[:, None]
    labels[:, 1::2] = torch.where(is_star | ~inside, 0, targets)  # padding may hold any value
    star_state = torch.zeros((B, S), dtype=torch.bool, device=dev)
    star_state[:, 1::2] = is_star
    skip_ok = torch.zeros((B, S), dtype=torch.bool, device=dev)
    if L > 1:
        skip_ok[:, 3::2] = targets[:, 1:] != targets[:, :-1]
    S_b = 2 * target_lengths + 1
    in_trellis = torch.arange(S, device=dev)[None, :] < S_b[:, None]
    neg = torch.tensor(float("-inf"), dtype=acc, device=dev)

    def emissions(t: int) -> torch.Tensor:
        e = lp[:, t].gather(1, labels)
        if star_scores is not None:
            e = torch.where(star_state, star_scores[:, t].to(acc)[:, None], e)
        return torch.where(in_trellis, e, neg)

    alpha = torch.full((B, S), float("-inf"), dtype=acc, device=dev)
    e0 = emissions(0) if T > 0 else alpha
    alpha[:, 0] = e0[:, 0]
    alpha[:, 1] = torch.where(target_lengths > 0, e0[:, 1], neg) if S > 1 else alpha[:, 1]
    back = torch.zeros((B, T, S), dtype=torch.int8, device=dev)
    for t in range(1, T):
        x1 = torch.cat([alpha.new_full((B, 1), float("-inf")), alpha[:, :-1]], 1)
        x2 = torch.cat([alpha.new_full((B, 2), float("-inf")), alpha[:, :-2]], 1)[:, :S]
        x2 = torch.where(skip_ok, x2, neg)
        m = alpha
        code = torch.zeros((B, S), dtype=torch.int8, device=dev)
        c1 = x1 > m
        m = torch.where(c1, x1, m)
        code[c1] = 1
        c2 = x2 > m
        m = torch.where(c2, x2, m)
        code[c2] = 2
        live = (t < input_lengths)[:, None]
        alpha = torch.where(live, m + emissions(t), alpha)
        back[:, t] = code

    paths = torch.full((B, T), -1, dtype=torch.long, device=dev)
    scores = torch.zeros((B, T), dtype=log_probs.dtype, device=dev)
    feasible = input_lengths >= target_lengths + repeats(targets, target_lengths)
    feasible &= (input_lengths > 0) | (target_lengths == 0)
    for b in range(B):
        Tb, Lb = int(input_lengths[b]), int(target_lengths[b])
        if not bool(feasible[b]) or Tb == 0:
            scores[b, :Tb] = float("-inf")
            continue
        last = 2 * Lb
        s = last if Lb == 0 or alpha[b, last] > alpha[b, last - 1] else last - 1
        if alpha[b, s] == float("-inf"):
            feasible[b] = False
            scores[b, :Tb] = float("-inf")
            continue
        for t in range(Tb - 1, -1, -1):
            is_star = bool(star_state[b, s])
            paths[b, t] = star_id if is_star else labels[b, s]
            e = star_scores[b, t] if is_star else log_probs[b, t, labels[b, s]]
            scores[b, t] = e.to(log_probs.dtype)
            s -= int(back[b, t, s])
    return paths, scores, feasible
