"""Build a student from its teacher, DistilBERT-style (TAD paper §3.2, §3.2.2).

The student is a regular Hugging Face model of the teacher's class (`from_config`), so it saves and
loads like any other. What is copied, and how:

Layers   `layers` (teacher indices, increasing) or `num_layers` evenly spaced with the first and the last included:
         ``layers[j] = floor(j * (L - 1) / (n - 1) + 1/2)`` (rounded linspace; n = 1 → [0]), or with
         ``layer_choice="influence"`` the n of largest Block Influence over calibration rows (`tailkd.calibration`).
         Per-layer config lists follow the chosen layers (``layer_types``: sliding vs full attention, which also picks
         Gemma3's local/global RoPE), and "from layer N on" thresholds are renumbered
         (``max_window_layers`` becomes the number of chosen layers below it). A teacher whose layers compute with their
         own index (GPT-2's ``scale_attn_by_inverse_layer_idx``: layer i's attention scores / (i + 1), which a config
         cannot set per layer) gives a student of its first n layers only: other choices are refused.
Widths   Student `hidden_size`, `num_heads`, `num_kv_heads`, `intermediate_size` (`head_dim`: see Heads; `ssm_heads`:
         see Hybrids) default to the teacher's and may only shrink (num_kv_heads of an MHA teacher, one KV head per
         query head as in Phi-2, defaults to num_heads). Residual-stream tensors keep their first `hidden_size`
         columns/entries (embeddings, norms, every projection's residual side), or with ``hidden_channels="active"``
         the `hidden_size` channels of largest activity at the teacher's norms over calibration rows
         (`tailkd.calibration`), the same channels in every tensor.
Heads    head_dim, per family: Llama/Qwen2/Mistral the teacher's while the hidden size is unchanged, else hidden_size //
         num_heads; GPT-2, GPT-BigCode, GPT-Neo, GPT-J, CodeGen, OPT, GPT-NeoX, Bloom, MPT, Falcon, Persimmon, nanochat,
         FlexOlmo, Phi, Phi-3, OLMo-2, BitNet, DBRX (no head_dim in their configs) always hidden_size // num_heads;
         Gemma, Gemma2, Gemma3, Qwen3 (head_dim decoupled from hidden_size/heads by design) the teacher's. A Phi, Phi-3,
         OLMo-2, nanochat or FlexOlmo config that does carry a head_dim (their models read it first) is treated like
         Llama's, and the student's config carries the student's head_dim. An explicit `head_dim` overrides the first
         and last group. Never more than the teacher's. hidden_size must be a multiple of num_heads where head_dim is
         hidden_size // num_heads, and where the installed transformers' config class of the teacher requires it (Llama,
         Gemma2, Gemma3 in transformers 5). Each student head is a teacher head truncated to head_dim:
           - KV heads: the teacher's first `num_kv_heads`.
           - Query heads: grouped so that every query head keeps the KV head it was trained with: for
             KV head k the teacher's query heads k*g_t + m, m < g_s (g = heads per KV head). With
             unchanged grouping (g_s == g_t) these are simply the first `num_heads` heads.
           - With ``attention_heads="active"``, per layer in place of both: of each teacher KV head its g_s query
             heads of largest importance over calibration rows, and the `num_kv_heads` KV heads whose kept query
             heads sum to the most (`tailkd.calibrated.kept_heads`), each query head still on its own KV head.
           - Rows kept inside a head: v (and o_proj's matching columns) the first head_dim rows. q and
             k use rotate-half RoPE over their first r = int(head_dim * partial_rotary_factor) rows (all of
             them but in Phi/Phi-3 configs with a partial factor), which pairs row i with row i + r/2; we
             keep whole pairs, teacher pair floor(j * r_t/r_s + 1/2) for student pair j, which is the
             teacher pair rotating at exactly the student's frequency when r_t/r_s is an integer
             (a plain "first rows" cut would split every pair and re-time every frequency), then the first
             head_dim - r_s of the teacher's non-rotated rows. A RoPE scaling (rope_type) is the teacher's
             setting, computed by transformers over the student's r_s: YaRN's interpolation ramp is bounded
             at indices it rounds over r_s/2 pairs (the same wavelengths up to that rounding), dynamic NTK
             raises its base to r_s/(r_s - 2), so a dynamic teacher needs r_s >= 4 (r_s = 2 is refused).
             GPT-2, GPT-BigCode, GPT-Neo and OPT (absolute positions) and Bloom, MPT and Falcon-RW (ALiBi) keep the
             first head_dim rows of q, k and v.
           - Fused projections are cut per block: Phi-3 qkv_proj / GPT-2 c_attn / GPT-BigCode's multi-query c_attn (one
             KV head, kept) keep the q, k and v rows above in their own blocks, GPT-NeoX's, Bloom's and Persimmon's
             query_key_value and GPT-BigCode's c_attn without multi_query ([q | k | v] per head) in each kept head's
             block, Falcon's query_key_value by its config's layout (Falcon-7B's multi-query [q | k | v], Falcon-RW's
             blocks per head, with num_kv_heads following num_heads; under new_decoder_architecture, Falcon-40B's, per
             kept KV head its kept query heads' rows, then its k and v rows), CodeGen's qkv_proj (4 blocks of
             [q | v | k] over a quarter of the heads each) in each block as many heads — its first, or its most
             important —, Phi-3 gate_up_proj the first units of each half.
           - q/k norms follow the q/k rows: per-head norms (Qwen3, Gemma3, Phi qk_layernorm, Persimmon, HunYuan's
             after RoPE) keep the rows kept inside a head, OLMo-2's, FlexOlmo's and MiniMax-M2's norms over the whole
             projection keep exactly q_proj's/k_proj's rows; StableLM's qk_layernorm, one LayerNorm module per query
             (KV) head, gives student head j the module of its kept teacher head (`Family.head_module_lists`).
MLP      "random" (the paper): the student config's own initialisation, seeded by `seed`. "copy": the
         first `intermediate_size` units (gate/up rows, down columns), input side truncated to hidden, or with
         ``mlp_units="active"`` per layer the most active over calibration rows (`tailkd.calibration`).
Experts  A mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS, Phi-MoE, Granite-MoE(-SWA), ERNIE 4.5 MoE,
         HunYuan-MoE, Cohere2-MoE, Mellum, FlexOlmo, MiniMax-M2, Hy3, AFMoE, Kolibri-1, Kolibri 1.1, Flint, GLM-4.5,
         dots.llm1, Solar Open, EXAONE-MoE, DeepSeek-V2/V3/V3.2, GLM-5, A.X K1, GLM-4.7-Flash, Kimi Linear,
         MiniCPM5-MoE, MiMo-V2-Flash, Laguna, Llama 4, DBRX, Jamba, MiniMax, Gemma 4) keeps the teacher's first
         `num_experts` routed experts (all by default; at least its `num_experts_per_tok`, the teacher's by default)
         and, with "copy", their router rows;
         with "copy" and ``experts="used"`` it keeps per layer the experts the teacher routes the most tokens of
         calibration rows to (`tailkd.calibration`); `intermediate_size` is each routed expert's width (the config's
         intermediate_size or moe_intermediate_size, whichever the family's experts have; its first units, or with
         ``mlp_units="active"`` each kept expert's own most active ones, over the tokens routed to it — experts stored
         as [E, gate | up, d], not GPT-OSS's interleaved gate/up pairs, which are kept as pairs of the first units, nor
         Llama 4's in-before-out [E, d, gate | up] or DBRX's flattened [E x units, d] w1, v1, w2, which keep their first
         units; DBRX's sizes are in its attn_config and ffn_config). GPT-OSS's and Granite-SWA's attention sinks follow
         the kept query heads. Qwen-MoE's whole-width MLPs — its dense layers' and Qwen2-MoE's shared expert — keep the
         teacher's width. Whether a Qwen-MoE layer routes or is dense depends on its index (``decoder_sparse_step``,
         ``mlp_only_layers``): the student's layer j has teacher layer layers[j]'s kind, its dense layers listed in
         ``mlp_only_layers`` where the teacher's settings would give other ones. The router load-balancing loss is on
         where the student's config (the teacher's settings) sets ``output_router_logits`` (`tailkd.objective`). ERNIE
         4.5 MoE routes the layers from moe_layer_start_index to moe_layer_end_index, every moe_layer_interval-th: start
         and end are renumbered to the chosen layers, the interval kept. Every student layer must have its teacher
         layer's modules: a choice of layers whose kinds the student's config cannot give (off ERNIE's interval, say) is
         refused in one line. Phi-MoE's router (sparsemixer) sends every token to 2 experts whatever its config says:
         num_experts is at least 2 and num_experts_per_tok is refused. GLM-4.5, dots.llm1, Solar Open, EXAONE-MoE,
         DeepSeek-V2/V3 and GLM-4.7-Flash (DeepSeek's routing): dense MLPs (the teacher's width) below
         ``first_k_dense_replace``, renumbered as other thresholds (GLM-4.7-Flash, EXAONE-MoE: per layer,
         ``mlp_layer_types``, subset as layer_types); the router's score-correction bias (a saved buffer) follows the
         kept experts; under group-limited routing (``n_group`` groups, each scored by its top 2 experts — DeepSeek-V2's
         by its best one, where its topk_method is group_limited_greedy —, ``topk_group`` picked per token) the student
         keeps the first num_experts/n_group experts of each group (or, by use, the most used of each group), so
         num_experts is a multiple of n_group with at least 2 (V2: 1) per group and num_experts_per_tok fits in
         topk_group groups; the shared experts (one MLP of n_shared_experts routed widths) keep their first
         n_shared_experts x intermediate_size units. MiniMax-M2's and Hy3's score-correction bias (on the MoE block)
         likewise follows the kept experts. HunYuan-MoE's always-on shared MLP is as wide as its experts and narrows
         with them; where its config lists moe_topk per layer (Hunyuan-A13B's), the student's lists the kept layers'
         (num_experts at least their largest; `num_experts_per_tok` sets every layer's). Llama 4 (text)
         routes with a sigmoid top-k router whose experts take every token pre-scaled by its score (with experts "used"
         the counts are read at the router); its shared expert is as wide as each routed one and narrows with them, its
         dense layers' MLPs (``intermediate_size_mlp``, in the layers ``moe_layers`` does not list: renumbered to the
         chosen layers) keep the teacher's width, its ``no_rope_layers`` follow the chosen layers as ``layer_types``
         (chunked attention on its RoPE layers) do.
Latent   Multi-head latent attention (DeepSeek-V2/V3/V3.2, GLM-5, A.X K1, GLM-4.7-Flash, Youtu-LLM, MiniCPM3; Kimi
         Linear's, see Hybrids): one key/value head per query head, so num_heads narrows whole heads (the first ones:
         their rows of q_proj / q_b_proj, of kv_b_proj, which expands the shared latent into each head's [key | value],
         and o_proj's columns); the head sizes (qk_nope_head_dim, qk_rope_head_dim, v_head_dim) and the low ranks
         (q_lora_rank, kv_lora_rank) are the teacher's, so num_kv_heads and head_dim are refused; the latent projections
         narrow on the residual side. DeepSeek-V3.2's and GLM-5's DSA indexer (its own index_n_heads x index_head_dim,
         picking the index_topk keys each query attends to; transformers computes it without gradients, so a student's
         keeps the copied weights) narrows on the residual side only. GLM-5's "shared" layers (``indexer_types``) reuse
         the last earlier full layer's top-k (a student's its last earlier chosen one's; refused as its first layer).
         Kolibri 1.1's indexed-attention layers (NoPE; weightless indexers pick keys with the leading query heads of KV
         head 0) keep their kind: a layer reading another's keys and values (``kv_source_layers``) keeps it — spaced,
         in place of the kept layer nearest to it (`tailkd.layer_choice.student_layers`), by influence with it; listed
         layers without it are refused — and its KV heads under attention_heads "active"; a reindexer (an indexed layer
         ``index_layers`` does not list) rescores the pool of the student's last earlier indexer (refused as its first
         indexed layer); its dense layers (``mlp_only_layers``) keep their width.
Hybrids  Qwen3-Next, Qwen3.5, Qwen3.5-MoE, Lara-Mini, OLMo-Hybrid: the chosen layers keep their kind (``layer_types``:
         gated full attention, Lara-Mini's and OLMo-Hybrid's ungated, or Gated DeltaNet linear attention). The
         full-attention layers narrow like Qwen3's (their q_proj holds [query | gate] per head: the query's kept rows,
         then the gate's first head_dim rows, which scale the head's output as v's rows); the linear-attention layers
         keep their own sizes (``linear_num_key_heads``, ...) and narrow on the residual side only (input projections'
         columns, out_proj's). OLMo-Hybrid's config needs a layer of each kind: spaced layers missing one take the
         nearest layer of that kind in place of a kept one, influence keeps each kind's most influential layer, listed
         layers lacking a kind are refused in one line (`tailkd.layer_choice.required_kinds`).
         Kimi Linear: Kimi Delta Attention layers beside latent attention layers without RoPE (``layer_types``); the
         delta layers keep their own sizes (``linear_num_heads`` x ``linear_head_dim``) and narrow on the residual
         side; the latent layers' heads narrow as latent attention's (both kinds name q_proj and o_proj alike: cut by
         whole heads, every one in a delta layer, `Family.kind_heads`); DeepSeek-V3's mixture, dense or routed per
         layer (``mlp_layer_types``).
         LFM2 and LFM2-MoE: short-convolution layers beside attention layers (``layer_types``, ``full_attn_idxs``,
         both following the chosen layers); the convolution is depthwise over the residual channels, so it narrows
         with hidden_size channel by channel (in_proj's B, C and x blocks, the kernels, out_proj); the MLP
         (``feed_forward``, which mlp_init draws) keeps the first units of the width LFM2's model makes of
         intermediate_size (rounded to block_multiple_of); LFM2-MoE's dense prefix (``num_dense_layers``) is
         renumbered as other thresholds and its per-expert score bias (a saved buffer) follows the kept experts.
         LFM3: LFM2's convolutions beside sliding and full attention layers (``layer_types``); Qwen3's attention
         (head_dim kept by default) with a sigmoid output gate per query head (g_proj: the kept heads' rows); its full
         layers' proportional RoPE pairs rows rotate-half over the whole head at frequencies base^(-2i / head_dim),
         those past partial_rotary_factor at 0, so a student head keeps the whole head's pairs
         (`tailkd.sizing.rotary_fraction`) under both of its RoPE kinds; its MLP is intermediate_size wide.
         Mamba-2 mixers (Falcon-H1, Bamba, Granite 4.0-H, Nemotron-H, Mamba-2): their state and groups are kept,
         `ssm_heads` keeps each group's first heads, or with ``ssm_head_choice="active"`` its most important
         (`tailkd.calibration`): z's, x's and dt's rows of in_proj, x's convolution channels, dt_bias, A_log, D, the
         gated norm and out_proj over their channels, B and C whole; the width is its heads x head_dim, set where the
         config sets it (``mamba_d_ssm``), else as a whole mamba_expand x hidden_size.
         Falcon-H1: attention and a Mamba-2 mixer side by side in every layer; its muP multipliers are the teacher's.
         Bamba: Falcon-H1's tensors, one mixer per layer (attention where ``attn_layer_indices`` lists it, a list
         that follows the chosen layers).
         MiniMax (MiniMax-Text-01): lightning attention layers beside full attention ones (``layer_types``); a
         lightning layer's qkv_proj holds [q | k | v] per head, cut as GPT-NeoX's (the kept query heads' blocks, each
         with its own key and value), its output gate and the RMSNorm over its output follow the kept heads' rows, and
         its per-head decays (saved buffers, set by the head and the layer's depth) are the teacher layer's own; its
         layers normalize the residual stream itself (post-norm); Mixtral's experts.
         Jamba: Mamba-1 mixers beside Llama's attention, and routed experts in place of the MLP, in the layers its
         config's periods and offsets give (attn_layer_period, expert_layer_period): the student's config keeps them,
         so its layer j must be a teacher layer of j's kinds; `num_layers` keeps whole periods (their lcm; a multiple
         of it, evenly spaced, or with ``layer_choice="influence"`` those of largest summed Block Influence), listed
         `layers` are checked layer by layer (refused in one line where a kind differs); its mixers, mamba_expand x
         hidden_size channels (heads of one), keep the first `ssm_heads` channels (all by default), or with
         ``ssm_head_choice="active"`` the most active ones (mean |out_proj input|): x's and z's rows of in_proj, the
         convolution, x_proj's columns, dt_proj's rows, A_log, D, out_proj's columns; dt_rank, the state and the dt,
         B and C norms kept; a whole mamba_expand over the student's hidden_size; the experts are as wide as the MLP
         (intermediate_size).
         Granite 4.0-H: Mamba-2 layers beside attention layers (``layer_types``); its routed experts
         (``block_sparse_moe``) narrow as other mixtures', its shared MLP keeps the teacher's width beside them and is
         the MLP, narrowed by intermediate_size (shared_intermediate_size), in the variants without experts;
         attention_multiplier follows head_dim as Granite's.
         Nemotron-H: one mixer per layer (``layers_block_type``: Mamba-2 of its own width; attention; a relu² MLP;
         DeepSeek-V3-style routed relu² experts with a shared one of its own width); a model without "moe" layers
         has no experts whatever n_routed_experts says and narrows its MLP by intermediate_size; experts in a latent
         space of their own (moe_latent_size) are refused.
         Gemma 4 (text: Gemma4ForCausalLM): its full attention layers' heads have their own size (global_head_dim;
         with attention_k_eq_v their own KV heads, keys as values: ``per_layer_config``), scaled for the chosen
         layers as head_dim and num_kv_heads are (`tailkd.layer_attention`; o reads the keys' rows where they are
         the values); its per-layer embeddings keep the chosen layers' blocks; its last ``num_kv_shared_layers``
         layers reuse the keys and values of the last earlier layer of their kind (a student's are its chosen ones
         among them, each needing an earlier kept layer of its kind, and keep its KV heads under attention_heads
         "active") with MLPs twice as wide under use_double_wide_mlp (twice the student's units); its last layer is
         always full attention. Spaced layers take what a kept sharing layer reads in place of the nearest kept
         layer (`tailkd.layer_choice.student_layers`), influence keeps the last layer first and each layer with what it
         reads (`tailkd.layer_choice.layer_needs`); listed layers missing one are refused in one line. With
         enable_moe_block, routed experts (a router with its own scales) beside each layer's MLP, kept whole. Gemma 4
         unified (Gemma4UnifiedForCausalLM) likewise, without per-layer embeddings or experts. Gemma 3's and Gemma 4's
         multimodal checkpoints (...ForConditionalGeneration, unified too) give a text-only student built from their
         text part (`tailkd.multimodal.text_teacher`; the table's ``source`` names the text model's tensors,
         model.layers....).
Embeds   Copied (all vocabulary rows, the kept hidden_size columns), untied LM head (and its bias: Phi)
         likewise, final norm copied. ``tie_embeddings`` (None: the teacher's setting) ties the student's
         head to its input embeddings (True: one matrix, copied from the teacher's input embeddings, as
         MiniPLM's Qwen students) or unties it (False: its own head, copied from the teacher's head, which is
         the input embedding matrix for a tied teacher). ``freeze_embeddings=True`` freezes the input embeddings
         (GPT-2: token and position embeddings) and with them a tied LM head; an untied LM head stays trainable.
Generate The teacher's ``generation_config`` (the student has the teacher's tokenizer: the same stop ids, e.g. an
         instruct model's end-of-turn id, and sampling defaults), not one derived from the config.

Family notes. Norms and sandwich norms (Gemma2/3 pre/post feed-forward, OLMo-2 post-norms) are copied like any
residual-stream tensor. Gemma's embedding multiplier is sqrt(hidden_size) of the *student*: a narrower student's copied
embeddings enter the residual stream scaled by sqrt(d_s/d_t) relative to the teacher's. Gemma2/3's query_pre_attn_scalar
(attention scale 1/sqrt of it) is multiplied by head_dim_s/head_dim_t (rounded) when head_dim shrinks, as Llama's
1/sqrt(head_dim) would be, and Granite's attention_multiplier and an explicit MPT attn_config.softmax_scale (the scale
itself) by sqrt(head_dim_t/head_dim_s); soft-capping, sliding windows, RoPE settings and Granite's other multipliers are
the teacher's (Granite-SWA's per-layer RoPE bases, ``layer_rope_theta``, follow the chosen layers); MiniMax-M2's RoPE
rows (``rotary_dim``) follow head_dim in proportion, as its partial_rotary_factor; GPT-J's ``rotary_dim``, which its
model reads in place of one, is the rows the student keeps rotating. Narrowing is supported for every family; the one
refusal is a head_dim change under per-frequency RoPE factor lists (Phi-3 "longrope" short/long factors): keep head_dim
(narrow hidden_size and num_heads together). The per-family parameter tables are in `tailkd.families`.

Values are exact copies/slices of the teacher's (computed in its dtype, stored in float32: the student is always built
in float32, its master weights). The teachers supported are `SUPPORTED`, one entry of `tailkd.families.FAMILIES` per
family whose comment says what is particular to it (the README names them all); DBRX's experts module gets its input in
the autocast dtype under autocast (`tailkd.models.autocast_safe`).
"""

from __future__ import annotations

import copy

import torch

from tailkd.calibrated import calibrated_layers, wanted_measures
from tailkd.calibration import measure
from tailkd.config import (
    EXPERT_CHOICES,
    HEAD_CHOICES,
    HIDDEN_CHANNEL_CHOICES,
    LAYER_CHOICES,
    MLP_INITS,
    MLP_UNIT_CHOICES,
    SSM_HEAD_CHOICES,
)
from tailkd.copying import Choices, copy_into, head_member, in_layer, provenance
from tailkd.errors import TailkdError
from tailkd.families import SUPPORTED, Family, family_for_class
from tailkd.layer_attention import layer_query_heads
from tailkd.layer_choice import layer_needs, layer_period
from tailkd.models import autocast_safe
from tailkd.multimodal import text_teacher
from tailkd.sizing import config_family, family_spec, student_plan, student_widths

__all__ = ["SUPPORTED", "build_student", "calibrate", "format_table", "freeze_student_embeddings", "student_config"]


# --------------------------------------------------------------------------- the builder

def student_config(teacher, *, num_layers: int | None = None, layers=None, hidden_size: int | None = None,
                   num_heads: int | None = None, num_kv_heads: int | None = None,
                   intermediate_size: int | None = None, head_dim: int | None = None,
                   tie_embeddings: bool | None = None, num_experts: int | None = None,
                   num_experts_per_tok: int | None = None, ssm_heads: int | None = None):
    """The config of the student `build_student` makes from `teacher` with these options. The teacher's weights
    are not read: a teacher built on the meta device will do (e.g. to count a planned student's parameters with
    `tailkd.flops.model_size`, as tests/test_paper_configs.py does for the paper's students)."""
    teacher = text_teacher(teacher)
    return student_plan(teacher, num_layers, layers, hidden_size, num_heads, num_kv_heads, intermediate_size,
                        head_dim, tie_embeddings, num_experts, num_experts_per_tok, ssm_heads)[-1]


def build_student(teacher, *, num_layers: int | None = None, layers=None, hidden_size: int | None = None,
                  num_heads: int | None = None, num_kv_heads: int | None = None,
                  intermediate_size: int | None = None, head_dim: int | None = None, mlp_init: str = "random",
                  freeze_embeddings: bool = False, tie_embeddings: bool | None = None, num_experts: int | None = None,
                  num_experts_per_tok: int | None = None, ssm_heads: int | None = None, seed: int = 0,
                  experts: str = "first",
                  layer_choice: str = "spaced", mlp_units: str = "first", hidden_channels: str = "first",
                  attention_heads: str = "first", ssm_head_choice: str = "first", calibration=None,
                  measured: dict | None = None):
    """A student initialised from `teacher` (see the module docstring) and its provenance table.

    ``layer_choice``: which teacher layers a student of ``num_layers`` keeps — "spaced" (evenly, see the module
    docstring) or "influence" (the ``num_layers`` of largest Block Influence over ``calibration()``'s batches, see
    `tailkd.calibration`); ``layers`` lists them instead.
    ``experts``: which routed experts a student with fewer than the teacher's copies (``mlp_init="copy"``) — "first"
    (the teacher's first ones; of each group under group-limited routing) or "used" (per layer the ones the teacher
    routes the most real tokens to over ``calibration()``'s batches, dicts of ``input_ids`` and optionally
    ``attention_mask``; see `tailkd.calibration`).
    ``mlp_units``: which units of a dense MLP a narrower student (``intermediate_size``) copies (``mlp_init="copy"``)
    — "first" or "active" (per layer those of largest mean absolute activation at the down projection's input over
    ``calibration()``'s batches; of a mixture, each routed expert's own, over the tokens routed to it).
    ``hidden_channels``: which residual-stream channels a narrower student (``hidden_size``) keeps — "first" or
    "active" (those of largest mean absolute output of the teacher's norms over ``calibration()``'s batches, one
    choice for every tensor's residual side).
    ``attention_heads``: which heads a student with fewer (``num_heads``, ``num_kv_heads``) keeps — "first" (the first
    ones of the first KV heads, see the module docstring) or "active" (per layer those whose output has the largest
    mean L2 norm over ``calibration()``'s batches, KV head by KV head: `tailkd.calibrated.kept_heads`);
    ``ssm_head_choice`` likewise which Mamba-2 heads (Jamba's Mamba-1 channels) a student with fewer ``ssm_heads``
    keeps, group by group.
    ``calibration`` is called only where a choice is to be made, once: one teacher pass serves every choice.
    ``measured``: that pass made already (`calibrate`'s measures for these settings, e.g. over a teacher sharded with
    FSDP2 while `teacher` is the skeleton of `tailkd.sharded_teacher.student_source`), in place of ``calibration``.

    Returns ``(student, table)``: a float32 CPU model of the teacher's class in train mode, and one dict
    per student parameter ``{"name", "shape", "source", "action", "frozen"}`` where action is
    "copied" (same shape), "truncated" (a slice of `source`) or "random" (source None); under "influence" a layer's
    tensors add ``"block_influence"`` (their teacher layer's), under "used" a routed layer's expert tensors add
    ``"experts"`` (the teacher's experts kept, in the student's order) and ``"routed_share"`` (the share of that
    layer's calibration routings that went to them), under "active" a layer's MLP tensors add ``"units"`` (how many
    and a digest of which) and ``"active_share"`` (the share of the layer's activity the kept units had), under
    hidden_channels "active" the input embeddings' rows add ``"channels"`` (how many and a digest of which) and
    ``"channel_share"`` (the share of the norms' activity the kept channels had), under attention_heads "active" a
    layer's attention tensors add ``"heads"`` (the teacher's query heads kept, in the student's order) and
    ``"head_share"`` (the share of the layer's head importance they had), under ssm_head_choice "active" a layer's
    Mamba tensors ``"ssm_heads"`` and ``"ssm_head_share"`` likewise.
    """
    if mlp_init not in MLP_INITS:
        raise TailkdError(f"mlp_init={mlp_init!r}: use one of {', '.join(MLP_INITS)}")
    if experts == "used" and mlp_init != "copy":
        raise TailkdError(f"experts=used keeps the experts the teacher uses, but mlp_init={mlp_init} draws the "
                          "student's experts afresh: use mlp_init copy")
    if mlp_units == "active" and mlp_init != "copy":
        raise TailkdError(f"mlp_units=active keeps the MLP units the teacher uses most, but mlp_init={mlp_init} draws "
                          "the student's MLP afresh: use mlp_init copy")
    if getattr(teacher, "hf_quantizer", None) is not None or getattr(teacher.config, "quantization_config", None):
        raise TailkdError("the teacher is a quantized model: load it with tailkd.models.load_teacher, "
                          "which dequantizes GGUF files into a plain model")
    teacher = text_teacher(teacher)
    settings = dict(num_layers=num_layers, layers=layers, hidden_size=hidden_size, num_heads=num_heads,
                    num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, head_dim=head_dim,
                    num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, ssm_heads=ssm_heads,
                    layer_choice=layer_choice, hidden_channels=hidden_channels, attention_heads=attention_heads,
                    mlp_units=mlp_units, experts=experts, ssm_head_choice=ssm_head_choice)
    if measured is None:
        measured = calibrate(teacher, calibration, **settings)
    elif set(measured) != set(wanted := _wanted(teacher, **settings)[1]):  # a caller's bug, not a user error
        raise RuntimeError(f"measured holds {sorted(measured)}, these settings need {sorted(wanted)}")
    fam = config_family(teacher.config, family_spec(teacher))
    num_layers, layers = calibrated_layers(measured, num_layers, layers, layer_period(teacher.config, fam),
                                           layer_needs(teacher.config, fam))
    fam, t, s, fraction, chosen, config = student_plan(teacher, num_layers, layers, hidden_size, num_heads,
                                                       num_kv_heads, intermediate_size, head_dim, tie_embeddings,
                                                       num_experts, num_experts_per_tok, ssm_heads)

    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = autocast_safe(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    if getattr(teacher, "generation_config", None) is not None:  # the teacher's tokenizer: its stop ids and sampling
        student.generation_config = copy.deepcopy(teacher.generation_config)
    _check_layer_kinds(teacher, student, fam, chosen)

    choices = Choices.of(teacher.config, fam, t, s, fraction, chosen, measured)
    teacher_tensors = {**dict(teacher.named_buffers()),  # persistent buffers: GLM-4.5's expert score correction
                       **dict(teacher.named_parameters(remove_duplicate=False))}  # a tied head under its own name too
    table = []
    with torch.no_grad():
        for name, param in student.named_parameters():
            source = copy_into(name, param, choices, teacher_tensors, mlp_init)
            same = source is not None and tuple(param.shape) == tuple(teacher_tensors[source].shape)
            table.append({"name": name, "shape": list(param.shape), "source": source,
                          "action": "random" if source is None else "copied" if same else "truncated",
                          **provenance(name, choices)})
        persistent = set(student.state_dict())
        for name, buffer in student.named_buffers():  # not in the table: it lists parameters
            if name in persistent:
                copy_into(name, buffer, choices, teacher_tensors, mlp_init, buffer=True)
    frozen = freeze_student_embeddings(student) if freeze_embeddings else []
    for row in table:
        row["frozen"] = row["name"] in frozen
    student.train()
    return student, table


def calibrate(teacher, calibration=None, *, num_layers: int | None = None, layers=None, hidden_size=None,
              num_heads=None, num_kv_heads=None, intermediate_size=None, head_dim=None, num_experts=None,
              num_experts_per_tok=None, ssm_heads=None, layer_choice: str = "spaced", hidden_channels: str = "first",
              attention_heads: str = "first", mlp_units: str = "first", experts: str = "first",
              ssm_head_choice: str = "first") -> dict:
    """What the calibrated choices among `build_student`'s settings (the same keywords) need to know of the teacher,
    ``{tailkd.calibration.PROBES key: measure}``, of every teacher layer, all from one forward over
    ``calibration()``'s batches (`tailkd.calibration.measure`); {} (and no forward) where nothing is to be chosen:
    every layer, channel, head, unit or expert kept, or the first ones asked for. A choice the teacher's family cannot
    make, or widths it cannot give (`tailkd.sizing.student_widths`), are refused here, before any forward.
    ``teacher`` may be sharded with FSDP2 (`tailkd.sharded_teacher.load_sharded_teacher`; collective then: every rank
    passes the same batches).
    """
    teacher = text_teacher(teacher)
    fam, wanted, heads = _wanted(teacher, num_layers=num_layers, layers=layers, hidden_size=hidden_size,
                                 num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                                 head_dim=head_dim, num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                                 ssm_heads=ssm_heads, layer_choice=layer_choice, hidden_channels=hidden_channels,
                                 attention_heads=attention_heads, mlp_units=mlp_units, experts=experts,
                                 ssm_head_choice=ssm_head_choice)
    if not wanted:
        return {}
    if calibration is None:
        raise TailkdError(f"{' and '.join(wanted)} need{'s' if len(wanted) == 1 else ''} calibration rows to measure "
                          "the teacher over")
    return measure(teacher, fam, calibration(), wanted, heads)[0]


def _wanted(teacher, *, num_layers, layers, hidden_size, num_heads, num_kv_heads, intermediate_size, head_dim,
            num_experts, num_experts_per_tok, ssm_heads, layer_choice, hidden_channels, attention_heads, mlp_units,
            experts, ssm_head_choice):
    """``(family, {PROBES key: teacher layers}, the teacher's query heads per layer)``: what `calibrate` measures for
    these settings, after their refusals."""
    for key, value, choices in (("experts", experts, EXPERT_CHOICES), ("mlp_units", mlp_units, MLP_UNIT_CHOICES),
                                ("attention_heads", attention_heads, HEAD_CHOICES),
                                ("hidden_channels", hidden_channels, HIDDEN_CHANNEL_CHOICES),
                                ("layer_choice", layer_choice, LAYER_CHOICES),
                                ("ssm_head_choice", ssm_head_choice, SSM_HEAD_CHOICES)):
        if value not in choices:
            raise TailkdError(f"{key}={value!r}: use one of {', '.join(choices)}")
    if layer_choice == "influence" and layers is not None:
        raise TailkdError("layer_choice=influence chooses the student's layers, and layers lists them: drop one of "
                          "the two")
    # its refusals: before any pass
    fam, t, s, _, _ = student_widths(teacher, num_layers, layers, hidden_size, num_heads, num_kv_heads,
                                     intermediate_size, head_dim, num_experts, num_experts_per_tok, ssm_heads)
    return fam, wanted_measures(fam, t, s, layers=layers, layer_choice=layer_choice, hidden_channels=hidden_channels,
                                attention_heads=attention_heads, mlp_units=mlp_units, experts=experts,
                                ssm_head_choice=ssm_head_choice), layer_query_heads(teacher.config, fam, t)


def _check_layer_kinds(teacher, student, fam: Family, chosen: list[int]) -> None:
    """Each student layer j has teacher layer chosen[j]'s modules (the per-layer settings that follow the layers saw to
    it); a layer kind the student's config cannot give its layer (ERNIE 4.5's routed layers every moe_layer_interval
    layers, a choice off that rhythm) is refused in one line."""
    def kinds(model, layers):
        out = {i: set() for i in layers}
        for name, _ in model.named_parameters():
            layer, rest = in_layer(name, fam)
            if layer in out:  # the module path; a per-head module list's members as one (their number is the heads')
                member = head_member(rest, fam)
                out[layer].add(f"{member[0]}.*" if member else rest.rpartition(".")[0])
        return out
    want, have = kinds(teacher, chosen), kinds(student, range(len(chosen)))
    for j, i in enumerate(chosen):
        if want[i] != have[j]:
            diff = sorted(want[i] ^ have[j])[0]
            raise TailkdError(f"the student's config cannot give its layer {j} the modules of teacher layer {i} "
                              f"({diff} differs): the teacher's per-layer settings do not carry over to layers "
                              f"{' '.join(map(str, chosen))}; choose other layers (--student.layers)")


def freeze_student_embeddings(student) -> list[str]:
    """Freeze the input embeddings (GPT-2: token and position) and so a tied head; return their names.

    Any causal LM (an existing student, `student.path`): the families of `tailkd.families` by their tables, the others
    by their input embedding module (``get_input_embeddings``). requires_grad is not saved with a model: call this
    again after reloading a student to resume.
    """
    family = family_for_class(type(student).__name__)
    params = dict(student.named_parameters())
    if family is not None:
        names = list(family.embeddings)
    else:
        embedding = {id(p) for p in student.get_input_embeddings().parameters()}
        names = [name for name, p in params.items() if id(p) in embedding]
    for name in names:
        params[name].requires_grad_(False)
    return names


def format_table(table) -> str:
    """The table as aligned text, one line per parameter, and a parameter-count summary."""
    header = ("name", "shape", "action", "frozen", "source")
    rows = [(r["name"], "x".join(map(str, r["shape"])), r["action"], "yes" if r.get("frozen") else "",
             r["source"] or "-") for r in table]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    counts = {}
    for r in table:
        n = 1
        for size in r["shape"]:
            n *= size
        counts[r["action"]] = counts.get(r["action"], 0) + n
        if r.get("frozen"):
            counts["frozen"] = counts.get("frozen", 0) + n
    total = sum(v for k, v in counts.items() if k != "frozen")
    parts = ", ".join(f"{counts[k]:,} {k}" for k in ("copied", "truncated", "random", "frozen") if k in counts)
    lines.append(f"{len(table)} tensors, {total:,} parameters: {parts}")
    return "\n".join(lines)
