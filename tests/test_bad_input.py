"""Bad input through the real CLI (a subprocess each): one line ``tailkd: error: ...`` naming the problem and
its fix, exit code 2, no traceback, and no run folder left behind. (tests/test_distill.py covers a missing
teacher or data path, --seq-len above the model maximum, K = 0, negative β and an empty corpus.)"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_teacher_dir, make_tokenizer, write_corpus
from transformers import LlamaConfig, LlamaForCausalLM

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    teacher = make_teacher_dir(root / "teacher", train_steps=0)
    tok = make_tokenizer()
    vocab = len(tok)

    def student(path, tokenizer, vocab_size, positions=128):
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=positions)
        LlamaForCausalLM(cfg).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    other_tok = make_tokenizer(vocab_size=280)  # the teacher's first 280 tokens: a vocabulary the teacher's extends,
    other_tok.add_tokens(["<only-in-the-student>"])  # ... until the student has a token the teacher lacks
    no_config = root / "no-config"
    shutil.copytree(teacher, no_config)
    (no_config / "config.json").unlink()
    bad_config = root / "bad-config"
    shutil.copytree(teacher, bad_config)
    (bad_config / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    weights = teacher / "model.safetensors"
    truncated = root / "truncated"
    shutil.copytree(teacher, truncated)
    (truncated / "model.safetensors").write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    bad_header = root / "bad-header"
    shutil.copytree(teacher, bad_header)
    (bad_header / "model.safetensors").write_bytes(weights.read_bytes()[:4])
    sharded = root / "sharded"
    shutil.copytree(teacher, sharded)
    (sharded / "model.safetensors").unlink()
    LlamaForCausalLM.from_pretrained(teacher).save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    bin_only = root / "bin-only"
    shutil.copytree(teacher, bin_only)
    (bin_only / "model.safetensors").unlink()
    torch.save(load_file(str(weights)), bin_only / "pytorch_model.bin")
    bad_bin = root / "bad-bin"
    shutil.copytree(bin_only, bad_bin)
    data = (bin_only / "pytorch_model.bin").read_bytes()
    (bad_bin / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    binary = root / "data.bin.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    no_text = root / "docs.jsonl"
    no_text.write_text('{"body": "a document"}\n')
    surrogate = root / "surrogate.jsonl"  # the JSON escape \ud800 without its other half: no Unicode text
    surrogate.write_text('{"text": "a document"}\n{"text": "cut \\ud800"}\n')
    return {
        "root": root, "teacher": teacher, "corpus": write_corpus(root / "corpus.txt"), "cache": root / "cache",
        "vocab": vocab,
        "other_tokenizer": student(root / "other-tok", other_tok, len(other_tok)),
        "small_head": student(root / "small-head", tok, vocab - 8),
        "long_context": student(root / "long-context", tok, vocab, positions=256),  # the teacher has 128
        "no_config": no_config, "bad_config": bad_config, "binary": binary, "no_text": no_text, "surrogate": surrogate,
        "truncated": truncated, "bad_header": bad_header, "sharded": sharded, "missing_shard": shards[1],
        "bin_only": bin_only, "bad_bin": bad_bin,
    }


def args(assets, out, *extra):
    return ["distill", "--teacher", str(assets["teacher"]), "--data", str(assets["corpus"]),
            "--data.cache_dir", str(assets["cache"]), "--student-layers", "2", "--seq-len", "32",
            "--batch-size", "2", "--steps", "2", "--data.eval_rows", "2", "--device", "cpu", "--out", str(out), *extra]


def cli(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "tailkd.cli", *argv], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=300, check=False)


def assert_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    last = lines[-1]
    assert last.startswith("tailkd: error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in last, (needle, last)
    return last


def yaml_file(assets, name, text):
    path = assets["root"] / name
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------- config files and flags

CONFIGS = {
    "garbled": ("loss: {name: tad\nk: [", ["not valid YAML", "fix the syntax"]),
    "unknown key": ("loss:\n  kk: 3\n", ["unknown config key loss.kk", "valid keys"]),
    "wrong type": ("train:\n  warmup_steps: four\n", ["train.warmup_steps expects an integer", "'four'"]),
    "number as string": ("loss:\n  beta: lots\n", ["loss.beta expects a number", "'lots'"]),
    "section not a mapping": ("loss: 5\n", ["config section loss", "must be a mapping"]),
    "null value": ("loss:\n  k: null\n", ["config key loss.k cannot be null"]),
    "bool as string": ("train:\n  resume: maybe\n", ["train.resume expects true/false"]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_config_file(assets, tmp_path, case):
    text, needles = CONFIGS[case]
    run = tmp_path / "run"
    assert_error(cli(*args(assets, run), "--config", yaml_file(assets, f"{case}.yaml", text)), *needles)
    assert not run.exists()


def test_missing_config_file(assets, tmp_path):
    assert_error(cli(*args(assets, tmp_path / "run"), "--config", str(tmp_path / "nope.yaml")),
                 "nope.yaml does not exist")


def test_wrong_flag_type_is_an_argparse_error(assets, tmp_path):
    """One line (a subcommand's usage block lists every flag and used to bury the error)."""
    proc = cli(*args(assets, tmp_path / "run"), "--k", "ten")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "tailkd distill: error: argument --k/--loss.k: invalid int value: 'ten' (`tailkd distill --help` lists the "
        "flags)"]


@pytest.mark.parametrize("flags,line", [
    (["--loss.kk", "3"], "unrecognized arguments: --loss.kk 3; did you mean --loss.k or"),
    (["--train.warmupsteps=3"], "unrecognized arguments: --train.warmupsteps=3; did you mean --train.warmup_steps"),
    (["--zzz"], "unrecognized arguments: --zzz (`tailkd distill --help` lists the flags)")])
def test_an_unknown_flag_is_one_line_naming_the_closest_flags(flags, line):
    """Was argparse's top-level usage and 'tailkd: error: unrecognized arguments' with no hint of the right key."""
    proc = cli("distill", *flags)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("tailkd distill: error: " + line), proc.stderr


FLAGS = {
    "negative gamma": (["--gamma", "-0.5"], ["loss.gamma=-0.5 must be a finite number >= 0"]),
    "zero temperature": (["--temperature", "0"], ["loss.temperature=0.0 must be a finite number > 0"]),
    "jsd beta above 1": (["--loss", "jsd", "--loss.jsd_beta", "1.5"],
                         ["loss.jsd_beta=1.5 must be a finite number in [0, 1]"]),
    "nan learning rate": (["--lr", "nan"], ["train.lr=nan must be a finite number > 0"]),
    "infinite beta": (["--beta", "inf"], ["loss.beta=inf must be a finite number >= 0"]),
    "nan in a list": (["--train.adam_betas", "0.9", "nan"], ["train.adam_betas=0.9 nan: each must be a finite"]),
    "unknown loss": (["--loss", "kl"], ["loss.name='kl' is not a loss"]),
    "zero batch": (["--batch-size", "0"], ["train.batch_size=0 must be >= 1"]),
    "zero max_bad_steps": (["--train.max_bad_steps", "0"], ["train.max_bad_steps=0 must be >= 1"]),
    "unknown parallel mode": (["--train.parallel", "zero3"], ["train.parallel='zero3' must be ddp or fsdp"]),
    "force without resume": (["--force"], ["--force) only applies with --resume"]),
    "resume and overwrite": (["--resume", "--overwrite"], ["exclude each other"]),
    "no such device": (["--device", "tpu"], ["train.device='tpu' is not a device"]),
}


@pytest.mark.parametrize("case", list(FLAGS))
def test_bad_flag_value(assets, tmp_path, case):
    extra, needles = FLAGS[case]
    run = tmp_path / "run"
    assert_error(cli(*args(assets, run), *extra), *needles)
    assert not run.exists()


# The other subcommands take typed configs too (tailkd.command_config): the same one-line errors, named by key.
SUBCOMMAND_FLAGS = {
    "eval bins": (["eval", "--student", "{teacher}", "--bins", "0"], ["eval.bins=0 must be >= 1"]),
    "eval nan temperature": (["eval", "--student", "{teacher}", "--generate", "--temperature", "nan"],
                             ["generate.temperature=nan must be a finite number > 0"]),
    "eval no student": (["eval"], ["eval.student is not set; pass --student DIR"]),
    "analyze unknown key": (["analyze-teacher", "--config", "{yaml}"],
                            ["unknown config key analyze.kmaxx in section 'analyze'", "valid keys"]),
    "cache k": (["cache-teacher", "--out", "{out}", "--k", "0"], ["cache.k=0 must be >= 1"]),
    "cache split": (["cache-teacher", "--out", "{out}", "--split", "all"],
                    ["cache.split='all' must be train or heldout"]),
    "lm-eval device": (["lm-eval", "--model", "{teacher}", "--device", "tpu"],
                       ["lm_eval.device='tpu' is not a device"]),
    "flops infinite params": (["flops", "--teacher-params", "inf", "--student-params", "1e8", "--vocab", "9",
                               "--hidden", "4"], ["flops.teacher_params=inf must be a finite number > 0"]),
}


@pytest.mark.parametrize("case", list(SUBCOMMAND_FLAGS))
def test_bad_subcommand_flag_value(assets, tmp_path, case):
    argv, needles = SUBCOMMAND_FLAGS[case]
    fill = {"teacher": str(assets["teacher"]), "out": str(tmp_path / "out"),
            "yaml": yaml_file(assets, "analyze.yaml", "analyze:\n  kmaxx: 3\n")}
    assert_error(cli(*(a.format(**fill) for a in argv)), *needles)
    assert not (tmp_path / "out").exists()


def test_wrong_subcommand_flag_type_is_an_argparse_error(assets):
    proc = cli("eval", "--student", str(assets["teacher"]), "--bins", "ten")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "tailkd eval: error: argument --bins/--eval.bins: invalid int value: 'ten' (`tailkd eval --help` lists the "
        "flags)"]


def test_k_not_below_the_vocabulary(assets, tmp_path):
    run = tmp_path / "run"
    v = assets["vocab"]
    assert_error(cli(*args(assets, run), "--k", str(v)), f"loss.k={v} must be smaller than the vocabulary ({v})")
    assert not run.exists()


def test_overwrite_replaces_only_a_run_folder(assets, tmp_path):
    """--overwrite deletes the run folder it replaces: a folder that is not a run (no config.yaml) is refused, its
    files kept (it was deleted whole); an empty folder is used as a new run."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    assert_error(cli(*args(assets, mine), "--overwrite"), "is not a tailkd run folder", "--overwrite would delete")
    assert (mine / "notes.txt").read_text() == "precious" and len(list(mine.iterdir())) == 1
    run = tmp_path / "run"
    run.mkdir()  # empty: a new run
    assert cli(*args(assets, run)).returncode == 0 and (run / "config.yaml").is_file()
    (run / "stale.txt").write_text("from the old run")
    assert cli(*args(assets, run), "--overwrite").returncode == 0
    assert (run / "config.yaml").is_file() and not (run / "stale.txt").exists()


def test_deepspeed_accelerate_config_is_refused(assets, tmp_path):
    proc = cli(*args(assets, tmp_path / "run"), env={"ACCELERATE_USE_DEEPSPEED": "true"})
    assert_error(proc, "DeepSpeed config is not supported", "--train.parallel fsdp")


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("case, needles", [
    ("other_tokenizer", ["teacher and student tokenizers differ", "shared vocabulary"]),
    ("small_head", ["the student's LM head has", "resize_token_embeddings"]),
])
def test_student_that_does_not_fit_the_teacher(assets, tmp_path, case, needles):
    run = tmp_path / "run"
    argv = args(assets, run)
    del argv[argv.index("--student-layers"):argv.index("--student-layers") + 2]  # a setting of a built student only
    assert_error(cli(*argv, "--student", str(assets[case])), *needles)
    assert not run.exists()


def test_seq_len_past_the_teachers_context_is_refused_whatever_the_students(assets, tmp_path):
    """The longest row is the shorter of the two models' contexts: a loaded student of 256 positions with the
    teacher's 128 refuses --seq-len 200 before anything is trained or written."""
    run = tmp_path / "run"
    argv = args(assets, run)
    del argv[argv.index("--student-layers"):argv.index("--student-layers") + 2]  # a setting of a built student only
    assert_error(cli(*argv, "--student", str(assets["long_context"]), "--seq-len", "200"),
                 "--seq-len 200 exceeds the model's maximum context of 128 tokens")
    assert not run.exists()


@pytest.mark.parametrize("case, needle", [
    ("no_config", "has no config.json, so it is not a Hugging Face model directory"),
    ("bad_config", "cannot read the model config in"),
])
def test_unreadable_model_folder(assets, tmp_path, case, needle):
    run = tmp_path / "run"
    assert_error(cli(*args(assets, run), "--teacher", str(assets[case])), needle, str(assets[case]))
    assert not run.exists()


@pytest.mark.parametrize("case, named, needle", [
    ("truncated", lambda a: a["truncated"] / "model.safetensors", "is truncated or damaged (Error while deserializing"),
    ("bad_header", lambda a: a["bad_header"] / "model.safetensors", "is truncated or damaged (Error while deserializ"),
    ("sharded", lambda a: a["missing_shard"], "is missing (listed in model.safetensors.index.json)"),
    ("bad_bin", lambda a: a["bad_bin"], "cannot load pytorch_model.bin in"),
])
def test_unreadable_weights_are_named(assets, tmp_path, case, named, needle):
    run = tmp_path / "run"
    last = assert_error(cli(*args(assets, run), "--teacher", str(assets[case])), needle, str(named(assets)))
    assert "copy it again" in last or "copy the complete model folder again" in last
    assert not run.exists()


def test_a_bin_only_model_folder_loads(assets, tmp_path):
    """Weights as pytorch_model.bin (no safetensors) are what transformers loads too: accepted."""
    proc = cli(*args(assets, tmp_path / "run"), "--teacher", str(assets["bin_only"]), "--steps", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("case, needles", [
    ("binary", ["is not UTF-8 text", "remove it from data.paths"]),
    ("no_text", ['no "text" field', "docs.jsonl:1"]),
    ("surrogate", ['surrogate.jsonl:2: "text" holds \\ud800, half of a UTF-16 surrogate pair', "remove the line"]),
])
def test_unusable_data_file(assets, tmp_path, case, needles):
    run = tmp_path / "run"
    assert_error(cli(*args(assets, run), "--data", str(assets[case])), *needles)
    assert not run.exists()


# --------------------------------------------------------------------------- resuming


def test_resume_with_another_config_is_refused_unless_forced(assets, tmp_path):
    run = tmp_path / "run"
    proc = cli(*args(assets, run, "--steps", "4", "--train.stop_after", "2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    last = assert_error(cli(*args(assets, run, "--steps", "4", "--resume", "--k", "5")),
                        "cannot resume", "loss.k was 10, now 5", "--force")
    assert "config.yaml" in last
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing touched

    proc = cli(*args(assets, run, "--steps", "4", "--resume", "--k", "5", "--force"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming" in proc.stdout and "loss.k: 10 -> 5" in proc.stderr
    kept = list(run.glob("config.replaced-*.yaml"))
    assert len(kept) == 1 and "k: 10" in kept[0].read_text()
    assert "k: 5" in (run / "config.yaml").read_text() and (run / "final").is_dir()


def test_resume_over_edited_data_is_refused_unless_forced(assets, tmp_path):
    """The data edited between a stop and --resume, the number of rows unchanged (the same documents in another
    order): the saved data order would continue over other rows, so the resume is refused."""
    docs = Path(assets["corpus"]).read_text().strip().split("\n\n")
    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(docs) + "\n")
    run = tmp_path / "run"
    proc = cli(*args(assets, run, "--steps", "4", "--train.stop_after", "2", "--data", str(data)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data.write_text("\n\n".join(reversed(docs)) + "\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert_error(cli(*args(assets, run, "--steps", "4", "--resume", "--data", str(data))),
                 "the training rows differ from the checkpoint's", "--force")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing touched
    proc = cli(*args(assets, run, "--steps", "4", "--resume", "--force", "--data", str(data)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: --force: the training rows differ" in proc.stderr and (run / "final").is_dir()


def test_a_forced_resume_that_cannot_load_the_checkpoint_leaves_the_run_as_it_was(assets, tmp_path):
    """--resume --force with another architecture: the checkpoint does not fit the student, exit 2. The run's
    config.yaml was replaced by the new config (and config.replaced-*.yaml written) before the checkpoint was read,
    so the error's fix, resuming with the run's own config (--config RUN/config.yaml), read the new one and failed
    again. Now nothing in the run folder changes and that fix resumes the run."""
    run = tmp_path / "run"
    proc = cli(*args(assets, run, "--steps", "4", "--train.stop_after", "2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert_error(cli(*args(assets, run, "--steps", "4", "--resume", "--force", "--student-layers", "3")),
                 "does not fit this student", "resume with the run's own config")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing touched
    proc = cli("distill", "--config", str(run / "config.yaml"), "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "final").is_dir() and not list(run.glob("config.replaced-*.yaml"))


def test_resume_of_something_that_is_not_a_run(assets, tmp_path):
    assert_error(cli(*args(assets, tmp_path / "nothing"), "--resume"), "holds no run", "drop --resume")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_error(cli(*args(assets, other), "--resume"), "has no config.yaml", "not a tailkd run")
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_a_run_killed_while_writing_its_first_config_can_be_started_again(assets, tmp_path):
    """A kill between creating the run folder and renaming its first config.yaml into place leaves only
    atomic_write_file's temporary file: no run ever started there. The same command starts the run (it used to be
    refused as 'already exists', and --overwrite as 'not a tailkd run folder': the folder had to be deleted by
    hand), and the leftover is removed; --resume says there is no run."""
    run = tmp_path / "run"
    run.mkdir()
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()  # the writer is gone (a live one's file is that of a run claiming the folder right now)
    leftover = run / f".tmp-config.yaml-{killed.pid}"
    leftover.write_text("train:\n  lr: 0.0")  # half written
    assert_error(cli(*args(assets, run), "--resume"), "holds no run", "drop --resume")
    proc = cli(*args(assets, run))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "final").is_dir() and not leftover.exists()


@pytest.mark.parametrize("text, why", [("loss: [unclosed\n", "not valid YAML"),
                                       ("", "it is empty"), ("# nothing but a comment\n", "it is empty")])
def test_resume_of_a_run_with_a_damaged_config(assets, tmp_path, text, why):
    """An empty config.yaml (no section at all: a run writes every one) is damaged too; it was read as the defaults,
    and the resume refused with 'data.cache_dir was None, now ...; resume with the run's own config', a config
    that is not the run's."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(text)
    assert_error(cli(*args(assets, run), "--resume"), f"cannot resume {run}: its config.yaml is damaged (", why,
                 "start a new run with another --out")


def test_a_stage_with_an_empty_config_is_damaged(tmp_path):
    """A recipe's or reproduction's stage whose config.yaml is empty is damaged, as a resume says (it was read as
    the defaults: 'finished with data.cache_dir=None, but now gives ...')."""
    from tailkd.config import DistillConfig
    from tailkd.errors import TailkdError
    from tailkd.recipe import saved_change

    cfg = DistillConfig()
    cfg.train.out_dir = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("")
    with pytest.raises(TailkdError, match=r"^the run folder .*run has a damaged config\.yaml \(it is empty\); delete "):
        saved_change(cfg)


def test_an_older_runs_relative_paths_are_read_against_the_working_directory(tmp_path, monkeypatch):
    """An older tailkd saved a run's paths as given (relative): `runs.saved_config` reads them against the working
    directory, as the new config's are made absolute, so a --resume or a recipe's finished stage from where the run
    was started sees no change (it saw 'teacher.path was 'teacher', now '/.../teacher''), and another teacher is
    still one."""
    from tailkd.config import DistillConfig, save_yaml
    from tailkd.recipe import saved_change
    from tailkd.runs import RESUME_FREE_KEYS, config_changes, saved_config

    monkeypatch.chdir(tmp_path)
    cfg = DistillConfig()
    cfg.teacher.path, cfg.data.paths, cfg.train.out_dir = "teacher", ["c.txt"], "run"
    (tmp_path / "run").mkdir()
    save_yaml(cfg, tmp_path / "run" / "config.yaml")  # its paths relative, as an older tailkd wrote them
    old = saved_config(tmp_path / "run" / "config.yaml")
    assert old["teacher.path"] == str(tmp_path / "teacher") and old["data.paths"] == [str(tmp_path / "c.txt")]
    assert config_changes(old, cfg, RESUME_FREE_KEYS) == [] and saved_change(cfg) is None
    cfg.teacher.path = "other"
    assert config_changes(old, cfg, RESUME_FREE_KEYS) == ["teacher.path"]


def test_generate_rouge_without_reference_responses(assets, tmp_path):
    """`eval --generate` scores ROUGE-L by default: a prompt whose reference response is empty (a chat whose last
    assistant turn is blank) is refused with one line naming it (FILE:LINE) and the fix, and no result file is
    written."""
    import json

    prompts = tmp_path / "p.jsonl"
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}
    prompts.write_text(json.dumps({"prompt": "A", "response": "B"}) + "\n" + json.dumps(chat) + "\n"
                       + json.dumps({"prompt": "C", "response": ""}) + "\n")
    out = tmp_path / "g.json"
    argv = ["eval", "--student", str(assets["teacher"]), "--teacher", str(assets["teacher"]), "--generate",
            "--prompts", str(prompts), "--max-new-tokens", "2", "--out", str(out)]
    assert_error(cli(*argv), "ROUGE-L needs a reference response for every prompt", "2 of 3", f"(first: {prompts}:2)",
                 "--generate.rouge false")
    assert not out.exists()
    # the fix it names works for an empty "response" too (refused when the file was read, with a message that did
    # not name it; the tiny teacher has no chat template, so prompt/response pairs only)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "A", "response": "B"}) + "\n" + json.dumps({"prompt": "C", "response": ""}))
    argv[argv.index(str(prompts))] = str(pairs)
    assert_error(cli(*argv), "ROUGE-L needs a reference response for every prompt", "--generate.rouge false")
    proc = cli(*argv, "--generate.rouge", "false", "--generate.teacher", "false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text())["examples"] == 2


def test_a_resume_with_fewer_steps_than_done_says_so(assets, tmp_path):
    """--steps below the checkpoint's step on --resume (max_steps may change on resume): nothing more is trained and
    the run ends at the checkpoint's step — said in a warning, not only in summary.json's steps."""
    run = tmp_path / "run"
    proc = cli(*args(assets, run, "--steps", "4", "--train.stop_after", "3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = cli(*args(assets, run, "--steps", "2", "--resume"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("warning: the checkpoint is at step 3, past train.max_steps=2: nothing more is trained; the run ends at "
            "step 3") in proc.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_a_finished_run_resumed_with_more_steps_evaluates_at_its_new_end(assets, tmp_path):
    """A run that finished at step 2 (its final held-out metrics in the step-2 checkpoint) resumed with --steps 4
    (max_steps may change on resume) trains steps 3 and 4 and evaluates the step-4 student: summary.json's
    heldout_after and the printed line are step 4's, not the step-2 metrics the checkpoint held, and a step-4
    checkpoint holds them."""
    run = tmp_path / "run"
    proc = cli(*args(assets, run))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = cli(*args(assets, run, "--steps", "4", "--resume"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    heldout = {r["step"]: r for r in records if r["split"] == "heldout"}
    assert sorted(heldout) == [0, 2, 4] and [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["heldout_after"]["kl"] == heldout[4]["kl"] != heldout[2]["kl"]
    assert f"-> {heldout[4]['kl']:.4f}" in proc.stdout
    assert (run / "checkpoints" / "step_00000004").is_dir()


# --------------------------------------------------------------------------- values found by a randomized CLI audit
# In-process (`tailkd.cli.main`): each is refused while the config is read, before any model loads. The other
# settings are the tiny assets', so that where a value was not refused the command ran quickly to its failure.


def run_main(capsys, *argv):
    """(exit code, stderr lines) of `tailkd.cli.main`; a traceback would escape as an exception."""
    from tailkd.cli import main

    capsys.readouterr()
    code = main(list(argv))
    return code, [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]


def assert_main_error(capsys, argv, *needles):
    code, lines = run_main(capsys, *argv)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tailkd: error: "), (code, lines[-3:])
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def tiny(assets, command, out, *extra):
    """``command`` on the tiny assets, output ``out``, then ``extra``."""
    data = ["--data", str(assets["corpus"]), "--seq-len", "32"]
    cache = ["--data.cache_dir" if command == "distill" else "--cache-dir", str(assets["cache"])]
    small = {
        "distill": [*args(assets, out)[1:]],
        "reproduce": ["--teacher", str(assets["teacher"]), *data, *cache, "--heldout-data", str(assets["corpus"]),
                      "--steps", "1", "--batch-size", "2", "--data.eval_rows", "2", "--student-layers", "1",
                      "--seeds", "0", "--betas", "2", "--ks", "10", "--sweep-seeds", "0", "--eval-rows", "2",
                      "--device", "cpu", "--train.eval_every", "0", "--out", str(out)],
        "eval": ["--student", str(assets["teacher"]), "--teacher", str(assets["teacher"]), *data, *cache,
                 "--max-rows", "2", "--device", "cpu", "--out", str(out)],
        "cache-teacher": ["--teacher", str(assets["teacher"]), *data, *cache, "--max-rows", "2", "--k", "4",
                          "--device", "cpu", "--out", str(out)],
        "select-data": ["--teacher", str(assets["teacher"]), "--reference", str(assets["teacher"]), *data, *cache,
                        "--max-docs", "2", "--device", "cpu", "--out", str(out)],
        "analyze-teacher": ["--teacher", str(assets["teacher"]), *data, *cache, "--max-rows", "2", "--kmax", "5",
                            "--device", "cpu", "--out", str(out)],
        "lm-eval": ["--model", str(assets["teacher"]), "--data", str(assets["corpus"]), "--write-only",
                    "--out", str(out)],
    }[command]
    return [command, *small, *extra]


@pytest.mark.parametrize("command, extra, needles", [
    # beyond 64 bits: torch's 'Overflow when unpacking long long' (exit 1) after the model had loaded
    ("eval", ["--bins", str(2 ** 63)], ["eval.bins", "64-bit"]),
    ("cache-teacher", ["--tail-samples", str(10 ** 30)], ["cache.tail_samples", "64-bit"]),
    # seeds: numpy's 'Seed must be between 0 and 2**32 - 1' (exit 1) once the run had started
    ("distill", ["--seed", "-1"], ["train.seed=-1", "[0, 4294967295]"]),
    ("distill", ["--seed", str(2 ** 32)], ["train.seed=4294967296", "[0, 4294967295]"]),
    ("reproduce", ["--seeds", "0", "-3"], ["reproduce.seeds", "[0, 4294967295]"]),
    ("cache-teacher", ["--seed", str(2 ** 50), "--tail-samples", "2"], ["cache.seed", "[0, 4294967295]"]),
])
def test_an_integer_out_of_range_is_refused_up_front(assets, tmp_path, capsys, command, extra, needles):
    out = tmp_path / ("out.json" if command == "eval" else "out")
    assert_main_error(capsys, tiny(assets, command, out, *extra), *needles)
    assert not out.exists()


def test_an_integer_yaml_cannot_read_is_one_line(tmp_path, capsys):
    """An integer of more digits than Python converts (4300) was 'ValueError: Exceeds the limit', exit 1."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: " + "9" * 5000 + "\n")
    assert_main_error(capsys, ["distill", "--config", str(path), "--out", str(tmp_path / "run")], "not valid YAML")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command, text, key", [
    ("eval", "eval:\n  student: [1, 2]\n", "eval.student expects a string"),
    ("lm-eval", "lm_eval:\n  model: {a: 1}\n", "lm_eval.model expects a string"),
])
def test_a_saved_model_setting_of_the_wrong_type_is_named(tmp_path, capsys, command, text, key):
    """eval and lm-eval read the run config of the saved model before the types were checked: 'TypeError: expected
    str, bytes or os.PathLike object, not list', exit 1."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert_main_error(capsys, [command, "--config", str(path)], key)


@pytest.mark.parametrize("command", [
    "eval",  # 'ValueError: PosixPath('.') has an empty name' after the evaluation
    "select-data",  # the same after scoring every document, and a .tmp- folder left in the working directory
    "analyze-teacher",  # wrote into the working directory
    "distill",  # a run in the working directory, among whatever else it held
    "reproduce",  # the same
    "lm-eval",  # the results file ''
])
def test_an_empty_output_path_is_refused(assets, tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    assert_main_error(capsys, tiny(assets, command, ""), "is empty", "--out")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_compare_output_is_refused(assets, tmp_path, capsys, monkeypatch):
    """'ValueError: PosixPath('.') has an empty name' and a .tmp- folder left in the working directory."""
    run = tmp_path / "run"
    assert run_main(capsys, *args(assets, run))[0] == 0
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert_main_error(capsys, ["compare", str(run), "--out", ""], "compare.out is empty", "--out")
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["distill", "--config", "~no_such_user_zz9/run.yaml"],
    ["distill", "--teacher", "~no_such_user_zz9/teacher", "--out", "{out}"],
    ["losses", "--loss.module", "~no_such_user_zz9/losses.py"],
])
def test_a_home_of_no_user_is_a_path_that_does_not_exist(tmp_path, capsys, argv):
    """'~user' of a user that does not exist stays as it is (as the shell and os.path.expanduser leave it): it was
    'RuntimeError: Could not determine home directory', exit 1 (pathlib's expanduser)."""
    assert_main_error(capsys, [a.format(out=tmp_path / "run") for a in argv], "~no_such_user_zz9")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["distill", "select-data"])
def test_an_input_path_longer_than_the_filesystem_allows_is_one_line(assets, tmp_path, capsys, command):
    """A name over 255 bytes among the data paths (read once the models have loaded): 'OSError: [Errno 36] File name
    too long', exit 1 (pathlib's exists() raises it)."""
    long = str(tmp_path / ("x" * 300))
    out = tmp_path / "out"
    code, lines = run_main(capsys, *tiny(assets, command, out, "--data", long))
    assert code == 2 and lines[-1].startswith("tailkd: error: File name too long: " + long), (code, lines[-1:])
    assert not any("Traceback" in ln for ln in lines) and not out.exists()


def test_python_m_tailkd_is_the_command(tmp_path):
    """`python -m tailkd` runs the `tailkd` command (it was "No module named tailkd.__main__"): its help, and a bad
    value's one line and exit 2."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "tailkd", "--help"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0 and "distill" in done.stdout and "reproduce" in done.stdout, done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "tailkd", "distill", "--steps", "0", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert done.stderr.startswith("tailkd: error:") and "Traceback" not in done.stderr
