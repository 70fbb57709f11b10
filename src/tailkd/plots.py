"""Matplotlib figures (PNG), drawn with the object-oriented API on the Agg canvas.

No ``pyplot``: no global backend switch, no figure registry, safe on machines without a display
and inside other people's notebooks.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, format="png")
    return path


def short_names(names: list[str]) -> list[str]:
    """Legend labels: the last path component of each name (``runs/x/final`` → ``final``'s parent if clashing)."""
    for depth in (1, 2, 3):
        short = ["/".join(Path(n).parts[-depth:]) or n for n in names]
        if len(set(short)) == len(short):
            return short
    return list(names)


def plot_tail_mass(results: dict, path: str | Path) -> Path:
    """Paper Figure 2 for one or more teachers. ``results``: {name: ``analysis.teacher_statistics`` dict}.

    (a) mean teacher tail mass α_K (fraction of probability outside the top K) vs K, the q25–q75 band
    shaded and the median dashed; (b) mode mismatch rate (argmax p ≠ next token) per teacher, in %.
    """
    fig = Figure(figsize=(11, 4.2))
    ax_a, ax_b = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    names = list(results)
    labels = short_names(names)
    for i, name in enumerate(names):
        r = results[name]
        color = f"C{i % 10}"
        ax_a.plot(r["k"], r["alpha_mean"], color=color, label=f"{labels[i]} (mean)")
        ax_a.plot(r["k"], r["alpha_median"], color=color, linestyle="--", linewidth=0.8)
        ax_a.fill_between(r["k"], r["alpha_q25"], r["alpha_q75"], color=color, alpha=0.2)
    ax_a.set_xlabel("K (top-K teacher tokens)")
    ax_a.set_ylabel("teacher tail mass α_K = 1 − Σ top-K p")
    ax_a.set_title("(a) tail mass: mean, median (dashed), q25–q75 band")
    ax_a.set_ylim(0, 1)
    ax_a.grid(alpha=0.3)
    ax_a.legend(fontsize=8)
    rates = [100 * results[n]["mismatch_rate"] for n in names]
    bars = ax_b.bar(range(len(names)), rates, color=[f"C{i % 10}" for i in range(len(names))])
    for bar, rate in zip(bars, rates):
        ax_b.annotate(f"{rate:.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                      va="bottom", fontsize=8)
    ax_b.set_xticks(range(len(names)), labels, rotation=20, fontsize=8)
    ax_b.set_ylabel("positions where argmax p ≠ next token [%]")
    ax_b.set_ylim(0, 100)
    ax_b.set_title("(b) teacher mode mismatch rate")
    fig.tight_layout()
    return _save(fig, path)


def plot_heldout_kl(curves: dict, path: str | Path) -> Path:
    """Paper Figure 1: held-out KL(teacher‖student) [nats/token] vs training tokens, one line per run.

    ``curves``: {run label: (tokens list, kl list)}.
    """
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for i, (label, (tokens, kl)) in enumerate(curves.items()):
        ax.plot(tokens, kl, marker="o", markersize=3, color=f"C{i % 10}", label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out KL(teacher‖student) [nats/token]")
    ax.set_title("held-out KL during distillation")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
