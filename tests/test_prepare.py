"""tailkd.prepare's small decisions, each alone (the whole set-up runs in tests/test_distill.py and the others)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tailkd import corpus, fused, prepare
from tailkd import data as data_mod
from tailkd import distributed as dist
from tailkd.config import DistillConfig
from tailkd.errors import TailkdError
from tailkd.train import lr_lambda


def test_the_cache_k_is_the_loss_s_k_only_for_a_loss_with_a_k():
    cfg = DistillConfig()
    cfg.loss.name, cfg.loss.k = "tad", 7
    assert prepare._cache_k(cfg) == 7
    cfg.loss.name = "kd"  # KD reads a cache's top-K as it holds it
    assert prepare._cache_k(cfg) is None


def test_a_cache_is_refused_only_with_a_teacher_vocabulary_extending_the_student_s():
    cfg = DistillConfig()
    cfg.teacher.cache = "some/cache"
    prepare.check_cache_vocab(cfg, 100, 100)
    with pytest.raises(TailkdError, match=r"^teacher\.cache does not combine with a teacher vocabulary extending the "
                                          r"student's \(the student's 100 token ids of the teacher's 101\)"):
        prepare.check_cache_vocab(cfg, 100, 101)
    cfg.teacher.cache = None
    prepare.check_cache_vocab(cfg, 100, 101)  # the online teacher, renormalised over the shared ids


def test_the_shared_vocabulary_is_measured_on_the_initial_evaluation_s_rows():
    cfg = DistillConfig()
    cfg.data.eval_rows = 4
    held, train = list(range(10)), list(range(20))
    assert prepare.shared_vocab_rows(cfg, held, train) == (held, 4, "the first 4 held-out rows")
    assert prepare.shared_vocab_rows(cfg, held[:3], train) == (held[:3], 3, "the first 3 held-out rows")
    assert prepare.shared_vocab_rows(cfg, [], train) == (train, 4, "the first 4 training rows (no held-out rows)")


def _rows(n: int, seq_len: int = 3) -> list[dict]:
    return [{"input_ids": torch.full((seq_len,), i), "labels": torch.full((seq_len,), i),
             "segment_ids": torch.zeros(seq_len, dtype=torch.long)} for i in range(n)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_batches_share_the_rows_out_and_every_rank_yields_as_many_batches(monkeypatch, world):
    """Rank r takes rows r::W, batch_size / W at a time; every rank yields ceil(ceil(n / W) / per batch) batches, a
    rank without rows left a masked row 0 (a forward that adds nothing)."""
    rows, n, batch_size = _rows(10), 7, 4
    per_batch = max(1, batch_size // world)
    seen, counts = [], set()
    monkeypatch.setattr(dist, "world", lambda: world)
    for r in range(world):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        batches = list(prepare.rank_batches(rows, n, batch_size, row_tokens=3, vocab=5))
        counts.add(len(batches))
        for b in batches:
            valid = b["labels"][:, 0] != data_mod.IGNORE_INDEX
            assert len(b["input_ids"]) <= per_batch
            if not bool(valid.any()):
                assert b["input_ids"].tolist() == [[0, 0, 0]]  # the masked row 0
            seen += b["input_ids"][valid, 0].tolist()
            assert all(i % world == r for i in b["input_ids"][valid, 0].tolist())
    assert counts == {math.ceil(math.ceil(n / world) / per_batch)}
    assert sorted(seen) == list(range(n))  # each of rows 0..n-1 once, none past n


def test_rank_batches_hold_at_most_a_gib_of_float32_logits(monkeypatch):
    monkeypatch.setattr(fused, "AUTO_BYTES", 4 * 3 * 5 * 2)  # two rows of 3 tokens x 5 float32 logits
    batches = list(prepare.rank_batches(_rows(10), 7, 8, row_tokens=3, vocab=5))
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 2, 1]


def test_epochs_set_max_steps_to_whole_optimizer_steps():
    cfg = DistillConfig()
    cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum = 1.5, 2, 3
    prepare.set_steps_from_epochs(cfg, 10)  # 15 rows, 6 per optimizer step: 3 steps (the last one partial)
    assert cfg.train.max_steps == 3
    cfg.train.epochs = 0.01
    prepare.set_steps_from_epochs(cfg, 10)
    assert cfg.train.max_steps == 1


def test_the_global_micro_batch_splits_evenly_over_the_processes(monkeypatch):
    monkeypatch.setattr(dist, "world", lambda: 4)
    prepare.check_batch_split(8)
    with pytest.raises(TailkdError, match=r"^train\.batch_size=6 is the GLOBAL micro-batch and must split evenly over "
                                          r"the 4 processes; use --batch-size 8$"):
        prepare.check_batch_split(6)


def test_fused_loss_under_fsdp(monkeypatch):
    """FSDP shards the LM head the fused layer reads: on is refused, auto takes full logits; the auto rule counts one
    rank's micro-batch (batch_size / W rows)."""
    cfg = DistillConfig()
    cfg.train.batch_size, cfg.data.seq_len = 4, 8
    monkeypatch.setattr(fused, "AUTO_BYTES", 4 * 16 * 10 - 1)  # a micro-batch of 16 tokens x 10 logits is over it
    monkeypatch.setattr(dist, "world", lambda: 2)  # 2 rows x 8 tokens = 16 per rank
    cfg.train.fused_loss = "auto"
    assert prepare.choose_loss_path(cfg, 10)
    monkeypatch.setattr(dist, "world", lambda: 4)  # 8 tokens per rank: under it
    assert not prepare.choose_loss_path(cfg, 10)
    monkeypatch.setattr(dist, "world", lambda: 2)
    cfg.train.parallel = "fsdp"
    assert not prepare.choose_loss_path(cfg, 10)
    cfg.train.fused_loss = "on"
    with pytest.raises(TailkdError, match=r"^train\.fused_loss=on does not combine with train\.parallel=fsdp"):
        prepare.choose_loss_path(cfg, 10)


def test_a_chunk_size_given_is_the_run_s_on_any_device():
    cfg = DistillConfig()
    cfg.train.loss_chunk_size = 512
    # on CUDA too: given, it is not read from the free memory (no device is touched: this runs without one)
    assert prepare.run_loss_chunk(cfg, 100, None, torch.device("cuda")) == 512
    assert prepare.run_loss_chunk(cfg, 100, None, torch.device("cpu")) == 512
    cfg.train.loss_chunk_size = 0
    assert prepare.run_loss_chunk(cfg, 100, None, torch.device("cpu")) is None


def _model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    model[0].weight.requires_grad_(False)  # frozen: in no group
    return model


def test_adamw_decays_matrices_only_and_leaves_frozen_parameters_out():
    cfg = DistillConfig()
    cfg.train.lr, cfg.train.weight_decay, cfg.train.adam_betas = 1e-3, 0.1, [0.8, 0.9]
    model = _model()
    opt = prepare.make_optimizer(model, cfg)
    decay, no_decay = opt.param_groups
    assert [p is model[2].weight for p in decay["params"]] == [True] and decay["weight_decay"] == 0.1
    assert {id(p) for p in no_decay["params"]} == {id(model[1].weight), id(model[1].bias), id(model[2].bias)}
    assert no_decay["weight_decay"] == 0.0 and decay["betas"] == (0.8, 0.9) and decay["lr"] == 1e-3
    assert not decay["fused"]  # on the CPU: torch's default


def test_a_resumed_optimizer_takes_the_run_s_settings_and_the_schedule_s_place():
    """After a checkpoint's optimizer and schedule are loaded (their saved lr, betas, weight decay), a resume with
    --force takes the run's: the lr of the schedule's next step computed from the new lr, betas and decay in both
    groups (no decay on vectors), get_last_lr() saying so; the step count stays the checkpoint's."""
    cfg = DistillConfig()
    t = cfg.train
    t.lr, t.weight_decay, t.adam_betas, t.warmup_steps, t.max_steps, t.min_lr_ratio = 1e-3, 0.1, [0.9, 0.95], 2, 10, 0.1
    opt = prepare.make_optimizer(_model(), cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, warmup=t.warmup_steps, total=t.max_steps, min_ratio=t.min_lr_ratio))
    for _ in range(4):
        opt.step()
        sched.step()
    t.lr, t.weight_decay, t.adam_betas = 5e-4, 0.01, [0.5, 0.6]
    prepare.use_optimizer_settings(opt, sched, t)
    want = 5e-4 * lr_lambda(4, warmup=2, total=10, min_ratio=0.1)
    assert [g["lr"] for g in opt.param_groups] == sched.get_last_lr() == [want, want]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert all(g["betas"] == (0.5, 0.6) and g["initial_lr"] == 5e-4 for g in opt.param_groups)
    assert sched.base_lrs == [5e-4, 5e-4] and sched.last_epoch == 4
    sched.step()  # the schedule goes on from the new lr
    assert opt.param_groups[0]["lr"] == 5e-4 * lr_lambda(5, warmup=2, total=10, min_ratio=0.1)


def test_data_settings_name_the_corpus_they_prepare(tmp_path):
    cfg = DistillConfig()
    cfg.data.doc_sep, cfg.data.doc_eos, cfg.data.heldout_fraction = "line", False, 0.2
    assert prepare.corpus_settings(cfg.data) == {"doc_sep": "line", "append_eos": False, "heldout_fraction": 0.2}
    cfg.data.cache_dir = str(tmp_path / "c")
    assert prepare.data_cache_root(cfg.data) == tmp_path / "c"
    cfg.data.cache_dir = None
    assert prepare.data_cache_root(cfg.data) == corpus.default_cache_root()
    pydoc = prepare.text_paths(["builtin:pydoc", "a.txt"], cfg.data, tmp_path)
    assert pydoc == [corpus.python_docs_corpus(tmp_path), Path("a.txt")] and pydoc[0].is_file()
    cfg.data.paths = ["a.txt"]
    assert prepare.pretrain_paths(cfg.data, tmp_path) == [Path("a.txt")]


def test_setup_models_drops_the_teacher_of_a_clm_run_and_freezes_a_loaded_student_s_embeddings(tmp_path):
    """A loss without a teacher (clm) keeps no teacher after the student is built from it (no teacher forward, no
    teacher in the run's summary); a loaded student (``student.path``) with ``freeze_embeddings`` has its input
    embeddings frozen, as a student built with it."""
    from tiny import make_teacher_dir

    cfg = DistillConfig()
    cfg.teacher.path = str(make_teacher_dir(tmp_path / "teacher", layers=2, hidden=32, train_steps=0))
    cfg.student.num_layers = 1
    cfg.loss.name = "clm"
    teacher, student, tokenizer, vocab, teacher_vocab, table = prepare.setup_models(cfg, torch.device("cpu"))
    assert teacher is None and table is not None and student.config.num_hidden_layers == 1
    assert vocab == teacher_vocab == len(tokenizer)
    cfg.loss.name = "kd"
    assert prepare.setup_models(cfg, torch.device("cpu"))[0] is not None
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    cfg.student.path, cfg.student.freeze_embeddings = str(tmp_path / "student"), True
    _, loaded, _, _, _, table = prepare.setup_models(cfg, torch.device("cpu"))
    assert table is None and not loaded.get_input_embeddings().weight.requires_grad
    others = [p for name, p in loaded.named_parameters() if "embed" not in name and "lm_head" not in name]
    assert others and all(p.requires_grad for p in others)


def test_the_online_teacher_s_head_is_checked_on_the_fused_path_and_hands_over_its_hidden_states(tmp_path):
    """On the fused path the teacher's LM head is checked against its own logits (here a hook doubles them, a
    transform no HeadSpec knows: refused); on full logits there is nothing to check. The online teacher returns its
    last hidden states where the loss has a cosine term (loss.cosine_weight > 0), only there."""
    from tiny import make_teacher_dir
    from transformers import AutoModelForCausalLM

    path = make_teacher_dir(tmp_path / "teacher", layers=2, hidden=32, train_steps=0)
    student, teacher = AutoModelForCausalLM.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    cfg = DistillConfig()
    cfg.loss.name = "kd"
    probe = torch.arange(8)[None]
    vocab = student.config.vocab_size

    def signal(fused_path):
        return prepare.setup_teacher_signal(cfg, teacher, student, None, None, vocab, torch.device("cpu"), None,
                                            fused_path, probe, 10)

    online, text = signal(True)
    assert text == "kd: exact, online teacher" and not online.want_hidden
    cfg.loss.cosine_weight = 0.5
    assert signal(False)[0].want_hidden
    teacher.get_output_embeddings().register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(TailkdError, match=r"^the fused loss layer does not reproduce LlamaForCausalLM's logits"):
        signal(True)
    signal(False)  # full logits: the model's own, whatever its head does


def _checkpointed_llama(every: int, dropout: float = 0.1):
    """A 4-layer Llama with attention dropout, in train mode, its layers checkpointed every ``every`` (0: none)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, attention_dropout=dropout)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    text = prepare.checkpoint_activations(model, every) if every else ""
    return model, text


def _grads_and_saved_bytes(model):
    """The gradients of one forward and backward (dropout seeded), and the bytes autograd saved for the backward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    ids = torch.arange(2 * 24).reshape(2, 24) % 97
    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
        forward_bytes = sum(saved)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, forward_bytes


def test_activation_checkpointing_gives_the_same_gradients_from_fewer_saved_activations():
    """--train.activation_checkpointing N: transformers' checkpointing of every N-th decoder layer. The recompute runs
    the same operations on the same inputs with the RNG restored (dropout draws the same masks), so the gradients
    are bit for bit those of kept activations; what the forward saves for the backward shrinks: a checkpointed
    layer keeps its input alone (of the ~10 tensors of B x T x d or more its attention and MLP keep otherwise)."""
    plain, _ = _checkpointed_llama(0)
    grads, plain_bytes = _grads_and_saved_bytes(plain)
    for every, layers in ((1, 4), (2, 2)):
        model, text = _checkpointed_llama(every)
        assert text == (f"activation checkpointing: {layers} of the student's 4 layers recompute their activations in "
                        "the backward pass")
        got, saved = _grads_and_saved_bytes(model)
        assert got.keys() == grads.keys()
        for name in grads:
            assert torch.equal(got[name], grads[name]), name
        kept = 4 - layers
        assert saved < plain_bytes * (kept + 0.25 * layers) / 4, (every, saved, plain_bytes)
    assert "activation_checkpointing" not in str(model.config.to_dict())  # nothing of it saved with the student


def test_activation_checkpointing_of_a_class_transformers_does_not_checkpoint_is_refused():
    import transformers

    class Unsupported(transformers.LlamaForCausalLM):
        supports_gradient_checkpointing = False

    config = transformers.LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2)
    with pytest.raises(TailkdError, match=r"^train\.activation_checkpointing: transformers does not checkpoint "
                                          r"Unsupported's layers .*: set it to 0$"):
        prepare.checkpoint_activations(Unsupported(config), 1)


def test_a_heldout_split_holding_most_tokens_is_warned_of():
    """data.heldout_fraction holds out documents by hash: one long document held out took 99.6% of a corpus's tokens
    without a word. Above a quarter of the tokens and three times the fraction, the run log says so (and that
    --heldout-data does not give them back); a split near its fraction passes silently."""
    from tailkd.config import DataConfig

    meta = {"heldout": {"tokens": 212_711, "docs": 1}, "train": {"tokens": 757, "docs": 1}}
    text = prepare.heldout_share_warning(DataConfig(), meta)
    assert text.startswith("tailkd: warning: --data's held-out split holds 99.6% of its tokens (212,711 of 213,468, "
                           "1 of 2 document(s)): data.heldout_fraction=0.05 holds out documents, not tokens, and "
                           "training reads 757 tokens; split long documents")
    with_other = prepare.heldout_share_warning(DataConfig(heldout_paths=["other.txt"]), meta)
    assert "(with --heldout-data it is not evaluated either" in with_other
    near = {"heldout": {"tokens": 25, "docs": 1}, "train": {"tokens": 75, "docs": 3}}  # 25%: not above a quarter
    assert prepare.heldout_share_warning(DataConfig(), near) is None
    assert prepare.heldout_share_warning(DataConfig(heldout_fraction=0.1), near) is None
    assert prepare.heldout_share_warning(DataConfig(heldout_fraction=0.05), {**near, "train": {"tokens": 74,
                                                                                            "docs": 3}}) is not None
