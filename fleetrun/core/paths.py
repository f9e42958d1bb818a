"""Where fleetrun keeps its state and looks for its configuration (XDG base directories)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

HOME_ENV = "FLEETRUN_HOME"
HOSTS_ENV = "FLEETRUN_HOSTS"
POLICY_ENV = "FLEETRUN_POLICY"


def data_dir() -> Path:
    """The task store's directory: ``$FLEETRUN_HOME``, else ``$XDG_DATA_HOME/fleetrun``.

    A relative ``$FLEETRUN_HOME`` is made absolute against the current directory, so
    records and messages name the same place whatever directory a later step runs in.
    """
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override).expanduser().absolute()
    return _xdg_base("XDG_DATA_HOME", ".local", "share") / "fleetrun"


def config_dir() -> Path:
    """fleetrun's configuration directory: ``$XDG_CONFIG_HOME/fleetrun``."""
    return _xdg_base("XDG_CONFIG_HOME", ".config") / "fleetrun"


def _xdg_base(variable: str, *default_under_home: str) -> Path:
    # The XDG base directory specification says a relative value is invalid and to be ignored.
    value = os.environ.get(variable)
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home().joinpath(*default_under_home)


def config_file_location(explicit: str | os.PathLike[str] | None, *, env: str, name: str) -> Path:
    """The file :func:`find_config_file` reads, whether or not it is there now."""
    for candidate in (explicit, os.environ.get(env)):
        if candidate:
            return Path(candidate).expanduser()
    return config_dir() / name


def find_config_file(
    explicit: str | os.PathLike[str] | None,
    *,
    flag: str,
    env: str,
    name: str,
    not_found: Callable[[str, str, str], Exception],
) -> Path | None:
    """A configuration file: ``explicit`` (from ``flag``), then ``$env``, then ``name`` in the config dir.

    A path given by flag or environment must be a file: otherwise ``not_found(path,
    origin, problem)`` is raised, ``problem`` being "not found", "is a directory" or "is
    not a regular file". The config-dir file is optional.
    """
    path = config_file_location(explicit, env=env, name=name)
    origin = flag if explicit else env if os.environ.get(env) else None
    if origin is None:
        return path if path.is_file() else None
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "not found"
        raise not_found(str(path), origin, problem)
    return path
