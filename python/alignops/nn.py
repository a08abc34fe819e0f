"""``nn.Module`` wrappers of the functional API (hyper-parameters held as attributes)."""

from __future__ import annotations

import torch

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
