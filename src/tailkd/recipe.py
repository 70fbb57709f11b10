"""Recipes: several distillation runs in one YAML, then (optionally) an evaluation of each and a comparison.

Two kinds. A CHAIN (the default) is the paper's supervised recipe (§3.4): pretraining distillation on domain
text, then distillation on prompt/response pairs starting from the first stage's student::

    out_dir: runs/math                # stages go to out_dir/<stage name>
    common:                           # merged into every stage (a stage's own keys win)
      teacher: {path: smollm2}
      loss: {name: tad, k: 10, beta: 2.0}
    stages:
      - name: domain
        data: {task: pretrain, paths: ["builtin:math"]}
        train: {max_steps: 200}
      - name: sft
        data: {task: sft}
        train: {max_steps: 100, lr: 1.0e-5}

A SWEEP (``chain: false``) runs the stages side by side, each from the same starting student (e.g. one stage per
loss), and may end with ``evaluate:`` (sections of `tailkd.command_config.EvalConfig`, run as ``tailkd eval`` on
each stage's ``final/``; the settings not given are the stage's own, as for ``tailkd eval``) and ``compare:``
(sections of `CompareConfig`: ``tailkd compare`` of every stage into ``out_dir/compare``; ``compare.baseline`` may
name a stage). ``configs/drkl-instruct.yaml`` is one.

Every stage is a plain `DistillConfig` (unknown keys are errors), and every config is checked before the first
stage starts. In a chain, a stage after the first with no ``student.path`` starts from the previous stage's
``final/``; the settings of a student built from the teacher it inherits from ``common`` or ``--set`` (the first
stage's: ``student.num_layers``, ...) are dropped, and those it sets itself are refused, as by distill.
Re-running a recipe skips stages that wrote ``final/`` and ``summary.json`` (`finished`), resumes a stage that has
checkpoints, and skips evaluations already made (of a stage not trained again, with their settings saved beside
them: ``RUN/eval.settings.json``, or ``RUN/generate.settings.json`` beside a ``generate.json``), so an interrupted
recipe continues. A finished stage is skipped only if it was run with the stage's settings (`saved_change`), an
evaluation kept only if made with the ``evaluate:`` settings (`check_evaluations`); otherwise the recipe stops,
before anything runs, with one line naming the setting. In a chain, a stage that has a run folder while the stage it
starts from is to be trained again (its ``final/`` deleted) stops the recipe before anything runs (`check_chain`): it
began from the student that is being replaced.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tailkd import jsonfile
from tailkd.command_config import CompareConfig, EvalConfig
from tailkd.config import (
    BUILD_KEYS,
    PATH_KEYS,
    DistillConfig,
    StudentConfig,
    absolute_path,
    absolute_paths,
    config_from_dict,
    flatten,
    from_dict,
    load_yaml,
    merge,
    to_dict,
)
from tailkd.errors import TailkdError

RECIPE_KEYS = ("out_dir", "chain", "common", "stages", "evaluate", "compare")


@dataclass
class Recipe:
    """A recipe file, read and checked: its stages' configs and what follows them."""

    root: Path
    stages: list[DistillConfig]
    evaluate: dict | None  # EvalConfig sections applied to every stage
    compare: dict | None  # CompareConfig sections

    def eval_out(self, stage: DistillConfig) -> Path:
        """Where the evaluation of ``stage`` goes: RUN/generate.json for ``--generate``, else RUN/eval.json."""
        generate = (self.evaluate or {}).get("generate")  # not a mapping: refused by eval_config
        generate = isinstance(generate, dict) and generate.get("enabled", False)
        return Path(stage.train.out_dir) / ("generate.json" if generate else "eval.json")

    def eval_config(self, stage: DistillConfig, *, with_run: bool = True) -> EvalConfig:
        """The ``tailkd eval`` config of ``stage``'s final student (``with_run``: under the stage's own settings,
        which need its run folder)."""
        given = merge(self.evaluate or {}, {"eval": {"student": str(Path(stage.train.out_dir) / "final"),
                                                     "out": str(self.eval_out(stage))}})
        return config_from_dict(EvalConfig, given) if with_run else from_dict(EvalConfig, given).validate()

    def compare_config(self) -> CompareConfig:
        """The ``tailkd compare`` config of all stages (``compare.baseline``: a stage name or a run folder)."""
        names = {Path(s.train.out_dir).name: s.train.out_dir for s in self.stages}
        given = merge({"compare": {"out": str(self.root / "compare")}}, self.compare or {})
        options = given.setdefault("compare", {})
        if not isinstance(options, dict):
            raise TailkdError(f"config section compare must be a mapping, got {type(options).__name__}")
        options["runs"] = [s.train.out_dir for s in self.stages]
        base = options.get("baseline")
        if isinstance(base, str):
            if base not in names and not Path(base).is_dir():  # known before any stage trains
                raise TailkdError(f"compare.baseline={base!r} is neither a stage of this recipe ({', '.join(names)}) "
                                  "nor a run folder")
            options["baseline"] = names.get(base, base)
        return from_dict(CompareConfig, given).validate()


def _mapping(doc: dict, key: str, path) -> dict | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, dict):
        raise TailkdError(f"recipe {path}: '{key}' must be a mapping of config sections")
    return value


def read_recipe(path: str | Path, out_dir: str | None = None, overrides: dict | None = None) -> Recipe:
    """The recipe in ``path``, every config checked; ``out_dir`` replaces its ``out_dir``, ``overrides`` (config
    sections: ``--set``) are merged over each stage's settings (``common`` and the stage's own keys)."""
    doc = load_yaml(path, what="recipe file", missing="give the path of a recipe YAML file (e.g. "
                    "configs/math-two-stage.yaml)", mapping=f"recipe keys ({', '.join(RECIPE_KEYS)})")
    unknown = sorted(set(doc) - set(RECIPE_KEYS))
    if unknown:
        raise TailkdError(f"unknown recipe key {unknown[0]!r} in {path}; valid keys: {', '.join(RECIPE_KEYS)}")
    stages = doc.get("stages")
    if not isinstance(stages, list) or not stages:
        raise TailkdError(f"recipe {path} needs a non-empty list under 'stages'")
    chain = doc.get("chain", True)
    if not isinstance(chain, bool):
        raise TailkdError(f"recipe {path}: 'chain' must be true or false, got {chain!r}")
    root = out_dir or doc.get("out_dir") or "runs/recipe"
    if not isinstance(root, str):
        raise TailkdError(f"recipe {path}: 'out_dir' must be a folder name, got {root!r:.80}")
    # '~' expanded as in every path setting (config.PATH_KEYS); '~user' of no user left as it is
    root = Path(os.path.expanduser(root))
    common = _mapping(doc, "common", path) or {}
    configs, names = [], set()
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise TailkdError(f"recipe {path}: stage {i} must be a mapping of config sections")
        stage = dict(stage)
        name = str(stage.pop("name", f"stage{i + 1}"))
        if name in ("", ".", "..") or "/" in name:  # its run's folder is out_dir/name: one folder of its own
            raise TailkdError(f"recipe {path}: a stage is named {name!r}; a stage's name is its run's folder under "
                              "out_dir: give one folder name (no '/')")
        if name in names:
            raise TailkdError(f"recipe {path}: two stages are named {name!r}; give each stage its own name")
        names.add(name)
        try:
            cfg = from_dict(DistillConfig, merge(merge(common, stage), overrides or {}))  # --set wins
            cfg.train.out_dir = str(root / name)
            if chain and i > 0 and not cfg.student.path:
                cfg.student.path = str(Path(configs[-1].train.out_dir) / "final")
                own = stage.get("student") if isinstance(stage.get("student"), dict) else {}
                for key in set(BUILD_KEYS) - set(own):  # the first stage's student's (common, --set)
                    setattr(cfg.student, key, getattr(StudentConfig(), key))
            configs.append(cfg.validate())
        except TailkdError as exc:  # which stage: its settings come from common:, the stage and --set
            raise TailkdError(f"recipe {path}, stage {name!r}: {exc}") from None
    recipe = Recipe(root, configs, _mapping(doc, "evaluate", path), _mapping(doc, "compare", path))
    if recipe.evaluate is not None:
        recipe.eval_config(configs[0], with_run=False)  # its keys and values, before any stage runs
    if recipe.compare is not None:
        recipe.compare_config()
    return recipe


def saved_change(cfg: DistillConfig) -> tuple[str, object, object] | None:
    """The first setting in which the ``config.yaml`` saved in ``cfg``'s run folder differs from ``cfg``: (dotted
    key, saved value, ``cfg``'s value); None if the folder holds no config.yaml or they agree. Not compared: the
    settings that change nothing a finished run computed (`tailkd.runs.RESUME_FREE_KEYS`: device, checkpointing,
    logging, loss kernels, ...) except the schedule's length and held-out points (train.max_steps and
    train.eval_every, which a resume may change but a finished run cannot); train.max_steps neither when
    train.epochs sets it from the data."""
    from tailkd.runs import RESUME_FREE_KEYS, config_changes, saved_config

    run = Path(cfg.train.out_dir)
    saved = run / "config.yaml"
    if not saved.is_file():
        return None
    try:
        old = saved_config(saved)
    except TailkdError as exc:
        raise TailkdError(f"the run folder {run} has a damaged config.yaml ({exc}); delete {run} to run it "
                          "again") from None
    free = RESUME_FREE_KEYS - {"train.max_steps", "train.eval_every"}
    if cfg.train.epochs > 0:
        free = free | {"train.max_steps"}
    changed = config_changes(old, cfg, free)
    return (changed[0], old.get(changed[0]), flatten(to_dict(absolute_paths(cfg))).get(changed[0])) if changed else None


def finished(cfg: DistillConfig) -> bool:
    """Whether the stage's run wrote all its outputs: ``final/`` and then ``summary.json``, the last (a kill between
    them leaves a run that ``--resume`` completes, writing only the outputs)."""
    run = Path(cfg.train.out_dir)
    return (run / "final" / "config.json").is_file() and (run / "summary.json").is_file()


def check_chain(stages: list[DistillConfig]) -> None:
    """``TailkdError`` (one line) if a stage that starts from an earlier stage's ``final/`` has a run folder while
    that earlier stage is still to be trained (its ``final/`` missing, e.g. deleted to run it with new settings, or
    itself starting from such a stage): its work started from a student that is about to be replaced. Checked
    before any stage runs."""
    pending = set()  # the final/ folders this invocation will (re)make
    for cfg in stages:
        run = Path(cfg.train.out_dir)
        start = Path(cfg.student.path) if cfg.student.path else None
        if start in pending and run.is_dir() and any(run.iterdir()):
            raise TailkdError(f"stage {run.name} ({run}) was started from {start}, which is to be trained again; "
                              f"delete {run} too, to run it from the new student, or choose another --out")
        if start in pending or not finished(cfg):
            pending.add(run / "final")


# --------------------------------------------------------------------------- evaluations made with known settings


def result_settings(config, section: str) -> dict:
    """What an evaluation's (``eval``) or the teacher analysis's (``analyze``) numbers depend on: every setting but
    the device and the paths of its run; the paths of its teacher and data absolute (`absolute_settings`)."""

    drop = {f"{section}.device", f"{section}.out", f"{section}.student"}
    flat = {k: v for k, v in flatten(to_dict(config)).items() if k not in drop}
    return json.loads(json.dumps(absolute_settings(flat)))


def absolute_settings(settings: dict) -> dict:
    """``settings`` (flat, `result_settings`) with the path settings absolute (`tailkd.config.absolute_path`), as the
    runs' config.yaml hold them: the same reproduction or recipe continued from another folder spells its teacher
    and data otherwise (w1/teacher for teacher). A saved file's relative paths (an older tailkd) are read against the
    working directory, as an older relative config.yaml is."""
    return {k: absolute_path(v) if k in PATH_KEYS and k != "loss.module" else v for k, v in settings.items()}


def _settings_path(result: Path) -> Path:
    return result.with_name(f"{result.stem}.settings.json")  # RUN/eval.json -> RUN/eval.settings.json


def write_settings(result: Path, settings: dict) -> None:
    """Save ``settings`` (`result_settings`) beside ``result``: ``RUN/eval.json`` -> ``RUN/eval.settings.json``."""
    from tailkd.checkpoint import atomic_write_text

    result.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(_settings_path(result), jsonfile.dumps(settings, indent=1))


def redo_result(result: Path, settings: dict) -> None:
    """Before ``result`` is made: a result without trusted settings is removed, then the settings are written, so
    an interrupted evaluation never leaves an old result beside new settings."""
    result.unlink(missing_ok=True)
    write_settings(result, settings)


def saved_settings(result: Path) -> dict | None:
    """The settings saved beside ``result`` (eval.json, teacher_analysis.json) if both exist, else None: not done
    (a result without its settings — an older tailkd's, or one ``tailkd eval`` wrote — is done again)."""
    path = _settings_path(result)
    if not (result.is_file() and path.is_file()):
        return None
    try:
        saved = jsonfile.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # ValueError: not UTF-8 or not JSON; Recursion: nested too deep
        return None  # a damaged settings file: the result cannot be trusted, so it is made again
    return saved if isinstance(saved, dict) else None


def first_change(saved: dict, planned: dict) -> tuple[str, object, object] | None:
    """The first setting in which ``saved`` and ``planned`` (`result_settings`) differ: (key, saved, planned)."""
    saved = absolute_settings(saved)  # a file saved with relative paths (before they were saved absolute)
    for key in [*planned, *(k for k in saved if k not in planned)]:
        if saved.get(key) != planned.get(key):
            return key, saved.get(key), planned.get(key)
    return None


def run_stages(stages: list[DistillConfig]) -> list[dict]:
    """Run each stage's distillation in order: a `finished` stage is skipped (``TailkdError`` if it was
    run with other settings: `saved_change`), one with a run folder is resumed (distill refuses a changed config);
    before any runs, `check_chain` refuses a stage started from an earlier stage that is to be trained again.
    Stops after a stage that was stopped (a signal, ``train.stop_after``): its summary is the last."""
    from tailkd.train import distill

    check_chain(stages)
    for cfg in stages:  # every finished stage, before any stage runs
        change = saved_change(cfg) if finished(cfg) else None
        if change is not None:
            run, (key, old, new) = Path(cfg.train.out_dir), change
            raise TailkdError(f"stage {run.name} ({run}) finished with {key}={old!r}, but now gives {new!r}; "
                              f"delete {run} to run it again with the new settings, or choose another --out")
    summaries = []
    for cfg in stages:
        run = Path(cfg.train.out_dir)
        if finished(cfg):
            print(f"stage {run.name}: already done ({run / 'final'})")
            summaries.append({"run": str(run), "final": str(run / "final"), "skipped": True})
            continue
        cfg.train.resume = run.exists() and (run / "config.yaml").exists()
        print(f"stage {run.name}: {'resuming' if cfg.train.resume else 'starting'} ({cfg.data.task}, {cfg.loss.name})")
        summaries.append(distill(cfg))
        if summaries[-1].get("stopped"):
            break
    return summaries


def check_evaluations(recipe: Recipe) -> None:
    """``TailkdError`` (one line) if an evaluation on disk of a finished stage was made with settings other than
    those the recipe's ``evaluate:`` now gives (its settings file, `saved_settings`). Checked before any stage
    runs. An evaluation without its settings (an older tailkd's, or one ``tailkd eval`` wrote) is made again, as is
    that of a stage trained (again) by this invocation."""
    for cfg in recipe.stages:
        out = recipe.eval_out(cfg)
        saved = saved_settings(out) if finished(cfg) else None
        change = None if saved is None else first_change(saved, result_settings(recipe.eval_config(cfg), "eval"))
        if change is not None:
            key, old, new = change
            raise TailkdError(f"{out} was made with {key}={old!r}, but the recipe's evaluate now gives {new!r}; "
                              f"delete {out} to evaluate again with these settings, or choose another --out")


def run_recipe(path: str | Path, out_dir: str | None = None, overrides: dict | None = None) -> list[dict]:
    """Run every stage in order, then evaluate each stage and compare them (when the recipe says so); returns the
    stage summaries."""
    from tailkd import commands

    recipe = read_recipe(path, out_dir, overrides)
    if recipe.evaluate is not None:
        check_evaluations(recipe)
    summaries = run_stages(recipe.stages)
    if summaries[-1].get("stopped"):
        return summaries
    if recipe.evaluate is not None:
        for cfg, summary in zip(recipe.stages, summaries):
            out, ev = recipe.eval_out(cfg), recipe.eval_config(cfg)
            if summary.get("skipped") and saved_settings(out) is not None:
                print(f"stage {Path(cfg.train.out_dir).name}: evaluation already done ({out})")
                continue
            print(f"stage {Path(cfg.train.out_dir).name}: evaluating {Path(cfg.train.out_dir) / 'final'}")
            redo_result(out, result_settings(ev, "eval"))
            commands.evaluate(ev)
    if recipe.compare is not None:
        commands.compare(recipe.compare_config())
    return summaries
