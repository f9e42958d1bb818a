from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from fleetrun.core.events import EventRecorder
from fleetrun.core.executor import Executor
from fleetrun.core.inventory import Inventory, parse_inventory
from fleetrun.core.models import Task, TaskRequest
from fleetrun.core.plugin_manager import PluginManager
from fleetrun.core.store import TaskStore

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's real store, config or plugins."""
    monkeypatch.setenv("FLEETRUN_HOME", str(tmp_path / "fleetrun-home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("FLEETRUN_HOSTS", raising=False)
    monkeypatch.delenv("FLEETRUN_POLICY", raising=False)
    monkeypatch.delenv("FLEETRUN_JSON_LOG", raising=False)
    monkeypatch.delenv("FLEETRUN_TRACE", raising=False)
    monkeypatch.delenv("FLEETRUN_DISABLE_PLUGINS", raising=False)
    monkeypatch.setenv("FLEETRUN_DISABLE_PLUGIN_AUTOLOAD", "1")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TaskStore]:
    s = TaskStore(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture
def recorder() -> EventRecorder:
    return EventRecorder()


@pytest.fixture
def make_executor(store: TaskStore, recorder: EventRecorder) -> Iterator[Callable[..., Executor]]:
    """Build executors on the test store with the recorder plugged in; all closed afterwards."""
    made: list[Executor] = []

    def make(*, hosts_yaml: str | None = None, plugins: list[object] = (), **kwargs: object) -> Executor:
        manager = PluginManager(plugins=[recorder, *plugins], autoload=False)
        inventory: Inventory | None = kwargs.pop("inventory", None)  # type: ignore[assignment]
        if hosts_yaml is not None:
            inventory = parse_inventory(hosts_yaml, source="test-hosts.yaml", transports=manager.transports)
        executor = Executor(store=store, plugins=manager, inventory=inventory, **kwargs)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.close()


@pytest.fixture
def marker() -> str:
    """A unique number usable as `sleep` argument, to find a test's processes in /proc."""
    return f"{300 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 10**9:09d}"


def stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` from field 3 (the state) on; None once the process is reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def processes_with(text: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat_fields(int(entry))
        if text in cmdline and fields is not None and fields[0] != "Z":
            found.append(int(entry))
    return found


def processes_running(*argv: str) -> list[int]:
    """Pids of live processes whose command line is exactly ``argv``."""
    wanted = b"".join(arg.encode() + b"\0" for arg in argv)
    found = []
    for pid in processes_with(argv[-1]):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == wanted:
                found.append(pid)
        except OSError:
            pass  # gone meanwhile
    return found


def assert_none_left(marker: str, within: float = 2.0) -> None:
    """No process with ``marker`` in its command line survives; a killed one may take a moment to go."""
    deadline = time.monotonic() + within
    while processes_with(marker):
        if time.monotonic() > deadline:
            survivors = processes_with(marker)
            assert survivors == [], f"still running: {survivors}"
        time.sleep(0.02)


def run_leaving_a_writer_behind(executor: Executor, host: str, go: Path, wrote: Path) -> tuple[Task, bytes]:
    """Run a command that exits at once, leaving a process in the background that prints
    at 0.2 s, and again, then creates ``wrote``, once ``go`` exists; create ``go`` and wait
    for that process to end. Returns the task and its stdout."""
    command = f"(sleep 0.2; echo soon; until [ -e {go} ]; do sleep 0.05; done; echo late; touch {wrote}) & echo now"
    task = executor.run(TaskRequest(host=host, command=command, timeout_s=10))
    assert processes_with(str(go))  # still waiting in the background
    go.touch()
    try:
        wait_until(lambda: not processes_with(str(go)))
    finally:
        for pid in processes_with(str(go)):
            os.kill(pid, signal.SIGKILL)
    return task, executor.read_output(task.id).data


#: A command that cleans up on TERM, in 0.3 s, printing as it does.
CLEANS_UP_ON_TERM = "trap 'echo cleaning; sleep 0.3; echo cleaned; exit 3' TERM; echo ready; sleep 30 & wait"


def stop_one_that_cleans_up(executor: Executor, host: str, ending: str) -> Task:
    """Run CLEANS_UP_ON_TERM on ``host`` and stop it once ready, by a cancel or by a 1 s
    timeout (``ending``); the task as it ended."""
    handle = executor.submit(TaskRequest(host=host, command=CLEANS_UP_ON_TERM, timeout_s=1 if ending == "timeout" else None))
    wait_until(lambda: executor.read_output(handle.id).data == b"ready\n")
    if ending == "cancel":
        handle.cancel()
    return handle.wait(15)


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run the installed `fleetrun` command in a child process (stdin: /dev/null unless given)."""
    if "input" not in kwargs:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(
        [sys.executable, "-m", "fleetrun", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


# -- SSH: real OpenSSH servers on loopback (see tests/sshd.py) ---------------------------


@pytest.fixture(scope="session")
def sshd_fleet():  # -> sshd.SshdFleet
    from sshd import SshdFleet

    fleet = SshdFleet()
    yield fleet
    fleet.close()


@pytest.fixture(scope="session")
def shared_sshd(sshd_fleet):
    """One server shared by tests that do not stop or reconfigure it."""
    return sshd_fleet.start()


@pytest.fixture
def known_hosts(tmp_path, sshd_fleet, shared_sshd) -> Path:
    """A known_hosts file listing the shared server's key."""
    return sshd_fleet.known_hosts(tmp_path / "known_hosts", [shared_sshd])


def ssh_host(fleet, server, known_hosts: Path, **fields: object) -> dict[str, object]:
    """The hosts-file entry for logging in to ``server`` with the fleet's test key."""
    entry: dict[str, object] = {
        "transport": "ssh",
        "hostname": server.address,
        "port": server.port,
        "user": fleet.user,
        "identity_files": [str(fleet.client_key)],
        "known_hosts": str(known_hosts),
        "use_ssh_config": False,
        "connect_timeout": 5,
    }
    entry.update(fields)
    return entry


def hosts_file_text(hosts: dict[str, dict[str, object]]) -> str:
    import yaml

    return yaml.safe_dump({"hosts": hosts}, sort_keys=False)
