"""A multimodal teacher's text part: what of a multimodal checkpoint tailkd teaches with and builds students from.

Two routes, by what transformers offers. Where AutoModelForCausalLM does not take a multimodal checkpoint but its text
part is a causal LM's that transformers loads from that checkpoint (Apertus 1.5), `text_part` gives the text config
`tailkd.models` loads the text model by. Where AutoModelForCausalLM loads the whole multimodal model
(`MULTIMODAL_TEACHERS`: Gemma 3's, Gemma 4's ...ForConditionalGeneration), `text_teacher` gives the text-only causal
LM sharing its language model and LM head, which alone compute the logits of text, and which `tailkd.student` builds
a student from.
"""

from __future__ import annotations

import copy

from tailkd.errors import TailkdError
from tailkd.head import model_class_name

__all__ = ["MULTIMODAL_TEACHERS", "text_part", "text_teacher"]


def text_part(config):
    """The text config of a multimodal ``config`` where AutoModelForCausalLM does not take the whole (Apertus 1.5's)
    and the text part is a causal LM's, else None; transformers loads that text model from the multimodal
    checkpoint where it converts the checkpoint's names on load (`_load_hf_dir` refuses it otherwise)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not hasattr(config, "get_text_config"):
        return None
    text = config.get_text_config()
    return text if text is not config and text.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else None


# multimodal teachers whose text part (a language model and the LM head, which alone compute the logits of text, as
# tested bit for bit) builds a student, by class name: the causal LM class transformers maps their text config to
MULTIMODAL_TEACHERS = ("Gemma3ForConditionalGeneration", "Gemma4ForConditionalGeneration",
                       "Gemma4UnifiedForConditionalGeneration")


def text_teacher(teacher):
    """The text-only causal LM inside a multimodal teacher of `MULTIMODAL_TEACHERS` (Gemma 3's, Gemma 4's and Gemma 4
    unified's ...ForConditionalGeneration: their language model and LM head, which alone compute the logits of text): a
    model of that class sharing the teacher's modules (nothing copied; a skeleton's too: `tailkd.sharded_teacher`),
    its generation config the teacher's; the teacher itself for any other class.
    Calibrated choices over such a teacher sharded with FSDP2 are refused in one line: its own forward must run, and
    the measures read its text part's layers."""
    from torch.distributed.fsdp import FSDPModule
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_class_name(teacher) not in MULTIMODAL_TEACHERS:
        return teacher
    text = teacher.config.get_text_config()
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text.model_type]
    if isinstance(teacher, FSDPModule):
        raise TailkdError(f"a student of {model_class_name(teacher)}'s text part ({name}) is measured over its text "
                          "layers, which a teacher sharded with FSDP2 runs only within its own forward: use "
                          "--teacher.parallel replicate for calibrated choices (or spaced layers and first widths)")
    import torch
    import transformers

    with torch.device("meta"):
        view = getattr(transformers, name)(text)
    setattr(view, view.base_model_prefix, teacher.get_decoder())
    view.set_output_embeddings(teacher.get_output_embeddings())
    own = {id(t) for t in (*teacher.parameters(), *teacher.buffers())}
    if any(id(t) not in own for t in (*view.parameters(), *view.buffers())):  # a bug, not a user error
        raise RuntimeError(f"{name} holds more than {model_class_name(teacher)}'s language model and LM head")
    view.generation_config = copy.deepcopy(teacher.generation_config)
    return view.train(teacher.training)
