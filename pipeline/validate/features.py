"""The named per-record features of the scan: what their co-moment matrices' axes mean.

The scan (:mod:`pipeline.validate.accumulate`) adds, per record and (t-bin, channel) cell, a
vector of features to a :class:`pipeline.validate.stats.GroupedCoMoments`; the checks read means and
linear combinations of them with standard errors. Both sides name the features through one
:class:`Features` declaration, so neither depends on the order of the axes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from pipeline.validate.stats import GroupedCoMoments, linear_mean_se


@dataclass(frozen=True)
class Features:
    """Feature names in the order of the co-moment axes."""

    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """The axis of ``name``; KeyError naming the known features otherwise."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no feature {name!r}; features are {self.names}") from None

    def weights(self, **coef: float) -> np.ndarray:
        """The weight vector of ``sum(coef[name] * feature[name])`` (other features 0)."""
        w = np.zeros(len(self.names), dtype=np.float64)
        for name, c in coef.items():
            w[self.index(name)] = c
        return w

    def stack(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """Arrays of every feature (same shape) -> one array with the features on a last axis."""
        missing = set(self.names) - set(values)
        if missing or len(values) != len(self.names):
            raise KeyError(f"features {self.names} expected, got {tuple(values)}")
        return np.stack([values[n] for n in self.names], axis=-1)


# Per record and channel (the last channel index averages the channels): mean(x_t),
# mean(x_t^2), mean(x_t eps), and the record's alpha_t^2 (``ab``: DDPM's alpha_bar), alpha_t
# (``sqrt_ab``), sigma_t (``sqrt_1mab``) and sigma_t^2 (``s2``) of x_t = alpha_t x_0 + sigma_t eps.
REC = Features(("xt_mean", "xt_ms", "xt_eps", "ab", "sqrt_ab", "sqrt_1mab", "s2"))
# Per record and channel where x_0 is known: mean(x_0), mean(x_0^2).
X0REC = Features(("x0_mean", "x0_ms"))
# Elementwise co-moments of these tensors per (t-bin, channel) cell.
CROSS = Features(("eps", "x0", "xt"))


@dataclass(frozen=True)
class Cell:
    """The co-moments of named features over the records of one cell (or a union of cells):
    ``n`` records, ``mean`` [d] and the centred cross-product matrix ``cm`` [d, d]."""

    features: Features
    n: float
    mean: np.ndarray
    cm: np.ndarray

    @classmethod
    def of(cls, co: GroupedCoMoments, features: Features, idx) -> Cell:
        return cls(features, *co.cell(idx))

    @classmethod
    def pooled(cls, co: GroupedCoMoments, features: Features, cells) -> Cell:
        return cls(features, *co.pooled(cells))

    def __getitem__(self, name: str) -> np.float64:
        """The mean of feature ``name`` over the records."""
        return self.mean[self.features.index(name)]

    def linear(self, **coef: float) -> tuple[float, float]:
        """Mean of ``sum(coef[name] * feature[name])`` across records and its standard error."""
        return linear_mean_se(self.n, self.mean, self.cm, self.features.weights(**coef))

    def var(self, name: str) -> float:
        """The sample variance of feature ``name`` across records (n - 1 denominator)."""
        i = self.features.index(name)
        return self.cm[i, i] / (self.n - 1)
