"""Multi-stage recipes: several distillation runs in one YAML, each stage starting from the last's student.

The paper's supervised recipe (§3.4) is two stages: pretraining distillation on domain text, then
distillation on prompt/response pairs starting from the first stage's student. A recipe file::

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

Every stage is a plain `DistillConfig` (unknown keys are errors). A stage after the first with no
``student.path`` starts from the previous stage's ``final/``. Re-running a recipe skips stages whose
``final/`` exists and resumes a stage that has checkpoints, so an interrupted recipe continues.
"""

from __future__ import annotations

from pathlib import Path

from tailkd.config import DistillConfig, from_dict, load_yaml, merge
from tailkd.errors import TailkdError

RECIPE_KEYS = {"out_dir", "common", "stages"}


def load_recipe(path: str | Path, out_dir: str | None = None) -> list[DistillConfig]:
    """The stage configs of a recipe file, validated, with out_dir and student chaining resolved."""
    doc = load_yaml(path)
    unknown = sorted(set(doc) - RECIPE_KEYS)
    if unknown:
        raise TailkdError(f"unknown recipe key {unknown[0]!r} in {path}; valid keys: out_dir, common, stages")
    stages = doc.get("stages")
    if not isinstance(stages, list) or not stages:
        raise TailkdError(f"recipe {path} needs a non-empty list under 'stages'")
    root = Path(out_dir or doc.get("out_dir") or "runs/recipe")
    common = doc.get("common") or {}
    configs, names = [], set()
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise TailkdError(f"recipe {path}: stage {i} must be a mapping of config sections")
        stage = dict(stage)
        name = str(stage.pop("name", f"stage{i + 1}"))
        if name in names:
            raise TailkdError(f"recipe {path}: two stages are named {name!r}; give each stage its own name")
        names.add(name)
        cfg = from_dict(DistillConfig, merge(common, stage))
        cfg.train.out_dir = str(root / name)
        if i > 0 and not cfg.student.path:
            cfg.student.path = str(Path(configs[-1].train.out_dir) / "final")
        configs.append(cfg.validate())
    return configs


def run_recipe(path: str | Path, out_dir: str | None = None) -> list[dict]:
    """Run every stage in order; returns the stage summaries."""
    from tailkd.train import distill

    summaries = []
    for cfg in load_recipe(path, out_dir):
        run = Path(cfg.train.out_dir)
        if (run / "final" / "config.json").exists():
            print(f"stage {run.name}: already done ({run / 'final'})")
            summaries.append({"run": str(run), "final": str(run / "final"), "skipped": True})
            continue
        cfg.train.resume = run.exists() and (run / "config.yaml").exists()
        print(f"stage {run.name}: {'resuming' if cfg.train.resume else 'starting'} ({cfg.data.task}, {cfg.loss.name})")
        summaries.append(distill(cfg))
        if summaries[-1].get("stopped"):
            break
    return summaries
