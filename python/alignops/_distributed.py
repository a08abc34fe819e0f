"""Sharded LM-head weights (FSDP2, tensor parallelism) for the fused LM-head losses.

The fused losses take the LM head's weight outside the head's ``forward`` (the model body returns hidden
states, the loss reads ``lm_head.weight``), so FSDP2's pre-forward all-gather never runs for it and the
weight arrives as a sharded ``DTensor``. The custom ops take plain tensors: :func:`gathered_weight` turns the
DTensor into the full weight once per loss call, before any vocabulary tile, and routes its gradient back
to the shards.
"""

from __future__ import annotations

import sys

import torch

from ._errors import AlignopsError


def is_dtensor(t: object) -> bool:
    # torch.distributed.tensor takes seconds to import; until something has imported it no tensor is a DTensor
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def gathered_weight(weight: torch.Tensor | None, name: str) -> torch.Tensor | None:
    r"""``weight`` as a plain tensor: a plain tensor (or None) unchanged; a ``DTensor`` whose placements are
    all ``Shard`` / ``Replicate`` (FSDP2's ``Shard(0)``, HSDP's ``(Replicate(), Shard(0))``, a vocabulary-
    or hidden-sharded tensor-parallel head) all-gathered to the full [V, H] tensor on every rank.

    The gather is differentiable: the full weight's gradient is a per-rank partial, averaged over the mesh
    and reduce-scattered back to the shards (``Partial("avg")`` -> the weight's placements), the averaging
    that FSDP2 and DDP apply to every other parameter (each rank's loss is the mean over its own batch).
    Tensor-parallel ranks see the same batch, so their average is the gradient itself.

    Raises AlignopsError for a DTensor with a ``Partial`` placement (an unreduced sum is not a parameter).
    """
    if not is_dtensor(weight):
        return weight
    from torch.distributed.tensor import Partial, Replicate, Shard

    placements = tuple(weight.placements)
    if not all(isinstance(p, (Shard, Replicate)) for p in placements):
        raise AlignopsError(
            f"{name} is a DTensor with placements {placements}: the fused LM-head losses gather "
            f"a Shard or Replicate weight (FSDP2, HSDP, tensor parallel), not a Partial one; "
            f"reduce it first ({name}.redistribute(placements=[Replicate()]))"
        )
    full = weight.redistribute(weight.device_mesh, [Replicate()] * len(placements))
    return full.to_local(grad_placements=[Partial("avg")] * len(placements))


def gathered_frozen(**heads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """:func:`gathered_weight` of each named tensor (in order) under no_grad: a frozen model's head (a teacher,
    a reference) is not trained, so its gather needs no backward."""
    with torch.no_grad():
        return tuple(gathered_weight(t, name) for name, t in heads.items())


def refuse_dtensor(fn: str, **named: torch.Tensor | None) -> None:
    """Raise AlignopsError naming the first DTensor among ``named``: hidden states, targets and masks are this
    rank's local batch, plain tensors (an obscure "mixed torch.Tensor and DTensor" dispatch error otherwise)."""
    for name, t in named.items():
        if is_dtensor(t):
            raise AlignopsError(
                f"{fn}: {name} is a DTensor with placements {tuple(t.placements)}; only the LM "
                f"head's weight and bias may be DTensors. Pass this rank's local batch as a plain "
                f"tensor ({name}.to_local() or {name}.full_tensor())"
            )
