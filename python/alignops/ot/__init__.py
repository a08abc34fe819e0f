r"""Optimal transport: batched log-domain Sinkhorn, UCoFiA's similarity normalisation and its peers,
entropic OT between point clouds; the 1-D, sliced and Gaussian Wasserstein distances of
:mod:`alignops.wasserstein` are re-exported here.

One job per file: :mod:`.solver` (Sinkhorn over a cost matrix), :mod:`.newton` (the Sinkhorn-Newton
polish), :mod:`.retrieval` (similarity normalisers), :mod:`.points` (point-cloud distances). Import from
``alignops.ot``: the file split is not API.

Conventions (POT's ``ot.bregman.sinkhorn_log``, so that potentials compare one to one):

* cost ``C [B, N, M]``; ``scores=True`` means the input holds scores ``S = -C`` (similarities); no negated
  copy is made.
* plan ``P_ij = exp((f_i + g_j - C_ij) / eps)``: the potentials absorb the marginals, ``f = eps * log_u``
  and ``g = eps * log_v`` of POT's ``log=True`` output.
* an iteration updates g then f (``g = eps log b - eps LSE_i((f_i - C_ij) / eps)``, then the same for f),
  from f = g = 0, as POT does.
* marginal error: the L1 violation of the column marginal, ``sum_j |sum_i P_ij - b_j|`` (the rows are
  exact after the f update). POT's ``err`` is the L2 norm of the same vector.
"""

from ..wasserstein import gaussian_w2, sliced_wasserstein, wasserstein_1d
from .points import DistanceOutput, sinkhorn_distance
from .retrieval import (
    NormalizeOutput,
    bank_column_lse,
    dual_softmax,
    inverted_softmax,
    nnn,
    qb_norm,
    sinkhorn_normalize,
)
from .solver import SinkhornOutput, eps_schedule, implicit_grad_cost, sinkhorn

__all__ = [
    "SinkhornOutput",
    "sinkhorn",
    "eps_schedule",
    "implicit_grad_cost",
    "NormalizeOutput",
    "sinkhorn_normalize",
    "bank_column_lse",
    "inverted_softmax",
    "qb_norm",
    "dual_softmax",
    "nnn",
    "DistanceOutput",
    "sinkhorn_distance",
    "wasserstein_1d",
    "sliced_wasserstein",
    "gaussian_w2",
]
