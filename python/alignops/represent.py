"""Representation alignment, the historical grab-bag module: kept so that ``alignops.represent.X`` still works.

The code lives in two modules, one job each:

- :mod:`alignops.ima`: the implicit multimodal alignment score of a multimodal LLM (:func:`ima_score`,
  :class:`IMACollector`, :class:`IMAScore`, :class:`IMADatasetScore`);
- :mod:`alignops.similarity`: similarity scores between two sets of representations (:func:`cca`,
  :func:`cca_loss`, :func:`linear_cka`, :func:`ches_score`).

New code should import from those modules (or from ``alignops``); this one only re-exports them.
"""

from .ima import TOKEN_PAIR_MODES, IMACollector, IMADatasetScore, IMAScore, ima_score
from .similarity import cca, cca_loss, ches_score, linear_cka

__all__ = [
    "TOKEN_PAIR_MODES",
    "IMADatasetScore",
    "IMAScore",
    "IMACollector",
    "ima_score",
    "cca",
    "cca_loss",
    "linear_cka",
    "ches_score",
]
