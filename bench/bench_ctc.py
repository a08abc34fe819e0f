"""ctc family: forced_align vs torchaudio.functional.forced_align (batch-1, looped over the utterances)
and the pure-PyTorch reference. (a) a batch of utterances of 20 s (T=1000 frames, L=300 characters);
(b) single files of 5, 15 and 30 minutes at 50 frames/s and 15 characters/s, full and checkpointed.
Targets (issue 4, CPU): (a) >= 4x torchaudio; 15 min exact in <= 1 s; memory <= T*S/4 bytes in full mode
and <= 100 MB for 30 min checkpointed. GPU: (a) at 256 utterances >= 100x torchaudio's CUDA path looped."""

from __future__ import annotations

import torch

from alignops import ctc
from alignops.reference import ctc as ref

from .common import annotate, case_maker, nbytes

FAMILY = "ctc"
C = 32  # a character vocabulary (wav2vec2 / MMS-style CTC heads)


def _torchaudio():
    try:
        import torchaudio.functional as F
    except (ImportError, OSError):
        return None
    return F


def _inputs(B, T, L, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(B, T, C, generator=g) * 3).log_softmax(-1).to(device)
    tg = torch.randint(1, C, (B, L), generator=g).to(device)
    return lp, tg


def _looped(F, lp, tg):
    for b in range(lp.shape[0]):
        F.forced_align(lp[b : b + 1], tg[b : b + 1], blank=0)
    if lp.is_cuda:
        torch.cuda.synchronize()


def _work(cases, lp, tg):
    """Emissions and targets read once, paths (int64) and per-frame scores written once; about 3 fp32
    operations per trellis cell and frame (two maxes and an add over S = 2L+1 states)."""
    B, T, _ = lp.shape
    return annotate(cases, nbytes(lp, tg) + B * T * (8 + lp.element_size()), 3 * B * T * (2 * tg.shape[1] + 1))


def groups(device: str, quick: bool):
    F = _torchaudio()
    B = 4 if quick else (256 if device == "cuda" else 32)
    T, L = (200, 60) if quick else (1000, 300)
    lp, tg = _inputs(B, T, L, device)
    case = case_maker(FAMILY, "forced_align", f"B={B} T={T} L={L} C={C}", "float32", "fwd")
    cases = []
    if F is not None:
        cases.append(case(f"torchaudio {device} (looped)", lambda: _looped(F, lp, tg), baseline=True))
    cases.append(case("alignops", lambda: ctc.forced_align(lp, tg), baseline=F is None))
    if device == "cpu":
        il = torch.full((B,), T)
        tl = torch.full((B,), L)
        cases.append(case("reference (torch)", lambda: ref.forced_align(lp, tg, il, tl)))
    yield _work(cases, lp, tg)
    minutes = (0.5,) if quick else (5, 15, 30)
    for m in minutes:
        T = int(m * 60 * 50)
        L = int(m * 60 * 15)
        lp, tg = _inputs(1, T, L, device, seed=int(m * 10))
        case = case_maker(FAMILY, "forced_align", f"{m} min: T={T} L={L}", "float32", "fwd")
        cases = []
        # torchaudio's CPU kernel indexes its T*S int8 backpointers with int: past 2^31 it crashes.
        runs_torchaudio = F is not None and T * (2 * L + 1) < 2**31
        if runs_torchaudio:
            cases.append(case(f"torchaudio {device}", lambda lp=lp, tg=tg: _looped(F, lp, tg), baseline=True))
        cases.append(case("alignops full", lambda lp=lp, tg=tg: ctc.forced_align(lp, tg), baseline=not runs_torchaudio))
        cases.append(
            case("alignops checkpointed", lambda lp=lp, tg=tg: ctc.forced_align(lp, tg, memory="checkpointed"))
        )
        yield _work(cases, lp, tg)


def _frames(shape: str) -> int:
    fields = dict(f.split("=") for f in shape.replace(":", "").split() if "=" in f)
    return int(fields["T"]) * int(fields.get("B", 1))


def summary(results) -> list[str]:
    """Throughput and the issue's targets, on this run's medians and peaks."""
    lines = []
    for r in results:
        rate = _frames(r.shape) / (r.median_ms / 1e3)
        lines.append(f"{r.shape} {r.provider}: {rate / 1e6:.2f} M aligned frames/s, peak {r.peak_mb:.0f} MB")
    for r in results:
        if r.provider == "alignops" and "B=" in r.shape:
            lines.append(f"(a) {r.shape}: {r.ratio:.1f}x torchaudio looped (target >= 4x CPU, >= 100x GPU)")
        if r.provider == "alignops full" and r.shape.startswith("15 min"):
            lines.append(f"15 min exact in {r.median_ms / 1e3:.2f} s (target <= 1 s)")
        if r.provider.startswith("alignops") and " min" in r.shape:
            fields = dict(f.split("=") for f in r.shape.split() if "=" in f)
            cells = int(fields["T"]) * (2 * int(fields["L"]) + 1)
            if r.provider == "alignops full":
                lines.append(f"{r.shape} full: peak {r.peak_mb:.0f} MB vs T*S/4 = {cells / 4 / 2**20:.0f} MB")
            elif r.shape.startswith("30 min"):
                lines.append(f"{r.shape} checkpointed: peak {r.peak_mb:.0f} MB (target <= 100 MB)")
    if not any("torchaudio" in r.provider and "30 min" in r.shape for r in results) and any(
        "30 min" in r.shape for r in results
    ):
        lines.append("30 min: torchaudio not run (T*S = 4.9e9 int8 backpointers, indexed with int: it crashes)")
    return lines
