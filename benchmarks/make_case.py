"""Write a synthetic Llama-style distributed checkpoint (a benchmark case) with mpickpt's own writer.

No MindSpore needed. The case is deterministic: every full tensor is a window of a seeded random pool, so
any rank's slice (source or target) can be regenerated later to check a conversion's outputs by content.

Usage: python benchmarks/make_case.py --gb 2 --out /work/bench-data/llama_2gb [--pipeline] [--seed 0]

Layout of the case folder:
  src/rank_<r>/checkpoint_<r>.ckpt     8 source ranks: tp2 x dp4 with optimizer parallel
                                       (--pipeline: 2 stages x (tp2 x dp2), optimizer parallel)
  src_strategy.ckpt                    source strategy (pipeline: MindSpore-style merge of the stages)
  src_strategys/src_strategy_<r>.ckpt  pipeline only: the per-rank stage strategy files
  dst_strategy_<n>.ckpt                targets: 4 = tp4, 6 = tp2 x dp3 (opt), 16 = tp4 x dp4 (opt)
  case.json                            what is where, sizes, and which targets MindSpore can convert
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpickpt.ckpt import CheckpointWriter
from mpickpt.strategy import LayoutItem, Strategy, StrategyItem, save_strategy

PREFIX = "checkpoint_"
SRC_RANKS = 8
POOL_LEN = (1 << 22) + 1237  # pool period is no multiple of any row length, so rows differ
MAX_TOTAL_GB = 20.0
NET = "Default/network-TrainOneStepCell/network-LlamaForCausalLM"
SCALARS = ("global_step", "learning_rate")


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of the synthetic Llama model."""

    hidden: int
    kv_dim: int
    ffn: int
    vocab: int
    layers: int


@dataclass(frozen=True)
class Param:
    """One trainable parameter: its full shape and how tensor parallelism splits it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str  # "col" / "vocab": split dim 0 over tp; "row": split dim 1 over tp; "rep": replicated
    stage: int  # pipeline stage holding it (0 without pipeline)


@dataclass(frozen=True)
class Topology:
    """A device arrangement: dp x tp per stage, pipeline stages, optimizer parallel on or off."""

    dp: int
    tp: int
    stages: int = 1
    opt: bool = False

    @property
    def per_stage(self) -> int:
        return self.dp * self.tp

    @property
    def ranks(self) -> int:
        return self.per_stage * self.stages


SRC = Topology(dp=4, tp=2, opt=True)
SRC_PIPE = Topology(dp=2, tp=2, stages=2, opt=True)
TARGETS: dict[str, tuple[Topology, bool]] = {  # name -> (topology, MindSpore can convert 8 -> it)
    "4": (Topology(dp=1, tp=4), True),
    "6": (Topology(dp=3, tp=2, opt=True), False),
    "16": (Topology(dp=4, tp=4, opt=True), True),
}


def model_for_size(gb: float) -> ModelShape:
    """A Llama shape whose source checkpoint (bf16 weights + two f32 Adam moments) is about `gb` GB."""
    if gb <= 0.01:  # the example shipped in examples/ (smallest shape every target splits evenly)
        hidden, vocab = 192, 768
    elif gb <= 0.3:
        hidden, vocab = 384, 8064
    elif gb <= 1.5:
        hidden, vocab = 768, 16128
    elif gb <= 4.0:
        hidden, vocab = 1536, 32064
    else:
        hidden, vocab = 2304, 32064
    kv_dim = hidden // 4
    ffn = 96 * math.ceil(8 * hidden / 3 / 96)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * ffn + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1 if gb <= 0.01 else 2, round((gb * 1e9 / 10 - fixed) / per_layer))
    return ModelShape(hidden, kv_dim, ffn, vocab, layers)


def weights(model: ModelShape, stages: int) -> list[Param]:
    """The model's BFloat16 weights in network order; layers are dealt evenly to pipeline stages."""
    h, last = model.hidden, stages - 1
    params = [Param("model.tok_embeddings.embedding_weight", "BFloat16", (model.vocab, h), "vocab", 0)]
    for i in range(model.layers):
        stage = i * stages // model.layers
        pre = f"model.layers.{i}."
        params += [
            Param(pre + "attention_norm.weight", "BFloat16", (h,), "rep", stage),
            Param(pre + "attention.wq.weight", "BFloat16", (h, h), "col", stage),
            Param(pre + "attention.wk.weight", "BFloat16", (model.kv_dim, h), "col", stage),
            Param(pre + "attention.wv.weight", "BFloat16", (model.kv_dim, h), "col", stage),
            Param(pre + "attention.wo.weight", "BFloat16", (h, h), "row", stage),
            Param(pre + "ffn_norm.weight", "BFloat16", (h,), "rep", stage),
            Param(pre + "feed_forward.w1.weight", "BFloat16", (model.ffn, h), "col", stage),
            Param(pre + "feed_forward.w3.weight", "BFloat16", (model.ffn, h), "col", stage),
            Param(pre + "feed_forward.w2.weight", "BFloat16", (h, model.ffn), "row", stage),
        ]
    params += [Param("model.norm_out.weight", "BFloat16", (h,), "rep", last),
               Param("lm_head.weight", "BFloat16", (model.vocab, h), "vocab", last)]
    return params


def all_params(model: ModelShape, stages: int) -> list[Param]:
    """Weights, then Adam's first and second moments (Float32, same layouts)."""
    ws = weights(model, stages)
    moments = [Param(f"{m}.{p.name}", "Float32", p.shape, p.kind, p.stage) for m in ("adam_m", "adam_v") for p in ws]
    return ws + moments


# ---- layouts (an independent model of FORMATS.md's rules, written for the benchmark) ----

def tensor_map(param: Param) -> tuple[int, ...]:
    """Plain tensor map over dev_matrix (dp, tp): axis 0 is tp, axis 1 is dp."""
    if param.kind in ("col", "vocab"):
        return (0,) + (-1,) * (len(param.shape) - 1)
    if param.kind == "row":
        return (-1, 0)
    return (-1,) * len(param.shape)


def opt_sharded(param: Param, topo: Topology) -> bool:
    """Optimizer parallel shards every weight but the small norms (below MindSpore's 64 KB threshold)."""
    return topo.opt and topo.dp > 1 and param.kind != "rep"


def layout_item(param: Param, topo: Topology, name: str | None = None) -> LayoutItem:
    """The strategy-file layout of `param` under `topo` (dev_matrix (dp, tp); opt step = tp, size -1)."""
    sharded = opt_sharded(param, topo)
    return LayoutItem(
        name=name or param.name, dev_matrix=(topo.dp, topo.tp), tensor_map=(tensor_map(param),),
        param_split_shape=((),), indices_offset=((),), field=0,
        opt_weight_shard_step=topo.tp if sharded else 0, opt_weight_shard_size=-1 if sharded else 0)


def rank_box(param: Param, topo: Topology, local_rank: int) -> tuple[slice, ...]:
    """The region of the full tensor that `local_rank` (rank within its stage) stores."""
    dp_coord, tp_coord = divmod(local_rank, topo.tp)
    starts = [0] * len(param.shape)
    sizes = list(param.shape)
    for dim, axis in enumerate(tensor_map(param)):
        if axis == 0:
            sizes[dim] = _split(param, dim, param.shape[dim], topo.tp)
            starts[dim] = tp_coord * sizes[dim]
    if opt_sharded(param, topo):
        piece = _split(param, 0, sizes[0], topo.dp)
        starts[0] += dp_coord * piece
        sizes[0] = piece
    return tuple(slice(s, s + n) for s, n in zip(starts, sizes))


def _split(param: Param, dim: int, length: int, parts: int) -> int:
    if length % parts:
        raise ValueError(f"{param.name}: dim {dim} of length {length} does not split into {parts}")
    return length // parts


def largest_slice_bytes(params: list[Param], topo: Topology) -> int:
    """Bytes of the largest parameter slice any rank of `topo` stores."""
    return max(math.prod(s.stop - s.start for s in rank_box(p, topo, 0)) * _itemsize(p.dtype) for p in params)


def _itemsize(dtype: str) -> int:
    return {"BFloat16": 2, "Float32": 4, "Int32": 4}[dtype]


# ---- contents ----

class Contents:
    """Deterministic full tensors: each is a window of a seeded random pool, starting at a name-derived offset."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        normal = rng.standard_normal(POOL_LEN, dtype=np.float32)
        self.pools = {
            "weight": ((normal * np.float32(0.02)).view(np.uint32) >> 16).astype(np.uint16),  # bf16 bits
            "adam_m": normal * np.float32(1e-3),
            "adam_v": np.abs(rng.standard_normal(POOL_LEN, dtype=np.float32)) * np.float32(1e-6),
        }

    def full(self, param: Param) -> np.ndarray:
        """The whole tensor of `param` (BFloat16 as uint16 bit patterns)."""
        pool = self.pools[param.name.split(".")[0] if param.dtype == "Float32" else "weight"]
        count = math.prod(param.shape)
        out = np.empty(count, pool.dtype)
        pos, src = 0, zlib.crc32(param.name.encode()) % POOL_LEN
        while pos < count:
            take = min(count - pos, POOL_LEN - src)
            out[pos:pos + take] = pool[src:src + take]
            pos, src = pos + take, 0
        return out.reshape(param.shape)


def scalars() -> list[tuple[str, str, tuple[int, ...], np.ndarray]]:
    """Parameters outside the strategy, the same in every rank file: global_step [1] and scalar learning_rate."""
    return [("global_step", "Int32", (1,), np.array([1000], np.int32)),
            ("learning_rate", "Float32", (), np.array(3e-4, np.float32))]


# ---- strategies ----

def strategy_items(params: list[Param], topo: Topology, stage: int) -> tuple[StrategyItem, ...]:
    """One MatMul/Gather operator strategy per weight of `stage` (what the compiler records)."""
    dp, tp = topo.dp, topo.tp
    items = []
    for i, p in enumerate(q for q in params if q.stage == stage and not q.name.startswith("adam_")):
        strat: tuple[tuple[int, ...], ...]
        if p.kind == "vocab":
            op, strat = "Gather", ((tp, 1), (dp, 1))
        elif p.kind == "col":
            op, strat = "MatMul", ((dp, 1), (tp, 1))
        elif p.kind == "row":
            op, strat = "MatMul", ((dp, tp), (1, tp))
        else:
            op, strat = "RmsNorm", ((dp, 1, 1), (1,))
        items.append(StrategyItem(f"{NET}/{p.name.replace('.', '-')}/{op}-op{i}", stage, strat))
    return tuple(items)


def stage_strategy(params: list[Param], topo: Topology, stage: int) -> Strategy:
    """The strategy file one rank of `stage` writes."""
    mine = [p for p in params if p.stage == stage]
    return Strategy(current_stage=stage, strategy_items=strategy_items(params, topo, stage),
                    layout_items=tuple(layout_item(p, topo) for p in mine))


def merged_strategy(params: list[Param], topo: Topology) -> Strategy:
    """MindSpore's merge of per-stage files: names become "<stage>-<name>", current_stage 1."""
    items = tuple(i for s in range(topo.stages) for i in strategy_items(params, topo, s))
    layouts = tuple(layout_item(p, topo, f"{p.stage}-{p.name}") for s in range(topo.stages)
                    for p in params if p.stage == s)
    return Strategy(current_stage=1, strategy_items=items, layout_items=layouts)


# ---- the case ----

def check_disk(out: Path, gb: float) -> None:
    """Refuse when the case (source + a few outputs) would not fit or would pass the benchmark budget."""
    free = shutil.disk_usage(out.parent if not out.exists() else out).free
    need = gb * 1e9 * 4  # source, two target copies, slack
    if gb > MAX_TOTAL_GB / 2.5:
        raise SystemExit(f"--gb {gb}: benchmark data must stay under {MAX_TOTAL_GB} GB (source + outputs)")
    if free < need:
        raise SystemExit(f"{out}: {free / 1e9:.1f} GB free, need about {need / 1e9:.1f} GB")


def write_sources(out: Path, params: list[Param], topo: Topology, contents: Contents) -> int:
    """Write every source rank's file in one pass over the parameters; returns total bytes."""
    paths = [out / "src" / f"rank_{r}" / f"{PREFIX}{r}.ckpt" for r in range(topo.ranks)]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        writers = [stack.enter_context(CheckpointWriter(str(path), sync=False)) for path in paths]
        for p in params:
            full = contents.full(p)
            for rank in range(p.stage * topo.per_stage, (p.stage + 1) * topo.per_stage):
                data = np.ascontiguousarray(full[rank_box(p, topo, rank % topo.per_stage)])
                writers[rank].write_tensor(p.name, p.dtype, data.shape, data)
        for writer in writers:
            for name, dtype, dims, data in scalars():
                writer.write_tensor(name, dtype, dims, data)
    return sum(path.stat().st_size for path in paths)


def make_case(out: Path, gb: float, pipeline: bool, seed: int) -> dict:
    """Write the whole case folder; returns what case.json holds."""
    out.mkdir(parents=True, exist_ok=True)
    check_disk(out, gb)
    model = model_for_size(gb)
    topo = SRC_PIPE if pipeline else SRC
    params = all_params(model, topo.stages)
    desc: dict = {
        "name": out.name, "gb_requested": gb, "seed": seed, "model": model.__dict__, "pipeline": pipeline,
        "prefix": PREFIX, "src_dir": "src", "src_ranks": topo.ranks, "src_topology": topo.__dict__,
        "src_strategy": "src_strategy.ckpt", "params": len(params) + len(SCALARS), "targets": {},
    }
    if pipeline:
        sdir = out / "src_strategys"
        sdir.mkdir(exist_ok=True)
        for rank in range(topo.ranks):
            save_strategy(stage_strategy(params, topo, rank // topo.per_stage), str(sdir / f"src_strategy_{rank}.ckpt"))
        save_strategy(merged_strategy(params, topo), str(out / "src_strategy.ckpt"))
        desc["src_strategy_dir"] = "src_strategys"
    else:
        save_strategy(stage_strategy(params, topo, 0), str(out / "src_strategy.ckpt"))
    flat = all_params(model, 1)
    for name, (target, ms_ok) in TARGETS.items():
        fname = f"dst_strategy_{name}.ckpt"
        save_strategy(stage_strategy(flat, target, 0), str(out / fname))
        desc["targets"][name] = {"strategy": fname, "ranks": target.ranks, "topology": target.__dict__,
                                 "mindspore": ms_ok, "largest_slice_bytes": largest_slice_bytes(flat, target)}
    desc["src_bytes"] = write_sources(out, params, topo, Contents(seed))
    (out / "case.json").write_text(json.dumps(desc, indent=1) + "\n")
    return desc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, required=True, help="approximate total source size in GB (0.1 .. 8)")
    ap.add_argument("--out", type=Path, required=True, help="case folder (keep it outside the repository)")
    ap.add_argument("--pipeline", action="store_true", help="2 pipeline stages x (tp2 x dp2) source")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    desc = make_case(args.out, args.gb, args.pipeline, args.seed)
    print(f"{args.out}: {desc['src_bytes'] / 1e9:.3f} GB in {desc['src_ranks']} ranks, "
          f"{desc['params']} parameters, model {desc['model']}, {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
