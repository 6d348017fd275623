"""Test-wide settings (hypothesis profiles: CI caps examples so the suite stays fast) and the session's
test data: MindSpore-made cases (generated once, skipped with the reason when MindSpore is missing) and
cases written by mpickpt itself (always available)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from fixture_cases import Case
from mindspore_cases import make_mindspore_cases, make_redundancy_removed
from written_cases import write_written_cases

settings.register_profile("ci", max_examples=100, deadline=None)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests using MindSpore-made data are MindSpore comparisons: ``-m "not mindspore"`` leaves them out."""
    for item in items:
        if {"mindspore_cases", "redundancy_removed_case"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mindspore)


@pytest.fixture(scope="session")
def mindspore_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    """The MindSpore-made conversion cases by name (their folder's parent also holds ``format_samples``)."""
    return make_mindspore_cases(tmp_path_factory.mktemp("mindspore_cases"))


@pytest.fixture(scope="session")
def mindspore_root(mindspore_cases: dict[str, Case]) -> Path:
    """The folder of the MindSpore-made cases and format samples."""
    return next(iter(mindspore_cases.values())).root.parent


@pytest.fixture(scope="session")
def format_samples(mindspore_root: Path) -> Path:
    """MindSpore-made ``crc.ckpt``, ``append_info.ckpt`` and ``all_dtypes.ckpt``."""
    return mindspore_root / "format_samples"


@pytest.fixture()
def case(request: pytest.FixtureRequest, mindspore_cases: dict[str, Case]) -> Case:
    """The MindSpore-made case named by the test's parameter (``fixture_cases.case_params``)."""
    return mindspore_cases[request.param]


@pytest.fixture(scope="session")
def written_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    """Conversion cases written by mpickpt (no MindSpore needed), by name."""
    return write_written_cases(tmp_path_factory.mktemp("written_cases"))


@pytest.fixture(scope="session")
def redundancy_removed_case(mindspore_cases: dict[str, Case],
                            tmp_path_factory: pytest.TempPathFactory) -> tuple[Case, Path]:
    """``seed_8to4`` (full redundancy) and a folder of its source checkpoints as MindSpore saves them with
    ``CheckpointConfig(remove_redundancy=True)``: ``rank_<r>/checkpoint_<r>.ckpt`` holding rank r's share."""
    case = mindspore_cases["seed_8to4"]
    reduced = tmp_path_factory.mktemp("redundancy_removed") / "src_checkpoints"
    make_redundancy_removed(case, reduced)
    return case, reduced
