"""distillation family: fused_linear_distillation_loss (generalised JSD from both LM heads, fwd+bwd) against
TRL 1.16's chunked divergence (``_chunked_divergence_loss``, called as DistillationTrainer calls it: hidden
states and LM heads, logits computed chunk by chunk inside) and Liger-Kernel's LigerFusedLinearJSDLoss
(compiled=False on the CPU, soft loss only).

Baseline: TRL. Shapes: 8 sequences x 256 completion tokens, H = 1024, V = 32000, fp32, beta = 0.5 (the issue's
targets: time <= 1x TRL on the CPU, peak extra memory <= 0.5x Liger's); at V = 128256 (full plan, 2 x 256 tokens,
alignops and TRL) the extra memory beyond the student's gradients should stay a few vocabulary tiles.

The top-k teacher (offline distillation, k = 20 log-probs and ids per token, the vLLM default):
topk_distillation_loss with support="tail" against TRL's ServerDistillationTrainer forward-KL path (its own
``_compute_server_forward_kl_loss`` on the materialised student log-softmax, as the trainer calls it), and
support="teacher".
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

import alignops

from .common import annotate, case_maker, grad_closures, import_peer, nbytes

FAMILY = "distillation"


def _trl_chunked_divergence_loss():
    return import_peer("trl.trainer.distillation_trainer")._chunked_divergence_loss


def _fused_linear_distillation_group(device: str, B: int, T: int, H: int, V: int, liger: bool):
    """The fused_linear_distillation group at one shape (beta = 0.5): TRL's chunked divergence (the baseline
    when TRL is installed), alignops, and Liger-Kernel's JSD when ``liger`` and it is installed."""
    beta = 0.5
    sh = (torch.randn(B, T, H, device=device) * 0.5).requires_grad_()
    sw = (torch.randn(V, H, device=device) / H**0.5).requires_grad_()
    th = torch.randn(B, T, H, device=device) * 0.5
    tw = torch.randn(V, H, device=device) / H**0.5
    mask = torch.ones(B, T, dtype=torch.long, device=device)

    fwd_bwd, reset = grad_closures(sh, sw)

    shape = f"B={B} T={T} H={H} V={V} beta={beta}"
    case = case_maker(FAMILY, "fused_linear_distillation", shape, "float32", "fwd+bwd")
    cases = []
    if importlib.util.find_spec("trl") is not None:
        _chunked_divergence_loss = _trl_chunked_divergence_loss()
        cases.append(
            case(
                "trl chunked_divergence",
                lambda: fwd_bwd(lambda: _chunked_divergence_loss(sh, th, sw, tw, mask, beta)[0]),
                baseline=True,
                reset=reset,
            )
        )
    cases.append(
        case(
            "alignops",
            lambda: fwd_bwd(lambda: alignops.fused_linear_distillation_loss(sh, sw, th, tw, mask, beta=beta).loss),
            baseline=not cases,
            reset=reset,
        )
    )
    if liger and importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger_loss = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=device == "cuda"
        )
        labels = torch.zeros(B * T, dtype=torch.long, device=device)
        cases.append(
            case(
                "liger-kernel",
                lambda: fwd_bwd(lambda: liger_loss(sh.reshape(-1, H), sw, th.reshape(-1, H), tw, labels)),
                reset=reset,
            )
        )
    # Both heads and hidden states read, the student's gradients written; two [N, V] GEMMs forward and two
    # backward (grad_hidden, grad_weight).
    yield annotate(cases, nbytes(sh, sw, th, tw) + nbytes(sh, sw), 4 * 2 * B * T * H * V)


def _trl_server_trainer():
    return import_peer("trl.experimental.server_distillation.server_distillation_trainer").ServerDistillationTrainer


def _topk_groups(device: str, quick: bool):
    B, T, H, V, k = (2, 64, 256, 8000, 20) if quick else (8, 256, 1024, 32000, 20)
    sh = (torch.randn(B, T, H, device=device) * 0.5).requires_grad_()
    sw = (torch.randn(V, H, device=device) / H**0.5).requires_grad_()
    with torch.no_grad():  # a teacher's top-k: sharper than the student, k = 20 log-probs per token
        teacher = torch.log_softmax(torch.randn(B, T, V, device=device) * 3, -1)
        values, ids = teacher.topk(k, -1)
        del teacher
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    labels = torch.zeros(B, T, dtype=torch.long, device=device)

    fwd_bwd, reset = grad_closures(sh, sw)

    shape = f"B={B} T={T} H={H} V={V} k={k}"
    case = case_maker(FAMILY, "topk_distillation", shape, "float32", "fwd+bwd")
    cases = []
    if importlib.util.find_spec("trl") is not None:
        from types import SimpleNamespace

        trainer = _trl_server_trainer()
        stand_in = SimpleNamespace(loss_add_tail=True, _reduce_divergence_loss=trainer._reduce_divergence_loss)
        result = {"topk_logprobs": values, "topk_token_ids": ids}

        def trl_loss():
            log_ps = torch.log_softmax(sh @ sw.T, -1)  # the trainer's student log-softmax, [B, T, V]
            return trainer._compute_server_forward_kl_loss(stand_in, result, log_ps, labels)

        cases.append(case("trl server forward_kl (tail)", lambda: fwd_bwd(trl_loss), baseline=True, reset=reset))
    for support in ("tail", "teacher"):
        cases.append(
            case(
                f"alignops ({support})",
                lambda support=support: fwd_bwd(
                    lambda: alignops.topk_distillation_loss(sh, sw, values, ids, mask, support=support).loss
                ),
                baseline=not cases,
                reset=reset,
            )
        )
    # The student's head and hidden states read, the top-k read, gradients written; two GEMMs forward (the
    # logsumexp), two backward.
    yield annotate(cases, nbytes(sh, sw, values, ids) + nbytes(sh, sw), 4 * 2 * B * T * H * V)


def groups(device: str, quick: bool):
    B, T, H, V = (2, 64, 256, 8000) if quick else (8, 256, 1024, 32000)
    yield from _fused_linear_distillation_group(device, B, T, H, V, liger=True)
    yield from _topk_groups(device, quick)
    if not quick:
        # V = 128256 (Llama 3): the extra memory beyond the student's gradients should not grow with V beyond a
        # few tiles. Fewer tokens (2 x 256) keep the CPU run short: the claim is about V.
        yield from _fused_linear_distillation_group(device, 2, 256, 1024, 128256, liger=False)


def _fields(shape: str) -> dict[str, int]:
    return {k: int(v) for k, v in (f.split("=") for f in shape.split() if "=" in f) if v.isdigit()}


def summary(results) -> list[str]:
    """The issue's targets on this run's medians and peaks, and the extra memory beyond the gradients."""
    lines = []
    by = {(r.op, r.shape, r.provider): r for r in results}
    for r in results:
        if r.op != "fused_linear_distillation" or r.provider != "alignops":
            continue
        f = _fields(r.shape)
        trl = by.get((r.op, r.shape, "trl chunked_divergence"))
        liger = by.get((r.op, r.shape, "liger-kernel"))
        if trl is not None:
            lines.append(f"{r.shape}: time {r.median_ms / trl.median_ms:.2f}x TRL's chunked divergence (target <= 1x)")
        if liger is not None:
            lines.append(f"{r.shape}: peak extra memory {r.peak_mb / liger.peak_mb:.2f}x Liger's JSD (target <= 0.5x)")
        # The student's gradients (hidden states and weight, fp32) are outputs: what is left is working memory.
        grads_mb = 4 * (f["B"] * f["T"] * f["H"] + f["V"] * f["H"]) / 2**20
        lines.append(
            f"{r.shape}: peak extra {r.peak_mb:.0f} MB, of which {grads_mb:.0f} MB the student's gradients; "
            f"{r.peak_mb - grads_mb:.0f} MB working memory (one fp32 [R, V] block is ~16 MB per model)"
        )
    for r in results:
        if r.op == "topk_distillation" and r.provider.startswith("alignops"):
            base = [b for b in results if b.op == r.op and b.shape == r.shape and b.provider.startswith("trl")]
            if base:
                lines.append(
                    f"{r.shape} {r.provider}: {r.ratio:.2f}x TRL's server forward-KL speed, "
                    f"peak {r.peak_mb:.0f} MB vs TRL's {base[0].peak_mb:.0f} MB"
                )
    return lines
