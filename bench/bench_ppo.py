"""ppo family: gae_advantages against TRL's PPOTrainer loop, the Python-loop reference and a vectorised
PyTorch formula, at B x T = 1e6 tokens; ppo_value_loss (PyTorch ops) against TRL's value-loss lines.

Baseline: TRL's loop (trl/trainer/ppo_trainer.py up to v1.12, transcribed: TRL 1.16 ships no PPO), run on
rewards and values zero-filled after each row's last token as TRL runs it. The vectorised formula writes
A_t = w_t^-1 * sum_{k >= t} w_k delta_k with w_k = (gamma * lam)^k as one reverse cumsum in fp64: no Python
loop, but exact only while (gamma * lam)^-T fits in fp64 (T up to ~13k at gamma * lam = 0.95), and it needs
zero-filled padding, not a general mask.
"""

from __future__ import annotations

import torch

import alignops
from alignops.reference import ppo as ref

from .common import Case, annotate, nbytes, provider_backend, providers

FAMILY = "ppo"
GAMMA, LAM = 1.0, 0.95


def trl_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """TRL PPOTrainer's loop ("6. compute advantages and returns"), on zero-filled padding."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    return advantages, returns


def vectorised_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """The same on zero-filled padding without a loop over T: a scaled reverse cumsum in fp64."""
    r, v = rewards.double(), values.double()
    next_v = torch.nn.functional.pad(v[:, 1:], (0, 1))
    delta = r + gamma * next_v - v
    w = (gamma * lam) ** torch.arange(r.shape[1], dtype=torch.float64, device=r.device)
    adv = (delta * w).flip(1).cumsum(1).flip(1) / w
    return adv.to(rewards.dtype), (adv + v).to(rewards.dtype)


def rollout(B: int, T: int, device: str):
    """Rewards (a small per-token term, a score on the last token), values, a mask with trailing padding;
    rewards and values zero-filled after the mask, as TRL has them."""
    lengths = torch.randint(T // 2, T + 1, (B,), device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    r = 0.05 * torch.randn(B, T, device=device)
    r[torch.arange(B, device=device), lengths - 1] += torch.randn(B, device=device)
    v = torch.randn(B, T, device=device)
    return r.masked_fill(~mask, 0), v.masked_fill(~mask, 0), mask


def _gae_groups(device: str, quick: bool):
    shapes = [(64, 256)] if quick else [(1000, 1000), (125, 8000)]
    for B, T in shapes:
        r, v, m = rollout(B, T, device)
        shape = f"B={B} T={T}"
        cases = [
            Case(
                FAMILY,
                "gae_advantages",
                shape,
                "float32",
                "TRL loop",
                "fwd",
                lambda r=r, v=v: trl_gae(r, v, GAMMA, LAM),
                baseline=True,
            ),
            Case(
                FAMILY,
                "gae_advantages",
                shape,
                "float32",
                "vectorised torch (fp64 cumsum)",
                "fwd",
                lambda r=r, v=v: vectorised_gae(r, v, GAMMA, LAM),
            ),
            Case(
                FAMILY,
                "gae_advantages",
                shape,
                "float32",
                "reference (Python loop)",
                "fwd",
                lambda r=r, v=v, m=m: ref.gae_advantages(r, v, m, None, GAMMA, LAM),
            ),
        ]
        for p in providers(device):
            cases.append(
                Case(
                    FAMILY,
                    "gae_advantages",
                    shape,
                    "float32",
                    p,
                    "fwd",
                    lambda r=r, v=v, m=m, b=provider_backend(p): alignops.gae_advantages(
                        r, v, m, gamma=GAMMA, lam=LAM, backend=b
                    ),
                )
            )
        # rewards, values, mask read once; advantages and returns written once. ~6 flops per token.
        yield annotate(cases, nbytes(r, v, m) + 2 * nbytes(r), 6 * B * T)
        del cases, r, v, m


def _value_loss_groups(device: str, quick: bool):
    B, T = (64, 256) if quick else (1000, 1000)
    r, old, m = rollout(B, T, device)
    returns = old + 0.3 * torch.randn_like(old)
    new = (old + 0.3 * torch.randn_like(old)).requires_grad_(True)

    def fwd_bwd(f):
        new.grad = None
        loss = f()
        loss.backward()
        return loss

    def trl():
        vpred = torch.masked_fill(new, ~m, 0)
        vpredclipped = torch.clamp(vpred, old - 0.2, old + 0.2)
        l1, l2 = torch.square(vpred - returns), torch.square(vpredclipped - returns)
        return 0.5 * (torch.max(l1, l2) * ~m).sum() / (~m).sum()

    shape = f"B={B} T={T}"
    reset = lambda: setattr(new, "grad", None)  # noqa: E731
    cases = [
        Case(
            FAMILY,
            "ppo_value_loss",
            shape,
            "float32",
            "TRL formula",
            "fwd+bwd",
            lambda: fwd_bwd(trl),
            baseline=True,
            reset=reset,
        ),
        Case(
            FAMILY,
            "ppo_value_loss",
            shape,
            "float32",
            "alignops",
            "fwd+bwd",
            lambda: fwd_bwd(lambda: alignops.ppo_value_loss(new, old, returns, m).loss),
            reset=reset,
        ),
    ]
    yield annotate(cases, nbytes(new, old, returns, m) + nbytes(new))


def groups(device: str, quick: bool):
    """Lists of cases that share inputs, built one at a time so that only one group's tensors are alive."""
    yield from _gae_groups(device, quick)
    yield from _value_loss_groups(device, quick)
