"""TAD vs KD in a plain torch loop, written apart from tailkd's trainer and losses (issue 14's discrepancy).

The outside check that found TAD 3.4% below KD was a short plain script. This is one like it: the same teacher
(SmolLM2-135M-Instruct), the same 6-layer student (tailkd's builder: attention copied, MLP random, embeddings
frozen), the built-in news corpus as one continuous token stream cut into 256-token rows, 4 random rows per step,
AdamW(lr 1e-4, betas (0.9, 0.999), torch's default weight decay), a constant learning rate, no clipping, float32,
full logits, and the losses written out from the paper (Eq. 2-3) here, not imported: KD = KL(p_T || p_S), TAD =
D_KL1 + β(X)·α^T·D_KL2 with β(X) = β / (mean α^T over the row). ``--clm`` adds the student's cross-entropy (Eq. 4).
Held-out KL on the stream's last 5% of rows and on Python's documentation (other source), every 10 steps.

    .venv/bin/python scripts/plain_tad_kd.py --out runs/plain --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tailkd.corpus import default_corpus_files, iter_documents, python_docs_corpus
from tailkd.models import load_teacher
from tailkd.student import build_student

SEQ, BATCH, STEPS, LR, EVAL_ROWS = 256, 4, 50, 1e-4, 32


def stream_rows(paths, tokenizer) -> torch.Tensor:
    """Every document's tokens, concatenated without separators, cut into rows of SEQ + 1 (inputs and targets)."""
    ids = [i for doc in iter_documents(paths) for i in tokenizer(doc, add_special_tokens=False)["input_ids"]]
    n = len(ids) // (SEQ + 1)
    return torch.tensor(ids[: n * (SEQ + 1)]).view(n, SEQ + 1)


def kl_per_token(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """KL(p_T || p_S) per position from logits [B, T, V]."""
    logp, logq = F.log_softmax(t, -1), F.log_softmax(s, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def tad_per_token(s: torch.Tensor, t: torch.Tensor, k: int = 10, beta: float = 2.0) -> torch.Tensor:
    """Paper Eq. 2-3 per position: D_KL1 over the teacher's top-K and the (K+1)st rest bucket, plus
    β(X)·α^T·KL(p̃_T || p̃_S) over the renormalised tails, β(X) = β / (row mean of α^T)."""
    logp, logq = F.log_softmax(t, -1), F.log_softmax(s, -1)
    p, q = logp.exp(), logq.exp()
    top = logp.topk(k, -1).indices
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, top, True)
    p_top, q_top = p.gather(-1, top), q.gather(-1, top)
    alpha_t = (1 - p_top.sum(-1)).clamp_min(1e-30)
    alpha_s = (1 - q_top.sum(-1)).clamp_min(1e-30)
    d_kl1 = (p_top * (p_top.log() - q_top.log())).sum(-1) + alpha_t * (alpha_t.log() - alpha_s.log())
    log_pt = logp - alpha_t.log()[..., None]  # log p̃_T on the tail (the top-K entries are masked out below)
    log_qt = logq - alpha_s.log()[..., None]  # log p̃_S
    d_kl2 = torch.where(in_top, 0.0, log_pt.exp() * (log_pt - log_qt)).sum(-1)
    beta_x = beta / alpha_t.detach().mean(-1, keepdim=True)  # [B, 1]: per row (sequence)
    return d_kl1 + beta_x * alpha_t * d_kl2


@torch.no_grad()
def heldout_kl(student, teacher, rows: torch.Tensor) -> float:
    total = 0.0
    for i in range(0, len(rows), BATCH):
        x = rows[i:i + BATCH, :-1]
        total += kl_per_token(student(x).logits.float(), teacher(x).logits.float()).sum().item()
    return total / (len(rows) * SEQ)


def run(loss: str, seed: int, clm: bool, out: Path) -> dict:
    teacher, tokenizer = load_teacher("smollm2", device="cpu", dtype="fp32")
    teacher.eval().requires_grad_(False)
    student, _ = build_student(teacher, num_layers=6, freeze_embeddings=True, seed=seed)
    rows = stream_rows(default_corpus_files(), tokenizer)
    n_held = max(EVAL_ROWS, len(rows) // 20)
    train, held = rows[:-n_held], rows[-n_held:][:EVAL_ROWS]
    other = stream_rows([python_docs_corpus()], tokenizer)[:EVAL_ROWS]
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=LR, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(STEPS + 1):
        if step % 10 == 0:
            student.eval()
            curve.append({"step": step, "heldout_kl": heldout_kl(student, teacher, held),
                          "other_kl": heldout_kl(student, teacher, other)})
            student.train()
            print(loss, seed, curve[-1], flush=True)
        if step == STEPS:
            break
        batch = train[torch.randint(len(train), (BATCH,), generator=gen)]
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.no_grad():
            t = teacher(x).logits.float()
        s = student(x).logits.float()
        per_token = kl_per_token(s, t) if loss == "kd" else tad_per_token(s, t)
        objective = per_token.mean()
        if clm:
            objective = objective + F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()
    result = {"loss": loss, "seed": seed, "clm": clm, "curve": curve}
    (out / f"{loss}-s{seed}{'-clm' if clm else ''}.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/plain"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--clm", action="store_true", help="add the student's cross-entropy (paper Eq. 4)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())
    for seed in args.seeds:
        res = {loss: run(loss, seed, args.clm, args.out) for loss in ("kd", "tad")}
        for key in ("heldout_kl", "other_kl"):
            kd, tad = res["kd"]["curve"][-1][key], res["tad"]["curve"][-1][key]
            print(f"seed {seed} {key}: KD {kd:.3f} TAD {tad:.3f} ({100 * (tad / kd - 1):+.1f}%)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
