"""fused_linear_policy family: one GRPO step from hidden states (policy loss + backward to hidden and the LM head,
the reference model's forward under no_grad, beta = 0.04, dapo) against the materialised path (TRL's: [B, T, V]
logits, log_softmax + gather, entropy_from_logits, then TRL 1.16's loss; the baseline) and Liger-Kernel's chunked
LigerFusedLinearGRPOLoss (compiled=False on the CPU, as in the other CPU rows).

Targets (issue 14, CPU, fp32, 8 sequences x T=256 completion tokens, H=1024, V=32000, dapo): peak extra memory
<= 0.5x Liger's and time <= 1.0x Liger's."""

from __future__ import annotations

import importlib.util

import torch

import alignops
from alignops.reference.policy import policy_loss

from .common import annotate, case_maker, grad_closures, matmul_unit, nbytes

FAMILY = "fused_linear_policy"
BETA = 0.04


def _materialised(hidden, weight, ids, mask, adv, old, ref_hidden):
    """TRL's path: full logits, selective log-softmax, entropies (no grad), the reference's log-probs (no grad)."""
    logits = hidden @ weight.t()
    logp = torch.log_softmax(logits, -1)
    per_token = logp.gather(-1, ids[..., None]).squeeze(-1)
    with torch.no_grad():
        _entropies = -(logp.exp() * logp).sum(-1)
        ref = torch.log_softmax(ref_hidden @ weight.t(), -1).gather(-1, ids[..., None]).squeeze(-1)
    return policy_loss(
        per_token,
        adv,
        mask,
        old_per_token_logps=old,
        ref_per_token_logps=ref,
        beta=BETA,
        loss_type="dapo",
        epsilon_high=0.28,
    )[0]


def groups(device: str, quick: bool):
    if quick:
        configs = [(2, 64, 128, 4000)]
    elif device == "cuda":
        configs = [(8, 1024, 4096, 128256)]
    else:
        configs = [(8, 256, 1024, 32000)]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    liger = None
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(
            beta=BETA, loss_type="dapo", epsilon_high=0.28, use_ref_model=True, compiled=device == "cuda"
        )
    backends = ["native"] if device == "cpu" else ["triton"]
    for B, T, H, V in configs:
        hidden = torch.randn(B, T, H, device=device, dtype=dtype, requires_grad=True)
        ref_hidden = (hidden.detach() + 0.1 * torch.randn_like(hidden)).to(dtype)
        weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype).requires_grad_(True)
        ids = torch.randint(0, V, (B, T), device=device)
        mask = torch.ones(B, T, dtype=torch.long, device=device)
        mask[: B // 2, 3 * T // 4 :] = 0  # half the completions end early: padding the fused paths never touch
        adv = torch.randn(B, device=device)
        with torch.no_grad():
            old = alignops.fused_linear_logprobs(hidden.reshape(-1, H), weight, ids.reshape(-1)).logp.view(B, T)
            old = old + 0.1 * torch.randn_like(old)

        step, reset = grad_closures(hidden, weight)
        shape = f"B={B} T={T} H={H} V={V} dapo beta={BETA}"
        case = case_maker(FAMILY, "grpo_step", shape, str(dtype).replace("torch.", ""), "fwd+bwd")
        cases = [
            case(
                "reference (TRL materialised)",
                lambda s=step, h=hidden, w=weight, i=ids, m=mask, a=adv, o=old, r=ref_hidden: s(
                    lambda: _materialised(h, w, i, m, a, o, r)
                ),
                baseline=True,
                reset=reset,
            )
        ]
        for b in backends:
            cases.append(
                case(
                    "alignops" if b == "native" else "alignops-triton",
                    lambda s=step, b=b, h=hidden, w=weight, i=ids, m=mask, a=adv, o=old, r=ref_hidden: s(
                        lambda: (
                            alignops.fused_linear_policy_loss(
                                h,
                                w,
                                i,
                                a,
                                m,
                                ref_hidden=r,
                                old_per_token_logps=o,
                                beta=BETA,
                                loss_type="dapo",
                                epsilon_high=0.28,
                                backend=b,
                            ).loss
                        )
                    ),
                    reset=reset,
                )
            )
        if liger is not None:
            cases.append(
                case(
                    "liger-kernel",
                    lambda s=step, h=hidden, w=weight, i=ids, m=mask, a=adv, o=old, r=ref_hidden: s(
                        lambda: liger(h, w, i, m, a, old_per_token_logps=o, ref_input=r, ref_weight=w.detach())[0]
                    ),
                    reset=reset,
                )
            )
        # Minimum: inputs read once, the gradients of hidden and weight written once; the LM-head matmuls of the
        # completion tokens: policy forward 2nHV, its backward 4nHV, the reference forward 2nHV.
        n = int(mask.sum())
        yield annotate(
            cases,
            nbytes(hidden, ref_hidden, weight, ids, old) + nbytes(hidden, weight),
            8 * n * H * V,
            matmul_unit(dtype),
        )
        del cases, hidden, ref_hidden, weight, ids, old


def summary(results) -> list[str]:
    lines = []
    for shape in dict.fromkeys(r.shape for r in results):
        rows = {r.provider: r for r in results if r.shape == shape}
        ours = rows.get("alignops") or rows.get("alignops-triton")
        base = rows["reference (TRL materialised)"]
        line = (
            f"{shape}: time {ours.median_ms / base.median_ms:.2f}x the materialised path, "
            f"peak memory {ours.peak_mb / base.peak_mb:.2f}x"
        )
        if "liger-kernel" in rows:
            lg = rows["liger-kernel"]
            line += (
                f"; time {ours.median_ms / lg.median_ms:.2f}x Liger's (target <= 1.0), "
                f"memory {ours.peak_mb / lg.peak_mb:.2f}x Liger's (target <= 0.5)"
            )
        lines.append(line)
    return lines
