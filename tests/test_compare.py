"""tailkd.compare and `tailkd compare`: run folders side by side, relative change, Figure 1."""

import json
import math

import bounds as B
import loss_bounds as LB
import pytest
from test_analysis import assert_png
from test_evaluate import one_line_error

from tailkd.cli import main
from tailkd.compare import (
    check_task_setups,
    compare_runs,
    fidelity_diversity_points,
    load_run,
    loss_labels,
    markdown_table,
    read_metrics,
    read_task_accuracies,
    read_task_setups,
    relative_change,
    task_summary,
)
from tailkd.errors import TailkdError


def make_run(root, name, *, loss, kls, ppl, agreement, tokens_per_eval=1000, full_ece=None, seconds=75.0,
             flops=2.5e15, finished=True):
    """A run folder in the layout `tailkd distill` writes (metrics.jsonl, summary.json, config.yaml)."""
    run = root / name
    run.mkdir(parents=True)
    lines = []
    for i, kl in enumerate(kls):
        lines.append({"step": i * 10, "split": "heldout", "tokens": i * tokens_per_eval, "kl": kl, "rkl": kl * 1.1,
                      "student_ppl": ppl + (len(kls) - 1 - i), "agreement": agreement - 0.01 * (len(kls) - 1 - i),
                      "student_clm": math.log(ppl)})
        lines.append({"step": i * 10 + 1, "split": "train", "tokens": i * tokens_per_eval + 100, "loss": 9.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "config.yaml").write_text(f"loss:\n  name: {loss}\n")
    if finished:
        summary = {"tokens": (len(kls) - 1) * tokens_per_eval, "train_seconds": seconds, "loss": loss,
                   "flops": {"total": flops, "pflops_per_1m_tokens": 9.2}}
        (run / "summary.json").write_text(json.dumps(summary))
    if full_ece is not None:
        (run / "eval.json").write_text(json.dumps({"student_full_ece": full_ece, "kl": 123.0}))
    return run


def test_relative_change_closed_form():
    assert relative_change(0.5, 1.0) == pytest.approx(100 * math.log(0.5))
    assert relative_change(2.0, 2.0) == 0.0
    assert relative_change(None, 1.0) is None and relative_change(1.0, 0.0) is None
    assert relative_change(0.0, 1.0) is None  # not positive: no logarithm (an accuracy of 0 on a task)


def test_load_run_reads_the_final_heldout_row(tmp_path):
    run = make_run(tmp_path, "kd", loss="kd", kls=[3.0, 2.0, 1.5], ppl=40.0, agreement=0.6, full_ece=0.2)
    r = load_run(run)
    assert r["curve"] == ([0, 1000, 2000], [3.0, 2.0, 1.5])
    assert (r["kl"], r["ppl"], r["agreement"], r["full_ece"]) == (1.5, 40.0, 0.6, 0.2)
    assert (r["tokens"], r["train_seconds"], r["flops"], r["loss"], r["finished"]) == (2000, 75.0, 2.5e15, "kd", True)


def test_compare_table_and_figure(tmp_path, capsys):
    kd = make_run(tmp_path, "kd", loss="kd", kls=[3.0, 2.0, 1.6], ppl=40.0, agreement=0.50, full_ece=0.20)
    tad = make_run(tmp_path, "tad", loss="tad", kls=[3.0, 1.8, 0.8], ppl=20.0, agreement=0.55, full_ece=0.10)
    part = make_run(tmp_path, "partial", loss="rkl", kls=[3.0, 2.5], ppl=50.0, agreement=0.4, finished=False)
    out = tmp_path / "cmp"
    assert main(["compare", str(kd), str(tad), str(part), "--baseline", str(kd), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert md == capsys.readouterr().out.split(f"saved {out}")[0].rstrip("\n") + "\n"
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert header[:6] == ["run", "loss", "tokens", "held-out KL", "Rel held-out KL", "perplexity"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in md.splitlines()[2:] if line.startswith("|")}
    tad_row = dict(zip(header, rows["tad"]))
    assert tad_row["held-out KL"] == "0.8000"
    assert tad_row["Rel held-out KL"] == f"{100 * math.log(0.8 / 1.6):+.2f}"  # -69.31
    assert tad_row["Rel perplexity"] == f"{100 * math.log(20 / 40):+.2f}"
    assert tad_row["Full-ECE"] == "0.1000" and tad_row["Rel Full-ECE"] == f"{100 * math.log(0.5):+.2f}"
    assert tad_row["Rel agreement"] == f"{100 * math.log(0.55 / 0.50):+.2f}"
    assert tad_row["train time"] == "0:01:15" and tad_row["PFLOPs"] == "2.5" and tad_row["tokens"] == "2,000"
    base_row = dict(zip(header, rows["kd (baseline)"]))
    assert base_row["Rel held-out KL"] == "+0.00"
    part_row = dict(zip(header, rows["partial (unfinished)"]))
    assert part_row["Full-ECE"] == "—" and part_row["PFLOPs"] == "—" and part_row["held-out KL"] == "2.5000"
    assert_png(out / "heldout_kl.png")
    saved = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in saved] == ["kd", "tad", "partial"]


def test_the_loss_column_names_the_settings_in_which_runs_of_one_loss_differ(tmp_path):
    """Runs of one loss with other knobs (TAD's k, a loss of one's own's options) read alike in the loss column;
    it now adds the loss settings that differ between runs of the same loss, and only those."""
    import yaml

    runs = []
    settings = (("tad16", {"name": "tad", "k": 16, "beta": 2.0}), ("tad64", {"name": "tad", "k": 64, "beta": 2.0}),
                ("tad", {"name": "tad", "beta": 2.0}),  # no k in its config.yaml: k differs, but it has none to name
                ("kd", {"name": "kd", "k": 10}), ("a3", {"name": "amari", "options": {"alpha": 0.3}}),
                ("a5", {"name": "amari", "options": {"alpha": 0.5}}))
    for name, loss in settings:
        run = make_run(tmp_path, name, loss=loss["name"], kls=[3.0, 2.0], ppl=30.0, agreement=0.5)
        (run / "config.yaml").write_text(yaml.safe_dump({"loss": loss, "train": {"lr": 1e-3}}))
        runs.append(str(run))
    out = tmp_path / "cmp"
    assert main(["compare", *runs, "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    cells = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in md.splitlines()[2:]
             if line.startswith("|")}
    assert cells == {"tad16": "tad (k=16)", "tad64": "tad (k=64)", "tad": "tad", "kd": "kd",
                     "a3": "amari (options.alpha=0.3)", "a5": "amari (options.alpha=0.5)"}
    saved = {r["name"]: r for r in json.loads((out / "compare.json").read_text())}
    assert saved["a3"]["loss"] == "amari" and saved["a3"]["loss_settings"] == {"options.alpha": 0.3}


def test_train_time_is_hours_minutes_seconds(tmp_path):
    """The train time column is h:mm:ss of summary.json's train_seconds, rounded to the second: 3725 s = 1 h 2 min
    5 s; 36059.6 s rounds to 36060 s = 10 h 1 min 0 s."""
    for seconds, shown in ((3725.0, "1:02:05"), (36059.6, "10:01:00"), (59.4, "0:00:59")):
        run = make_run(tmp_path / str(seconds), "r", loss="kd", kls=[2.0, 1.0], ppl=10.0, agreement=0.5,
                       seconds=seconds)
        _, rows = table_rows(markdown_table([load_run(run)], None))
        assert rows["r"]["train time"] == shown


def test_of_two_eval_files_holding_one_kind_the_first_is_read(tmp_path):
    """read_evals: of RUN/eval.json and RUN/generate.json, in that order, the first holding held-out results and the
    first holding generation results (``"mode": "generate"``) are read."""
    run = make_run(tmp_path, "r", loss="kd", kls=[2.0, 1.0], ppl=10.0, agreement=0.5, full_ece=0.2)
    (run / "generate.json").write_text(json.dumps({"student_full_ece": 0.7}))  # held-out results in both
    assert load_run(run)["full_ece"] == 0.2
    write_generation(run, "eval.json", rougeL=0.31)
    write_generation(run, "generate.json", rougeL=0.99)  # generation results in both
    assert load_run(run)["rougeL"] == 0.31


def test_a_baseline_later_in_the_list_is_the_one_compared_against(tmp_path):
    """--baseline naming the second run: that run is marked and every Rel is against it (its own Rel +0.00, the
    first run's 100·ln(2.0 / 0.5))."""
    a = make_run(tmp_path, "a", loss="kd", kls=[3.0, 2.0], ppl=10.0, agreement=0.5)
    b = make_run(tmp_path, "b", loss="tad", kls=[3.0, 0.5], ppl=8.0, agreement=0.6)
    res = compare_runs([a, b], baseline=b, out_dir=tmp_path / "o")
    _, rows = table_rows(res["markdown"])
    assert set(rows) == {"a", "b (baseline)"}
    assert rows["b (baseline)"]["Rel held-out KL"] == "+0.00"
    assert rows["a"]["Rel held-out KL"] == f"{100 * math.log(2.0 / 0.5):+.2f}"


def test_the_tokens_column_is_the_summarys_trained_tokens(tmp_path):
    """tokens: summary.json's trained tokens, which may lie past the last held-out row; a run without summary.json
    (unfinished) shows its last held-out row's."""
    run = make_run(tmp_path, "r", loss="kd", kls=[3.0, 2.0], ppl=10.0, agreement=0.5)  # held-out rows at 0, 1000
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "tokens": 1500}))
    part = make_run(tmp_path, "p", loss="kd", kls=[3.0, 2.5, 2.2], ppl=10.0, agreement=0.5, finished=False)
    _, rows = table_rows(markdown_table([load_run(run), load_run(part)], None))
    assert rows["r"]["tokens"] == "1,500" and rows["p (unfinished)"]["tokens"] == "2,000"


def test_rouge_alone_still_shows_the_generation_columns(tmp_path):
    """A run whose generation results have ROUGE-L but no diversity (``--samples 0``) has generation results: the
    table shows ROUGE-L (Distinct-2 and Self-BLEU "—"), and there is no scatter (it needs all three)."""
    run = make_run(tmp_path, "greedy", loss="rkl", kls=[3.0, 1.4], ppl=35.0, agreement=0.55)
    write_generation(run, rougeL=0.33)
    res = compare_runs([run], out_dir=tmp_path / "o")
    _, rows = table_rows(res["markdown"])
    greedy = rows["greedy"]
    assert (greedy["ROUGE-L"], greedy["Distinct-2"], greedy["Self-BLEU"]) == ("0.3300", "—", "—")
    assert res["fidelity_plot"] is None


def test_task_mean_and_rel_bar_with_an_accuracy_of_zero():
    """task_summary: the mean accuracy is still the plain mean ((0 + 0.5) / 2), Rel̄ is None when a task's accuracy
    is 0 (no logarithm), and with both positive it is the mean of 100·ln(acc / acc_baseline)."""
    base = {"tasks": {"a": 0.4, "b": 0.5}}
    assert task_summary({"tasks": {"a": 0.0, "b": 0.5}}, base, ["a", "b"]) == (0.25, None)
    mean, rel_bar = task_summary({"tasks": {"a": 0.2, "b": 0.5}}, base, ["a", "b"])
    assert mean == pytest.approx(0.35) and rel_bar == pytest.approx(100 * math.log(0.2 / 0.4) / 2)


def test_compare_without_baseline_and_a_baseline_not_in_the_list(tmp_path):
    a = make_run(tmp_path, "a", loss="kd", kls=[2.0, 1.0], ppl=10.0, agreement=0.5)
    b = make_run(tmp_path, "b", loss="tad", kls=[2.0, 0.5], ppl=8.0, agreement=0.6)
    res = compare_runs([a], out_dir=tmp_path / "o1")
    assert "Rel" not in res["markdown"]
    res = compare_runs([a], baseline=b, out_dir=tmp_path / "o2")
    assert [r["name"] for r in res["records"]] == ["b", "a"]
    assert f"{100 * math.log(1.0 / 0.5):+.2f}" in res["markdown"]


def test_a_baseline_outside_the_list_with_a_run_s_folder_name(tmp_path):
    """`tailkd compare x/kd --baseline y/kd`: two runs named kd. Both keep a distinct name (their paths), so the
    figure has both curves (keyed by name) and the table tells them apart."""
    kx = make_run(tmp_path / "x", "kd", loss="kd", kls=[2.0, 1.0], ppl=10.0, agreement=0.5)
    ky = make_run(tmp_path / "y", "kd", loss="kd", kls=[2.0, 0.5], ppl=10.0, agreement=0.5)
    res = compare_runs([kx], baseline=ky, out_dir=tmp_path / "o")
    assert [r["name"] for r in res["records"]] == [str(ky), str(kx)]
    _, rows = table_rows(res["markdown"])
    assert rows[f"{ky} (baseline)"]["held-out KL"] == "0.5000" and rows[str(kx)]["held-out KL"] == "1.0000"


def write_generation(run, name="generate.json", **metrics):
    """The JSON `tailkd eval --generate --out RUN/<name>` writes: ``mode`` generate, ``student_*``/``teacher_*``."""
    result = {"mode": "generate", "examples": 20, "teacher_rougeL": 0.9,
              **{f"student_{k}": v for k, v in metrics.items()}}
    (run / name).write_text(json.dumps(result))


def table_rows(md):
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    return header, {line.split("|")[1].strip(): dict(zip(header, [c.strip() for c in line.strip("|").split("|")]))
                    for line in md.splitlines()[2:] if line.startswith("|")}


def test_compare_fidelity_diversity_columns_and_scatter(tmp_path, capsys):
    """Runs with `tailkd eval --generate` results (in RUN/generate.json, or RUN/eval.json when that holds them):
    ROUGE-L, Distinct-2 and Self-BLEU columns and one scatter point each; a run without diversity (no samples) or
    without any generation result is left out of the scatter."""
    kd = make_run(tmp_path, "kd", loss="kd", kls=[3.0, 1.6], ppl=40.0, agreement=0.5, full_ece=0.2)
    write_generation(kd, rougeL=0.31, distinct_2=0.62, self_bleu=0.40, exact_match=0.1)  # beside eval.json
    drkl = make_run(tmp_path, "drkl", loss="drkl", kls=[3.0, 1.2], ppl=30.0, agreement=0.6)
    write_generation(drkl, "eval.json", rougeL=0.35, distinct_2=0.55, self_bleu=0.50)
    greedy = make_run(tmp_path, "greedy", loss="rkl", kls=[3.0, 1.4], ppl=35.0, agreement=0.55)
    write_generation(greedy, rougeL=0.33)  # --samples 0: no diversity
    plain = make_run(tmp_path, "plain", loss="tad", kls=[3.0, 1.0], ppl=20.0, agreement=0.7, full_ece=0.1)
    out = tmp_path / "cmp"
    assert main(["compare", str(kd), str(drkl), str(greedy), str(plain), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"saved {out / 'fidelity_diversity.png'}" in printed
    header, rows = table_rows((out / "compare.md").read_text())
    assert header[-5:] == ["ROUGE-L", "Distinct-2", "Self-BLEU", "train time", "PFLOPs"]
    assert (rows["kd"]["ROUGE-L"], rows["kd"]["Distinct-2"], rows["kd"]["Self-BLEU"]) == ("0.3100", "0.6200", "0.4000")
    assert rows["kd"]["Full-ECE"] == "0.2000"  # eval.json (held-out) and generate.json are both read
    assert (rows["drkl"]["ROUGE-L"], rows["drkl"]["Full-ECE"]) == ("0.3500", "—")
    assert (rows["greedy"]["ROUGE-L"], rows["greedy"]["Distinct-2"]) == ("0.3300", "—")
    assert rows["plain"]["ROUGE-L"] == "—" and rows["plain"]["Full-ECE"] == "0.1000"
    saved = {r["name"]: r for r in json.loads((out / "compare.json").read_text())}
    assert (saved["kd"]["rougeL"], saved["kd"]["distinct_2"], saved["kd"]["self_bleu"]) == (0.31, 0.62, 0.40)
    assert saved["plain"]["rougeL"] is None
    records = [load_run(r) for r in (kd, drkl, greedy, plain)]
    assert fidelity_diversity_points(records) == {"kd": {"rougeL": 0.31, "distinct_2": 0.62, "self_bleu": 0.40},
                                                  "drkl": {"rougeL": 0.35, "distinct_2": 0.55, "self_bleu": 0.50}}
    assert_png(out / "fidelity_diversity.png")


def test_compare_without_generation_results_has_no_scatter(tmp_path):
    a = make_run(tmp_path, "a", loss="kd", kls=[2.0, 1.0], ppl=10.0, agreement=0.5, full_ece=0.3)
    res = compare_runs([a], out_dir=tmp_path / "o")
    assert res["fidelity_plot"] is None and not (tmp_path / "o" / "fidelity_diversity.png").exists()
    assert "ROUGE-L" not in res["markdown"] and res["records"][0]["rougeL"] is None


def test_compare_replaces_its_output_folder_whole(tmp_path, capsys, monkeypatch):
    """compare's output is one folder written at once (as select-data's): each of its files was replaced on its own,
    so a compare without generation results into the folder of one with them kept the old fidelity_diversity.png
    (of other runs) beside the new table, and Ctrl-C / SIGTERM between the files left a new compare.md beside the
    old compare.json. A folder that is not a compare output (one of the runs compared) is refused, untouched."""
    kd = make_run(tmp_path, "kd", loss="kd", kls=[3.0, 1.6], ppl=40.0, agreement=0.5)
    write_generation(kd, rougeL=0.31, distinct_2=0.62, self_bleu=0.40)
    tad = make_run(tmp_path, "tad", loss="tad", kls=[3.0, 1.0], ppl=20.0, agreement=0.7)
    out = tmp_path / "cmp"
    assert main(["compare", str(kd), str(tad), "--out", str(out)]) == 0 and (out / "fidelity_diversity.png").is_file()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import tailkd.plots

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # stopped after compare.md is written, at the second file
        m.setattr(tailkd.plots, "plot_heldout_kl", stopped)
        with pytest.raises(KeyboardInterrupt):
            compare_runs([tad], out_dir=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp", "kd", "tad"]  # no temporary folder left
    capsys.readouterr()
    assert main(["compare", str(tad), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "heldout_kl.png"]
    in_run = sorted(p.name for p in tad.iterdir())
    assert main(["compare", str(kd), str(tad), "--out", str(tad)]) == 2
    one_line_error(capsys.readouterr().err, f"refusing to replace {tad}: it exists and is not a tailkd compare output")
    assert sorted(p.name for p in tad.iterdir()) == in_run


def test_compare_writes_into_an_existing_empty_folder(tmp_path):
    """--out may name a folder that exists and is empty (check_compare_out: new, empty or an earlier compare)."""
    a = make_run(tmp_path, "a", loss="kd", kls=[2.0, 1.0], ppl=10.0, agreement=0.5)
    (tmp_path / "empty").mkdir()
    res = compare_runs([a], out_dir=tmp_path / "empty")
    assert (tmp_path / "empty" / "compare.md").read_text() == res["markdown"]


def test_compare_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "notarun").mkdir()
    assert main(["compare", str(tmp_path / "notarun"), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys.readouterr().err, "metrics.jsonl")
    run = make_run(tmp_path, "broken", loss="kd", kls=[1.0], ppl=3.0, agreement=0.5)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write("{not json\n")
    assert main(["compare", str(run), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys.readouterr().err, "metrics.jsonl:3")
    run = make_run(tmp_path, "deep", loss="kd", kls=[1.0], ppl=3.0, agreement=0.5)
    with open(run / "metrics.jsonl", "a") as fh:  # JSON nested past what Python's parser reads: a RecursionError
        fh.write("[" * 100_000 + "]" * 100_000 + "\n")
    assert main(["compare", str(run), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys.readouterr().err, "metrics.jsonl:3 is not valid JSON")
    run = make_run(tmp_path, "deep_eval", loss="kd", kls=[1.0], ppl=3.0, agreement=0.5)
    (run / "eval.json").write_text("[" * 100_000 + "]" * 100_000)  # the same in a run's eval.json
    assert main(["compare", str(run), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys.readouterr().err, "eval.json is not valid JSON (nested too deeply to read)")


def test_real_runs_eval_and_compare_end_to_end(tmp_path, capsys):
    """`tailkd distill` (tiny, kd and tad) -> `tailkd eval --student RUN/final` -> `tailkd compare`."""
    from tiny import make_teacher_dir, write_corpus

    teacher = make_teacher_dir(tmp_path / "teacher", train_steps=0)  # the plumbing is under test, not learning
    corpus = write_corpus(tmp_path / "corpus.txt")
    runs = {}
    for loss in ("kd", "tad"):
        run = tmp_path / loss
        assert main(["distill", "--teacher", str(teacher), "--data", str(corpus), "--data.cache_dir",
                     str(tmp_path / "cache"), "--student-layers", "2", "--seq-len", "32", "--batch-size", "4",
                     "--lr", "3e-3", "--train.warmup_steps", "2", "--data.eval_rows", "8", "--steps", "6",
                     "--train.eval_every", "3", "--loss", loss, "--train.precision", "fp32",  # eval runs in fp32
                     "--out", str(run)]) == 0
        # teacher, data, seq_len and the held-out split all come from RUN/config.yaml
        assert main(["eval", "--student", str(run / "final"), "--max-rows", "8", "--out", str(run / "eval.json")]) == 0
        runs[loss] = run
    ev = json.loads((runs["tad"] / "eval.json").read_text())
    final = load_run(runs["tad"])
    # the same 8 held-out rows as the trainer's, the same saved float32 weights: two float32 forwards, each within
    # the forward-error model of loss_bounds.lm_logits_err, the metrics within loss_bounds.heldout_bounds
    import torch
    from transformers import AutoModelForCausalLM

    from tailkd.commands import eval_rows
    from tailkd.config import DataConfig
    from tailkd.data import collate
    from tailkd.models import load_teacher

    teacher_model, tok = load_teacher(str(teacher), device="cpu", dtype="fp32")
    student = AutoModelForCausalLM.from_pretrained(runs["tad"] / "final", dtype=torch.float32).eval()
    rows = eval_rows(tok, DataConfig(paths=[str(corpus)], seq_len=32, cache_dir=str(tmp_path / "cache")), max_rows=8)
    bound = LB.two_forwards_heldout_bounds(student, teacher_model, collate(rows), len(tok))
    B.assert_within(ev["kl"], final["kl"], bound["kl"], msg="kl")
    B.assert_within(ev["student_ppl"], final["ppl"], bound["student_ppl"], msg="ppl")
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert main(["compare", str(runs["kd"]), str(runs["tad"]), "--baseline", str(runs["kd"]), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    tad_line = next(line for line in md.splitlines() if line.startswith("| tad "))
    assert f"{ev['student_full_ece']:.4f}" in tad_line and "0:00:0" in tad_line
    assert len(final["curve"][0]) == 3  # held-out KL before, at step 3 and at the end
    assert_png(out / "heldout_kl.png")


def write_lm_eval(run, accuracies: dict, extra: dict | None = None):
    """RUN/lm_eval.json as `tailkd lm-eval --out` saves lm-eval's results: {"results": {task: {"acc,none": ...}}}."""
    results = {t: {"alias": t, "acc,none": a, "acc_stderr,none": 0.01} for t, a in accuracies.items()}
    (run / "lm_eval.json").write_text(json.dumps({"results": {**results, **(extra or {})}, "n-samples": {}}))


def test_compare_lm_eval_accuracies_and_the_papers_rel_bar(tmp_path, capsys):
    """The paper's Table 1 Rel̄: the mean over tasks of 100·ln(acc / acc_baseline), over the tasks every run with
    results has; a perplexity task (no accuracy) and a task only one run has are left out of the mean."""
    kd = make_run(tmp_path, "kd", loss="kd", kls=[3.0, 1.6], ppl=40.0, agreement=0.5)
    tad = make_run(tmp_path, "tad", loss="tad", kls=[3.0, 1.4], ppl=30.0, agreement=0.55)
    clm = make_run(tmp_path, "clm", loss="clm", kls=[3.0, 2.4], ppl=60.0, agreement=0.4)
    ppl_task = {"tailkd_ppl": {"word_perplexity,none": 50.0, "bits_per_byte,none": 1.2}}
    write_lm_eval(kd, {"arc_easy": 0.40, "piqa": 0.60, "hellaswag": 0.30}, ppl_task)
    write_lm_eval(tad, {"arc_easy": 0.44, "piqa": 0.57, "hellaswag": 0.33})
    (clm / "lm_eval.json").write_text(json.dumps({"results": {"tailkd_gsm": {"exact_match,strict-match": 0.25},
                                                             "arc_easy": {"acc,none": 0.35},
                                                             "piqa": {"acc,none": 0.55}}}))
    assert load_run(clm)["tasks"] == {"tailkd_gsm": 0.25, "arc_easy": 0.35, "piqa": 0.55}
    out = tmp_path / "cmp"
    assert main(["compare", str(kd), str(tad), str(clm), "--baseline", str(kd), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    _, rows = table_rows(md.split("\n\n")[0])  # the main table (the per-task table follows the notes)
    rel_tad = (100 * math.log(0.44 / 0.40) + 100 * math.log(0.57 / 0.60)) / 2  # arc_easy and piqa: in every run
    rel_clm = (100 * math.log(0.35 / 0.40) + 100 * math.log(0.55 / 0.60)) / 2
    assert rows["tad"]["tasks: mean acc"] == f"{(0.44 + 0.57) / 2:.4f}"
    assert rows["tad"]["Rel̄ (tasks)"] == f"{rel_tad:+.2f}" and rows["clm"]["Rel̄ (tasks)"] == f"{rel_clm:+.2f}"
    assert rows["kd (baseline)"]["Rel̄ (tasks)"] == "+0.00"
    per_task = md.split("\n\n| run | ")[1].splitlines()
    assert per_task[0] == "arc_easy | piqa |"
    assert per_task[2] == "| kd | 0.4000 | 0.6000 |" and per_task[4] == "| clm | 0.3500 | 0.5500 |"
    saved = {r["name"]: r["tasks"] for r in json.loads((out / "compare.json").read_text())}
    assert saved["kd"] == {"arc_easy": 0.40, "piqa": 0.60, "hellaswag": 0.30}
    capsys.readouterr()
    # without lm-eval results nothing changes: no task columns
    assert main(["compare", str(make_run(tmp_path, "a", loss="kd", kls=[1.0], ppl=1.0, agreement=0.1)),
                 "--out", str(tmp_path / "cmp2")]) == 0
    assert "tasks" not in (tmp_path / "cmp2" / "compare.md").read_text()


def test_a_run_without_lm_eval_results_leaves_the_task_mean_to_the_others(tmp_path):
    """The task columns average over the tasks every run WITH results has: a third run without lm_eval.json neither
    empties that set nor removes the columns; its own cells are "—"."""
    kd = make_run(tmp_path, "kd", loss="kd", kls=[3.0, 1.6], ppl=40.0, agreement=0.5)
    tad = make_run(tmp_path, "tad", loss="tad", kls=[3.0, 1.4], ppl=30.0, agreement=0.55)
    plain = make_run(tmp_path, "plain", loss="rkl", kls=[3.0, 1.5], ppl=35.0, agreement=0.5)
    write_lm_eval(kd, {"arc_easy": 0.40, "piqa": 0.60})
    write_lm_eval(tad, {"arc_easy": 0.44, "piqa": 0.56})
    res = compare_runs([kd, tad, plain], out_dir=tmp_path / "o")
    _, rows = table_rows(res["markdown"].split("\n\n")[0])
    assert rows["tad"]["tasks: mean acc"] == f"{(0.44 + 0.56) / 2:.4f}"
    assert rows["plain"]["tasks: mean acc"] == "—"


def test_compare_lm_eval_runs_without_a_shared_task(tmp_path):
    """Runs scored on disjoint lm-eval tasks: the task columns stay, as "—", and the note names the tasks left out
    (they vanished from the table without a word); a task only one run has is named too."""
    a = make_run(tmp_path, "a", loss="kd", kls=[2.0, 1.0], ppl=10.0, agreement=0.5)
    b = make_run(tmp_path, "b", loss="tad", kls=[2.0, 0.8], ppl=9.0, agreement=0.6)
    write_lm_eval(a, {"arc_easy": 0.4})
    write_lm_eval(b, {"piqa": 0.6})
    md = compare_runs([a, b], baseline=a, out_dir=tmp_path / "o")["markdown"]
    _, rows = table_rows(md.split("\n\n")[0])
    assert rows["b"]["tasks: mean acc"] == "—" and rows["b"]["Rel̄ (tasks)"] == "—"
    assert "left out (not in every run's results): arc_easy, piqa." in md
    assert "\n\n| run |" not in md  # no per-task table without a task in it
    write_lm_eval(b, {"piqa": 0.6, "arc_easy": 0.5})
    md = compare_runs([a, b], baseline=a, out_dir=tmp_path / "o")["markdown"]
    _, rows = table_rows(md.split("\n\n")[0])
    assert rows["b"]["Rel̄ (tasks)"] == f"{100 * math.log(0.5 / 0.4):+.2f}"
    assert "left out (not in every run's results): piqa." in md


def test_compare_refuses_a_task_scored_with_other_shots_or_documents(tmp_path, capsys):
    """A task scored 5-shot in one run and 0-shot (or on a --limit of its documents) in another: its Rel̄ would
    compare two evaluations, so compare stops with a one-line error naming the task and both files."""
    def lm_eval_json(run, acc, shots, docs):
        (run / "lm_eval.json").write_text(json.dumps({
            "results": {"arc_easy": {"acc,none": acc}, "piqa": {"acc,none": 0.6}},
            "n-shot": {"arc_easy": shots, "piqa": 0},
            "n-samples": {"arc_easy": {"original": 2376, "effective": docs}, "piqa": {"original": 1838,
                                                                                     "effective": 1838}}}))

    a = make_run(tmp_path, "a", loss="kd", kls=[2.0, 1.0], ppl=10.0, agreement=0.5)
    b = make_run(tmp_path, "b", loss="tad", kls=[2.0, 0.8], ppl=9.0, agreement=0.6)
    lm_eval_json(a, 0.40, 0, 2376)
    lm_eval_json(b, 0.50, 0, 2376)
    assert "Rel̄" in compare_runs([a, b], baseline=a, out_dir=tmp_path / "o")["markdown"]  # the same setups: fine
    for shots, docs in ((5, 2376), (0, 100)):
        lm_eval_json(b, 0.50, shots, docs)
        assert main(["compare", str(a), str(b), "--baseline", str(a), "--out", str(tmp_path / "o")]) == 2
        one_line_error(capsys.readouterr().err, f"arc_easy was scored with {shots} shots on {docs} documents in {b}")


def test_compare_help_names_the_lm_eval_columns(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "tailkd lm-eval --out RUN/lm_eval.json" in " ".join(capsys.readouterr().out.split())


def test_compare_a_clm_run_without_a_teacher(tmp_path):
    """A `--loss clm` run without a teacher logs held-out student_clm / student_ppl but no kl: the table still shows
    its perplexity (and Rel perplexity), with KL and agreement "—" (its perplexity was "—" too)."""
    kd = make_run(tmp_path, "kd", loss="kd", kls=[3.0, 1.6], ppl=40.0, agreement=0.5)
    clm = tmp_path / "clm"
    clm.mkdir()
    rows = [{"step": s, "split": "heldout", "tokens": 1000 * s, "student_clm": math.log(p), "student_ppl": p,
             "student_acc": 0.3} for s, p in ((0, 90.0), (1, 50.0))]
    (clm / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (clm / "summary.json").write_text(json.dumps({"tokens": 1000, "train_seconds": 60.0, "loss": "clm"}))
    _, rows = table_rows(compare_runs([kd, clm], baseline=kd, out_dir=tmp_path / "o")["markdown"])
    assert rows["clm"]["perplexity"] == "50.00" and rows["clm"]["Rel perplexity"] == f"{100 * math.log(50 / 40):+.2f}"
    assert rows["clm"]["held-out KL"] == "—" and rows["clm"]["agreement"] == "—"
    assert load_run(clm)["curve"] == ([], [])


def test_heldout_kl_figure_leaves_out_a_run_without_kl(tmp_path, monkeypatch):
    """heldout_kl.png draws one line per run with held-out KL; a run without a teacher has none and got a legend
    entry without a line."""
    import tailkd.plots

    kd = make_run(tmp_path, "kd", loss="kd", kls=[3.0, 1.6], ppl=40.0, agreement=0.5)
    clm = tmp_path / "clm"
    clm.mkdir()
    (clm / "metrics.jsonl").write_text(json.dumps({"split": "heldout", "tokens": 0, "student_clm": 4.0}) + "\n")
    drawn = {}
    real = tailkd.plots.plot_heldout_kl
    monkeypatch.setattr(tailkd.plots, "plot_heldout_kl", lambda c, path: drawn.update(c) or real(c, path))
    compare_runs([kd, clm], out_dir=tmp_path / "o")
    assert drawn == {"kd": ([0, 1000], [3.0, 1.6])}


@pytest.mark.parametrize("name, content, needle", [
    ("metrics.jsonl", b"[1]\n", "metrics.jsonl:5 is not a JSON object"),
    ("metrics.jsonl", b"\xff\n", "metrics.jsonl is not UTF-8 text (line 5"),
    ("metrics.jsonl", b'{"step": 30, "split": "heldout", "tokens": 9, "kl": "low"}\n',
     'metrics.jsonl:5: "kl" is a str, not a number'),
    ("metrics.jsonl", b'{"step": 30, "split": "train", "tokens": [9], "loss": 1.0}\n',
     'metrics.jsonl:5: "tokens" is a list, not a number'),
    ("summary.json", b"[1]", "summary.json is not a JSON object (it holds a list)"),
    ("summary.json", b'{"tokens": "many"}', 'summary.json: "tokens" is a str, not a number'),
    ("summary.json", b'{"flops": 5}', 'summary.json: "flops" is an int, not an object'),
    ("summary.json", b'{"loss": 5}', 'summary.json: "loss" is an int, not a string'),
    ("eval.json", b'{"student_full_ece": \xff}', "eval.json is not UTF-8 text"),
    ("eval.json", b"[1]", "eval.json is not a JSON object (it holds a list)"),
    ("eval.json", b'{"student_full_ece": true}', 'eval.json: "student_full_ece" is a bool, not a number'),
    ("lm_eval.json", b'"results"', "lm_eval.json is not a JSON object (it holds a str)"),
    # a task's shots or documents scored that is no number: 'TypeError: unhashable type: 'list'', exit 1
    ("lm_eval.json", b'{"results": {"t": {"acc,none": 0.5}}, "n-shot": {"t": [0]}, "n-samples": {"t": '
     b'{"effective": 5}}}', 'lm_eval.json n-shot: "t" is a list, not a number'),
    ("lm_eval.json", b'{"results": {"t": {"acc,none": 0.5}}, "n-shot": {"t": 0}, "n-samples": {"t": '
     b'{"effective": [5]}}}', 'lm_eval.json n-samples t: "effective" is a list, not a number'),
])
def test_damaged_run_files_are_one_line(tmp_path, capsys, name, content, needle):
    """A run file that is not UTF-8, holds JSON of another shape, or a field of another type is one line naming the
    file (and the line): an AttributeError / UnicodeDecodeError / ValueError of a format spec, exit 1, before; and a
    non-object eval.json or lm_eval.json was silently taken for no results."""
    run = make_run(tmp_path, "r", loss="kd", kls=[1.0, 0.5], ppl=3.0, agreement=0.5)
    path = run / name
    path.write_bytes((path.read_bytes() if name == "metrics.jsonl" else b"") + content)
    assert main(["compare", str(run), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys.readouterr().err, needle)


@pytest.mark.parametrize("content", [b"loss:\n  name: \xff\n", b"[" * 100_000 + b"]" * 100_000,
                                     b"- loss\n", b"loss: kd\n"])
def test_a_config_yaml_that_is_not_utf8_only_loses_the_loss_settings(tmp_path, content):
    """config.yaml gives the loss settings of the loss column, read leniently ({} when unreadable): bytes that are
    not UTF-8, or YAML nested past Python's stack, are unreadable too (a UnicodeDecodeError / RecursionError
    traceback before), and a config.yaml of another shape (a list, a loss that is no mapping) gives no settings
    either, not an AttributeError; the loss name comes from summary.json."""
    run = make_run(tmp_path, "r", loss="kd", kls=[1.0], ppl=3.0, agreement=0.5)
    (run / "config.yaml").write_bytes(content)
    record = load_run(run)
    assert record["loss"] == "kd" and record["loss_settings"] == {}


# --------------------------------------------------------------------------- gaps found by a mutation audit


def test_read_metrics_keeps_the_rows_it_plots_in_training_order(tmp_path):
    """read_metrics: the training rows and the held-out rows with a KL or a student CLM, each sorted by training
    tokens whatever the order of the lines; a blank line (also one of spaces) is skipped; a held-out row with
    neither metric is not a held-out row (it would become the table's final row, with KL "—"); a row of no known
    split is not a training row; a row without tokens (the checker lets it through) sorts as 0, not a TypeError."""
    run = tmp_path / "r"
    run.mkdir()
    rows = [{"step": 20, "split": "heldout", "tokens": 2000, "kl": 1.0},
            {"step": 11, "split": "train", "tokens": 1100, "loss": 2.0},
            {"step": 10, "split": "heldout", "tokens": 1000, "kl": 2.0},
            {"step": 30, "split": "heldout", "tokens": 3000, "teacher_ppl": 5.0},  # no kl, no student_clm
            {"step": 1, "split": "train", "tokens": 100, "loss": 3.0},
            {"step": 5, "tokens": 500, "loss": 9.0},  # no split
            {"step": 0, "split": "heldout", "kl": 3.0}]  # no tokens
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "   ")
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    train, held = read_metrics(run)
    assert [r["step"] for r in train] == [1, 11]
    assert [r["step"] for r in held] == [0, 10, 20]
    assert load_run(run)["kl"] == 1.0 and load_run(run)["curve"] == ([0, 1000, 2000], [3.0, 2.0, 1.0])


def test_lm_eval_accuracies_read_from_each_task(tmp_path):
    """read_task_accuracies: a task's acc,none before any exact_match; of several exact_match filters the first by
    name (sorted: the same one for every run, whatever the file's order); an accuracy of 0 is an accuracy (it was
    left out, so the task vanished from the mean); a null accuracy (a non-finite value, `tailkd.jsonfile`) is none,
    and the next metric is taken; a task entry that is not an object is left out."""
    run = make_run(tmp_path, "r", loss="kd", kls=[1.0], ppl=3.0, agreement=0.5)
    results = {"both": {"exact_match,strict-match": 0.9, "acc,none": 0.4},
               "gsm": {"exact_match,strict-match": 0.2, "exact_match,flexible-extract": 0.3},
               "zero": {"acc,none": 0.0},
               "nan_acc": {"acc,none": None, "exact_match,strict-match": 0.6},
               "nan_only": {"acc,none": None},
               "odd": "not scored"}
    (run / "lm_eval.json").write_text(json.dumps({"results": results}))
    assert read_task_accuracies(run) == {"both": 0.4, "gsm": 0.3, "zero": 0.0, "nan_acc": 0.6}


def test_task_setups_without_a_number_of_documents_are_left_out(tmp_path):
    """read_task_setups: a task whose n-samples has no "effective" (null or missing) has no setup to compare, so
    compare does not stop over it."""
    run = make_run(tmp_path, "r", loss="kd", kls=[1.0], ppl=3.0, agreement=0.5)
    (run / "lm_eval.json").write_text(json.dumps({
        "results": {"a": {"acc,none": 0.5}, "b": {"acc,none": 0.5}, "c": {"acc,none": 0.5}},
        "n-shot": {"a": 5, "b": 0, "c": 0},
        "n-samples": {"a": {"original": 10, "effective": 8}, "b": {"original": 10, "effective": None},
                      "c": {"original": 10}}}))
    assert read_task_setups(run) == {"a": (5, 8)}


def test_a_task_setup_error_names_the_first_run_of_each_setup(tmp_path):
    """check_task_setups with three runs, the first and third scored alike: the line names the first run of each
    setup (a and b), not the last run seen with a's setup."""
    records = [{"path": p, "task_setups": {"arc": s}} for p, s in (("a", (0, 100)), ("b", (5, 100)), ("c", (0, 100)))]
    with pytest.raises(TailkdError, match=r"^arc was scored with 5 shots on 100 documents in b/lm_eval\.json but 0 "
                                          r"shots on 100 in a/lm_eval\.json;"):
        check_task_setups(records, ["arc"])


def test_a_run_missing_one_of_the_tasks_has_no_task_mean():
    """task_summary: a run with some of the tasks but not all has no mean and no Rel̄ (a mean over fewer tasks
    would not compare with the others')."""
    base = {"tasks": {"a": 0.4, "b": 0.5}}
    assert task_summary({"tasks": {"a": 0.3}}, base, ["a", "b"]) == (None, None)


def test_a_loss_setting_that_is_a_float_is_shown_short():
    """loss_labels: float settings as format's g (``beta=2``, not ``beta=2.0``), as ``k=16`` reads, where that is
    their value; else exactly."""
    records = [{"loss": "tad", "loss_settings": {"beta": b, "k": 16}} for b in (2.0, 0.5)]
    assert loss_labels(records) == ["tad (beta=2)", "tad (beta=0.5)"]
    # a value g's six digits do not hold is shown exactly: runs of beta 1 and 1.0000001 must not look alike
    records = [{"loss": "tad", "loss_settings": {"beta": b}} for b in (1.0, 1.0000001, 1e-30, 123456789.0)]
    assert loss_labels(records) == ["tad (beta=1)", "tad (beta=1.0000001)", "tad (beta=1e-30)",
                                    "tad (beta=123456789.0)"]


def test_generation_columns_have_no_rel_column_beside_a_baseline(tmp_path):
    """With a baseline, the Rel columns follow KL, perplexity, Full-ECE and agreement only; ROUGE-L, Distinct-2 and
    Self-BLEU have none, in the header as in the rows (a header with one put every later cell under another title)."""
    a = make_run(tmp_path, "a", loss="kd", kls=[3.0, 1.6], ppl=40.0, agreement=0.5)
    b = make_run(tmp_path, "b", loss="tad", kls=[3.0, 1.0], ppl=20.0, agreement=0.7)
    write_generation(a, rougeL=0.31, distinct_2=0.62, self_bleu=0.40)
    write_generation(b, rougeL=0.35, distinct_2=0.55, self_bleu=0.50)
    header, rows = table_rows(compare_runs([a, b], baseline=a, out_dir=tmp_path / "o")["markdown"])
    assert header == ["run", "loss", "tokens", "held-out KL", "Rel held-out KL", "perplexity", "Rel perplexity",
                      "Full-ECE", "Rel Full-ECE", "agreement", "Rel agreement", "ROUGE-L", "Distinct-2", "Self-BLEU",
                      "train time", "PFLOPs"]
    assert (rows["b"]["ROUGE-L"], rows["b"]["Self-BLEU"], rows["b"]["train time"]) == ("0.3500", "0.5000", "0:01:15")


def test_a_baseline_spelled_otherwise_is_the_run_in_the_list(tmp_path, monkeypatch):
    """--baseline a relative path of a run given absolute (or through ..): the same folder, so the same record, not
    a second copy of it (which made every name a path, the two copies of one name)."""
    a = make_run(tmp_path, "a", loss="kd", kls=[2.0, 1.0], ppl=10.0, agreement=0.5)
    b = make_run(tmp_path, "b", loss="tad", kls=[2.0, 0.5], ppl=8.0, agreement=0.6)
    monkeypatch.chdir(b)
    res = compare_runs([a, b], baseline="../a", out_dir=tmp_path / "o")
    assert [r["name"] for r in res["records"]] == ["a", "b"]
    assert set(table_rows(res["markdown"])[1]) == {"a (baseline)", "b"}


def test_compare_of_no_run_is_refused(tmp_path):
    with pytest.raises(TailkdError, match=r"^no run given; "):
        compare_runs([], out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
