"""Which teacher layers a student keeps (`tailkd.sizing` sizes the rest; the rules in `tailkd.student`'s docstring).

`choose_layers` spaces ``num_layers`` evenly, first and last included (whole periods where a config sets its layers'
kinds by periods: `layer_period`), or checks listed ``layers``; `student_layers` mends spaced layers a family's
layers need (the layer whose keys and values a layer reads, a layer of each kind its config needs: `required_kinds`);
`layer_needs` tells `tailkd.calibrated.calibrated_layers` what layers chosen by influence need; `check_layers` refuses,
each in one line naming the layers to keep, a choice the family cannot take.
"""

from __future__ import annotations

import itertools
import math

from tailkd.errors import TailkdError
from tailkd.families import Family, setting
from tailkd.layer_attention import kv_reads, kv_sharing, result_layers, reused_results

__all__ = ["check_layers", "choose_layers", "layer_needs", "layer_period", "required_kinds", "student_layers"]


def layer_period(config, fam: Family) -> int:
    """How many layers the pattern of a family's layer kinds spans where its config sets them by periods (Jamba's
    attn_layer_period and expert_layer_period: their lcm, `Family.layer_periods`); 1 otherwise."""
    return math.lcm(*(int(setting(config, key) or 1) for key in fam.layer_periods))


def required_kinds(config, fam: Family) -> list | None:
    """Each teacher layer's kind where the family's config needs a layer of every kind it lists (`Family.every_kind`:
    OLMo-Hybrid's layer_types, an attention and a Gated DeltaNet layer at least); None elsewhere."""
    kinds = getattr(config, fam.every_kind, None) if fam.every_kind else None
    return list(kinds) if kinds else None


def layer_needs(config, fam: Family) -> tuple[list[int], dict[int, tuple[int, ...]], list | None]:
    """``(first, needs, kinds)`` where a family's layers need others (Gemma 4): its teacher's last layer, kept first,
    where the student's config gives its last layer a kind of its own (`Family.last_layer_kind`: full attention, as
    the teacher's last layer is), and for each layer that reuses keys and values (`Family.kv_shared_layers`) the last
    earlier layer of its kind, whose it reads in the teacher (`Family.kv_sources`: the layer its config lists), or
    another earlier layer's result (`Family.reuses_earlier`: GLM-5's DSA top-k; `Family.reindexes`: Kolibri 1.1's key
    pools) that layer (both where a layer needs two); ``kinds``: the layers' kinds where the config needs one
    of each (`required_kinds`: OLMo-Hybrid's); ``([], {}, None)`` elsewhere.
    `tailkd.calibrated.calibrated_layers` keeps them with the layers it chooses."""
    n = setting(config, fam.keys["layers"])
    first, kinds, read = kv_sharing(config, fam)
    needs = {i: (read[kinds[i]],) for i in range(first, n) if kinds is not None and kinds[i] in read}
    for i, j in [*reused_results(config, fam).items(), *kv_reads(config, fam).items()]:
        needs[i] = tuple(dict.fromkeys((*needs.get(i, ()), j)))
    return [n - 1] if fam.last_layer_kind else [], needs, required_kinds(config, fam)


def student_layers(config, fam: Family, num_layers: int | None = None, layers=None) -> list[int]:
    """The teacher layers a student keeps (`choose_layers`, with the family's period); where they are spaced and the
    family's last layers reuse earlier layers' keys and values (`Family.kv_shared_layers`: Gemma 4), a kept sharing
    layer whose kind has no earlier kept layer gets the layer the teacher's sharing layers of that kind read, in place
    of the kept earlier layer nearest to it (one whose kind stays kept where a sharing layer needs it); what this
    cannot mend is refused after (`check_layers`). Where the config lists the layer whose keys and values each layer
    reads (`Family.kv_sources`), `_kv_sources_kept` sees to it, and where it needs a layer of each kind
    (`required_kinds`), `_every_kind`."""
    chosen = choose_layers(setting(config, fam.keys["layers"]), num_layers, layers, layer_period(config, fam))
    first, kinds, read = kv_sharing(config, fam)
    for i in [c for c in chosen if c >= first] if layers is None and kinds is not None else []:
        own = [j for j in chosen if j < first]
        if kinds[i] not in read or any(kinds[j] == kinds[i] for j in own):
            continue
        needed = {kinds[c] for c in chosen if c >= first}
        movable = [j for j in own if kinds[j] not in needed or sum(kinds[x] == kinds[j] for x in own) > 1]
        if movable:
            j = min(movable, key=lambda j: (abs(j - read[kinds[i]]), j))
            chosen = sorted([read[kinds[i]] if c == j else c for c in chosen])
    if layers is None:
        chosen = _kv_sources_kept(config, fam, chosen)
    return _every_kind(config, fam, chosen, listed=layers is not None)


def _kv_sources_kept(config, fam: Family, chosen: list[int]) -> list[int]:
    """Spaced ``chosen`` layers where each that reads another layer's keys and values (`kv_reads`) keeps that layer:
    it takes the place of the kept layer nearest to it that no kept layer reads from (ties: the lower index), until
    every reader has its source or no layer can give way (refused after: `check_layers`)."""
    reads = kv_reads(config, fam)
    for _ in range(len(chosen)):
        missing = sorted({reads[i] for i in chosen if i in reads} - set(chosen))
        movable = [c for c in chosen if c not in {reads.get(i) for i in chosen}]
        if not missing or not movable:
            break
        j = min(movable, key=lambda c: (abs(c - missing[0]), c))
        chosen = sorted(missing[0] if c == j else c for c in chosen)
    return chosen


def _every_kind(config, fam: Family, chosen: list[int], listed: bool) -> list[int]:
    """``chosen`` with a layer of each kind where the family's config needs one (`required_kinds`): for each missing
    kind, spaced layers take the layer of that kind nearest to a kept layer whose kind stays kept, in its place (ties:
    the lower index); fewer layers than kinds, and listed layers lacking a kind, are refused in one line."""
    kinds = required_kinds(config, fam)
    if kinds is None:
        return chosen
    wanted = list(dict.fromkeys(kinds))
    if not listed and len(chosen) < len(wanted):
        raise TailkdError(f"num_layers={len(chosen)}, but {fam.label}'s config needs a layer of each kind its "
                          f"{fam.every_kind} lists ({', '.join(wanted)}): pick num_layers {len(wanted)} or more")
    for kind in wanted:
        of_kind = [i for i, k in enumerate(kinds) if k == kind]
        if any(kinds[j] == kind for j in chosen):
            continue
        if listed:
            raise TailkdError(f"the student keeps no {kind} layer (teacher layers {' '.join(map(str, chosen))}), but "
                              f"{fam.label}'s config needs a layer of each kind its {fam.every_kind} lists "
                              f"({', '.join(wanted)}): keep one of teacher layers {' '.join(map(str, of_kind))} too "
                              "(--student.layers)")
        movable = [j for j in chosen if sum(kinds[x] == kinds[j] for x in chosen) > 1]
        j, i = min(((j, i) for j in movable for i in of_kind), key=lambda p: (abs(p[0] - p[1]), p[1], p[0]))
        chosen = sorted(i if c == j else c for c in chosen)
    return chosen


def choose_layers(n_teacher: int, num_layers: int | None = None, layers=None, period: int = 1) -> list[int]:
    """The teacher layers the student keeps (see `tailkd.student`'s docstring); all of them by default. Where the
    layers' kinds repeat every ``period`` layers (`layer_period`), ``num_layers`` keeps whole periods, evenly spaced."""
    if layers is not None and num_layers is not None and len(layers) != num_layers:
        raise TailkdError(f"layers lists {len(layers)} layers but num_layers={num_layers}: pass only one of them")
    if layers is not None:
        layers = [int(i) for i in layers]
        if not layers:
            raise TailkdError(f"layers is empty: list the teacher layers (0..{n_teacher - 1}) the student keeps, "
                              "or pass num_layers")
        bad = [i for i in layers if not 0 <= i < n_teacher]
        if bad:
            raise TailkdError(f"layer indices {bad} out of range: the teacher has layers 0..{n_teacher - 1}")
        if any(a >= b for a, b in itertools.pairwise(layers)):
            raise TailkdError(f"layers {layers} must be increasing without repeats: pass e.g. {sorted(set(layers))}")
        return layers
    if num_layers is None:
        return list(range(n_teacher))
    if not 1 <= num_layers <= n_teacher:
        raise TailkdError(f"num_layers={num_layers} but the teacher has {n_teacher} layers: pick 1..{n_teacher}")
    if period > 1:
        if num_layers % period:
            raise TailkdError(f"num_layers={num_layers}, but the teacher's layer kinds repeat every {period} layers "
                              f"(its config's periods): pick a multiple of {period} (whole periods) or list the "
                              "layers (--student.layers)")
        return [p * period + r for p in choose_layers(n_teacher // period, num_layers // period) for r in range(period)]
    if num_layers == 1:
        return [0]
    return [(2 * j * (n_teacher - 1) + (num_layers - 1)) // (2 * (num_layers - 1)) for j in range(num_layers)]


def check_layers(config, fam: Family, chosen: list[int]) -> None:
    """Refuse, in one line naming the layers to keep, ``chosen`` teacher layers the family's student cannot have:
    layers that compute with their own index moved, a KV-shared layer without an earlier kept layer of its kind, a last
    layer of another kind than the config gives it, a first reusing layer with nothing to reuse, a layer without the
    layer whose keys and values it reads."""
    _check_layer_index_flags(config, fam, chosen)
    _check_kv_sharing(config, fam, chosen)
    _check_last_layer_kind(config, fam, chosen)
    _check_reused_results(config, fam, chosen)
    _check_kv_sources(config, fam, chosen)


def _check_layer_index_flags(config, fam: Family, chosen: list[int]) -> None:
    """Refuse layers other than the first n under a setting that ties a layer to its own index (`Family`'s
    ``layer_index_flags``): the student's layer j would compute as layer j, not as teacher layer chosen[j]."""
    moved = [(j, i) for j, i in enumerate(chosen) if i != j]
    for flag, what in fam.layer_index_flags:
        if getattr(config, flag, False) and moved:
            j, i = moved[0]
            first = " ".join(map(str, range(len(chosen))))
            raise TailkdError(f"the teacher {what} ({flag}): the student's layer {j} would compute as layer {j}, "
                              f"not as teacher layer {i}; keep the teacher's first {len(chosen)} layers "
                              f"(--student.layers {first})")


def _check_kv_sharing(config, fam: Family, chosen: list[int]) -> None:
    """The layers that reuse keys and values (`Family.kv_shared_layers`: the teacher's last N) take them from the
    student's last earlier layer of their kind (sliding or full attention: ``layer_types``), so each kind among the
    student's sharing layers needs such a layer before them; refused in one line naming the teacher layers to add."""
    first, kinds, _ = kv_sharing(config, fam)
    if kinds is None:
        return
    shared = len(kinds) - first
    own = {kinds[i] for i in chosen if i < first}
    for i in chosen:
        if i >= first and kinds[i] not in own:
            offer = [str(j) for j in range(first) if kinds[j] == kinds[i]]
            keep = f"teacher layer {offer[0]}" if len(offer) == 1 else f"one of teacher layers {' '.join(offer)}"
            raise TailkdError(f"teacher layer {i} reuses the keys and values of an earlier {kinds[i]} layer "
                              f"({fam.kv_shared_layers}: its last {shared} layers do), but the student keeps none "
                              f"before it: keep {keep} too (--student.layers)")


def _check_kv_sources(config, fam: Family, chosen: list[int]) -> None:
    """A layer that reads another layer's keys and values (`kv_reads`: Kolibri 1.1's kv_source_layers; it has no k/v
    projections) needs that layer in the student; refused in one line naming the teacher layer to add."""
    for i, j in kv_reads(config, fam).items():
        if i in chosen and j not in chosen:
            raise TailkdError(f"teacher layer {i} reads the keys and values of teacher layer {j} "
                              f"({fam.kv_sources}; it has no key and value projections of its own), but the student "
                              f"does not keep layer {j}: keep it too (--student.layers)")


def _check_reused_results(config, fam: Family, chosen: list[int]) -> None:
    """A layer that reuses an earlier layer's result (`Family.reuses_earlier`: GLM-5's shared DSA layers;
    `Family.reindexes`: Kolibri 1.1's reindexers) reuses the student's last earlier chosen layer's, so the student's
    first layer of those that compute or reuse it cannot be one; refused in one line."""
    among, read = set(result_layers(config, fam)), reused_results(config, fam)
    if (i := next((i for i in chosen if i in among), None)) in read:
        key, kind, what = fam.reuses_earlier or fam.reindexes
        kind = kind if fam.reuses_earlier else f"an {kind} layer it does not list"
        raise TailkdError(f"teacher layer {i} reuses the {what} of an earlier layer ({key}: {kind}), but the student "
                          f"keeps none before it: keep teacher layer {read[i]}, which it reads, too (--student.layers)")


def _check_last_layer_kind(config, fam: Family, chosen: list[int]) -> None:
    """A family whose config gives its last layer a kind whatever it lists (`Family.last_layer_kind`: Gemma 4's full
    attention) needs a student whose last chosen layer is of that kind; refused in one line naming those layers."""
    kinds = getattr(config, "layer_types", None)
    if fam.last_layer_kind and kinds and kinds[chosen[-1]] != fam.last_layer_kind:
        of_kind = " ".join(str(i) for i, kind in enumerate(kinds) if kind == fam.last_layer_kind)
        raise TailkdError(f"{fam.label}'s last layer is a {fam.last_layer_kind} one whatever its config lists, but the "
                          f"student's (teacher layer {chosen[-1]}) is a {kinds[chosen[-1]]} one: end the student's "
                          f"layers with one of teacher layers {of_kind} (--student.layers)")
