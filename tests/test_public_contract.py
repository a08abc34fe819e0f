"""The contract every public function keeps, checked over one table of (callable, small valid inputs):

- inputs are not mutated (clones compared before / after the call);
- tensors on mismatched devices raise an error that says so (one argument moved to the "meta" device, as a
  weight left there by deferred initialisation), instead of running the fake kernel and returning
  uninitialised memory;
- non-finite float hyper-parameters (beta = inf, eps = nan, temperature = nan, ...) raise ValueError.

An entry that still breaks the contract is xfail(strict=True) with the defect as its reason, so that the
test flips (and fails) when the fix lands and the mark must go.
"""

from __future__ import annotations

import importlib
import pathlib

import pytest
import torch
from contract import Case, case

import alignops
from alignops import ctc, metrics, ot, rewards, skip, watermark
from alignops import wasserstein as W


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def rn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=g(seed), dtype=torch.float64).to(dtype)


def logps(B=4, seed=0):
    return -torch.rand(B, generator=g(seed), dtype=torch.float64).float() * 5 - 0.1


def ctc_inputs():
    lp = torch.log_softmax(rn(2, 8, 5), -1)
    return [lp, torch.tensor([[1, 2, 3], [2, 3, 0]]), torch.tensor([8, 6]), torch.tensor([3, 2])]


def ffn_inputs():
    H, I = 8, 6
    return [rn(2, 3, H), rn(2 * I, H, seed=1) / H**0.5, rn(H, I, seed=2) / I**0.5, torch.rand(H, generator=g(3)) + 0.5]


def cloud(n, d=3, seed=0):
    return rn(n, d, seed=seed)


def spd(d, seed):
    A = rn(d, d, seed=seed)
    return A @ A.T + 0.1 * torch.eye(d)


def paths():
    return torch.tensor([[0, 1, 1, 0, 2, -1], [3, 0, 3, 3, 0, 0]])


CASES: dict[str, Case] = {
    # preference
    "preference_loss": case(
        alignops.preference_loss,
        lambda: [logps(seed=i) for i in range(4)],
        hyper=("beta", "gamma", "discopop_tau", "f_alpha_divergence_coef"),
    ),
    "selective_logprobs": case(
        alignops.selective_logprobs,
        lambda: [rn(5, 11), torch.randint(0, 11, (5,), generator=g())],
        hyper=("temperature",),
    ),
    "sequence_logprobs": case(
        alignops.sequence_logprobs,
        lambda: [rn(2, 4, 7), torch.randint(0, 7, (2, 4), generator=g())],
        lambda: dict(completion_mask=torch.ones(2, 4, dtype=torch.bool)),
        meta="completion_mask",
        hyper=("temperature",),
    ),
    "fused_linear_logprobs": case(
        alignops.fused_linear_logprobs,
        lambda: [rn(5, 8), rn(11, 8, seed=1), torch.randint(0, 11, (5,), generator=g())],
        meta=1,
        hyper=("temperature", "logit_scale", "softcap"),
    ),
    "fused_linear_sequence_logprobs": case(
        alignops.fused_linear_sequence_logprobs,
        lambda: [rn(5, 8), rn(11, 8, seed=1), torch.randint(0, 11, (5,), generator=g())],
        lambda: dict(cu_seqlens=torch.tensor([0, 2, 5])),
        meta=1,
        hyper=("temperature", "logit_scale", "softcap"),
    ),
    "fused_linear_preference_loss": case(
        alignops.fused_linear_preference_loss,
        lambda: [rn(4, 3, 8), rn(11, 8, seed=1), torch.randint(0, 11, (4, 3), generator=g())],
        lambda: dict(ref_chosen_logps=logps(2, 5), ref_rejected_logps=logps(2, 6)),
        meta=1,
        hyper=("beta", "temperature", "logit_scale", "softcap", "alpha"),
    ),
    # ctc
    "forced_align": case(ctc.forced_align, ctc_inputs, meta=1, hyper=("star_penalty:nan",)),
    "ctc_loss": case(alignops.ctc_loss, ctc_inputs, meta=1),
    "ctc_posteriors": case(alignops.ctc_posteriors.ctc_posteriors, ctc_inputs, meta=1),
    "token_spans": case(ctc.token_spans, lambda: [paths(), rn(2, 6)], meta=1),
    "utterance_score": case(
        alignops.ctc_segmentation.utterance_score,
        lambda: [torch.log_softmax(rn(20, 4), -1)[:, 1], torch.tensor([0, 8]), torch.tensor([6, 19])],
        lambda: dict(window=3),
        meta=1,
    ),
    # ot
    "sinkhorn": case(
        ot.sinkhorn,
        lambda: [torch.rand(3, 4, generator=g()), torch.full((3,), 1 / 3), torch.full((4,), 0.25)],
        lambda: dict(eps=0.5),
        meta=2,
        hyper=("eps", "tol:nan", "eps_scaling", "cost_range:nan"),
    ),
    "sinkhorn_distance": case(
        ot.sinkhorn_distance,
        lambda: [cloud(3), cloud(4, seed=1)],
        lambda: dict(eps=0.5),
        meta=1,
        hyper=("eps", "p", "tol:nan", "eps_scaling", "diameter:nan"),
    ),
    "sinkhorn_normalize": case(ot.sinkhorn_normalize, lambda: [rn(4, 5)], hyper=("temperature",)),
    "dual_softmax": case(ot.dual_softmax, lambda: [rn(4, 5)], hyper=("temperature",)),
    "inverted_softmax": case(ot.inverted_softmax, lambda: [rn(4, 5), rn(6, 5, seed=1)], hyper=("temperature",)),
    "qb_norm": case(ot.qb_norm, lambda: [rn(4, 5), rn(6, 5, seed=1)], hyper=("temperature",)),
    "nnn": case(ot.nnn, lambda: [rn(4, 5), rn(6, 5, seed=1)], lambda: dict(k=2), hyper=("alpha",)),
    # skip
    "skip_ffn": case(
        alignops.skip_ffn,
        ffn_inputs,
        lambda: dict(keep=torch.tensor([[True, False, True], [False, True, True]])),
        meta="keep",
        hyper=("eps",),
    ),
    "skip_ffn_weight": case(alignops.skip_ffn, ffn_inputs, meta=1),
    "skip_ffn_threshold": case(
        alignops.skip_ffn,
        ffn_inputs,
        lambda: dict(previous=rn(2, 3, 8, seed=9), threshold=0.5),
        meta="previous",
        hyper=("threshold:nan",),
    ),
    "change_score": case(skip.change_score, lambda: [rn(2, 3, 8), rn(2, 3, 8, seed=1)]),
    # wasserstein
    "wasserstein_1d": case(W.wasserstein_1d, lambda: [rn(2, 5), rn(2, 4, seed=1)], hyper=("p",)),
    "wasserstein_1d_weights": case(
        W.wasserstein_1d, lambda: [rn(5), rn(4, seed=1), torch.rand(5, generator=g()) + 0.1], meta=2
    ),
    "sliced_wasserstein": case(
        W.sliced_wasserstein,
        lambda: [cloud(5), cloud(4, seed=1)],
        lambda: dict(projections=W.random_projections(3, 4, 0)),
        meta="projections",
        hyper=("p",),
    ),
    "gaussian_w2": case(W.gaussian_w2, lambda: [rn(3), spd(3, 1), rn(3, seed=2), spd(3, 3)]),
    # metrics
    "pearson": case(metrics.pearson, lambda: [rn(6), rn(6, seed=1)], hyper=("confidence",)),
    "spearman": case(metrics.spearman, lambda: [rn(6), rn(6, seed=1)]),
    "win_rate": case(metrics.win_rate, lambda: [rn(6), rn(6, seed=1)], hyper=("tie_value",)),
    "reward_accuracy": case(metrics.reward_accuracy, lambda: [rn(6), rn(6, seed=1)]),
    "ranking_accuracy": case(metrics.ranking_accuracy, lambda: [rn(6), rn(6, seed=1)]),
    "cohen_kappa": case(metrics.cohen_kappa, lambda: [torch.tensor([0, 1, 2, 1, 0]), torch.tensor([0, 1, 1, 1, 2])]),
    "percent_agreement": case(
        metrics.percent_agreement, lambda: [torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 1, 1])]
    ),
    "confusion_matrices": case(
        metrics.confusion_matrices, lambda: [torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 1, 1])]
    ),
    "expected_calibration_error": case(
        metrics.expected_calibration_error,
        lambda: [torch.rand(8, generator=g()), torch.tensor([1, 0, 1, 1, 0, 1, 0, 1]).bool()],
    ),
    "benjamini_hochberg": case(
        metrics.benjamini_hochberg, lambda: [torch.rand(8, generator=g())], lambda: dict(q=0.1), hyper=("q",)
    ),
    "elo_ratings": case(
        metrics.elo_ratings,
        lambda: [torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])],
        lambda: dict(num_players=3),
        hyper=("k", "scale", "initial"),
    ),
    "bradley_terry": case(
        metrics.bradley_terry,
        lambda: [torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 2])],
        lambda: dict(num_players=3),
        hyper=("pseudo_count", "tol:nan"),
    ),
    "alignment_gap": case(
        metrics.alignment_gap,
        lambda: [logps(seed=i) for i in range(4)] + [torch.rand(4, generator=g())],
        lambda: dict(beta=0.1),
        hyper=("beta",),
    ),
    "idealized_ranking_accuracy": case(
        metrics.idealized_ranking_accuracy,
        lambda: [logps(), logps(seed=1), torch.rand(4, generator=g())],
        lambda: dict(beta=0.1),
        hyper=("beta",),
    ),
    "conformal_pvalues": case(
        metrics.conformal_pvalues,
        lambda: [rn(8), rn(8, seed=1), rn(3, seed=2)],
        lambda: dict(threshold=0.0),
        hyper=("threshold:nan",),
    ),
    # watermark
    "kgw_process": case(
        watermark.kgw_process,
        lambda: [rn(3, 20), torch.randint(0, 20, (3, 1), generator=g())],
        lambda: dict(key=7),
        hyper=("gamma", "delta"),
    ),
    "kgw_greedy": case(
        watermark.kgw_greedy,
        lambda: [rn(3, 20), torch.randint(0, 20, (3, 1), generator=g())],
        lambda: dict(key=7),
        hyper=("gamma", "delta"),
    ),
    "gumbel_sample": case(
        watermark.gumbel_sample,
        lambda: [rn(3, 20), torch.randint(0, 20, (3, 1), generator=g())],
        lambda: dict(key=7),
        hyper=("temperature",),
    ),
    "kgw_detect": case(
        watermark.kgw_detect,
        lambda: [torch.randint(0, 20, (2, 9), generator=g())],
        lambda: dict(key=7, mask=torch.ones(2, 9, dtype=torch.bool)),
        meta="mask",
        hyper=("gamma",),
    ),
    "gumbel_detect": case(
        watermark.gumbel_detect,
        lambda: [torch.randint(0, 20, (2, 9), generator=g())],
        lambda: dict(key=7, mask=torch.ones(2, 9, dtype=torch.bool)),
        meta="mask",
    ),
    "alignment_resampling": case(
        watermark.alignment_resampling, lambda: [torch.randint(0, 20, (2, 3, 4), generator=g()), rn(2, 3)]
    ),
    # represent
    "linear_cka": case(alignops.linear_cka, lambda: [rn(6, 3), rn(6, 4, seed=1)]),
    "cca": case(alignops.cca, lambda: [rn(12, 3), rn(12, 4, seed=1)], hyper=("reg",)),
    "cca_loss": case(alignops.cca_loss, lambda: [rn(12, 3), rn(12, 4, seed=1)], hyper=("reg",)),
    "ches_score": case(
        alignops.ches_score,
        lambda: [
            rn(2, 5, 4),
            rn(2, 5, 4, seed=1),
            torch.ones(2, 5, dtype=torch.bool),
            torch.ones(2, 5, dtype=torch.bool),
        ],
    ),
    "ima_score": case(
        alignops.ima_score, lambda: [rn(3, 2, 6, 4), torch.tensor([[1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]]).bool()]
    ),
    # rewards
    "best_of_n": case(rewards.best_of_n, lambda: [rn(2, 5)]),
    "calibrate": case(rewards.calibrate, lambda: [rn(2, 3), rn(2, 6, seed=1)]),
    "bt_transform": case(rewards.bt_transform, lambda: [rn(2, 3), rn(2, 1, seed=1)]),
    "combine_rewards": case(
        rewards.combine_rewards, lambda: [rn(2, 3, 2), rn(2, 1, 2, seed=1), torch.tensor([1.0, 0.5])]
    ),
    "ctrl_transform": case(
        rewards.ctrl_transform, lambda: [torch.rand(2, 3, generator=g())], lambda: dict(t=0.5), hyper=("t",)
    ),
    "weighted_majority_vote": case(
        rewards.weighted_majority_vote, lambda: [torch.tensor([[0, 1, 1], [2, 2, 0]]), rn(2, 3).abs()]
    ),
    # objectives
    "orpo_loss": case(alignops.orpo_loss, lambda: [logps(), logps(seed=1), logps(seed=2).neg()], hyper=("beta",)),
    "kto_loss": case(
        alignops.kto_loss,
        lambda: [logps(), logps(seed=1), torch.tensor([True, False, True, False])],
        hyper=("beta", "desirable_weight", "undesirable_weight"),
    ),
    "bco_loss": case(
        alignops.bco_loss,
        lambda: [logps(), logps(seed=1), torch.tensor([True, False, True, False])],
        lambda: dict(delta=0.0),
        hyper=("beta",),
    ),
    "cpo_loss": case(
        alignops.cpo_loss, lambda: [logps(), logps(seed=1)], hyper=("beta", "alpha", "gamma", "alphapo_alpha")
    ),
    "tpo_loss": case(
        alignops.tpo_loss, lambda: [logps(), logps(seed=1), logps(seed=2)], hyper=("beta", "alpha", "gamma")
    ),
    "rrhf_loss": case(
        alignops.rrhf_loss,
        lambda: [rn(2, 3), rn(2, 3, seed=1), torch.randint(1, 9, (2, 3), generator=g())],
        hyper=("rank_weight", "length_penalty"),
    ),
    "pro_loss": case(alignops.pro_loss, lambda: [rn(2, 4)]),
    "curry_pairs": case(alignops.curry_pairs, lambda: [rn(2, 4)]),
    "ld_logps": case(
        alignops.ld_logps,
        lambda: [rn(4, 5), torch.ones(4, 5, dtype=torch.bool)],
        lambda: dict(ld_alpha=0.5),
        hyper=("ld_alpha",),
    ),
    "wpo_weights": case(
        alignops.wpo_weights, lambda: [-rn(4, 5).abs(), -rn(4, 5, seed=1).abs(), torch.ones(4, 5, dtype=torch.bool)]
    ),
    "diffusion_dpo_loss": case(
        alignops.diffusion_dpo_loss, lambda: [rn(4).abs() for _ in range(4)], lambda: dict(beta=10.0), hyper=("beta",)
    ),
    "dro_loss": case(alignops.dro_loss, lambda: [rn(4).abs(), rn(4, seed=1).abs(), rn(4, seed=2)], hyper=("beta",)),
    "log1mexp": case(alignops.log1mexp, lambda: [-rn(6).abs() - 1e-3]),
    "bradley_terry_loss": case(
        alignops.bradley_terry_loss,
        lambda: [rn(4), rn(4, seed=1), rn(4, seed=2).abs()],
        hyper=("center_rewards_coefficient",),
    ),
    "reward_centering_loss": case(
        alignops.reward_centering_loss, lambda: [rn(4), rn(4, seed=1)], hyper=("center_rewards_coefficient",)
    ),
    "rating_regression_loss": case(
        alignops.rating_regression_loss, lambda: [rn(3, 2), rn(3, 2, seed=1), torch.ones(3, 2, dtype=torch.bool)]
    ),
    "helpsteer2_preference_loss": case(
        alignops.helpsteer2_preference_loss,
        lambda: [rn(4), rn(4, seed=1), torch.tensor([1.0, 2.0, 3.0, 1.0])],
        hyper=("regression_weight",),
    ),
    # ppo
    "gae_advantages": case(
        alignops.gae_advantages,
        lambda: [rn(3, 6), rn(3, 6, seed=1), torch.ones(3, 6, dtype=torch.bool)],
        lambda: dict(last_values=rn(3, seed=2)),
        hyper=("gamma", "lam"),
    ),
    "ppo_value_loss": case(
        alignops.ppo_value_loss,
        lambda: [rn(3, 6), rn(3, 6, seed=1), rn(3, 6, seed=2), torch.ones(3, 6, dtype=torch.bool)],
        hyper=("cliprange_value",),
    ),
    # adpa
    "adpa_loss": case(
        alignops.adpa_loss,
        lambda: [
            rn(2, 3, 4),
            rn(7, 4, seed=1),
            rn(2, 3, 5, seed=2),
            rn(7, 5, seed=3),
            rn(2, 3, 4, seed=4),
            rn(7, 4, seed=5),
            torch.ones(2, 3, dtype=torch.bool),
        ],
    ),
    "dckd_loss": case(
        alignops.dckd_loss,
        lambda: [
            rn(2, 3, 4),
            rn(7, 4, seed=1),
            rn(2, 3, 5, seed=2),
            rn(7, 5, seed=3),
            torch.tensor([[True, True, False], [False, False, False]]),
            torch.tensor([[False, False, False], [True, True, True]]),
        ],
        hyper=("chosen_weight", "rejected_weight"),
    ),
    # fused_linear_policy
    "fused_linear_policy_loss": case(
        alignops.fused_linear_policy_loss,
        lambda: [
            rn(2, 4, 8),
            rn(11, 8, seed=1),
            torch.randint(0, 11, (2, 4), generator=g()),
            rn(2, seed=2),
            torch.ones(2, 4, dtype=torch.bool),
        ],
        lambda: dict(
            old_per_token_logps=rn(2, 4, seed=3),
            ref_per_token_logps=rn(2, 4, seed=4),
            beta=0.04,
            top_entropy_quantile=0.5,
        ),
        meta="ref_per_token_logps",
        hyper=("temperature", "logit_scale", "entropy_coef", "top_entropy_quantile", "beta", "epsilon_low"),
    ),
    "high_entropy_mask": case(
        alignops.fused_linear_policy.high_entropy_mask,
        lambda: [rn(2, 4).abs(), torch.ones(2, 4, dtype=torch.bool)],
        lambda: dict(quantile=0.5),
        hyper=("quantile",),
    ),
}


def _family_cases() -> dict[str, Case]:
    """The rows kept next to their family's tests: ``CONTRACT_CASES`` of tests/test_<family>.py (a new op adds its
    row there, CONTRIBUTING.md); the table above holds the older families' rows."""
    out: dict[str, Case] = {}
    for path in sorted(pathlib.Path(__file__).parent.glob("test_*.py")):
        if path != pathlib.Path(__file__) and "\nCONTRACT_CASES" in path.read_text():
            out.update(importlib.import_module(path.stem).CONTRACT_CASES)
    return out


CASES.update(_family_cases())

# Entries that still break the contract today, with the defect (xfail strict: they fail loudly once fixed).
META_XFAIL: dict[str, str] = {}
MUTATION_XFAIL: dict[str, str] = {}
HYPER_XFAIL: dict[tuple[str, str], str] = {}
# Only one of the two values breaks the contract for these.
HYPER_VALUE_XFAIL: dict[tuple[str, str, str], str] = {}


def tensors_of(args, kwargs):
    return [(i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)] + [
        (k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)
    ]


def marked(params, xfails):
    return [
        pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=xfails[p])) if p in xfails else p for p in params
    ]


@pytest.mark.parametrize("name", marked(sorted(CASES), MUTATION_XFAIL))
def test_inputs_are_not_mutated(name):
    c = CASES[name]
    args, kwargs = c.build()
    before = [(k, t.clone()) for k, t in tensors_of(args, kwargs)]
    c.fn(*args, **kwargs)
    for (k, old), (_, new) in zip(before, tensors_of(args, kwargs)):
        assert torch.equal(old, new) or (
            old.is_floating_point()
            and torch.equal(old.isnan(), new.isnan())
            and torch.equal(old.nan_to_num(), new.nan_to_num())
        ), f"{name} mutated its argument {k!r}"


def _meta_cases():
    out = []
    for name, c in sorted(CASES.items()):
        args, kwargs = c.build()
        ts = tensors_of(args, kwargs)
        if len(ts) < 2:
            continue  # one tensor: no second device to mismatch
        out.append(name)
    return out


@pytest.mark.parametrize("name", marked(_meta_cases(), META_XFAIL))
def test_mismatched_devices_raise(name):
    c = CASES[name]
    args, kwargs = c.build()
    key = c.meta if c.meta is not None else tensors_of(args, kwargs)[-1][0]
    if isinstance(key, int):
        args[key] = args[key].to("meta")
    else:
        kwargs[key] = kwargs[key].to("meta")
    with pytest.raises((ValueError, RuntimeError, NotImplementedError), match=r"(?i)device") as info:
        c.fn(*args, **kwargs)
    assert "cannot be called on meta tensors" not in str(info.value), str(info.value)


def _hyper_cases():
    return [
        (name, h.split(":")[0], v)
        for name, c in sorted(CASES.items())
        for h in c.hyper
        for v in (("nan",) if h.endswith(":nan") else ("nan", "inf"))
    ]


def _hyper_reason(n, h, v):
    return HYPER_XFAIL.get((n, h)) or HYPER_VALUE_XFAIL.get((n, h, v))


@pytest.mark.parametrize(
    "name,hyper,value",
    [
        pytest.param(n, h, v, marks=pytest.mark.xfail(strict=True, reason=_hyper_reason(n, h, v)))
        if _hyper_reason(n, h, v)
        else (n, h, v)
        for n, h, v in _hyper_cases()
    ],
)
def test_non_finite_hyper_parameters_raise(name, hyper, value):
    c = CASES[name]
    args, kwargs = c.build()
    kwargs[hyper] = float(value)
    with pytest.raises(ValueError, match=hyper.split("_")[0] if hyper != "f_alpha_divergence_coef" else "alpha"):
        c.fn(*args, **kwargs)


def test_the_table_covers_every_public_function():
    """A new public function needs a row here (or a reason to have none)."""
    listed = {c.fn for c in CASES.values()}
    # Not tensor kernels: writers, helpers, constructors and schedules.
    exempt = {
        "prepare_token_list",
        "write_kaldi_segments",
        "write_ctm",
        "to_json",
        "random_projections",
        "eps_schedule",
        "implicit_grad_cost",
        "bank_column_lse",
        "check_cu_seqlens",
        "check_targets_in_range",
        "segment_sums",
        "patch_ffn_skipping",
        "prepack",
        "unprepack",
        "is_prepacked",
        "keep_from_spans",
        "decoder_layers",
        "perceptual_token_ids",
        "keep_top_k",
        "span_occupancy",
        "word_spans",
        "ctc_segmentation",
        "utterance_segments",
        "pseudo_forced_align",
        "kappa_from_confusion",
        "conformal_selection",
        "worst_of_n",
        "percent_agreement",
    }
    import importlib
    import inspect

    missing = []
    for m in (
        "preference",
        "fused_linear",
        "ctc",
        "ctc_posteriors",
        "ctc_segmentation",
        "ot",
        "skip",
        "wasserstein",
        "metrics",
        "watermark",
        "ima",
        "similarity",
        "rewards",
        "objectives",
        "ppo",
        "policy",
        "fused_linear_policy",
        "adpa",
    ):
        mod = importlib.import_module(f"alignops.{m}")
        for n, f in vars(mod).items():
            if (
                not n.startswith("_")
                and inspect.isfunction(f)
                and f not in listed
                and (f.__module__ == mod.__name__ or f.__module__.startswith(mod.__name__ + "."))
                and n not in exempt
            ):
                missing.append(f"{m}.{n}")
    assert not missing, f"public functions without a contract row: {missing}"
