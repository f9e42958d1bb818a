"""The README's set-up commands are the ones CI runs."""

from __future__ import annotations

import re

from conftest import REPO


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
