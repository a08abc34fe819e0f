"""Pure-PyTorch implicit multimodal alignment (IMA) scores: the spec and the test oracle.

Written as the IMA paper's analysis code computes them (Shukor & Cord, NeurIPS 2024, Analysing_LLMs in
mshukor/ima-lmms): explicit Python loops over layers, examples, tokens and pairs of examples, one cosine
at a time. Slow by design; :mod:`alignops.represent` is the vectorised implementation.

cos(x, y) = x . y / (max(|x|, eps) max(|y|, eps)), eps = 1e-12 (``F.normalize``'s convention: a zero
vector has cosine 0 with everything). Perceptual tokens of example b are ``perceptual_mask[b] &
attention_mask[b]``, textual tokens ``~perceptual_mask[b] & attention_mask[b]``. A term that is not
defined for an example (the example has no token of a modality it needs) is NaN, and is left out of
the dataset averages.
"""

from __future__ import annotations

import torch

from .._errors import AlignopsError

EPS = 1e-12


def _cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.dot(x, y) / (x.norm().clamp_min(EPS) * y.norm().clamp_min(EPS))


def _mean_of(values: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.stack(values).mean() if values else like.new_tensor(float("nan"))


def ima_score(
    hidden_states,
    perceptual_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    mode: str = "mean",
    layer_offset: int = 1,
    fixed_perceptual_layer: int = 0,
) -> dict:
    """Reference of :func:`alignops.represent.ima_score`; returns a dict of the same fields.

    Per example (``[L, B]`` or ``[L-k, B]``): ``cross``, ``cross_fixed``, ``token_pair``,
    ``change_perceptual``, ``change_textual``. Dataset level: ``dataset_<field>`` (mean over the examples
    where the field is defined), and ``dataset_cross_all_pairs`` / ``dataset_cross_fixed_all_pairs``:
    the mean over every pair (i, j) of examples, i with perceptual and j with textual tokens, of
    cos(mean perceptual_i, mean textual_j), by an explicit double loop. Computed in fp32 (fp64 for fp64
    inputs).
    """
    layers = list(hidden_states)
    acc = torch.float64 if layers[0].dtype == torch.float64 else torch.float32
    layers = [h.to(acc) for h in layers]
    L = len(layers)
    B, T, _ = layers[0].shape
    k = layer_offset
    f = fixed_perceptual_layer % L
    nan = layers[0].new_tensor(float("nan"))
    keep = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.cpu() != 0
    pmask = perceptual_mask.cpu()
    p_idx = [[t for t in range(T) if pmask[b, t] and keep[b, t]] for b in range(B)]
    t_idx = [[t for t in range(T) if not pmask[b, t] and keep[b, t]] for b in range(B)]

    def mean_vec(h, b, idx):
        return torch.stack([h[b, t] for t in idx]).mean(0) if idx else None

    means_p = [[mean_vec(h, b, p_idx[b]) for b in range(B)] for h in layers]
    means_t = [[mean_vec(h, b, t_idx[b]) for b in range(B)] for h in layers]

    out = {name: torch.full((L, B), float("nan"), dtype=acc) for name in ("cross", "cross_fixed", "token_pair")}
    for name in ("change_perceptual", "change_textual"):
        out[name] = torch.full((L - k, B), float("nan"), dtype=acc)
    for l, h in enumerate(layers):
        for b in range(B):
            if means_p[l][b] is None or means_t[l][b] is None:
                continue
            out["cross"][l, b] = _cos(means_p[l][b], means_t[l][b])
            out["cross_fixed"][l, b] = _cos(means_p[f][b], means_t[l][b])
            pair_cos = [_cos(h[b, i], h[b, j]) for i in p_idx[b] for j in t_idx[b]]
            pair_cos = torch.stack(pair_cos)
            if mode == "mean":
                out["token_pair"][l, b] = pair_cos.mean()
            elif mode == "max":
                out["token_pair"][l, b] = pair_cos.max()
            elif mode == "median":  # numpy's median: the mean of the two middle values for an even count
                out["token_pair"][l, b] = torch.quantile(pair_cos, 0.5)
            else:
                raise AlignopsError(f"unknown mode {mode!r}")
    for l in range(L - k):
        for b in range(B):
            for name, idx in (("change_perceptual", p_idx[b]), ("change_textual", t_idx[b])):
                if idx:
                    out[name][l, b] = torch.stack([_cos(layers[l][b, t], layers[l + k][b, t]) for t in idx]).mean()

    for name in list(out):
        per_layer = []
        for row in out[name]:
            defined = [v for v in row if not torch.isnan(v)]
            per_layer.append(_mean_of(defined, nan))
        out["dataset_" + name] = torch.stack(per_layer)
    for name, fixed in (("dataset_cross_all_pairs", False), ("dataset_cross_fixed_all_pairs", True)):
        per_layer = []
        for l in range(L):
            lp = f if fixed else l
            pairs = [
                _cos(means_p[lp][i], means_t[l][j])
                for i in range(B)
                for j in range(B)
                if means_p[lp][i] is not None and means_t[l][j] is not None
            ]
            per_layer.append(_mean_of(pairs, nan))
        out[name] = torch.stack(per_layer)
    return out


# ---- CCA, CKA, CHES: the textbook formulas, one problem at a time ------------------------------------


def cca(H1: torch.Tensor, H2: torch.Tensor, k: int | None = None, reg: float = 1e-3) -> torch.Tensor:
    """Deep CCA's correlations [k] of one pair H1 [n, d1], H2 [n, d2], as the DCCA code computes them
    (fp64, inverse square roots by ``eigh`` with autograd through it: NaN gradients at repeated eigenvalues)."""
    H1, H2 = H1.double(), H2.double()
    n = H1.shape[0]
    H1, H2 = H1 - H1.mean(0), H2 - H2.mean(0)
    S11 = H1.T @ H1 / (n - 1) + reg * torch.eye(H1.shape[1], dtype=H1.dtype)
    S22 = H2.T @ H2 / (n - 1) + reg * torch.eye(H2.shape[1], dtype=H2.dtype)
    S12 = H1.T @ H2 / (n - 1)

    def inv_sqrt(S):
        w, V = torch.linalg.eigh(S)
        return V @ torch.diag(w.rsqrt()) @ V.T

    T = inv_sqrt(S11) @ S12 @ inv_sqrt(S22)
    s = torch.linalg.svdvals(T)
    return s[: min(H1.shape[1], H2.shape[1]) if k is None else k]


def _hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012), eq. (5): the unbiased HSIC estimator (n > 3)."""
    n = K.shape[0]
    K = K - torch.diag(torch.diag(K))
    L = L - torch.diag(torch.diag(L))
    one = torch.ones(n, dtype=K.dtype)
    return (
        torch.trace(K @ L)
        + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ K @ L @ one)
    ) / (n * (n - 3))


def linear_cka(X: torch.Tensor, Y: torch.Tensor, debiased: bool = False) -> torch.Tensor:
    """Linear CKA of one pair X [n, d1], Y [n, d2] from the Gram matrices (Kornblith et al. 2019, eq. 4 with
    HSIC = tr(K H L H); debiased: Song et al.'s unbiased HSIC in numerator and both normalisers)."""
    X, Y = X.double(), Y.double()
    K, L = X @ X.T, Y @ Y.T
    if debiased:
        return _hsic_unbiased(K, L) / (_hsic_unbiased(K, K) * _hsic_unbiased(L, L)).sqrt()
    n = K.shape[0]
    H = torch.eye(n, dtype=K.dtype) - 1.0 / n
    hsic = lambda a, b: torch.trace(a @ H @ b @ H)  # noqa: E731
    return hsic(K, L) / (hsic(K, K) * hsic(L, L)).sqrt()


def ches_score(
    h_chosen: torch.Tensor,
    h_rejected: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    length_normalized: bool = False,
) -> torch.Tensor:
    """CHES (Razin et al. 2024) per pair, one pair at a time: <h+, h-> - |h+|^2 with h = sum of the response
    tokens' hidden states (divided by the response lengths when length_normalized)."""
    out = []
    for b in range(h_chosen.shape[0]):
        hp = h_chosen[b][chosen_mask[b]].double().sum(0)
        hm = h_rejected[b][rejected_mask[b]].double().sum(0)
        if length_normalized:
            hp, hm = hp / chosen_mask[b].sum(), hm / rejected_mask[b].sum()
        out.append(hp @ hm - hp @ hp)
    return torch.stack(out)
