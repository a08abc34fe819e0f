"""Deprecation shims for the API style of docs/api-style.md: hyperparameters that used to be positional, and
arguments renamed to the one name the family uses. Each keeps the old call working for one release with a
``DeprecationWarning`` that names the new spelling; ``inspect.signature`` shows the new signature (the
wrapper sets ``__wrapped__``), so the docs and tests/test_api_style.py see only the new names.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable

import torch


def _positional_count(f: Callable) -> int:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds for p in inspect.signature(f).parameters.values())


def _warn_positional(fn: str, moved: tuple[str, ...]) -> None:
    if torch.compiler.is_compiling():  # dynamo cannot trace warnings.warn under fullgraph=True; eager calls warn
        return
    warnings.warn(
        f"{fn}: passing {', '.join(moved)} positionally is deprecated and will be refused in the next release; "
        f"pass {', '.join(f'{n}=' for n in moved)} by keyword",
        DeprecationWarning,
        stacklevel=3,  # the user's call: _warn_positional <- the shim <- the caller
    )


def keyword_only(*names: str) -> Callable:
    """``names`` (in their old positional order, right after the positional parameters of the new signature)
    were positional: a call that still passes them so binds them by name and warns."""

    def wrap(f: Callable) -> Callable:
        n_pos = _positional_count(f)

        @functools.wraps(f)
        def shim(*args, **kwargs):
            if len(args) > n_pos:
                extra = args[n_pos:]
                if len(extra) > len(names):
                    raise TypeError(f"{f.__name__}() takes {n_pos} positional arguments but {len(args)} were given")
                moved = names[: len(extra)]
                for name, value in zip(moved, extra):
                    if name in kwargs:
                        raise TypeError(f"{f.__name__}() got multiple values for argument '{name}'")
                    kwargs[name] = value
                _warn_positional(f.__name__, moved)
                args = args[:n_pos]
            return f(*args, **kwargs)

        shim.__deprecated_positional__ = names
        return shim

    return wrap


def renamed(**old_to_new: str) -> Callable:
    """Keyword arguments renamed to the family's name: the old keyword is accepted with a warning."""

    def wrap(f: Callable) -> Callable:
        @functools.wraps(f)
        def shim(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{f.__name__}() got both {new}= and its deprecated alias {old}=")
                    if not torch.compiler.is_compiling():  # dynamo cannot trace warnings.warn (fullgraph)
                        warnings.warn(
                            f"{f.__name__}: {old}= is deprecated and will be removed in the next release; use {new}=",
                            DeprecationWarning,
                            stacklevel=2,
                        )
                    kwargs[new] = kwargs.pop(old)
            return f(*args, **kwargs)

        shim.__deprecated_aliases__ = {**getattr(f, "__deprecated_aliases__", {}), **old_to_new}
        return shim

    return wrap


def legacy_order(n_kept: int, *old_order: str) -> Callable:
    """The parameters after the first ``n_kept`` were reordered (optional tensors now come before keyword-only
    hyperparameters): a call whose argument at position ``n_kept`` is neither a tensor nor None still uses the
    old order ``old_order``; it is bound by name and warns. Tensors and hyperparameters never share a slot, so
    the two orders cannot be confused."""

    def wrap(f: Callable) -> Callable:
        @functools.wraps(f)
        def shim(*args, **kwargs):
            if len(args) > n_kept and args[n_kept] is not None and not isinstance(args[n_kept], torch.Tensor):
                extra = args[n_kept:]
                if len(extra) > len(old_order):
                    raise TypeError(
                        f"{f.__name__}() got {len(args)} positional arguments in the deprecated order "
                        f"(at most {n_kept + len(old_order)})"
                    )
                moved = old_order[: len(extra)]
                for name, value in zip(moved, extra):
                    if name in kwargs:
                        raise TypeError(f"{f.__name__}() got multiple values for argument '{name}'")
                    kwargs[name] = value
                _warn_positional(f.__name__, moved)
                args = args[:n_kept]
            return f(*args, **kwargs)

        shim.__deprecated_positional__ = old_order
        return shim

    return wrap
