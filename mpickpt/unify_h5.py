"""Unify into one HDF5 file of full tensors, written by every process at once (``mpickpt unify --format h5``).

Rank 0 plans (:func:`~mpickpt.unify.plan_shared`: every process then confirms it sees the source files
and the output's folder rank 0 planned with), locks that folder for the run as ``transform`` and ``unify``
do, removes the earlier run's ``<file>.manifest.json`` (written again once this run is complete) and lays
the file out under a temporary name
(:meth:`~mpickpt.formats.hdf5.H5Writer.layout`), learning each dataset's byte offset; the region map is
broadcast, the parameters are dealt to processes by size, each process assembles its parameters and writes
them at their offsets (:func:`~mpickpt.formats.hdf5.open_regions`), and once every process has reported,
rank 0 checks each parameter was written once and renames the file into place, then writes
``<file>.manifest.json`` beside it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, cast

from .collective import broadcast_prepared, deal_by_size, fail
from .destination import DestinationLock, lock_for_run
from .execute import SourceFiles, write_plan
from .formats import TensorSpec
from .manifest import remove_manifest, write_json_atomic
from .mpi import Comm
from .plan import ParamPlan, TargetPlan
from .strategy import describe_strategy
from .unify import Adapted, UnifyOptions, UnifyPlan, UnifySummary, collect, plan_shared

__all__ = ["run_unify_h5"]

MANIFEST_SUFFIX = ".manifest.json"


def run_unify_h5(options: UnifyOptions, comm: Comm, *, sync: bool = True, manifest: bool = True) -> UnifySummary:
    """Called on every process; returns the same summary on each."""
    from .formats.hdf5 import H5Layout, H5Writer, open_regions

    started = time.monotonic()
    plan = plan_shared(options, comm)
    file = plan.files[0]
    writer: H5Writer | None = None
    lock: DestinationLock | None = None

    def lay_out() -> H5Layout:
        nonlocal writer, lock
        lock = lock_for_run(plan.dst, sys.stderr)
        try:
            remove_manifest(plan.dst, f"{os.path.basename(file.path)}{MANIFEST_SUFFIX}")
            writer = H5Writer(file.path, sync=sync, forbidden_dirs=plan.job.forbidden_dirs, attrs=_file_attrs(plan))
            return writer.layout(_specs(plan, _params(plan)))
        except BaseException:
            lock.release()
            raise

    layout = broadcast_prepared(lay_out, comm)
    summary = None
    try:
        began = time.monotonic()
        mine = deal_by_size(_params(plan), lambda p: p.nbytes, comm.size)[comm.rank]
        target = TargetPlan(0, tuple(mine), tuple(sorted({c.src_rank for p in mine for c in p.copies}, reverse=True)))
        region = open_regions(file.path, layout, sync=sync)
        try:
            with SourceFiles({r: plan.job.rank_files[r] for r in target.source_ranks}) as sources:
                written = write_plan(target, sources, Adapted(region, {}, declared=True))  # type: ignore[arg-type]
        except BaseException:
            region.abort()
            raise
        part = region.close()
        report = {"process": comm.rank, "params": len(mine), "bytes_read": target.bytes_read(),
                  "bytes_written": written, "seconds": round(time.monotonic() - began, 6), "part": part}
        comm.send(report, 0)
        if comm.rank == 0:
            reports = collect(comm)
            cast(H5Writer, writer).finish([r.pop("part") for r in reports])
            summary = _summary(plan, reports, time.monotonic() - started, sync, manifest)
    except BaseException as exc:
        if writer is not None:
            writer.abort()
        fail(comm, exc, f"process {comm.rank} ({file.path})")
    finally:
        if lock is not None:
            lock.release()
    comm.flush()
    return cast(UnifySummary, comm.bcast(summary, root=0))  # rank 0 always has one here


def _specs(plan: UnifyPlan, params: list[ParamPlan]) -> list[TensorSpec]:
    """The datasets to lay out. A ``str`` value's size is its text's, which its dims (``[0]``) do not give:
    it is read from the header of the file holding it."""
    texts = {p.name: p.copies[0].src_rank for p in params if p.dtype == "str"}
    with SourceFiles({r: plan.job.rank_files[r] for r in set(texts.values())}) as sources:
        sizes = {name: sources.entry(rank, name).nbytes for name, rank in texts.items()}
    return [TensorSpec(p.name, p.dtype, p.dims, sizes.get(p.name, p.nbytes)) for p in params]


def _file_attrs(plan: UnifyPlan) -> dict[str, object]:
    """File attributes beside mpickpt's version: the source strategy's per-parameter layout, as JSON."""
    src = plan.job.src
    return {"source_layouts": json.dumps(describe_strategy(src) if src is not None else [])}


def _params(plan: UnifyPlan) -> list[ParamPlan]:
    """Every parameter of the file, planned whole, in plan order."""
    return list(plan.target_plan(plan.files[0]).params)


def _summary(plan: UnifyPlan, reports: list[dict[str, Any]], wall: float, sync: bool,
             manifest: bool) -> UnifySummary:
    """Rank 0: ``<file>.manifest.json`` in transform's form, and the summary."""
    from . import __version__

    file = plan.files[0]
    path = None
    if manifest:
        path = Path(f"{file.path}{MANIFEST_SUFFIX}")
        write_json_atomic(path, {"version": 1, "tool": f"mpickpt {__version__}", "command": "unify",
                                 "world_size": len(reports), "wall_seconds": round(wall, 6),
                                 "file": os.path.basename(file.path), "size": os.path.getsize(file.path),
                                 "left_out": list(plan.left_out), "processes": reports}, sync=sync)
    return UnifySummary(1, len(file.names), sum(r["bytes_written"] for r in reports), len(reports), wall,
                        plan.left_out, str(path) if path else None)
