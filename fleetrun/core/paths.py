"""Where fleetrun keeps its state and looks for its configuration (XDG base directories)."""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Callable

from fleetrun.core.errors import FleetrunError

HOME_ENV = "FLEETRUN_HOME"
HOSTS_ENV = "FLEETRUN_HOSTS"
POLICY_ENV = "FLEETRUN_POLICY"


class HomeDirectoryError(FleetrunError):
    """A path starts with ``~user`` for a user this machine does not have, or with ``~``
    where no home directory can be found."""


def home_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the ``~`` or ``~user`` that ``path`` starts with cannot be expanded here, or None."""
    text = os.fspath(path)
    if not text.startswith("~"):
        return None
    user = text[1:].split("/", 1)[0]
    if not user:
        reason = _no_home_reason()
        return None if reason is None else f"{text!r} starts with ~, the home directory, and there is none ({reason})"
    try:
        pwd.getpwnam(user)
    except KeyError:
        return f"{text!r} starts with the home directory of user {user!r}, who does not exist on this machine"
    return None


def _no_home_reason() -> str | None:
    if os.environ.get("HOME"):
        return None
    try:
        pwd.getpwuid(os.getuid())
    except KeyError:
        return f"$HOME is not set and user id {os.getuid()} has no account"
    return None


def expand_home(path: str | os.PathLike[str], *, given_by: str | None = None) -> Path:
    """``path`` with the ``~`` or ``~user`` it starts with made that home directory;
    :class:`HomeDirectoryError` saying why if it cannot be, after ``given_by: `` when given
    (pathlib's own error is a bare RuntimeError that names neither the path nor the user)."""
    problem = home_problem(path)
    if problem is not None:
        raise HomeDirectoryError(problem if given_by is None else f"{given_by}: {problem}")
    return Path(path).expanduser()


def data_dir() -> Path:
    """The task store's directory: ``$FLEETRUN_HOME``, else ``$XDG_DATA_HOME/fleetrun``.

    A relative ``$FLEETRUN_HOME`` is made absolute against the current directory, so
    records and messages name the same place whatever directory a later step runs in.
    """
    override = os.environ.get(HOME_ENV)
    if override:
        return expand_home(override, given_by=f"${HOME_ENV}").absolute()
    return _xdg_base("XDG_DATA_HOME", ".local", "share") / "fleetrun"


def config_dir() -> Path:
    """fleetrun's configuration directory: ``$XDG_CONFIG_HOME/fleetrun``."""
    return _xdg_base("XDG_CONFIG_HOME", ".config") / "fleetrun"


def _xdg_base(variable: str, *default_under_home: str) -> Path:
    # The XDG base directory specification says a relative value is invalid and to be ignored.
    value = os.environ.get(variable)
    if value and os.path.isabs(value):
        return Path(value)
    reason = _no_home_reason()
    if reason is not None:
        raise HomeDirectoryError(f"cannot find the home directory ({reason}): set $HOME or ${variable}")
    return Path.home().joinpath(*default_under_home)


def config_file_location(
    explicit: str | os.PathLike[str] | None, *, env: str, name: str, flag: str = "the path given"
) -> Path:
    """The file :func:`find_config_file` reads, whether or not it is there now."""
    for origin, candidate in ((flag, explicit), (f"${env}", os.environ.get(env))):
        if candidate:
            return expand_home(candidate, given_by=origin)
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
    path = config_file_location(explicit, env=env, name=name, flag=flag)
    origin = flag if explicit else env if os.environ.get(env) else None
    if origin is None:
        return path if path.is_file() else None
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "not found"
        raise not_found(str(path), origin, problem)
    return path
