"""Tensors on more than one device, and the meta device (issue 13, item 4).

A meta tensor among CPU tensors makes the dispatcher run an op's fake kernel, which returned uninitialised
CPU memory without an error: every op now checks that its tensors share one device and names the argument
that differs. Meta inputs to the public functions propagate shapes, or raise an error that says what to pass.
"""

import pytest
import torch

import alignops
from alignops import ctc, metrics, watermark

M = torch.device("meta")


def _fused_linear(meta):
    h, w, t = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    b = torch.randn(11)
    args = dict(hidden=h, weight=w, targets=t, bias=b)
    args[meta] = args[meta].to(M)
    return lambda: torch.ops.alignops.fused_linear_logprobs(
        args["hidden"], args["weight"], args["targets"], args["bias"], -100, 1.0, 1.0, 0.0, False
    )


def _skip_ffn_keep():
    x, wg, wd = torch.randn(6, 8), torch.randn(32, 8), torch.randn(8, 16)
    keep = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool, device=M)
    return lambda: torch.ops.alignops.skip_ffn(x, keep, wg, wd, None, None, None, 0, 1e-6, False)


def _kgw_context():
    logits, context = torch.randn(3, 17), torch.randint(0, 17, (3, 2), device=M)
    return lambda: torch.ops.alignops.kgw_logits(logits, context, 7, 0.25, 2.0)


def _utterance_score_starts():
    fl = torch.randn(2, 12)
    starts, ends = torch.tensor([[0, 3], [1, 5]], device=M), torch.tensor([[3, 8], [5, 12]])
    return lambda: torch.ops.alignops.ctc_segmentation_utterance_score(fl, starts, ends, 3)


def _forced_align_targets():
    lp = torch.randn(1, 12, 5).log_softmax(-1)
    targets = torch.tensor([[1, 2, 3]], device=M)
    lengths = torch.tensor([12]), torch.tensor([3])
    return lambda: torch.ops.alignops.forced_align(lp, targets, *lengths, 0, None, -1, 0)


def _ctc_posteriors_lengths():
    lp = torch.randn(2, 12, 5).log_softmax(-1)
    targets, il, tl = torch.tensor([[1, 2], [3, 4]]), torch.tensor([12, 10]), torch.tensor([2, 2], device=M)
    return lambda: torch.ops.alignops.ctc_posteriors(lp, targets, il, tl, 0, True, False, False)


def _wasserstein_weights():
    u, v = torch.randn(2, 7), torch.randn(2, 9)
    return lambda: torch.ops.alignops.wasserstein_1d(u, v, None, torch.rand(2, 9, device=M), 1.0)


@pytest.mark.parametrize(
    "call, message",
    [
        (_fused_linear("weight"), r"weight must be on the device of hidden \(cpu\), got meta"),
        (_fused_linear("bias"), r"bias must be on the device of hidden \(cpu\), got meta"),
        (_fused_linear("targets"), r"targets must be on the device of hidden \(cpu\), got meta"),
        (_fused_linear("hidden"), r"weight must be on the device of hidden \(meta\), got cpu"),
        (_skip_ffn_keep(), r"keep must be on the device of x \(cpu\), got meta"),
        (_kgw_context(), r"context must be on the device of logits \(cpu\), got meta"),
        (_utterance_score_starts(), r"starts must be on the device of frame_logprobs \(cpu\), got meta"),
        (_forced_align_targets(), r"targets must be on the device of log_probs \(cpu\), got meta"),
        (_ctc_posteriors_lengths(), r"target_lengths must be on the device of log_probs \(cpu\), got meta"),
        (_wasserstein_weights(), r"v_weights must be on the device of u \(cpu\), got meta"),
    ],
    ids=[
        "fll-weight",
        "fll-bias",
        "fll-targets",
        "fll-hidden",
        "skip-keep",
        "kgw-context",
        "utt-starts",
        "forced-align-targets",
        "ctc-posteriors-lengths",
        "w1d-weights",
    ],
)
def test_raw_op_names_the_argument_on_another_device(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_public_functions_name_the_argument_on_the_meta_device():
    h, w, t = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    with pytest.raises(ValueError, match=r"weight must be on the device of hidden \(cpu\), got meta"):
        alignops.fused_linear_logprobs(h, w.to(M), t)
    with pytest.raises(ValueError, match=r"bias must be on the device of hidden \(cpu\), got meta"):
        alignops.fused_linear_logprobs(h, w, t, bias=torch.zeros(11, device=M))
    x, wg, wd = torch.randn(6, 8), torch.randn(32, 8), torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"keep must be on the device of x \(cpu\), got meta"):
        alignops.skip_ffn(x, wg, wd, keep=torch.ones(6, dtype=torch.bool, device=M))
    with pytest.raises(ValueError, match=r"context must be on the device of logits \(cpu\), got meta"):
        watermark.kgw_process(torch.randn(3, 17), torch.zeros(3, 2, dtype=torch.long, device=M), 7)
    paths = torch.tensor([[0, 1, 1, 0, 2]])
    with pytest.raises(ValueError, match=r"frame_scores must be on the device of paths \(cpu\), got meta"):
        ctc.token_spans(paths, torch.zeros(1, 5, device=M))
    gt = torch.tensor([[[1, -1], [2, -1], [3, -1]]])
    with pytest.raises(ValueError, match=r"ground_truth must be on the device of lpz \(cpu\), got meta"):
        ctc.ctc_segmentation(torch.randn(1, 20, 5).log_softmax(-1), gt.to(M))


def test_meta_inputs_propagate_shapes():
    B, T, C, L = 2, 12, 5, 3
    lp = torch.empty(B, T, C, device=M)
    targets = torch.empty(B, L, dtype=torch.long, device=M)
    il, tl = torch.empty(B, dtype=torch.long, device=M), torch.empty(B, dtype=torch.long, device=M)
    paths, scores = ctc.forced_align(lp, targets, il, tl)
    assert (paths.device, paths.shape, paths.dtype) == (M, (B, T), torch.long)
    assert (scores.device, scores.shape) == (M, (B, T))
    loss = ctc.ctc_loss(lp, targets, il, tl, reduction="none")
    assert (loss.device, loss.shape) == (M, (B,))
    post = ctc.ctc_posteriors(lp, targets, il, tl)
    assert post.loss.shape == (B,) and post.states.device == M
    score = ctc.utterance_score(
        torch.empty(B, T, device=M),
        torch.zeros(B, 4, dtype=torch.long, device=M),
        torch.zeros(B, 4, dtype=torch.long, device=M),
        window=3,
    )
    assert (score.device, score.shape) == (M, (B, 4))
    logp = alignops.selective_logprobs(torch.empty(4, 11, device=M), torch.zeros(4, dtype=torch.long, device=M))
    assert (logp.device, logp.shape) == (M, (4,))
    seq = alignops.sequence_logprobs(torch.empty(2, 3, 11, device=M), torch.zeros(2, 3, dtype=torch.long, device=M))
    assert (seq.sum.device, seq.sum.shape) == (M, (2,))
    spans = ctc.token_spans(torch.empty(B, T, dtype=torch.long, device=M), num_spans=4)
    assert (spans.start.device, spans.start.shape) == (M, (B, 4))
    a = torch.empty(2, 50, dtype=torch.long, device=M)
    kappa = metrics.cohen_kappa(a, a, num_classes=3)
    assert (kappa.value.device, kappa.value.shape) == (M, (2,))


def test_meta_inputs_that_need_values_say_what_to_pass():
    with pytest.raises(ValueError, match="token_spans: paths is a meta tensor, which holds no values; pass num_spans"):
        ctc.token_spans(torch.empty(2, 12, dtype=torch.long, device=M))
    a = torch.empty(2, 50, dtype=torch.long, device=M)
    with pytest.raises(
        ValueError, match="confusion_matrices: a is a meta tensor, which holds no values; pass num_classes"
    ):
        metrics.cohen_kappa(a, a)
    lp = torch.empty(2, 12, 5, device=M)
    with pytest.raises(
        ValueError,
        match="ctc_posteriors: target_lengths is a meta tensor, which holds no values; concatenated 1-D targets",
    ):
        ctc.ctc_loss(
            lp, torch.empty(6, dtype=torch.long, device=M), [12, 12], torch.empty(2, dtype=torch.long, device=M)
        )
