"""The source catalog: every file's headers checked against the source strategy; who holds what."""

from __future__ import annotations

import pytest

from mpickpt.catalog import Fingerprint, build_catalog, check_copies_agree, copied_through
from mpickpt.errors import LayoutError, PlanError, SourceDisagreementError
from mpickpt.plan import TensorInfo
from test_plan import F32, item, strategy

PATHS = {r: f"/ckpt/rank_{r}/a.ckpt" for r in range(8)}.get


def test_full_shapes_in_mindspore_order_and_stages_of_unlaid_parameters() -> None:
    src = strategy(item("0-w", (2,), (0, -1)), item("1-v", (2,), (-1, 0)), stages=2)
    headers = {0: [("w", F32, (2, 3)), ("global_step", "Int32", (1,))],
               1: [("w", F32, (2, 3)), ("global_step", "Int32", (1,))],
               2: [("v", F32, (5, 2)), ("global_step", "Int32", (1,)), ("tail", F32, ())],
               3: [("v", F32, (5, 2)), ("global_step", "Int32", (1,)), ("tail", F32, ())]}
    catalog = build_catalog(src, headers)
    assert list(catalog.params) == ["v", "global_step", "tail", "w"]
    assert catalog.params["w"] == TensorInfo(F32, (4, 3)) and catalog.params["v"] == TensorInfo(F32, (5, 4))
    assert catalog.params["global_step"].stages == (0, 1) and catalog.params["tail"].stages == (1,)
    assert catalog.holders == {"tail": frozenset({2, 3})}
    assert build_catalog(None, {0: [("w", F32, (4, 3))]}).params == {"w": TensorInfo(F32, (4, 3))}


def test_a_slice_stored_larger_than_its_strategy_implies_names_file_and_both_shapes() -> None:
    src = strategy(item("w", (4,), (0, -1)))
    headers = {r: [("w", F32, (2, 3))] for r in range(4)}
    headers[2] = [("w", F32, (4, 3))]
    with pytest.raises(LayoutError, match=r"/ckpt/rank_2/a.ckpt: parameter 'w' is stored as \[4, 3\], but the "
                                          r"source strategy gives source rank 2 a slice of \[2, 3\] \(full shape "
                                          r"\[8, 3\], as 3 other file\(s\) imply\)"):
        build_catalog(src, headers, PATHS)


def test_files_that_disagree_evenly_are_named() -> None:
    src = strategy(item("w", (2,), (0, -1)))
    with pytest.raises(LayoutError, match=r"disagree on its shape: /ckpt/rank_1/a.ckpt implies full shape "
                                          r"\[4, 3\]; /ckpt/rank_0/a.ckpt implies full shape \[6, 3\]"):
        build_catalog(src, {0: [("w", F32, (3, 3))], 1: [("w", F32, (2, 3))]}, PATHS)


def test_dtypes_dims_and_stages_must_agree() -> None:
    src = strategy(item("w", (2,), (0, -1)))
    with pytest.raises(PlanError, match=r"'global_step': /ckpt/rank_0/a.ckpt holds it as Int32, but "
                                        r"/ckpt/rank_1/a.ckpt as Int64"):
        build_catalog(src, {0: [("w", F32, (3, 3)), ("global_step", "Int32", (1,))],
                            1: [("w", F32, (3, 3)), ("global_step", "Int64", (1,))]}, PATHS)
    with pytest.raises(PlanError, match=r"'global_step': /ckpt/rank_0/a.ckpt holds \[2\], but "
                                        r"/ckpt/rank_1/a.ckpt holds \[1\]"):
        build_catalog(src, {0: [("w", F32, (3, 3)), ("global_step", "Int32", (2,))],
                            1: [("w", F32, (3, 3)), ("global_step", "Int32", (1,))]}, PATHS)
    with pytest.raises(LayoutError, match=r"/ckpt/rank_0/a.ckpt: .*'w': a stored slice has 1 dimensions"):
        build_catalog(src, {0: [("w", F32, (3,))], 1: [("w", F32, (3, 3))]}, PATHS)
    piped = strategy(item("0-w", (2,), (0,)), item("1-v", (2,), (0,)), stages=2)
    with pytest.raises(PlanError, match=r"rank_2/a.ckpt: parameter 'w' is stored here \(pipeline stage 1\)"):
        build_catalog(piped, {0: [("w", F32, (3,))], 2: [("w", F32, (3,))]}, PATHS)


def test_a_strategy_parameter_no_file_holds_names_the_ranks_that_should() -> None:
    src = strategy(item("w", (4,), (0,)), item("b", (4,), (-1,)))
    with pytest.raises(PlanError, match=r"parameter 'b' is in the source strategy but in no source file; "
                                        r"source ranks \[0, 1, 2, 3\] should hold it"):
        build_catalog(src, {r: [("w", F32, (2,))] for r in range(4)}, PATHS)


def test_redundancy_removed_files_record_their_holders() -> None:
    # dev [2, 2], w split on axis 0 (the last entry): ranks 0, 2 hold one half and 1, 3 the other
    src = strategy(item("w", (2, 2), (0,)), item("b", (2, 2), (-1,)))
    headers = {0: [("w", F32, (2,)), ("b", F32, (4,))], 1: [("w", F32, (2,))], 2: [("global_step", "Int32", ())],
               3: [("global_step", "Int32", ())]}
    catalog = build_catalog(src, headers, PATHS)
    assert catalog.holders == {"w": frozenset({0, 1}), "b": frozenset({0}), "global_step": frozenset({2, 3})}
    assert catalog.params["w"] == TensorInfo(F32, (4,))


def test_a_slice_no_replica_holds_is_an_error() -> None:
    src = strategy(item("w", (2, 2), (0,)))
    headers = {0: [("w", F32, (2,))], 1: [("global_step", "Int32", ())], 2: [("w", F32, (2,))],
               3: [("global_step", "Int32", ())]}
    with pytest.raises(PlanError, match=r"'w': no source file holds the slice of source ranks \[1, 3\]"):
        build_catalog(src, headers, PATHS)


def test_copies_of_a_copied_through_value_must_agree() -> None:
    src = strategy(item("w", (2,), (0, -1)))
    outside = copied_through(src)
    assert outside("global_step") and not outside("w") and not copied_through(None)("global_step")
    same = {r: {"global_step": Fingerprint(7, shown="[7]")} for r in range(4)}
    check_copies_agree(same, PATHS)
    check_copies_agree({0: {}, 1: {"big": Fingerprint(1, sampled=True)}, 2: {}}, PATHS)  # held by one file
    with pytest.raises(SourceDisagreementError, match=r"parameter 'global_step' is outside the source strategy, so "
                       r"every rank file should hold the same value, but /ckpt/rank_2/a.ckpt holds \[8\], "
                       r"/ckpt/rank_0/a.ckpt holds \[7\]"):
        check_copies_agree({**same, 2: {"global_step": Fingerprint(8, shown="[8]")}}, PATHS)
    with pytest.raises(SourceDisagreementError, match=r"rank_1/a.ckpt holds bytes of CRC-32 00000002 \(its first and "
                       r"last 32 KiB\), /ckpt/rank_0/a.ckpt holds bytes of CRC-32 00000001 \(its first"):
        check_copies_agree({r: {"big": Fingerprint(r + 1, sampled=True)} for r in range(2)}, PATHS)
