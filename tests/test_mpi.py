"""`mpickpt transform` under real MPI launchers, as `mpiexec -n K` subprocesses (MPI stays out of pytest).

MPICH is the venv's (PyPI `mpich`); Open MPI is Debian's (`mpiexec.openmpi`), with mpi4py's wheel switched to
it by mpickpt itself. Every case written by mpickpt (``tests/written_cases.py``: the full tensors split by
the target layout are known) and the MindSpore-made pipeline case (per-stage strategy folder; skipped
without MindSpore) gives the same bytes for K = 1..4 as the serial run, whose content is the expected
one; a process that raises or is killed ends the whole job quickly, leaves no partial output under a final
name, and a rerun finishes the job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fixture_cases import Case, assert_same_content
from mpickpt.ckpt import index_checkpoint, save_checkpoint
from mpickpt.destination import LOCK_NAME
from written_cases import WRITTEN

# not pytest.mark.mpi: pytest-mpi skips those without --with-mpi

REPO = Path(__file__).resolve().parents[1]
MPICH_MPIEXEC = Path(sys.executable).parent / "mpiexec"
FLAVORS = ["mpich", "openmpi"]
TIMEOUT = 60  # a run that takes this long has hung
ENDS_WITHIN = 30  # seconds from launch to every process gone after a failure
KILL_CASE = "random_8to4"  # 4 targets
MINDSPORE_PIPELINE = "pipeline_2x4_to_4"
Serial = Callable[[Case], dict[str, bytes]]


def launcher(flavor: str) -> list[str]:
    """The mpiexec command of one MPI flavour (skips when it is not installed)."""
    if flavor == "mpich":
        if not MPICH_MPIEXEC.exists():
            pytest.skip(f"MPICH's mpiexec is not at {MPICH_MPIEXEC} (pip install mpich)")
        return [str(MPICH_MPIEXEC)]
    path = shutil.which("mpiexec.openmpi")
    if path is None:
        pytest.skip("Open MPI is not installed (apt-get install openmpi-bin libopenmpi-dev)")
    return [path, "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's or mpi4py's variables, plus `extra`."""
    drop = ("PMI_", "PMIX_", "OMPI_", "MPI4PY_", "SLURM_", "HYDRA_", "MPICKPT_TEST")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def transform_args(case: Case, dst: Path, src_dir: Path | None = None) -> list[str]:
    """`mpickpt transform` flags for a fixture case (pipeline cases give the per-stage strategy folder)."""
    args = ["--src-dir", str(src_dir or case.src_dir), "--dst-dir", str(dst), "--prefix", case.prefix]
    stage_dir = case.meta.get("src_pipeline_strategy_dir")
    if stage_dir:
        args += ["--src-strategy-dir", str(case.root / stage_dir)]
    elif case.strategy("src"):
        args += ["--src-strategy", str(case.strategy("src"))]
    if case.strategy("dst"):
        args += ["--dst-strategy", str(case.strategy("dst"))]
    return args


@dataclass(frozen=True)
class Run:
    """A finished command."""

    returncode: int
    output: str  # stdout and stderr
    seconds: float


def run(cmd: list[str], **env: str) -> Run:
    """Run a command with a clean environment plus `env`; a run over TIMEOUT seconds fails the test."""
    began = time.monotonic()
    done = subprocess.run(cmd, env=clean_env(**env), capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    return Run(done.returncode, done.stdout + done.stderr, time.monotonic() - began)


def mpickpt(args: list[str], prefix: list[str] | None = None, **env: str) -> Run:
    """Run `[prefix] python -m mpickpt transform args`."""
    return run((prefix or []) + [sys.executable, "-m", "mpickpt", "transform", *args], **env)


SEGMENT_PATTERNS = ("mpich_shm_*", "vader_segment.*")  # MPICH's and Open MPI's shared memory


def shm_segments() -> set[Path]:
    """MPI shared-memory segments now in /dev/shm."""
    return {p for pattern in SEGMENT_PATTERNS for p in Path("/dev/shm").glob(pattern)}


def remove_stale_segments(candidates: Iterable[Path], wait: float = 3.0) -> None:
    """Delete those of `candidates` that no process maps, waiting up to `wait` s for dying processes to go.

    The MPI libraries unlink their segments once every process has attached or at exit, so only a killed
    job leaves them behind (and a later MPICH job whose name hashes alike would hang in MPI_Init)."""
    left = set(candidates)
    end = time.monotonic() + wait
    while left:
        mapped: set[str] = set()
        for maps in Path("/proc").glob("[0-9]*/maps"):
            try:
                mapped.update(line.rsplit(" ", 1)[-1] for line in maps.read_text().splitlines()
                              if "/dev/shm/" in line)
            except OSError:
                continue
        for segment in [s for s in left if str(s) not in mapped]:
            segment.unlink(missing_ok=True)
            left.discard(segment)
        if time.monotonic() > end:
            break
        time.sleep(0.2)


@pytest.fixture(autouse=True)
def no_stale_segments() -> Iterator[None]:
    """Remove the shared-memory segments that processes killed or aborted by a test leave behind."""
    before = shm_segments()
    yield
    remove_stale_segments(shm_segments() - before)


def outputs(root: Path) -> dict[str, bytes]:
    """Every file a run leaves, by relative path, except the run-specific manifest, records and lock file."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", LOCK_NAME) and not p.name.endswith(".done.json")}


@pytest.fixture(params=[*WRITTEN, MINDSPORE_PIPELINE])
def conversion(request: pytest.FixtureRequest, written_cases: dict[str, Case]) -> Case:
    """A case written by mpickpt, or the MindSpore-made pipeline case (skipped without MindSpore)."""
    if request.param in written_cases:
        return written_cases[request.param]
    return request.getfixturevalue("mindspore_cases")[request.param]


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory) -> Serial:
    """The serial outputs of a case, made once (no launcher: one process runs all targets) and checked
    against the case's expected files."""
    made: dict[str, dict[str, bytes]] = {}

    def outputs_of(case: Case) -> dict[str, bytes]:
        if case.name not in made:
            dst = tmp_path_factory.mktemp(f"serial_{case.name}")
            done = mpickpt(transform_args(case, dst) + ["--quiet"])
            assert done.returncode == 0, done.output
            assert done.output == ""
            for rank, expected in case.expected_files().items():
                assert_same_content(dst / f"rank_{rank}" / expected.name, expected)
            assert json.loads((dst / "manifest.json").read_text())["world_size"] == 1
            made[case.name] = outputs(dst)
        return made[case.name]

    return outputs_of


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("processes", [1, 2, 3, 4])
def test_mpiexec_gives_the_serial_bytes(conversion: Case, processes: int, flavor: str, tmp_path: Path,
                                        serial: Serial) -> None:
    case = conversion
    prefix = launcher(flavor) + ["-n", str(processes)]
    done = mpickpt(transform_args(case, tmp_path), prefix)
    assert done.returncode == 0, done.output
    got = outputs(tmp_path)
    expected = serial(case)
    assert sorted(got) == sorted(expected)
    for name, data in expected.items():
        assert got[name] == data, f"{name} differs from the serial run ({flavor}, {processes} processes)"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["world_size"] == processes
    dealt = [t for p in manifest["processes"] for t in p["targets"]]
    assert sorted(dealt) == sorted(f["target_rank"] for f in manifest["files"])  # each target exactly once
    busy = sum(bool(p["targets"]) for p in manifest["processes"])
    assert busy == min(processes, len(dealt))  # extra processes idle, the others all work
    assert f"by {processes} process" in done.output.splitlines()[-1]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_killed_process_ends_the_job_and_a_rerun_finishes_it(flavor: str, tmp_path: Path, serial: Serial,
                                                             written_cases: dict[str, Case]) -> None:
    case = written_cases[KILL_CASE]
    expected = serial(case)
    prefix = launcher(flavor) + ["-n", "4"]
    killed = mpickpt(transform_args(case, tmp_path), prefix,
                     MPICKPT_TEST_FAIL="process=1,after_bytes=1,action=kill")
    assert killed.returncode != 0, killed.output
    assert killed.seconds < ENDS_WITHIN, f"the job took {killed.seconds:.1f} s to end"
    complete = [name for name in expected if name.endswith(".ckpt") and (tmp_path / name).exists()]
    missing = [name for name in expected if name.endswith(".ckpt") and name not in complete]
    assert missing, "the killed process's output must not exist under its final name"
    for name in complete:
        assert (tmp_path / name).read_bytes() == expected[name], f"{name} is incomplete under its final name"
    assert not (tmp_path / "manifest.json").exists()
    recorded = [name for name in complete if Path(f"{tmp_path / name}.done.json").exists()]

    rerun = mpickpt(transform_args(case, tmp_path), prefix)
    assert rerun.returncode == 0, rerun.output
    assert outputs(tmp_path) == expected  # the dead processes' temporaries are gone too
    files = {f["file"]: f for f in json.loads((tmp_path / "manifest.json").read_text())["files"]}
    assert all(not files[name]["skipped"] for name in missing)
    assert all(files[name]["skipped"] for name in recorded)  # complete with a record: kept, not redone


def run_in_session(cmd: list[str], **env: str) -> Run:
    """`run`, the command in a session of its own whose processes are all killed when it ends or times out
    (a stopped process outlives its launcher)."""
    began = time.monotonic()
    with subprocess.Popen(cmd, env=clean_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=REPO, start_new_session=True) as proc:
        try:
            output, _ = proc.communicate(timeout=TIMEOUT)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return Run(proc.returncode, output, time.monotonic() - began)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_stopped_process_ends_the_job_naming_it_and_a_rerun_finishes_it(flavor: str, tmp_path: Path,
                                                                        serial: Serial,
                                                                        written_cases: dict[str, Case]) -> None:
    """A process that hangs (SIGSTOP) while writing never reports; rank 0 waited for it forever."""
    case = written_cases[KILL_CASE]
    prefix = launcher(flavor) + ["-n", "2"]
    cmd = prefix + [sys.executable, "-m", "mpickpt", "transform", *transform_args(case, tmp_path)]
    stopped = run_in_session(cmd, MPICKPT_TEST_FAIL="process=1,after_bytes=1,action=stop",
                             MPICKPT_TEST_REPORT_STALL="3")
    assert stopped.returncode != 0, stopped.output
    assert stopped.seconds < ENDS_WITHIN, f"the job took {stopped.seconds:.1f} s to end"
    assert "mpickpt: process 0: process 1 has not reported and no process has sent anything for 3 s" \
        in stopped.output, stopped.output
    assert not (tmp_path / "manifest.json").exists()
    rerun = mpickpt(transform_args(case, tmp_path), prefix)
    assert rerun.returncode == 0, rerun.output
    assert outputs(tmp_path) == serial(case)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_exception_in_one_process_names_it_and_ends_every_process(flavor: str, tmp_path: Path,
                                                                  written_cases: dict[str, Case]) -> None:
    done = mpickpt(transform_args(written_cases[KILL_CASE], tmp_path), launcher(flavor) + ["-n", "3"],
                   MPICKPT_TEST_FAIL="process=2,after_bytes=1")
    assert done.returncode != 0
    assert done.seconds < ENDS_WITHIN
    line = next((line for line in done.output.splitlines() if line.startswith("mpickpt: process 2")), done.output)
    assert line.startswith("mpickpt: process 2: target rank ") and line.count("target rank") == 1, line
    assert "): MPICKPT_TEST_FAIL: injected failure after" in line
    assert not (tmp_path / "manifest.json").exists()


INTERRUPT_FIRST_SOURCE_READ = """
import os, signal, sys
fired = []
def hook(event, args):
    if not fired and event == "open" and str(args[0]).endswith(".ckpt") and "/src/" in str(args[0]):
        fired.append(True)
        os.kill(os.getpid(), signal.SIGINT)
if os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK")) == "1":
    sys.addaudithook(hook)
"""


@pytest.mark.parametrize("flavor", FLAVORS)
def test_ctrl_c_on_one_process_while_the_job_starts_ends_every_process(flavor: str, tmp_path: Path,
                                                                       serial: Serial,
                                                                       written_cases: dict[str, Case]) -> None:
    """SIGINT to process 1 as it first reads a source header (inside a collective, before any output): it
    printed `mpickpt: interrupted` and left, and the others waited for it forever."""
    case = written_cases[KILL_CASE]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(INTERRUPT_FIRST_SOURCE_READ)
    src = tmp_path / "src"
    shutil.copytree(case.src_dir, src)
    prefix = launcher(flavor) + ["-n", "3"]
    cmd = prefix + [sys.executable, "-m", "mpickpt", "transform", *transform_args(case, tmp_path / "dst", src)]
    interrupted = run_in_session(cmd, PYTHONPATH=str(site))
    assert interrupted.returncode != 0, interrupted.output
    assert interrupted.seconds < ENDS_WITHIN, f"the job took {interrupted.seconds:.1f} s to end"
    assert "mpickpt: process 1: interrupted" in interrupted.output, interrupted.output
    assert not (tmp_path / "dst" / "manifest.json").exists()
    rerun = mpickpt(transform_args(case, tmp_path / "dst", src), prefix)
    assert rerun.returncode == 0, rerun.output
    assert outputs(tmp_path / "dst") == serial(case)


REFUSE_SOURCES_ONCE_CHECKING = """
import os, sys
checking = []
def hook(event, args):
    if event != "open" or not str(args[0]).endswith(".ckpt"):
        return
    if "/dst/" in str(args[0]):
        checking.append(True)
    elif checking:
        raise PermissionError(13, "Permission denied (injected)", str(args[0]))
if os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK")) == "1":
    sys.addaudithook(hook)
"""


@pytest.mark.parametrize("flavor", FLAVORS)
def test_verify_that_cannot_read_a_source_on_one_process_exits_2(flavor: str, tmp_path: Path,
                                                                   written_cases: dict[str, Case]) -> None:
    """verify's status 1 means an output does not match, 2 that the check could not run (as serially); under
    mpiexec a process failing to read a source file while checking aborted the job with 1."""
    case = written_cases[KILL_CASE]
    dst = tmp_path / "dst"
    assert mpickpt(transform_args(case, dst) + ["--quiet"]).returncode == 0
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(REFUSE_SOURCES_ONCE_CHECKING)
    args = [a for a in transform_args(case, dst) if a not in ("--prefix", case.prefix)]
    cmd = launcher(flavor) + ["-n", "2", sys.executable, "-m", "mpickpt", "verify", *args]
    done = run_in_session(cmd, PYTHONPATH=str(site))
    assert done.returncode == 2, done.output
    assert done.seconds < ENDS_WITHIN
    line = next((line for line in done.output.splitlines() if line.startswith("mpickpt: verify: process 1: ")), "")
    assert str(case.src_dir) in line and "Permission denied (injected)" in line, done.output


def copy_with_victim(case: Case, tmp_path: Path) -> tuple[Path, Path]:
    """The case's sources copied to tmp_path/src, and rank 3's file there made writable (to be damaged)."""
    src = tmp_path / "src"
    shutil.copytree(case.src_dir, src)
    victim = next((src / "rank_3").glob("*.ckpt"))
    victim.chmod(0o600)
    return src, victim


@pytest.mark.parametrize("flavor", FLAVORS)
def test_corrupt_source_is_refused_before_any_output_naming_file_and_parameter(flavor: str, tmp_path: Path,
                                                                            written_cases: dict[str, Case]) -> None:
    case = written_cases[KILL_CASE]
    src, victim = copy_with_victim(case, tmp_path)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    done = mpickpt(transform_args(case, tmp_path / "dst", src), launcher(flavor) + ["-n", "2"])
    assert done.returncode != 0
    assert done.seconds < ENDS_WITHIN
    errors = {line for line in done.output.splitlines() if line.startswith("mpickpt: error:")}
    assert len(errors) == 1 and done.output.count("mpickpt: error:") == 2, done.output  # rank 0's, on both ranks
    line = errors.pop()
    assert str(victim) in line and "parameter '" in line, line
    assert not list((tmp_path / "dst").rglob("*.ckpt"))  # the whole job is validated before writing


@pytest.mark.parametrize("flavor", FLAVORS)
def test_rank_files_disagreeing_on_a_copied_value_are_refused_on_every_rank(flavor: str, tmp_path: Path,
                                                                           written_cases: dict[str, Case]) -> None:
    """Each process fingerprints its share of the files' copied-through values; every process refuses alike."""
    case = written_cases[KILL_CASE]
    src, victim = copy_with_victim(case, tmp_path)
    with index_checkpoint(victim) as index:
        params = [(n, e.dtype, e.dims, np.array(index.array(n))) for n, e in index.entries.items()]
    victim.unlink()
    save_checkpoint(victim, [(n, d, dims, np.full_like(a, 8) if n == "global_step" else a)
                             for n, d, dims, a in params])
    done = mpickpt(transform_args(case, tmp_path / "dst", src), launcher(flavor) + ["-n", "2"])
    assert done.returncode != 0
    errors = {line for line in done.output.splitlines() if line.startswith("mpickpt: error:")}
    assert len(errors) == 1 and done.output.count("mpickpt: error:") == 2, done.output
    line = errors.pop()
    assert "parameter 'global_step' is outside the source strategy" in line and f"{victim} holds [8]" in line, line
    assert not list((tmp_path / "dst").rglob("*.ckpt"))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_destination_inside_a_source_is_refused_on_every_rank(flavor: str, tmp_path: Path,
                                                              written_cases: dict[str, Case]) -> None:
    case = written_cases["random_full_to_4"]
    src = tmp_path / "src"
    shutil.copytree(case.src_dir, src)
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    done = mpickpt(transform_args(case, src / "out", src), launcher(flavor) + ["-n", "2"])
    assert done.returncode != 0
    assert done.output.count("mpickpt: error:") == 2, done.output  # both ranks, rank 0's message
    assert len({line for line in done.output.splitlines() if line.startswith("mpickpt: error:")}) == 1
    assert f"{src / 'out'}: refusing to write inside source folder {src}" in done.output
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before


@pytest.mark.parametrize("flavor", FLAVORS)
def test_locked_destination_is_refused_on_every_rank(flavor: str, tmp_path: Path,
                                                     written_cases: dict[str, Case]) -> None:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from mpickpt.destination import DestinationLock; "
        f"DestinationLock.acquire({str(tmp_path)!r}); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env=clean_env(PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        done = mpickpt(transform_args(written_cases[KILL_CASE], tmp_path), launcher(flavor) + ["-n", "2"])
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode != 0
    errors = [line for line in done.output.splitlines() if line.startswith("mpickpt: error:")]
    assert errors and len(set(errors)) == 1, done.output  # rank 0's message (Open MPI may end one rank first)
    assert "another mpickpt run is writing here" in errors[0] and f"pid={holder.pid}" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]


def test_launcher_and_mpi_world_disagreeing_is_refused(tmp_path: Path, written_cases: dict[str, Case]) -> None:
    """srun without --mpi=pmi2 would start N one-process worlds; mpickpt refuses instead of converting N times."""
    case = written_cases[KILL_CASE]
    done = mpickpt(transform_args(case, tmp_path), SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="0")
    assert done.returncode != 0
    assert "the launcher started 2 processes but MPI formed a world of 1" in done.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flavor", FLAVORS)
def test_mpirun_wrapper_script(flavor: str, tmp_path: Path, serial: Serial, written_cases: dict[str, Case]) -> None:
    case = written_cases[KILL_CASE]
    mpiexec = launcher(flavor)[0]
    cmd = ["bash", str(REPO / "launch" / "mpirun.sh"), "-n", "3", "--mpiexec", mpiexec, "--",
           *transform_args(case, tmp_path)]
    done = run(cmd, MPICKPT=str(Path(sys.executable).parent / "mpickpt"))
    assert done.returncode == 0, done.output
    assert outputs(tmp_path) == serial(case)
    assert json.loads((tmp_path / "manifest.json").read_text())["world_size"] == 3
