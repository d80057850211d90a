"""What the benchmarks share: the result document written as they go, the checkout's commit,
one-line errors, and the statistics of paired rounds (medians with order-statistics
intervals, the AB/BA crossover estimate, Amdahl's prediction).

`bench-encoder` and `bench-ab` both time rounds of two or more modes on the same inputs and
report per-round ratios; these are the pieces they have in common. Pure standard library.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
from pathlib import Path

CONFIDENCE = 0.95


# -- the result document ----------------------------------------------------------------------

def git_sha() -> str | None:
    """The checkout's commit, for the result file (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


def error_line(e: BaseException) -> str:
    """An exception as one line for a result file: its type and the first line of its text."""
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:300] if s else ''}"


class Recorder:
    """The result document, rewritten (atomically) after every step that adds to it."""

    def __init__(self, doc: dict, results_dir: Path):
        self.doc = doc
        self.dir = results_dir
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def json_path(self) -> Path:
        return self.dir / f"{self.doc['name']}.json"

    def error(self, where: str, e: BaseException | str):
        self.doc["errors"].append({"where": where,
                                   "error": e if isinstance(e, str) else error_line(e)})

    def save(self):
        tmp = self.json_path.with_suffix(".json.part")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        os.replace(tmp, self.json_path)


# -- statistics (pure) -------------------------------------------------------------------------

def median_ci(values, confidence: float = CONFIDENCE) -> dict:
    """Median and a distribution-free interval for it from order statistics.

    With n samples the number below the true median is Binomial(n, 1/2); the interval
    [x_(j), x_(n-j+1)] covers the median with probability 1 - 2 P(B <= j-1). j is the largest
    rank whose coverage is still >= `confidence` (n = 20: 6th and 15th, 95.9 %). Below n = 6
    no pair reaches 95 %: the interval is [min, max] and `coverage` says what it achieves."""
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if n == 0:
        return {"n": 0, "median": None, "lo": None, "hi": None, "coverage": None,
                "min": None, "max": None}
    alpha = 1 - confidence
    cdf, j = 0.0, 0
    for k in range(n + 1):
        p = math.comb(n, k) / 2 ** n
        if cdf + p > alpha / 2:
            break
        cdf += p
        j = k + 1  # P(B <= j-1) <= alpha/2
    if j == 0 or j > n - j + 1:
        lo, hi, coverage = xs[0], xs[-1], 1 - 2 / 2 ** n if n > 1 else 0.0
    else:
        lo, hi, coverage = xs[j - 1], xs[n - j], 1 - 2 * cdf
    return {"n": n, "median": statistics.median(xs), "lo": lo, "hi": hi,
            "coverage": round(coverage, 4), "min": xs[0], "max": xs[-1]}


def t_two_sided(df: int, confidence: float = CONFIDENCE) -> float:
    """Student's t quantile with P(|T| <= t) = `confidence` for `df` degrees of freedom
    (df 4: 2.776; df 18: 2.101). P(|T| <= t) has a closed form for integer df (a finite
    series in cos θ, θ = atan(t / √df)); it rises with t, so bisection finds t. Exact to
    1e-9, without scipy."""
    if df < 1:
        raise ValueError("df must be >= 1")

    def inside(t: float) -> float:
        th = math.atan(t / math.sqrt(df))
        c2, s = math.cos(th) ** 2, math.sin(th)
        if df % 2:  # odd: (2/π)(θ + sinθ cosθ (1 + 2/3 c² + 2·4/(3·5) c⁴ + ...))
            term, acc = 1.0, 1.0 if df > 1 else 0.0
            for k in range(1, (df - 1) // 2):
                term *= c2 * (2 * k) / (2 * k + 1)
                acc += term
            return 2 / math.pi * (th + s * math.cos(th) * acc)
        term, acc = 1.0, 1.0  # even: sinθ (1 + 1/2 c² + 1·3/(2·4) c⁴ + ...)
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            acc += term
        return s * acc

    lo, hi = 0.0, 1.0
    while inside(hi) < confidence:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if inside(mid) < confidence else (lo, mid)
        if hi - lo < 1e-10:
            break
    return (lo + hi) / 2


def crossover(ratios: list[float], second_is_num: list[bool],
              confidence: float = CONFIDENCE) -> dict:
    """The paired ratio num/den of an AB/BA crossover, with the order effect taken out.

    Each round runs both modes, in alternating order. If whichever mode runs second in a
    round is a little faster (or slower), the per-round ratio num/den is high in rounds
    where num ran second and low in the others; the median and its order-statistics
    interval carry that as noise. The textbook analysis of a two-period crossover
    (Hills and Armitage) takes d = log ratio per round, the mean of d over each order group,
    the estimate exp((mean_num_second + mean_num_first) / 2), the order effect
    exp((mean_num_second - mean_num_first) / 2) (> 1: the second mode of a round is faster),
    and a Student t interval from the pooled within-group variance with n - 2 degrees of
    freedom. Needs >= 2 rounds of each order; with balanced orders and no order effect the
    estimate is the geometric mean of the ratios."""
    pairs = [(math.log(r), bool(s)) for r, s in zip(ratios, second_is_num) if r and r > 0]
    a = [d for d, s in pairs if s]
    b = [d for d, s in pairs if not s]
    out = {"n": len(pairs), "n_num_second": len(a), "n_num_first": len(b), "estimate": None,
           "lo": None, "hi": None, "half_width_pct": None, "order_effect": None,
           "order_effect_lo": None, "order_effect_hi": None, "sd_log": None, "df": None,
           "confidence": confidence}
    if len(a) < 2 or len(b) < 2:
        return out
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    df = len(a) + len(b) - 2
    var = ((len(a) - 1) * statistics.variance(a) + (len(b) - 1) * statistics.variance(b)) / df
    # estimate and order effect are (ma ± mb) / 2: the same standard error
    se = math.sqrt(var * (1 / len(a) + 1 / len(b))) / 2
    t = t_two_sided(df, confidence)
    g, p = (ma + mb) / 2, (ma - mb) / 2
    out.update(estimate=math.exp(g), lo=math.exp(g - t * se), hi=math.exp(g + t * se),
               order_effect=math.exp(p), order_effect_lo=math.exp(p - t * se),
               order_effect_hi=math.exp(p + t * se), sd_log=math.sqrt(var), df=df, t=t)
    out["half_width_pct"] = round(100 * (out["hi"] - out["lo"]) / 2 / out["estimate"], 3)
    return out


def paired_speedup(base: list[float], other: list[float]) -> dict:
    """Per-round ratios base/other (> 1: `other` is faster) of rounds both completed."""
    ratios = [a / b for a, b in zip(base, other) if a and b]
    s = median_ci(ratios)
    mb, mo = median_ci(base)["median"], median_ci(other)["median"]
    s["of_medians"] = mb / mo if mb and mo else None
    return s


def predicted_speedup(share: float, gain: float) -> float:
    """Amdahl: a part taking `share` of the time that becomes `gain` times faster."""
    return 1.0 / ((1.0 - share) + share / gain)


def footer_markdown(doc: dict) -> list[str]:
    """A report's last lines: the errors it met (at most 30) and the command that made it."""
    lines = []
    errs = doc.get("errors", [])
    if errs:
        lines += ["", "Errors:", ""] + [f"- {e['where']}: {e['error']}" for e in errs[:30]]
    if doc.get("command"):
        lines += ["", f"Command: `{doc['command']}`"]
    return lines
