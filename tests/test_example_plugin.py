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


BROKEN_PLUGINS = {
    # entry-point name: (module source, what fleetrun reports)
    "broken": (
        # Its message also tries to clear the screen: fleetrun's log line and table show it escaped.
        'raise RuntimeError("broken on purpose\\x1b[2J")\n',
        "RuntimeError: broken on purpose\x1b[2J",
    ),
    "typo": (
        "from fleetrun import hookimpl\n\n"
        "@hookimpl\ndef fleetrun_task_create(task):\n    pass\n",
        "it implements 'fleetrun_task_create', which is not a fleetrun hook (did you mean 'fleetrun_task_created'?)",
    ),
    "extra_argument": (
        "from fleetrun import hookimpl\n\n"
        "@hookimpl\ndef fleetrun_task_created(task, retries):\n    pass\n",
        "hookimpl definition: fleetrun_task_created(task, retries); "
        "Argument(s) {'retries'} are declared in the hookimpl but can not be found in the hookspec",
    ),
    "takes_local": (
        "import os\nfrom fleetrun import Transport, hookimpl\n\n"
        "class Impostor(Transport):\n    name = 'local'\n\n"
        "    async def execute(self, execution):\n        return 0\n\n"
        "@hookimpl\ndef fleetrun_register_transports(register):\n    register(Impostor)\n\n"
        "@hookimpl\ndef fleetrun_task_created(task):\n"
        "    open(os.environ['FLEETRUN_IMPOSTOR_FILE'], 'a').write(task.id)\n",
        "two transports are named 'local': fleetrun.plugins.transports.local.LocalTransport and "
        "fleetrun_broken_plugins.takes_local.Impostor",
    ),
    "a_class": (
        "from fleetrun import hookimpl\n\n"
        "class Notifier:\n    @hookimpl\n    def fleetrun_task_created(self, task):\n        pass\n",
        "it is the class fleetrun_broken_plugins.a_class.Notifier, whose hooks would have no `self`: "
        "use an instance of it, or a module",
    ),
    "register_raises": (
        "from fleetrun import hookimpl\n\n"
        "@hookimpl\ndef fleetrun_register_transports(register):\n    raise OSError('no docker socket')\n",
        "fleetrun_register_transports raised OSError: no docker socket",
    ),
}


def test_installed_plugins_that_fail_to_load_or_do_not_fit_are_left_out_and_the_others_still_run(plugin_env, tmp_path):
    package = tmp_path / "broken-plugins"
    (package / "fleetrun_broken_plugins").mkdir(parents=True)
    (package / "fleetrun_broken_plugins" / "__init__.py").write_text("")
    for name, (source, _) in BROKEN_PLUGINS.items():
        (package / "fleetrun_broken_plugins" / f"{name}.py").write_text(source)
    entry_points = "".join(
        f'{name} = "fleetrun_broken_plugins.{name}{":Notifier" if name == "a_class" else ""}"\n' for name in BROKEN_PLUGINS
    )
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "fleetrun-broken-plugins"\nversion = "0.1.0"\n\n'
        f"[project.entry-points.fleetrun]\n{entry_points}\n"
        '[tool.setuptools]\npackages = ["fleetrun_broken_plugins"]\n'
    )
    pip = [str(plugin_env / "bin" / "python"), "-m", "pip", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", str(package)], check=True, capture_output=True, text=True, timeout=600)
    try:
        sink, impostor_sink = tmp_path / "events.tsv", tmp_path / "impostor"
        env = {
            "FLEETRUN_EXAMPLE_NOTIFIER_FILE": str(sink),
            "FLEETRUN_IMPOSTOR_FILE": str(impostor_sink),
            "FLEETRUN_HOME": str(tmp_path / "home"),
        }
        result = run_in(plugin_env, "run", "local", "--", "echo still runs", extra_env=env)
        assert (result.returncode, result.stdout) == (0, "still runs\n")
        warnings = sorted(result.stderr.splitlines())
        assert warnings == sorted(
            f"fleetrun: WARNING: fleetrun.plugins: plugin {name!r} (fleetrun-broken-plugins 0.1.0) failed to load: "
            f"{problem.encode('unicode_escape').decode() if name == 'broken' else problem}; "
            f"fleetrun goes on without it (FLEETRUN_DISABLE_PLUGINS={name} stops loading it)"
            for name, (_, problem) in BROKEN_PLUGINS.items()
        )
        # The plugin that fits still saw the task; the impostor transport did not run it.
        assert [line.split("\t")[0] for line in sink.read_text().splitlines()] == ["created", "completed"]
        assert not impostor_sink.exists()

        listing = run_in(plugin_env, "plugins", "--json", extra_env=env)
        assert listing.returncode == 0
        listed = json.loads(listing.stdout)
        failed = {p["name"]: (p["source"], p["error"], p["hooks"]) for p in listed["plugins"] if p["error"]}
        assert failed == {
            name: ("fleetrun-broken-plugins 0.1.0", problem, []) for name, (_, problem) in BROKEN_PLUGINS.items()
        }
        assert listed["transports"]["local"] == "fleetrun.plugins.transports.local.LocalTransport"
        table = run_in(plugin_env, "plugins", extra_env=env).stdout
        assert "FAILED TO LOAD: RuntimeError: broken on purpose\\x1b[2J\n" in table

        # Blocking one by name silences its warning and lists it as blocked.
        quiet = run_in(plugin_env, "run", "local", "--", "true", extra_env={**env, "FLEETRUN_DISABLE_PLUGINS": "typo"})
        assert quiet.returncode == 0 and "'typo'" not in quiet.stderr and "'broken'" in quiet.stderr
    finally:
        subprocess.run([*pip, "uninstall", "--yes", "fleetrun-broken-plugins"], check=True, capture_output=True, timeout=120)
