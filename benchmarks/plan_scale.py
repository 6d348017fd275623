"""How planning time grows with the source rank count.

1000 parameters of a tensor-parallel (8) x data-parallel model with optimizer sharding, converted
from N source ranks to 3N/4 target ranks (data parallel N/8 -> 3N/32, so the counts do not divide
each other) for N = 64, 256, 1024. Prints the setup time (resolving both strategies, once per
process), the time to plan one target rank (mean and max over sampled targets), the time one process
spends with one target (setup + one plan), and growth ratios between rows. Layers of one model
share shapes, which the planner exploits; the "distinct" columns give every parameter its own shape
(the worst case: every parameter planned from scratch).

    python benchmarks/plan_scale.py [--params 1000] [--sources 64 256 1024] [--samples 8]
"""

from __future__ import annotations

import argparse
import time

from mpickpt.plan import Planner, TensorInfo
from mpickpt.strategy import LayoutItem, Strategy, StrategyItem

TENSOR_PARALLEL = 8
# (name, tensor map on the device matrix [dp, tp], shape in units of `hidden`)
KINDS = (
    ("column.weight", (0, -1), (1, 1)),  # dim 0 split by tensor parallel
    ("row.weight", (-1, 0), (1, 1)),  # dim 1 split by tensor parallel
    ("column.bias", (0,), (1,)),
    ("norm.gamma", (-1,), (1,)),  # replicated on every rank
    ("adam_m.column.weight", (0, -1), (1, 1)),
)


def model(devices: int, params: int, hidden: int, distinct: bool = False) -> tuple[Strategy, dict[str, TensorInfo]]:
    """A strategy over [devices // 8, 8] with optimizer sharding over data parallel, and its catalog
    (`distinct`: every parameter's dimension 0 a different multiple of `hidden`)."""
    dev = (devices // TENSOR_PARALLEL, TENSOR_PARALLEL)
    items, catalog = [], {}
    for i in range(params):
        kind, tensor_map, units = KINDS[i % len(KINDS)]
        name = f"layer{i // len(KINDS)}.{kind}"
        items.append(LayoutItem(name=name, dev_matrix=dev, tensor_map=(tensor_map,), param_split_shape=((),),
                                indices_offset=((),), opt_weight_shard_step=TENSOR_PARALLEL, opt_weight_shard_size=-1))
        shape = tuple(u * hidden for u in units)
        if distinct:
            shape = (shape[0] * (1 + i), *shape[1:])
        catalog[name] = TensorInfo("Float16", shape)
    strategy = Strategy(current_stage=0, strategy_items=(StrategyItem("MatMul-op0", 0, ((1, 1),)),),
                        layout_items=tuple(items))
    return strategy, catalog


def measure(sources: int, params: int, samples: int, distinct: bool) -> dict[str, float]:
    targets = sources * 3 // 4
    hidden = 3 * sources  # every dimension splits evenly on both sides
    src, catalog = model(sources, params, hidden, distinct)
    dst, _ = model(targets, params, hidden, distinct)
    start = time.perf_counter()
    planner = Planner(src, dst, catalog)
    setup = time.perf_counter() - start
    times = []
    reads = []
    for k in range(samples):
        target = (k * targets) // samples
        start = time.perf_counter()
        plan = planner.plan(target)
        times.append(time.perf_counter() - start)
        reads.append(len(plan.source_ranks))
    return {"sources": sources, "targets": targets, "setup": setup, "plan_first": times[0],
            "plan_mean": sum(times) / len(times), "plan_max": max(times), "files": max(reads),
            "per_process": setup + times[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1000)
    parser.add_argument("--sources", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    print(f"{args.params} parameters; seconds; growth = ratio of mean plan time to the previous row")
    print(f"{'':11} {'---- shared layer shapes ----':>38} {'---- every shape distinct ----':>38}")
    print(f"{'src':>5} {'dst':>5} " + f"{'setup':>7} {'plan mean':>10} {'plan max':>9} {'1 proc':>7} {'files':>5} " * 2
          + f"{'growth':>7} {'growth(distinct)':>17}")
    previous = None
    for sources in args.sources:
        rows = [measure(sources, args.params, args.samples, distinct) for distinct in (False, True)]
        line = f"{sources:>5} {rows[0]['targets']:>5} "
        for row in rows:
            line += (f"{row['setup']:>7.3f} {row['plan_mean']:>10.3f} {row['plan_max']:>9.3f} "
                     f"{row['per_process']:>7.3f} {row['files']:>5} ")
        if previous is not None:
            line += " ".join(f"{'x' + format(r['plan_mean'] / p['plan_mean'], '.2f'):>{w}}"
                             for r, p, w in zip(rows, previous, (7, 17)))
        print(line)
        previous = rows


if __name__ == "__main__":
    main()
