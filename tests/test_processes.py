"""Process tokens: a command left running by a dead owner is stopped, and nothing else ever is."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from fleetrun.core import processes
from fleetrun.core.processes import boot_ticks, command_token, leftover_command, owner_alive, owner_token, stop_leftover_commands

from conftest import assert_none_left, processes_running, wait_until


@pytest.fixture
def started():
    """Start commands as the local transport does (a session of their own); kill what is left."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(script: str, *, new_session: bool = True) -> tuple[subprocess.Popen[bytes], str]:
        proc = subprocess.Popen(["/bin/sh", "-c", script], start_new_session=new_session)
        procs.append(proc)
        return proc, command_token(proc.pid, boot_ticks())

    yield start
    for proc in procs:
        if proc.poll() is None:
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        proc.wait()


def test_a_running_command_is_found_and_stopped_with_everything_it_started(started, marker):
    proc, token = started(f"sleep {marker} & sleep {marker}; wait")
    wait_until(lambda: len(processes_running("sleep", marker)) == 2)
    assert leftover_command(token) == proc.pid
    assert stop_leftover_commands([token, None]) == {token: proc.pid}
    assert proc.wait(5) == -signal.SIGTERM
    assert_none_left(marker)
    assert leftover_command(token) is None  # gone
    assert stop_leftover_commands([token]) == {}


def test_a_command_that_ignores_term_is_killed_after_the_grace(started, marker):
    proc, token = started(f"trap '' TERM; sleep {marker} & sleep {marker}; wait")
    wait_until(lambda: len(processes_running("sleep", marker)) == 2)
    began = time.monotonic()
    assert stop_leftover_commands([token], grace=0.3) == {token: proc.pid}
    assert time.monotonic() - began >= 0.3
    assert proc.wait(5) == -signal.SIGKILL
    assert_none_left(marker)


def test_a_process_that_only_has_the_commands_pid_is_left_alone(started, marker):
    # The same pid with another start time: the command's pid was given to a later process.
    proc, token = started(f"sleep {marker}")
    boot, pid, seen = token.split(":")
    for later in (int(seen) + 5 * os.sysconf("SC_CLK_TCK"), int(seen) - 5 * os.sysconf("SC_CLK_TCK")):
        stale = f"{boot}:{pid}:{later}"
        assert leftover_command(stale) is None
        assert stop_leftover_commands([stale], grace=0.1) == {}
    assert proc.poll() is None


def test_a_process_that_does_not_lead_its_own_group_is_left_alone(started, marker):
    # Started in the test's own process group: signalling "its" group would hit pytest.
    proc, token = started(f"sleep {marker}", new_session=False)
    assert leftover_command(token) is None
    assert stop_leftover_commands([token], grace=0.1) == {}
    assert proc.poll() is None


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a:b:c", "other-boot:1:1", "x:1", "{boot}:notapid:1", "{boot}:1:notticks", "{boot}:999999999:1"],
)
def test_tokens_that_name_no_command_of_this_boot_are_ignored(token):
    token = token.format(boot=processes.boot_id())
    assert leftover_command(token) is None
    assert stop_leftover_commands([token], grace=0.1) == {}


def test_another_boots_command_is_left_alone(started, marker):
    proc, token = started(f"sleep {marker}")
    _, pid, seen = token.split(":")
    assert leftover_command(f"00000000-0000-0000-0000-000000000000:{pid}:{seen}") is None
    assert proc.poll() is None


def test_owner_tokens_tell_a_live_owner_from_a_dead_one():
    assert owner_alive(owner_token())
    proc = subprocess.Popen(["true"])
    token = owner_token(proc.pid)
    proc.wait()
    assert not owner_alive(token)
    assert not owner_alive(None)
    assert not owner_alive(f"other-boot:{os.getpid()}:{processes.process_start(os.getpid())}")
