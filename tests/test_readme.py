"""The README's set-up commands are the ones CI runs, and its Python examples work as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import REPO, run_cli

pytest_plugins = ["pytester"]


def _setup_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S)]


def test_ci_runs_exactly_the_readmes_test_command():
    install_and_run, install_and_test = _setup_commands()
    assert install_and_run == "python -m pip install . && fleetrun run local -- uname -a"
    assert install_and_test.endswith("python -m pytest") and "\n" not in install_and_test
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install_and_test in [line for line in ci if not line.lstrip().startswith("#")]


# -- the README's Python examples, run as written ---------------------------------------------


def _python_blocks(after: str) -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split(f"\n## {after}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _run_python(code: str, cwd, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=cwd, env={**os.environ, **(env or {})}
    )


def test_the_python_examples_run_as_written(tmp_path):
    one_host, batch = _python_blocks("From Python")
    ran = _run_python(one_host, tmp_path)
    assert ran.returncode == 0, ran.stderr
    status, exit_code, output = ran.stdout.split(" ", 2)
    assert (status, exit_code) == ("succeeded", "0") and output.startswith("Linux ")
    tasks = json.loads(run_cli("tasks", "list", "--json", cwd=tmp_path).stdout)
    assert [(t["command"], t["status"], t["cancel_reason"]) for t in tasks] == [
        ("sleep 60", "cancelled", "changed my mind"), ("uname -a", "succeeded", None),
    ]

    # The batch example names web1 and web2, under the built-in read-only policy.
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("hosts:\n  web1:\n  web2:\n")
    ran = _run_python(batch, tmp_path, {"FLEETRUN_HOSTS": str(hosts)})
    assert (ran.returncode, ran.stdout) == (0, "True [('web1', 'succeeded'), ('web2', 'succeeded')]\n"), ran.stderr


def test_the_notifier_example_reports_what_the_readme_says(tmp_path):
    notifier = _python_blocks("Plugins")[0]
    (tmp_path / "my_notifier.py").write_text(notifier)
    code = (
        "import my_notifier\n"
        "from fleetrun import Executor, PluginManager, TaskRequest\n"
        "with Executor(plugins=PluginManager(plugins=[my_notifier])) as executor:\n"
        "    executor.run(TaskRequest(host='local', command='exit 3'))\n"
    )
    ran = _run_python(code, tmp_path, {"PYTHONPATH": str(tmp_path)})
    assert (ran.returncode, ran.stdout) == (0, "local: 'exit 3' -> failed (3)\n"), ran.stderr


def test_the_pytest_example_passes(pytester):
    example = _python_blocks("The pytest plugin")[0]
    script = pytester.path / "migrate.sh"
    script.write_text("#!/bin/sh\necho 'schema: up to date'\n")
    script.chmod(0o755)
    pytester.makepyfile(test_example=example)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_worked_policy_example_gives_the_answers_shown(tmp_path):
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## The command policy\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", section, flags=re.S | re.M)
    (policy,) = [text for language, text in blocks if language == "yaml"]
    (tmp_path / "policy.yaml").write_text(policy)
    (tmp_path / "hosts.yaml").write_text("hosts:\n  web1: {tags: [web]}\n  db1:\n  local:\n")
    transcript = next(text for language, text in blocks if not language and "$ fleetrun policy check" in text)
    sessions = re.findall(r"^\$ fleetrun policy check (\S+) -- '(.*?)'\n(.*?)(?=^\$ |\Z)", transcript, flags=re.S | re.M)
    assert len(sessions) == 4
    for host, command, shown in sessions:
        checked = run_cli("--policy", "policy.yaml", "--hosts", "hosts.yaml", "policy", "check", host, "--", command, cwd=tmp_path)
        assert (checked.stdout, checked.returncode) == (shown, 0 if shown.startswith("allowed") else 126), checked.stderr
