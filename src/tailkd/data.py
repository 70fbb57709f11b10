"""Token rows for the trainer: packed pretraining rows, the batch collation, a resumable row sampler.

The row contract every data source meets (`PackedRows` here, `tailkd.sft.SFTRows`, the on-policy rows of
`tailkd.onpolicy`): int64 ``[T]`` tensors ``input_ids``, ``labels`` (shifted ONCE, at the source;
``IGNORE_INDEX`` = -100 marks a position without a target) and ``segment_ids``. Text becomes a tokenised
corpus on disk in `tailkd.corpus`; this module reads it.

1. ``PackedRows``: row i = tokens ``[i*T, i*T + T + 1)`` of a corpus split (flat uint32 token ids).
2. ``collate`` / ``collate_rows``: stack rows into ``[B, T]`` batches.
3. ``RowSampler`` + ``batches``: an infinite, seeded order over rows that resumes exactly.

A row with T = 5 (rows overlap by one token so that every position has a next-token label)::

    tokens       a  b  c  E  d  e  f  E  g ...        (E = EOS, appended after each document)
    input_ids    a  b  c  E  d                         tokens[0:5]
    labels       b  c  E  d  e                         tokens[1:6]   (-100 would mean "ignore")
    segment_ids  0  0  0  0  1                         +1 right AFTER each EOS: the EOS closes its document

By default no position ids: none are passed to the model, which numbers a row's positions 0..T-1 itself (no
per-document reset). With ``data.document_attention`` (`tailkd.documents`) packed rows also carry ``position_ids``
(`document_positions`: 0 1 2 3 0 above), which every forward over rows passes (`model_inputs`): each document
then attends to itself alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tailkd.errors import TailkdError

IGNORE_INDEX = -100  # the label of a position without a target: the one definition, imported everywhere
TOKEN_DTYPE = np.uint32  # vocabularies exceed 65535 (e.g. 128k, 151k), so no uint16
TOKEN_BYTES = np.dtype(TOKEN_DTYPE).itemsize
TRAIN_FILE, HELDOUT_FILE, META_FILE = "train.bin", "heldout.bin", "meta.json"  # a prepared corpus's files


def content_digest(parts) -> str:
    """SHA-256 (hex) of a JSON-able description of rows, NumPy arrays included by their bytes: the ``digest`` of a
    row source (``PackedRows``, ``tailkd.sft.SFTRows``), which a checkpoint keeps so that ``--resume`` notices rows
    whose content changed (`RowSampler`)."""
    h = hashlib.sha256()

    def add(x) -> None:
        if isinstance(x, np.ndarray):
            h.update(f"array {x.dtype.str} {x.shape}|".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, (list, tuple)):
            h.update(f"list {len(x)}|".encode())
            for item in x:
                add(item)
        elif isinstance(x, dict):
            h.update(f"dict {len(x)}|".encode())
            for key in sorted(x):
                add(str(key))
                add(x[key])
        else:
            h.update(f"{json.dumps(x)}|".encode())

    add(parts)
    return h.hexdigest()


# --------------------------------------------------------------------------- packed rows


class PackedRows(Dataset):
    """Map-style dataset of ``seq_len``-token rows over a flat uint32 token file (memory-mapped).

    Row i reads tokens ``[i*T, i*T + T + 1)`` and returns int64 tensors of shape ``[T]``:
    ``input_ids = tokens[:-1]``, ``labels = tokens[1:]`` (shifted once, here; the trainer never
    shifts again; ``IGNORE_INDEX`` would mark a position without target, none in pretraining rows),
    ``segment_ids`` (document index within the row, +1 right after each EOS). ``len()`` counts full rows;
    the last partial row is dropped.

    ``eos_id`` defaults to the one in the ``meta.json`` next to ``bin_path``; ``None`` there (a corpus
    prepared with ``append_eos=False``) makes every row one segment. ``what`` names the data in the refusal of a file
    shorter than one row (else the file). ``restart_positions`` (``data.document_attention``; set after
    construction, as `tailkd.prepare.setup_data` does): rows also carry ``position_ids`` that restart at each
    document (`tailkd.documents`).
    """

    restart_positions = False

    def __init__(self, bin_path: Path, seq_len: int, *, eos_id: int | None | str = "meta", what: str = ""):
        self.path = Path(bin_path)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise TailkdError(f"--seq-len must be a positive whole number of tokens, got {seq_len!r}")
        self.seq_len = seq_len
        if not self.path.is_file():
            raise TailkdError(f"token file {self.path} does not exist; prepare the corpus first (prepare_corpus)")
        size = self.path.stat().st_size
        if size % TOKEN_BYTES:
            raise TailkdError(f"{self.path} is not a flat {np.dtype(TOKEN_DTYPE).name} token file (size {size}); "
                              "prepare the corpus again")
        meta_path = self.path.parent / META_FILE
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None
        if eos_id == "meta":
            if meta is None:
                raise TailkdError(f"no {META_FILE} next to {self.path}, so the EOS id is unknown; pass eos_id=...")
            eos_id = meta["eos_id"]
        self.eos_id = eos_id
        token_sha = (meta or {}).get("sha256", {}).get(self.path.name)  # None: a corpus of an older tailkd
        self.digest = None if token_sha is None else content_digest(
            {"tokens": token_sha, "seq_len": seq_len, "eos_id": eos_id})
        self.num_tokens = size // TOKEN_BYTES
        self.num_rows = max(0, (self.num_tokens - 1) // seq_len)
        if self.num_rows == 0:
            fix = f"a --seq-len of at most {self.num_tokens - 1}" if self.num_tokens >= 2 else "a smaller --seq-len"
            more = "more data or a larger data.heldout_fraction" if self.path.name == HELDOUT_FILE else "more data"
            named = f"{what} (its tokens: {self.path})" if what else str(self.path)  # the data, not only its cache
            raise TailkdError(f"{named} holds {self.num_tokens} tokens, fewer than one row of --seq-len "
                              f"{seq_len} needs ({seq_len + 1}); use {fix} or {more}")
        self._tokens = None  # opened lazily, so the dataset pickles cheaply into DataLoader workers

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    @property
    def tokens(self) -> np.memmap:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")
        return self._tokens

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.num_rows <= i < self.num_rows:
            raise IndexError(f"row {i} out of range for {self.num_rows} rows")
        start = (i % self.num_rows) * self.seq_len
        chunk = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))  # (T+1,)
        input_ids, labels = chunk[:-1].clone(), chunk[1:].clone()  # (T,), (T,)
        if self.eos_id is None:
            segment_ids = torch.zeros_like(input_ids)
        else:
            is_eos = (input_ids == self.eos_id).long()
            segment_ids = torch.cumsum(is_eos, 0) - is_eos  # EOS ends its document; the next token starts a new one
        row = {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids}
        if self.restart_positions:
            row["position_ids"] = document_positions(segment_ids)
        return row

    def max_label(self) -> int:
        """The largest label of the rows: of tokens 1..num_rows·T (row i's labels are tokens i·T+1 .. i·T+T)."""
        return int(self.tokens[1:self.num_rows * self.seq_len + 1].max())


def max_label(rows) -> int:
    """The largest label of ``rows`` (IGNORE_INDEX where none has a target): read from the token file at once for
    `PackedRows` (billions of tokens), else row by row: any rows (`tailkd.sft.SFTRows`, a list), or the label ids of
    each (select-data's documents)."""
    if hasattr(rows, "max_label"):
        return rows.max_label()
    labels = (torch.as_tensor(row["labels"] if isinstance(row, dict) else row) for row in rows)
    return max((int(y.max()) for y in labels if y.numel()), default=IGNORE_INDEX)


def document_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Each position's index within its document, int64 of ``segment_ids``' shape ``[..., T]``: 0 where the segment
    id changes (and at the row's first position), then 1, 2, ... — the ``position_ids`` of a packed row."""
    idx = torch.arange(segment_ids.shape[-1]).expand(segment_ids.shape)
    starts = torch.ones(segment_ids.shape, dtype=torch.bool)
    starts[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values  # the start of each position's document
    return (idx - first).contiguous()


def model_inputs(batch: dict, device=None) -> dict:
    """The keyword arguments a forward over ``batch``'s rows takes besides ``input_ids``: ``{"position_ids": ...}``
    (on ``device`` where given) where the rows carry them (``data.document_attention``), else ``{}``."""
    positions = batch.get("position_ids")
    if positions is None:
        return {}
    return {"position_ids": positions if device is None else positions.to(device)}


def collate(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack row dicts into ``[B, T]`` tensors."""
    if not rows:
        raise ValueError("collate needs at least one row")
    return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}


# --------------------------------------------------------------------------- sampling


class RowSampler:
    """Infinite iterator over row indices: epoch e visits every row once, in the order of
    ``torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + e))`` (or 0..n-1 if
    not ``shuffle``). ``state_dict()`` after k draws + ``load_state_dict`` on a new sampler continues
    with draw k+1, across epoch boundaries too.

    ``digest``: the rows' content (``PackedRows.digest``, ``SFTRows.digest``; None when unknown), kept in the state:
    ``load_state_dict`` refuses a saved order over rows of other content (data edited between a kill and
    ``--resume``, the row count unchanged), or with ``force`` (``--force``) sets ``rows_changed`` and continues over
    the new rows."""

    def __init__(self, num_rows: int, *, seed: int, shuffle: bool = True, digest: str | None = None,
                 force: bool = False):
        if num_rows < 1:
            raise TailkdError("no training rows to sample; use a smaller --seq-len or more data")
        self.num_rows, self.seed, self.shuffle = int(num_rows), int(seed), bool(shuffle)
        self.digest, self.force = digest, bool(force)
        self.rows_changed = False  # set by a forced load_state_dict over rows of other content
        self.epoch = 0
        self.position = 0  # index into this epoch's order of the next row to return; always < num_rows
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_rows)
        return torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __iter__(self) -> RowSampler:
        return self

    def __next__(self) -> int:
        if self._order is None:
            self._order = self._epoch_order()
        row = int(self._order[self.position])
        self.position += 1
        if self.position == self.num_rows:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return row

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_rows": self.num_rows, "shuffle": self.shuffle, "digest": self.digest}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_rows", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise TailkdError(f"the saved data order has {key}={state[key]}, this run {getattr(self, key)}: the "
                                  "training corpus or --seq-len changed since the checkpoint; resume with the same "
                                  "data and settings")
        if not 0 <= state["position"] < self.num_rows:
            raise TailkdError(f"saved sampler position {state['position']} is outside 0..{self.num_rows - 1}; "
                              "resume with the same data and --seq-len")
        saved = state.get("digest")  # None: a checkpoint (or corpus) from before digests were kept
        if saved is not None and self.digest is not None and saved != self.digest:
            if not self.force:
                raise TailkdError("the training rows differ from the checkpoint's: the data changed since the run "
                                  "started (the same number of rows, other tokens); resume with the run's own data, "
                                  "start a new run with another --out, or pass --force to continue over the new rows")
            self.rows_changed = True  # the trainer warns (rank 0)
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order = None


def collate_rows(rows, index: Sequence[int]) -> dict[str, torch.Tensor]:
    """Rows ``index`` of ``rows`` as `collate` stacks them, plus ``row_index`` ``[B]``: the rows' places, by which
    a teacher cache (`tailkd.cache`) finds their cached teacher outputs."""
    batch = collate([rows[i] for i in index])
    batch["row_index"] = torch.tensor(list(index), dtype=torch.long)
    return batch


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """``x`` on ``device``; from the host to CUDA through pinned memory without waiting for the device (the copy
    queues behind the work already launched)."""
    device = torch.device(device)
    if x.device == device:
        return x
    if x.device.type == "cpu" and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def batches(rows: PackedRows, sampler: RowSampler, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Infinite ``[B, T]`` batches (`collate_rows`) in the sampler's order. Draws lazily (no prefetch), so the
    sampler's state always matches the batches handed out."""
    if batch_size < 1:
        raise TailkdError(f"batch size must be at least 1, got {batch_size}")
    while True:
        yield collate_rows(rows, [next(sampler) for _ in range(batch_size)])


def check_seq_len(seq_len: int, model_max: int | None) -> None:
    """``TailkdError`` unless ``1 <= seq_len <= model_max`` (``model_max=None``: no known limit)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise TailkdError(f"--seq-len must be a positive whole number of tokens, got {seq_len!r}")
    if model_max is not None and seq_len > model_max:
        raise TailkdError(f"--seq-len {seq_len} exceeds the model's maximum context of {model_max} tokens; "
                          f"use --seq-len {model_max} or less")
