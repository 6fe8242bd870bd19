"""A study's `report:` spec: where it comes from (the runs' config.yaml, else experiments/<study>.yaml), its
validation with errors that say what was expected, the metrics it names and its per-dataset values."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from bnstudy.analysis import stats
from bnstudy.analysis.errors import ReportError, ReportWarning
from bnstudy.analysis.load import LoadedRuns
from bnstudy.app import config_tree

EXPERIMENTS_DIR = config_tree.experiments_dir()


def experiment_spec(study: str, experiments_dir: Path = EXPERIMENTS_DIR) -> dict | None:
    path = experiments_dir / f"{study}.yaml"
    if not path.is_file():
        return None
    return (yaml.safe_load(path.read_text()) or {}).get("report")


def choose_spec(study: str, runs: LoadedRuns, experiments_dir: Path = EXPERIMENTS_DIR) -> dict:
    """The report block the runs were trained with (the most common one), else the experiment file's."""
    if runs.specs:
        check_one_variant(runs.specs)
        blobs = pd.Series([json.dumps(s, sort_keys=True) for s in runs.specs])
        if blobs.nunique() > 1:
            warnings.warn(f"runs carry {blobs.nunique()} different report blocks; using the most common", ReportWarning)
        spec = json.loads(blobs.value_counts().index[0])
    else:
        spec = experiment_spec(study, experiments_dir)
    if not spec:
        raise ReportError(
            f"no report block for study {study!r}: expected experiments/{study}.yaml with a `report:` "
            f"block, or runs trained with one. Known studies: {', '.join(config_tree.known_studies(experiments_dir)) or 'none'}."
        )
    return validate_spec(spec, study)


def check_one_variant(specs: list[dict]) -> None:
    """A claim is decided on one grid variant: runs of the full grid and of its quick variant (which can share a
    folder: `+preset=quick` and `+network=NAME` both set out_dir, and the later one wins) are refused, naming
    each variant and its runs."""
    variants = pd.Series([str(s.get("variant") or "default") for s in specs]).value_counts()
    if len(variants) > 1:
        found = "; ".join(f"{name} ({n} runs)" for name, n in variants.items())
        raise ReportError(
            f"the runs are of several grid variants: {found}. A report decides a claim on one variant; train each "
            f"into its own out_dir (e.g. `out_dir=outputs/quick` after `+preset=quick`) and report each folder alone."
        )


def _margin_values(value: Any) -> list:
    return list(value.values()) if isinstance(value, dict) else [value]


def _is_margin(value: Any) -> bool:
    """A margin: a number >= 0, or one per dataset ({mnist: 0.005, cifar10: 0.01})."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in _margin_values(value))


def validate_comparison(comp: Any, where: str) -> None:
    """A `compare:` entry: metric, a, b, expect; a declared margin needs `margin_reason`, `equivalent` a margin."""
    if not isinstance(comp, dict):
        raise ReportError(f"{where}: expected a mapping with metric, a, b, expect; got {comp!r}.")
    if "trend" in comp:
        validate_trend(comp, where)
    else:
        missing = [k for k in ("metric", "a", "b", "expect") if k not in comp]
        if missing:
            raise ReportError(f"{where} lacks {missing} (needs metric, a, b, expect; or metric, trend, expect).")
    if "along" in comp:
        validate_along(comp, where)
    if comp["expect"] not in stats.EXPECTATIONS:
        raise ReportError(f"{where}: `expect` must be one of {', '.join(stats.EXPECTATIONS)}, got {comp['expect']!r}.")
    if "margin" in comp and not _is_margin(comp["margin"]):
        raise ReportError(f"{where}: `margin` must be a number >= 0 or one per dataset, got {comp['margin']!r}.")
    if comp["expect"] == "equivalent" and not all(v > 0 for v in _margin_values(comp.get("margin", 0))):
        raise ReportError(
            f"{where}: `expect: equivalent` needs a `margin` > 0 (the largest difference that "
            f"does not matter), got {comp.get('margin')!r}."
        )
    if "margin" in comp and not (isinstance(comp.get("margin_reason"), str) and comp["margin_reason"].strip()):
        raise ReportError(
            f"{where}: a declared `margin` needs a `margin_reason` (one sentence: why this size), "
            f"got {comp.get('margin_reason')!r}."
        )


def validate_trend(comp: dict, where: str) -> None:
    """A trend comparison: `{metric, trend: AXIS, expect, [logx], [logy], [a, b]}`: the slope of the metric
    along a grid axis, alone or as the difference of two arms' slopes (a and b given together)."""
    missing = [k for k in ("metric", "expect") if k not in comp]
    if missing:
        raise ReportError(f"{where}: a trend comparison lacks {missing} (needs metric, trend, expect).")
    if not isinstance(comp["trend"], str) or not comp["trend"]:
        raise ReportError(
            f"{where}: `trend` must name the grid axis the slope runs along (e.g. train.batch_size), "
            f"got {comp['trend']!r}."
        )
    if ("a" in comp) != ("b" in comp):
        raise ReportError(
            f"{where}: a trend comparison takes both `a` and `b` (difference of two arms' slopes) or "
            f"neither (one slope), got only {'a' if 'a' in comp else 'b'}."
        )
    for key in ("logx", "logy"):
        if not isinstance(comp.get(key, key == "logx"), bool):
            raise ReportError(f"{where}: `{key}` must be true or false, got {comp[key]!r}.")
    if "relative_to" in comp:
        raise ReportError(f"{where}: `relative_to` is not supported in a trend comparison; use a and b.")


ALONG_AXES = ("train.batch_size", "optimizer.lr", "model.init_scale")


def validate_along(comp: dict, where: str) -> None:
    """`along: AXIS`: the comparison is decided at every value of a grid axis, not over its pooled runs."""
    axis = comp["along"]
    if not isinstance(axis, str) or not axis:
        raise ReportError(f"{where}: `along` must name a grid axis (one of {', '.join(ALONG_AXES)}), got {axis!r}.")
    if "trend" in comp:
        raise ReportError(f"{where}: a trend comparison runs along its axis already; drop `along`.")
    fixed = {*comp.get("a", {}), *comp.get("b", {}), *(comp.get("where") or {}), *(comp.get("relative_to") or {})}
    if axis in fixed:
        raise ReportError(f"{where}: `along: {axis}` must not also be fixed by a, b, where or relative_to.")


RUN_FUNCTIONS = ("mean", "median", "step0", "log10")  # `fn(key)` run metrics, see derived.add_run_metrics
FUNCTION_NAME = re.compile(r"^(\w+)\((.+)\)$")


def validate_metric_name(name: Any, study: str) -> None:
    if not isinstance(name, str) or not name:
        raise ReportError(f"study {study!r}: a metric name must be a non-empty string, got {name!r}.")
    m = FUNCTION_NAME.match(name)
    if m and m.group(1) not in RUN_FUNCTIONS:
        raise ReportError(
            f"study {study!r}: metric {name!r} uses unknown function {m.group(1)!r}; known: "
            f"{', '.join(f'{f}(KEY)' for f in RUN_FUNCTIONS)}."
        )
    if m:
        validate_metric_name(m.group(2), study)


def validate_convergence(conv: Any, study: str) -> None:
    """`convergence: {key: val/acc, tolerance: 0.005}`: the stated criterion behind the `converged` metric."""
    if not (
        isinstance(conv, dict)
        and isinstance(conv.get("key"), str)
        and _is_margin(conv.get("tolerance", -1))
        and not isinstance(conv.get("tolerance"), dict)
    ):
        raise ReportError(
            f"study {study!r}: `convergence` must be {{key: LOGGED_KEY, tolerance: NUMBER >= 0}} "
            f"(e.g. {{key: val/acc, tolerance: 0.005}}), got {conv!r}."
        )


def validate_select(select: Any, study: str) -> None:
    """`select: {by: val/acc, over: [optimizer.lr], mode: max}`: chosen on validation, never on test keys."""
    where = f"study {study!r}: `select`"
    if (
        not isinstance(select, dict)
        or not isinstance(select.get("by"), str)
        or not (
            isinstance(select.get("over"), list) and select["over"] and all(isinstance(k, str) for k in select["over"])
        )
    ):
        raise ReportError(
            f"{where} must be {{by: METRIC, over: [CONFIG_KEY, ...]}} (e.g. {{by: val/acc, over: "
            f"[optimizer.lr]}}), got {select!r}."
        )
    if select["by"].startswith("test/"):
        raise ReportError(
            f"{where}: `by: {select['by']}` is a test metric; a setting must be chosen on the "
            f"validation split (e.g. val/acc or val/loss), never on the test split."
        )
    if select.get("mode", "max") not in ("max", "min"):
        raise ReportError(f"{where}: `mode` must be max or min, got {select.get('mode')!r}.")
    validate_bounds(select.get("bounds", {}), select["over"], where)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_bounds(bounds: Any, over: list[str], where: str) -> None:
    """`bounds: {optimizer.lr: [low, high]}`: how far a selection's grid may be extended, per `over` key."""
    ok = isinstance(bounds, dict) and all(
        key in over and isinstance(b, list) and len(b) == 2 and all(map(_number, b)) and b[0] <= b[1]
        for key, b in bounds.items()
    )
    if not ok:
        raise ReportError(
            f"{where}: `bounds` must map keys of `over` to [LOW, HIGH] with LOW <= HIGH (e.g. "
            f"{{optimizer.lr: [0.001, 1.0]}}), got {bounds!r}."
        )


def validate_seeds(seeds: Any, study: str) -> None:
    """`seeds: {start: 3, step: 2, max: 10}`: the seed schedule of the group-sequential looks."""
    keys = {"start", "step", "max"}
    ok = isinstance(seeds, dict) and set(seeds) <= keys and all(isinstance(seeds.get(k), int) for k in keys)
    if not ok or not (2 <= seeds["start"] <= seeds["max"] and seeds["step"] >= 1):
        raise ReportError(
            f"study {study!r}: `seeds` must be {{start: INT, step: INT, max: INT}} with 2 <= start <= max and "
            f"step >= 1 (e.g. {{start: 3, step: 2, max: 10}}), got {seeds!r}."
        )


CONFIRMATION_SEED_BASE = 100  # the first confirmation seed of a study with a selection (bnstudy.analysis.phases)


def validate_selection_seeds(value: Any, study: str) -> None:
    """`selection_seeds: 3`: how many seeds (0 .. N-1) the selection phase trains each searched setting with."""
    if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value < CONFIRMATION_SEED_BASE):
        raise ReportError(
            f"study {study!r}: `selection_seeds` must be a whole number from 1 to {CONFIRMATION_SEED_BASE - 1} "
            f"(the selection phase's seeds 0 .. N-1; confirmation seeds start at {CONFIRMATION_SEED_BASE}), "
            f"got {value!r}."
        )


def validate_spec(spec: dict, study: str) -> dict:
    if not isinstance(spec.get("claim"), str):
        raise ReportError(f"study {study!r}: the report block needs a `claim` (one sentence).")
    for i, comp in enumerate(spec.get("compare") or []):
        validate_comparison(comp, f"study {study!r}: comparison {i + 1}")
    for name, d in (spec.get("derived") or {}).items():
        if d.get("reduce") not in ("max_stable", "range") or "over" not in d or "of" not in d:
            raise ReportError(f"study {study!r}: derived metric {name!r} needs over, of and reduce: max_stable|range.")
    if "select" in spec:
        validate_select(spec["select"], study)
    if "seeds" in spec:
        validate_seeds(spec["seeds"], study)
    if "selection_seeds" in spec:
        validate_selection_seeds(spec["selection_seeds"], study)
    for name in spec_metrics(spec):
        validate_metric_name(name, study)
    if "convergence" in spec:
        validate_convergence(spec["convergence"], study)
    elif "converged" in spec_metrics(spec):
        raise ReportError(
            f"study {study!r}: metric `converged` needs a `convergence: {{key, tolerance}}` block "
            f"(the stated criterion)."
        )
    if "steps_to_target" in spec_metrics(spec) and not _is_margin(spec.get("target_acc", -1)):
        raise ReportError(
            f"study {study!r}: metric `steps_to_target` needs `target_acc` (a number, or one per "
            f"dataset), got {spec.get('target_acc')!r}."
        )
    heavy = spec.get("heavy_tailed", [])
    if not (isinstance(heavy, list) and all(isinstance(h, str) for h in heavy)):
        raise ReportError(f"study {study!r}: `heavy_tailed` must be a list of metric names, got {heavy!r}.")
    if not isinstance(spec.get("require_trained", True), bool):
        raise ReportError(f"study {study!r}: `require_trained` must be true or false, got {spec['require_trained']!r}.")
    return spec


# A per-dataset spec value given for the family holds for its members: the embedded digits are MNIST digits.
DATASET_FAMILY = {"mnist_t10k": "mnist"}


def for_dataset(value: Any, dataset: str) -> Any:
    """A spec value given once or per dataset ({mnist: ..., cifar10: ...}; `mnist` also covers mnist_t10k)."""
    if not isinstance(value, dict):
        return value
    return value[dataset] if dataset in value else value.get(DATASET_FAMILY.get(dataset, dataset))


def spec_metrics(spec: dict) -> list[str]:
    names = list(spec.get("metrics") or ["test/acc"])
    names += [c["metric"] for c in spec.get("compare") or []]
    names += [f["y"] for f in spec.get("figures") or [] if "y" in f]
    names += [d["of"] for d in (spec.get("derived") or {}).values()]
    names += [spec["select"]["by"]] if spec.get("select") else []
    return list(dict.fromkeys(names))
