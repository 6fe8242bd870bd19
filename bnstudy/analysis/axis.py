"""Verdicts along a grid axis: a claim decided at each value of an axis, and the sentence that names the regions.

A comparison with `along: train.batch_size` is expanded into one comparison per axis value (the same arms, each
at that value). Those comparisons join the study's Holm family like any other, so the family-wise error of
every per-value verdict together stays at the study's level; nothing here tests anything. What this module
adds is the reading: neighbouring values with the same verdict form a region, and the claim's sentence names
each region and brackets each crossover between two searched values, e.g.

    supported at batch <= 2, contradicted at batch 8, inconclusive at batch 32 to 128 (crossover between 2 and 8)
"""

from __future__ import annotations

from collections.abc import Sequence

SHORT_NAMES = {"train.batch_size": "batch", "optimizer.lr": "lr", "model.init_scale": "init scale"}
FAILURES = ("contradicted", "negligible")
DECIDED = ("supported", *FAILURES)


def regions(values: Sequence[float], verdicts: Sequence[str]) -> list[tuple[str, list[float]]]:
    """Runs of neighbouring axis values (in ascending order) that share a verdict."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out: list[tuple[str, list[float]]] = []
    for i in order:
        if out and out[-1][0] == verdicts[i]:
            out[-1][1].append(values[i])
        else:
            out.append((verdicts[i], [values[i]]))
    return out


def _fmt(x: float) -> str:
    return f"{x:g}"


def _where(name: str, vals: list[float], lowest: float, highest: float) -> str:
    if len(vals) == 1:
        return f"{name} {_fmt(vals[0])}"
    if vals[0] == lowest:
        return f"{name} <= {_fmt(vals[-1])}"
    if vals[-1] == highest:
        return f"{name} >= {_fmt(vals[0])}"
    return f"{name} {_fmt(vals[0])} to {_fmt(vals[-1])}"


def crossovers(values: Sequence[float], verdicts: Sequence[str]) -> list[tuple[float, float]]:
    """Pairs of neighbouring searched values between which the verdict flips from supported to a failure
    (contradicted or negligible) or back, across any inconclusive values between them: the bracket where the
    truth changes."""
    decided = [(vals, v == "supported") for v, vals in regions(values, verdicts) if v in DECIDED]
    return [(a[-1], b[0]) for (a, va), (b, vb) in zip(decided, decided[1:]) if va != vb]


def sentence(axis: str, values: Sequence[float], verdicts: Sequence[str]) -> str:
    """The claim's verdict along `axis`: each region named, each crossover bracketed."""
    if not values:
        return "inconclusive (no axis values)"
    name = SHORT_NAMES.get(axis, axis)
    lowest, highest = min(values), max(values)
    parts = [f"{v} at {_where(name, vals, lowest, highest)}" for v, vals in regions(values, verdicts)]
    if len(parts) == 1:
        return f"{verdicts[0]} at every {name} searched ({', '.join(_fmt(x) for x in sorted(values))})"
    text = ", ".join(parts)
    brackets = [f"between {_fmt(a)} and {_fmt(b)}" for a, b in crossovers(values, verdicts)]
    return text + (f" (crossover {'; '.join(brackets)})" if brackets else "")


def overall_along(verdicts: Sequence[str]) -> str:
    """The one word for a claim decided along an axis, by the rule a study applies to its comparisons, at every
    value alike: "depends" when some values support it and others show its failure (contradicted or
    negligible); otherwise contradicted if any value is, negligible if any is, supported if all are, else
    inconclusive."""
    kinds = set(verdicts)
    if "supported" in kinds and kinds & set(FAILURES):
        return "depends"
    for word in FAILURES:
        if word in kinds:
            return word
    return "supported" if kinds == {"supported"} else "inconclusive"
