"""Seed-retrain statistics: the mean and 95% Student-t interval of each architecture's
retrains, and whether the gap between the two best architectures is larger than seed noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Literal

from hpsearch.ranking import improves
from hpsearch.report.data import ArchitectureSummary, GapVerdict, SeedSummary, fmt_ci, fmt_num

# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30.
_T_975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
    2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
    2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
    2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)
_Z_975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """Return the 0.975 quantile of Student's t with ``df`` degrees of freedom.

    Exact to six decimals for ``df <= 30`` (table), and within 1e-7 above that (the
    Cornish-Fisher expansion around the normal quantile, four terms).

    Args:
        df: Degrees of freedom, at least 1.

    Raises:
        ValueError: If ``df`` is below 1.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = _Z_975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def seed_summary(values: Iterable[float]) -> SeedSummary:
    """Mean and 95% Student-t confidence interval of seed-retrain test metrics.

    Non-finite values (a diverged retrain) are kept in ``values`` but left out of the mean and
    interval. One finite value gives a mean without an interval.

    Args:
        values: Test metric of each retrain.

    Returns:
        The summary; ``mean`` is None when no value is finite.
    """
    raw = tuple(float(v) for v in values)
    finite = [v for v in raw if math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return SeedSummary(raw, 0, None, None, None)
    mean = math.fsum(finite) / n
    if n == 1:
        return SeedSummary(raw, 1, mean, None, None)
    half = t_quantile_975(n - 1) * statistics.stdev(finite) / math.sqrt(n)
    return SeedSummary(raw, n, mean, mean - half, mean + half)


def gap_verdict(
    ranked: Sequence[ArchitectureSummary], *, maximize: bool, test_metric_name: str
) -> GapVerdict:
    """Judge the gap between the two best-ranked architectures against their seed noise.

    Args:
        ranked: The ranked (explored) architectures, best first.
        maximize: Whether a larger test metric is better.
        test_metric_name: Name of the test metric, for the verdict's text.

    Returns:
        ``separated`` when the intervals do not overlap and the leader is ahead, ``reversed``
        when they do not overlap and the runner-up is ahead, ``within noise`` when they
        overlap, ``n/a`` when there is nothing to judge.
    """
    if len(ranked) < 2:
        return GapVerdict(
            ranked[0].architecture if ranked else None,
            None,
            None,
            "n/a",
            "Fewer than two architectures are explored enough to rank; there is no gap to "
            "judge.",
        )
    lead, second = ranked[0], ranked[1]
    a, b = lead.seeds, second.seeds
    if a.ci_low is None or b.ci_low is None or a.ci_high is None or b.ci_high is None:
        return GapVerdict(
            lead.architecture,
            second.architecture,
            None if a.mean is None or b.mean is None else a.mean - b.mean,
            "n/a",
            f"Cannot judge {lead.architecture} vs {second.architecture}: a confidence interval "
            f"needs at least 2 finite seed retrains each (have {a.n} and {b.n}).",
        )
    assert a.mean is not None and b.mean is not None
    difference = a.mean - b.mean
    leader_ahead = difference > 0 if maximize else difference < 0
    overlap = a.ci_low <= b.ci_high and b.ci_low <= a.ci_high
    intervals = (
        f"{lead.architecture} {fmt_ci(a)} vs {second.architecture} {fmt_ci(b)} "
        f"({test_metric_name}, 95% CI)"
    )
    if overlap:
        verdict: Literal["separated", "within noise", "reversed"] = "within noise"
        text = (
            f"The gap between {lead.architecture} and {second.architecture} is within seed "
            f"noise: the intervals overlap, {intervals}."
        )
    elif leader_ahead:
        verdict = "separated"
        text = (
            f"{lead.architecture} beats {second.architecture} by {fmt_num(abs(difference))} "
            f"{test_metric_name}, more than seed noise: the intervals do not overlap, "
            f"{intervals}."
        )
    else:
        verdict = "reversed"
        text = (
            f"Reversed on the test split: {second.architecture} beats {lead.architecture} by "
            f"{fmt_num(abs(difference))} {test_metric_name} beyond seed noise, although "
            f"{lead.architecture} had the best validation value; {intervals}."
        )
    notes = [_not_reproduced(a, maximize, test_metric_name) for a in (lead, second)]
    if notes[0] is None and verdict != "reversed":
        notes[0] = _lead_not_held(lead, second, maximize, test_metric_name)
    text = " ".join([text, *(n for n in notes if n)])
    return GapVerdict(lead.architecture, second.architecture, difference, verdict, text)


def _not_reproduced(arch: ArchitectureSummary, maximize: bool, test_metric_name: str
                    ) -> str | None:
    """A sentence when the representative's own checkpoint scored better on the test split
    than its configuration's retrains' interval: the retrains then judge a configuration
    that only some seeds train well (a GRU at a high learning rate can stay at chance), not
    the best the architecture showed."""
    seeds, checkpoint = arch.seeds, arch.test_metric
    bound = seeds.ci_high if maximize else seeds.ci_low
    if bound is None or not improves(checkpoint, bound, "max" if maximize else "min"):
        return None
    return (
        f"{arch.architecture}'s best checkpoint scored {fmt_num(checkpoint)} "
        f"{test_metric_name}, outside its retrains' interval {fmt_ci(seeds)}: its "
        f"configuration did not reproduce that result with fresh seeds, so the retrains "
        f"measure that one configuration, not what {arch.architecture} can reach."
    )


def _lead_not_held(lead: ArchitectureSummary, second: ArchitectureSummary, maximize: bool,
                   test_metric_name: str) -> str | None:
    """A sentence when most of the leader's retrains scored worse than every retrain of the
    runner-up. Seeds that split into some near the checkpoint and some far below it (a GRU
    that stays at chance with some seeds) give an interval too wide to exclude the
    checkpoint, yet the lead did not hold."""
    direction = "max" if maximize else "min"
    theirs = [v for v in second.seeds.values if math.isfinite(v)]
    ours = [v for v in lead.seeds.values if math.isfinite(v)]
    if not theirs or not ours:
        return None
    floor = min(theirs) if maximize else max(theirs)
    below = [v for v in ours if improves(floor, v, direction)]
    if 2 * len(below) <= len(ours):
        return None
    return (
        f"{lead.architecture}'s lead did not hold with fresh seeds: {len(below)} of its "
        f"{len(ours)} retrains ({', '.join(fmt_num(v) for v in below)} {test_metric_name}) "
        f"scored worse than every retrain of {second.architecture}; the rank it holds on "
        f"validation is not borne out by its retrains."
    )
