"""The graded verdict of a rerun cell against its published task record: a pure function
of two records (`grade`), what `scripts/reproduce.py` prints and exits with.

    verdict = grade(published, rerun, episodes=50)
    print(verdict.grade, verdict.exit_code, verdict.reasons, verdict.deviation_line())

Grades, by what may differ between two honest runs of one cell: *identical*; *equal within
float rounding* (every success count and the structure identical, continuous values
within a relative `REL_TOL` or an absolute `ABS_TOL`: another CPU kind); *consistent* (the
structure identical, the final success counts not told apart by a two-sided Fisher exact
test at level `ALPHA`: evaluation noise); else *different*, as is a record that
contradicts its own success curve.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from agents.runs import is_finite
from eva_rl.metrics import success_auc

COMPARED = ("success", "mean_return", "auc", "success_curve", "loss_curve", "first_grad_norm",
            "trainable_params")

EXIT_IDENTICAL, EXIT_DIFFERENT, EXIT_ROUNDING, EXIT_CONSISTENT = 0, 1, 3, 4
GRADES = {"identical": EXIT_IDENTICAL, "equal within float rounding": EXIT_ROUNDING,
          "consistent": EXIT_CONSISTENT, "different": EXIT_DIFFERENT}
REL_TOL, ABS_TOL, ALPHA = 1e-3, 1e-6, 0.05

# the compared values by what may differ between two honest runs of one cell:
# schedules and sizes never; success counts only by evaluation noise; the rest by rounding
STRUCTURE = ("trainable_params", "success_curve.steps", "loss_curve.steps")
COUNTS = ("success", "success_curve.success")
CONTINUOUS = ("mean_return", "auc", "success_curve.return", "loss_curve.loss",
              "first_grad_norm")


def fisher_exact(k1: int, k2: int, n: int) -> float:
    """Two-sided p-value of Fisher's exact test that ``k1`` of ``n`` and ``k2`` of ``n``
    successes come from one success rate (tables as or less likely than the observed
    one, exact integer arithmetic)."""
    total = k1 + k2
    weight = [math.comb(n, x) * math.comb(n, total - x)
              for x in range(max(0, total - n), min(n, total) + 1)]
    observed = math.comb(n, k1) * math.comb(n, total - k1)
    return sum(w for w in weight if w <= observed) / math.comb(2 * n, total)


def _values(rec: dict[str, Any], key: str) -> list[Any] | None:
    value: Any = rec
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return None
    return list(value) if isinstance(value, list) else [value]


def deviation(published: dict[str, Any], rerun: dict[str, Any], key: str
              ) -> tuple[float, float] | None:
    """The largest absolute and relative difference of ``key`` (dotted for a curve's
    list) between the records; None where they do not line up (a missing value, another
    length, a value that is not a number)."""
    a, b = _values(published, key), _values(rerun, key)
    if a is None or b is None:
        return (0.0, 0.0) if a == b else None
    if len(a) != len(b) or not all(is_finite(v) for v in a + b):
        return None
    absolute = max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)
    relative = max((abs(x - y) / max(abs(x), abs(y)) for x, y in zip(a, b, strict=True)
                    if x != y), default=0.0)
    return absolute, relative


def _within(published: dict[str, Any], rerun: dict[str, Any], key: str, rel_tol: float,
            abs_tol: float) -> bool:
    a, b = _values(published, key), _values(rerun, key)
    if a is None or b is None or deviation(published, rerun, key) is None:
        return a == b
    return all(abs(x - y) <= max(rel_tol * max(abs(x), abs(y)), abs_tol)
               for x, y in zip(a, b, strict=True))


def self_contradictions(rec: dict[str, Any], who: str) -> list[str]:
    """Where a record disagrees with its own success curve (its AUC by Continual World's
    rule, its final success and return are the curve's last point): no run writes that."""
    curve = rec.get("success_curve")
    try:
        steps, success, returns = curve["steps"], curve["success"], curve["return"]
        auc = success_auc(success, steps) if len(steps) > 1 else float(success[0])
    except (KeyError, TypeError, ValueError, IndexError):
        return [f"{who} success_curve is not a curve"]
    out = []
    if not is_finite(rec.get("auc")) or abs(rec["auc"] - auc) > 1e-9:
        out.append(f"{who} auc {rec.get('auc')!r} is not its success curve's ({auc!r})")
    if rec.get("success") != success[-1]:
        out.append(f"{who} success {rec.get('success')!r} is not its success curve's last "
                   f"point ({success[-1]!r})")
    if rec.get("mean_return") != returns[-1]:
        out.append(f"{who} mean_return {rec.get('mean_return')!r} is not its success "
                   f"curve's last return ({returns[-1]!r})")
    return out


@dataclass(frozen=True)
class Verdict:
    """How a rerun compares with the published record: a grade of `GRADES`, why, and
    the largest deviation of every compared value."""

    grade: str
    reasons: tuple[str, ...]
    deviations: dict[str, tuple[float, float] | None]

    @property
    def exit_code(self) -> int:
        """The script's exit status for this grade (`GRADES`)."""
        return GRADES[self.grade]

    def deviation_line(self) -> str:
        """``key abs A rel R`` for every compared value."""
        parts = []
        for key, dev in self.deviations.items():
            if dev is None:
                parts.append(f"{key} (does not line up)")
            elif dev == (0.0, 0.0):
                parts.append(f"{key} 0")
            else:
                parts.append(f"{key} abs {dev[0]:.3g} rel {dev[1]:.3g}")
        return "; ".join(parts)


def grade(published: dict[str, Any], rerun: dict[str, Any], episodes: int,
          rel_tol: float = REL_TOL, abs_tol: float = ABS_TOL, alpha: float = ALPHA) -> Verdict:
    """The verdict of ``rerun`` against ``published`` (task records), ``episodes`` being
    the final evaluation's: identical; equal within float rounding (every success count
    and the structure identical, continuous values within ``rel_tol`` or ``abs_tol``);
    consistent (the structure identical and the final success counts not told apart by a
    two-sided Fisher exact test at level ``alpha``); else different. See
    `scripts/reproduce.py` for the exit codes."""
    devs = {key: deviation(published, rerun, key) for key in STRUCTURE + COUNTS + CONTINUOUS}
    if all(json.dumps(published.get(k), sort_keys=True) == json.dumps(rerun.get(k),
                                                                      sort_keys=True)
           for k in COMPARED):
        return Verdict("identical", (f"equal: {', '.join(COMPARED)}",), devs)
    broken = self_contradictions(published, "published") + self_contradictions(rerun, "rerun")
    broken += [f"{key} differs ({_show(published, key)} vs {_show(rerun, key)})"
               for key in STRUCTURE if _values(published, key) != _values(rerun, key)]
    broken += [f"{key} does not line up" for key in COUNTS + CONTINUOUS if devs[key] is None]
    if broken:
        return Verdict("different", tuple(broken), devs)
    counts_equal = all(_values(published, k) == _values(rerun, k) for k in COUNTS)
    outside = [f"{key} (abs {devs[key][0]:.3g}, rel {devs[key][1]:.3g})"
               for key in CONTINUOUS if not _within(published, rerun, key, rel_tol, abs_tol)]
    if counts_equal and not outside:
        return Verdict("equal within float rounding", (
            "every success count and trainable_params identical; every continuous value "
            f"within rel {rel_tol:g} or abs {abs_tol:g}",), devs)
    why = (["success counts differ"] if not counts_equal else []) + \
        [f"beyond rel {rel_tol:g} / abs {abs_tol:g}: {', '.join(outside)}"] * bool(outside)
    k1, k2 = (round(r["success"] * episodes) for r in (published, rerun))
    if any(abs(r["success"] * episodes - k) > 1e-6 for r, k in ((published, k1), (rerun, k2))):
        return Verdict("different", (*why, f"a success is not a count of {episodes} episodes"),
                       devs)
    p = fisher_exact(k1, k2, episodes)
    test = (f"final success {k1}/{episodes} published vs {k2}/{episodes} rerun: two-sided "
            f"Fisher exact p = {p:.3g}")
    if p >= alpha:
        return Verdict("consistent", (*why, f"{test} >= {alpha:g} (within evaluation noise)"),
                       devs)
    return Verdict("different", (*why, f"{test} < {alpha:g} (beyond evaluation noise)"), devs)


def _show(rec: dict[str, Any], key: str) -> str:
    value = _values(rec, key)
    return f"{value!r:.80}"


def differences(published: dict[str, Any], rerun: dict[str, Any]) -> list[str]:
    """The compared fields that differ, each with both values."""
    out = []
    for key in COMPARED:
        if json.dumps(published.get(key), sort_keys=True) != json.dumps(rerun.get(key),
                                                                        sort_keys=True):
            out.append(f"{key}: published {published.get(key)!r:.300} vs rerun "
                       f"{rerun.get(key)!r:.300}")
    return out
