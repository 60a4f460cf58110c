"""Statistics over seeds (mean, sample std, paired differences with a t-interval) and their printed forms."""
from __future__ import annotations

import math


def mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """Paired differences a - b over the seeds both have: n, mean, sample std, and the 95% t-interval
    mean +- t(0.975, n - 1) * std / sqrt(n) (None when n < 2)."""
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
    d = [float(a[s]) - float(b[s]) for s in seeds]
    m, sd = mean_std(d)
    out = {"n": len(d), "seeds": seeds, "diffs": d, "mean": m, "std": sd, "ci95": None}
    if len(d) >= 2 and sd is not None:
        from scipy.stats import t

        h = float(t.ppf(0.975, len(d) - 1)) * sd / math.sqrt(len(d))
        out["ci95"] = [m - h, m + h]
    return out


def fmt(x, nd=4) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def fmt_paired(p: dict, nd=4) -> str:
    if not p or not p["n"]:
        return "n/a"
    s = f"{p['mean']:+.{nd}f}"
    if p["std"] is not None:
        s += f" +- {p['std']:.{nd}f}"
    if p["ci95"] is not None:
        s += f" [{p['ci95'][0]:+.{nd}f}, {p['ci95'][1]:+.{nd}f}]"
    return s + f" (n={p['n']})"


def fmt_pair(pair, nd=4) -> str:
    m, s = pair
    if m is None:
        return "n/a"
    return f"{m:.{nd}f}" if s is None else f"{m:.{nd}f} +- {s:.{nd}f}"
