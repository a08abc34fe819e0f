"""The integer codes that cross from Python into the C++ and Triton kernels, one ``IntEnum`` per family.

This module is the single Python source of these numbers: the public modules, the ops' argument checks and
the Triton kernels (as ``tl.constexpr`` globals) import them from here. The C++ side keeps its own enums
(C++ cannot import Python); ``torch.ops.alignops.codes(family)`` reports them and tests/test_codes.py checks
that every C++ enum and every Triton constant has the names and values below.

Member names are the C++ enumerators without their ``k`` prefix, in upper snake case
(``kSigmoidNorm`` -> ``SIGMOID_NORM``).
"""

from __future__ import annotations

import enum


class LossType(enum.IntEnum):
    """``loss_types`` of ``alignops::preference_loss`` (csrc/preference/preference_loss_math.h).

    The public names map onto these in alignops.preference: ``"ln_dpo"`` is ``SIGMOID_NORM``, ``"aot"`` and
    ``"aot_unpaired"`` are ``AOT`` on inputs sorted there."""

    SIGMOID = 0
    HINGE = 1
    IPO = 2
    EXO_PAIR = 3
    NCA_PAIR = 4
    ROBUST = 5
    BCO_PAIR = 6
    SPPO_HARD = 7
    AOT = 8
    APO_ZERO = 9
    APO_DOWN = 10
    DISCOPOP = 11
    SIGMOID_NORM = 12
    SIMPO = 13
    CPO = 14


class FDivergence(enum.IntEnum):
    """``f_divergence`` of ``alignops::preference_loss``; the names are TRL's ``f_divergence_type`` values."""

    REVERSE_KL = 0
    FORWARD_KL = 1
    JS_DIVERGENCE = 2
    ALPHA_DIVERGENCE = 3


class Activation(enum.IntEnum):
    """``activation`` of ``alignops::skip_ffn`` / ``skip_ffn_`` (csrc/skip/skip_ffn_cpu_kernel.h)."""

    SWIGLU = 0
    GELU = 1
    GELU_TANH = 2


class Criterion(enum.IntEnum):
    """``criterion`` of ``alignops::skip_add_score``: 1 - cos(h, residual), or |h - residual| / |residual|."""

    COSINE = 0
    NORM_RATIO = 1


class CtcSegmentationFlag(enum.IntFlag):
    """Bits of ``flags`` of ``alignops::ctc_segmentation`` / ``ctc_segmentation_prefixes``
    (csrc/ctc_segmentation/ctc_segmentation_cpu_kernel.h), as the ctc-segmentation package builds them."""

    BLANK_TRANSITION_COST_ZERO = 1
    PREAMBLE_TRANSITION_COST_ZERO = 2


class PolicyLossType(enum.IntEnum):
    """``loss_type`` of ``alignops::policy_loss`` (csrc/policy/policy_codes.h): TRL GRPOConfig's loss types."""

    GRPO = 0
    BNPO = 1
    DR_GRPO = 2
    DAPO = 3
    CISPO = 4
    SAPO = 5
    LUSPO = 6
    VESPO = 7


class ImportanceSamplingLevel(enum.IntEnum):
    """``importance_sampling_level`` of ``alignops::policy_loss``: one ratio per token or one per sequence."""

    TOKEN = 0
    SEQUENCE = 1


class RowStat(enum.IntEnum):
    """The columns of ``alignops::policy_loss``'s ``row_stats`` [B, NUM_ROW_STATS] (csrc/policy/policy_codes.h)."""

    MASK_COUNT = 0
    CLIP_LOW = 1
    CLIP_HIGH = 2
    CLIP_REGION = 3
    KL = 4
    RATIO = 5
    PHI = 6
    ROW_LOSS = 7
    NUM_ROW_STATS = 8


class DistillationMode(enum.IntEnum):
    """The kernels' divergence of ``alignops::fused_linear_distillation`` (``Mode`` in
    csrc/distillation/fused_linear_distillation_cpu_kernel.h): the op takes ``divergence`` by name and ``jsd``
    with ``coef`` 0 or 1 runs as the forward or reverse KL (``parse_mode``, ``ops/distillation._mode``)."""

    FORWARD_KL = 0
    REVERSE_KL = 1
    JSD = 2
    TV = 3
    SKEW_KL = 4
    SKEW_REVERSE_KL = 5


class HashSalt(enum.IntEnum):
    """The domain-separation salts of the counter hash (``kSalt*`` in csrc/common/counter_hash.h): one key never
    yields the same stream for two purposes."""

    BOOTSTRAP = 0x13198A2E
    KGW = 0x243F6A88
    GUMBEL = 0x85A308D3


# family name of torch.ops.alignops.codes -> enum
FAMILIES: dict[str, type[enum.Enum]] = {
    "loss_type": LossType,
    "f_divergence": FDivergence,
    "activation": Activation,
    "criterion": Criterion,
    "ctc_segmentation_flag": CtcSegmentationFlag,
    "policy_loss_type": PolicyLossType,
    "importance_sampling_level": ImportanceSamplingLevel,
    "row_stat": RowStat,
    "distillation_mode": DistillationMode,
    "hash_salt": HashSalt,
}


def lower_name(code: enum.IntEnum) -> str:
    """The user-facing spelling of a code: ``LossType.SIGMOID_NORM`` -> ``"sigmoid_norm"``."""
    return code.name.lower()
