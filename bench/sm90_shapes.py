"""The launches the bench and real users make on a GPU, recorded for the compile gate without running them.

``record()`` calls every Triton launch helper of kernels/ on empty CPU tensors of the bench's shapes, with
kernels/_launch.py in dry-run mode: the helpers choose their GPU tiles, warps and stages as on a device, and
each launch is written to ALIGNOPS_TRITON_CAPTURE instead of running. Shapes: Sinkhorn 64^2 / 512^2 /
8192^2 (one tile, tiled, split) in fp32 and fp64, point clouds; V = 32000 and 128256 at H = 4096; skip_ffn at
H = 4096, I = 11008 in fp32 / bf16 / fp16 / fp64; CTC at 15 minutes of speech; GRPO micro-batches of 8 x 4096
and 64 x 1024 tokens for the policy loss; the other families' bench sizes. Nothing here is timed or checked: the
gate compiles what is recorded.
"""

from __future__ import annotations

import torch

from .._codes import PolicyLossType, RowStat
from ..kernels import (
    _launch,
    ctc,
    ctc_segmentation,
    fused_linear,
    metrics,
    ot,
    policy,
    preference,
    skip,
    wasserstein,
    watermark,
)

_HALF = (torch.bfloat16, torch.float16)


def _e(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype)


def _ot() -> None:
    for dtype in (torch.float32, torch.float64):
        for B, N, M in ((1024, 64, 64), (64, 512, 512), (256, 100, 300), (1, 8192, 8192), (2, 3000, 5000)):
            cost = _e(1, 1, 1, dtype=dtype).expand(B, N, M)  # never read: a view of one element
            f, g, scratch = _e(B, N, dtype=dtype), _e(B, M, dtype=dtype), _e(B, M, dtype=dtype)
            sizes = (torch.full((B,), N), torch.full((B,), M))
            iters, err = torch.empty(B, dtype=torch.int64), _e(B, dtype=dtype)
            a, b = _e(B, N, dtype=dtype), _e(B, M, dtype=dtype)
            # Both launchers take the same arguments but n_iters: the split path's eps_t holds n_iters + 1 entries
            # (the 3 passed below), the one-launch kernel's schedule the K = 2 scaling steps then eps.
            if ot.use_split(torch.device("cuda"), B, N, M):
                launch, n_iters = ot.launch_sinkhorn_split, 2
            else:
                launch, n_iters = ot.launch_sinkhorn, 50
            for points in (None, (_e(B, N, 64, dtype=dtype), _e(B, M, 64, dtype=dtype))):
                launch(
                    cost,
                    a,
                    b,
                    *sizes,
                    _e(3, dtype=dtype),
                    2,
                    n_iters,
                    1e-4,
                    False,
                    f,
                    g,
                    scratch,
                    iters,
                    err,
                    points=points,
                )
        L, N, M = 3, 20000, 1000
        ot.launch_normalize_pass(
            _e(1, 1, 1, dtype=dtype).expand(L, N, M),
            _e(L, M, dtype=dtype),
            20.0,
            True,
            _e(L, N, dtype=dtype),
            _e(L, M, dtype=dtype),
        )


def _preference() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        acc = torch.float32
        B = 1_000_000
        lp = [_e(B, dtype=dtype) for _ in range(4)]
        outs = [_e(B, dtype=acc) for _ in range(3)]
        for terms, lengths in (((0,), False), ((2,), True), ((12,), False), ((0, 3), False)):
            ln = _e(B, dtype=acc) if lengths else None
            preference.launch_preference_loss(
                *lp,
                None,
                ln,
                ln,
                *outs,
                _e(4, B, dtype=acc),
                tuple((c, 1.0) for c in terms),
                0.1,
                0.0,
                0.0,
                0.05,
                0,
                0.5,
            )
        for V in (32000, 128256):
            N = 4096
            logits, t = _e(N, V, dtype=dtype), torch.empty(N, dtype=torch.int64)
            preference.launch_selective_logprobs_forward(logits, t, _e(N), _e(N), -100, 1.0)
            preference.launch_selective_logprobs_backward(_e(N), _e(N), logits, t, _e(N, V, dtype=dtype), -100, 1.0)


def _fused_linear() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for V, H in ((32000, 1024), (128256, 4096)):
            # few rows: the host-side GEMMs run on the CPU here; the tile width depends on max(N, H)
            N = 16
            h, w, t = _e(N, H, dtype=dtype), _e(V, H, dtype=dtype), torch.zeros(N, dtype=torch.int64)
            for softcap, entropy in ((0.0, False), (30.0, True)):
                fused_linear.launch_fused_linear_forward(
                    h, w, t, None, _e(N), _e(N), _e(N if entropy else 0), -100, 1.0, 1.0, softcap
                )
                fused_linear.launch_fused_linear_backward(
                    _e(N),
                    h,
                    w,
                    t,
                    None,
                    _e(N),
                    _e(N, H, dtype=dtype),
                    _e(V, H, dtype=dtype),
                    _e(0),
                    -100,
                    1.0,
                    1.0,
                    softcap,
                )


def _skip() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for N, H, I in ((650, 4096, 11008), (650, 2048, 5632), (2_000_000, 64, 128)):
            for activation in (0, 1):
                G = 2 * I if activation == 0 else I
                x = _e(N, H, dtype=dtype)
                for save, norm in ((True, True), (False, False)):
                    skip.launch_skip_ffn(
                        x,
                        torch.empty(N, dtype=torch.uint8),
                        _e(G, H, dtype=dtype),
                        _e(H, I, dtype=dtype),
                        _e(H, dtype=dtype) if norm else None,
                        None,
                        None,
                        activation,
                        1e-6,
                        _e(N, H, dtype=dtype),
                        torch.empty(N, dtype=torch.int64),
                        torch.empty(1, dtype=torch.int64),
                        _e(N if save else 0, dtype=acc),
                        _e(N if save else 0, G, dtype=dtype),
                        _e(N, H, dtype=dtype),
                        _e(N, I, dtype=dtype),
                    )
        for criterion in (0, 1):
            skip.launch_add_score(
                _e(650, 4096, dtype=dtype),
                _e(650, 4096, dtype=dtype),
                criterion,
                _e(650, 4096, dtype=dtype),
                _e(650, dtype=acc),
            )


def _ctc() -> None:
    for dtype, acc in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        for B, T, L, C in ((32, 1000, 300, 32), (1, 45000, 13500, 32), (256, 500, 150, 1000)):
            ctc.launch_ctc_posteriors(
                _e(B, T, C, dtype=dtype),
                torch.empty(B, L, dtype=torch.int64),
                torch.empty(B, dtype=torch.int64),
                torch.empty(B, dtype=torch.int64),
                0,
                acc,
            )
    for window in (35, 400):
        ctc_segmentation.launch_utterance_score(
            _e(4, 15000, dtype=torch.float64),
            torch.empty(4, 145, dtype=torch.int64),
            torch.empty(4, 145, dtype=torch.int64),
            window,
            _e(4, 145, dtype=torch.float64),
        )


def _others() -> None:
    for dtype in (torch.float32, torch.float64):
        for n, m in ((1024, 1024), (100, 3000)):
            B = 4096
            xu, cu, xv, cv = _e(B, n, dtype=dtype), _e(B, n, dtype=dtype), _e(B, m, dtype=dtype), _e(B, m, dtype=dtype)
            for p in (1.0, 2.0, 1.5):
                wasserstein.launch_merge(xu, cu, xv, cv, p, _e(B, dtype=dtype))
                wasserstein.launch_merge(xu, cu, xv, cv, p, _e(B, n + m, dtype=dtype), g=_e(B, dtype=dtype))
    for C in (2, 5, 16):
        metrics.launch_bootstrap_confusion(
            torch.empty(1000, 10000, dtype=torch.int64),
            torch.empty(1, 10000, dtype=torch.int64),
            torch.empty(1000, 1001, C, C, dtype=torch.int32),
            C,
            12345,
        )
    for dtype in (torch.float32, torch.bfloat16):
        B, V = 64, 128256
        x, ctx = _e(B, V, dtype=dtype), torch.empty(B, 4, dtype=torch.int64)
        watermark.launch_kgw_logits(x, ctx, _e(B, V, dtype=dtype), 15485863, 2**31, 2.0)
        watermark.launch_kgw_argmax(x, ctx, torch.empty(B, dtype=torch.int64), 15485863, 2**31, 2.0)
        watermark.launch_gumbel_argmax(x, ctx, torch.empty(B, dtype=torch.int64), 15485863, 1.0)


def _policy() -> None:
    # TRL GRPO micro-batches: 8 x 4096 and 64 x 1024 tokens; bf16 / fp32 log-probs (fp32 arithmetic) and fp64; the
    # configurations TRL users run: dapo token-level (the default), grpo sequence-level (GSPO) with the KL term,
    # vLLM IS ratios and the off-policy mask, cispo / sapo, vespo with token advantages, the no-gradient forward.
    P = PolicyLossType
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for B, T in ((8, 4096), (64, 1024)):
            lp, full, mask = _e(B, T, dtype=dtype), _e(B, T, dtype=acc), torch.empty(B, T, dtype=torch.uint8)
            rows, stats = _e(B, dtype=acc), _e(B, RowStat.NUM_ROW_STATS, dtype=acc)
            cases = (
                dict(loss_type=P.DAPO, sequence=False, adv=rows, isr=None, beta=0.0, opm=None, em=None, grad=True),
                dict(loss_type=P.GRPO, sequence=True, adv=rows, isr=full, beta=0.04, opm=0.5, em=full, grad=True),
                dict(loss_type=P.CISPO, sequence=False, adv=rows, isr=rows, beta=0.04, opm=None, em=None, grad=True),
                dict(loss_type=P.SAPO, sequence=False, adv=full, isr=None, beta=0.0, opm=0.5, em=None, grad=True),
                dict(loss_type=P.VESPO, sequence=False, adv=full, isr=full, beta=0.0, opm=None, em=None, grad=True),
                dict(loss_type=P.DAPO, sequence=False, adv=rows, isr=None, beta=0.04, opm=None, em=None, grad=False),
            )
            for c in cases:
                policy.launch_policy_loss(
                    lp, c["adv"], mask, full, full, c["isr"], full, c["em"], lp if c["grad"] else None, stats,
                    loss_type=c["loss_type"], sequence=c["sequence"], epsilon_low=0.2, epsilon_high=0.28,
                    delta=1.5 if c["sequence"] else None, beta=c["beta"], use_bias_correction_kl=True,
                    off_policy_mask_threshold=c["opm"], sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                    vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
                )  # fmt: skip


def record(path: str) -> None:
    """Append the GPU launches of every family at the bench's shapes to the capture file ``path``."""
    _launch._CAPTURE, _launch._dry_run = path, True
    try:
        for family in (_ot, _preference, _fused_linear, _skip, _ctc, _policy, _others):
            family()
    finally:
        _launch._dry_run = False
