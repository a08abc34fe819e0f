"""Preference objectives beyond the DPO family: ORPO, KTO, BCO, CPO / AlphaPO, TPO, RRHF, PRO, Curry-DPO
pairs, the LD-DPO and WPO helpers, Diffusion-DPO and DSO's DRO.

Each objective is a closed form over per-sequence log-probs [B] (summed over completion tokens) or, for
the ranking objectives, [B, K] candidates per prompt. They are cheap epilogues next to the LM head, so
they are plain PyTorch differentiated by autograd (no custom op). Inputs may be fp32, fp64, bf16 or fp16
(mixed dtypes allowed); everything is computed in fp32 (fp64 when any input is fp64) and the outputs
have that dtype. Formulas follow TRL (1.x; BCO from 0.19, where its trainer last lived) and the
authors' code; :mod:`alignops.reference.objectives` writes each one the obvious way and is the test
oracle.

``reduction`` is ``"mean" | "sum" | "none"`` as in torch (``"none"`` gives one loss per pair / sample /
prompt). Metric fields of the returned NamedTuples are detached.

One module per family: :mod:`.orpo`, :mod:`.kto_bco` (unpaired, with :class:`RunningMoments`),
:mod:`.reference_free` (CPO / SimPO / AlphaPO, TPO), :mod:`.ranking` (RRHF, PRO, Curry-DPO pairs),
:mod:`.length` (LD-DPO, WPO), :mod:`.diffusion` (Diffusion-DPO, DRO), :mod:`.reward_model` (Bradley-Terry,
reward centring, rating regression, HelpSteer2-Preference); what they share is in
:mod:`._common`.
"""

from .diffusion import DiffusionDPOLossOutput, DROLossOutput, diffusion_dpo_loss, dro_loss
from .kto_bco import BCOLossOutput, KTOLossOutput, RunningMoments, bco_loss, kto_loss
from .length import PairLogps, ld_logps, wpo_weights
from .orpo import ORPOLossOutput, log1mexp, orpo_loss
from .ranking import CurryPairs, PROLossOutput, RRHFLossOutput, curry_pairs, pro_loss, rrhf_loss
from .reference_free import RefFreeLossOutput, cpo_loss, tpo_loss
from .reward_model import (
    BradleyTerryLossOutput,
    HelpSteer2PreferenceOutput,
    RatingRegressionOutput,
    RewardCenteringOutput,
    bradley_terry_loss,
    helpsteer2_preference_loss,
    rating_regression_loss,
    reward_centering_loss,
)

__all__ = [
    "log1mexp",
    "orpo_loss",
    "kto_loss",
    "RunningMoments",
    "bco_loss",
    "cpo_loss",
    "tpo_loss",
    "rrhf_loss",
    "pro_loss",
    "curry_pairs",
    "ld_logps",
    "wpo_weights",
    "diffusion_dpo_loss",
    "dro_loss",
    "ORPOLossOutput",
    "KTOLossOutput",
    "BCOLossOutput",
    "RefFreeLossOutput",
    "RRHFLossOutput",
    "PROLossOutput",
    "CurryPairs",
    "PairLogps",
    "DiffusionDPOLossOutput",
    "DROLossOutput",
    "bradley_terry_loss",
    "reward_centering_loss",
    "rating_regression_loss",
    "helpsteer2_preference_loss",
    "BradleyTerryLossOutput",
    "RewardCenteringOutput",
    "RatingRegressionOutput",
    "HelpSteer2PreferenceOutput",
]
