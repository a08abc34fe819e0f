"""adpa family: adpa_loss (three LM heads: student, DPO teacher, its reference; fwd+bwd) and dckd_loss (forward
KL to the teacher on chosen and rejected tokens; fwd+bwd) against the same losses written the obvious way in
PyTorch (the references in alignops.reference.adpa: every model's [N, V] logits materialised in fp32). No peer
library implements ADPA or DCKD; the paper's released trainer materialises the logits as the baseline does.

Baseline: the materialised PyTorch loss. Shapes: 4 sequences x 256 completion tokens, H = 1024, V = 32000, fp32
(quick: 2 x 64, H = 256, V = 8000).
"""

from __future__ import annotations

import torch

import alignops
from alignops.reference import adpa as ref

from .common import Case, annotate, grad_closures, nbytes

FAMILY = "adpa"


def _groups(device: str, quick: bool):
    B, T, H, V = (2, 64, 256, 8000) if quick else (4, 256, 1024, 32000)
    sh = (torch.randn(B, T, H, device=device) * 0.5).requires_grad_()
    sw = (torch.randn(V, H, device=device) / H**0.5).requires_grad_()
    th, rh = (torch.randn(B, T, H, device=device) * 0.5 for _ in range(2))
    tw, rw = (torch.randn(V, H, device=device) / H**0.5 for _ in range(2))
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    chosen = mask.clone()
    chosen[B // 2 :] = False

    fwd_bwd, reset = grad_closures(sh, sw)

    shape = f"B={B} T={T} H={H} V={V}"
    cases = [
        Case(
            FAMILY,
            "adpa_loss",
            shape,
            "float32",
            "torch materialised",
            "fwd+bwd",
            lambda: fwd_bwd(lambda: ref.adpa_loss(sh, sw, th, tw, rh, rw, mask)[0]),
            baseline=True,
            reset=reset,
        ),
        Case(
            FAMILY,
            "adpa_loss",
            shape,
            "float32",
            "alignops",
            "fwd+bwd",
            lambda: fwd_bwd(lambda: alignops.adpa_loss(sh, sw, th, tw, rh, rw, mask).loss),
            reset=reset,
        ),
    ]
    # Three heads read, the student's gradients written; three [N, V] GEMMs forward and two backward.
    yield annotate(cases, nbytes(sh, sw, th, tw, rh, rw) + nbytes(sh, sw), 5 * 2 * B * T * H * V)
    cases = [
        Case(
            FAMILY,
            "dckd_loss",
            shape,
            "float32",
            "torch materialised",
            "fwd+bwd",
            lambda: fwd_bwd(lambda: ref.dckd_loss(sh, sw, th, tw, chosen, ~chosen)[0]),
            baseline=True,
            reset=reset,
        ),
        Case(
            FAMILY,
            "dckd_loss",
            shape,
            "float32",
            "alignops",
            "fwd+bwd",
            lambda: fwd_bwd(lambda: alignops.dckd_loss(sh, sw, th, tw, chosen, ~chosen).loss),
            reset=reset,
        ),
    ]
    yield annotate(cases, nbytes(sh, sw, th, tw) + nbytes(sh, sw), 4 * 2 * B * T * H * V)


def groups(device: str, quick: bool):
    yield from _groups(device, quick)
