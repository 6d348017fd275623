#!/usr/bin/env python3
"""A single-host Slurm (munge + slurmctld + slurmd on localhost) for tests and trying the launch templates.

    python tools/slurm_local.py start [--state-dir DIR] [--install]   # prints `export SLURM_CONF=...`
    python tools/slurm_local.py stop  [--state-dir DIR]               # kills the daemons it started, by pid
    python tools/slurm_local.py status [--state-dir DIR]

Needs root. `--install` apt-installs Debian's slurm-wlm and munge when `slurmctld` is missing. Every file it
writes lives in the state folder (default /tmp/mpickpt-slurm) except the munge key and socket folder, which
use munge's standard places (/etc/munge/munge.key is created only when absent). Each daemon runs in the
foreground as a child of this tool's process group-less session; its pid goes to `<state>/<daemon>.pid` and
`stop` signals exactly those pids (a munged that was already running is reused and never stopped).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_STATE = Path("/tmp/mpickpt-slurm")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
DAEMONS = ("munged", "slurmctld", "slurmd")


class SlurmSetupError(RuntimeError):
    """The local Slurm could not be installed or started; the message says which step failed."""


def install() -> None:
    """apt-get install slurm-wlm and munge when the Slurm daemons are missing."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if shutil.which("apt-get") is None:
        raise SlurmSetupError("slurmctld is not installed and apt-get is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SlurmSetupError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")


def slurm_conf(state: Path, host: str, cpus: int, memory_mib: int, ports: tuple[int, int], first_job: int) -> str:
    """The slurm.conf text for one node `host` with `cpus` CPUs, everything kept under `state`; `ports` are
    slurmctld's and slurmd's (free ones, so another Slurm on this host does not get in the way).

    `first_job` should differ between starts: MPICH names its shared-memory segments after the job id, and a
    segment left in /dev/shm by a killed job would make a new job with the same id hang in MPI_Init.
    """
    return "\n".join([
        "ClusterName=mpickpt",
        f"FirstJobId={first_job}",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        "MpiDefault=none",
        "SchedulerType=sched/builtin",
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none",
        "SlurmdParameters=config_overrides",
        f"StateSaveLocation={state}/ctld",
        f"SlurmdSpoolDir={state}/spool",
        f"SlurmctldPidFile={state}/slurmctld.daemon.pid",
        f"SlurmdPidFile={state}/slurmd.daemon.pid",
        f"SlurmctldLogFile={state}/slurmctld.log",
        f"SlurmdLogFile={state}/slurmd.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mib} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE",
        "",
    ])


def _free_ports(count: int) -> tuple[int, ...]:
    """Ports nobody listens on now (the OS picks them)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return tuple(sock.getsockname()[1] for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()


def _memory_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 1024
    return 1024


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _read_pid(state: Path, name: str) -> int | None:
    path = state / f"{name}.pid"
    return int(path.read_text()) if path.exists() else None


def _spawn(state: Path, name: str, cmd: list[str], env: dict[str, str], user: str | None = None) -> None:
    log = open(state / f"{name}.out", "ab")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                            start_new_session=True, user=user, group=user)
    (state / f"{name}.pid").write_text(str(proc.pid))
    time.sleep(0.5)
    if proc.poll() is not None:
        raise SlurmSetupError(f"{name} exited with code {proc.returncode} at start; see {state / (name + '.out')}:\n"
                              + (state / f"{name}.out").read_text()[-2000:])


def _wait(what: str, check, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.3)
    raise SlurmSetupError(f"timed out after {seconds:.0f} s waiting for {what}")


def _munge_works() -> bool:
    cred = subprocess.run(["munge", "-n"], capture_output=True)
    return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True).returncode == 0


def start_munge(state: Path, env: dict[str, str]) -> None:
    """Reuse a working munged, else create the key if missing and start munged as the munge user."""
    if _munge_works():
        return
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        MUNGE_KEY.write_bytes(os.urandom(1024))
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
    MUNGE_RUN.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_RUN, "munge", "munge")
    MUNGE_RUN.chmod(0o755)
    _spawn(state, "munged", ["munged", "--foreground"], env, user="munge")
    _wait("munge -n | unmunge", _munge_works, 15)


def start(state: Path, do_install: bool) -> Path:
    """Bring up munge, slurmctld and slurmd; return the slurm.conf path (export it as SLURM_CONF)."""
    if os.geteuid() != 0:
        raise SlurmSetupError("a local Slurm needs root (slurmd runs jobs as their users)")
    if do_install:
        install()
    for tool in ("slurmctld", "slurmd", "munged", "sinfo"):
        if shutil.which(tool) is None:
            raise SlurmSetupError(f"{tool} is not installed (apt-get install slurm-wlm munge)")
    stop(state)
    for sub in ("ctld", "spool"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    conf = state / "slurm.conf"
    ctld_port, slurmd_port = _free_ports(2)
    first_job = 1000 + int(time.time()) % 50_000_000
    conf.write_text(slurm_conf(state, host, os.cpu_count() or 1, _memory_mib(), (ctld_port, slurmd_port), first_job))
    env = dict(os.environ, SLURM_CONF=str(conf))
    start_munge(state, env)
    _spawn(state, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)], env)
    _spawn(state, "slurmd", ["slurmd", "-D", "-f", str(conf)], env)

    def node_idle() -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip().startswith("idle")

    _wait("sinfo to show the node idle", node_idle, 30)
    return conf


def stop(state: Path) -> None:
    """Terminate the daemons this tool started (slurmd, slurmctld, munged), by the pids in the state folder."""
    for name in reversed(DAEMONS):
        pid = _read_pid(state, name)
        if pid is None:
            continue
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
            end = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < end:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        (state / f"{name}.pid").unlink()


def status(state: Path) -> dict[str, bool]:
    """Which of the daemons started by this tool are still running."""
    return {name: (pid := _read_pid(state, name)) is not None and _alive(pid) for name in DAEMONS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--install", action="store_true", help="apt-get install slurm-wlm and munge if missing")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            print(f"export SLURM_CONF={start(args.state_dir, args.install)}")
        elif args.command == "stop":
            stop(args.state_dir)
        else:
            for name, alive in status(args.state_dir).items():
                print(f"{name}: {'running' if alive else 'stopped'}")
    except SlurmSetupError as exc:
        print(f"slurm_local: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
