"""watermark family: one decoding step over V = 128256 (Llama-3 vocabulary), batch 64. Baseline: a plain
torch.argmax over the logits (what an unwatermarked greedy step costs). Providers: the fused KGW greedy
step, the fused KGW logits processor (writes the processed logits), fused Gumbel sampling, and the
straightforward PyTorch implementations: the hashed words materialised as a [B, V] tensor (our reference),
the original KGW code's per-row seeded randperm green lists, and Gumbel noise from a [B, V] torch.rand.
Target (issue): processor within 1.2x of the plain argmax on the GPU; on the CPU the ratio is reported."""

from __future__ import annotations

import torch

from alignops import watermark as W
from alignops.reference import watermark as ref

from .common import Case

FAMILY = "watermark"
KEY, GAMMA, DELTA = 15485863, 0.25, 2.0


def _randperm_kgw_greedy(logits, context):
    green = ref.randperm_green(context[:, -1].cpu(), KEY, GAMMA, logits.shape[1]).to(logits.device)
    return (logits + DELTA * green.to(logits.dtype)).argmax(-1)


def _rand_gumbel(logits, gen):
    u = torch.rand(logits.shape, generator=gen, device=logits.device)
    return (logits.float() - torch.log(-torch.log(u))).argmax(-1)


def groups(device: str, quick: bool):
    B, V = (8, 32000) if quick else (64, 128256)
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    backend = "native" if device == "cpu" else "triton"
    for dtype in dtypes:
        logits = (torch.randn(B, V, device=device) * 2).to(dtype)
        context = torch.randint(0, V, (B, 1), device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        shape = f"B={B} V={V}"
        dt = str(dtype).replace("torch.", "")
        yield [
            Case(
                FAMILY,
                "decode step",
                shape,
                dt,
                "plain torch.argmax",
                "fwd",
                lambda x=logits: x.argmax(-1),
                baseline=True,
            ),
            Case(
                FAMILY,
                "decode step",
                shape,
                dt,
                f"alignops kgw_greedy ({backend})",
                "fwd",
                lambda x=logits, c=context: W.kgw_greedy(x, c, KEY, gamma=GAMMA, delta=DELTA, backend=backend),
            ),
            Case(
                FAMILY,
                "decode step",
                shape,
                dt,
                f"alignops kgw_process ({backend})",
                "fwd",
                lambda x=logits, c=context: W.kgw_process(x, c, KEY, gamma=GAMMA, delta=DELTA, backend=backend),
            ),
            Case(
                FAMILY,
                "decode step",
                shape,
                dt,
                f"alignops gumbel_sample ({backend})",
                "fwd",
                lambda x=logits, c=context: W.gumbel_sample(x, c, KEY, backend=backend),
            ),
            Case(
                FAMILY,
                "decode step",
                shape,
                dt,
                "torch kgw_process (hash tensor [B, V])",
                "fwd",
                lambda x=logits, c=context: W.kgw_process(x, c, KEY, gamma=GAMMA, delta=DELTA, backend="torch"),
            ),
            Case(
                FAMILY,
                "decode step",
                shape,
                dt,
                "torch KGW greedy (randperm green lists)",
                "fwd",
                lambda x=logits, c=context: _randperm_kgw_greedy(x, c),
            ),
            Case(
                FAMILY,
                "decode step",
                shape,
                dt,
                "torch Gumbel (torch.rand [B, V])",
                "fwd",
                lambda x=logits, g=gen: _rand_gumbel(x, g),
            ),
        ]


def summary(results) -> list[str]:
    lines = []
    for r in results:
        if r.provider.startswith("alignops"):
            slow = 1 / r.ratio
            lines.append(
                f"{r.dtype} {r.shape} {r.provider}: {slow:.2f}x the time of a plain argmax "
                f"(GPU target <= 1.2x; this run: {'cpu' if '(native)' in r.provider else 'gpu'})"
            )
    return lines
