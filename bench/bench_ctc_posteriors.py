"""ctc_posteriors family: CTC loss forward + backward, alignops vs torch.nn.functional.ctc_loss (baseline).

Shapes of the issue: B=32, T=1000, L=300 with C=32 (characters) and C=1000 (a BPE vocabulary), and one long
utterance T=45000 (15 min at 50 fps), L=13500. fp32 log-softmax inputs. The summary reports, for every
provider, the largest deviation from 1 of an occupancy row sum, read off the gradient of the summed loss:
for normalised inputs torch's gradient (w.r.t. the logits) is exp(lp) - occupancy, so a row of occupancy
sums to 1 - sum_c grad; alignops' gradient is -occupancy, whose rows sum to -sum_c grad.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import alignops

from .common import Case

FAMILY = "ctc_posteriors"
_GRADS: dict[tuple[str, str], tuple[torch.Tensor, bool]] = {}  # (shape, provider) -> (last gradient, torch-style)


def _shapes(device: str, quick: bool):
    if quick:
        return [(4, 200, 60, 32)]
    return [(32, 1000, 300, 32), (32, 1000, 300, 1000), (1, 45000, 13500, 32)]


def groups(device: str, quick: bool):
    for B, T, L, C in _shapes(device, quick):
        lp = torch.randn(B, T, C, device=device).mul_(3).log_softmax(-1).requires_grad_()
        lp_tbc = lp.detach().transpose(0, 1).contiguous().requires_grad_()
        targets = torch.randint(1, C, (B, L), device=device)
        il = torch.full((B,), T, dtype=torch.long, device=device)
        tl = torch.full((B,), L, dtype=torch.long, device=device)
        shape = f"B={B} T={T} L={L} C={C}"

        def torch_run(shape=shape, x=lp_tbc, targets=targets, il=il, tl=tl):
            x.grad = None
            F.ctc_loss(x, targets, il, tl, reduction="sum").backward()
            _GRADS[(shape, "torch ctc_loss")] = (x.grad.transpose(0, 1), True)

        def ours_run(shape=shape, x=lp, targets=targets, il=il, tl=tl):
            x.grad = None
            alignops.ctc_loss(x, targets, il, tl, reduction="sum").backward()
            _GRADS[(shape, "alignops")] = (x.grad, False)

        yield [
            Case(
                FAMILY,
                "ctc_loss",
                shape,
                "float32",
                "torch ctc_loss",
                "fwd+bwd",
                torch_run,
                baseline=True,
                reset=lambda x=lp_tbc: setattr(x, "grad", None),
            ),
            Case(
                FAMILY,
                "ctc_loss",
                shape,
                "float32",
                "alignops",
                "fwd+bwd",
                ours_run,
                reset=lambda x=lp: setattr(x, "grad", None),
            ),
        ]


def row_sum_error(grad: torch.Tensor, torch_style: bool) -> float:
    rows = grad.double().sum(-1)
    return float((rows if torch_style else rows + 1).abs().max())


def summary(results) -> list[str]:
    lines = []
    for r in results:
        key = (r.shape, r.provider)
        if key in _GRADS:
            err = row_sum_error(*_GRADS[key])
            lines.append(
                f"{r.shape} {r.provider}: max |occupancy row sum - 1| = {err:.2e}; "
                f"{r.ratio:.2f}x torch's speed, peak {r.peak_mb:.0f} MB"
            )
    lines.append(
        "target: rows sum to 1 within 1e-4 (fp32 inputs); alignops accumulates alpha/beta in fp64 (log domain)"
    )
    _GRADS.clear()
    return lines
