"""Hook order and exactly-once firing, for every way a task can end."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

import pytest

from fleetrun import hookimpl
from fleetrun.core.errors import FleetrunError
from fleetrun.core.events import EventRecorder
from fleetrun.core.models import TaskRequest, TaskStatus
from fleetrun.core.plugin_manager import SLOW_HOOK_SECONDS
from fleetrun.core.store import TaskStore

from conftest import assert_none_left, processes_running, wait_until


def test_success_fires_created_then_completed_once(make_executor, recorder: EventRecorder):
    executor = make_executor()
    task = executor.run(TaskRequest(host="local", command="echo hello"))
    names = recorder.names(task.id)
    assert names[0] == "task.created"
    assert names[-1] == "task.completed"
    assert names.count("task.created") == 1 and names.count("task.completed") == 1
    assert set(names[1:-1]) <= {"task.progress"}
    assert "task.cancelled" not in names
    created, completed = recorder[0], recorder[-1]
    assert created.task.status is TaskStatus.QUEUED
    assert completed.result.status is TaskStatus.SUCCEEDED
    assert completed.result.exit_code == 0
    assert completed.task.stdout_bytes == len(b"hello\n")


def test_nonzero_exit_is_failed_with_the_exit_code(make_executor, recorder):
    task = make_executor().run(TaskRequest(host="local", command="echo oops >&2; exit 3"))
    assert task.status is TaskStatus.FAILED
    assert task.exit_code == 3
    assert task.stderr_bytes == 5 and task.stdout_bytes == 0
    assert recorder.names(task.id) == ["task.created", "task.progress", "task.completed"]
    assert recorder[-1].result.status is TaskStatus.FAILED


def test_killed_by_a_signal_reports_128_plus_the_signal(make_executor):
    task = make_executor().run(TaskRequest(host="local", command="kill -9 $$"))
    assert task.status is TaskStatus.FAILED
    assert task.exit_code == 128 + 9


def test_timeout_fires_completed_with_timed_out(make_executor, recorder):
    task = make_executor().run(TaskRequest(host="local", command="sleep 30", timeout_s=0.3))
    assert task.status is TaskStatus.TIMED_OUT
    assert task.exit_code is None
    assert task.error == "timed out after 0.3 s"
    names = recorder.names(task.id)
    assert names[0] == "task.created" and names[-1] == "task.completed"
    assert names.count("task.completed") == 1 and "task.cancelled" not in names
    assert recorder[-1].result.status is TaskStatus.TIMED_OUT
    assert 0.3 <= task.duration_s < 3


def test_a_timeout_shorter_than_a_moment_still_ends_the_task(make_executor, recorder, marker):
    task = make_executor().run(TaskRequest(host="local", command=f"sleep {marker}", timeout_s=0.02))
    assert task.status is TaskStatus.TIMED_OUT
    assert task.error == "timed out after 0.02 s"
    assert recorder.names(task.id) == ["task.created", "task.completed"]
    assert_none_left(marker)


def test_cancel_while_running_fires_cancelled_not_completed(make_executor, recorder):
    executor = make_executor()
    handle = executor.submit(TaskRequest(host="local", command="echo started; sleep 30"))
    wait_until(lambda: executor.get(handle.id).stdout_bytes > 0 or recorder.names(handle.id)[-1:] == ["task.progress"])
    assert handle.cancel("no longer needed") is True
    task = handle.wait(10)
    assert task.status is TaskStatus.CANCELLED
    assert task.cancel_reason == "no longer needed"
    names = recorder.names(task.id)
    assert names[0] == "task.created" and names[-1] == "task.cancelled"
    assert names.count("task.cancelled") == 1 and "task.completed" not in names
    assert recorder[-1].reason == "no longer needed"
    # A second cancel of an ended task changes nothing and fires nothing.
    assert handle.cancel() is False
    assert recorder.names(task.id) == names


def test_cancel_while_queued_never_runs_the_command(make_executor, recorder, tmp_path):
    executor = make_executor(max_concurrent=1)
    blocker = executor.submit(TaskRequest(host="local", command="sleep 30"))
    flag = tmp_path / "ran"
    queued = executor.submit(TaskRequest(host="local", command=f"touch {flag}"))
    assert executor.get(queued.id).status is TaskStatus.QUEUED
    assert queued.cancel("changed my mind")
    task = queued.wait(10)
    assert task.status is TaskStatus.CANCELLED and task.started_at is None
    assert recorder.names(task.id) == ["task.created", "task.cancelled"]
    blocker.cancel()
    blocker.wait(10)
    assert not flag.exists()


class _HoldsTheEngine:
    """Blocks the engine thread in the first task's ``created`` hook until released."""

    def __init__(self) -> None:
        self.inside = threading.Event()
        self.release = threading.Event()

    @hookimpl
    def fleetrun_task_created(self, task):
        if not self.inside.is_set():
            self.inside.set()
            self.release.wait(30)


@contextlib.contextmanager
def _engine_held(make_executor):
    """An executor whose engine is blocked (in its first task's ``created`` hook) until the block ends."""
    holder = _HoldsTheEngine()
    executor = make_executor(plugins=[holder])
    first = executor.submit(TaskRequest(host="local", command="true"))
    assert holder.inside.wait(10)
    try:
        yield executor, first
    finally:
        holder.release.set()


def test_submit_returns_with_the_task_recorded_while_the_engine_is_busy(make_executor, recorder, store):
    with _engine_held(make_executor) as (executor, first):
        second = executor.submit(TaskRequest(host="local", command="echo second"))
        # Tasks that arrive while the engine is busy are taken together, in order.
        later = [executor.submit(TaskRequest(host="local", command=f"echo {n}")) for n in range(5)]
        # The engine has not taken it yet, and the task is already known and stored.
        assert recorder.names(second.id) == []
        assert executor.get(second.id).status is TaskStatus.QUEUED
        queued = [t.id for t in executor.list(status=[TaskStatus.QUEUED])]  # newest first
        assert queued == [*(handle.id for handle in reversed(later)), second.id, first.id]
        another_reader = TaskStore(store.home)
        try:
            assert another_reader.get(second.id).status is TaskStatus.QUEUED
        finally:
            another_reader.close()
    assert second.wait(10).status is TaskStatus.SUCCEEDED
    assert first.wait(10).status is TaskStatus.SUCCEEDED
    assert recorder.names(second.id) == ["task.created", "task.progress", "task.completed"]
    for n, handle in enumerate(later):
        task = handle.wait(10)
        assert (task.status, executor.read_output(task.id).data) == (TaskStatus.SUCCEEDED, f"{n}\n".encode())
    created = [event.task.id for event in recorder if event.event == "task.created"]
    assert created == [first.id, second.id, *(handle.id for handle in later)]


def test_tasks_taken_together_do_not_share_a_failure(make_executor, recorder, caplog):
    with _engine_held(make_executor) as (executor, first):
        broken = executor.submit(TaskRequest(host="local", command="echo broken"))
        healthy = executor.submit(TaskRequest(host="local", command="echo healthy"))
        admit = executor._admit

        def admit_failing_for_one(live):  # a fault inside fleetrun, injected for one task only
            if live.record.id == broken.id:
                raise RuntimeError("injected")
            admit(live)

        executor._admit = admit_failing_for_one
    assert first.wait(10).status is TaskStatus.SUCCEEDED
    assert healthy.wait(10).status is TaskStatus.SUCCEEDED
    assert recorder.names(healthy.id) == ["task.created", "task.progress", "task.completed"]
    assert recorder.names(broken.id) == []
    assert f"admitting task {broken.id} failed" in caplog.text


def test_a_task_cancelled_before_the_engine_takes_it_runs_nothing(make_executor, recorder, tmp_path):
    flag = tmp_path / "ran"
    submitted = {}

    class SubmitsAndCancels:
        """From a hook, on the engine thread: the new task cannot have been taken yet."""

        @hookimpl
        def fleetrun_task_created(self, task):
            if not submitted:
                handle = executor.submit(TaskRequest(host="local", command=f"touch {flag}"))
                submitted["handle"] = handle
                submitted["cancelled"] = executor.cancel(handle.id, "stopped before it started")

    executor = make_executor(plugins=[SubmitsAndCancels()])
    executor.run(TaskRequest(host="local", command="true"))
    assert submitted["cancelled"] is True
    task = submitted["handle"].wait(10)
    assert task.status is TaskStatus.CANCELLED
    assert task.cancel_reason == "stopped before it started"
    assert task.started_at is None and task.exit_code is None
    assert recorder.names(task.id) == ["task.created", "task.cancelled"]
    assert executor.store.get(task.id).status is TaskStatus.CANCELLED
    assert not flag.exists()

def test_a_task_recorded_just_before_close_is_ended_by_the_shutdown(make_executor, recorder, tmp_path):
    """The caller wakes the engine after it lets go of the start lock, so close() can come
    between the task being recorded and the wake-up: the shutdown must still end it."""
    flag = tmp_path / "ran"
    executor = make_executor()
    executor.run(TaskRequest(host="local", command="true"))  # the engine is up
    loop = executor._loop
    wake = loop.call_soon_threadsafe
    closer = threading.Thread(target=executor.close)

    def close_before_the_wake(callback, *args, **kwargs):
        if getattr(callback, "__name__", "") == "_admit_arrivals" and not closer.is_alive() and not executor._closed:
            closer.start()
            closer.join(10)  # close() has shut the engine down and closed its loop
        return wake(callback, *args, **kwargs)

    loop.call_soon_threadsafe = close_before_the_wake
    handle = executor.submit(TaskRequest(host="local", command=f"touch {flag}"))
    assert loop.is_closed() and not closer.is_alive()
    task = handle.wait(1)
    assert task.status is TaskStatus.CANCELLED
    assert task.cancel_reason == "the executor was closed"
    assert task.started_at is None and not flag.exists()
    assert recorder.names(task.id) == ["task.created", "task.cancelled"]
    assert executor.store.get(task.id).status is TaskStatus.CANCELLED


@pytest.mark.parametrize("ending", ["cancel", "timeout"])
def test_close_waits_for_a_task_that_was_already_being_stopped(make_executor, recorder, marker, ending):
    # The command ignores TERM: it is stopped by KILL, after the grace period.
    executor = make_executor()
    handle = executor.submit(TaskRequest(host="local", command=f"trap '' TERM; sleep {marker}", timeout_s=0.3 if ending == "timeout" else None))
    wait_until(lambda: processes_running("sleep", marker))
    try:
        if ending == "cancel":
            assert executor.cancel(handle.id, "stopped by the test")
        else:
            time.sleep(0.6)  # past the timeout: being stopped
        executor.close()
        # Before: close() waited only for the tasks it cancelled itself, and stopped the engine
        # with this one still being stopped: its KILL never came (the command ran on), and its
        # handle never resolved.
        assert not processes_running("sleep", marker)
        task = handle.wait(1)
    finally:
        for pid in processes_running("sleep", marker):
            os.kill(pid, signal.SIGKILL)
    expected = (TaskStatus.CANCELLED, "stopped by the test") if ending == "cancel" else (TaskStatus.TIMED_OUT, None)
    assert (task.status, task.cancel_reason) == expected
    assert recorder.names(task.id)[-1] == ("task.cancelled" if ending == "cancel" else "task.completed")
    assert executor.store.get(task.id).status is task.status


def test_a_hook_can_cancel_its_own_running_task(make_executor, recorder):
    class CancelsOnOutput:
        @hookimpl
        def fleetrun_task_progress(self, task, progress):
            if progress.latest_line == "stop me":
                assert executor.cancel(task.id, "the output said so") is True

    executor = make_executor(plugins=[CancelsOnOutput()])
    task = executor.run(TaskRequest(host="local", command="echo stop me; sleep 30"))
    assert task.status is TaskStatus.CANCELLED
    assert task.cancel_reason == "the output said so"
    assert recorder.names(task.id)[-1] == "task.cancelled"


def test_a_hook_may_close_the_executor_and_submit_but_not_wait(make_executor, recorder, marker):
    # Waiting from a hook would wait for the engine thread itself: it used to hang for good.
    seen = {}

    class Plugin:
        @hookimpl
        def fleetrun_task_completed(self, task, result):
            # Outcomes are kept, not asserted here: the plugin manager logs what a hook raises.
            if task.command == "echo first":
                for name, attempt in (("run", lambda: executor.run(TaskRequest(host="local", command="true"))),
                                      ("submit", lambda: executor.submit(TaskRequest(host="local", command=f"sleep {marker}"))),
                                      ("wait", lambda: seen["submit"].wait(1))):
                    try:
                        seen[name] = attempt()
                    except FleetrunError as exc:
                        seen[name] = str(exc)
            elif task.command == "echo last":
                executor.close("closed by a plugin")  # starts the shutdown and returns

    executor = make_executor(plugins=[Plugin()])
    assert executor.run(TaskRequest(host="local", command="echo first")).status is TaskStatus.SUCCEEDED
    assert seen["run"] == (
        "run() was called from a hook, on the executor's engine thread, and would wait for that thread itself: "
        "use submit(), which returns at once"
    )
    assert seen["wait"].startswith("TaskHandle.wait() was called from a hook")
    wait_until(lambda: processes_running("sleep", marker))
    assert executor.run(TaskRequest(host="local", command="echo last")).status is TaskStatus.SUCCEEDED
    later = seen["submit"].wait(20)
    assert (later.status, later.cancel_reason) == (TaskStatus.CANCELLED, "closed by a plugin")
    assert_none_left(marker)
    wait_until(lambda: not executor._thread.is_alive())
    with pytest.raises(FleetrunError, match="this executor is closed"):
        executor.submit(TaskRequest(host="local", command="true"))
    executor.close()  # returns at once: already closed


def test_spawn_failure_is_a_failed_task_with_a_category(make_executor, recorder, tmp_path):
    task = make_executor().run(TaskRequest(host="local", command="true", cwd=str(tmp_path / "missing")))
    assert task.status is TaskStatus.FAILED
    assert task.exit_code is None
    assert task.error_category == "spawn"
    assert "missing" in task.error
    assert recorder.names(task.id) == ["task.created", "task.completed"]
    assert recorder[-1].result.error_category == "spawn"


def test_many_concurrent_tasks_each_get_exactly_one_ending(make_executor, recorder):
    executor = make_executor(max_concurrent=8)
    handles = [executor.submit(TaskRequest(host="local", command=f"echo {i}; sleep 0.0{i % 5}")) for i in range(40)]
    for h in handles[::3]:
        h.cancel()
    tasks = [h.wait(30) for h in handles]
    for task in tasks:
        names = recorder.names(task.id)
        endings = [n for n in names if n in ("task.completed", "task.cancelled")]
        assert names[0] == "task.created"
        assert endings == [names[-1]], names
        assert (names[-1] == "task.cancelled") == (task.status is TaskStatus.CANCELLED)


class _Exploding:
    @hookimpl
    def fleetrun_task_created(self, task):
        raise RuntimeError("notifier bug")

    @hookimpl
    def fleetrun_task_completed(self, task, result):
        raise RuntimeError("notifier bug")


class _Collector:
    def __init__(self):
        self.seen = []

    @hookimpl
    def fleetrun_task_created(self, task):
        self.seen.append("created")

    @hookimpl
    def fleetrun_task_completed(self, task, result):
        self.seen.append(result.status.value)


@pytest.mark.parametrize("exploding_first", [True, False])
def test_a_failing_notifier_is_logged_and_isolated(make_executor, recorder, caplog, exploding_first):
    collector = _Collector()
    plugins = [_Exploding(), collector] if exploding_first else [collector, _Exploding()]
    executor = make_executor(plugins=plugins)
    with caplog.at_level(logging.ERROR, logger="fleetrun.plugins"):
        task = executor.run(TaskRequest(host="local", command="true"))
    assert task.status is TaskStatus.SUCCEEDED
    assert collector.seen == ["created", "succeeded"]
    assert recorder.names(task.id)[-1] == "task.completed"
    failures = [r for r in caplog.records if "notifier bug" in (r.exc_text or str(r.exc_info))]
    assert len(failures) == 2
    messages = [r.getMessage() for r in failures]
    assert all("_Exploding" in m for m in messages), messages
    assert {m.split(" in ")[1].split(";")[0] for m in messages} == {"fleetrun_task_created", "fleetrun_task_completed"}


class _Slow:
    @hookimpl
    def fleetrun_task_completed(self, task, result):
        time.sleep(SLOW_HOOK_SECONDS + 0.05)  # a notifier posting to a web service, say, on the engine thread


def test_a_slow_notifier_is_named_once_in_a_warning(make_executor, recorder, caplog):
    executor = make_executor(plugins=[_Slow()])
    with caplog.at_level(logging.WARNING, logger="fleetrun.plugins"):
        tasks = [executor.run(TaskRequest(host="local", command="true")) for _ in range(2)]
    assert [t.status for t in tasks] == [TaskStatus.SUCCEEDED] * 2
    slow = [r.getMessage() for r in caplog.records if "engine thread" in r.getMessage()]
    assert len(slow) == 1, slow  # once, not for every task
    assert "_Slow" in slow[0].split("' took ")[0] and " in fleetrun_task_completed: " in slow[0]
    assert "hand slow work to a thread" in slow[0]


def test_progress_stops_before_the_final_hook(make_executor, recorder):
    task = make_executor(heartbeat_s=0.05).run(TaskRequest(host="local", command="sleep 0.4"))
    time.sleep(0.3)  # a stray heartbeat would land here
    names = recorder.names(task.id)
    assert names[-1] == "task.completed"
    assert names.count("task.progress") >= 3
    assert all(e.progress.heartbeat for e in recorder if e.event == "task.progress")
