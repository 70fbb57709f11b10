"""Paths and names: long file names, temporary names beside a target, leftovers of killed writers, `~`, relative
paths read from another working directory."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tailkd import runs
from tailkd.config import DistillConfig
from tailkd.errors import TailkdError


def _dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


@pytest.mark.parametrize("tagged", [False, True], ids=["pid", "pid@host"])
def test_a_dead_writers_first_config_leftover_is_removed_when_the_run_starts(tmp_path, tagged):
    """A run killed while writing its first config.yaml leaves `atomic_write_file`'s temporary file, named
    ``.tmp-config.yaml-<pid>@<host>`` (an older tailkd: ``-<pid>``). Starting the run there again crashed on the
    tagged name (ValueError: invalid literal for int() with base 10: '<pid>@<host>', exit 1)."""
    out = tmp_path / "run"
    out.mkdir()
    pid = _dead_pid()
    leftover = out / (f".tmp-config.yaml-{pid}@{socket.gethostname()}" if tagged else f".tmp-config.yaml-{pid}")
    leftover.write_text("train:\n  lr: 0.0")
    cfg = DistillConfig()
    cfg.train.out_dir = str(out)
    assert runs.prepare_run_dir(cfg)[:2] == (out, False)
    runs.claim_run_dir(out, cfg, False)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_a_live_or_other_hosts_first_config_leftover_is_left_alone(tmp_path):
    """A live writer's temporary config (a run claiming the folder right now) and another host's (a shared disk:
    its pid says nothing here) are not removed."""
    out = tmp_path / "run"
    out.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out / f".tmp-config.yaml-{writer.pid}@{socket.gethostname()}"
        other = out / f".tmp-config.yaml-{_dead_pid()}@not-{socket.gethostname()}"
        for p in (live, other):
            p.write_text("train:\n  lr: 0.0")
        cfg = DistillConfig()
        cfg.train.out_dir = str(out)
        runs.claim_run_dir(out, cfg, False)
    finally:
        writer.kill()
        writer.wait()
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.yaml", live.name, other.name])


LONG_NAMES = {"ascii 250": "r" * 246 + ".json", "cjk 255 bytes": "中" * 85, "e-acute 254 bytes": "é" * 127}


@pytest.mark.parametrize("name", LONG_NAMES.values(), ids=LONG_NAMES.keys())
def test_a_target_named_near_name_max_is_written(tmp_path, name):
    """A file or folder whose name is near NAME_MAX (255 bytes) but within it: the temporary name beside it
    (``.tmp-<name>-<pid>@<host>...``, 20+ bytes more) was over the limit, so e.g. ``tailkd eval --out <240
    characters>.json`` failed after the evaluation with OSError: [Errno 36] File name too long (exit 1)."""
    from tailkd import checkpoint as ckpt

    assert len(name.encode()) <= ckpt.NAME_MAX
    ckpt.atomic_write_text(tmp_path / name, "one")
    ckpt.atomic_write_text(tmp_path / name, "two")  # replacing it
    assert (tmp_path / name).read_text() == "two"
    folder = tmp_path / "d" / name
    for text in ("one", "two"):
        ckpt.atomic_write_dir(folder, lambda tmp, text=text: (tmp / "f.txt").write_text(text))
        assert (folder / "f.txt").read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d", name])
    assert [p.name for p in folder.parent.iterdir()] == [name]


def test_a_dead_writers_leftovers_of_a_long_name_are_found(tmp_path):
    """`remove_dead_writers` finds a killed writer's shortened ``.tmp-*`` and ``.old-*`` (its pid longer or shorter
    than ours: the shortened name does not depend on it), and puts the set-aside folder back."""
    from tailkd import checkpoint as ckpt

    final = tmp_path / ("x" * 250)
    stem, tag = ckpt.temp_stem(final.name), f"{_dead_pid()}@{socket.gethostname()}"
    assert stem != final.name and len(f".tmp-{stem}-4194304@{socket.gethostname()}-{'0' * 12}".encode()) <= 255
    half = tmp_path / f".tmp-{stem}-{tag}-0123456789ab"
    aside = tmp_path / f".old-{stem}-{tag}"
    half.mkdir()
    aside.mkdir()
    (aside / "kept.txt").write_text("the old folder")
    assert sorted(ckpt.remove_dead_writers(final)) == sorted([half, aside])
    assert (final / "kept.txt").read_text() == "the old folder" and sorted(tmp_path.iterdir()) == [final]


def test_a_name_that_fits_beside_its_temporary_names_is_kept_whole():
    """temp_stem keeps a name of exactly the room its temporary names leave (NAME_MAX less the tag, the host and the
    random part) and shortens one byte more to a stem that fits."""
    from tailkd import checkpoint as ckpt

    room = ckpt.NAME_MAX - ckpt._TEMP_ROOM - len(socket.gethostname().encode())
    assert ckpt.temp_stem("a" * room) == "a" * room
    longer = ckpt.temp_stem("a" * (room + 1))
    assert longer != "a" * (room + 1) and len(longer.encode()) <= room


def test_a_live_process_of_another_user_is_alive(monkeypatch):
    """pid_alive: os.kill(pid, 0) refused (PermissionError: another user's process) means the process exists, so
    its temporary files are not a dead writer's; a pid that is gone is dead."""
    import os

    from tailkd import checkpoint as ckpt

    dead = _dead_pid()
    assert not ckpt.pid_alive(dead)

    def refuse(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refuse)
    assert ckpt.pid_alive(dead)


def test_an_untagged_temporary_name_is_a_dead_writers_only_when_asked():
    """``.tmp-<file>-<pid>`` (an older tailkd's temporary file, without ``@host``) is read as this host's dead writer's
    with ``untagged=True`` only; a name with this host's tag is read either way."""
    from tailkd import checkpoint as ckpt

    dead = _dead_pid()
    assert ckpt.left_by_dead_writer(f".tmp-config.yaml-{dead}", untagged=True)
    assert not ckpt.left_by_dead_writer(f".tmp-config.yaml-{dead}")
    assert ckpt.left_by_dead_writer(f".tmp-config.yaml-{dead}@{socket.gethostname()}")


def test_an_exclusive_atomic_write_never_writes_through_an_existing_link(tmp_path):
    """atomic_write_file(replace=False) never replaces an existing name: a symbolic link is one, even when the file
    it points to is missing (FileExistsError; nothing made where it points)."""
    from tailkd import checkpoint as ckpt

    link = tmp_path / "claim.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(FileExistsError):
        ckpt.atomic_write_file(link, lambda tmp: tmp.write_text("{}"), replace=False)
    assert not (tmp_path / "elsewhere.json").exists() and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["claim.json"]


def _configs():
    from tailkd.cli import COMMANDS

    return [DistillConfig, *(cls for cls, *_ in COMMANDS.values())]


def test_every_path_setting_is_listed_and_reads_a_leading_tilde_as_home(tmp_path, monkeypatch):
    """``~`` in a path setting (quoted on the command line, or in YAML) is the user's home, as transformers' and
    datasets' own paths: ``--out '~/runs/x'`` made a folder named '~' in the working directory, ``--data.cache_dir
    '~/c'`` another, and ``--data '~/corpus.txt'`` was 'does not exist' while ``--teacher '~/t'`` was expanded.
    Every str / list[str] leaf that names a file or folder is in PATH_KEYS; the others hold words (devices,
    choices, task names)."""
    from tailkd.config import PATH_KEYS, _leaves, from_dict, leaf_value

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = str(tmp_path / "home")
    words = {"teacher.dtype", "teacher.parallel", "student.mlp_init", "student.experts", "student.layer_choice",
             "student.mlp_units", "student.hidden_channels", "student.attention_heads", "student.ssm_head_choice",
             "data.doc_sep", "data.task", "data.sft_mode", "data.overlong", "loss.name", "loss.drkl_anchor",
             "train.precision", "train.device", "train.fused_loss", "train.loss_kernels", "train.parallel",
             "eval.split", "eval.device", "analyze.split", "analyze.device", "lm_eval.tasks", "lm_eval.split",
             "lm_eval.device", "cache.hidden_dtype", "cache.split", "cache.device", "select.device", "reproduce.device",
             "seqkd.device", "train.report_to"}
    seen = set()
    for cls in _configs():
        for key, tp, _ in _leaves(cls):
            if "str" not in str(tp) or "dict" in str(tp):
                continue
            seen.add(key)
            section, name = key.split(".")
            value = ["~/a", "b"] if "list" in str(tp) else "~/a"
            got = leaf_value(from_dict(cls, {section: {name: value}}), key)
            if key in PATH_KEYS:
                assert got == ([f"{home}/a", "b"] if isinstance(value, list) else f"{home}/a"), key
            else:
                assert key in words, f"{key}: a path (add it to PATH_KEYS) or a word (add it here)?"
    assert PATH_KEYS <= seen
    words = from_dict(DistillConfig, {"teacher": {"path": "smollm2"}, "data": {"paths": ["builtin:math"]}})
    assert (words.teacher.path, words.data.paths, words.data.chat_template) == ("smollm2", ["builtin:math"], "auto")


def test_a_tilde_in_a_config_built_in_python_or_a_recipe_is_home(tmp_path, monkeypatch):
    from tailkd.config import load_yaml
    from tailkd.recipe import read_recipe

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cfg = DistillConfig()
    cfg.train.out_dir, cfg.data.cache_dir = "~/runs/x", "~/cache"
    cfg.validate()
    assert (cfg.train.out_dir, cfg.data.cache_dir) == (f"{tmp_path}/runs/x", f"{tmp_path}/cache")
    (tmp_path / "r.yaml").write_text("out_dir: ~/math\nstages:\n  - name: one\n    train: {max_steps: 2}\n")
    assert load_yaml("~/r.yaml")["out_dir"] == "~/math"
    (stage,) = read_recipe("~/r.yaml").stages
    assert stage.train.out_dir == f"{tmp_path}/math/one"


def _relative_run(tmp_path, monkeypatch):
    """A run's config as `tailkd distill --teacher teacher --data corpus.txt --data.cache_dir cache --out runs/rel`
    from ``tmp_path/w1`` saves it (claim_run_dir), with a final/ folder."""
    from tailkd.config import from_dict

    work = tmp_path / "w1"
    (work / "teacher").mkdir(parents=True)
    (work / "corpus.txt").write_text("one\n\ntwo\n")
    monkeypatch.chdir(work)
    cfg = from_dict(DistillConfig, {"teacher": {"path": "teacher"}, "data": {"paths": ["corpus.txt"],
                                    "cache_dir": "cache", "heldout_paths": ["builtin:pydoc"]},
                                    "train": {"out_dir": "runs/rel/"}})
    runs.claim_run_dir(Path(cfg.train.out_dir), cfg, False)
    (work / "runs" / "rel" / "final").mkdir()
    return work, cfg


def test_a_runs_config_holds_absolute_paths(tmp_path, monkeypatch):
    """config.yaml held the paths as given, relative to the working directory of the run: `tailkd eval RUN/final`
    and `tailkd distill --config RUN/config.yaml --resume` from another one read them against theirs ('model
    'teacher' not found', '--resume given but runs/rel holds no run', or silently another folder of that name)."""
    from tailkd.config import load_yaml

    work, _ = _relative_run(tmp_path, monkeypatch)
    saved = load_yaml(work / "runs" / "rel" / "config.yaml")
    assert saved["teacher"]["path"] == str(work / "teacher") and saved["teacher"]["cache"] is None
    assert saved["data"]["paths"] == [str(work / "corpus.txt")] and saved["data"]["cache_dir"] == str(work / "cache")
    assert saved["data"]["heldout_paths"] == ["builtin:pydoc"] and saved["data"]["chat_template"] == "auto"
    assert saved["train"]["out_dir"] == str(work / "runs" / "rel") and saved["student"]["path"] is None


def test_tailkds_own_words_stay_words_in_a_runs_config(tmp_path, monkeypatch):
    """`absolute_paths` leaves tailkd's own words as they are: a chat_template of none or auto, the built-in teacher,
    builtin:* data sets (made absolute, 'none' would name a template file in the working directory)."""
    from tailkd.config import DistillConfig, absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = DistillConfig()
    cfg.data.paths, cfg.data.heldout_paths = ["builtin:math"], ["builtin:pydoc"]
    for word in ("none", "auto"):
        cfg.data.chat_template = word
        saved = absolute_paths(cfg)
        assert (saved.data.chat_template, saved.teacher.path) == (word, "smollm2")
        assert (saved.data.paths, saved.data.heldout_paths) == (["builtin:math"], ["builtin:pydoc"])


def test_absolute_paths_makes_every_local_path_absolute_as_written(tmp_path, monkeypatch):
    """Every path setting a run reads again (teacher and its cache, a student, data and held-out files, the data
    cache, a chat template file, a loss.module file, the run folder) is saved against the working directory, as
    written: through a symlinked folder and '..' unresolved (the link is what the user named; resolving it would tie
    the run to where it points today). A dotted loss.module and an empty setting stay as they are."""
    from tailkd.config import absolute_paths

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    cfg = DistillConfig()
    cfg.teacher.path, cfg.teacher.cache, cfg.student.path = "link/teacher", "caches/top64", "students/s"
    cfg.data.paths, cfg.data.heldout_paths = ["link/a.txt", "b.jsonl"], ["held/c.txt"]
    cfg.data.cache_dir, cfg.data.chat_template, cfg.train.out_dir = "dc", "tpl/chat.jinja", "runs/x/../y"
    for module, saved_module in (("losses/mine.py", str(tmp_path / "losses/mine.py")),
                                 ("losses/mine", str(tmp_path / "losses/mine")), ("mine.py", str(tmp_path / "mine.py")),
                                 ("pkg.mine", "pkg.mine")):
        cfg.loss.module = module
        saved = absolute_paths(cfg)
        assert saved.loss.module == saved_module
    assert saved.teacher.path == f"{tmp_path}/link/teacher" and saved.teacher.cache == f"{tmp_path}/caches/top64"
    assert saved.student.path == f"{tmp_path}/students/s" and saved.data.cache_dir == f"{tmp_path}/dc"
    assert saved.data.paths == [f"{tmp_path}/link/a.txt", f"{tmp_path}/b.jsonl"]
    assert saved.data.heldout_paths == [f"{tmp_path}/held/c.txt"]
    assert saved.data.chat_template == f"{tmp_path}/tpl/chat.jinja" and saved.train.out_dir == f"{tmp_path}/runs/x/../y"
    assert cfg.teacher.path == "link/teacher"  # a copy: the given config unchanged
    cfg.teacher.cache = ""
    assert absolute_paths(cfg).teacher.cache == ""


def test_eval_and_resume_of_a_run_from_another_working_directory(tmp_path, monkeypatch):
    from tailkd.command_config import EvalConfig
    from tailkd.config import from_dict, load_yaml

    work, _ = _relative_run(tmp_path, monkeypatch)
    other = tmp_path / "w2"
    (other / "teacher").mkdir(parents=True)  # another folder of the same name: not the run's
    monkeypatch.chdir(other)
    run = Path("../w1/runs/rel")
    ev = EvalConfig.run_defaults({"eval": {"student": str(run / "final")}})
    assert ev["teacher"]["path"] == str(work / "teacher") and ev["data"]["paths"] == [str(work / "corpus.txt")]
    again = from_dict(DistillConfig, {**load_yaml(run / "config.yaml"), "train": {
        **load_yaml(run / "config.yaml")["train"], "resume": True}})
    out, resuming, changes = runs.prepare_run_dir(again)
    assert (out, resuming, changes) == (work / "runs" / "rel", True, [])


def test_a_moved_run_folder_says_how_to_resume_it(tmp_path, monkeypatch):
    """config.yaml names the folder the run started in: resuming a moved run from its config said only 'holds no
    run; drop --resume'. The line now says that --out its new place resumes it, and that does."""
    from tailkd.config import from_dict, load_yaml

    work, _ = _relative_run(tmp_path, monkeypatch)
    moved = work / "runs" / "moved"
    (work / "runs" / "rel").rename(moved)
    saved = load_yaml(moved / "config.yaml")
    again = from_dict(DistillConfig, {**saved, "train": {**saved["train"], "resume": True}})
    with pytest.raises(TailkdError, match=r"holds no run; drop --resume to start a new run \(a run folder moved "
                                          r"since: --out its new place"):
        runs.prepare_run_dir(again)
    again.train.out_dir = str(moved)
    assert runs.prepare_run_dir(again) == (moved, True, [])


def test_a_resume_may_spell_the_runs_paths_otherwise(tmp_path, monkeypatch):
    """Relative or absolute, with ./ or a trailing slash: the same teacher, data and cache are no config change; an
    older run's config.yaml with relative paths resumes (read against the working directory, as before)."""
    from tailkd.config import from_dict

    work, cfg = _relative_run(tmp_path, monkeypatch)
    spelled = from_dict(DistillConfig, {"teacher": {"path": str(work / "teacher") + "/"}, "data": {
        "paths": ["./corpus.txt"], "cache_dir": str(work / "cache"), "heldout_paths": ["builtin:pydoc"]},
        "train": {"out_dir": str(work / "runs" / "rel"), "resume": True}})
    assert runs.prepare_run_dir(spelled)[1:] == (True, [])
    import yaml

    older = work / "runs" / "rel" / "config.yaml"  # as an older tailkd wrote it
    text = yaml.safe_load(older.read_text())
    text["teacher"]["path"], text["data"]["paths"], text["train"]["out_dir"] = "teacher", ["corpus.txt"], "runs/rel"
    older.write_text(yaml.safe_dump(text))
    assert runs.prepare_run_dir(spelled)[1:] == (True, [])
    moved = from_dict(DistillConfig, {"teacher": {"path": str(tmp_path / "elsewhere")}, "data": {
        "paths": ["corpus.txt"], "cache_dir": "cache", "heldout_paths": ["builtin:pydoc"]},
        "train": {"out_dir": "runs/rel", "resume": True}})
    with pytest.raises(Exception, match="teacher.path was"):
        runs.prepare_run_dir(moved)


def test_overwrite_of_a_run_folder_that_is_a_symlink(tmp_path):
    """--out a symlink to a folder elsewhere (another disk) holding a run, with --overwrite: shutil.rmtree refused
    the link (OSError: Cannot call rmtree on a symbolic link, exit 1). The run in the folder it points to is
    replaced; the link stays."""
    target = tmp_path / "disk" / "run"
    target.mkdir(parents=True)
    (target / "config.yaml").write_text("train: {seed: 3}\n")
    (target / "stale.txt").write_text("from the old run")
    link = tmp_path / "run"
    link.symlink_to(target, target_is_directory=True)
    cfg = DistillConfig()
    cfg.train.out_dir, cfg.train.overwrite = str(link), True
    out, resuming, _ = runs.prepare_run_dir(cfg)
    runs.claim_run_dir(out, cfg, resuming)
    assert link.is_symlink() and sorted(p.name for p in target.iterdir()) == ["config.yaml"]
    assert "seed: 0" in (target / "config.yaml").read_text()


@pytest.mark.parametrize("argv", [["flops", "--teacher-params", "1e9", "--student-params", "1e8", "--vocab", "1000",
                                   "--hidden", "64", "--out"],
                                  ["distill", "--out"], ["lm-eval", "--model", "m", "--work-dir"]])
def test_an_output_name_over_the_filesystems_limit_is_one_line(tmp_path, capsys, argv):
    """A name longer than NAME_MAX (300 bytes) in --out (lm-eval: --work-dir) ended in 'OSError: [Errno 36] File name
    too long' with exit 1 (an unexpected error); it is bad input: one line naming the setting, exit 2, before anything
    runs."""
    from tailkd.cli import main

    long = tmp_path / ("y" * 300) / "x.json"
    assert main([*argv, str(long)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tailkd: error: ") and "out" in err[0], err
    assert "File name too long; choose another path" in err[0] and "OSError" not in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dangling", [False, True], ids=["link", "dangling-link"])
def test_a_folder_written_whole_through_a_symlink_is_written_where_the_link_points(tmp_path, dangling):
    """select-data --out / compare --out a symlink to a folder elsewhere (another disk): atomic_write_dir renamed the
    link itself aside and its new folder into the link's place (the output on the wrong disk), then rmtree refused
    the link (ignored): a '.old-<name>-<pid>@<host>' link stayed beside it for good. The folder the link points to is
    replaced now; the link stays, and nothing is left beside it or the target. Twice: a second write replaces the
    first through the same link."""
    from tailkd.checkpoint import atomic_write_dir

    target = tmp_path / "disk" / "sel"
    if not dangling:
        target.mkdir(parents=True)
        (target / "selection.json").write_text("{}")
    link = tmp_path / "here" / "sel"
    link.parent.mkdir()
    link.symlink_to(target, target_is_directory=True)
    for text in ("first", "second"):
        assert atomic_write_dir(link, lambda tmp, text=text: (tmp / "selected.jsonl").write_text(text)) == link
        assert link.is_symlink() and link.resolve() == target.resolve()
        assert [p.name for p in target.iterdir()] == ["selected.jsonl"]
        assert (link / "selected.jsonl").read_text() == text
        assert [p.name for p in link.parent.iterdir()] == [p.name for p in target.parent.iterdir()] == ["sel"]


def test_a_dead_writers_set_aside_link_is_removed(tmp_path):
    """The '.old-<name>-<pid>@<host>' link an earlier tailkd left (the test above) is removed by the next writer: rmtree
    with ignore_errors left a link as it was."""
    from tailkd.checkpoint import atomic_write_dir

    target = tmp_path / "disk"
    target.mkdir()
    old = tmp_path / f".old-sel-{_dead_pid()}@{socket.gethostname()}"
    old.symlink_to(target, target_is_directory=True)
    (tmp_path / "sel").mkdir()  # in place: the link is not put back
    atomic_write_dir(tmp_path / "sel", lambda tmp: (tmp / "selection.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "sel"] and target.is_dir()


def test_a_dead_writers_leftover_beside_a_links_target_is_removed(tmp_path):
    """atomic_write_dir through a link (--out a link to a folder on another disk) writes beside the folder the link
    points to, so a killed writer's ``.tmp-*`` folder is left there, not beside the link: the next write through the
    link removes it."""
    from tailkd.checkpoint import atomic_write_dir

    target = tmp_path / "disk" / "sel"
    target.mkdir(parents=True)
    half = target.parent / f".tmp-sel-{_dead_pid()}@{socket.gethostname()}-0123456789ab"
    half.mkdir()
    (half / "selected.jsonl").write_text("half")
    link = tmp_path / "sel"
    link.symlink_to(target, target_is_directory=True)
    atomic_write_dir(link, lambda tmp: (tmp / "selected.jsonl").write_text("whole"))
    assert [p.name for p in target.parent.iterdir()] == ["sel"] and (link / "selected.jsonl").read_text() == "whole"


def test_an_unwritable_folder_behind_a_symlinked_out_is_refused_before_the_work(tmp_path, monkeypatch, capsys):
    """select-data / compare --out a link to a folder on a read-only disk: the folder is written beside the one the
    link points to (atomic_write_dir), so that is where a file must be creatable; the probe looked beside the link,
    passed, and the write failed after the scoring ('OSError: [Errno 30] Read-only file system', exit 1). As root,
    the refusal is simulated (creating a file there fails with EACCES), as in test_config."""
    from conftest import refuse_new_files_in

    from tailkd.cli import main

    disk = tmp_path / "disk"
    (disk / "sel").mkdir(parents=True)
    here = tmp_path / "here"
    here.mkdir()
    (here / "sel").symlink_to(disk / "sel", target_is_directory=True)
    (here / "cmp").symlink_to(disk / "cmp", target_is_directory=True)  # dangling: the folder is made there
    refuse_new_files_in(monkeypatch, disk)
    for argv, key, link in ((["select-data", "--reference", str(tmp_path)], "select.out", here / "sel"),
                            (["compare"], "compare.out", here / "cmp")):
        assert main([*argv, "--out", str(link)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"tailkd: error: {key}={link}: cannot write in {disk} (Permission denied); choose another "
                       "--out, or make that folder writable"], err


@pytest.mark.parametrize("dangling", [False, True], ids=["link", "dangling-link"])
def test_a_file_written_through_a_symlink_is_written_where_the_link_points(tmp_path, dangling):
    """eval / lm-eval / flops --out a symlink to a file elsewhere (another disk): atomic_write_file renamed the new
    file over the link itself (the output here, on the wrong disk; the file the link pointed to left stale). The file
    the link points to is replaced now (made if missing), as `open(link, "w")` would write it, still atomically; the
    link stays, nothing is left beside it or the target. Twice: a second write replaces the first through the link."""
    from tailkd.checkpoint import atomic_write_text

    target = tmp_path / "disk" / "result.json"
    target.parent.mkdir()
    if not dangling:
        target.write_text("old")
    link = tmp_path / "here" / "result.json"
    link.parent.mkdir()
    link.symlink_to(target)
    for text in ("first", "second"):
        assert atomic_write_text(link, text) == link
        assert link.is_symlink() and link.resolve() == target.resolve() and target.read_text() == text
        assert [p.name for p in link.parent.iterdir()] == [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_an_unwritable_folder_behind_a_symlinked_out_file_is_refused_before_the_work(tmp_path, monkeypatch, capsys):
    """lm-eval / eval --out a link to a file on a read-only disk: the file is written beside the one the link points
    to, so that is where a file must be creatable (the probe looked beside the link). Simulated as above."""
    from conftest import refuse_new_files_in

    from tailkd.cli import main

    disk, here = tmp_path / "disk", tmp_path / "here"
    disk.mkdir()
    here.mkdir()
    (here / "results.json").symlink_to(disk / "results.json")
    refuse_new_files_in(monkeypatch, disk)
    link = here / "results.json"
    assert main(["lm-eval", "--model", "m", "--write-only", "--work-dir", str(tmp_path / "w"), "--out",
                 str(link)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tailkd: error: lm_eval.out={link}: cannot write in {disk} (Permission denied); choose another "
                   "--out, or make that folder writable"], err


def test_lm_eval_write_only_checks_its_default_work_folder(tmp_path, monkeypatch, capsys):
    """lm-eval --write-only without --work-dir writes ./lm_eval_tasks; that path went unchecked (the given --work-dir
    is checked as every output folder): a file of that name ended in 'FileExistsError: [Errno 17]', exit 1, after
    the data was read. One line naming the setting, exit 2, before anything runs."""
    from tailkd.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lm_eval_tasks").write_text("mine")
    assert main(["lm-eval", "--model", "m", "--write-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tailkd: error: lm_eval.work_dir=lm_eval_tasks is a file; give a folder name"], err
    assert (tmp_path / "lm_eval_tasks").read_text() == "mine"
