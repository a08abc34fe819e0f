"""The mechanical half of docs/api-style.md, over every public function of ``alignops.__all__`` and of the family
modules: tensors positional and hyperparameters keyword-only, ``backend=`` wherever a function reaches more than
one implementation (and forwarded, never replaced by a literal), several outputs as a NamedTuple, one name per
idea (a deprecated name only as an alias). What is deliberately different is in the allow-lists below, each
entry with its reason; an entry that no longer matches anything fails the test, so the lists cannot go stale.

The deprecation shims (alignops._api) are exercised at the end: the old spelling still works, warns, and gives
the same result as the new one.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
import types
import warnings

import pytest
import torch

import alignops

# The family modules whose public functions are checked besides alignops.__all__ (ctc_posteriors and
# ctc_segmentation are re-exported by alignops.ctc but own their functions).
FAMILIES = (
    "preference",
    "fused_linear",
    "objectives",
    "ctc",
    "ctc_posteriors",
    "ctc_segmentation",
    "ot",
    "wasserstein",
    "ima",
    "similarity",
    "skip",
    "metrics",
    "distillation",
    "ppo",
    "policy",
    "fused_linear_policy",
    "adpa",
    "rewards",
    "watermark",
)
# Families being rewritten by other work streams when this test was written: checked once they land (add them
# to FAMILIES then).
NOT_YET: tuple[str, ...] = ()

# Public names that are helpers, not tensor kernels (argument checks, writers, schedules): outside the rules.
HELPERS = {
    "check_cu_seqlens",
    "check_targets_in_range",
    "check_finite",
    "check_floating",
    "check_python_float",
    "check_positive",
    "check_same_device",
    "check_has_values",
    "check_not_nan",
    "check_int64",
    "run_checks",
    "run_op_checks",
    "run_value_checks",
    "lower_name",
    "values_checkable",
    "acc_dtype",
    "gathered_weight",
    "refuse_dtensor",
    "psd_sqrt",
    "prepare_token_list",
    "to_json",
    "write_ctm",
    "write_kaldi_segments",
    "prepack",
    "unprepack",
    "is_prepacked",
    "segment_sums",
    "log1mexp",
}

# (function, parameter): a non-tensor parameter that stays positional, and why.
POSITIONAL_ALLOWED = {
    # torch.nn.functional.ctc_loss's drop-in signature (log_probs, targets, input_lengths, target_lengths, blank,
    # reduction, zero_infinity): tests/test_public_contract.py calls it positionally like torch.
    ("ctc_loss", "blank"): "torch.nn.functional.ctc_loss drop-in",
    ("ctc_loss", "reduction"): "torch.nn.functional.ctc_loss drop-in",
    ("ctc_loss", "zero_infinity"): "torch.nn.functional.ctc_loss drop-in",
    # torchaudio.functional.forced_align(log_probs, targets, input_lengths, target_lengths, blank)
    ("forced_align", "blank"): "torchaudio.functional.forced_align drop-in",
    # the rest of the CTC family keeps blank where torch and torchaudio put it (after the tensors)
    ("ctc_posteriors", "blank"): "the CTC family's blank position (torch / torchaudio)",
    ("token_spans", "blank"): "torchaudio.functional.merge_tokens(tokens, scores, blank=0)",
    ("token_spans", "num_spans"): "the output size, a shape rather than a hyperparameter",
    # POT's ot.wasserstein_1d(u_values, v_values, u_weights=None, v_weights=None, p=1)
    ("wasserstein_1d", "p"): "POT ot.wasserstein_1d drop-in",
    # POT's ot.sliced.get_random_projections(d, n_projections, seed=None)
    ("random_projections", "d"): "POT ot.sliced.get_random_projections drop-in",
    ("random_projections", "n_projections"): "POT ot.sliced.get_random_projections drop-in",
    ("random_projections", "seed"): "POT ot.sliced.get_random_projections drop-in",
    # sizes that define the problem (like torch.bincount's minlength), not hyperparameters
    ("cohen_kappa", "num_classes"): "problem size",
    ("confusion_matrices", "num_classes"): "problem size",
    ("percent_agreement", "num_classes"): "problem size",
    ("weighted_majority_vote", "num_classes"): "problem size",
    ("bradley_terry", "num_players"): "problem size",
    ("elo_ratings", "num_players"): "problem size",
    ("keep_from_spans", "seq_len"): "problem size",
    # the watermark key is the input's identity (which hash), like a seed of the data, not a hyperparameter
    # the schedule object bundles the skip hyperparameters (like a trainer's config object)
    ("patch_ffn_skipping", "schedule"): "a SkipSchedule config object",
    ("gumbel_detect", "key"): "the watermark key",
    ("gumbel_sample", "key"): "the watermark key",
    ("kgw_detect", "key"): "the watermark key",
    ("kgw_greedy", "key"): "the watermark key",
    ("kgw_process", "key"): "the watermark key",
}

# Functions that reach an op with a twin (or a public function taking backend=) without taking backend=.
BACKEND_ALLOWED: dict[str, str] = {}

# Functions returning a plain tuple, and why.
TUPLE_ALLOWED: dict[str, str] = {}

# Calls that pass backend= a literal instead of the caller's choice, and why.
LITERAL_BACKEND_ALLOWED: dict[str, str] = {}

# Names retired in favour of the family's one name (TRL / torchaudio / POT spelling): they may only survive as
# deprecated aliases (alignops._api.renamed), never as a parameter.
RETIRED = {"simpo_gamma": "gamma", "nll_weight": "alpha", "compute_nll": "compute_nll_loss"}
# Not retired: ctc_segmentation / pseudo_forced_align keep ``lpz`` (and ``lpz_lengths``), the name of the
# ctc-segmentation package they are drop-ins for (docs/api-style.md: where users know a peer's name, it wins); the
# family name elsewhere is ``log_probs`` (torch, torchaudio).
LPZ_FUNCTIONS = {"ctc_segmentation", "pseudo_forced_align"}

TENSORISH = ("Tensor", "Sequence", "Module", "IO[", "Spans", "PseudoForcedAlignment", "Iterable")


def _public_functions() -> dict[str, types.FunctionType]:
    found: dict[str, types.FunctionType] = {}
    modules = [alignops] + [importlib.import_module(f"alignops.{m}") for m in FAMILIES]
    for mod in modules:
        names = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
        for n in names:
            f = getattr(mod, n)
            if (
                inspect.isfunction(f)
                and f.__module__.startswith("alignops.")
                and n not in HELPERS
                and not any(f.__module__ == f"alignops.{m}" for m in NOT_YET)
            ):
                found[n] = f
    return found


FUNCTIONS = _public_functions()


def _has_backend(f) -> bool:
    return "backend" in inspect.signature(f).parameters


def test_the_walk_finds_the_families():
    # a guard on the walk itself: a refactor that hid the functions would make every rule below vacuous
    for name in (
        "preference_loss",
        "forced_align",
        "sinkhorn",
        "sinkhorn_distance",
        "cca",
        "ima_score",
        "cohen_kappa",
        "kgw_process",
        "cpo_loss",
        "ctc_segmentation",
        "skip_ffn",
    ):
        assert name in FUNCTIONS, name
    assert len(FUNCTIONS) > 60


def _positional_non_tensors(f) -> list[str]:
    out = []
    for p in inspect.signature(f).parameters.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue
        ann = p.annotation
        if ann is inspect.Parameter.empty or any(t in str(ann) for t in TENSORISH):
            continue  # unannotated or tensor-like: data
        out.append(p.name)
    return out


def test_hyperparameters_are_keyword_only():
    bad = [
        f"{n}({p})"
        for n, f in sorted(FUNCTIONS.items())
        for p in _positional_non_tensors(f)
        if (n, p) not in POSITIONAL_ALLOWED
    ]
    assert not bad, f"positional hyperparameters (make them keyword-only, see docs/api-style.md): {bad}"


def test_positional_allow_list_is_current():
    stale = [
        k for k in POSITIONAL_ALLOWED if k[0] not in FUNCTIONS or k[1] not in _positional_non_tensors(FUNCTIONS[k[0]])
    ]
    assert not stale, f"allow-list entries that no longer apply (remove them): {stale}"


def test_backend_is_keyword_only_and_defaults_to_auto():
    for n, f in FUNCTIONS.items():
        p = inspect.signature(f).parameters.get("backend")
        if p is not None:
            assert p.kind == p.KEYWORD_ONLY and p.default == "auto", n


def _dispatch(f, backend_fns, seen) -> tuple[bool, list[str]]:
    """(does f reach torch.ops.alignops / _backend.resolve / a public function with backend=, the calls of f
    that pass backend= a literal instead of forwarding the caller's); private helpers are followed."""
    if f in seen:
        return False, []
    seen.add(f)
    try:
        src = textwrap.dedent(inspect.getsource(inspect.unwrap(f)))
    except (OSError, TypeError):
        return False, []
    reaches = "torch.ops.alignops" in src or "_backend.resolve" in src
    literal = []
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, ast.Call):
            continue
        for kw in node.keywords:
            if kw.arg == "backend" and isinstance(kw.value, ast.Constant):
                literal.append(ast.unparse(node)[:100])
        callee = f.__globals__.get(node.func.id) if isinstance(node.func, ast.Name) else None
        if inspect.isfunction(callee) and callee.__module__.startswith("alignops") and callee is not f:
            if callee in backend_fns:
                reaches = True
            elif callee.__name__.startswith("_"):
                reaches |= _dispatch(callee, backend_fns, seen)[0]
    return reaches, literal


def test_backend_wherever_an_implementation_is_chosen():
    backend_fns = {f for f in FUNCTIONS.values() if _has_backend(f)}
    missing, literal = [], []
    for n, f in sorted(FUNCTIONS.items()):
        reaches, lits = _dispatch(f, backend_fns, set())
        if reaches and not _has_backend(f) and n not in BACKEND_ALLOWED:
            missing.append(n)
        if n not in LITERAL_BACKEND_ALLOWED:
            literal += [f"{n}: {c}" for c in lits]
        elif not lits:
            literal.append(f"{n}: allow-listed in LITERAL_BACKEND_ALLOWED but passes no literal (remove the entry)")
    assert not missing, f"functions that reach an op with several implementations but take no backend=: {missing}"
    assert not literal, f"calls that replace the caller's backend by a literal: {literal}"


TAIL = ("reduction", "backend", "check_values")
# torch.nn.functional.ctc_loss's drop-in: reduction sits among its positional arguments, before zero_infinity.
TAIL_ALLOWED = {"ctc_loss": "torch.nn.functional.ctc_loss drop-in"}


def test_reduction_backend_check_values_close_every_signature():
    bad = []
    for n, f in sorted(FUNCTIONS.items()):
        params = [p.name for p in inspect.signature(f).parameters.values() if p.kind != p.VAR_KEYWORD]
        tail = [p for p in params if p in TAIL]
        if tail and n not in TAIL_ALLOWED and (params[-len(tail) :] != tail or tail != sorted(tail, key=TAIL.index)):
            bad.append(f"{n}: ...{params[-len(tail) - 1 :]}")
    assert not bad, f"reduction, backend, check_values must end the signature in that order: {bad}"


def test_several_outputs_are_named_tuples():
    bad = []
    for n, f in sorted(FUNCTIONS.items()):
        ret = str(inspect.signature(f).return_annotation)
        if ret.replace(" ", "").startswith(("tuple[", "Tuple[")) and n not in TUPLE_ALLOWED:
            bad.append(f"{n} -> {ret}")
    assert not bad, f"plain tuples (return a NamedTuple: it still unpacks like one): {bad}"
    stale = [
        n
        for n in TUPLE_ALLOWED
        if n not in FUNCTIONS or not str(inspect.signature(FUNCTIONS[n]).return_annotation).startswith("tuple[")
    ]
    assert not stale, f"allow-list entries that no longer apply: {stale}"


def test_retired_names_survive_only_as_aliases():
    bad = [f"{n}({p})" for n, f in sorted(FUNCTIONS.items()) for p in inspect.signature(f).parameters if p in RETIRED]
    assert not bad, f"retired names as parameters (use {RETIRED}): {bad}"
    aliased = {old for f in FUNCTIONS.values() for old in getattr(f, "__deprecated_aliases__", {})}
    assert aliased == set(RETIRED), aliased


# ---- the shims: the old spelling works, warns, and means the same ----------------------------------------


def _same(old, new):
    if isinstance(new, tuple):
        for a, b in zip(old, new):
            _same(a, b)
    elif isinstance(new, torch.Tensor):
        torch.testing.assert_close(old, new, rtol=0, atol=0)
    else:
        assert old == new


def _old_and_new(old_call, new_call, match):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling must not warn
        new = new_call()
    with pytest.warns(DeprecationWarning, match=match):
        old = old_call()
    _same(old, new)


def test_forced_align_output_is_named_and_unpacks():
    lp = torch.randn(2, 7, 5).log_softmax(-1)
    targets = torch.tensor([[1, 2, 3], [4, 4, 0]])
    out = alignops.forced_align(lp, targets, target_lengths=torch.tensor([3, 2]))
    paths, scores = out  # torchaudio's (alignments, scores)
    assert type(out).__name__ == "ForcedAlignOutput" and out._fields == ("alignments", "scores")
    assert out.alignments is paths and out.scores is scores


def test_nll_weight_names_are_peers_names():
    """alpha (TRL's cpo_alpha / rpo_alpha, Liger's alpha) and compute_nll_loss (Liger's); the old keywords warn."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 3, 8, generator=g), torch.randn(11, 8, generator=g)
    y = torch.randint(0, 11, (4, 3), generator=g)
    _old_and_new(
        lambda: alignops.fused_linear_preference_loss(h, w, y, nll_weight=0.5),
        lambda: alignops.fused_linear_preference_loss(h, w, y, alpha=0.5),
        "nll_weight= is deprecated",
    )
    old = alignops.nn.FusedLinearPreferenceLoss
    _old_and_new(lambda: old(nll_weight=0.5)(w, h, y), lambda: old(alpha=0.5)(w, h, y), "nll_weight= is deprecated")
    pc, pr = -torch.rand(5, generator=g) - 0.1, -torch.rand(5, generator=g) - 0.1
    orpo = alignops.objectives.orpo_loss
    _old_and_new(
        lambda: orpo(pc, pr, torch.rand(5, generator=g), compute_nll=False),
        lambda: orpo(pc, pr, torch.rand(5, generator=g), compute_nll_loss=False),
        "compute_nll= is deprecated",
    )


def test_sinkhorn_distance_eps_positional_is_deprecated():
    x, y = torch.rand(2, 5, 3, dtype=torch.float64), torch.rand(2, 4, 3, dtype=torch.float64)
    a = torch.full((5,), 0.2, dtype=torch.float64)
    _old_and_new(
        lambda: alignops.ot.sinkhorn_distance(x, y, 0.1, 1.5, a, n_iters=20),
        lambda: alignops.ot.sinkhorn_distance(x, y, a, eps=0.1, p=1.5, n_iters=20),
        "eps, p, a",
    )
    _old_and_new(
        lambda: alignops.ot.sinkhorn_distance(x, y, 0.1, n_iters=20),
        lambda: alignops.ot.sinkhorn_distance(x, y, eps=0.1, n_iters=20),
        "passing eps positionally",
    )


def test_keyword_only_shims():
    g = torch.Generator().manual_seed(0)
    H1, H2 = torch.randn(20, 4, generator=g), torch.randn(20, 3, generator=g)
    _old_and_new(lambda: alignops.cca(H1, H2, 2, 0.1), lambda: alignops.cca(H1, H2, k=2, reg=0.1), "k, reg")
    _old_and_new(
        lambda: alignops.linear_cka(H1, H2, True), lambda: alignops.linear_cka(H1, H2, debiased=True), "debiased"
    )
    X, Y = torch.randn(30, 3, generator=g), torch.randn(25, 3, generator=g)
    _old_and_new(
        lambda: alignops.sliced_wasserstein(X, Y, 8, 3),
        lambda: alignops.sliced_wasserstein(X, Y, n_projections=8, seed=3),
        "n_projections, seed",
    )
    sim = torch.randn(6, 5, generator=g)
    _old_and_new(
        lambda: alignops.ot.sinkhorn_normalize(sim, 3),
        lambda: alignops.ot.sinkhorn_normalize(sim, n_iters=3),
        "n_iters",
    )
    with pytest.raises(TypeError, match="multiple values for argument 'k'"):
        alignops.cca(H1, H2, 2, k=2)


def test_renamed_keywords():
    g = torch.Generator().manual_seed(1)
    pc, pr = -torch.rand(4, generator=g) * 5, -torch.rand(4, generator=g) * 5
    _old_and_new(
        lambda: alignops.cpo_loss(pc, pr, loss_type="simpo", simpo_gamma=0.3),
        lambda: alignops.cpo_loss(pc, pr, loss_type="simpo", gamma=0.3),
        "simpo_gamma= is deprecated",
    )
    with pytest.raises(TypeError, match="both gamma= and its deprecated alias simpo_gamma="):
        alignops.cpo_loss(pc, pr, gamma=0.3, simpo_gamma=0.3)


def test_lpz_only_where_the_peer_spells_it():
    have = {n for n, f in FUNCTIONS.items() if "lpz" in inspect.signature(f).parameters}
    assert have == LPZ_FUNCTIONS, have


def _preference_from_hidden(backend):
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(4, 3, 8, generator=g), torch.randn(11, 8, generator=g)
    targets = torch.randint(0, 11, (4, 3), generator=g)
    alignops.fused_linear_preference_loss(hidden, weight, targets, backend=backend)


def _policy_from_hidden(backend):
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(2, 4, 8, generator=g), torch.randn(11, 8, generator=g)
    ids, adv = torch.randint(0, 11, (2, 4), generator=g), torch.randn(2, generator=g)
    alignops.fused_linear_policy_loss(hidden, weight, ids, adv, backend=backend)


# Both used to call their loss with backend="auto" (the policy one unless "torch") whatever the caller chose.
@pytest.mark.parametrize(
    "module, loss, call",
    [
        ("fused_linear", "preference_loss", _preference_from_hidden),
        ("fused_linear_policy", "policy_loss", _policy_from_hidden),
    ],
)
def test_fused_losses_forward_the_backend(monkeypatch, module, loss, call):
    seen = []
    module = getattr(alignops, module)
    real = getattr(module, loss)

    def spy(*args, **kwargs):
        seen.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, loss, spy)
    for backend in ("torch", "native"):
        call(backend)
    assert seen == ["torch", "native"]


def test_patch_ffn_skipping_options_are_keyword_only():
    from alignops.skip import patch_ffn_skipping

    params = inspect.signature(patch_ffn_skipping).parameters
    assert params["prepack"].kind is params["backend"].kind is inspect.Parameter.KEYWORD_ONLY
    assert patch_ffn_skipping.__deprecated_positional__ == ("prepack", "backend")


def test_add_fused_lm_head_takes_keywords_and_backend(import_peer):
    import_peer("trl")  # skips where TRL is not installed (the torch 2.13 run of .ci/torch_compat.sh)
    trl = import_peer("alignops.integrations.trl")
    params = inspect.signature(trl.add_fused_lm_head).parameters
    assert [n for n, p in params.items() if p.kind is not inspect.Parameter.KEYWORD_ONLY] == ["model"]
    assert params["backend"].default == "auto"
    assert trl.add_fused_lm_head.__deprecated_positional__ == ("temperature", "cast_lm_head_to_fp32", "outputs")
