"""Autograd of ops that return the closed-form gradient of their summed loss (fused_linear_distillation, its
Triton twin, fused_linear_adpa): the op computes ``dL/d(student hidden, weight, bias)`` in forward from the same
logits as the loss, and backward only scales it by the incoming gradient of the loss.

Memory: at V = 128256 the weight gradient is a [V, H] tensor; ``saved * grad_loss`` would make a second one at the
backward's peak (1002 MB at H = 1024). When the incoming gradient is exactly 1 (``loss.backward()`` on the loss
itself, the usual case; the public wrappers fold their reduction's scale into the op's row weights so that it is)
the saved tensor is returned as it is, as Liger-Kernel does, for each input that is not a view (the weight, as a
model passes it). The saved tensor is never written: without retain_graph autograd frees it once backward returns,
so AccumulateGrad takes it as ``.grad`` without a copy; with retain_graph it is still referenced, so AccumulateGrad
copies it (or adds it into an existing ``.grad``) and a second backward sees it unchanged. A view input (the
wrappers' reshaped hidden) still gets a product: a view's backward would hand the saved storage on under a new
alias that AccumulateGrad takes even with retain_graph, and a later in-place accumulation would change it (torch's
version counter then refuses the next backward; it is not silent). The test against 1 is one host sync per
backward.
"""

from __future__ import annotations

import torch

from .._dtypes import acc_dtype


def _is_one(grad_loss: torch.Tensor) -> bool:
    # Traced (fake / functional tensor subclasses, torch.compile) the value is unknown: always the product there.
    if type(grad_loss) is not torch.Tensor or torch.compiler.is_compiling() or grad_loss.device.type == "meta":
        return False
    return grad_loss.numel() == 1 and bool(grad_loss == 1)


def _scaled(saved: torch.Tensor, grad_loss: torch.Tensor, one: bool) -> torch.Tensor:
    return saved if one else saved * grad_loss.to(saved.dtype)


def fake_grad_outputs(student_hidden, student_weight, student_bias, compute_grad):
    """Fake (grad_hidden, grad_weight, grad_bias) outputs of such an op: the inputs' shapes and dtypes with
    compute_grad (grad_bias [V] in the bias's dtype, [0] without a bias), else three empty [0] tensors."""
    acc = acc_dtype(student_hidden.dtype)
    new = student_hidden.new_empty
    if not compute_grad:
        return new(0, dtype=acc), new(0, dtype=acc), new(0, dtype=acc)
    grad_bias = new(
        student_weight.shape[0] if student_bias is not None else 0,
        dtype=student_bias.dtype if student_bias is not None else acc,
    )
    return (
        torch.empty_like(student_hidden, memory_format=torch.contiguous_format),
        torch.empty_like(student_weight, memory_format=torch.contiguous_format),
        grad_bias,
    )


def register_closed_form_autograd(
    op: str, num_inputs: int, first_grad_output: int, bias_input: int, wrapper_hint: str
) -> None:
    """Autograd of ``op`` whose outputs ``[first_grad_output:]`` are the gradients of its summed loss (output 0)
    w.r.t. inputs 0 (hidden [N, H]), 1 (weight [V, H]) and ``bias_input`` (bias [V], or an empty [0] tensor
    without a bias); its last input is ``compute_grad`` (those outputs are empty without it)."""

    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.compute_grad = inputs[-1]
        # Saved as detached aliases, not as outputs: autograd unpacks a saved output as a new tensor each time
        # (which AccumulateGrad would take as .grad even with retain_graph, then add into in place), but hands a
        # saved non-output back as the very tensor it holds, whose extra reference makes AccumulateGrad copy it.
        ctx.save_for_backward(*(t.detach() for t in output[first_grad_output : first_grad_output + 3]))
        # A view's backward hands the gradient on as a new alias of its storage, which AccumulateGrad takes as
        # .grad even when the graph is retained and then adds into in place: the saved tensor would change.
        ctx.may_alias = tuple(t is not None and not t._is_view() for t in (inputs[0], inputs[1], inputs[bias_input]))

    def backward(ctx, grad_loss, *_unused):
        if grad_loss is None:
            return (None,) * num_inputs
        if not ctx.compute_grad:
            raise RuntimeError(
                f"{op} was called with compute_grad=False; call it through {wrapper_hint} (which sets it) to "
                "differentiate"
            )
        needs = ctx.needs_input_grad
        grads: list[torch.Tensor | None] = [None] * num_inputs
        if not (needs[0] or needs[1] or needs[bias_input]):
            return tuple(grads)
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        one = _is_one(grad_loss)
        alias = ctx.may_alias
        if needs[0]:
            grads[0] = _scaled(grad_hidden, grad_loss, one and alias[0])
        if needs[1]:
            grads[1] = _scaled(grad_weight, grad_loss, one and alias[1])
        if needs[bias_input] and grad_bias.numel():
            grads[bias_input] = _scaled(grad_bias, grad_loss, one and alias[2])
        return tuple(grads)

    torch.library.register_autograd(op, backward, setup_context=setup)
