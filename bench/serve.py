"""MCP server benchmarks with the SDK's own client.

    python bench/serve.py                 # both scenarios
    python bench/serve.py calls           # get_task latency: over stdio and in memory, same run
    python bench/serve.py --quick         # smaller sizes

Results go to bench/results/mcp-latest.json.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import harness  # noqa: E402

POLICY = "rules:\n  - allow: ['true', 'echo *', 'sleep *']\n"


def _policy_file() -> Path:
    path = Path(tempfile.mkdtemp(prefix="fleetrun-bench-")) / "policy.yaml"
    path.write_text(POLICY)
    return path


def _in_memory_server():
    from fleetrun.core.executor import Executor
    from fleetrun.core.plugin_manager import PluginManager
    from fleetrun.core.policy import parse_policy
    from fleetrun.core.store import TaskStore
    from fleetrun.mcp_server import create_server

    executor = Executor(
        store=TaskStore(tempfile.mkdtemp(prefix="fleetrun-bench-")), plugins=PluginManager(autoload=False),
        policy=parse_policy(POLICY), max_concurrent=256,
    )
    return create_server(executor), executor


async def _get_task_times(client, n: int) -> list[float]:
    started = await client.call_tool("run_command", {"host": "local", "command": "true"})
    task_id = started.structured_content["task"]["task_id"]
    for _ in range(20):
        await client.call_tool("get_task", {"task_id": task_id})
    times = []
    for _ in range(n):
        t = time.perf_counter()
        result = await client.call_tool("get_task", {"task_id": task_id})
        times.append(time.perf_counter() - t)
        assert not result.is_error
    return times


def bench_calls(params: dict) -> dict:
    """N get_task calls, one after another: over stdio to a `fleetrun serve` process, and in memory."""
    import anyio
    import mcp
    from mcp.client.stdio import StdioServerParameters

    n = params["n"]
    home = tempfile.mkdtemp(prefix="fleetrun-bench-")
    env = {**os.environ, "FLEETRUN_POLICY": str(_policy_file()), "FLEETRUN_HOME": home}
    out: dict = {"calls": n}

    async def over_stdio():
        server = StdioServerParameters(command=sys.executable, args=["-m", "fleetrun", "serve"], env=env)
        async with mcp.Client(server, mode="legacy") as client:
            return await _get_task_times(client, n)

    async def in_memory():
        server, executor = _in_memory_server()
        try:
            async with mcp.Client(server, mode="legacy") as client:
                return await _get_task_times(client, n)
        finally:
            executor.close()

    for name, scenario in (("stdio", over_stdio), ("memory", in_memory)):
        times = anyio.run(scenario)
        out[f"{name}_median_ms"] = round(statistics.median(times) * 1000, 3)
        out[f"{name}_p90_ms"] = round(sorted(times)[int(n * 0.9)] * 1000, 3)
        out[f"{name}_calls_per_s"] = round(n / sum(times), 1)
    out["stdio_share_of_median"] = round(1 - out["memory_median_ms"] / out["stdio_median_ms"], 2)
    return out


def bench_burst(params: dict) -> dict:
    """N start_task calls at once; wait until every task.completed notification has arrived."""
    import anyio
    import mcp

    n = params["n"]

    async def scenario():
        server, executor = _in_memory_server()
        completed: set[str] = set()

        async def on_log(params):
            if isinstance(params.data, dict) and params.data.get("event") == "task.completed":
                completed.add(params.data["task_id"])

        try:
            async with mcp.Client(server, mode="legacy", logging_callback=on_log) as client:
                ids: list[str] = []

                async def start():
                    result = await client.call_tool("start_task", {"host": "local", "command": "sleep 0.2"})
                    ids.append(result.structured_content["task_id"])

                t = time.perf_counter()
                async with anyio.create_task_group() as group:
                    for _ in range(n):
                        group.start_soon(start)
                started = time.perf_counter() - t
                with anyio.fail_after(120):
                    while not set(ids) <= completed:
                        await anyio.sleep(0.005)
                wall = time.perf_counter() - t
                statuses = {t.status.value for t in executor.list(limit=n)}
        finally:
            executor.close()
        return {
            "tasks": n, "all_started_s": round(started, 3), "wall_s": round(wall, 3),
            "notifications": len(completed & set(ids)), "statuses": sorted(statuses),
        }

    return anyio.run(scenario)


SCENARIOS = {"calls": bench_calls, "burst": bench_burst}


def plan(quick: bool) -> dict[str, list[dict]]:
    return {"calls": [{"n": 100 if quick else 1000}], "burst": [{"n": 20 if quick else 100}]}


if __name__ == "__main__":
    harness.main(script=__file__, doc=__doc__, scenarios=SCENARIOS, plan=plan, results_file="mcp-latest.json")
