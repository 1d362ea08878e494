"""`python -m bench.figures` (`make docs-figures`): draw the documentation's plots from the
tables the benchmarks recorded in bench/results/ (see `common.record`), as SVG in
docs/images/. Every number on a plot is one a benchmark printed; nothing is typed in here.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402

from .common import RESULTS  # noqa: E402

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
# Okabe-Ito colours, told apart with colour-blindness (as the page's palette).
COLOURS = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9"]
STYLE = {
    "svg.fonttype": "none",  # text stays text: searchable, and smaller files
    "svg.hashsalt": "distill",  # the same ids every time: a redraw of the same results is the same file
    "font.size": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=COLOURS),
}


class Table:
    """One recorded table: its rows as dicts by header, and where it came from."""

    def __init__(self, bench: str, title_start: str):
        results = json.loads((RESULTS / f"{bench}.json").read_text())
        tables = [t for t in results["tables"] if t["title"].startswith(title_start)]
        if not tables:
            raise SystemExit(f"bench/results/{bench}.json has no table titled {title_start!r}…: "
                             f"run `python -m bench.{bench}` to the end first")
        table = tables[-1]
        self.title = table["title"]
        self.rows = [dict(zip(table["header"], row)) for row in table["rows"]]
        self.source = f"{results['command']}, {results['date']}; {results['machine']}"


def number(value: object) -> float:
    """A cell as a number: the benches print some cells pre-formatted ("0.952", "1,000")."""
    return float(str(value).replace(",", ""))


def latency_against_n() -> None:
    """Pipeline and clustering time against n, next to the bare product (the GEMM bound)."""
    table = Table("pipeline_bench", "In-process pipeline")
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for ax, d in zip(axes, (384, 1536)):
        rows = sorted((r for r in table.rows if r["d"] == d and r["planted dups"] == "yes" and r["threads"] == 2),
                      key=lambda r: r["n"])
        n = [r["n"] for r in rows]
        for column, label, marker in (("bare ms", "bare X·Xᵀ (GEMM bound)", "o"),
                                      ("clustering ms", "clustering stage", "s"),
                                      ("pipeline ms", "whole pipeline", "^")):
            ax.plot(n, [number(r[column]) for r in rows], marker=marker, label=label)
        ax.set(xscale="log", yscale="log", xlabel="chunks per request (n)", title=f"d = {d}, two threads")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("milliseconds (log)")
    legend_on_top(figure, axes[0])
    save(figure, "latency-against-n.svg", table.source)


def model_mode_latency() -> None:
    """Server latency by chunk size: cold, half new, shifted and repeated requests."""
    table = Table("whole_chunks_bench", "Model mode")
    columns = [("cold", "cold"), ("half new", "half the chunks new"), ("shifted", "shifted (50 % overlap)"),
               ("repeated", "repeated (cached)")]
    figure, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(columns)
    for i, (column, label) in enumerate(columns):
        x = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(table.rows))]
        bars = ax.bar(x, [number(r[column]) for r in table.rows], width, label=label)
        ax.bar_label(bars, [str(r[column]) for r in table.rows], padding=1, fontsize=7)
    ax.set_xticks(range(len(table.rows)), [f"~{r['tokens/chunk']} tokens" for r in table.rows])
    ax.set(yscale="log", ylabel="server latency_ms (log)", xlabel="tokens per chunk",
           title=table.title.split(":")[0])
    ax.grid(True, axis="y", which="major", alpha=0.3)
    legend_on_top(figure, ax)
    save(figure, "model-mode-latency.svg", table.source)


def stsb_quality() -> None:
    """Precision, recall and F1 per setting, train and dev."""
    table = Table("quality", "STS-B pairs")
    settings = list(dict.fromkeys(r["setting"] for r in table.rows))
    figure, axes = plt.subplots(1, 2, figsize=(9, 0.7 * len(settings) + 1.5), sharey=True)
    for ax, split in zip(axes, ("train", "dev")):
        rows = {r["setting"]: r for r in table.rows if r["split"] == split}
        metrics = (("P", "precision"), ("R", "recall"), ("F1", "F1"))
        height = 0.8 / len(metrics)
        for i, (metric, label) in enumerate(metrics):
            y = [j + (i - 1) * height for j in range(len(settings))]
            bars = ax.barh(y, [number(rows[s][metric]) for s in settings], height, label=label)
            ax.bar_label(bars, [str(rows[s][metric]) for s in settings], padding=2, fontsize=7)
        ax.set(xlim=(0, 1.1), title=split, xlabel="share of pairs")
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].invert_yaxis()  # the table's order, top down (the axes share y: invert once)
    axes[0].set_yticks(range(len(settings)), [s.replace(": ", ":\n", 1) for s in settings])
    legend_on_top(figure, axes[0])
    save(figure, "quality-stsb.svg", table.source)


def long_chunk_quality() -> None:
    """Share of long-chunk pairs answered right, per kind, with and without the coverage guard."""
    table = Table("quality", "Long chunk pairs")
    kinds = [h for h in table.rows[0] if h not in ("split", "setting")]
    splits = list(dict.fromkeys(r["split"] for r in table.rows))
    figure, axes = plt.subplots(1, len(splits), figsize=(9, 3.8), sharey=True)
    for ax, split in zip(axes, splits):
        rows = [r for r in table.rows if r["split"] == split]
        width = 0.8 / len(rows)
        for i, row in enumerate(rows):
            x = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(kinds))]
            bars = ax.bar(x, [number(row[k]) for k in kinds], width, label=row["setting"])
            ax.bar_label(bars, [str(row[k]) for k in kinds], padding=1, fontsize=7)
        ax.set_xticks(range(len(kinds)), [k.replace(": ", ":\n").replace(" ", "\n", 1) for k in kinds], fontsize=8)
        ax.set(ylim=(0, 1.1), title="held out" if split == "eval" else split)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("share of pairs answered right")
    legend_on_top(figure, axes[0])
    save(figure, "quality-long-chunks.svg", table.source)


def legend_on_top(figure, ax) -> None:
    """One legend for the figure, in a row above the plots, where it hides no bar."""
    handles, labels = ax.get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncols=len(labels), frameon=False)


def save(figure, name: str, source: str) -> None:
    """Write the figure with the command and run it came from in its bottom line."""
    figure.text(0.01, 0.005, f"Source: {source}", fontsize=7, color="#444444")
    figure.tight_layout(rect=(0, 0.04, 1, 0.93))
    IMAGES.mkdir(parents=True, exist_ok=True)
    figure.savefig(IMAGES / name, metadata={"Date": None})
    plt.close(figure)
    print(f"drew docs/images/{name}")


def main() -> None:
    with plt.rc_context(STYLE):
        for draw in (latency_against_n, model_mode_latency, stsb_quality, long_chunk_quality):
            draw()


if __name__ == "__main__":
    main()
