"""What a reused step adds to each stream: the cached delta, or a forecast of it.

Every forecaster is a linear combination: ``forecast = delta + sum_i c_i * term_i``, where the
``terms`` are tensors kept per stream at each computed step (made from the new delta and the
previous computed step's, :meth:`Forecaster.stream_terms`) and the coefficients ``c_i`` are
host numbers of the sampler's variable (:meth:`Forecaster.coefficients`). That form is what the
runtime applies, eagerly (:func:`apply_forecast`) or inside the fused reused-step graph (the
terms and a coefficient tensor are its inputs), per call or per batch row. Memory: ``terms``
tensors per stream and guidance branch, O(1) in the number of steps.

A new forecaster is a subclass in a file of its own, registered by name
(``forecasters/registry.py``) and chosen with ``AdaCacheConfig(reuse=name)``.
"""
from __future__ import annotations

import torch


class Forecaster:
    name = "base"
    terms = 0   # tensors kept per stream besides the delta

    def __init__(self, config):
        self.config = config

    def stream_terms(self, new: torch.Tensor, previous: torch.Tensor) -> list:
        """The ``terms`` tensors of one stream at a computed step, from its new delta and the
        previous computed step's."""
        return []

    def coefficients(self, time: float, computed_time: float, span: float) -> tuple:
        """The ``terms`` coefficients at the sampler's variable ``time``, for terms made at
        ``computed_time``, ``span`` after the computed step before it."""
        return ()


def apply_forecast(delta: torch.Tensor, terms: list, coefficients) -> torch.Tensor:
    """``delta + sum_i c_i * term_i``, as a multiply then an add per term (the same op sequence
    as the fused reused-step graph, so that both paths give the same bits under an eager inner
    compiler). ``coefficients``: host numbers, or tensors broadcasting against the terms."""
    out = delta
    for term, c in zip(terms, coefficients):
        out = torch.add(out, torch.mul(term, c))
    return out
