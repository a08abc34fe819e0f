"""``nn.Module`` wrappers of the functional API (hyper-parameters held as attributes)."""

from __future__ import annotations

import torch

from ._errors import AlignopsError
from .preference import PreferenceLossOutput, preference_loss


class PreferenceLoss(torch.nn.Module):
    """Module form of :func:`alignops.preference_loss`; ``forward`` takes the four [B] log-prob tensors.

    Example::

        loss_fn = alignops.nn.PreferenceLoss(loss_type="sigmoid", beta=0.1)
        out = loss_fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
        out.loss.backward()
    """

    def __init__(self, loss_type: str | list[str] = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                 **options):
        super().__init__()
        self.loss_type = loss_type
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.options = options
        # Fail at construction, not at the first batch.
        probe = torch.zeros(1)
        preference_loss(probe, probe, probe, probe, loss_type, beta, label_smoothing,
                        **{**options, **({"chosen_lengths": torch.ones(1), "rejected_lengths": torch.ones(1)}
                                         if "chosen_lengths" not in options else {})})

    def forward(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                **per_batch) -> PreferenceLossOutput:
        return preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               self.loss_type, self.beta, self.label_smoothing, **{**self.options, **per_batch})

    def extra_repr(self) -> str:
        return f"loss_type={self.loss_type!r}, beta={self.beta}, label_smoothing={self.label_smoothing}"


class FusedLinearPreferenceLoss(torch.nn.Module):
    """LM head + preference loss as a module, with Liger-Kernel's ``forward`` signature.

    ``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None)``
    with ``_input`` [2B, T, H] (B chosen rows, then B rejected) and ``target`` [2B, T]; returns
    :class:`alignops.FusedLinearPreferenceOutput` (a NamedTuple whose first field is the loss). Any
    :func:`alignops.preference_loss` type; see :func:`alignops.fused_linear_preference_loss`.
    """

    def __init__(self, loss_type: str | list[str] = "sigmoid", beta: float = 0.1, ignore_index: int = -100,
                 label_smoothing: float = 0.0, average_log_prob: bool = False, nll_weight: float = 0.0,
                 use_ref_model: bool = True, **options):
        super().__init__()
        self.loss_type, self.beta, self.ignore_index = loss_type, beta, ignore_index
        self.label_smoothing, self.average_log_prob, self.nll_weight = label_smoothing, average_log_prob, nll_weight
        self.use_ref_model = use_ref_model
        self.options = options

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None,
                **per_batch):
        from .fused_linear import fused_linear_preference_loss

        if self.use_ref_model and ref_input is not None:
            per_batch = {"ref_hidden": ref_input, "ref_weight": ref_weight, "ref_bias": ref_bias, **per_batch}
        return fused_linear_preference_loss(
            _input, lin_weight, target, bias, loss_type=self.loss_type, beta=self.beta,
            label_smoothing=self.label_smoothing, ignore_index=self.ignore_index,
            average_log_prob=self.average_log_prob, nll_weight=self.nll_weight, **{**self.options, **per_batch})

    def extra_repr(self) -> str:
        return f"loss_type={self.loss_type!r}, beta={self.beta}"


class FusedLinearDPOLoss(FusedLinearPreferenceLoss):
    """Drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearDPOLoss`` (same constructor arguments;
    ``compiled`` and ``chunk_size`` are accepted and unused: nothing here recompiles per shape)."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, compute_nll_loss: bool = False,
                 compiled: bool = True, use_ref_model: bool = True, average_log_prob: bool = False,
                 chunk_size: int = 1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 discopop_tau: float = 0.05):
        super().__init__(loss_type, beta, ignore_index, label_smoothing, average_log_prob,
                         alpha if compute_nll_loss else 0.0, use_ref_model, discopop_tau=discopop_tau)


class FusedLinearSimPOLoss(FusedLinearPreferenceLoss):
    """Drop-in for ``LigerFusedLinearSimPOLoss``: reference-free, length-averaged log-probs, margin ``gamma``."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = True, compiled: bool = True, gamma: float = 0.5, chunk_size: int = 1):
        super().__init__("simpo", beta, ignore_index, label_smoothing, True, alpha if compute_nll_loss else 0.0,
                         False, gamma=gamma)


class FusedLinearCPOLoss(FusedLinearPreferenceLoss):
    """Drop-in for ``LigerFusedLinearCPOLoss``: reference-free CPO plus ``alpha`` x NLL of the chosen tokens."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = True, compiled: bool = True, average_log_prob: bool = False,
                 chunk_size: int = 1):
        super().__init__("cpo", beta, ignore_index, label_smoothing, average_log_prob,
                         alpha if compute_nll_loss else 0.0, False)


class FusedLinearORPOLoss(torch.nn.Module):
    """Drop-in for ``LigerFusedLinearORPOLoss``: ORPO from LM-head inputs (``_input`` [2B, T, H], chosen rows
    first), NLL on the chosen tokens plus ``beta`` x the odds-ratio loss with a stable ``log1mexp``.
    Returns :class:`alignops.objectives.ORPOLossOutput` (a NamedTuple whose first field is the loss)."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compute_nll_loss: bool = True,
                 compiled: bool = True, chunk_size: int = 1):
        super().__init__()
        self.ignore_index, self.beta, self.compute_nll_loss = ignore_index, beta, compute_nll_loss

    def forward(self, lin_weight, _input, target, bias=None):
        from .fused_linear import fused_linear_sequence_logprobs
        from .objectives import orpo_loss

        if _input.dim() >= 1 and _input.shape[0] % 2:
            raise AlignopsError(f"_input must stack B chosen then B rejected rows ([2B, T, H]); got "
                                f"{_input.shape[0]} rows")
        seq = fused_linear_sequence_logprobs(_input, lin_weight, target, bias, ignore_index=self.ignore_index)
        B = _input.shape[0] // 2
        return orpo_loss(seq.sum[:B], seq.sum[B:], beta=self.beta, chosen_lengths=seq.num_tokens[:B],
                         rejected_lengths=seq.num_tokens[B:], compute_nll=self.compute_nll_loss)
