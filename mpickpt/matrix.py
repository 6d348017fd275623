"""The source-rank x target-rank byte matrix of a job: how many bytes each target reads from each source
rank's file, from the plans alone (no I/O), as a text table or an image (SVG written here, PNG by matplotlib).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

from .errors import MpickptError
from .plan import TargetPlan, _itemsize

_RAMP = ((255, 237, 160), (240, 59, 32), (128, 0, 38))  # the colour scale's stops, light to dark
_CORNER = "src\\tgt"  # the table's top-left cell: rows are sources, columns targets
_UNITS = ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"), (1, "B"))


def transfer_bytes(plans: Iterable[TargetPlan]) -> dict[tuple[int, int], int]:
    """(source rank, target rank) -> bytes the target reads from that source's file, nonzero entries only.

    A laid-out parameter reads each copy's source box; one outside the strategies is copied through whole
    from its one source (as `TargetPlan.bytes_read` counts), so each target's entries sum to its bytes read."""
    totals: dict[tuple[int, int], int] = {}
    for plan in plans:
        for param in plan.params:
            itemsize = _itemsize(param.dtype)
            reads = ([(c.src_rank, c.src_box.size * itemsize) for c in param.copies] if param.in_strategy
                     else [(param.copies[0].src_rank, param.nbytes)])
            for source, size in reads:
                key = (source, plan.target_rank)
                totals[key] = totals.get(key, 0) + size
    return {key: size for key, size in sorted(totals.items()) if size}


@dataclass(frozen=True)
class Grid:
    """A byte matrix ready to show: one row per source rank (or group of consecutive ranks), one column per
    target rank (or group), `cells[row][column]` in bytes; `note` says how ranks were grouped, if they were."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    cells: tuple[tuple[int, ...], ...]
    note: str = ""

    @property
    def peak(self) -> int:
        """The largest cell."""
        return max((max(row) for row in self.cells if row), default=0)


def make_grid(transfers: dict[tuple[int, int], int], sources: Sequence[int], targets: Sequence[int],
              max_sources: int = 64, max_targets: int = 16) -> Grid:
    """`transfers` laid out over `sources` x `targets` (sorted rank lists); beyond `max_sources` rows or
    `max_targets` columns, consecutive ranks are grouped into equal blocks whose cells are summed."""
    source_groups = _groups(sources, max_sources)
    target_groups = _groups(targets, max_targets)
    cells = tuple(tuple(sum(transfers.get((s, t), 0) for s in rows for t in columns) for columns in target_groups)
                  for rows in source_groups)
    notes = [f"{what} ranks grouped {len(groups[0])} to a {where}" for what, where, groups in
             (("source", "row", source_groups), ("target", "column", target_groups))
             if groups and len(groups[0]) > 1]
    return Grid(tuple(map(_label, source_groups)), tuple(map(_label, target_groups)), cells,
                "; ".join(notes) + (" (cells summed)" if notes else ""))


def _groups(ranks: Sequence[int], limit: int) -> list[list[int]]:
    """`ranks` in consecutive blocks, as few as needed to make at most `limit` blocks."""
    size = max(1, math.ceil(len(ranks) / limit))
    return [list(ranks[i:i + size]) for i in range(0, len(ranks), size)]


def _label(group: list[int]) -> str:
    return str(group[0]) if len(group) == 1 else f"{group[0]}-{group[-1]}"


def _unit(peak: int) -> tuple[int, str]:
    """The largest unit that shows `peak` as at least 1."""
    return next(((scale, name) for scale, name in _UNITS if peak >= scale), (1, "B"))


def format_grid(grid: Grid) -> str:
    """A compact text table: rows source ranks, columns target ranks, in one unit; '.' where nothing is read."""
    scale, unit = _unit(grid.peak)
    shown = [["." if v == 0 else f"{v / scale:.1f}" if scale > 1 else str(v) for v in row] for row in grid.cells]
    width = max([len(t) for t in grid.targets] + [len(v) for row in shown for v in row] + [1])
    head = max([len(s) for s in grid.sources] + [len(_CORNER)])
    lines = [f"bytes read by each target rank (columns) from each source rank's file (rows), in {unit}",
             f"{_CORNER:>{head}} " + " ".join(f"{t:>{width}}" for t in grid.targets)]
    lines += [f"{s:>{head}} " + " ".join(f"{v:>{width}}" for v in row) for s, row in zip(grid.sources, shown)]
    if grid.note:
        lines.append(grid.note)
    return "\n".join(lines)


def grid_svg(grid: Grid, title: str = "") -> str:
    """The grid as an SVG heat map: one <rect class="cell"> per nonzero cell (its bytes in data-bytes and a
    tooltip), source ranks down the left, target ranks along the top, and a colour scale on the right."""
    cell = max(8, min(40, 640 // max(len(grid.targets), len(grid.sources), 1)))
    left, top = 70, 70
    width, height = cell * len(grid.targets), cell * len(grid.sources)
    bar_x, bar_h = left + width + 20, max(height, 100)
    scale, unit = _unit(grid.peak)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{max(left + width + 130, 420)}" '
           f'height="{top + bar_h + 40}" font-family="sans-serif" font-size="11">')
    heading = escape(title or "bytes read per source and target rank")
    parts = [svg, f'<text x="{left}" y="16" font-size="13">{heading}</text>',
             f'<text x="{left + width / 2}" y="36" text-anchor="middle">target rank</text>',
             f'<text transform="translate(18 {top + height / 2}) rotate(-90)" text-anchor="middle">source rank</text>',
             f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="#f4f4f4" stroke="#999"/>']
    step = max(1, math.ceil(12 / cell))  # label every step-th rank so labels do not overlap
    parts += [f'<text x="{left + (i + 0.5) * cell}" y="{top - 6}" text-anchor="middle">{escape(t)}</text>'
              for i, t in enumerate(grid.targets) if i % step == 0]
    parts += [f'<text x="{left - 6}" y="{top + (i + 0.5) * cell + 4}" text-anchor="end">{escape(s)}</text>'
              for i, s in enumerate(grid.sources) if i % step == 0]
    for r, row in enumerate(grid.cells):
        for c, value in enumerate(row):
            if value:
                parts.append(f'<rect class="cell" x="{left + c * cell}" y="{top + r * cell}" width="{cell}" '
                             f'height="{cell}" fill="{_colour(value / grid.peak)}" data-bytes="{value}">'
                             f"<title>source {escape(grid.sources[r])} -&gt; target {escape(grid.targets[c])}: "
                             f"{value:,} bytes</title></rect>")
    parts += [f'<rect x="{bar_x}" y="{top + bar_h * (1 - (i + 1) / 20)}" width="14" height="{bar_h / 20 + 0.5}" '
              f'fill="{_colour((i + 0.5) / 20)}"/>' for i in range(20)]
    parts += [f'<text x="{bar_x + 18}" y="{top + 4}">{grid.peak / scale:.3g} {unit}</text>',
              f'<text x="{bar_x + 18}" y="{top + bar_h + 4}">0</text>']
    if grid.note:
        parts.append(f'<text x="{left}" y="{top + height + 24}">{escape(grid.note)}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def _colour(fraction: float) -> str:
    """Light yellow (little) through orange-red to dark red (the most) for `fraction` in [0, 1]."""
    position = min(1.0, max(0.0, fraction)) * (len(_RAMP) - 1)
    stop = min(int(position), len(_RAMP) - 2)
    return "#" + "".join(f"{round(a + (b - a) * (position - stop)):02x}"
                         for a, b in zip(_RAMP[stop], _RAMP[stop + 1]))


def write_image(grid: Grid, path: str, title: str = "") -> None:
    """Write the heat map to `path`: .svg without any dependency, .png with matplotlib."""
    if path.lower().endswith(".svg"):
        with open(path, "w", encoding="utf-8") as out:
            out.write(grid_svg(grid, title))
    elif path.lower().endswith(".png"):
        _write_png(grid, path, title)
    else:
        raise MpickptError(f"--out {path}: write .svg (or .png with matplotlib installed)")


def _write_png(grid: Grid, path: str, title: str) -> None:
    try:
        import matplotlib  # type: ignore[import-not-found]  # optional (the bench extra)
    except ImportError:
        raise MpickptError(f"--out {path}: PNG needs matplotlib, which is not installed; write .svg instead") \
            from None
    matplotlib.use("Agg")
    import numpy
    from matplotlib import pyplot

    scale, unit = _unit(grid.peak)
    figure, axes = pyplot.subplots(figsize=(min(12, 3 + 0.4 * len(grid.targets)),
                                            min(12, 2.5 + 0.3 * len(grid.sources))))
    values = numpy.ma.masked_equal(numpy.array(grid.cells, dtype=float) / scale, 0)  # nothing read: background
    axes.set_facecolor("#f4f4f4")
    image = axes.imshow(values, cmap="YlOrRd", aspect="auto", vmin=0)
    axes.set_xticks(range(len(grid.targets)), grid.targets)
    axes.set_yticks(range(len(grid.sources)), grid.sources)
    axes.set_xlabel("target rank")
    axes.set_ylabel("source rank")
    axes.set_title(title or "bytes read per source and target rank")
    figure.colorbar(image, ax=axes, label=unit)
    if grid.note:
        figure.text(0.01, 0.01, grid.note, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
