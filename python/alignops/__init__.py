"""alignops: fused, tested PyTorch kernels for alignment work.

Three ways in: the functional API (``alignops.preference_loss``), ``nn.Module`` wrappers
(``alignops.nn``) and the raw ops (``torch.ops.alignops.*``). ``alignops info`` lists the
compiled backends.
"""

# isort: skip_file
# (the order below is load order: torch, then _C, then the modules that register against its schemas)
import torch  # noqa: F401  (libc10 must be loaded before the extension)

# _C registers the torch.ops.alignops schemas and kernels; _torch_check loads it only after comparing the running
# torch with the one it was built against (under another torch the load fails with an undefined symbol).
from ._torch_check import _C  # noqa: F401
from ._errors import AlignopsError
from . import ops  # noqa: F401  (autograd, fake kernels and Triton ops)
from .fused_linear import (
    FusedLinearLogprobs,
    FusedLinearPreferenceOutput,
    fused_linear_logprobs,
    fused_linear_preference_loss,
    fused_linear_sequence_logprobs,
)
from .preference import (
    LOSS_TYPES,
    PreferenceLossOutput,
    preference_loss,
    selective_logprobs,
    sequence_logprobs,
)
from . import ctc, ima, nn, objectives, ot, reference, represent, similarity, skip
from .distillation import DistillationOutput, fused_linear_distillation_loss, topk_distillation_loss
from .fused_linear_policy import FusedLinearPolicyOutput, fused_linear_policy_loss
from .objectives import (
    RunningMoments,
    bco_loss,
    bradley_terry_loss,
    cpo_loss,
    curry_pairs,
    diffusion_dpo_loss,
    dro_loss,
    helpsteer2_preference_loss,
    kto_loss,
    ld_logps,
    log1mexp,
    orpo_loss,
    pro_loss,
    rating_regression_loss,
    reward_centering_loss,
    rrhf_loss,
    tpo_loss,
    wpo_weights,
)
from .ima import IMACollector, IMADatasetScore, IMAScore, ima_score
from .similarity import cca, cca_loss, ches_score, linear_cka
from .skip import skip_ffn
from . import metrics, rewards, wasserstein, watermark
from .wasserstein import gaussian_w2, sliced_wasserstein, wasserstein_1d

__version__ = "0.1.0"

__all__ = [
    "AlignopsError",
    "LOSS_TYPES",
    "PreferenceLossOutput",
    "FusedLinearLogprobs",
    "FusedLinearPreferenceOutput",
    "fused_linear_logprobs",
    "DistillationOutput",
    "fused_linear_distillation_loss",
    "topk_distillation_loss",
    "FusedLinearPolicyOutput",
    "fused_linear_policy_loss",
    "fused_linear_preference_loss",
    "fused_linear_sequence_logprobs",
    "preference_loss",
    "selective_logprobs",
    "sequence_logprobs",
    "skip_ffn",
    "ima_score",
    "IMACollector",
    "IMAScore",
    "IMADatasetScore",
    "RunningMoments",
    "bco_loss",
    "cpo_loss",
    "curry_pairs",
    "diffusion_dpo_loss",
    "dro_loss",
    "kto_loss",
    "ld_logps",
    "log1mexp",
    "orpo_loss",
    "pro_loss",
    "rrhf_loss",
    "tpo_loss",
    "wpo_weights",
    "bradley_terry_loss",
    "reward_centering_loss",
    "rating_regression_loss",
    "helpsteer2_preference_loss",
    "ctc",
    "nn",
    "objectives",
    "ot",
    "represent",
    "ima",
    "similarity",
    "skip",
    "reference",
    "wasserstein",
    "wasserstein_1d",
    "sliced_wasserstein",
    "gaussian_w2",
    "cca",
    "cca_loss",
    "linear_cka",
    "ches_score",
    "metrics",
    "rewards",
    "watermark",
]

# The CTC functions live in alignops.ctc (alignops.ctc_posteriors / ctc_segmentation stay modules).
from .ctc import ctc_loss, forced_align, pseudo_forced_align

__all__ += ["ctc_loss", "forced_align", "pseudo_forced_align"]

from . import ppo  # noqa: E402
from .ppo import GAEOutput, ValueLossOutput, gae_advantages, ppo_value_loss  # noqa: E402

__all__ += ["ppo", "GAEOutput", "ValueLossOutput", "gae_advantages", "ppo_value_loss"]

from . import policy  # noqa: E402
from .policy import PolicyLossOutput, policy_loss  # noqa: E402

__all__ += ["policy", "PolicyLossOutput", "policy_loss"]

from . import adpa  # noqa: E402
from .adpa import ADPAOutput, DCKDOutput, adpa_loss, dckd_loss  # noqa: E402

__all__ += ["adpa", "ADPAOutput", "DCKDOutput", "adpa_loss", "dckd_loss"]
