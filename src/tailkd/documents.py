"""Packed rows whose documents attend to themselves alone (``data.document_attention``).

A packed row holds several documents, marked by its ``segment_ids``: pretraining text split after each EOS, or SFT
examples with ``data.sft_mode pack``. By default a document attends to the earlier documents of its row too (the
usual packing approximation). With ``data.document_attention`` the rows also carry ``position_ids`` that restart
at 0 at every document (`tailkd.data.document_positions`), and every forward over rows passes them
(`tailkd.data.model_inputs`) without an attention mask and without a cache: transformers then masks attention
block-diagonally (its packed-sequence detection: a position that is not its predecessor's + 1 starts a sequence;
sdpa and eager attention, tailkd's, take a block-diagonal mask), so each document is computed as if it were alone
in its row, at positions 0, 1, ... — TRL's ``padding_free``, axolotl's sample packing. A document cut by a row
boundary goes on at position 0 in the next row. SFT rows of ``sft_mode pad`` hold one example each (the setting is
refused with them: `tailkd.config.check_data`). `check_document_attention`
checks a run's models (and refuses a student's router term on packed SFT rows, whose padding mask would turn the
packed-sequence masking off); ``cache.json`` of a teacher cache keeps the setting (`tailkd.cache`).

`check_model` runs once per model before it reads such rows: a model whose forward carries information from one
document to the next anyway (a recurrent or convolution layer: Mamba, the hybrids; a forward that ignores
``position_ids``), or reads positions other than the restarted ones (learned absolute positions, Llama 4's attention
temperature), is refused.
"""

from __future__ import annotations

import torch

from tailkd.errors import TailkdError

PROBE_TOKENS = 8  # tokens of the probe's second document (`check_model`)
# the run log's words (the attention line of tailkd distill; eval and analyze-teacher print them)
DOCUMENTS_APART = "packed documents kept apart (data.document_attention: position ids restart at each document)"


def leak_bound(dtype: torch.dtype) -> float:
    """`check_model`'s bound on a difference of the second document's outputs, relative to their root mean square:
    1024 units of ``dtype``'s last place (float32: 1.2e-4), at most 2^-4 (16 bf16 ulps of an rms-sized value). Far
    above the rounding of another grouping or shape: at most 1.1e-5 in float32 over every family that keeps documents
    apart (a mixture's experts batch the tokens routed to them; the document alone is a shorter forward); far below
    the leaks of float32 models that do not, freshly initialised: 2.5e-3 (LFM2) to 3.5 (Mamba). In bf16 (a teacher)
    a leak under 2^-4 passes: the float32 student of the same architecture is the tight check."""
    return min(2.0 ** -4, 1024 * torch.finfo(dtype).eps)


def restarts_positions(data) -> bool:
    """Whether rows of the data section ``data`` carry position ids restarting at each document: with
    ``document_attention``, packed text (task pretrain) and SFT rows of ``sft_mode pack`` (a pad row holds one
    example)."""
    return bool(data.document_attention) and (data.task != "sft" or data.sft_mode == "pack")


def check_models(data, **models) -> bool:
    """`check_model` of each of ``models`` (name=model; None skipped; rows of ``data.seq_len``) where the rows of the
    data section ``data`` keep their documents apart (`restarts_positions`); nothing otherwise. Returns whether they
    do (the commands then say so: `DOCUMENTS_APART`)."""
    if not restarts_positions(data):
        return False
    for name, model in models.items():
        if model is not None:
            check_model(model, name, seq_len=data.seq_len)
    return True


@torch.no_grad()
def check_model(model, name: str, seq_len: int = 2 * PROBE_TOKENS) -> None:
    """A one-line TailkdError unless ``model`` keeps the documents of a packed row apart given their position ids.

    Two rows of ``seq_len`` tokens (at least 2 x `PROBE_TOKENS`) that share their second document (its last
    `PROBE_TOKENS`) and differ in their first (random ids; positions 0.. in each) go through the model's final hidden
    states one at a time, in eval mode, and the second document alone: where the model keeps documents apart the
    second document's outputs are the same in all three up to rounding (bit-equal on the same shapes; other shapes,
    and a mixture of experts that groups the tokens routed to an expert by their count, round otherwise). A
    difference above `leak_bound` of their root mean square between the two rows is information from the first
    document (a recurrent state, a convolution window, a forward that drops ``position_ids``); from the document
    alone, a layer that reads positions other than the restarted ones (learned absolute positions, Llama 4's
    attention temperature past its floor_scale: the second document sits where a run's row ends; DSA's indexer).
    ``name``: "teacher" / "student", for the message."""
    from tailkd.head import final_hidden

    n = PROBE_TOKENS
    m = max(n, seq_len - n)  # the first document's length
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    firsts, second = torch.randint(0, vocab, (2, m), generator=gen), torch.randint(0, vocab, (n,), generator=gen)
    positions = torch.cat([torch.arange(m), torch.arange(n)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        outs = [final_hidden(model, torch.cat([first, second])[None].to(device), position_ids=positions)[0, m:]
                for first in firsts]
        alone = final_hidden(model, second[None].to(device))[0].double()
    finally:
        model.train(was_training)
    bound = leak_bound(outs[0].dtype)
    a, b = outs[0].double(), outs[1].double()
    rms = a.square().mean().sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    leak, moved = float((a - b).abs().max() / rms), float((a - alone).abs().max() / rms)
    if max(leak, moved) <= bound:
        return
    kind = type(getattr(model, "module", model)).__name__
    why = (f"a document's outputs still depend on the document before it ({leak:.2g} of their root mean square: a "
           "recurrent or convolution layer, or a forward that ignores position_ids)" if leak > bound else
           f"a document's outputs are not those of the document alone ({moved:.2g} of their root mean square: "
           "positions that do not restart, or a layer that reads the row's own positions)")
    raise TailkdError(f"the {name} ({kind}) does not keep the documents of a packed row apart: with their position "
                      f"ids restarting, {why}; drop --data.document_attention")


def check_document_attention(cfg, student, teacher=None) -> None:
    """Where the run's rows keep their documents apart (``data.document_attention``, `restarts_positions`): a
    TailkdError unless the student and the online ``teacher`` (None: a cache, or no teacher) do
    (`check_model`: two forwards of one row each and one of 8 tokens, collectives for a sharded teacher), and
    unless the student's router term leaves transformers' packed-sequence masking on: that term passes the padding's
    attention mask (`tailkd.objective._padding_mask`), and with a mask transformers does not read the documents
    from the position ids."""
    from tailkd.objective import router_weight

    if not restarts_positions(cfg.data):
        return
    if router_weight(student) and cfg.data.task == "sft":
        raise TailkdError("data.document_attention cannot keep packed SFT examples apart for a student trained with "
                          "its router load-balancing loss (its config sets output_router_logits): that term's "
                          "attention mask over the padding turns transformers' packed-sequence masking off; use "
                          "--data.sft_mode pad without --data.document_attention, or output_router_logits false in "
                          "the student's config.json")
    check_models(cfg.data, student=student, teacher=teacher)
