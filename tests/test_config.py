"""Config: YAML mirrors the dataclasses, flags override YAML, unknown keys and wrong types are errors."""

import argparse
import math
from pathlib import Path

import pytest
import yaml

from tailkd.config import DistillConfig, add_config_flags, config_from_args, from_dict, save_yaml, to_dict
from tailkd.errors import TailkdError

REPO = Path(__file__).resolve().parents[1]


def parse(argv):
    p = argparse.ArgumentParser()
    add_config_flags(p)
    return config_from_args(p.parse_args(argv))


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
        ({"teacher": {"cache": "c"}, "data": {"task": "sft"}}, "drop --teacher.cache"),
        ({"train": {"fused_loss": "yes"}}, "train.fused_loss='yes' must be auto, on or off"),
        ({"train": {"loss_chunk_size": -1}}, "train.loss_chunk_size=-1 must be >= 0"),
    ],
)
def test_bad_yaml_is_one_clear_error(tmp_path, doc, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(TailkdError, match=match):
        parse(["--config", str(path)])


def test_garbled_yaml_and_missing_file(tmp_path):
    path = tmp_path / "garbled.yaml"
    path.write_text("loss: {name: tad\n  k: [")
    with pytest.raises(TailkdError, match="not valid YAML"):
        parse(["--config", str(path)])
    with pytest.raises(TailkdError, match="does not exist"):
        parse(["--config", str(tmp_path / "nope.yaml")])


def test_shipped_configs_load():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files, "configs/ should ship example recipes"
    for f in files:
        doc = yaml.safe_load(f.read_text()) or {}
        if "stages" in doc:  # a multi-stage recipe
            from tailkd.recipe import load_recipe

            stages = load_recipe(f)
            assert len(stages) == len(doc["stages"])
            assert stages[1].student.path == str(Path(stages[0].train.out_dir) / "final")
            continue
        cfg = from_dict(DistillConfig, doc).validate()
        assert to_dict(cfg)


def _float_fields(cls=DistillConfig, prefix=""):
    import dataclasses
    import typing

    from tailkd.config import _unwrap_optional

    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(typing.get_type_hints(cls)[f.name])[0]
        if dataclasses.is_dataclass(tp):
            yield from _float_fields(tp, prefix + f.name + ".")
        elif tp is float or tp == list[float]:
            yield prefix + f.name


def test_every_float_field_has_a_range():
    from tailkd.config import FLOAT_RANGES

    assert sorted(_float_fields()) == sorted(FLOAT_RANGES)


@pytest.mark.parametrize("key", sorted(_float_fields()))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_rejects_nan_and_infinities(key, bad):
    """Each float field (each item of a list field) refuses NaN and ±inf with one message naming the key."""
    section, name = key.split(".")
    default = getattr(getattr(DistillConfig(), section), name)
    value = [default[0], bad] if isinstance(default, list) else bad
    with pytest.raises(TailkdError, match=rf"^{key}=.*{bad}.* must be a finite number"):
        from_dict(DistillConfig, {section: {name: value}}).validate()


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
