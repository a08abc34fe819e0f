"""The one exception class of alignops' argument checks."""


class AlignopsError(ValueError, RuntimeError):
    """A bad argument: its message names the argument and the value it got.

    A ``ValueError`` (what Python code expects for a bad value) that is also a ``RuntimeError``, so that code
    written for torch or torchaudio, whose argument checks (``TORCH_CHECK``) raise RuntimeError, catches it
    unchanged: ``except RuntimeError`` around a drop-in call keeps working.
    """
