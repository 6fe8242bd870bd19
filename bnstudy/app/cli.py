"""The command line's checks and exits: group options and keys checked before Hydra composes, `out_dir`
checked before anything is written, and the exit codes (2: bad input; 3: a write failed, e.g. no space left
on device; 128+signal: stopped by a signal)."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

from bnstudy.app import config_tree
from bnstudy.app.config import ConfigError
from bnstudy.app.signals import RunInterrupted

EXIT_BAD_INPUT = 2
EXIT_WRITE_FAILED = 3


def exit_bad_input(error: Exception) -> NoReturn:
    """A one-paragraph message and exit 2; nothing has been written."""
    print(f"bnstudy: {error}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def exit_write_failed(error: OSError, marked: list[str], folder: str | None = None) -> NoReturn:
    """One line naming the file that could not be written (or, when the error names none, the `folder` written
    in) and why (`[Errno 28] No space left on device`) and the run folders marked failed; exit 3."""
    named = error.filename or folder
    where = f" {named}" if named else ""
    why = error.strerror or str(error)
    failed = f"; marked failed: {', '.join(marked)}" if marked else ""
    print(f"bnstudy: could not write{where}: {why.lower()} ([Errno {error.errno}]){failed}", file=sys.stderr)
    sys.exit(EXIT_WRITE_FAILED)


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind `error` (itself, or one it was raised from: orbax wraps a failed write)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def exit_interrupted(stop: RunInterrupted) -> NoReturn:
    """One line naming the signal and the run folders marked interrupted; exit 128+signal, as a shell does.
    The runs are marked and the wandb process closed by now: `os._exit` skips the interpreter's teardown,
    where XLA's threads could crash the process (exit 139) after the right line was printed."""
    marked = f"; marked interrupted: {', '.join(stop.folders)}" if stop.folders else ""
    print(f"bnstudy: stopped by {stop.name}{marked}", file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + stop.signum)


def check_group_choices(overrides: list[str], config_dir: Path) -> dict[str, list[str]]:
    """`group=option` overrides (optimizer=rmsprop, experiment=placment) name an existing option; checked
    before Hydra composes, whose own error would exit 1, or for the optional experiment not at all.
    Returns the options chosen per group (a sweep's values too)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    groups = sorted(p.name for p in config_dir.iterdir() if p.is_dir() and p.name != "hydra")
    groups.append(config_tree.EXPERIMENT_GROUP)
    try:
        parsed = OverridesParser.create().parse_overrides(override_arguments(overrides))
    except HydraException:
        return {}  # bad syntax: Hydra's own message says where
    chosen: dict[str, list[str]] = {}
    for o in parsed:
        if o.key_or_group not in groups:
            check_known_key(o)
            continue
        if o.is_delete() or o.package is not None:
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        known = group_options(o.key_or_group, config_dir)
        for value in values:
            if str(value) not in known:
                what = "studies" if o.key_or_group == "experiment" else "options"
                raise ConfigError(
                    f"Invalid config: `{o.key_or_group}` must be one of the known {what} {known}; got {value!r}."
                )
            chosen.setdefault(o.key_or_group, []).append(str(value))
    return chosen


INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def hydra_arguments(arguments: list[str]) -> list[str]:
    """The command line for Hydra, with `-m` moved first (Hydra takes no flag after an override) and a bare
    `--info` moved last: its optional topic would otherwise take the override after it (`--info experiment=...`)."""
    multirun = [a for a in arguments if a in ("-m", "--multirun")]
    out = multirun + [a for a in arguments if a not in multirun]
    for i, a in enumerate(out[:-1]):
        if a in ("--info", "-i") and out[i + 1] not in INFO_TOPICS:
            return out[:i] + out[i + 1 :] + [a]
    return out


def override_arguments(arguments: list[str]) -> list[str]:
    """The `key=value` (and `~key`) arguments: Hydra's flags and their values (`--cfg job`, `--info
    defaults`, `-cn NAME`) are not overrides."""
    return [a for a in arguments if not a.startswith("-") and ("=" in a or a.startswith("~"))]


def check_known_key(override) -> None:
    """A plain `key=value` names a key of the schema (Hydra's own error would exit 1); `+key=` adds one on
    purpose (the parse then says whether the schema takes it) and `hydra.*` keys are Hydra's."""
    key = override.key_or_group
    if override.is_add() or override.is_force_add() or key.startswith("hydra") or "/" in key:
        return
    node = config_tree.schema_defaults()
    for part in key.split("."):
        if not isinstance(node, dict):
            return  # inside a free-form value (a study's `report`): the parse checks it
        if part not in node:
            raise ConfigError(
                f"Invalid config: unknown key `{key}`. Check its spelling; the known keys are in configs/ and "
                f"in the README's config table."
            )
        node = node[part]


def group_options(group: str, config_dir: Path) -> list[str]:
    if group == config_tree.EXPERIMENT_GROUP:
        return config_tree.known_studies()
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def check_paths(out_dir: str, compile_cache_dir: str | None) -> None:
    """`out_dir` and `compile_cache_dir` (when set) are folders bnstudy can write in; nothing is created."""
    check_folder("out_dir", out_dir, "run folders")
    if compile_cache_dir:
        check_folder("compile_cache_dir", compile_cache_dir, "its compiled programs (or null: no cache)")


def check_folder(key: str, value: str, what: str) -> None:
    """`key` must be (or be creatable in) a writable folder; checked without creating anything."""
    path = Path(value).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    expected = f"Invalid config: `{key}` must be a folder bnstudy can write {what} in; got {value!r}, but"
    if not existing.is_dir():
        raise ConfigError(f"{expected} {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{expected} {existing} is not writable by this user. Choose another `{key}=`.")
    try_creating(path, existing, expected, key)


def try_creating(path: Path, existing: Path, expected: str, key: str) -> None:
    """Create the missing part of the folder and remove it again: some folders pass the permission check and
    still refuse (/proc, a read-only mount)."""
    if path == existing:
        return
    first_new = path
    while first_new.parent != existing:
        first_new = first_new.parent
    try:
        path.mkdir(parents=True)
    except OSError as e:
        why = (e.strerror or str(e)).lower()
        raise ConfigError(
            f"{expected} creating it in {existing} failed: {why} ([Errno {e.errno}]). Choose another `{key}=`."
        ) from None
    finally:
        shutil.rmtree(first_new, ignore_errors=True)
