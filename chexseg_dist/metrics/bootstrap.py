"""Bootstrap CIs over images for ratio statistics: every metric here is a ratio of per-image sums."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

CI_PERCENTILES = (2.5, 97.5)


# ---------------------------------------------------------------------------------------------------- bootstrap
def bootstrap_counts(n_images: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """Multiplicity of each image in each bootstrap resample: ``[n_bootstrap, n_images]`` float64.

    Resample ``b`` draws ``n_images`` images with replacement (``default_rng(seed).integers``), so the same seed
    gives the same resamples.
    """
    if n_bootstrap == 0 or n_images == 0:
        return np.zeros((n_bootstrap, n_images))
    idx = np.random.default_rng(seed).integers(0, n_images, size=(n_bootstrap, n_images))
    flat = (idx + n_images * np.arange(n_bootstrap)[:, None]).ravel()
    return np.bincount(flat, minlength=n_bootstrap * n_images).reshape(n_bootstrap, n_images).astype(np.float64)


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den == 0``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def percentile_ci(samples: np.ndarray) -> np.ndarray:
    """``[..., 2]`` 2.5 / 97.5 percentiles over axis 0, ignoring NaN (NaN where no resample has a value)."""
    samples = np.asarray(samples, dtype=np.float64)
    out = np.full((*samples.shape[1:], 2), np.nan)
    ok = np.isfinite(samples).any(axis=0)
    if ok.any():
        out[ok] = np.nanpercentile(samples[:, ok], CI_PERCENTILES, axis=0).T
    return out


@dataclass
class Metric:
    """A per-pathology ratio statistic with bootstrap CIs.

    Attributes:
        value: ``[10]`` point estimates (NaN where undefined).
        ci: ``[10, 2]`` 95% CI.
        n: ``[10]`` pairs (or images) behind each value.
        mean: plain mean of ``value`` over pathologies where it is defined.
        mean_ci: CI of that mean (over the same pathologies).
    """

    value: np.ndarray
    ci: np.ndarray
    n: np.ndarray
    mean: float
    mean_ci: np.ndarray
    samples: np.ndarray | None = field(default=None, repr=False)


def ratio_metric(num: np.ndarray, den: np.ndarray, counts: np.ndarray, n: np.ndarray | None = None) -> Metric:
    """Per-pathology ``sum(num) / sum(den)`` over images, with bootstrap CIs from ``counts``.

    Args:
        num, den: ``[N, 10]`` per-image sufficient statistics.
        counts: ``[B, N]`` resample multiplicities (:func:`bootstrap_counts`).
        n: ``[10]`` sizes to report (default: ``den`` summed, e.g. the number of kept pairs).
    """
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    value = ratio(num.sum(axis=0), den.sum(axis=0))
    samples = ratio(counts @ num, counts @ den) if counts.shape[0] else np.zeros((0, num.shape[1]))
    defined = np.isfinite(value)
    mean = float(value[defined].mean()) if defined.any() else float("nan")
    if defined.any() and samples.shape[0]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample may lack every defined pathology
            mean_samples = np.nanmean(samples[:, defined], axis=1)
        mean_ci = percentile_ci(mean_samples[:, None])[0]
    else:
        mean_ci = np.full(2, np.nan)
    return Metric(
        value=value,
        ci=percentile_ci(samples),
        n=np.asarray(den.sum(axis=0) if n is None else n, dtype=np.int64),
        mean=mean,
        mean_ci=mean_ci,
        samples=samples,
    )
