"""``check_values=False``: the checks that read tensor values (a host sync each on a GPU) are skipped, the same
checks still raise with their messages when on, and torch.compile(fullgraph=True) goes through calls that
broke the graph on those reads. CUDA-graph capture itself needs a GPU (bench/gpu_check.sh); here the checks
are seen to be skipped: an invalid value passes through where the kernel is safe with it, and elsewhere the
check function is seen not to run."""

import pytest
import torch

import alignops
import alignops.ctc_posteriors
import alignops.ot
from alignops import metrics as M

triton_only = pytest.mark.skipif(not alignops._backend.triton_available(), reason="needs the triton package")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---- invalid values pass through the kernels that are safe with them ---------------------------------------


@triton_only
@pytest.mark.triton
def test_selective_logprobs_target_out_of_range():
    logits = torch.randn(4, 19, device=DEVICE)
    targets = torch.tensor([3, 19, -100, 0], device=DEVICE)
    with pytest.raises(ValueError, match=r"targets\[1\] = 19 is out of range"):
        alignops.selective_logprobs(logits, targets, backend="triton")
    logp = alignops.selective_logprobs(logits, targets, backend="triton", check_values=False)
    assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2, 3]]).all()


@triton_only
@pytest.mark.triton
def test_fused_linear_target_out_of_range():
    hidden, weight = torch.randn(3, 8, device=DEVICE), torch.randn(11, 8, device=DEVICE)
    targets = torch.tensor([2, 11, 5], device=DEVICE)
    with pytest.raises(ValueError, match=r"targets\[1\] = 11 is out of range"):
        alignops.fused_linear_logprobs(hidden, weight, targets, backend="triton")
    logp = alignops.fused_linear_logprobs(hidden, weight, targets, backend="triton", check_values=False).logp
    assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2]]).all()


@triton_only
@pytest.mark.triton
def test_confusion_labels_out_of_range():
    a = torch.randint(0, 3, (2, 12), device=DEVICE)
    b = torch.randint(0, 3, (12,), device=DEVICE)
    for backend in ("triton", "torch"):
        with pytest.raises(
            ValueError,
            match=r"a must hold class labels in \[0, num_classes\) = \[0, 3\), got "
            r"values in \[0, 3\]",
        ):
            M.confusion_matrices(a + (a == 2), b, 3, backend=backend)
    # The Triton kernel miscounts such labels and touches nothing out of bounds.
    out = M.confusion_matrices(a + (a == 2), b, 3, n_bootstrap=2, backend="triton", check_values=False)
    assert out.shape == (2, 3, 3, 3)
    # The raw op reads nothing back: the public function is where labels are checked.
    torch.ops.alignops.bootstrap_confusion_triton(a + 3, a, 3, 0, 0)


def test_token_and_word_spans_beyond_their_capacity():
    paths = torch.tensor([[1, 1, 0, 2, 3, 3, 0, 4], [0, 5, 0, 0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"num_spans=2 is fewer than the spans of a row \(4\)"):
        alignops.ctc.token_spans(paths, num_spans=2)
    spans = alignops.ctc.token_spans(paths, num_spans=2, check_values=False)
    assert spans.token.tolist() == [[1, 2], [5, -1]]  # the first num_spans spans of the row
    assert spans.count.tolist() == [4, 1]
    lengths = torch.tensor([[1, 2], [1, 1]])  # row 1 asks for 2 tokens, it has 1 span
    with pytest.raises(ValueError, match="word_lengths asks for more tokens than a row has spans"):
        alignops.ctc.word_spans(spans, lengths)
    with pytest.raises(ValueError, match="word_lengths must be >= 0"):
        alignops.ctc.word_spans(spans, -lengths)
    words = alignops.ctc.word_spans(spans, lengths, check_values=False)
    assert words.token[0].tolist() == [1, 2] and words.count.tolist() == [2, 2]


def test_sinkhorn_marginals_unchecked():
    cost = torch.rand(2, 5, 6, dtype=torch.float64)
    a, b = torch.full((2, 5), 0.2, dtype=torch.float64), torch.full((2, 6), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="a and b must have the same total mass in every problem"):
        alignops.ot.sinkhorn(cost, a, b, eps=0.1, n_iters=5)
    with pytest.raises(ValueError, match="a must hold finite non-negative weights"):
        alignops.ot.sinkhorn(cost, -a, b, eps=0.1, n_iters=5)
    out = alignops.ot.sinkhorn(cost, a, b, eps=0.1, n_iters=5, check_values=False)
    assert out.f.shape == (2, 5)


def test_metric_ranges_unchecked():
    c, r = torch.randn(2, 30), torch.randn(2, 30)
    prob = torch.full((30,), 1.5)
    with pytest.raises(ValueError, match=r"preference_prob must hold probabilities in \[0, 1\]"):
        M.idealized_ranking_accuracy(c, r, prob, beta=0.1)
    M.idealized_ranking_accuracy(c, r, prob, beta=0.1, check_values=False)
    with pytest.raises(ValueError, match=r"confidences must lie in \[0, 1\]"):
        M.expected_calibration_error(prob, torch.ones(30))
    M.expected_calibration_error(prob, torch.ones(30), check_values=False)


# ---- checks whose invalid values a kernel would not survive: the check is seen not to run --------------------


@pytest.fixture
def spy(monkeypatch):
    """spy(module, name): replace a check function by one that raises, to see whether it runs."""

    def install(module, name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"{name} ran")

        monkeypatch.setattr(module, name, refuse)

    return install


def test_ctc_posteriors_and_loss_skip_the_value_check(spy):
    lp = torch.randn(2, 7, 5).log_softmax(-1)
    targets, il, tl = torch.tensor([[1, 2, 0], [3, 3, 4]]), torch.tensor([7, 6]), torch.tensor([2, 3])
    spy(alignops.ctc_posteriors, "run_value_checks")
    with pytest.raises(AssertionError, match="run_value_checks ran"):
        alignops.ctc_loss(lp, targets, il, tl)
    loss = alignops.ctc_loss(lp, targets, il, tl, reduction="none", check_values=False)
    post = alignops.ctc.ctc_posteriors(lp, targets, il, tl, check_values=False)
    torch.testing.assert_close(post.loss, loss)


def test_forced_align_skips_the_value_check(spy):
    lp = torch.randn(2, 9, 6).log_softmax(-1)
    targets = torch.tensor([[1, 2, 3], [4, 4, 0]])
    spy(alignops.ctc, "run_value_checks")
    with pytest.raises(AssertionError, match="run_value_checks ran"):
        alignops.ctc.forced_align(lp, targets, target_lengths=torch.tensor([3, 2]), backend="torch")
    paths, _ = alignops.ctc.forced_align(
        lp, targets, target_lengths=torch.tensor([3, 2]), backend="torch", check_values=False, on_infeasible="skip"
    )
    assert paths.shape == (2, 9)


def test_given_eps_scaling_start_reads_nothing(spy):
    cost = torch.rand(3, 6, 5, dtype=torch.float64) * 2
    R = alignops.ot.solver._cost_range(cost, None, None)
    x, y = torch.randn(2, 6, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    lo, hi = torch.minimum(x.amin((0, 1)), y.amin((0, 1))), torch.maximum(x.amax((0, 1)), y.amax((0, 1)))
    diameter = float((hi - lo).norm())
    expected = alignops.ot.sinkhorn(cost, eps=0.05, n_iters=40, eps_scaling=0.5)
    expected_d = alignops.ot.sinkhorn_distance(x, y, eps=0.05, n_iters=40, eps_scaling=0.5)
    spy(alignops.ot.solver, "_cost_range")  # where sinkhorn looks it up
    got = alignops.ot.sinkhorn(cost, eps=0.05, n_iters=40, eps_scaling=0.5, cost_range=R)
    torch.testing.assert_close(got.f, expected.f)
    torch.testing.assert_close(got.n_iters, expected.n_iters)
    got_d = alignops.ot.sinkhorn_distance(x, y, eps=0.05, n_iters=40, eps_scaling=0.5, diameter=diameter)
    torch.testing.assert_close(got_d.value, expected_d.value)


# ---- torch.compile(fullgraph=True) through calls that read values before -------------------------------------


def test_compile_fullgraph_without_value_reads():
    torch._dynamo.reset()
    paths = torch.tensor([[1, 1, 0, 2, 3, 3, 0, 4], [0, 5, 0, 0, 0, 0, 0, 7]])
    lengths = torch.tensor([[1, 3], [2, 0]])

    def spans(p):  # the span counts and word lengths were read
        s = alignops.ctc.token_spans(p, num_spans=4, check_values=False)
        return alignops.ctc.word_spans(s, lengths, check_values=False).start

    torch.testing.assert_close(torch.compile(spans, fullgraph=True, backend="aot_eager")(paths), spans(paths))

    cost = torch.rand(2, 6, 5, dtype=torch.float64)

    def ot(c):  # eps scaling read the cost range
        return alignops.ot.sinkhorn(c, eps=0.05, n_iters=30, eps_scaling=0.5, cost_range=1.0, check_values=False).f

    torch.testing.assert_close(torch.compile(ot, fullgraph=True, backend="aot_eager")(cost), ot(cost))

    a, b = torch.randint(0, 3, (2, 20)), torch.randint(0, 3, (20,))

    def kappa(x, y):  # the labels' range check read them
        return M.cohen_kappa(x, y, 3, backend="torch", check_values=False).value

    torch.testing.assert_close(torch.compile(kappa, fullgraph=True, backend="aot_eager")(a, b), kappa(a, b))


def test_compile_fullgraph_breaks_on_the_value_reads():
    """Why the flag exists: with the checks on, the same calls read values and cannot trace as one graph."""
    torch._dynamo.reset()
    paths = torch.tensor([[1, 1, 0, 2, 3, 3, 0, 4]])
    fn = torch.compile(lambda p: alignops.ctc.token_spans(p, num_spans=4).start, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="(?i)data.dependent|item|graph break|unsupported"):
        fn(paths)
