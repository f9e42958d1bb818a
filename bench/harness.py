"""What every benchmark script shares: scenarios in child processes, a plan, a report.

A script defines its scenarios (functions taking a params dict, returning a results
dict) and a plan (scenario name -> list of params, for full and quick runs), then calls
:func:`main`. Each scenario runs in a child process of its own, so that its peak RSS
(``VmHWM``) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"

Scenario = Callable[[dict], dict]


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(script: str, name: str, params: dict) -> dict:
    out = subprocess.run(
        [sys.executable, script, "--child", name, json.dumps(params)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"benchmark {name} {params} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(
    *,
    script: str,
    doc: str | None,
    scenarios: dict[str, Scenario],
    plan: Callable[[bool], dict[str, list[dict]]],
    results_file: str,
    summary: Callable[[dict], str] | None = None,
) -> None:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", choices=[*scenarios, []], default=[], help="scenarios to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, params = args.child
        print(json.dumps(scenarios[name](json.loads(params))))
        return
    sizes = plan(args.quick)
    results = {}
    for name in args.names or list(scenarios):
        for params in sizes[name]:
            key = f"{name}:{json.dumps(params, sort_keys=True)}"
            results[key] = run_child(script, name, params)
            print(f"{key}\n  {json.dumps(results[key], indent=None)}", flush=True)
    report = {"machine": {"nproc": os.cpu_count(), "python": sys.version.split()[0]}, "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / results_file).write_text(json.dumps(report, indent=2))
    if summary is not None:
        print(summary(results))
