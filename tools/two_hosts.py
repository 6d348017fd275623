#!/usr/bin/env python3
"""Two "hosts" on this machine for a real multi-host MPI job: network + UTS + mount namespaces joined by a veth.

    sudo python tools/two_hosts.py [--root DIR] -- COMMAND...   # runs COMMAND on the first host, then tears down

Each host is a network namespace (`ip netns`) holding one end of a veth pair created here (10.200.0.1/30 and
10.200.0.2/30, nothing else: no route, no bridge, no NAT, so traffic stays between the two namespaces) and an
sshd that runs in its own UTS and private mount namespaces (`unshare --uts --mount`): its own host name
(`hosta`, `hostb`), an /etc/hosts naming just the two addresses, a tmpfs on /run (sshd's privilege separation
folder), and `<root>/local_src` bind-mounted from `<root>/hosta` or `<root>/hostb`, so one path holds different
files on each host (node-local disks). The sshd listens only on its host's veth address; its host key, the
client key and authorized_keys are generated into `root`; `<root>/ssh` is an ssh wrapper using them
(`StrictHostKeyChecking=no`), for Hydra's `-launcher-exec` or Open MPI's `plm_rsh_agent`. Commands run on a host
with `nsenter` into its sshd's namespaces (`TwoHosts.command`).

Teardown kills every process left in the two namespaces and the sshds by pid, then deletes the namespaces
(which deletes the veth pair; the bind mounts and tmpfs live only in the sshds' mount namespaces). Needs root,
`ip`, `unshare`, `nsenter`, and `/usr/sbin/sshd` (`install()` apt-gets openssh-server when missing). Every step
has a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")
HOSTS = ("hosta", "hostb")
ADDRESSES = {"hosta": "10.200.0.1", "hostb": "10.200.0.2"}  # only ever on the veth pair inside the namespaces
PREFIX_LENGTH = 30
LINK = "mpk2h0"  # the veth end's name inside either namespace (one name for UCX_NET_DEVICES and the like)
STEP_SECONDS = 30  # any single setup or teardown command
SSH_READY_SECONDS = 15  # from starting the sshds to both answering


class TwoHostsError(RuntimeError):
    """The two hosts could not be set up; the message names the failing step and its output."""


def missing_tools() -> list[str]:
    """What this machine lacks to run the two hosts (root, commands), apart from ssh and sshd (`install`)."""
    missing = [] if os.geteuid() == 0 else ["root (namespaces, veth, sshd)"]
    missing += [tool for tool in ("ip", "unshare", "nsenter") if shutil.which(tool) is None]
    return missing


def install() -> None:
    """apt-get install openssh-server (and openssh-client, iproute2) when sshd or ssh is missing."""
    if SSHD.exists() and shutil.which("ssh") and shutil.which("ssh-keygen"):
        return
    if shutil.which("apt-get") is None:
        raise TwoHostsError(f"{SSHD} is missing and apt-get is not available to install openssh-server")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "openssh-server", "openssh-client", "iproute2"]
    try:
        done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise TwoHostsError(f"{' '.join(cmd)} took over 300 s") from None
    if done.returncode != 0:
        raise TwoHostsError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    if not SSHD.exists():
        raise TwoHostsError(f"openssh-server installed but {SSHD} is missing")


def _run(cmd: Sequence[str], what: str, timeout: float = STEP_SECONDS) -> str:
    try:
        done = subprocess.run(list(cmd), check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TwoHostsError(f"{what}: `{' '.join(cmd)}` took over {timeout} s") from None
    if done.returncode != 0:
        raise TwoHostsError(f"{what}: `{' '.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@dataclass
class TwoHosts:
    """The running hosts (see the module's docstring)."""

    root: Path
    tag: str  # unique per setup: namespace and veth names
    sshd: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def namespace(self, host: str) -> str:
        return f"mpickpt-{self.tag}-{host}"

    def veth(self, host: str) -> str:
        """`host`'s veth end while in the root namespace (unique names, at most 15 characters)."""
        return f"mk{self.tag}{host[-1]}"

    @property
    def ssh(self) -> Path:
        """The ssh wrapper (generated key, no host key checking)."""
        return self.root / "ssh"

    @property
    def local_src(self) -> Path:
        """One path, on each host the content of `root/<host>`."""
        return self.root / "local_src"

    def folder(self, host: str) -> Path:
        """What `local_src` shows on `host`."""
        return self.root / host

    def command(self, host: str, cmd: Sequence[str]) -> list[str]:
        """`cmd` run on `host` (its network, host name and mounts)."""
        return ["nsenter", "-t", str(self.sshd[host].pid), "-n", "-u", "-m", f"--wd={self.root}", "--", *cmd]

    def veth_bytes(self, host: str) -> tuple[int, int]:
        """(received, sent) bytes of `host`'s veth end so far."""
        shown = json.loads(_run(["ip", "-n", self.namespace(host), "-s", "-j", "link", "show", LINK],
                                "read veth counters"))
        stats = shown[0]["stats64"]
        return stats["rx"]["bytes"], stats["tx"]["bytes"]


def _write_files(hosts: TwoHosts) -> None:
    root = hosts.root
    for key in ("host_key", "user_key"):
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mpickpt-two-hosts", "-f", str(root / key)],
             "generate an ssh key")
    shutil.copy(root / "user_key.pub", root / "authorized_keys")
    (root / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for h, a in ADDRESSES.items()))
    for host, address in ADDRESSES.items():
        (root / f"sshd_{host}.conf").write_text("\n".join([
            f"ListenAddress {address}:22",
            f"HostKey {root / 'host_key'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",  # the keys live in a temporary folder
            "PidFile none",
            "X11Forwarding no",
            "LogLevel ERROR",
            "MaxStartups 100",
            "",
        ]))
        hosts.folder(host).mkdir(exist_ok=True)
    hosts.local_src.mkdir(exist_ok=True)
    hosts.ssh.write_text("#!/bin/sh\n# ssh between the two namespace hosts with the generated key\n"
                         f"exec ssh -F none -i {root / 'user_key'} -o IdentitiesOnly=yes -o BatchMode=yes "
                         "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=5 "
                         "-o ServerAliveInterval=5 -o ServerAliveCountMax=6 -o LogLevel=ERROR \"$@\"\n")
    hosts.ssh.chmod(0o755)


def _kill_namespace_processes(hosts: TwoHosts) -> None:
    """SIGKILL every process still in the two network namespaces (all started by this setup), sshds last."""
    for host in HOSTS:
        try:
            pids = subprocess.run(["ip", "netns", "pids", hosts.namespace(host)], check=False,
                                  capture_output=True, text=True, timeout=STEP_SECONDS).stdout.split()
        except subprocess.TimeoutExpired:
            continue
        daemons = {p.pid for p in hosts.sshd.values()}
        for pid in sorted({int(p) for p in pids} - daemons):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for process in hosts.sshd.values():
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


@contextlib.contextmanager
def two_hosts(root: Path | None = None) -> Iterator[TwoHosts]:
    """Set the two hosts up under `root` (a new temporary folder if None), yield them, tear them down."""
    if missing := missing_tools():
        raise TwoHostsError(f"missing: {', '.join(missing)}")
    install()
    made_root = root is None
    root = Path(tempfile.mkdtemp(prefix="mpickpt-2h-", dir="/tmp")) if root is None else root
    hosts = TwoHosts(root.resolve(), tag=str(os.getpid() % 10**7))
    with contextlib.ExitStack() as cleanup:
        if made_root:
            cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        _write_files(hosts)
        for host in HOSTS:
            _run(["ip", "netns", "add", hosts.namespace(host)], "create a network namespace")
            cleanup.callback(subprocess.run, ["ip", "netns", "delete", hosts.namespace(host)], timeout=STEP_SECONDS)
        a, b = HOSTS
        _run(["ip", "link", "add", hosts.veth(a), "type", "veth", "peer", "name", hosts.veth(b)], "create the veth")
        for host in HOSTS:
            _run(["ip", "link", "set", hosts.veth(host), "netns", hosts.namespace(host)], "move a veth end")
            ns = ["ip", "-n", hosts.namespace(host)]
            _run([*ns, "link", "set", "dev", hosts.veth(host), "name", LINK], "rename the veth end")
            _run([*ns, "addr", "add", f"{ADDRESSES[host]}/{PREFIX_LENGTH}", "dev", LINK], "address")
            _run([*ns, "link", "set", "lo", "up"], "loopback up")
            _run([*ns, "link", "set", LINK, "up"], "veth up")
        cleanup.callback(_kill_namespace_processes, hosts)  # runs before the namespaces are deleted
        for host in HOSTS:
            inside = (f"hostname {host} && mount -t tmpfs -o size=1m mpickpt-run /run && mkdir /run/sshd && "
                      f"mount --bind {root / 'hosts'} /etc/hosts && "
                      f"mount --bind {hosts.folder(host)} {hosts.local_src} && "
                      f"exec {SSHD} -D -e -f {root / f'sshd_{host}.conf'}")
            log = open(root / f"sshd_{host}.log", "wb")  # noqa: SIM115 - kept by the process
            cleanup.callback(log.close)
            hosts.sshd[host] = subprocess.Popen(
                ["ip", "netns", "exec", hosts.namespace(host), "unshare", "--uts", "--mount", "--propagation",
                 "private", "sh", "-c", inside], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        _wait_for_ssh(hosts)
        yield hosts


def _wait_for_ssh(hosts: TwoHosts) -> None:
    """Until each host answers ssh from the other with its own name (TwoHostsError after SSH_READY_SECONDS)."""
    end = time.monotonic() + SSH_READY_SECONDS
    for host, other in zip(HOSTS, reversed(HOSTS)):
        while True:
            for which in HOSTS:
                if hosts.sshd[which].poll() is not None:
                    log = (hosts.root / f"sshd_{which}.log").read_text(errors="replace")
                    raise TwoHostsError(f"sshd on {which} exited ({hosts.sshd[which].returncode}): {log.strip()}")
            try:
                done = subprocess.run(hosts.command(other, [str(hosts.ssh), host, "hostname"]),
                                      check=False, capture_output=True, text=True, timeout=10)
                if done.returncode == 0 and done.stdout.strip() == host:
                    break
                last = done.stderr.strip() or done.stdout.strip()
            except subprocess.TimeoutExpired:
                last = "ssh took over 10 s"
            if time.monotonic() > end:
                raise TwoHostsError(f"ssh {other} -> {host} did not work within {SSH_READY_SECONDS} s: {last}")
            time.sleep(0.2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="folder for keys, configs, hosta/, hostb/, local_src")
    parser.add_argument("command", nargs="+", help="run on hosta (cwd: root), then tear down")
    args = parser.parse_args(argv)
    try:
        with two_hosts(args.root) as hosts:
            print(f"two hosts up under {hosts.root}; ssh wrapper {hosts.ssh}", file=sys.stderr)
            return subprocess.run(hosts.command("hosta", args.command), check=False).returncode
    except TwoHostsError as error:
        print(f"two_hosts: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
