"""Config: YAML mirrors the dataclasses, flags override YAML, unknown keys and wrong types are errors."""

import argparse
import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml

from tailkd.cli import COMMANDS
from tailkd.config import DistillConfig, add_config_flags, config_from_args, from_dict, save_yaml, to_dict, utf8_text
from tailkd.errors import TailkdError

REPO = Path(__file__).resolve().parents[1]
COMMAND_CONFIGS = {name: command[0] for name, command in COMMANDS.items()}  # subcommand -> its typed config
CONFIGS = [DistillConfig, *COMMAND_CONFIGS.values()]  # every typed config: distill's and the other subcommands'


def parse(argv, cls=DistillConfig):
    p = argparse.ArgumentParser()
    add_config_flags(p, cls)
    return config_from_args(p.parse_args(argv), cls)


def test_defaults_are_the_papers():
    cfg = parse([])
    assert (cfg.loss.name, cfg.loss.k, cfg.loss.beta, cfg.loss.temperature) == ("tad", 10, 2.0, 1.0)
    assert (cfg.train.lr, cfg.train.weight_decay) == (1e-4, 0.1)
    assert (cfg.loss.clm_weight, cfg.loss.div_weight) == (1.0, 1.0)


def test_yaml_round_trip_and_flags_override(tmp_path):
    cfg = DistillConfig()
    cfg.loss.k = 5
    cfg.data.paths = ["a.txt", "b.jsonl"]
    path = tmp_path / "run.yaml"
    save_yaml(cfg, path)
    assert from_dict(DistillConfig, yaml.safe_load(path.read_text())) == cfg
    saved = yaml.safe_load(path.read_text())  # in the config's own order (teacher first, train last), not sorted
    assert list(saved) == [f.name for f in dataclasses.fields(DistillConfig)]
    assert list(saved["loss"]) == [f.name for f in dataclasses.fields(type(cfg.loss))]
    got = parse(["--config", str(path), "--k", "20", "--loss.beta", "5", "--data", "c.txt", "--resume"])
    assert (got.loss.k, got.loss.beta, got.data.paths, got.train.resume) == (20, 5.0, ["c.txt"], True)
    assert got.train.lr == cfg.train.lr


@pytest.mark.parametrize(
    "doc, match",
    [
        ({"loss": {"kk": 3}}, "unknown config key loss.kk"),
        ({"trainer": {}}, "unknown config key trainer"),
        ({"loss": {"k": "ten"}}, "loss.k expects an integer"),
        ({"train": {"resume": "yes"}}, "train.resume expects true/false"),
        ({"loss": {"beta": -1}}, "loss.beta=-1.0 must be a finite number >= 0"),
        ({"loss": {"name": "mse"}}, "not a loss"),
        ({"loss": {"k": 0}}, "loss.k=0 must be >= 1"),
        ({"loss": 3}, "config section loss must be a mapping"),
        ({"teacher": {"cache": "c"}, "data": {"task": "sft"}, "train": {"on_policy": 0.5}}, "drop --teacher.cache"),
        ({"train": {"fused_loss": "yes"}}, "train.fused_loss='yes' must be auto, on or off"),
        ({"train": {"loss_chunk_size": -1}}, "train.loss_chunk_size=-1 must be >= 0"),
        # step counts: log_every 0 was a ZeroDivisionError after the models loaded; stop_after -1 "stopped after
        # step 0" with exit 0; negative warm-up / eval / save intervals ran
        ({"train": {"log_every": 0}}, r"^train\.log_every=0 must be >= 1$"),
        ({"train": {"stop_after": -1}}, r"^train\.stop_after=-1 must be >= 0 \(0: run to max_steps\)$"),
        ({"train": {"warmup_steps": -3}}, r"^train\.warmup_steps=-3 must be >= 0$"),
        ({"train": {"eval_every": -1}}, r"^train\.eval_every=-1 must be >= 0"),
        ({"train": {"save_every": -1}}, r"^train\.save_every=-1 must be >= 0"),
        ({"data": {"math_train": -5}}, r"^data\.math_train=-5 must be >= 1$"),  # was n_train, after the models loaded
        ({"data": {"seq_len": 1}}, r"^data\.seq_len=1 must be >= 2 \(a row needs a token and its successor\)$"),
        ({"loss": {"name": "clm", "cosine_weight": 0.5}},
         r"^loss\.cosine_weight needs a teacher; it cannot be used with loss\.name=clm$"),
    ],
)
def test_bad_yaml_is_one_clear_error(tmp_path, doc, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(TailkdError, match=match):
        parse(["--config", str(path)])


def test_yaml_reads_floats_written_with_an_exponent(tmp_path):
    """``lr: 1e-4`` is the number it looks like, as YAML 1.2 reads it: PyYAML's YAML 1.1 resolver wants a dot
    (``1.0e-4``) and read a string, so the learning rate the README writes as 1e-4 was refused ("config key train.lr
    expects a number, got '1e-4'") in --config, a run's config.yaml read by eval, and recipe --set."""
    from tailkd.command_config import EvalConfig
    from tailkd.config import parse_assignment

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  weight_decay: 5E-2\n  adam_betas: [0.9, 9.5e-1]\n"
                    "loss:\n  beta: +2e0\n  temperature: 1.5e+0\n")
    cfg = parse(["--config", str(path)])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.adam_betas, cfg.loss.beta, cfg.loss.temperature) == (
        1e-4, 5e-2, [0.9, 0.95], 2.0, 1.5)
    assert parse_assignment("train.lr=3e-5") == {"train": {"lr": 3e-5}}
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  heldout_fraction: 2e-1\n")
    assert parse(["--student", str(run / "final")], EvalConfig).data.heldout_fraction == 0.2
    path.write_text("train:\n  lr: 1e-4x\n")  # not a number: the same one-line error as before
    with pytest.raises(TailkdError, match=r"^config key train\.lr expects a number, got '1e-4x'$"):
        parse(["--config", str(path)])
    path.write_text("train:\n  max_steps: 1e3\n")
    with pytest.raises(TailkdError, match=r"^config key train\.max_steps expects an integer, got 1000\.0$"):
        parse(["--config", str(path)])


def test_yaml_on_off_are_the_choices_of_a_setting_that_has_them(tmp_path):
    """``fused_loss: off`` (the values its help lists: auto, on, off) is that value: YAML 1.1 reads unquoted on/off
    as true/false, and the config refused it ("config key train.fused_loss expects a string, got False"), in
    --config and in recipe --set. A setting without on/off among its choices still refuses true/false."""
    from tailkd.config import parse_assignment

    path = tmp_path / "c.yaml"
    for word, value in (("off", "off"), ("on", "on"), ("Off", "off"), ("auto", "auto")):
        path.write_text(f"train:\n  fused_loss: {word}\n")
        assert parse(["--config", str(path)]).train.fused_loss == value
    assert from_dict(DistillConfig, parse_assignment("train.fused_loss=off")).train.fused_loss == "off"
    path.write_text("train:\n  precision: off\n")
    with pytest.raises(TailkdError, match=r"^config key train\.precision expects a string, got False$"):
        parse(["--config", str(path)])


def test_garbled_yaml_and_missing_file(tmp_path):
    path = tmp_path / "garbled.yaml"
    path.write_text("loss: {name: tad\n  k: [")
    with pytest.raises(TailkdError, match="not valid YAML"):
        parse(["--config", str(path)])
    with pytest.raises(TailkdError, match="does not exist"):
        parse(["--config", str(tmp_path / "nope.yaml")])
    path.write_text("train:\n  seed: " + "9" * 5000 + "\n")  # Python's int() refuses over 4300 digits: ValueError
    with pytest.raises(TailkdError, match=r"garbled\.yaml is not valid YAML \(Exceeds the limit \(4300 digits\)"):
        parse(["--config", str(path)])


def test_yaml_nested_past_the_parser_is_not_valid_yaml(tmp_path):
    """A YAML document nested past Python's stack (PyYAML's composer recurses: a RecursionError traceback before) is
    the one 'not valid YAML' line, in --config, in the run config a saved model's commands read, and in --set."""
    from tailkd.command_config import read_run_config
    from tailkd.config import parse_assignment

    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "deep.yaml"
    path.write_text(deep)
    with pytest.raises(TailkdError, match=r"config file .*deep\.yaml is not valid YAML \(nested too deeply to read\)"):
        parse(["--config", str(path)])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(deep)
    with pytest.raises(TailkdError, match=r"the run config .*config\.yaml of .* is not valid YAML \(nested too "):
        read_run_config(tmp_path / "run" / "final")
    assert parse_assignment(f"train.seed={deep}") == {"train": {"seed": deep}}  # a string, refused as a seed later


def test_yaml_that_is_not_utf8_says_so_and_where(tmp_path):
    """A --config or a saved model's run config holding bytes that are not UTF-8 (a Latin-1 'é') is one line naming
    the file and its line as not UTF-8 text; it was "not valid YAML ('utf-8' codec can't decode byte 0xe9 in
    position 15: ...); fix the syntax": no syntax to fix."""
    from tailkd.command_config import read_run_config

    latin = b"loss:\n  name: caf\xe9\n"
    path = tmp_path / "latin.yaml"
    path.write_bytes(latin)
    with pytest.raises(TailkdError, match=r"^config file .*latin\.yaml is not UTF-8 text \(line 2: invalid "
                                          r"continuation byte\); save it as UTF-8$"):
        parse(["--config", str(path)])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_bytes(latin)
    with pytest.raises(TailkdError, match=r"^the run config .*config\.yaml of .* is not UTF-8 text \(line 2: invalid "
                                          r"continuation byte\); save it as UTF-8, or give "):
        read_run_config(tmp_path / "run" / "final")


def test_utf8_text_reads_line_endings_as_read_text_does(tmp_path):
    """config.utf8_text, the reader of --config, a run config, a chat template file and compare's run files, reads
    \\r\\n and a lone \\r (a classic-Mac file) as \\n, as read_text(encoding="utf-8") does: a Jinja chat template keeps
    no \\r of its line endings."""
    path = tmp_path / "t.jinja"
    path.write_bytes(b"{{ a }}\r\n{{ b }}\r{{ c }}\n")
    assert utf8_text(path, "t", "fix") == "{{ a }}\n{{ b }}\n{{ c }}\n" == path.read_text(encoding="utf-8")


@pytest.mark.parametrize("raw", [b"a\nb\ncaf\xe9\n", b"a\r\nb\r\ncaf\xe9\r\n", b"a\rb\rcaf\xe9\r"])
def test_utf8_text_names_the_line_of_a_bad_byte_as_it_reads_the_lines(tmp_path, raw):
    """The line a byte that is not UTF-8 is on, counted as utf8_text reads the lines (\\n, \\r\\n and a lone \\r end
    one; an editor's line numbers): a classic-Mac file's third line is line 3. It counted \\n only: line 1."""
    path = tmp_path / "t.yaml"
    path.write_bytes(raw)
    with pytest.raises(TailkdError, match=r"^t is not UTF-8 text \(line 3: invalid continuation byte\); fix$"):
        utf8_text(path, "t", "fix")


def test_shipped_configs_load():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files, "configs/ should ship example recipes"
    for f in files:
        doc = yaml.safe_load(f.read_text()) or {}
        if "stages" in doc:  # a multi-stage recipe
            from tailkd.recipe import read_recipe

            stages = read_recipe(f).stages
            assert len(stages) == len(doc["stages"])
            if doc.get("chain", True):  # each stage from the previous one's student
                assert stages[1].student.path == str(Path(stages[0].train.out_dir) / "final")
            else:  # a sweep: every stage from the same start
                assert all(s.student.path == stages[0].student.path for s in stages)
            continue
        cfg = from_dict(DistillConfig, doc).validate()
        assert to_dict(cfg)


def _float_fields(cls=DistillConfig, prefix=""):
    """The float leaves of ``cls`` (an omitted leaf of a reused section too: it has its range all the same)."""
    import dataclasses
    import typing

    from tailkd.config import _unwrap_optional

    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(typing.get_type_hints(cls)[f.name])[0]
        if dataclasses.is_dataclass(tp):
            yield from _float_fields(tp, prefix + f.name + ".")
        elif tp is float or tp == list[float]:
            yield prefix + f.name


def _config_float_leaves():
    """(config class, float leaf) for every float leaf a config reads (its OMIT left out)."""
    from tailkd.config import _leaves

    return [(cls, key) for cls in CONFIGS for key, _, _ in _leaves(cls) if key in set(_float_fields(cls))]


def test_every_float_field_has_a_range():
    from tailkd.config import FLOAT_RANGES

    assert sorted({key for cls in CONFIGS for key in _float_fields(cls)}) == sorted(FLOAT_RANGES)


@pytest.mark.parametrize("cls, key", _config_float_leaves(), ids=lambda x: x if isinstance(x, str) else x.__name__)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_rejects_nan_and_infinities(cls, key, bad):
    """Each float field of every config (each item of a list field) refuses NaN and ±inf with one message naming
    the key."""
    section, name = key.split(".")
    default = getattr(getattr(cls(), section), name)
    value = [default[0], bad] if isinstance(default, list) else bad
    with pytest.raises(TailkdError, match=rf"^{key}=.*{bad}.* must be a finite number"):
        from_dict(cls, {section: {name: value}}).validate()


def test_range_messages():
    with pytest.raises(TailkdError, match=r"^train\.lr=nan must be a finite number > 0$"):
        parse(["--lr", "nan"])
    with pytest.raises(TailkdError, match=r"^train\.adam_betas=0\.9 1\.0: each must be a finite number in \[0, 1\)$"):
        parse(["--train.adam_betas", "0.9", "1.0"])
    with pytest.raises(TailkdError, match=r"^train\.adam_betas=0\.9 must be two numbers"):
        parse(["--train.adam_betas", "0.9"])
    with pytest.raises(TailkdError, match=r"^data\.heldout_fraction=1\.0 must be a finite number in \(0, 1\)$"):
        parse(["--data.heldout_fraction", "1"])
    assert parse(["--train.grad_clip", "0", "--loss.jsd_beta", "1"]).train.grad_clip == 0.0  # the closed ends pass


def test_a_seed_range_is_numpys_both_ends_included():
    """Seeds lie in numpy's [0, 2^32 - 1] (`SEED_KEYS`): both ends pass, one past either end is refused."""
    from tailkd.command_config import ReproduceConfig

    assert [parse(["--seed", str(seed)]).train.seed for seed in (0, 2 ** 32 - 1)] == [0, 2 ** 32 - 1]
    assert parse(["--seeds", "0", str(2 ** 32 - 1)], ReproduceConfig).reproduce.seeds == [0, 2 ** 32 - 1]
    for seed in (-1, 2 ** 32):
        with pytest.raises(TailkdError, match=rf"^train\.seed={seed}: a seed must be an integer in \[0, 4294967295\]"):
            parse(["--seed", str(seed)])


# --------------------------------------------------------------------------- the other subcommands' configs


def test_subcommand_config_from_yaml_and_flags(tmp_path):
    """`tailkd eval --config`: the YAML mirrors EvalConfig (distill's teacher and data sections, eval, generate),
    the flags (short aliases and --section.field) override it."""
    from tailkd.command_config import EvalConfig

    student = tmp_path / "student"
    student.mkdir()
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"path": "t", "dtype": "fp32"},
                                    "data": {"paths": ["a.txt"], "seq_len": 64, "heldout_fraction": 0.1},
                                    "eval": {"student": str(student), "max_rows": 5, "bins": 20},
                                    "generate": {"samples": 3}}))
    cfg = parse(["--config", str(path), "--seq-len", "32", "--max-rows", "7", "--eval.out", "o.json"], EvalConfig)
    assert (cfg.teacher.path, cfg.teacher.dtype) == ("t", "fp32")
    assert (cfg.data.paths, cfg.data.seq_len, cfg.data.heldout_fraction) == (["a.txt"], 32, 0.1)
    assert (cfg.eval.student, cfg.eval.max_rows, cfg.eval.bins, cfg.eval.out) == (str(student), 7, 20, "o.json")
    assert (cfg.generate.samples, cfg.generate.enabled) == (3, False)


def test_a_section_keeps_its_commands_defaults(tmp_path):
    """analyze-teacher's data section defaults to 256-token rows; a YAML that sets another data key keeps that."""
    from tailkd.command_config import AnalyzeTeacherConfig

    assert parse([], AnalyzeTeacherConfig).data.seq_len == 256
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump({"data": {"paths": ["a.txt"]}, "analyze": {"teachers": ["t1", "t2"]}}))
    cfg = parse(["--config", str(path)], AnalyzeTeacherConfig)
    assert (cfg.data.seq_len, cfg.data.paths, cfg.analyze.teachers) == (256, ["a.txt"], ["t1", "t2"])


def test_eval_settings_default_to_the_students_run(tmp_path):
    """Teacher and data settings not given are those of RUN/config.yaml (the whole data section, 'builtin:math' and
    the held-out fraction included); flags win; a leaf eval does not read (teacher.cache) is not taken."""
    from tailkd.command_config import EvalConfig

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    rc = DistillConfig()
    rc.teacher.path, rc.teacher.cache = "my-teacher", "some-cache"
    rc.data.paths, rc.data.seq_len, rc.data.heldout_fraction, rc.data.math_heldout = ["builtin:math"], 48, 0.2, 7
    save_yaml(rc, run / "config.yaml")
    student = str(run / "final")
    cfg = parse(["--student", student], EvalConfig)
    assert (cfg.teacher.path, cfg.teacher.cache) == ("my-teacher", None)
    assert (cfg.data.paths, cfg.data.seq_len, cfg.data.heldout_fraction, cfg.data.math_heldout) == (
        ["builtin:math"], 48, 0.2, 7)
    cfg = parse(["--student", student, "--seq-len", "16", "--data", "x.txt", "--teacher", "other"], EvalConfig)
    assert (cfg.teacher.path, cfg.data.paths, cfg.data.seq_len, cfg.data.heldout_fraction) == (
        "other", ["x.txt"], 16, 0.2)
    # --generate of a pretraining run: its text holds no prompts, so its data.paths are not taken
    cfg = parse(["--student", student, "--generate"], EvalConfig)
    assert cfg.generate.enabled and cfg.data.paths == [] and cfg.data.math_heldout == 7
    # nor its seq_len (the length of its packed text rows): the decoded examples' limit is the given one, or 128
    from tailkd.config import DataConfig

    assert cfg.data.seq_len == DataConfig().seq_len == 128
    assert parse(["--student", student, "--generate", "--seq-len", "300"], EvalConfig).data.seq_len == 300
    (run / "config.yaml").write_text("data:\n  seq_len: long\n")
    with pytest.raises(TailkdError, match=r"config\.yaml: config key data\.seq_len expects an integer"):
        parse(["--student", student], EvalConfig)


def test_flags_unset_optional_fields_and_empty_lists_as_yaml_does(tmp_path):
    """What YAML writes as null or [], a flag can too: ``null`` unsets an optional field (num_layers, whose default
    6 conflicted with a layer list of another length, or a teacher cache named in a --config), a list flag without
    values is [] (data.paths: the built-in corpus), and an optional list without values is unset."""
    cfg = parse(["--student.num_layers", "null", "--student.layers", "0", "2"])
    assert (cfg.student.num_layers, cfg.student.layers) == (None, [0, 2])
    yml = tmp_path / "c.yaml"
    yml.write_text("teacher: {cache: c}\ndata: {paths: [a.txt]}\nstudent: {layers: [0, 1]}\n")
    cfg = parse(["--config", str(yml), "--teacher.cache", "null", "--data.paths", "--student.layers"])
    assert (cfg.teacher.cache, cfg.data.paths, cfg.student.layers) == (None, [], None)
    assert parse(["--student.hidden_size", "64"]).student.hidden_size == 64
    with pytest.raises(SystemExit):  # anything else than null is the field's type, as before
        parse(["--student.hidden_size", "none"])
    assert parse(["--loss.k", "3"]).loss.k == 3  # a field that is not optional takes no null
    # an optional bool: true / false / the bare flag (true) / null (unset: the teacher's tie), as YAML's
    assert [parse(flags).student.tie_embeddings for flags in (
        [], ["--student.tie_embeddings"], ["--student.tie_embeddings", "false"], ["--student.tie_embeddings", "true"],
        ["--student.tie_embeddings", "true", "--student.tie_embeddings", "null"])] == [None, True, False, True, None]


def test_reproduce_takes_distills_short_flags_for_what_it_shares():
    """reproduce's help says its teacher/student/data/train flags are distill's: the short ones too (only the long
    --train.* forms worked for batch size, learning rate, student depth)."""
    cfg = parse(["--student-layers", "3", "--batch-size", "8", "--grad-accum", "2", "--lr", "1e-3", "--fused-loss",
                 "off", "--steps", "12"], COMMAND_CONFIGS["reproduce"])
    assert (cfg.student.num_layers, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.lr, cfg.train.fused_loss,
            cfg.train.max_steps) == (3, 8, 2, 1e-3, "off", 12)


def test_reproduce_scale_rounds_each_runs_steps_to_at_least_one_and_keeps_eval_every_0():
    """`ReproduceConfig.scaled_steps`: train.max_steps and train.eval_every × reproduce.scale, rounded, at least 1;
    an eval_every of 0 (only before and after) stays 0."""
    reproduce = COMMAND_CONFIGS["reproduce"]
    assert parse(["--steps", "10", "--train.eval_every", "0", "--scale", "0.5"], reproduce).scaled_steps() == (5, 0)
    assert parse(["--steps", "10", "--train.eval_every", "4", "--scale", "0.1"], reproduce).scaled_steps() == (1, 1)


def test_output_paths_of_the_wrong_kind_are_one_clear_error(tmp_path):
    """A JSON output that is an existing folder, an output folder that is an existing file: refused when the
    command's config is read (flops --out DIR was an IsADirectoryError, compare --out FILE a FileExistsError, after
    the work)."""
    a_file = tmp_path / "f.json"
    a_file.write_text("{}")
    folder, file_ = re.escape(str(tmp_path)), re.escape(str(a_file))
    cases = [
        ("flops", ["--teacher-params", "1e9", "--student-params", "1e8", "--vocab", "9", "--hidden", "4", "--out",
                   str(tmp_path)], rf"^flops\.out={folder} is a folder; give a file name$"),
        ("eval", ["--student", str(tmp_path), "--out", str(tmp_path)], rf"^eval\.out={folder} is a folder"),
        ("lm-eval", ["--model", str(tmp_path), "--out", str(tmp_path)], rf"^lm_eval\.out={folder} is a folder"),
        ("lm-eval", ["--model", str(tmp_path), "--work-dir", str(a_file)], rf"^lm_eval\.work_dir={file_} is a file"),
        ("compare", ["--out", str(a_file)], rf"^compare\.out={file_} is a file; give a folder name$"),
        ("analyze-teacher", ["--out", str(a_file)], rf"^analyze\.out={file_} is a file"),
        ("reproduce", ["--out", str(a_file)], rf"^reproduce\.out={file_} is a file"),
    ]
    for command, argv, match in cases:
        with pytest.raises(TailkdError, match=match):
            parse(argv, COMMAND_CONFIGS[command])


def test_a_json_output_replaces_only_an_earlier_output_of_its_command(tmp_path):
    """eval / lm-eval / flops --out naming an existing file that is not an earlier output of that command (the
    student's own config.json, a run's metrics.jsonl, a data file) is refused when the config is read, the file
    untouched. It was replaced after the work, exit 0: `tailkd eval --student RUN/final --out RUN/final/config.json`
    left a student that no longer loads ('Unrecognized model ... should have a model_type key'). An earlier output
    of the same command (a re-run replacing its eval.json), an empty file or a new name is accepted."""
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text('{"model_type": "llama", "vocab_size": 9}')
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)  # past Python's parser: a RecursionError
    (tmp_path / "half.json").write_text('{"student": "s"}')  # one of eval's two keys only: not an eval output
    inputs = {p: p.read_bytes() for p in (final / "config.json", tmp_path / "run" / "metrics.jsonl",
                                          tmp_path / "deep.json", tmp_path / "half.json")}
    sizes = ["--teacher-params", "1e9", "--student-params", "1e8", "--vocab", "9", "--hidden", "4"]
    commands = {"eval": (["--student", str(final)], "eval.out", '{"student": "s", "teacher": "t", "kl": 1.0}'),
                "lm-eval": (["--model", str(final)], "lm_eval.out", '{"results": {"tailkd_ppl": {}}}'),
                "flops": (sizes, "flops.out", '{"teacher": {}, "student": {}, "methods": []}')}
    for command, (argv, key, earlier) in commands.items():
        for victim in inputs:
            with pytest.raises(TailkdError, match=rf"^refusing to replace {re.escape(str(victim))}: it is not a "
                                                  rf"tailkd {command} output .*choose another --out"):
                parse([*argv, "--out", str(victim)], COMMAND_CONFIGS[command])
        previous = tmp_path / f"{command}.json"
        previous.write_text(earlier)
        empty = tmp_path / f"{command}-empty.json"
        empty.touch()
        for ok in (previous, empty, tmp_path / "new" / f"{command}.json"):
            cfg = parse([*argv, "--out", str(ok)], COMMAND_CONFIGS[command])
            assert getattr(getattr(cfg, key.split(".")[0]), "out") == str(ok)
    assert all(p.read_bytes() == data for p, data in inputs.items())


def test_output_paths_under_a_file_are_one_clear_error(tmp_path):
    """An output path with an existing file among its parent folders (eval --out notes.txt/eval.json) cannot be
    written: refused when the command's config is read; it was a FileExistsError / NotADirectoryError with exit 1,
    after the whole evaluation or analysis had run."""
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    file_ = re.escape(str(a_file))
    cases = [
        ("flops", ["--teacher-params", "1e9", "--student-params", "1e8", "--vocab", "9", "--hidden", "4", "--out",
                   str(a_file / "flops.json")], rf"^flops\.out={file_}/flops\.json: {file_} is a file, not a folder"),
        ("eval", ["--student", str(tmp_path), "--out", str(a_file / "sub" / "e.json")], rf"^eval\.out=.*{file_} is a"),
        ("lm-eval", ["--model", str(tmp_path), "--out", str(a_file / "r.json")], rf"^lm_eval\.out=.*{file_} is a"),
        ("lm-eval", ["--model", str(tmp_path), "--work-dir", str(a_file / "w")], rf"^lm_eval\.work_dir=.*{file_} is a"),
        ("compare", ["--out", str(a_file / "cmp")], rf"^compare\.out=.*{file_} is a file"),
        ("analyze-teacher", ["--out", str(a_file / "an")], rf"^analyze\.out=.*{file_} is a file"),
        ("reproduce", ["--out", str(a_file / "rep")], rf"^reproduce\.out=.*{file_} is a file"),
        ("cache-teacher", ["--out", str(a_file / "cache")], rf"^cache\.out=.*{file_} is a file"),
        ("select-data", ["--reference", str(tmp_path), "--out", str(a_file / "sel")], rf"^select\.out=.*{file_} is a"),
        ("distill", ["--out", str(a_file / "run")], rf"^train\.out_dir=.*{file_} is a file"),  # before models load
    ]
    for command, argv, match in cases:
        with pytest.raises(TailkdError, match=match):
            parse(argv, COMMAND_CONFIGS.get(command, DistillConfig))


def test_an_unwritable_output_folder_is_refused_before_the_work(tmp_path, monkeypatch, capsys):
    """An output folder without write permission (or on a read-only file system) was found only when the result was
    written, after the whole evaluation, analysis, scoring or lm-eval run: exit 1, 'PermissionError: [Errno 13]'. Now
    refused when the command's config is read, in one line, exit 2: a probe file cannot be created where the output
    goes (this test runs as root, so the folder's refusal is simulated: creating a file in it fails with EACCES).
    flops and reproduce are probed too (they were not: the only commands with an --out that were not)."""
    from conftest import refuse_new_files_in

    from tailkd.cli import main

    locked = tmp_path / "locked"
    locked.mkdir()
    refuse_new_files_in(monkeypatch, locked)
    where = re.escape(str(locked))
    cases = [
        ("eval", ["--student", str(tmp_path), "--out", str(locked / "e.json")], "eval.out"),
        ("lm-eval", ["--model", str(tmp_path), "--out", str(locked / "r.json")], "lm_eval.out"),
        ("lm-eval", ["--model", str(tmp_path), "--work-dir", str(locked / "tasks")], "lm_eval.work_dir"),
        ("analyze-teacher", ["--out", str(locked)], "analyze.out"),
        ("analyze-teacher", ["--out", str(locked / "new" / "an")], "analyze.out"),  # the folders to be made in it
        ("cache-teacher", ["--out", str(locked / "cache")], "cache.out"),
        ("select-data", ["--reference", str(tmp_path), "--out", str(locked / "sel")], "select.out"),
        ("compare", ["--out", str(locked / "cmp")], "compare.out"),  # written beside, renamed into place
        ("flops", ["--teacher-params", "1e9", "--student-params", "1e8", "--vocab", "9", "--hidden", "4", "--out",
                   str(locked / "f.json")], "flops.out"),
        ("reproduce", ["--out", str(locked / "rep")], "reproduce.out"),  # its runs, evaluations and report inside
    ]
    for command, argv, key in cases:
        flag = argv[-2]  # the fix names the flag the user gave (--work-dir, not --out)
        with pytest.raises(TailkdError, match=rf"^{re.escape(key)}=.*: cannot write in {where} \(Permission denied\); "
                                              rf"choose another {flag}, or make that folder writable$"):
            parse(argv, COMMAND_CONFIGS[command])
    capsys.readouterr()
    assert main(["eval", "--student", str(tmp_path / "nothing"), "--out", str(locked / "e.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tailkd: error: eval.out=") and "cannot write in" in err[0]
    monkeypatch.undo()
    assert list(locked.iterdir()) == []  # nothing made there; and a writable folder passes (no probe left)
    parse(["--student", str(tmp_path), "--out", str(locked / "e.json")], COMMAND_CONFIGS["eval"])
    parse(["--out", str(locked)], COMMAND_CONFIGS["analyze-teacher"])
    assert list(locked.iterdir()) == []


def test_recipe_set_overrides_every_stage_even_its_own_keys(tmp_path, capsys):
    """``recipe --set`` overrides a setting of every stage, also where a stage sets it itself (math-two-stage's
    stages set train.max_steps and lr: --set was merged under them and ignored), and is checked like the stage's own
    values before any stage runs (-1 and 'abc' started the full recipe)."""
    from tailkd.cli import main
    from tailkd.recipe import read_recipe

    path = REPO / "configs" / "math-two-stage.yaml"
    assert [c.train.max_steps for c in read_recipe(path, str(tmp_path)).stages] == [40, 30]
    recipe = read_recipe(path, str(tmp_path), {"train": {"max_steps": 2, "lr": 3e-4}, "data": {"seq_len": 16}})
    assert [(c.train.max_steps, c.train.lr, c.data.seq_len) for c in recipe.stages] == [(2, 3e-4, 16)] * 2
    with pytest.raises(TailkdError, match=r"^recipe .*math-two-stage\.yaml, stage '[a-z-]+': train\.max_steps=-1 must "
                                          r"be >= 1$"):
        read_recipe(path, str(tmp_path), {"train": {"max_steps": -1}})
    assert main(["recipe", str(path), "--out", str(tmp_path / "r"), "--set", "train.max_steps=abc"]) == 2
    assert "train.max_steps expects an integer" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_a_recipe_error_in_a_stage_names_the_stage(tmp_path):
    """A bad setting of one stage was one line that did not say which stage (a loss option, a value, a key):
    the line now starts with the recipe and the stage's name."""
    from tailkd.recipe import read_recipe

    for second, match in (({"loss": {"name": "kd", "options": {"alpha": 1}}}, r"loss\.options: loss 'kd' has no "
                                                                                r"option alpha"),
                          ({"train": {"lr": -1}}, r"train\.lr=-1\.0 must be"),
                          ({"trian": {"lr": 1}}, r"unknown config key trian; valid keys: ")):
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump({"stages": [{"name": "first"}, {"name": "second", **second}]}))
        with pytest.raises(TailkdError, match=rf"^recipe {re.escape(str(path))}, stage 'second': {match}"):
            read_recipe(path, str(tmp_path / "r"))


def test_recipe_compare_baseline_is_checked_before_any_stage(tmp_path):
    """A recipe's compare.baseline names a stage or a run folder; anything else is refused when the recipe is read
    (it failed only after every stage had trained)."""
    from tailkd.recipe import read_recipe

    doc = yaml.safe_load((REPO / "configs" / "math-two-stage.yaml").read_text())
    for baseline, ok in (("nope", False), (doc["stages"][0]["name"], True), (str(tmp_path), True)):
        doc["compare"] = {"compare": {"baseline": baseline}}
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(doc))
        if ok:
            read_recipe(path, str(tmp_path / "r"))
            continue
        with pytest.raises(TailkdError, match=r"^compare\.baseline='nope' is neither a stage of this recipe \("):
            read_recipe(path, str(tmp_path / "r"))


@pytest.mark.parametrize("part, match", [
    ({"out_dir": [1]}, r"^recipe .*recipe\.yaml: 'out_dir' must be a folder name, got \[1\]$"),  # a TypeError
    ({"evaluate": {"generate": 5}}, r"^config section generate must be a mapping, got int"),  # an AttributeError
    ({"compare": {"compare": 5}}, r"^config section compare must be a mapping, got int$"),  # a TypeError
])
def test_a_recipe_part_of_another_shape_is_one_line(tmp_path, part, match):
    """A recipe's out_dir that is not a string, or its evaluate: generate: or compare: compare: that is not a mapping,
    was a TypeError or AttributeError traceback, exit 1, while the recipe was read (generate: null too, which now
    reads as an empty section, as a null section does everywhere)."""
    from tailkd.recipe import read_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "a"}], **part}))
    with pytest.raises(TailkdError, match=match):
        read_recipe(path, None if "out_dir" in part else str(tmp_path / "r"))


def test_a_missing_recipe_file_is_named_as_the_recipe(tmp_path, capsys):
    """`tailkd recipe FILE` of no file: one line naming the recipe, not the --config flag (which recipe has not: the
    line was load_yaml's 'pass an existing YAML file to --config')."""
    from tailkd.cli import main

    missing = tmp_path / "nope.yaml"
    assert main(["recipe", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tailkd: error: recipe file {missing} does not exist; give the path of a recipe YAML file "
                   "(e.g. configs/math-two-stage.yaml)"]
    assert main(["distill", "--config", str(tmp_path)]) == 2  # a folder: said so (it "did not exist")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tailkd: error: config file {tmp_path} is a folder, not a file; pass an existing YAML file to "
                   "--config"]
    # load_yaml's other lines name it as the recipe too (they said "config file", and a list's "a mapping of
    # sections (teacher:, student:, ...)", a --config file's keys)
    garbled, listed = tmp_path / "garbled.yaml", tmp_path / "list.yaml"
    garbled.write_text("stages: [\n")
    listed.write_text("- a\n")
    for path, line in ((garbled, f"recipe file {garbled} is not valid YAML ("),
                       (listed, f"recipe file {listed} must hold a mapping of recipe keys (out_dir, chain, common, "
                                "stages, evaluate, compare)")):
        assert main(["recipe", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"tailkd: error: {line}"), err


@pytest.mark.parametrize("evaluate, name", [
    ({"generate": {"enabled": True, "limit": 2}}, "generate.json"), ({"generate": {"limit": 2}}, "eval.json"),
    ({"generate": None}, "eval.json"), ({"eval": {"max_rows": 2}}, "eval.json")])
def test_a_recipes_evaluation_is_generate_json_only_where_generation_is_enabled(tmp_path, evaluate, name):
    """Recipe.eval_out: a stage's evaluation is RUN/generate.json where the recipe's evaluate: enables generation,
    else RUN/eval.json — a generate: section giving other options only (enabled is false by default) or none is the
    held-out metrics' eval.json, where compare reads them; the eval config writes the file eval_out names."""
    from tailkd.recipe import read_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "a"}], "evaluate": evaluate}))
    recipe = read_recipe(path, str(tmp_path / "r"))
    stage = recipe.stages[0]
    assert recipe.eval_out(stage) == Path(stage.train.out_dir) / name
    ev = recipe.eval_config(stage, with_run=False)
    assert ev.eval.out == str(recipe.eval_out(stage)) and ev.generate.enabled == (name == "generate.json")


@pytest.mark.parametrize("command, argv, match", [
    ("eval", [], r"^eval\.student is not set; pass --student DIR"),
    ("eval", ["--bins", "0"], r"^eval\.bins=0 must be >= 1$"),
    ("eval", ["--split", "dev"], r"^eval\.split='dev' must be heldout, train or all$"),
    ("eval", ["--temperature", "nan"], r"^generate\.temperature=nan must be a finite number > 0$"),
    ("eval", ["--top-p", "1.5"], r"^generate\.top_p=1\.5 must be a finite number in \(0, 1\]$"),
    ("eval", ["--device", "tpu"], r"^eval\.device='tpu' is not a device; use auto, cpu, cuda or cuda:N$"),
    ("eval", ["--seq-len", "1"], r"^data\.seq_len=1 must be >= 2"),
    ("eval", ["--generate", "--data", "p.jsonl"], r"pass the files with --prompts FILE\.jsonl"),
    ("eval", ["--generate", "--prompts", "/no/such.jsonl"],  # it said "leave data.paths empty for the news corpus"
     r"^generate\.prompts: /no/such\.jsonl does not exist; fix the path given to --prompts$"),
    ("analyze-teacher", ["--kmax", "0"], r"^analyze\.kmax=0 must be >= 1 \(the paper uses 100\)$"),
    ("analyze-teacher", ["--dtype", "fp16"], r"^teacher\.dtype='fp16' must be auto, bf16 or fp32$"),
    ("cache-teacher", ["--k", "8"], r"^cache\.out is not set; pass --out DIR"),
    ("cache-teacher", ["--out", "c", "--hidden-dtype", "fp8"],
     r"^cache\.hidden_dtype='fp8' must be bf16, fp16 or fp32$"),
    ("cache-teacher", ["--out", "c", "--heldout-fraction", "inf"],
     r"^data\.heldout_fraction=inf must be a finite number in \(0, 1\)$"),
    ("lm-eval", ["--limit", "-1"], r"^lm_eval\.limit=-1\.0 must be a finite number > 0"),
    ("lm-eval", ["--split", "train"], r"^lm_eval\.split='train' must be heldout or all$"),
    ("flops", ["--teacher", "t", "--student", "s", "--tokens", "inf"], r"^flops\.tokens=inf must be a finite number"),
    ("flops", ["--teacher", "t", "--student", "s", "--seq-len", "0"], r"^flops\.seq_len=0 must be >= 1$"),
    ("reproduce", ["--steps", "0"], r"^train\.max_steps=0 must be >= 1$"),  # was scaled up to 1 step
    ("reproduce", ["--steps", "-5"], r"^train\.max_steps=-5 must be >= 1$"),
    ("reproduce", ["--train.eval_every", "-1"], r"^train\.eval_every=-1 must be >= 0"),
])
def test_bad_subcommand_values_are_one_clear_error(tmp_path, command, argv, match):
    cls = COMMAND_CONFIGS[command]
    required = {"eval": ["--student", str(tmp_path)], "lm-eval": ["--model", str(tmp_path)]}.get(command, [])
    with pytest.raises(TailkdError, match=match):
        parse([*required, *argv] if argv else argv, cls)


def test_a_key_a_command_does_not_read_is_unknown(tmp_path):
    from tailkd.command_config import EvalConfig, SelectDataConfig

    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"cache": "c"}}))
    with pytest.raises(TailkdError, match=r"^unknown config key teacher\.cache in section 'teacher'; valid keys: "
                                          r"dtype, path$"):
        parse(["--config", str(path)], EvalConfig)
    path.write_text(yaml.safe_dump({"data": {"task": "sft"}}))
    with pytest.raises(TailkdError, match=r"^unknown config key data\.task"):
        parse(["--config", str(path), "--out", "c"], SelectDataConfig)


# Every flag spelling the subcommands took before they had typed configs, and the leaf it sets now.
OLD_SPELLINGS = {
    "eval": (["--student", "S", "--teacher", "T", "--data", "a", "b", "--split", "all", "--seq-len", "16",
              "--batch-size", "2", "--max-rows", "0", "--bins", "5", "--device", "cpu", "--teacher-dtype", "fp32",
              "--cache-dir", "C", "--out", "o.json", "--max-new-tokens", "9", "--samples", "2", "--temperature",
              "0.5", "--top-p", "0.9", "--gen-limit", "0", "--seed", "3"],
             {"eval.student": "S", "teacher.path": "T", "data.paths": ["a", "b"], "eval.split": "all",
              "data.seq_len": 16, "eval.batch_size": 2, "eval.max_rows": 0, "eval.bins": 5, "eval.device": "cpu",
              "teacher.dtype": "fp32", "data.cache_dir": "C", "eval.out": "o.json", "generate.max_new_tokens": 9,
              "generate.samples": 2, "generate.temperature": 0.5, "generate.top_p": 0.9, "generate.limit": 0,
              "generate.seed": 3}),
    "analyze-teacher": (["--teacher", "t1", "t2", "--data", "a", "--split", "train", "--seq-len", "16",
                         "--batch-size", "2", "--max-rows", "3", "--kmax", "7", "--device", "cpu", "--dtype", "bf16",
                         "--cache-dir", "C", "--out", "O"],
                        {"analyze.teachers": ["t1", "t2"], "data.paths": ["a"], "analyze.split": "train",
                         "data.seq_len": 16, "analyze.batch_size": 2, "analyze.max_rows": 3, "analyze.kmax": 7,
                         "analyze.device": "cpu", "teacher.dtype": "bf16", "data.cache_dir": "C", "analyze.out": "O"}),
    "compare": (["r1", "r2", "--baseline", "r1", "--out", "O"],
                {"compare.runs": ["r1", "r2"], "compare.baseline": "r1", "compare.out": "O"}),
    "flops": (["--teacher", "t", "--student", "s", "--teacher-params", "2e9", "--student-params", "1e9", "--vocab",
               "9", "--hidden", "4", "--student-hidden", "2", "--teacher-layers", "3", "--student-layers", "1",
               "--teacher-tied", "--student-tied", "--seq-len", "64", "--tokens", "1e5", "--freeze-embeddings",
               "--delta", "0.25", "--reference", "r", "--reference-params", "1e6", "--prompt-len", "8", "--gen-len",
               "16", "--ppo-epochs", "2", "--out", "f.json"],
              {"flops.teacher": "t", "flops.student": "s", "flops.teacher_params": 2e9, "flops.student_params": 1e9,
               "flops.vocab": 9, "flops.hidden": 4, "flops.student_hidden": 2, "flops.teacher_layers": 3,
               "flops.student_layers": 1, "flops.teacher_tied": True, "flops.student_tied": True, "flops.seq_len": 64,
               "flops.tokens": 1e5, "flops.freeze_embeddings": True, "flops.delta": 0.25, "flops.reference": "r",
               "flops.reference_params": 1e6, "flops.prompt_len": 8, "flops.gen_len": 16, "flops.ppo_epochs": 2,
               "flops.out": "f.json"}),
    "lm-eval": (["--model", "M", "--tasks", "tailkd_gsm", "--data", "a", "--split", "all", "--gsm-data", "g.jsonl",
                 "--max-gen-toks", "8", "--limit", "2", "--num-fewshot", "1", "--batch-size", "2", "--device", "cpu",
                 "--work-dir", "W", "--write-only", "--cache-dir", "C", "--out", "l.json"],
                {"lm_eval.model": "M", "lm_eval.tasks": "tailkd_gsm", "data.paths": ["a"], "lm_eval.split": "all",
                 "lm_eval.gsm_data": "g.jsonl", "lm_eval.max_gen_toks": 8, "lm_eval.limit": 2.0,
                 "lm_eval.num_fewshot": 1, "lm_eval.batch_size": 2, "lm_eval.device": "cpu", "lm_eval.work_dir": "W",
                 "lm_eval.write_only": True, "data.cache_dir": "C", "lm_eval.out": "l.json"}),
    "cache-teacher": (["--teacher", "T", "--data", "a", "--seq-len", "16", "--k", "4", "--out", "O",
                       "--hidden-states", "--hidden-dtype", "fp32", "--tail-samples", "2", "--split", "heldout",
                       "--batch-size", "2", "--rows-per-shard", "8", "--max-rows", "6", "--device", "cpu", "--dtype",
                       "fp32", "--cache-dir", "C", "--doc-sep", "line", "--heldout-fraction", "0.2", "--seed", "1"],
                      {"teacher.path": "T", "data.paths": ["a"], "data.seq_len": 16, "cache.k": 4, "cache.out": "O",
                       "cache.hidden_states": True, "cache.hidden_dtype": "fp32", "cache.tail_samples": 2,
                       "cache.split": "heldout", "cache.batch_size": 2, "cache.rows_per_shard": 8, "cache.max_rows": 6,
                       "cache.device": "cpu", "teacher.dtype": "fp32", "data.cache_dir": "C", "data.doc_sep": "line",
                       "data.heldout_fraction": 0.2, "cache.seed": 1}),
}


@pytest.mark.parametrize("command", list(OLD_SPELLINGS))
def test_the_flags_users_type_still_work(command):
    """`tailkd COMMAND` parses every flag it took before, through the real parser, into the typed config."""
    from tailkd.cli import build_parser
    from tailkd.config import leaf_value

    argv, expected = OLD_SPELLINGS[command]
    cfg = config_from_args(build_parser().parse_args([command, *argv]), COMMAND_CONFIGS[command])
    assert {key: leaf_value(cfg, key) for key in expected} == expected


def test_aliases_name_leaves_and_choices_agree_with_the_cache():
    from tailkd.cache import HIDDEN_DTYPES
    from tailkd.command_config import CACHE_HIDDEN_DTYPES, DATA_ALIASES
    from tailkd.config import ALIASES, _leaves

    assert CACHE_HIDDEN_DTYPES == tuple(HIDDEN_DTYPES)
    for cls in CONFIGS:
        leaves = {key for key, _, _ in _leaves(cls, omit=frozenset())}
        aliases = getattr(cls, "ALIASES", ALIASES)
        assert set(aliases.values()) <= leaves, cls.__name__
        # only the data flags shared by every command with a data section may point to a leaf it omits
        unused = {a for a, key in aliases.items() if key in getattr(cls, "OMIT", ())}
        assert unused <= set(DATA_ALIASES), (cls.__name__, unused)


def test_the_readmes_subcommand_lines_parse(tmp_path, monkeypatch):
    """Every `tailkd eval|analyze-teacher|compare|flops|lm-eval|cache-teacher ...` line of the README's code blocks
    parses into its typed config and validates (nothing runs)."""
    import re
    import shlex

    from tailkd.cli import build_parser

    monkeypatch.chdir(tmp_path)  # relative paths (runs/tad/final) name nothing here: no run config is read
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = [ln for block in re.findall(r"```bash\n(.*?)```", text, re.S) for ln in block.splitlines()]
    seen = set()
    for line in lines:
        argv = shlex.split(line, comments=True) if line.startswith("tailkd ") else []
        if argv and argv[1] in COMMAND_CONFIGS:
            config_from_args(build_parser().parse_args(argv[1:]), COMMAND_CONFIGS[argv[1]])
            seen.add(argv[1])
    assert seen == set(COMMAND_CONFIGS)


def test_every_flag_the_readme_names_exists():
    """Every ``--flag`` of the README is a flag of a tailkd command, and one on a ``tailkd SUBCOMMAND ...`` line (a
    code block, continuation lines joined, or inline code) is that subcommand's own. The launchers' flags (torchrun,
    accelerate launch), those of ``python -m tailkd.install`` and the table's examples of a typo are named here."""
    from tailkd.cli import build_parser

    parser = build_parser()
    subcommands = parser._subcommands
    ours = {f for p in (parser, *subcommands.values()) for f in p._option_string_actions}
    others = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port",  # torchrun
              "--config_file", "--cpu", "--multi_gpu", "--num_processes", "--machine_rank", "--mpirun_hostfile",
              "--dest", "--from", "--no-convert",  # python -m tailkd.install
              "--logdir",  # tensorboard
              "--loss.kk", "--section.field"}  # the error table's typo, the flags' pattern
    flag = re.compile(r"(?<![\w-])--[A-Za-z](?:[\w.-]*\w)?")
    text = re.sub(r"--\w+\.\*", "", (REPO / "README.md").read_text(encoding="utf-8"))  # --train.*: a section's flags
    assert set(flag.findall(text)) - ours - others == set()
    lines = [ln for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
             for ln in block.replace("\\\n", " ").splitlines()] + re.findall(r"`([^`\n]+)`", text)
    wrong = []
    for line in lines:
        for sub, rest in re.findall(r"(?:\btailkd|-m tailkd\.cli)\s+([a-z-]+)(?=\s|$)(.*)", line):
            if sub in subcommands:
                wrong += [(sub, f) for f in flag.findall(rest)
                          if f not in subcommands[sub]._option_string_actions and f not in others]
    assert wrong == []


def test_the_readmes_distill_synopsis_names_every_loss():
    """The README's `tailkd distill` synopsis offers ``--loss a|b|...``: the registry's names, all of them (it offered
    7 of the 13, without tvd and the DRKL paper's baselines)."""
    from tailkd.registry import LOSSES

    text = (REPO / "README.md").read_text(encoding="utf-8")
    (choices,) = re.findall(r"\[--loss ([a-z_|]+)\]", text)
    assert choices.split("|") == list(LOSSES)


def test_the_readmes_loss_table_lists_every_knob():
    """The README's table of losses names, per ``--loss``, the `LossConfig` knobs its registry row reads, all of them
    (it left temperature out of eight rows: tad, jsd, dkd, drkl, skew_kl, skew_rkl, akl, alpha_beta)."""
    from tailkd.registry import LOSSES

    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text.split("| loss (`--loss`) | function | per-token formula | knobs |")[1].split("\n\n")[0]
    cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in table.splitlines()[2:]]  # a \| inside a formula
    rows = {re.match(r" `(\w+)`", c[0]).group(1): c[3] for c in cells if re.match(r" `(\w+)`", c[0])}
    knobs = {name: set(re.findall(r"`(\w+)`", rows[name])) for name in LOSSES if name != "clm"}
    assert knobs == {name: set(spec.knobs) for name, spec in LOSSES.items() if name != "clm"}


@pytest.mark.parametrize("flags, key", [
    (["--student.hidden_size", "32"], "student.hidden_size=32"),
    (["--student-layers", "3"], "student.num_layers=3"),
    (["--student.layers", "0", "2"], "student.layers=[0, 2]"),
    (["--student.tie_embeddings", "false"], "student.tie_embeddings=False"),
    (["--student.mlp_init", "copy"], "student.mlp_init='copy'"),
    (["--student.num_heads", "2"], "student.num_heads=2"),
    (["--student.num_kv_heads", "1"], "student.num_kv_heads=1"),
    (["--student.intermediate_size", "64"], "student.intermediate_size=64"),
    (["--student.head_dim", "16"], "student.head_dim=16"),
    (["--student.experts", "used", "--student.mlp_init", "copy"], "student.experts='used'"),
    (["--student.calibration_rows", "8"], "student.calibration_rows=8"),
    (["--student.layer_choice", "influence"], "student.layer_choice='influence'"),
    (["--student.mlp_units", "active", "--student.mlp_init", "copy"], "student.mlp_units='active'"),
    (["--student.hidden_channels", "active"], "student.hidden_channels='active'"),
    (["--student.attention_heads", "active"], "student.attention_heads='active'"),
])
def test_student_path_refuses_the_settings_of_a_built_student(flags, key):
    """An existing student (student.path) is loaded as it is: the settings that shape a student built from the teacher
    do not apply to it and are refused in one line; they were ignored without a word (the run trained the loaded
    student unchanged while its config.yaml said e.g. hidden_size: 32, tie_embeddings: false)."""
    with pytest.raises(TailkdError, match=rf"^{re.escape(key)} shapes a student built from the teacher, but "
                                          r"student\.path='s' loads an existing one: drop "):
        parse(["--student", "s", *flags]).validate()
    # what does apply to a loaded student: freezing its embeddings; the defaults pass
    assert parse(["--student", "s", "--student.freeze_embeddings", "true"]).validate().student.path == "s"


@pytest.mark.parametrize("flags, message", [
    (["--student.experts", "most"], r"^student\.experts='most' must be first or used$"),
    (["--student.calibration_rows", "0"], r"^student\.calibration_rows=0 must be >= 1$"),
    (["--student.experts", "used"], r"^student\.experts=used keeps the experts the teacher uses, but "
                                    r"student\.mlp_init=random draws the student's experts afresh: add "
                                    r"--student\.mlp_init copy$"),
    (["--student.layer_choice", "influence", "--student.layers", "0", "2"],
     r"^student\.layer_choice=influence chooses the student's layers, and student\.layers lists them: drop one of "
     r"the two$"),
    (["--student.layer_choice", "deep"], r"^student\.layer_choice='deep' must be spaced or influence$"),
    (["--student.hidden_channels", "most"], r"^student\.hidden_channels='most' must be first or active$"),
    (["--student.attention_heads", "most"], r"^student\.attention_heads='most' must be first or active$"),
    (["--student.mlp_units", "active"], r"^student\.mlp_units=active keeps the MLP units the teacher uses most, but "
                                        r"student\.mlp_init=random draws the student's MLP afresh: add "
                                        r"--student\.mlp_init copy$"),
])
def test_bad_calibrated_student_choices_are_refused(flags, message):
    with pytest.raises(TailkdError, match=message):
        parse(flags).validate()
    ok = parse(["--student.experts", "used", "--student.mlp_init", "copy", "--student.calibration_rows", "1"])
    assert ok.validate().student.experts == "used"


def test_a_chained_recipe_stage_does_not_inherit_the_first_stages_build_settings(tmp_path):
    """A chained stage starts from the previous stage's final/: the build settings it inherits from `common` or --set
    (those of the first stage's student) are dropped, not refused; its own are refused like distill's."""
    from tailkd.recipe import read_recipe

    path = REPO / "configs" / "math-two-stage.yaml"
    recipe = read_recipe(path, str(tmp_path), {"student": {"num_layers": 8, "hidden_size": 256}})
    first, second = recipe.stages
    assert (first.student.path, first.student.num_layers, first.student.hidden_size) == (None, 8, 256)
    assert second.student.path == str(tmp_path / "domain" / "final")
    assert (second.student.num_layers, second.student.hidden_size) == (6, None)  # the defaults
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({"stages": [{"name": "a"}, {"name": "b", "student": {"hidden_size": 64}}]}))
    with pytest.raises(TailkdError, match=r"^recipe .*, stage 'b': student\.hidden_size=64 shapes a student built "
                                          r"from the teacher"):
        read_recipe(own, str(tmp_path / "own"))


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_flags_help_states_its_default_once_and_truly(cls):
    """Each flag's --help line gives its default once: the config's own value (``(default: 6)``), or the words of a
    help text that explains it (``default: the teacher's``). student.head_dim said both ("... default: the
    teacher's) (default: None; ...)"). A default that prints as nothing is said in words: loss.module's help ended
    in "(default: )"."""
    from tailkd.config import _leaves, leaf_value

    p = argparse.ArgumentParser()
    add_config_flags(p, cls)
    helps = {a.dest: a.help for a in p._actions}
    for dotted, _, f in _leaves(cls):
        text = helps[dotted]
        assert text.count("default:") == 1 and "(default: )" not in text, (dotted, text)
        if "default:" not in getattr(cls, "HELP", {}).get(dotted, f.metadata["help"]):
            assert f"(default: {leaf_value(cls(), dotted)}" in text, (dotted, text)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_a_commands_own_help_of_a_shared_leaf(cls):
    """A command whose reused section means something else there says so in --help (``cls.HELP``): select-data's
    data.seq_len is its scoring window, not distill's "tokens per training row" (the shared field's help,
    which it printed). Every HELP key is a leaf of the command's config, and its text replaces the field's."""
    from tailkd.config import _leaves

    p = argparse.ArgumentParser()
    add_config_flags(p, cls)
    helps = {a.dest: a.help for a in p._actions}
    own = getattr(cls, "HELP", {})
    assert set(own) <= {dotted for dotted, _, _ in _leaves(cls)}, set(own)
    for dotted, text in own.items():
        assert helps[dotted].startswith(text), (dotted, helps[dotted])
    if cls is COMMAND_CONFIGS["select-data"]:
        window = helps["data.seq_len"]
        assert window.startswith("tokens per scoring window") and "(default: 256)" in window
    if cls is DistillConfig:
        assert helps["data.seq_len"].startswith("tokens per training row")


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_flags_help_states_its_type(cls):
    """--help names each flag's type (INT, FLOAT, BOOL, TEXT, a list of them, or the choices), not the key again
    (``--lr TRAIN.LR``)."""
    import typing

    from tailkd.config import _leaves, _unwrap_optional

    p = argparse.ArgumentParser()
    add_config_flags(p, cls)
    actions = {a.dest: a for a in p._actions}
    names = {int: "INT", float: "FLOAT", bool: "BOOL", str: "TEXT"}
    for dotted, tp, f in _leaves(cls):
        base = _unwrap_optional(tp)[0]
        item = typing.get_args(base)[0] if typing.get_origin(base) is list else base
        want = "{" + ",".join(f.metadata["choices"]) + "}" if f.metadata.get("choices") else \
            f.metadata.get("positional") or ("NAME=VALUE" if typing.get_origin(base) is dict else names[item])
        assert actions[dotted].metavar == want, dotted
    text = p.format_help()
    if cls is DistillConfig:
        for flag in ("--lr FLOAT", "--k INT", "--train.adam_betas [FLOAT ...]", "--resume [BOOL]",
                     "--fused-loss {auto,on,off}", "--teacher TEXT"):
            assert flag in text, flag


def test_a_config_section_that_is_not_a_mapping_is_refused_under_flags_of_it(tmp_path):
    """A --config whose section is a scalar or a list (``train: 5``) is refused naming the section also where flags
    of that section are given (they replaced it: the file's value was dropped without a word); a null section is
    empty."""
    for text, argv, cls, section in (("train: 5\n", ["--steps", "3"], DistillConfig, "train"),
                                     ("loss: [kd]\n", ["--loss", "tad"], DistillConfig, "loss"),
                                     ("compare: 5\n", ["--out", str(tmp_path / "c")], COMMAND_CONFIGS["compare"],
                                      "compare")):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(TailkdError, match=rf"^config section {section} must be a mapping, got (int|list)"):
            parse(["--config", str(path), *argv], cls)
    path.write_text("train:\n")
    assert parse(["--config", str(path), "--steps", "3"]).train.max_steps == 3


@pytest.mark.parametrize("command, argv", [("eval", ["--student", "s"]), ("analyze-teacher", []),
                                           ("cache-teacher", ["--out", "c"]), ("lm-eval", ["--model", "m"]),
                                           ("select-data", ["--reference", "r"])])
def test_every_command_with_a_data_section_checks_its_settings_as_distill(command, argv, tmp_path, monkeypatch):
    """The built-in data sets' sizes (data.math_train, data.math_heldout >= 1; data.instruct_max_words >= 0, 0 keeping
    every pair as its help says: 0 was refused) are checked when the command's config is read, as distill does (they
    failed after the teacher loaded, naming n_train / n_heldout), and, where the command reads data.task, a built-in
    set the task cannot read (of the settings the command has: instruct_max_words and data.task are sft's, which
    cache-teacher, lm-eval and select-data do not read)."""
    monkeypatch.chdir(tmp_path)
    cls = COMMAND_CONFIGS[command]
    for key in {"data.math_train", "data.math_heldout"} - set(cls.OMIT):
        with pytest.raises(TailkdError, match=rf"^{re.escape(key)}=0 must be >= 1$"):
            parse([*argv, f"--{key}", "0"], cls)
    if "data.instruct_max_words" not in cls.OMIT:  # 0 keeps every pair, as its help and instructdata say
        assert parse([*argv, "--data.instruct_max_words", "0"], cls).data.instruct_max_words == 0
        with pytest.raises(TailkdError, match=r"^data\.instruct_max_words=-1 must be >= 0 \(0: all\)$"):
            parse([*argv, "--data.instruct_max_words", "-1"], cls)
    if "data.task" not in cls.OMIT:
        with pytest.raises(TailkdError, match=r"^data.paths builtin:instruct is prompt/response data"):
            parse([*argv, "--data", "builtin:instruct"], cls)
    else:  # lm-eval takes a run's data section as it is: an sft run's builtin:instruct (cache-teacher, select-data:
        parse([*argv, "--data", "builtin:instruct"], cls)  # no such path, said when the corpus is read)


# --------------------------------------------------------------------------- validate()'s checks, end by end


def test_the_open_and_closed_ends_of_a_float_range():
    """Each range's ends as its help and message say: a temperature of 0 (a division by zero) is refused, while
    train.min_lr_ratio 0 (decay to zero) and train.on_policy 1 (fully on-policy, GKD's λ = 1) are allowed; the
    skew losses' α stops short of 1 (α = 1 is the target itself, no skew)."""
    with pytest.raises(TailkdError, match=r"^loss\.temperature=0\.0 must be a finite number > 0 \(the paper uses 1\)$"):
        parse(["--temperature", "0"])
    assert parse(["--train.min_lr_ratio", "0"]).train.min_lr_ratio == 0.0
    assert parse(["--task", "sft", "--train.on_policy", "1"]).train.on_policy == 1.0
    with pytest.raises(TailkdError, match=r"^loss\.skew_alpha=1\.0 must be a finite number in \[0, 1\)$"):
        parse(["--loss", "skew_kl", "--loss.skew_alpha", "1"])


def test_an_integer_setting_holds_64_bits_both_ends():
    """An int leaf lies in [-2^63, 2^63) (a C long long, what torch and numpy read): both ends pass, one past
    either end is refused naming the key."""
    for value in (-2 ** 63, 2 ** 63 - 1):
        assert from_dict(DistillConfig, {"data": {"split_seed": value}}).data.split_seed == value
    for value in (-2 ** 63 - 1, 2 ** 63):
        with pytest.raises(TailkdError, match=rf"^config key data\.split_seed expects a 64-bit integer .*got {value}$"):
            from_dict(DistillConfig, {"data": {"split_seed": value}})


def test_a_layer_list_overrides_num_layers():
    """``student.layers`` decides the depth (the default num_layers 6 would otherwise conflict with a list of
    another length); without a list, num_layers does."""
    from tailkd.config import StudentConfig

    assert StudentConfig(layers=[0, 2]).depth is None
    assert StudentConfig(num_layers=3).depth == 3
    assert parse(["--student.layers", "0", "2"]).student.depth is None


def test_loss_config_check_names_the_knob_as_python_spells_it():
    """`LossConfig.check` (configs built in Python: `tailkd.registry.bind`) names the field without the ``loss.``
    of the CLI (the caller wrote ``LossConfig(temperature=0)``), and refuses k = 0 and k = True (a bool is an int
    to Python, not a number of tokens)."""
    from tailkd.config import LossConfig

    with pytest.raises(ValueError, match=r"^temperature=0\.0 must be a finite number > 0"):
        LossConfig(temperature=0.0).check()
    for k in (0, True, 2.0):
        with pytest.raises(ValueError, match=rf"^k={k!r} must be an integer >= 1"):
            LossConfig(k=k).check()
    assert LossConfig(k=1).check().k == 1


AT_LEAST = [("data.eval_rows", 1, ""), ("train.max_steps", 1, ""), ("train.batch_size", 1, ""),
            ("train.grad_accum", 1, ""), ("train.keep_last", 1, ""), ("train.log_every", 1, ""),
            ("train.max_bad_steps", 1, ""), ("train.ddp_timeout", 1, ""), ("train.warmup_steps", 0, ""),
            ("train.stop_after", 0, " (0: run to max_steps)"), ("train.eval_every", 0, " (0: only before and after)"),
            ("train.save_every", 0, " (0: only at the end)"), ("train.loss_chunk_size", 0, " (0: automatic)"),
            ("train.on_policy_max_new_tokens", 1, ""), ("train.activation_checkpointing", 0, " (0: off)")]


@pytest.mark.parametrize("key, low, hint", AT_LEAST, ids=[key for key, _, _ in AT_LEAST])
def test_every_count_setting_is_refused_below_its_least_value_and_taken_at_it(key, low, hint):
    """Each count of distill's config: ``low`` passes, ``low - 1`` is one line naming the key (a zero batch,
    accumulation, evaluation size or collective timeout failed after the models had loaded, or divided by zero)."""
    section, name = key.split(".")
    assert getattr(getattr(parse([f"--{key}", str(low)]), section), name) == low
    with pytest.raises(TailkdError, match=rf"^{re.escape(key)}={low - 1} must be >= {low}{re.escape(hint)}$"):
        parse([f"--{key}", str(low - 1)])


def test_the_flag_pairs_validate_refuses_and_the_ones_it_takes():
    """--force goes with --resume (refused alone, taken with it); per-document β needs the documents' EOS
    boundaries only in packed pretraining rows (sft rows are one example each); a loss without a teacher (clm)
    takes the default cosine weight 0."""
    with pytest.raises(TailkdError, match=r"^train\.force_resume \(--force\) only applies with --resume$"):
        parse(["--force"])
    assert parse(["--resume", "--force"]).train.force_resume
    with pytest.raises(TailkdError, match=r"^loss\.per_document needs the documents' boundaries"):
        parse(["--loss.per_document", "--data.doc_eos", "false"])
    assert parse(["--loss.per_document", "--data.doc_eos", "false", "--task", "sft"]).loss.per_document
    assert parse(["--loss", "clm"]).loss.cosine_weight == 0.0


@pytest.mark.parametrize("flags, why", [
    ([], "it samples responses to prompts: use --task sft"),
    (["--task", "sft", "--teacher.cache", "c"], "a teacher cache cannot score tokens the student generates"),
    (["--task", "sft", "--loss", "clm"], "loss.name=clm has no teacher to score the generated tokens"),
    (["--task", "sft", "--data.sft_mode", "pack"], "packed rows hold several prompts: use --data.sft_mode pad"),
    (["--task", "sft", "--train.parallel", "fsdp"], "FSDP's forward is a collective"),
])
def test_on_policy_is_refused_where_it_cannot_sample_or_score(flags, why):
    """Any λ > 0 (not only λ = 1) needs prompt/response rows, an online teacher, a loss with a teacher, one example
    per row and DDP; each lack is one line naming it, before any model loads. λ = 0.5 with all of them passes."""
    with pytest.raises(TailkdError, match=rf"^train\.on_policy=0\.5 cannot be used here: {re.escape(why)}"):
        parse([*flags, "--train.on_policy", "0.5"])
    assert parse(["--task", "sft", "--train.on_policy", "0.5"]).train.on_policy == 0.5


def test_device_names():
    """auto, cpu, cuda and cuda:N are device names (whether the GPU is there is checked at run time); anything
    else, cuda with a non-number index included, is refused naming the key."""
    from tailkd.config import check_device_name

    for name in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        check_device_name("train.device", name)
    assert parse(["--device", "cuda:1"]).train.device == "cuda:1"
    for name in ("tpu", "cuda:", "cuda:x", "cudax1", "cuda1"):
        with pytest.raises(TailkdError, match=rf"^train\.device={re.escape(repr(name))} is not a device"):
            check_device_name("train.device", name)


def test_a_falsy_section_under_flags_of_it_is_refused_too(tmp_path):
    """``train: 0``, ``train: []`` or ``train: ''`` in a --config under --steps is no mapping either: refused
    naming the section, as ``train: 5`` is (only null is an empty section)."""
    path = tmp_path / "c.yaml"
    for text, kind in (("train: 0\n", "int"), ("train: []\n", "list"), ("train: ''\n", "str")):
        path.write_text(text)
        with pytest.raises(TailkdError, match=rf"^config section train must be a mapping, got {kind}$"):
            parse(["--config", str(path), "--steps", "3"])


def test_an_empty_config_file_is_the_defaults(tmp_path):
    """A --config with no document (empty, or comments only) is no settings: the defaults, not 'must hold a
    mapping'."""
    path = tmp_path / "c.yaml"
    for text in ("", "# nothing yet\n"):
        path.write_text(text)
        assert parse(["--config", str(path)]) == parse([])


def test_set_needs_a_section_and_a_key():
    """recipe --set names a leaf as section.key: a bare key (``max_steps=3``) is refused with the form and an
    example, not read as a section of its own."""
    from tailkd.config import parse_assignment

    for text in ("max_steps=3", ".max_steps=3", "train.=3", "train.max_steps"):
        with pytest.raises(TailkdError, match=r"must look like section\.key=value, e\.g\. train\.max_steps=400$"):
            parse_assignment(text)
    assert parse_assignment("train.max_steps=3") == {"train": {"max_steps": 3}}


# The counts of the other subcommands (tailkd.command_config): (command, key, least value, hint of the message).
COMMAND_AT_LEAST = [
    ("eval", "data.seq_len", 2, " (a row needs a token and its successor)"), ("eval", "eval.batch_size", 1, ""),
    ("eval", "eval.bins", 1, ""), ("eval", "generate.max_new_tokens", 1, ""), ("eval", "eval.max_rows", 0, " (0: all)"),
    ("eval", "generate.samples", 0, ""), ("eval", "generate.limit", 0, " (0: all)"),
    ("analyze-teacher", "data.seq_len", 2, " (a row needs a token and its successor)"),
    ("analyze-teacher", "analyze.batch_size", 1, ""), ("analyze-teacher", "analyze.max_rows", 0, " (0: all)"),
    ("analyze-teacher", "analyze.kmax", 1, " (the paper uses 100)"),
    ("cache-teacher", "data.seq_len", 1, ""), ("cache-teacher", "cache.k", 1, ""),
    ("cache-teacher", "cache.batch_size", 1, ""), ("cache-teacher", "cache.rows_per_shard", 1, ""),
    ("cache-teacher", "cache.ddp_timeout", 1, ""), ("cache-teacher", "cache.tail_samples", 0, " (0: none)"),
    ("cache-teacher", "cache.max_rows", 0, " (0: all)"),
    ("lm-eval", "lm_eval.max_gen_toks", 1, ""), ("lm-eval", "lm_eval.batch_size", 1, ""),
    ("lm-eval", "lm_eval.num_fewshot", 0, ""),
    ("flops", "flops.seq_len", 1, ""), ("flops", "flops.gen_len", 1, ""), ("flops", "flops.vocab", 1, ""),
    ("flops", "flops.hidden", 1, ""), ("flops", "flops.student_hidden", 1, ""), ("flops", "flops.prompt_len", 0, ""),
    ("flops", "flops.ppo_epochs", 0, ""), ("flops", "flops.teacher_layers", 0, ""),
    ("flops", "flops.student_layers", 0, ""),
    ("select-data", "data.seq_len", 1, ""), ("select-data", "select.batch_size", 1, ""),
    ("select-data", "select.max_docs", 0, " (0: all)"),
    ("reproduce", "reproduce.eval_rows", 0, " (0: all)"), ("reproduce", "train.max_steps", 1, ""),
    ("reproduce", "train.eval_every", 0, " (0: only before and after)")]


@pytest.mark.parametrize("command, key, low, hint", COMMAND_AT_LEAST,
                         ids=[f"{command}-{key}" for command, key, _, _ in COMMAND_AT_LEAST])
def test_every_count_of_a_subcommand_is_refused_below_its_least_value_and_taken_at_it(tmp_path, command, key, low,
                                                                                      hint):
    """As distill's counts: ``low`` passes (0 is "all" or "none" where the help says so, select-data scores windows
    of one token with the previous window's last as context), ``low - 1`` is one line naming the key, when the
    config is read: before any model loads."""
    cls = COMMAND_CONFIGS[command]
    required = {"eval": ["--student", str(tmp_path), "--out", str(tmp_path / "e.json")],
                "cache-teacher": ["--out", str(tmp_path / "c")],
                "lm-eval": ["--model", str(tmp_path), "--out", str(tmp_path / "l.json")],
                "flops": ["--teacher", "t", "--student", "s"], "select-data": ["--reference", "r"],
                "analyze-teacher": ["--out", str(tmp_path / "a")], "reproduce": ["--out", str(tmp_path / "r")]}
    argv = required[command]
    section, name = key.split(".")
    assert getattr(getattr(parse([*argv, f"--{key}", str(low)], cls), section), name) == low
    with pytest.raises(TailkdError, match=rf"^{re.escape(key)}={low - 1} must be >= {low}{re.escape(hint)}$"):
        parse([*argv, f"--{key}", str(low - 1)], cls)


def test_analyze_teacher_without_a_teacher_is_refused(tmp_path):
    """``--teacher`` with no spec (an empty list, as YAML's ``teachers: []``) names nothing to analyse: refused when
    the config is read, by the check for no teacher (an empty list is not None)."""
    from tailkd.command_config import AnalyzeTeacherConfig

    for argv in (["--teacher"], ["--analyze.teachers"]):
        with pytest.raises(TailkdError, match=r"^no teacher given; pass --teacher SPEC"):
            parse([*argv, "--out", str(tmp_path / "a")], AnalyzeTeacherConfig)


def test_a_run_config_that_is_not_a_mapping_gives_no_defaults(tmp_path):
    """RUN/config.yaml holding a list or a scalar is no run's config: eval and lm-eval take none of its settings
    (read as one, a list would be 'AttributeError: 'list' object has no attribute 'get'', exit 1)."""
    from tailkd.command_config import EvalConfig, LmEvalConfig, read_run_config

    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    for text in ("- a\n- b\n", "just words\n"):
        (tmp_path / "run" / "config.yaml").write_text(text)
        assert read_run_config(final) == ({}, tmp_path / "run" / "config.yaml")
        assert parse(["--student", str(final)], EvalConfig).data.paths == []
        assert parse(["--model", str(final)], LmEvalConfig).data.paths == []


def test_reproduce_scale_refuses_a_product_of_2_to_the_63(tmp_path):
    """`ReproduceConfig.scaled_steps`: a run length must be below 2^63 (a setting's int64); exactly 2^63 (2^62 steps
    × 2, a float with no rounding error) is refused when the config is read (validate), not first while planning the
    runs; one step less is taken."""
    reproduce = COMMAND_CONFIGS["reproduce"]
    out = ["--out", str(tmp_path / "r"), "--train.eval_every", "0"]
    with pytest.raises(TailkdError, match=r"^reproduce\.scale=2 makes train\.max_steps 4611686018427387904 × 2 = "
                                          r"9\.22e\+18, more than a setting may hold \(2\^63\)"):
        parse([*out, "--steps", str(2 ** 62), "--scale", "2"], reproduce)
    assert parse([*out, "--steps", str(2 ** 61), "--scale", "2"], reproduce).scaled_steps() == (2 ** 62, 0)


def test_eval_generate_needs_rouge_score_only_to_score_rouge(tmp_path, monkeypatch):
    """--generate scores ROUGE-L (generate.rouge, true by default) with the rouge-score package: without it the config
    is refused before any model loads, unless --generate.rouge false (exact match and diversity need no package);
    without --generate nothing needs it."""
    import sys

    from tailkd.command_config import EvalConfig

    monkeypatch.setitem(sys.modules, "rouge_score", None)  # as if not installed
    argv = ["--student", str(tmp_path), "--out", str(tmp_path / "g.json")]
    with pytest.raises(TailkdError, match=r"^eval --generate scores ROUGE-L with the rouge-score package, which is "
                                          r"not installed: pip install rouge-score"):
        parse([*argv, "--generate"], EvalConfig)
    assert not parse([*argv, "--generate", "--generate.rouge", "false"], EvalConfig).generate.rouge
    assert not parse(argv, EvalConfig).generate.enabled


def test_a_teacher_cache_folder_with_its_shards_is_taken_as_the_cache_out(tmp_path):
    """cache-teacher --out: a folder holding a cache (cache.json beside its shards) is resumed, so taken; one holding
    other files and no cache.json is refused (tests/test_cache.py), an empty one or one holding only a killed
    writer's temporary files is a cache still to be written."""
    from tailkd.command_config import CacheTeacherConfig

    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("cache.json", "shard_000000.safetensors", ".tmp-shard_000001.safetensors-1"):
        (cache / name).write_text("")
    assert parse(["--out", str(cache)], CacheTeacherConfig).cache.out == str(cache)
    (cache / "cache.json").unlink()
    with pytest.raises(TailkdError, match=rf"^{re.escape(str(cache))} exists and is not a teacher cache; choose a new "
                                          r"or empty --out$"):
        parse(["--out", str(cache)], CacheTeacherConfig)
    (cache / "shard_000000.safetensors").unlink()
    assert parse(["--out", str(cache)], CacheTeacherConfig).cache.out == str(cache)


def test_lm_eval_writes_its_tasks_in_a_temporary_folder_unless_told(tmp_path, monkeypatch):
    """`LmEvalOptions.task_folder`: --work-dir, else --write-only's ./lm_eval_tasks, else None (a temporary folder):
    without --write-only a file named lm_eval_tasks in the working directory is no concern of lm-eval's."""
    from tailkd.command_config import LmEvalConfig, LmEvalOptions

    assert [LmEvalOptions(work_dir=w, write_only=o).task_folder() for w, o in (
        ("w", False), ("w", True), (None, True), (None, False))] == ["w", "w", "lm_eval_tasks", None]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lm_eval_tasks").write_text("mine")
    assert parse(["--model", "m"], LmEvalConfig).lm_eval.task_folder() is None


def test_lm_eval_settings_default_to_the_models_run(tmp_path):
    """lm-eval's data settings not given are those of RUN/config.yaml (tailkd_ppl then scores that run's held-out
    documents); flags win; its teacher section is not lm-eval's."""
    from tailkd.command_config import LmEvalConfig

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    rc = DistillConfig()
    rc.teacher.path, rc.data.paths, rc.data.heldout_fraction, rc.data.doc_sep = "t", ["a.txt"], 0.2, "line"
    save_yaml(rc, run / "config.yaml")
    cfg = parse(["--model", str(run / "final")], LmEvalConfig)
    assert (cfg.data.paths, cfg.data.heldout_fraction, cfg.data.doc_sep) == (["a.txt"], 0.2, "line")
    cfg = parse(["--model", str(run / "final"), "--data", "b.txt"], LmEvalConfig)
    assert (cfg.data.paths, cfg.data.heldout_fraction) == (["b.txt"], 0.2)


def test_compare_out_of_other_files_is_refused_when_the_config_is_read(tmp_path):
    """compare --out replaces its folder whole: a folder of other files (one of the runs compared) is refused by
    CompareConfig.validate, so a recipe's compare: says so before any of its stages trains; an earlier compare output
    (compare.json) or an empty folder is taken."""
    from tailkd.command_config import CompareConfig

    out = tmp_path / "cmp"
    out.mkdir()
    assert parse(["--out", str(out)], CompareConfig).compare.out == str(out)
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(TailkdError, match=rf"^refusing to replace {re.escape(str(out))}: it exists and is not a "
                                          r"tailkd compare output"):
        parse(["--out", str(out)], CompareConfig)
    (out / "compare.json").write_text("{}")
    assert parse(["--out", str(out)], CompareConfig).compare.out == str(out)


def test_flops_from_sizes_needs_the_vocabulary_and_the_hidden_size(tmp_path):
    """A model given by its parameter count (--teacher-params / --student-params) has its embedding from --vocab and
    --hidden: either missing is refused, naming both, when the config is read."""
    from tailkd.command_config import FlopsConfig

    sizes = ["--teacher-params", "1e9", "--student", "s"]
    for given in (["--vocab", "9"], ["--hidden", "4"], []):
        with pytest.raises(TailkdError, match=r"^--teacher-params needs --vocab and --hidden"):
            parse([*sizes, *given], FlopsConfig)
    assert parse([*sizes, "--vocab", "9", "--hidden", "4"], FlopsConfig).flops.hidden == 4


def test_a_config_built_in_python_is_read_as_yaml_reads_it():
    """`distill(cfg)` with a DistillConfig built in Python: a string where a list of paths goes is that one path (as
    in YAML; it was read character by character, '/' first: the whole file system listed), a Path a string, an int
    where a float goes a float, a range or tuple where a list goes its items, a numpy scalar its number, and a value
    of another type one line naming the key (a string seq_len was a raw TypeError)."""
    from pathlib import Path

    import numpy as np

    from tailkd.config import DistillConfig

    cfg = DistillConfig()
    cfg.data.paths, cfg.data.heldout_paths, cfg.train.lr = "/some/corpus.jsonl", Path("/some/dev.txt"), 1
    cfg.student.layers, cfg.train.adam_betas, cfg.train.max_steps = range(0, 4, 2), (0.9, 0.99), np.int64(7)
    cfg.validate()
    assert cfg.data.paths == ["/some/corpus.jsonl"] and cfg.data.heldout_paths == ["/some/dev.txt"]
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.student.layers == [0, 2] and cfg.train.adam_betas == [0.9, 0.99]  # a range, a tuple: their items
    assert cfg.train.max_steps == 7 and type(cfg.train.max_steps) is int  # a numpy scalar: its number
    for section, key, value, want in (("data", "seq_len", "64", "an integer"), ("train", "lr", "1e-4", "a number"),
                                      ("train", "resume", "yes", "true/false"), ("loss", "name", 3, "a string")):
        cfg = DistillConfig()
        setattr(getattr(cfg, section), key, value)
        with pytest.raises(TailkdError, match=rf"^config key {section}\.{key} expects {re.escape(want)}, got "):
            cfg.validate()
