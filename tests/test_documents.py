"""data.document_attention: packed rows whose documents attend to themselves alone (`tailkd.documents`)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_lm
from tiny import SENTENCES, make_teacher_dir, read_metrics, write_corpus

from tailkd.cli import main
from tailkd.config import DistillConfig, LossConfig
from tailkd.data import document_positions, model_inputs
from tailkd.documents import check_model
from tailkd.errors import TailkdError
from tailkd.objective import count_valid_tokens, step_terms
from tailkd.sft import prepare_sft
from tailkd.teacher import OnlineTeacher


def test_document_positions_count_from_each_documents_first_token():
    """Plain loops as the reference: a position's index since the last change of segment id (single-token documents,
    a row of one document, several rows)."""
    g = torch.Generator().manual_seed(0)
    seg = torch.cumsum((torch.rand(5, 40, generator=g) < 0.3).long(), -1)  # [5, 40]: documents of 1.. tokens
    seg[1] = 0
    want = torch.zeros_like(seg)
    for r in range(seg.shape[0]):
        for t in range(1, seg.shape[1]):
            want[r, t] = 0 if seg[r, t] != seg[r, t - 1] else want[r, t - 1] + 1
    got = document_positions(seg)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert torch.equal(document_positions(seg[2]), want[2])  # one row [T]
    assert model_inputs({"input_ids": seg}) == {}
    assert torch.equal(model_inputs({"position_ids": got})["position_ids"], got)


def _pairs(path, n=10):
    with open(path, "w") as fh:
        for i in range(n):
            words = SENTENCES[(3 * i + 1) % 8].split()
            fh.write(json.dumps({"prompt": f"Q{i}: {SENTENCES[i % 8][:12]}\n",
                                 "response": " " + " ".join(words[:2 + i % 4])}) + "\n")
    return path


def _rows(tmp_path, tokenizer, mode):
    rows = prepare_sft([_pairs(tmp_path / "pairs.jsonl")], tokenizer, seq_len=96, mode=mode, chat_template=None,
                       heldout_fraction=0.0)[0]
    rows.restart_positions = True
    return rows


def _batch(rows):
    return {key: torch.stack([rows[i][key] for i in range(len(rows))]) for key in rows[0]}


@pytest.mark.parametrize("loss,fused", [("kd", False), ("kd", True), ("tad", False), ("tad", True)])
def test_packed_examples_kept_apart_have_the_loss_of_one_example_per_row(tmp_path, tiny_tokenizer, loss, fused):
    """SFT examples packed several to a row with document attention: the online teacher and the student's step read
    each example as if alone, so the step's loss over the packed rows is the loss over the same examples one per
    padded row (TAD normalising β per document, as a pad row's one example). float64 models: two batchings of the
    same sums, ~1e-16 relative per operation through a few hundred: 1e-10 holds with room. Without the position ids
    the packed examples see each other and the loss moves by far more (the check can fail)."""
    teacher = make_tiny_lm(seed=1).double()
    student = make_tiny_lm(seed=2).double()
    pad, pack = _batch(_rows(tmp_path, tiny_tokenizer, "pad")), _batch(_rows(tmp_path, tiny_tokenizer, "pack"))
    assert "position_ids" not in pad and "position_ids" in pack  # a pad row holds one example: unchanged
    assert pack["input_ids"].shape[0] < pad["input_ids"].shape[0] and int(pack["segment_ids"][0].max()) >= 2
    n = count_valid_tokens(pad["labels"])
    assert n == count_valid_tokens(pack["labels"])
    cfg = LossConfig(name=loss, k=5, per_document=True)

    def total(batch):
        signal = OnlineTeacher(teacher, TINY_VOCAB, fused_path=fused)(batch)
        return step_terms(student, batch, signal, n, cfg, vocab_size=TINY_VOCAB, fused_path=fused).loss

    want, got = total(pad), total(pack)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    across = total({key: value for key, value in pack.items() if key != "position_ids"})
    assert abs(float(across.detach() - want.detach())) > 1e-3 * abs(float(want.detach()))


def test_calibration_reads_packed_examples_apart(tmp_path, tiny_tokenizer):
    """A calibration pass (`prepare.calibration_batches`, then `tailkd.calibration`) over packed SFT rows with
    document attention measures each example as if alone: the teacher's Block Influence equals the pass over the
    same examples one per padded row (float64: rel 1e-10, as the loss above); without the position ids it moves."""
    from tailkd.calibration import block_influence
    from tailkd.prepare import calibration_batches
    from tailkd.sizing import config_family, family_spec

    teacher = make_tiny_lm(seed=1).double()
    fam = config_family(teacher.config, family_spec(teacher))
    cfg = DistillConfig()
    cfg.student.calibration_rows, cfg.train.batch_size = 64, 64
    pad, pack = _rows(tmp_path, tiny_tokenizer, "pad"), _rows(tmp_path, tiny_tokenizer, "pack")
    batches = {mode: list(calibration_batches(cfg, rows)) for mode, rows in (("pad", pad), ("pack", pack))}
    assert "position_ids" in batches["pack"][0] and "position_ids" not in batches["pad"][0]
    (want, n_pad), (got, n_pack) = (block_influence(teacher, fam, batches[mode]) for mode in ("pad", "pack"))
    assert n_pad == n_pack
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    across = block_influence(teacher, fam, [{k: v for k, v in b.items() if k != "position_ids"}
                                            for b in batches["pack"]])[0]
    assert (across - want).abs().max() > 1e-3 * want.abs().max()


def test_check_model_passes_attention_models_and_refuses_one_that_carries_state(tiny_lm):
    import transformers

    for family in ("llama", "qwen2", "mixtral", "gpt2"):
        model = tiny_lm(family).train()
        check_model(model, "student")
        assert model.training  # its mode restored
    mamba = transformers.AutoModelForCausalLM.from_config(
        transformers.MambaConfig(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4))
    with pytest.raises(TailkdError, match=r"^the teacher \(MambaForCausalLM\) does not keep the documents of a "
                                          r"packed row apart: .*drop --data.document_attention$"):
        check_model(mamba, "teacher")


def test_check_model_refuses_positions_that_do_not_restart(tiny_lm, monkeypatch):
    """A forward that keeps the documents apart but numbers the second one from 100 on (the packed-sequence mask holds:
    100 is not 7 + 1): GPT-2's learned absolute positions then give other outputs than the document alone's,
    refused; Llama's rotary positions are relative, so its outputs are the same, and pass."""
    import tailkd.head

    real = tailkd.head.final_hidden

    def shifted(model, input_ids, position_ids=None, **kwargs):
        if position_ids is not None:
            position_ids = position_ids.clone()
            position_ids[:, position_ids.shape[1] // 2:] += 100
        return real(model, input_ids, position_ids=position_ids, **kwargs)

    monkeypatch.setattr(tailkd.head, "final_hidden", shifted)
    check_model(tiny_lm("llama"), "student")
    with pytest.raises(TailkdError, match=r"^the teacher \(GPT2LMHeadModel\) does not keep .*, a document's outputs "
                                          r"are not those of the document alone \(.*: positions that do not restart, "
                                          r"or a layer that reads the row's own positions\); drop "
                                          r"--data.document_attention$"):
        check_model(tiny_lm("gpt2", n_positions=128), "teacher")


def test_check_model_refuses_small_leaks_in_float32_and_positions_read_past_the_row(monkeypatch):
    """A freshly initialised LFM2 (convolution layers beside attention; transformers' own small init) leaks 3e-3-6e-3
    of the outputs' rms into the next document: above the float32 bound (1.2e-4), refused. Llama 4's attention
    temperature on its NoPE layers reads the row's own positions (from floor_scale 4 on here), not the restarted
    ones: refused as outputs that are not the document's alone; without the temperature tuning it passes."""
    import transformers
    from test_student_families import _COMMON, CONFIGS, make_teacher

    from tailkd.documents import leak_bound

    assert leak_bound(torch.float32) == 1024 * 2.0 ** -23 and leak_bound(torch.bfloat16) == 2.0 ** -4
    name, extra = CONFIGS["lfm2"]
    torch.manual_seed(0)
    lfm2 = transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**{**_COMMON, **extra}))
    with pytest.raises(TailkdError, match=r"^the student \(Lfm2ForCausalLM\) .* depend on the document before it"):
        check_model(lfm2, "student", seq_len=32)
    with pytest.raises(TailkdError, match=r"^the teacher \(Llama4ForCausalLM\) .* not those of the document alone"):
        check_model(make_teacher("llama4"), "teacher", seq_len=32)
    check_model(make_teacher("llama4", attn_temperature_tuning=False), "teacher", seq_len=32)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("documents")
    return {"teacher": make_teacher_dir(root / "teacher"), "corpus": write_corpus(root / "corpus.txt"),
            "pairs": _pairs(root / "pairs.jsonl", 40), "cache": root / "cache"}


def _distill(assets, out, *extra):
    return ["distill", "--teacher", str(assets["teacher"]), "--data", str(assets["corpus"]), "--data.cache_dir",
            str(assets["cache"]), "--student-layers", "2", "--seq-len", "48", "--batch-size", "4", "--steps", "3",
            "--data.eval_rows", "8", "--train.precision", "fp32", "--out", str(out), *extra]


def test_a_run_with_document_attention_evaluates_as_it_trained(assets, tmp_path, capsys):
    """A pretraining run with --data.document_attention true trains (its loss is not the default run's: its packed
    rows hold several documents) and `tailkd eval` of its student reads the run's setting: the run's last held-out KL
    (float32 sums of <= 8 x 48 token values in other batchings: 1e-5 relative holds); the other setting gives
    another figure."""
    from tailkd.documents import DOCUMENTS_APART

    apart, across = tmp_path / "apart", tmp_path / "across"
    assert main(_distill(assets, apart, "--data.document_attention", "true")) == 0
    assert re.search(r"^attention: student \w+, teacher \w+; " + re.escape(DOCUMENTS_APART) + "$",
                     capsys.readouterr().out, re.M)
    assert main(_distill(assets, across)) == 0
    assert DOCUMENTS_APART not in capsys.readouterr().out
    a, b = read_metrics(apart), read_metrics(across)
    assert [r["loss"] for r in a if r["split"] == "train"] != [r["loss"] for r in b if r["split"] == "train"]
    held = [r for r in a if r["split"] == "heldout"][-1]["kl"]
    for extra, equal in (((), True), (("--data.document_attention", "false"), False)):
        out = tmp_path / f"eval{len(extra)}.json"
        assert main(["eval", "--student", str(apart / "final"), "--max-rows", "8", "--out", str(out), *extra]) == 0
        saved = json.loads(out.read_text())
        assert (saved["kl"] == pytest.approx(held, rel=1e-5)) is equal
        assert saved.get("document_attention", False) is equal  # recorded where the documents were read apart
        assert (DOCUMENTS_APART in capsys.readouterr().out) is equal


def test_document_attention_refusals(assets, tmp_path, capsys):
    """Without document boundaries (data.doc_eos false) the setting is refused before anything loads; a teacher cache
    written with the other setting is refused before any model loads, in one line; a matching cache (float32 hidden
    states: the teacher's forward over the packed rows, each example alone) gives the online run's losses (two
    float32 forwards in other batchings, ~1e-6 relative apart: 1e-4 holds with room)."""
    assert main(_distill(assets, tmp_path / "r", "--data.document_attention", "true", "--data.doc_eos", "false")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tailkd: error: data.document_attention needs the documents' boundaries, and data.doc_eos false removes them "
        "(one continuous token stream); drop one of the two")
    sft = ["--task", "sft", "--data", str(assets["pairs"]), "--seq-len", "96"]
    assert main(_distill(assets, tmp_path / "r", *sft, "--data.document_attention", "true")) == 2  # sft_mode pad
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tailkd: error: data.document_attention keeps the examples of packed rows apart, and data.sft_mode pad rows "
        "hold one example each (apart already); drop it, or pack: --data.sft_mode pack")
    cache = tmp_path / "cache"
    assert main(["cache-teacher", "--task", "sft", "--teacher", str(assets["teacher"]), "--data", str(assets["pairs"]),
                 "--data.cache_dir", str(assets["cache"]), "--seq-len", "96", "--data.sft_mode", "pack", "--k", "16",
                 "--hidden-states", "--hidden-dtype", "fp32", "--data.document_attention", "true", "--out", str(cache),
                 "--device", "cpu"]) == 0
    assert json.loads((cache / "cache.json").read_text())["corpus"]["settings"]["document_attention"] is True
    sft = [*sft, "--data.sft_mode", "pack", "--teacher-cache", str(cache)]
    capsys.readouterr()
    assert main(_distill(assets, tmp_path / "s", *sft)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"tailkd: error: teacher cache {cache} holds the teacher's outputs over each packed document alone, this run "
        "reads the documents of a row together: rebuild it with tailkd cache-teacher --data.document_attention "
        "false, or run with --data.document_attention true")
    assert not (tmp_path / "s").exists()
    assert main(_distill(assets, tmp_path / "t", *sft, "--data.document_attention", "true")) == 0
    assert main(_distill(assets, tmp_path / "u", *sft[:-2], "--data.document_attention", "true")) == 0
    cached, online = ([r["loss"] for r in read_metrics(tmp_path / run) if r["split"] == "train"] for run in "tu")
    assert len(cached) == 3 and cached == pytest.approx(online, rel=1e-4)


def test_packed_sft_rows_of_one_example_each_are_warned_of(assets, tmp_path, tiny_tokenizer):
    """Examples too long for two to share a row of --seq-len: document attention has nothing to keep apart, said in a
    warning; rows that pack several give none."""
    import warnings

    from tailkd.prepare import setup_data

    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": f"Q{i}: {SENTENCES[i]}\n", "response": " " + SENTENCES[i + 1]})
                            + "\n" for i in range(6)))
    cfg = DistillConfig()
    cfg.data.task, cfg.data.sft_mode, cfg.data.document_attention = "sft", "pack", True
    cfg.data.paths, cfg.data.seq_len = [str(long)], 128
    cfg.data.heldout_paths, cfg.data.heldout_fraction = [], 0.3
    with pytest.warns(UserWarning, match=r"^data.document_attention: every packed training row holds one example \(\d+ "
                                         r"rows of --seq-len 128\): nothing to keep apart; a longer --seq-len packs "
                                         r"several$"):
        rows = setup_data(cfg, tiny_tokenizer, None, prompt_only=False)[1]
    assert len(rows) >= 2 and all(len(members) == 1 for members in rows.rows)
    cfg.data.seq_len = 1024
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = setup_data(cfg, tiny_tokenizer, None, prompt_only=False)[1]
    assert any(len(members) > 1 for members in rows.rows)


def test_a_student_with_a_router_term_on_packed_sft_rows_is_refused(tmp_path):
    from tailkd.documents import check_document_attention

    cfg = DistillConfig()
    cfg.data.task, cfg.data.sft_mode, cfg.data.document_attention = "sft", "pack", True
    student = make_tiny_lm("mixtral", output_router_logits=True, router_aux_loss_coef=0.01)
    with pytest.raises(TailkdError, match="its config sets output_router_logits"):
        check_document_attention(cfg, student)
    cfg.data.sft_mode = "pad"  # one example per row: nothing to keep apart, no check
    check_document_attention(cfg, student)
    cfg.data.task = "pretrain"  # rows without padding: the term passes no mask
    check_document_attention(cfg, student)


def test_a_run_refuses_a_student_that_reads_across_documents_before_its_folder_is_made(assets, tmp_path, capsys):
    """A --student DIR whose layers carry state from one document to the next (a Mamba, the teacher's tokenizer) is
    refused in one line by a run that asks for document attention; the run folder is not made."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(assets["teacher"])
    mamba = transformers.AutoModelForCausalLM.from_config(transformers.MambaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, state_size=4, eos_token_id=tok.eos_token_id))
    mamba.save_pretrained(tmp_path / "mamba")
    tok.save_pretrained(tmp_path / "mamba")
    out = tmp_path / "run"
    args = _distill(assets, out, "--student", str(tmp_path / "mamba"), "--data.document_attention", "true")
    assert main([a for a in args if a != "--student-layers" and a != "2"]) == 2
    assert re.fullmatch(r"tailkd: error: the student \(MambaForCausalLM\) does not keep the documents of a packed row "
                        r"apart: .* drop --data.document_attention", capsys.readouterr().err.strip().splitlines()[-1])
    assert not out.exists()
