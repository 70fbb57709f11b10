"""tailkd.lmeval_tasks and `tailkd lm-eval`: our offline task files, closed-form metrics, a real HF run."""

import json
import math

import pytest
import torch
from bounds import assert_within
from test_evaluate import one_line_error
from tiny import SENTENCES, make_teacher_dir, write_corpus

from tailkd import commands
from tailkd.cli import main
from tailkd.command_config import LmEvalConfig, LmEvalOptions
from tailkd.config import DataConfig
from tailkd.errors import TailkdError
from tailkd.lmeval_tasks import PAPER_TASKS, expand_tasks, prepare_tasks, read_gsm_items, run_lm_eval

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'tailkd[eval]')")
from lm_eval.api.model import LM  # noqa: E402 - after the skip when lm-eval is missing

GSM = [
    {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?", "answer": "3 + 2 = 5\n#### 5"},
    {"question": "A box holds 1,200 pens; 200 are sold. How many are left?", "answer": "1200 - 200 = 1000\n#### 1,000"},
    {"question": "What is 7 times 6?", "answer": "#### 42"},
    {"question": "What is 10 minus 13?", "answer": "-3"},  # a bare answer: written as "#### -3"
]


class ScriptedLM(LM):
    """An lm-eval model with known outputs: answers right for the questions in ``right``, and known log-likelihoods."""

    def __init__(self, right: set[str], loglik: dict[str, float]):
        super().__init__()
        self.right, self.loglik = right, loglik

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        return [self.loglik[req.args[0]] for req in requests]

    def generate_until(self, requests):
        out = []
        for req in requests:
            context = req.args[0]
            item = next(i for i in GSM if i["question"] in context)
            final = item["answer"].split("#### ")[-1] if "####" in item["answer"] else item["answer"]
            out.append(f" Let me think. #### {final}" if item["question"] in self.right else " I do not know. #### 17")
        return out


def test_expand_tasks():
    assert expand_tasks("tailkd_ppl, paper,arc_easy") == ["tailkd_ppl", *PAPER_TASKS]
    assert "winogrande" in PAPER_TASKS and "hellaswag" in PAPER_TASKS


def test_gsm_exact_match_closed_form(tmp_path):
    gsm_file = tmp_path / "gsm.jsonl"
    gsm_file.write_text("".join(json.dumps(i) + "\n" for i in GSM))
    items = read_gsm_items(gsm_file)
    assert items[3]["answer"] == "#### -3"
    inc = prepare_tasks(tmp_path / "work", gsm_items=items, max_gen_toks=32)
    assert "max_gen_toks: 32" in (inc / "tailkd_gsm.yaml").read_text()
    right = {GSM[0]["question"], GSM[1]["question"], GSM[3]["question"]}  # 3 of 4 right, "1,000" == "1000"
    res = run_lm_eval(ScriptedLM(right, {}), ["tailkd_gsm"], include_path=inc)
    assert res["results"]["tailkd_gsm"]["exact_match,strict-match"] == pytest.approx(0.75)
    assert res["n-samples"]["tailkd_gsm"]["effective"] == 4


class FinalAnswerLM(LM):
    """Writes ``#### N`` for the question's final answer N (given per question)."""

    def __init__(self, finals: dict[str, str]):
        super().__init__()
        self.finals = finals

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        return [f" So. #### {next(n for q, n in self.finals.items() if q in req.args[0])}" for req in requests]


def test_gsm_reference_whitespace_does_not_turn_right_answers_wrong(tmp_path):
    """lm-eval compares the text after the reference's last "#### " verbatim: an answer line ending in a newline or a
    space, or "####42" without the space, would score every right output 0. The final answer is read as the text
    after the last "####", whitespace dropped."""
    rows = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5\n"},
            {"question": "What is 6 times 7?", "answer": "####42"},
            {"question": "What is 1 - 4?", "answer": "1 - 4 = -3 ####  -3 "},
            {"question": "What is 9 + 1?", "answer": " 10\n"}]
    gsm_file = tmp_path / "gsm.jsonl"
    gsm_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = read_gsm_items(gsm_file)
    assert [i["answer"] for i in items] == ["2 + 3 = 5\n#### 5", "#### 42", "1 - 4 = -3 #### -3", "#### 10"]
    finals = dict(zip((r["question"] for r in rows), ("5", "42", "-3", "10")))
    inc = prepare_tasks(tmp_path / "w", gsm_items=items)
    res = run_lm_eval(FinalAnswerLM(finals), ["tailkd_gsm"], include_path=inc)
    assert res["results"]["tailkd_gsm"]["exact_match,strict-match"] == 1.0


@pytest.mark.parametrize("content, line, why", [
    (b'{"question": "q", "answer": "#### 5"}\n{"question": "caf\xe9?", "answer": "5"}\n', 2,
     r"not UTF-8 \(invalid continuation byte\); --gsm-data needs UTF-8 JSON lines"),  # a UnicodeDecodeError
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", 1, r"not valid JSON \(nested too deeply to read\)"),  # RecursionError
])
def test_a_gsm_file_that_cannot_be_read_is_one_line_naming_the_line(tmp_path, content, line, why):
    gsm_file = tmp_path / "gsm.jsonl"
    gsm_file.write_bytes(content)
    with pytest.raises(TailkdError, match=rf"^{gsm_file}:{line}: {why}"):
        read_gsm_items(gsm_file)


def test_perplexity_task_closed_form(tmp_path):
    docs = ["one two three", "héllo wörld"]
    loglik = {docs[0]: -6.0, docs[1]: -4.0}
    inc = prepare_tasks(tmp_path / "work", ppl_docs=docs)
    res = run_lm_eval(ScriptedLM(set(), loglik), ["tailkd_ppl"], include_path=inc)["results"]["tailkd_ppl"]
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)  # 13 + 13
    n_words = 5
    assert res["bits_per_byte,none"] == pytest.approx(10.0 / (n_bytes * math.log(2)), rel=1e-12)
    assert res["byte_perplexity,none"] == pytest.approx(math.exp(10.0 / n_bytes), rel=1e-12)
    assert res["word_perplexity,none"] == pytest.approx(math.exp(10.0 / n_words), rel=1e-12)


def test_perplexity_task_scores_documents_that_look_like_python_lists(tmp_path):
    """A document such as "[1]" (a footnote paragraph) or "[1, 2]" is text: lm-eval turns a Jinja-rendered target that
    reads as a Python list into that list, so tailkd_ppl takes its documents as the field itself, not "{{text}}"."""
    docs = ["one two three", "[1]", "[1, 2]"]
    loglik = {docs[0]: -6.0, docs[1]: -3.0, docs[2]: -5.0}
    inc = prepare_tasks(tmp_path / "work", ppl_docs=docs)
    res = run_lm_eval(ScriptedLM(set(), loglik), ["tailkd_ppl"], include_path=inc)["results"]["tailkd_ppl"]
    n_bytes = 13 + 3 + 6
    assert res["bits_per_byte,none"] == pytest.approx(14.0 / (n_bytes * math.log(2)), rel=1e-12)
    assert res["word_perplexity,none"] == pytest.approx(math.exp(14.0 / (3 + 1 + 2)), rel=1e-12)


def test_task_data_is_cached_in_the_work_folder_not_the_users_datasets_cache(tmp_path, monkeypatch):
    """datasets keeps an arrow copy of every JSONL it loads, keyed by the file's path: in the user's datasets cache each
    `tailkd lm-eval` run (a new temporary folder) left a copy of its documents that nothing read again. The copy is
    made in the work folder, removed with it."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "user_cache")
    gsm_file = tmp_path / "gsm.jsonl"
    gsm_file.write_text("".join(json.dumps(i) + "\n" for i in GSM))
    inc = prepare_tasks(tmp_path / "work", ppl_docs=["one two three"], gsm_items=read_gsm_items(gsm_file))
    run_lm_eval(ScriptedLM(set(), {"one two three": -1.0}), ["tailkd_ppl", "tailkd_gsm"], include_path=inc)
    assert not list((tmp_path / "user_cache").rglob("*.arrow"))
    assert len(list(inc.rglob("*.arrow"))) == 2


def own_loglik(model_dir, doc):
    """Σ_t log p(x_t | x_<t) of a short document, the first token conditioned on BOS (lm-eval's convention)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[tok.bos_token_id, *tok(doc, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        logp = model(ids).logits.double().log_softmax(-1)
    return float(logp[0, :-1].gather(-1, ids[0, 1:, None]).sum())


def own_loglik_bound(model_dir, doc):
    """lm-eval's float32 forward (its own batching/padding) and ours: two float32 forwards, each within the
    forward-error model of loss_bounds.lm_logits_err (dz per token); each log-probability then moves by <= 2dz, plus
    lm-eval's float32 log_softmax (κ_V + 2u|log p|, ours is float64): summed over the document's tokens."""
    from bounds import SAFETY, U32, lse_kappa
    from loss_bounds import model_logits
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[tok.bos_token_id, *tok(doc, add_special_tokens=False)["input_ids"]]])
    logits, dz = model_logits(model, ids, model.config.vocab_size)
    logp = logits.double().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    per_token = 4 * dz[0, :-1] + SAFETY * (lse_kappa(logits.shape[-1]) + 2 * U32 * logp.abs())
    return float(per_token.sum())


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    return {"model": make_teacher_dir(root / "student", layers=2, train_steps=0),
            "corpus": write_corpus(root / "corpus.txt", 12),
            "cache": root / "cache"}


def test_real_student_ppl_matches_our_own_loglikelihood(student, tmp_path):
    docs_file = tmp_path / "docs.jsonl"
    docs_file.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES[:3]))
    gsm_file = tmp_path / "gsm.jsonl"
    gsm_file.write_text("".join(json.dumps(i) + "\n" for i in GSM[:2]))
    cfg = LmEvalConfig(data=DataConfig(paths=[str(docs_file)], cache_dir=str(student["cache"])),
                       lm_eval=LmEvalOptions(model=str(student["model"]), tasks="tailkd_ppl,tailkd_gsm", split="all",
                                             gsm_data=str(gsm_file), max_gen_toks=8, device="cpu",
                                             out=str(tmp_path / "lm.json")))
    res = commands.lm_eval(cfg.validate(), log_samples=True)["results"]
    samples = res["samples"]["tailkd_ppl"]
    assert len(samples) == 3
    for s in samples:
        assert_within(s["resps"][0][0], own_loglik(student["model"], s["doc"]["text"]),
                      own_loglik_bound(student["model"], s["doc"]["text"]), msg=s["doc"]["text"])
    assert 0.0 <= res["results"]["tailkd_gsm"]["exact_match,strict-match"] <= 1.0
    assert [s["target"] for s in res["samples"]["tailkd_gsm"]] == [i["answer"] for i in GSM[:2]]
    saved = json.loads((tmp_path / "lm.json").read_text())
    assert "samples" not in saved and set(saved["results"]) == {"tailkd_ppl", "tailkd_gsm"}


def test_lm_eval_cli_on_the_heldout_documents(student, tmp_path, capsys):
    out = tmp_path / "lm_eval.json"
    assert main(["lm-eval", "--model", str(student["model"]), "--tasks", "tailkd_ppl", "--data",
                 str(student["corpus"]), "--cache-dir", str(student["cache"]), "--device", "cpu",
                 "--out", str(out)]) == 0
    assert "tailkd_ppl" in capsys.readouterr().out
    r = json.loads(out.read_text())["results"]["tailkd_ppl"]
    assert math.isfinite(r["bits_per_byte,none"]) and r["bits_per_byte,none"] > 0
    # the held-out documents are the ones `tailkd distill` holds out (at least one of the 12)
    n = json.loads(out.read_text())["n-samples"]["tailkd_ppl"]["effective"]
    assert 1 <= n < 12


def test_sigterm_during_a_run_removes_the_work_folder_and_exits_143(student, tmp_path):
    """lm-eval runs in a temporary work folder; SIGTERM used to end the process at once and leave it behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    temp = tmp_path / "tmp"
    temp.mkdir()
    out = tmp_path / "lm_eval.json"
    env = {**os.environ, "TMPDIR": str(temp), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tailkd.cli", "lm-eval", "--model", str(student["model"]),
                             "--tasks", "tailkd_ppl", "--data", str(student["corpus"]), "--cache-dir",
                             str(student["cache"]), "--device", "cpu", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    end = time.monotonic() + 240
    while not any(p.name.startswith("tailkd-lmeval-") for p in temp.iterdir()):
        assert proc.poll() is None, f"ended (rc {proc.returncode}) before its work folder: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < end, "no work folder after 240 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "tailkd: terminated (SIGTERM)" and "Traceback" not in err
    assert not any(p.name.startswith("tailkd-lmeval-") for p in temp.iterdir()) and not out.exists()


def test_a_sigterm_as_the_work_folder_is_made_leaves_nothing(student, tmp_path, monkeypatch, capsys):
    """The work folder is named before it is made, inside the block that removes it: a SIGTERM raised the moment it
    exists (here: as its mkdir returns) leaves nothing. Before, mkdtemp's folder was made before that block began, and
    a SIGTERM in between left it (test_sigterm_during_a_run_removes_the_work_folder_and_exits_143 failed so once in a
    fresh-clone CI run)."""
    import tempfile
    from pathlib import Path

    from tailkd.errors import Terminated

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    mkdir = Path.mkdir

    def mkdir_then_sigterm(self, *args, **kwargs):
        mkdir(self, *args, **kwargs)
        if self.name.startswith("tailkd-lmeval-"):
            raise Terminated

    monkeypatch.setattr(Path, "mkdir", mkdir_then_sigterm)
    out = tmp_path / "lm_eval.json"
    assert main(["lm-eval", "--model", str(student["model"]), "--tasks", "tailkd_ppl", "--data",
                 str(student["corpus"]), "--cache-dir", str(student["cache"]), "--device", "cpu",
                 "--out", str(out)]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "tailkd: terminated (SIGTERM)"
    assert list(temp.iterdir()) == [] and not out.exists()


def test_write_only_prints_the_lm_eval_command(student, tmp_path, capsys):
    work = tmp_path / "tasks"
    assert main(["lm-eval", "--model", str(student["model"]), "--tasks", "tailkd_ppl", "--data",
                 str(student["corpus"]), "--split", "all", "--work-dir", str(work), "--write-only"]) == 0
    printed = capsys.readouterr().out
    assert f"--include_path {work.resolve()}" in printed and "--model hf" in printed and "pretrained=" in printed
    rows = [json.loads(line) for line in (work / "tailkd_ppl.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and str(work.resolve() / "tailkd_ppl.jsonl") in (work / "tailkd_ppl.yaml").read_text()


def test_tailkd_ppl_of_a_model_trained_on_builtin_math(student, tmp_path):
    """A model whose run trained on `--data builtin:math`: tailkd_ppl reads that run's held-out documents of the
    built-in math corpus ('builtin:math' resolved as tailkd distill resolves it, not taken for a file path)."""
    pytest.importorskip("reasoning_gym", reason="builtin:math needs reasoning-gym")
    import shutil

    import yaml

    from tailkd.mathdata import default_math_dataset

    run = tmp_path / "run"
    shutil.copytree(student["model"], run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"paths": ["builtin:math"], "math_train": 40,
                                                              "math_heldout": 4, "cache_dir": str(student["cache"])}}))
    work = tmp_path / "tasks"
    assert main(["lm-eval", "--model", str(run / "final"), "--work-dir", str(work), "--write-only"]) == 0
    docs = [json.loads(line)["text"] for line in (work / "tailkd_ppl.jsonl").read_text().splitlines()]
    corpus = default_math_dataset(student["cache"], n_train=40, n_heldout=4).corpus.read_text()
    assert 1 <= len(docs) < 40 and all("####" in d and d in corpus for d in docs)


def test_tailkd_ppl_refuses_the_heldout_split_of_an_sft_runs_data(student, tmp_path, capsys):
    """An SFT run trains on the prompt/response examples of its data and holds out other examples (builtin:math: the
    problems of heldout.jsonl): the held-out split of that data read as text (builtin:math: its corpus.txt, the
    TRAINING problems) is not what the run held out, so tailkd_ppl would score text the model trained on as held out.
    It is a one-line error naming the way out; text given with --data is scored."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(student["model"], run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"task": "sft", "paths": ["builtin:math"],
                                                              "math_train": 40, "math_heldout": 4,
                                                              "cache_dir": str(student["cache"])}}))
    assert main(["lm-eval", "--model", str(run / "final"), "--work-dir", str(tmp_path / "w"), "--write-only"]) == 2
    one_line_error(capsys.readouterr().err, "--data")
    assert main(["lm-eval", "--model", str(run / "final"), "--data", str(student["corpus"]), "--work-dir",
                 str(tmp_path / "w2"), "--write-only"]) == 0
    assert (tmp_path / "w2" / "tailkd_ppl.jsonl").is_file()
    # --split all asks for every document of the run's own data, training text included: not refused (refusing
    # it too survived the mutation audit)
    assert main(["lm-eval", "--model", str(run / "final"), "--split", "all", "--work-dir", str(tmp_path / "w3"),
                 "--write-only"]) == 0
    assert (tmp_path / "w3" / "tailkd_ppl.jsonl").is_file()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--tasks", "tailkd_gsm"], "--gsm-data"),
        (["--tasks", "tailkd_ppl", "--split", "all", "--data", "/nonexistent/x.txt"], "/nonexistent/x.txt"),
        (["--tasks", "no_such_task_xyz", "--split", "all"], "no_such_task_xyz"),
    ],
)
def test_lm_eval_errors_are_one_line(student, capsys, extra, needle):
    assert main(["lm-eval", "--model", str(student["model"]), "--data", str(student["corpus"]), *extra]) == 2
    one_line_error(capsys.readouterr().err, needle)


def test_write_only_names_an_unknown_task_before_writing(student, tmp_path, capsys):
    """--write-only checked no task name: the printed lm_eval command failed later on a misspelt one. With lm-eval
    installed its own tasks' names are checked before the folder is written; ours are always known."""
    work = tmp_path / "tasks"
    base = ["lm-eval", "--model", str(student["model"]), "--data", str(student["corpus"]), "--split", "all",
            "--work-dir", str(work), "--write-only"]
    assert main([*base, "--tasks", "tailkd_ppl,arc_easyy"]) == 2
    one_line_error(capsys.readouterr().err, "unknown lm-eval task 'arc_easyy'; check the name with `lm_eval ls tasks`")
    assert not work.exists()
    assert main([*base, "--tasks", "tailkd_ppl,arc_easy"]) == 0
    assert "--tasks tailkd_ppl,arc_easy" in capsys.readouterr().out


def test_max_gen_toks_beyond_the_models_context_is_one_line_before_loading(student, tmp_path, capsys):
    """lm-eval's generate_until keeps context − max_gen_toks prompt tokens and fails on an assertion (exit 1, after
    loading the model and the data) when that is not positive: the default 256 on the tiny 128-position model is
    refused up front in one line; 127 leaves one prompt token and is accepted."""
    gsm_file = tmp_path / "gsm.jsonl"
    gsm_file.write_text("".join(json.dumps(i) + "\n" for i in GSM))
    base = ["lm-eval", "--model", str(student["model"]), "--tasks", "tailkd_gsm", "--gsm-data", str(gsm_file),
            "--write-only"]
    assert main([*base, "--work-dir", str(tmp_path / "w1")]) == 2
    one_line_error(capsys.readouterr().err, "--max-gen-toks 256 leaves no room for the question in the 128-token")
    assert not (tmp_path / "w1").exists()
    assert main([*base, "--max-gen-toks", "127", "--work-dir", str(tmp_path / "w2")]) == 0


def test_a_model_config_of_a_wrong_field_type_is_one_line(student, tmp_path, capsys):
    """A config.json field of the wrong type (huggingface_hub's StrictDataclassError, not a ValueError): the context
    check of `--write-only` leaves it to lm-eval's loading (it raised), and a run reports it in one line before
    lm-eval loads the model (a bare exception line, exit 1)."""
    import shutil

    from tailkd.commands import _check_generation_room

    model = tmp_path / "m"
    shutil.copytree(student["model"], model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": "many"}))
    assert _check_generation_room(model, 256) is None
    assert main(["lm-eval", "--model", str(model), "--tasks", "tailkd_ppl", "--out", str(tmp_path / "r.json")]) == 2
    one_line_error(capsys.readouterr().err, f"cannot read the model config in {model} (Validation error for field "
                                            "'max_position_embeddings': TypeError: Field 'max_position_embeddings' "
                                            "expected int, got str")


def test_paper_tasks_offline_fail_in_one_line(student, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(["lm-eval", "--model", str(student["model"]), "--tasks", "arc_easy", "--limit", "2"]) == 2
    one_line_error(capsys.readouterr().err, "HF_HUB_OFFLINE=0")


def test_num_fewshot_on_our_zero_shot_tasks_is_said(student, tmp_path, capsys):
    """tailkd_gsm's YAML sets 0 shots, which lm-eval keeps whatever --num-fewshot says (its n-shot stays 0), and
    tailkd_ppl scores whole documents: --num-fewshot does not apply to them, and the user is told so."""
    gsm_file = tmp_path / "gsm.jsonl"
    gsm_file.write_text("".join(json.dumps(i) + "\n" for i in GSM))
    inc = prepare_tasks(tmp_path / "work", gsm_items=read_gsm_items(gsm_file), max_gen_toks=8)
    res = run_lm_eval(ScriptedLM(set(), {}), ["tailkd_gsm"], include_path=inc, num_fewshot=2)
    assert res["n-shot"]["tailkd_gsm"] == 0
    assert main(["lm-eval", "--model", str(student["model"]), "--tasks", "tailkd_gsm,arc_easy", "--gsm-data",
                 str(gsm_file), "--max-gen-toks", "8", "--num-fewshot", "2", "--work-dir", str(tmp_path / "w"),
                 "--write-only"]) == 0
    err = capsys.readouterr().err
    assert "tailkd_gsm is zero-shot: --num-fewshot 2 applies to the other tasks only" in err


def test_limit_below_one_is_a_fraction_as_the_help_says(tmp_path, capsys):
    gsm_file = tmp_path / "gsm.jsonl"
    gsm_file.write_text("".join(json.dumps(i) + "\n" for i in GSM))
    inc = prepare_tasks(tmp_path / "work", gsm_items=read_gsm_items(gsm_file), max_gen_toks=8)
    res = run_lm_eval(ScriptedLM(set(), {}), ["tailkd_gsm"], include_path=inc, limit=0.5)
    assert res["n-samples"]["tailkd_gsm"]["effective"] == 2  # half of the 4, not "at most 0.5 documents"
    with pytest.raises(SystemExit):
        main(["lm-eval", "--help"])
    assert "below 1: this fraction" in " ".join(capsys.readouterr().out.split())


def test_a_full_disk_while_the_task_files_are_written_leaves_the_earlier_ones_whole(tmp_path, monkeypatch):
    """prepare_tasks wrote the task YAMLs with Path.write_text: a full disk (or a kill) part-way left a cut YAML in
    --work-dir (--write-only's output, read later by the printed lm_eval command, or by lm-eval at once), where a
    complete one had been. Now each file is written whole or not at all: the earlier YAML stays."""
    import errno
    import os
    from pathlib import Path

    work = tmp_path / "tasks"
    prepare_tasks(work, ppl_docs=["one document", "another"], gsm_items=[{"question": "1+1?", "answer": "#### 2"}])
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.suffix == ".yaml"}
    real = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        if ".yaml" in self.name:
            real(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError):
        prepare_tasks(work, ppl_docs=["one document"], gsm_items=[{"question": "2+2?", "answer": "#### 4"}],
                      max_gen_toks=64)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.suffix == ".yaml"} == before
    assert not [p.name for p in work.iterdir() if p.name.startswith(".tmp-")]


def test_the_printed_command_carries_every_option(tmp_path, monkeypatch):
    """`lm_eval_command` (what `--write-only` prints) passes each option through: the model folder absolute and in
    float32 (as `run_lm_eval` loads it), every task in order, the batch size, the device, a fractional or whole
    --limit as given, and --num_fewshot only when set."""
    import shlex

    from tailkd.lmeval_tasks import lm_eval_command

    monkeypatch.chdir(tmp_path)
    parts = shlex.split(lm_eval_command("model", ["tailkd_ppl", "tailkd_gsm"], tmp_path / "inc", batch_size=3,
                                        device="cuda:1", limit=0.25, num_fewshot=2))
    assert parts == ["lm_eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'model'},dtype=float32",
                     "--include_path", str(tmp_path / "inc"), "--tasks", "tailkd_ppl,tailkd_gsm", "--batch_size", "3",
                     "--device", "cuda:1", "--limit", "0.25", "--num_fewshot", "2"]
    plain = shlex.split(lm_eval_command("model", ["tailkd_ppl"], tmp_path, limit=40.0))
    assert plain[-4:] == ["--device", "cpu", "--limit", "40"] and "--num_fewshot" not in plain


def test_corpus_documents_are_the_held_out_ones_by_hash_in_reading_order(tmp_path):
    """`corpus_documents` reads the corpus with its document separator and keeps, with ``heldout_only``, exactly the
    documents whose `corpus.doc_hash` is below the split threshold (as `tailkd distill` holds them out), in
    reading order; without it, every document."""
    import types

    from tailkd import corpus
    from tailkd.lmeval_tasks import corpus_documents

    docs = [f"document number {i} about {SENTENCES[i % len(SENTENCES)]}" for i in range(12)]
    path = tmp_path / "c.txt"
    path.write_text("\n".join(docs) + "\n")  # one document per line: doc_sep "line"
    hashes = sorted(corpus.doc_hash(d) for d in docs)
    info = types.SimpleNamespace(meta={"files": [{"path": str(path)}], "split_threshold": hashes[5]})
    assert corpus_documents(info, doc_sep="line", heldout_only=False) == docs
    held = corpus_documents(info, doc_sep="line")
    assert held == [d for d in docs if corpus.doc_hash(d) < hashes[5]] and len(held) == 5


def test_a_model_folder_lm_eval_cannot_load_is_named_not_the_hub(student, tmp_path, monkeypatch):
    """Offline, an OSError of lm-eval was reported as the hub's ("run online with HF_HUB_OFFLINE=0"); with only our
    tasks (local data) the hub has no part in the run: a folder with config.json but no weights is named as the
    failure. A run with one of lm-eval's own tasks offline still gets the hub hint."""
    import shutil

    import tailkd.lmeval_tasks as lt

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tmp_path / "m"
    shutil.copytree(student["model"], model, ignore=shutil.ignore_patterns("*.safetensors"))
    inc = prepare_tasks(tmp_path / "work", ppl_docs=["one two three"])
    with pytest.raises(TailkdError) as err:
        run_lm_eval(model, ["tailkd_ppl"], include_path=inc)
    assert f"could not load the model in {model} (" in str(err.value) and "check that folder" in str(err.value)
    assert "HF_HUB_OFFLINE" not in str(err.value) and "\n" not in str(err.value)

    def no_connection(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the dataset")

    monkeypatch.setattr(lm_eval, "simple_evaluate", no_connection)
    monkeypatch.setattr(lt, "task_manager", lambda tasks, include_path: None)  # lm-eval's task index takes seconds
    with pytest.raises(TailkdError, match="fetch their data from the Hugging Face hub: run online with HF_HUB_OFF"):
        run_lm_eval(model, ["tailkd_ppl", "arc_easy"], include_path=inc)


def test_expand_tasks_skips_empty_names_and_refuses_no_task():
    """An empty name (a doubled or trailing comma) is skipped, not passed to lm-eval as task ''; nothing but empty names
    is the one-line "no task given"."""
    assert expand_tasks("tailkd_ppl,,arc_easy,") == ["tailkd_ppl", "arc_easy"]
    assert expand_tasks(["", " paper"]) == list(PAPER_TASKS)
    for spec in ("", " , ", []):
        with pytest.raises(TailkdError, match=r"^no task given; pass --tasks tailkd_ppl,tailkd_gsm"):
            expand_tasks(spec)


@pytest.mark.parametrize("content, line, why", [
    (b'{"question": "q", "answer": "#### 5"}\n{"question": "q2"}\n', 2, 'needs "question" \\(a string\\) and "answer"'),
    (b'{"question": 7, "answer": "#### 5"}\n', 1, 'needs "question" \\(a string\\) and "answer"'),
    (b'{"question": "q", "answer": "2 + 3 = 5 ####  \\n"}\n', 1, "the final answer is empty"),
    (b'{"question": "q", "answer": ""}\n', 1, "the final answer is empty"),
    (b'\n{"question": "q", "answer": "#### 5"}\n  \n\n{"question": "q"}\n', 5, 'needs "question"'),  # blanks counted
])
def test_a_gsm_item_without_a_question_or_a_final_answer_is_one_line_naming_the_line(tmp_path, content, line, why):
    gsm_file = tmp_path / "gsm.jsonl"
    gsm_file.write_bytes(content)
    with pytest.raises(TailkdError, match=rf"^{gsm_file}:{line}: {why}") as err:
        read_gsm_items(gsm_file)
    assert "\n" not in str(err.value)


def test_gsm_blank_lines_are_skipped_and_a_file_without_a_problem_is_refused(tmp_path):
    gsm_file = tmp_path / "gsm.jsonl"
    gsm_file.write_text('\n{"question": "q1", "answer": "#### 1"}\n \t\n\n{"question": "q2", "answer": "2"}\n\n')
    assert read_gsm_items(gsm_file) == [{"question": "q1", "answer": "#### 1"}, {"question": "q2", "answer": "#### 2"}]
    gsm_file.write_text("\n  \n")
    with pytest.raises(TailkdError, match=rf"^--gsm-data {gsm_file} holds no problem; add"):
        read_gsm_items(gsm_file)
    with pytest.raises(TailkdError, match=rf"^--gsm-data {tmp_path / 'none.jsonl'} does not exist; pass a .jsonl"):
        read_gsm_items(tmp_path / "none.jsonl")


def test_task_files_refuse_no_document_and_no_generated_token(tmp_path):
    """An empty tailkd_ppl.jsonl makes lm-eval end in a bare StopIteration, and max_gen_toks 0 generates no answer:
    prepare_tasks refuses both in one line (the CLI refuses --max-gen-toks 0 when it reads its options), before it
    creates its folder."""
    with pytest.raises(TailkdError, match=r"^no documents for tailkd_ppl; pass --data with text$"):
        prepare_tasks(tmp_path / "w1", ppl_docs=[])
    with pytest.raises(TailkdError, match=r"^--max-gen-toks 0 must be >= 1$"):
        prepare_tasks(tmp_path / "w2", gsm_items=[{"question": "1+1?", "answer": "#### 2"}], max_gen_toks=0)
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()


def test_summary_drops_the_samples_only():
    from tailkd.lmeval_tasks import summarize

    results = {"results": {"t": {}}, "configs": {"t": {"dataset_kwargs": {}}}, "config": {"model": "hf"},
               "n-samples": {"t": {}}, "samples": {"t": [{"doc": {}}]}}
    assert summarize(results) == {k: v for k, v in results.items() if k != "samples"}


def test_the_printed_command_is_shell_quoted(tmp_path):
    """A model or task folder with a space (or a quote) reads back through the shell as one argument."""
    import shlex

    from tailkd.lmeval_tasks import lm_eval_command

    model, inc = tmp_path / "my model's", tmp_path / "task folder"
    parts = shlex.split(lm_eval_command(model, ["tailkd_ppl"], inc))
    assert parts[4] == f"pretrained={model},dtype=float32" and parts[6] == str(inc) and len(parts) == 13


def test_max_gen_toks_equal_to_the_context_is_refused(student):
    """context − max_gen_toks prompt tokens must be positive: 128 on the 128-position model leaves none."""
    from tailkd.commands import _check_generation_room

    with pytest.raises(TailkdError, match=r"^tailkd_gsm: --max-gen-toks 128 leaves no room .* the 128-token context"):
        _check_generation_room(student["model"], 128)
    assert _check_generation_room(student["model"], 127) is None


def test_a_model_folder_without_config_json_is_one_line(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    assert main(["lm-eval", "--model", str(tmp_path / "m"), "--tasks", "tailkd_ppl", "--write-only"]) == 2
    one_line_error(capsys.readouterr().err, f"--model {tmp_path / 'm'} is not a saved model folder (no config.json)")
    assert main(["lm-eval", "--model", str(tmp_path / "m"), "--max-gen-toks", "0"]) == 2
    one_line_error(capsys.readouterr().err, "lm_eval.max_gen_toks=0 must be >= 1")


def test_tailkd_ppl_reads_the_runs_documents_with_its_separator(student, tmp_path):
    """The run's data.doc_sep (here `line`, in its config.yaml) splits the documents of tailkd_ppl as it split them for
    `tailkd distill`; the default for a .txt file (blank_line) would give paragraphs of two lines."""
    import shutil

    import yaml

    lines = [f"{s} ({i})" for i, s in enumerate(SENTENCES[:6] * 2)]
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"{a}\n{b}\n\n" for a, b in zip(lines[::2], lines[1::2])))
    run = tmp_path / "run"
    shutil.copytree(student["model"], run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"paths": [str(corpus)], "doc_sep": "line",
                                                              "cache_dir": str(student["cache"])}}))
    work = tmp_path / "tasks"
    assert main(["lm-eval", "--model", str(run / "final"), "--split", "all", "--work-dir", str(work),
                 "--write-only"]) == 0
    assert [json.loads(r)["text"] for r in (work / "tailkd_ppl.jsonl").read_text().splitlines()] == lines


class CallRecorder:
    """lm_eval.simple_evaluate in place: records its arguments, returns results of no task."""

    def __init__(self):
        self.kwargs = None

    def __call__(self, **kwargs):
        self.kwargs = kwargs
        return {"results": {}, "configs": {}}


def test_a_run_passes_every_option_to_lm_eval(student, tmp_path, monkeypatch, capsys):
    """`tailkd lm-eval` runs lm-eval in-process with what its printed command says: the folder absolute in float32,
    the tasks, batch size, the device resolved (auto: cpu here, as torch sees no GPU), --limit and --num-fewshot."""
    from tailkd.distributed import resolve_device

    monkeypatch.setattr(lm_eval, "simple_evaluate", record := CallRecorder())
    gsm_file = tmp_path / "gsm.jsonl"
    gsm_file.write_text("".join(json.dumps(i) + "\n" for i in GSM))
    base = ["lm-eval", "--model", str(student["model"]), "--tasks", "tailkd_gsm", "--gsm-data", str(gsm_file),
            "--max-gen-toks", "8", "--batch-size", "3", "--device", "auto", "--limit", "0.5", "--num-fewshot", "2"]
    assert main([*base, "--out", str(tmp_path / "r.json")]) == 0
    device = str(resolve_device("auto"))
    assert {k: record.kwargs[k] for k in ("model", "model_args", "tasks", "batch_size", "device", "limit",
                                          "num_fewshot")} == {
        "model": "hf", "model_args": {"pretrained": str(student["model"].resolve()), "dtype": "float32"},
        "tasks": ["tailkd_gsm"], "batch_size": 3, "device": device, "limit": 0.5, "num_fewshot": 2}
    ran = commands.lm_eval(LmEvalConfig(lm_eval=LmEvalOptions(
        model=str(student["model"]), tasks="tailkd_gsm", gsm_data=str(gsm_file), max_gen_toks=8, device="cpu",
        out=str(tmp_path / "r2.json"))).validate())
    assert ran["include_path"] is None  # its temporary task folder, removed after the run, is not named
    capsys.readouterr()
    work = tmp_path / "tasks"
    got = commands.lm_eval(LmEvalConfig(lm_eval=LmEvalOptions(
        model=str(student["model"]), tasks="tailkd_gsm", gsm_data=str(gsm_file), max_gen_toks=8, device="auto",
        work_dir=str(work), write_only=True)).validate())
    assert f" --device {device} " in f"{got['command']} " and got["command"] in capsys.readouterr().out
    assert got == {"command": got["command"], "include_path": str(work.resolve()), "results": None}
    assert (work / "tailkd_gsm.yaml").is_file()


def test_only_the_asked_tasks_are_prepared_and_warned_about(student, tmp_path, monkeypatch, capsys):
    """tailkd_ppl's documents are read only when it is asked (a run on tailkd_gsm needs no --data); the --num-fewshot
    warning is for our zero-shot tasks only: none for lm-eval's own tasks, none without --num-fewshot."""
    import tailkd.lmeval_tasks as lt

    def no_ppl(cfg):
        raise AssertionError("tailkd_ppl's documents read")

    monkeypatch.setattr(commands, "ppl_documents", no_ppl)
    monkeypatch.setattr(lt, "task_manager", lambda tasks, include_path: None)  # lm-eval's task index takes seconds
    gsm_file = tmp_path / "gsm.jsonl"
    gsm_file.write_text("".join(json.dumps(i) + "\n" for i in GSM))
    base = ["lm-eval", "--model", str(student["model"]), "--write-only"]
    assert main([*base, "--tasks", "tailkd_gsm,arc_easy", "--gsm-data", str(gsm_file), "--max-gen-toks", "8",
                 "--work-dir", str(tmp_path / "w1")]) == 0
    assert sorted(p.name for p in (tmp_path / "w1").iterdir()) == ["tailkd_gsm.jsonl", "tailkd_gsm.yaml"]
    assert main([*base, "--tasks", "arc_easy", "--num-fewshot", "2", "--work-dir", str(tmp_path / "w2")]) == 0
    out = capsys.readouterr()
    assert "--num_fewshot 2" in out.out and "warning" not in out.err
