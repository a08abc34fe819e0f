"""CTC forward-backward: occupancy ("alignment matrix") per frame and state or token, and the CTC loss with
the exact gradient for any scores (re-exported by ``alignops.ctc``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _backend
from ._checks import check_has_values, values_checkable
from ._dtypes import acc_dtype
from ._errors import AlignopsError
from .ops._registration import run_checks, run_value_checks
from .reference import ctc_posteriors as _ref

_OUTPUTS = ("states", "tokens", "both")
_REDUCTIONS = ("mean", "sum", "none")


class CTCPosteriors(NamedTuple):
    loss: torch.Tensor  # [B]: -log p(targets | scores); inf where no alignment exists
    states: torch.Tensor | None  # [B, T, 2L+1] occupancy of every trellis state (output "states" / "both")
    tokens: torch.Tensor | None  # [B, T, L] occupancy of every target token (output "tokens" / "both")


def _lengths(x, log_probs: torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)):
        return _backend.to_device(torch.tensor(x, dtype=torch.long), log_probs.device)
    raise AlignopsError(f"{name} must be a tensor or a list of ints, got {type(x).__name__}")


def _padded(targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """torch's concatenated 1-D layout -> [B, max(target_lengths)] padded (reads the lengths: one sync)."""
    if target_lengths.dim() != 1 or target_lengths.dtype not in (torch.int64, torch.int32):
        raise AlignopsError("target_lengths must be an int64 or int32 tensor of shape [B]")
    check_has_values(
        "ctc_posteriors",
        "target_lengths",
        target_lengths,
        "concatenated 1-D targets are padded by their lengths: pass padded [B, L] targets",
    )
    total = int(target_lengths.sum()) if target_lengths.numel() else 0
    if (target_lengths < 0).any() or total != targets.numel():
        raise AlignopsError(
            f"concatenated 1-D targets need non-negative target_lengths summing to targets.numel() "
            f"= {targets.numel()}, got a sum of {total}"
        )
    L = int(target_lengths.max()) if target_lengths.numel() else 0
    start = torch.cumsum(target_lengths.long(), 0) - target_lengths.long()
    j = torch.arange(L, device=targets.device)
    used = j < target_lengths[:, None]
    idx = torch.where(used, start[:, None] + j, 0)
    return torch.where(used, targets[idx] if targets.numel() else torch.zeros_like(idx), 0).to(targets.dtype)


def _nan_frames(log_probs, targets, input_lengths, target_lengths, blank) -> torch.Tensor:
    """[B, T] bool: the frames before the input length of the rows whose alignments read a NaN (a NaN at the
    row's blank or target classes at such a frame). The kernels treat a NaN score as an impossible step, so
    such a row would come back inf, which zero_infinity turns into 0, with a gradient of 0: torch's ctc_loss
    returns NaN for the loss and for the gradient at every class of these frames, and so does alignops."""
    T, L = log_probs.shape[1], targets.shape[1]
    frames = torch.arange(T, device=log_probs.device) < input_lengths[:, None]
    used = torch.arange(L, device=targets.device) < target_lengths[:, None]
    classes = torch.cat([torch.full_like(targets[:, :1], blank), torch.where(used, targets, blank)], 1).long()
    read = log_probs.detach().gather(2, classes[:, None, :].expand(-1, T, -1))
    return (read.isnan().any(2) & frames).any(1, keepdim=True) & frames


class _NaNFramesGrad(torch.autograd.Function):
    """Identity on log_probs whose backward sets the gradient of the given [B, T] frames to NaN (every class),
    as torch's ctc_loss does for a row that reads a NaN score."""

    @staticmethod
    def forward(ctx, log_probs, frames):
        ctx.save_for_backward(frames)
        return log_probs.view_as(log_probs)

    @staticmethod
    def backward(ctx, grad):
        (frames,) = ctx.saved_tensors
        return torch.where(frames[:, :, None], torch.nan, grad), None


def _with_nan_grad(log_probs: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and log_probs.requires_grad:
        return _NaNFramesGrad.apply(log_probs, frames)
    return log_probs


def _prepare(log_probs, targets, input_lengths, target_lengths, blank, check_values):
    if not isinstance(log_probs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise AlignopsError("log_probs and targets must be tensors")
    input_lengths = _lengths(input_lengths, log_probs, "input_lengths")
    target_lengths = _lengths(target_lengths, log_probs, "target_lengths")
    if targets.dim() == 1:
        targets = _padded(targets, target_lengths)
    run_checks(
        "alignops::ctc_posteriors", log_probs, targets, input_lengths, target_lengths, blank, False, False, False
    )
    if check_values and values_checkable(log_probs):
        run_value_checks("alignops::ctc_posteriors", log_probs, targets, input_lengths, target_lengths, blank)
    return targets, input_lengths, target_lengths


def ctc_posteriors(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: torch.Tensor | Sequence[int],
    target_lengths: torch.Tensor | Sequence[int],
    blank: int = 0,
    *,
    output: str = "states",
    backend: str = "auto",
    check_values: bool = True,
) -> CTCPosteriors:
    r"""CTC forward-backward: the loss and the occupancy gamma of every frame and trellis state (or token).

    The standard 2L+1 trellis (state 2j+1 = token j, even states = blank). With ``e_t(s) =
    log_probs[b, t, label(s)]``:
    ``alpha_t(s) = logsumexp(alpha_{t-1}(s), alpha_{t-1}(s-1), [alpha_{t-1}(s-2) if label(s) != blank and
    label(s) != label(s-2)]) + e_t(s)``, beta the same backwards, ``log Z = logsumexp(alpha_{T-1}(S-1),
    alpha_{T-1}(S-2))``, ``gamma_t(s) = exp(alpha_t(s) + beta_t(s) - log Z)`` (each row sums to 1),
    ``loss = -log Z``. The scores need not be normalised (any real scores per frame and class).

    Shapes: ``log_probs`` [B, T, C] (batch first), ``targets`` [B, L] padded (entries past
    ``target_lengths`` ignored) or torch's concatenated 1-D layout, ``input_lengths`` / ``target_lengths``
    [B] (tensors or lists). ``output``: ``"states"`` -> ``states`` [B, T, 2L+1]; ``"tokens"`` -> ``tokens``
    [B, T, L], the occupancy of each token's state (blank occupancy = 1 - the row sum); ``"both"``.
    Frames past ``input_lengths``, states past 2 * target_lengths + 1 and utterances without any alignment
    (T < L + number of repeated neighbours, or all alignments of score -inf) get 0; those get loss inf.

    Precision: alpha and beta are accumulated in the log domain in fp64 for every input dtype (rows of gamma
    sum to 1 within 1e-10 before the final rounding at T = 1e5). Outputs: fp32 (fp64 for fp64 inputs);
    inputs fp32 / fp64 / fp16 / bf16, targets and lengths int32 / int64.

    Memory (CPU kernel, ``output="tokens"`` is the light mode: nothing of size [B, T, 2L+1] is stored).
    Besides the outputs (and the [B, T, C] gradient when ``log_probs`` requires grad), each thread holds the
    fp64 alpha of its utterance while T (2L+1) * 8 bytes <= 64 MB; beyond that alpha is checkpointed every
    ceil(sqrt(T)) frames and recomputed block by block (one extra alpha pass), O((2L+1) sqrt(T)) fp64:
    92 MB for T = 45000, L = 13500 (twice that when a single utterance runs on two threads), where a stored
    alpha takes T (2L+1) cells (4.9 GB in fp32, as torch's ctc_loss does, plus as much for beta). The Triton
    kernel (GPU) stores the fp64 log-alpha of every frame and the [B, T, 2L+1] occupancy in every mode.

    Devices / backends: ``"native"`` C++ CPU kernel (threads over the batch; a single long utterance runs
    alpha and beta concurrently on two threads; states vectorised);
    ``"triton"`` GPU kernel (one program per utterance); ``"torch"`` the fp64 reference; ``"auto"`` native
    on CPU, Triton on GPU. The occupancy is not differentiable; the loss is (see :func:`ctc_loss`).

    Raises ValueError for wrong ranks / dtypes / devices, ``blank`` outside [0, C), lengths outside
    [0, T] / [0, L], and target ids equal to ``blank`` or outside [0, C). Checking the values reads them:
    one host sync on a GPU, as torch's ctc_loss. ``check_values=False`` skips the checks that read tensor
    values on the device, so the call neither syncs nor breaks CUDA-graph capture (with padded [B, L]
    targets and tensor lengths on the device: the 1-D layout reads the lengths to pad, and lists are copied
    to the device). Unchecked values are the caller's promise: the CPU kernel still checks them, the Triton
    kernel would read and write out of bounds for lengths outside [0, T] / [0, L].
    """
    if output not in _OUTPUTS:
        raise AlignopsError(f"output must be one of {_OUTPUTS}, got {output!r}")
    targets, input_lengths, target_lengths = _prepare(
        log_probs, targets, input_lengths, target_lengths, blank, check_values
    )
    want_states, want_tokens = output in ("states", "both"), output in ("tokens", "both")
    impl = _backend.resolve(backend, log_probs.device, "ctc_posteriors", native_cuda=False)
    nan_frames = _nan_frames(log_probs, targets, input_lengths, target_lengths, blank)
    log_probs = _with_nan_grad(log_probs, nan_frames)
    if impl == "torch":
        acc = acc_dtype(log_probs.dtype)
        loss, gamma = _ref.forward_backward(log_probs, targets, input_lengths, target_lengths, blank)
        loss = torch.where(nan_frames.any(1), torch.nan, loss)
        return CTCPosteriors(
            loss.to(acc),
            gamma.to(acc) if want_states else None,
            _ref.token_occupancy(gamma).to(acc) if want_tokens else None,
        )
    op = torch.ops.alignops.ctc_posteriors if impl == "native" else torch.ops.alignops.ctc_posteriors_triton
    compute_grad = torch.is_grad_enabled() and log_probs.requires_grad
    loss, states, tokens, _ = op(
        log_probs, targets, input_lengths, target_lengths, blank, want_states, want_tokens, compute_grad
    )
    loss = torch.where(nan_frames.any(1), torch.nan, loss)
    return CTCPosteriors(loss, states if want_states else None, tokens if want_tokens else None)


def ctc_loss(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: torch.Tensor | Sequence[int],
    target_lengths: torch.Tensor | Sequence[int],
    blank: int = 0,
    reduction: str = "mean",
    zero_infinity: bool = False,
    *,
    batch_first: bool = True,
    backend: str = "auto",
    check_values: bool = True,
) -> torch.Tensor:
    r"""CTC loss with torch.nn.functional.ctc_loss's arguments and reductions, exact for any scores.

    ``loss_b = -log sum over alignments of exp(sum of the aligned log_probs)``. ``reduction="none"`` -> [B];
    ``"sum"``; ``"mean"`` divides each loss by its target length (clamped to >= 1) and averages over the
    batch, as torch. ``zero_infinity`` replaces infinite losses (no alignment) by 0; their gradient is 0
    either way. A NaN among the scores a row reads (its blank and target classes within its input length)
    makes its loss NaN, as torch's, which ``zero_infinity`` keeps, and its gradient NaN at every class of
    every frame within its input length, as torch's (a NaN at a class the row never reads leaves its loss and
    gradient as they are: the exact derivative there is 0, where torch's logit gradient reads exp(NaN)).

    The gradient is d loss_b / d log_probs[b, t, c] = -sum_{s: label(s) = c} gamma_t(s): the exact
    derivative with respect to the given scores, whether or not they are log-softmax outputs (torch's
    ctc_loss returns the gradient with respect to the logits, assuming normalised inputs). It is computed
    in the forward call when ``log_probs`` requires grad (fp64 accumulation, nothing of size [B, T, 2L+1]
    kept, see :func:`ctc_posteriors` for the memory) and returned in log_probs' dtype; the backward only
    scales it. The loss is fp32 (fp64 for fp64 inputs).

    ``log_probs`` is [B, T, C]; pass ``batch_first=False`` for torch's [T, B, C] layout. Targets padded
    [B, L] or concatenated 1-D; lengths tensors or lists. Backends, devices, dtypes, errors and
    ``check_values`` as :func:`ctc_posteriors`, plus ValueError for an unknown ``reduction``.
    """
    if reduction not in _REDUCTIONS:
        raise AlignopsError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(log_probs, torch.Tensor) and not batch_first:
        if log_probs.dim() != 3:
            raise AlignopsError(f"log_probs must be a 3-D tensor of shape [T, B, C], got shape {list(log_probs.shape)}")
        log_probs = log_probs.transpose(0, 1)
    targets, input_lengths, target_lengths = _prepare(
        log_probs, targets, input_lengths, target_lengths, blank, check_values
    )
    impl = _backend.resolve(backend, log_probs.device, "ctc_loss", native_cuda=False)
    nan_frames = _nan_frames(log_probs, targets, input_lengths, target_lengths, blank)
    log_probs = _with_nan_grad(log_probs, nan_frames)
    if impl == "torch":
        loss = _ref.forward_backward(log_probs, targets, input_lengths, target_lengths, blank)[0]
        loss = loss.to(acc_dtype(log_probs.dtype))
    else:
        op = torch.ops.alignops.ctc_posteriors if impl == "native" else torch.ops.alignops.ctc_posteriors_triton
        compute_grad = torch.is_grad_enabled() and log_probs.requires_grad
        loss = op(log_probs, targets, input_lengths, target_lengths, blank, False, False, compute_grad)[0]
    loss = torch.where(nan_frames.any(1), torch.nan, loss)
    if zero_infinity:
        loss = torch.where(torch.isinf(loss), torch.zeros_like(loss), loss)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return (loss / target_lengths.to(loss.dtype).clamp(min=1)).mean()
