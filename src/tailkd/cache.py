"""Offline teacher cache: run the teacher once over the training rows, train many students from disk.

The rows are a run's: packed text (`tailkd.data.PackedRows`) or prompt/response rows (`tailkd.sft.SFTRows`, every
position of a row cached, its prompt and padding too; the loss reads the response positions). A cache folder holds
``cache.json`` (identity + layout), optionally ``head.safetensors`` (the teacher's LM head, stored once) and shards
``shard_000000.safetensors``, each ``rows_per_shard`` consecutive rows:

=================  ===================  ======================================================================
tensor             dtype, shape         meaning (per token t of row r)
=================  ===================  ======================================================================
topk_ids           int32 [R, T, K]      the teacher's K most probable ids, by descending p (torch.topk order);
                                        int32 because vocabularies exceed 65535
topk_logprobs      float32 [R, T, K]    their TRUE log-probabilities (log-softmax over the full vocabulary)
log_tail_mass      float32 [R, T]       log α^T_K = logsumexp(tail logits) − logsumexp(logits)
hidden             bf16/fp16/fp32       (``--hidden-states``) the teacher's final hidden states [R, T, d]; the
                                        training run re-applies ``head.safetensors`` -> exact teacher logits
tail_ids           int32 [R, T, M]      (``--tail-samples M``) M ids drawn with replacement from the teacher's
tail_logprobs      float32 [R, T, M]    renormalised tail p̃ = p/α^T (i ∉ 𝒦), and their true log p
row_hash           int64 [R]            hash of each row's input ids (alignment check against the run's rows)
=================  ===================  ======================================================================

A position where the teacher's logits have no softmax (NaN, or +inf: a NaN in its weights) has NaN log-probs, tail
mass and tail log-probs (its ids are in the vocabulary; tail ids drawn uniformly), as the online teacher's
log-softmax has there: a training step that draws its row has a non-finite loss and is skipped and counted
(``train.max_bad_steps``) as with the online teacher. Writing the cache says how many positions are so.

Each shard's safetensors metadata holds the sha256 of every tensor; a shard is written to a temporary file,
fsync'ed and renamed, so after a crash a restart finds only complete shards, verifies and skips them.
Reading checks the cache against the run (tokenizer fingerprint, corpus fingerprint — of SFT rows the digest of
their input ids, `tailkd.prepare.rows_fingerprint` —, split, seq_len, K_run ≤ K_cache: a larger cache is truncated
exactly) and verifies each shard's checksums the first time it is read:
a damaged shard is named in a TailkdError and never used.

What each mode gives (formulas.md §2; `cache_loss_description` says it in the run log):
- top-K only: D_KL1 exactly (the K+1 bucket loss, `losses.topk_bucket_kl`); the tail term α^T·D_KL2 is absent.
- + tail samples: D_KL1 + β(X)·(unbiased estimate of α^T·D_KL2); β(X) itself is exact (α^T is cached). cache.json's
  ``tail_sampler`` (`TAIL_SAMPLER`) marks samples drawn from p̃ in log space; a cache of an older tailkd's samples
  (no key: uniform draws where the tail lies ~104+ nats below 𝒦) is refused.
- + hidden states: the teacher's logits re-computed from its head: every loss exactly, up to the rounding of
  the stored hidden states (bf16 by default).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tailkd import jsonfile
from tailkd.checkpoint import atomic_write_file, atomic_write_text, left_by_dead_writer, save_safetensors
from tailkd.command_config import check_cache_out
from tailkd.data import model_inputs
from tailkd.divergences import SparseTeacher
from tailkd.errors import TailkdError
from tailkd.fused import default_chunk_size
from tailkd.head import Head, HeadSpec, apply_head, final_hidden, model_class_name, model_head, verify_head

FORMAT = "tailkd-teacher-cache-1"
META_FILE = "cache.json"
HEAD_FILE = "head.safetensors"
SHARD_BYTES = 1 << 28  # default shard size ~256 MiB
HIDDEN_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IDENTITY_KEYS = ("format", "teacher", "tokenizer_fingerprint", "corpus", "k", "vocab_size", "hidden_states",
                 "tail_samples", "tail_sampler", "seed", "rows_per_shard", "num_rows")
# The tail sampler of a cache with tail samples (cache.json "tail_sampler"): 2 draws from p̃ = p/α^T formed in log
# space (`sample_tail`); an older tailkd (no key) drew uniformly where the teacher's tail lies ~104+ nats below 𝒦,
# rows whose sampled tail term did not count then and does now (`divergences.sparse_tail_points`): refused.
TAIL_SAMPLER = 2

__all__ = ["CacheReader", "bytes_per_token", "cache_loss_description", "format_size_table",
           "open_cache", "row_hash", "sample_tail", "verify_shard", "weights_hash", "write_cache"]


# --------------------------------------------------------------------------- hashes and sizes


def _sha256_tensor(x: torch.Tensor, h=None):
    h = h or hashlib.sha256()
    arr = x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    h.update(memoryview(arr))
    return h


def weights_hash(model, dtype: torch.dtype | None = None) -> str:
    """sha256 over the model's state dict: every tensor's name, dtype, shape and bytes, in state-dict order; with
    ``dtype`` every floating-point tensor cast to it first (bf16: the same for a teacher loaded in fp32 or in bf16).

    A teacher sharded with FSDP2 (`tailkd.sharded_teacher`) hashes the same as the same weights loaded whole: each
    sharded tensor is gathered in turn (``full_tensor``; a collective, so every rank calls this), one at a time."""
    return weights_hashes(model, (dtype,))[0]


def weights_hashes(model, dtypes) -> list[str]:
    """`weights_hash` of ``model`` for each of ``dtypes`` (None: as loaded), in one pass over its tensors (one
    gather each when sharded)."""
    hashes = [hashlib.sha256() for _ in dtypes]
    for name, x in model.state_dict().items():
        x = x.full_tensor() if hasattr(x, "full_tensor") else x
        for h, dtype in zip(hashes, dtypes):
            y = x.to(dtype) if dtype is not None and x.is_floating_point() else x
            h.update(f"{name}|{y.dtype}|{tuple(y.shape)}|".encode())
            _sha256_tensor(y, h)
    return [h.hexdigest() for h in hashes]


def row_hash(input_ids: torch.Tensor) -> torch.Tensor:
    """[R] int64 hash of each row of ``input_ids`` [R, T] (first 8 bytes of blake2b over the ids as int64)."""
    rows = input_ids.detach().cpu().to(torch.int64).numpy()
    out = [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little", signed=True) for r in rows]
    return torch.tensor(out, dtype=torch.int64)


def bytes_per_token(k: int, *, hidden_size: int = 0, hidden_dtype: str = "bf16", tail_samples: int = 0) -> int:
    """Cache bytes per token: K ids (int32) + K log-probs (float32) + log α (float32) [+ hidden d] [+ M samples]."""
    size = 8 * k + 4
    if hidden_size:
        size += hidden_size * torch.finfo(HIDDEN_DTYPES[hidden_dtype]).bits // 8
    return size + 8 * tail_samples


def format_size_table(k: int, *, hidden_size: int, hidden_dtype: str = "bf16", tail_samples: int = 16) -> str:
    """Markdown table: bytes per token and GB per billion tokens (10^9 B) of each cache mode."""
    modes = [("top-K only", bytes_per_token(k)),
             (f"top-K + hidden states ({hidden_dtype}, d={hidden_size})",
              bytes_per_token(k, hidden_size=hidden_size, hidden_dtype=hidden_dtype)),
             (f"top-K + {tail_samples} tail samples", bytes_per_token(k, tail_samples=tail_samples)),
             (f"top-K + hidden + {tail_samples} tail samples",
              bytes_per_token(k, hidden_size=hidden_size, hidden_dtype=hidden_dtype, tail_samples=tail_samples))]
    lines = [f"| cache mode (K={k}) | bytes/token | GB per 1B tokens |", "|---|---:|---:|"]
    lines += [f"| {name} | {b:,} | {b * 1e9 / 1e9:,.0f} |" for name, b in modes]  # b bytes/token = b GB per 1e9 tokens
    return "\n".join(lines)


# --------------------------------------------------------------------------- writing


def _shard_name(i: int) -> str:
    return f"shard_{i:06d}.safetensors"


# the fields of cache.json a reader uses: (key, inner keys of an object) or (key, int)
_META_FIELDS = (("tokenizer_fingerprint", str), ("corpus", ("fingerprint", "split", "seq_len")),
                ("teacher", ("weights_sha256",)), ("k", int), ("num_rows", int), ("rows_per_shard", int),
                ("num_shards", int), ("vocab_size", int))
# ... and those it uses where they are not null: the number of tail samples, the hidden states' dtype and size
_OPTIONAL_META_FIELDS = (("tail_samples", int), ("hidden_states", ("dtype", "size")))


def _damaged(path: Path, why: str) -> TailkdError:
    return TailkdError(f"teacher cache {path}: {META_FILE} is damaged ({why}); delete {path} and build the cache "
                       "again with tailkd cache-teacher")


def read_meta(path: Path) -> dict:
    """The ``cache.json`` object of cache folder ``path`` (a one-line TailkdError when it is not readable JSON)."""
    try:
        return jsonfile.read_object(Path(path) / META_FILE)
    except jsonfile.Damaged as exc:
        raise _damaged(path, str(exc)) from None


def _check_meta(path: Path, meta: dict) -> None:
    """A one-line TailkdError unless ``meta`` has the fields a reader uses (`_META_FIELDS`; `_OPTIONAL_META_FIELDS`
    where not null, and the teacher's head with hidden states), of their types."""
    for key, want in _META_FIELDS + _OPTIONAL_META_FIELDS:
        if meta.get(key) is None and (key, want) in _OPTIONAL_META_FIELDS:
            continue
        if key not in meta:
            raise _damaged(path, f"no {key!r}")
        value = meta[key]
        if isinstance(want, tuple):
            if not isinstance(value, dict) or any(inner not in value for inner in want):
                raise _damaged(path, f"{key!r} is not an object with {', '.join(map(repr, want))}")
        elif not isinstance(value, want) or isinstance(value, bool):
            raise _damaged(path, f"{key!r} is {value!r}, not {'an integer' if want is int else 'a string'}")
    head = meta["teacher"].get("head")  # hidden states give the logits through the teacher's LM head
    if meta.get("hidden_states") is not None and not (isinstance(head, dict) and
                                                      all(k in head for k in ("vocab_size", "scale", "softcap"))):
        raise _damaged(path, "'teacher' has no 'head' object with 'vocab_size', 'scale', 'softcap'")


def _identity(meta: dict) -> dict:
    """What a resume compares: ``IDENTITY_KEYS``, less the teacher's name (--teacher as spelled: relative to the
    folder the command ran in, ./, a trailing /). Its weights hash, class and head tell the teacher; the name did
    refuse the same teacher spelled otherwise (the same command run from another folder)."""
    ident = {key: meta.get(key) for key in IDENTITY_KEYS}
    if isinstance(ident["teacher"], dict):
        ident["teacher"] = {k: v for k, v in ident["teacher"].items() if k != "name"}
    return ident


def _first_difference(a, b, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {a!r} vs {b!r}"


def sample_tail(t: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, m: int, generator: torch.Generator):
    """M ids per row drawn with replacement from the renormalised teacher tail p̃ = p/α^T (i ∉ 𝒦 = ``ids``).

    ``t`` [n, V] teacher logits, ``ids`` [n, K], ``lse`` [n] = logsumexp(t). Returns (ids [n, M] int64, their true
    log p [n, M]). Σ_j (α^T/M) f(id_j) is then an unbiased estimate of Σ_{i∉𝒦} p_i f(i). p̃ is formed from the
    tail's own log-sum-exp, in range however far below float32 the tail lies (p_i itself is 0 in float32 beyond ~104
    nats, where its weights α^T/M still count: `divergences.sparse_tail_points`). A row without tail mass (every tail
    logit −inf: α^T = 0) draws uniformly from the tail; its weights α^T/M are 0. A row without a distribution
    (``lse`` not finite: NaN or +inf logits) draws uniformly from the tail too, and its log p are NaN.
    """
    tail = t.scatter(-1, ids, -torch.inf)  # [n, V] the tail logits, −inf on 𝒦
    lse_tail = torch.logsumexp(tail, dim=-1)  # [n]
    broken = ~torch.isfinite(lse)  # [n] NaN / +inf logits: p̃ is NaN, which torch.multinomial refuses
    empty = ~torch.isfinite(lse_tail) | broken  # no tail mass (or no distribution)
    p_tilde = (tail - torch.where(empty, 0.0, lse_tail)[:, None]).exp()  # [n, V] p̃ = p/α^T, 0 on 𝒦
    if bool(empty.any()):
        p_tilde[empty] = torch.ones_like(p_tilde[empty]).scatter_(-1, ids[empty], 0.0)
    draw = torch.multinomial(p_tilde.float().cpu(), m, replacement=True, generator=generator).to(t.device)  # [n, M]
    draw_lp = t.gather(-1, draw) - lse[:, None]
    return draw, draw_lp.masked_fill_(broken[:, None], math.nan)


@torch.no_grad()
def _teacher_forward(model, input_ids: torch.Tensor, autocast_dtype=None, **extra) -> torch.Tensor:
    """The teacher's final hidden states [R, T, d] of rows ``input_ids`` [R, T]: its one forward (a collective for
    a sharded teacher); ``extra``: the rows' `tailkd.documents.model_inputs`."""
    with torch.autocast(input_ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return final_hidden(model, input_ids, **extra)


@torch.no_grad()
def _teacher_rows(hidden: torch.Tensor, head: Head, *, k: int, tail_samples: int, generator: torch.Generator,
                  chunk: int, want_hidden: bool) -> dict:
    """The cached tensors of a batch of rows from their final hidden states ``hidden`` [R, T, d] (see the module
    docstring); local to this process."""
    n_rows, n_time, d = hidden.shape
    flat = hidden.reshape(-1, d)
    out = {"topk_ids": [], "topk_logprobs": [], "log_tail_mass": [], "tail_ids": [], "tail_logprobs": [],
           "broken": []}
    for a in range(0, flat.shape[0], chunk):
        t = apply_head(flat[a:a + chunk], head).float()  # [n, V] chunk of teacher logits
        lse = torch.logsumexp(t, dim=-1)  # [n]
        broken = ~torch.isfinite(lse)  # [n] NaN or +inf logits: no distribution (the online log-softmax is NaN)
        top_t, ids = torch.topk(t, k, dim=-1)  # [n, K] sorted by descending p
        tail = t.scatter(-1, ids, -torch.inf)  # [n, V]
        log_alpha = torch.logsumexp(tail, dim=-1) - lse  # [n]
        out["topk_ids"].append(ids.to(torch.int32))
        out["topk_logprobs"].append((top_t - lse[:, None]).masked_fill_(broken[:, None], math.nan))
        out["log_tail_mass"].append(log_alpha.masked_fill_(broken, math.nan))
        out["broken"].append(broken)
        if tail_samples:
            draw, draw_lp = sample_tail(t, ids, lse, tail_samples, generator)
            out["tail_ids"].append(draw.to(torch.int32))
            out["tail_logprobs"].append(draw_lp)
    res = {key: torch.cat(v).reshape(n_rows, n_time, -1).cpu() for key, v in out.items() if v}  # [R, T, K|M]
    res["log_tail_mass"] = res["log_tail_mass"].reshape(n_rows, n_time)
    res["broken"] = res["broken"].reshape(n_rows, n_time)  # not a cached tensor: counted by write_cache
    if want_hidden:
        res["hidden"] = hidden
    return res


def _save_shard(path: Path, tensors: dict) -> None:
    """Write one shard atomically (`checkpoint.atomic_write_file`), with the sha256 of every tensor.

    Its metadata is that one key: safetensors writes the metadata map in an order that varies from one process (and
    one map) to the next, so only a one-key map gives the same file bytes from a resumed or a multi-rank run."""
    sums = {name: _sha256_tensor(x).hexdigest() for name, x in tensors.items()}
    metadata = {"sha256": json.dumps(sums)}
    try:
        atomic_write_file(path, lambda tmp: save_safetensors(tensors, tmp, metadata))
    except OSError as exc:
        raise TailkdError(f"could not write teacher cache shard {path} ({exc.strerror or exc}); free disk space and "
                          "rerun the same tailkd cache-teacher command: the complete shards are kept") from exc


def verify_shard(path: Path) -> dict[str, torch.Tensor]:
    """Load a shard and check every tensor against its sha256; TailkdError naming the shard if it is damaged."""
    fix = f"delete {path.name} and run tailkd cache-teacher again with the same arguments (it rewrites only it)"
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
        sums = json.loads(meta["sha256"])
    except Exception as exc:  # noqa: BLE001 - any parse failure means the file is damaged
        raise TailkdError(f"teacher cache shard {path} is unreadable ({type(exc).__name__}); {fix}") from None
    if set(sums) != set(tensors):
        raise TailkdError(f"teacher cache shard {path} lacks tensors {sorted(set(sums) ^ set(tensors))}; {fix}")
    for name, x in tensors.items():
        if _sha256_tensor(x).hexdigest() != sums[name]:
            raise TailkdError(f"teacher cache shard {path} is corrupted (checksum of '{name}' differs); {fix}")
    return tensors


def write_cache(model, tokenizer, rows, out_dir, *, k: int = 64, corpus: dict, teacher_name: str = "",
                hidden_states: bool = False, hidden_dtype: str = "bf16", tail_samples: int = 0, seed: int = 0,
                batch_size: int = 8, rows_per_shard: int | None = None, max_rows: int = 0,
                vocab_size: int | None = None,
                autocast_dtype=None, chunk_size: int | None = None, log=print) -> dict:
    """Cache ``model``'s top-K (and optional hidden states / tail samples) over ``rows`` into out_dir: a `PackedRows`
    or `SFTRows` (``seq_len`` and rows of ``input_ids``; the teacher reads them as a run's online teacher does).

    ``corpus``: the identity of the rows (``fingerprint``, ``split``, ``seq_len``, ``eos_id``, tokenisation
    settings), compared on resume and at read time. Resumable: complete shards are verified and skipped; a folder
    written with other settings is refused. Returns the meta dict (also ``cache.json``).

    Several processes (`tailkd.distributed`; every rank calls this): rank r writes shards r, r + W, r + 2W, ...;
    rank 0 alone claims the folder and writes ``cache.json`` (and the head), first. A shard's contents do not depend
    on who writes it (its rows, batches and tail-sample seed are the shard's), so W ranks write the files one
    process writes. A sharded teacher (`tailkd.sharded_teacher`: each forward is a collective) runs in lockstep:
    a rank with fewer forwards left pads with forwards of row 0 whose results are dropped. An error on one rank
    (a full disk while writing a shard) ends that rank's writing, not its lockstep forwards: it pads up to the
    common count too, and then every rank raises (`tailkd.distributed.raise_if_any`: the rank's own error, on the
    others a TailkdError naming it and its rank), so no rank waits in a collective for one that has left.
    """
    from tailkd import distributed as dist
    from tailkd.data import collate
    from tailkd.runs import progress_bar
    from tailkd.sharded_teacher import is_sharded

    if hidden_dtype not in HIDDEN_DTYPES:
        raise TailkdError(f"--hidden-dtype {hidden_dtype} is not one of {', '.join(HIDDEN_DTYPES)}")
    out = Path(out_dir)
    head = model_head(model, vocab_size or len(tokenizer))
    if not 1 <= k < head.spec.vocab_size:
        raise TailkdError(f"--k {k} must lie in [1, {head.spec.vocab_size}) (the vocabulary size); 64 is usual")
    if tail_samples < 0:
        raise TailkdError(f"--tail-samples {tail_samples} must be >= 0")
    n_rows = len(rows) if not max_rows else min(max_rows, len(rows))
    dev = head.weight.device
    probe = collate([rows[0]])["input_ids"][:, : min(rows.seq_len, 16)].to(dev)
    verify_head(model, probe, head)  # the cache applies the head itself: it must match the model's logits
    meta = cache_meta(model, tokenizer, head, k=k, corpus=corpus, seq_len=rows.seq_len, n_rows=n_rows,
                      teacher_name=teacher_name, hidden_states=hidden_states, hidden_dtype=hidden_dtype,
                      tail_samples=tail_samples, seed=seed, rows_per_shard=rows_per_shard)
    dist.on_main_then_all(lambda: claim_cache_dir(out, meta, head if hidden_states else None), main_only=True)
    chunk = chunk_size or default_chunk_size(head.spec.vocab_size)
    r, w = dist.rank(), dist.world()
    todo = []  # (shard, first row, end row) of this rank's shards not complete yet
    for i in range(r, meta["num_shards"], w):
        a, b = i * meta["rows_per_shard"], min((i + 1) * meta["rows_per_shard"], n_rows)
        if not _shard_complete(out / _shard_name(i), log):
            todo.append((i, a, b))
    forwards = sum(math.ceil((b - a) / batch_size) for _, a, b in todo)
    lockstep = is_sharded(model)  # FSDP2 shards: forwards are collective
    most = int(dist.max_over_ranks(forwards, dev)) if lockstep else forwards
    done, error = 0, None  # forwards run; the first error of this rank
    broken = [0, 0, 0]  # positions without a teacher distribution (cached as NaN), their rows, all positions written
    with progress_bar(total=sum(b - a for _, a, b in todo) * rows.seq_len, unit="tok", unit_scale=True,  # tokens/s,
                      desc="cache-teacher", dynamic_ncols=True, disable=not dist.is_main()) as bar:  # ETA
        try:
            for i, a, b in todo:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + i)  # per shard: resumed equals fresh
                parts = []
                for start in range(a, b, batch_size):
                    batch = collate([rows[j] for j in range(start, min(start + batch_size, b))])
                    ids = batch["input_ids"]
                    hidden = _teacher_forward(model, ids.to(dev), autocast_dtype, **model_inputs(batch, dev))
                    done += 1
                    part = _teacher_rows(hidden, head, k=k, tail_samples=tail_samples, generator=gen, chunk=chunk,
                                         want_hidden=hidden_states)
                    bad = part.pop("broken")  # [R, T]
                    broken = [broken[0] + int(bad.sum()), broken[1] + int(bad.any(1).sum()), broken[2] + bad.numel()]
                    if hidden_states:
                        part["hidden"] = part["hidden"].to(HIDDEN_DTYPES[hidden_dtype]).cpu()
                    part["row_hash"] = row_hash(ids)
                    parts.append(part)
                    bar.update(ids.numel())
                tensors = {key: torch.cat([p[key] for p in parts]).contiguous() for key in parts[0]}
                _save_shard(out / _shard_name(i), tensors)
                bar.set_postfix(shard=f"{i + 1}/{meta['num_shards']}")
        except Exception as exc:  # noqa: BLE001 - raised on every rank below, after this rank's lockstep forwards
            if w == 1:
                raise
            error = exc
        for _ in range(most - done if lockstep else 0):  # lockstep with the ranks that have more forwards left
            _teacher_forward(model, probe, autocast_dtype)
    dist.raise_if_any(error)
    mine = len(range(r, meta["num_shards"], w))
    written, skipped, *broken = dist.sum_over_ranks([len(todo), mine - len(todo), *broken], dev)
    dist.barrier()
    if dist.is_main():
        log(f"teacher cache {out}: {int(written)} shard(s) written, {int(skipped)} complete shard(s) kept"
            + (f" ({w} processes)" if w > 1 else ""))
        if broken[0]:
            dist.say(f"tailkd: warning: the teacher's logits are not finite (NaN or inf) at {int(broken[0])} of "
                f"{int(broken[2])} positions ({int(broken[1])} rows) written now: their log-probs are cached as NaN, "
                "as the online teacher gives them, so a training step that draws one of those rows has a non-finite "
                "loss and is skipped and counted (train.max_bad_steps); check the teacher's weights", err=True)
    return json.loads((out / META_FILE).read_text())


def cache_meta(model, tokenizer, head, *, k: int, corpus: dict, seq_len: int, n_rows: int, teacher_name: str,
               hidden_states: bool, hidden_dtype: str, tail_samples: int, seed: int,
               rows_per_shard: int | None) -> dict:
    """The ``cache.json`` of a cache of ``model`` (its LM head ``head``) over ``n_rows`` rows: what it was written
    with (compared on resume and at read time), its shard layout and dtypes."""
    from tailkd.vocab import tokenizer_fingerprint

    vocab, d = head.spec.vocab_size, head.weight.shape[1]
    per_token = bytes_per_token(k, hidden_size=d if hidden_states else 0, hidden_dtype=hidden_dtype,
                                tail_samples=tail_samples)
    rows_per_shard = int(rows_per_shard or max(1, SHARD_BYTES // (per_token * seq_len)))
    sha, sha_bf16 = weights_hashes(model, (None, torch.bfloat16))
    return {
        "format": FORMAT,
        "teacher": {"name": teacher_name, "class": model_class_name(model), "weights_sha256": sha,
                    "hidden_size": d,
                    "head": {"vocab_size": vocab, "scale": head.spec.scale, "softcap": head.spec.softcap},
                    "dtype": str(head.weight.dtype).removeprefix("torch.")},
        # outside "teacher" (an identity key on resume): a cache begun by an older tailkd, without it, still resumes
        "teacher_weights_sha256_bf16": sha_bf16,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "corpus": dict(corpus, seq_len=seq_len),
        "k": k, "vocab_size": vocab,
        "hidden_states": {"dtype": hidden_dtype, "size": d} if hidden_states else None,
        "tail_samples": tail_samples, "tail_sampler": TAIL_SAMPLER if tail_samples else None, "seed": seed,
        "rows_per_shard": rows_per_shard, "num_rows": n_rows,
        "num_shards": -(-n_rows // rows_per_shard),
        "dtypes": {"topk_ids": "int32", "topk_logprobs": "float32", "log_tail_mass": "float32", "row_hash": "int64",
                   **({"hidden": hidden_dtype} if hidden_states else {}),
                   **({"tail_ids": "int32", "tail_logprobs": "float32"} if tail_samples else {})},
        "bytes_per_token": per_token,
    }


def claim_cache_dir(out: Path, meta: dict, head=None) -> None:
    """Make ``out`` the cache described by ``meta``: refused if it holds another cache or other files; temporary
    files of killed writers removed (`checkpoint.left_by_dead_writer`: not the shard another run on ``out`` writes now);
    ``cache.json`` written once (and the teacher's LM head when ``head`` is given: a cache of hidden states needs
    it)."""
    meta_path = out / META_FILE
    if out.exists() and not out.is_dir():
        raise TailkdError(f"cache.out {out} is a file; choose a folder name with --out")
    if meta_path.is_file():
        old = read_meta(out)
        diff = _first_difference(_identity(old), _identity(meta))
        if diff and old.get("tail_samples") and old.get("tail_sampler") != TAIL_SAMPLER:  # no argument resumes it
            raise TailkdError(f"{out} holds a teacher cache whose tail samples an older tailkd drew; delete it and "
                              "run this command again, or choose another --out")
        if diff:
            raise TailkdError(f"{out} holds a teacher cache written with other settings ({diff}); resume with the "
                              f"same arguments, or delete {out} (or choose another --out) to write this one")
    else:
        check_cache_out(out)  # (CacheTeacherConfig.validate checks it first, before the teacher loads)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".tmp-*"):
            if left_by_dead_writer(stale.name, untagged=True):  # not a live writer's (a second run on out)
                stale.unlink(missing_ok=True)
        if not meta_path.is_file():
            atomic_write_text(meta_path, jsonfile.dumps({**meta, "created_unix": time.time()}, indent=1))
    except OSError as exc:
        raise TailkdError(f"could not write teacher cache {out} ({exc.strerror or exc}); free disk space or choose "
                          "another --out") from exc
    if head is not None and not (out / HEAD_FILE).is_file():
        vocab = meta["vocab_size"]
        tensors = {"weight": head.weight[:vocab].detach().cpu().contiguous()}
        if head.bias is not None:
            tensors["bias"] = head.bias[:vocab].detach().cpu().contiguous()
        _save_shard(out / HEAD_FILE, tensors)


def _shard_complete(path: Path, log) -> bool:
    """Whether shard ``path`` exists and verifies (a damaged one is named and will be rewritten)."""
    if not path.is_file():
        return False
    try:
        verify_shard(path)
        return True
    except TailkdError as exc:
        log(f"rewriting damaged shard: {exc}")
        return False


# --------------------------------------------------------------------------- reading


class CacheReader:
    """Cached teacher tensors for row indices of the run's training rows, checked against the run.

    ``k``: the run's K (TAD's loss.k; ≤ the cache's K: the top-K is truncated and the tail mass extended exactly).
    ``rows``: the run's number of training rows, every one of them cached.
    Shards are verified (sha256 of every tensor) the first time they are read.
    """

    def __init__(self, path, *, tokenizer_fingerprint: str | None = None, corpus_fingerprint: str | None = None,
                 split: str | None = None, seq_len: int | None = None, k: int | None = None,
                 teacher_weights_sha256: str | None = None, teacher_weights_sha256_bf16: str | None = None,
                 rows: int | None = None):
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise TailkdError(f"{self.path} is not a teacher cache (no {META_FILE}); build one with tailkd "
                              "cache-teacher")
        self.meta = read_meta(self.path)
        m = self.meta
        if m.get("format") != FORMAT:
            raise TailkdError(f"{self.path} has cache format {m.get('format')!r}, this tailkd reads {FORMAT}; "
                              "rebuild it")
        _check_meta(self.path, m)
        if m.get("tail_samples") and m.get("tail_sampler") != TAIL_SAMPLER:
            raise TailkdError(f"teacher cache {self.path} holds tail samples drawn by an older tailkd (uniformly where "
                              "the teacher's tail lies ~104+ nats below its top-K, rows whose tail term now counts); "
                              "delete it and run the same tailkd cache-teacher command again")
        self.check_run(tokenizer_fingerprint=tokenizer_fingerprint, corpus_fingerprint=corpus_fingerprint,
                       split=split, seq_len=seq_len, teacher_weights_sha256=teacher_weights_sha256,
                       teacher_weights_sha256_bf16=teacher_weights_sha256_bf16)
        self.k = int(k or m["k"])
        if self.k > m["k"]:
            raise TailkdError(f"teacher cache {self.path} holds the top-{m['k']} teacher ids, the run needs "
                              f"K={self.k}; use loss.k <= {m['k']} or rebuild the cache with --k {self.k}")
        self.num_rows = int(m["num_rows"])
        if rows is not None and self.num_rows < rows:  # refused now, not at the first step that draws such a row
            raise TailkdError(f"teacher cache {self.path} holds {self.num_rows} of the run's {rows} training rows "
                              "(cache-teacher --max-rows): a run reads every training row; cache them all: delete "
                              f"{self.path} (or choose another --out) and run tailkd cache-teacher with --max-rows 0")
        self.rows_per_shard = int(m["rows_per_shard"])
        self._verified: set[int] = set()
        missing = [_shard_name(i) for i in range(int(m["num_shards"])) if not (self.path / _shard_name(i)).is_file()]
        if missing:  # refused now, not at the first batch (maybe hours in) that reads a row of a missing shard
            raise self._unfinished(missing)

    def check_run(self, *, tokenizer_fingerprint: str | None = None, corpus_fingerprint: str | None = None,
                  split: str | None = None, seq_len: int | None = None, teacher_weights_sha256: str | None = None,
                  teacher_weights_sha256_bf16: str | None = None) -> None:
        """A one-line TailkdError naming the first of the run's tokenizer, corpus, split, seq_len and teacher weights
        that is not this cache's (those given; None is not compared). The constructor checks what it is given; a run
        checks what needs no model before any loads, the same way (`tailkd.prepare.check_before_models`)."""
        m = self.meta
        rebuild = "rebuild it with tailkd cache-teacher for this run's teacher, data and --seq-len"
        if split is not None and split != m["corpus"]["split"]:
            rebuild = f"a run reads the {split} rows: rebuild it with tailkd cache-teacher --split {split}"
        checks = [("tokenizer", tokenizer_fingerprint, m["tokenizer_fingerprint"]),
                  ("corpus", corpus_fingerprint, m["corpus"]["fingerprint"]),
                  ("split", split, m["corpus"]["split"]), ("seq_len", seq_len, m["corpus"]["seq_len"]),
                  ("teacher weights", teacher_weights_sha256, m["teacher"]["weights_sha256"]),
                  ("teacher weights", teacher_weights_sha256_bf16, m.get("teacher_weights_sha256_bf16"))]
        for what, run_value, cached in checks:
            if run_value is not None and run_value != cached:
                show = (lambda v: str(v)[:12]) if isinstance(cached, str) and len(str(cached)) > 20 else repr
                raise TailkdError(f"teacher cache {self.path} does not match this run: its {what} is {show(cached)}, "
                                  f"the run's is {show(run_value)}; {rebuild}")

    def check_rows_kind(self, task: str, sft_mode: str, document_attention: bool = False) -> None:
        """A one-line TailkdError where the cache's rows are of another kind than the run's, named (their digests
        would only differ): SFT rows (``corpus.settings.task``, cache-teacher --task sft) or packed text, SFT rows'
        ``sft_mode``, and whether the teacher read each packed document alone (``document_attention``: the run's
        `tailkd.documents.restarts_positions`; ``corpus.settings.document_attention``, absent in older caches)."""
        settings = self.meta["corpus"].get("settings") or {}
        cached = "sft" if settings.get("task") == "sft" else "pretrain"
        kind = {"sft": "SFT rows (cache-teacher --task sft)", "pretrain": "packed text rows"}
        if cached != task:
            raise TailkdError(f"teacher cache {self.path} holds {kind[cached]}, this run trains on {kind[task]}: "
                              f"rebuild it with tailkd cache-teacher --task {task}, or run with --task {cached}")
        if cached == "sft" and settings.get("sft_mode", sft_mode) != sft_mode:
            raise TailkdError(f"teacher cache {self.path} holds SFT rows of --data.sft_mode {settings['sft_mode']}, "
                              f"the run's are {sft_mode}: rebuild it with tailkd cache-teacher --data.sft_mode "
                              f"{sft_mode}, or run with --data.sft_mode {settings['sft_mode']}")
        apart = bool(settings.get("document_attention", False))
        if apart != bool(document_attention):
            how = {True: "each packed document alone", False: "the documents of a row together"}
            raise TailkdError(f"teacher cache {self.path} holds the teacher's outputs over {how[apart]}, this run "
                              f"reads {how[bool(document_attention)]}: rebuild it with tailkd cache-teacher "
                              f"--data.document_attention {str(not apart).lower()}, or run with "
                              f"--data.document_attention {str(apart).lower()}")

    def _unfinished(self, missing: list[str]) -> TailkdError:
        more = f" and {len(missing) - 1} more shard(s)" if len(missing) > 1 else ""
        return TailkdError(f"teacher cache {self.path} lacks {missing[0]}{more} (caching did not finish); run tailkd "
                           "cache-teacher again with the same arguments to complete it")

    def check_loss(self, loss_name: str, temperature: float = 1.0, cosine_weight: float = 0.0) -> str:
        """TailkdError if this cache cannot give ``loss_name``; else its `cache_loss_description` (for the run log)."""
        from tailkd.registry import LOSSES

        spec = LOSSES[loss_name]
        if not self.has_hidden:
            if spec.needs_teacher and not spec.sparse:
                raise TailkdError(f"loss.name={loss_name} needs the teacher's full distribution, which a top-K cache "
                                  f"({self.path}) does not hold; rebuild it with --hidden-states or drop the cache")
            if temperature != 1.0:
                raise TailkdError(f"a top-K cache holds log-probs at temperature 1, loss.temperature={temperature}; "
                                  "use 1 or rebuild the cache with --hidden-states")
            if cosine_weight > 0:
                raise TailkdError("loss.cosine_weight > 0 needs the teacher's hidden states; rebuild the cache with "
                                  "--hidden-states")
        return cache_loss_description(self.meta, loss_name, k=self.k)

    @property
    def has_hidden(self) -> bool:
        return self.meta.get("hidden_states") is not None

    @property
    def tail_samples(self) -> int:
        return int(self.meta.get("tail_samples") or 0)

    def head(self, device="cpu") -> Head:
        """The teacher's LM head stored with ``--hidden-states`` (weights checked), as a `tailkd.head.Head`."""
        if not self.has_hidden:
            raise TailkdError(f"teacher cache {self.path} has no hidden states; rebuild it with --hidden-states")
        tensors = verify_shard(self.path / HEAD_FILE)
        h = self.meta["teacher"]["head"]
        spec = HeadSpec(vocab_size=h["vocab_size"], scale=h["scale"], softcap=h["softcap"])
        return Head(tensors["weight"].to(device), tensors.get("bias", None), spec)

    def _shard(self, i: int) -> Path:
        path = self.path / _shard_name(i)
        if not path.is_file():
            raise self._unfinished([path.name])
        if i not in self._verified:
            verify_shard(path)
            self._verified.add(i)
        return path

    def rows(self, indices, *, input_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Cached tensors of rows ``indices`` (ints), stacked [B, T, ...] in that order (K not truncated).

        ``input_ids`` [B, T]: the run's rows; their hashes must equal the cached ones (alignment check).
        """
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < self.num_rows:
                raise TailkdError(f"row {i} is not in teacher cache {self.path} ({self.num_rows} rows cached): a run "
                                  f"reads every training row; cache them all: delete {self.path} (or choose another "
                                  "--out) and run tailkd cache-teacher with --max-rows 0")
        out: dict[str, list] = {}
        by_shard: dict[int, list[int]] = {}
        for pos, i in enumerate(indices):
            by_shard.setdefault(i // self.rows_per_shard, []).append(pos)
        slots: list = [None] * len(indices)
        for s, positions in by_shard.items():
            with safe_open(str(self._shard(s)), "pt") as fh:
                names = list(fh.keys())
                for pos in positions:
                    r = indices[pos] - s * self.rows_per_shard
                    slots[pos] = {n: fh.get_slice(n)[r:r + 1] for n in names}
        for name in slots[0]:
            out[name] = torch.cat([row[name] for row in slots])
        if input_ids is not None and not torch.equal(out["row_hash"], row_hash(input_ids)):
            raise TailkdError(f"the rows read from teacher cache {self.path} do not hold the run's tokens (row hash "
                              "mismatch): the cache and the training data are not aligned; rebuild the cache")
        return out

    def sparse_teacher(self, indices, *, input_ids: torch.Tensor | None = None, device="cpu") -> SparseTeacher:
        """Rows as a `divergences.SparseTeacher` truncated to the run's K, with tail support points when cached.

        With K_run < K_cache the ranks K_run..K_cache−1 are known exactly: α^T_{K_run} = α^T_{K_cache} + Σ their p,
        and they join the tail support points with weights p_i (samples keep weights α^T_{K_cache}/M). The weights
        are given as their logs (`divergences.SparseTeacher.tail_log_weights`), as α^T is.
        """
        got = self.rows(indices, input_ids=input_ids)
        k, kc = self.k, self.meta["k"]
        ids, lp, la = got["topk_ids"], got["topk_logprobs"].double(), got["log_tail_mass"].double()
        vocab = self.meta["vocab_size"]
        for key in ("topk_ids", "tail_ids"):  # on the host, before a device would assert on a bad gather index
            if key in got and got[key].numel() and not bool(((got[key] >= 0) & (got[key] < vocab)).all()):
                raise TailkdError(f"teacher cache {self.path}: {key} outside the vocabulary [0, {vocab}); the cache "
                                  "is damaged: rebuild it")
        extra_ids, extra_lp = ids[..., k:], lp[..., k:]
        if k < kc:
            la = torch.logaddexp(la, torch.logsumexp(extra_lp, dim=-1))
        tail_ids = tail_lp = tail_lw = None
        if self.tail_samples:
            m = self.tail_samples
            samples_lw = (got["log_tail_mass"].double() - math.log(m))[..., None].expand(*got["tail_ids"].shape)
            tail_ids = torch.cat([extra_ids, got["tail_ids"]], dim=-1)
            tail_lp = torch.cat([extra_lp, got["tail_logprobs"].double()], dim=-1)
            tail_lw = torch.cat([extra_lp, samples_lw], dim=-1)  # log w_j: log p_i, log(α^T_{K_cache}/M)
        def to(x, dtype=None):
            return None if x is None else x.to(device=device, dtype=dtype or x.dtype)

        return SparseTeacher(to(ids[..., :k]), to(lp[..., :k], torch.float32), to(la, torch.float32),
                             to(tail_ids), to(tail_lp, torch.float32), to(tail_lw, torch.float32))

    def teacher_hidden(self, indices, *, input_ids: torch.Tensor | None = None, device="cpu") -> torch.Tensor:
        """Cached final hidden states [B, T, d] of rows ``indices`` (feed them with `head()` to the fused path)."""
        if not self.has_hidden:
            raise TailkdError(f"teacher cache {self.path} has no hidden states; rebuild it with --hidden-states")
        return self.rows(indices, input_ids=input_ids)["hidden"].to(device)


def open_cache(path, *, tokenizer=None, corpus_fingerprint: str | None = None, split: str = "train",
               seq_len: int | None = None, k: int | None = None, teacher_model=None,
               rows: int | None = None) -> CacheReader:
    """`CacheReader` checked against the run's tokenizer, corpus, split, seq_len, K, teacher weights and number of
    training rows.

    ``teacher_model`` loaded in the dtype the cache was written with is compared by its weights hash; loaded in
    another (a bf16 cache from a GPU and an fp32 teacher on a CPU hash differently with the same weights), by the
    hash of its weights rounded to bf16 (``teacher_weights_sha256_bf16``; a cache written before it had that key is
    not compared)."""
    from tailkd.vocab import tokenizer_fingerprint

    sha = sha_bf16 = None
    if teacher_model is not None:
        meta_path = Path(path) / META_FILE
        meta = read_meta(path) if meta_path.is_file() else {}
        cached = meta.get("teacher", {}).get("dtype") if isinstance(meta.get("teacher"), dict) else None
        loaded = str(next(teacher_model.parameters()).dtype).removeprefix("torch.")
        if cached in (None, loaded):
            sha = weights_hash(teacher_model)
        elif meta.get("teacher_weights_sha256_bf16"):
            sha_bf16 = weights_hash(teacher_model, torch.bfloat16)
    return CacheReader(path, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
                       corpus_fingerprint=corpus_fingerprint, split=split, seq_len=seq_len, k=k,
                       teacher_weights_sha256=sha, teacher_weights_sha256_bf16=sha_bf16, rows=rows)


# --------------------------------------------------------------------------- what a run gets from a cache


def cache_loss_description(meta: dict, loss_name: str, k: int | None = None) -> str:
    """One line for the run log / README: which loss a run from this cache computes, and its approximation."""
    from tailkd.registry import LOSSES

    spec = LOSSES[loss_name]
    kc = meta["k"]
    hidden = meta.get("hidden_states")
    m = int(meta.get("tail_samples") or 0)
    if not spec.needs_teacher:
        return f"{loss_name}: no teacher; the teacher cache is not used"
    if hidden:
        return (f"{loss_name}: exact, the teacher's logits re-computed from its cached final hidden states "
                f"({hidden['dtype']}, d={hidden['size']}) and its LM head (equal to the online teacher up to the "
                f"{hidden['dtype']} rounding of the hidden states)")
    if not spec.sparse:
        return (f"{loss_name}: NOT available from a top-K cache (needs the full teacher distribution); cache hidden "
                "states or use the online teacher")
    kk = (k or kc) if "k" in spec.knobs else kc  # a loss with a K of its own truncates the cache; others use all of it
    weight = "β(X)·" if spec.tail_weight else ""
    if m:
        exact = "; β(X) exact from the cached tail masses" if spec.tail_weight else " (so the KL itself in expectation)"
        return (f"{loss_name}: D_KL1 exact over the teacher top-{kk} + rest bucket, plus an unbiased {m}-sample "
                f"estimate of {weight}α^T·D_KL2 from tail tokens sampled from the teacher's renormalised tail "
                f"(Anshumann et al. 2025 sparse logit sampling){exact}")
    return (f"{loss_name}: D_KL1 only, the exact K+1 bucket loss with K={kk} (top-{kk} teacher log-probs + the rest "
            f"bucket α^T, no renormalisation), a lower bound of the full loss whose value depends on K; the tail term "
            f"{weight}α^T·D_KL2 is DROPPED (a top-K cache cannot give it){', so β has no effect' if weight else ''}")
