"""Teacher and student vocabularies: one shared token → id map, or a teacher vocabulary that extends the student's.

Distillation compares two distributions over the same token ids. Two cases are accepted:

- **same**: one token → id map and the same special tokens (a student built from its teacher, or trained with the
  teacher's tokenizer). V = max id + 1; LM heads padded beyond V (151936 vs 152064) are sliced to ``[..., :V]``.
- **extends** (shared-vocabulary distillation, the TAD paper's §3.3: Phi-3 over Llama-2): every student token has
  the same id in the teacher's vocabulary, and the teacher's extra tokens all come after the student's ids. The
  data is tokenised with the student's tokenizer, and distillation runs over the student's V_S ids with the
  teacher renormalised over them: every code path slices the teacher's logits to ``[..., :V_S]`` before its
  softmax, so the teacher's distribution becomes p_i / Σ_{j < V_S} p_j — exactly the teacher conditioned on the
  shared ids. The mass the teacher puts outside them (`outside_mass`) is measured at the start of a run over the
  rows of its initial held-out evaluation, logged and recorded in its summary.json
  (`tailkd.prepare.shared_vocab_summary`). A teacher cache does not combine with it: ``tailkd cache-teacher``
  tokenises with the teacher's tokenizer and stores probabilities over all the teacher's ids, so such a run is
  refused up front (`tailkd.prepare.check_cache_vocab`) and distils from the online teacher.

Any other difference (another id for a shared token, a student token the teacher lacks, extra teacher tokens in
between, other special tokens) is refused with one line naming the first difference: the first student token whose
teacher id differs, else the first extra teacher token among the student's ids, else the special tokens.

**A pruned LM head** scores a prefix of its tokenizer's ids only: Apertus 1.5 drops the rows of its multimodal
tokens from its output projection (its config's ``output_vocab_size`` below ``vocab_size``; `head_ids`), its input
embeddings keeping them all. Distillation then runs over the ids both heads score, V = the smaller of each model's
`scored_vocab`, every path slicing logits to ``[..., :V]`` as above; a teacher scoring more ids than V is
renormalised over them as an extending one is. A label at or above V has no score: the rows are checked
(`check_labels`; text tokenised as text holds no multimodal token) and such a label refused in one line.
"""

from __future__ import annotations

import hashlib
import json

import torch

from tailkd.data import max_label
from tailkd.errors import TailkdError

__all__ = ["check_labels", "check_own_vocab", "check_rows", "check_vocab", "head_ids", "outside_mass",
           "real_vocab_size", "relation", "scored_vocab", "tokenizer_fingerprint"]


def real_vocab_size(tokenizer) -> int:
    """Number of token ids the tokenizer can emit: max id + 1 (== len(tokenizer) without id gaps)."""
    return max(max(tokenizer.get_vocab().values()) + 1, len(tokenizer))


def head_ids(config) -> int | None:
    """n where the config declares its LM head pruned to the ids 0..n-1 of its vocabulary (``output_vocab_size`` below
    ``vocab_size``: Apertus 1.5, whose retained output ids equal their token ids), else None (a head over the whole
    vocabulary, padded or not). A multimodal config is read by its text part."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n, whole = getattr(text, "output_vocab_size", None), getattr(text, "vocab_size", None)
    return int(n) if n is not None and whole is not None and n < whole else None


def scored_vocab(tokenizer, model) -> int:
    """The ids ``model`` scores of its ``tokenizer``'s: `real_vocab_size`, or fewer where its head is pruned
    (`head_ids`)."""
    pruned = head_ids(model.config)
    return real_vocab_size(tokenizer) if pruned is None else min(real_vocab_size(tokenizer), pruned)


def _special_tokens(tokenizer) -> dict:
    named = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    named = {name: str(tok) for name, tok in named.items() if tok is not None}
    return {"named": named, "all": sorted(str(t) for t in tokenizer.all_special_tokens)}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token → id, sorted) and the special tokens (bos/eos/unk/pad and the rest)."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items()), "special": _special_tokens(tokenizer)}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def _difference(teacher, student) -> str:
    """The first difference of two tokenizers that `relation` refuses, in words: the first student token (by id)
    whose teacher id differs, else the first teacher token the student lacks with an id below the student's vocabulary
    size, else the special tokens (every student token then has its id in the teacher's vocabulary, and the teacher
    has no token the student lacks: with one, all after the student's ids, `relation` found an extension)."""
    vt, vs = teacher.get_vocab(), student.get_vocab()
    for token, idx in sorted(vs.items(), key=lambda kv: kv[1]):
        if token not in vt:
            return f"the student's token {token!r} (id {idx}) is not in the teacher's vocabulary"
        if vt[token] != idx:
            return f"the student's token {token!r} has id {idx}, the teacher's id {vt[token]}"
    n_s = real_vocab_size(student)
    inside = sorted((idx, token) for token, idx in vt.items() if token not in vs and idx < n_s)
    if inside:
        idx, token = inside[0]
        return (f"the teacher's token {token!r} has id {idx}, which the student lacks, among the student's ids "
                f"0..{n_s - 1}")
    return f"special tokens {_special_tokens(teacher)} vs {_special_tokens(student)}"


def relation(teacher_tokenizer, student_tokenizer) -> str:
    """"same", "extends" (see the module docstring), or TailkdError naming the first difference."""
    if tokenizer_fingerprint(teacher_tokenizer) == tokenizer_fingerprint(student_tokenizer):
        return "same"
    vt, vs = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    n_s = real_vocab_size(student_tokenizer)
    shared = all(vt.get(token) == idx for token, idx in vs.items())
    if shared and len(vt) > len(vs) and all(idx >= n_s for token, idx in vt.items() if token not in vs):
        return "extends"
    raise TailkdError(
        f"teacher and student tokenizers differ ({_difference(teacher_tokenizer, student_tokenizer)}): "
        "distillation needs one shared vocabulary, or a teacher vocabulary that extends the student's (the same "
        "id for every student token, extra teacher tokens after them); build the student from the teacher "
        "(tailkd.student) or pick a student trained with the teacher's tokenizer"
    )


def check_vocab(teacher_tokenizer, student_tokenizer, teacher_model, student_model, *,
                student_role: str = "student") -> int:
    """The vocabulary distilled over, V (the student's max id + 1; fewer where a head is pruned: the ids both score,
    `scored_vocab`), or a TailkdError (`relation`).

    LM heads with more rows than V (padded, or a teacher's extra tokens) are fine: logits are sliced to
    ``[..., :V]``. A head (or input embedding) with fewer rows than V cannot score every token: error, naming the
    model as ``student_role`` for the second one (select-data's reference).
    """
    relation(teacher_tokenizer, student_tokenizer)
    vocab = min(scored_vocab(student_tokenizer, student_model), scored_vocab(teacher_tokenizer, teacher_model))
    for role, model in (("teacher", teacher_model), (student_role, student_model)):
        check_rows(model, vocab, role, real_vocab_size(student_tokenizer))
    return vocab


def check_own_vocab(tokenizer, model, role: str) -> int:
    """A model scored in its own tokenization (select-data's cross-tokenizer score): its vocabulary V
    (`scored_vocab`), or a TailkdError if its LM head or input embedding has fewer than V rows (`check_rows`)."""
    vocab = scored_vocab(tokenizer, model)
    check_rows(model, vocab, role, real_vocab_size(tokenizer))
    return vocab


def check_rows(model, vocab: int, role: str, tokens: int | None = None) -> None:
    """TailkdError if the LM head of ``model`` (the ``role``) has fewer than ``vocab`` rows, or its input embedding
    fewer than ``tokens`` (the ids the data holds: the data tokenizer's; None: ``vocab``)."""
    head = model.get_output_embeddings()
    tokens = vocab if tokens is None else tokens
    rows = {"LM head": (head.weight.shape[0] if head is not None else 0, vocab),
            "input embedding": (model.get_input_embeddings().weight.shape[0], tokens)}
    for part, (n, needed) in rows.items():
        if n < needed:
            raise TailkdError(
                f"the {role}'s {part} has {n} rows but the tokenizer has {needed} tokens: "
                f"resize it (model.resize_token_embeddings({needed})) or use the model's own tokenizer"
            )


def check_labels(vocab: int, tokenizer, rows: dict) -> None:
    """Where V (``vocab``) is below the ``tokenizer``'s ids (a pruned LM head: `head_ids`), a TailkdError if ``rows``
    ({name: rows}, e.g. ``{"training": train_rows}``; `tailkd.data.max_label` reads them) hold a label the heads
    cannot score, naming the largest; nothing to read elsewhere (every label is then a token id below V)."""
    if vocab >= real_vocab_size(tokenizer):
        return
    for name, part in rows.items():
        top = max_label(part)
        if top >= vocab:
            raise TailkdError(f"the {name} rows hold the label {tokenizer.convert_ids_to_tokens(top)!r} (id {top}), "
                              f"but the LM heads score ids 0..{vocab - 1} only (a head pruned to them: its config's "
                              "output_vocab_size): give data without such tokens (text tokenised as text holds none)")


@torch.no_grad()
def outside_mass(teacher_logits: torch.Tensor, shared: int, teacher_vocab: int) -> torch.Tensor:
    """Per position, the teacher's probability on its own extra tokens (ids ``shared .. teacher_vocab − 1``):
    Σ_{shared ≤ i < teacher_vocab} p_i, computed as exp(lse(z[shared:teacher_vocab]) − lse(z[:teacher_vocab])) in
    float64, so a tiny mass keeps its relative precision (about 2^-52 · the two log-sum-exps' magnitude; 1 − Σ_{i <
    shared} p_i would round any mass below ~1e-16 to 0). Padded head rows past the tokenizer (``teacher_vocab``) are
    no tokens: left out."""
    z = teacher_logits[..., :teacher_vocab].double()
    return torch.exp(torch.logsumexp(z[..., shared:], -1) - torch.logsumexp(z, -1))
