"""Growth fits: cost = a + b·N^k by least squares over the Service counts of a sweep.

`a` is the part that does not grow (the floor, a sync's fixed cost), `b·N^k` what the
Services add. k enters non-linearly, a and b linearly, so the fit is a variable projection:
for a given k the best a, b come from linear least squares, and k minimises what is left.
Confidence intervals come from the Gauss-Newton covariance at the optimum (Student t).

b at N = 1 lies outside the interesting range and trades off against k so strongly that a
clear O(N) growth can still show an interval touching zero; so the fit is written as
a + added·(N/N_max)^k and b's interval is read where the data are, at the largest size:
the mode is flat when the interval of what N_max Services add contains zero. b itself and
b·1000^k ("added per 1,000 Services") follow by the delta method, exact for this
linearised fit.

`decide` turns such an interval into the one word a report states (grows, flat, falls),
and says flat too when the growth is smaller than what the values can resolve or the cost
is not above its floor: an exponent is only ever quoted for a cost that grows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, stats

K_BOUNDS = (0.1, 3.0)  # below 0.1 N^k is a second constant; above 3 no data plane grows
PER = 1000.0  # "added per 1,000 Services"
CONFIDENCE = 0.95
MIN_SIZES = 3  # three parameters need at least three distinct sizes
# Beyond this condition number the columns of the Jacobian are parallel: k is not determined.
MAX_CONDITION = 1e10


class NotEnoughSizes(ValueError):
    """The sizes cannot determine a, b and k (fewer than 3 distinct sizes, or no spare point)."""


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    @property
    def known(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)


UNKNOWN = Interval(-math.inf, math.inf)


@dataclass(frozen=True)
class GrowthFit:
    """cost(N) = a + b·N^k = a + added_max·(N/n_max)^k, with confidence intervals."""

    a: float
    b: float
    k: float
    per_1000: float  # b·1000^k: what the first 1,000 Services add (per 1,000 when k = 1)
    added_max: float  # b·n_max^k: what the largest size measured adds
    a_ci: Interval
    b_ci: Interval
    k_ci: Interval
    per_1000_ci: Interval
    added_max_ci: Interval
    n_max: int
    n_points: int
    sizes: tuple[int, ...]
    dof: int
    rmse: float
    k_determined: bool  # False when the Services add nothing k could be read from
    level: float = math.nan  # the mean: what a flat series costs at any size
    level_ci: Interval = UNKNOWN
    confidence: float = CONFIDENCE

    @property
    def flat(self) -> bool:
        """The added part is indistinguishable from zero: say so instead of quoting k."""
        return self.added_max_ci.contains(0.0)

    @property
    def shrinks(self) -> bool:
        return self.added_max_ci.high < 0

    @property
    def k_at_bound(self) -> bool:
        return min(abs(self.k - K_BOUNDS[0]), abs(self.k - K_BOUNDS[1])) < 1e-3

    def added(self, n: float) -> float:
        """What N Services add over a, per the fit."""
        return self.b * float(n) ** self.k

    def cost(self, n: float) -> float:
        return self.a + self.added(n)

    @property
    def verdict(self) -> str:
        """grows, flat or falls: what the largest size adds, read from its interval."""
        return decide(self.added_max, self.added_max_ci.low, self.added_max_ci.high)


GROWS, FLAT, FALLS, UNKNOWN_VERDICT = "grows", "flat", "falls", "unknown"


def decide(added: float, low: float, high: float, resolution: float = 0.0,
           above_floor: float | None = None) -> str:
    """One verdict for what N Services do to a cost, from the interval [low, high] of what
    the largest size adds (fit_table's added_max columns).

    grows: the interval lies above `resolution` (zero for most figures; a figure counted
    in clock ticks moves by one tick with nothing changed, so its growth must clear one)
    and, when given, the cost at the largest size stands above its floor (`above_floor`:
    the low end of that difference's interval, or the difference itself when it has none),
    since a cost at or below the floor cannot grow. falls: the interval lies below minus
    the resolution. Otherwise flat; unknown when there is no interval.
    """
    values = (added, low, high)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return UNKNOWN_VERDICT
    resolution = resolution if math.isfinite(resolution) else 0.0
    if above_floor is not None and not math.isfinite(above_floor):
        above_floor = None  # no floor to hold the cost against
    resolution = max(resolution, 0.0)
    if low > resolution and (above_floor is None or above_floor > 0):
        return GROWS
    if high < -resolution:
        return FALLS
    return FLAT


def _t_quantile(dof: int, confidence: float) -> float:
    return float(stats.t.ppf(0.5 + confidence / 2.0, dof))


def _linear(u: np.ndarray, y: np.ndarray, w: np.ndarray, k: float) -> tuple[np.ndarray, float]:
    """Best (a, d) for a fixed k with row weights w, and the weighted residual sum of squares."""
    x = np.column_stack([np.ones_like(u), u**k])
    coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    resid = (y - x @ coef) * w
    return coef, float(resid @ resid)


def fit_growth(
    sizes: Sequence[float], values: Sequence[float], confidence: float = CONFIDENCE
) -> GrowthFit:
    """Least-squares fit of values = a + b·sizes^k; one point per measurement (repeats count).

    Residuals are relative (weights 1/value) when every value is positive: costs span
    decades (a sync takes 50 ms at 1 Service and 10 s at 5,000) and their noise grows with
    them, so plain residuals would let the largest size decide alone.
    """
    n = np.asarray(sizes, dtype=float)
    y = np.asarray(values, dtype=float)
    keep = np.isfinite(n) & np.isfinite(y) & (n >= 0)
    n, y = n[keep], y[keep]
    distinct = sorted({int(v) for v in n})
    if len(distinct) < MIN_SIZES or len(y) <= 3:
        raise NotEnoughSizes(
            f"a growth fit needs {MIN_SIZES} sizes and 4 measurements; "
            f"has sizes {', '.join(map(str, distinct))} and {len(y)} measurements"
        )
    n_max = float(n.max())
    u = n / n_max
    w = 1.0 / y if np.all(y > 0) else np.ones_like(y)
    lo, hi = K_BOUNDS
    grid = np.linspace(lo, hi, 59)
    rss = [_linear(u, y, w, k)[1] for k in grid]
    i = int(np.argmin(rss))
    # Refine around the best grid point; the residual is smooth in k between grid points.
    bracket = (grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)])
    best = optimize.minimize_scalar(
        lambda k: _linear(u, y, w, k)[1], bounds=bracket, method="bounded",
        options={"xatol": 1e-6},
    )
    k = float(best.x) if best.fun <= rss[i] else float(grid[i])
    (a, d), sse = _linear(u, y, w, k)
    a, d = float(a), float(d)
    dof = len(y) - 3
    s2 = sse / dof
    t = _t_quantile(dof, confidence)

    uk = u**k
    with np.errstate(divide="ignore", invalid="ignore"):
        dk = np.where(u > 0, d * uk * np.log(np.where(u > 0, u, 1.0)), 0.0)
    jac = np.column_stack([np.ones_like(u), uk, dk]) * w[:, None]
    cov, k_determined = _covariance(jac, s2)
    if not k_determined:
        # k cannot be read from the data: keep it fixed and take a and d's intervals
        # from the linear model (still with n - 3 degrees of freedom, which is conservative).
        cov2, _ = _covariance(jac[:, :2], s2)
        cov = np.zeros((3, 3))
        cov[:2, :2] = cov2
    se = np.sqrt(np.clip(np.diag(cov), 0.0, np.inf))

    def interval(value: float, err: float) -> Interval:
        if not math.isfinite(err):
            return UNKNOWN
        return Interval(float(value - t * err), float(value + t * err))

    def rescaled(ref: float) -> tuple[float, float]:
        """d·(ref/n_max)^k and its standard error (with k fixed when it is undetermined)."""
        r = ref / n_max
        value = d * r**k
        grad = np.array([0.0, r**k, value * math.log(r)])
        return value, float(np.sqrt(max(grad @ cov @ grad, 0.0)))

    b, b_se = rescaled(1.0)
    per_1000, per_1000_se = rescaled(PER)
    return GrowthFit(
        a=a,
        b=b,
        k=k,
        per_1000=per_1000,
        added_max=d,
        a_ci=interval(a, se[0]),
        b_ci=interval(b, b_se),
        k_ci=_clip(interval(k, se[2]), *K_BOUNDS) if k_determined else UNKNOWN,
        per_1000_ci=interval(per_1000, per_1000_se),
        added_max_ci=interval(d, se[1]),
        n_max=int(n_max),
        n_points=len(y),
        sizes=tuple(distinct),
        dof=dof,
        rmse=math.sqrt(sse / len(y)),  # relative when weighted
        k_determined=k_determined,
        level=float(y.mean()),
        level_ci=_mean_interval(y, confidence),
        confidence=confidence,
    )


def _clip(iv: Interval, lo: float, hi: float) -> Interval:
    """k outside its bounds is not a curve the model draws: the interval stops there too."""
    return Interval(max(iv.low, lo), min(iv.high, hi))


def _mean_interval(y: np.ndarray, confidence: float) -> Interval:
    half = _t_quantile(len(y) - 1, confidence) * float(y.std(ddof=1)) / math.sqrt(len(y))
    return Interval(float(y.mean()) - half, float(y.mean()) + half)


def _covariance(jac: np.ndarray, s2: float) -> tuple[np.ndarray, bool]:
    """s²·(JᵀJ)⁻¹, computed on unit-norm columns; False when JᵀJ is singular."""
    norms = np.linalg.norm(jac, axis=0)
    if np.any(norms == 0):
        return np.full((jac.shape[1],) * 2, np.inf), False
    scaled = jac / norms
    gram = scaled.T @ scaled
    if not np.all(np.isfinite(gram)) or np.linalg.cond(gram) > MAX_CONDITION:
        return np.full((jac.shape[1],) * 2, np.inf), False
    inv = np.linalg.inv(gram) / np.outer(norms, norms)
    return s2 * inv, True


FIT_COLUMNS = (
    "kernel", "mode", "metric", "stat", "unit", "a", "a_low", "a_high", "b", "b_low", "b_high",
    "k", "k_low", "k_high", "per_1000", "per_1000_low", "per_1000_high", "added_max",
    "added_max_low", "added_max_high", "level", "level_low", "level_high", "flat", "verdict",
    "sizes", "n_points", "dof", "rmse",
    "max_n", "note",
)


def fit_table(
    frame: pd.DataFrame,
    by: Iterable[str] = ("kernel", "mode", "metric", "stat"),
    confidence: float = CONFIDENCE,
) -> pd.DataFrame:
    """One growth fit per group of a bench frame (columns n_services and value, plus `by`),
    over the sizes above zero.

    Groups that cannot be fitted get a row with the reason in `note` and no numbers.
    """
    by = [c for c in by if c in frame.columns]
    rows = []
    if frame.empty:
        return pd.DataFrame(columns=list(FIT_COLUMNS))
    # Size 0 rows are the floor and the teardown to no Services, not a point of the sweep.
    frame = frame[frame["n_services"] > 0]
    for key, group in frame.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict = dict(zip(by, key, strict=True))
        if "unit" in group.columns:
            units = group["unit"].dropna().unique()
            row["unit"] = str(units[0]) if len(units) else ""
        max_n = int(group["n_services"].max())
        row["max_n"] = max_n
        try:
            fit = fit_growth(group["n_services"], group["value"], confidence)
        except NotEnoughSizes as exc:
            row["note"] = str(exc)
            rows.append(row)
            continue
        row.update(
            a=fit.a, a_low=fit.a_ci.low, a_high=fit.a_ci.high,
            b=fit.b, b_low=fit.b_ci.low, b_high=fit.b_ci.high,
            k=fit.k, k_low=fit.k_ci.low, k_high=fit.k_ci.high,
            per_1000=fit.per_1000, per_1000_low=fit.per_1000_ci.low,
            per_1000_high=fit.per_1000_ci.high, added_max=fit.added_max,
            added_max_low=fit.added_max_ci.low, added_max_high=fit.added_max_ci.high,
            level=fit.level, level_low=fit.level_ci.low, level_high=fit.level_ci.high,
            flat=fit.flat, verdict=fit.verdict, sizes=",".join(map(str, fit.sizes)),
            n_points=fit.n_points, dof=fit.dof, rmse=fit.rmse,
            note="k at its bound" if fit.k_at_bound and fit.verdict == GROWS else "",
        )
        rows.append(row)
    out = pd.DataFrame(rows)
    for col in FIT_COLUMNS:
        if col not in out.columns:
            out[col] = None
    return out[[*by, *[c for c in FIT_COLUMNS if c not in by]]]
