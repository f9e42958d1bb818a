"""fleetrun's pytest plugin, exercised the way users use it, through pytester."""

from __future__ import annotations

pytest_plugins = ["pytester"]


def test_fixtures_run_real_tasks_and_record_their_events(pytester):
    pytester.makepyfile(
        """
        from fleetrun import TaskRequest, TaskStatus

        def test_success(fleetrun_executor, fleetrun_events):
            task = fleetrun_executor.run(TaskRequest(host="local", command="echo from-a-test"))
            assert task.status is TaskStatus.SUCCEEDED
            assert fleetrun_executor.read_output(task.id).data == b"from-a-test\\n"
            assert fleetrun_events.names(task.id) == ["task.created", "task.progress", "task.completed"]

        def test_store_is_isolated(fleetrun_executor, fleetrun_events):
            assert fleetrun_executor.list() == []
            assert len(fleetrun_events) == 0

        def test_failure_is_reported(fleetrun_executor, fleetrun_events):
            task = fleetrun_executor.run(TaskRequest(host="local", command="exit 9"))
            assert task.exit_code == 9
            assert fleetrun_events[-1].result.status is TaskStatus.FAILED
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_the_executor_is_closed_after_the_test(pytester):
    pytester.makepyfile(
        """
        import pytest
        from fleetrun import TaskRequest

        kept = {}

        def test_starts_a_long_task(fleetrun_executor):
            handle = fleetrun_executor.submit(TaskRequest(host="local", command="sleep 30"))
            kept["handle"] = handle

        def test_it_was_cancelled_at_teardown():
            task = kept["handle"].wait(5)
            assert task.status.value == "cancelled"
            assert task.cancel_reason == "the executor was closed"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
