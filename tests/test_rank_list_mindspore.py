"""Our rank lists against MindSpore's own `rank_list_for_transform` (run in a subprocess) for random
layout pairs, pipelined ones included: ours never names a file MindSpore does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from mindspore_helpers import requires_mindspore, run_mindspore
from mpickpt.layout import Layouts
from mpickpt.plan import rank_list_for_transform
from mpickpt.strategy import LayoutItem, Strategy, StrategyItem, save_strategy
from mpickpt.testing.strategies import Conversion, conversions

CASES = 24

_SCRIPT = """
import json
import mindspore as ms
result = {}
for case in json.load(open("cases.json")):
    lists = []
    for target in range(case["targets"]):
        try:
            lists.append([int(r) for r in ms.rank_list_for_transform(target, case["src"], case["dst"])])
        except Exception as error:  # MindSpore refuses some layouts we accept
            lists.append(str(error)[:200])
    result[case["src"]] = lists
json.dump(result, open("ms.json", "w"))
"""


def _random_cases(count: int) -> list[Conversion]:
    cases: list[Conversion] = []

    @settings(max_examples=count, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(conversions(mindspore=True, missing=False, device_counts=(1, 2, 4, 8, 16)))
    def collect(case: Conversion) -> None:
        cases.append(case)

    collect()
    return cases[:count]


def _two_layouts() -> Conversion:
    """Two layouts sharing replicas: MindSpore lists three files, two suffice."""
    items = tuple(LayoutItem(name=n, dev_matrix=(2, 2), tensor_map=(m,), param_split_shape=((),), indices_offset=((),))
                  for n, m in (("a", (1, -1)), ("b", (0, -1))))
    src = Strategy(0, (StrategyItem("MatMul-op0", 0, ((1, 1),)),), items)
    dst = Strategy(0, (StrategyItem("MatMul-op0", 0, ((1, 1),)),), tuple(
        LayoutItem(name=n, dev_matrix=(1,), tensor_map=((-1, -1),), param_split_shape=((),), indices_offset=((),))
        for n in ("a", "b")))
    return Conversion(src, dst, {"a": (4, 2), "b": (4, 2)})


@requires_mindspore
@pytest.mark.mindspore
def test_rank_lists_are_subsets_of_mindspores(tmp_path: Path) -> None:
    cases = [*_random_cases(CASES), _two_layouts()]
    listing = []
    for i, case in enumerate(cases):
        src, dst = tmp_path / f"src_{i}.ckpt", tmp_path / f"dst_{i}.ckpt"
        save_strategy(case.src, src)
        save_strategy(case.dst, dst)
        listing.append({"src": str(src), "dst": str(dst), "targets": Layouts.from_strategy(case.dst).device_count})
    (tmp_path / "cases.json").write_text(json.dumps(listing))
    run_mindspore(_SCRIPT, tmp_path)
    theirs_all = json.loads((tmp_path / "ms.json").read_text())
    compared = fewer = 0
    for case, entry in zip(cases, listing):
        for target, theirs in enumerate(theirs_all[entry["src"]]):
            if isinstance(theirs, str) or not theirs:  # MindSpore refuses or cannot convert this target
                continue
            ours = rank_list_for_transform(target, case.src, case.dst)
            assert set(ours) <= set(theirs) and len(ours) <= len(theirs), (
                f"{entry['src']} -> {entry['dst']}, target {target}: ours {ours}, MindSpore {theirs}")
            compared += 1
            fewer += len(ours) < len(theirs)
    assert compared >= 2 * CASES, f"only {compared} target ranks could be compared"
    assert fewer >= 1  # at least the two-layout case reads fewer files
