"""The latency plot of BENCHMARKS.md: B5 and B6 over time, from the runs' own samples.

Run with ``make bench`` (after the scripts) or ``.venv/bin/python -m bench.plot``.

``bench/consumers.py`` (B5, commit → handler latency) and
``bench/long_transaction.py`` (B6, latency while a write transaction stays
open) keep every event's sample in ``bench/samples/`` (git-ignored),
``b5.json`` and ``b6.json``, with the run's date, commit, machine and
parameters. This module defines that format (:func:`write_samples`, which
those scripts call) and draws one PNG of two panels from it,
``docs/latency.png``:

* **B5**: p50, p90 and p99 of commit → handler latency per 1-second window
  (events grouped by when they committed) over each rate's measured seconds on
  PostgreSQL, its rounds end to end, with the targets (p50 ≤ 10 ms, p99 ≤ 50 ms)
  as horizontal lines;
* **B6**: herald's and the xid horizon's p50 and p99 per 1-second window, from
  a few seconds before the long transaction begins until a few after it ends
  (the time it is open shaded), on a log scale: the horizon reaches the 30 s
  the transaction is held, herald stays in milliseconds.

It then rewrites its section of ``BENCHMARKS.md`` (between the ``bench.plot``
markers), which embeds the image. matplotlib is the ``bench`` extra
(``pip install -e '.[dev,bench]'``); only the drawing imports it, so the
scripts that write samples run without it.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from bench.append_throughput import REPO, Machine, git_revision, percentile
from bench.common import markers, write_section

if TYPE_CHECKING:
    # matplotlib is the bench extra: where it is not installed (`make test` installs the
    # dev extra only) mypy reads its types as Any rather than failing.
    from matplotlib.axes import Axes  # type: ignore[import-not-found,unused-ignore]

__all__ = ["SAMPLES", "machine_facts", "write_samples"]

#: where the scripts keep their samples (git-ignored)
SAMPLES: Final = REPO / "bench" / "samples"
#: the samples files' format; a reader refuses another
FORMAT: Final = 1
#: the width of a window, seconds
WINDOW: Final = 1.0
#: a window with fewer events than this is left out of the lines (too few for a p99)
LEAST: Final = 5
#: B5's targets, seconds
B5_P50: Final = 0.010
B5_P99: Final = 0.050
#: B6's target for herald's p99, seconds
B6_P99: Final = 0.100

BEGIN_MARK, END_MARK = markers("bench.plot")

# -- the samples files (written by the benchmark scripts) -------------------------------


def head_commit() -> str:
    """The repository's commit, short (``?`` outside a git checkout)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def machine_facts(machine: Machine) -> dict[str, Any]:
    """What the plot's title says about the machine."""
    return {
        "cores": machine.cores,
        "cpu_model": machine.cpu_model,
        "postgresql": machine.server_version,
    }


def write_samples(directory: Path, name: str, record: dict[str, Any]) -> Path:
    """Write ``record`` (``benchmark``, ``machine``, ``parameters`` and the samples) as
    ``directory/name``, with the date, the commit and whether herald had changes."""
    directory.mkdir(parents=True, exist_ok=True)
    full = {
        "format": FORMAT,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": head_commit(),
        "revision": git_revision(),
        **record,
    }
    path = directory / name
    # Written whole, then renamed: a plot never reads half a file.
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(full, separators=(",", ":")), encoding="utf-8")
    partial.replace(path)
    return path


def read_samples(path: Path) -> dict[str, Any] | None:
    """A samples file, or None if there is none."""
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise SystemExit(f"{path}: format {data.get('format')!r}, expected {FORMAT}; rerun it")
    return data


# -- windows ----------------------------------------------------------------------------


def per_window(points: Sequence[Sequence[float | None]], column: int = 1) -> list[list[float]]:
    """Group ``(time, value, ...)`` points into ``WINDOW``-second windows by time.

    Returns ``[centre, p50, p90, p99]`` (seconds) per window from the first to
    the last; a window with fewer than ``LEAST`` values in ``column`` has NaNs,
    which break the lines drawn through it.
    """
    buckets: dict[int, list[float]] = defaultdict(list)
    for point in points:
        at, value = point[0], point[column]
        if at is not None and value is not None:
            buckets[math.floor(at / WINDOW)].append(value)
    if not buckets:
        return []
    nan = float("nan")
    return [
        [
            (key + 0.5) * WINDOW,
            *(
                percentile(buckets[key], q) if len(buckets.get(key, ())) >= LEAST else nan
                for q in (0.5, 0.9, 0.99)
            ),
        ]
        for key in range(min(buckets), max(buckets) + 1)
    ]


def _column(rows: Sequence[Sequence[float]], index: int, scale: float = 1.0) -> list[float]:
    return [row[index] * scale for row in rows]


# -- the panels -------------------------------------------------------------------------

PERCENTILES: Final = (("p50", 1, "tab:blue"), ("p90", 2, "tab:green"), ("p99", 3, "tab:red"))
#: line styles of the rates, fastest first
STYLES: Final[tuple[Literal["-", "--", ":", "-."], ...]] = ("-", "--", ":", "-.")


def _stamp(data: dict[str, Any]) -> str:
    return f"{data['date'][:10]}, commit {data['commit']}"


def draw_b5(ax: Axes, data: dict[str, Any] | None) -> str:
    """The B5 panel; returns a sentence on what it was drawn from."""
    ax.set_xlabel("seconds into the measured run (a rate's rounds end to end; by commit time)")
    ax.set_ylabel("commit → handler, ms")
    if data is None:
        ax.set_title("B5 — no samples: run python -m bench.consumers")
        return "no B5 samples"
    from matplotlib.lines import Line2D  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

    runs = [run for run in data["runs"] if run["backend"] == "postgresql"]
    rates = sorted({run["rate"] for run in runs}, reverse=True)
    handles = [Line2D([], [], color=colour, label=name) for name, _, colour in PERCENTILES]
    for rate, style in zip(rates, STYLES, strict=False):
        points: list[list[float]] = []
        offset = 0.0
        mine = sorted((r for r in runs if r["rate"] == rate), key=lambda r: r["round"])
        for number, run in enumerate(mine):
            if number:  # where this rate's next round begins
                ax.axvline(offset, color="0.6", linestyle=style, linewidth=0.8, zorder=0)
            points += [[offset + at, latency] for at, latency in run["samples"]]
            # Writers that fell behind commit past the round's nominal seconds; the next
            # round starts after the last commit, on a whole second (windows stay apart).
            last = max((at for at, _ in run["samples"]), default=0.0)
            offset += math.ceil(max(run["seconds"], last))
        rows = per_window(points)
        x = _column(rows, 0)
        for _, index, colour in PERCENTILES:
            ax.plot(x, _column(rows, index, 1000), style, color=colour, linewidth=1.3)
        # As the report has it: the rounds' rates weighted by their measured windows.
        window = sum(r["window"] for r in mine)
        achieved = sum(r["achieved_rate"] * r["window"] for r in mine) / window if window else 0
        handles.append(
            Line2D(
                [],
                [],
                color="0.3",
                linestyle=style,
                label=f"{rate:,.0f} events/s asked\n({achieved:,.0f} achieved)",
            )
        )
    ax.axhline(B5_P50 * 1000, color="tab:blue", linewidth=0.9, alpha=0.6, linestyle=(0, (1, 2)))
    ax.axhline(B5_P99 * 1000, color="tab:red", linewidth=0.9, alpha=0.6, linestyle=(0, (1, 2)))
    ax.annotate(
        "target p50 ≤ 10 ms",
        (1.0, B5_P50 * 1000),
        xycoords=("axes fraction", "data"),
        ha="right",
        va="bottom",
        fontsize=8,
        color="tab:blue",
    )
    ax.annotate(
        "target p99 ≤ 50 ms",
        (1.0, B5_P99 * 1000),
        xycoords=("axes fraction", "data"),
        ha="right",
        va="bottom",
        fontsize=8,
        color="tab:red",
    )
    _log_ms(ax, subs=(1.0, 2.0, 5.0))
    ax.set_xlim(left=0)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    params = data["parameters"]
    quick = " — a --quick run" if params.get("quick") else ""
    ax.set_title(
        "B5 — commit → handler latency per 1-s window, PostgreSQL, "
        f"{params['writers']} writers at a steady rate, one consumer "
        f"({_stamp(data)}{quick})",
        fontsize=10,
    )
    rounds = params["rounds"]
    seconds = params["latency_seconds"]
    return (
        f"B5, `bench.consumers` on {_stamp(data)}: {seconds:g} s measured per rate "
        f"({', '.join(f'{r:,.0f}' for r in rates)} events/s) in {rounds} round(s)"
        + (" (a `--quick` run)" if params.get("quick") else "")
    )


def draw_b6(ax: Axes, data: dict[str, Any] | None) -> str:
    """The B6 panel; returns a sentence on what it was drawn from."""
    ax.set_xlabel("seconds from the long transaction's BEGIN (by commit time)")
    ax.set_ylabel("commit → a reader gets it (log scale)")
    if data is None:
        ax.set_title("B6 — no samples: run python -m bench.long_transaction")
        return "no B6 samples"
    began, ended = data["began"], data["ended"]
    points = [[at - began, herald, horizon] for at, herald, horizon in data["samples"]]
    ax.axvspan(0, ended - began, color="0.9", zorder=0, label="the transaction is open")
    for label, column, colour in (
        ("herald\n(LogReader.follow)", 1, "tab:blue"),
        ("xid horizon\n(tx < pg_snapshot_xmin)", 2, "tab:orange"),
    ):
        rows = per_window(points, column)
        x = _column(rows, 0)
        ax.plot(x, _column(rows, 1), "-", color=colour, linewidth=1.4, label=f"p50, {label}")
        ax.plot(x, _column(rows, 3), "--", color=colour, linewidth=1.1, label=f"p99, {label}")
    ax.axhline(B6_P99, color="tab:red", linewidth=0.9, alpha=0.6, linestyle=(0, (1, 2)))
    ax.annotate(
        "target: herald p99 ≤ 100 ms",
        (1.0, B6_P99),
        xycoords=("axes fraction", "data"),
        ha="right",
        va="bottom",
        fontsize=8,
        color="tab:red",
    )
    _log_ms(ax, seconds=True)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    params = data["parameters"]
    ax.set_title(
        f"B6 — latency while one write transaction stays open {params['hold']:g} s, "
        f"a writer committing {params['rate']:g} events/s ({_stamp(data)})",
        fontsize=10,
    )
    return (
        f"B6, `bench.long_transaction` on {_stamp(data)}: the transaction held "
        f"{params['hold']:g} s, {params['rate']:g} events/s around it"
    )


def _log_ms(ax: Axes, *, seconds: bool = False, subs: Sequence[float] = (1.0,)) -> None:
    """A log-scale y axis labelled in ms (and s from 1 s up), ticks at ``subs`` × 10ⁿ;
    ``seconds``: the values are seconds."""
    # The bench extra (see Axes above), imported only to draw.
    from matplotlib.ticker import (  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
        FuncFormatter,
        LogLocator,
        NullFormatter,
    )

    def label(value: float, _pos: int | None) -> str:
        ms = value * 1000 if seconds else value
        if ms >= 1000:
            return f"{ms / 1000:g} s"
        return f"{ms:g} ms"

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(label))
    # Unlabelled: on a short range matplotlib would label them as 6×10¹.
    ax.yaxis.set_minor_formatter(NullFormatter())


def _machine(b5: dict[str, Any] | None, b6: dict[str, Any] | None) -> str:
    machines = {
        (m["cores"], m["cpu_model"], m["postgresql"])
        for m in (d["machine"] for d in (b5, b6) if d is not None)
    }
    return "; ".join(f"{c} cores ({cpu}), PostgreSQL {pg}" for c, cpu, pg in sorted(machines))


def draw(b5: dict[str, Any] | None, b6: dict[str, Any] | None, output: Path) -> list[str]:
    """Draw the two panels into ``output`` (PNG); what each was drawn from."""
    # The bench extra (see Axes above), imported only to draw. Agg draws to a file and
    # needs no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
    from matplotlib.figure import Figure  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

    figure = Figure(figsize=(12, 9.5), layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1)
    said = [draw_b5(top, b5), draw_b6(bottom, b6)]
    figure.suptitle(
        f"herald: latency over time (B5, B6) — one machine, {_machine(b5, b6)}",
        fontsize=12,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100, pil_kwargs={"optimize": True})
    return said


# -- the report -------------------------------------------------------------------------


def markdown(said: Sequence[str], image: str) -> str:
    return f"""{BEGIN_MARK}

## Latency over time (B5, B6)

![B5: p50, p90 and p99 of commit → handler latency per second at a steady rate; B6: herald's \
and the xid horizon's p50 and p99 per second while one transaction stays open]({image})

**What it shows.** Each line is a percentile of the events that committed in one 1-second
window, so it shows when the slow events of the tables happened, not only how slow they
were. Top (B5): commit → handler latency on PostgreSQL at each rate `bench.consumers`
measured, its rounds end to end (grey lines where the next begins), against the targets
p50 ≤ 10 ms and p99 ≤ 50 ms; the legend gives the rate the writers achieved beside the
daemon (the SQLite runs of B9 are in the samples too, not drawn: their table is in the B3
section). Bottom (B6): the latency of the other events around the transaction that
`bench.long_transaction` holds open (shaded), herald's reader against the xid horizon, on a
log scale: the horizon's latency falls from the whole hold to nothing as the events it
holds back commit closer to the transaction's end, while herald's stays in milliseconds.
The horizon is the whole server's: a transaction open in any database holds it back.
Drawn from: {"; ".join(said)}.

**Reproduce.** `make bench`, or `.venv/bin/python -m bench.consumers` and
`.venv/bin/python -m bench.long_transaction` (each keeps its per-event samples in
`bench/samples/`, git-ignored), then `.venv/bin/python -m bench.plot` (`--samples`,
`--output`, `--markdown`; it needs matplotlib, the `bench` extra:
`.venv/bin/pip install -e '.[dev,bench]'`).

{END_MARK}
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__)
    parser.add_argument(
        "--samples", type=Path, default=SAMPLES, help="Where b5.json and b6.json are."
    )
    parser.add_argument(
        "--output", type=Path, default=REPO / "docs" / "latency.png", help="The PNG."
    )
    parser.add_argument(
        "--markdown", type=Path, default=REPO / "BENCHMARKS.md", help="The report to update."
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    b5 = read_samples(args.samples / "b5.json")
    b6 = read_samples(args.samples / "b6.json")
    if b5 is None and b6 is None:
        raise SystemExit(
            f"no samples in {args.samples}: run python -m bench.consumers and "
            "python -m bench.long_transaction first"
        )
    said = draw(b5, b6, args.output)
    print(f"wrote {args.output}")
    try:
        image = args.output.resolve().relative_to(args.markdown.resolve().parent).as_posix()
    except ValueError:
        image = args.output.resolve().as_posix()
    write_section(args.markdown, "bench.plot", markdown(said, image))
    print(f"wrote its section of {args.markdown}")


if __name__ == "__main__":
    main()
