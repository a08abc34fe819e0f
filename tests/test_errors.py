"""Bad input across the families: one exception class, messages that name the argument and the value,
non-finite hyper-parameters and NaN data handled on purpose (issue 13)."""

import pytest
import torch

import alignops
from alignops import AlignopsError


def test_error_class_is_both_value_and_runtime_error():
    assert issubclass(AlignopsError, ValueError) and issubclass(AlignopsError, RuntimeError)


@pytest.mark.parametrize("call", [
    lambda: alignops.preference_loss(*torch.randn(4, 3), beta=-1.0),
    lambda: alignops.selective_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=0.0),
    lambda: alignops.skip_ffn(torch.randn(2, 3, 4), torch.randn(8, 3), torch.randn(4, 4)),
    lambda: alignops.ctc.forced_align(torch.randn(1, 4, 3), torch.zeros(3)),
], ids=["preference", "selective_logprobs", "skip_ffn", "forced_align"])
def test_argument_errors_caught_as_runtime_error(call):
    # torch's / torchaudio's TORCH_CHECK argument errors are RuntimeErrors; code that catches them keeps working.
    with pytest.raises(RuntimeError, match="must") as info:
        call()
    assert isinstance(info.value, AlignopsError)
