"""tailkd.sizing: which teacher layers a student keeps, and the refusals of widths a family cannot give."""

import itertools

import pytest
from conftest import make_tiny_lm
from hypothesis import given
from hypothesis import strategies as st

from tailkd.errors import TailkdError
from tailkd.families import setting
from tailkd.layer_choice import choose_layers
from tailkd.sizing import student_plan


def _plan(teacher, **options):
    """`student_plan` with `tailkd.student.build_student`'s keywords (the unset ones None)."""
    sizes = dict.fromkeys(("num_layers", "layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size",
                           "head_dim"))
    return student_plan(teacher, **{**sizes, **options})


# --------------------------------------------------------------------------- layer choice


@pytest.mark.parametrize("n_teacher, n, expected", [
    (30, 6, [0, 6, 12, 17, 23, 29]), (4, 2, [0, 3]), (4, 4, [0, 1, 2, 3]), (4, 1, [0]), (5, 3, [0, 2, 4]),
    (12, 4, [0, 4, 7, 11]),
])
def test_choose_layers_examples(n_teacher, n, expected):
    assert choose_layers(n_teacher, n) == expected


def test_choose_layers_keeps_whole_periods_where_the_kinds_repeat():
    """Jamba's layer kinds repeat every lcm(attn_layer_period, expert_layer_period) layers: num_layers keeps whole
    periods, evenly spaced as layers are (a trailing partial period is never kept); other counts are refused."""
    assert choose_layers(32, 16, period=8) == [*range(8), *range(24, 32)]
    assert choose_layers(8, 4, period=2) == [0, 1, 6, 7]
    assert choose_layers(30, 16, period=8) == [*range(8), *range(16, 24)]
    assert choose_layers(8, 8, period=4) == list(range(8))
    with pytest.raises(TailkdError, match=r"^num_layers=3, but the teacher's layer kinds repeat every 4 layers \(its "
                                          r"config's periods\): pick a multiple of 4 \(whole periods\) or list the "
                                          r"layers \(--student.layers\)$"):
        choose_layers(8, 3, period=4)
    assert choose_layers(8, layers=[0, 1, 2], period=4) == [0, 1, 2]  # listed layers: the model's own check follows


def test_spaced_gemma4_layers_keep_what_their_kv_shared_layers_read():
    """A Gemma 4 shaped like its E2B (35 layers, full attention every 5th, the last 20 reusing the keys and values of
    layers 13 (sliding) and 14 (full)): spaced layers whose KV-shared ones have an earlier kept layer of their kind are
    kept as spaced; where one has none, the layer the teacher's read (14) replaces the kept earlier layer nearest to
    it whose kind stays kept; what that cannot mend (3 layers: one earlier layer for two kinds) is left to the
    refusal; listed layers are the user's."""
    import transformers

    from tailkd.families import FAMILIES
    from tailkd.layer_choice import student_layers

    kinds = ["full_attention" if i % 5 == 4 else "sliding_attention" for i in range(35)]
    config = transformers.Gemma4TextConfig(num_hidden_layers=35, num_kv_shared_layers=20, layer_types=kinds)
    gemma4 = FAMILIES["gemma4"]
    assert choose_layers(35, 12) == student_layers(config, gemma4, 12)  # 9 (full) and 0, 3, 6, 12 (sliding) kept
    assert choose_layers(35, 8) == [0, 5, 10, 15, 19, 24, 29, 34]  # no full attention layer before 15
    assert student_layers(config, gemma4, 8) == [0, 5, 14, 15, 19, 24, 29, 34]  # 14 for 10, the nearest
    assert student_layers(config, gemma4, 2) == [14, 34]  # 34 (full) reads 14; 0 (sliding) needed by none
    assert student_layers(config, gemma4, 3) == [0, 17, 34] == choose_layers(35, 3)  # 0 is 17's only source
    assert student_layers(config, gemma4, layers=[0, 5, 34]) == [0, 5, 34]
    assert student_layers(transformers.LlamaConfig(num_hidden_layers=8), FAMILIES["llama"], 3) == choose_layers(8, 3)


def test_spaced_olmo_hybrid_layers_keep_a_layer_of_each_kind():
    """OLMo-Hybrid's config needs a layer of each kind its layer_types lists (an attention and a Gated DeltaNet
    layer): spaced layers missing a kind take the layer of that kind nearest to a kept layer whose kind stays kept, in
    its place (ties: the lower index); fewer layers than kinds and listed layers lacking a kind are refused in one
    line; layers that have every kind are the spaced ones."""
    import transformers

    from tailkd.families import FAMILIES
    from tailkd.layer_choice import student_layers

    full, linear = "full_attention", "linear_attention"
    olmo = FAMILIES["olmo_hybrid"]
    config = transformers.OlmoHybridConfig(num_hidden_layers=5, layer_types=[full, linear, linear, linear, full])
    assert choose_layers(5, 2) == [0, 4]  # both full attention
    assert student_layers(config, olmo, 2) == [1, 4]  # 1 for 0 (3 for 4 is as near: the lower index)
    assert student_layers(config, olmo, 3) == [0, 2, 4] == choose_layers(5, 3)
    config = transformers.OlmoHybridConfig(num_hidden_layers=8, layer_types=[linear] * 7 + [full])
    assert student_layers(config, olmo, 2) == [0, 7] == choose_layers(8, 2)
    config = transformers.OlmoHybridConfig(num_hidden_layers=8, layer_types=[linear] * 3 + [full] + [linear] * 4)
    assert choose_layers(8, 3) == [0, 4, 7]
    assert student_layers(config, olmo, 3) == [0, 3, 7]  # 3 (full) for its neighbour 4
    with pytest.raises(TailkdError, match=r"^num_layers=1, but OLMo-Hybrid's config needs a layer of each kind its "
                                          r"layer_types lists \(linear_attention, full_attention\): pick num_layers 2 "
                                          r"or more$"):
        student_layers(config, olmo, 1)
    with pytest.raises(TailkdError, match=r"^the student keeps no full_attention layer \(teacher layers 0 5\), but "
                                          r"OLMo-Hybrid's config needs a layer of each kind its layer_types lists "
                                          r"\(linear_attention, full_attention\): keep one of teacher layers 3 too "
                                          r"\(--student.layers\)$"):
        student_layers(config, olmo, layers=[0, 5])
    assert student_layers(config, olmo, layers=[3, 5]) == [3, 5]
    # three kinds (a config of OLMo-Hybrid's keys): the kept C (3) is its kind's only layer, so the missing B (2) takes
    # the place of 0, farther off
    from types import SimpleNamespace

    three = SimpleNamespace(num_hidden_layers=7, layer_types=["A", "A", "B", "C", "A", "A", "A"])
    assert choose_layers(7, 3) == [0, 3, 6]
    assert student_layers(three, olmo, 3) == [2, 3, 6]


def test_kv_sources_are_the_students_last_earlier_layer_of_each_kind():
    """The layer a kept KV-shared layer reads in the student: its last kept layer of that kind before the sharing ones
    (the teacher's 13 and 14 where kept; else an earlier one, as the model's own rule gives); none elsewhere."""
    import transformers

    from tailkd.families import FAMILIES
    from tailkd.layer_attention import kv_sources

    kinds = ["full_attention" if i % 5 == 4 else "sliding_attention" for i in range(35)]
    config = transformers.Gemma4TextConfig(num_hidden_layers=35, num_kv_shared_layers=20, layer_types=kinds)
    gemma4 = FAMILIES["gemma4"]
    assert kv_sources(config, gemma4, [0, 5, 14, 15, 19, 24, 29, 34]) == {15: 5, 19: 14, 24: 14, 29: 14, 34: 14}
    assert kv_sources(config, gemma4, [3, 9, 13, 14, 20]) == {20: 13}
    assert kv_sources(config, gemma4, [0, 4]) == {}
    assert kv_sources(transformers.LlamaConfig(num_hidden_layers=8), FAMILIES["llama"], [0, 7]) == {}


@given(st.integers(2, 80).flatmap(lambda L: st.tuples(st.just(L), st.integers(2, L))))
def test_choose_layers_is_rounded_linspace(case):
    n_teacher, n = case
    chosen = choose_layers(n_teacher, n)
    assert chosen[0] == 0 and chosen[-1] == n_teacher - 1 and len(chosen) == n
    assert all(a < b for a, b in itertools.pairwise(chosen))
    for j, i in enumerate(chosen):
        assert abs(i - j * (n_teacher - 1) / (n - 1)) <= 0.5


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("family, kwargs, message", [
    ("llama", {"num_layers": 5}, r"num_layers=5 but the teacher has 4 layers"),
    ("llama", {"num_layers": 0}, r"pick 1\.\.4"),
    ("llama", {"layers": [0, 4]}, r"layer indices \[4\] out of range.*0\.\.3"),
    ("llama", {"layers": [2, 1]}, r"increasing.*\[1, 2\]"),
    ("llama", {"layers": [0, 1, 1]}, r"layers \[0, 1, 1\] must be increasing without repeats: pass e\.g\. \[0, 1\]"),
    ("llama", {"layers": [0, 1], "num_layers": 3}, r"only one of them"),
    ("llama", {"layers": []}, r"^layers is empty: list the teacher layers \(0\.\.3\) the student keeps, or pass "
                              r"num_layers$"),
    ("llama", {"hidden_size": 128}, r"hidden_size=128 but the teacher's is 64"),
    ("llama", {"intermediate_size": 256}, r"intermediate_size=256 but the teacher's is 128"),
    ("llama", {"hidden_size": 30}, r"hidden_size=30 is not divisible by num_heads=4"),
    ("llama", {"num_heads": 3}, r"num_heads=3 is not a multiple of num_kv_heads=2"),
    ("llama", {"num_kv_heads": 3}, r"num_kv_heads=3 but the teacher has 2"),
    ("llama", {"num_kv_heads": 1}, r"raise num_kv_heads to at least 2"),
    ("llama", {"hidden_size": 48, "num_heads": 2, "num_kv_heads": 2}, r"head_dim 24, wider than the teacher's 16"),
    ("gpt2", {"num_kv_heads": 2}, r"GPT-2 has no grouped KV heads"),
    ("gpt2", {"num_heads": 2}, r"head_dim 32, wider than the teacher's 16"),
    # the lower bounds and the fixes named: without them a student with no MLP units was built, a layer -1 or 0 KV
    # heads failed with a KeyError or ZeroDivisionError, head_dim 0 was called odd, and a fix one head short was named
    ("llama", {"layers": [-1, 2]}, r"^layer indices \[-1\] out of range: the teacher has layers 0\.\.3$"),
    ("llama", {"intermediate_size": 0}, r"^intermediate_size=0 but the teacher's is 128: a student can only be "
                                        r"narrower, pick 1\.\.128$"),
    ("llama", {"num_kv_heads": 0}, r"^num_kv_heads=0 but the teacher has 2: pick 1\.\.2$"),
    ("llama", {"head_dim": 0}, r"^head_dim=0 but the teacher's is 16: a student can only be narrower, pick 1\.\.16$"),
    ("llama", {"num_heads": 3, "num_kv_heads": 1}, r"than the teacher's 2: raise num_kv_heads to at least 2 "
                                                   r"\(a divisor of 3\)$"),  # 3 heads need 3 / 2 -> 2 KV heads
    ("llama", {"hidden_size": 40, "num_heads": 2, "num_kv_heads": 2}, r"gives head_dim 20, wider than the teacher's "
                                                                       r"16: use at least 3 heads"),  # 40 / 16 -> 3
    # GPT-2's head_dim is n_embd // n_head, which must be exact: an explicit head_dim of 34 // 4 is no way round it
    ("gpt2", {"hidden_size": 34, "head_dim": 8}, r"^GPT-2 has no head_dim setting \(it is hidden_size/num_heads = "
                                                 r"34/4\): drop head_dim=8"),
])
def test_bad_arguments(family, kwargs, message):
    with pytest.raises(TailkdError, match=message):
        _plan(make_tiny_lm(family), **kwargs)


def test_setting_reads_a_key_of_a_sub_config():
    """A family's config key "a.b" is key b of the config's sub-config (or dict) a: DBRX's attn_config.kv_n_heads."""
    from types import SimpleNamespace

    config = SimpleNamespace(d_model=8, attn_config=SimpleNamespace(kv_n_heads=2), ffn_config={"moe_top_k": 1})
    assert setting(config, "d_model") == 8 and setting(config, "attn_config.kv_n_heads") == 2
    assert setting(config, "ffn_config.moe_top_k") == 1 and setting(config, "ffn_config.moe_num_experts", 0) == 0
