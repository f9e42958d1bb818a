"""SSH transport benchmarks against OpenSSH's own client, on throwaway sshds on loopback.

    python bench/ssh.py                      # all scenarios
    python bench/ssh.py latency fanout       # some (latency, big, fanout, cancel, known_hosts)
                                             # (known_hosts also with a host certificate)
    python bench/ssh.py --quick              # smaller sizes, for a smoke run

Needs /usr/sbin/sshd and root (to create the unprivileged login user, as the tests do).
Each scenario runs in a child process of its own (so its peak RSS is its own) and starts
its own servers on 127.0.0.N; results go to bench/results/ssh-latest.json.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

import harness  # noqa: E402
from harness import peak_rss_mib  # noqa: E402

MiB = 1 << 20


class Rig:
    """sshd servers, a known_hosts file, an inventory and OpenSSH client options for them."""

    def __init__(self, count: int) -> None:
        from sshd import SshdFleet

        self.fleet = SshdFleet()
        self.servers = [self.fleet.start() for _ in range(count)]
        self.known_hosts = self.fleet.known_hosts(self.fleet.directory / "known_hosts")
        self.home = Path(tempfile.mkdtemp(prefix="fleetrun-bench-"))

    def executor(self, **host_fields):
        from conftest import hosts_file_text, ssh_host

        from fleetrun.core.executor import Executor
        from fleetrun.core.inventory import parse_inventory
        from fleetrun.core.plugin_manager import PluginManager
        from fleetrun.core.store import TaskStore

        manager = PluginManager(autoload=False)
        hosts = {
            f"h{i}": ssh_host(self.fleet, server, self.known_hosts, **host_fields) for i, server in enumerate(self.servers)
        }
        inventory = parse_inventory(hosts_file_text(hosts), transports=manager.transports)
        return Executor(store=TaskStore(self.home), plugins=manager, inventory=inventory, max_concurrent=256)

    def ssh_argv(self, server, *extra: str) -> list[str]:
        return [
            "ssh", "-q", "-i", str(self.fleet.client_key), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-F", "/dev/null", "-p", str(server.port), *extra, f"{self.fleet.user}@{server.address}",
        ]

    def close(self) -> None:
        self.fleet.close()


def bench_latency(params: dict) -> dict:
    """N x `true` on a warm connection: fleetrun vs ssh through a ControlMaster socket."""
    from fleetrun.core.models import TaskRequest

    n = params["n"]
    rig = Rig(1)
    server = rig.servers[0]
    control = rig.fleet.directory / "control.sock"
    master = subprocess.Popen(
        rig.ssh_argv(server, "-o", "ControlMaster=yes", "-o", f"ControlPath={control}", "-N"),
        stdin=subprocess.DEVNULL,
    )
    try:
        while not control.exists():
            time.sleep(0.01)
        client = rig.ssh_argv(server, "-o", "ControlMaster=no", "-o", f"ControlPath={control}")
        executor = rig.executor()
        request = TaskRequest(host="h0", command="true")
        for _ in range(10):
            executor.run(request)
            subprocess.run([*client, "true"], check=True)
        fleetrun_times, ssh_times = [], []
        for _ in range(n):  # interleaved, so both see the same machine
            t = time.perf_counter()
            task = executor.run(request)
            fleetrun_times.append(time.perf_counter() - t)
            assert task.exit_code == 0, task
            t = time.perf_counter()
            subprocess.run([*client, "true"], check=True)
            ssh_times.append(time.perf_counter() - t)
        executor.close()
    finally:
        master.terminate()
        master.wait()
        rig.close()
    fleetrun_ms = statistics.median(fleetrun_times) * 1000
    ssh_ms = statistics.median(ssh_times) * 1000
    return {
        "fleetrun_median_ms": round(fleetrun_ms, 2),
        "ssh_controlmaster_median_ms": round(ssh_ms, 2),
        "ratio": round(fleetrun_ms / ssh_ms, 2),
        "fleetrun_p90_ms": round(sorted(fleetrun_times)[int(n * 0.9)] * 1000, 2),
    }


def bench_big(params: dict) -> dict:
    """One command printing N MiB: fleetrun (cold: connect included) vs `ssh HOST cat FILE > /dev/null`."""
    from fleetrun.core.models import TaskRequest

    size = params["mib"] * MiB
    rig = Rig(1)
    server = rig.servers[0]
    payload = rig.fleet.directory / "payload.bin"
    with payload.open("wb") as out:
        for _ in range(params["mib"]):
            out.write(os.urandom(MiB))
    payload.chmod(0o644)
    try:
        ssh_times, cold_times, warm_times = [], [], []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run([*rig.ssh_argv(server), f"cat {payload}"], stdout=subprocess.DEVNULL, check=True)
            ssh_times.append(time.perf_counter() - t)
            executor = rig.executor()
            t = time.perf_counter()
            task = executor.run(TaskRequest(host="h0", command=f"cat {payload}"))
            cold_times.append(time.perf_counter() - t)
            assert task.stdout_bytes == size and task.exit_code == 0, task
            t = time.perf_counter()
            executor.run(TaskRequest(host="h0", command=f"cat {payload}"))
            warm_times.append(time.perf_counter() - t)
            executor.close()
    finally:
        rig.close()
    ssh_s, cold_s, warm_s = min(ssh_times), min(cold_times), min(warm_times)
    return {
        "mib": params["mib"],
        "ssh_s": round(ssh_s, 3),
        "fleetrun_cold_s": round(cold_s, 3),
        "fleetrun_warm_s": round(warm_s, 3),
        "ratio_cold": round(cold_s / ssh_s, 2),
        "fleetrun_mib_per_s": round(params["mib"] / warm_s, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def bench_fanout(params: dict) -> dict:
    """`true` on N hosts (N sshds): fleetrun batch, cold then warm, vs N ssh clients in parallel."""
    from fleetrun.core.batch import BatchRequest, run_batch

    n = params["hosts"]
    rig = Rig(n)
    try:
        ssh_times, cold_times, warm_times = [], [], []
        batch = BatchRequest(hosts=tuple(f"h{i}" for i in range(n)), command="true", max_parallel=n)
        for _ in range(3):
            t = time.perf_counter()
            clients = [subprocess.Popen([*rig.ssh_argv(s), "true"]) for s in rig.servers]
            assert all(c.wait() == 0 for c in clients)
            ssh_times.append(time.perf_counter() - t)
            executor = rig.executor()
            t = time.perf_counter()
            outcome = run_batch(executor, batch)
            cold_times.append(time.perf_counter() - t)
            assert outcome.succeeded, [t.error for t in outcome.tasks]
            t = time.perf_counter()
            assert run_batch(executor, batch).succeeded
            warm_times.append(time.perf_counter() - t)
            executor.close()
    finally:
        rig.close()
    ssh_s, cold_s, warm_s = statistics.median(ssh_times), statistics.median(cold_times), statistics.median(warm_times)
    return {
        "hosts": n,
        "ssh_parallel_s": round(ssh_s, 3),
        "fleetrun_cold_s": round(cold_s, 3),
        "fleetrun_warm_s": round(warm_s, 3),
        "ratio_cold": round(cold_s / ssh_s, 2),
    }


def bench_cancel(params: dict) -> dict:
    """Time from cancel() until the remote processes are gone (seen on the server side),
    and until the task has ended (its record says cancelled, its hooks have fired)."""
    from conftest import processes_with

    from fleetrun.core.models import TaskRequest

    rig = Rig(1)
    delays, endings = [], []
    try:
        executor = rig.executor()
        for round_ in range(params["rounds"]):
            marker = f"{400 + round_}.{os.getpid()}"
            handle = executor.submit(TaskRequest(host="h0", command=f"sleep {marker} & sleep {marker}; wait"))
            while len(processes_with(f"sleep {marker}")) < 2:
                time.sleep(0.005)
            t = time.perf_counter()
            handle.cancel()
            while processes_with(f"sleep {marker}"):
                time.sleep(0.002)
            delays.append(time.perf_counter() - t)
            assert handle.wait(10).status.value == "cancelled"
            endings.append(time.perf_counter() - t)
        executor.close()
    finally:
        rig.close()
    return {
        "rounds": len(delays),
        "median_s": round(statistics.median(delays), 3),
        "max_s": round(max(delays), 3),
        "task_ended_median_s": round(statistics.median(endings), 3),
        "task_ended_max_s": round(max(endings), 3),
    }


def bench_known_hosts(params: dict) -> dict:
    """A cold `true` (connect, check the host key, log in, run) with a known_hosts of N lines
    for other hosts, hashed as HashKnownHosts writes them, then the server's: fleetrun vs ssh.
    With ``certificate``, the server presents its key signed by an authority, and the last
    line is the authority's (``@cert-authority *``) instead of the server's key."""
    import base64
    import hashlib
    import hmac

    from sshd import generate_key

    from fleetrun.core.models import TaskRequest

    rig = Rig(1)
    server = rig.servers[0]
    kind, blob = server.host_public_key.split()[:2]
    lines = []
    for i in range(params["lines"]):
        salt = os.urandom(20)
        digest = hmac.new(salt, f"host{i}.example.test".encode(), hashlib.sha1).digest()
        lines.append(f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()} {kind} {blob}\n")
    vouching = server.known_hosts_line
    if params.get("certificate"):
        authority = generate_key(rig.fleet.directory / "host_ca")
        subprocess.run(["ssh-keygen", "-q", "-s", str(authority), "-h", "-I", "bench", "-n", server.address, f"{server.host_key}.pub"], check=True)
        server.stop()
        server.extra_config = f"HostCertificate {server.host_key}-cert.pub"
        server.start()
        vouching = f"@cert-authority * {' '.join(Path(f'{authority}.pub').read_text().split()[:2])}\n"
    rig.known_hosts.write_text("".join(lines) + vouching)
    try:
        ssh_times, fleetrun_times = [], []
        for _ in range(params["rounds"]):
            t = time.perf_counter()
            subprocess.run([*rig.ssh_argv(server), "true"], check=True)
            ssh_times.append(time.perf_counter() - t)
            executor = rig.executor()
            t = time.perf_counter()
            task = executor.run(TaskRequest(host="h0", command="true"))
            fleetrun_times.append(time.perf_counter() - t)
            assert task.exit_code == 0, task.error
            executor.close()
    finally:
        rig.close()
    ssh_s, fleetrun_s = statistics.median(ssh_times), statistics.median(fleetrun_times)
    return {
        "lines": params["lines"],
        "certificate": bool(params.get("certificate")),
        "ssh_median_s": round(ssh_s, 4),
        "fleetrun_median_s": round(fleetrun_s, 4),
        "ratio": round(fleetrun_s / ssh_s, 2),
    }


SCENARIOS = {
    "latency": bench_latency, "big": bench_big, "fanout": bench_fanout, "cancel": bench_cancel, "known_hosts": bench_known_hosts,
}


def plan(quick: bool) -> dict[str, list[dict]]:
    return {
        "latency": [{"n": 30 if quick else 200}],
        "big": [{"mib": 8 if quick else 64}],
        "fanout": [{"hosts": 4 if quick else 20}],
        "cancel": [{"rounds": 3 if quick else 10}],
        "known_hosts": [
            *({"lines": n, "rounds": 3 if quick else 10} for n in ((1, 1000) if quick else (1, 1000, 10000))),
            {"lines": 1, "certificate": True, "rounds": 3 if quick else 10},
        ],
    }


if __name__ == "__main__":
    harness.main(script=__file__, doc=__doc__, scenarios=SCENARIOS, plan=plan, results_file="ssh-latest.json")
