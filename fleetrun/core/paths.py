"""Where fleetrun keeps its state and looks for its configuration (XDG base directories)."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "FLEETRUN_HOME"
HOSTS_ENV = "FLEETRUN_HOSTS"
POLICY_ENV = "FLEETRUN_POLICY"


def data_dir() -> Path:
    """The task store's directory: ``$FLEETRUN_HOME``, else ``$XDG_DATA_HOME/fleetrun``."""
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "fleetrun"


def config_dir() -> Path:
    """fleetrun's configuration directory: ``$XDG_CONFIG_HOME/fleetrun``."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "fleetrun"
