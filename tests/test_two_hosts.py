"""A real two-host MPI job on one machine (tools/two_hosts.py): hosts `hosta` and `hostb` are network + UTS +
mount namespaces joined by a veth pair, each with its own sshd; ONE MPI job is started over ssh across them.

The source rank folders of a written case (8 -> 4 ranks) are split between the hosts' node-local folders:
even ranks on hosta, odd ones on hostb. Either the same path shows different files on each host
(`--src-dir <root>/local_src`, a bind mount per host) or `--src-dir '<root>/base/{host}'` expands to each
host's own name. Two processes run on each host, so every target needs slices from the other host, which
travel over MPI across the veth. Outputs must equal the serial single-folder run byte for byte, and the
bytes hosta's processes received must have crossed hosta's veth.

Skipped, saying why, when not root, without `ip`/`unshare`/`nsenter`, when openssh-server cannot be
installed or an sshd does not start.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixture_cases import Case
from test_mpi import REPO, Serial, no_stale_segments, outputs, serial, transform_args  # noqa: F401

pytestmark = pytest.mark.two_hosts

CASE = "random_8to4"
PER_HOST = 2
JOB_SECONDS = 90
VENV_BIN = Path(sys.executable).parent
HYDRA = VENV_BIN / "mpiexec"

_spec = importlib.util.spec_from_file_location("two_hosts_tool", REPO / "tools" / "two_hosts.py")
assert _spec and _spec.loader
tool = importlib.util.module_from_spec(_spec)
sys.modules["two_hosts_tool"] = tool
_spec.loader.exec_module(tool)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tool.TwoHosts]:
    """hosta and hostb, up for the module's tests."""
    if missing := tool.missing_tools():
        pytest.skip(f"two namespace hosts need {', '.join(missing)}")
    root = tmp_path_factory.mktemp("two_hosts")
    try:
        setup = tool.two_hosts(root)
        up = setup.__enter__()
    except tool.TwoHostsError as error:
        pytest.skip(f"the two namespace hosts could not be set up: {error}")
    try:
        yield up
    finally:
        setup.__exit__(None, None, None)
    assert not subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True,
                              timeout=30).stdout.count(f"mpickpt-{up.tag}-")


@pytest.fixture(scope="module")
def case(written_cases: dict[str, Case]) -> Case:
    return written_cases[CASE]


def split(case: Case, folder_of: dict[str, Path]) -> None:
    """Copy the case's rank folders: even ranks into hosta's folder, odd ranks into hostb's."""
    for rank_dir in sorted(case.src_dir.glob("rank_*")):
        host = tool.HOSTS[int(rank_dir.name.split("_")[1]) % 2]
        shutil.copytree(rank_dir, folder_of[host] / rank_dir.name)


def job_env() -> dict[str, str]:
    """The environment the launchers carry to every process: this venv first, this checkout, no MPI or
    MPICKPT_HOST variables (the host names must come from the namespaces).

    The namespaces share one kernel (one boot id), so UCX, which PyPI's MPICH uses between nodes, would find
    hostb's processes reachable through shared memory and never touch the veth: `UCX_TLS=tcp,self` on the
    veth makes inter-host traffic really go over the link (MPICH keeps its own shared memory within a host)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "OMPI_", "MPI4PY_", "HYDRA_", "SLURM_", "MPICKPT_", "UCX_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.update(UCX_TLS="tcp,self", UCX_NET_DEVICES=tool.LINK)
    return env


def launch(hosts: tool.TwoHosts, flavor: str, args: list[str]) -> tuple[int, str, float]:
    """Run `mpickpt transform args` as one MPI job of PER_HOST processes on each host, launched from hosta
    over ssh; returns (exit code, output, seconds). A job over JOB_SECONDS is killed and fails the test."""
    n = PER_HOST * len(tool.HOSTS)
    command = [str(VENV_BIN / "mpickpt"), "transform", *args]
    if flavor == "mpich":
        if not HYDRA.exists():
            pytest.skip(f"MPICH's mpiexec is not at {HYDRA} (pip install mpich)")
        launcher = [str(HYDRA), "-hosts", ",".join(tool.HOSTS), "-ppn", str(PER_HOST), "-n", str(n),
                    "-launcher", "ssh", "-launcher-exec", str(hosts.ssh)]
    else:
        openmpi = shutil.which("mpiexec.openmpi")
        if openmpi is None:
            pytest.skip("Open MPI is not installed (apt-get install openmpi-bin)")
        link = f"{tool.ADDRESSES['hosta']}/{tool.PREFIX_LENGTH}"
        launcher = [openmpi, "--allow-run-as-root", "--host", ",".join(f"{h}:{PER_HOST}" for h in tool.HOSTS),
                    "-n", str(n), "--mca", "plm_rsh_agent", str(hosts.ssh), "--mca", "pml", "ob1",
                    "--mca", "btl", "self,vader,tcp", "--mca", "btl_tcp_if_include", link,
                    "--mca", "oob_tcp_if_include", link, "-x", "PATH", "-x", "PYTHONPATH"]
    began = time.monotonic()
    job = subprocess.Popen(hosts.command("hosta", launcher + command), env=job_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = job.communicate(timeout=JOB_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, 9)
        output, _ = job.communicate(timeout=30)
        pytest.fail(f"the two-host {flavor} job took over {JOB_SECONDS} s:\n{output}")
    return job.returncode, output, time.monotonic() - began


@pytest.mark.parametrize("flavor", ["mpich", "openmpi"])
@pytest.mark.parametrize("placement", ["same_path", "host_placeholder"])
def test_one_job_across_two_hosts_equals_the_serial_run(hosts: tool.TwoHosts, case: Case,
                                                        serial: Serial,  # noqa: F811 - the fixture
                                                        tmp_path: Path, flavor: str, placement: str) -> None:
    if placement == "same_path":  # one path, node-local content: a bind mount per host
        for host in tool.HOSTS:
            for old in hosts.folder(host).iterdir():
                shutil.rmtree(old)
        split(case, {h: hosts.folder(h) for h in tool.HOSTS})
        src, dst = str(hosts.local_src), str(tmp_path / "dst")
    else:
        base = tmp_path / "base"
        split(case, {h: base / h for h in tool.HOSTS})
        src, dst = f"{base}/{{host}}", f"{tmp_path}/dst/{{host}}"
    args = transform_args(case, Path(dst), src_dir=Path(src))
    received_before = hosts.veth_bytes("hosta")[0]
    code, output, seconds = launch(hosts, flavor, args)
    assert code == 0, output
    print(f"{flavor} {placement}: {seconds:.2f} s\n{output}")
    if placement == "same_path":
        made = outputs(Path(dst))
        manifest = json.loads((Path(dst) / "manifest.json").read_text())
    else:
        made = {name: data for host in tool.HOSTS for name, data in outputs(tmp_path / "dst" / host).items()}
        manifest = json.loads((tmp_path / "dst" / "hosta" / "manifest.json").read_text())
        assert "process 2 (host hostb" in output and "process 0 (host hosta" in output
        on_hostb = sorted(f"rank_{t}" for p in manifest["processes"][PER_HOST:] for t in p["targets"])
        assert len(on_hostb) == 2 and sorted(p.name for p in (tmp_path / "dst" / "hostb").glob("rank_*")) == on_hostb
    assert made == serial(case)
    assert manifest["world_size"] == PER_HOST * len(tool.HOSTS)
    processes = manifest["processes"]
    from_hostb = sum(p["bytes_received"] for p in processes[:PER_HOST])  # hosta's processes get odd ranks' slices
    assert from_hostb > 0 and all(p["bytes_received"] > 0 and p["bytes_sent"] > 0 for p in processes)
    assert hosts.veth_bytes("hosta")[0] - received_before >= from_hostb  # they crossed the veth
