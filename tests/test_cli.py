"""The ``tailkd`` entry point in process (`tailkd.cli`): how each ending of a command becomes one line and an exit code
(2 for the user's error, 1 for a surprise, 143 / 130 for a signal, a command's own code passed on), ``--debug`` before
or after the command, the top-level help, argparse's one-line errors of the top level and of a subcommand, tailkd's
own warnings, the SIGTERM handler outside the main thread, recipe --set and a stopped recipe, the losses table, and
`entry`'s end of a rank. The command functions are replaced by stand-ins: what is checked is the CLI's share, in
well under a second each (tests/test_bad_input.py runs the real commands, most in a subprocess)."""

import errno
import os
import sys
import threading
import types
import warnings
from pathlib import Path

import pytest

from tailkd import cli, commands
from tailkd.cli import main
from tailkd.errors import TailkdError, Terminated

FLOPS = ["flops", "--teacher-params", "1e9", "--student-params", "1e8", "--vocab", "1000", "--hidden", "64"]


def _stand_in(monkeypatch, raised=None, returned=None):
    """tailkd.commands.flops replaced: raises ``raised`` (if any), else returns ``returned``."""
    def command(cfg):
        if raised is not None:
            raise raised
        return returned

    monkeypatch.setattr(commands, "flops", command)


@pytest.mark.parametrize("raised, code, line", [
    (TailkdError("bad value; fix it"), 2, "tailkd: error: bad value; fix it"),
    (Terminated(), 143, "tailkd: terminated (SIGTERM)"),
    (KeyboardInterrupt(), 130, "tailkd: interrupted"),
    # a surprise: its type and first line only, and the way to its traceback
    (ValueError("first line\nsecond line"), 1,
     "tailkd: error: ValueError: first line (rerun with --debug for the traceback)"),
    # one without a message: its type alone (it was 'RuntimeError:  (rerun ...', a colon before nothing)
    (RuntimeError(""), 1, "tailkd: error: RuntimeError (rerun with --debug for the traceback)"),
    # a name longer than the filesystem allows is the user's path: exit 2, whatever reads it first
    (OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), "x" * 300), 2,
     f"tailkd: error: {os.strerror(errno.ENAMETOOLONG)}: {'x' * 300} (one name holds at most 255 bytes on most "
     "filesystems); give a shorter path"),
    # any other OSError is a surprise as any other exception
    (FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "gone.txt"), 1,
     f"tailkd: error: FileNotFoundError: [Errno {errno.ENOENT}] {os.strerror(errno.ENOENT)}: 'gone.txt' (rerun with "
     "--debug for the traceback)"),
])
def test_each_ending_of_a_command_is_one_line_and_its_exit_code(monkeypatch, capsys, raised, code, line):
    """The module docstring's contract; with --debug, after the command or before it, the exception itself."""
    _stand_in(monkeypatch, raised=raised)
    assert main(FLOPS) == code
    assert capsys.readouterr().err.splitlines() == [line]
    for argv in ([*FLOPS, "--debug"], ["--debug", *FLOPS]):
        with pytest.raises(type(raised)):
            main(argv)


@pytest.mark.parametrize("returned, code", [({"exit_code": 143}, 143), ({"exit_code": 0}, 0), ({}, 0), (None, 0),
                                            ([1, 2], 0)])
def test_a_commands_own_exit_code_is_the_exit_code(monkeypatch, returned, code):
    """reproduce returns 130 / 143 when a signal stopped one of its runs: the process must not exit 0 then."""
    _stand_in(monkeypatch, returned=returned)
    assert main(FLOPS) == code


def test_distills_exit_code_is_the_exit_code(monkeypatch, tmp_path):
    """A distill run stopped by SIGTERM saved a checkpoint and says 143 in its summary: the process exits 143."""
    import tailkd.train

    monkeypatch.setattr(tailkd.train, "distill", lambda cfg: {"exit_code": 143})
    assert main(["distill", "--out", str(tmp_path / "run")]) == 143
    monkeypatch.setattr(tailkd.train, "distill", lambda cfg: {"steps": 2})
    assert main(["distill", "--out", str(tmp_path / "run")]) == 0


def test_no_command_prints_the_help_and_exits_0(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tailkd") and "distill" in out and "reproduce" in out


@pytest.mark.parametrize("argv, line", [
    (["nosuch"], "tailkd: error: argument COMMAND: invalid choice: 'nosuch' (choose from "),
    (["flops", "--zzz"], "tailkd flops: error: unrecognized arguments: --zzz (`tailkd flops --help` lists the flags)"),
    # the closest flags to the name before '=', whatever the value's length
    (["flops", "--teacher-paramz=123456789012345678901234567890"],
     "tailkd flops: error: unrecognized arguments: --teacher-paramz=123456789012345678901234567890; did you mean "
     "--teacher-params"),
    # a stray positional is no flag: the hint is of the unknown flag after it
    (["flops", "stray", "--teacher-paramz", "1"],
     "tailkd flops: error: unrecognized arguments: stray --teacher-paramz 1; did you mean --teacher-params"),
])
def test_an_argparse_error_is_one_line_of_its_parser_exit_2(capsys, argv, line):
    """The top level's error names its commands (`tailkd --help` lists the commands), a subcommand's its flags, each
    with its own prog (`tailkd flops: error:`)."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    (err,) = capsys.readouterr().err.splitlines()
    assert err.startswith(line), err
    what = "commands" if argv[0] == "nosuch" else "flags"
    assert err.endswith(f"(`{'tailkd' if what == 'commands' else 'tailkd flops'} --help` lists the {what})"), err


def test_tailkds_own_warnings_are_one_line_each_time_others_keep_pythons_format(monkeypatch, capsys, recwarn):
    """A warning from a module of the tailkd package (its code's file is there and its module name tailkd.*) prints
    as ``tailkd: warning: MESSAGE`` each time it is raised (Python's default shows a place once: a recipe's second
    stage said nothing); another library's goes to Python's own showwarning (pytest's recorder here, `recwarn`), as
    before. The filters are the caller's again after."""
    package = Path(cli.__file__).parent
    space = {"__name__": "tailkd.stand_in"}
    exec(compile("import warnings\ndef warn(m):\n    warnings.warn(m)\n", str(package / "stand_in.py"), "exec"), space)

    def command(cfg):
        for _ in range(2):
            space["warn"]("cut to --seq-len")
        warnings.warn("from elsewhere")

    monkeypatch.setattr(commands, "flops", command)
    before = list(warnings.filters)
    assert main(FLOPS) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["tailkd: warning: cut to --seq-len"] * 2, err
    assert [(str(w.message), w.filename) for w in recwarn] == [("from elsewhere", __file__)]
    assert warnings.filters == before


def test_a_command_run_outside_the_main_thread_takes_no_signal_handler(monkeypatch):
    """Python lets only the main thread set a signal handler: from another thread (a notebook's worker, a test
    runner's) `main` runs the command without one (setting one there raises ValueError: exit 1 before any work)."""
    _stand_in(monkeypatch, returned={})
    codes = []
    worker = threading.Thread(target=lambda: codes.append(main(FLOPS)))
    worker.start()
    worker.join(60)
    assert codes == [0]


def test_recipe_sets_merge_and_a_stopped_recipe_exits_with_its_stages_code(monkeypatch, tmp_path, capsys):
    """Every --set reaches the recipe (merged: two keys of one section both); a recipe whose last stage a signal
    stopped exits with that stage's 130 / 143 and says how to continue; one whose earlier stages stopped and last
    finished exits 0."""
    import tailkd.recipe

    seen = []
    summaries = [{"stopped": False}, {"stopped": True, "exit_code": 143}]
    monkeypatch.setattr(tailkd.recipe, "run_recipe", lambda recipe, out, overrides: seen.append(overrides) or summaries)
    recipe = str(tmp_path / "r.yaml")
    assert main(["recipe", recipe, "--set", "train.max_steps=4", "--set", "train.lr=0.001", "--set",
                 "data.seq_len=16"]) == 143
    assert seen == [{"train": {"max_steps": 4, "lr": 0.001}, "data": {"seq_len": 16}}]
    assert capsys.readouterr().err.splitlines() == [
        f"tailkd: recipe stopped; run the same command again to continue ({recipe})"]
    summaries[:] = [{"stopped": True, "exit_code": 130}, {"stopped": False}]
    assert main(["recipe", recipe]) == 0 and capsys.readouterr().err == ""


def test_a_pipe_in_a_losses_row_is_escaped_in_the_markdown_table(monkeypatch, capsys):
    """`tailkd losses` prints a Markdown table: a '|' of a formula (|p - q|) would end its cell there."""
    import dataclasses

    from tailkd.registry import LOSSES

    monkeypatch.setitem(LOSSES, "kd", dataclasses.replace(LOSSES["kd"], formula="½ Σ |p − q|"))
    assert main(["losses"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (row,) = [ln for ln in lines if ln.startswith("| kd |")]
    assert "| ½ Σ \\|p − q\\| |" in row
    assert {ln.replace("\\|", "").count("|") for ln in lines if ln.startswith("|")} == {len(lines[0].split("|")) - 1}


@pytest.mark.parametrize("world_size, left", [(None, False), ("1", False), ("2", True)])
def test_entry_ends_a_rank_of_a_launch_without_finalization(monkeypatch, world_size, left):
    """`entry` hands the exit code to `tailkd.distributed.leave` in a rank of a multi-process launch (WORLD_SIZE > 1)
    only: a single process returns it to sys.exit as usual."""
    ended = []
    monkeypatch.setitem(sys.modules, "tailkd.distributed", types.SimpleNamespace(leave=ended.append))
    monkeypatch.setattr(cli, "_keep_host_memory", lambda: None)
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(sys, "argv", ["tailkd"])
    assert cli.entry() == 0
    assert ended == ([0] if left else [])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the ignored exception, on purpose
def test_a_sigterm_whose_exception_python_ignores_still_ends_the_block():
    """SIGTERM's `Terminated` raised where Python ignores exceptions (here a ``__del__``; in a CI run of the lm-eval
    SIGTERM test an import lock's callback: the run then finished with exit 0) still ends the block: raised as it
    ends, after the rest of it ran (the premise: it ran on)."""
    import signal

    from tailkd.errors import Terminated

    class Dies:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)

    ran = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with cli._unwind_on_sigterm():
            Dies()  # deleted at once: the handler's exception is ignored there
            ran.append(True)
    assert ran == [True] and signal.getsignal(signal.SIGTERM) is before
