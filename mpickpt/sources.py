"""Where source checkpoints are: `src_dir/rank_<r>/` holding `.ckpt` or `.safetensors` files, picked as
MindSpore 2.10 picks them."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from .errors import MpickptError, SourceDisagreementError, SourceMissingError
from .formats import suffix_of

RANK_FORMATS = ("ckpt", "safetensors")  # what MindSpore saves per rank (and so what rank folders are searched for)
_RANK_DIR = re.compile(r"rank_(\d+)")
_NUMBER = re.compile(r"\d+")
_SINGLE = "model.safetensors"  # a folder's one full checkpoint, without an index


def find_rank_files(src_dir: str | os.PathLike[str], src_format: str | None = None) -> dict[int, str]:
    """Map source rank -> its checkpoint file (absolute path), from `src_dir/rank_<r>/`; without rank
    folders, a unified checkpoint (MindSpore's or Hugging Face's folder, or one `.h5`/`.safetensors` file,
    also given directly as `src_dir`) is the one source rank 0.

    With several files in one rank folder, MindSpore takes the lexicographically last `.ckpt`, and the
    `.safetensors` whose last two numbers are largest (compared as numbers: `x-10_1875` over `x-9_1875`);
    hidden files, which its glob skips, are not taken. Rank folders holding both formats (in one folder
    or across folders, which MindSpore refuses) are an error unless `src_format` picks one; so are two
    folders of one rank (`rank_1` and `rank_01`), which a listing would order by chance.
    """
    root = Path(src_dir).absolute()
    if root.is_file() and root.suffix in (".h5", ".safetensors"):
        return {0: str(root)}  # one unified file
    if not root.is_dir():
        raise SourceMissingError(f"source checkpoint folder {root} is not a directory (nor a unified .h5 or "
                                 f".safetensors file)")
    if src_format is not None and src_format not in RANK_FORMATS:
        raise MpickptError(f"--src-format {src_format!r}: rank folders hold {' or '.join(RANK_FORMATS)} files")
    files: dict[int, str] = {}
    for folder in sorted(root.iterdir()):
        match = _RANK_DIR.fullmatch(folder.name)
        if match and folder.is_dir():
            chosen = _pick(folder, src_format)
            if chosen is not None:
                rank = int(match.group(1))
                if rank in files:
                    raise SourceDisagreementError(
                        f"rank folders {Path(files[rank]).parent} and {folder} both hold checkpoint files of source "
                        f"rank {rank}: move the one not of this checkpoint away")
                files[rank] = str(chosen)
    if src_format is None:
        refuse_mixed_formats(files.values())
    if not files:
        unified = _unified_source(root)
        if unified is not None:
            return {0: unified}
        looked = " or ".join(f"rank_<r>/*{suffix_of(f)}" for f in ([src_format] if src_format else RANK_FORMATS))
        raise SourceMissingError(f"{root} holds no {looked} checkpoint files")
    _refuse_unified_beside_ranks(root)
    return dict(sorted(files.items()))


def _refuse_unified_beside_ranks(root: Path) -> None:
    """A folder of rank folders that is also a unified checkpoint is two checkpoints: refuse to pick one."""
    from .unified import HF_INDEX, MS_INDEX

    names = [MS_INDEX, HF_INDEX, _SINGLE]
    unified = [p.name for p in map(root.joinpath, names) if p.is_file()] + sorted(
        p.name for p in root.glob("*.h5") if p.is_file())
    if unified:
        raise MpickptError(f"{root} holds both rank_<r> folders and a unified checkpoint ({unified[0]}): move one "
                           f"of them to a folder of its own")


def _unified_source(root: Path) -> str | None:
    """A folder without rank folders holding one full checkpoint: a unified folder (index file: the folder
    is the source), a single `model.safetensors` or a single `*.h5` file (that file)."""
    from .unified import is_unified_folder

    if is_unified_folder(root):
        return str(root)
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in (".safetensors", ".h5"))
    if not any(p.name == _SINGLE or p.suffix == ".h5" for p in files):
        return None
    if len(files) > 1:  # MindSpore too refuses several files without an index
        raise MpickptError(f"{root} holds {len(files)} checkpoint files ({', '.join(p.name for p in files)}) and no "
                           f"index file: give the one to convert as --src-dir, or move the others away")
    return str(files[0])


def refuse_mixed_formats(paths: Iterable[str]) -> None:
    """Rank folders must all hold one format: MindSpore refuses a source folder holding both (also when
    node-local folders each hold one)."""
    by_format: dict[str, str] = {}
    for path in paths:  # the first rank folder of each format is named
        by_format.setdefault(Path(path).suffix, path)
    if len(by_format) > 1:
        named = " and ".join(f"{Path(path).parent} ({suffix[1:]})" for suffix, path in sorted(by_format.items()))
        raise MpickptError(f"rank folders hold checkpoints of both formats, {named}; choose one with "
                           f"--src-format ({'|'.join(RANK_FORMATS)})")


def _pick(folder: Path, src_format: str | None) -> Path | None:
    """The checkpoint file MindSpore would take from one rank folder (hidden files are not listed)."""
    found = {fmt: [p for p in folder.glob(f"*{suffix_of(fmt)}") if p.is_file() and not p.name.startswith(".")]
             for fmt in RANK_FORMATS}
    present = [fmt for fmt in RANK_FORMATS if found[fmt]]
    if src_format is None and len(present) > 1:
        raise MpickptError(f"{folder} holds both {' and '.join(present)} checkpoints; choose one with "
                           f"--src-format ({'|'.join(RANK_FORMATS)})")
    fmt = src_format or (present[0] if present else None)
    if fmt is None or not found[fmt]:
        return None
    if fmt == "safetensors":
        return max(found[fmt], key=_last_two_numbers)
    return max(found[fmt], key=lambda p: p.name)


def _last_two_numbers(path: Path) -> tuple[int, int, str]:
    numbers = [int(n) for n in _NUMBER.findall(path.stem)][-2:]
    numbers = [0] * (2 - len(numbers)) + numbers
    return numbers[0], numbers[1], path.name


def stray_checkpoints(folder: str | os.PathLike[str]) -> tuple[str, ...]:
    """The names of the checkpoint files (`.safetensors`, `.h5`, `.ckpt`; not hidden) at the top of a folder."""
    root = Path(folder)
    if not root.is_dir():
        return ()
    return tuple(sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                        and p.suffix in (".safetensors", ".h5", ".ckpt")))


def stamped_files(source: str) -> list[str]:
    """The files whose size and time stand for a source: the file itself, or every file of a unified folder
    (so a shard edited in place makes a rerun redo what it made)."""
    path = Path(source)
    if not path.is_dir():
        return [str(path.absolute())]
    return sorted(str(p.absolute()) for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
