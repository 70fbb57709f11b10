"""``tailkd reproduce`` end to end on tiny models: every run, evaluation and figure, the report's numbers taken
from the runs, a kill (SIGKILL, mid-way) and a resume, and bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny import make_teacher_dir, read_metrics, write_corpus

from tailkd import reproduce as rp
from tailkd.cli import main
from tailkd.command_config import ReproduceConfig
from tailkd.config import DistillConfig, save_yaml
from tailkd.errors import TailkdError
from tailkd.recipe import read_recipe, redo_result, result_settings, run_stages, saved_settings, write_settings
from tailkd.reproduce import plan


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    other = root / "other.txt"
    other.write_text(write_corpus(root / "unused.txt", n_docs=20).read_text().replace("the", "a"))
    return {"teacher": make_teacher_dir(root / "teacher"), "corpus": write_corpus(root / "corpus.txt"),
            "other": other, "cache": root / "cache"}


def _args(assets, out):
    return ["reproduce", "--teacher", str(assets["teacher"]), "--data", str(assets["corpus"]), "--heldout-data",
            str(assets["other"]), "--cache-dir", str(assets["cache"]), "--seq-len", "32", "--data.eval_rows", "4",
            "--student.num_layers", "1", "--steps", "4", "--train.eval_every", "2", "--train.warmup_steps", "1",
            "--train.save_every", "2", "--train.batch_size", "2", "--seeds", "0", "1", "--betas", "1", "2",
            "--ks", "5", "10", "--eval-rows", "4", "--out", str(out)]


def test_plan_names_every_run_once():
    cfg = ReproduceConfig()
    names = [e.name for e in plan(cfg)]
    assert names[:3] == ["clm-s0", "kd-s0", "tad-s0"] and len(names) == len(set(names)) == 9 + 3 + 2
    assert {"tad-beta0p5-s0", "tad-beta4-s0", "tad-k5-s0", "tad-k20-s0"} <= set(names)
    tad = next(e for e in plan(cfg) if e.name == "tad-k20-s0").cfg
    assert (tad.loss.k, tad.loss.beta, tad.train.seed, tad.data.heldout_paths) == (20, 2.0, 0, ["builtin:pydoc"])
    cfg.reproduce.scale = 2.5
    assert plan(cfg)[0].cfg.train.max_steps == 100 and plan(cfg)[0].cfg.train.eval_every == 25  # 40, 10 scaled


def test_reproduce_killed_then_resumed_writes_the_report(assets, tmp_path, capsys):
    out = tmp_path / "rep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tailkd.cli", *_args(assets, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "runs" / "kd-s0" / "checkpoints").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-way through a run: no handler, nothing flushed
    proc.wait()
    assert not (out / "report.md").exists()
    assert main(_args(assets, out)) == 0
    names = ["clm-s0", "kd-s0", "tad-s0", "clm-s1", "kd-s1", "tad-s1", "tad-beta1-s0", "tad-k5-s0"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(names)
    for name in names:
        run = out / "runs" / name
        steps = [r["step"] for r in read_metrics(run) if r["split"] == "train"]
        assert steps == [1, 2, 3, 4], name  # the killed run resumed: every step once
        assert (run / "final" / "config.json").is_file() and (run / "eval.json").is_file()
        assert not (run / "checkpoints").exists()  # pruned once every run had finished
    report = (out / "report.md").read_text()
    numbers = json.loads((out / "report.json").read_text())
    for png in ("fig1_heldout_kl.png", "fig2_tail_mass.png", "sweeps.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png})" in report
    ev = {n: json.loads((out / "runs" / n / "eval.json").read_text()) for n in names}
    want = [100 * (ev[f"tad-s{s}"]["kl"] / ev[f"kd-s{s}"]["kl"] - 1) for s in (0, 1)]
    assert numbers["paired"]["tad_vs_kd_kl_percent"] == pytest.approx(want, rel=1e-12)
    assert numbers["beta_sweep"] == pytest.approx({"1.0": ev["tad-beta1-s0"]["kl"], "2.0": ev["tad-s0"]["kl"]})
    assert numbers["k_sweep"] == pytest.approx({"5": ev["tad-k5-s0"]["kl"], "10": ev["tad-s0"]["kl"]})
    assert f"below KD's in **{sum(w < 0 for w in want)} of 2** seeds" in report
    # the held-out data is the other corpus: the evaluations say so
    assert all(e["rows"] >= 1 for e in ev.values())
    # a second invocation redoes nothing but the report
    before = {n: (out / "runs" / n / "eval.json").stat().st_mtime_ns for n in names}
    assert main(_args(assets, out)) == 0
    assert before == {n: (out / "runs" / n / "eval.json").stat().st_mtime_ns for n in names}
    # other settings into the same --out: refused, nothing reused or touched (the report is not rewritten)
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*_args(assets, out), "--scale", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run clm-s0 was finished with train.max_steps=4, this command gives 8" in err[0]
    assert "use a new --out" in err[0]
    assert files == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("extra, needle", [(["--seeds"], "seeds"), (["--ks", "0"], "reproduce.ks"),
                                           (["--betas", "-1"], "reproduce.betas"), (["--scale", "0"], "scale"),
                                           (["--scale", "1e308"], "reproduce.scale=1e+308 makes train.max_steps 4 × "
                                            "1e+308 = inf, more than a setting may hold"),
                                           (["--scale", "3e18"], "train.max_steps 4 × 3e+18 = 1.2e+19, more than"),
                                           (["--seeds", "0", "0", "1"], "reproduce.seeds names 0 twice"),
                                           (["--sweep-seeds", "0", "3"], "reproduce.sweep_seeds holds 3"),
                                           (["--betas", "0", "2"], "every β of the sweep must be > 0"),
                                           (["--train.epochs", "1"], "--train.epochs"),
                                           (["--ks", "5", "100000"], "every K must be smaller than the teacher's "
                                            "vocabulary")])
def test_bad_input_is_one_line(assets, tmp_path, extra, needle):
    proc = subprocess.run([sys.executable, "-m", "tailkd.cli", *_args(assets, tmp_path / "r"), *extra],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and needle in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "r").exists()


def test_the_gpu_config_loads():
    """configs/reproduce/paper-qwen-1.8b-gpu.yaml: the paper's §3.2.1 sizes through tailkd reproduce (nothing runs)."""
    from tailkd.cli import build_parser
    from tailkd.config import config_from_args

    path = Path(__file__).resolve().parents[1] / "configs" / "reproduce" / "paper-qwen-1.8b-gpu.yaml"
    cfg = config_from_args(build_parser().parse_args(["reproduce", "--config", str(path)]), ReproduceConfig)
    runs = plan(cfg)
    assert len(runs) == 16 and {r.cfg.train.max_steps for r in runs} == {7630}
    # the paper's sweeps: "K∈{1,5,10,20}" and "β∈{0.5,1,2,5,10}" (§3.2.1, Table 2)
    assert sorted({r.cfg.loss.k for r in runs if r.cfg.loss.name == "tad"}) == [1, 5, 10, 20]
    assert sorted({r.cfg.loss.beta for r in runs if r.cfg.loss.name == "tad"}) == [0.5, 1.0, 2.0, 5.0, 10.0]
    assert {(r.cfg.data.seq_len, r.cfg.student.num_layers, r.cfg.teacher.path) for r in runs} == {
        (2048, 20, "/models/Qwen1.5-1.8B")}


# --------------------------------------------------------------------------- what a re-run may reuse


def _finish(cfg: DistillConfig, *, final: bool = True) -> None:
    """A run folder as tailkd distill leaves it (its config.yaml; final/ when finished), without training."""
    run = Path(cfg.train.out_dir)
    run.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, run / "config.yaml")
    if final:
        (run / "final").mkdir(exist_ok=True)
        (run / "final" / "config.json").write_text("{}")
        (run / "summary.json").write_text("{}")  # written last


def _reproduction(tmp_path, **options) -> ReproduceConfig:
    cfg = ReproduceConfig()
    r = cfg.reproduce
    r.out, r.seeds, r.betas, r.ks = str(tmp_path / "rep"), [0], [2.0], [10]
    for key, value in options.items():
        section, _, name = key.partition("__")
        setattr(getattr(cfg, section), name, value)
    return cfg.validate()


def test_a_rerun_reuses_only_work_done_with_the_same_settings(tmp_path):
    cfg = _reproduction(tmp_path)
    runs = plan(cfg)
    assert [e.name for e in runs] == ["clm-s0", "kd-s0", "tad-s0"]
    for e in runs:
        _finish(e.cfg, final=e.name != "tad-s0")  # tad-s0 was killed mid-way
    rp.check_reuse(cfg, runs)  # the same settings: every run reused (or resumed)
    rp.check_reuse(_reproduction(tmp_path, reproduce__device="cpu"), runs)  # the device changes no result
    for options, needle in (({"reproduce__scale": 4.0}, "run clm-s0 was finished with train.max_steps=40, this "
                                                        "command gives 160"),
                            ({"teacher__path": "/models/other"}, "teacher.path='smollm2', this command gives "
                                                                 "'/models/other'"),
                            ({"data__seq_len": 64}, "run clm-s0 was finished with data.seq_len=128")):
        other = _reproduction(tmp_path, **options)
        with pytest.raises(TailkdError, match="holds a reproduction with other settings") as err:
            rp.check_reuse(other, plan(other))
        assert needle in str(err.value) and "use a new --out, or delete" in str(err.value), str(err.value)
    # a run that was only started is compared too
    for e in runs[:2]:
        shutil.rmtree(e.run)
    other = _reproduction(tmp_path, train__lr=1e-3)
    with pytest.raises(TailkdError, match=r"run tad-s0 was started with train.lr=0.0001, this command gives 0.001"):
        rp.check_reuse(other, plan(other))


EVAL_STUB = '{"student": "final", "teacher": "teacher"}'  # what an eval.json always holds (eval.out replaces only that)


def test_a_rerun_reuses_only_evaluations_made_with_the_same_settings(tmp_path):
    cfg = _reproduction(tmp_path)
    runs = plan(cfg)
    out = tmp_path / "rep"
    analysis = out / "teacher_analysis.json"
    write_settings(analysis, result_settings(rp._analysis_config(cfg, out), "analyze"))
    analysis.write_text("{}")
    for e in runs:
        _finish(e.cfg)
        write_settings(e.run / "eval.json", result_settings(rp._eval_config(cfg, e), "eval"))
        (e.run / "eval.json").write_text(EVAL_STUB)
    rp.check_reuse(cfg, runs)
    assert saved_settings(runs[0].run / "eval.json") == result_settings(rp._eval_config(cfg, runs[0]), "eval")
    other = _reproduction(tmp_path, reproduce__eval_rows=8)
    with pytest.raises(TailkdError) as err:
        rp.check_reuse(other, plan(other))
    assert f"{runs[0].run / 'eval.json'} was made with eval.max_rows=64, this command gives 8" in str(err.value)
    assert f"delete {runs[0].run / 'eval.json'} to make it again" in str(err.value)
    for e in runs:  # evaluations deleted: the teacher analysis is checked on its own
        (e.run / "eval.json").unlink()
    with pytest.raises(TailkdError, match="teacher_analysis.json was made with analyze.max_rows=64, this command "
                                          "gives 8"):
        rp.check_reuse(other, plan(other))
    # an eval.json without its settings (an older tailkd) is not trusted: it is evaluated again
    (runs[0].run / "eval.json").write_text(EVAL_STUB)
    (runs[0].run / "eval.settings.json").unlink()
    assert saved_settings(runs[0].run / "eval.json") is None
    settings = result_settings(rp._eval_config(cfg, runs[0]), "eval")
    redo_result(runs[0].run / "eval.json", settings)  # what reproduce does before evaluating it again
    assert not (runs[0].run / "eval.json").exists() and saved_settings(runs[0].run / "eval.json") is None
    assert json.loads((runs[0].run / "eval.settings.json").read_text()) == settings


def test_a_settings_file_nested_too_deeply_is_not_trusted(tmp_path):
    """An eval.settings.json nested past Python's parser is damaged as an unreadable one is: its result is made
    again (saved_settings None); it was a RecursionError traceback (exit 1) of reproduce or recipe."""
    result = tmp_path / "eval.json"
    result.write_text(EVAL_STUB)
    write_settings(result, {"eval.max_rows": 8})
    assert saved_settings(result) == {"eval.max_rows": 8}
    (tmp_path / "eval.settings.json").write_text("[" * 100_000 + "]" * 100_000)
    assert saved_settings(result) is None


def test_a_finished_recipe_stage_with_other_settings_is_refused(tmp_path, capsys):
    cfg = DistillConfig()
    cfg.train.out_dir = str(tmp_path / "stage")
    _finish(cfg.validate())
    assert run_stages([cfg])[0]["skipped"]  # the same settings: skipped, nothing loaded
    cfg.train.device = "cpu"
    assert run_stages([cfg])[0]["skipped"]
    for key, value, needle in (("loss", "k", "loss.k=10, but now gives 5"),
                               ("train", "max_steps", "train.max_steps=40, but now gives 80")):
        other = DistillConfig()
        other.train.out_dir = cfg.train.out_dir
        setattr(getattr(other, key), value, 5 if value == "k" else 80)
        with pytest.raises(TailkdError, match="stage stage .* finished with") as err:
            run_stages([other.validate()])
        assert needle in str(err.value) and "choose another --out" in str(err.value)
    # with train.epochs the run computed max_steps from the data when it started: that is not compared
    saved = DistillConfig()
    saved.train.out_dir, saved.train.epochs, saved.train.max_steps = cfg.train.out_dir, 2.0, 17
    _finish(saved.validate())
    planned = DistillConfig()
    planned.train.out_dir, planned.train.epochs = cfg.train.out_dir, 2.0
    assert run_stages([planned.validate()])[0]["skipped"]


def test_a_changed_finished_stage_is_refused_before_an_earlier_stage_trains(tmp_path):
    """A sweep whose first stage is still to train and whose second finished with other settings: refused at once,
    not after the first stage's training (its teacher does not even exist here: loading it would fail otherwise)."""
    first, second = DistillConfig(), DistillConfig()
    first.teacher.path = second.teacher.path = str(tmp_path / "no-teacher")
    first.train.out_dir, second.train.out_dir = str(tmp_path / "a"), str(tmp_path / "b")
    _finish(second.validate())
    second.loss.k = 5
    with pytest.raises(TailkdError, match=r"stage b .* finished with loss.k=10, but now gives 5"):
        run_stages([first.validate(), second.validate()])
    assert not Path(first.train.out_dir).exists()


def test_a_chained_stage_is_not_reused_when_the_stage_it_started_from_is_trained_again(tmp_path):
    """A finished chain; stage domain deleted (as the refusal of a changed finished stage tells): a re-run would train
    domain again, and sft, finished (or started) from the old domain student, must not be skipped (or resumed) as if
    it continued the new one. Refused in one line before anything is loaded (the teacher does not exist here)."""
    recipe = tmp_path / "chain.yaml"
    stages = [{"name": "domain", "train": {"max_steps": 3}}, {"name": "sft", "train": {"max_steps": 2}},
              {"name": "polish", "train": {"max_steps": 1}}]
    recipe.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "runs"), "stages": stages,
                                      "common": {"teacher": {"path": str(tmp_path / "no-teacher")}}}))
    domain, sft, polish = read_recipe(recipe).stages
    assert sft.student.path == str(tmp_path / "runs" / "domain" / "final")
    for cfg in (domain, sft, polish):
        _finish(cfg)
    assert [s["skipped"] for s in run_stages([domain, sft, polish])] == [True] * 3  # all done: reused
    shutil.rmtree(domain.train.out_dir)
    with pytest.raises(TailkdError) as err:
        run_stages([domain, sft, polish])
    assert str(err.value) == (f"stage sft ({sft.train.out_dir}) was started from {domain.train.out_dir}/final, which "
                              f"is to be trained again; delete {sft.train.out_dir} too, to run it from the new "
                              "student, or choose another --out")
    assert not Path(domain.train.out_dir).exists()
    # a stage only started counts too, and so does a stage further down the chain
    _finish(domain, final=False)
    with pytest.raises(TailkdError, match="stage sft .* was started from"):
        run_stages([domain, sft, polish])
    _finish(domain)
    shutil.rmtree(sft.train.out_dir)
    with pytest.raises(TailkdError, match=f"stage polish .* was started from {sft.train.out_dir}/final"):
        run_stages([domain, sft, polish])


def test_a_stage_killed_between_its_final_student_and_its_summary_is_completed(assets, tmp_path):
    """A kill after RUN/final/ was written and before summary.json (the last output): the stage is not done; a re-run
    resumes it, which writes the outputs again (and the stage after it is not skipped as chained to a done stage)."""
    cfg = DistillConfig()
    cfg.teacher.path, cfg.data.paths, cfg.data.cache_dir = str(assets["teacher"]), [str(assets["corpus"])], \
        str(assets["cache"])
    cfg.data.seq_len, cfg.data.eval_rows, cfg.student.num_layers = 32, 2, 1
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.device = 2, 2, "cpu"
    cfg.train.out_dir = str(tmp_path / "stage")
    run = Path(cfg.train.out_dir)
    assert not run_stages([cfg.validate()])[0].get("skipped")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()  # as if killed before summary.json (final/ and curves.png are there)
    again = run_stages([cfg])[0]
    assert not again.get("skipped") and json.loads((run / "summary.json").read_text())["steps"] == summary["steps"]
    assert again["heldout_after"] == summary["heldout_after"]  # the checkpoint's outputs, not a new training
    assert run_stages([cfg])[0]["skipped"]


def test_plan_refuses_two_runs_of_one_name():
    cfg = ReproduceConfig()
    cfg.reproduce.betas = [0.1, 0.10000001, 2.0]
    with pytest.raises(TailkdError, match="named tad-beta0p1-s0"):
        plan(cfg.validate())


@pytest.mark.parametrize("options, needle", [
    ({"seeds": [0, 1, 1]}, "reproduce.seeds names 1 twice"), ({"ks": [5, 5]}, "reproduce.ks names 5 twice"),
    ({"betas": [1.0, 1.0]}, "reproduce.betas names 1 twice"), ({"sweep_seeds": [0, 0]}, "sweep_seeds names 0 twice"),
    ({"seeds": [1, 2], "sweep_seeds": [0]}, "reproduce.sweep_seeds holds 0, which is not one of reproduce.seeds"),
    ({"betas": [0.0, 2.0]}, "reproduce.betas holds 0; every β of the sweep must be > 0")])
def test_seed_and_sweep_sets_are_checked(options, needle):
    cfg = ReproduceConfig()
    for key, value in options.items():
        setattr(cfg.reproduce, key, value)
    with pytest.raises(TailkdError, match=re.escape(needle)):
        cfg.validate()


def test_epochs_do_not_apply():
    cfg = ReproduceConfig()
    cfg.train.epochs = 1.0
    with pytest.raises(TailkdError, match=r"train.epochs=1 does not apply to tailkd reproduce"):
        cfg.validate()


def _report_inputs(runs, out: Path, kl: float) -> None:
    """What the runs, evaluations and analysis on disk hold for `write_report`; ``kl`` tells one state from
    another."""
    for e in runs:
        e.run.mkdir(parents=True, exist_ok=True)
        (e.run / "eval.json").write_text(json.dumps({"kl": kl, "student_clm": 3.0, "student_full_ece": 0.1,
                                                     "agreement": 0.5}))
        (e.run / "metrics.jsonl").write_text(json.dumps({"split": "heldout", "tokens": 10, "kl": kl}) + "\n")
    (out / "teacher_analysis.json").write_text(json.dumps(
        {"t": {"alpha_mean": [0.5, 0.3], "mismatch_rate": 0.4, "tokens": 100}}))


def _figures_unplotted(monkeypatch) -> None:
    """The report's figures written as the bytes b"png", without drawing them (each is an atomic write of its own,
    plots._save)."""
    from tailkd import checkpoint, plots

    def figure(*args):
        return checkpoint.atomic_write_file(Path(args[-1]), lambda tmp: tmp.write_bytes(b"png"))

    for name in ("plot_seed_bands", "plot_tail_mass", "plot_sweeps"):
        monkeypatch.setattr(plots, name, figure)


def test_a_stop_while_the_report_is_written_never_leaves_report_md_and_json_of_two_states(tmp_path, monkeypatch):
    """report.md and report.json were two atomic writes, markdown first: a stop between them (Ctrl-C, a kill, a full
    disk) left a fresh report.md beside the report.json of the previous invocation (other numbers). Now both are
    removed before anything is written and report.md comes last: after a stop at any write, every report file
    present is of this invocation, and a report.md present means report.json and the figures are written."""
    from tailkd import checkpoint

    cfg = _reproduction(tmp_path)
    runs = plan(cfg)
    out = Path(cfg.reproduce.out)

    def state(kl: float) -> None:
        _report_inputs(runs, out, kl)

    _figures_unplotted(monkeypatch)
    state(1.0)
    rp.write_report(cfg, runs, out, seconds=1.0)
    writes = []
    real = checkpoint.atomic_write_file

    def counted(final, write, **kw):
        writes.append(Path(final).name)
        return real(final, write, **kw)

    monkeypatch.setattr(checkpoint, "atomic_write_file", counted)
    state(2.0)
    rp.write_report(cfg, runs, out, seconds=1.0)  # every write of the report, in order
    assert {"report.md", "report.json"} <= set(writes)
    for stop in range(len(writes)):
        state(1.0)
        monkeypatch.setattr(checkpoint, "atomic_write_file", real)
        rp.write_report(cfg, runs, out, seconds=1.0)  # the complete report of state 1
        state(2.0)
        calls = []

        def stopped(final, write, **kw):
            calls.append(final)
            if len(calls) > stop:
                raise KeyboardInterrupt
            return real(final, write, **kw)

        monkeypatch.setattr(checkpoint, "atomic_write_file", stopped)
        with pytest.raises(KeyboardInterrupt):
            rp.write_report(cfg, runs, out, seconds=1.0)
        md, js = out / "report.md", out / "report.json"
        assert not md.exists() or "| KD | 1 | 2.0000 |" in md.read_text(), writes[stop]
        assert not js.exists() or json.loads(js.read_text())["evals"]["kd-s0"]["kl"] == 2.0, writes[stop]
        assert not md.exists() or js.exists(), writes[stop]


def _report_ready(tmp_path, monkeypatch):
    """``(cfg, runs, out)`` of a one-seed reproduction whose runs, evaluations (held-out KL 1.0) and analysis are on
    disk for `write_report`, its figures not drawn."""
    cfg = _reproduction(tmp_path)
    runs = plan(cfg)
    out = Path(cfg.reproduce.out)
    _figures_unplotted(monkeypatch)
    _report_inputs(runs, out, 1.0)
    for e in runs:
        (e.run / "summary.json").write_text(json.dumps({"train_seconds": 1.0}))
    return cfg, runs, out


@pytest.mark.parametrize("name", ["runs/kd-s0/eval.json", "teacher_analysis.json", "runs/kd-s0/summary.json"])
@pytest.mark.parametrize("content, why", [(b'{"kl": ', "not valid JSON: Expecting value"), (b"\xff", "not UTF-8 text"),
                                          (b"[1]", "not a JSON object"),
                                          (b"[" * 100_000 + b"]" * 100_000, "nested too deeply to read")])
def test_a_damaged_result_the_report_reads_is_one_line_naming_it(tmp_path, monkeypatch, name, content, why):
    """An evaluation, the teacher analysis or a run's summary.json that a re-run reuses (its settings file intact)
    but that is not a JSON object: write_report said 'JSONDecodeError: ...', 'UnicodeDecodeError: ...',
    'TypeError: list indices ...' or 'RecursionError: ...' (exit 1). Deleted, it is made again by the next run of the
    command (a summary.json: that run is trained again)."""
    cfg, runs, out = _report_ready(tmp_path, monkeypatch)
    (out / name).write_bytes(content)
    with pytest.raises(TailkdError, match=rf"^{re.escape(str(out / name))} is damaged \({why}.*\); delete it and run "
                                          "the same command again$"):
        rp.write_report(cfg, runs, out, seconds=1.0)


@pytest.mark.parametrize("content, why", [(b"{bad", "not valid JSON: Expecting property name"),
                                          (b'{"student": {}, "teacher": {}}', "no 'kl' in it"),
                                          (b'{"kl": 1.0, "student_clm": 3.0, "student_full_ece": 0.1}',
                                           "no 'agreement' in it")])
def test_an_evaluation_damaged_by_hand_is_named_before_any_run_and_by_the_report(tmp_path, monkeypatch, content,
                                                                                 why):
    """An eval.json a re-run reuses, damaged by hand: not JSON, or without the numbers the report reads (there a
    KeyError, exit 1). Refused in one line naming it by the report, and where it is no JSON object before any run
    (`check_reuse`: eval's own check of its --out said "choose another --out", which for reproduce redoes every
    run)."""
    cfg, runs, out = _report_ready(tmp_path, monkeypatch)
    (runs[1].run / "eval.json").write_bytes(content)
    path = re.escape(str(runs[1].run / "eval.json"))
    line = rf"^{path} is damaged \({why}.*\); delete it and run the same command again$"
    if content.startswith(b"{bad"):
        with pytest.raises(TailkdError, match=line):
            rp.check_reuse(cfg, runs)
    with pytest.raises(TailkdError, match=line):
        rp.write_report(cfg, runs, out, seconds=1.0)


def test_a_rerun_from_another_folder_may_spell_the_paths_otherwise(tmp_path, monkeypatch):
    """The runs' config.yaml hold absolute paths (compared through config.absolute_paths), but eval.settings.json and
    teacher_analysis.settings.json held teacher.path, data.paths and data.cache_dir as spelled: the same reproduction
    continued from the parent folder (--teacher w1/teacher --out w1/rep for --teacher teacher --out rep) was refused,
    'w1/rep/runs/clm-s0/eval.json was made with teacher.path='teacher', this command gives 'w1/teacher''. Settings
    are saved with absolute paths and an older file's relative ones read against the working directory; another
    teacher is still refused."""
    from tailkd import runs as runs_mod

    (tmp_path / "w1" / "teacher").mkdir(parents=True)
    (tmp_path / "w1" / "corpus.txt").write_text("x")

    def reproduction(prefix: str, teacher: str = "teacher") -> ReproduceConfig:
        cfg = _reproduction(tmp_path, teacher__path=prefix + teacher)
        cfg.data.paths, cfg.data.cache_dir = [prefix + "corpus.txt"], prefix + "cache"
        cfg.reproduce.out = prefix + "rep"
        return cfg.validate()

    monkeypatch.chdir(tmp_path / "w1")
    cfg = reproduction("")
    runs = plan(cfg)
    out = Path(cfg.reproduce.out)
    write_settings(out / "teacher_analysis.json", result_settings(rp._analysis_config(cfg, out), "analyze"))
    (out / "teacher_analysis.json").write_text("{}")
    for e in runs:
        _finish(e.cfg)
        runs_mod._write_config(e.cfg, e.run / "config.yaml")  # as tailkd distill writes it: absolute paths
        write_settings(e.run / "eval.json", result_settings(rp._eval_config(cfg, e), "eval"))
        (e.run / "eval.json").write_text(EVAL_STUB)
    rp.check_reuse(cfg, runs)
    monkeypatch.chdir(tmp_path)
    for again in (reproduction("w1/"), reproduction(f"{tmp_path}/w1/"), reproduction("./w1/")):
        rp.check_reuse(again, plan(again))
    (tmp_path / "w1" / "other").mkdir()
    other = reproduction("w1/", teacher="other")
    with pytest.raises(TailkdError, match="its run clm-s0 was finished with teacher.path="):
        rp.check_reuse(other, plan(other))
    for e in runs:  # the evaluations on their own
        (tmp_path / "w1" / e.run / "config.yaml").unlink()
    with pytest.raises(TailkdError, match="clm-s0/eval.json was made with teacher.path="):
        rp.check_reuse(other, plan(other))
    rp.check_reuse(reproduction("w1/"), plan(reproduction("w1/")))


# --------------------------------------------------------------------------- mutation audit: plan, driver, report


def test_plan_gives_every_run_its_own_seed_folder_and_loss():
    """Each run trains with its own seed, into OUT/runs/<name>, with the loss, K and β its name says (the seed was
    only checked on a seed-0 run, where a constant 0 passes)."""
    cfg = ReproduceConfig()
    cfg.reproduce.out = "/r"
    runs = plan(cfg.validate())
    assert {e.seed for e in runs} == {0, 1, 2}
    for e in runs:
        assert e.cfg.train.seed == e.seed and e.run == Path("/r/runs") / e.name, e.name
        assert (e.cfg.loss.name, e.cfg.loss.k, e.cfg.loss.beta) == (e.loss, e.k, e.beta), e.name


def _check_ks_teacher(tmp_path) -> str:
    """A teacher config.json of 40 tokens (`_check_ks` reads only the config)."""
    from transformers import LlamaConfig

    path = tmp_path / "teacher.json"
    LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2).to_json_file(path)
    return str(path)


def test_every_k_of_the_sweep_must_be_below_the_teachers_vocabulary(tmp_path):
    """K = V leaves no tail (α_V = 0): refused before any run, as a larger K is; K = V - 1 is accepted."""
    cfg = _reproduction(tmp_path, teacher__path=_check_ks_teacher(tmp_path))
    cfg.reproduce.ks = [5, 39]
    rp._check_ks(cfg)
    cfg.reproduce.ks = [40, 5]
    with pytest.raises(TailkdError, match=r"reproduce.ks holds 40; every K must be smaller than the teacher's "
                                          r"vocabulary \(40;"):
        rp._check_ks(cfg)


def test_reproduce_evaluates_what_it_trained_and_stops_when_a_run_stops(tmp_path, monkeypatch):
    """The driver on its own (training, evaluation, analysis and report replaced by records): a stopped run stops
    the reproduction with its exit code, before any evaluation or pruning; then an evaluation is made again for a
    run trained by this invocation even where one with the same settings is on disk, kept for a run skipped, and
    made where it is missing; checkpoints of finished runs are deleted; the teacher is analysed once."""
    from tailkd import commands, recipe

    cfg = _reproduction(tmp_path)
    runs = plan(cfg)
    out = Path(cfg.reproduce.out)
    for e in runs[:2]:  # clm-s0 and kd-s0 were evaluated by an earlier invocation
        write_settings(e.run / "eval.json", result_settings(rp._eval_config(cfg, e), "eval"))
        (e.run / "eval.json").write_text(EVAL_STUB)
    for e in runs:
        (e.run / "checkpoints").mkdir(parents=True)
    summaries = []
    evaluated, analysed = [], []
    monkeypatch.setattr(recipe, "run_stages", lambda cfgs: summaries)
    monkeypatch.setattr(rp, "_check_ks", lambda cfg: None)
    monkeypatch.setattr(rp, "write_report", lambda cfg, runs, out, seconds: out / "report.md")
    monkeypatch.setattr(commands, "evaluate", lambda ev: evaluated.append(Path(ev.eval.out))
                        or Path(ev.eval.out).write_text(EVAL_STUB))
    monkeypatch.setattr(commands, "analyze_teacher", lambda a: analysed.append(a.analyze.out)
                        or (Path(a.analyze.out) / "teacher_analysis.json").write_text("{}"))
    summaries[:] = [{"skipped": True}, {"stopped": True, "exit_code": 130}]
    assert rp.reproduce(cfg) == {"stopped": True, "out": str(out), "exit_code": 130}
    assert evaluated == analysed == [] and all((e.run / "checkpoints").is_dir() for e in runs)
    summaries[:] = [{"skipped": True}, {}, {}]  # kd-s0 trained again (resumed), tad-s0 trained
    assert rp.reproduce(cfg) == {"out": str(out), "report": str(out / "report.md")}
    assert evaluated == [runs[1].run / "eval.json", runs[2].run / "eval.json"]
    assert analysed == [str(out)] and not any((e.run / "checkpoints").exists() for e in runs)
    assert (runs[0].run / "eval.json").read_text() == EVAL_STUB  # the skipped run's evaluation is reused
    summaries[:] = [{"skipped": True}] * 3
    evaluated.clear()
    rp.reproduce(cfg)  # nothing new: tad-s0 and kd-s0 have settings files now, and so has the analysis
    assert evaluated == [] and analysed == [str(out)]


def test_the_report_numbers_are_those_of_the_evaluations(tmp_path, monkeypatch):
    """write_report's tables and report.json from evaluations of known values (figures not drawn): mean ± sample
    std over two seeds, one seed without ±, the main table of the main runs only, the sweeps in increasing order
    with the lowest held-out KL named, TAD vs KD per seed (a tie is not below), the KD seed spread, α_1 and α_K at
    K = len(alpha_mean), the student line. The end-to-end test checks only the paired KL and the sweep points."""
    cfg = _reproduction(tmp_path, reproduce__seeds=[0, 1], reproduce__betas=[4.0, 1.0, 2.0], reproduce__ks=[10, 5],
                        student__layers=[0, 2], student__freeze_embeddings=True)
    runs = plan(cfg)
    out = Path(cfg.reproduce.out)
    _figures_unplotted(monkeypatch)
    kl = {"clm-s0": 9.0, "clm-s1": 9.0, "kd-s0": 2.0, "kd-s1": 4.0, "tad-s0": 1.5, "tad-s1": 4.0,
          "tad-beta4-s0": 1.0, "tad-beta1-s0": 3.0, "tad-k5-s0": 1.8}
    ece = {"kd-s0": 0.1, "kd-s1": 0.2, "tad-s0": 0.05, "tad-s1": 0.3}
    assert sorted(e.name for e in runs) == sorted(kl)
    for e in runs:
        e.run.mkdir(parents=True)
        (e.run / "eval.json").write_text(json.dumps({"kl": kl[e.name], "student_clm": 3.0, "agreement": 0.5,
                                                     "student_full_ece": ece.get(e.name, 0.1)}))
        (e.run / "metrics.jsonl").write_text(json.dumps({"split": "heldout", "tokens": 10, "kl": kl[e.name]}) + "\n")
        (e.run / "summary.json").write_text(json.dumps({"train_seconds": 60.0}))
    (out / "teacher_analysis.json").write_text(json.dumps(
        {"t": {"alpha_mean": [0.9, 0.7, 0.5, 0.4, 0.3], "mismatch_rate": 0.4, "tokens": 100}}))
    report = rp.write_report(cfg, runs, out, seconds=120.0).read_text()
    numbers = json.loads((out / "report.json").read_text())
    spread = 100 * 2 ** 0.5 / 3  # KD's KL 2 and 4: sample std √2, mean 3
    paired = numbers["paired"]
    assert paired["tad_vs_kd_kl_percent"] == pytest.approx([-25.0, 0.0], abs=1e-12)
    assert paired["tad_vs_kd_full_ece_percent"] == pytest.approx([-50.0, 50.0], rel=1e-12)
    assert (paired["tad_below_kd_seeds"], paired["seeds"]) == (1, 2)
    assert paired["kd_seed_spread_percent"] == pytest.approx(spread, rel=1e-12)
    assert numbers["alpha"] == {"1": 0.9, "5": 0.3}
    assert numbers["beta_sweep"] == {"1.0": 3.0, "2.0": 1.5, "4.0": 1.0} and numbers["k_sweep"] == {"5": 1.8, "10": 1.5}
    lines = report.splitlines()
    assert "| KD | 2 | 3.0000 ± 1.4142 | 3.0000 ± 0.0000 | 0.1500 ± 0.0707 | 0.500 ± 0.000 |" in lines
    assert "| TAD | 2 | 2.7500 ± 1.7678 | 3.0000 ± 0.0000 | 0.1750 ± 0.1768 | 0.500 ± 0.000 |" in lines
    beta = [line for line in lines if re.match(r"\| [0-9.]+ \| ", line)]
    assert beta == ["| 1 | 3.0000 | 0.1000 |", "| 2 | 1.5000 | 0.0500 |", "| 4 | 1.0000 | 0.1000 |",
                    "| 5 | 1.8000 | 0.1000 |", "| 10 | 1.5000 | 0.0500 |"]  # the β sweep's rows, then the K sweep's
    assert "Lowest held-out KL at β = 4." in lines and "Lowest held-out KL at K = 10." in lines
    assert f"below KD's in **1 of 2** seeds: per seed -25.00%, +0.00%; mean -12.50% ± 17.68% (paired), " \
           f"against a seed spread (std/mean) of KD's KL of {spread:.2f}%." in report
    assert "Mean tail mass α_K = 1 − Σ top-K p: α_1 = 0.900, α_5 = 0.300; mode mismatch" in report
    assert "student: built from the teacher (layers [0, 2], MLP random, embeddings frozen);" in report
    assert "9 runs, 9.0 min of training in all (this invocation: 2.0 min)." in report


def test_one_seed_reports_no_spread(tmp_path, monkeypatch):
    """With one seed there is no paired spread nor a seed spread of KD's KL: the report says so (it printed
    "± 0.00%" and "a seed spread ... of 0.00%"), report.json's spread is null."""
    cfg, runs, out = _report_ready(tmp_path, monkeypatch)
    (runs[2].run / "eval.json").write_text(json.dumps({"kl": 0.5, "student_clm": 3.0, "student_full_ece": 0.1,
                                                       "agreement": 0.5}))  # tad-s0
    report = rp.write_report(cfg, runs, out, seconds=1.0).read_text()
    assert ("below KD's in **1 of 1** seeds: per seed -50.00% (one seed: no spread to weigh it against)."
            in report), report
    assert json.loads((out / "report.json").read_text())["paired"]["kd_seed_spread_percent"] is None


def test_the_report_names_a_student_as_it_was_built():
    """The report's student: a given model by its path, else the layers kept and whether embeddings train."""
    cfg = DistillConfig()
    assert rp._student_text(cfg) == "built from the teacher (6 layers, MLP random, embeddings trained)"
    cfg.student.path = "runs/x/final"
    assert rp._student_text(cfg) == "`runs/x/final`"


def test_the_sweeps_hold_the_main_run_where_they_cross(tmp_path):
    """A β (K) sweep's table and points hold the main TAD run's β = 2 (K = 10) whether --betas (--ks) lists it or
    not: with --betas 1 the report said 'lowest at β = 1' beside a lower main run it left out."""
    cfg = DistillConfig()

    def run(name, group, k, beta):
        return rp.Experiment(name, group, "tad", 0, k, beta, cfg)

    experiments = [run("tad-s0", "main", 10, 2.0), run("beta1-s0", "beta", 10, 1.0), run("k5-s0", "k", 5, 2.0)]
    evals = {"tad-s0": {"kl": 3.2374, "student_full_ece": 0.1}, "beta1-s0": {"kl": 3.2398, "student_full_ece": 0.2},
             "k5-s0": {"kl": 3.2380, "student_full_ece": 0.3}}
    rows, points = rp.sweep_rows(experiments, evals, "beta", [1.0], [0])
    assert points == {1.0: 3.2398, 2.0: 3.2374} and [r.split(" |")[0] for r in rows[2:]] == ["| 1", "| 2"]
    rows, points = rp.sweep_rows(experiments, evals, "k", [5], [0])
    assert points == {5: 3.2380, 10: 3.2374}
    assert rp.sweep_rows(experiments, evals, "beta", [1.0, 2.0], [0])[1] == {1.0: 3.2398, 2.0: 3.2374}
