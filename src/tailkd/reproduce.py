"""``tailkd reproduce``: the TAD paper's experiments in one resumable command, and a report of what they show.

Runs (each an ordinary ``tailkd distill`` run folder under ``OUT/runs/``):

- ``clm-s<seed>``, ``kd-s<seed>``, ``tad-s<seed>`` (K = 10, β = 2) for every seed of ``reproduce.seeds``: Fig. 1
  (held-out KL against training tokens, KD vs TAD, mean and the band of the seeds) and the main table;
- ``tad-beta<β>-s<seed>`` and ``tad-k<K>-s<seed>`` for ``reproduce.betas`` / ``reproduce.ks`` over
  ``reproduce.sweep_seeds`` (β = 2 and K = 10 are the main TAD runs): the sweeps of Table 2 and Tables 1/4;
- ``tailkd eval`` of every final student on the held-out corpus (``RUN/eval.json``: KL, CLM, Full-ECE);
- ``tailkd analyze-teacher`` of the teacher on the same held-out rows (Fig. 2: α_K against K, mode mismatch).

Then ``OUT/report.md`` with ``fig1_heldout_kl.png``, ``fig2_tail_mass.png`` and ``sweeps.png``: tables with mean
± std over seeds, TAD's paired difference to KD per seed against the seed spread, the sweeps' optima, α_K and the
mismatch rate beside the paper's, the machine, the versions and the date. Held-out evaluation uses
``data.heldout_paths`` (default ``builtin:pydoc``, Python's documentation: another source than the news corpus the
students train on), as the paper evaluates on a validation set of its own.

Re-running the command continues a stopped or killed reproduction: finished runs and evaluations are skipped,
an interrupted run resumes from its last checkpoint, and the report is written again from everything on disk.
Once every run has finished their checkpoints are deleted (a finished run is never resumed; its ``final/`` stays).
Only work done with the same settings is reused: before anything runs, each run folder's ``config.yaml`` is
compared with the planned config (`tailkd.recipe.saved_change`: all but the settings that change nothing a run
computes, such as the device), each ``eval.json`` with the evaluation settings saved beside it
(``eval.settings.json``) and ``teacher_analysis.json`` with ``teacher_analysis.settings.json``; a difference (e.g.
another ``--scale`` or ``--teacher`` into the same ``--out``) is refused with one line naming the run and the
setting. An ``eval.json`` without its settings file (written by an older tailkd) is evaluated again, as is that of a
run trained (again) by this invocation.
"""

from __future__ import annotations

import copy
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from tailkd import jsonfile
from tailkd.command_config import AnalyzeTeacherConfig, EvalConfig, ReproduceConfig
from tailkd.config import DistillConfig, LossConfig
from tailkd.errors import TailkdError

MAIN_K, MAIN_BETA = 10, 2.0  # the paper's defaults: the main TAD runs, where the sweeps cross
PAPER_MISMATCH = (0.39, 0.46)  # the paper's mode-mismatch rates for its 1.8B-9B teachers (§2, Fig. 2)


@dataclass
class Experiment:
    """One run of the reproduction: its name (the run folder's), what it is for, and its distill config."""

    name: str
    group: str  # "main", "beta" or "k"
    loss: str
    seed: int
    k: int
    beta: float
    cfg: DistillConfig

    @property
    def run(self) -> Path:
        return Path(self.cfg.train.out_dir)


def _tag(x: float) -> str:
    return f"{x:g}".replace(".", "p")


def plan(cfg: ReproduceConfig) -> list[Experiment]:
    """Every run of the reproduction, in the order they run (the main runs seed by seed first)."""
    r = cfg.reproduce
    todo: list[tuple[str, str, str, int, int, float]] = []
    for seed in r.seeds:
        todo += [(f"{loss}-s{seed}", "main", loss, seed, MAIN_K, MAIN_BETA) for loss in ("clm", "kd", "tad")]
    for seed in r.sweep_seeds:
        todo += [(f"tad-beta{_tag(b)}-s{seed}", "beta", "tad", seed, MAIN_K, b) for b in r.betas if b != MAIN_BETA]
        todo += [(f"tad-k{k}-s{seed}", "k", "tad", seed, k, MAIN_BETA) for k in r.ks if k != MAIN_K]
    names = [name for name, *_ in todo]
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:  # ReproduceConfig.validate refuses repeated values; this is two β that print alike
        raise TailkdError(f"two runs of the reproduction would be named {twice}; give β values that differ in their "
                          "first 6 significant digits")
    return [Experiment(name, group, loss, seed, k, beta, _distill_config(cfg, name, loss, seed, k, beta))
            for name, group, loss, seed, k, beta in todo]


def _distill_config(cfg: ReproduceConfig, name: str, loss: str, seed: int, k: int, beta: float) -> DistillConfig:
    train = copy.deepcopy(cfg.train)
    train.max_steps, train.eval_every = cfg.scaled_steps()
    train.seed, train.out_dir, train.device = seed, str(Path(cfg.reproduce.out) / "runs" / name), cfg.reproduce.device
    return DistillConfig(teacher=copy.deepcopy(cfg.teacher), student=copy.deepcopy(cfg.student),
                         data=copy.deepcopy(cfg.data), loss=LossConfig(name=loss, k=k, beta=beta),
                         train=train).validate()


def main_runs(experiments: list[Experiment]) -> list[Experiment]:
    return [e for e in experiments if e.group == "main"]


def sweep_point(experiments: list[Experiment], group: str, seed: int, value) -> Experiment | None:
    """The run of a sweep at ``value`` (β or K) for ``seed``: the main TAD run where the sweep crosses it."""
    for e in experiments:
        if e.seed == seed and e.loss == "tad" and (
                (e.group == group and (e.beta if group == "beta" else e.k) == value)
                or (e.group == "main" and (MAIN_BETA if group == "beta" else MAIN_K) == value)):
            return e
    return None


# --------------------------------------------------------------------------- running


def reproduce(cfg: ReproduceConfig) -> dict:
    """Run (or continue) every experiment, evaluate every student, analyse the teacher, write the report."""
    from tailkd import commands
    from tailkd.recipe import redo_result, result_settings, run_stages, saved_settings

    experiments = plan(cfg)
    out = Path(cfg.reproduce.out)
    check_reuse(cfg, experiments)  # before anything runs: what is on disk was made with these settings
    _check_ks(cfg)
    started = time.time()
    print(f"reproduce: {len(experiments)} runs of {experiments[0].cfg.train.max_steps} steps into {out / 'runs'}")
    summaries = run_stages([e.cfg for e in experiments])
    if summaries and summaries[-1].get("stopped"):
        print(f"reproduce: stopped; run the same command again to continue ({out})")
        return {"stopped": True, "out": str(out), "exit_code": summaries[-1].get("exit_code", 0)}
    for e, summary in zip(experiments, summaries):
        shutil.rmtree(e.run / "checkpoints", ignore_errors=True)  # finished (final/ written): never resumed again
        ev = _eval_config(cfg, e)
        if saved_settings(e.run / "eval.json") is None or not summary.get("skipped"):  # new, or of a new student
            redo_result(e.run / "eval.json", result_settings(ev, "eval"))
            commands.evaluate(ev)
    analysis = out / "teacher_analysis.json"
    a = _analysis_config(cfg, out)
    if saved_settings(analysis) is None:
        redo_result(analysis, result_settings(a, "analyze"))
        commands.analyze_teacher(a)
    report = write_report(cfg, experiments, out, seconds=time.time() - started)
    print(f"reproduce: report {report}")
    return {"out": str(out), "report": str(report)}


def _check_ks(cfg: ReproduceConfig) -> None:
    """Every K of the sweep below the teacher's vocabulary, from its config before any run (a run checks its own K
    only once its models are loaded: the K sweep comes after the main runs)."""
    from tailkd.flops import size_from_spec

    vocab = size_from_spec(cfg.teacher.path, " (--teacher)").vocab
    if max(cfg.reproduce.ks) >= vocab:
        raise TailkdError(f"reproduce.ks holds {max(cfg.reproduce.ks)}; every K must be smaller than the teacher's "
                          f"vocabulary ({vocab}; the paper sweeps 1, 5, 10, 20)")


def _eval_config(cfg: ReproduceConfig, e: Experiment) -> EvalConfig:
    ev = EvalConfig(teacher=copy.deepcopy(e.cfg.teacher), data=copy.deepcopy(e.cfg.data))
    ev.eval.student, ev.eval.out = str(e.run / "final"), str(e.run / "eval.json")
    ev.eval.max_rows, ev.eval.device = cfg.reproduce.eval_rows, cfg.reproduce.device
    return ev.validate()


def _analysis_config(cfg: ReproduceConfig, out: Path) -> AnalyzeTeacherConfig:
    a = AnalyzeTeacherConfig(teacher=copy.deepcopy(cfg.teacher), data=copy.deepcopy(cfg.data))
    a.analyze.teachers, a.analyze.out, a.analyze.device = [cfg.teacher.path], str(out), cfg.reproduce.device
    a.analyze.max_rows = cfg.reproduce.eval_rows
    return a.validate()


# --------------------------------------------------------------------------- reusing what is on disk


def check_reuse(cfg: ReproduceConfig, experiments: list[Experiment]) -> None:
    """``TailkdError`` (one line) unless every run folder, evaluation and teacher analysis already under
    ``reproduce.out`` was made with the settings this invocation plans: a re-run reuses them as they are."""
    from tailkd.recipe import finished, first_change, result_settings, saved_change, saved_settings

    out = Path(cfg.reproduce.out)
    fix = f"use a new --out, or delete {out} to start over with these settings"
    for e in experiments:
        change = saved_change(e.cfg)
        if change is not None:
            key, old, new = change
            state = "finished" if finished(e.cfg) else "started"
            raise TailkdError(f"{out} holds a reproduction with other settings: its run {e.name} was {state} with "
                              f"{key}={old!r}, this command gives {new!r}; {fix}")
    for e in experiments:  # an evaluation damaged by hand: named as such (eval's own check says "another --out");
        if (e.run / "eval.json").is_file():  # its numbers are the report's to check (`_evals`)
            _read_result(e.run / "eval.json")
    checks = [(e.run / "eval.json", result_settings(_eval_config(cfg, e), "eval")) for e in experiments]
    checks.append((out / "teacher_analysis.json", result_settings(_analysis_config(cfg, out), "analyze")))
    for result, planned in checks:
        saved = saved_settings(result)
        change = None if saved is None else first_change(saved, planned)
        if change is not None:
            key, old, new = change
            raise TailkdError(f"{result} was made with {key}={old!r}, this command gives {new!r}; {fix}, or delete "
                              f"{result} to make it again")


# --------------------------------------------------------------------------- the report


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(values: list[float], fmt: str = ".4f") -> str:
    if not values:
        return "-"
    m, s = _mean_std(values)
    return f"{m:{fmt}} ± {s:{fmt}}" if len(values) > 1 else f"{m:{fmt}}"


EVAL_KEYS = ("kl", "student_clm", "student_full_ece", "agreement")  # what the report reads of each evaluation


def _read_result(path: Path, keys: tuple[str, ...] = ()) -> dict:
    """The JSON object in ``path`` (an evaluation, the teacher analysis, a run's summary.json), holding ``keys``;
    where it is not one, a one-line TailkdError naming it: deleted, it is made again by the next invocation."""
    try:
        result = jsonfile.read_object(path)
    except jsonfile.Damaged as exc:
        raise TailkdError(f"{path} is damaged ({exc}); delete it and run the same command again") from None
    missing = [key for key in keys if key not in result]
    if missing:
        raise TailkdError(f"{path} is damaged (no {missing[0]!r} in it); delete it and run the same command again")
    return result


def _evals(experiments: list[Experiment]) -> dict[str, dict]:
    return {e.name: _read_result(e.run / "eval.json", EVAL_KEYS) for e in experiments}


def main_table(experiments: list[Experiment], evals: dict[str, dict]) -> list[str]:
    """Markdown rows: per loss, held-out KL, CLM, Full-ECE and agreement as mean ± std over the seeds."""
    rows = ["| loss | seeds | held-out KL(teacher‖student) | student CLM [nats/token] | Full-ECE | top-1 agreement |",
            "|---|---|---|---|---|---|"]
    for loss in ("clm", "kd", "tad"):
        runs = [evals[e.name] for e in main_runs(experiments) if e.loss == loss]
        rows.append(f"| {loss.upper()} | {len(runs)} | {_pm([r['kl'] for r in runs])} | "
                    f"{_pm([r['student_clm'] for r in runs])} | {_pm([r['student_full_ece'] for r in runs])} | "
                    f"{_pm([r['agreement'] for r in runs], '.3f')} |")
    return rows


def paired_verdict(experiments: list[Experiment], evals: dict[str, dict]) -> tuple[list[str], dict]:
    """TAD vs KD seed by seed (100·(KL_TAD/KL_KD − 1)) against the seed spread of KD's KL; lines + numbers."""
    by = {(e.loss, e.seed): evals[e.name] for e in main_runs(experiments)}
    seeds = sorted({s for (loss, s) in by if loss == "kd" and ("tad", s) in by})
    diffs = [100 * (by["tad", s]["kl"] / by["kd", s]["kl"] - 1) for s in seeds]
    ece = [100 * (by["tad", s]["student_full_ece"] / by["kd", s]["student_full_ece"] - 1) for s in seeds]
    kd = [by["kd", s]["kl"] for s in seeds]
    spread = 100 * _mean_std(kd)[1] / _mean_std(kd)[0] if len(kd) > 1 else None  # one seed: no spread
    below = sum(d < 0 for d in diffs)
    m, sd = _mean_std(diffs)
    against = (f"; mean {m:+.2f}% ± {sd:.2f}% (paired), against a seed spread (std/mean) of KD's KL of {spread:.2f}%."
               if spread is not None else " (one seed: no spread to weigh it against).")
    lines = [f"- TAD's held-out KL is below KD's in **{below} of {len(seeds)}** seeds: per seed "
             + ", ".join(f"{d:+.2f}%" for d in diffs) + against,
             "- TAD's Full-ECE relative to KD's: " + ", ".join(f"{d:+.1f}%" for d in ece) + " per seed."]
    return lines, {"tad_vs_kd_kl_percent": diffs, "tad_vs_kd_full_ece_percent": ece, "kd_seed_spread_percent": spread,
                   "tad_below_kd_seeds": below, "seeds": len(seeds)}


def sweep_rows(experiments: list[Experiment], evals: dict[str, dict], group: str, values, seeds) -> tuple[list, dict]:
    """Markdown rows of a sweep (held-out KL and Full-ECE per value, mean over the sweep seeds) and its points; the
    main TAD runs' value (β = 2, K = 10), where the sweeps cross, is one of them whether ``values`` lists it or not
    (a sweep of β 1 only said 'lowest at β = 1' beside a lower main run)."""
    name = "β" if group == "beta" else "K"
    rows = [f"| {name} | held-out KL | Full-ECE |", "|---|---|---|"]
    points = {}
    for v in sorted({*values, MAIN_BETA if group == "beta" else MAIN_K}):
        runs = [evals[e.name] for s in seeds if (e := sweep_point(experiments, group, s, v)) is not None]
        if runs:
            points[v] = statistics.fmean(r["kl"] for r in runs)
            rows.append(f"| {v:g} | {_pm([r['kl'] for r in runs])} | {_pm([r['student_full_ece'] for r in runs])} |")
    return rows, points


def _machine() -> str:
    import torch
    import transformers

    from tailkd.distributed import native_bf16, resolve_device

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = resolve_device("auto")
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{cpu}, {os.cpu_count()} cores"
    return (f"{where}; native bf16: {'yes' if native_bf16(dev) else 'no'}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}; {platform.platform()}")


def write_report(cfg: ReproduceConfig, experiments: list[Experiment], out: Path, *, seconds: float) -> Path:
    """``out/report.md``, its figures and ``out/report.json`` (its numbers) from the run folders, evaluations and
    teacher analysis on disk; report.md last."""
    from tailkd.checkpoint import atomic_write_text
    from tailkd.compare import read_metrics
    from tailkd.plots import plot_seed_bands, plot_sweeps, plot_tail_mass

    evals = _evals(experiments)
    analysis = _read_result(out / "teacher_analysis.json")
    curves = {loss.upper(): [([r["tokens"] for r in held], [r["kl"] for r in held])
                             for e in main_runs(experiments) if e.loss == loss
                             for held in [[r for r in read_metrics(e.run)[1] if "kl" in r]]]
              for loss in ("kd", "tad")}
    # report.md and report.json describe one state of the runs, and report.md shows the figures: both are removed
    # before anything is written, and report.md comes last. A stop part-way (Ctrl-C, a kill, a full disk) leaves no
    # report.md (the next invocation writes the report), never one beside a report.json or figures of another state.
    for name in ("report.md", "report.json"):
        (out / name).unlink(missing_ok=True)
    plot_seed_bands(curves, out / "fig1_heldout_kl.png")
    plot_tail_mass(analysis, out / "fig2_tail_mass.png")
    r = cfg.reproduce
    beta_rows, beta_points = sweep_rows(experiments, evals, "beta", r.betas, r.sweep_seeds)
    k_rows, k_points = sweep_rows(experiments, evals, "k", r.ks, r.sweep_seeds)
    plot_sweeps(beta_points, k_points, out / "sweeps.png")
    verdict, numbers = paired_verdict(experiments, evals)
    stats = next(iter(analysis.values()))
    alpha = {k: stats["alpha_mean"][k - 1] for k in (1, 5, 10, 20) if k <= len(stats["alpha_mean"])}
    train_seconds = sum(_read_result(e.run / "summary.json").get("train_seconds") or 0.0
                        for e in experiments if (e.run / "summary.json").is_file())
    e0 = experiments[0].cfg
    lines = [
        "# TAD reproduction report", "",
        f"Written by `tailkd reproduce` on {time.strftime('%Y-%m-%d')}; machine: {_machine()}.",
        f"Teacher `{e0.teacher.path}`; student: {_student_text(e0)}; training data: "
        f"{', '.join(e0.data.paths) or 'the built-in news corpus'}; held-out data (every KL, CLM and ECE below): "
        f"{', '.join(e0.data.heldout_paths) or 'a held-out fraction of the training data'}. Each run: "
        f"{e0.train.max_steps} steps of {e0.train.batch_size * e0.train.grad_accum} × {e0.data.seq_len} tokens, "
        f"lr {e0.train.lr:g}, AdamW betas {tuple(e0.train.adam_betas)}, warm-up {e0.train.warmup_steps} + cosine "
        f"to {e0.train.min_lr_ratio:g}, precision {e0.train.precision}; final evaluation on "
        f"{r.eval_rows or 'all'} held-out rows. {len(experiments)} runs, {train_seconds / 60:.1f} min of training "
        f"in all (this invocation: {seconds / 60:.1f} min).", "",
        "## TAD vs KD (paper Fig. 1 and Tables 1/4)", "", *main_table(experiments, evals), "", *verdict, "",
        "![held-out KL](fig1_heldout_kl.png)", "",
        f"## β sweep (K = {MAIN_K}; paper Table 2: peak near β = 2)", "", *beta_rows, "",
        f"Lowest held-out KL at β = {min(beta_points, key=beta_points.get):g}." if beta_points else "", "",
        f"## K sweep (β = {MAIN_BETA:g}; paper: gains up to K = 5–10)", "", *k_rows, "",
        f"Lowest held-out KL at K = {min(k_points, key=k_points.get):g}." if k_points else "", "",
        "![sweeps](sweeps.png)", "",
        "## The teacher's tail (paper Fig. 2)", "",
        "Mean tail mass α_K = 1 − Σ top-K p: " + ", ".join(f"α_{k} = {a:.3f}" for k, a in alpha.items())
        + f"; mode mismatch (argmax ≠ next token) {stats['mismatch_rate']:.1%}, against the paper's "
        f"{PAPER_MISMATCH[0]:.0%}–{PAPER_MISMATCH[1]:.0%} for its 1.8B–9B teachers; over {stats['tokens']} tokens.",
        "", "![tail mass](fig2_tail_mass.png)", ""]
    atomic_write_text(out / "report.json", jsonfile.dumps(
        {"paired": numbers, "beta_sweep": beta_points, "k_sweep": k_points, "alpha": alpha,
         "mismatch_rate": stats["mismatch_rate"], "evals": evals}, indent=1, default=str))
    atomic_write_text(out / "report.md", "\n".join(lines))  # last: a report.md is a whole report
    return out / "report.md"


def _student_text(cfg: DistillConfig) -> str:
    s = cfg.student
    if s.path:
        return f"`{s.path}`"
    layers = f"layers {s.layers}" if s.layers else f"{s.num_layers} layers"
    frozen = "frozen" if s.freeze_embeddings else "trained"
    return f"built from the teacher ({layers}, MLP {s.mlp_init}, embeddings {frozen})"

