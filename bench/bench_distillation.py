"""distillation family: fused_linear_distillation_loss (generalised JSD from both LM heads, fwd+bwd) against
TRL 1.16's chunked divergence (``_chunked_divergence_loss``, called as DistillationTrainer calls it: hidden
states and LM heads, logits computed chunk by chunk inside) and Liger-Kernel's LigerFusedLinearJSDLoss
(compiled=False on the CPU, soft loss only).

Baseline: TRL. Shapes: 8 sequences x 256 completion tokens, H = 1024, V = 32000, fp32, beta = 0.5.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import torch

import alignops

from .common import Case, annotate, nbytes

FAMILY = "distillation"


def _trl_chunked_divergence_loss():
    """TRL's loss function. transformers imports the Hub's ``kernels`` package when it is installed; this
    repository's ``kernels/`` folder, on sys.path when the bench runs from the root, would shadow it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved_path, saved_module = sys.path[:], sys.modules.pop("kernels", None)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != root]
    try:
        return importlib.import_module("trl.trainer.distillation_trainer")._chunked_divergence_loss
    finally:
        sys.path[:] = saved_path
        if saved_module is not None:
            sys.modules["kernels"] = saved_module


def _groups(device: str, quick: bool):
    B, T, H, V = (2, 64, 256, 8000) if quick else (8, 256, 1024, 32000)
    beta = 0.5
    sh = (torch.randn(B, T, H, device=device) * 0.5).requires_grad_()
    sw = (torch.randn(V, H, device=device) / H**0.5).requires_grad_()
    th = torch.randn(B, T, H, device=device) * 0.5
    tw = torch.randn(V, H, device=device) / H**0.5
    mask = torch.ones(B, T, dtype=torch.long, device=device)

    def fwd_bwd(f):
        sh.grad = sw.grad = None
        loss = f()
        loss.backward()
        return loss

    def reset():
        sh.grad = sw.grad = None

    shape = f"B={B} T={T} H={H} V={V} beta={beta}"
    cases = []
    if importlib.util.find_spec("trl") is not None:
        _chunked_divergence_loss = _trl_chunked_divergence_loss()
        cases.append(
            Case(
                FAMILY,
                "fused_linear_distillation",
                shape,
                "float32",
                "trl chunked_divergence",
                "fwd+bwd",
                lambda: fwd_bwd(lambda: _chunked_divergence_loss(sh, th, sw, tw, mask, beta)[0]),
                baseline=True,
                reset=reset,
            )
        )
    cases.append(
        Case(
            FAMILY,
            "fused_linear_distillation",
            shape,
            "float32",
            "alignops",
            "fwd+bwd",
            lambda: fwd_bwd(lambda: alignops.fused_linear_distillation_loss(sh, sw, th, tw, mask, beta=beta).loss),
            baseline=not cases,
            reset=reset,
        )
    )
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=device == "cuda"
        )
        labels = torch.zeros(B * T, dtype=torch.long, device=device)
        cases.append(
            Case(
                FAMILY,
                "fused_linear_distillation",
                shape,
                "float32",
                "liger-kernel",
                "fwd+bwd",
                lambda: fwd_bwd(lambda: liger(sh.reshape(-1, H), sw, th.reshape(-1, H), tw, labels)),
                reset=reset,
            )
        )
    # Both heads and hidden states read, the student's gradients written; two [N, V] GEMMs forward and two
    # backward (grad_hidden, grad_weight).
    yield annotate(cases, nbytes(sh, sw, th, tw) + nbytes(sh, sw), 4 * 2 * B * T * H * V)


def groups(device: str, quick: bool):
    yield from _groups(device, quick)
