"""Tables and plots shared by the experiment commands (demo, sweep)."""
from __future__ import annotations

import math
from pathlib import Path

from ..tasks.figures import save_figure


# A table column: (header, row key, width, format spec of the value).
TABLE_COLUMNS = [("patch", "patch", 5, ""), ("tokens", "tokens", 6, ""), ("params", "params", 8, ","),
                 ("GFLOPs", "gflops", 8, ".4f"), ("test acc", "accuracy", 9, ".2%"), ("seconds", "seconds", 8, ".1f")]


def format_table(rows: list[dict], columns: list[tuple[str, str, int, str]] = TABLE_COLUMNS,
                 markdown: bool = False) -> str:
    """Rows as an aligned text table, or a markdown table."""
    cells = [[f"{r[key]:>{width}{spec}}" for _, key, width, spec in columns] for r in rows]
    head = [f"{name:>{width}}" for name, _, width, _ in columns]
    if markdown:
        rule = ["-" * (len(h) - 1) + ":" for h in head]
        return "\n".join("| " + " | ".join(line) + " |" for line in [head, rule, *cells])
    header = " ".join(head)
    return "\n".join([header, "-" * len(header), *(" ".join(c) for c in cells)])


def plot(rows: list[dict], path: Path, title: str, x: str = "patch", xlabel: str = "patch size (pixels per side)",
         ylabel: str = "test accuracy (%)", footnote: str | None = None):
    """Accuracy against patch size (log scale, smallest patch on the right). Each point is labelled with
    row["note"] (default: its token count); row["std"], where given, draws an error bar; `footnote`
    is written under the axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    xs = [r[x] for r in rows]
    ax.errorbar(xs, [100 * r["accuracy"] for r in rows], yerr=[100 * r.get("std", 0.0) for r in rows],
                fmt="o-", capsize=3)
    for r in rows:
        ax.annotate(r.get("note", f"{r['tokens']} tokens"), (r[x], 100 * r["accuracy"]), textcoords="offset points",
                    xytext=(0, 7), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(v) for v in xs])
    ax.invert_xaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.08, y=0.15)  # room for the point labels
    ax.grid(alpha=0.3)
    if footnote:
        fig.text(0.01, 0.01, footnote, fontsize=7, color="0.25", ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.1 if footnote else 0, 1, 1))
    save_figure(fig, path)


def binomial_se(accuracy: float, n: int) -> float:
    """The standard error of an accuracy measured on `n` test images."""
    return math.sqrt(accuracy * (1 - accuracy) / max(n, 1))


def sampling_noise(accuracy: float, n: int) -> float:
    """Two standard errors of the difference between two accuracies near `accuracy` measured on the
    same number `n` of test images (binomial): differences below this are within test-set noise."""
    return 2 * math.sqrt(2) * binomial_se(accuracy, n)
