"""Run a command and measure it: wall time, peak resident set, and I/O as the kernel counts them.

Standard library only, so it can wrap every MPI rank cheaply:
    mpiexec -n 2 python -I -S benchmarks/_measure.py OUT_DIR/rank_{rank}.json -- mpickpt transform ...
writes one JSON per rank ({rank} comes from PMI_RANK / OMPI_COMM_WORLD_RANK / PMIX_RANK) and exits with
the command's status. From Python: `measure(cmd)`.

Peak RSS is the child's ru_maxrss from wait4 (it counts touched pages of mapped files, and covers the
child's own waited-for children). Linux carries the spawning process's peak RSS into a child's ru_maxrss
at exec, so a big parent (the benchmark driver) must not spawn measured commands itself: `run_wrapped`
puts this small wrapper (about 12 MB) in between. I/O comes from /proc/<pid>/io read while the child is a zombie:
rchar/wchar are bytes passed through read/write calls (page-cache hits included, mmap reads not),
read_bytes/write_bytes are what reached or left the block device.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass

RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


@dataclass(frozen=True)
class ProcStats:
    """What one finished process cost."""

    wall_s: float
    maxrss_bytes: int
    rchar: int
    wchar: int
    read_bytes: int
    write_bytes: int
    returncode: int
    cpu_s: float = 0.0  # user + system CPU time


def _proc_io(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f)}
    except OSError:
        return {}


def measure(cmd: list[str], env: dict[str, str] | None = None, log: str | None = None) -> ProcStats:
    """Run `cmd` to completion and return its costs; its output goes to `log` (appended) or is inherited."""
    actions = []
    if log is not None:
        actions = [(os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
                   (os.POSIX_SPAWN_DUP2, 1, 2)]
    start = time.perf_counter()
    pid = os.posix_spawnp(cmd[0], cmd, os.environ if env is None else env, file_actions=actions)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    wall = time.perf_counter() - start
    io = _proc_io(pid)
    _, status, usage = os.wait4(pid, 0)
    return ProcStats(wall_s=wall, maxrss_bytes=usage.ru_maxrss * 1024, rchar=io.get("rchar", 0),
                     wchar=io.get("wchar", 0), read_bytes=io.get("read_bytes", 0),
                     write_bytes=io.get("write_bytes", 0), returncode=os.waitstatus_to_exitcode(status),
                     cpu_s=usage.ru_utime + usage.ru_stime)


def run_wrapped(cmd: list[str], stats_file: str, env: dict[str, str] | None = None,
                log: str | None = None) -> tuple[float, ProcStats]:
    """Run `cmd` under this wrapper; returns the wall time seen from here and the command's own costs."""
    outer = measure([sys.executable, "-I", "-S", __file__, stats_file, "--", *cmd], env=env, log=log)
    try:
        with open(stats_file) as f:
            return outer.wall_s, ProcStats(**json.load(f))
    except FileNotFoundError:
        raise RuntimeError(f"{cmd[0]} could not be run (wrapper exit status {outer.returncode})") from None


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (not idle, not waiting for I/O) since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _rank() -> str:
    return next((os.environ[v] for v in RANK_VARS if v in os.environ), "0")


def main(argv: list[str]) -> int:
    """`_measure.py OUT_TEMPLATE -- CMD...`: run CMD, write its ProcStats as JSON to OUT_TEMPLATE."""
    if len(argv) < 3 or argv[1] != "--":
        print("usage: _measure.py OUT_TEMPLATE -- CMD [ARGS...]", file=sys.stderr)
        return 2
    stats = measure(argv[2:])
    with open(argv[0].replace("{rank}", _rank()), "w") as f:
        json.dump(asdict(stats), f)
    return stats.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
