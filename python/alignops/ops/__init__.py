"""Fake kernels, autograd formulas and Triton ops of every family, registered on import."""

from . import preference  # noqa: F401
