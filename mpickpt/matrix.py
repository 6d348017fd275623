"""The source-rank x target-rank byte matrix of a job: how many bytes each target reads from each source
rank's file, from the plans alone (no I/O), as a text table or an image (SVG written here, PNG by matplotlib).

With sources on several hosts, each cell also says whether its bytes cross processes or hosts: the process
writing the target (as `driver.deal` deals targets) reads them itself when it sees the source file, else they
come over MPI from the process `placement.choose_holder` picks (`route_transfers`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import MpickptError
from .placement import choose_holder
from .plan import TargetPlan, _itemsize

_RAMP = ((255, 237, 160), (240, 59, 32), (128, 0, 38))  # the colour scale's stops, light to dark
_CORNER = "src\\tgt"  # the table's top-left cell: rows are sources, columns targets
_UNITS = ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"), (1, "B"))
CROSSINGS = ("none", "process", "host")  # how far a cell's bytes travel, nearest first
MARKS = {"none": "", "process": "+", "host": "*"}  # the table's suffix per crossing


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
class Route:
    """Who moves one cell's bytes: the process reading them from the source file, the process writing the
    target, and how far they travel ("none": the writer reads them; "process": another process on its host;
    "host": a process on another host)."""

    reader: int
    writer: int
    crosses: str


def route_transfers(transfers: Mapping[tuple[int, int], int], shares: Sequence[Sequence[int]],
                    seen_by: Mapping[int, Sequence[int]], hosts: Sequence[str]) -> dict[tuple[int, int], Route]:
    """The route of every cell, as `transform` runs: `shares[p]` are the targets process p writes, in the order
    it writes them; a source rank whose file it does not see is read by `choose_holder`'s pick, balanced by the
    bytes the writer asked of each process so far (source ranks taken in ascending order per target)."""
    by_target: dict[int, list[tuple[int, int]]] = {}
    for (source, target), size in sorted(transfers.items()):
        by_target.setdefault(target, []).append((source, size))
    routes = {}
    for writer, targets in enumerate(shares):
        load: dict[int, int] = {}
        for target in targets:
            for source, size in by_target.get(target, []):
                reader = choose_holder(source, target, writer, seen_by, hosts, load)
                if reader != writer:
                    load[reader] = load.get(reader, 0) + size
                crosses = "none" if reader == writer else "process" if hosts[reader] == hosts[writer] else "host"
                routes[(source, target)] = Route(reader, writer, crosses)
    return routes


def crossing_totals(transfers: Mapping[tuple[int, int], int],
                    routes: Mapping[tuple[int, int], Route]) -> dict[str, int]:
    """Bytes per crossing ("none", "process", "host") over the cells of `transfers`."""
    totals = dict.fromkeys(CROSSINGS, 0)
    for key, size in transfers.items():
        totals[routes[key].crosses] += size
    return totals


def legend(totals: Mapping[str, int], grouped: bool = False) -> str:
    """The line under the table: what the marks mean and the bytes of each kind (`grouped`: cells sum
    several ranks, each marked by its farthest crossing)."""
    whole = sum(totals.values())
    if whole == totals["none"]:
        return (f"nothing crosses processes or hosts: each target's process reads all {whole:,} bytes from files "
                "it sees")
    return (f"{MARKS['host']} crosses hosts, {MARKS['process']} crosses processes on one host"
            f"{' (a grouped cell: its farthest)' if grouped else ''}; bytes local {totals['none']:,}, "
            f"across processes {totals['process']:,}, across hosts {totals['host']:,}")


@dataclass(frozen=True)
class Grid:
    """A byte matrix ready to show: one row per source rank (or group of consecutive ranks), one column per
    target rank (or group), `cells[row][column]` in bytes; `note` says how ranks were grouped, if they were;
    `crosses[row][column]` how far the cell's farthest bytes travel (empty: not known) and `legend` the totals."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    cells: tuple[tuple[int, ...], ...]
    note: str = ""
    crosses: tuple[tuple[str, ...], ...] = ()
    legend: str = ""

    def crossing(self, row: int, column: int) -> str:
        """How far the bytes of one cell travel ("none" when routes are not known)."""
        return self.crosses[row][column] if self.crosses else "none"

    @property
    def peak(self) -> int:
        """The largest cell."""
        return max((max(row) for row in self.cells if row), default=0)


def make_grid(transfers: dict[tuple[int, int], int], sources: Sequence[int], targets: Sequence[int],
              max_sources: int = 64, max_targets: int = 16,
              routes: Mapping[tuple[int, int], Route] | None = None) -> Grid:
    """`transfers` laid out over `sources` x `targets` (sorted rank lists); beyond `max_sources` rows or
    `max_targets` columns, consecutive ranks are grouped into equal blocks whose cells are summed. With
    `routes`, each cell is marked by its farthest crossing and the legend gives the totals."""
    source_groups = _groups(sources, max_sources)
    target_groups = _groups(targets, max_targets)
    cells = tuple(tuple(sum(transfers.get((s, t), 0) for s in rows for t in columns) for columns in target_groups)
                  for rows in source_groups)
    crosses: tuple[tuple[str, ...], ...] = ()
    if routes is not None:
        crosses = tuple(tuple(max((routes[(s, t)].crosses for s in rows for t in columns if (s, t) in transfers),
                                  key=CROSSINGS.index, default="none") for columns in target_groups)
                        for rows in source_groups)
    notes = [f"{what} ranks grouped {len(groups[0])} to a {where}" for what, where, groups in
             (("source", "row", source_groups), ("target", "column", target_groups))
             if groups and len(groups[0]) > 1]
    shown = {key: size for key, size in transfers.items() if key[0] in sources and key[1] in targets}
    return Grid(tuple(map(_label, source_groups)), tuple(map(_label, target_groups)), cells,
                "; ".join(notes) + (" (cells summed)" if notes else ""), crosses,
                legend(crossing_totals(shown, routes), bool(notes)) if routes is not None else "")


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
    """A compact text table: rows source ranks, columns target ranks, in one unit; '.' where nothing is read;
    a cell whose bytes cross hosts ends in '*', one crossing processes on one host in '+'."""
    scale, unit = _unit(grid.peak)
    marked = any(c != "none" for row in grid.crosses for c in row)
    shown = [[("." if v == 0 else f"{v / scale:.1f}" if scale > 1 else str(v))
              + (MARKS[grid.crossing(r, c)].ljust(1) if marked else "") for c, v in enumerate(row)]
             for r, row in enumerate(grid.cells)]
    labels = [t + " " if marked else t for t in grid.targets]  # over the digits, not the marks
    width = max([len(t) for t in labels] + [len(v) for row in shown for v in row] + [1])
    head = max([len(s) for s in grid.sources] + [len(_CORNER)])
    lines = [f"bytes read by each target rank (columns) from each source rank's file (rows), in {unit}",
             f"{_CORNER:>{head}} " + " ".join(f"{t:>{width}}" for t in labels)]
    lines += [f"{s:>{head}} " + " ".join(f"{v:>{width}}" for v in row) for s, row in zip(grid.sources, shown)]
    lines = [line.rstrip() for line in lines]
    lines += [text for text in (grid.note, grid.legend) if text]
    return "\n".join(lines)


_OUTLINES = {"process": 'fill="none" stroke="#1f4e9e" stroke-width="2" stroke-dasharray="3 2"',
             "host": 'fill="url(#crosses-host)" stroke="#1f4e9e" stroke-width="2"'}  # SVG look of crossing cells
_HATCH = ('<defs><pattern id="crosses-host" width="6" height="6" patternUnits="userSpaceOnUse" '
          'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" stroke="#1f4e9e" stroke-width="2"/>'
          '</pattern></defs>')


def grid_svg(grid: Grid, title: str = "") -> str:
    """The grid as an SVG heat map: one <rect class="cell"> per nonzero cell (its bytes in data-bytes, its
    crossing in data-crosses, a tooltip), source ranks down the left, target ranks along the top, a colour
    scale on the right; cells crossing hosts hatched and outlined, those crossing processes outlined dashed
    (a <rect class="crossing"> over the cell), and the legend below."""
    cell = max(8, min(40, 640 // max(len(grid.targets), len(grid.sources), 1)))
    left, top = 70, 70
    width, height = cell * len(grid.targets), cell * len(grid.sources)
    bar_x, bar_h = left + width + 20, max(height, 100)
    scale, unit = _unit(grid.peak)
    below = [text for text in (grid.note, grid.legend) if text]
    wide = max(left + width + 130, 420, left + 6 * max(map(len, below), default=0))  # legend: ~6 px a character
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{wide}" height="{top + bar_h + 20 + 20 * len(below)}" '
           'font-family="sans-serif" font-size="11">')
    heading = escape(title or "bytes read per source and target rank")
    parts = [svg, _HATCH,
             f'<text x="{left}" y="16" font-size="13">{heading}</text>',
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
            if not value:
                continue
            x, y, crosses = left + c * cell, top + r * cell, grid.crossing(r, c)
            travel = "" if crosses == "none" else f" (crosses {'hosts' if crosses == 'host' else 'processes'})"
            parts.append(f'<rect class="cell" x="{x}" y="{y}" width="{cell}" height="{cell}" '
                         f'fill="{_colour(value / grid.peak)}" data-bytes="{value}" data-crosses="{crosses}">'
                         f"<title>source {escape(grid.sources[r])} -&gt; target {escape(grid.targets[c])}: "
                         f"{value:,} bytes{travel}</title></rect>")
            if crosses != "none":
                parts.append(f'<rect class="crossing" x="{x + 1}" y="{y + 1}" width="{cell - 2}" '
                             f'height="{cell - 2}" {_OUTLINES[crosses]}/>')
    parts += [f'<rect x="{bar_x}" y="{top + bar_h * (1 - (i + 1) / 20)}" width="14" height="{bar_h / 20 + 0.5}" '
              f'fill="{_colour((i + 0.5) / 20)}"/>' for i in range(20)]
    parts += [f'<text x="{bar_x + 18}" y="{top + 4}">{grid.peak / scale:.3g} {unit}</text>',
              f'<text x="{bar_x + 18}" y="{top + bar_h + 4}">0</text>']
    parts += [f'<text x="{left}" y="{top + bar_h + 24 + 20 * i}">{escape(text)}</text>' for i, text in enumerate(below)]
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
    from matplotlib import patches, pyplot

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
    for r, row in enumerate(grid.cells):
        for c, value in enumerate(row):
            crosses = grid.crossing(r, c)
            if value and crosses != "none":
                axes.add_patch(patches.Rectangle((c - 0.45, r - 0.45), 0.9, 0.9, fill=False, edgecolor="#1f4e9e",
                                                 linewidth=2, linestyle="-" if crosses == "host" else "--",
                                                 hatch="///" if crosses == "host" else None))
    below = "\n".join(text for text in (grid.note, grid.legend) if text)
    if below:
        figure.text(0.01, 0.01, below, fontsize=8)
    figure.tight_layout(rect=(0, 0.04 * below.count("\n") + 0.05 if below else 0, 1, 1))
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def escape(text: str) -> str:
    """`text` as SVG character data (& < > escaped; xml.sax.saxutils would pull in urllib and ssl)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
