"""Which training setting decides whether TAD's held-out KL falls below KD's? (issue 14's discrepancy)

An outside 150-line script found TAD 3.4% below KD at step 50, where `tailkd distill` found a tie or KD slightly
ahead. The two differ in AdamW's β2 (0.999 vs tailkd's 0.95), the learning-rate schedule (constant vs warm-up +
cosine decay to 10%) and the rows (a continuous token stream vs documents closed by EOS), and maybe the precision
(tailkd autocasts to bf16 on a CPU with native bf16; a plain script computes in float32). This script trains KD
and TAD students under each setting with the same teacher, student, data and seeds, and writes a table of the
held-out KL on the training corpus's held-out split (at every evaluation) and on text from another source
(Python's documentation: `--heldout-data builtin:pydoc`, `tailkd.corpus.python_docs_corpus`).

    .venv/bin/python scripts/ablate_tad_kd.py --out runs/ablation --seeds 0 1
    .venv/bin/python scripts/ablate_tad_kd.py --out runs/ablation --settings default outside   # a subset

Runs already finished in --out are reused (the script resumes). Each run: SmolLM2-135M teacher, 6-layer student
(attention copied, MLP random, embeddings frozen), 4 x 256 tokens per step, lr 1e-4, 50 steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

COMMON = ["--steps", "50", "--seq-len", "256", "--batch-size", "4", "--lr", "1e-4", "--student.freeze_embeddings",
          "true", "--train.save_every", "0", "--train.keep_last", "1", "--train.eval_every", "10",
          "--data.eval_rows", "32"]
BETAS = ["--train.adam_betas", "0.9", "0.999"]
CONSTANT = ["--train.warmup_steps", "0", "--train.min_lr_ratio", "1"]
STREAM = ["--data.doc_eos", "false"]
NO_CLM = ["--loss.clm_weight", "0"]
# torch.optim.AdamW's default weight decay, no gradient clipping
PLAIN_ADAMW = ["--train.grad_clip", "0", "--train.weight_decay", "0.01"]
FP32 = ["--train.precision", "fp32"]  # tailkd's auto precision is bf16 autocast on a CPU with native bf16
SETTINGS = {
    "default": [],  # tailkd's defaults: betas (0.9, 0.95), 5 warm-up steps + cosine to 10%, EOS-closed documents
    "betas999": BETAS,
    "constant_lr": CONSTANT,
    "stream": STREAM,
    "outside": BETAS + CONSTANT + STREAM,  # the outside script's three choices together
    "outside-betas": CONSTANT + STREAM,
    "outside-constant": BETAS + STREAM,
    "outside-stream": BETAS + CONSTANT,
    "fp32": FP32,
    "outside-fp32": BETAS + CONSTANT + STREAM + FP32,
    "outside-first6": BETAS + CONSTANT + STREAM + ["--student.layers", "0", "1", "2", "3", "4", "5"],
    "outside-noclm": BETAS + CONSTANT + STREAM + NO_CLM,  # the divergence alone, without Eq. 4's CLM term
    "outside-noclip": BETAS + CONSTANT + STREAM + PLAIN_ADAMW,
    "noclip": ["--train.grad_clip", "0"],  # tailkd's defaults without gradient clipping
    "plain": BETAS + CONSTANT + STREAM + NO_CLM + PLAIN_ADAMW + FP32,  # what a plain torch script does
}


def run_one(tailkd: str, out: Path, setting: str, loss: str, seed: int) -> dict:
    """Train (unless finished), then evaluate on the other source; returns the run's numbers."""
    run = out / f"{setting}-{loss}-s{seed}"
    if not (run / "summary.json").is_file():
        cmd = [tailkd, "distill", "--out", str(run), "--loss", loss, "--seed", str(seed), "--overwrite",
               *COMMON, *SETTINGS[setting]]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    other_json = run / "eval_other.json"
    if not other_json.is_file():
        subprocess.run([tailkd, "eval", "--student", str(run / "final"), "--heldout-data", "builtin:pydoc",
                        "--max-rows", "32", "--out", str(other_json)], check=True, stdout=subprocess.DEVNULL)
    curve = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["kl"]) for r in curve if r.get("split") == "heldout"]
    other_result = json.loads(other_json.read_text())
    return {"setting": setting, "loss": loss, "seed": seed, "curve": evals, "heldout_kl": evals[-1][1],
            "other_kl": other_result["kl"], "other_ece": other_result["student_full_ece"]}


def table(results: list[dict]) -> str:
    """Markdown: per setting, KD and TAD held-out KL (mean over seeds) and TAD's relative difference per seed."""
    lines = ["| setting | KD held-out KL | TAD held-out KL | TAD vs KD (per seed) | KD other-source KL | "
             "TAD other-source KL | TAD vs KD (per seed) |", "|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        rows = {(r["loss"], r["seed"]): r for r in results if r["setting"] == setting}
        seeds = sorted({s for (_, s) in rows if ("kd", s) in rows and ("tad", s) in rows})
        if not seeds:
            continue
        cells = [setting]
        for key in ("heldout_kl", "other_kl"):
            kd = [rows["kd", s][key] for s in seeds]
            tad = [rows["tad", s][key] for s in seeds]
            rel = ", ".join(f"{100 * (t / k - 1):+.1f}%" for k, t in zip(kd, tad))
            cells += [f"{statistics.fmean(kd):.3f}", f"{statistics.fmean(tad):.3f}", rel]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/ablation"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--tailkd", default=str(Path(sys.executable).with_name("tailkd")))
    args = ap.parse_args(argv)
    results = []
    for seed in args.seeds:
        for setting in args.settings:
            for loss in ("kd", "tad"):
                results.append(run_one(args.tailkd, args.out, setting, loss, seed))
                (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
