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
    listed = run_in(plugin_env, "plugins", extra_env=env).stdout.splitlines()
    assert [row.split(None, 1)[0] for row in listed[1:4]] == ["fleetrun.transports.local", "fleetrun.transports.ssh", "example_notifier"]
    assert listed[3].split()[1:] == ["fleetrun-example-notifier", "0.1.0", "blocked", "by", "$FLEETRUN_DISABLE_PLUGINS"]


def test_a_plugin_that_fails_to_load_is_reported_and_the_others_still_run(plugin_env, tmp_path):
    package = tmp_path / "broken-plugin"
    package.mkdir()
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "fleetrun-broken-plugin"\nversion = "0.1.0"\n\n'
        '[project.entry-points.fleetrun]\nbroken = "fleetrun_broken_plugin"\n\n'
        '[tool.setuptools]\npy-modules = ["fleetrun_broken_plugin"]\n'
    )
    # Its message also tries to clear the screen: fleetrun's log line and table show it escaped.
    (package / "fleetrun_broken_plugin.py").write_text('raise RuntimeError("broken on purpose\\x1b[2J")\n')
    pip = [str(plugin_env / "bin" / "python"), "-m", "pip", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", str(package)], check=True, capture_output=True, text=True, timeout=600)
    try:
        sink = tmp_path / "events.tsv"
        env = {"FLEETRUN_EXAMPLE_NOTIFIER_FILE": str(sink), "FLEETRUN_HOME": str(tmp_path / "home")}
        result = run_in(plugin_env, "run", "local", "--", "echo still runs", extra_env=env)
        assert (result.returncode, result.stdout) == (0, "still runs\n")
        assert "plugin 'broken' (fleetrun-broken-plugin 0.1.0) failed to load: RuntimeError: broken on purpose\\x1b[2J\n" in result.stderr
        assert [line.split("\t")[0] for line in sink.read_text().splitlines()] == ["created", "completed"]
        listed = json.loads(run_in(plugin_env, "plugins", "--json", extra_env=env).stdout)["plugins"]
        broken = next(p for p in listed if p["name"] == "broken")
        assert (broken["source"], broken["error"]) == ("fleetrun-broken-plugin 0.1.0", "RuntimeError: broken on purpose\x1b[2J")
        table = run_in(plugin_env, "plugins", extra_env=env).stdout
        assert "FAILED TO LOAD: RuntimeError: broken on purpose\\x1b[2J\n" in table
    finally:
        subprocess.run([*pip, "uninstall", "--yes", "fleetrun-broken-plugin"], check=True, capture_output=True, timeout=120)
