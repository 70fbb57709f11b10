"""`tailkd.runs` function by function, without a training run: the counters a checkpoint saves, the progress bar's
refresh rule, metrics.jsonl's resume truncation and appends, the held-out line, the time estimate, the run folder's
decisions (new run, resume, --force, --overwrite) and its config.yaml, a checkpoint's round trip of the training
state and its refusals, SIGINT / SIGTERM during a run and ``train.deterministic``'s environment."""

import io
import json
import os
import re
import signal
import threading
import time

import pytest
import torch
import yaml

from tailkd import runs
from tailkd.config import DistillConfig
from tailkd.errors import TailkdError

# --------------------------------------------------------------------------- counters, progress bar, metrics.jsonl


def test_progress_round_trips_and_ignores_a_counter_it_does_not_know():
    """A checkpoint's ``state`` dict loads into `Progress` whatever tailkd wrote it: an older one's missing counters
    take their defaults and a counter this version does not have is left out (not a TypeError at the resume)."""
    p = runs.Progress(step=3, tokens=96, elapsed=1.5, initial_heldout={"loss": 2.0}, bad_steps=1, empty_steps=2)
    assert runs.Progress.from_dict(p.to_dict()) == p
    assert runs.Progress.from_dict({"step": 3, "a_removed_counter": 7}) == runs.Progress(step=3)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _bar_intervals(monkeypatch, **kwargs) -> tuple[float, float]:
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal, as under pytest's capture or in CI
    bar = runs.progress_bar(total=3, **kwargs)
    bar.close()
    return bar.mininterval, bar.maxinterval


def test_a_progress_bar_refreshes_every_30_s_only_where_its_stream_is_not_a_terminal(monkeypatch):
    """A log, a file or a pipe gets a line per `LOG_REFRESH_S` (tqdm's maxinterval raised to it as well, or tqdm's
    monitor would lower the interval again); a terminal keeps tqdm's own (0.1 s). The stream is the bar's ``file``,
    not stderr, and a ``mininterval`` given decides instead. (``TQDM_MININTERVAL`` is read by tqdm when it is
    imported: a process started with it, not this one.)"""
    from tqdm.auto import tqdm

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    plain = tqdm(total=3, file=io.StringIO())
    plain.close()
    assert _bar_intervals(monkeypatch, file=io.StringIO()) == (runs.LOG_REFRESH_S, runs.LOG_REFRESH_S)
    assert _bar_intervals(monkeypatch) == (runs.LOG_REFRESH_S, runs.LOG_REFRESH_S)  # stderr, not a terminal
    assert _bar_intervals(monkeypatch, file=_Terminal()) == (plain.mininterval, plain.maxinterval) != (30, 30)
    assert _bar_intervals(monkeypatch, file=io.StringIO(), mininterval=2.0) == (2.0, plain.maxinterval)


def test_metrics_truncation_drops_a_line_without_a_step_and_creates_no_file(tmp_path):
    """On resume a line with no ``step`` (damaged into another JSON object) is dropped like a half-written one, not
    a KeyError; without a file there is nothing to truncate and none is created (it appears with the first line);
    a log opened without a resume step keeps every line."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"split": "train"}\n{"step": 2}\n')
    runs.MetricsLog(metrics)
    assert metrics.read_text() == '{"step": 1}\n{"split": "train"}\n{"step": 2}\n'
    runs.MetricsLog(metrics, resume_step=1)
    assert metrics.read_text() == '{"step": 1}\n'
    runs.MetricsLog(metrics, resume_step=-1)  # a resume of a run killed before its first checkpoint: from step 0
    assert metrics.read_text() == ""
    absent = tmp_path / "new" / "metrics.jsonl"
    runs.MetricsLog(absent, resume_step=-1)
    assert not absent.exists()


def test_metrics_lines_are_appended_one_per_record(tmp_path):
    """Each `MetricsLog.write` adds one JSON line after the ones a resume kept."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2}\n')
    log = runs.MetricsLog(metrics, resume_step=1)
    log.write({"step": 2, "loss": 0.5})
    log.write({"step": 3, "loss": 0.25})
    assert [json.loads(ln) for ln in metrics.read_text().splitlines()] == [
        {"step": 1}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}]


def test_a_heldout_record_names_the_training_and_the_heldout_tokens_apart():
    """``tokens`` of a held-out line are the training tokens so far; the held-out tokens scored are
    ``eval_tokens``. The metrics given (the run's `Progress.initial_heldout`, saved in every checkpoint and
    written again after a resume) are left as they were."""
    metrics = {"loss": 2.5, "tokens": 640}
    assert runs.heldout_record(4, 128, metrics) == {"step": 4, "split": "heldout", "tokens": 128, "eval_tokens": 640,
                                                    "loss": 2.5}
    assert metrics == {"loss": 2.5, "tokens": 640}
    assert runs.heldout_record(0, 0, {"loss": 1.0})["eval_tokens"] == 0


# --------------------------------------------------------------------------- how long the rest takes


@pytest.mark.parametrize("step,stop_at,every,total,count", [
    (0, 10, 4, 10, 3),  # 4, 8 and the final one at 10
    (4, 10, 4, 10, 2),  # the evaluation at step 4 is done: 8 and 10
    (0, 8, 4, 8, 2),  # 4, then 8 once: the periodic one at the final step is the final one
    (0, 6, 4, 10, 1),  # stopped at 6 (train.stop_after): 4 only, no final one
    (0, 10, 0, 10, 1),  # eval_every 0: the final one only
    (10, 10, 4, 10, 1),  # nothing left to train: the final evaluation still runs
])
def test_evals_between_counts_the_periodic_and_the_final_evaluations(step, stop_at, every, total, count):
    assert runs.evals_between(step, stop_at, every, total) == count


def test_format_duration_at_its_unit_boundaries():
    assert [runs.format_duration(s) for s in (-5, 0, 59.4, 59.5, 60, 3599, 3600, 7325)] == [
        "0 s", "0 s", "59 s", "1 min 00 s", "1 min 00 s", "59 min 59 s", "1 h 00 min", "2 h 02 min"]


def test_expected_duration_says_when_the_rest_is_done(monkeypatch):
    """The clock time printed is now + the steps and evaluations left (here 2 h 10 min later)."""
    now = time.mktime((2026, 3, 1, 9, 0, 0, 0, 0, -1))
    monkeypatch.setattr(time, "time", lambda: now)
    line = runs.expected_duration(3.0, 2000, 600.0, 3)
    assert line == ("expected: 2 h 10 min more (2000 steps at 3.0 s/step + 3 held-out evaluations at 600 s); done "
                    "around 11:10")


# --------------------------------------------------------------------------- run folder


def _config(out, **train) -> DistillConfig:
    cfg = DistillConfig()
    cfg.train.out_dir = str(out)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_a_forced_resume_returns_the_changes_and_a_refusal_names_the_first(tmp_path):
    """--resume with a changed setting is refused naming the first changed key (sorted); with --force it resumes and
    hands the changes on (`replace_config` saves the new config with them once the checkpoint has loaded)."""
    out = tmp_path / "run"
    runs.claim_run_dir(out, _config(out), False)
    changed = _config(out, resume=True, seed=7, lr=1e-3)
    with pytest.raises(TailkdError, match=rf"^cannot resume {out}: train\.lr was 0\.0001, now 0\.001; resume with "
                                          r"the run's own config \(--config .*config\.yaml\)"):
        runs.prepare_run_dir(changed)
    changed.train.force_resume = True
    assert runs.prepare_run_dir(changed) == (out, True, ["train.lr: 0.0001 -> 0.001", "train.seed: 0 -> 7"])


def test_a_resume_of_a_run_whose_config_is_empty_is_refused(tmp_path):
    """An empty config.yaml reads as the defaults; a run saves every section, so it is damaged, not a run of
    defaults that any default config resumes."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("")
    with pytest.raises(TailkdError, match=rf"^cannot resume {out}: its config\.yaml is damaged \(it is empty\)"):
        runs.prepare_run_dir(_config(out, resume=True))


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TailkdError, match=r"is not a tailkd run folder \(no config\.yaml\) and --overwrite would "
                                          r"delete everything in it"):
        runs.prepare_run_dir(_config(out, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine"


def test_a_folder_named_like_a_config_leftover_makes_the_folder_a_run_folder(tmp_path):
    """Only a file can be the temporary file of a killed config.yaml write: a folder of that name is something
    else, so the folder is not free for a new run."""
    out = tmp_path / "run"
    (out / ".tmp-config.yaml-1").mkdir(parents=True)
    with pytest.raises(TailkdError, match="already exists"):
        runs.prepare_run_dir(_config(out))


def test_a_resume_claims_nothing(tmp_path):
    """claim_run_dir of a resume writes nothing: the run's config.yaml stays (the config of a --force is saved by
    `replace_config` once the checkpoint fits)."""
    out = tmp_path / "run"
    runs.claim_run_dir(out, _config(out), False)
    before = (out / "config.yaml").read_text()
    runs.claim_run_dir(out, _config(out, resume=True, seed=7), True, student_init={"layers": [0]})
    assert (out / "config.yaml").read_text() == before and sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_overwrite_through_a_linked_run_folder_unlinks_a_link_inside_it(tmp_path):
    """--overwrite of a run folder that is a symlink empties the folder it points to; a link in it to a folder
    elsewhere is removed, not followed (and not refused by rmtree): the folder it points to is not the run's."""
    target, elsewhere = tmp_path / "disk" / "run", tmp_path / "data"
    target.mkdir(parents=True)
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not the run's")
    (target / "config.yaml").write_text("train: {seed: 3}\n")
    (target / "data").symlink_to(elsewhere, target_is_directory=True)
    link = tmp_path / "run"
    link.symlink_to(target, target_is_directory=True)
    runs.claim_run_dir(link, _config(link, overwrite=True), False)
    assert sorted(p.name for p in target.iterdir()) == ["config.yaml"]
    assert (elsewhere / "keep.txt").read_text() == "not the run's"


def test_overwrite_empties_the_run_folder_and_keeps_the_folder(tmp_path, monkeypatch):
    """--overwrite deletes the run in its folder, not the folder: a mount point (which rmtree cannot remove: EBUSY,
    after deleting what it held) keeps working, the folder's own permissions stay. A file that cannot be deleted is
    refused in one line naming it."""
    import errno
    import os

    out = tmp_path / "run"
    (out / "checkpoints" / "step_2").mkdir(parents=True)
    (out / "config.yaml").write_text("train: {seed: 3}\n")
    (out / "checkpoints" / "step_2" / "state.pt").write_bytes(b"x")
    out.chmod(0o750)  # not what a new folder gets (0o777 less the umask)
    runs.claim_run_dir(out, _config(out, overwrite=True, seed=5), False)
    assert os.stat(out).st_mode & 0o777 == 0o750 and sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    assert "seed: 5" in (out / "config.yaml").read_text()

    def busy(path, *args, **kwargs):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))

    (out / "checkpoints").mkdir()
    monkeypatch.setattr(runs.shutil, "rmtree", busy)
    with pytest.raises(TailkdError, match=rf"^--overwrite could not delete {re.escape(str(out / 'checkpoints'))} "
                                          r"\(Device or resource busy\); delete the run in .* yourself or choose "
                                          r"another --out$"):
        runs.claim_run_dir(out, _config(out, overwrite=True), False)


def test_replace_config_keeps_the_old_one_and_saves_the_new_without_the_invocation_flags(tmp_path, capsys):
    """A forced resume's config.yaml: the old one kept as config.replaced-TIME.yaml, the new one saved without
    --resume / --force (so the printed ``--config RUN/config.yaml --resume`` continues it, and the next change needs
    --force again). A resume without changes writes nothing."""
    out = tmp_path / "run"
    runs.claim_run_dir(out, _config(out), False)
    before = (out / "config.yaml").read_text()
    runs.replace_config(out, _config(out, resume=True, force_resume=True, seed=7), [])
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"] and (out / "config.yaml").read_text() == before
    assert capsys.readouterr().err == ""
    runs.replace_config(out, _config(out, resume=True, force_resume=True, seed=7), ["train.seed: 0 -> 7"])
    kept = [p for p in out.iterdir() if p.name != "config.yaml"]
    assert len(kept) == 1 and kept[0].name.startswith("config.replaced-") and kept[0].read_text() == before
    train = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (train["seed"], train["resume"], train["force_resume"], train["overwrite"]) == (7, False, False, False)
    assert f"--force: resuming {out} with a changed config (train.seed: 0 -> 7)" in capsys.readouterr().err


# --------------------------------------------------------------------------- checkpoints


class _Sampler:
    def __init__(self, state=None):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def _linear(groups=1):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    params = list(model.parameters())
    split = [params] if groups == 1 else [[p for p in params if p.ndim == 2], [p for p in params if p.ndim < 2]]
    optimizer = torch.optim.AdamW([{"params": g} for g in split], lr=1e-2)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))


def _step(model, optimizer, scheduler):
    optimizer.zero_grad()
    model(torch.ones(2, 3)).square().sum().backward()
    optimizer.step()
    scheduler.step()


def test_a_restore_puts_back_the_counters_the_schedule_and_the_data_order(tmp_path):
    model, optimizer, scheduler = _linear()
    for _ in range(3):
        _step(model, optimizer, scheduler)
    progress = runs.Progress(step=3, tokens=96, elapsed=2.5, initial_heldout={"loss": 3.0, "tokens": 64},
                             bad_steps=1, bad_in_a_row=1, empty_steps=1)
    runs.save(tmp_path, model, optimizer, scheduler, _Sampler({"epoch": 1, "position": 5}), progress, keep_last=2)
    model, optimizer, scheduler = _linear()
    sampler = _Sampler()
    assert runs.restore(tmp_path, model, model, optimizer, scheduler, sampler) == progress
    assert scheduler.last_epoch == 3 and scheduler.get_last_lr() == [1e-2 / 4]
    assert sampler.state == {"epoch": 1, "position": 5}


def test_a_checkpoint_before_the_first_update_resumes_into_the_same_first_update(tmp_path):
    """A checkpoint saved before any optimizer step holds no optimizer state: loading it must not leave torch's
    zero-gradient initialisation (AdamW: step 1, zero moments), or the first update differs from an uninterrupted
    run's."""
    model, optimizer, scheduler = _linear()
    runs.save(tmp_path, model, optimizer, scheduler, _Sampler(), runs.Progress(), keep_last=2)
    resumed, resumed_optimizer, resumed_scheduler = _linear()
    runs.restore(tmp_path, resumed, resumed, resumed_optimizer, resumed_scheduler, _Sampler())
    assert not resumed_optimizer.state
    _step(model, optimizer, scheduler)
    _step(resumed, resumed_optimizer, resumed_scheduler)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def test_a_run_without_a_checkpoint_starts_from_step_0(tmp_path):
    """Killed before its first checkpoint: no checkpoint at all is no error (None: the run starts again)."""
    model, optimizer, scheduler = _linear()
    assert runs.restore(tmp_path, model, model, optimizer, scheduler, _Sampler()) is None


def test_a_run_with_more_parameter_groups_than_its_checkpoint_is_refused(tmp_path):
    """A checkpoint whose optimizer had one group (tailkd's has two: decay for matrices only), the run's two: the
    weights of the second group have no state in a group of that place, so the first is named in one line (without
    the check of the group's place: an IndexError, a traceback)."""
    model, optimizer, scheduler = _linear(groups=1)
    _step(model, optimizer, scheduler)
    runs.save(tmp_path, model, optimizer, scheduler, _Sampler(), runs.Progress(step=1), keep_last=2)
    model, optimizer, scheduler = _linear(groups=2)
    with pytest.raises(TailkdError, match=r"it holds no state of 0\.bias, which this run trains"):
        runs.restore(tmp_path, model, model, optimizer, scheduler, _Sampler())


def test_the_untrained_weight_check_passes_on_ranks_without_the_checkpoint():
    """The ranks other than 0 read no checkpoint (an empty optimizer state): nothing to check there, rank 0's
    answer is broadcast."""
    model, optimizer, _ = _linear()
    assert runs._untrained_in_checkpoint(model, optimizer, {}) is None


def test_tied_embeddings_trained_in_the_checkpoint_and_now_resume(tmp_path):
    """Tied embeddings and LM head: one parameter, saved in the optimizer state under its first name only. The
    check for untrained weights accepts it under any of its names, so the run resumes with its own config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def tied():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    model, optimizer, scheduler = tied()
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    runs.save(tmp_path, model, optimizer, scheduler, _Sampler(), runs.Progress(step=1), keep_last=2)
    resumed, resumed_optimizer, resumed_scheduler = tied()
    assert runs.restore(tmp_path, resumed, resumed, resumed_optimizer, resumed_scheduler, _Sampler()).step == 1
    embeddings = resumed.get_input_embeddings().weight
    assert torch.equal(resumed_optimizer.state[embeddings]["exp_avg"], optimizer.state[model.lm_head.weight]["exp_avg"])


# --------------------------------------------------------------------------- run control


def test_signals_in_a_run_are_recorded_said_once_and_a_second_ctrl_c_interrupts(capsys):
    """SIGTERM / SIGINT inside the block are recorded (the loop stops after its step) and said once; a second
    SIGTERM is recorded too, a second SIGINT (Ctrl-C twice) raises KeyboardInterrupt; the caller's handlers are back
    afterwards. (Python's own handlers first: a suite started as a shell's background job has SIGINT ignored, which a
    run keeps ignoring, `test_a_signal_the_process_ignores_stays_ignored`.)"""
    started = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        _signals_recorded_said_once(capsys)
    finally:
        signal.signal(signal.SIGINT, started[0])
        signal.signal(signal.SIGTERM, started[1])


def _signals_recorded_said_once(capsys):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with runs.stop_on_signals() as received:
        try:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt:  # not raised on: pytest would end the session
            pytest.fail("a second SIGTERM interrupted at once, as only a second SIGINT may")
        assert received == [signal.SIGTERM, signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    err = capsys.readouterr().err
    assert err.count("received") == 1 and ("tailkd: SIGTERM received: finishing this step, then saving a checkpoint "
                                           "(Ctrl-C to stop at once, without one)") in err
    with runs.stop_on_signals() as received:
        signal.raise_signal(signal.SIGINT)
        assert received == [signal.SIGINT]
    assert "(Ctrl-C again to stop at once, without one)" in capsys.readouterr().err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_signal_the_process_ignores_stays_ignored():
    """A background job of a script starts with SIGINT ignored (the shell's doing): a run there is not stopped by it,
    as its loading was not (it had been, once training started); SIGTERM still is."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with runs.stop_on_signals() as received:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
            assert received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_signals_are_left_alone_outside_the_main_thread():
    """Python takes signal handlers in the main thread only (elsewhere signal.signal is a ValueError): a run in
    another thread (a notebook's, a server's) gets an empty list and the handlers stay as they are."""
    seen = {}

    def run():
        try:
            with runs.stop_on_signals() as received:
                seen["received"] = received
        except Exception as exc:  # noqa: BLE001 (reported below)
            seen["error"] = exc

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == {"received": []} and signal.getsignal(signal.SIGTERM) is before


def test_deterministic_mode_sets_cublas_workspace_unless_given(monkeypatch):
    """cuBLAS refuses deterministic mode without CUBLAS_WORKSPACE_CONFIG: it is set where the environment has none,
    a value given is kept."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "placeholder")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")  # removed now, put back as it was (unset or not) afterwards
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with runs.deterministic_mode(True):
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        with runs.deterministic_mode(True):
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_a_calibrated_students_resume_check_names_what_differs(tmp_path):
    """`runs.check_student_init`: the first tensor whose source, kept experts, kept MLP units or kept hidden channels
    (their digests) or kept heads (attention or Mamba-2) differ from the run's student_init.json is named in one line;
    equal rows, or a file that holds no list of rows, pass."""
    from tailkd.runs import check_student_init

    row = {"name": "model.layers.0.mlp.up_proj.weight", "source": "model.layers.2.mlp.up_proj.weight",
           "experts": [1, 3], "units": "2 of 4, sha1 00aa", "channels": "3 of 8, sha1 00cc",
           "heads": [0, 1], "ssm_heads": [0, 2]}
    (tmp_path / "student_init.json").write_text(json.dumps([row]))
    check_student_init(tmp_path, [dict(row)])
    for change, said in ((dict(source="model.layers.3.mlp.up_proj.weight"), "built from model.layers.3.mlp.up_proj."
                          "weight, the run's from model.layers.2.mlp.up_proj.weight"),
                         (dict(experts=[1, 2]), "its experts [1, 2], the run's [1, 3]"),
                         (dict(units="2 of 4, sha1 00bb"), "its units 2 of 4, sha1 00bb, the run's 2 of 4, sha1 00aa"),
                         (dict(channels="3 of 8, sha1 00dd"), "its channels 3 of 8, sha1 00dd, the run's 3 of 8, "
                                                              "sha1 00cc"),
                         (dict(heads=[2, 3]), "its heads [2, 3], the run's [0, 1]"),
                         (dict(ssm_heads=[1, 2]), "its ssm_heads [1, 2], the run's [0, 2]")):
        with pytest.raises(TailkdError, match=rf"^cannot resume {re.escape(str(tmp_path))}: the student built now "
                                              rf"differs from the run's \(student_init\.json\): model\.layers\.0\.mlp"
                                              rf"\.up_proj\.weight {re.escape(said)}: a student chosen from "):
            check_student_init(tmp_path, [{**row, **change}])
    (tmp_path / "student_init.json").write_text(json.dumps({"rows": [row]}))
    check_student_init(tmp_path, [{**row, "units": "other"}])
