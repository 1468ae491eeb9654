"""Statistics of learning curves: intervals over seeds, paired tests, a power law.

The power law is the saturating form of the learning-curve literature (Hestness et
al. 2017; Rosenfeld et al. 2020): test error err(n) = a * n^-b + c over n samples
per class, with c the error no amount of data removes from this recipe. A fit only
earns a forecast when it passed its own check: fitted without the largest size, it
must predict that size's measured error.
"""

import dataclasses
import math
import warnings

import numpy as np
from scipy import optimize
from scipy import stats

# A forecast says how many samples per class reach the best measured accuracy plus
# each of these gains (accuracy points / 100).
MILESTONES = (0.005, 0.01, 0.02)
# A held-out prediction counts as good within the larger of this and the measured
# value's 95% interval.
CHECK_TOLERANCE = 0.01
# Forecasts beyond this many times the largest size are not extrapolation but guesswork.
MAX_EXTRAPOLATION = 10


def interval(values) -> tuple[float, float, float]:
  """Mean, standard deviation (ddof 1) and the half-width of the 95% t-interval."""
  x = np.asarray([v for v in values if v is not None], float)
  if len(x) == 0:
    return math.nan, math.nan, math.nan
  if len(x) == 1:
    return float(x[0]), math.nan, math.nan
  std = float(np.std(x, ddof=1))
  return float(np.mean(x)), std, float(stats.t.ppf(0.975, len(x) - 1) * std / np.sqrt(len(x)))


def paired_p(a: dict, b: dict) -> float:
  """Two-sided p-value of the paired t-test between two methods' seeds ({seed: accuracy}).

  Seed k of every method trains on the same sub-sample, so the seeds pair. nan where it
  cannot be computed: fewer than 2 shared seeds, or differences that do not vary (their
  spread is 0, which says nothing about the noise with so few seeds).
  """
  seeds = sorted(set(a) & set(b))
  d = np.array([a[s] - b[s] for s in seeds], float)
  if len(d) < 2 or np.allclose(d, d[0]):
    return 1.0 if len(d) >= 2 and np.allclose(d, 0) else math.nan
  return float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  a: float
  b: float
  c: float

  def error(self, n):
    return self.a * np.power(np.asarray(n, float), -self.b) + self.c

  def samples_for(self, accuracy: float) -> float:
    """Samples per class at which the fit reaches `accuracy` (inf beyond its floor)."""
    gap = (1 - accuracy) - self.c
    return math.inf if gap <= 0 else float((self.a / gap) ** (1 / self.b))


def fit(sizes, errors) -> PowerLaw | None:
  """Least-squares fit of err = a n^-b + c (None when it does not converge)."""
  n, e = np.asarray(sizes, float), np.asarray(errors, float)
  if len(n) < 3:
    return None
  try:
    with warnings.catch_warnings():  # a curve of 3 points has no covariance: not needed
      warnings.simplefilter('ignore', optimize.OptimizeWarning)
      params, _ = optimize.curve_fit(
          lambda n, a, b, c: a * np.power(n, -b) + c, n, e,
          p0=(max(e[0] - e[-1], 1e-3) * n[0] ** 0.5, 0.5, max(e[-1] / 2, 0.0)),
          bounds=([0, 0.01, 0], [np.inf, 3.0, max(float(e.min()), 1e-9)]), maxfev=20000)
  except (RuntimeError, ValueError):
    return None
  return PowerLaw(*map(float, params))


@dataclasses.dataclass(frozen=True)
class Forecast:
  """What a curve says about more data, or why it says nothing."""
  law: PowerLaw | None
  check: tuple[int, float, float, float] | None  # (size, predicted, measured, tolerance)
  trusted: bool
  reason: str                                    # why not trusted, or ''
  needed: list[tuple[float, float]]              # (accuracy, samples per class)


def forecast(sizes, accuracy, half_widths) -> Forecast:
  """The power law of a curve, its held-out check, and the samples next milestones need."""
  sizes = list(sizes)
  errors = [1 - a for a in accuracy]
  if len(sizes) < 4:
    counted = f'{len(sizes)} size' + 's' * (len(sizes) != 1)
    return Forecast(fit(sizes, errors), None, False,
                    f'{counted}: a fit of 3 parameters needs 4 to be checked', [])
  if errors[-1] >= errors[0] - max(CHECK_TOLERANCE, _finite(half_widths[-1])):
    return Forecast(None, None, False, 'the error does not fall with more data here', [])
  held = fit(sizes[:-1], errors[:-1])
  law = fit(sizes, errors)
  if held is None or law is None:
    return Forecast(law, None, False, 'the power law does not converge on this curve', [])
  predicted = float(1 - held.error(sizes[-1]))
  tolerance = max(CHECK_TOLERANCE, _finite(half_widths[-1]))
  check = (sizes[-1], predicted, float(accuracy[-1]), tolerance)
  if abs(predicted - accuracy[-1]) > tolerance:
    return Forecast(law, check, False, (
        f'fitted without n={sizes[-1]}, it predicts {predicted:.3f} there against '
        f'{accuracy[-1]:.3f} measured (off by more than {tolerance:.3f})'), [])
  if law.c < 1e-4:
    return Forecast(law, check, False, (
        f'the curve has not bent: no floor is in sight, the error still falls as n^-{law.b:.2f}, '
        'so no milestone can be placed on it'), [])
  best = max(accuracy)
  needed = [(best + gain, law.samples_for(best + gain)) for gain in MILESTONES
            if best + gain < 1]
  return Forecast(law, check, True, '', needed)


def _finite(x) -> float:
  return 0.0 if x is None or not np.isfinite(x) else float(x)
