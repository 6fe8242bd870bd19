"""The command line's checks and exits: group options checked before Hydra composes, `out_dir` checked
before anything is written, and the exit codes (2: bad input; 128+signal: stopped by a signal)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

from bnstudy.app import config_tree
from bnstudy.app.config import ConfigError
from bnstudy.app.signals import RunInterrupted

EXIT_BAD_INPUT = 2


def exit_bad_input(error: Exception) -> NoReturn:
    """A one-paragraph message and exit 2; nothing has been written."""
    print(f"bnstudy: {error}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def exit_interrupted(stop: RunInterrupted) -> NoReturn:
    """One line naming the signal and the run folders marked interrupted; exit 128+signal, as a shell does."""
    marked = f"; marked interrupted: {', '.join(stop.folders)}" if stop.folders else ""
    print(f"bnstudy: stopped by {stop.name}{marked}", file=sys.stderr)
    sys.exit(128 + stop.signum)


def check_group_choices(overrides: list[str], config_dir: Path) -> dict[str, list[str]]:
    """`group=option` overrides (optimizer=rmsprop, experiment=placment) name an existing option; checked
    before Hydra composes, whose own error would exit 1, or for the optional experiment not at all.
    Returns the options chosen per group (a sweep's values too)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    groups = sorted(p.name for p in config_dir.iterdir() if p.is_dir() and p.name != "hydra")
    groups.append(config_tree.EXPERIMENT_GROUP)
    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
    except HydraException:
        return {}  # bad syntax: Hydra's own message says where
    chosen: dict[str, list[str]] = {}
    for o in parsed:
        if o.key_or_group not in groups or o.is_delete() or o.package is not None:
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        known = group_options(o.key_or_group, config_dir)
        for value in values:
            if str(value) not in known:
                what = "study" if o.key_or_group == "experiment" else "option"
                raise ConfigError(
                    f"Invalid config: `{o.key_or_group}` must be one of the known {what}s {known}; got {value!r}."
                )
            chosen.setdefault(o.key_or_group, []).append(str(value))
    return chosen


def group_options(group: str, config_dir: Path) -> list[str]:
    if group == config_tree.EXPERIMENT_GROUP:
        return config_tree.known_studies()
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def check_out_dir(out_dir: str) -> None:
    """`out_dir` must be (or be creatable in) a writable folder; checked without creating anything."""
    path = Path(out_dir).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"Invalid config: `out_dir` must be a folder bnstudy can write run folders in; got {out_dir!r}, "
            f"but {existing} is a file, not a folder."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"Invalid config: `out_dir` must be a folder bnstudy can write run folders in; got {out_dir!r}, "
            f"but {existing} is not writable by this user. Choose another `out_dir=`."
        )
