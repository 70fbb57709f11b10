"""What a distillation run prepares before its first step (`tailkd.train.setup_run` calls these in order).

0. What needs no model (`check_before_models`), before any model loads: of a teacher cache its cache.json, split,
   seq_len and K, every shard there, whether it can give the loss; a loaded student's tokenizer against the
   teacher's (read alone); the cache's tokenizer and corpus, against the data tokenizer and the corpus fingerprint
   (packed text: computed without tokenising; SFT rows: their digest, the files tokenised). The rest of the cache
   with the teacher signal (3.).
1. Models (`setup_models`): the teacher (eval, no grad; replicated, or a skeleton to build the student from when
   ``teacher.parallel fsdp`` shards it: `tailkd.sharded_teacher`; a student chosen from calibration rows is measured
   on the sharded teacher first, `calibrate_sharded_teacher`), the student (built from the teacher,
   `tailkd.student`, or loaded for continued pretraining), their vocabulary (`tailkd.vocab`: one shared vocabulary,
   or a teacher vocabulary extending the student's, which refuses a teacher cache, and whose teacher mass outside
   the shared ids `shared_vocab_summary` measures); ``train.activation_checkpointing``; ``train.compile``; the
   attention implementation, logged.
2. Data (`setup_data`): packed text rows (`tailkd.corpus` -> `tailkd.data`; a held-out corpus of its own with
   ``data.heldout_paths``) or prompt/response rows (`tailkd.sft`); ``train.epochs`` -> ``train.max_steps``.
   `tailkd.commands` builds every subcommand's rows with the same function, so a data section means the same
   everywhere.
3. The loss path (`choose_loss_path`: full logits or the fused chunked layer, `tailkd.fused`) and the teacher
   signal (`setup_teacher_signal`: online, or a top-K cache, `tailkd.teacher`).
4. AdamW (`make_optimizer`: fused on CUDA, no weight decay on vectors; `use_optimizer_settings` after a resume).
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import torch

from tailkd import corpus, fused, models, sharded_teacher
from tailkd import data as data_mod
from tailkd import distributed as dist
from tailkd import teacher as teacher_mod
from tailkd import vocab as vocab_mod
from tailkd.calibrated import calibrated_choice_lines
from tailkd.config import DistillConfig
from tailkd.documents import check_document_attention, restarts_positions
from tailkd.errors import TailkdError
from tailkd.head import verify_head
from tailkd.objective import computed_divergence
from tailkd.registry import LOSSES

# --------------------------------------------------------------------------- before any model loads


def _cache_k(cfg: DistillConfig) -> int | None:
    """The K a run reads from a teacher cache: loss.k for a loss with a K, else None (the cache's own)."""
    return cfg.loss.k if "k" in LOSSES[cfg.loss.name].knobs else None


def check_before_models(cfg: DistillConfig) -> None:
    """What needs no model, checked before any loads (minutes for a large teacher), in this order: SFT data files
    (`tailkd.sft.check_sft_files`); of a teacher cache
    (``teacher.cache``, a loss with a teacher) a complete cache of training rows of this seq_len, holding the run's K,
    that can give the loss (`CacheReader.check_loss`); with ``student.path`` the two tokenizers read alone, one
    vocabulary or a teacher's extending the student's (`vocab.relation`'s line, as `setup_models` gives it), and no
    cache with an extending teacher (`check_cache_vocab`); then the cache's tokenizer and training rows
    (`CacheReader.check_run`, the lines `setup_teacher_signal` gives) against the data tokenizer (`data_tokenizer`)
    and the fingerprint of the training rows (`train_corpus_fingerprint`: of packed text without tokenising; SFT
    files are tokenised for it, as `setup_data` does again after the models load). The rest — the models' heads,
    teacher weights, number of rows — when `setup_models` and `setup_teacher_signal` load them."""
    if cfg.data.task == "sft":  # the files as training reads them (JSON, fields, responses): seconds, not minutes
        from tailkd.sft import check_sft_files

        check_sft_files(cfg.data, prompt_only=cfg.train.on_policy >= 1)
    reader = None
    if cfg.teacher.cache and LOSSES[cfg.loss.name].needs_teacher:
        from tailkd.cache import CacheReader

        reader = CacheReader(cfg.teacher.cache, split="train", seq_len=cfg.data.seq_len, k=_cache_k(cfg))
        reader.check_loss(cfg.loss.name, cfg.loss.temperature, cfg.loss.cosine_weight)
    if reader is None and not cfg.student.path:
        return  # a student built from the teacher has the teacher's tokenizer: nothing to compare
    # rank 0 first, as setup_models and setup_data: a GGUF converted once, a built-in corpus written once
    tokenizer = dist.on_main_then_all(lambda: data_tokenizer(cfg))
    if reader is not None:
        reader.check_rows_kind(cfg.data.task, cfg.data.sft_mode, restarts_positions(cfg.data))  # before the digests
        reader.check_run(tokenizer_fingerprint=vocab_mod.tokenizer_fingerprint(tokenizer))
        corpus_fp = dist.on_main_then_all(lambda: train_corpus_fingerprint(cfg, tokenizer))
        try:
            reader.check_run(corpus_fingerprint=corpus_fp)
        except TailkdError as exc:
            if cfg.data.task != "sft" or not cfg.student.path or \
                    models.read_tokenizer(cfg.teacher.path).chat_template == tokenizer.chat_template:
                raise
            raise TailkdError(f"{exc} (this run reads its SFT data with the student's tokenizer, whose chat template "
                              f"is not the teacher's: cache-teacher --tokenizer {cfg.student.path})") from None


def data_tokenizer(cfg: DistillConfig):
    """The tokenizer `setup_models` gives the data (the teacher's; the student's with ``student.path``), read alone
    from its model folder (seconds; a GGUF converted first, as loading it does).
    With ``student.path`` the pair is checked as `setup_models` checks it: a TailkdError unless the tokenizers are one
    (`vocab.relation` "same": equal fingerprints) or the teacher's extends the student's ("extends"), which refuses a
    teacher cache (`check_cache_vocab`)."""
    tok = teacher_tok = models.read_tokenizer(cfg.teacher.path)
    if cfg.student.path:
        tok = models.read_tokenizer(cfg.student.path)
        if vocab_mod.relation(teacher_tok, tok) == "extends":
            check_cache_vocab(cfg, vocab_mod.real_vocab_size(tok), vocab_mod.real_vocab_size(teacher_tok))
    return tok


# --------------------------------------------------------------------------- models: teacher, student, vocabulary

def setup_models(cfg: DistillConfig, device: torch.device, measured: dict | None = None):
    """Teacher (frozen) and student; returns (teacher or None, student, tokenizer, V, V_teacher, table): the
    student's tokenizer (it reads the data), V the vocabulary distilled over (the student's ids, `tailkd.vocab`),
    V_teacher the ids the teacher scores (`tailkd.vocab.scored_vocab`: > V when its vocabulary extends the student's,
    shared-vocabulary distillation, or the student's head is pruned below it), and the
    `tailkd.student` provenance table of a student built from the teacher (None for a loaded one).

    With ``teacher.parallel fsdp`` the teacher returned is a skeleton holding only what the student is built from
    (`tailkd.sharded_teacher.student_source`); `setup_run` then loads the sharded teacher on every rank at once,
    or has loaded it before to calibrate the student (``measured``: `calibrate_sharded_teacher`).
    A teacher cache with a teacher vocabulary extending the student's is refused here (`check_cache_vocab`)."""
    if cfg.teacher.parallel == "fsdp":
        teacher, t_tok = sharded_teacher.student_source(cfg.teacher.path, cfg.student, dtype=cfg.teacher.dtype,
                                                        device=device, measured=measured)
    else:
        teacher, t_tok = models.load_teacher(cfg.teacher.path, device=device, dtype=cfg.teacher.dtype)
    table = None
    if cfg.student.path:
        student, s_tok = models.load_causal_lm(cfg.student.path)
        student.to(device=device, dtype=torch.float32)
        if cfg.student.freeze_embeddings:
            from tailkd.student import freeze_student_embeddings

            freeze_student_embeddings(student)
    else:
        from tailkd.student import build_student, format_table

        s = cfg.student
        student, table = build_student(
            teacher, **student_shape(cfg), mlp_init=s.mlp_init, freeze_embeddings=s.freeze_embeddings,
            tie_embeddings=s.tie_embeddings, seed=cfg.train.seed, measured=measured,
            # the training rows, set up where a calibrated choice reads them (one teacher pass for all)
            calibration=lambda: calibration_batches(cfg, setup_data(cfg, t_tok, models.model_max_length(teacher))[1]),
        )
        student.to(device=device, dtype=torch.float32)
        s_tok = t_tok
        dist.say(format_table(table))
        for line in calibrated_choice_lines(table, s.calibration_rows):
            dist.say(line)
    vocab = vocab_mod.check_vocab(t_tok, s_tok, teacher, student)
    teacher_vocab = vocab_mod.scored_vocab(t_tok, teacher)
    check_cache_vocab(cfg, vocab, teacher_vocab,
                      pruned=vocab_mod.real_vocab_size(t_tok) <= vocab_mod.real_vocab_size(s_tok))
    student.train()
    if not LOSSES[cfg.loss.name].needs_teacher:
        teacher = None
    # the student's tokenizer reads the data: the teacher's may extend it (shared-vocabulary distillation)
    return teacher, student, s_tok, vocab, teacher_vocab, table


def student_shape(cfg: DistillConfig) -> dict:
    """The keywords of `tailkd.student.build_student` (and `tailkd.student.calibrate`) that ``cfg.student`` sets: the
    student's shape and how its layers, channels, heads, units and experts are chosen."""
    s = cfg.student
    return dict(num_layers=s.depth, layers=s.layers, hidden_size=s.hidden_size, num_heads=s.num_heads,
                num_kv_heads=s.num_kv_heads, intermediate_size=s.intermediate_size, num_experts=s.num_experts,
                num_experts_per_tok=s.num_experts_per_tok, ssm_heads=s.ssm_heads, head_dim=s.head_dim,
                layer_choice=s.layer_choice, experts=s.experts, mlp_units=s.mlp_units,
                hidden_channels=s.hidden_channels, attention_heads=s.attention_heads, ssm_head_choice=s.ssm_head_choice)


def calibrate_sharded_teacher(cfg: DistillConfig, device: torch.device):
    """Collective (every rank calls it): with ``teacher.parallel fsdp`` and a calibrated choice of the student's
    layers, channels, heads, units or experts, ``(the sharded teacher, its calibration)``: the teacher loaded here,
    before the student (`tailkd.sharded_teacher.load_sharded_teacher`), and measured over the calibration rows
    (`tailkd.student.calibrate`); `setup_models` then builds the student from a skeleton of the layers it chose.
    Every rank runs the whole pass — the sharded forward is collective, and rows split over the ranks would sum the
    measures in another order than one process does, moving near ties — and builds from rank 0's measures
    (broadcast), so that every rank holds one student, the one a replicated teacher gives."""
    from tailkd.student import calibrate

    folder = dist.on_main_then_all(lambda: sharded_teacher.teacher_folder(cfg.teacher.path))  # a GGUF converted once
    teacher = sharded_teacher.load_sharded_teacher(cfg.teacher.path, device=device, dtype=cfg.teacher.dtype,
                                                   log=dist.say)
    tokenizer = models.load_tokenizer(folder)
    rows = dist.on_main_then_all(lambda: setup_data(cfg, tokenizer, models.model_max_length(teacher)))[1]
    measured = calibrate(teacher, lambda: calibration_batches(cfg, rows), **student_shape(cfg))
    return teacher, dist.broadcast(measured)  # CPU tensors (`tailkd.calibration`'s probes sum on the host)


def calibration_batches(cfg: DistillConfig, train_rows):
    """The batches `tailkd.calibration` measures a teacher over (``student.layer_choice influence``, ``student.experts
    used``, ``student.mlp_units active``, ``student.hidden_channels active``, ``student.attention_heads active``):
    ``student.calibration_rows`` of ``train_rows`` (all where there are fewer), evenly spaced (row ``j * rows // n``),
    ``train.batch_size`` at a time, as ``input_ids`` and, for padded rows, ``attention_mask`` (with
    ``data.document_attention``, ``position_ids``: `tailkd.calibration` passes them to the forward)."""
    rows = len(train_rows)
    n = min(cfg.student.calibration_rows, rows)
    index = [j * rows // n for j in range(n)]
    for b in range(0, n, cfg.train.batch_size):
        batch = data_mod.collate([train_rows[i] for i in index[b:b + cfg.train.batch_size]])
        yield {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}


def check_cache_vocab(cfg: DistillConfig, vocab: int, teacher_vocab: int, pruned: bool = False) -> None:
    """A teacher cache (``teacher.cache``) is written by ``tailkd cache-teacher`` with the teacher's tokenizer over
    the teacher's whole vocabulary: with a teacher vocabulary extending the student's, neither its rows (the run's
    are the student tokenizer's) nor its probabilities (not renormalised over the student's ids) are the run's, and
    rebuilding it would give the same cache: refused, the online teacher is the way. Likewise its probabilities
    where the student's LM head is ``pruned`` below the ids the teacher scores (`tailkd.vocab.head_ids`)."""
    if cfg.teacher.cache and teacher_vocab > vocab:
        what = ("a student whose LM head is pruned below the teacher's ids" if pruned else
                "a teacher vocabulary extending the student's")
        raise TailkdError(f"teacher.cache does not combine with {what} (the student's {vocab} token ids of the "
                          f"teacher's {teacher_vocab}): a cache holds the teacher's own tokenisation and "
                          f"probabilities over all its ids; drop --teacher-cache to distil from the online teacher, "
                          f"renormalised over the shared ids")


def shared_vocab_rows(cfg: DistillConfig, held_rows, train_rows) -> tuple[object, int, str]:
    """(rows, n, words): the rows `shared_vocab_summary` measures on, their first n: those of the run's initial
    held-out evaluation (the first ``data.eval_rows`` held-out rows), or, without held-out rows, the first
    ``data.eval_rows`` training rows."""
    if len(held_rows):
        n = min(len(held_rows), cfg.data.eval_rows)
        return held_rows, n, f"the first {n} held-out rows"
    n = min(len(train_rows), cfg.data.eval_rows)
    return train_rows, n, f"the first {n} training rows (no held-out rows)"


def rank_batches(rows, n: int, batch_size: int, row_tokens: int, vocab: int):
    """This rank's share of rows 0..n-1 of ``rows`` as collated batches, for a collective pass over them (the
    held-out evaluation, `shared_vocab_mass`): rank r takes rows r::W, ``batch_size`` (the global micro-batch) / W
    at a time, fewer where a batch's float32 logits over ``vocab`` would exceed ~1 GiB (``row_tokens`` per row),
    and every rank yields the same number of batches (FSDP's forward is a collective): a rank without rows left
    yields row 0 with every label masked (a forward that adds nothing)."""
    r, w = dist.rank(), dist.world()
    mine = list(range(r, n, w))
    per_batch = max(1, min(max(1, batch_size // w), fused.AUTO_BYTES // (4 * row_tokens * vocab)))
    for b in range(math.ceil(math.ceil(n / w) / per_batch)):
        index = mine[b * per_batch:(b + 1) * per_batch]
        batch = data_mod.collate([rows[i] for i in (index or [0])])
        if not index:
            batch["labels"] = torch.full_like(batch["labels"], data_mod.IGNORE_INDEX)
        yield batch


@torch.no_grad()
def shared_vocab_mass(teacher, rows, n: int, vocab: int, teacher_vocab: int, *, batch_size: int, device,
                      autocast_dtype=None) -> tuple[float, int]:
    """(mean, tokens): the teacher's mass outside the shared ids (`tailkd.vocab.outside_mass`, float64), averaged
    over the positions with a label (those the losses and the held-out metrics score) of rows 0..n-1 of ``rows``.
    Collective, like the held-out evaluation (`rank_batches`); the sums (float64) are added over ranks, then
    divided once."""
    from tailkd.evaluate import forward_logits

    total, count = torch.zeros((), dtype=torch.float64), 0
    for batch in rank_batches(rows, n, batch_size, rows[0]["input_ids"].numel(), teacher_vocab):
        logits = forward_logits(teacher, batch["input_ids"].to(device), teacher_vocab, autocast_dtype=autocast_dtype,
                                **data_mod.model_inputs(batch, device))
        mask = (batch["labels"] != data_mod.IGNORE_INDEX).to(logits.device)
        if not bool(mask.any()):
            continue
        total += vocab_mod.outside_mass(logits[mask], vocab, teacher_vocab).sum().cpu()
        count += int(mask.sum())
    total, count = dist.sum_over_ranks([float(total), count], device)
    return (total / count if count else float("nan")), int(count)


def shared_vocab_summary(cfg: DistillConfig, teacher, held_rows, train_rows, vocab: int, teacher_vocab: int,
                         device, autocast_dtype=None) -> dict:
    """A teacher vocabulary extending the student's: say so in the run log, with the teacher's mass outside the
    shared ids (`shared_vocab_mass` over `shared_vocab_rows`), which the renormalisation over them removes
    (`tailkd.vocab`); returns the record for the run's summary.json: ``student_ids``, ``teacher_ids``,
    ``outside_mass`` (the mean), ``tokens`` and ``rows`` (what it was measured on). Collective."""
    rows, n, words = shared_vocab_rows(cfg, held_rows, train_rows)
    mass, tokens = shared_vocab_mass(teacher, rows, n, vocab, teacher_vocab, batch_size=cfg.train.batch_size,
                                     device=device, autocast_dtype=autocast_dtype)
    dist.say(f"shared vocabulary: the student's {vocab} token ids of the teacher's {teacher_vocab}, the teacher "
             f"renormalised over them; its mass on its {teacher_vocab - vocab} other tokens: {mass:.3g} (mean over "
             f"{tokens} tokens of {words})")
    return {"student_ids": vocab, "teacher_ids": teacher_vocab, "outside_mass": mass, "tokens": tokens,
            "rows": words}


def attention_text(student, teacher) -> str:
    """The attention implementations transformers picked (sdpa, flash_attention_2, eager), for the run log."""
    name = {m: getattr(m.config, "_attn_implementation", "?") for m in (student, teacher) if m is not None}
    return ", ".join(f"{role} {name[m]}" for role, m in (("student", student), ("teacher", teacher)) if m is not None)


def checkpoint_activations(student, every: int) -> str:
    """``--train.activation_checkpointing N``: transformers' activation (gradient) checkpointing of every N-th decoder
    layer of ``student`` (in place; nothing saved changes), non-reentrant: `torch.utils.checkpoint` restores the RNG
    and autocast state for the recompute, so dropout draws the same masks and the gradients are the ones kept
    activations give. Returns the run log's line; a class transformers does not checkpoint is refused in one line."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    name = type(student).__name__
    if not getattr(student, "supports_gradient_checkpointing", False):
        raise TailkdError(f"train.activation_checkpointing: transformers does not checkpoint {name}'s layers "
                          "(its supports_gradient_checkpointing is False): set it to 0")
    enable = getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable  # 5.17
    enable({"use_reentrant": False}, every_n_layers=every)
    layers = [m for m in student.modules() if isinstance(m, GradientCheckpointingLayer)]
    kept = sum(not m.gradient_checkpointing for m in layers)
    if kept == len(layers):
        raise TailkdError(f"train.activation_checkpointing: transformers checkpoints none of {name}'s layers: set it "
                          "to 0")
    return (f"activation checkpointing: {len(layers) - kept} of the student's {len(layers)} layers recompute their "
            "activations in the backward pass")


def compile_models(student, teacher) -> None:
    """``--train.compile``: torch.compile the decoder stacks in place (`nn.Module.compile`: parameters, state_dict
    keys, checkpoints and the saved student stay as they are; the LM heads and the loss are tailkd's own code).
    A sharded teacher stays eager."""
    student.base_model.compile()
    if teacher is not None and not sharded_teacher.is_sharded(teacher):
        teacher.base_model.compile()

# --------------------------------------------------------------------------- data: the rows of a run


def text_paths(paths, data, cache_root: Path) -> list[Path]:
    """Text files, with the built-in sets resolved: ``builtin:math`` (the worked solutions of the built-in math
    problems, a stage-1 corpus) and ``builtin:pydoc`` (Python's documentation, `corpus.python_docs_corpus`)."""
    out = []
    for p in paths:
        if p == "builtin:math":
            from tailkd.mathdata import default_math_dataset

            out.append(default_math_dataset(cache_root, n_train=data.math_train, n_heldout=data.math_heldout).corpus)
        elif p == "builtin:pydoc":
            out.append(corpus.python_docs_corpus(cache_root))
        else:
            out.append(Path(p))
    return out


def pretrain_paths(data, cache_root: Path) -> list[Path]:
    """The text files of a pretraining corpus: ``data.paths`` (`text_paths`), or the built-in news corpus."""
    return text_paths(data.paths, data, cache_root) or corpus.default_corpus_files(cache_root)


def data_cache_root(data) -> Path:
    """Where a run's data is prepared: ``data.cache_dir``, else tailkd's cache root (`corpus.default_cache_root`)."""
    return Path(data.cache_dir) if data.cache_dir else corpus.default_cache_root()


def corpus_settings(data) -> dict:
    """The settings `setup_data` prepares the training corpus of packed text rows with
    (`corpus.prepare_corpus_cached`); a held-out corpus of its own (``data.heldout_paths``) holds nothing out."""
    return {"doc_sep": data.doc_sep, "append_eos": data.doc_eos, "heldout_fraction": data.heldout_fraction}


def train_corpus_fingerprint(cfg: DistillConfig, tokenizer) -> str:
    """`rows_fingerprint` of the training rows `setup_data` gives ``cfg`` with ``tokenizer``, before any model loads.
    Packed text rows: the corpus's fingerprint without tokenising (`corpus.cached_fingerprint`: the files' paths,
    sizes and mtimes, the settings, the tokenizer). SFT rows: their `SFTRows.input_digest`, the files read and
    tokenised as `setup_data` reads them (seconds for thousands of examples; its warnings are given there, once)."""
    data = cfg.data
    if data.task == "sft":
        from tailkd.sft import setup_sft_rows

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = setup_sft_rows(data, tokenizer, data_cache_root(data), prompt_only=cfg.train.on_policy >= 1)[0]
        return rows.input_digest
    return corpus.cached_fingerprint(pretrain_paths(data, data_cache_root(data)),
                                     tokenizer_fingerprint=vocab_mod.tokenizer_fingerprint(tokenizer),
                                     **corpus_settings(data))


def rows_fingerprint(info, rows) -> str:
    """The identity a teacher cache keeps of the rows it holds (cache.json's ``corpus.fingerprint``): of packed text
    rows, their corpus's fingerprint (both splits; cache.json's ``split`` says which: ``info.fingerprint``); of SFT
    rows, the digest of their layout and input ids (`SFTRows.input_digest`: what the teacher reads; not the labels)."""
    digest = getattr(rows, "input_digest", None)
    return digest if digest is not None else info.fingerprint


def setup_data(cfg: DistillConfig, tokenizer, model_max: int, *, heldout_only: bool = False, prompt_only: bool = True):
    """(info, train_rows, held_rows): packed text rows (task pretrain) or prompt/response rows (task sft).

    Both give rows of ``input_ids``/``labels`` (shifted once, -100 = ignore)/``segment_ids``; the loop is the same.
    ``heldout_only``: where packed text rows come from a held-out corpus of its own (``data.heldout_paths``), those
    alone: (None, None, held_rows), ``data.paths`` not read (they may be gone since the run). ``prompt_only``: SFT
    training files may hold prompts alone (`tailkd.sft.setup_sft_rows`; a run below ``train.on_policy`` 1: False).
    With ``data.document_attention`` packed rows also carry ``position_ids`` (`tailkd.documents`).
    """
    info, train_rows, held_rows = _setup_rows(cfg, tokenizer, model_max, heldout_only, prompt_only)
    for rows in (train_rows, held_rows):
        if rows is not None:  # packed rows carry position ids restarting at each document (`tailkd.documents`)
            rows.restart_positions = cfg.data.document_attention
    if restarts_positions(cfg.data) and cfg.data.task == "sft" and train_rows is not None \
            and all(len(members) == 1 for members in train_rows.rows):
        warnings.warn(f"data.document_attention: every packed training row holds one example ({len(train_rows)} rows "
                      f"of --seq-len {cfg.data.seq_len}): nothing to keep apart; a longer --seq-len packs several")
    return info, train_rows, held_rows


def _setup_rows(cfg: DistillConfig, tokenizer, model_max: int, heldout_only: bool, prompt_only: bool):
    data_mod.check_seq_len(cfg.data.seq_len, model_max)
    cache_root = data_cache_root(cfg.data)
    if cfg.data.task == "sft":
        from tailkd.sft import setup_sft_rows

        train_rows, held_rows, info = setup_sft_rows(cfg.data, tokenizer, cache_root, prompt_only=prompt_only)
        return info, train_rows, held_rows
    prepare = functools.partial(corpus.prepare_corpus_cached, tokenizer=tokenizer, cache_root=cache_root / "corpora",
                                tokenizer_fingerprint=vocab_mod.tokenizer_fingerprint(tokenizer),
                                **corpus_settings(cfg.data))
    if heldout_only and cfg.data.heldout_paths:  # `tailkd eval` of a run's held-out rows: --data is not read
        return None, None, heldout_corpus_rows(cfg.data, prepare, cache_root)
    info = prepare(pretrain_paths(cfg.data, cache_root))
    train_rows = data_mod.PackedRows(info.train_bin, cfg.data.seq_len, what="--data's training split")
    if not cfg.data.heldout_paths:
        return info, train_rows, data_mod.PackedRows(info.heldout_bin, cfg.data.seq_len,
                                                     what="--data's held-out split")
    return info, train_rows, heldout_corpus_rows(cfg.data, prepare, cache_root)


def heldout_corpus_rows(data, prepare, cache_root: Path):
    """The packed rows of ``data.heldout_paths``, a held-out corpus of its own (paper: held-out KL on a validation set
    of its own): all of its documents, i.e. the "train" file of a corpus prepared with nothing held out. The training
    corpus is prepared as without it, so its rows (and a teacher cache of them) do not depend on --heldout-data."""
    try:  # its errors name files (no documents) or the cached train.bin of that corpus: say which data they are
        held = prepare(text_paths(data.heldout_paths, data, cache_root), heldout_fraction=0.0, min_heldout_docs=0)
        return data_mod.PackedRows(held.train_bin, data.seq_len)
    except TailkdError as exc:
        raise TailkdError(f"--heldout-data {' '.join(map(str, data.heldout_paths))}: {exc}") from None


def heldout_share_warning(data, meta: dict) -> str | None:
    """The run log's warning where --data's held-out split (a fraction of its DOCUMENTS, by hash) holds far more of
    its tokens than ``data.heldout_fraction`` — above a quarter and three times the fraction: one long document
    held out took 99.6% of a corpus, silently (`tailkd.corpus.prepare_corpus`'s ``meta``); None otherwise."""
    held, train = meta["heldout"], meta["train"]
    total = held["tokens"] + train["tokens"]
    share = held["tokens"] / total if total else 0.0
    if share <= max(0.25, 3 * data.heldout_fraction):
        return None
    docs = held["docs"] + train["docs"]
    also = (" (with --heldout-data it is not evaluated either: the training split is the same with or without it)"
            if data.heldout_paths else "")
    return (f"tailkd: warning: --data's held-out split holds {share:.1%} of its tokens ({held['tokens']:,} of "
            f"{total:,}, {held['docs']} of {docs} document(s)){also}: data.heldout_fraction={data.heldout_fraction:g} "
            f"holds out documents, not tokens, and training reads {train['tokens']:,} tokens; split long documents "
            "(--data.doc_sep blank_line or line) or add more of them")


def set_steps_from_epochs(cfg: DistillConfig, rows: int) -> None:
    """``train.epochs`` > 0: the schedule's length becomes ceil(epochs x rows / rows per optimizer step), written
    into ``cfg.train.max_steps`` (and so into the run's config.yaml; a resume computes the same number)."""
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    cfg.train.max_steps = max(1, math.ceil(cfg.train.epochs * rows / per_step))
    dist.say(f"train.epochs={cfg.train.epochs:g}: {rows} training rows, {per_step} per step -> "
             f"{cfg.train.max_steps} steps")


def check_batch_split(batch_size: int) -> None:
    w = dist.world()
    if batch_size % w:
        raise TailkdError(f"train.batch_size={batch_size} is the GLOBAL micro-batch and must split evenly over the "
                          f"{w} processes; use --batch-size {math.ceil(batch_size / w) * w}")

# --------------------------------------------------------------------------- the loss path and the teacher signal


def choose_loss_path(cfg: DistillConfig, vocab: int) -> bool:
    """``train.fused_loss``: True for the fused, chunked loss layer (`tailkd.fused`), False for full logits."""
    tokens = max(1, cfg.train.batch_size // dist.world()) * cfg.data.seq_len  # one rank's micro-batch
    fused_path = fused.use_fused(cfg.train.fused_loss, tokens, vocab)
    if fused_path and cfg.train.parallel == "fsdp":
        if cfg.train.fused_loss == "on":
            raise TailkdError("train.fused_loss=on does not combine with train.parallel=fsdp (FSDP shards the LM head "
                              "the fused layer reads); use --train.parallel ddp or --train.fused_loss off")
        return False
    return fused_path


def run_loss_chunk(cfg: DistillConfig, vocab: int, student, device: torch.device) -> int | None:
    """Tokens per chunk of the fused layer for the whole run: ``train.loss_chunk_size``, else on CUDA the rule of
    `tailkd.fused.chunk_tokens` (whole rows of ``data.seq_len`` tokens where they fit) read once from the free memory
    now (not per micro-batch: no driver call in the step, the same chunks every step); None on the CPU (its per-call
    rule grows TAD's chunks to whole sequences)."""
    if cfg.train.loss_chunk_size or device.type != "cuda":
        return cfg.train.loss_chunk_size or None
    dtype = dist.autocast_dtype(cfg.train.precision, device) or torch.float32
    return fused.device_chunk(device, vocab, student.config.get_text_config().hidden_size, dtype, cfg.data.seq_len)


def loss_layer_text(cfg: DistillConfig, fused_path: bool, vocab: int, device: torch.device,
                    chunk: int | None, sparse: bool = False) -> str:
    """The run log's account of the loss layer: full logits, or fused with its chunk size (``chunk``: the run's,
    `run_loss_chunk`; None: the CPU's rule, whose chunks `fused.grows_to_whole_sequences` up to rows of
    ``data.seq_len`` tokens) and row maths (``sparse``: the teacher signal is a top-K cache; the kernels' rule is
    the fused layer's, `fused.kernel_form`) — both for the divergence a step computes (`computed_divergence`)."""
    if not fused_path:
        return "full logits"
    divergence = computed_divergence(cfg.loss)
    size = f"{chunk or fused.default_chunk_size(vocab)} tokens"
    whole = fused.whole_sequence_chunk(vocab, cfg.data.seq_len)
    if fused.grows_to_whole_sequences(divergence, sparse, device.type, chunk) and whole > fused.default_chunk_size(
            vocab):
        size = f"up to {whole} tokens (whole sequences)"
    maths = "torch row maths"
    if (device.type == "cuda" and cfg.train.loss_kernels == "auto"
            and fused.kernel_form(divergence, sparse) is not None):
        from tailkd import kernels

        maths = "Triton row kernels" if kernels.available() else "torch row maths (pip install tailkd[kernels] " \
                                                                 "for the Triton ones)"
    return f"fused (LM heads + loss in chunks of {size}, {maths})"


def setup_teacher_signal(cfg: DistillConfig, teacher, student, tokenizer, info, vocab: int, device, ac,
                         fused_path: bool, probe: torch.Tensor, train_rows):
    """(signal_of, description): where each step's teacher signal comes from, and in words which loss that gives.

    Online: the teacher runs on every micro-batch (full logits, or final hidden states + LM head when fused).
    ``teacher.cache``: a `tailkd.cache.CacheReader` checked against this run (tokenizer, the training rows
    ``train_rows`` by `rows_fingerprint`, split, seq_len, K, teacher weights, that it holds every one of those rows,
    and each batch's row hashes); a top-K cache gives
    D_KL1 (+ a sampled tail estimate), a cache with hidden states the exact loss. On the fused path the LM heads
    are checked once against the models' own logits (``probe``: a few token ids)."""
    if fused_path:
        verify_head(student, probe, vocab_size=vocab)
    check_document_attention(cfg, student, None if cfg.teacher.cache else teacher)
    if not LOSSES[cfg.loss.name].needs_teacher:
        return None, "clm: no teacher"
    if cfg.teacher.cache:
        from tailkd.cache import open_cache

        reader = open_cache(cfg.teacher.cache, tokenizer=tokenizer,
                            corpus_fingerprint=rows_fingerprint(info, train_rows), split="train",
                            seq_len=cfg.data.seq_len, k=_cache_k(cfg), teacher_model=teacher, rows=len(train_rows))
        description = reader.check_loss(cfg.loss.name, cfg.loss.temperature, cfg.loss.cosine_weight)
        return teacher_mod.CachedTeacher(reader, device=device), f"teacher cache {cfg.teacher.cache}: {description}"
    if fused_path:
        verify_head(teacher, probe, vocab_size=vocab)
    online = teacher_mod.OnlineTeacher(teacher, vocab, fused_path=fused_path, autocast_dtype=ac,
                                       want_hidden=cfg.loss.cosine_weight > 0)
    return online, f"{cfg.loss.name}: exact, online teacher"


# --------------------------------------------------------------------------- the optimizer


def _group_settings(t) -> tuple[dict, dict]:
    """The settings of `make_optimizer`'s two parameter groups (weight matrices and embeddings; biases and norm
    weights) from the train section ``t``."""
    return {"weight_decay": t.weight_decay}, {"weight_decay": 0.0}


def use_optimizer_settings(optimizer: torch.optim.Optimizer, scheduler, t) -> None:
    """The run's lr, AdamW betas and weight decay (``t``: its train section) on an optimizer and schedule restored
    from a checkpoint: loading their states brought back the saved ones, which a resume with --force may change.
    The moments and the step count stay the checkpoint's; with unchanged settings nothing changes (the same lr)."""
    for group, settings in zip(optimizer.param_groups, _group_settings(t)):
        group.update(settings, betas=tuple(t.adam_betas), initial_lr=t.lr)
    scheduler.base_lrs = [t.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:  # the lr of the next step, as LambdaLR computes it
        group["lr"] = t.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def make_optimizer(model: torch.nn.Module, cfg: DistillConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": params, **settings} for params, settings in zip((decay, no_decay), _group_settings(cfg.train))]
    # CUDA: the fused AdamW kernel (one launch for all tensors); FSDP2's DTensor shards keep the foreach default
    params = decay + no_decay
    fused = bool(params) and all(p.is_cuda and not sharded_teacher.is_dtensor(p) for p in params)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas), fused=fused or None)
