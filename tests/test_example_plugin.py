"""A real third-party plugin: installed into a fresh environment, loaded by entry point."""

from __future__ import annotations

import json
import os
import subprocess
import venv
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> Path:
    """A new virtual environment with fleetrun and the example notifier installed from source."""
    root = tmp_path_factory.mktemp("plugin-venv")
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         str(REPO), str(REPO / "examples" / "fleetrun-example-notifier")],
        check=True, capture_output=True, text=True, timeout=600,
    )
    return root


def run_in(env_root: Path, *args: str, extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FLEETRUN_DISABLE_PLUGIN_AUTOLOAD"}
    env.update(extra_env)
    return subprocess.run([str(env_root / "bin" / "fleetrun"), *args], capture_output=True, text=True, env=env, timeout=60)


def test_installed_plugin_is_loaded_and_receives_the_events_of_a_real_run(plugin_env, tmp_path):
    sink = tmp_path / "events.tsv"
    env = {"FLEETRUN_EXAMPLE_NOTIFIER_FILE": str(sink), "FLEETRUN_HOME": str(tmp_path / "home")}
    plugins = json.loads(run_in(plugin_env, "plugins", "--json", extra_env=env).stdout)
    example = next(p for p in plugins["plugins"] if p["name"] == "example_notifier")
    assert example["source"] == "fleetrun-example-notifier 0.1.0"
    assert example["hooks"] == ["fleetrun_task_cancelled", "fleetrun_task_completed", "fleetrun_task_created"]

    result = run_in(plugin_env, "run", "local", "--", "echo plugged; exit 5", extra_env=env)
    assert result.returncode == 5 and result.stdout == "plugged\n"
    rows = [line.split("\t") for line in sink.read_text().splitlines()]
    task_id = rows[0][1]
    assert rows == [
        ["created", task_id, "local", "queued", "-", "echo plugged; exit 5"],
        ["completed", task_id, "local", "failed", "5", "echo plugged; exit 5"],
    ]


def test_a_blocked_plugin_receives_nothing(plugin_env, tmp_path):
    sink = tmp_path / "events.tsv"
    env = {
        "FLEETRUN_EXAMPLE_NOTIFIER_FILE": str(sink),
        "FLEETRUN_HOME": str(tmp_path / "home"),
        "FLEETRUN_DISABLE_PLUGINS": "example_notifier",
    }
    assert run_in(plugin_env, "run", "local", "--", "true", extra_env=env).returncode == 0
    assert not sink.exists()
