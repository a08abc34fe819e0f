"""policy family: alignops.policy_loss (TRL 1.16 GRPOTrainer's loss epilogue) fwd+bwd at B x T = 1e6 tokens.

Baseline: TRL's lines of ``GRPOTrainer._compute_loss`` from the log-probs on (ratio, clip, k3 KL with the bias
correction, the loss type's normaliser) and its logged clip / KL metrics, as torch ops differentiated by autograd;
also the reference (alignops.reference.policy, the same math written as the spec). Two configurations: dapo at
token level and grpo at sequence level, both with beta = 0.04 and off-policy old log-probs.

token_entropy fwd+bwd on [N, V] logits against TRL's ``entropy_from_logits`` (its chunked log_softmax on the CPU,
its fused Triton kernel on a GPU when TRL finds triton) and the reference, in fp32 and bf16.
"""

from __future__ import annotations

import importlib.util

import torch

import alignops
from alignops.reference import policy as ref

from .common import Case, annotate, grad_closures, import_peer, nbytes, provider_backend, providers

FAMILY = "policy"
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def trl_formula(lp, old, ref_lp, adv, mask, loss_type, level):
    """GRPOTrainer._compute_loss's lines (TRL 1.16) for the clip loss types, with its metric tensors."""
    advantages = adv.unsqueeze(1)
    log_ratio = lp - old
    if level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    per_token_kl = torch.exp(ref_lp - lp) - (ref_lp - lp) - 1
    per_token_kl = per_token_kl * coef_1
    coef_2 = torch.clamp(coef_1, 1 - EPS_LOW, 1 + EPS_HIGH)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    per_token_loss = per_token_loss + BETA * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    else:
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        kl = (per_token_kl * mask).sum() / n
        low = (coef_1 < 1 - EPS_LOW) & (advantages < 0)
        high = (coef_1 > 1 + EPS_HIGH) & (advantages > 0)
        metrics = [kl]
        for flags in (low, high, low | high):
            flags = flags.float()
            metrics.append(flags.mean() if flags.shape[1] == 1 else (flags * mask).sum() / n)
    return loss, metrics


def _group(device, B, T, loss_type, level, g):
    lengths = torch.randint(T // 2, T + 1, (B,), device=device, generator=g)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    maskf = mask.float()
    base = -torch.rand(B, T, device=device, generator=g) * 3
    old = base + 0.1 * torch.randn(B, T, device=device, generator=g)
    ref_lp = base + 0.1 * torch.randn(B, T, device=device, generator=g)
    adv = torch.randn(B, device=device, generator=g)
    lp = base.requires_grad_(True)
    kw = dict(
        old_per_token_logps=old,
        ref_per_token_logps=ref_lp,
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=BETA,
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
    )

    fwd_bwd, reset = grad_closures(lp)

    def row(provider, fn, baseline=False):
        shape = f"B={B} T={T} {loss_type} {level}"
        return Case(
            FAMILY,
            "policy_loss",
            shape,
            "float32",
            provider,
            "fwd+bwd",
            lambda: fwd_bwd(fn),
            baseline=baseline,
            reset=reset,
        )

    cases = [
        row("TRL formula", lambda: trl_formula(lp, old, ref_lp, adv, maskf, loss_type, level)[0], baseline=True),
        row("reference", lambda: ref.policy_loss(lp, adv, mask, **kw)[0]),
    ]
    for p in providers(device):
        backend = "triton" if p == "alignops-triton" else "native"
        cases.append(row(p, lambda b=backend: alignops.policy_loss(lp, adv, mask, **kw, backend=b).loss))
    # lp, old, ref, mask read (twice at sequence level, counted once), the gradient written; ~40 flops a token.
    return annotate(cases, nbytes(lp, old, ref_lp, mask, adv) + nbytes(lp), 40 * B * T)


def _entropy_group(device, N, V, dtype, g):
    logits = (2 * torch.randn(N, V, device=device, generator=g)).to(dtype).requires_grad_(True)
    weights = torch.rand(N, device=device, generator=g)  # a weighted sum, so that every row gets a gradient
    fwd_bwd, reset = grad_closures(logits)
    shape, dname = f"N={N} V={V}", str(dtype).removeprefix("torch.")

    def row(provider, fn, baseline=False):
        return Case(
            FAMILY,
            "token_entropy",
            shape,
            dname,
            provider,
            "fwd+bwd",
            lambda: fwd_bwd(lambda: (fn() * weights).sum()),
            baseline=baseline,
            reset=reset,
        )

    cases = []
    if importlib.util.find_spec("trl") is not None:
        entropy_from_logits = import_peer("trl.trainer.utils").entropy_from_logits
        cases.append(row("trl entropy_from_logits", lambda: entropy_from_logits(logits), baseline=True))
    cases.append(row("reference", lambda: ref.token_entropy(logits), baseline=not cases))
    for p in providers(device):
        cases.append(row(p, lambda b=provider_backend(p): alignops.policy.token_entropy(logits, backend=b)))
    # The logits read forward and backward, their gradient written; ~6 flops an entry each way.
    return annotate(cases, 2 * nbytes(logits) + nbytes(logits), 12 * N * V)


def groups(device: str, quick: bool):
    """One group per configuration; only one group's tensors are alive at a time."""
    B, T = (64, 256) if quick else (1000, 1000)
    g = torch.Generator(device=device).manual_seed(0)
    for loss_type, level in (("dapo", "token"), ("grpo", "sequence")):
        yield _group(device, B, T, loss_type, level, g)
    N, V = (128, 32000) if quick else ((8192, 128256) if device == "cuda" else (1024, 128256))
    for dtype in (torch.float32, torch.bfloat16):
        yield _entropy_group(device, N, V, dtype, g)
