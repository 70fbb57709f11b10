"""The teacher families `tailkd.student` can build a student from, one table entry each.

An entry says, for one family of Hugging Face causal LMs:

- which model classes it covers and what its config calls the sizes a student may change (`keys`, read by `setting`:
  "a.b" is key b of the config's sub-config a);
- how each parameter (and persistent buffer: GLM-4.5's expert score correction) is sliced: a name (global ones by
  full name, per-layer ones by the part after ``<layer_prefix><i>.``) maps to one *axis kind* per tensor dimension
  (see `AXES`); the student builder turns the kinds into index lists once per student and cuts every teacher tensor
  with them;
- how the head size follows the other sizes (`head_dim`, `reads_head_dim`), whether q/k carry rotate-half RoPE
  (`rope`);
- which config fields must follow the chosen layers: per-layer lists (``layer_types``) are subset, "from layer
  N on" thresholds (``max_window_layers``) are renumbered, and fields proportional to head_dim
  (``query_pre_attn_scalar``) are rescaled when head_dim shrinks; which settings make a layer depend on its own
  index (`layer_index_flags`: GPT-2's ``scale_attn_by_inverse_layer_idx``), so that only the first layers can be
  kept.

A parameter of the student that its family's table does not name is an error (never a silent random init); a
persistent buffer it does not name keeps the value the student's own config gives it.
Parameters under the family's ``mlp_prefix`` (``mlp.``; LFM2's ``feed_forward.``, Granite 4.0-H's two MLP modules)
are the MLP (random or copied, see ``mlp_init``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Axis kinds, one per tensor dimension:
#   all      keep the whole axis (vocabulary rows, positions)
#   d        the residual stream: its first hidden_size entries (with hidden_channels "active", the most active:
#            tailkd.calibration)
#   ff       the MLP: its first intermediate_size units
#   q k v    the query / key / value rows of the kept heads (q and k: RoPE-pair aware, see tailkd.slicing; value heads
#            of their own size, `Family.value_head_dim`: their first rows, as many as a student's value head has)
#   o        the attention output's input side: the kept query heads, the rows v keeps in each
#   head_qk  the rows kept inside one q/k head (per-head q/k norms: Qwen3, Gemma3, Phi qk_layernorm)
#   qkv      a fused [q | k | v] projection (Phi-3 qkv_proj, GPT-2 c_attn): q, k and v rows in their blocks
#   qkv_heads  a fused projection of [q | k | v] blocks per head (GPT-NeoX's query_key_value; one KV head per query
#            head): the kept heads' blocks, q, k and v rows in each
#   qkv_groups  a fused projection of, per KV head, its group's query heads then its key and value (Falcon's new
#            decoder architecture): the kept KV heads' blocks, in each the kept query heads' q rows, then k and v rows
#   gate_up  a fused [gate | up] projection (Phi-3 gate_up_proj, a mixture's experts.gate_up_proj): the first units
#            of each half
#   gate_up_pairs  an interleaved [gate_0, up_0, gate_1, up_1, ...] projection (GPT-OSS's experts): the first pairs
#   expert   a mixture's routed experts (the router's rows and score-correction bias, the experts' leading axis):
#            the first num_experts; under group-limited routing (n_group groups: GLM-4.5, DeepSeek-V3) the first
#            num_experts / n_group of each group (with experts "used", per layer the most used: tailkd.calibration)
#   expert_ff  a mixture's experts flattened with their units, [experts x units, ...] (DBRX's w1, v1, w2): per kept
#            expert (as `expert`) its first intermediate_size units
#   ff_shared  a mixture's shared experts, one MLP of n_shared_experts x the routed width: its first units, the
#            student's routed width x n_shared_experts
#   head     whole query heads: the kept query heads' blocks of rows, whatever a head's size (GPT-OSS's attention
#            sinks: one entry per head; latent attention's q / q_b_proj, kv_b_proj and o_proj: a head's query, its
#            [key | value] rows out of the latent, its output columns)
#   kv_head  one entry per KV head (Cohere's k norm, [kv heads, head_dim]): the first num_kv_heads
#   d_blocks the entries d keeps of each block of the teacher's hidden_size (LFM2's short convolution:
#            in_proj = [B | C | x], channel by channel)
#   ff_model the MLP's first units, as many as the student's model makes of its intermediate_size (LFM2 rounds it)
#   qkv_mp   CodeGen's qkv_proj: `Family.head_blocks` blocks (its mp_num, 4) of [q | v | k] rows of a quarter of the
#            heads each: in each block the kept heads of that block, their q rows, v rows and k rows
#   q_gated  a gated attention's q_proj (Qwen3-Next, Qwen3.5), [query | gate] per head: q's rows of the kept query
#            heads, then the gate's first head_dim rows (the gate multiplies the head's output, as v's rows)
#   gate     an output gate of the attention (Laguna's g_proj): one row per query head (the kept heads), or one per
#            row of each head's output (as ``o``'s columns: the kept heads' first head_dim rows)
#   layer_blocks  an axis of one equal block per teacher layer (Gemma 4's per-layer embeddings, packed): the blocks of
#            the chosen layers, in order
#   ssm_in   a Mamba-2 mixer's in_proj, [z | x | B | C | dt]: the kept heads' channels of z and x (each group's first
#            heads: `tailkd.slicing.ssm_heads`), B and C whole (per group), the kept heads' dt
#   ssm_conv its depthwise convolution over [x | B | C]: the kept heads' channels of x, B and C whole
#   ssm_head one entry per Mamba-2 head (dt_bias, A_log, D): the kept heads
#   ssm_channels  one entry per channel of the mixer's output (its gated norm, out_proj's input): the kept heads'
#            (a Mamba-1 mixer's, Jamba's, each channel a head of one: every per-channel tensor, x_proj's input too)
#   ssm_xz   a Mamba-1 mixer's in_proj, [x | z]: the kept channels of each half
# (``ff``'s first units: where a layer's MLP is m times intermediate_size wide, Gemma 4's double-wide ones, m times the
# student's)
AXES = ("all", "d", "ff", "q", "k", "v", "o", "head_qk", "qkv", "qkv_heads", "qkv_groups", "gate_up", "gate_up_pairs",
        "expert", "expert_ff", "ff_shared", "head", "kv_head", "d_blocks", "ff_model", "q_gated", "qkv_mp",
        "layer_blocks", "gate", "ssm_in", "ssm_conv", "ssm_head", "ssm_channels", "ssm_xz")


def linear(module: str, out: str, inp: str) -> dict:
    """nn.Linear: weight [out, in], bias [out] (listed even where the model has none: only the student's own
    parameters are looked up)."""
    return {f"{module}.weight": (out, inp), f"{module}.bias": (out,)}


def conv1d(module: str, inp: str, out: str) -> dict:
    """GPT-2's Conv1D: weight [in, out] (transposed vs nn.Linear), bias [out]."""
    return {f"{module}.weight": (inp, out), f"{module}.bias": (out,)}


def norms(*modules: str, axis: str = "d") -> dict:
    """RMSNorm / LayerNorm weights (and LayerNorm biases) over one axis."""
    return {f"{m}.{kind}": (axis,) for m in modules for kind in ("weight", "bias")}


@dataclass(frozen=True)
class Family:
    """One teacher family (see the module docstring)."""

    name: str
    label: str  # for messages
    classes: tuple[str, ...]
    params: dict  # global parameter name -> axis kinds
    layer_params: dict  # per-layer parameter name (after the layer prefix) -> axis kinds
    embeddings: tuple[str, ...]  # frozen by freeze_embeddings
    head_dim: str  # "derived": hidden_size // heads (no head_dim in the config); "follows_hidden": the teacher's
    #                while hidden_size is unchanged, else hidden_size // heads; "kept": the teacher's (decoupled)
    layer_prefix: str = "model.layers."
    rope: bool | str = True  # q/k carry RoPE: True rotate-half (pairs (i, i + half)), "interleaved" (pairs (2i, 2i+1):
    #                         GLM), False none (GPT-2's absolute positions)
    keys: dict = field(default_factory=lambda: dict(
        layers="num_hidden_layers", hidden="hidden_size", heads="num_attention_heads",
        kv_heads="num_key_value_heads", intermediate="intermediate_size", experts=None, experts_per_token=None))
    # (a key "a.b" is key b of the config's sub-config a: DBRX's attn_config, ffn_config; `tailkd.families.setting`)
    # optional keys of a mixture, kept at the teacher's values: expert_groups (group-limited routing: n_group),
    # shared_experts (how many routed widths the shared MLP is: n_shared_experts)
    layer_lists: tuple[str, ...] = ("layer_types",)
    # per-layer settings listed run-length encoded, ``[[kinds, repeat], ...]`` spelling kinds * repeat in turn
    # (GPT-Neo's attention_types): rewritten as one entry per chosen layer (kept as it is where every layer is kept)
    run_length_layer_lists: tuple[str, ...] = ()
    layer_thresholds: tuple[str, ...] = ()
    # "up to layer N" (inclusive) bounds (ERNIE 4.5's moe_layer_end_index): the student's index of the last chosen layer
    # at or below N
    layer_last_indices: tuple[str, ...] = ()
    # lists of layer indices (LFM2's full_attn_idxs): the student's indices of the chosen layers they list
    layer_index_lists: tuple[str, ...] = ()
    head_dim_scaled: tuple[str, ...] = ()
    # the attention scale itself (Granite's attention_multiplier, MPT's attn_config.softmax_scale — "a.b", key b of
    # the config's dict a —, in place of 1/sqrt(head_dim)): multiplied by sqrt(head_dim_t / head_dim_s) when head_dim
    # shrinks, as Llama's 1/sqrt(head_dim) changes; unset (None), the model's own 1/sqrt(head_dim)
    attention_scales: tuple[str, ...] = ()
    # (config flag, what it does): when set, layer i computes with its index i (no config can say otherwise for a
    # student's layer j), so a student keeps the teacher's first layers or is refused
    layer_index_flags: tuple[tuple[str, str], ...] = ()
    # a "derived" family whose models read config.head_dim first when the config carries one (Phi, Phi-3, OLMo-2;
    # not GPT-2): such a teacher's head_dim is the config's and follows the student like "follows_hidden"
    reads_head_dim: bool = True
    # a mixture whose layers are sparse (routed experts) or dense by their index (Qwen-MoE's ``decoder_sparse_step``
    # and ``mlp_only_layers``): the student's config lists its dense layers explicitly (see tailkd.student)
    sparse_by_index: bool = False
    # multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Flash): heads narrow whole (axis "head"), one key/value
    # head per query head, the head sizes (qk_nope_head_dim, qk_rope_head_dim, v_head_dim) and LoRA ranks kept
    latent_attention: bool = False
    # a router that sends every token to this many experts whatever num_experts_per_tok says (Phi-MoE's sparsemixer: 2)
    fixed_experts_per_token: int = 0
    mlp_prefix: str | tuple[str, ...] = "mlp."  # what mlp_init random draws afresh
    # Mamba mixers' config keys (`tailkd.sizing.teacher_dims`): Mamba-2's heads, head_dim, groups (n_groups: each
    # group's heads read its B and C), and how the width is set — width (a key giving it: Falcon-H1's mamba_d_ssm, used
    # where set), expand (else expand x hidden_size: a student's is its width over its hidden_size, which must be
    # whole); neither: heads x head_dim (Nemotron-H). A student keeps each group's first ssm_heads / groups heads.
    # expand alone: Mamba-1 mixers (Jamba's), expand x hidden_size channels, each a head of one in one group
    ssm: dict = field(default_factory=dict)
    # a mixture whose models may have no routed experts (Granite 4.0-H's dense variants): the keys and per-layer axis
    # kinds that change then (`tailkd.sizing.config_family` applies them)
    without_experts: dict = field(default_factory=dict)
    # the layer kind (in the first of `layer_lists`) that holds the routed experts: a config listing none has none
    # (Nemotron-H's "moe" layers; its dense models still set n_routed_experts)
    expert_layer_kind: str = ""
    # (config key, why): a teacher setting the key has tensors the table cannot slice, refused in one line
    refused_settings: tuple[tuple[str, str], ...] = ()
    # group-limited routing (expert_groups): how many of a group's experts score it (DeepSeek-V3's top-2 sum, V2's
    # max: 1), and the (config key, value) under which the groups limit routing at all (DeepSeek-V2's topk_method)
    group_score_top: int = 2
    group_routing: tuple[str, ...] = ()
    # config keys equal to hidden_size that follow it (OPT's word_embed_proj_dim); a teacher where one differs has
    # projections between the two widths (OPT-350m), refused in one line
    hidden_keys: tuple[str, ...] = ()
    # ALiBi position biases (Bloom): one slope per head, set by the number of heads, so num_heads is the teacher's
    alibi: bool = False
    # a config key giving RoPE's rows per head (GPT-J's rotary_dim, which its model reads in place of a
    # partial_rotary_factor): the rotated share is that over head_dim; a student's are the rows it keeps rotating
    rotary_dim_key: str = ""
    # multi-query attention: one KV head, kept (set by a layout where a config flag asks for it: GPT-BigCode, Falcon-7B)
    multi_query: bool = False
    # ((config flag, Family fields where it is set), ...): the first set flag's fields replace the entry's (its
    # layer_params and keys merged into the entry's; `tailkd.sizing.config_family`): the attention layouts a config
    # picks (GPT-BigCode's multi-query or per-head c_attn, Falcon's three query_key_value layouts)
    layouts: tuple = ()
    # config keys equal to the number of query heads that follow it (Falcon's num_kv_heads where each query head has
    # its own KV head): a student's are its num_heads
    heads_keys: tuple[str, ...] = ()
    # a config flag that turns `alibi` on and RoPE off where it is set (Falcon-RW's alibi)
    alibi_flag: str = ""
    # an attention output projection of hidden_size x hidden_size whatever the heads (transformers' HeliumAttention):
    # a student's num_heads x head_dim must be its hidden_size
    square_attention_output: bool = False
    # depth-muP residual scales (MiniCPM3's scale_depth: each residual branch times key / sqrt(num_hidden_layers)):
    # rescaled by sqrt(student layers / teacher layers), so that a kept layer adds to the residual stream what it did
    depth_scales: tuple[str, ...] = ()
    # query heads held in this many equal blocks of one projection (CodeGen's qkv_proj: 4, its mp_num, fixed in its
    # code; axis qkv_mp): a student keeps as many heads of each block — its first ones, or by importance the most
    # important of each (`tailkd.calibrated.kept_heads` with the blocks as groups) — so num_heads is a multiple
    head_blocks: int = 0
    # (a module list inside a layer, "q" or "kv"): one module per query (or KV) head (StableLM's per-head q/k
    # LayerNorms, qk_layernorm): its table entries name the list's members "<list>.*.<parameter>", and a student's
    # module j is the teacher's of its j-th kept query (or KV) head, sliced as the entry says (`tailkd.student`)
    head_module_lists: tuple[tuple[str, str], ...] = ()
    # config keys in proportion to hidden_size (MiniCPM3's dim_model_base: its final hidden states divide by
    # hidden_size / dim_model_base before the head): scaled with a narrower hidden_size, the ratio the teacher's; a
    # hidden_size for which the key is not a whole number is refused
    hidden_ratios: tuple[str, ...] = ()
    # a router whose forward returns (scores, logits) and routes each token to the top num_experts_per_tok of the
    # logits, inside one of the family's layers, where its experts module is called without the routed indices (Llama
    # 4's feed_forward.router: its experts take every token pre-scaled by its score): `tailkd.calibration` counts the
    # routed experts there
    router: str = ""
    # config keys of periods that set the layers' kinds (Jamba: attention where i % attn_layer_period is its offset,
    # experts likewise): a student keeps whole periods of their lcm (`tailkd.layer_choice.layer_period`)
    layer_periods: tuple[str, ...] = ()
    # a config key counting the last layers that reuse the keys and values of the last earlier layer of their kind
    # (Gemma 4's num_kv_shared_layers; such a layer has no k/v projections): the student's are its chosen layers among
    # them, and each of their kinds needs an earlier chosen layer of that kind (refused in one line otherwise)
    kv_shared_layers: str = ""
    # a config key listing, per layer, the layer whose keys and values it reads (Kolibri 1.1's kv_source_layers; a
    # layer reading another's has no k/v projections): a student's reads the same teacher layer, which it keeps —
    # spaced layers take it in place of the kept layer nearest to it, influence keeps it with its reader, listed layers
    # lacking it are refused in one line (`tailkd.layer_attention.kv_reads`)
    kv_sources: str = ""
    # the kind (of ``layer_types``) a family's config gives its last layer whatever it is told (Gemma 4: full
    # attention): a student's last layer must be a teacher layer of that kind (refused in one line otherwise)
    last_layer_kind: str = ""
    # a config key listing each layer's kind where the family's config needs a layer of every kind it lists
    # (OLMo-Hybrid's layer_types: an attention and a Gated DeltaNet layer): spaced layers take the nearest layer of a
    # missing kind in place of a kept one, influence keeps each kind's most influential layer first, listed layers
    # lacking a kind are refused in one line (`tailkd.layer_choice.required_kinds`)
    every_kind: str = ""
    # (a config key listing each layer's kind, a kind, what it reuses): layers of that kind reuse what the last earlier
    # layer of another kind computed (GLM-5's shared DSA layers: the top-k of the last full indexer layer): a student's
    # first layer must not be one, and a layer chosen by influence keeps the one it reads
    # (`tailkd.layer_attention.reused_results`)
    reuses_earlier: tuple[str, str, str] = ()
    # (a config key listing the layers that compute a result, a layer kind of ``layer_types``, what it is): the other
    # layers of that kind reuse the last earlier listed layer's (Kolibri 1.1's index_layers: its other indexed-attention
    # layers rescore the key pool of the closest preceding indexer), as ``reuses_earlier``
    reindexes: tuple[str, str, str] = ()
    # (a config flag, a layer kind of ``layer_types``): where the flag is set, layers of that kind use their keys as
    # values (Gemma 4's attention_k_eq_v in its full attention layers: no v_proj), so their output projection reads
    # the kept keys' rows (`tailkd.layer_attention.keys_as_values`)
    keys_as_values: tuple[str, str] = ()
    # a config key listing each layer's query heads (Laguna's num_attention_heads_per_layer): a student's are the
    # chosen layers', scaled as num_heads scales the config's (`tailkd.layer_attention.layer_dims`)
    layer_heads: str = ""
    # (a layer kind, a multiple): that kind's layers have that many times the config's KV heads (MiMo-V2-Flash's
    # sliding layers: twice num_key_value_heads), a student's likewise (`tailkd.layer_attention.layer_dims`)
    kind_kv_multiple: tuple[str, int] = ()
    # a config key of value heads of their own size beside head_dim (MiMo-V2-Flash's v_head_dim): a student's scaled
    # as head_dim scales the config's (`tailkd.sizing.student_dims`), v and o cut by them (`tailkd.slicing`)
    value_head_dim: str = ""
    # (a layer kind, a config key of its heads, one of their size): that kind's layers have heads of their own, which
    # a student keeps whole (Kimi Linear's delta attention: linear_num_heads x linear_head_dim), so the table's head
    # axes keep every head there (`tailkd.layer_attention.layer_dims`) where tensors of both kinds share a name
    kind_heads: tuple[str, str, str] = ()


_DECODER = {"model.embed_tokens.weight": ("all", "d"), **linear("lm_head", "all", "d"), **norms("model.norm")}
_ATTENTION = {**linear("self_attn.q_proj", "q", "d"), **linear("self_attn.k_proj", "k", "d"),
              **linear("self_attn.v_proj", "v", "d"), **linear("self_attn.o_proj", "d", "o")}
_GATED_MLP = {**linear("mlp.gate_proj", "ff", "d"), **linear("mlp.up_proj", "ff", "d"),
              **linear("mlp.down_proj", "d", "ff")}
_PRE_NORMS = norms("input_layernorm", "post_attention_layernorm")
_SANDWICH = norms("pre_feedforward_layernorm", "post_feedforward_layernorm")
_HEAD_QK_NORMS = norms("self_attn.q_norm", "self_attn.k_norm", axis="head_qk")
_EMBED = ("model.embed_tokens.weight",)
_FUSED_MLP = {**linear("mlp.gate_up_proj", "gate_up", "d"), **linear("mlp.down_proj", "d", "ff")}  # [gate | up]
_PROJECTION_QK_NORMS = {"self_attn.q_norm.weight": ("q",), "self_attn.k_norm.weight": ("k",)}  # OLMo-2's, OLMoE's
# a mixture of experts (transformers 5's layout: the experts of a layer as 3-D tensors [E, out, in], gate before up)
_EXPERTS = {"mlp.gate.weight": ("expert", "d"), "mlp.experts.gate_up_proj": ("expert", "gate_up", "d"),
            "mlp.experts.down_proj": ("expert", "d", "ff")}
# Qwen-MoE's whole-width MLPs, kept at the teacher's width (intermediate_size / shared_expert_intermediate_size):
# the dense layers' MLP (mlp_only_layers, decoder_sparse_step) and Qwen2-MoE's shared expert with its gate
_DENSE_MLP = {**linear("mlp.gate_proj", "all", "d"), **linear("mlp.up_proj", "all", "d"),
              **linear("mlp.down_proj", "d", "all")}
_SHARED_EXPERT = {**linear("mlp.shared_expert.gate_proj", "all", "d"),
                  **linear("mlp.shared_expert.up_proj", "all", "d"),
                  **linear("mlp.shared_expert.down_proj", "d", "all"), **linear("mlp.shared_expert_gate", "all", "d")}
# hybrids (Qwen3-Next, Qwen3.5): gated full attention beside Gated DeltaNet linear attention, whose own sizes
# (linear_num_key_heads, ...) a student keeps: only its residual side (d) narrows
_GATED_ATTENTION = {**_ATTENTION, **linear("self_attn.q_proj", "q_gated", "d")}
_LINEAR_ATTENTION = {"linear_attn.dt_bias": ("all",), "linear_attn.A_log": ("all",),
                     **{f"linear_attn.conv1d.{kind}": ("all", "all", "all") for kind in ("weight", "bias")},
                     **norms("linear_attn.norm", axis="all"), **linear("linear_attn.out_proj", "d", "all"),
                     **{k: v for p in ("qkvz", "ba", "qkv", "z", "b", "a")  # Qwen3-Next: qkvz, ba; Qwen3.5 split
                        for k, v in linear(f"linear_attn.in_proj_{p}", "all", "d").items()}}
# DeepSeek-style mixtures (DeepSeek-V2/V3, GLM-4.5, dots.llm1): a router (V3's sigmoid one with a score-correction
# bias, a persistent buffer) with group-limited routing, shared experts of n_shared_experts x the routed width, dense
# MLPs (the teacher's width) in the first first_k_dense_replace layers
_SHARED_EXPERTS = {**linear("mlp.shared_experts.gate_proj", "ff_shared", "d"),  # n_shared_experts routed widths
                   **linear("mlp.shared_experts.up_proj", "ff_shared", "d"),
                   **linear("mlp.shared_experts.down_proj", "d", "ff_shared")}
# shared experts of a width of their own (shared_expert_intermediate_size: Laguna, Kolibri-1), kept whole
_OWN_SHARED_EXPERTS = {**linear("mlp.shared_experts.gate_proj", "all", "d"),
                       **linear("mlp.shared_experts.up_proj", "all", "d"),
                       **linear("mlp.shared_experts.down_proj", "d", "all")}
_DEEPSEEK_MOE = {**_EXPERTS, "mlp.gate.e_score_correction_bias": ("expert",), **_DENSE_MLP, **_SHARED_EXPERTS}
_MOE_KEYS = dict(layers="num_hidden_layers", hidden="hidden_size", heads="num_attention_heads",
                 kv_heads="num_key_value_heads", experts="num_experts", experts_per_token="num_experts_per_tok")

# multi-head latent attention: q from the residual stream directly (q_proj) or through a low-rank q_a / q_b pair; k and
# v from one shared latent (kv_a_proj_with_mqa: the latent and a RoPE key shared by all heads), expanded per head
_LATENT_ATTENTION = {**linear("self_attn.q_proj", "head", "d"), **linear("self_attn.q_b_proj", "head", "all"),
                     **linear("self_attn.kv_b_proj", "head", "all"), **linear("self_attn.o_proj", "d", "head"),
                     **linear("self_attn.q_a_proj", "all", "d"), **linear("self_attn.kv_a_proj_with_mqa", "all", "d"),
                     **norms("self_attn.q_a_layernorm", "self_attn.kv_a_layernorm", axis="all")}
_DEEPSEEK_MOE_KEYS = dict(_MOE_KEYS, experts="n_routed_experts", intermediate="moe_intermediate_size",
                          expert_groups="n_group", shared_experts="n_shared_experts")
# DeepSeek-V3.2's DSA indexer (in every attention layer): its own heads (index_n_heads x index_head_dim) score the keys
# each query attends to; wq_b reads the query latent (q_lora_rank, kept), wk and weights_proj the residual stream
_DSA_INDEXER = {**linear("self_attn.indexer.wq_b", "all", "all"), **linear("self_attn.indexer.wk", "all", "d"),
                **norms("self_attn.indexer.k_norm", axis="all"), **linear("self_attn.indexer.weights_proj", "all", "d")}

# LFM2's global tensors (its final norm is embedding_norm) and its mixers: attention with per-head q/k norms, or a
# short convolution whose in_proj is [B | C | x] over the residual channels
_LFM2_GLOBAL = {"model.embed_tokens.weight": ("all", "d"), **linear("lm_head", "all", "d"),
                **norms("model.embedding_norm")}
_SHORT_CONV = {**linear("conv.in_proj", "d_blocks", "d"), "conv.conv.weight": ("d", "all", "all"),
               "conv.conv.bias": ("d",), **linear("conv.out_proj", "d", "d")}  # LFM2's, LFM3's
_LFM2_MIXERS = {**linear("self_attn.q_proj", "q", "d"), **linear("self_attn.k_proj", "k", "d"),
                **linear("self_attn.v_proj", "v", "d"), **linear("self_attn.out_proj", "d", "o"),
                **norms("self_attn.q_layernorm", "self_attn.k_layernorm", axis="head_qk"), **_SHORT_CONV,
                **norms("operator_norm", "ffn_norm")}
# a Mamba-2 mixer (Falcon-H1, Bamba, Granite 4.0-H; Nemotron-H's and Mamba-2's under "mixer."): its heads narrow
# (ssm_heads, each group's first ones), its state and groups are kept; its residual side follows hidden_size
_MAMBA2 = {**linear("mamba.in_proj", "ssm_in", "d"), **linear("mamba.out_proj", "d", "ssm_channels"),
           "mamba.conv1d.weight": ("ssm_conv", "all", "all"), "mamba.conv1d.bias": ("ssm_conv",),
           "mamba.dt_bias": ("ssm_head",), "mamba.A_log": ("ssm_head",), "mamba.D": ("ssm_head",),
           **norms("mamba.norm", axis="ssm_channels")}
_HYBRID_SSM = dict(heads="mamba_n_heads", head_dim="mamba_d_head", groups="mamba_n_groups", expand="mamba_expand",
                   width="mamba_d_ssm")  # Falcon-H1's, Bamba's, Granite 4.0-H's keys (the last two: no mamba_d_ssm)
# Falcon-H1's and Bamba's tensors: a final LayerNorm of that name; attention and a Mamba-2 mixer, a gated MLP
_MAMBA_HYBRID_DECODER = {"model.embed_tokens.weight": ("all", "d"), **linear("lm_head", "all", "d"),
                         **norms("model.final_layernorm")}
_MAMBA_HYBRID_LAYER = {**_ATTENTION, **_MAMBA2, **linear("feed_forward.gate_proj", "ff", "d"),
                       **linear("feed_forward.up_proj", "ff", "d"), **linear("feed_forward.down_proj", "d", "ff"),
                       **norms("input_layernorm", "pre_ff_layernorm")}
# Granite's mixtures (Granite 3 MoE, Granite 4.0-H): routed experts under block_sparse_moe beside an always-on shared
# MLP ([gate | up] input_linear, output_linear) kept at the teacher's width
_GRANITE_MOE = {"block_sparse_moe.router.weight": ("expert", "d"),
                "block_sparse_moe.experts.gate_up_proj": ("expert", "gate_up", "d"),
                "block_sparse_moe.experts.down_proj": ("expert", "d", "ff"),
                **linear("shared_mlp.input_linear", "all", "d"), **linear("shared_mlp.output_linear", "d", "all")}
_GRANITE_MOE_KEYS = dict(_MOE_KEYS, experts="num_local_experts", intermediate="intermediate_size")
_PARALLEL_COHERE = {**_ATTENTION, **_GATED_MLP, **norms("input_layernorm")}  # attention and MLP after one LayerNorm
_UNGATED_MLP = {**linear("mlp.up_proj", "ff", "d"), **linear("mlp.down_proj", "d", "ff")}  # Nemotron's, Arcee's relu²
_HUNYUAN_QK_NORMS = norms("self_attn.query_layernorm", "self_attn.key_layernorm", axis="head_qk")  # after RoPE
# GPT-NeoX's and Persimmon's MLP; the sizes of the families with one KV head per query head (MHA) under their config's
# names: Llama's, or GPT-2's
_NEOX_MLP = {**linear("mlp.dense_h_to_4h", "ff", "d"), **linear("mlp.dense_4h_to_h", "d", "ff")}
_MHA_KEYS = dict(layers="num_hidden_layers", hidden="hidden_size", heads="num_attention_heads", kv_heads=None,
                 intermediate="intermediate_size")
_GPT2_KEYS = dict(layers="n_layer", hidden="n_embd", heads="n_head", kv_heads=None, intermediate="n_inner")

FAMILIES = {f.name: f for f in (
    # Ministral 3: Mistral's layout (its position-dependent query scale, llama_4_scaling_beta, has no width); CWM:
    # Llama's with sliding layers (layer_types)
    Family("llama", "Llama", ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "MinistralForCausalLM",
                              "Ministral3ForCausalLM", "SeedOssForCausalLM", "CwmForCausalLM"), _DECODER,
           {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS}, _EMBED, "follows_hidden",
           layer_thresholds=("max_window_layers",)),
    # Helium: Llama's layout with interleaved RoPE
    Family("helium", "Helium", ("HeliumForCausalLM",), _DECODER, {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS}, _EMBED,
           "follows_hidden", rope="interleaved", square_attention_output=True),
    # BitNet (its unpacked weights: a packed checkpoint is quantized, refused): Llama's layout with an RMSNorm over
    # the attention's output before o_proj (attn_sub_norm: the kept heads' rows) and over the MLP's units before
    # down_proj (ffn_sub_norm), head_dim hidden_size / num_heads; the sub-norm is hidden_size wide, so heads x head_dim
    # must be hidden_size
    Family("bitnet", "BitNet", ("BitNetForCausalLM",), _DECODER,
           {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS, **norms("self_attn.attn_sub_norm", axis="o"),
            **norms("mlp.ffn_sub_norm", axis="ff")}, _EMBED, "derived", square_attention_output=True),
    # HunYuan (dense): per-head q/k norms applied after RoPE (query_layernorm, key_layernorm)
    Family("hunyuan_v1_dense", "HunYuan", ("HunYuanDenseV1ForCausalLM",), _DECODER,
           {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS, **_HUNYUAN_QK_NORMS}, _EMBED, "follows_hidden"),
    # HunYuan-MoE (Hunyuan-A13B): HunYuan's attention; routed experts and an always-on shared MLP, both
    # intermediate_size wide, so both narrow with it; the router under mlp.gate.wg
    Family("hunyuan_v1_moe", "HunYuan-MoE", ("HunYuanMoEV1ForCausalLM",), _DECODER,
           {**_ATTENTION, **_PRE_NORMS, **_HUNYUAN_QK_NORMS,
            "mlp.gate.wg.weight": ("expert", "d"), "mlp.experts.gate_up_proj": ("expert", "gate_up", "d"),
            "mlp.experts.down_proj": ("expert", "d", "ff"), **linear("mlp.shared_mlp.gate_proj", "ff", "d"),
            **linear("mlp.shared_mlp.up_proj", "ff", "d"), **linear("mlp.shared_mlp.down_proj", "d", "ff")},
           _EMBED, "follows_hidden", keys=dict(_MOE_KEYS, experts_per_token="moe_topk",
                                               intermediate="intermediate_size")),
    # Jais 2: LayerNorms with biases, an ungated relu² MLP, biases throughout
    Family("jais2", "Jais 2", ("Jais2ForCausalLM",), _DECODER, {**_ATTENTION, **_UNGATED_MLP, **_PRE_NORMS}, _EMBED,
           "follows_hidden"),
    # Granite with sliding layers: an attention sink per query head, a RoPE base per layer (layer_rope_theta, 0: none)
    Family("granite_swa", "Granite-SWA", ("GraniteSWAForCausalLM",), _DECODER,
           {**_ATTENTION, "self_attn.sinks": ("head",), **_GATED_MLP, **_PRE_NORMS}, _EMBED, "follows_hidden",
           attention_scales=("attention_multiplier",), layer_lists=("layer_types", "layer_rope_theta")),
    Family("granitemoe_swa", "Granite-MoE-SWA", ("GraniteMoeSWAForCausalLM",), _DECODER,
           {**_ATTENTION, "self_attn.sinks": ("head",), **_PRE_NORMS, **_GRANITE_MOE}, _EMBED, "follows_hidden",
           keys=_GRANITE_MOE_KEYS, attention_scales=("attention_multiplier",),
           layer_lists=("layer_types", "layer_rope_theta"), mlp_prefix=("block_sparse_moe.", "shared_mlp.")),
    # Granite 3 MoE (and its variant with a shared MLP): Granite's attention, routed experts under block_sparse_moe
    Family("granitemoe", "Granite-MoE", ("GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM"), _DECODER,
           {**_ATTENTION, **_PRE_NORMS, **_GRANITE_MOE}, _EMBED, "follows_hidden", keys=_GRANITE_MOE_KEYS,
           attention_scales=("attention_multiplier",), mlp_prefix=("block_sparse_moe.", "shared_mlp.")),
    # Granite: Llama's layout; its attention scale is a setting (attention_multiplier), its multipliers the teacher's
    Family("granite", "Granite", ("GraniteForCausalLM",), _DECODER, {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS}, _EMBED,
           "follows_hidden", attention_scales=("attention_multiplier",)),
    # HyperCLOVA X: Granite's, with a norm after each sub-layer's output (use_post_norm: post_norm1, post_norm2) and a
    # head_dim in its config; its logits multiplied by logits_scaling (`tailkd.head`)
    Family("hyperclovax", "HyperCLOVA X", ("HyperCLOVAXForCausalLM",), _DECODER,
           {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS, **norms("post_norm1", "post_norm2")}, _EMBED, "follows_hidden",
           attention_scales=("attention_multiplier",)),
    # OLMo (1): Llama's layout with LayerNorms without parameters
    Family("olmo", "OLMo", ("OlmoForCausalLM",), _DECODER, {**_ATTENTION, **_GATED_MLP}, _EMBED, "follows_hidden"),
    Family("starcoder2", "StarCoder2", ("Starcoder2ForCausalLM",), _DECODER,
           {**_ATTENTION, **linear("mlp.c_fc", "ff", "d"), **linear("mlp.c_proj", "d", "ff"), **_PRE_NORMS}, _EMBED,
           "follows_hidden"),
    # StableLM: partial rotary (0.25), LayerNorms with biases, optionally parallel attention and MLP; head_dim is always
    # hidden_size / num_heads; with qk_layernorm (StableLM 2 12B) one q/k LayerNorm module per head, the kept heads'
    Family("stablelm", "StableLM", ("StableLmForCausalLM",), _DECODER,
           {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS,
            **{f"self_attn.{p}_layernorm.norms.*.{w}": ("head_qk",) for p in "qk" for w in ("weight", "bias")}},
           _EMBED, "derived", reads_head_dim=False,
           head_module_lists=(("self_attn.q_layernorm.norms", "q"), ("self_attn.k_layernorm.norms", "kv"))),
    Family("nemotron", "Nemotron", ("NemotronForCausalLM",), _DECODER, {**_ATTENTION, **_UNGATED_MLP, **_PRE_NORMS},
           _EMBED, "follows_hidden"),
    Family("arcee", "Arcee", ("ArceeForCausalLM",), _DECODER, {**_ATTENTION, **_UNGATED_MLP, **_PRE_NORMS}, _EMBED,
           "follows_hidden"),
    # ERNIE 4.5 (dense): interleaved RoPE, head_dim decoupled from hidden_size / heads
    Family("ernie4_5", "ERNIE 4.5", ("Ernie4_5ForCausalLM",), _DECODER, {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS},
           _EMBED, "kept", rope="interleaved"),
    Family("gpt2", "GPT-2", ("GPT2LMHeadModel",),
           {"transformer.wte.weight": ("all", "d"), "transformer.wpe.weight": ("all", "d"),
            **linear("lm_head", "all", "d"), **norms("transformer.ln_f")},
           {**conv1d("attn.c_attn", "d", "qkv"), **conv1d("attn.c_proj", "o", "d"), **conv1d("mlp.c_fc", "d", "ff"),
            **conv1d("mlp.c_proj", "ff", "d"), **norms("ln_1", "ln_2")},
           ("transformer.wte.weight", "transformer.wpe.weight"), "derived", layer_prefix="transformer.h.",
           rope=False, keys=_GPT2_KEYS, layer_lists=(), reads_head_dim=False,
           layer_index_flags=(("scale_attn_by_inverse_layer_idx", "divides layer i's attention scores by i + 1"),)),
    # GPT-BigCode (StarCoder, SantaCoder): GPT-2's layout in nn.Linear; c_attn = [q | k | v] blocks per head, or under
    # multi-query attention (multi_query, StarCoder's) [q | k | v] with one KV head
    Family("gpt_bigcode", "GPT-BigCode", ("GPTBigCodeForCausalLM",),
           {"transformer.wte.weight": ("all", "d"), "transformer.wpe.weight": ("all", "d"),
            **linear("lm_head", "all", "d"), **norms("transformer.ln_f")},
           {**linear("attn.c_attn", "qkv_heads", "d"), **linear("attn.c_proj", "d", "o"),
            **linear("mlp.c_fc", "ff", "d"), **linear("mlp.c_proj", "d", "ff"), **norms("ln_1", "ln_2")},
           ("transformer.wte.weight", "transformer.wpe.weight"), "derived", layer_prefix="transformer.h.", rope=False,
           keys=_GPT2_KEYS, layer_lists=(), reads_head_dim=False,
           layouts=(("multi_query", dict(layer_params=linear("attn.c_attn", "qkv", "d"), multi_query=True)),)),
    # GPT-Neo: GPT-2's layout in nn.Linear, q/k/v without biases, global and local (window_size) attention by layer
    # (attention_types run-length encoded, attention_layers spelled out), no 1/sqrt(head_dim) scale at all
    Family("gpt_neo", "GPT-Neo", ("GPTNeoForCausalLM",),
           {"transformer.wte.weight": ("all", "d"), "transformer.wpe.weight": ("all", "d"),
            **linear("lm_head", "all", "d"), **norms("transformer.ln_f")},
           {**linear("attn.attention.q_proj", "q", "d"), **linear("attn.attention.k_proj", "k", "d"),
            **linear("attn.attention.v_proj", "v", "d"), **linear("attn.attention.out_proj", "d", "o"),
            **linear("mlp.c_fc", "ff", "d"), **linear("mlp.c_proj", "d", "ff"), **norms("ln_1", "ln_2")},
           ("transformer.wte.weight", "transformer.wpe.weight"), "derived", layer_prefix="transformer.h.", rope=False,
           keys=dict(layers="num_layers", hidden="hidden_size", heads="num_heads", kv_heads=None,
                     intermediate="intermediate_size"),
           layer_lists=("attention_layers",), run_length_layer_lists=("attention_types",), reads_head_dim=False),
    # GPT-J: parallel attention and MLP after one LayerNorm, interleaved RoPE on rotary_dim rows of each head (which
    # follows head_dim), an LM head with a bias
    Family("gptj", "GPT-J", ("GPTJForCausalLM",),
           {"transformer.wte.weight": ("all", "d"), **linear("lm_head", "all", "d"), **norms("transformer.ln_f")},
           {**linear("attn.q_proj", "q", "d"), **linear("attn.k_proj", "k", "d"), **linear("attn.v_proj", "v", "d"),
            **linear("attn.out_proj", "d", "o"), **linear("mlp.fc_in", "ff", "d"), **linear("mlp.fc_out", "d", "ff"),
            **norms("ln_1")}, ("transformer.wte.weight",), "derived", layer_prefix="transformer.h.",
           rope="interleaved", keys=_GPT2_KEYS, layer_lists=(), reads_head_dim=False, rotary_dim_key="rotary_dim"),
    # CodeGen: GPT-J's block (parallel attention and MLP, interleaved RoPE on rotary_dim rows, LM head bias) with q, v
    # and k in one qkv_proj of 4 blocks of heads (mp_num, fixed in its code): a student keeps as many of each
    Family("codegen", "CodeGen", ("CodeGenForCausalLM",),
           {"transformer.wte.weight": ("all", "d"), **linear("lm_head", "all", "d"), **norms("transformer.ln_f")},
           {**linear("attn.qkv_proj", "qkv_mp", "d"), **linear("attn.out_proj", "d", "o"),
            **linear("mlp.fc_in", "ff", "d"), **linear("mlp.fc_out", "d", "ff"), **norms("ln_1")},
           ("transformer.wte.weight",), "derived", layer_prefix="transformer.h.", rope="interleaved", keys=_GPT2_KEYS,
           layer_lists=(), reads_head_dim=False, rotary_dim_key="rotary_dim", head_blocks=4),
    # Bloom: ALiBi (no RoPE; num_heads kept), GPT-NeoX's per-head [q | k | v] projection, an embedding LayerNorm, an MLP
    # always 4 x hidden_size wide (no setting: it narrows with hidden_size)
    Family("bloom", "Bloom", ("BloomForCausalLM",),
           {"transformer.word_embeddings.weight": ("all", "d"), **linear("lm_head", "all", "d"),
            **norms("transformer.word_embeddings_layernorm", "transformer.ln_f")},
           {**linear("self_attention.query_key_value", "qkv_heads", "d"), **linear("self_attention.dense", "d", "o"),
            **linear("mlp.dense_h_to_4h", "ff_model", "d"), **linear("mlp.dense_4h_to_h", "d", "ff_model"),
            **norms("input_layernorm", "post_attention_layernorm")},
           ("transformer.word_embeddings.weight",), "derived", layer_prefix="transformer.h.", rope=False,
           keys=dict(layers="n_layer", hidden="hidden_size", heads="n_head", kv_heads=None, intermediate=None),
           layer_lists=(), reads_head_dim=False, alibi=True),
    # MPT: ALiBi (num_heads kept), a fused [q | k | v] Wqkv, LayerNorms without biases, an MLP always 4 x hidden_size
    # wide (axis ff_model)
    Family("mpt", "MPT", ("MptForCausalLM",),
           {"transformer.wte.weight": ("all", "d"), **linear("lm_head", "all", "d"), **norms("transformer.norm_f")},
           {**linear("attn.Wqkv", "qkv", "d"), **linear("attn.out_proj", "d", "o"),
            **linear("ffn.up_proj", "ff_model", "d"), **linear("ffn.down_proj", "d", "ff_model"),
            **norms("norm_1", "norm_2")}, ("transformer.wte.weight",), "derived",
           layer_prefix="transformer.blocks.", rope=False,
           keys=dict(layers="n_layers", hidden="d_model", heads="n_heads", kv_heads=None, intermediate=None),
           layer_lists=(), reads_head_dim=False, alibi=True, mlp_prefix="ffn.",
           attention_scales=("attn_config.softmax_scale",)),
    # Falcon (Falcon-7B/40B/180B, Falcon-11B, Falcon-RW): a fused query_key_value in one of three layouts by config —
    # [q | k | v] blocks per head (the base: one KV head per query head, num_kv_heads following num_heads), multi-query
    # [q | k | v] with one KV head (multi_query; its model then ignores num_kv_heads, which still follows), or per KV
    # head its group's queries then its key and value (new_decoder_architecture, num_kv_heads grouped); RoPE, or ALiBi
    # where its alibi flag is set; LayerNorms with biases, one or two per block (parallel attention: ln_attn, ln_mlp);
    # an ungated MLP ffn_hidden_size wide
    Family("falcon", "Falcon", ("FalconForCausalLM",),
           {"transformer.word_embeddings.weight": ("all", "d"), **linear("lm_head", "all", "d"),
            **norms("transformer.ln_f")},
           {**linear("self_attention.query_key_value", "qkv_heads", "d"), **linear("self_attention.dense", "d", "o"),
            **linear("mlp.dense_h_to_4h", "ff", "d"), **linear("mlp.dense_4h_to_h", "d", "ff"),
            **norms("input_layernorm", "post_attention_layernorm", "ln_attn", "ln_mlp")},
           ("transformer.word_embeddings.weight",), "derived", layer_prefix="transformer.h.",
           keys=dict(_MHA_KEYS, intermediate="ffn_hidden_size"), layer_lists=(), reads_head_dim=False,
           heads_keys=("num_kv_heads",), alibi_flag="alibi",
           layouts=(("new_decoder_architecture", dict(layer_params=linear("self_attention.query_key_value",
                                                                         "qkv_groups", "d"),
                                                      keys={"kv_heads": "num_kv_heads"}, heads_keys=())),
                    ("multi_query", dict(layer_params=linear("self_attention.query_key_value", "qkv", "d"),
                                         multi_query=True)))),
    # OPT: learned absolute positions (offset 2), q/k/v/out biases, an ungated MLP (fc1, fc2) in the layer itself
    Family("opt", "OPT", ("OPTForCausalLM",),
           {"model.decoder.embed_tokens.weight": ("all", "d"), "model.decoder.embed_positions.weight": ("all", "d"),
            **linear("lm_head", "all", "d"), **norms("model.decoder.final_layer_norm")},
           {**linear("self_attn.q_proj", "q", "d"), **linear("self_attn.k_proj", "k", "d"),
            **linear("self_attn.v_proj", "v", "d"), **linear("self_attn.out_proj", "d", "o"),
            **linear("fc1", "ff", "d"), **linear("fc2", "d", "ff"),
            **norms("self_attn_layer_norm", "final_layer_norm")},
           ("model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"), "derived",
           layer_prefix="model.decoder.layers.", rope=False,
           keys=dict(_MHA_KEYS, intermediate="ffn_dim"), layer_lists=(), reads_head_dim=False,
           mlp_prefix=("fc1.", "fc2."),
           hidden_keys=("word_embed_proj_dim",)),
    # GPT-NeoX (Pythia): one query_key_value of [q | k | v] blocks per head, partial rotate-half RoPE, parallel
    # attention and MLP, LayerNorms with biases
    Family("gpt_neox", "GPT-NeoX", ("GPTNeoXForCausalLM",),
           {"gpt_neox.embed_in.weight": ("all", "d"), **linear("lm_head", "all", "d"),
            **norms("gpt_neox.final_layer_norm")},
           {**linear("attention.query_key_value", "qkv_heads", "d"), **linear("attention.dense", "d", "o"),
            **_NEOX_MLP, **norms("input_layernorm", "post_attention_layernorm")},
           ("gpt_neox.embed_in.weight",), "derived", layer_prefix="gpt_neox.layers.", keys=_MHA_KEYS, layer_lists=(),
           reads_head_dim=False),
    # Persimmon (Adept): GPT-NeoX's per-head [q | k | v] projection with per-head q/k LayerNorms, partial RoPE
    Family("persimmon", "Persimmon", ("PersimmonForCausalLM",),
           {"model.embed_tokens.weight": ("all", "d"), **linear("lm_head", "all", "d"),
            **norms("model.final_layernorm")},
           {**linear("self_attn.query_key_value", "qkv_heads", "d"), **linear("self_attn.dense", "d", "o"),
            **norms("self_attn.q_layernorm", "self_attn.k_layernorm", axis="head_qk"),
            **_NEOX_MLP, **norms("input_layernorm", "post_attention_layernorm")}, _EMBED, "derived", keys=_MHA_KEYS,
           layer_lists=(), reads_head_dim=False),
    # nanochat: norms without weights (q/k norms too), a relu² MLP (fc1, fc2), final soft-capping (the head's)
    Family("nanochat", "nanochat", ("NanoChatForCausalLM",), _DECODER,
           {**_ATTENTION, **linear("mlp.fc1", "ff", "d"), **linear("mlp.fc2", "d", "ff")}, _EMBED, "derived"),
    Family("phi", "Phi", ("PhiForCausalLM",),
           {"model.embed_tokens.weight": ("all", "d"), **linear("lm_head", "all", "d"),
            **norms("model.final_layernorm")},
           {**linear("self_attn.q_proj", "q", "d"), **linear("self_attn.k_proj", "k", "d"),
            **linear("self_attn.v_proj", "v", "d"), **linear("self_attn.dense", "d", "o"),
            **norms("self_attn.q_layernorm", "self_attn.k_layernorm", axis="head_qk"),
            **linear("mlp.fc1", "ff", "d"), **linear("mlp.fc2", "d", "ff"), **norms("input_layernorm")},
           _EMBED, "derived"),
    Family("phi3", "Phi-3", ("Phi3ForCausalLM",), _DECODER,
           {**linear("self_attn.qkv_proj", "qkv", "d"), **linear("self_attn.o_proj", "d", "o"),
            **_FUSED_MLP, **_PRE_NORMS},
           _EMBED, "derived"),
    Family("gemma", "Gemma", ("GemmaForCausalLM",), _DECODER, {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS},
           _EMBED, "kept"),
    # VaultGemma: Gemma2's attention (query_pre_attn_scalar, soft-capping) with pre-norms only
    Family("vaultgemma", "VaultGemma", ("VaultGemmaForCausalLM",), _DECODER,
           {**_ATTENTION, **_GATED_MLP, **norms("input_layernorm", "pre_feedforward_layernorm")}, _EMBED, "kept",
           head_dim_scaled=("query_pre_attn_scalar",)),
    Family("gemma2", "Gemma2", ("Gemma2ForCausalLM",), _DECODER,
           {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS, **_SANDWICH}, _EMBED, "kept",
           head_dim_scaled=("query_pre_attn_scalar",)),
    Family("gemma3", "Gemma3", ("Gemma3ForCausalLM",), _DECODER,
           {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS, **_SANDWICH, **_HEAD_QK_NORMS}, _EMBED, "kept",
           head_dim_scaled=("query_pre_attn_scalar",)),
    # Gemma 4 (text: Gemma4ForCausalLM): Gemma 3's sandwich norms and per-head q/k norms (v's without weights) under
    # an attention scale of 1; its full attention layers' heads of their own size (global_head_dim; with
    # attention_k_eq_v KV heads of their own, keys used as values: per_layer_config), which a student scales as it
    # does head_dim and num_kv_heads (`tailkd.layer_attention`); per-layer embeddings (a table and a projection of one
    # block per layer: layer_blocks) entering each layer through a gate; its last num_kv_shared_layers layers reuse an
    # earlier layer's keys and values, their MLPs twice as wide under use_double_wide_mlp; a scale per layer
    # (layer_scalar, a buffer); with enable_moe_block, routed experts (a router with its own scales) beside each
    # layer's dense MLP, which stays whole
    Family("gemma4", "Gemma 4", ("Gemma4ForCausalLM", "Gemma4UnifiedForCausalLM"),
           {**_DECODER, "model.embed_tokens_per_layer.weight": ("all", "layer_blocks"),
            **linear("model.per_layer_model_projection", "layer_blocks", "d"),
            **norms("model.per_layer_projection_norm", axis="all")},
           {**_ATTENTION, **_HEAD_QK_NORMS, **_GATED_MLP, **_PRE_NORMS, **_SANDWICH,
            **linear("per_layer_input_gate", "all", "d"), **linear("per_layer_projection", "d", "all"),
            **norms("post_per_layer_input_norm"), "layer_scalar": ("all",)},
           (*_EMBED, "model.embed_tokens_per_layer.weight"), "kept", mlp_prefix=("mlp.", "router.", "experts."),
           kv_shared_layers="num_kv_shared_layers", last_layer_kind="full_attention",
           keys_as_values=("attention_k_eq_v", "full_attention"),
           layouts=(("enable_moe_block", dict(
               keys=dict(_MOE_KEYS, experts="num_experts", experts_per_token="top_k_experts",
                         intermediate="moe_intermediate_size"),
               layer_params={**_DENSE_MLP, **linear("router.proj", "expert", "d"), "router.scale": ("d",),
                             "router.per_expert_scale": ("expert",), "experts.gate_up_proj": ("expert", "gate_up", "d"),
                             "experts.down_proj": ("expert", "d", "ff"),
                             **norms("post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                                     "pre_feedforward_layernorm_2")})),)),
    Family("qwen3", "Qwen3", ("Qwen3ForCausalLM",), _DECODER,
           {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS, **_HEAD_QK_NORMS}, _EMBED, "kept",
           layer_thresholds=("max_window_layers",)),
    Family("mixtral", "Mixtral", ("MixtralForCausalLM",), _DECODER, {**_ATTENTION, **_EXPERTS, **_PRE_NORMS},
           _EMBED, "follows_hidden", keys=dict(_MOE_KEYS, intermediate="intermediate_size")),
    # DBRX: MPT's block names (transformer.blocks, norm_attn_norm's LayerNorms without biases around a fused [q | k | v]
    # Wqkv, clip_qkv) with grouped KV heads and RoPE; a softmax top-k router; its experts' gate (w1), up (v1) and down
    # (w2) weights each [experts x units, hidden]; its sizes in the nested attn_config and ffn_config ("a.b": key b of
    # the config's sub-config a)
    Family("dbrx", "DBRX", ("DbrxForCausalLM",),
           {"transformer.wte.weight": ("all", "d"), **linear("lm_head", "all", "d"), **norms("transformer.norm_f")},
           {**norms("norm_attn_norm.norm_1", "norm_attn_norm.norm_2"), **linear("norm_attn_norm.attn.Wqkv", "qkv", "d"),
            **linear("norm_attn_norm.attn.out_proj", "d", "o"), **linear("ffn.router.layer", "expert", "d"),
            **{f"ffn.experts.mlp.{w}": ("expert_ff", "d") for w in ("w1", "v1", "w2")}},
           ("transformer.wte.weight",), "derived", layer_prefix="transformer.blocks.",
           keys=dict(layers="n_layers", hidden="d_model", heads="n_heads", kv_heads="attn_config.kv_n_heads",
                     intermediate="ffn_config.ffn_hidden_size", experts="ffn_config.moe_num_experts",
                     experts_per_token="ffn_config.moe_top_k"),
           layer_lists=(), reads_head_dim=False, mlp_prefix="ffn."),
    Family("qwen2_moe", "Qwen2-MoE", ("Qwen2MoeForCausalLM",), _DECODER,
           {**_ATTENTION, **_EXPERTS, **_SHARED_EXPERT, **_DENSE_MLP, **_PRE_NORMS}, _EMBED, "follows_hidden",
           keys=dict(_MOE_KEYS, intermediate="moe_intermediate_size"), layer_thresholds=("max_window_layers",),
           sparse_by_index=True),
    Family("qwen3_moe", "Qwen3-MoE", ("Qwen3MoeForCausalLM",), _DECODER,
           {**_ATTENTION, **_EXPERTS, **_DENSE_MLP, **_PRE_NORMS, **_HEAD_QK_NORMS}, _EMBED, "kept",
           keys=dict(_MOE_KEYS, intermediate="moe_intermediate_size"), layer_thresholds=("max_window_layers",),
           sparse_by_index=True),
    # Flint: Qwen3-MoE's layout with an attention sink per query head, sliding and full layers (layer_types), a sigmoid
    # router and a shared expert of its own width (Qwen2-MoE's name, no gate: kept), dense layers in mlp_only_layers
    Family("flint", "Flint", ("FlintForCausalLM",), _DECODER,
           {**_ATTENTION, **_EXPERTS, **_SHARED_EXPERT, **_DENSE_MLP, **_PRE_NORMS, **_HEAD_QK_NORMS,
            "self_attn.sinks": ("head",)}, _EMBED, "kept", keys=dict(_MOE_KEYS, intermediate="moe_intermediate_size"),
           layer_lists=("layer_types",), sparse_by_index=True),
    # Mellum: Qwen3-MoE's layout, its sparse/dense MLPs and sliding/full attention listed per layer (mlp_layer_types,
    # layer_types)
    Family("mellum", "Mellum", ("MellumForCausalLM",), _DECODER,
           {**_ATTENTION, **_HEAD_QK_NORMS, **_EXPERTS, **_DENSE_MLP, **_PRE_NORMS}, _EMBED, "kept",
           keys=dict(_MOE_KEYS, intermediate="moe_intermediate_size"), layer_lists=("layer_types", "mlp_layer_types")),
    # FlexOlmo: OLMoE's attention (q/k norms over the whole projection) with OLMo-2's post-norms
    Family("flex_olmo", "FlexOlmo", ("FlexOlmoForCausalLM",), _DECODER,
           {**_ATTENTION, **_EXPERTS, **norms("post_attention_layernorm", "post_feedforward_layernorm"),
            **_PROJECTION_QK_NORMS}, _EMBED, "derived", keys=dict(_MOE_KEYS, intermediate="intermediate_size")),
    # ERNIE 4.5 MoE: interleaved RoPE; routed layers by index (moe_layer_start/end_index renumbered, moe_layer_interval
    # kept: a choice of layers it cannot express is refused), a [1, E] score bias parameter, shared experts
    Family("ernie4_5_moe", "ERNIE 4.5 MoE", ("Ernie4_5_MoeForCausalLM",), _DECODER,
           {**_ATTENTION, **_EXPERTS, "mlp.gate.moe_statics.e_score_correction_bias": ("all", "expert"), **_DENSE_MLP,
            **_SHARED_EXPERTS, **_PRE_NORMS}, _EMBED, "kept", rope="interleaved",
           keys=dict(_MOE_KEYS, experts="moe_num_experts", experts_per_token="moe_k",
                     intermediate="moe_intermediate_size", shared_experts="moe_num_shared_experts"),
           layer_thresholds=("moe_layer_start_index",), layer_last_indices=("moe_layer_end_index",)),
    Family("glm4_moe", "GLM-4.5", ("Glm4MoeForCausalLM",), _DECODER,
           {**_ATTENTION, **_HEAD_QK_NORMS, **_DEEPSEEK_MOE, **_PRE_NORMS}, _EMBED, "kept",
           keys=_DEEPSEEK_MOE_KEYS, layer_thresholds=("first_k_dense_replace",)),
    # EXAONE-MoE: DeepSeek-V3's routing with per-head q/k norms, RoPE on sliding layers only (EXAONE 4's), its
    # sliding/full attention and dense/sparse MLPs listed per layer (first_k_dense_replace renumbered alike)
    Family("exaone_moe", "EXAONE-MoE", ("ExaoneMoeForCausalLM",), _DECODER,
           {**_ATTENTION, **_HEAD_QK_NORMS, **_DEEPSEEK_MOE, **_PRE_NORMS}, _EMBED, "kept",
           keys=dict(_DEEPSEEK_MOE_KEYS, experts="num_experts", shared_experts="num_shared_experts"),
           layer_lists=("layer_types", "mlp_layer_types"), layer_thresholds=("first_k_dense_replace",)),
    # Solar Open: DeepSeek-V3's routing (every layer routed), grouped-query attention
    Family("solar_open", "Solar Open", ("SolarOpenForCausalLM",), _DECODER,
           {**_ATTENTION, **_DEEPSEEK_MOE, **_PRE_NORMS}, _EMBED, "kept", keys=_DEEPSEEK_MOE_KEYS),
    # MiniMax-M2: a sigmoid router whose score-correction bias (a buffer) sits on the MoE block, q/k norms over the
    # whole projection (OLMo-2's), partial rotary set by rotary_dim (rows, so it follows head_dim)
    Family("minimax_m2", "MiniMax-M2", ("MiniMaxM2ForCausalLM",), _DECODER,
           {**_ATTENTION, **_PROJECTION_QK_NORMS, **_EXPERTS, "mlp.e_score_correction_bias": ("expert",),
            **_PRE_NORMS}, _EMBED, "kept", keys=dict(_MOE_KEYS, experts="num_local_experts",
                                                      intermediate="intermediate_size"),
           head_dim_scaled=("rotary_dim",)),
    # Hy3 (HY-V3): per-head q/k norms (Apertus' attention), a sigmoid router whose score-correction bias (a buffer)
    # sits on the MoE block (MiniMax-M2's), shared experts num_shared_experts routed widths wide, dense and routed
    # layers listed per layer (mlp_layer_types)
    Family("hy_v3", "Hy3", ("HYV3ForCausalLM",), _DECODER,
           {**_ATTENTION, **_HEAD_QK_NORMS, **_EXPERTS, "mlp.e_score_correction_bias": ("expert",), **_DENSE_MLP,
            **_SHARED_EXPERTS, **_PRE_NORMS}, _EMBED, "kept",
           keys=dict(_MOE_KEYS, intermediate="moe_intermediate_size", shared_experts="num_shared_experts"),
           layer_lists=("mlp_layer_types",)),
    # AFMoE (Arcee Trinity): per-head q/k norms, a sigmoid output gate per element of the attention's output
    # (self_attn.gate_proj: as o's columns), RoPE on its sliding layers only (layer_types), sandwich norms around the
    # MLP; a sigmoid router (mlp.router.gate) whose score bias is a frozen parameter on the block (expert_bias), shared
    # experts num_shared_experts routed widths wide, dense below num_dense_layers; under mup_enabled its embeddings are
    # scaled by sqrt(hidden_size) of the student (as Gemma's)
    Family("afmoe", "AFMoE", ("AfmoeForCausalLM",), _DECODER,
           {**_ATTENTION, **_HEAD_QK_NORMS, **linear("self_attn.gate_proj", "gate", "d"),
            **linear("mlp.router.gate", "expert", "d"), "mlp.experts.gate_up_proj": ("expert", "gate_up", "d"),
            "mlp.experts.down_proj": ("expert", "d", "ff"), "mlp.expert_bias": ("expert",), **_DENSE_MLP,
            **_SHARED_EXPERTS, **_PRE_NORMS, **norms("pre_mlp_layernorm", "post_mlp_layernorm")}, _EMBED, "kept",
           keys=dict(_MOE_KEYS, intermediate="moe_intermediate_size", shared_experts="num_shared_experts"),
           layer_lists=("layer_types",), layer_thresholds=("num_dense_layers",)),
    Family("dots1", "dots.llm1", ("Dots1ForCausalLM",), _DECODER,
           {**_ATTENTION, **_HEAD_QK_NORMS, **_DEEPSEEK_MOE, **_PRE_NORMS}, _EMBED, "kept",
           keys=_DEEPSEEK_MOE_KEYS, layer_thresholds=("first_k_dense_replace", "max_window_layers")),
    # DeepSeek-V2: a softmax router whose groups (topk_method group_limited_greedy) are scored by their best expert
    Family("deepseek_v2", "DeepSeek-V2", ("DeepseekV2ForCausalLM",), _DECODER,
           {**_LATENT_ATTENTION, **_DEEPSEEK_MOE, **_PRE_NORMS}, _EMBED, "kept", keys=_DEEPSEEK_MOE_KEYS,
           layer_thresholds=("first_k_dense_replace",), latent_attention=True, group_score_top=1,
           group_routing=("topk_method", "group_limited_greedy")),
    Family("deepseek_v3", "DeepSeek-V3", ("DeepseekV3ForCausalLM",), _DECODER,
           {**_LATENT_ATTENTION, **_DEEPSEEK_MOE, **_PRE_NORMS}, _EMBED, "kept", keys=_DEEPSEEK_MOE_KEYS,
           layer_thresholds=("first_k_dense_replace",), latent_attention=True),
    # DeepSeek-V3.2: DeepSeek-V3 with the DSA indexer (only its residual side narrows: its heads are its own, the latent
    # attention's narrow whole), dense and routed layers also listed per layer (mlp_layer_types)
    Family("deepseek_v32", "DeepSeek-V3.2", ("DeepseekV32ForCausalLM",), _DECODER,
           {**_LATENT_ATTENTION, **_DSA_INDEXER, **_DEEPSEEK_MOE, **_PRE_NORMS}, _EMBED, "kept",
           keys=_DEEPSEEK_MOE_KEYS, layer_lists=("layer_types", "mlp_layer_types"),
           layer_thresholds=("first_k_dense_replace",), latent_attention=True),
    # A.X K1: DeepSeek-V3's layout (latent attention always through q_lora_rank) with a norm on its MoE block's output
    # (mlp.post_mlp_layernorm), dense and routed layers listed per layer (mlp_layer_types; transformers 5.17: dense
    # below first_k_dense_replace)
    Family("axk1", "A.X K1", ("AXK1ForCausalLM",), _DECODER,
           {**_LATENT_ATTENTION, **_DEEPSEEK_MOE, **norms("mlp.post_mlp_layernorm"), **_PRE_NORMS}, _EMBED, "kept",
           keys=_DEEPSEEK_MOE_KEYS, layer_lists=("mlp_layer_types",), layer_thresholds=("first_k_dense_replace",),
           latent_attention=True),
    # GLM-MoE-DSA (GLM-5): DeepSeek-V3.2's layout whose "shared" layers (indexer_types) have no indexer and reuse the
    # DSA top-k of the last earlier "full" one (a student's follow its chosen layers: reuses_earlier)
    Family("glm_moe_dsa", "GLM-MoE-DSA", ("GlmMoeDsaForCausalLM",), _DECODER,
           {**_LATENT_ATTENTION, **_DSA_INDEXER, **_DEEPSEEK_MOE, **_PRE_NORMS}, _EMBED, "kept",
           keys=_DEEPSEEK_MOE_KEYS, layer_lists=("layer_types", "mlp_layer_types", "indexer_types"),
           layer_thresholds=("first_k_dense_replace",), latent_attention=True,
           reuses_earlier=("indexer_types", "shared", "DSA top-k")),
    # MiniCPM5-MoE: q and a sigmoid output gate in one q_gate_proj, [query | gate] per head (the gate's rows scale the
    # head's output rows, as v's: axis q_gated), head_dim decoupled from hidden_size / heads, DeepSeek-V3's mixture, its
    # dense and routed layers listed per layer (mlp_layer_types)
    Family("minicpm5_moe", "MiniCPM5-MoE", ("MiniCPM5MoeForCausalLM",), _DECODER,
           {**{name: axes for name, axes in _ATTENTION.items() if ".q_proj." not in name},
            **linear("self_attn.q_gate_proj", "q_gated", "d"), **_DEEPSEEK_MOE, **_PRE_NORMS}, _EMBED, "kept",
           keys=_DEEPSEEK_MOE_KEYS, layer_lists=("layer_types", "mlp_layer_types")),
    # Youtu-LLM: DeepSeek-V3's latent attention with a dense MLP in every layer
    Family("youtu", "Youtu-LLM", ("YoutuForCausalLM",), _DECODER, {**_LATENT_ATTENTION, **_GATED_MLP, **_PRE_NORMS},
           _EMBED, "kept", latent_attention=True),
    # MiniCPM3: Youtu's layout, with muP scales: embeddings times scale_emb (kept), each residual branch times
    # scale_depth / sqrt(num_hidden_layers), the final hidden states divided by hidden_size / dim_model_base
    Family("minicpm3", "MiniCPM3", ("MiniCPM3ForCausalLM",), _DECODER,
           {**_LATENT_ATTENTION, **_GATED_MLP, **_PRE_NORMS}, _EMBED, "kept", latent_attention=True,
           depth_scales=("scale_depth",), hidden_ratios=("dim_model_base",)),
    # GLM-4.7-Flash: DeepSeek-V3's layout, its dense/routed layers listed per layer (mlp_layer_types)
    Family("glm4_moe_lite", "GLM-4.7-Flash", ("Glm4MoeLiteForCausalLM",), _DECODER,
           {**_LATENT_ATTENTION, **_DEEPSEEK_MOE, **_PRE_NORMS}, _EMBED, "kept", keys=_DEEPSEEK_MOE_KEYS,
           layer_lists=("layer_types", "mlp_layer_types"), latent_attention=True),
    # Kimi Linear: Kimi Delta Attention layers (a linear attention of their own sizes, linear_num_heads x
    # linear_head_dim: only the residual side narrows) beside multi-head latent attention layers without RoPE
    # (layer_types), whose heads narrow whole; the two kinds name their q_proj and o_proj alike, cut by whole heads,
    # every one in the delta layers (kind_heads); DeepSeek-V3's mixture, its dense and routed layers listed per layer
    # (mlp_layer_types)
    Family("kimi_linear", "Kimi Linear", ("KimiLinearForCausalLM",), _DECODER,
           {**_LATENT_ATTENTION, **linear("self_attn.k_proj", "all", "d"), **linear("self_attn.v_proj", "all", "d"),
            **norms("self_attn.o_norm", axis="all"),
            **linear("self_attn.b_proj", "all", "d"), **linear("self_attn.g_a_proj", "all", "d"),
            **linear("self_attn.g_b_proj", "all", "all"), **linear("self_attn.forget_gate.f_a_proj", "all", "d"),
            **linear("self_attn.forget_gate.f_b_proj", "all", "all"), "self_attn.conv1d.weight": ("all", "all", "all"),
            "self_attn.forget_gate.dt_bias": ("all",), "self_attn.forget_gate.A_log": ("all", "all", "all", "all"),
            **_DEEPSEEK_MOE, **_PRE_NORMS}, _EMBED, "kept", rope=False,
           keys=dict(_DEEPSEEK_MOE_KEYS, experts="num_experts"), layer_lists=("layer_types", "mlp_layer_types"),
           latent_attention=True, kind_heads=("linear_attention", "linear_num_heads", "linear_head_dim")),
    # MiMo-V2-Flash: sliding layers (an attention sink per query head) with twice the KV heads of its full layers under
    # one num_key_value_heads (a student's likewise: kind_kv_multiple), value heads of their own size (v_head_dim,
    # scaled as head_dim: value_head_dim), partial RoPE with a base per layer kind; DeepSeek-V3's mixture without
    # shared experts, dense and routed layers listed per layer (mlp_layer_types)
    Family("mimo_v2_flash", "MiMo-V2-Flash", ("MiMoV2FlashForCausalLM",), _DECODER,
           {**_ATTENTION, "self_attn.sinks": ("head",), **_DEEPSEEK_MOE, **_PRE_NORMS}, _EMBED, "kept",
           keys=_DEEPSEEK_MOE_KEYS, layer_lists=("layer_types", "mlp_layer_types"),
           kind_kv_multiple=("sliding_attention", 2), value_head_dim="v_head_dim"),
    # Laguna: a number of query heads per layer (num_attention_heads_per_layer: a student's scaled as num_heads is,
    # `tailkd.layer_attention`), per-head q/k norms, a softplus output gate per head or per element (g_proj), partial
    # RoPE on its full layers only (a narrower head keeps each kind's own pairs: `layer_attention.layer_fractions`);
    # a sigmoid router (its score-correction bias a frozen parameter) beside a shared expert of its own width
    # (shared_expert_intermediate_size, kept), dense and routed layers listed per layer
    Family("laguna", "Laguna", ("LagunaForCausalLM",), _DECODER,
           {**_ATTENTION, **linear("self_attn.g_proj", "gate", "d"), **_HEAD_QK_NORMS,
            **_EXPERTS, "mlp.gate.e_score_correction_bias": ("expert",), **_DENSE_MLP, **_OWN_SHARED_EXPERTS,
            **_PRE_NORMS}, _EMBED, "kept",
           keys=dict(_MOE_KEYS, intermediate="moe_intermediate_size"),
           layer_lists=("layer_types", "mlp_layer_types"), layer_heads="num_attention_heads_per_layer"),
    # MiniMax (MiniMax-Text-01): lightning (linear) attention layers beside full attention ones (layer_types): a
    # lightning layer's qkv_proj holds [q | k | v] per head (a key and value head per query head: the kept query heads'
    # blocks), its output gate and the RMSNorm over its output follow the kept heads' rows, and its per-head decays are
    # saved buffers, set by the head and the layer's depth (copied: the teacher layer's own); Mixtral's experts
    Family("minimax", "MiniMax", ("MiniMaxForCausalLM",), _DECODER,
           {**_ATTENTION, **linear("self_attn.qkv_proj", "qkv_heads", "d"), **linear("self_attn.out_proj", "d", "o"),
            **linear("self_attn.output_gate", "o", "d"), **norms("self_attn.norm", axis="o"),
            **{f"self_attn.{name}": ("head", "all", "all") for name in ("slope_rate", "query_decay", "key_decay")},
            "self_attn.diagonal_decay": ("all", "head", "all", "all"), **_EXPERTS, **_PRE_NORMS}, _EMBED,
           "follows_hidden", keys=dict(_MOE_KEYS, experts="num_local_experts", intermediate="intermediate_size")),
    # Phi-3.5-MoE: a router named router (sparsemixer: always 2 experts per token), LayerNorms with biases
    Family("phimoe", "Phi-MoE", ("PhimoeForCausalLM",), _DECODER,
           {**_ATTENTION, "mlp.router.weight": ("expert", "d"), **{k: v for k, v in _EXPERTS.items() if "experts" in k},
            **_PRE_NORMS}, _EMBED, "follows_hidden", keys=dict(_MOE_KEYS, experts="num_local_experts",
                                                                 intermediate="intermediate_size"),
           fixed_experts_per_token=2),
    Family("olmoe", "OLMoE", ("OlmoeForCausalLM",), _DECODER,
           {**_ATTENTION, **_EXPERTS, **_PRE_NORMS, **_PROJECTION_QK_NORMS}, _EMBED, "derived",
           keys=dict(_MOE_KEYS, intermediate="intermediate_size")),
    # experts stored [E, in, out] (transposed) with biases; a learned attention sink per query head
    Family("gpt_oss", "GPT-OSS", ("GptOssForCausalLM",), _DECODER,
           {**_ATTENTION, "self_attn.sinks": ("head",), **linear("mlp.router", "expert", "d"),
            "mlp.experts.gate_up_proj": ("expert", "d", "gate_up_pairs"),
            "mlp.experts.gate_up_proj_bias": ("expert", "gate_up_pairs"),
            "mlp.experts.down_proj": ("expert", "ff", "d"), "mlp.experts.down_proj_bias": ("expert", "d"),
            **_PRE_NORMS}, _EMBED, "kept", keys=dict(_MOE_KEYS, intermediate="intermediate_size")),
    Family("qwen3_next", "Qwen3-Next", ("Qwen3NextForCausalLM",), _DECODER,
           {**_GATED_ATTENTION, **_HEAD_QK_NORMS, **_LINEAR_ATTENTION, **_EXPERTS, **_SHARED_EXPERT, **_DENSE_MLP,
            **_PRE_NORMS}, _EMBED, "kept", keys=dict(_MOE_KEYS, intermediate="moe_intermediate_size"),
           sparse_by_index=True),
    Family("qwen3_5", "Qwen3.5", ("Qwen3_5ForCausalLM",), _DECODER,
           {**_GATED_ATTENTION, **_HEAD_QK_NORMS, **_LINEAR_ATTENTION, **_GATED_MLP, **_PRE_NORMS}, _EMBED, "kept"),
    Family("qwen3_5_moe", "Qwen3.5-MoE", ("Qwen3_5MoeForCausalLM",), _DECODER,
           {**_GATED_ATTENTION, **_HEAD_QK_NORMS, **_LINEAR_ATTENTION, **_EXPERTS, **_SHARED_EXPERT, **_PRE_NORMS},
           _EMBED, "kept", keys=dict(_MOE_KEYS, intermediate="moe_intermediate_size")),
    # Lara-Mini (Lara-4-Mini): Qwen3.5's Gated DeltaNet layers beside sliding and full attention ones (Qwen3's: per-head
    # q/k norms, no output gate; layer_types), a mixture in every layer with a shared expert of its own width (kept)
    Family("lara_mini", "Lara-Mini", ("LaraMiniForCausalLM",), _DECODER,
           {**_ATTENTION, **_HEAD_QK_NORMS, **_LINEAR_ATTENTION, **_EXPERTS, **_SHARED_EXPERT, **_PRE_NORMS}, _EMBED,
           "kept", keys=dict(_MOE_KEYS, intermediate="moe_intermediate_size")),
    # GLM, GLM-4: interleaved partial RoPE, fused [gate | up], q/k/v biases; GLM-4 adds post-sublayer norms
    Family("glm", "GLM", ("GlmForCausalLM",), _DECODER,
           {**_ATTENTION, **_FUSED_MLP, **_PRE_NORMS}, _EMBED, "kept", rope="interleaved"),
    Family("glm4", "GLM-4", ("Glm4ForCausalLM",), _DECODER,
           {**_ATTENTION, **_FUSED_MLP, **_PRE_NORMS, **norms("post_self_attn_layernorm", "post_mlp_layernorm")},
           _EMBED, "kept", rope="interleaved"),
    # Cohere2 (Command R7B / A): parallel attention and MLP after one LayerNorm, interleaved RoPE (on its sliding
    # layers only); its logit_scale is the head's (tailkd.head)
    Family("cohere2", "Cohere2", ("Cohere2ForCausalLM",), _DECODER, _PARALLEL_COHERE, _EMBED, "follows_hidden",
           rope="interleaved"),
    # Cohere (Command R, Aya 23, Aya Expanse): Cohere2's layout with interleaved RoPE everywhere and optional q/k
    # LayerNorms of one [heads, head_dim] weight each (use_qk_norm)
    Family("cohere", "Cohere", ("CohereForCausalLM",), _DECODER,
           {**_PARALLEL_COHERE, "self_attn.q_norm.weight": ("head", "head_qk"),
            "self_attn.k_norm.weight": ("kv_head", "head_qk")}, _EMBED, "follows_hidden", rope="interleaved"),
    # Cohere2-MoE: Cohere2's parallel attention and MLP after one LayerNorm; routed experts (intermediate_size wide)
    # with optional shared experts (num_shared_experts widths), dense MLPs of their own width (prefix dense layers,
    # listed per layer in mlp_layer_types)
    Family("cohere2_moe", "Cohere2-MoE", ("Cohere2MoeForCausalLM",), _DECODER,
           {**_ATTENTION, **norms("input_layernorm"), **_EXPERTS, **_DENSE_MLP, **_SHARED_EXPERTS}, _EMBED,
           "follows_hidden", rope="interleaved",
           keys=dict(_MOE_KEYS, intermediate="intermediate_size", shared_experts="num_shared_experts"),
           layer_lists=("layer_types", "mlp_layer_types")),
    # EXAONE 4: OLMo-2-style post-norms, per-head q/k norms (RoPE on its sliding layers only)
    Family("exaone4", "EXAONE 4", ("Exaone4ForCausalLM",), _DECODER,
           {**_ATTENTION, **_GATED_MLP, **_HEAD_QK_NORMS, **norms("post_attention_layernorm",
                                                                  "post_feedforward_layernorm")},
           _EMBED, "derived"),
    # Kolibri-1: EXAONE 4's attention (per-head q/k norms, RoPE on its sliding layers only) in GLM-4's sandwich of
    # norms; in every layer a router whose score-correction bias (a buffer) sits on it, beside a shared expert of its
    # own width (shared_expert_intermediate_size, kept)
    Family("kolibri1", "Kolibri-1", ("Kolibri1ForCausalLM",), _DECODER,
           {**_ATTENTION, **_HEAD_QK_NORMS, **_EXPERTS, "mlp.gate.e_score_correction_bias": ("expert",),
            **_OWN_SHARED_EXPERTS, **_PRE_NORMS, **norms("post_self_attn_layernorm", "post_mlp_layernorm")}, _EMBED,
           "kept", keys=dict(_MOE_KEYS, intermediate="moe_intermediate_size"), layer_lists=("layer_types",)),
    # Kolibri 1.1: Kolibri-1's layers with indexed attention (NoPE, keys selected by indexers without weights, from
    # the leading query heads of KV head 0) beside sliding layers; its layers may read another's keys and values
    # (kv_source_layers: no k/v projections), its reindexers rescore the closest preceding indexer's pool
    # (index_layers), its first layers are dense MLPs of their own width (mlp_only_layers, mlp_only_intermediate_size:
    # kept)
    Family("kolibri1_1", "Kolibri 1.1", ("Kolibri1_1ForCausalLM",), _DECODER,
           {**_ATTENTION, **_HEAD_QK_NORMS, **_EXPERTS, "mlp.gate.e_score_correction_bias": ("expert",),
            **_OWN_SHARED_EXPERTS, **_DENSE_MLP, **_PRE_NORMS, **norms("post_self_attn_layernorm",
                                                                        "post_mlp_layernorm")}, _EMBED,
           "kept", keys=dict(_MOE_KEYS, intermediate="moe_intermediate_size"), layer_lists=("layer_types",),
           layer_index_lists=("index_layers", "mlp_only_layers"), kv_sources="kv_source_layers",
           reindexes=("index_layers", "indexed_attention", "key pool")),
    # Apertus: an ungated MLP with xIELU's two learned scalars, per-head q/k norms; Apertus 1.5's text model is its
    # layout under an LM head pruned to the vocabulary's first output_vocab_size ids (kept: `tailkd.vocab.head_ids`)
    Family("apertus", "Apertus", ("ApertusForCausalLM", "Apertus1p5TextForCausalLM"), _DECODER,
           {**_ATTENTION, **_HEAD_QK_NORMS, **linear("mlp.up_proj", "ff", "d"), **linear("mlp.down_proj", "d", "ff"),
            **{f"mlp.act_fn.{name}": ("all",) for name in ("alpha_p", "alpha_n", "beta", "eps")},
            **norms("attention_layernorm", "feedforward_layernorm")}, _EMBED, "derived"),
    # SmolLM3: Llama's layout; no_rope_layers (1 = RoPE, 0 = none) is per layer and follows the chosen layers
    Family("smollm3", "SmolLM3", ("SmolLM3ForCausalLM",), _DECODER, {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS},
           _EMBED, "follows_hidden", layer_lists=("layer_types", "no_rope_layers")),
    # Llama 4 (text): routed experts stored in before out ([E, d, gate | up], [E, units, d]) under a sigmoid top-k
    # router, beside a shared expert as wide as each of them; dense MLPs of their own width (intermediate_size_mlp,
    # kept) in the layers moe_layers does not list; NoPE layers (no_rope_layers) beside RoPE layers on interleaved pairs
    # with chunked attention (layer_types); weightless q/k norms
    Family("llama4", "Llama 4", ("Llama4ForCausalLM",), _DECODER,
           {**_ATTENTION, **_PRE_NORMS, "feed_forward.router.weight": ("expert", "d"),
            "feed_forward.experts.gate_up_proj": ("expert", "d", "gate_up"),
            "feed_forward.experts.down_proj": ("expert", "ff", "d"),
            **linear("feed_forward.shared_expert.gate_proj", "ff", "d"),
            **linear("feed_forward.shared_expert.up_proj", "ff", "d"),
            **linear("feed_forward.shared_expert.down_proj", "d", "ff"), **linear("feed_forward.gate_proj", "all", "d"),
            **linear("feed_forward.up_proj", "all", "d"), **linear("feed_forward.down_proj", "d", "all")},
           _EMBED, "follows_hidden", rope="interleaved",
           keys=dict(_MOE_KEYS, experts="num_local_experts", intermediate="intermediate_size"),
           layer_lists=("layer_types", "no_rope_layers"), layer_index_lists=("moe_layers",),
           mlp_prefix="feed_forward.", router="feed_forward.router"),
    # LFM2: short-convolution layers (depthwise over the residual channels: they narrow with hidden_size) beside
    # attention layers (layer_types / full_attn_idxs), per-head q/k norms, an MLP whose width the model rounds
    Family("lfm2", "LFM2", ("Lfm2ForCausalLM",), _LFM2_GLOBAL,
           {**_LFM2_MIXERS, **linear("feed_forward.w1", "ff_model", "d"), **linear("feed_forward.w3", "ff_model", "d"),
            **linear("feed_forward.w2", "d", "ff_model")},
           _EMBED, "follows_hidden", layer_index_lists=("full_attn_idxs",), mlp_prefix="feed_forward."),
    # LFM3: LFM2's short convolutions beside sliding and full attention layers (layer_types; Qwen3's attention with
    # per-head q/k norms and a sigmoid output gate per head, g_proj), a gated MLP of intermediate_size, sandwich norms
    Family("lfm3", "LFM3", ("Lfm3ForCausalLM",), _LFM2_GLOBAL,
           {**_ATTENTION, **_HEAD_QK_NORMS, **linear("self_attn.g_proj", "head", "d"), **_SHORT_CONV,
            **linear("feed_forward.w1", "ff", "d"), **linear("feed_forward.w3", "ff", "d"),
            **linear("feed_forward.w2", "d", "ff"),
            **norms("operator_norm", "ffn_norm", "post_operator_norm", "post_ffn_norm")},
           _EMBED, "kept", mlp_prefix="feed_forward."),
    # LFM2-MoE: routed experts (sigmoid router, a score bias per expert: a saved buffer) below a dense prefix
    # (num_dense_layers) of the teacher's width
    Family("lfm2_moe", "LFM2-MoE", ("Lfm2MoeForCausalLM",), _LFM2_GLOBAL,
           {**_LFM2_MIXERS, "feed_forward.gate.weight": ("expert", "d"), "feed_forward.expert_bias": ("expert",),
            "feed_forward.experts.gate_up_proj": ("expert", "gate_up", "d"),
            "feed_forward.experts.down_proj": ("expert", "d", "ff"), **linear("feed_forward.w1", "all", "d"),
            **linear("feed_forward.w3", "all", "d"), **linear("feed_forward.w2", "d", "all")},
           _EMBED, "follows_hidden", keys=dict(_MOE_KEYS, intermediate="moe_intermediate_size"),
           layer_thresholds=("num_dense_layers",), mlp_prefix="feed_forward."),
    # Falcon-H1: attention and a Mamba-2 mixer side by side in every layer, muP multipliers (the teacher's; its
    # mup_vector follows the student's mixer sizes: computed from the config); the mixer's heads narrow (mamba_d_ssm
    # with them where set, else mamba_expand x hidden_size wide), its state and groups kept
    Family("falcon_h1", "Falcon-H1", ("FalconH1ForCausalLM",), _MAMBA_HYBRID_DECODER, _MAMBA_HYBRID_LAYER, _EMBED,
           "follows_hidden", mlp_prefix="feed_forward.", ssm=_HYBRID_SSM),
    # Bamba: Falcon-H1's tensors, but one mixer per layer (attention where attn_layer_indices lists it, Mamba-2
    # elsewhere, mamba_expand x hidden_size wide)
    Family("bamba", "Bamba", ("BambaForCausalLM",), _MAMBA_HYBRID_DECODER, _MAMBA_HYBRID_LAYER, _EMBED,
           "follows_hidden", layer_index_lists=("attn_layer_indices",), mlp_prefix="feed_forward.", ssm=_HYBRID_SSM),
    # Mamba, Falcon-Mamba: attention-free, a Mamba-1 mixer per layer over intermediate_size channels (expand x
    # hidden_size unless the config says; each channel its own state space: in_proj's [x | z] halves, the
    # convolution, dt_proj, A_log and D by channel, x_proj reads them all), narrowed as an MLP's units are; no
    # MLP: mlp_init draws none
    Family("mamba", "Mamba", ("MambaForCausalLM", "FalconMambaForCausalLM"),
           {"backbone.embeddings.weight": ("all", "d"), **linear("lm_head", "all", "d"), **norms("backbone.norm_f")},
           {**linear("mixer.in_proj", "gate_up", "d"), **linear("mixer.out_proj", "d", "ff"),
            **linear("mixer.x_proj", "all", "ff"), **linear("mixer.dt_proj", "ff", "all"),
            "mixer.conv1d.weight": ("ff", "all", "all"), "mixer.conv1d.bias": ("ff",), "mixer.A_log": ("ff", "all"),
            "mixer.D": ("ff",), **norms("norm")},
           ("backbone.embeddings.weight",), "derived", layer_prefix="backbone.layers.", rope=False,
           keys=dict(layers="num_hidden_layers", hidden="hidden_size", heads=None, kv_heads=None,
                     intermediate="intermediate_size", experts=None, experts_per_token=None),
           layer_lists=(), mlp_prefix=()),
    # Mamba-2: attention-free, a Mamba-2 mixer per layer, expand x hidden_size wide (its heads narrow, its groups and
    # state kept, as the hybrids' Mamba-2 mixers; head_dim is theirs)
    Family("mamba2", "Mamba-2", ("Mamba2ForCausalLM",),
           {"backbone.embeddings.weight": ("all", "d"), **linear("lm_head", "all", "d"), **norms("backbone.norm_f")},
           {**{"mixer." + k.removeprefix("mamba."): v for k, v in _MAMBA2.items()}, **norms("norm")},
           ("backbone.embeddings.weight",), "derived", layer_prefix="backbone.layers.", rope=False,
           keys=dict(layers="num_hidden_layers", hidden="hidden_size", heads=None, kv_heads=None, intermediate=None,
                     experts=None, experts_per_token=None),
           layer_lists=(), reads_head_dim=False, mlp_prefix=(),
           ssm=dict(heads="num_heads", head_dim="head_dim", groups="n_groups", expand="expand")),
    # Jamba: Mamba-1 mixers (mamba_expand x hidden_size channels, narrowed as heads of one: ssm_heads; their dt, B and
    # C norms and dt_rank kept) beside Llama's
    # attention, where layer i % attn_layer_period == attn_layer_offset; routed experts in place of the gated MLP where
    # i % expert_layer_period == expert_layer_offset (the experts as wide as the MLP: intermediate_size). Its config
    # gives a student's layer j its kinds by the same periods: a student keeps whole periods (layer_periods), listed
    # layers whose kinds differ are refused
    Family("jamba", "Jamba", ("JambaForCausalLM",), _MAMBA_HYBRID_DECODER,
           {**_ATTENTION, **linear("mamba.in_proj", "ssm_xz", "d"), **linear("mamba.out_proj", "d", "ssm_channels"),
            **linear("mamba.x_proj", "all", "ssm_channels"), **linear("mamba.dt_proj", "ssm_channels", "all"),
            "mamba.conv1d.weight": ("ssm_channels", "all", "all"), "mamba.conv1d.bias": ("ssm_channels",),
            "mamba.A_log": ("ssm_channels", "all"), "mamba.D": ("ssm_channels",),
            **norms("mamba.dt_layernorm", "mamba.b_layernorm", "mamba.c_layernorm", axis="all"),
            **linear("feed_forward.gate_proj", "ff", "d"), **linear("feed_forward.up_proj", "ff", "d"),
            **linear("feed_forward.down_proj", "d", "ff"), "feed_forward.router.weight": ("expert", "d"),
            "feed_forward.experts.gate_up_proj": ("expert", "gate_up", "d"),
            "feed_forward.experts.down_proj": ("expert", "d", "ff"), **norms("input_layernorm", "pre_ff_layernorm")},
           _EMBED, "follows_hidden", keys=dict(_MOE_KEYS, intermediate="intermediate_size"), layer_lists=(),
           mlp_prefix="feed_forward.", ssm=dict(expand="mamba_expand"),
           layer_periods=("attn_layer_period", "expert_layer_period")),
    # Granite 4.0-H: Mamba-2 layers (mamba_expand x hidden_size wide) beside attention layers
    # (layer_types), routed experts (block_sparse_moe) plus an always-on shared MLP (shared_mlp: [gate | up], kept at
    # the teacher's width beside experts; the MLP itself, narrowed, in the dense variants without experts)
    Family("granitemoehybrid", "Granite 4.0-H", ("GraniteMoeHybridForCausalLM",), _DECODER,
           {**_ATTENTION, **_MAMBA2, **_PRE_NORMS, **_GRANITE_MOE}, _EMBED, "follows_hidden", keys=_GRANITE_MOE_KEYS,
           attention_scales=("attention_multiplier",), mlp_prefix=("block_sparse_moe.", "shared_mlp."), ssm=_HYBRID_SSM,
           without_experts=dict(
               keys=dict(experts=None, experts_per_token=None, intermediate="shared_intermediate_size"),
               layer_params={**linear("shared_mlp.input_linear", "gate_up", "d"),
                             **linear("shared_mlp.output_linear", "d", "ff")})),
    # Nemotron-H: every layer one mixer (layers_block_type: Mamba-2 of its own width, attention without RoPE, a relu²
    # MLP, or DeepSeek-V3-style routed relu² experts with a shared one); the dense models (no "moe" layer) narrow the
    # MLP
    Family("nemotron_h", "Nemotron-H", ("NemotronHForCausalLM",),
           {"model.embeddings.weight": ("all", "d"), **linear("lm_head", "all", "d"), **norms("model.norm_f")},
           {**{"mixer." + k.removeprefix("mamba."): v for k, v in _MAMBA2.items()},
            **linear("mixer.q_proj", "q", "d"), **linear("mixer.k_proj", "k", "d"), **linear("mixer.v_proj", "v", "d"),
            **linear("mixer.o_proj", "d", "o"), **linear("mixer.up_proj", "all", "d"),
            **linear("mixer.down_proj", "d", "all"), "mixer.gate.weight": ("expert", "d"),
            "mixer.gate.e_score_correction_bias": ("expert",), "mixer.experts.up_proj": ("expert", "ff", "d"),
            "mixer.experts.down_proj": ("expert", "d", "ff"), **linear("mixer.shared_experts.up_proj", "all", "d"),
            **linear("mixer.shared_experts.down_proj", "d", "all"), **norms("norm")},
           ("model.embeddings.weight",), "kept", layer_lists=("layers_block_type",),
           keys=dict(_DEEPSEEK_MOE_KEYS, shared_experts=None),
           mlp_prefix=("mixer.up_proj", "mixer.down_proj", "mixer.gate.", "mixer.experts.", "mixer.shared_experts."),
           expert_layer_kind="moe", ssm=dict(heads="mamba_num_heads", head_dim="mamba_head_dim", groups="n_groups"),
           refused_settings=(("moe_latent_size", "its experts work in a latent space of their own"),),
           without_experts=dict(keys=dict(experts=None, experts_per_token=None, intermediate="intermediate_size"),
                                layer_params={**linear("mixer.up_proj", "ff", "d"),
                                              **linear("mixer.down_proj", "d", "ff")})),
    Family("olmo2", "OLMo-2/3", ("Olmo2ForCausalLM", "Olmo3ForCausalLM"), _DECODER,
           {**_ATTENTION, **_GATED_MLP, **norms("post_attention_layernorm", "post_feedforward_layernorm"),
            **_PROJECTION_QK_NORMS}, _EMBED, "derived"),
    # OLMo-Hybrid: OLMo-3's attention layers (post-norms, q/k norms over the whole projection) beside Gated DeltaNet
    # layers (layer_types) of their own sizes (linear_num_key_heads x linear_key_head_dim, ...: only the residual side
    # narrows) under pre-norms
    Family("olmo_hybrid", "OLMo-Hybrid", ("OlmoHybridForCausalLM",), _DECODER,
           {**_ATTENTION, **_GATED_MLP, **norms("input_layernorm", "post_attention_layernorm",
                                                "post_feedforward_layernorm"), **_PROJECTION_QK_NORMS,
            **{k: v for p in "qkvabg" for k, v in linear(f"linear_attn.{p}_proj", "all", "d").items()},
            **linear("linear_attn.o_proj", "d", "all"), "linear_attn.conv1d.weight": ("all", "all", "all"),
            "linear_attn.A_log": ("all",), "linear_attn.dt_bias": ("all",), **norms("linear_attn.o_norm", axis="all")},
           _EMBED, "derived", every_kind="layer_types"),
)}

SUPPORTED = tuple(name for family in FAMILIES.values() for name in family.classes)
_BY_CLASS = {name: family for family in FAMILIES.values() for name in family.classes}


def family_for_class(class_name: str) -> Family | None:
    """The family of a model class name, None when unsupported."""
    return _BY_CLASS.get(class_name)


def setting(config, key: str, default=None):
    """The config's ``key``; "a.b": key b of its sub-config (or dict) a (DBRX's attn_config.kv_n_heads). A key some
    layers override (transformers 5's per_layer_config: Gemma 4's head_dim) reads the config's own value, that of the
    layers without an override (transformers refuses it as one value for every layer)."""
    for part in key.split("."):
        if isinstance(config, dict):
            config = config.get(part, default)
        elif part in (getattr(config, "per_layer_attributes", None) or ()):
            config = config.to_dict().get(part, default)
        else:
            config = getattr(config, part, default)
    return config
