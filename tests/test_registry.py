"""A loss of the user's own in the registry: a row that is malformed fails in one clear line, never silently."""

import pytest
import torch
from user_loss import (
    HELLINGER,
    h_backward,
    h_forward,
    h_teacher,
    hellinger,
    hellinger_per_token,
    register_amari,
    register_hellinger,
)

from tailkd import divergences as dv
from tailkd.config import LossConfig
from tailkd.head import Head, HeadSpec
from tailkd.objective import IGNORE_INDEX, chunked_objective, count_valid_tokens, objective
from tailkd.registry import LOSSES, LossSpec

V = 37


@pytest.fixture
def restore_losses():
    """The registry as it was after the test: a row added here must not reach other tests."""
    saved = dict(LOSSES)
    yield
    LOSSES.clear()
    LOSSES.update(saved)


def _inputs(seed=0, B=2, T=6, d=5):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    h_t = torch.randn(B, T, d, generator=g, dtype=torch.float64) * 2
    w_s = torch.randn(V, d, generator=g, dtype=torch.float64)
    w_t = torch.randn(V, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = IGNORE_INDEX  # masked positions: a whole-batch mean would count them
    return h_s, w_s, h_t, w_t, labels


def _dense(name, h_s, w_s, h_t, w_t, labels):
    return objective(h_s @ w_s.T, labels, count_valid_tokens(labels), cfg=LossConfig(name=name),
                     teacher_logits=h_t @ w_t.T)


def _chunked(name, h_s, w_s, h_t, w_t, labels, chunk_size=4):
    return chunked_objective(h_s, Head(w_s, None, HeadSpec(V)), labels, count_valid_tokens(labels),
                             cfg=LossConfig(name=name), teacher_hidden=h_t, teacher_head=Head(w_t, None, HeadSpec(V)),
                             chunk_size=chunk_size)


def _one_line(exc_info, *parts):
    text = str(exc_info.value)
    assert "\n" not in text and all(p in text for p in parts), text


@pytest.mark.parametrize("bad, shape", [
    (lambda d, s, t, labels, mask, seg: hellinger(s, t).mean(), "()"),  # a mean instead of one value per token
    (lambda d, s, t, labels, mask, seg: 0.5 * (torch.softmax(t, -1).sqrt() - torch.softmax(s, -1).sqrt()).square(),
     "V"),  # the sum over the vocabulary forgotten
])
@pytest.mark.parametrize("path", [_dense, _chunked])
def test_a_per_token_function_of_the_wrong_shape_is_refused(restore_losses, bad, shape, path):
    """A per-token function that returns a batch mean broadcast silently over the masked tokens on the dense path (the
    loss then counted positions without a label) and one that forgets the sum over V failed with torch's broadcast
    message; both are now a ValueError naming the loss and the shape it must return."""
    LOSSES["mine"] = LossSpec("mine", "", "", bad)
    with pytest.raises(ValueError) as exc:
        path("mine", *_inputs())
    _one_line(exc, "'mine'", "per_token", "one value per token")


def test_a_row_kernel_whose_value_is_not_one_per_row_is_refused(restore_losses):
    """A kernel whose forward sums its rows was broadcast into every row of the chunk (a loss several times too
    large, silently); now a ValueError naming the loss."""
    def summed(s, logq, teacher, w=None):
        value, state = h_forward(s, logq, teacher, w)
        return value.sum(), state

    LOSSES["mine"] = LossSpec("mine", "", "", hellinger_per_token, kernel=lambda c: dv.RowKernel(h_teacher, summed,
                                                                                          h_backward))
    with pytest.raises(ValueError) as exc:
        _chunked("mine", *_inputs())
    _one_line(exc, "'mine'", "forward", "one value per row")


@pytest.mark.parametrize("kernel, got", [
    (HELLINGER, "got a RowKernel, not a function"),  # the kernel itself where the row takes a function making it
    (lambda c: dv.RowKernel(h_teacher, h_forward, None), "got a RowKernel whose backward is not a function"),
    (lambda c: (h_teacher, h_forward, h_backward), "got a function returning a tuple"),  # a plain tuple
])
def test_a_malformed_kernel_row_is_refused_in_one_line(restore_losses, kernel, got):
    """Each was a bare TypeError ("'NoneType' object is not callable", "'RowKernel' object is not callable") from
    inside the chunked layer, or an AttributeError; now one ValueError naming the loss, what the row needs and what
    it got: the kernel itself instead of a function making it, or only the RowKernel's field that is not a
    function (not all three)."""
    LOSSES["mine"] = LossSpec("mine", "", "", hellinger_per_token, kernel=kernel)
    with pytest.raises(ValueError) as exc:
        _chunked("mine", *_inputs())
    _one_line(exc, "'mine'", "RowKernel", got)


# --------------------------------------------------------------------------- register: a loss of your own


def _reference_loss(h_s, w_s, h_t, w_t, labels, tau):
    """Σ over valid tokens of CE + ½ Σ_i (√p_i − √q_i)², / their count: explicit exp / sum per row in float64 (no
    log_softmax, no tailkd code), differentiable in h_s and w_s."""
    s, t = h_s @ w_s.T, h_t @ w_t.T
    total, n = torch.zeros((), dtype=torch.float64), 0
    for b, j in (labels != IGNORE_INDEX).nonzero().tolist():
        srow, trow = s[b, j], t[b, j]
        es, et = torch.exp(srow - srow.max().item()), torch.exp((trow - trow.max().item()) / tau)
        es_tau = torch.exp((srow - srow.max().item()) / tau)
        q, p = es_tau / es_tau.sum(), et / et.sum()
        ce = -torch.log(es[labels[b, j]] / es.sum())
        total = total + ce + 0.5 * sum((p[i].sqrt() - q[i].sqrt()) ** 2 for i in range(V))
        n += 1
    return total / n


@pytest.mark.parametrize("with_kernel", [True, False])
@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_a_registered_loss_matches_its_float64_reference_on_every_path(restore_losses, with_kernel, tau):
    """Squared Hellinger registered from outside tailkd (its per-token function, and its closed-form RowKernel or
    autograd per chunk) through the dense objective, the chunked layer (chunks of 1, 4 and all tokens) and
    distill_loss: loss and the gradients of the student's hidden states and head equal the plain-sum reference.
    float64 throughout: ~1e-16 per operation over V = 37 terms of O(1) values; 1e-11 relative leaves 10^3 margin."""
    register_hellinger(kernel=with_kernel)
    _every_path_equals(LossConfig(name="hellinger", temperature=tau), _inputs(seed=1),
                       lambda *x: _reference_loss(*x, tau))


def _every_path_equals(cfg, inputs, reference):
    """The dense objective, the chunked layer (chunks of 1, 4 and all tokens) and distill_loss with ``cfg`` equal
    ``reference(h_s, w_s, h_t, w_t, labels)``: loss and the gradients of the student's hidden states and head, within
    1e-11 relative (float64)."""
    from tailkd import distill_loss

    h_s, w_s, h_t, w_t, labels = inputs
    a, w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    want = reference(a, w, h_t, w_t, labels)
    want_grads = torch.autograd.grad(want, (a, w))
    n, head_t = count_valid_tokens(labels), Head(w_t, None, HeadSpec(V))
    knobs = {"temperature": cfg.temperature, "options": cfg.options}
    paths = {
        "dense": lambda a, w: objective(a @ w.T, labels, n, cfg=cfg, teacher_logits=h_t @ w_t.T).loss,
        **{f"chunked {c}": lambda a, w, c=c: chunked_objective(a, Head(w, None, HeadSpec(V)), labels, n, cfg=cfg,
                                                               teacher_hidden=h_t, teacher_head=head_t,
                                                               chunk_size=c).loss for c in (1, 4, 100)},
        "distill_loss": lambda a, w: distill_loss(a, w, h_t, w_t, labels, loss=cfg.name, chunk_size=4, **knobs).loss,
    }
    for name, run in paths.items():
        a, w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
        got = run(a, w)
        got.backward()
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-11, atol=0, msg=name)
        for g, r in zip((a.grad, w.grad), want_grads):
            torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-13, msg=name)


def test_a_registered_loss_is_a_loss_of_the_config_and_of_tailkd_losses(restore_losses, capsys):
    """After register, the run's config accepts the name and `tailkd losses` (same process) lists the row."""
    from tailkd.cli import main
    from tailkd.config import DistillConfig
    register_hellinger()
    DistillConfig(loss=LossConfig(name="hellinger")).validate()
    assert main(["losses"]) == 0
    assert "| hellinger | ½ Σ (√p − √q)² | temperature | teacher | closed-form kernel |" in capsys.readouterr().out


def test_the_readmes_my_losses_module_runs_as_written(tmp_path, restore_losses, capsys):
    """README "A loss of your own": its ``my_losses.py`` block, saved as it stands, is a module `tailkd losses
    --loss.module` imports (it lists the row), whose loss is the squared Hellinger distance — the value of
    `user_loss.hellinger` (float64: the same operations, so equal to a few ulps: rel 1e-12) on the dense and the
    chunked path (autograd per chunk: 1e-12 as well)."""
    import re
    import sys
    from pathlib import Path

    from tailkd.cli import main

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if b.startswith("# my_losses.py")]
    module = tmp_path / "my_losses.py"
    module.write_text(block)
    try:
        assert main(["losses", "--loss.module", str(module)]) == 0
    finally:
        for name in [n for n in sys.modules if n.startswith("tailkd_user_losses_")]:
            del sys.modules[name]
    assert "| hellinger | ½ Σ (√p − √q)² | temperature | teacher | autograd per chunk |" in capsys.readouterr().out
    h_s, w_s, h_t, w_t, labels = _inputs()
    LOSSES["reference"] = LossSpec("reference", "", "", hellinger_per_token)
    for path in (_dense, _chunked):
        got, want = path("hellinger", h_s, w_s, h_t, w_t, labels), path("reference", h_s, w_s, h_t, w_t, labels)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=0)


@pytest.mark.parametrize("change, words", [
    ({"name": "kd"}, ["'kd' is already a loss", "replace=True"]),
    ({"name": "My Loss"}, ["lowercase identifier"]),
    ({"per_token": None}, ["per_token must be a function"]),
    ({"kernel": HELLINGER}, ["kernel must be a function of the LossConfig", "RowKernel"]),
    ({"knobs": "temperature"}, ["tuple of LossConfig field names"]),
    ({"tail_weight": True, "kernel": None}, ["tail_weight=True needs a kernel"]),
    ({"flops_per_vocab": -1}, ["flops_per_vocab=-1"]),
    ({"per_token": "by kernel"}, ["per_token_by_kernel", "needs a kernel"]),
    ({"options": {"Alpha": 0.5}}, ["options: 'Alpha' is not a lowercase identifier"]),
    ({"options": {"alpha": "half"}}, ["options: alpha='half' must be a finite number"]),
    ({"options": {"alpha": float("nan")}}, ["options: alpha=nan must be a finite number"]),
    ({"options": [("alpha", 0.5)]}, ["must be a mapping of names to numbers"]),
    ({"name": "2nd"}, ["lowercase identifier"]),  # not a flag value / YAML key: a digit first
    ({"name": "_x"}, ["lowercase identifier"]),  # nor an underscore first
    ({"knobs": ("temperature", 1)}, ["tuple of LossConfig field names"]),  # a tuple, but not of names
    ({"per_token": "by kernel", "kernel": lambda c: HELLINGER, "tail_weight": True},
     ["per_token_by_kernel", "one without tail_weight"]),  # kernel_divergence takes no row weight
    ({"triton": "kl"}, ["triton must be a function of the LossConfig or None"]),  # the form, not a function of cfg
    ({"flops_per_vocab": True}, ["flops_per_vocab=True must be an integer >= 0"]),  # a bool is an int to Python
    ({"flops_per_vocab": 1.5}, ["flops_per_vocab=1.5 must be an integer >= 0"]),
])
def test_register_refuses_a_malformed_row_in_one_line(restore_losses, change, words):
    """A row the rest of tailkd could not use is refused when it is registered, in one line; a built-in's name is
    not silently redefined (assigning LOSSES["kd"] replaces vanilla KD everywhere without a word)."""
    from tailkd.registry import register

    before = dict(LOSSES)
    fields = {"name": "mine", "formula": "", "source": "", "per_token": hellinger_per_token,
              "knobs": ("temperature",), **change}
    if fields["per_token"] == "by kernel":
        from tailkd.registry import per_token_by_kernel

        fields["per_token"] = per_token_by_kernel
    with pytest.raises(ValueError) as exc:
        register(LossSpec(**fields))
    _one_line(exc, "cannot register loss", *words)
    assert LOSSES == before


def test_register_replace_redefines_a_row(restore_losses):
    from tailkd.registry import register

    spec = register(LossSpec("kd", "½ Σ (√p − √q)²", "", hellinger_per_token), replace=True)
    assert LOSSES["kd"] is spec


def test_knobs_that_are_not_loss_config_fields_are_refused_when_the_loss_is_bound(restore_losses):
    """A row listing a knob LossConfig does not have (the user's α of an α-divergence) thinks it reads a setting that
    no flag, YAML key or distill_loss argument can give: refused in one line at the first use, not ignored."""
    from tailkd.registry import register

    register(LossSpec("mine", "", "", hellinger_per_token, knobs=("amari_alpha", "temperature")))
    with pytest.raises(ValueError) as exc:
        _dense("mine", *_inputs())
    _one_line(exc, "'mine'", "amari_alpha", "a knob of its own goes in LossSpec.options")


def test_loss_module_imports_a_file_or_a_dotted_name_once_and_fails_in_one_line(tmp_path, monkeypatch,
                                                                              restore_losses):
    """``loss.module`` (`tailkd.config.load_loss_module`, what distill's validation and `bind` run): a .py file is
    imported once per process (imported twice, its ``register`` would refuse the taken name); a dotted name comes from
    sys.path; a missing file or module, or one that raises, is a TailkdError in one line naming the setting; a module
    that registers another name leaves ``loss.name`` refused, saying so."""
    import sys

    from tailkd.config import DistillConfig, load_loss_module
    from tailkd.errors import TailkdError
    from tailkd.registry import bind

    mine = tmp_path / "mine.py"
    mine.write_text("from user_loss import register_hellinger\nregister_hellinger()\n")
    try:
        load_loss_module(str(mine))
        load_loss_module(str(mine))  # a second import would raise "already a loss"
        assert "hellinger" in LOSSES
        LOSSES.pop("hellinger")
        monkeypatch.syspath_prepend(str(tmp_path))
        d = bind(LossConfig(name="hellinger", module="mine"))  # a dotted name, by bind for a config built in Python
        assert d.spec is LOSSES["hellinger"]
    finally:
        for name in [n for n in sys.modules if n.startswith("tailkd_user_losses_") or n == "mine"]:
            del sys.modules[name]
    (tmp_path / "broken.py").write_text("raise RuntimeError('no GPU here')\n")
    (tmp_path / "other.py").write_text("")
    for source, needle in ((str(tmp_path / "absent.py"), "FileNotFoundError"), ("no_such_mod", "ModuleNotFoundError"),
                           (str(tmp_path / "broken.py"), "RuntimeError: no GPU here")):
        with pytest.raises(TailkdError) as err:
            load_loss_module(source)
        assert str(err.value).startswith(f"loss.module={source!r} could not be imported: ") and needle in str(err.value)
        assert "\n" not in str(err.value)
    cfg = DistillConfig()
    cfg.loss.name, cfg.loss.module = "hellinger2", str(tmp_path / "other.py")
    with pytest.raises(TailkdError, match=r"is not a loss \(loss.module=.* registered none of that name\)"):
        cfg.validate()


def test_a_loss_module_whose_error_spans_lines_is_one_line(tmp_path, capsys):
    """The error of a module that raises with a message of several lines (a YAML or torch error of the module's own
    code) was printed whole by ``tailkd`` (README: "a one-line error"); now its first line, with the way to its
    traceback, as the CLI says of any unexpected error."""
    from tailkd.cli import main
    from tailkd.config import load_loss_module
    from tailkd.errors import TailkdError

    module = tmp_path / "multi.py"
    module.write_text("raise ValueError('while parsing a flow node\\n  in line 1, column 5\\n    a: [')\n")
    with pytest.raises(TailkdError) as err:
        load_loss_module(str(module))
    _one_line(err, f"loss.module={str(module)!r} could not be imported: ValueError: while parsing a flow node",
              "--debug")
    assert main(["losses", "--loss.module", str(module)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tailkd: error: loss.module="), lines


def test_a_loss_module_that_fails_on_its_own_import_is_not_told_to_give_a_file(tmp_path, monkeypatch,
                                                                                restore_losses):
    """A .py file that imports a sibling file (its folder is not put on sys.path: README "A loss of your own"), or
    opens a file of its own that is missing, was told "give a .py file, or a module importable from sys.path" — it
    was one. The hint now names what the module itself could not find; with the folder on PYTHONPATH (the README's
    way) the sibling import works."""
    import sys

    from tailkd.config import load_loss_module
    from tailkd.errors import TailkdError

    (tmp_path / "helper_of_mine.py").write_text("SCALE = 2.0\n")
    mine = tmp_path / "with_sibling.py"
    mine.write_text("from helper_of_mine import SCALE\nfrom user_loss import register_hellinger\n"
                    "register_hellinger()\n")
    (tmp_path / "reads_data.py").write_text("open('no_such_table.txt')\n")
    with pytest.raises(TailkdError) as err:
        load_loss_module(str(mine))
    _one_line(err, "No module named 'helper_of_mine'", "a module that loss.module imports", "PYTHONPATH")
    assert "give a .py file" not in str(err.value)
    with pytest.raises(TailkdError) as err:
        load_loss_module(str(tmp_path / "reads_data.py"))
    _one_line(err, "FileNotFoundError", "no_such_table.txt", "--debug")
    assert "give a .py file" not in str(err.value)
    for source in (str(tmp_path / "absent.py"), "no_such_pkg.losses"):  # the module itself is missing
        with pytest.raises(TailkdError) as err:
            load_loss_module(source)
        _one_line(err, "give a .py file, or a module importable from sys.path (PYTHONPATH)")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        load_loss_module(str(mine))
        assert "hellinger" in LOSSES
    finally:
        for name in [n for n in sys.modules if n.startswith("tailkd_user_losses_") or n == "helper_of_mine"]:
            del sys.modules[name]


def test_a_dotted_loss_module_that_imports_a_missing_one_is_not_told_it_is_missing(tmp_path, monkeypatch):
    """A dotted loss.module that is found but imports a module that is not is told so ("a module that loss.module
    imports"), not "give a .py file": the missing module is the one loss.module names only when that name is
    loss.module or a package above it — as a dotted prefix, so that ``lossmod_extra`` importing a missing ``lossmod``
    is not taken for itself."""
    import sys

    from tailkd.config import load_loss_module
    from tailkd.errors import TailkdError

    (tmp_path / "lossmod_extra.py").write_text("import lossmod\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(TailkdError) as err:
            load_loss_module("lossmod_extra")
    finally:
        sys.modules.pop("lossmod_extra", None)
    _one_line(err, "loss.module='lossmod_extra' could not be imported: ModuleNotFoundError: No module named "
                   "'lossmod'", "a module that loss.module imports")
    assert "give a .py file" not in str(err.value)


def test_a_loss_of_ones_own_without_its_module_is_refused_naming_loss_module(restore_losses):
    """A run made through a launcher that registers its loss (README: it "works as well") saves no loss.module, so
    the ``tailkd distill --config RUN/config.yaml --resume`` it prints refused the name with only the built-in names
    to choose from; the error now says how tailkd imports a loss of one's own."""
    from tailkd.config import DistillConfig
    from tailkd.errors import TailkdError

    cfg = DistillConfig()
    cfg.loss.name = "hellinger"
    with pytest.raises(TailkdError) as err:
        cfg.validate()
    _one_line(err, "loss.name='hellinger' is not a loss; choose one of tad, ", "--loss.module")


def test_a_loss_module_path_that_is_not_a_py_file_is_refused_saying_so(tmp_path):
    """A path (it holds a '/') to a file without the .py suffix was handed to importlib, which finds no loader for it:
    "AttributeError: 'NoneType' object has no attribute 'loader'"; now a one-line error saying it is not a .py
    file."""
    from tailkd.config import load_loss_module
    from tailkd.errors import TailkdError

    for name in ("my_losses.txt", "my_losses"):
        (tmp_path / name).write_text("raise RuntimeError('never run')\n")
        with pytest.raises(TailkdError) as err:
            load_loss_module(str(tmp_path / name))
        _one_line(err, f"{tmp_path / name} is not a .py file", "give a .py file")


# --------------------------------------------------------------------------- a loss's options (LossSpec.options)


def _amari_reference(h_s, w_s, h_t, w_t, labels, alpha):
    """Σ over valid tokens of CE + (1 − Σ_i p_i^α q_i^(1−α)) / (α(1−α)), / their count: explicit exp / sum per row in
    float64 (no log_softmax, no tailkd code), differentiable in h_s and w_s."""
    s, t = h_s @ w_s.T, h_t @ w_t.T
    total, n = torch.zeros((), dtype=torch.float64), 0
    for b, j in (labels != IGNORE_INDEX).nonzero().tolist():
        es, et = torch.exp(s[b, j] - s[b, j].max().item()), torch.exp(t[b, j] - t[b, j].max().item())
        q, p = es / es.sum(), et / et.sum()
        total = total - torch.log(q[labels[b, j]])
        total = total + (1 - sum(p[i] ** alpha * q[i] ** (1 - alpha) for i in range(V))) / (alpha * (1 - alpha))
        n += 1
    return total / n


@pytest.mark.parametrize("with_kernel, dense_by_kernel", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("alpha", [None, 0.2, 0.9])
def test_a_loss_option_reaches_every_path_and_its_default_fills_in(restore_losses, with_kernel, dense_by_kernel,
                                                                   alpha):
    """Amari's α-divergence registered with ``options={"alpha": 0.5}``: given ``LossConfig.options`` (or its default
    where none is given), the dense objective, the chunked layer (its closed-form kernel, or autograd per chunk) and
    distill_loss equal the plain-sum float64 reference at that α, values and gradients; so does the dense path
    computed by the kernel (`per_token_by_kernel`) instead of the per-token function. float64: ~1e-16 per operation
    over V = 37 terms, p^α q^(1−α) condition ~1/(α(1−α)) ≤ 6; 1e-11 relative leaves > 10^3 margin."""
    register_amari(kernel=with_kernel, dense_by_kernel=dense_by_kernel)
    options = {} if alpha is None else {"alpha": alpha}
    _every_path_equals(LossConfig(name="amari", options=options), _inputs(seed=2),
                       lambda *x: _amari_reference(*x, 0.5 if alpha is None else alpha))


def test_amari_at_one_half_is_four_times_the_squared_hellinger_distance(restore_losses):
    """The identity D_½(p‖q) = 4 H²(p, q) between the two registered losses, through their bound per-token rows."""
    from tailkd.registry import bind

    register_amari()
    register_hellinger()
    s, t = torch.randn(3, 5, V, dtype=torch.float64), 3 * torch.randn(3, 5, V, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    d_half = bind(LossConfig(name="amari")).per_token(s, t, None, mask)
    torch.testing.assert_close(d_half, 4 * bind(LossConfig(name="hellinger")).per_token(s, t, None, mask),
                               rtol=1e-12, atol=1e-15)


def test_options_a_loss_does_not_have_are_refused_in_one_line(restore_losses):
    """An option name the loss does not declare (a typo, or an option given to a built-in loss) would be ignored
    without a word: a ValueError naming it and the loss's options with their defaults."""
    from tailkd.registry import bind

    register_amari()
    with pytest.raises(ValueError) as exc:
        bind(LossConfig(name="amari", options={"alhpa": 0.3}))
    _one_line(exc, "'amari' has no option alhpa", "its options are alpha (default 0.5)")
    with pytest.raises(ValueError) as exc:
        bind(LossConfig(name="kd", options={"alpha": 0.3}))
    _one_line(exc, "'kd' has no option alpha", "it has none")
    with pytest.raises(ValueError) as exc:
        bind(LossConfig(name="amari", options={"alpha": float("inf")}))
    _one_line(exc, "alpha=inf must be a finite number")


@pytest.mark.parametrize("options", [None, ["alpha"], "alpha", 0.3])
def test_options_that_are_not_a_mapping_are_a_value_error_in_one_line(restore_losses, options):
    """``LossConfig(options=...)`` / ``distill_loss(options=...)`` given something other than a mapping (None, a list
    of names, a string, a number) is the ValueError in one line the docstrings promise, for a loss with options as for
    one without: it was 'TypeError: 'NoneType' object is not a mapping' (a loss with options), a string's letters
    named as unknown options ('has no option a, h, l, p'), or 'TypeError: 'float' object is not iterable'."""
    from tailkd import distill_loss
    from tailkd.registry import bind

    register_amari()
    h_s, w_s, h_t, w_t, labels = _inputs()
    for name in ("amari", "kd"):
        with pytest.raises(ValueError) as exc:
            bind(LossConfig(name=name, options=options))
        _one_line(exc, f"loss {name!r}: options: {options!r} must be a mapping of names to numbers")
        with pytest.raises(ValueError) as exc:
            distill_loss(h_s, w_s, h_t, w_t, labels, loss=name, options=options)
        _one_line(exc, "must be a mapping of names to numbers")


def test_options_come_from_flags_and_yaml_and_are_checked_before_the_run(restore_losses, tmp_path, capsys):
    """``--loss.options NAME=VALUE ...`` over YAML's ``loss: {options: {...}}`` (merged, flags win), refused in one line
    (exit 2, nothing written) when malformed, unknown to the loss, or out of the range its kernel checks; `tailkd
    losses` lists the options with their defaults."""
    import argparse

    import yaml

    from tailkd.cli import build_parser, main
    from tailkd.config import config_from_args

    register_amari()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"loss": {"name": "amari", "options": {"alpha": 0.3}}}))

    def parsed(*flags) -> dict:
        args = build_parser().parse_args(["distill", "--config", str(config), *flags])
        return config_from_args(argparse.Namespace(**vars(args))).loss.options

    assert parsed() == {"alpha": 0.3}
    assert parsed("--loss.options", "alpha=0.7") == {"alpha": 0.7}
    out = tmp_path / "never"
    for flags, words in [(["--loss.options", "alpha"], "expected NAME=VALUE with a number"),
                         (["--loss.options", "alpha=x"], "expected NAME=VALUE with a number"),
                         (["--loss.options", "beta=1"], "'amari' has no option beta"),
                         (["--loss.options", "alpha=1"], "amari's alpha=1 must be in (0, 1)"),
                         (["--loss", "tad", "--loss.options", "alpha=0.5"], "'tad' has no option alpha")]:
        try:  # argparse's own errors exit (SystemExit 2); the config's return 2
            code = main(["distill", "--config", str(config), *flags, "--out", str(out)])
        except SystemExit as exc:
            code = exc.code
        assert code == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (flags, err)
        assert not out.exists()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("loss: {name: amari, options: [0.3]}\n")
    assert main(["distill", "--config", str(bad_yaml), "--out", str(out)]) == 2
    assert "loss.options expects NAME: number pairs" in capsys.readouterr().err
    assert main(["losses"]) == 0
    assert "| amari | (1 − Σ p^α q^(1−α)) / (α(1−α)) | temperature; options: alpha=0.5 |" in capsys.readouterr().out


def test_repeated_options_flags_add_up_as_one_flag_with_every_word(restore_losses, tmp_path):
    """``--loss.options a=1 --loss.options b=2`` sets both, as ``--loss.options a=1 b=2`` does (a later word for the
    same name wins), over the YAML's: each repeated flag replaced the previous one's words, so ``a`` silently kept the
    YAML's value (or its default) and the run trained with it (argparse's store of a list)."""
    import argparse

    import yaml
    from user_loss import amari_kernel, amari_per_token

    from tailkd.cli import build_parser
    from tailkd.config import config_from_args
    from tailkd.registry import register

    register(LossSpec("amari2", "(1 − Σ p^α q^(1−α)) / (α(1−α))", "two options", amari_per_token,
                      kernel=amari_kernel, knobs=("temperature",), options={"alpha": 0.5, "gamma": 1.0}))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"loss": {"name": "amari2", "options": {"alpha": 0.2, "gamma": 3.0}}}))

    def parsed(*flags) -> dict:
        args = build_parser().parse_args(["distill", "--config", str(config), *flags])
        return config_from_args(argparse.Namespace(**vars(args))).loss.options

    assert parsed("--loss.options", "alpha=0.3", "--loss.options", "gamma=2") == {"alpha": 0.3, "gamma": 2.0}
    assert parsed("--loss.options", "alpha=0.3", "gamma=2") == {"alpha": 0.3, "gamma": 2.0}
    assert parsed("--loss.options", "alpha=0.3", "--loss.options", "alpha=0.4") == {"alpha": 0.4, "gamma": 3.0}
    assert parsed("--loss.options", "gamma=2") == {"alpha": 0.2, "gamma": 2.0}


def test_the_run_config_holds_every_option_so_a_resume_compares_the_values_used(restore_losses, tmp_path):
    """A run given no --loss.options trains with the loss's defaults; its config.yaml (the validated config) holds
    them, so a resume that states the same value is the same run, and one whose module now has another default is
    refused naming the option. config.yaml said ``options: {}``: a resume with ``alpha=0.5`` was refused ('was None,
    now 0.5'), and a changed default resumed silently with another α (and nothing said which α trained the run)."""
    from user_loss import amari_kernel, amari_per_token

    from tailkd.config import DistillConfig, load_yaml
    from tailkd.errors import TailkdError
    from tailkd.registry import register
    from tailkd.runs import _write_config, prepare_run_dir

    register_amari()
    run = tmp_path / "run"

    def config(**options) -> DistillConfig:
        cfg = DistillConfig(loss=LossConfig(name="amari", options=options))
        cfg.train.out_dir = str(run)
        return cfg.validate()

    first = config()
    assert first.loss.options == {"alpha": 0.5}
    run.mkdir()
    _write_config(first, run / "config.yaml")
    assert load_yaml(run / "config.yaml")["loss"]["options"] == {"alpha": 0.5}
    for same in (config(), config(alpha=0.5)):
        same.train.resume = True
        assert prepare_run_dir(same)[:2] == (run, True)
    register(LossSpec("amari", "(1 − Σ p^α q^(1−α)) / (α(1−α))", "Amari's α-divergence", amari_per_token,
                      kernel=amari_kernel, knobs=("temperature",), options={"alpha": 0.3}), replace=True)
    changed = config()
    changed.train.resume = True
    with pytest.raises(TailkdError, match="loss.options.alpha was 0.5, now 0.3"):
        prepare_run_dir(changed)


# --------------------------------------------------------------------------- the built-in rows and bind


def test_every_built_in_rows_flops_per_vocab_is_the_count_its_comment_derives():
    """The run's reported loss-layer FLOPs (`flops.loss_flops_per_token`) take each row's ``flops_per_vocab``; the
    comment above `LOSSES` derives each count term by term ("tad 28: kd 15 + ..."). Every built-in row states the
    count derived there (clm: the objective's `CLM_FLOPS_PER_VOCAB`, its row 0), and the run reports it plus CLM's."""
    import inspect
    import re

    from tailkd import registry
    from tailkd.flops import loss_flops_per_token

    derived = {}
    for line in inspect.getsource(registry).splitlines():
        head = re.match(r"#  ([a-z_]+ +\d+(?: / [a-z_]+ +\d+)*):", line)
        if head:
            derived.update((n, int(c)) for n, c in re.findall(r"([a-z_]+) +(\d+)", head.group(1)))
    assert derived.pop("clm") == registry.CLM_FLOPS_PER_VOCAB == 6 and LOSSES["clm"].flops_per_vocab == 0
    assert derived == {name: spec.flops_per_vocab for name, spec in LOSSES.items() if name != "clm"}
    assert derived["tad"] == 28 and loss_flops_per_token("tad", 1000) == (28 + 6) * 1000


def test_tailkd_losses_says_what_each_built_in_needs_and_which_a_top_k_cache_gives(capsys):
    """`tailkd losses`'s needs and top-K cache cells come from the rows' ``needs_labels``, ``tail_weight`` and
    ``sparse``: DKD and DRKL need labels (the label is their target split), TAD needs the teacher's top-K and ᾱ(X),
    and a top-K cache gives KD and TAD only."""
    from tailkd.cli import main

    assert main(["losses"]) == 0
    cells = {row.split(" | ")[0].strip("| "): row.split(" | ")[3:6] for row in capsys.readouterr().out.splitlines()}
    assert cells["tad"] == ["teacher, teacher top-K and ᾱ(X)", "closed-form kernel", "D_KL1 (+ tail estimate)"]
    assert cells["kd"] == ["teacher", "closed-form kernel", "D_KL1 (+ tail estimate)"]
    assert cells["rkl"] == ["teacher", "closed-form kernel", "-"]
    assert cells["dkd"] == ["teacher, labels", "autograd per chunk", "-"]
    assert cells["drkl"] == ["teacher, labels", "autograd per chunk", "-"]


def _exact_cache(t, k=5):
    """A top-K cache of teacher logits ``t`` [B, T, V] at τ = 1 whose tail points are every id outside the top k,
    each with its exact weight p_i: the cache's tail estimate is then the tail sum itself."""
    from tailkd.divergences import SparseTeacher

    ranked = torch.log_softmax(t, -1).topk(t.shape[-1], -1)
    ids, vals = ranked.indices, ranked.values
    return SparseTeacher(ids[..., :k], vals[..., :k], vals[..., k:].logsumexp(-1), ids[..., k:], vals[..., k:],
                         vals[..., k:])


def test_a_top_k_cache_gives_kd_exactly_and_only_sparse_rows_at_temperature_one():
    """KD from a top-K cache whose tail points are exact is KL(p‖q) itself (D_KL1 + 1·α^T·D_KL2), as the dense KD
    gives it (float64, the same sums in another order: 1e-12); a loss without a top-K form (RKL), or KD at τ ≠ 1
    (the cache holds log-probs at τ = 1), is a TailkdError, not a silently different loss."""
    from tailkd.errors import TailkdError
    from tailkd.registry import bind

    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 4, V, generator=g, dtype=torch.float64), 2 * torch.randn(2, 4, V, generator=g,
                                                                                     dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 0] = False
    kd = bind(LossConfig(name="kd"))
    got = kd.sparse_per_token(s, _exact_cache(t), mask)
    torch.testing.assert_close(got, kd.per_token(s, t, None, mask), rtol=1e-12, atol=1e-14)
    assert got[0, 0] == 0 and bool((got[mask] > 1e-3).all())
    for cfg, words in ((LossConfig(name="rkl"), "cannot be computed from a top-K teacher cache"),
                       (LossConfig(name="kd", temperature=2.0), "loss.temperature must be 1")):
        with pytest.raises(TailkdError, match=words):
            bind(cfg).sparse_per_token(s, _exact_cache(t), mask)


def test_only_a_tail_weight_row_has_a_row_weight():
    """`Divergence.row_log_weight` is TAD's log β(X) = log β − log ᾱ(X), and None for a row without ``tail_weight``
    (KD's kernel and cache then weigh the tail by 1, not by β(X))."""
    from tailkd.registry import bind

    log_abar = torch.tensor([-1.0, -3.0], dtype=torch.float64)
    assert bind(LossConfig(name="kd", beta=4.0)).row_log_weight(log_abar) is None
    torch.testing.assert_close(bind(LossConfig(name="tad", beta=4.0)).row_log_weight(log_abar),
                               torch.log(torch.tensor(4.0, dtype=torch.float64)) - log_abar)


def test_dense_tad_uses_segment_ids_only_per_document():
    """TAD's dense row (the registry's per_token): β(X) averages α^T over each row unless loss.per_document, so
    segment ids given with per_document false change nothing (bit-identical), and with it true they do (the
    documents' ᾱ differ here)."""
    from tailkd.registry import bind

    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(2, 6, V, generator=g, dtype=torch.float64), 3 * torch.randn(2, 6, V, generator=g,
                                                                                     dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    seg = torch.tensor([0, 0, 0, 1, 1, 1]).expand(2, 6)
    per_row = bind(LossConfig(name="tad", k=5)).per_token(s, t, None, mask)
    ignored = bind(LossConfig(name="tad", k=5, per_document=False)).per_token(s, t, None, mask, seg)
    per_doc = bind(LossConfig(name="tad", k=5, per_document=True)).per_token(s, t, None, mask, seg)
    assert torch.equal(ignored, per_row)
    assert (per_doc - per_row).abs().max() > 1e-3


def test_per_token_by_kernel_takes_the_temperature(restore_losses):
    """A loss defined by its kernel alone (``per_token=per_token_by_kernel``) at τ = 1.7 is the kernel on p and q at
    τ: squared Hellinger's plain autograd `hellinger` at the same τ, not at τ = 1 (float64: 1e-12)."""
    from tailkd.registry import bind, per_token_by_kernel, register

    register(LossSpec("mine", "", "", per_token_by_kernel, kernel=lambda c: HELLINGER, knobs=("temperature",)))
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 5, V, generator=g, dtype=torch.float64), 3 * torch.randn(2, 5, V, generator=g,
                                                                                     dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    got = bind(LossConfig(name="mine", temperature=1.7)).per_token(s, t, None, mask)
    torch.testing.assert_close(got, hellinger(s, t, temperature=1.7), rtol=1e-12, atol=1e-15)
    assert (got - hellinger(s, t)).abs().max() > 1e-3  # τ matters here


def test_bind_refuses_an_unknown_name_a_knob_named_name_and_knobs_out_of_range(restore_losses):
    """`bind`, for a config built in Python: a name not in the registry is a ValueError listing the losses (not a
    KeyError); a registered row whose knobs list ``name`` (the loss's name, not one of its knobs) is refused as a
    knob that is not a LossConfig field; a knob out of its range is refused by `LossConfig.check` at bind, so
    neither path computes a loss with it."""
    from tailkd.registry import bind, register

    with pytest.raises(ValueError) as exc:
        bind(LossConfig(name="no_such_loss"))
    _one_line(exc, "loss 'no_such_loss' is not in the registry; choose one of tad, kd")
    register(LossSpec("mine", "", "", hellinger_per_token, knobs=("name", "temperature")))
    with pytest.raises(ValueError) as exc:
        bind(LossConfig(name="mine"))
    _one_line(exc, "'mine': its knobs name are not LossConfig fields")
    assert "(name, " not in str(exc.value) and ", name," not in str(exc.value)
    for cfg, words in ((LossConfig(name="tad", k=0), "k=0 must be an integer >= 1"),
                       (LossConfig(name="kd", temperature=0.0), "temperature")):
        with pytest.raises(ValueError, match=words):
            bind(cfg)


def test_bind_imports_loss_module_only_for_a_name_not_yet_registered(tmp_path, restore_losses):
    """``loss.module`` is imported by `bind` only where ``loss.name`` is not a loss yet: a config naming a built-in
    (or a loss already registered) with a module is bound without running the module again."""
    from tailkd.registry import bind

    module = tmp_path / "raises.py"
    module.write_text("raise RuntimeError('imported')\n")
    assert bind(LossConfig(name="kd", module=str(module))).name == "kd"
    with pytest.raises(RuntimeError, match="imported"):
        bind(LossConfig(name="hellinger", module=str(module)))


def test_a_loss_module_path_is_one_file_however_it_is_written(tmp_path, monkeypatch, restore_losses):
    """`load_module` imports a file once per resolved path: the same file named as a/../a/m.py, through a symbolic
    link, or as ~/m.py (the home folder expanded) is not imported again (its ``register`` would refuse the taken
    name); a path written with backslashes names a file, not a dotted module."""
    import sys

    from tailkd.registry import load_module, names_a_file

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "m.py").write_text("from user_loss import register_hellinger\nregister_hellinger()\n")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    monkeypatch.setenv("HOME", str(tmp_path / "a"))
    monkeypatch.chdir(tmp_path)
    before = set(sys.modules)
    try:
        load_module(str(tmp_path / "a" / "m.py"))
        for same in (str(tmp_path / "a" / ".." / "a" / "m.py"), "a/../a/m.py", "link/m.py", "~/m.py"):
            load_module(same)
        assert "hellinger" in LOSSES
        assert len([n for n in set(sys.modules) - before if n.startswith("tailkd_user_losses_")]) == 1
        LOSSES.pop("hellinger")
        for name in [n for n in set(sys.modules) - before if n.startswith("tailkd_user_losses_")]:
            del sys.modules[name]
        load_module("~/m.py")  # expanded: the file in $HOME, not ./~/m.py
        assert "hellinger" in LOSSES
    finally:
        for name in [n for n in set(sys.modules) - before if n.startswith("tailkd_user_losses_")]:
            del sys.modules[name]
    assert names_a_file(r"losses\mine") and names_a_file("losses/mine") and names_a_file("mine.py")
    assert not names_a_file("my_pkg.losses")
