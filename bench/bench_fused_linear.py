"""fused_linear family: the DPO step from LM-head inputs (policy loss + backward, reference forward), vs the
materialised-logits path (TRL's; the baseline) and Liger-Kernel's chunked LigerFusedLinearDPOLoss.

Targets (issue 3, CPU, fp32, 4 pairs x T=512, H=1024): peak extra memory <= 0.25x the reference and
<= 0.5x Liger; time <= 1.0x the reference and faster than Liger."""

from __future__ import annotations

import importlib.util

import torch

import alignops
from alignops.reference import preference as ref

from .common import annotate, case_maker, grad_closures, matmul_unit, nbytes

FAMILY = "fused_linear"


def groups(device: str, quick: bool):
    if quick:
        configs = [(2, 64, 128, 4000, 0.0)]
    elif device == "cuda":
        configs = [(8, 2048, 4096, 128256, 0.0), (8, 2048, 4096, 128256, 0.5)]
    else:
        configs = [(4, 512, 1024, 32000, 0.0), (4, 512, 1024, 32000, 0.5), (4, 512, 1024, 128256, 0.0)]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    liger = None
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger = LigerFusedLinearDPOLoss(beta=0.1, compiled=device == "cuda")
    backends = ["native"] if device == "cpu" else ["triton"]
    for B, T, H, V, prompt in configs:
        hidden = torch.randn(2 * B, T, H, device=device, dtype=dtype, requires_grad=True)
        ref_hidden = torch.randn(2 * B, T, H, device=device, dtype=dtype)
        weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype).requires_grad_(True)
        targets = torch.randint(0, V, (2 * B, T), device=device)
        targets[:, : int(prompt * T)] = -100

        step, reset = grad_closures(hidden, weight)
        shape = f"{B} pairs T={T} H={H} V={V} prompt={prompt:.0%}"
        case = case_maker(FAMILY, "dpo_step", shape, str(dtype).replace("torch.", ""), "fwd+bwd")
        cases = [
            case(
                "reference (TRL materialised)",
                lambda s=step, h=hidden, w=weight, t=targets, r=ref_hidden: s(
                    lambda: ref.fused_linear_preference_loss(h, w, t, r)
                ),
                baseline=True,
                reset=reset,
            )
        ]
        for b in backends:
            cases.append(
                case(
                    "alignops" if b == "native" else "alignops-triton",
                    lambda s=step, h=hidden, w=weight, t=targets, r=ref_hidden, b=b: s(
                        lambda: alignops.fused_linear_preference_loss(h, w, t, ref_hidden=r, backend=b).loss
                    ),
                    reset=reset,
                )
            )
        if liger is not None:
            cases.append(
                case(
                    "liger-kernel",
                    lambda s=step, h=hidden, w=weight, t=targets, r=ref_hidden: s(
                        lambda: liger(w, h, t, ref_input=r, ref_weight=w.detach())[0]
                    ),
                    reset=reset,
                )
            )
        # Minimum: inputs read once, the gradients of hidden and weight written once; the LM-head matmuls of
        # the scored (non-prompt) tokens: policy forward 2nHV, its backward 4nHV, the reference forward 2nHV.
        n = 2 * B * (T - int(prompt * T))
        yield annotate(
            cases,
            nbytes(hidden, ref_hidden, weight, targets) + nbytes(hidden, weight),
            8 * n * H * V,
            matmul_unit(dtype),
        )
        del cases, hidden, ref_hidden, weight, targets


def summary(results) -> list[str]:
    lines = []
    for shape in dict.fromkeys(r.shape for r in results):
        rows = {r.provider: r for r in results if r.shape == shape}
        ours = rows.get("alignops") or rows.get("alignops-triton")
        base = rows["reference (TRL materialised)"]
        line = (
            f"{shape}: time {ours.median_ms / base.median_ms:.2f}x the reference (target <= 1.0), "
            f"peak memory {ours.peak_mb / base.peak_mb:.2f}x (target <= 0.25)"
        )
        if "liger-kernel" in rows:
            lg = rows["liger-kernel"]
            line += (
                f"; {lg.median_ms / ours.median_ms:.2f}x Liger's speed (target > 1), "
                f"memory {ours.peak_mb / lg.peak_mb:.2f}x Liger's (target <= 0.5)"
            )
        lines.append(line)
    return lines
