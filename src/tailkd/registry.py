"""The registry of losses: one row per loss, read by every part of tailkd that needs to know about a loss.

`LOSSES` = {name: `LossSpec`}: for each loss its per-token function (`tailkd.losses`, `tailkd.baselines`), its
closed-form row kernel (`tailkd.divergences`) if any, whether it needs labels / the teacher's top-K tail weight β(X)
/ can come from a top-K teacher cache, its FLOPs per vocabulary entry and the `LossConfig` knobs it reads. `bind`
turns a `tailkd.config.LossConfig` into the `Divergence` that `tailkd.objective`, `tailkd.fused` and `tailkd.cache`
call; `config`, `flops` and the CLI read the rows too. None of them branches on a loss name. Adding a loss = one
function in `tailkd.losses` or `tailkd.baselines` (optionally a kernel in `tailkd.divergences`), one row here, its
tests; a loss of your own, in your module: `register`, the module named by ``loss.module`` (`load_module`; README
"A loss of your own").
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tailkd import divergences as dv
from tailkd.baselines import ab_divergence, akl, skew_forward_kl, skew_reverse_kl, symmetric_kl, tvd
from tailkd.errors import TailkdError
from tailkd.losses import (
    cache_divergence,
    dkd,
    drkl,
    finite_number,
    forward_kl,
    jsd,
    kernel_divergence,
    reverse_kl,
    sequence_log_alpha_mean,
    tad,
    tail_log_weight,
)

__all__ = ["CLM_FLOPS_PER_VOCAB", "LOSSES", "Divergence", "LossSpec", "bind", "load_module", "per_token_by_kernel",
           "register"]


@dataclass(frozen=True)
class LossSpec:
    """One row of `LOSSES`: everything the rest of tailkd needs to know about a loss.

    ``per_token(d, student_logits, teacher_logits, labels, mask, segment_ids) -> [B, T]``: the divergence on full
    logits [B, T, V] (the dense path), knobs from the bound `Divergence` ``d``; None for ``clm`` (no teacher).
    ``kernel(cfg) -> RowKernel``: the closed-form row maths (`tailkd.divergences`), if any; the chunked layer uses
    it, and differentiates ``per_token`` chunk by chunk otherwise. ``tail_weight``: the kernel's row weight is TAD's
    β(X) = β/ᾱ(X), as log β(X) (the caller computes log ᾱ from the teacher rows' α^T per sequence, in log space).
    ``sparse``: computable from a top-K teacher cache (D_KL1, plus an unbiased tail estimate weighted by the row
    weight; 1 without ``tail_weight``): the cache path computes that form whatever ``per_token`` and ``kernel`` are,
    so set it only where it is the loss's top-K form (kd, tad). ``flops_per_vocab``: loss-layer FLOPs per token
    per vocabulary entry, forward + backward (`tailkd.flops`; the objective's CLM term adds `CLM_FLOPS_PER_VOCAB`).
    ``knobs``: the `LossConfig` fields read. ``options``: the loss's own knobs with their defaults, {name: number}
    (a loss of your own: ``--loss.options name=value``, YAML ``loss: {options: {name: value}}``); the bound
    `Divergence`'s ``cfg.options`` holds every one of them (the defaults, then what the config gives), read by
    ``per_token`` as ``d.cfg.options[name]`` and by ``kernel`` as ``cfg.options[name]`` — which may raise ValueError
    for a value out of its range: `tailkd.config.DistillConfig.validate` makes the kernel, so the CLI says so in one
    line before the run starts.
    ``triton(cfg) -> (form, args) | None``: the same row maths as `tailkd.kernels` computes it on CUDA (form
    "kl", "rkl", "jsd" with ``beta``, "tad" with ``k``), or None where the kernels do not apply (the torch path).
    """

    name: str
    formula: str
    source: str
    per_token: Callable[..., torch.Tensor] | None
    kernel: Callable[..., dv.RowKernel] | None = None
    needs_labels: bool = False
    tail_weight: bool = False
    sparse: bool = False
    flops_per_vocab: int = 0
    knobs: tuple[str, ...] = ()
    triton: Callable[..., tuple[str, dict] | None] | None = None
    options: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def needs_teacher(self) -> bool:
        return self.per_token is not None


# Loss-layer FLOPs per token per vocabulary entry (all on [V] vectors, float32):
#  clm  6: student log-softmax forward 4 (max, subtract, exp, sum) + backward softmax − onehot 2 (exp, subtract/scale)
#  kd  15: teacher log-softmax 4 + student log-softmax 4 + p = exp 1 + (log p − log q) 1 + multiply 1 + sum 1
#          + backward q − p 3 (exp, subtract, scale)
#  rkl 15: the mirror image of kd
#  jsd 26: both log-softmaxes 8 + m = βp + (1−β)q 3 + log m 1 + two KL(·‖m) 8 + backward 6
#  dkd 20 / drkl 20: both log-softmaxes 8 + target/non-target renormalisation and two KLs 8 + backward 4
#  tad 28: kd 15 + teacher top-K selection 1 + two tail log-sum-exps (mask 1 + max/sub/exp/sum 3 each) 8
#          + backward tail correction (β(X) − 1)(q·α^T/α^S − p) 4; the K top-K terms are O(K), not O(V)
#  tvd 16: both softmaxes 8 + difference, abs, sum 3 + backward sign, product, row sum, scale 5
#  sym_kl 28: kd 15 + rkl 15 sharing nothing but the inputs, minus the shared student log-softmax's backward 2
#  skew_kl 20 / skew_rkl 20: both log-softmaxes 8 + logaddexp mixture 4 + one KL 4 + backward 4
#  akl 40: kd 15 + rkl 15 + the teacher's sort, cumulative sum and |p − q| over V 10 (the sort's log V counted once)
#  alpha_beta 24: both log-softmaxes 8 + three powers (exp of scaled logs) 6 + products and sum 4 + backward 6
CLM_FLOPS_PER_VOCAB = 6


def _tad_per_token(d, s, t, labels, mask, segment_ids):
    c = d.cfg
    return tad(s, t, mask, k=c.k, beta=c.beta, segment_ids=segment_ids if c.per_document else None,
               temperature=c.temperature)


def _jsd_triton(c) -> tuple[str, dict]:
    """JSD's kernel form; its endpoints as `divergences.jsd_kernel`: β = 0 is KL(p‖q), β = 1 is KL(q‖p)."""
    beta = float(c.jsd_beta)
    return ("kl", {}) if beta == 0 else ("rkl", {}) if beta == 1 else ("jsd", {"beta": beta})


LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in (
    LossSpec("tad", "D_KL1 + β(X)·α^T·D_KL2, β(X) = β/ᾱ(X)", "TAD paper, Eq. 2-3", _tad_per_token,
             kernel=lambda c: dv.tad_kernel(c.k), tail_weight=True, sparse=True, flops_per_vocab=28,
             knobs=("k", "beta", "per_document", "temperature"), triton=lambda c: ("tad", {"k": int(c.k)})),
    LossSpec("kd", "KL(p‖q)", "Hinton et al. 2015",
             lambda d, s, t, labels, mask, seg: forward_kl(s, t, temperature=d.cfg.temperature),
             kernel=lambda c: dv.KL, sparse=True, flops_per_vocab=15, knobs=("temperature",),
             triton=lambda c: ("kl", {})),
    LossSpec("rkl", "KL(q‖p)", "MiniLLM-style reverse KL",
             lambda d, s, t, labels, mask, seg: reverse_kl(s, t, temperature=d.cfg.temperature),
             kernel=lambda c: dv.RKL, flops_per_vocab=15, knobs=("temperature",), triton=lambda c: ("rkl", {})),
    LossSpec("jsd", "β KL(p‖m) + (1−β) KL(q‖m), m = βp + (1−β)q", "generalized JSD (GKD)",
             lambda d, s, t, labels, mask, seg: jsd(s, t, beta=d.cfg.jsd_beta, temperature=d.cfg.temperature),
             kernel=lambda c: dv.jsd_kernel(c.jsd_beta), flops_per_vocab=26, knobs=("jsd_beta", "temperature"),
             triton=_jsd_triton),
    LossSpec("dkd", "α KL(b^p‖b^q) + β KL(p̂‖q̂), target = label", "Zhao et al. 2022",
             lambda d, s, t, labels, mask, seg: dkd(s, t, labels, alpha=d.cfg.dkd_alpha, beta=d.cfg.dkd_beta,
                                                    temperature=d.cfg.temperature),
             needs_labels=True, flops_per_vocab=20, knobs=("dkd_alpha", "dkd_beta", "temperature")),
    LossSpec("drkl", "KL(b^q‖b^p) + γ KL(q̂‖p̂), target = label or teacher argmax", "DRKL, arXiv 2604.00223",
             lambda d, s, t, labels, mask, seg: drkl(s, t, labels, gamma=d.cfg.gamma, anchor=d.cfg.drkl_anchor,
                                                     temperature=d.cfg.temperature),
             needs_labels=True, flops_per_vocab=20, knobs=("gamma", "drkl_anchor", "temperature")),
    LossSpec("tvd", "½ Σ|p − q|", "total variation distance",
             lambda d, s, t, labels, mask, seg: tvd(s, t, temperature=d.cfg.temperature),
             flops_per_vocab=16, knobs=("temperature",)),
    LossSpec("sym_kl", "KL(p‖q) + KL(q‖p)", "symmetric (Jeffreys) KL; DRKL paper baseline",
             lambda d, s, t, labels, mask, seg: symmetric_kl(s, t, temperature=d.cfg.temperature),
             flops_per_vocab=28, knobs=("temperature",)),
    LossSpec("skew_kl", "KL(p ‖ αp + (1−α)q)", "skew forward KL, DistiLLM (Ko et al. 2024)",
             lambda d, s, t, labels, mask, seg: skew_forward_kl(s, t, alpha=d.cfg.skew_alpha,
                                                                temperature=d.cfg.temperature),
             flops_per_vocab=20, knobs=("skew_alpha", "temperature")),
    LossSpec("skew_rkl", "KL(q ‖ αq + (1−α)p)", "skew reverse KL, DistiLLM (Ko et al. 2024)",
             lambda d, s, t, labels, mask, seg: skew_reverse_kl(s, t, alpha=d.cfg.skew_alpha,
                                                                temperature=d.cfg.temperature),
             flops_per_vocab=20, knobs=("skew_alpha", "temperature")),
    LossSpec("akl", "w_head KL(p‖q) + w_tail KL(q‖p), w from |p − q| on the teacher's head / tail",
             "adaptive KL, Wu et al. 2024",
             lambda d, s, t, labels, mask, seg: akl(s, t, mu=d.cfg.akl_mu, temperature=d.cfg.temperature),
             flops_per_vocab=40, knobs=("akl_mu", "temperature")),
    LossSpec("alpha_beta", "−1/(αβ) Σ (p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β))",
             "α-β divergence, ABKD (Wang et al. 2025)",
             lambda d, s, t, labels, mask, seg: ab_divergence(s, t, alpha=d.cfg.ab_alpha, beta=d.cfg.ab_beta,
                                                              temperature=d.cfg.temperature),
             flops_per_vocab=24, knobs=("ab_alpha", "ab_beta", "temperature")),
    LossSpec("clm", "no divergence: the student's next-token cross-entropy only", "baseline", None),
)}


@dataclass(frozen=True)
class Divergence:
    """A registry row bound to its knobs (a `tailkd.config.LossConfig`): what the dense path (`per_token`), the
    chunked layer and the top-K cache call. ``kernel`` is the bound `divergences.RowKernel` or None."""

    spec: LossSpec
    cfg: object  # tailkd.config.LossConfig (not imported here: config stays free of torch)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def temperature(self) -> float:
        return float(self.cfg.temperature)

    @property
    def kernel(self) -> dv.RowKernel | None:
        """The row's `divergences.RowKernel` made with this divergence's knobs; ValueError in one line when the row's
        ``kernel`` is not a function of the `LossConfig` returning a RowKernel of three functions."""
        if self.spec.kernel is None:
            return None
        made = self.spec.kernel(self.cfg) if callable(self.spec.kernel) else None
        if not (isinstance(made, dv.RowKernel) and all(callable(f) for f in made)):
            raise ValueError(f"loss {self.name!r}: its kernel must be a function of the LossConfig returning a "
                             "divergences.RowKernel(teacher, forward, backward) of three functions (e.g. "
                             f"kernel=lambda cfg: MY_KERNEL); got {_describe(self.spec.kernel, made)}")
        return made

    @property
    def triton(self) -> tuple[str, dict] | None:
        """The kernel form (`LossSpec.triton`) of this divergence with its knobs, or None."""
        return self.spec.triton(self.cfg) if self.spec.triton is not None else None

    def per_token(self, student_logits, teacher_logits, labels, mask, segment_ids=None) -> torch.Tensor:
        """[B, T] divergence on full logits [B, T, V], 0 at masked positions."""
        div = self.spec.per_token(self, student_logits, teacher_logits, labels, mask, segment_ids)
        if not isinstance(div, torch.Tensor) or div.shape != mask.shape:
            got = tuple(div.shape) if isinstance(div, torch.Tensor) else type(div).__name__
            raise ValueError(f"loss {self.name!r}: its per_token function returned {got} for logits "
                             f"{tuple(student_logits.shape)}; it must return one value per token, {tuple(mask.shape)}")
        return torch.where(mask, div, torch.zeros_like(div))

    def row_log_weight(self, log_abar: torch.Tensor) -> torch.Tensor | None:
        """log of the per-row weight from log ᾱ of each row's sequence: log β(X) for ``tail_weight`` losses (TAD's
        kernel and the top-K cache's both take it so), else None."""
        return tail_log_weight(log_abar, float(self.cfg.beta)) if self.spec.tail_weight else None

    def check_sparse(self) -> None:
        """TailkdError unless a top-K teacher cache can give this divergence: a ``sparse`` row (its top-K form) at
        temperature 1 (the cache holds log-probs at τ = 1). The dense and the chunked paths both check it here."""
        if not self.spec.sparse:
            raise TailkdError(f"loss.name={self.name} cannot be computed from a top-K teacher cache; cache the "
                              "teacher's hidden states (--hidden-states) or use the online teacher")
        if self.temperature != 1.0:
            raise TailkdError("a top-K teacher cache holds log-probs at temperature 1; loss.temperature must be 1 "
                              "(or cache hidden states)")

    def sparse_per_token(self, student_logits: torch.Tensor, teacher: dv.SparseTeacher, mask: torch.Tensor,
                         segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] from dense student logits [B, T, V] (τ = 1) and a top-K cache's teacher ([B, T, ...] fields), 0 at
        masked positions: D_KL1, plus w·(the tail estimate) where the cache holds tail samples, w = β(X) from the
        cached α^T for ``tail_weight`` losses (per row, or per document with ``per_document``), else 1 — the kernel
        of the chunked path (`divergences.SPARSE`), given log w."""
        self.check_sparse()
        log_alpha = teacher.log_tail_mass.detach().double()  # [B, T]
        log_w = torch.zeros_like(log_alpha)
        if self.spec.tail_weight:
            seg = segment_ids if self.cfg.per_document else None
            log_w = self.row_log_weight(sequence_log_alpha_mean(log_alpha, mask, seg))
        return cache_divergence(student_logits, teacher, mask, log_w)


def per_token_by_kernel(d, student_logits, teacher_logits, labels, mask, segment_ids=None) -> torch.Tensor:
    """A `LossSpec.per_token` for a loss defined by its row kernel alone: the bound ``d.kernel`` on full logits
    (`losses.kernel_divergence`), so that the dense path computes the same closed form as the chunked layer
    (``LossSpec("mine", ..., per_token=per_token_by_kernel, kernel=lambda cfg: MY_KERNEL)``). Not for a kernel with
    a row weight (``tail_weight``: TAD's)."""
    return kernel_divergence(d.kernel, student_logits, teacher_logits, temperature=d.temperature)


def register(spec: LossSpec, *, replace: bool = False) -> LossSpec:
    """Add ``spec`` to `LOSSES` under ``spec.name``: a loss of your own, defined in your module (README "A loss of your
    own"); every path that reads the registry (`tailkd.objective`, the chunked layer, `tailkd.distill_loss`,
    `tailkd.train.distill`, `tailkd losses`, the run's FLOPs) then takes it in this process. ValueError in one line
    for a row the rest of tailkd could not use: a name that is not a lowercase identifier (a flag and YAML value) or
    is already a loss (a built-in is redefined only with ``replace=True``), a ``per_token`` or ``kernel`` that is not
    a function, ``knobs`` that are not a tuple of names, ``options`` that are not {lowercase name: finite number},
    ``tail_weight`` (TAD's β(X), which reads the kernel's teacher rows' α^T) without a kernel, a negative
    ``flops_per_vocab``; knobs that are not `LossConfig` fields when the loss is first bound (`bind`).
    ``sparse=True`` states that the loss from a top-K cache is D_KL1 (+ the tail estimate): the cache path computes
    that, not ``per_token`` or ``kernel``. Returns ``spec``."""

    def bad(problem: str) -> ValueError:
        return ValueError(f"cannot register loss {getattr(spec, 'name', spec)!r}: {problem}")

    if not isinstance(spec, LossSpec):
        raise bad(f"register takes a tailkd.registry.LossSpec, not a {type(spec).__name__}")
    if not isinstance(spec.name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", spec.name):
        raise bad("its name must be a lowercase identifier (letters, digits, _), as --loss NAME and YAML take it")
    if spec.name in LOSSES and not replace:
        raise bad(f"{spec.name!r} is already a loss of the registry; choose another name, or pass replace=True to "
                  "redefine it")
    if not callable(spec.per_token):
        raise bad("per_token must be a function (d, student_logits, teacher_logits, labels, mask, segment_ids) -> "
                  "[B, T]")
    if spec.kernel is not None and not callable(spec.kernel):
        raise bad(f"kernel must be a function of the LossConfig returning a divergences.RowKernel (e.g. "
                  f"kernel=lambda cfg: MY_KERNEL), not a {type(spec.kernel).__name__}")
    if not isinstance(spec.knobs, tuple) or not all(isinstance(k, str) for k in spec.knobs):
        raise bad(f"knobs={spec.knobs!r} must be a tuple of LossConfig field names, e.g. ('temperature',)")
    problem = check_options(spec.options)
    if problem:
        raise bad(f"options: {problem} (its defaults, e.g. options={{'alpha': 0.5}})")
    if spec.per_token is per_token_by_kernel and (spec.kernel is None or spec.tail_weight):
        raise bad("per_token=per_token_by_kernel computes the row kernel on full logits: it needs a kernel, and one "
                  "without tail_weight")
    if spec.tail_weight and spec.kernel is None:
        raise bad("tail_weight=True needs a kernel whose teacher rows carry TAD's tail mass (divergences.tad_kernel)")
    if spec.triton is not None and not callable(spec.triton):
        raise bad("triton must be a function of the LossConfig or None")
    if isinstance(spec.flops_per_vocab, bool) or not isinstance(spec.flops_per_vocab, int) or spec.flops_per_vocab < 0:
        raise bad(f"flops_per_vocab={spec.flops_per_vocab!r} must be an integer >= 0")
    LOSSES[spec.name] = spec
    return spec


def check_options(options) -> str | None:
    """What is wrong with ``options`` (`LossSpec.options`, a bound `LossConfig.options`), or None: a mapping of
    lowercase identifiers (as a flag and a YAML key take them) to finite numbers."""
    if not isinstance(options, dict):
        return f"{options!r} must be a mapping of names to numbers, e.g. {{'alpha': 0.5}}"
    for name, value in options.items():
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            return f"{name!r} is not a lowercase identifier (letters, digits, _)"
        if not finite_number(value):
            return f"{name}={value!r} must be a finite number"
    return None


def names_a_file(source: str) -> bool:
    """Whether ``loss.module``'s ``source`` names a file (ends in ``.py`` or holds a path separator), not a dotted
    module name."""
    return source.endswith(".py") or "/" in source or "\\" in source


def load_module(source: str) -> None:
    """Import the module of one's own losses that ``loss.module`` names (it calls `register` as it is imported), once
    per process: ``source`` is a ``.py`` file (a path, relative to the working directory) or a dotted name importable
    from ``sys.path`` (an installed package, ``PYTHONPATH``). A file is imported as a module of its own (its folder is
    not put on ``sys.path``), once per resolved path. Raises what the import raises (ModuleNotFoundError,
    FileNotFoundError, ImportError for a path to a file that is not ``.py``, the module's own errors)."""
    if not names_a_file(source):
        importlib.import_module(source)
        return
    path = Path(os.path.expanduser(source)).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    if path.suffix != ".py":  # importlib has no loader for it
        raise ImportError(f"{path} is not a .py file")
    name = "tailkd_user_losses_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a module that failed is imported again next time, as Python does
        raise


def _describe(kernel, made) -> str:
    if not callable(kernel):
        return f"a {type(kernel).__name__}, not a function"
    if isinstance(made, dv.RowKernel):
        missing = [n for n, f in zip(dv.RowKernel._fields, made) if not callable(f)]
        return f"a RowKernel whose {', '.join(missing)} is not a function"
    return f"a function returning a {type(made).__name__}"


def bind(cfg) -> Divergence:
    """The `Divergence` of a `tailkd.config.LossConfig` (``cfg.name`` must be a key of `LOSSES`; its knobs are checked
    by `LossConfig.check`: ValueError naming the knob; ``cfg.options`` must be among the loss's `LossSpec.options`,
    whose defaults fill in the others). A ``cfg.module`` is imported first (`load_module`)."""
    if cfg.module and cfg.name not in LOSSES:
        load_module(cfg.module)
    if cfg.name not in LOSSES:
        raise ValueError(f"loss {cfg.name!r} is not in the registry; choose one of {', '.join(LOSSES)}")
    spec, fields = LOSSES[cfg.name], [f.name for f in dataclasses.fields(cfg) if f.name != "name"]
    unknown = [k for k in spec.knobs if k not in fields]
    if unknown:  # a registered row's knobs (`register`): a knob of its own is a new LossConfig field
        raise ValueError(f"loss {cfg.name!r}: its knobs {', '.join(unknown)} are not LossConfig fields ("
                         f"{', '.join(fields)}); a knob of its own goes in LossSpec.options")
    problem = check_options(cfg.options)  # a mapping (None, a list, a string: not one) of names to finite numbers
    if problem:
        raise ValueError(f"loss {cfg.name!r}: options: {problem}")
    extra = sorted(set(cfg.options) - set(spec.options))
    if extra:
        has = (f"its options are {', '.join(f'{n} (default {v:g})' for n, v in spec.options.items())}" if spec.options
               else "it has none (loss.options are the knobs of a loss of your own)")
        raise ValueError(f"loss {cfg.name!r} has no option {', '.join(extra)}: {has}")
    if spec.options:
        cfg = dataclasses.replace(cfg, options={**spec.options, **cfg.options})
    return Divergence(spec, cfg.check())

