"""The student's dropout switched off (``train.disable_dropout``, TRL's ``disable_dropout``) and its config's values
kept for the student saved: `disable_dropout`, `saved_dropouts`."""

from __future__ import annotations

import contextlib
import re

import torch

# config keys / float attributes that hold a dropout probability (OPT's layerdrop skips whole layers in training)
DROPOUT_KEY = re.compile(r"dropout|pdrop|layerdrop", re.I)


def config_dropouts(config) -> list[tuple[object, str, float]]:
    """``(config, key, value)`` of every nonzero dropout probability of a model config and of its sub-configs
    (a multimodal one's ``text_config``): float keys naming dropout or pdrop (``attention_dropout``,
    ``hidden_dropout``, GPT-2's ``resid_pdrop``, ...)."""
    out = []
    for key, value in vars(config).items():
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config
            out += config_dropouts(value)
        elif DROPOUT_KEY.search(key) and isinstance(value, float) and value > 0:
            out.append((config, key, value))
    return out


def disable_dropout(student, log=print) -> list:
    """``--train.disable_dropout`` (TRL's ``disable_dropout``): the student trains without dropout, in place — every
    dropout layer's p, every float dropout probability a module keeps (HF attention keeps ``attention_dropout`` as a
    number, no layer; OPT's ``layerdrop``) and every one of its config, which some modules read as they run (GPT-Neo,
    Persimmon, Falcon), set to 0. ``log`` gets the run log's line; returns the config's original values:
    `saved_dropouts` puts them back while the student is saved, so its config.json is the one it was built or loaded
    with."""
    originals = config_dropouts(student.config)
    for config, key, _ in originals:
        object.__setattr__(config, key, 0.0)  # past strict type checks: transformers types MPT's attn_pdrop as int
    layers = attrs = 0
    for module in student.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p, layers = 0.0, layers + 1
        for key, value in list(vars(module).items()):
            if DROPOUT_KEY.search(key) and isinstance(value, float) and value > 0:
                setattr(module, key, 0.0)
                attrs += 1
    log(f"dropout off (train.disable_dropout): {layers} dropout layer(s), {attrs} float dropout attribute(s) and "
        f"{len(originals)} config value(s) of the student set to 0 (its saved config keeps them)")
    return originals


@contextlib.contextmanager
def saved_dropouts(originals: list):
    """Within: the config values `disable_dropout` zeroed hold their originals again (the student being saved)."""
    for config, key, value in originals:
        object.__setattr__(config, key, value)
    try:
        yield
    finally:
        for config, key, _ in originals:
            object.__setattr__(config, key, 0.0)
