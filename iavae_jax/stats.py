"""The paper's paired test of IA-VAE against a baseline over seeds (Table 4 and its appendix).

For each data set the two models are trained from the same seeds (IA-VAE starts from the VAE of
its seed), so the comparison is paired: d = a - b per seed. Shapiro-Wilk is run on d; if
normality is not rejected at ``alpha`` (p >= alpha), a one-sided paired Student t-test is used,
otherwise a one-sided Wilcoxon signed-rank test. The alternative is H1: a > b, i.e. the first
model (IA-VAE) attains a higher ELBO.

Edge cases, decided here so that every caller reports them the same way:

* Fewer than 3 pairs: Shapiro-Wilk is undefined, so ``shapiro_p`` is None and the Wilcoxon test
  is used, because normality that cannot be checked is not assumed (the paper falls back to the
  test without that assumption). With 2 pairs its smallest possible p is 0.25.
* All differences identical (zero range): Shapiro-Wilk is undefined (SciPy warns and returns
  p = 1, which would select a t-test whose statistic is +-inf), so ``shapiro_p`` is None and the
  test is Wilcoxon. All differences zero: no evidence either way, p = 1. All equal to c != 0:
  every |d| ties, so under the sign-flip null the signed-rank statistic only counts positive
  signs, and the exact one-sided p is 2**-n for c > 0 and 1 for c < 0.
* Some differences zero: SciPy's default ("wilcox") drops them before ranking; with ties or
  zeros SciPy computes the p-value by exhaustive sign flips for up to 13 pairs, and from the
  tie-corrected normal approximation above that.
* NaN or infinite values, mismatched lengths, fewer than 2 pairs, or inputs that are not 1-D:
  ValueError, since any p-value would be meaningless.

``summarize_seeds`` and ``paired_comparison`` give the same as JSON-able dictionaries, as the
experiments' results files hold them, and ``format_summary``, ``format_share``, ``format_p`` and
``format_test`` write those dictionaries as the cells of a table (``TESTS_NOTE`` says how to read
them). The module has no I/O.
"""

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats as sp_stats

__all__ = ["T_TEST", "WILCOXON", "ALPHA", "PairedTest", "paired_one_sided", "summarize_seeds",
           "paired_comparison", "format_summary", "format_share", "format_p", "format_test",
           "TESTS_NOTE"]

T_TEST = "t-test"
WILCOXON = "wilcoxon"
ALPHA = 0.05   # the paper's significance level


@dataclasses.dataclass(frozen=True)
class PairedTest:
  """Outcome of ``paired_one_sided``.

  Attributes:
    test: ``"t-test"`` (one-sided paired Student t-test) or ``"wilcoxon"`` (one-sided Wilcoxon
      signed-rank test), chosen by Shapiro-Wilk on the differences.
    p_value: one-sided p-value for H1: mean(a - b) > 0.
    shapiro_p: Shapiro-Wilk p-value of the differences; None when it is undefined (fewer than 3
      pairs, or all differences identical), in which case the Wilcoxon test is used.
    n: number of pairs.
    mean_difference: mean of a - b.
  """
  test: str
  p_value: float
  shapiro_p: float | None
  n: int
  mean_difference: float


def _as_vector(x, name: str) -> np.ndarray:
  v = np.asarray(x, dtype=np.float64)
  if v.ndim != 1:
    raise ValueError(f"{name} must be a 1-D sequence of per-seed values, got shape {v.shape}.")
  if not np.all(np.isfinite(v)):
    bad = [i for i, value in enumerate(v) if not np.isfinite(value)]
    raise ValueError(f"{name} has non-finite values (NaN or inf) at positions {bad}; a paired "
                     "test over seeds needs a finite value for every seed.")
  return v


def paired_one_sided(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> PairedTest:
  """The paper's one-sided paired test of H1: a > b over seeds (see the module docstring).

  Args:
    a: per-seed values of the model expected to be better (IA-VAE), in seed order.
    b: per-seed values of the baseline, in the same seed order.
    alpha: significance level of the Shapiro-Wilk normality check.

  Returns:
    A PairedTest.

  Raises:
    ValueError: for inputs of different lengths, fewer than 2 pairs, non-finite values, or
      alpha outside (0, 1).
  """
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must lie in (0, 1), got {alpha}.")
  a = _as_vector(a, "a")
  b = _as_vector(b, "b")
  if a.shape != b.shape:
    raise ValueError(f"paired test needs one value per seed in both samples, got {a.size} and "
                     f"{b.size} values.")
  n = a.size
  if n < 2:
    raise ValueError(f"paired test needs at least 2 seeds, got {n}.")
  d = a - b
  mean_difference = float(np.mean(d))

  if np.ptp(d) == 0.0:
    # Degenerate: Shapiro-Wilk and the t statistic are undefined; the exact signed-rank p is
    # known in closed form (module docstring), and SciPy would warn or divide by zero.
    if d[0] == 0.0:
      p = 1.0
    else:
      p = 0.5 ** n if d[0] > 0.0 else 1.0
    return PairedTest(WILCOXON, p, None, n, mean_difference)

  shapiro_p = None
  if n >= 3:
    shapiro_p = float(sp_stats.shapiro(d).pvalue)
  if shapiro_p is not None and shapiro_p >= alpha:
    p = float(sp_stats.ttest_rel(a, b, alternative="greater").pvalue)
    return PairedTest(T_TEST, p, shapiro_p, n, mean_difference)
  p = float(sp_stats.wilcoxon(a, b, alternative="greater").pvalue)
  return PairedTest(WILCOXON, p, shapiro_p, n, mean_difference)


def _finite_or_none(x: float | None) -> float | None:
  return float(x) if x is not None and math.isfinite(x) else None


def summarize_seeds(values: Sequence[float | None]) -> dict:
  """{"mean", "std", "per_seed"} of per-seed values: the mean and the sample std (ddof=1), None
  where undefined (one seed's std) or non-finite (a None or non-finite value among them)."""
  if len(values) == 0:
    raise ValueError("summarize_seeds needs at least one per-seed value, got none.")
  vals = [float("nan") if v is None else float(v) for v in values]
  n = len(vals)
  mean = sum(vals) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else float("nan")
  return {"mean": _finite_or_none(mean), "std": _finite_or_none(std),
          "per_seed": [_finite_or_none(v) for v in vals]}


def paired_comparison(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> dict:
  """``paired_one_sided(a, b, alpha)`` as {"test", "p_value", "shapiro_p", "mean_difference",
  "n"}; with one seed, no test (test, p_value and shapiro_p None) and the difference alone."""
  if len(a) != len(b):
    raise ValueError(f"paired_comparison needs one value per seed in both samples, got "
                     f"{len(a)} and {len(b)} values.")
  if len(a) < 2:
    diffs = [x - y for x, y in zip(a, b)]
    return {"test": None, "p_value": None, "shapiro_p": None,
            "mean_difference": sum(diffs) / len(diffs) if diffs else None, "n": len(a)}
  result = paired_one_sided(a, b, alpha=alpha)
  return {"test": result.test, "p_value": result.p_value, "shapiro_p": result.shapiro_p,
          "mean_difference": result.mean_difference, "n": result.n}


# The dictionaries above as a table's cells.

TESTS_NOTE = ("Shapiro-Wilk (SW) on the per-seed differences; if normality is not rejected at "
              f"{ALPHA} a one-sided paired Student t-test, otherwise (or with fewer than 3 seeds, "
              "or identical differences, where SW is undefined) a one-sided Wilcoxon signed-rank "
              f"test. `*`: p < {ALPHA}. std: sample standard deviation (ddof = 1).")


def format_summary(summary: dict, digits: int = 2) -> str:
  """A ``summarize_seeds`` dictionary as "mean ± std", "mean" (one seed) or "n/a"."""
  mean, std = summary["mean"], summary["std"]
  if mean is None:
    return "n/a"
  return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def format_share(summary: dict | None) -> str:
  """A ``summarize_seeds`` dictionary of fractions as "mean ± std%" (one decimal), "—" if None."""
  if summary is None or summary["mean"] is None:
    return "—"
  std = "" if summary["std"] is None else f" ± {100 * summary['std']:.1f}"
  return f"{100 * summary['mean']:.1f}{std}%"


def format_p(comparison: dict) -> str:
  """A ``paired_comparison``'s p-value, starred below ALPHA; "—" where no test was made."""
  p = comparison["p_value"]
  if p is None:
    return "—"
  text = "<0.0001" if p < 1e-4 else f"{p:.4f}"
  return text + ("*" if p < ALPHA else "")


def format_test(comparison: dict) -> str:
  """A ``paired_comparison``'s test, with Shapiro-Wilk's p that chose it."""
  if comparison["test"] is None:
    return f"none ({comparison['n']} seed)"
  if comparison["shapiro_p"] is None:
    return f"{comparison['test']} (SW n/a)"
  return f"{comparison['test']} (SW p={comparison['shapiro_p']:.2g})"
