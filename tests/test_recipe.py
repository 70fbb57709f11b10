"""tailkd.recipe without training: how a recipe file is read into stages, which finished stages and evaluations a
re-run reuses, and the order run_recipe trains, evaluates and compares in (distill, eval and compare recorded, not
run: tests/test_sft_distill.py runs real recipes)."""

import json
import re
from pathlib import Path

import pytest
import yaml
from test_reproduce import _finish

from tailkd.config import DistillConfig
from tailkd.errors import TailkdError
from tailkd.recipe import (
    absolute_settings,
    check_evaluations,
    first_change,
    read_recipe,
    result_settings,
    run_recipe,
    run_stages,
    saved_change,
    saved_settings,
    write_settings,
)


def write_recipe(path, doc) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_stages_without_a_name_are_numbered_from_one_and_two_of_one_name_are_refused(tmp_path):
    """A stage's folder is out_dir/<its name>, stageN (from 1) without one; two stages of one name would share a
    folder (the second would be skipped as finished by the first), so they are refused."""
    path = write_recipe(tmp_path / "r.yaml", {"stages": [{}, {"name": "b"}, {}]})
    assert [Path(s.train.out_dir).name for s in read_recipe(path, str(tmp_path / "o")).stages] == [
        "stage1", "b", "stage3"]
    write_recipe(path, {"stages": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(TailkdError, match=r"two stages are named 'a'; give each stage its own name$"):
        read_recipe(path, str(tmp_path / "o"))


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs"])
def test_a_stage_name_that_is_not_one_folder_name_is_refused(tmp_path, name):
    """A stage's name is its run's folder under out_dir: "" or "." made out_dir itself the run (the other stages'
    folders inside it), ".." the folder above, "a/b" a nested folder that compare's baseline (a stage's folder name)
    cannot name, "/abs" a folder outside out_dir. Refused as one line before anything runs."""
    path = write_recipe(tmp_path / "r.yaml", {"stages": [{"name": "a"}, {"name": name}]})
    with pytest.raises(TailkdError, match=rf"^recipe {re.escape(str(path))}: a stage is named {re.escape(repr(name))}; "
                                          r"a stage's name is its run's folder under out_dir: give one folder name"):
        read_recipe(path, str(tmp_path / "o"))


@pytest.mark.parametrize("doc, match", [
    ({"stages": []}, r"needs a non-empty list under 'stages'$"),
    ({"chain": "no", "stages": [{}]}, r"'chain' must be true or false, got 'no'$"),
])
def test_a_recipe_without_stages_or_with_a_chain_that_is_no_boolean_is_refused(tmp_path, doc, match):
    """No stages: nothing would run (and run_recipe read the last summary of none); chain: "no" is a string, and a
    non-empty string is true: it would chain the stages the user meant to run side by side."""
    with pytest.raises(TailkdError, match=match):
        read_recipe(write_recipe(tmp_path / "r.yaml", doc), str(tmp_path / "o"))


def test_the_out_argument_and_set_win_over_the_recipe_file(tmp_path):
    """--out replaces the file's out_dir; --set wins over common: and over a stage's own keys, and a stage's own keys
    win over common:."""
    path = write_recipe(tmp_path / "r.yaml", {
        "out_dir": str(tmp_path / "file"), "common": {"train": {"max_steps": 7, "lr": 1e-3}},
        "stages": [{"name": "a", "train": {"max_steps": 3}}, {"name": "b"}]})
    a, b = read_recipe(path, str(tmp_path / "given")).stages
    assert a.train.out_dir == str(tmp_path / "given" / "a") and (a.train.max_steps, b.train.max_steps) == (3, 7)
    a, b = read_recipe(path, None, {"train": {"max_steps": 2}}).stages
    assert a.train.out_dir == str(tmp_path / "file" / "a") and (a.train.max_steps, b.train.max_steps) == (2, 2)
    assert a.train.lr == b.train.lr == 1e-3


def test_compare_config_of_a_recipe(tmp_path):
    """compare: every stage's run, in order, into out_dir/compare unless compare.out says otherwise; a baseline
    naming a stage is that stage's run folder (compare reads folders, not stage names)."""
    stages = [{"name": "a"}, {"name": "b"}, {"name": "c"}]
    path = write_recipe(tmp_path / "r.yaml", {"chain": False, "stages": stages,
                                              "compare": {"compare": {"baseline": "b"}}})
    cmp = read_recipe(path, str(tmp_path / "o")).compare_config().compare
    assert cmp.runs == [str(tmp_path / "o" / n) for n in "abc"] and cmp.out == str(tmp_path / "o" / "compare")
    assert cmp.baseline == str(tmp_path / "o" / "b")
    write_recipe(path, {"chain": False, "stages": stages, "compare": {"compare": {"out": str(tmp_path / "mine")}}})
    assert read_recipe(path, str(tmp_path / "o")).compare_config().compare.out == str(tmp_path / "mine")


def test_a_finished_stage_with_another_eval_every_is_refused(tmp_path):
    """train.eval_every is free on a resume but not for a finished stage: its held-out rows (the curves and the
    table's final row) were taken at the other points."""
    cfg = DistillConfig()
    cfg.train.out_dir = str(tmp_path / "s")
    _finish(cfg.validate())
    cfg.train.eval_every = 3
    assert saved_change(cfg.validate()) == ("train.eval_every", 10, 3)


def test_an_empty_folder_of_a_chained_stage_is_no_started_run(tmp_path):
    """check_chain refuses a stage with a run in its folder that began from a student to be trained again; an empty
    folder (made by hand, or by a run stopped before it wrote anything) holds no such run: the recipe goes on."""
    path = write_recipe(tmp_path / "r.yaml", {"stages": [{"name": "a"}, {"name": "b"}],
                                              "common": {"teacher": {"path": str(tmp_path / "no-teacher")}}})
    a, b = read_recipe(path, str(tmp_path / "o")).stages
    Path(b.train.out_dir).mkdir(parents=True)
    trained = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr("tailkd.train.distill", lambda cfg: trained.append(Path(cfg.train.out_dir).name) or {})
        run_stages([a, b])
    assert trained == ["a", "b"]


def test_the_settings_of_an_evaluation(tmp_path, monkeypatch):
    """result_settings: not the device (the numbers do not depend on it) nor the run's own paths; first_change also
    reads a saved file's relative paths against the working directory (as an older tailkd saved them), and finds a
    setting only the saved file has."""
    from tailkd.command_config import EvalConfig

    ev = EvalConfig()
    ev.eval.student, ev.eval.out, ev.eval.device = "s", "s/eval.json", "cpu"
    settings = result_settings(ev, "eval")
    assert not {"eval.device", "eval.student", "eval.out"} & set(settings) and "eval.max_rows" in settings
    monkeypatch.chdir(tmp_path)
    planned = absolute_settings({"teacher.path": "t", "eval.max_rows": 8})
    assert planned["teacher.path"] == str(tmp_path / "t")
    assert first_change({"teacher.path": "t", "eval.max_rows": 8}, planned) is None
    assert first_change({"teacher.path": "t", "eval.max_rows": 8, "eval.old": 1}, planned) == ("eval.old", 1, None)


def test_a_settings_file_that_is_no_object_is_not_trusted(tmp_path):
    result = tmp_path / "eval.json"
    result.write_text("{}")
    write_settings(result, ["eval.max_rows", 8])
    assert saved_settings(result) is None


class Recorder:
    """distill, eval and compare of run_recipe replaced by records of what each was given: distill leaves the run
    folder `_finish` makes (or, for a stage in ``stop``, a stopped run: config.yaml only, summary "stopped"), eval
    writes its result file, noting whether an earlier result was still there when it began."""

    def __init__(self, monkeypatch):
        self.calls, self.stop = [], set()
        monkeypatch.setattr("tailkd.train.distill", self.distill)
        monkeypatch.setattr("tailkd.commands.evaluate", self.evaluate)
        monkeypatch.setattr("tailkd.commands.compare", self.compare)

    def distill(self, cfg):
        name = Path(cfg.train.out_dir).name
        self.calls.append(("distill", name, cfg.train.resume))
        _finish(cfg, final=name not in self.stop)
        return {"stopped": True} if name in self.stop else {}

    def evaluate(self, ev):
        out = Path(ev.eval.out)
        self.calls.append(("eval", out.parent.name, out.exists()))
        out.write_text(json.dumps({"student": ev.eval.student, "teacher": ev.teacher.path}))  # as eval writes it

    def compare(self, cc):
        self.calls.append(("compare", [Path(r).name for r in cc.compare.runs]))

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def test_run_recipe_trains_evaluates_and_compares_what_is_not_done(tmp_path, monkeypatch, capsys):
    """A sweep of two stages with evaluate: and compare:. Every stage trained, then evaluated, then compared; a
    re-run trains and evaluates nothing; a stage whose final/ is deleted is trained again (resumed: its config.yaml
    is there; a folder without one starts afresh) and evaluated again, its old result removed first; a stage stopped
    (a signal) ends the recipe: no later stage, no evaluation, no compare."""
    path = write_recipe(tmp_path / "r.yaml", {
        "chain": False, "common": {"teacher": {"path": str(tmp_path / "no-teacher")}},
        "stages": [{"name": "a"}, {"name": "b"}], "evaluate": {"eval": {"max_rows": 2}}, "compare": {"compare": {}}})
    out = tmp_path / "o"
    rec = Recorder(monkeypatch)
    run_recipe(path, str(out))
    assert rec.take() == [("distill", "a", False), ("distill", "b", False), ("eval", "a", False),
                          ("eval", "b", False), ("compare", ["a", "b"])]
    run_recipe(path, str(out))
    assert rec.take() == [("compare", ["a", "b"])]
    (out / "b" / "final" / "config.json").unlink()
    run_recipe(path, str(out))
    assert rec.take() == [("distill", "b", True), ("eval", "b", False), ("compare", ["a", "b"])]
    (out / "b" / "final" / "config.json").unlink()
    (out / "b" / "config.yaml").unlink()  # a folder without a run's config: nothing to resume
    run_recipe(path, str(out))
    assert rec.take() == [("distill", "b", False), ("eval", "b", False), ("compare", ["a", "b"])]
    for name in ("a", "b"):
        (out / name / "final" / "config.json").unlink()
    rec.stop = {"a"}
    run_recipe(path, str(out))
    assert rec.take() == [("distill", "a", True)]


def test_an_evaluation_of_a_stage_to_be_trained_again_is_not_checked(tmp_path, monkeypatch):
    """check_evaluations compares only the evaluations of finished stages with evaluate:'s settings: that of a stage
    to be trained again is made again anyway, so other settings in it stop nothing."""
    path = write_recipe(tmp_path / "r.yaml", {"chain": False, "stages": [{"name": "a"}],
                                              "common": {"teacher": {"path": str(tmp_path / "no-teacher")}},
                                              "evaluate": {"eval": {"max_rows": 2}}})
    recipe = read_recipe(path, str(tmp_path / "o"))
    (stage,) = recipe.stages
    _finish(stage)
    out = recipe.eval_out(stage)
    out.write_text(json.dumps({"student": "s", "teacher": "t"}))
    write_settings(out, {**result_settings(recipe.eval_config(stage), "eval"), "eval.max_rows": 5})
    with pytest.raises(TailkdError, match=r"was made with eval.max_rows=5, but the recipe's evaluate now gives 2"):
        check_evaluations(recipe)
    (Path(stage.train.out_dir) / "summary.json").unlink()  # not finished: trained again, then evaluated again
    check_evaluations(recipe)


def test_a_started_stage_with_other_settings_is_resumed_not_refused(tmp_path, monkeypatch):
    """run_stages refuses a FINISHED stage run with other settings; a stage only started is handed to distill,
    which resumes it (and refuses the change itself, naming the resume's rules)."""
    cfg = DistillConfig()
    cfg.train.out_dir = str(tmp_path / "s")
    _finish(cfg.validate(), final=False)
    cfg.loss.k = 5
    seen = []
    monkeypatch.setattr("tailkd.train.distill", lambda c: seen.append(c.train.resume) or {})
    run_stages([cfg.validate()])
    assert seen == [True]


def test_a_stage_killed_before_its_summary_is_resumed_not_skipped(tmp_path, monkeypatch):
    """finished: final/ AND summary.json, written last; a stage with final/ but no summary.json (killed between
    them) is handed to distill again, resumed (which writes the outputs), not reported done."""
    cfg = DistillConfig()
    cfg.train.out_dir = str(tmp_path / "s")
    _finish(cfg.validate())
    (tmp_path / "s" / "summary.json").unlink()
    seen = []
    monkeypatch.setattr("tailkd.train.distill", lambda c: seen.append(c.train.resume) or {})
    assert run_stages([cfg]) == [{}] and seen == [True]
