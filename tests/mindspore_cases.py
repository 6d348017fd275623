"""MindSpore-made conversion cases, generated once per test session into a temporary folder.

The pytest process describes small models and layouts (copied from MindSpore's compiler output at
smaller shapes); one MindSpore subprocess (``run_mindspore``) saves the full model with
``save_checkpoint``, writes the strategy files with MindSpore's own protobuf classes, merges the pipeline
stage files, cuts ``src_checkpoints`` from the full model and writes ``expected/`` with
``transform_checkpoints``, records ``rank_list_for_transform``, and saves the format samples. Each case
folder has the layout of ``Case`` (``tests/fixture_cases.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fixture_cases import CASE_NAMES, Case
from mindspore_helpers import run_mindspore
from mpickpt.strategy import load_strategy

PREFIX = "checkpoint_"
MLP_NODE = "Default/network-WithLossCell/_backbone-Network/layer{0}-Dense/MatMul-op{1}"
STAGE_NODE = "Default/network-WithLossCell/_backbone-Net/stage0/MatMul-op0"
Layout = tuple[str, list[int], list[int], int, int]  # name, dev_matrix, tensor_map, opt size, opt step


def _mlp_params() -> list[tuple[str, str, list[int]]]:
    """The tutorial MLP with SGD state (accum/stat clones) at small shapes, in the order MindSpore saves it."""
    core = [("layer1.weight", [32, 16]), ("layer1.bias", [16]), ("layer2.weight", [16, 16]),
            ("layer2.bias", [16]), ("layer3.weight", [16, 10]), ("layer3.bias", [10])]
    params = [(f"{kind}{name}", "Float32", shape) for kind in ("", "accum.", "stat.") for name, shape in core]
    return params + [("global_step", "Int32", [1]), ("learning_rate", "Float32", []), ("momentum", "Float32", [])]


def _with_state(layouts: dict[str, tuple[list[int], list[int], int, int]]) -> list[Layout]:
    """MLP layouts, repeated for the accum and stat clones."""
    return [(f"{kind}{name}", *rest) for kind in ("", "accum.", "stat.") for name, rest in layouts.items()]


def _strategy(layouts: list[Layout], items: list[tuple[str, int, list[list[int]]]], stage: int = 0) -> dict:
    return {"current_stage": stage, "items": items, "layouts": layouts}


def _mlp_items(*strategies: tuple[int, list[list[int]]], stage: int = 0) -> list[tuple[str, int, list[list[int]]]]:
    """MatMul strategies of the MLP's layers, by layer number (1-3)."""
    return [(MLP_NODE.format(layer, layer - 1), stage, strategy) for layer, strategy in strategies]


def _seed_8to4() -> dict[str, Any]:
    src = _with_state({
        "layer1.weight": ([2, 2, 1, 2], [1, 0], 0, 0), "layer1.bias": ([8, 1], [0], 0, 0),
        "layer2.weight": ([8, 1, 1], [1, 0], 0, 0), "layer2.bias": ([8, 1], [0], 0, 0),
        "layer3.weight": ([2, 2, 2, 1], [1, 0], 0, 0), "layer3.bias": ([8, 1], [0], 0, 0),
    })
    dst = _with_state({
        "layer1.weight": ([2, 2, 1], [1, 0], -1, 2), "layer1.bias": ([4, 1], [0], -1, 1),
        "layer2.weight": ([4, 1, 1], [1, 0], -1, 1), "layer2.bias": ([4, 1], [0], -1, 1),
        "layer3.weight": ([2, 2, 1], [1, 0], -1, 2), "layer3.bias": ([4, 1], [0], 0, 0),
    })
    return {
        "description": "Tutorial MLP with SGD state: 8 devices layer1 ((2,1),(1,2)), no optimizer parallel -> "
                       "4 devices layer1 ((2,2),(2,1)) with optimizer parallel.",
        "params": _mlp_params(),
        "src": _strategy(src, _mlp_items((1, [[2, 1], [1, 2]]), (2, [[8, 1], [1, 1]]), (3, [[2, 2], [2, 1]]))),
        "dst": _strategy(dst, _mlp_items((1, [[2, 2], [2, 1]]), (2, [[4, 1], [1, 1]]), (3, [[2, 2], [2, 1]]))),
        "src_ranks": 8, "dst_ranks": 4,
    }


def _dp_to_tp_8to4() -> dict[str, Any]:
    shapes = {"fc1.weight": ("Float16", [16, 32]), "fc1.bias": ("Float16", [32]), "fc2.weight": ("Float16", [32, 16]),
              "fc2.bias": ("Float32", [16]), "norm.gamma": ("Float32", [16]), "norm.beta": ("Float32", [16]),
              "moments.fc1.weight": ("Float32", [16, 32]), "moments.fc2.weight": ("Float32", [32, 16])}
    src = [(name, [8, 1, 1] if len(shape) == 2 else [8, 1], [1, 0] if len(shape) == 2 else [0], 0, 0)
           for name, (_, shape) in shapes.items()]
    dst_layouts = {"fc1.weight": ([1, 1, 4], [1, 0]), "fc1.bias": ([1, 4], [0]), "fc2.weight": ([1, 4, 1], [1, 0]),
                   "fc2.bias": ([4, 1, 1], [0]), "norm.gamma": ([4, 1, 1], [0]), "norm.beta": ([4, 1, 1], [0]),
                   "moments.fc1.weight": ([1, 1, 4], [1, 0]), "moments.fc2.weight": ([1, 4, 1], [1, 0])}
    dst = [(name, dev, tmap, 0, 0) for name, (dev, tmap) in dst_layouts.items()]
    return {
        "description": "Pure data parallel 8 (all replicated) -> 4-way tensor parallel (column/row parallel MLP, "
                       "fp16 + fp32).",
        "params": [(name, dtype, shape) for name, (dtype, shape) in shapes.items()] + [("global_step", "Int32", [1])],
        "src": _strategy(src, [(STAGE_NODE, 0, [[1, 1], [1, 1]])]),
        "dst": _strategy(dst, [(STAGE_NODE, 0, [[1, 1], [1, 1]])]),
        "src_ranks": 8, "dst_ranks": 4,
    }


def _pipeline_2x4_to_4() -> dict[str, Any]:
    opt = ([4, 1, 1], [1, 0], -1, 1), ([4, 1], [0], -1, 1)
    stage0 = _with_state({"layer1.weight": opt[0], "layer1.bias": opt[1]})
    stage1 = _with_state({"layer2.weight": opt[0], "layer2.bias": opt[1], "layer3.weight": opt[0],
                          "layer3.bias": ([4, 1], [0], 0, 0)})
    dst = _with_state({
        "layer1.weight": ([1, 4, 1], [1, 0], 0, 0), "layer1.bias": ([4, 1], [0], 0, 0),
        "layer2.weight": ([4, 1, 1], [1, 0], 0, 0), "layer2.bias": ([4, 1], [0], 0, 0),
        "layer3.weight": ([2, 2, 1], [1, 0], 0, 0), "layer3.bias": ([4, 1], [0], 0, 0),
    })
    stages = [
        _strategy(stage0, _mlp_items((1, [[4, 1], [1, 1]])), stage=0),
        _strategy(stage1, _mlp_items((2, [[4, 1], [1, 1]]), (3, [[4, 1], [1, 1]]), stage=1), stage=1),
    ]
    return {
        "description": "Tutorial MLP with pipeline_stages=2 on 8 devices (4 per stage, data parallel + optimizer "
                       "parallel); per-rank strategy files merged with merge_pipeline_strategys -> 4 devices, no "
                       "pipeline, layer1 ((1,4),(4,1)), layer3 ((2,2),(2,1)), no optimizer parallel.",
        "params": _mlp_params(),
        "stages": [stages[rank // 4] for rank in range(8)],
        "dst": _strategy(dst, _mlp_items((1, [[1, 4], [4, 1]]), (3, [[2, 2], [2, 1]]))),
        "src_ranks": 8, "dst_ranks": 4,
    }


def _llm_8() -> tuple[list[tuple[str, str, list[int]]], dict]:
    """A small transformer block (bf16 weights, fp32 norms/Adam states) on 8 cards tp2 x dp4, optimizer parallel."""
    tp_row, tp_col, tp_bias, rep = ([4, 2, 1], [1, 0], -1, 2), ([4, 1, 2], [1, 0], -1, 2), ([4, 2], [0], -1, 2), \
        ([2, 4, 1], [0], -1, 1)
    table = [
        ("embedding.word_embeddings.embedding_table", "BFloat16", [32, 16], tp_row),
        ("attention.qkv.weight", "BFloat16", [16, 48], tp_col), ("attention.qkv.bias", "BFloat16", [48], tp_bias),
        ("attention.k_proj.weight", "BFloat16", [8, 16], ([4, 1, 2], [0, 1], -1, 2)),
        ("attention.dense.weight", "BFloat16", [16, 16], tp_row), ("attention.dense.bias", "Float32", [16], rep),
        ("mlp.w1.weight", "BFloat16", [16, 64], tp_col), ("mlp.w2.weight", "BFloat16", [64, 16], tp_row),
        ("ln1.gamma", "Float32", [16], rep), ("ln1.beta", "Float32", [16], rep),
        ("ln2.gamma", "Float32", [16], rep), ("ln2.beta", "Float32", [16], rep),
        ("adam_m.attention.qkv.weight", "Float32", [16, 48], tp_col), ("adam_m.ln1.gamma", "Float32", [16], rep),
        ("adam_v.attention.qkv.weight", "Float32", [16, 48], tp_col), ("adam_v.ln1.gamma", "Float32", [16], rep),
    ]
    params = [(name, dtype, shape) for name, dtype, shape, _ in table]
    params += [("global_step", "Int32", [1]), ("scale_sense", "Float32", [])]
    layouts = [(name, *layout) for name, _, _, layout in table]
    return params, _strategy(layouts, [(STAGE_NODE, 0, [[1, 1], [1, 1]])])


def _full_to_8() -> dict[str, Any]:
    params, strategy = _llm_8()
    return {"description": "One unsharded checkpoint (src_strategy_file=None) -> 8 ranks tp2 x dp4 with optimizer "
                           "parallel (bf16 weights, fp32 norms/Adam states).",
            "params": params, "src": None, "dst": strategy, "src_ranks": 1, "dst_ranks": 8}


def _8_to_full() -> dict[str, Any]:
    params, strategy = _llm_8()
    return {"description": "8 ranks tp2 x dp4 with optimizer parallel -> one unsharded checkpoint "
                           "(dst_strategy_file=None).",
            "params": params, "src": strategy, "dst": None, "src_ranks": 8, "dst_ranks": 1}


SPECS = {"seed_8to4": _seed_8to4, "dp_to_tp_8to4": _dp_to_tp_8to4, "pipeline_2x4_to_4": _pipeline_2x4_to_4,
         "full_to_8": _full_to_8, "8_to_full": _8_to_full}
assert sorted(SPECS) == list(CASE_NAMES)

SCRIPT = r"""
import json, os, shutil
import numpy as np
import mindspore as ms
from mindspore.train import node_strategy_pb2 as pb

MS_DTYPES = {"Float32": ms.float32, "Float16": ms.float16, "BFloat16": ms.bfloat16, "Int32": ms.int32}

def write_strategy(spec, path):
    doc = pb.ParallelStrategyMap(current_stage=spec["current_stage"])
    for node, stage, strategy in spec["items"]:
        item = doc.parallel_strategy_item.add(node_name=node)
        item.parallel_strategys.stage = stage
        for dims in strategy:
            item.parallel_strategys.parallel_strategy.add().dim.extend(dims)
    for name, dev, tensor_map, size, step in spec["layouts"]:
        layout = doc.parallel_layout_item.add(param_name=name).parallel_layouts
        layout.dev_matrix.add().dim.extend(dev)
        layout.tensor_map.add().dim.extend(tensor_map)
        layout.param_split_shape.add()
        layout.indices_offset.add()
        layout.field, layout.opt_weight_shard_step, layout.opt_weight_shard_size = 0, step, size
    with open(path, "wb") as f:
        f.write(doc.SerializeToString())

def tensor(rng, dtype, shape):
    if dtype == "Int32":
        return ms.Tensor(np.full(shape, 7, np.int32))
    values = rng.integers(-1000, 1000, size=shape).astype(np.float32) / 64
    return ms.Tensor(values).astype(MS_DTYPES[dtype])

def rank_files(folder):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".ckpt"))

def make_case(root, spec, seed):
    rng = np.random.default_rng(seed)
    full = os.path.join(root, "full", "rank_0")
    os.makedirs(full)
    params = [{"name": n, "data": tensor(rng, d, s)} for n, d, s in spec["params"]]
    ms.save_checkpoint(params, os.path.join(full, "checkpoint_0.ckpt"))
    src = dst = None
    if spec.get("stages"):
        os.makedirs(os.path.join(root, "src_pipeline_strategys"))
        for rank, stage in enumerate(spec["stages"]):
            write_strategy(stage, os.path.join(root, "src_pipeline_strategys", f"src_strategy_{rank}.ckpt"))
        src = os.path.join(root, "src_strategy.ckpt")
        ms.parallel.merge_pipeline_strategys(os.path.join(root, "src_pipeline_strategys"), src)
    elif spec["src"]:
        src = os.path.join(root, "src_strategy.ckpt")
        write_strategy(spec["src"], src)
    if spec["dst"]:
        dst = os.path.join(root, "dst_strategy.ckpt")
        write_strategy(spec["dst"], dst)
    source = os.path.join(root, "src_checkpoints")
    if src is None:
        shutil.copytree(os.path.join(root, "full"), source)
    else:
        ms.transform_checkpoints(os.path.join(root, "full"), source, "checkpoint_", None, src)
    ms.transform_checkpoints(source, os.path.join(root, "expected"), "checkpoint_", src, dst)
    if spec.get("stages"):
        for rank in (0, 4):
            stage_file = os.path.join(root, "src_pipeline_strategys", f"src_strategy_{rank}.ckpt")
            ms.transform_checkpoints(source, os.path.join(root, "expected_by_stage"), "checkpoint_", stage_file, dst)
    lists = {str(t): [int(r) for r in ms.rank_list_for_transform(t, src, dst)] for t in range(spec["dst_ranks"])}
    return {"src_bytes": sum(os.path.getsize(f) for f in rank_files(source)), "ms_rank_list_for_transform": lists}

def format_samples(root):
    os.makedirs(root)
    rng = np.random.default_rng(11)
    wb = [{"name": "w", "data": ms.Tensor(rng.standard_normal((64, 32)).astype(np.float32))},
          {"name": "b", "data": ms.Tensor(rng.standard_normal(32).astype(np.float16))}]
    ms.save_checkpoint(wb, os.path.join(root, "crc.ckpt"), crc_check=True)
    ms.save_checkpoint(wb, os.path.join(root, "append_info.ckpt"),
                       append_dict={"epoch_num": 3, "step_num": 12, "note": "a string value"})
    kinds = {"Bool": np.bool_, "Int8": np.int8, "UInt8": np.uint8, "Int16": np.int16, "UInt16": np.uint16,
             "Int32": np.int32, "UInt32": np.uint32, "Int64": np.int64, "UInt64": np.uint64,
             "Float16": np.float16, "Float32": np.float32, "Float64": np.float64}
    every = [{"name": f"p_{n}", "data": ms.Tensor(rng.integers(0, 100, size=(3, 5)).astype(k))}
             for n, k in kinds.items()]
    bf16 = rng.uniform(-3, 3, size=(4, 6)).astype(np.float32)
    every.append({"name": "p_BFloat16", "data": ms.Tensor(bf16).astype(ms.bfloat16)})
    every.append({"name": "scalar_f32", "data": ms.Tensor(np.float32(0.125))})
    ms.save_checkpoint(every, os.path.join(root, "all_dtypes.ckpt"))

job = json.load(open("job.json"))
results = {name: make_case(os.path.join(job["root"], name), spec, seed)
           for seed, (name, spec) in enumerate(sorted(job["cases"].items()))}
format_samples(os.path.join(job["root"], "format_samples"))
json.dump(results, open("results.json", "w"))
"""


def _meta(name: str, spec: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """case.json of one generated case."""
    src = "src_strategy.ckpt" if spec.get("src") or spec.get("stages") else None
    return {
        "name": name,
        "description": spec["description"],
        "prefix": PREFIX,
        "src_strategy_file": src,
        "dst_strategy_file": "dst_strategy.ckpt" if spec["dst"] else None,
        "src_pipeline_strategy_dir": "src_pipeline_strategys" if spec.get("stages") else None,
        "src_ranks": spec["src_ranks"],
        "dst_ranks": spec["dst_ranks"],
        "src_pipeline_stages": 2 if spec.get("stages") else 1,
        "dst_pipeline_stages": 1,
        **result,
        "src_checkpoints_dir": "src_checkpoints",
        "full_checkpoint": "full/rank_0/checkpoint_0.ckpt",
        "expected_dir": "expected",
        "expected_made_by": "mindspore transform_checkpoints(src_checkpoints, ..., src_strategy, dst_strategy)",
    }


def make_mindspore_cases(root: Path) -> dict[str, Case]:
    """Generate every case (and ``root/format_samples``) with MindSpore; return the cases by name."""
    root.mkdir(parents=True, exist_ok=True)
    specs = {name: make() for name, make in SPECS.items()}
    (root / "job.json").write_text(json.dumps({"root": str(root), "cases": specs}))
    run_mindspore(SCRIPT, root)
    results = json.loads((root / "results.json").read_text())
    cases = {}
    for name, spec in specs.items():
        meta = _meta(name, spec, results[name])
        (root / name / "case.json").write_text(json.dumps(meta, indent=1))
        cases[name] = Case(root / name, meta)
    return cases


REDUNDANCY_SCRIPT = r"""
import json, os
import mindspore as ms
from mindspore.train._utils import get_parameter_redundancy, remove_param_redundancy

job = json.load(open("redundancy.json"))
in_strategy, kept = set(), {}
for path, initial_rank in job["strategies"]:  # one file per pipeline stage, with the stage's first rank
    redundancy = get_parameter_redundancy(path, initial_rank)
    in_strategy.update(redundancy)
    for rank, names in remove_param_redundancy(redundancy).items():
        kept.setdefault(int(rank), set()).update(names)
for rank, source in job["sources"].items():
    mine = kept.get(int(rank), set())
    target = os.path.join(job["out"], f"rank_{rank}", os.path.basename(source))
    os.makedirs(os.path.dirname(target))
    ms.save_checkpoint(ms.load_checkpoint(source), target, remove_redundancy=True,
                       choice_func=lambda name: name not in in_strategy or name in mine)
json.dump({rank: sorted(names) for rank, names in kept.items()}, open("kept.json", "w"))
"""


def _stage_strategies(case: Case) -> list[tuple[str, int]]:
    """(source strategy file, first rank) per pipeline stage, as MindSpore's ranks see their own layouts."""
    stage_dir = case.meta.get("src_pipeline_strategy_dir")
    if not stage_dir:
        return [(str(case.strategy("src")), 0)]
    stage_files: dict[int, tuple[str, int]] = {}
    for path in sorted((case.root / stage_dir).glob("*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[1])):
        strategy = load_strategy(path)
        first_rank = strategy.current_stage * strategy.stage_device_count
        stage_files.setdefault(strategy.current_stage, (str(path), first_rank))
    return list(stage_files.values())


def make_redundancy_removed(case: Case, out: Path) -> dict[int, list[str]]:
    """Write ``out/rank_<r>/<file>``: each source rank's checkpoint holding only the parameters MindSpore's
    ``CheckpointConfig(remove_redundancy=True)`` saves on that rank (``remove_param_redundancy`` of
    ``get_parameter_redundancy`` of the source strategy; parameters outside the strategy on every rank).
    Returns the strategy parameters MindSpore assigned to each rank."""
    sources = {rank: str(next((case.src_dir / f"rank_{rank}").glob("*.ckpt")))
               for rank in range(case.meta["src_ranks"])}
    work = out.parent / f"{out.name}_job"
    work.mkdir(parents=True)
    job = {"strategies": _stage_strategies(case), "sources": sources, "out": str(out)}
    (work / "redundancy.json").write_text(json.dumps(job))
    run_mindspore(REDUNDANCY_SCRIPT, work)
    return {int(rank): names for rank, names in json.loads((work / "kept.json").read_text()).items()}
