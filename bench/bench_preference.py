"""preference family: selective_logprobs vs torch log_softmax + gather, and the loss epilogue vs the
reference and Liger-Kernel's loss functions.

Baselines: plain ``torch.log_softmax(logits.float()).gather`` for selective_logprobs, and the pure-PyTorch
reference (alignops.reference.preference, TRL's formulas) for the loss epilogue.
"""

from __future__ import annotations

import importlib.util

import torch

import alignops
from alignops.reference import preference as ref

from .common import annotate, case_maker, nbytes, provider_backend, providers

FAMILY = "preference"


def _log_softmax_gather(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What TRL and most training code do: fp32 log_softmax over the vocabulary, then gather."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _selective_groups(device: str, quick: bool):
    if quick:
        shapes = [(256, 32000, "fwd"), (256, 32000, "fwd+bwd")]
    elif device == "cuda":
        shapes = [(8192, 32000, "fwd"), (8192, 128256, "fwd"), (8192, 32000, "fwd+bwd"), (8192, 128256, "fwd+bwd")]
    else:
        shapes = [(8192, 32000, "fwd"), (8192, 128256, "fwd"), (8192, 32000, "fwd+bwd")]
    for N, V, mode in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            cases = []
            logits = torch.randn(N, V, device=device).mul_(4).to(dtype).requires_grad_(mode == "fwd+bwd")
            targets = torch.randint(0, V, (N,), device=device)
            g = torch.randn(N, device=device)

            def run(f, logits=logits, targets=targets, g=g, mode=mode):
                if mode == "fwd":
                    with torch.no_grad():
                        return f(logits, targets)
                logits.grad = None
                out = f(logits, targets)
                out.backward(g)
                return logits.grad

            case = case_maker(FAMILY, "selective_logprobs", f"N={N} V={V}", str(dtype).replace("torch.", ""), mode)
            reset = lambda logits=logits: setattr(logits, "grad", None)  # noqa: E731
            cases.append(
                case("torch log_softmax+gather", lambda run=run: run(_log_softmax_gather), baseline=True, reset=reset)
            )
            for p in providers(device):
                fn = lambda x, y, b=provider_backend(p): alignops.selective_logprobs(x, y, backend=b)  # noqa: E731
                cases.append(case(p, lambda run=run, fn=fn: run(fn), reset=reset))
            # Logits and targets read once, fp32 log-probs written; backward reads g and writes the logits'
            # gradient. About 4 fp32 operations per logit forward (max, subtract, exp, add), 4 more backward.
            fwd_bwd = mode == "fwd+bwd"
            yield annotate(
                cases,
                nbytes(logits, targets) + 4 * N + fwd_bwd * (nbytes(g) + nbytes(logits)),
                (8 if fwd_bwd else 4) * N * V,
            )
            del cases, logits, targets, g, run, reset


def _loss_groups(device: str, quick: bool):
    B = 10_000 if quick else 1_000_000
    liger = importlib.util.find_spec("liger_kernel") is not None
    for loss_type in ("sigmoid", "ipo", "discopop"):
        cases = []
        base = -60 + 10 * torch.randn(B, device=device)
        inputs = [(base + o + torch.randn(B, device=device)).requires_grad_(True) for o in (0.0, -3.0, 0.5, -2.0)]
        lengths = torch.randint(1, 200, (B,), device=device).float()
        kw = dict(loss_type=loss_type, beta=0.1, chosen_lengths=lengths, rejected_lengths=lengths)

        def fwd_bwd(f, inputs=inputs):
            for t in inputs:
                t.grad = None
            loss = f(*inputs)
            loss.backward()
            return loss

        case = case_maker(FAMILY, "preference_loss", f"B={B} {loss_type}", "float32", "fwd+bwd")
        cases.append(
            case(
                "reference (TRL formulas)",
                lambda fb=fwd_bwd, kw=kw: fb(lambda *x: ref.preference_loss(*x, **kw)[0]),
                baseline=True,
            )
        )
        for p in providers(device):
            cases.append(
                case(
                    p,
                    lambda fb=fwd_bwd, kw=kw, b=provider_backend(p): fb(
                        lambda *x: alignops.preference_loss(*x, **kw, backend=b).loss
                    ),
                )
            )
        if liger and loss_type in ("sigmoid", "discopop"):  # Liger has no IPO (it needs lengths)
            from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction

            target = torch.empty(2 * B, 1, device=device)
            cases.append(
                case(
                    "liger-kernel",
                    lambda fb=fwd_bwd, lt=loss_type, target=target: fb(
                        lambda pc, pr, rc, rr: LigerFusedLinearDPOFunction.preference_loss_fn(
                            pc, pr, target, rc, rr, beta=0.1, loss_type=lt
                        )[0]
                    ),
                )
            )
        # Four log-prob vectors and the lengths read, their four gradients written (the loss is a scalar).
        yield annotate(cases, 9 * 4 * B)


def groups(device: str, quick: bool):
    """Lists of cases that share inputs, built one at a time so that only one group's tensors are alive."""
    yield from _selective_groups(device, quick)
    yield from _loss_groups(device, quick)
