"""The teacher sharded with FSDP2 (`tailkd.sharded_teacher`, ``--teacher.parallel fsdp``) on the CPU, 1, 2 and 3 gloo
processes: the same logits, losses, student weights and teacher-cache files as a replicated teacher, a bounded peak
resident memory per rank while loading, and one-line errors for bad input.

Tolerances. A sharded forward IS the replicated forward's arithmetic: FSDP2 all-gathers each layer's shards, and an
all-gather is a concatenation, so the gathered weights are the very bits read from the same safetensors file; the
same module code then runs with the same kernels, shapes and thread count (1). The error bound of sharded vs
replicated is therefore 0: logits, final hidden states, the weights hash, every teacher-cache tensor, and a
one-process distillation run (weights, losses, held-out metrics) are compared for BIT equality (torch.equal / ==).
Runs on 2 and 3 processes differ from the one-process run by data parallelism itself (other batch shapes, the
gradient reduction order), not by the teacher's placement; they get tests/test_distributed.py's bounds for that:
weights rtol 1e-4 / atol 1e-5, logged losses and held-out metrics rel 1e-5 (see its `assert_same_run`).
"""

import json
import math
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_VOCAB, build_tiny_tokenizer, make_tiny_lm
from launch import ENV, as_a_plain_process, failure_text, free_port, join_gloo, run_cli, spawn
from safetensors.torch import load_file
from tiny import make_teacher_dir, read_metrics, write_corpus

from tailkd import distributed as dist
from tailkd import models
from tailkd.cache import weights_hash, write_cache
from tailkd.config import DistillConfig
from tailkd.errors import TailkdError
from tailkd.head import final_hidden
from tailkd.sharded_teacher import is_dtensor, load_sharded_teacher, local_numel, shard_rows, teacher_folder


def test_shard_rows_is_fsdp2s_torch_chunk_layout():
    """The rows each rank reads are exactly the dim-0 chunks FSDP2 gives it (torch.chunk), for sizes that do not
    divide by W and for W larger than the tensor."""
    for n in (0, 1, 5, 7, 64, 262):
        for w in (1, 2, 3, 5, 8):
            chunks = torch.arange(n).chunk(w) if n else ()
            got = [shard_rows(n, r, w) for r in range(w)]
            assert [b - a for a, b in got] == [len(c) for c in chunks] + [0] * (w - len(chunks)), (n, w)
            assert [x for a, b in got for x in range(a, b)] == list(range(n)), (n, w)


# --------------------------------------------------------------------------- logits and the cache, 2 and 3 ranks


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A trained tied teacher (one file), an untied teacher saved in 4+ safetensors shards (index), its GGUF already
    converted, a Mixtral in the checkpoint format transformers converts on load (a tensor per expert and projection,
    `block_sparse_moe`; several files), a corpus and its packed rows."""
    root = tmp_path_factory.mktemp("sharded")
    tied = make_teacher_dir(root / "tied", train_steps=20)
    untied = root / "untied"
    make_tiny_lm(seed=3, tie_word_embeddings=False).save_pretrained(untied, max_shard_size="100KB")
    build_tiny_tokenizer().save_pretrained(untied)
    assert len(list(untied.glob("model-*.safetensors"))) > 3
    moe = root / "moe"
    make_tiny_lm("mixtral", seed=5).save_pretrained(moe, max_shard_size="100KB")
    build_tiny_tokenizer().save_pretrained(moe)
    stored = json.loads((moe / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in stored
    assert "model.layers.0.mlp.experts.gate_up_proj" not in stored
    from test_models import write_tiny_llama_gguf

    gguf = write_tiny_llama_gguf(root / "tiny.gguf", make_tiny_lm(seed=4), build_tiny_tokenizer())
    gguf_cache = root / "gguf-cache"
    models.model_dir(gguf, gguf_cache)  # converted once here (distill does it on rank 0 first)
    corpus = write_corpus(root / "corpus.txt")
    cfg = DistillConfig()
    cfg.data.paths, cfg.data.cache_dir, cfg.data.seq_len = [str(corpus)], str(root / "data"), 32
    from tailkd.prepare import setup_data

    info, rows, _ = setup_data(cfg, models.load_tokenizer(tied), 128)
    return {"root": root, "tied": tied, "untied": untied, "gguf": gguf, "gguf_cache": gguf_cache,
            "corpus": corpus, "rows": (str(info.train_bin), 32), "fingerprint": info.fingerprint, "moe": moe}


CACHE_ARGS = {"k": 8, "hidden_states": True, "tail_samples": 4, "seed": 3, "batch_size": 2, "rows_per_shard": 3,
              "max_rows": 10}  # 4 shards (3, 3, 3, 1 rows): uneven over 2 and 3 ranks, 2 forwards per full shard


def _write_cache(model, tokenizer, rows, out, fingerprint):
    return write_cache(model, tokenizer, rows, out, corpus={"fingerprint": fingerprint, "split": "train"},
                       teacher_name="tied", log=lambda _: None, **CACHE_ARGS)


TEACHERS = ("tied", "untied", "gguf", "moe")


def _logits_worker(rank, world, port, assets, out):
    from torch.distributed.fsdp import FSDPModule

    from tailkd.data import PackedRows

    device = join_gloo(rank, world, port)
    try:
        results = {}
        ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(rank))  # other rows per rank
        for name in TEACHERS:
            sharded = load_sharded_teacher(str(assets[name]), device=device, dtype="fp32",
                                           cache_dir=assets["gguf_cache"])
            whole, _ = models.load_causal_lm(str(assets[name]), cache_dir=assets["gguf_cache"])
            with torch.no_grad():
                same = {"logits": torch.equal(sharded(input_ids=ids).logits, whole(input_ids=ids).logits),
                        "hidden": torch.equal(final_hidden(sharded, ids), final_hidden(whole, ids))}
            same["hash"] = weights_hash(sharded) == weights_hash(whole)
            same["buffers"] = all(torch.equal(b, dict(whole.named_buffers())[n]) for n, b in sharded.named_buffers())
            # after the forward: every layer's weights resharded (reshard_after_forward), none trainable, eval mode,
            # an untied input embedding its own FSDP unit (gathered for the lookup only, not for the whole forward)
            layers_sharded = all(is_dtensor(p) for n, p in sharded.named_parameters() if ".layers." in n)
            same["frozen_eval"] = not sharded.training and not any(p.requires_grad for p in sharded.parameters())
            tied = whole.get_output_embeddings().weight is whole.get_input_embeddings().weight
            same["embed_unit"] = isinstance(sharded.get_input_embeddings(), FSDPModule) is not tied
            results[name] = {**same, "layers_sharded": layers_sharded, "local": local_numel(sharded),
                             "total": sum(p.numel() for p in whole.parameters()),
                             "head": whole.get_output_embeddings().weight.numel(),
                             "tied": tied}
        # the teacher cache: rank r writes shards r, r + W, ...; then shard 1 (rank 1's) is lost and rewritten while
        # the other ranks, with nothing to write, pad with forwards (the sharded teacher's forward is a collective)
        sharded = load_sharded_teacher(str(assets["tied"]), device=device, dtype="fp32")
        rows = PackedRows(*assets["rows"])
        tokenizer = models.load_tokenizer(assets["tied"])
        _write_cache(sharded, tokenizer, rows, out / "cache", assets["fingerprint"])
        dist.barrier()
        if rank == 0:
            (out / "cache" / "shard_000001.safetensors").unlink()
        dist.barrier()
        _write_cache(sharded, tokenizer, rows, out / "cache", assets["fingerprint"])
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.shutdown()


def _cache_files(path: Path) -> dict:
    files = {p.name: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    meta = json.loads((path / "cache.json").read_text())
    meta.pop("created_unix")
    return {"files": files, "meta": meta}


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_teacher_equals_the_replicated_one_and_writes_the_same_cache(assets, tmp_path, world):
    """2 and 3 ranks, a tied teacher in one file, an untied one in several files, one from a GGUF, a Mixtral whose
    files hold one tensor per expert (its 4 experts over 3 ranks: 2, 2 and none): bit-equal logits, hidden states,
    buffers (rotary inv_freq) and weights hash; every rank holds less than the whole; the cache written by the ranks
    (and resumed) has the files one process writes with the replicated teacher, bit for bit."""
    from tailkd.data import PackedRows

    spawn(_logits_worker, (world, free_port(), assets, tmp_path), world)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name in TEACHERS:
        for r, got in enumerate(per_rank):
            g = got[name]
            assert g["logits"] and g["hidden"] and g["buffers"] and g["hash"] and g["layers_sharded"], (name, r, g)
            assert g["frozen_eval"] and g["embed_unit"], (name, r, g)
            # the shards of rank r plus the replicated head: never the whole teacher
            assert g["local"] < g["total"], (name, r, g)
        shards = sum(got[name]["local"] - got[name]["head"] for got in per_rank)
        assert shards == per_rank[0][name]["total"] - per_rank[0][name]["head"], name  # each row held once
    assert per_rank[0]["tied"]["tied"] and not per_rank[0]["untied"]["tied"]

    reference = tmp_path / "reference"  # one process, the replicated teacher, 1 thread like the workers
    whole, tokenizer = models.load_teacher(str(assets["tied"]), dtype="fp32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _write_cache(whole, tokenizer, PackedRows(*assets["rows"]), reference, assets["fingerprint"])
    finally:
        torch.set_num_threads(threads)
    ours, ref = _cache_files(tmp_path / "cache"), _cache_files(reference)
    assert ours["meta"] == ref["meta"]
    assert sorted(ours["files"]) == sorted(ref["files"]) == ["head.safetensors"] + [
        f"shard_{i:06d}.safetensors" for i in range(4)]
    for fname, tensors in ref["files"].items():
        assert tensors.keys() == ours["files"][fname].keys(), fname
        for key, value in tensors.items():
            assert torch.equal(ours["files"][fname][key], value), (fname, key)


# --------------------------------------------------------------------------- memory while loading


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss_worker(rank, world, port, warmup, big, sharded, out):
    """Load a tiny teacher first (every lazy import and allocator pool warmed up), then the big one; record the RSS
    just before it and the peak RSS (ru_maxrss) before and after it."""
    device = join_gloo(rank, world, port) if sharded else torch.device("cpu")
    torch.set_num_threads(1)
    try:
        for path in (warmup, big):
            before, before_max = _rss_now(), _max_rss()
            model = load_sharded_teacher(path, device=device, dtype="fp32") if sharded else \
                models.load_teacher(path, dtype="fp32")[0]
            # every byte this rank holds read once, as its first forward does (transformers maps a replicated
            # teacher's safetensors lazily: its pages become resident when used)
            sum(float((p.to_local() if is_dtensor(p) else p).sum()) for p in model.parameters())
            after_max = _max_rss()
            del model
        torch.save({"before": before, "before_max": before_max, "after_max": after_max},
                   Path(out) / f"rss{rank}-{sharded}.pt")
    finally:
        if sharded:
            dist.shutdown()


def _rss_main(warmup: str, big: str, out: str, world: int) -> None:
    """Run by the test in a fresh process: Linux keeps ru_maxrss across execve, so a worker spawned straight from
    pytest would start with pytest's RSS as its peak; spawned from this small process, its peak starts below its own
    RSS after the warm-up."""
    spawn(_rss_worker, (1, 0, warmup, big, False, out), 1)
    spawn(_rss_worker, (world, free_port(), warmup, big, True, out), world)


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads the RSS from /proc (Linux)")
def test_peak_rss_of_each_rank_while_loading_stays_below_its_share(tmp_path):
    """A random 6-layer teacher of 310 MB (fp32, tied 512-token vocabulary, largest tensor 11.5 MB), 2 ranks: loading
    it sharded raises each rank's peak RSS (getrusage ru_maxrss after, minus the RSS just before) by at most its 1/W
    share + 0.1 of the teacher (one tensor's rows read at a time, allocator slack; measured: 0.53); the replicated
    load of the same folder, measured the same way, adds at least 0.9 of it (measured: 1.0), so the test separates
    the two."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    warmup, big = tmp_path / "warmup", tmp_path / "big"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, tie_word_embeddings=True)).save_pretrained(warmup)
    config = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).named_parameters()}
    g = torch.Generator().manual_seed(0)
    big.mkdir()
    save_file({n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}, str(big / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(big)
    for folder in (warmup, big):  # the replicated load (tailkd.models.load_teacher) wants a tokenizer too
        build_tiny_tokenizer().save_pretrained(folder)
    full = sum(math.prod(s) * 4 for s in shapes.values())
    assert 300e6 < full < 330e6

    world = 2
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_sharded_teacher as t; "
            f"t._rss_main({str(warmup)!r}, {str(big)!r}, {str(tmp_path)!r}, {world})")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure_text(proc.stderr)
    for r, sharded in [(0, False)] + [(r, True) for r in range(world)]:
        got = torch.load(tmp_path / f"rss{r}-{sharded}.pt")
        assert got["before_max"] - got["before"] < 0.05 * full, got  # the peak before loading is the RSS then
        added = got["after_max"] - got["before"]
        print(f"{'sharded' if sharded else 'replicated'} rank {r}: loading added {added / 1e6:.0f} MB to the peak "
              f"RSS, {added / full:.2f} of the {full / 1e6:.0f} MB teacher")
        if sharded:
            assert added < (1 / world + 0.1) * full, (r, got, full)
        else:
            assert added > 0.9 * full, got  # the measurement sees a whole teacher


# --------------------------------------------------------------------------- distillation runs through the CLI


def distill_args(assets, out, *extra):
    # 6 rows per step (divisible by 1, 2, 3 ranks), 5 held-out rows (uneven over 2 and 3 ranks), evaluations and
    # checkpoints every 2 steps
    return ["distill", "--teacher", str(assets["tied"]), "--data", str(assets["corpus"]),
            "--data.cache_dir", str(assets["root"] / "data"), "--student-layers", "2", "--seq-len", "32",
            "--batch-size", "6", "--lr", "3e-3", "--train.warmup_steps", "2", "--data.eval_rows", "5", "--steps", "4",
            "--train.eval_every", "2", "--train.save_every", "2", "--device", "cpu", "--train.precision", "fp32",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def replicated_run(assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("replicated") / "run"
    run_cli(distill_args(assets, run))
    return run


def _compare_runs(one, many, *, exact: bool):
    a, b = load_file(str(one / "final" / "model.safetensors")), load_file(str(many / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(b[name], a[name]), name
        else:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    ra, rb = read_metrics(one), read_metrics(many)
    assert [(r["step"], r["split"]) for r in ra] == [(r["step"], r["split"]) for r in rb]
    for x, y in zip(ra, rb):
        keys = ["loss", "clm", "div", "grad_norm"] if x["split"] == "train" else ["kl", "rkl", "student_clm",
                                                                                   "teacher_clm", "agreement"]
        for key in keys:
            assert y[key] == (x[key] if exact else pytest.approx(x[key], rel=1e-5)), (x["step"], key)
    return a


def test_one_process_through_fsdp2_is_bit_identical_to_the_replicated_teacher(assets, replicated_run, tmp_path):
    """A one-process CPU run with --teacher.parallel fsdp is allowed: it goes through FSDP2 (a process group of one),
    as a single CUDA device does, and gives the replicated run's weights, losses and held-out metrics bit for bit."""
    run = tmp_path / "run"
    out, _ = run_cli(distill_args(assets, run, "--teacher.parallel", "fsdp"))
    assert "teacher: sharded over 1 rank (FSDP2" in out
    _compare_runs(replicated_run, run, exact=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher_placement"] == "sharded over 1 rank"
    assert json.loads((replicated_run / "summary.json").read_text())["teacher_placement"] == "replicated"
    (peak,) = summary["peak_memory_per_rank_bytes"]
    assert 50e6 < peak < 8e9 and summary["peak_memory_kind"].startswith("peak RSS")


def test_two_ranks_ddp_student_stopped_and_resumed_equal_one_process(assets, replicated_run, tmp_path):
    run = tmp_path / "run"
    run_cli(distill_args(assets, run, "--teacher.parallel", "fsdp", "--train.stop_after", "2"), nproc=2)
    assert (run / "checkpoints" / "step_00000002").is_dir() and not (run / "final").exists()
    out, _ = run_cli(distill_args(assets, run, "--teacher.parallel", "fsdp", "--resume"), nproc=2)
    assert "teacher: sharded over 2 ranks (FSDP2" in out and "peak memory per rank" in out
    _compare_runs(replicated_run, run, exact=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher_placement"] == "sharded over 2 ranks" and summary["world_size"] == 2
    assert len(summary["peak_memory_per_rank_bytes"]) == 2


def test_fused_layer_on_a_sharded_teacher_killed_and_resumed(assets, tmp_path):
    """The fused loss layer reads the sharded teacher's (replicated) head; 2 ranks, SIGKILLed after the step-2
    checkpoint (the writer pauses 3 s inside each checkpoint: the run cannot finish before the kill) and resumed,
    give the one-process replicated fused run (DDP's float tolerances, as above)."""
    import signal
    import time

    one = tmp_path / "one"
    run_cli(distill_args(assets, one, "--fused-loss", "on"))
    run = tmp_path / "run"
    argv = distill_args(assets, run, "--teacher.parallel", "fsdp", "--fused-loss", "on")
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    proc = subprocess.Popen([sys.executable, *launcher, "-m", "tailkd.cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**ENV, "TAILKD_TEST_CHECKPOINT_PAUSE": "3"},
                            start_new_session=True)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step_00000002").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()
    out, _ = run_cli([*argv, "--resume"], nproc=2)
    assert "chunks of" in out and "teacher: sharded over 2 ranks" in out
    _compare_runs(one, run, exact=False)


def test_cache_teacher_command_under_torchrun_with_a_sharded_teacher(assets, tmp_path):
    """`torchrun --nproc_per_node 2 -m tailkd.cli cache-teacher --teacher.parallel fsdp`: each rank writes the shards
    of its rows from the sharded teacher, rank 0 the cache.json; the files equal one process's with the replicated
    teacher (the workers and the reference both run 1 thread: OMP_NUM_THREADS=1), tensor for tensor."""
    common = ["cache-teacher", "--teacher", str(assets["tied"]), "--data", str(assets["corpus"]), "--cache-dir",
              str(assets["root"] / "data"), "--seq-len", "32", "--k", "8", "--batch-size", "2",
              "--rows-per-shard", "3", "--max-rows", "11", "--device", "cpu"]
    run_cli([*common, "--out", str(tmp_path / "one")])
    out, _ = run_cli([*common, "--teacher.parallel", "fsdp", "--out", str(tmp_path / "two")], nproc=2)
    assert out.count("cached 11 rows") == 1  # rank 0 alone prints the sizes
    one, two = _cache_files(tmp_path / "one"), _cache_files(tmp_path / "two")
    assert one["meta"] == two["meta"] and one["files"].keys() == two["files"].keys() and len(one["files"]) == 4
    for name, tensors in one["files"].items():
        assert tensors.keys() == two["files"][name].keys()
        for key, value in tensors.items():
            assert torch.equal(value, two["files"][name][key]), (name, key)


def test_three_ranks_fsdp_student_equal_one_process(assets, replicated_run, tmp_path):
    run = tmp_path / "run"
    run_cli(distill_args(assets, run, "--teacher.parallel", "fsdp", "--train.parallel", "fsdp"), nproc=3)
    final = _compare_runs(replicated_run, run, exact=False)
    from tailkd.student import build_student

    start = build_student(models.load_teacher(str(assets["tied"]), dtype="fp32")[0], num_layers=2, seed=0)[0]
    start = start.state_dict()
    # training moved the weights far beyond the tolerance (atol 1e-5): 4 AdamW steps of at most lr 3e-3 each
    assert max(float((final[k] - start[k]).abs().max()) for k in final) > 2e-3
    assert json.loads((run / "summary.json").read_text())["teacher_placement"] == "sharded over 3 ranks"


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line(assets, tmp_path, capsys):
    from tailkd.cli import main

    bin_only = tmp_path / "bin-only"
    shutil.copytree(assets["tied"], bin_only)
    torch.save(load_file(str(bin_only / "model.safetensors")), bin_only / "pytorch_model.bin")
    (bin_only / "model.safetensors").unlink()
    argv = distill_args(assets, tmp_path / "run", "--teacher.parallel", "fsdp")
    argv[argv.index("--teacher") + 1] = str(bin_only)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("tailkd: error: teacher.parallel=fsdp reads the teacher's "
                                                   "safetensors"), err
    assert "only pytorch_model.bin" in err and "--teacher.parallel replicate" in err
    assert not (tmp_path / "run").exists()  # nothing written before every input is checked
    assert not torch.distributed.is_initialized()  # the one-process group ended with the run

    assert main(distill_args(assets, tmp_path / "run", "--teacher.parallel", "zero3")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "tailkd: error: teacher.parallel='zero3' must be replicate or fsdp", err

    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(assets["tied"] / "config.json", empty)
    with pytest.raises(TailkdError, match=r"has no weights: re-save it with save_pretrained"):
        teacher_folder(str(empty))
    # a GGUF (the built-in teacher too) is read from its converted safetensors cache
    assert (teacher_folder(assets["gguf"], assets["gguf_cache"]) / "model.safetensors").is_file()
    with pytest.raises(TailkdError, match=r"needs a process group"):
        load_sharded_teacher(str(assets["tied"]), device=torch.device("cpu"))


def test_a_tensor_whose_stored_shape_is_not_the_model_classes_is_refused(tmp_path):
    """A folder whose config.json does not describe its weights: reading a tensor (whole or by rows) of another
    shape than the skeleton's is one line naming the tensor, its file and both shapes, not rows of a wrong layout."""
    from safetensors.torch import save_file

    from tailkd.sharded_teacher import _read

    file = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2, 3)}, str(file))
    for rows in (None, (0, 1)):
        with pytest.raises(TailkdError, match=r"tensor w of .* has shape \(2, 3\), its model class expects \(4, 3\): "
                                              "the folder's config.json and weights do not match"):
            _read({"w": file}, "w", rows, (4, 3))
    assert _read({"w": file}, "w", (1, 2), (2, 3)).shape == (1, 3)


def test_read_names_a_missing_tensor_and_reads_a_0_dim_one(tmp_path):
    """`_read`: a tensor the model class expects and no file holds is one line naming it and the fixes (not a
    KeyError); a 0-dim tensor (a learned scalar) is read whole, as a slice of it cannot be taken."""
    from safetensors.torch import save_file

    from tailkd.sharded_teacher import _read

    file = tmp_path / "model.safetensors"
    save_file({"scale": torch.tensor(2.5), "w": torch.arange(6.0).reshape(3, 2)}, str(file))
    files = {"scale": file, "w": file}
    with pytest.raises(TailkdError) as info:
        _read(files, "model.norm.weight", None, (2,))
    assert str(info.value) == ("the teacher's safetensors files have no tensor 'model.norm.weight', which its model "
                               "class expects, nor tensors that transformers' conversions for this architecture turn "
                               "into it: use --teacher.parallel replicate (from_pretrained reads the folder)")
    scale = _read(files, "scale", None, ())
    assert scale.shape == () and scale.item() == 2.5
    assert torch.equal(_read(files, "w", None, (3, 2)), torch.arange(6.0).reshape(3, 2))
    assert torch.equal(_read(files, "w", (1, 3), (3, 2)), torch.arange(2.0, 6.0).reshape(2, 2))
    assert _read(files, "w", (3, 3), (3, 2)).shape == (0, 2)  # the empty chunk of a rank past the last row


def test_a_sharded_teacher_with_only_pytorch_bin_weights_is_refused_with_the_fix(tmp_path):
    """A folder whose weights are only pytorch_model.bin (no safetensors to read slice by slice): one line naming the
    folder, what it has, and both fixes."""
    from transformers import LlamaConfig

    folder = tmp_path / "bin-teacher"
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(TailkdError) as info:
        teacher_folder(str(folder))
    assert str(info.value) == (f"teacher.parallel=fsdp reads the teacher's safetensors files slice by slice, and "
                               f"{folder} has only pytorch_model.bin: re-save it with save_pretrained (safetensors) "
                               "or use --teacher.parallel replicate")


def test_student_source_reads_exactly_the_tensors_the_student_copies(tmp_path):
    """`student_source`: the skeleton's parameters outside the decoder layers and those of the layers the student
    keeps are the teacher's (cast to the teacher dtype asked for), every other layer's stay on meta (never read);
    layer 1 skipped does not skip layer 10 or 11 (a name prefix "layers.1" would). With an existing student
    (``student.path``) nothing is read."""
    from tailkd.config import StudentConfig
    from tailkd.sharded_teacher import student_source

    teacher = make_tiny_lm("llama", num_hidden_layers=12)
    teacher.save_pretrained(tmp_path / "teacher")
    build_tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    weights = teacher.state_dict()
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        skeleton, _ = student_source(tmp_path / "teacher", StudentConfig(num_layers=None, layers=[0, 10, 11]),
                                     dtype=dtype)
        for name, p in skeleton.named_parameters():
            kept = ".layers." not in name or name.split(".layers.")[1].split(".")[0] in ("0", "10", "11")
            if kept:
                assert p.device.type == "cpu" and p.dtype == torch_dtype, (name, p.device, p.dtype)
                assert torch.equal(p, weights[name].to(torch_dtype)), name
            else:
                assert p.device.type == "meta", name
    skeleton, _ = student_source(tmp_path / "teacher", StudentConfig(path=str(tmp_path / "student")))
    assert all(p.device.type == "meta" for p in skeleton.parameters())


def test_a_student_built_from_a_sharded_mixture_is_the_one_built_from_the_whole_teacher(tmp_path):
    """A Mixtral stored in the checkpoint format (a tensor per expert and projection, which transformers stacks into
    one [E, ...] tensor on load): `student_source` reads the kept layers through those conversions, and the student
    built from its skeleton (2 of 4 layers, 3 of 4 experts, MLP copied) equals, tensor for tensor, the one built from
    the teacher loaded whole with from_pretrained; a layer it skips stays on meta."""
    from transformers import AutoModelForCausalLM

    from tailkd.config import StudentConfig
    from tailkd.sharded_teacher import student_source
    from tailkd.student import build_student

    make_tiny_lm("mixtral", seed=6).save_pretrained(tmp_path / "teacher")
    build_tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    skeleton, _ = student_source(tmp_path / "teacher", StudentConfig(num_layers=2), dtype="fp32")
    assert skeleton.model.layers[1].mlp.experts.gate_up_proj.device.type == "meta"
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    kwargs = dict(num_layers=2, num_experts=3, mlp_init="copy")
    (ours, _), (want, _) = build_student(skeleton, **kwargs), build_student(whole, **kwargs)
    params = dict(want.named_parameters())
    assert "model.layers.1.mlp.experts.gate_up_proj" in params
    for name, p in ours.named_parameters():
        assert torch.equal(p, params[name]), name


@pytest.mark.parametrize("config_class, sizes, narrow, a_log", [
    ("MambaConfig", dict(state_size=4), dict(intermediate_size=48), (48, 4)),
    ("FalconMambaConfig", dict(state_size=4), dict(intermediate_size=48), (48, 4)),
    ("Mamba2Config", dict(state_size=4, num_heads=8, head_dim=8, n_groups=2, expand=2), dict(ssm_heads=4), (4,))])
def test_a_sharded_mamba_teacher_builds_the_student_the_whole_teacher_builds(config_class, sizes, narrow, a_log,
                                                                            tmp_path):
    """Mamba's _no_split_modules lists its mixer beside its block: the decoder layers are the outermost (4 blocks, not
    8 modules), so `student_source` for layers 1 and 3 reads those blocks — narrowed to hidden 16 and 48 channels
    (Mamba-2: 4 of 8 heads, expand 2), the student equals the one built from the whole teacher, tensor for tensor —
    and leaves the others on meta."""
    import transformers
    from transformers import AutoModelForCausalLM

    from tailkd.config import StudentConfig
    from tailkd.sharded_teacher import _decoder_layers, student_source
    from tailkd.student import build_student

    config = getattr(transformers, config_class)(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=4, **sizes)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "teacher")
    build_tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    skeleton, _ = student_source(tmp_path / "teacher", StudentConfig(layers=[1, 3]), dtype="fp32")
    assert [name for name, _ in _decoder_layers(skeleton)] == [f"backbone.layers.{i}" for i in range(4)]
    assert skeleton.backbone.layers[0].mixer.in_proj.weight.device.type == "meta"
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    kwargs = dict(layers=[1, 3], hidden_size=16, **narrow)
    (ours, _), (want, _) = build_student(skeleton, **kwargs), build_student(whole, **kwargs)
    params = dict(want.named_parameters())
    assert params["backbone.layers.1.mixer.A_log"].shape == a_log
    for name, p in ours.named_parameters():
        assert torch.equal(p, params[name]), name


# --------------------------------------------------------------------------- a calibrated student, sharded teacher

# every calibrated choice a tiny Llama (4 layers, hidden 64, 4 heads on 2 KV heads, MLP 128) or Mixtral (4 experts, 128
# units each) can make, each narrowing its axis by half
CALIBRATED = {"tied": dict(num_layers=2, layer_choice="influence", hidden_size=32, hidden_channels="active",
                           num_heads=2, num_kv_heads=1, attention_heads="active", intermediate_size=64,
                           mlp_units="active"),
              "moe": dict(num_layers=2, layer_choice="influence", num_experts=2, experts="used", intermediate_size=64,
                          mlp_units="active")}


def _calibration_batches():
    """Two batches, the second right-padded (its mask's zeros must stay out of every measure)."""
    ids = torch.randint(3, 250, (5, 24), generator=torch.Generator().manual_seed(11))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[0, 17:], mask[2, 9:] = 0, 0
    return [{"input_ids": ids[:2]}, {"input_ids": ids[2:], "attention_mask": mask}]


def _calibration_worker(rank, world, port, assets, out):
    from tailkd.config import StudentConfig
    from tailkd.sharded_teacher import student_source
    from tailkd.student import build_student, calibrate

    device = join_gloo(rank, world, port)
    try:
        results = {}
        for name, settings in CALIBRATED.items():
            sharded = load_sharded_teacher(str(assets[name]), device=device, dtype="fp32")
            measured = calibrate(sharded, _calibration_batches, **settings)  # collective: the same rows everywhere
            skeleton, _ = student_source(str(assets[name]), StudentConfig(num_layers=2), dtype="fp32",
                                         measured=measured)
            student, table = build_student(skeleton, mlp_init="copy", measured=measured, **settings)
            results[name] = {"measured": measured, "student": student.state_dict(), "table": table}
        torch.save(results, out / f"calibrated{rank}.pt")
    finally:
        dist.shutdown()


def _same(a, b) -> bool:
    """Equal measures: tensors bit for bit, dicts key by key."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a.dtype == b.dtype and torch.equal(a, b)


def test_a_student_calibrated_on_the_sharded_teacher_is_the_one_the_whole_teacher_gives(assets, tmp_path):
    """`tailkd.student.calibrate` over a teacher sharded on 2 gloo ranks (its forward collective, every rank the same
    rows) measures what it measures over the teacher loaded whole, bit for bit (the sharded forward is the replicated
    one's arithmetic: module docstring): layers by influence, channels, heads and MLP units of a Llama, the experts
    and each expert's units of a Mixtral (stored a tensor per expert); the student built from `student_source`'s
    skeleton of the layers the pass chose (others on meta, never read) equals, tensor for tensor and in its table, the
    one built from the whole teacher."""
    from tailkd.student import build_student, calibrate

    spawn(_calibration_worker, (2, free_port(), assets, tmp_path), 2)
    per_rank = [torch.load(tmp_path / f"calibrated{r}.pt") for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same kernels, the same bits
    try:
        for name, settings in CALIBRATED.items():
            whole, _ = models.load_causal_lm(str(assets[name]))
            want, table = build_student(whole, mlp_init="copy", calibration=_calibration_batches, **settings)
            measured = calibrate(whole, _calibration_batches, **settings)
            assert len(measured) == (4 if name == "tied" else 3), sorted(measured)
            kept = sorted({int(row["source"].split(".")[2]) for row in table if "block_influence" in row})
            assert len(kept) == 2 and kept != [0, 3], kept  # not the spaced layers: the skeleton's follow the pass
            for r, got in enumerate(per_rank):
                assert _same(got[name]["measured"], measured), (name, r)
                assert got[name]["table"] == table, (name, r)
                state = want.state_dict()
                assert got[name]["student"].keys() == state.keys(), (name, r)
                for key, value in state.items():
                    assert torch.equal(got[name]["student"][key], value), (name, r, key)
    finally:
        torch.set_num_threads(threads)


def test_a_calibrated_student_of_a_sharded_teacher_through_the_cli_stopped_and_resumed(assets, tmp_path):
    """``distill --teacher.parallel fsdp`` with all four calibrated choices of a dense student on 2 ranks: the sharded
    teacher loads first and is measured (the run log's lines of each choice, once), the student is the one-process
    replicated run's (its student_init.json, equal), stopped after step 2 and resumed (the resume rebuilds it through
    the same pass and checks it against student_init.json) it trains as that run (DDP's float tolerances, above)."""
    flags = ["--student.layer_choice", "influence", "--student.hidden_size", "32", "--student.hidden_channels",
             "active", "--student.num_heads", "2", "--student.num_kv_heads", "1", "--student.attention_heads", "active",
             "--student.intermediate_size", "64", "--student.mlp_init", "copy", "--student.mlp_units", "active"]
    one = tmp_path / "one"
    run_cli(distill_args(assets, one, *flags))
    run = tmp_path / "run"
    argv = distill_args(assets, run, "--teacher.parallel", "fsdp", *flags)
    first, _ = run_cli([*argv, "--train.stop_after", "2"], nproc=2)
    assert not (run / "final").exists()
    resumed, _ = run_cli([*argv, "--resume"], nproc=2)
    for out in (first, resumed):
        assert out.count("teacher: sharded over 2 ranks (FSDP2") == 1, out
        for line in ("layers kept by influence", "hidden channels kept by activity", "attention heads kept by "
                     "importance", "MLP units kept by activity"):
            assert out.count(line) == 1, (line, out)
    init = json.loads((run / "student_init.json").read_text())
    assert init == json.loads((one / "student_init.json").read_text())
    assert {row["source"].split(".")[2] for row in init if "block_influence" in row} != {"0", "3"}  # not spaced
    _compare_runs(one, run, exact=False)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "qwen3_next", "qwen3_5_moe",
                                    "glm4_moe", "dots1", "deepseek_v2", "deepseek_v3", "glm4_moe_lite", "lfm2_moe",
                                    "nemotron_h", "ernie4_5_moe", "granitemoe", "solar_open", "minimax_m2",
                                    "gpt_neox", "cohere2_moe", "mellum", "flex_olmo", "exaone_moe", "hunyuan_v1_moe"])
def test_every_tensor_of_a_mixture_saved_in_the_checkpoint_format_reads_back(family, tmp_path):
    """Each mixture family's tiny teacher (test_student_families), and GPT-NeoX's (its head saved as embed_out), saved
    by save_pretrained in the format transformers converts on load (per-expert tensors, renamed modules):
    `student_source` with every layer reads every parameter through the conversions, and every saved buffer
    (GLM-4.5's, dots.llm1's expert score correction: redrawn, not the class's zeros), equal bit for bit to the model's
    own."""
    from test_student_families import _persistent_buffers, make_teacher

    from tailkd.config import StudentConfig
    from tailkd.sharded_teacher import _weight_map, student_source

    teacher = make_teacher(family)
    teacher.save_pretrained(tmp_path / "teacher")
    build_tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    names = dict(teacher.named_parameters())
    assert set(names) - set(_weight_map(tmp_path / "teacher"))  # some are stored under other names
    skeleton, _ = student_source(tmp_path / "teacher", StudentConfig(num_layers=None), dtype="fp32")
    for name, p in skeleton.named_parameters():
        assert torch.equal(p, names[name]), name
    buffers = _persistent_buffers(teacher)
    assert set(_persistent_buffers(skeleton)) == set(buffers)
    for name, b in _persistent_buffers(skeleton).items():
        assert torch.equal(b, buffers[name]), name


def test_a_sharded_jamba_teacher_reads_the_whole_periods_its_calibration_chose(tmp_path):
    """Jamba's students keep whole periods of its layer kinds (every 2 layers here): `student_source` reads the period
    a calibration by influence chose (teacher layers 2, 3: test_student_families' Jamba test), the others stay on
    meta, and the student built from that skeleton — half its Mamba-1 channels kept by importance — is, tensor for
    tensor, the one built from the whole teacher."""
    from test_student_families import _ids, _zero_dropped_layers, make_teacher

    from tailkd.config import StudentConfig
    from tailkd.sharded_teacher import student_source
    from tailkd.student import build_student, calibrate

    teacher = _zero_dropped_layers(make_teacher("jamba"), keep=[0, 2, 3, 4])
    teacher.save_pretrained(tmp_path / "teacher")
    build_tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    batches = [{"input_ids": _ids(7, (2, 13))}]
    settings = dict(num_layers=2, layer_choice="influence", ssm_heads=64, ssm_head_choice="active")
    measured = calibrate(teacher, lambda: batches, **settings)
    assert sorted(measured) == ["layer_choice=influence", "ssm_head_choice=active"]
    skeleton, _ = student_source(tmp_path / "teacher", StudentConfig(**settings), dtype="fp32", measured=measured)
    on_meta = [i for i, layer in enumerate(skeleton.model.layers) if layer.input_layernorm.weight.is_meta]
    assert on_meta == [0, 1, 4]
    (ours, _), (want, _) = (build_student(model, mlp_init="copy", measured=measured, **settings)
                            for model in (skeleton, teacher))
    params = dict(want.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(p, params[name]), name


@pytest.mark.parametrize("family", ["gemma4", "gemma4_moe"])
def test_a_sharded_gemma4_teacher_builds_the_student_the_whole_teacher_builds(family, tmp_path):
    """Gemma 4's per-layer embeddings (a table and a projection of one block per layer), its KV-shared layers (3, 4:
    no k/v projections), its layer scales (saved buffers), its mixture's router scales: `student_source` for layers 1,
    2, 4 (hidden_size 32) reads them, leaves layers 0 and 3 on meta, and the student built from that skeleton is,
    tensor for tensor and buffer for buffer, the one built from the whole teacher; by influence it reads the layers
    the calibration keeps (`tailkd.layer_choice.layer_needs`: the last layer and layer 1, which it reads)."""
    from test_student_families import _ids, _persistent_buffers, make_teacher

    from tailkd.config import StudentConfig
    from tailkd.sharded_teacher import student_source
    from tailkd.student import build_student, calibrate

    teacher = make_teacher(family)
    teacher.save_pretrained(tmp_path / "teacher")
    build_tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    settings = dict(layers=[1, 2, 4], hidden_size=32)
    skeleton, _ = student_source(tmp_path / "teacher", StudentConfig(**settings), dtype="fp32")
    on_meta = [i for i, layer in enumerate(skeleton.model.layers) if layer.input_layernorm.weight.is_meta]
    assert on_meta == [0, 3]
    (ours, _), (want, _) = (build_student(model, mlp_init="copy", **settings) for model in (skeleton, teacher))
    expected = {**dict(want.named_parameters()), **_persistent_buffers(want)}
    got = {**dict(ours.named_parameters()), **_persistent_buffers(ours)}
    assert got.keys() == expected.keys() and "model.layers.0.layer_scalar" in got
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name
    # by influence: the skeleton reads the layers the calibration keeps, with the last layer and the one it reads
    batches = [{"input_ids": _ids(7, (2, 13))}]
    settings = dict(num_layers=3, layer_choice="influence")
    measured = calibrate(teacher, lambda: batches, **settings)
    skeleton, _ = student_source(tmp_path / "teacher", StudentConfig(**settings), dtype="fp32", measured=measured)
    read = [i for i, layer in enumerate(skeleton.model.layers) if not layer.input_layernorm.weight.is_meta]
    _, table = build_student(teacher, mlp_init="copy", measured=measured, **settings)
    built = [int(row["source"].split(".")[2]) for row in table if row["name"].endswith("input_layernorm.weight")]
    assert read == built and {1, 4} <= set(read)


def test_a_sharded_multimodal_teacher_reads_its_text_part_and_builds_its_student(assets, tmp_path):
    """A Gemma 3 checkpoint with its vision tower (Gemma3ForConditionalGeneration): `student_source` returns its text
    part (a Gemma3ForCausalLM sharing the skeleton's modules: `tailkd.multimodal.text_teacher`), reads the kept layers'
    tensors under the checkpoint's names (model.language_model....) and leaves the vision tower on meta; the student
    built from it is the one the text model builds. Through the CLI with --teacher.parallel fsdp the run's
    student_init.json is the replicated run's, and a calibrated choice is refused in one line (exit 2, no run folder):
    the measures read the text layers, which the sharded teacher runs only within its own forward."""
    from test_student_families import _multimodal

    from tailkd.config import StudentConfig
    from tailkd.sharded_teacher import _skeleton, student_source
    from tailkd.student import build_student

    teacher, text = _multimodal("gemma3")
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    settings = dict(layers=[1, 2, 4], hidden_size=32)
    view, _ = student_source(folder, StudentConfig(**settings), dtype="fp32")
    assert type(view).__name__ == "Gemma3ForCausalLM"
    assert [i for i, layer in enumerate(view.model.layers) if layer.input_layernorm.weight.is_meta] == [0, 3]
    assert all(p.is_meta for p in _skeleton(folder, torch.float32).model.vision_tower.parameters())
    (ours, _), (want, _) = (build_student(model, mlp_init="copy", **settings) for model in (view, text))
    expected = dict(want.named_parameters())
    for name, tensor in ours.named_parameters():
        assert torch.equal(tensor, expected[name]), name
    data = ["--data", str(assets["corpus"]), "--data.cache_dir", str(assets["root"] / "data"), "--seq-len", "32",
            "--batch-size", "4", "--steps", "1", "--data.eval_rows", "4", "--device", "cpu", "--train.precision",
            "fp32", "--student.num_layers", "3", "--student.hidden_size", "32"]
    runs = {mode: tmp_path / mode for mode in ("fsdp", "replicate")}
    for mode, run in runs.items():
        run_cli(["distill", "--teacher", str(folder), *data, "--teacher.parallel", mode, "--out", str(run)])
    assert (runs["fsdp"] / "student_init.json").read_text() == (runs["replicate"] / "student_init.json").read_text()
    _, err = run_cli(["distill", "--teacher", str(folder), *data, "--teacher.parallel", "fsdp",
                      "--student.layer_choice", "influence", "--out", str(tmp_path / "refused")], expect=2)
    assert err.strip().splitlines()[-1] == (
        "tailkd: error: a student of Gemma3ForConditionalGeneration's text part (Gemma3ForCausalLM) is measured over "
        "its text layers, which a teacher sharded with FSDP2 runs only within its own forward: use --teacher.parallel "
        "replicate for calibrated choices (or spaced layers and first widths)")
    assert not (tmp_path / "refused").exists()


def test_a_sharded_teachers_skeleton_passes_autocast_safe(tmp_path):
    """The skeleton a sharded teacher (and `student_source`) is built on passes `tailkd.models.autocast_safe`, as a
    loaded model does: DBRX's experts modules carry the hook that hands them their input in the autocast dtype
    (tested in test_student_families: without it a float32 DBRX fails under bf16 autocast)."""
    from test_student_families import make_teacher

    from tailkd.config import StudentConfig
    from tailkd.models import _input_in_autocast_dtype
    from tailkd.sharded_teacher import student_source

    make_teacher("dbrx").save_pretrained(tmp_path / "teacher")
    build_tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    skeleton, _ = student_source(tmp_path / "teacher", StudentConfig(num_layers=None), dtype="fp32")
    hooks = [list(block.ffn.experts._forward_pre_hooks.values()) for block in skeleton.transformer.blocks]
    assert hooks == [[_input_in_autocast_dtype]] * len(skeleton.transformer.blocks) != []


def test_a_model_class_naming_no_decoder_layer_is_refused(monkeypatch):
    """FSDP2 shards the teacher by its decoder layers, the classes its ``_no_split_modules`` names: a class that names
    none (or none present) is one line with the fix, not a teacher sharded as one unit."""
    from tailkd.sharded_teacher import _decoder_layers

    model = make_tiny_lm("llama", num_hidden_layers=2)
    assert [name for name, _ in _decoder_layers(model)] == ["model.layers.0", "model.layers.1"]
    for names in (None, [], ["NoSuchLayer"]):
        monkeypatch.setattr(model, "_no_split_modules", names, raising=False)
        with pytest.raises(TailkdError) as info:
            _decoder_layers(model)
        assert str(info.value) == ("LlamaForCausalLM names no decoder layer class (_no_split_modules), so FSDP2 cannot "
                                   "shard it layer by layer: use --teacher.parallel replicate")


def test_placement_words_and_counts_of_a_replicated_model():
    """A model that is not sharded (or none: a run without a teacher) is "replicated" and holds all its parameters."""
    from tailkd.sharded_teacher import is_sharded, placement

    model = make_tiny_lm("llama", num_hidden_layers=1)
    assert not is_sharded(None) and not is_sharded(model) and placement(model) == "replicated"
    assert local_numel(model) == sum(p.numel() for p in model.parameters())


def test_a_tie_fsdp2_would_shard_is_refused(tmp_path, monkeypatch):
    """Tied weights stay one tensor only where they are replicated (the LM head and a tied input embedding): a class
    whose tied weights FSDP2 would shard (here: a head it does not name as its output embeddings, so not replicated)
    is one line with the fix. One process, a group of one (as a single GPU runs it)."""
    from transformers import LlamaForCausalLM

    teacher = make_tiny_lm("llama", num_hidden_layers=1, tie_word_embeddings=True)
    teacher.save_pretrained(tmp_path / "teacher")
    build_tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    monkeypatch.setattr(LlamaForCausalLM, "get_output_embeddings", lambda self: None)
    as_a_plain_process(monkeypatch)
    device = dist.setup("cpu", process_group=True)
    try:
        with pytest.raises(TailkdError) as info:
            load_sharded_teacher(str(tmp_path / "teacher"), device=device, dtype="fp32")
    finally:
        dist.shutdown()
    assert str(info.value) == ("LlamaForCausalLM ties model.embed_tokens.weight, lm_head.weight, which FSDP2 would "
                               "shard: use --teacher.parallel replicate")


def test_start_up_refusals_name_a_sharded_teachers_own_class(tmp_path, monkeypatch):
    """fully_shard swaps the teacher's class for a subclass FSDP<name>: the start-up check of the LM head names the
    model's own class, as for a replicated teacher ("FSDPLlamaForCausalLM's own logits ..." before). One process, a
    group of one; the teacher's final norm holds a NaN, so that its own logits are not finite."""
    from tailkd.head import verify_head

    teacher = make_tiny_lm("llama", num_hidden_layers=1)
    with torch.no_grad():
        teacher.model.norm.weight[0] = math.nan
    teacher.save_pretrained(tmp_path / "teacher")
    build_tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    as_a_plain_process(monkeypatch)
    device = dist.setup("cpu", process_group=True)
    try:
        sharded = load_sharded_teacher(str(tmp_path / "teacher"), device=device, dtype="fp32")
        assert type(sharded).__name__ == "FSDPLlamaForCausalLM"
        with pytest.raises(TailkdError, match=r"^LlamaForCausalLM's own logits are not finite \(NaN or inf\)"):
            verify_head(sharded, torch.tensor([[1, 2, 3]]))
    finally:
        dist.shutdown()


def _with_a_stored_buffer(model_cls):
    """``model_cls.__init__`` that also registers a persistent buffer ``marker`` of zeros: a model class whose state
    dict stores a buffer next to its weights (no causal LM of transformers here does: rotary buffers are computed)."""
    real = model_cls.__init__

    def init(self, config):
        real(self, config)
        self.register_buffer("marker", torch.zeros(3), persistent=True)

    return init


def _stored_buffer_worker(rank, world, port, folder, out_path):
    from transformers import LlamaModel

    LlamaModel.__init__ = _with_a_stored_buffer(LlamaModel)  # this process's model class, as the parent's
    device = join_gloo(rank, world, port)
    try:
        model = load_sharded_teacher(folder, device=device)
        if rank == 0:
            torch.save({"marker": model.model.marker.clone(),
                        "inv_freq": model.model.rotary_emb.inv_freq.clone()}, out_path)
    finally:
        dist.shutdown()


def test_a_persistent_buffer_stored_with_the_weights_is_read_from_them(tmp_path, monkeypatch):
    """A persistent buffer saved with the weights comes from the file (as from_pretrained loads it), not from the
    model class's __init__; a computed one (rotary inv_freq, non-persistent) is the class's on every rank, also where
    the file holds a tensor of its name (as checkpoints saved by older transformers do; from_pretrained ignores it)."""
    from safetensors.torch import save_file
    from transformers import LlamaModel

    monkeypatch.setattr(LlamaModel, "__init__", _with_a_stored_buffer(LlamaModel))
    folder, out = tmp_path / "teacher", tmp_path / "buffers.pt"
    model = make_tiny_lm("llama", num_hidden_layers=2)
    model.model.marker.copy_(torch.tensor([1.5, -2.0, 3.25]))
    model.save_pretrained(folder)
    stored = load_file(str(folder / "model.safetensors"))
    assert "model.marker" in stored and "model.rotary_emb.inv_freq" not in stored
    stored["model.rotary_emb.inv_freq"] = torch.zeros_like(model.model.rotary_emb.inv_freq)
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    spawn(_stored_buffer_worker, (2, free_port(), str(folder), str(out)), 2)
    got = torch.load(out)
    assert torch.equal(got["marker"], torch.tensor([1.5, -2.0, 3.25]))
    assert torch.equal(got["inv_freq"], model.model.rotary_emb.inv_freq)
