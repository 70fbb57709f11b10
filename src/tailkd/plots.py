"""Matplotlib figures (PNG), drawn with the object-oriented API on the Agg canvas.

No ``pyplot``: no global backend switch, no figure registry, safe on machines without a display
and inside other people's notebooks.
"""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG under a temporary name, then rename it: never a half-written picture."""
    from tailkd.checkpoint import atomic_write_file

    picture = _png(fig)
    return atomic_write_file(Path(path), lambda tmp: tmp.write_bytes(picture))


def _png(fig: Figure) -> bytes:
    """``fig`` as the PNG bytes `_save` writes, drawn in memory."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format="png")
    return buf.getvalue()


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
    return _save(_tail_mass_figure(results), path)


def tail_mass_png(results: dict) -> bytes:
    """`plot_tail_mass`'s picture as PNG bytes, nothing written (`tailkd.commands.analyze_teacher` draws it before
    it replaces anything on disk)."""
    return _png(_tail_mass_figure(results))


def _tail_mass_figure(results: dict) -> Figure:
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
    return fig


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


def plot_seed_bands(curves: dict, path: str | Path) -> Path:
    """Paper Figure 1 over seeds: held-out KL vs training tokens, per label the mean over its runs (line) and
    their min–max (band). ``curves``: {label: [(tokens list, kl list) per seed]} (the seeds share the tokens)."""
    import numpy as np

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for i, (label, runs) in enumerate(curves.items()):
        if not runs:
            continue
        n = min(len(kl) for _, kl in runs)  # an unfinished run's curve is shorter
        tokens, kl = np.asarray(runs[0][0][:n]), np.asarray([kl[:n] for _, kl in runs])
        ax.plot(tokens, kl.mean(0), marker="o", markersize=3, color=f"C{i % 10}",
                label=f"{label} (mean of {len(runs)} seed{'s' if len(runs) > 1 else ''})")
        if len(runs) > 1:
            ax.fill_between(tokens, kl.min(0), kl.max(0), color=f"C{i % 10}", alpha=0.2, linewidth=0)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out KL(teacher‖student) [nats/token]")
    ax.set_title("held-out KL during distillation (band: min–max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_sweeps(beta: dict, k: dict, path: str | Path) -> Path:
    """The β sweep and the K sweep of TAD side by side: final held-out KL against β and against K."""
    fig = Figure(figsize=(10, 3.8))
    for ax, points, name in zip(fig.subplots(1, 2), (beta, k), ("β", "K")):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", color="C1")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel(name)
        ax.set_ylabel("final held-out KL [nats/token]")
        ax.set_title(f"TAD: {name} sweep")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_fidelity_diversity(points: dict, path: str | Path) -> Path:
    """Fidelity vs diversity of several runs' students, one labelled point per run: ROUGE-L against the
    reference responses (y) vs (a) Distinct-2 and (b) 1 − Self-BLEU of the sampled completions (x; right =
    more diverse, up = closer to the references).

    ``points``: {run label: {"rougeL", "distinct_2", "self_bleu"}} (e.g. `tailkd.compare.fidelity_diversity_points`).
    """
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    panels = (("distinct_2", lambda v: v, "Distinct-2 of sampled completions (higher = more diverse)",
               "(a) ROUGE-L vs Distinct-2"),
              ("self_bleu", lambda v: 1.0 - v, "1 − Self-BLEU of sampled completions (higher = more diverse)",
               "(b) ROUGE-L vs 1 − Self-BLEU"))
    for ax, (key, to_x, xlabel, title) in zip(axes, panels):
        for i, (label, p) in enumerate(points.items()):
            x, y = to_x(p[key]), p["rougeL"]
            ax.scatter([x], [y], color=f"C{i % 10}", s=36, zorder=3)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ROUGE-L F vs reference responses (greedy)")
        ax.set_title(title)
        ax.margins(0.15)
        ax.grid(alpha=0.3)
    fig.suptitle("fidelity vs diversity of the students", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(train: list[dict], heldout: list[dict], path: str | Path, *, title: str = "") -> Path:
    """One run: (a) held-out KL(teacher‖student) vs training tokens (the student's held-out CLM loss when the
    run has no teacher), (b) the training loss and its terms (CLM, divergence) vs training tokens.

    ``train`` / ``heldout``: ``metrics.jsonl`` rows (``tokens`` and the metric keys), e.g. from
    `tailkd.compare.read_metrics`.
    """
    fig = Figure(figsize=(11, 4.2))
    ax_a, ax_b = fig.subplots(1, 2)
    key = "kl" if any("kl" in r for r in heldout) else "student_clm"
    rows = [r for r in heldout if key in r]
    ax_a.plot([r["tokens"] for r in rows], [r[key] for r in rows], marker="o", markersize=4, color="C0")
    for r in rows[:1] + rows[-1:]:
        ax_a.annotate(f"{r[key]:.4g}", (r["tokens"], r[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax_a.set_xlabel("training tokens")
    ax_a.set_ylabel("held-out KL(teacher‖student) [nats/token]" if key == "kl" else "held-out student CLM [nats]")
    ax_a.set_title("(a) held-out " + ("KL" if key == "kl" else "CLM loss"))
    ax_a.grid(alpha=0.3)
    tokens = [r["tokens"] for r in train]
    for i, (term, label) in enumerate((("loss", "loss (total)"), ("clm", "CLM"), ("div", "divergence"))):
        values = [r.get(term) for r in train]
        if any(v for v in values):
            ax_b.plot(tokens, values, color=f"C{i}", label=label, linewidth=1.2 if term == "loss" else 0.9)
    ax_b.set_xlabel("training tokens")
    ax_b.set_ylabel("training loss per valid token [nats]")
    ax_b.set_title("(b) training loss")
    ax_b.grid(alpha=0.3)
    if train:
        ax_b.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
