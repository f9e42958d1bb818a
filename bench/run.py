"""fleetrun benchmarks: each one against a baseline measured in the same run.

    python bench/run.py                 # all of them
    python bench/run.py seq big         # some of them (seq, concurrent, big, shapes, latency, inventory, reader)
    python bench/run.py --quick         # smaller sizes, for a smoke run

Every scenario runs in a child process of its own, so that its peak RSS (VmHWM) is its
own. Results are printed as a table and written to bench/results/latest.json.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import harness  # noqa: E402
from harness import peak_rss_mib  # noqa: E402

MiB = 1 << 20


# -- helpers run inside the child ------------------------------------------------------


def make_executor(home: Path, *, max_concurrent: int = 64, host_limit: int = 8, max_output: int = 100 * MiB, plugins=()):
    from fleetrun.core.executor import Executor
    from fleetrun.core.inventory import parse_inventory
    from fleetrun.core.plugin_manager import PluginManager
    from fleetrun.core.store import TaskStore

    manager = PluginManager(plugins=list(plugins), autoload=False)
    inventory = parse_inventory(
        f"hosts:\n  local:\n    max_concurrent: {host_limit}\n    max_output_bytes: {max_output}\n    max_seconds: 600\n",
        transports=manager.transports,
    )
    return Executor(store=TaskStore(home), plugins=manager, inventory=inventory, max_concurrent=max_concurrent)


def bench_seq(params: dict) -> dict:
    """N sequential `true` tasks (store and hooks included) against subprocess.run loops."""
    from fleetrun.core.events import EventRecorder
    from fleetrun.core.models import TaskRequest

    n = params["n"]
    home = Path(tempfile.mkdtemp(prefix="fleetrun-bench-"))
    recorder = EventRecorder()
    executor = make_executor(home, plugins=[recorder])
    request = TaskRequest(host="local", command="true")
    for _ in range(20):
        executor.run(request)
        subprocess.run("true", shell=True, capture_output=True)
    rounds = {"fleetrun": [], "subprocess.run(capture_output=True)": [], "subprocess.run (no capture)": []}
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            executor.run(request)
        rounds["fleetrun"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(n):
            subprocess.run("true", shell=True, capture_output=True)
        rounds["subprocess.run(capture_output=True)"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(n):
            subprocess.run("true", shell=True)
        rounds["subprocess.run (no capture)"].append(time.perf_counter() - t)
    executor.close()
    shutil.rmtree(home, ignore_errors=True)
    walls = {k: statistics.median(v) for k, v in rounds.items()}
    return {
        "tasks": n,
        "wall_s": walls,
        "per_task_ms": {k: v / n * 1000 for k, v in walls.items()},
        "ratio_vs_capture": walls["fleetrun"] / walls["subprocess.run(capture_output=True)"],
        "ratio_vs_no_capture": walls["fleetrun"] / walls["subprocess.run (no capture)"],
        "events_recorded": len(recorder),
    }


def bench_concurrent(params: dict) -> dict:
    """N concurrent `sleep 1` tasks: wall time from the first submit to the last end, peak RSS."""
    from fleetrun.core.models import TaskRequest, TaskStatus

    n = params["n"]
    home = Path(tempfile.mkdtemp(prefix="fleetrun-bench-"))
    executor = make_executor(home, max_concurrent=n, host_limit=n)
    executor.run(TaskRequest(host="local", command="true"))
    walls, submits, baselines, succeeded = [], [], [], []
    for _ in range(params["rounds"]):
        t = time.perf_counter()
        handles = [executor.submit(TaskRequest(host="local", command="sleep 1")) for _ in range(n)]
        submits.append(time.perf_counter() - t)
        tasks = [h.wait() for h in handles]
        walls.append(time.perf_counter() - t)
        succeeded.append(sum(task.status is TaskStatus.SUCCEEDED for task in tasks))
        baselines.append(_baseline_concurrent_sleeps(n))
    executor.close()
    shutil.rmtree(home, ignore_errors=True)
    med = statistics.median
    return {"tasks": n, "rounds": params["rounds"], "succeeded": min(succeeded), "wall_s": med(walls), "walls_s": walls,
            "submit_s": med(submits), "peak_rss_mib": peak_rss_mib(), "baseline_popen_wall_s": med(baselines),
            "baseline_popen_walls_s": baselines}


def _baseline_concurrent_sleeps(n: int) -> float:
    t = time.perf_counter()
    procs = [subprocess.Popen(["sleep", "1"]) for _ in range(n)]
    for p in procs:
        p.wait()
    return time.perf_counter() - t


def bench_big(params: dict) -> dict:
    """One task printing SIZE bytes vs the same producer piped into `cat > /dev/null`."""
    from fleetrun.core.models import TaskRequest

    size = params["size"]
    producer = f"yes 'fleetrun benchmark line of text, sixty-four bytes long..........' | head -c {size}"
    home = Path(tempfile.mkdtemp(prefix="fleetrun-bench-"))
    executor = make_executor(home, max_output=size + MiB)
    ours, base, direct, to_file = [], [], [], []
    kept = home / "kept-by-cat"
    for _ in range(params["rounds"]):
        # Each timed run starts with no dirty pages left by the one before it: writing them
        # back would otherwise land in whichever run comes next.
        os.sync()
        t = time.perf_counter()
        subprocess.run(["sh", "-c", f"{producer} | cat > /dev/null"], check=True)
        base.append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run(["sh", "-c", f"{producer} > /dev/null"], check=True)
        direct.append(time.perf_counter() - t)
        # fleetrun keeps the bytes in a file: this is the same work done by cat.
        os.sync()
        t = time.perf_counter()
        subprocess.run(["sh", "-c", f"{producer} | cat > {kept}"], check=True)
        to_file.append(time.perf_counter() - t)
        kept.unlink()
        os.sync()
        t = time.perf_counter()
        task = executor.run(TaskRequest(host="local", command=producer))
        ours.append(time.perf_counter() - t)
        assert task.stdout_bytes == size and not task.stdout_truncated, task
        assert (executor.store.output_dir(task.id) / "stdout").stat().st_size == size
        shutil.rmtree(executor.store.output_dir(task.id))
    executor.close()
    shutil.rmtree(home, ignore_errors=True)
    med = statistics.median
    return {
        "bytes": size, "rounds": params["rounds"],
        "fleetrun_wall_s": med(ours), "producer_pipe_cat_devnull_wall_s": med(base), "producer_devnull_wall_s": med(direct),
        "producer_pipe_cat_file_wall_s": med(to_file), "ratio_vs_cat": med(ours) / med(base),
        "ratio_vs_cat_to_file": med(ours) / med(to_file), "peak_rss_mib": peak_rss_mib(),
    }


#: Output shapes the progress tracker reads differently from plain lines (the `big`
#: scenario): each a producer of SIZE bytes.
OUTPUT_SHAPES = {
    "text lines": "yes 'fleetrun benchmark line of text, sixty-four bytes long..........'",
    "blank lines": "yes ''",
    "carriage returns": "yes 'progress: 50% [=========>          ]' | tr '\\n' '\\r'",
    "escape sequences": "yes \"$(printf '\\033[1;31mred\\033[0m \\033]0;title\\007text')\"",
    "one long line": "tr '\\0' a < /dev/zero",
}


def bench_shapes(params: dict) -> dict:
    """One task printing SIZE bytes of each output shape vs the same producer piped into `cat > /dev/null`."""
    from fleetrun.core.models import TaskRequest

    size = params["size"]
    home = Path(tempfile.mkdtemp(prefix="fleetrun-bench-"))
    executor = make_executor(home, max_output=size + MiB)
    shapes = {}
    for shape, source in OUTPUT_SHAPES.items():
        producer = f"{source} | head -c {size}"
        ours, base = [], []
        for _ in range(params["rounds"]):
            os.sync()  # as in `big`: no dirty pages of one run written back during the next
            t = time.perf_counter()
            subprocess.run(["sh", "-c", f"{producer} | cat > /dev/null"], check=True)
            base.append(time.perf_counter() - t)
            os.sync()
            t = time.perf_counter()
            task = executor.run(TaskRequest(host="local", command=producer))
            ours.append(time.perf_counter() - t)
            assert task.stdout_bytes == size, task
            shutil.rmtree(executor.store.output_dir(task.id))
        shapes[shape] = {"fleetrun_wall_s": statistics.median(ours), "baseline_wall_s": statistics.median(base),
                         "ratio": statistics.median(ours) / statistics.median(base)}
    executor.close()
    shutil.rmtree(home, ignore_errors=True)
    return {"bytes": size, "rounds": params["rounds"], "shapes": shapes}


#: Command lines as long as a request may be (128 KiB), each of one shape.
READER_SHAPES = {
    "words": "echo " + "word " * 26000,
    "one word of [": "echo " + "[" * 131000,
    "quoted words": "echo " + "'a b' " * 21800,
    "expansions": "echo " + '"$HOME" ' * 16300,
    "a chain of 1,000 commands": "uname -a; " * 1000,
    "line continuations": "echo " + "a\\\n" * 43600,
}


def bench_reader(params: dict) -> dict:
    """The built-in policy deciding on a 128 KiB command line vs `shlex.split` of the same line."""
    import shlex

    from fleetrun.core.inventory import Host
    from fleetrun.core.policy import read_only_policy

    policy, host = read_only_policy(), Host(name="local", transport="local")
    shapes = {}
    for shape, line in READER_SHAPES.items():
        ours, base = [], []
        for _ in range(params["rounds"]):
            t = time.perf_counter()
            policy.decide(host, line)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            shlex.split(line)
            base.append(time.perf_counter() - t)
        shapes[shape] = {"bytes": len(line), "decide_s": statistics.median(ours), "shlex_split_s": statistics.median(base),
                         "ratio": statistics.median(ours) / statistics.median(base)}
    return {"rounds": params["rounds"], "shapes": shapes}


def bench_latency(params: dict) -> dict:
    """A line printed (with its own timestamp) to its progress event reaching a hook."""
    from fleetrun import hookimpl
    from fleetrun.core.models import TaskRequest

    samples: list[float] = []

    class Stopwatch:
        @hookimpl
        def fleetrun_task_progress(self, task, progress):
            now = time.time()
            if progress.latest_line and progress.latest_line.startswith("t="):
                samples.append(now - float(progress.latest_line[2:]))

    home = Path(tempfile.mkdtemp(prefix="fleetrun-bench-"))
    executor = make_executor(home, plugins=[Stopwatch()])
    count = params["lines"]
    # 0.15 s apart: more than the 0.1 s rate limit, so every line gets an event of its own.
    script = f"i=0; while [ $i -lt {count} ]; do echo t=$(date +%s.%N); i=$((i+1)); sleep 0.15; done"
    executor.run(TaskRequest(host="local", command=script))
    executor.close()
    shutil.rmtree(home, ignore_errors=True)
    ms = sorted(s * 1000 for s in samples)
    return {"lines": count, "events": len(ms), "median_ms": statistics.median(ms), "p90_ms": ms[int(len(ms) * 0.9) - 1],
            "max_ms": ms[-1]}


def bench_inventory(params: dict) -> dict:
    """Loading and checking a hosts file of N SSH hosts vs PyYAML loading the same text."""
    import yaml

    from fleetrun.core.inventory import load_inventory
    from fleetrun.core.plugin_manager import PluginManager

    transports = PluginManager(autoload=False).transports
    count = params["hosts"]
    text = "hosts:\n" + "".join(
        f"  h{i}:\n    transport: ssh\n    hostname: 10.0.{i // 250}.{i % 250}\n    user: deploy\n    tags: [t{i % 10}, all]\n"
        f"    max_seconds: {60 + i % 7}\n"
        for i in range(count)
    )
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        handle.write(text)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    def timed(work) -> float:
        start = time.perf_counter()
        work()
        return time.perf_counter() - start

    ours, base = [], []
    for _ in range(params["rounds"]):
        ours.append(timed(lambda: load_inventory(handle.name, transports)))
        base.append(timed(lambda: yaml.load(Path(handle.name).read_text(), Loader=loader)))
    os.unlink(handle.name)
    med = statistics.median
    return {"hosts": count, "fleetrun_s": med(ours), "yaml_load_s": med(base), "loader": loader.__name__, "ratio": med(ours) / med(base)}


SCENARIOS = {"seq": bench_seq, "concurrent": bench_concurrent, "big": bench_big, "shapes": bench_shapes,
             "latency": bench_latency, "inventory": bench_inventory, "reader": bench_reader}


# -- driver ----------------------------------------------------------------------------


def plan(quick: bool) -> dict[str, list[dict]]:
    return {
        "seq": [{"n": 100 if quick else 500}],
        "concurrent": [{"n": 100, "rounds": 1} if quick else {"n": 1000, "rounds": 3}],
        "big": [{"size": 16 * MiB, "rounds": 1}] if quick else [{"size": 256 * MiB, "rounds": 5}, {"size": 1024 * MiB, "rounds": 3}],
        "shapes": [{"size": 16 * MiB, "rounds": 1} if quick else {"size": 512 * MiB, "rounds": 3}],
        "latency": [{"lines": 10 if quick else 40}],
        "inventory": [{"hosts": 500 if quick else 5000, "rounds": 1 if quick else 5}],
        "reader": [{"rounds": 1 if quick else 5}],
    }


def summary(results: dict) -> str:
    lines = ["", "| benchmark | fleetrun | baseline (same run) | ratio / figure | target |", "| --- | --- | --- | --- | --- |"]
    for key, r in results.items():
        name = key.split(":")[0]
        if name == "seq":
            lines.append(
                f"| {r['tasks']} sequential `true` | {r['per_task_ms']['fleetrun']:.3f} ms/task | "
                f"{r['per_task_ms']['subprocess.run(capture_output=True)']:.3f} ms (capture) / "
                f"{r['per_task_ms']['subprocess.run (no capture)']:.3f} ms (no capture) | "
                f"{r['ratio_vs_capture']:.2f}x / {r['ratio_vs_no_capture']:.2f}x | <= 1.3x |"
            )
        elif name == "concurrent":
            lines.append(
                f"| {r['tasks']} concurrent `sleep 1` ({r['rounds']} rounds, median) | {r['wall_s']:.2f} s wall, "
                f"{r['peak_rss_mib']:.0f} MiB peak RSS | {r['baseline_popen_wall_s']:.2f} s (bare Popen) | "
                f"{r['succeeded']}/{r['tasks']} succeeded in every round | <= 2.0 s, <= 300 MiB |"
            )
        elif name == "big":
            lines.append(
                f"| one task printing {r['bytes'] // MiB} MiB | {r['fleetrun_wall_s']:.3f} s, {r['peak_rss_mib']:.0f} MiB peak RSS | "
                f"{r['producer_pipe_cat_devnull_wall_s']:.3f} s (`\\| cat > /dev/null`); "
                f"{r['producer_pipe_cat_file_wall_s']:.3f} s (`\\| cat > file`) | "
                f"{r['ratio_vs_cat']:.2f}x vs /dev/null, {r['ratio_vs_cat_to_file']:.2f}x vs file | <= 1.5x, <= 100 MiB |"
            )
        elif name == "shapes":
            for shape, figures in r["shapes"].items():
                lines.append(
                    f"| one task printing {r['bytes'] // MiB} MiB of {shape} | {figures['fleetrun_wall_s']:.3f} s | "
                    f"{figures['baseline_wall_s']:.3f} s (`\\| cat > /dev/null`) | {figures['ratio']:.2f}x | - |"
                )
        elif name == "latency":
            lines.append(
                f"| line printed -> progress hook | median {r['median_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms | - | "
                f"{r['events']} samples | median <= 20 ms |"
            )
        elif name == "reader":
            for shape, figures in r["shapes"].items():
                lines.append(
                    f"| the built-in policy deciding on {figures['bytes'] // 1024} KiB of {shape} | {figures['decide_s'] * 1000:.1f} ms | "
                    f"{figures['shlex_split_s'] * 1000:.1f} ms (`shlex.split`) | {figures['ratio']:.2f}x | - |"
                )
        elif name == "inventory":
            lines.append(
                f"| a hosts file of {r['hosts']} SSH hosts, loaded and checked | {r['fleetrun_s']:.3f} s | "
                f"{r['yaml_load_s']:.3f} s (`yaml.load`, {r['loader']}) | {r['ratio']:.2f}x | - |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    harness.main(script=__file__, doc=__doc__, scenarios=SCENARIOS, plan=plan, results_file="latest.json", summary=summary)
