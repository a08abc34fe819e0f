"""A row of the public-function contract (tests/test_public_contract.py): a callable and small valid inputs.

Families keep their rows next to their tests, as ``CONTRACT_CASES = {"name": case(...)}`` in tests/test_<family>.py;
the contract test reads them all."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class Case(NamedTuple):
    fn: Callable
    build: Callable[[], tuple[list, dict]]
    meta: int | str | None = None  # the argument moved to "meta"; None: the last tensor argument
    hyper: tuple[str, ...] = ()  # float hyper-parameters that must be finite ("name:nan": inf has a meaning)


def case(fn, args, kwargs=None, meta=None, hyper=()) -> Case:
    """``args`` and ``kwargs`` build fresh inputs for each test (a list and a dict)."""
    return Case(fn, lambda: (args(), dict(kwargs() if kwargs else {})), meta, hyper)
