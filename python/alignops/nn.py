"""``nn.Module`` wrappers of the functional API (hyper-parameters held as attributes)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._api import renamed
from ._checks import check_finite
from ._errors import AlignopsError
from .preference import PreferenceLossOutput, preference_loss


class LigerLossOutput(NamedTuple):
    """What Liger-Kernel's fused losses return, so that ``loss, aux = module(...)`` and ``module(...)[0]`` work
    as with Liger: ``aux`` = (chosen_logps [B], rejected_logps [B], chosen_logits_mean, rejected_logits_mean,
    nll_loss, then the loss's own metrics: chosen_rewards [B], rejected_rewards [B]; ORPO adds log_odds_ratio
    and log_odds_chosen, both batch means). ``nll_loss`` is 0 when ``compute_nll_loss=False``, as in Liger."""

    loss: torch.Tensor
    aux: tuple


def _logits_means(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, B: int):
    """Liger's chosen / rejected logits means, sum over every position and vocabulary entry / (B T V), from
    hidden [2B, T, H] without the logits: sum_{t,v} z = (sum_t h_t) . (sum_v w_v) + (#positions) sum_v b_v."""
    with torch.no_grad():
        T, V = hidden.shape[1], weight.shape[0]
        w_sum = weight.sum(0, dtype=torch.float32)
        b_sum = bias.sum(dtype=torch.float32) if bias is not None else w_sum.new_zeros(())

        def mean(rows: torch.Tensor) -> torch.Tensor:
            return (rows.sum((0, 1), dtype=torch.float32) @ w_sum + rows.shape[0] * T * b_sum) / max(B * T * V, 1)

        return mean(hidden[:B]), mean(hidden[B:])


def _check_liger_input(_input: torch.Tensor) -> int:
    if _input.dim() != 3 or _input.shape[0] % 2:
        raise AlignopsError(
            f"_input must be [2B, T, H]: B chosen rows, then B rejected rows; got shape {list(_input.shape)}"
        )
    return _input.shape[0] // 2


class PreferenceLoss(torch.nn.Module):
    """Module form of :func:`alignops.preference_loss`; ``forward`` takes the four [B] log-prob tensors.

    Example::

        loss_fn = alignops.nn.PreferenceLoss(loss_type="sigmoid", beta=0.1)
        out = loss_fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
        out.loss.backward()
    """

    def __init__(
        self, loss_type: str | list[str] = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0, **options
    ):
        super().__init__()
        self.loss_type = loss_type
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.options = options
        # Fail at construction, not at the first batch.
        probe = torch.zeros(1)
        preference_loss(
            probe,
            probe,
            probe,
            probe,
            loss_type=loss_type,
            beta=beta,
            label_smoothing=label_smoothing,
            **{
                **options,
                **(
                    {"chosen_lengths": torch.ones(1), "rejected_lengths": torch.ones(1)}
                    if "chosen_lengths" not in options
                    else {}
                ),
            },
        )

    def forward(
        self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, **per_batch
    ) -> PreferenceLossOutput:
        return preference_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            loss_type=self.loss_type,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            **{**self.options, **per_batch},
        )

    def extra_repr(self) -> str:
        return f"loss_type={self.loss_type!r}, beta={self.beta}, label_smoothing={self.label_smoothing}"


class FusedLinearPreferenceLoss(torch.nn.Module):
    """LM head + preference loss as a module, with Liger-Kernel's ``forward`` signature.

    ``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None)``
    with ``_input`` [2B, T, H] (B chosen rows, then B rejected) and ``target`` [2B, T]; returns
    :class:`alignops.FusedLinearPreferenceOutput` (a NamedTuple whose first field is the loss). Any
    :func:`alignops.preference_loss` type; see :func:`alignops.fused_linear_preference_loss`.
    """

    @renamed(nll_weight="alpha")
    def __init__(
        self,
        loss_type: str | list[str] = "sigmoid",
        beta: float = 0.1,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        average_log_prob: bool = False,
        alpha: float = 0.0,
        use_ref_model: bool = True,
        **options,
    ):
        super().__init__()
        self.loss_type, self.beta, self.ignore_index = loss_type, beta, ignore_index
        self.label_smoothing, self.average_log_prob, self.alpha = label_smoothing, average_log_prob, alpha
        self.use_ref_model = use_ref_model
        self.options = options
        # Fail at construction, not at the first batch: one call on a 2-token problem checks every argument.
        from .fused_linear import fused_linear_preference_loss

        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise AlignopsError(f"ignore_index must be an int, got {ignore_index!r}")
        probe = torch.zeros(2, 1, 1)
        fused_linear_preference_loss(
            probe,
            torch.zeros(1, 1),
            torch.zeros(2, 1, dtype=torch.long),
            loss_type=loss_type,
            beta=beta,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            average_log_prob=average_log_prob,
            alpha=alpha,
            **options,
        )

    def forward(
        self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, **per_batch
    ):
        from .fused_linear import fused_linear_preference_loss

        if self.use_ref_model and ref_input is not None:
            per_batch = {"ref_hidden": ref_input, "ref_weight": ref_weight, "ref_bias": ref_bias, **per_batch}
        return fused_linear_preference_loss(
            _input,
            lin_weight,
            target,
            bias,
            loss_type=self.loss_type,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
            average_log_prob=self.average_log_prob,
            alpha=self.alpha,
            **{**self.options, **per_batch},
        )

    def extra_repr(self) -> str:
        return f"loss_type={self.loss_type!r}, beta={self.beta}"


class _LigerFusedLinearLoss(FusedLinearPreferenceLoss):
    """The base module with Liger-Kernel's return structure (:class:`LigerLossOutput`)."""

    compute_nll_loss = True

    def forward(
        self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, **per_batch
    ) -> LigerLossOutput:
        B = _check_liger_input(_input)
        out = super().forward(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias, **per_batch)
        chosen_mean, rejected_mean = _logits_means(_input, lin_weight, bias, B)
        nll = out.nll if self.compute_nll_loss else torch.zeros_like(out.nll)
        return LigerLossOutput(
            out.loss,
            (
                out.chosen_logps,
                out.rejected_logps,
                chosen_mean,
                rejected_mean,
                nll,
                out.chosen_rewards,
                out.rejected_rewards,
            ),
        )


class FusedLinearDPOLoss(_LigerFusedLinearLoss):
    """Drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearDPOLoss`` (same constructor arguments;
    ``compiled`` and ``chunk_size`` are accepted and unused: nothing here recompiles per shape)."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
    ):
        check_finite(alpha, "alpha")  # the NLL weight, by Liger's name
        super().__init__(
            loss_type,
            beta,
            ignore_index,
            label_smoothing,
            average_log_prob,
            alpha if compute_nll_loss else 0.0,
            use_ref_model,
            discopop_tau=discopop_tau,
        )
        self.compute_nll_loss = compute_nll_loss


class FusedLinearSimPOLoss(_LigerFusedLinearLoss):
    """Drop-in for ``LigerFusedLinearSimPOLoss``: reference-free, length-averaged log-probs, margin ``gamma``."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        gamma: float = 0.5,
        chunk_size: int = 1,
    ):
        check_finite(alpha, "alpha")  # the NLL weight, by Liger's name
        super().__init__(
            "simpo", beta, ignore_index, label_smoothing, True, alpha if compute_nll_loss else 0.0, False, gamma=gamma
        )
        self.compute_nll_loss = compute_nll_loss


class FusedLinearCPOLoss(_LigerFusedLinearLoss):
    """Drop-in for ``LigerFusedLinearCPOLoss``: reference-free CPO plus ``alpha`` x NLL of the chosen tokens."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
    ):
        check_finite(alpha, "alpha")  # the NLL weight, by Liger's name
        super().__init__(
            "cpo", beta, ignore_index, label_smoothing, average_log_prob, alpha if compute_nll_loss else 0.0, False
        )
        self.compute_nll_loss = compute_nll_loss


class FusedLinearORPOLoss(torch.nn.Module):
    """Drop-in for ``LigerFusedLinearORPOLoss``: ORPO from LM-head inputs (``_input`` [2B, T, H], chosen rows
    first), NLL on the chosen tokens plus ``beta`` x the odds-ratio loss with a stable ``log1mexp``.
    Returns :class:`LigerLossOutput`, Liger's ``(loss, aux)``: aux = (chosen / rejected mean log-probs [B],
    logits means, the chosen tokens' mean NLL (0 when ``compute_nll_loss=False``), rewards ``beta`` x mean logp
    [B], the batch means of ``log_odds_ratio`` and ``log_odds_chosen``)."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        chunk_size: int = 1,
    ):
        super().__init__()
        check_finite(beta, "beta")
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise AlignopsError(f"ignore_index must be an int, got {ignore_index!r}")
        self.ignore_index, self.beta, self.compute_nll_loss = ignore_index, beta, compute_nll_loss

    def forward(self, lin_weight, _input, target, bias=None):
        from .fused_linear import fused_linear_sequence_logprobs
        from .objectives import orpo_loss

        if _input.dim() >= 1 and _input.shape[0] % 2:
            raise AlignopsError(
                f"_input must stack B chosen then B rejected rows ([2B, T, H]); got {_input.shape[0]} rows"
            )
        seq = fused_linear_sequence_logprobs(_input, lin_weight, target, bias, ignore_index=self.ignore_index)
        B = _check_liger_input(_input)
        out = orpo_loss(
            seq.sum[:B],
            seq.sum[B:],
            beta=self.beta,
            chosen_lengths=seq.num_tokens[:B],
            rejected_lengths=seq.num_tokens[B:],
            compute_nll_loss=self.compute_nll_loss,
        )
        mean = seq.sum / seq.num_tokens.clamp(min=1)
        chosen_mean, rejected_mean = _logits_means(_input, lin_weight, bias, B)
        nll = (
            -seq.sum[:B].sum() / seq.num_tokens[:B].sum().clamp(min=1)
            if self.compute_nll_loss
            else out.loss.new_zeros(())
        )
        return LigerLossOutput(
            out.loss,
            (
                mean[:B],
                mean[B:],
                chosen_mean,
                rejected_mean,
                nll,
                out.chosen_rewards,
                out.rejected_rewards,
                out.log_odds_ratio.mean(),
                out.log_odds_chosen.mean(),
            ),
        )


class FusedLinearGRPOLoss(torch.nn.Module):
    """Drop-in for ``LigerFusedLinearGRPOLoss``: :func:`alignops.fused_linear_policy_loss` with Liger-Kernel's
    constructor and ``forward`` argument names (``_input`` [B, T, H] first, then ``lin_weight``). Returns Liger's
    ``(loss, metrics)``: metrics = [mean k3 KL to the reference (only when ``beta != 0``), the fraction of clipped
    tokens (TRL's ``clip_ratio/region_mean``)]. ``compiled`` and ``chunk_size`` are accepted and unused (there is
    nothing to compile and no chunk: the kernel walks the vocabulary); ``use_ref_model=False`` ignores the
    reference inputs. Keyword arguments beyond Liger's go to :func:`alignops.fused_linear_policy_loss`."""

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        **options,
    ):
        super().__init__()
        check_finite(beta, "beta")
        self.use_ref_model, self.temperature = use_ref_model, temperature
        self.options = dict(
            beta=beta,
            epsilon_low=epsilon_low,
            epsilon_high=epsilon_high,
            loss_type=loss_type,
            max_completion_length=max_completion_length,
            importance_sampling_level=importance_sampling_level,
            sapo_temperature_pos=sapo_temperature_pos,
            sapo_temperature_neg=sapo_temperature_neg,
            delta=delta,
            use_bias_correction_kl=use_bias_correction_kl,
            vespo_k_pos=vespo_k_pos,
            vespo_lambda_pos=vespo_lambda_pos,
            vespo_k_neg=vespo_k_neg,
            vespo_lambda_neg=vespo_lambda_neg,
            **options,
        )

    def forward(
        self,
        _input,
        lin_weight,
        selected_token_ids,
        attention_mask,
        advantages,
        bias=None,
        ref_per_token_logps=None,
        old_per_token_logps=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        vllm_is_ratio=None,
        num_items_in_batch=None,
    ):
        from .fused_linear_policy import fused_linear_policy_loss

        ref = (
            dict(
                ref_hidden=ref_input, ref_weight=ref_weight, ref_bias=ref_bias, ref_per_token_logps=ref_per_token_logps
            )
            if self.use_ref_model
            else {}
        )
        options = self.options
        if options["beta"] == 0.0 or not any(v is not None for k, v in ref.items() if k != "ref_weight"):
            # Liger: without a reference the KL is taken to the policy itself, i.e. 0
            ref, options = {}, {**options, "beta": 0.0}
        out = fused_linear_policy_loss(
            _input,
            lin_weight,
            selected_token_ids,
            advantages,
            attention_mask,
            bias=bias,
            old_per_token_logps=old_per_token_logps,
            temperature=self.temperature,
            importance_sampling_ratio=vllm_is_ratio,
            num_items_in_batch=num_items_in_batch,
            **ref,
            **options,
        )
        if self.options["beta"] == 0.0:
            metrics = []
        else:
            metrics = [out.metrics["kl"] if options["beta"] != 0.0 else out.loss.new_zeros(())]
        return out.loss, metrics + [out.metrics["clip_ratio_region"]]

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items())
