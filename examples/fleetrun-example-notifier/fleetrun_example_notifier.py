"""An example third-party fleetrun notifier.

It appends one tab-separated line per lifecycle event to the file named by
``FLEETRUN_EXAMPLE_NOTIFIER_FILE`` (nothing is written when it is not set):

    <event>\t<task id>\t<host>\t<status>\t<exit code or ->\t<command>

Installing this package is all it takes: fleetrun loads it from the ``fleetrun``
entry-point group declared in pyproject.toml.
"""

from __future__ import annotations

import os

from fleetrun import hookimpl

TARGET_ENV = "FLEETRUN_EXAMPLE_NOTIFIER_FILE"


def _append(event, task, detail="-"):
    path = os.environ.get(TARGET_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as out:
        out.write("\t".join([event, task.id, task.host, task.status.value, detail, task.command]) + "\n")


@hookimpl
def fleetrun_task_created(task):
    _append("created", task)


@hookimpl
def fleetrun_task_completed(task, result):
    _append("completed", task, "-" if result.exit_code is None else str(result.exit_code))


@hookimpl
def fleetrun_task_cancelled(task, reason):
    _append("cancelled", task, reason)
