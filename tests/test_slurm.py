"""launch/slurm_transform.sbatch on a real single-host Slurm (tools/slurm_local.py starts and stops it).

Needs root (slurmd) and Debian's slurm-wlm + munge, which the fixture installs with apt-get when missing.
Each job converts a case written by mpickpt (``tests/written_cases.py``, 8 -> 4 ranks) with 4 tasks; the
outputs must equal the serial run's (whose content is the expected one) and the manifest must show ONE MPI
world of 4 processes (not four one-process worlds).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixture_cases import Case, assert_same_content
from test_mpi import no_stale_segments  # noqa: F401 - autouse fixture: removes a killed job's segments

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "slurm_local.py"
TEMPLATE = REPO / "launch" / "slurm_transform.sbatch"
VENV_BIN = Path(sys.executable).parent
CASE = "random_8to4"
TASKS = 4
JOB_SECONDS = 120


@pytest.fixture(scope="module")
def slurm_env() -> Iterator[dict[str, str]]:
    """A running single-host Slurm (installed if missing); yields the environment to submit with."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (slurmd runs the jobs)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and apt-get is not available to install it")
    state = Path(tempfile.mkdtemp(prefix="mpickpt-slurm-", dir="/tmp"))  # short: slurmd puts sockets here
    started = subprocess.run([sys.executable, str(TOOL), "start", "--install", "--state-dir", str(state)],
                             capture_output=True, text=True, timeout=600)
    try:
        assert started.returncode == 0, f"single-host Slurm did not start: {started.stderr}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PMIX_", "OMPI_",
                                                                        "MPI4PY_", "MPICKPT_TEST"))}
        env.update(SLURM_CONF=str(state / "slurm.conf"), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
                   MPICKPT=str(VENV_BIN / "mpickpt"))
        yield env
    finally:
        subprocess.run([sys.executable, str(TOOL), "stop", "--state-dir", str(state)], timeout=60)
        shutil.rmtree(state, ignore_errors=True)


def case_args(case: Case, dst: Path) -> list[str]:
    return ["--src-dir", str(case.src_dir), "--dst-dir", str(dst), "--prefix", case.prefix,
            "--src-strategy", str(case.strategy("src")), "--dst-strategy", str(case.strategy("dst"))]


def outputs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.ckpt"))}


@pytest.fixture(scope="module")
def case(written_cases: dict[str, Case]) -> Case:
    """The case every job converts."""
    return written_cases[CASE]


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory, case: Case) -> dict[str, bytes]:
    """The serial outputs of the case (checked against its expected files)."""
    dst = tmp_path_factory.mktemp("serial")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PMIX_", "OMPI_"))}
    subprocess.run([sys.executable, "-m", "mpickpt", "transform", *case_args(case, dst), "--quiet"],
                   check=True, env=env, timeout=120)
    for rank, expected in case.expected_files().items():
        assert_same_content(dst / f"rank_{rank}" / expected.name, expected)
    return outputs(dst)


def job_state(env: dict[str, str], job: str) -> dict[str, str]:
    """`scontrol show job` fields of one job."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True,
                           timeout=30)
    return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)


def sbatch(env: dict[str, str], workdir: Path, args: list[str], **extra: str) -> tuple[int, str, float]:
    """Submit the template and wait for the job; return (exit code, job output, seconds from submission)."""
    out = workdir / "job.out"
    cmd = ["sbatch", "--parsable", "--nodes=1", f"--ntasks={TASKS}", "--overcommit", f"--output={out}",
           f"--chdir={workdir}", str(TEMPLATE), *args]
    began = time.monotonic()
    submitted = subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, timeout=30)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    while (state := job_state(env, job)).get("JobState") in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING",
                                                               None):
        if time.monotonic() - began > JOB_SECONDS:
            subprocess.run(["scancel", job], env=env, timeout=30)
            pytest.fail(f"Slurm job {job} still {state.get('JobState')} after {JOB_SECONDS} s")
        time.sleep(0.2)
    seconds = time.monotonic() - began
    code = int(state.get("ExitCode", "1:0").split(":")[0]) or (state["JobState"] != "COMPLETED")
    log = out.read_text() if out.exists() else ""
    return int(code), f"job {job} {state['JobState']}\n{log}", seconds


@pytest.mark.parametrize(("mpi", "launcher"), [("mpich", "srun"), ("mpich", "mpiexec"), ("openmpi", "srun")])
def test_sbatch_template_converts_in_one_mpi_world(slurm_env: dict[str, str], serial: dict[str, bytes], case: Case,
                                                   tmp_path: Path, mpi: str, launcher: str) -> None:
    if mpi == "openmpi" and shutil.which("mpiexec.openmpi") is None:
        pytest.skip("Open MPI is not installed (apt-get install openmpi-bin libopenmpi-dev)")
    dst = tmp_path / "dst"
    code, log, _ = sbatch(slurm_env, tmp_path, case_args(case, dst), MPICKPT_MPI=mpi, MPICKPT_LAUNCHER=launcher,
                          MPIEXEC=str(VENV_BIN / "mpiexec") if mpi == "mpich" else "mpiexec.openmpi")
    assert code == 0, log
    assert f"{TASKS} tasks on 1 node(s)" in log and f"{mpi} via {launcher}" in log
    assert outputs(dst) == serial
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["world_size"] == TASKS  # one world of 4, not four worlds of 1
    assert sorted(len(p["targets"]) for p in manifest["processes"]) == [1] * TASKS
    assert f"by {TASKS} processes" in log


def test_killed_task_fails_the_job_quickly_and_a_rerun_finishes(slurm_env: dict[str, str], case: Case,
                                                                serial: dict[str, bytes], tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    code, log, seconds = sbatch(slurm_env, tmp_path, case_args(case, dst),
                                MPICKPT_TEST_FAIL="process=2,after_bytes=1,action=kill")
    assert code != 0, log
    assert seconds < 30 + 5, f"the job took {seconds:.0f} s to end"  # 5 s: Slurm's own scheduling
    for name, data in outputs(dst).items():
        assert data == serial[name], f"{name} is incomplete under its final name"
    assert len(outputs(dst)) < len(serial)
    code, log, _ = sbatch(slurm_env, tmp_path, case_args(case, dst))
    assert code == 0, log
    assert outputs(dst) == serial
