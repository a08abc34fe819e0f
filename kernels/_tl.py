"""The ``@triton.jit`` helpers shared by several kernel files of this folder."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def finite_max(DTYPE: tl.constexpr):
    """The largest finite value of the accumulation dtype DTYPE (fp64 or fp32), as a 0-d DTYPE tensor: the
    start of a running max (its negation) that keeps masked -inf logits from forming -inf - -inf, and the
    bound that torch.nan_to_num clamps +-inf to."""
    if DTYPE == tl.float64:
        return tl.full([], 1.7976931348623157e308, DTYPE)
    else:
        return tl.full([], 3.4028234663852886e38, DTYPE)
