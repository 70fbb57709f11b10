"""tailkd.student for the teacher families beyond Llama/GPT-2: Phi (Phi-2), Phi-3, Gemma, Gemma2, Gemma3 (text), Qwen3,
OLMo-2, OLMo-3, SmolLM3, GLM, GLM-4 (interleaved RoPE), the mixtures of experts Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and
GPT-OSS, GLM-4.5 and dots.llm1 (DeepSeek-V3-style routing), and the hybrids (gated attention beside Gated DeltaNet
linear attention) Qwen3-Next, Qwen3.5 and Qwen3.5-MoE, each from a tiny random config built with its own config class
(no hub).

Exactness: a student with all the teacher's layers and no narrowing is the teacher's class, built from the same
config (only dtype/name differ), holding bit-identical float32 weights; its forward runs the very same kernels on
the same shapes in the same order, so its logits equal the teacher's bit for bit (no tolerance). The same holds
for a layer subset against the teacher whose dropped layers write exact zeros into the residual stream (output
projections zeroed: the layer adds +0.0, or a norm of 0.0, which is 0.0), provided the kept layers keep their
own per-layer settings (sliding vs full attention, Gemma3's local vs global RoPE): the test of `layer_types`.
"""

import copy
import json
import math
import re

import bounds as B
import pytest
import torch
import transformers
from conftest import TINY_VOCAB, build_tiny_tokenizer, rotated_qk

from tailkd.calibrated import kept_heads, largest
from tailkd.calibration import block_influence, channel_activity, head_importance, ssm_head_importance
from tailkd.errors import TailkdError
from tailkd.families import AXES, FAMILIES, SUPPORTED
from tailkd.head import HeadSpec, apply_head, final_hidden, head_spec, model_head, verify_head
from tailkd.sizing import config_family, family_spec, teacher_dims
from tailkd.student import build_student, freeze_student_embeddings
from tailkd.vocab import head_ids

N_LAYERS = 5
SUBSET = [1, 2, 4]  # non-contiguous; its layer_types differ from the teacher's first three in every family below
NARROW_LAYERS = [0, 2, 3]  # the narrow students' layers
# Jamba's config sets its layers' kinds by periods (attention at the odd layers, experts at the even ones here): a
# student's layer j is a teacher layer of j's parity, so its layer kinds are those of the teacher's first layers
SUBSETS, NARROW_LAYERS_OF = {"jamba": [0, 3, 4]}, {"jamba": [0, 1, 4]}
# Gemma 4's last layer is always a full attention one, and its KV-shared layers (3 and 4 here: full attention) need an
# earlier full attention layer to take keys and values from: the narrow students keep layers 1 (full), 2, 3 (the
# mixture's too: `_check_narrow_student` knows a family by its class)
NARROW_LAYERS_OF.update(gemma4=[1, 2, 3], gemma4_moe=[1, 2, 3], gemma4_unified=[1, 2, 3])
# Laguna's layers have 4, 2, 4, 4, 2 query heads: the narrow students keep one of 2 (layer 1)
NARROW_LAYERS_OF.update(laguna=[0, 1, 3])
# Kolibri 1.1's layer 3 reads layer 1's keys and values (and rescores its key pool): the narrow students keep both
NARROW_LAYERS_OF.update(kolibri1_1=[1, 2, 3])
# MiniMax's layers normalize the residual stream itself (input_layernorm's output is the residual): a layer whose
# outputs are zeroed is no identity, so a subset is not the teacher with its other layers zeroed
NORMED_RESIDUAL = {"minimax"}
_SLIDING = {"sliding_window": 4}  # shorter than the test sequences (13 tokens): sliding layers really differ
_COMMON = dict(vocab_size=TINY_VOCAB, num_hidden_layers=N_LAYERS, intermediate_size=96, num_attention_heads=4,
               max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
S, F, L, X = "sliding_attention", "full_attention", "linear_attention", "indexed_attention"
_LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
CONFIGS = {
    # Phi-2 style: parallel attention/MLP, partial rotary (8 of 16 rows), biases, final LayerNorm + LM head bias;
    # qk_layernorm on (Phi-2 has it off) to cover the per-head q/k LayerNorms.
    "phi": ("PhiConfig", dict(hidden_size=64, num_key_value_heads=4, partial_rotary_factor=0.5, qk_layernorm=True)),
    "phi3": ("Phi3Config", dict(hidden_size=64, num_key_value_heads=2)),
    # head_dim 16 with hidden 48 / 4 heads: head_dim != hidden / heads
    "gemma": ("GemmaConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                    final_logit_softcapping=2.0, attn_logit_softcapping=5.0, **_SLIDING)),
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                        layer_types=[S, F, S, S, F], **_SLIDING)),
    "qwen3": ("Qwen3Config", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, use_sliding_window=True,
                                  max_window_layers=2, **_SLIDING)),  # layer_types [F, F, S, S, S]
    "olmo2": ("Olmo2Config", dict(hidden_size=64, num_key_value_heads=2)),
    # interleaved RoPE over half of each 16-row head (rows (2p, 2p+1)), fused [gate | up], q/k/v biases
    "glm": ("GlmConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16)),
    "glm4": ("Glm4Config", dict(hidden_size=48, num_key_value_heads=2, head_dim=16)),
    "ministral": ("MinistralConfig", dict(hidden_size=64, num_key_value_heads=2, head_dim=16,
                                          layer_types=[S, F, S, S, F], **_SLIDING)),
    "seed_oss": ("SeedOssConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16)),  # biases, 4 x 16 != 48
    # Ministral 3: YaRN and a query scale growing with the position (every 4 tokens here: the test rows are 13)
    "ministral3": ("Ministral3Config", dict(hidden_size=64, num_key_value_heads=2, head_dim=16, rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=4, beta_fast=32.0,
        beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1))),
    "cwm": ("CwmConfig", dict(hidden_size=64, num_key_value_heads=2, head_dim=16, layer_types=[S, F, S, S, F],
                              **_SLIDING)),
    "helium": ("HeliumConfig", dict(hidden_size=64, num_key_value_heads=2, head_dim=16)),  # interleaved RoPE
    # BitNet: norms over the attention's output (before o_proj) and over the MLP's units (before down_proj), relu²
    "bitnet": ("BitNetConfig", dict(hidden_size=64, num_key_value_heads=2)),
    # per-head q/k norms after RoPE
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", dict(hidden_size=64, num_key_value_heads=2, head_dim=16)),
    "jais2": ("Jais2Config", dict(hidden_size=64, num_key_value_heads=2)),  # LayerNorms with biases, relu², biases
    # routed experts and an always-on shared MLP of the same width, per-head q/k norms after RoPE
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(hidden_size=64, num_key_value_heads=2, head_dim=16, num_experts=4,
                                                  moe_topk=2, intermediate_size=40)),
    # per-head [q | k | v] blocks with per-head q/k LayerNorms, RoPE on 8 of 16 rows, relu²
    "persimmon": ("PersimmonConfig", dict(hidden_size=64)),
    # norms without weights, relu² fc1/fc2, final soft-capping
    "nanochat": ("NanoChatConfig", dict(hidden_size=64, num_key_value_heads=2, final_logit_softcapping=3.0)),
    # GPT-BigCode: multi-query attention (c_attn = [q | k | v], one KV head), learned positions; without multi_query
    # c_attn holds [q | k | v] blocks per head
    "gpt_bigcode": ("GPTBigCodeConfig", dict(hidden_size=64, n_inner=96, multi_query=True)),
    "gpt_bigcode_mha": ("GPTBigCodeConfig", dict(hidden_size=64, n_inner=96, multi_query=False)),
    # Falcon's three attention layouts: Falcon-7B's multi-query [q | k | v] with parallel attention; Falcon-40B's new
    # decoder architecture (per KV head its 2 queries, key, value; ln_attn and ln_mlp; its config also says
    # multi_query); Falcon-RW's [q | k | v] per head under ALiBi, sequential, with biases; the same under RoPE
    "falcon": ("FalconConfig", dict(hidden_size=64, ffn_hidden_size=96, multi_query=True, parallel_attn=True)),
    "falcon_new": ("FalconConfig", dict(hidden_size=64, ffn_hidden_size=96, new_decoder_architecture=True,
                                        num_kv_heads=2, multi_query=True, parallel_attn=True)),
    "falcon_rw": ("FalconConfig", dict(hidden_size=64, ffn_hidden_size=96, multi_query=False, parallel_attn=False,
                                       alibi=True, bias=True)),
    "falcon_mha": ("FalconConfig", dict(hidden_size=64, ffn_hidden_size=96, multi_query=False, parallel_attn=False,
                                        bias=True)),
    # interleaved RoPE on 8 of a head's 16 rows (rotary_dim), parallel attention and MLP, an LM head bias
    "gptj": ("GPTJConfig", dict(hidden_size=64, rotary_dim=8, n_inner=96)),
    # ALiBi, per-head [q | k | v] blocks, an embedding LayerNorm, an MLP 4 x hidden_size wide; transformer.h
    "bloom": ("BloomConfig", dict(hidden_size=64, intermediate_size=None)),  # no such setting: 4 x hidden_size
    # MPT: ALiBi, a fused [q | k | v] Wqkv, LayerNorms without biases, an MLP 4 x hidden_size wide; transformer.blocks
    "mpt": ("MptConfig", dict(hidden_size=64, intermediate_size=None)),
    # learned positions, biases, fc1/fc2 in the layer itself; model.decoder.layers
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=96, word_embed_proj_dim=64)),
    # per-head [q | k | v] blocks, RoPE on 4 of a head's 16 rows, parallel residual; gpt_neox.layers
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64)),
    # GPT-J's block with q, v and k in one qkv_proj of 4 blocks of 2 heads (head_dim 8), RoPE on 4 rows
    "codegen": ("CodeGenConfig", dict(hidden_size=64, num_attention_heads=8, rotary_dim=4, n_inner=96)),
    # global and local (a window of 4) attention by layer, run-length encoded: G L G L L; separate q/k/v, no scale
    "gpt_neo": ("GPTNeoConfig", dict(hidden_size=64, window_size=4,
                                     attention_types=[[["global", "local"], 2], [["local"], 1]])),
    # VaultGemma: Gemma2's attention (soft-capping, query_pre_attn_scalar) with pre-norms only, sliding layers
    "vaultgemma": ("VaultGemmaConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16,
                                            query_pre_attn_scalar=16, final_logit_softcapping=2.0,
                                            attn_logit_softcapping=5.0, layer_types=[S, F, S, S, F], **_SLIDING)),
    # interleaved RoPE on the sliding layers only, parallel attention and MLP, logit_scale
    "cohere2": ("Cohere2Config", dict(hidden_size=64, num_key_value_heads=2, layer_types=[S, F, S, S, F], **_SLIDING)),
    # Cohere: interleaved RoPE, q/k LayerNorms of one [heads, head_dim] weight each, logit_scale
    "cohere": ("CohereConfig", dict(hidden_size=64, num_key_value_heads=2, use_qk_norm=True, logit_scale=0.5)),
    "exaone4": ("Exaone4Config", dict(hidden_size=64, num_key_value_heads=2, layer_types=[S, F, S, S, F], **_SLIDING)),
    "apertus": ("ApertusConfig", dict(hidden_size=64, num_key_value_heads=2)),
    # attention-free: a Mamba-1 mixer per layer, expand x hidden_size channels (Falcon-Mamba: with dt/B/C norms)
    "mamba": ("MambaConfig", dict(hidden_size=32, state_size=4, expand=2, time_step_rank=4)),
    "falcon_mamba": ("FalconMambaConfig", dict(hidden_size=32, state_size=4, expand=2, time_step_rank=4)),
    # a Mamba-2 mixer per layer (8 heads of 8 in 2 groups), kept whole: hidden_size kept (no intermediate_size)
    "mamba2": ("Mamba2Config", dict(hidden_size=32, state_size=8, num_heads=8, head_dim=8, n_groups=2, expand=2,
                                    chunk_size=16, intermediate_size=None)),
    # Apertus 1.5 (text): Apertus' layers under an LM head pruned to the first output_vocab_size ids (`tailkd.vocab`)
    "apertus1p5_text": ("Apertus1p5TextConfig", dict(hidden_size=64, num_key_value_heads=2,
                                                     output_vocab_size=TINY_VOCAB - 8)),
    "olmo3": ("Olmo3Config", dict(hidden_size=64, num_key_value_heads=2, layer_types=[S, F, S, S, F], **_SLIDING)),
    # no_rope_layers: 0 = a layer without RoPE, per layer as layer_types
    "smollm3": ("SmolLM3Config", dict(hidden_size=64, num_key_value_heads=2, no_rope_layers=[1, 0, 1, 1, 0],
                                      use_sliding_window=True, layer_types=[S, F, S, S, F], **_SLIDING)),
    # Granite: Llama's layout, an attention scale of its own (attention_multiplier) and multipliers
    "granite": ("GraniteConfig", dict(hidden_size=64, num_key_value_heads=2, attention_multiplier=0.05,
                                      embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0)),
    # HyperCLOVA X: Granite's, a norm after each sub-layer (use_post_norm), its logits multiplied by logits_scaling
    "hyperclovax": ("HyperCLOVAXConfig", dict(hidden_size=64, num_key_value_heads=2, attention_multiplier=0.05,
                                              embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0)),
    "olmo": ("OlmoConfig", dict(hidden_size=64, num_key_value_heads=2, clip_qkv=8.0)),  # LayerNorms without weights
    "starcoder2": ("Starcoder2Config", dict(hidden_size=64, num_key_value_heads=2, use_bias=True, **_SLIDING)),
    # partial rotary (4 of 16 rows), LayerNorms with biases, q/k/v biases
    "stablelm": ("StableLmConfig", dict(hidden_size=64, num_key_value_heads=2, use_qkv_bias=True)),
    "nemotron": ("NemotronConfig", dict(hidden_size=64, num_key_value_heads=2)),  # relu² MLP, partial rotary (8 of 16)
    "arcee": ("ArceeConfig", dict(hidden_size=64, num_key_value_heads=2)),
    "ernie4_5": ("Ernie4_5Config", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, use_bias=True)),
    # short-convolution layers beside attention layers, per-head q/k norms; the MLP's width is int(2/3 x 96) = 64,
    # rounded up to block_multiple_of
    "lfm2": ("Lfm2Config", dict(hidden_size=64, num_key_value_heads=2, layer_types=["conv", F, "conv", F, F],
                                full_attn_idxs=[1, 3, 4], block_multiple_of=8, conv_bias=True)),
    # LFM3: convolutions (biased), sliding and full attention with per-head q/k norms and an output gate per head, full
    # layers on proportional RoPE (rotate-half over the whole head, the last half of its pairs at frequency 0)
    "lfm3": ("Lfm3Config", dict(hidden_size=64, num_key_value_heads=2, head_dim=16,
                                layer_types=["conv", S, F, "conv", F], conv_bias=True, **_SLIDING)),
    # attention beside a Mamba-2 mixer of its own width (mamba_d_ssm 48: 6 heads of 8) with its gated norm, biases
    "falcon_h1": ("FalconH1Config", dict(hidden_size=64, num_key_value_heads=2, mamba_d_ssm=48, mamba_n_heads=6,
                                         mamba_d_head=8, mamba_n_groups=1, mamba_d_state=16, mamba_rms_norm=True,
                                         mamba_proj_bias=True, attention_bias=True, mlp_bias=True,
                                         key_multiplier=0.5, attention_out_multiplier=0.7, ssm_out_multiplier=0.9)),
    # Granite 4.0-H: Mamba-2 layers (2 x 64 wide: 16 heads of 8) beside attention layers (here with RoPE), routed
    # experts plus a shared MLP, Granite's attention_multiplier
    "granitemoehybrid": ("GraniteMoeHybridConfig", dict(
        hidden_size=64, num_key_value_heads=2, layer_types=[L, F, L, F, F], num_local_experts=4, num_experts_per_tok=2,
        shared_intermediate_size=80, mamba_n_heads=16, mamba_d_head=8, mamba_d_state=16, mamba_n_groups=1,
        attention_multiplier=0.05, position_embedding_type="rope")),
    # Nemotron-H: one mixer per layer (Mamba-2 of its own width, 8 heads of 8; attention; relu² MLP; routed relu²
    # experts, 8 in 2 groups, with a shared one and score-correction biases)
    "nemotron_h": ("NemotronHConfig", dict(
        hidden_size=64, num_key_value_heads=2, head_dim=16, layers_block_type=[L, "moe", F, "mlp", "moe"],
        mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=16, n_groups=1, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=40, moe_shared_expert_intermediate_size=48, n_group=2, topk_group=1)),
    # Bamba: attention in layers 1, 3, 4 (attn_layer_indices), Mamba-2 (2 x 64 wide: 16 heads of 8) elsewhere
    "bamba": ("BambaConfig", dict(hidden_size=64, num_key_value_heads=2, attn_layer_indices=[1, 3, 4],
                                  mamba_n_heads=16, mamba_d_head=8, mamba_d_state=16, mamba_n_groups=1)),
    # Granite with sliding layers: attention sinks, a RoPE base per layer (0: no RoPE), Granite's multipliers
    "granite_swa": ("GraniteSWAConfig", dict(hidden_size=64, num_key_value_heads=2, layer_types=[S, F, S, S, F],
                                             layer_rope_theta=[1e4, 0, 500.0, 1e4, 0], attention_multiplier=0.05,
                                             embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0,
                                             **_SLIDING)),
    "granitemoe_swa": ("GraniteMoeSWAConfig", dict(hidden_size=64, num_key_value_heads=2, num_local_experts=4,
                                                   num_experts_per_tok=2, layer_types=[S, F, S, S, F],
                                                   layer_rope_theta=[1e4, 0, 500.0, 1e4, 0],
                                                   attention_multiplier=0.05, **_SLIDING)),
    # Granite 3 MoE: routed experts under block_sparse_moe (the Shared variant adds an always-on MLP)
    "granitemoe": ("GraniteMoeConfig", dict(hidden_size=64, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2, attention_multiplier=0.05)),
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(hidden_size=64, num_key_value_heads=2, num_local_experts=4,
                                                        num_experts_per_tok=2, shared_intermediate_size=80,
                                                        attention_multiplier=0.05)),
    # ERNIE 4.5 MoE: routed layers 1..4 (moe_layer_start_index), interleaved RoPE, a [1, E] score bias, 2 shared
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, moe_num_experts=4,
                                                moe_k=2, moe_intermediate_size=40, moe_num_shared_experts=2,
                                                moe_layer_start_index=1, use_bias=True)),
    # LFM2-MoE: dense layers 0, 1 (num_dense_layers), a score bias per expert
    "lfm2_moe": ("Lfm2MoeConfig", dict(hidden_size=64, num_key_value_heads=2, layer_types=["conv", F, "conv", F, F],
                                       num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
                                       num_dense_layers=2)),
    # mixtures of 4 experts, 2 per token; Mixtral's intermediate_size is its experts' width
    "mixtral": ("MixtralConfig", dict(hidden_size=64, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2)),
    # every second layer sparse (1, 3; dense MLPs of intermediate_size 96 in 0, 2, 4), a shared expert, sliding
    # window below layer 3: layer_types [S, F, S, F, F]
    "qwen2_moe": ("Qwen2MoeConfig", dict(hidden_size=64, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=40, shared_expert_intermediate_size=80,
                                         decoder_sparse_step=2, use_sliding_window=True, max_window_layers=3,
                                         **_SLIDING)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=40, mlp_only_layers=[2])),
    # q/k norms over the whole projection, as OLMo-2's
    "olmoe": ("OlmoeConfig", dict(hidden_size=64, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)),
    "phimoe": ("PhimoeConfig", dict(hidden_size=64, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    # experts [E, in, out] with biases, gate/up interleaved; an attention sink per query head; sliding layers
    "gpt_oss": ("GptOssConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                     num_experts_per_tok=2, layer_types=[S, F, S, S, F], **_SLIDING)),
    # DeepSeek-V3-style routing: sigmoid router with a score-correction bias (a buffer), group-limited routing (8
    # experts in 2 groups, 1 group per token), shared experts of 2 routed widths, dense MLPs in layers 0, 1;
    # partial rotary (8 of 16 rows), per-head q/k norms, q/k/v biases
    "glm4_moe": ("Glm4MoeConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, n_routed_experts=8,
                                       num_experts_per_tok=2, moe_intermediate_size=40, n_shared_experts=2,
                                       n_group=2, topk_group=1, first_k_dense_replace=2, use_qk_norm=True,
                                       attention_bias=True)),
    # EXAONE-MoE: DeepSeek-V3's routing (8 experts in 2 groups), a shared expert, dense layers 0, 1 (96 wide) listed in
    # mlp_layer_types, RoPE on its sliding layers only, per-head q/k norms
    "exaone_moe": ("ExaoneMoeConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, moe_intermediate_size=40,
                                           num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
                                           first_k_dense_replace=2, n_group=2, topk_group=1,
                                           layer_types=[S, F, S, S, F], **_SLIDING)),
    # Solar Open: DeepSeek-V3's routing in every layer (8 experts in 2 groups, 1 group per token), a shared expert
    "solar_open": ("SolarOpenConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, n_routed_experts=8,
                                           num_experts_per_tok=2, moe_intermediate_size=40, n_shared_experts=1,
                                           n_group=2, topk_group=1)),
    # MiniMax-M2: sigmoid routing with the score bias on the block, q/k norms over the whole projection, RoPE on 8
    # of a head's 16 rows (rotary_dim, as its checkpoints say it)
    "minimax_m2": ("MiniMaxM2Config", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                           num_experts_per_tok=2, intermediate_size=40, rotary_dim=8)),
    # Hy3: per-head q/k norms, MiniMax-M2's sigmoid routing (4 experts) beside a shared expert, dense layers 0, 3
    "hy_v3": ("HYV3Config", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, num_experts=4,
                                 num_experts_per_tok=2, moe_intermediate_size=40, num_shared_experts=1,
                                 mlp_layer_types=["dense", "sparse", "sparse", "dense", "sparse"])),
    # AFMoE: per-head q/k norms, an output gate per element, RoPE on its sliding layers only; a sigmoid router (4
    # experts) with its score bias on the block, a shared expert, dense layer 0 (num_dense_layers); muP embeddings
    "afmoe": ("AfmoeConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, num_experts=4,
                                  num_experts_per_tok=2, moe_intermediate_size=40, num_shared_experts=1,
                                  num_dense_layers=1, layer_types=[S, F, S, S, F], mup_enabled=True, **_SLIDING)),
    # Kolibri-1: per-head q/k norms, RoPE on its sliding layers, GLM-4's sandwich norms; 4 experts whose router holds
    # a score bias, beside a shared expert of its own width (32)
    "kolibri1": ("Kolibri1Config", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, num_experts=4,
                                        num_experts_per_tok=2, moe_intermediate_size=40,
                                        shared_expert_intermediate_size=32, layer_types=[S, F, S, S, F], **_SLIDING)),
    # Kolibri 1.1: Kolibri-1's layers with indexed attention (layers 1, 3, 4: NoPE; selecting 2 of a pool of 8 keys
    # beside 1 sink and 2 local tokens, from query head 0 of KV head 0); layer 3 reads layer 1's keys and values and
    # rescores its pool (an indexer of index_layers, as 4); layer 0's MLP is dense (mlp_only_layers, 56 wide); heads of
    # 32 rows (NVFP4 rounds keys and values in blocks of 16)
    "kolibri1_1": ("Kolibri1_1Config", dict(hidden_size=64, num_key_value_heads=2, head_dim=32, num_experts=4,
                                            num_experts_per_tok=2, moe_intermediate_size=40,
                                            shared_expert_intermediate_size=32, layer_types=[S, X, S, X, X],
                                            index_layers=[1, 4], kv_source_layers=[0, 1, 2, 1, 4], index_topk=2,
                                            index_pool_size=8, index_compression=4, index_num_heads=1,
                                            index_num_local_tokens=2, index_num_sink_tokens=1, mlp_only_layers=[0],
                                            mlp_only_intermediate_size=56, **_SLIDING)),
    # Flint: Qwen3-MoE's with an attention sink per query head, sliding and full layers, a sigmoid router over 4 experts
    # beside a shared expert of its own width (32), dense layer 0 (mlp_only_layers)
    "flint": ("FlintConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, num_experts=4,
                                  num_experts_per_tok=2, moe_intermediate_size=40, shared_expert_intermediate_size=32,
                                  mlp_only_layers=[0], layer_types=[F, S, F, S, F], **_SLIDING)),
    # dense layer 0; full attention below layer 3 (max_window_layers), sliding above: layer_types [F, F, F, S, S]
    "dots1": ("Dots1Config", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, n_routed_experts=4,
                                  num_experts_per_tok=2, moe_intermediate_size=40, n_shared_experts=1,
                                  first_k_dense_replace=1, max_window_layers=3, **_SLIDING)),
    # multi-head latent attention (q through a rank-24 pair, k/v from a rank-16 latent; a head's q is 8 + 4 rows,
    # its [k | v] out of the latent 8 + 12) with DeepSeek-V3's routing (8 experts in 2 groups, dense layer 0)
    "deepseek_v3": ("DeepseekV3Config", dict(hidden_size=48, num_key_value_heads=4, n_routed_experts=8,
                                             num_experts_per_tok=2, moe_intermediate_size=40, n_shared_experts=1,
                                             n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=24,
                                             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12)),
    # DeepSeek-V3.2: DeepSeek-V3's layout with the DSA indexer (2 heads of 8 rows, 4 keys per query: fewer than the
    # rows' 13 tokens, so the indexer's choice matters), dense layer 0 also listed in mlp_layer_types
    "deepseek_v32": ("DeepseekV32Config", dict(hidden_size=48, num_key_value_heads=4, n_routed_experts=8,
                                               num_experts_per_tok=2, moe_intermediate_size=40, n_shared_experts=1,
                                               n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=24,
                                               kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
                                               index_topk=4, index_head_dim=8, index_n_heads=2)),
    # A.X K1: DeepSeek-V3's with a norm on its MoE blocks' output, dense layer 0 (first_k_dense_replace; after
    # transformers 5.17 it becomes mlp_layer_types)
    "axk1": ("AXK1Config", dict(hidden_size=48, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                                moe_intermediate_size=40, n_shared_experts=1, n_group=2, topk_group=1, q_lora_rank=24,
                                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
                                first_k_dense_replace=1)),
    # GLM-MoE-DSA (GLM-5): DeepSeek-V3.2's, its layers 2 and 3 "shared" (indexer_types: no indexer, layer 1's top-k)
    "glm_moe_dsa": ("GlmMoeDsaConfig", dict(hidden_size=48, num_key_value_heads=4, n_routed_experts=8,
                                            num_experts_per_tok=2, moe_intermediate_size=40, n_shared_experts=1,
                                            n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=24,
                                            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
                                            index_topk=4, index_head_dim=8, index_n_heads=2,
                                            indexer_types=["full", "full", "shared", "shared", "full"])),
    # MiniCPM5-MoE: [query | gate] per head in one q_gate_proj (4 heads of 16 on 2 KV heads), DeepSeek-V3's routing
    # (8 experts in 2 groups) with a shared expert, dense layers 0, 3 listed in mlp_layer_types
    "minicpm5_moe": ("MiniCPM5MoeConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, n_routed_experts=8,
                                               num_experts_per_tok=2, moe_intermediate_size=40, n_shared_experts=1,
                                               n_group=2, topk_group=1,
                                               mlp_layer_types=["dense", "sparse", "sparse", "dense", "sparse"])),
    # MiMo-V2-Flash: full layers 0, 3 with 1 KV head, sliding ones with 2 and an attention sink per query head; heads of
    # 12 q/k rows (4 rotated: partial_rotary_factor 0.334) and 8 value rows; DeepSeek-V3's routing, dense layers 0, 3
    "mimo_v2_flash": ("MiMoV2FlashConfig", dict(hidden_size=48, num_key_value_heads=1, head_dim=12, v_head_dim=8,
                                                n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=40,
                                                n_group=2, topk_group=1, layer_types=[F, S, S, F, S],
                                                mlp_layer_types=["dense", "sparse", "sparse", "dense", "sparse"],
                                                **_SLIDING)),
    # Laguna: 4, 2, 4, 4, 2 query heads by layer on 2 KV heads, full layers 0, 3 rotating half of each head, sliding
    # ones all of it; a softplus gate per head, per-head q/k norms; 4 experts beside a shared expert 32 wide, dense
    # layer 0
    "laguna": ("LagunaConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, num_experts=4,
                                    num_experts_per_tok=2, moe_intermediate_size=40, shared_expert_intermediate_size=32,
                                    layer_types=[F, S, S, F, S], num_attention_heads_per_layer=[4, 2, 4, 4, 2],
                                    **_SLIDING)),
    # DeepSeek-V2: q straight from the residual stream, a softmax router over 4 groups of 2 experts scored by their
    # best one (group_limited_greedy), 2 shared experts' width
    "deepseek_v2": ("DeepseekV2Config", dict(hidden_size=48, num_key_value_heads=4, n_routed_experts=8,
                                             num_experts_per_tok=2, moe_intermediate_size=40, n_shared_experts=2,
                                             n_group=4, topk_group=2, topk_method="group_limited_greedy",
                                             first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                                             qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12)),
    # Mellum: sparse and dense layers and sliding and full attention listed per layer, per-head q/k norms
    "mellum": ("MellumConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, num_experts=4,
                                    num_experts_per_tok=2, moe_intermediate_size=40,
                                    mlp_layer_types=["dense", "sparse", "sparse", "dense", "sparse"],
                                    layer_types=[S, F, S, S, F], **_SLIDING)),
    # FlexOlmo: q/k norms over the whole projection, post-norms
    "flex_olmo": ("FlexOlmoConfig", dict(hidden_size=64, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)),
    # Cohere2-MoE: dense layers 0, 1 (96 wide, prefix_dense_intermediate_size; first_k_dense_replace becomes
    # mlp_layer_types), routed experts 40 wide and one shared expert of their width, interleaved RoPE
    "cohere2_moe": ("Cohere2MoeConfig", dict(hidden_size=64, num_key_value_heads=2, head_dim=16, intermediate_size=40,
                                             num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                                             first_k_dense_replace=2, prefix_dense_intermediate_size=96,
                                             logit_scale=0.5, **_SLIDING)),
    # Youtu-LLM: latent attention (q through a rank-24 pair) with a dense MLP in every layer; no padding id: its
    # _init_weights zeroes the padding row again on every load (transformers 5.25): a redrawn row would not survive
    "youtu": ("YoutuConfig", dict(hidden_size=48, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
                                  qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, pad_token_id=None)),
    # MiniCPM3: Youtu's layout with muP scales (embeddings x 12; residual branches x scale_depth / sqrt(layers); final
    # hidden states / (hidden_size / dim_model_base) = / 4)
    "minicpm3": ("MiniCPM3Config", dict(hidden_size=64, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
                                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, dim_model_base=16,
                                        scale_depth=1.4)),
    # GLM-4.7-Flash: q straight from the residual stream (q_proj), dense/routed layers listed per layer
    "glm4_moe_lite": ("Glm4MoeLiteConfig", dict(hidden_size=48, num_key_value_heads=4, n_routed_experts=4,
                                                num_experts_per_tok=2, moe_intermediate_size=40, q_lora_rank=None,
                                                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
                                                mlp_layer_types=["dense", "sparse", "dense", "sparse", "sparse"])),
    # Llama 4: routed layers 1, 3, 4 (moe_layers; dense MLPs 96 wide in 0, 2), experts stored in before out beside a
    # shared expert of their width, a sigmoid top-2 router; NoPE layers 1, 3 (no_rope_layers, with the attention
    # temperature tuning from position 3 on: floor_scale 4) beside chunked attention in chunks of 8 (layer_types),
    # interleaved RoPE, weightless q/k norms
    "llama4": ("Llama4TextConfig", dict(hidden_size=64, num_key_value_heads=2, head_dim=16, intermediate_size=40,
                                        intermediate_size_mlp=96, num_local_experts=4, num_experts_per_tok=2,
                                        moe_layers=[1, 3, 4], no_rope_layer_interval=2, attention_chunk_size=8,
                                        floor_scale=4)),
    # DBRX: a fused [q | k | v] Wqkv (4 query heads on 2 KV heads of 16 rows, clipped at 8), LayerNorms without biases,
    # a softmax top-2 router over 4 experts whose w1, v1, w2 are [4 x 40, 64]; its sizes in attn_config / ffn_config
    "dbrx": ("DbrxConfig", dict(d_model=64, attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=1e4),
                                ffn_config=dict(ffn_hidden_size=40, moe_num_experts=4, moe_top_k=2))),
    # Kimi Linear: latent attention without RoPE (q straight from the residual stream, 4 heads of 8 + 4 query rows, a
    # rank-16 latent) in layers 0, 3, delta attention (2 heads of 8, a short convolution over its 48 q/k/v channels)
    # elsewhere; DeepSeek-V3's routing over 4 experts with a shared one, dense layers 0, 3 listed in mlp_layer_types
    "kimi_linear": ("KimiLinearConfig", dict(
        hidden_size=64, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=12, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
        n_shared_experts=1, linear_num_heads=2, linear_head_dim=8, layer_types=[F, L, L, F, L],
        mlp_layer_types=["dense", "sparse", "sparse", "dense", "sparse"])),
    # MiniMax: lightning attention in layers 0, 2, 3 ([q | k | v] per head, an output gate and norm, per-head decays
    # over blocks of 4 tokens), full attention in 1, 4; Mixtral's experts
    "minimax": ("MiniMaxConfig", dict(hidden_size=64, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                      num_experts_per_tok=2, block_size=4, layer_types=[L, F, L, L, F])),
    # Jamba: Mamba-1 mixers (2 x 64 wide, dt rank 4, with their dt / B / C norms) at the even layers, attention at the
    # odd ones (attn_layer_period 2, offset 1); 4 routed experts in place of the MLP at the even layers
    "jamba": ("JambaConfig", dict(hidden_size=64, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                  attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                  expert_layer_offset=0, mamba_d_state=8, mamba_dt_rank=4)),
    # Gemma 4: full attention layers 1, 3, 4 with heads of 32 rows (global_head_dim; 16 in the sliding ones), per-layer
    # embeddings of 8 per layer, layers 3, 4 reusing layer 1's keys and values with MLPs twice as wide
    "gemma4": ("Gemma4TextConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                                        layer_types=[S, F, S, F, F], hidden_size_per_layer_input=8,
                                        vocab_size_per_layer_input=TINY_VOCAB, num_kv_shared_layers=2,
                                        use_double_wide_mlp=True, **_SLIDING)),
    # Gemma 4 unified (text): Gemma 4 without per-layer embeddings or experts, KV sharing and double-wide MLPs kept
    "gemma4_unified": ("Gemma4UnifiedTextConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16,
                                                       global_head_dim=32, layer_types=[S, F, S, F, F],
                                                       num_kv_shared_layers=2, use_double_wide_mlp=True, **_SLIDING)),
    # Gemma 4's mixture: 4 routed experts 40 wide beside each layer's dense MLP; its full layers' keys used as values
    # (attention_k_eq_v) on 1 KV head of their own (num_global_key_value_heads); no per-layer embeddings
    "gemma4_moe": ("Gemma4TextConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                                            layer_types=[S, F, S, F, F], hidden_size_per_layer_input=0,
                                            enable_moe_block=True, num_experts=4, top_k_experts=2,
                                            moe_intermediate_size=40, attention_k_eq_v=True,
                                            num_global_key_value_heads=1, **_SLIDING)),
    # hybrids: partial rotary (4 of 16 rows), q_proj [query | gate] per head; Qwen3-Next's layer 3 dense
    "qwen3_next": ("Qwen3NextConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16,
                                           layer_types=[F, L, F, L, F], num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=40, shared_expert_intermediate_size=80,
                                           mlp_only_layers=[3], **_LINEAR)),
    "qwen3_5": ("Qwen3_5TextConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16,
                                          layer_types=[F, L, F, L, F], **_LINEAR)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16,
                                                 layer_types=[F, L, F, L, F], num_experts=4, num_experts_per_tok=2,
                                                 moe_intermediate_size=40, shared_expert_intermediate_size=80,
                                                 **_LINEAR)),
    # OLMo-Hybrid: OLMo-3's attention layers 2, 4 (post-norms, q/k norms over the projection), Gated DeltaNet layers 0,
    # 1, 3 (2 key heads of 8, 2 value heads of 16) under pre-norms
    "olmo_hybrid": ("OlmoHybridConfig", dict(hidden_size=64, num_key_value_heads=2, layer_types=[L, L, F, L, F],
                                             linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
                                             linear_value_head_dim=16)),
    # Lara-Mini: Gated DeltaNet layers 0, 2 beside sliding (1, 4) and full (3) attention with per-head q/k norms, 4
    # experts in every layer beside a shared expert of its own width (32)
    "lara_mini": ("LaraMiniConfig", dict(hidden_size=48, num_key_value_heads=2, head_dim=16,
                                         layer_types=[L, S, L, F, S], num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=40,
                                         shared_expert_intermediate_size=32, **_LINEAR, **_SLIDING)),
}
CLASSES = {"phi": "PhiForCausalLM", "phi3": "Phi3ForCausalLM", "gemma": "GemmaForCausalLM",
           "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "ministral": "MinistralForCausalLM", "seed_oss": "SeedOssForCausalLM", "cohere2": "Cohere2ForCausalLM",
           "cohere": "CohereForCausalLM",
           "exaone4": "Exaone4ForCausalLM", "apertus": "ApertusForCausalLM",
           "apertus1p5_text": "Apertus1p5TextForCausalLM", "mamba": "MambaForCausalLM",
           "falcon_mamba": "FalconMambaForCausalLM", "mamba2": "Mamba2ForCausalLM", "glm": "GlmForCausalLM",
           "glm4": "Glm4ForCausalLM", "olmo2": "Olmo2ForCausalLM", "olmo3": "Olmo3ForCausalLM",
           "smollm3": "SmolLM3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
           "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM", "gpt_oss": "GptOssForCausalLM",
           "glm4_moe": "Glm4MoeForCausalLM", "dots1": "Dots1ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
           "glm4_moe_lite": "Glm4MoeLiteForCausalLM", "granite": "GraniteForCausalLM",
           "hyperclovax": "HyperCLOVAXForCausalLM", "olmo": "OlmoForCausalLM",
           "starcoder2": "Starcoder2ForCausalLM", "stablelm": "StableLmForCausalLM", "nemotron": "NemotronForCausalLM",
           "arcee": "ArceeForCausalLM", "lfm2": "Lfm2ForCausalLM", "lfm2_moe": "Lfm2MoeForCausalLM",
           "ernie4_5": "Ernie4_5ForCausalLM", "phimoe": "PhimoeForCausalLM", "falcon_h1": "FalconH1ForCausalLM",
           "granitemoehybrid": "GraniteMoeHybridForCausalLM", "nemotron_h": "NemotronHForCausalLM",
           "deepseek_v2": "DeepseekV2ForCausalLM", "bamba": "BambaForCausalLM", "granitemoe": "GraniteMoeForCausalLM",
           "granitemoeshared": "GraniteMoeSharedForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM",
           "qwen3_next": "Qwen3NextForCausalLM", "qwen3_5": "Qwen3_5ForCausalLM",
           "qwen3_5_moe": "Qwen3_5MoeForCausalLM", "ministral3": "Ministral3ForCausalLM", "cwm": "CwmForCausalLM",
           "helium": "HeliumForCausalLM", "hunyuan_v1_dense": "HunYuanDenseV1ForCausalLM", "jais2": "Jais2ForCausalLM",
           "vaultgemma": "VaultGemmaForCausalLM", "granite_swa": "GraniteSWAForCausalLM",
           "granitemoe_swa": "GraniteMoeSWAForCausalLM", "solar_open": "SolarOpenForCausalLM",
           "minimax_m2": "MiniMaxM2ForCausalLM", "hy_v3": "HYV3ForCausalLM", "afmoe": "AfmoeForCausalLM",
           "kolibri1": "Kolibri1ForCausalLM", "kolibri1_1": "Kolibri1_1ForCausalLM", "flint": "FlintForCausalLM",
           "opt": "OPTForCausalLM",
           "lara_mini": "LaraMiniForCausalLM", "olmo_hybrid": "OlmoHybridForCausalLM",
           "gpt_neox": "GPTNeoXForCausalLM",
           "cohere2_moe": "Cohere2MoeForCausalLM", "youtu": "YoutuForCausalLM", "persimmon": "PersimmonForCausalLM",
           "nanochat": "NanoChatForCausalLM", "mellum": "MellumForCausalLM", "flex_olmo": "FlexOlmoForCausalLM",
           "exaone_moe": "ExaoneMoeForCausalLM", "hunyuan_v1_moe": "HunYuanMoEV1ForCausalLM",
           "bloom": "BloomForCausalLM", "gptj": "GPTJForCausalLM", "gpt_bigcode": "GPTBigCodeForCausalLM",
           "gpt_bigcode_mha": "GPTBigCodeForCausalLM", "mpt": "MptForCausalLM", "falcon": "FalconForCausalLM",
           "falcon_new": "FalconForCausalLM", "falcon_rw": "FalconForCausalLM", "falcon_mha": "FalconForCausalLM",
           "gpt_neo": "GPTNeoForCausalLM", "minicpm3": "MiniCPM3ForCausalLM", "codegen": "CodeGenForCausalLM",
           "llama4": "Llama4ForCausalLM", "lfm3": "Lfm3ForCausalLM",
           "bitnet": "BitNetForCausalLM", "dbrx": "DbrxForCausalLM", "kimi_linear": "KimiLinearForCausalLM",
           "deepseek_v32": "DeepseekV32ForCausalLM", "glm_moe_dsa": "GlmMoeDsaForCausalLM", "axk1": "AXK1ForCausalLM",
           "minicpm5_moe": "MiniCPM5MoeForCausalLM", "mimo_v2_flash": "MiMoV2FlashForCausalLM",
           "laguna": "LagunaForCausalLM",
           "jamba": "JambaForCausalLM", "minimax": "MiniMaxForCausalLM", "gemma4": "Gemma4ForCausalLM",
           "gemma4_moe": "Gemma4ForCausalLM", "gemma4_unified": "Gemma4UnifiedForCausalLM"}
NAMES = list(CONFIGS)
# attention-free: no heads in their plans
MAMBA_CLASSES = {"MambaForCausalLM", "FalconMambaForCausalLM", "Mamba2ForCausalLM"}
# classes the tables name that came after transformers 5.17 (pyproject's minimum, the GPU machine's): under an older
# release their tests skip (`make_teacher`) and the tables' check allows them missing
LATER_CLASSES = {"Lfm3ForCausalLM", "MiniCPM5MoeForCausalLM", "Kolibri1ForCausalLM", "Kolibri1_1ForCausalLM",
                 "FlintForCausalLM", "LaraMiniForCausalLM", "Apertus1p5TextForCausalLM"}


def make_teacher(family, seed=0, **overrides):
    """A seeded tiny teacher of `family`; every parameter and persistent buffer redrawn (norm weights and Gemma 4's
    layer scales 1 + N(0, 0.1), the rest N(0, 0.1)), so a tensor that is not copied cannot equal its source by
    accident."""
    name, extra = CONFIGS[family]
    if not hasattr(transformers, name):  # a family of a later transformers (LATER_CLASSES)
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    config = getattr(transformers, name)(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, param in [*model.named_parameters(), *_persistent_buffers(model).items()]:
            noise = torch.randn(param.shape, generator=generator) * 0.1
            scale = param.ndim == 1 and pname.endswith(("weight", "layer_scalar"))  # norms', Gemma 4's layer scale
            param.copy_(1.0 + noise if scale else noise)
    return model.eval()


def _reload(folder):
    """``from_pretrained(folder)`` with its tensors in memory of their own, for bit-for-bit comparisons of its outputs.

    safetensors leaves loaded tensors at their byte offsets in the file (8-byte aligned), and MKL's float32 GEMM may
    round differently at other operand alignments (its Conditional Numerical Reproducibility; ``MKL_CBWR=AUTO,STRICT``
    removes it): on an AMD EPYC a Qwen3-Next student and its reloaded copy, bit-identical tensors, gave logits 1.7e-6
    apart. The built student's tensors are the allocator's (64-byte aligned), as these copies are."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:  # tied parameters once: they stay one
            tensor.data = tensor.data.clone()
    return model


def _global(config, key, default=None):
    """The config's own ``key``, also where some layers override it (transformers 5's per_layer_config: Gemma 4's
    head_dim, which transformers refuses to read as one value)."""
    if key in (getattr(config, "per_layer_attributes", None) or ()) or key == "per_layer_config":  # (a view: its dict)
        return config.to_dict().get(key, default)
    return getattr(config, key, default)


def _persistent_buffers(model) -> dict:
    """The buffers a model saves (GLM-4.5's e_score_correction_bias, Apertus' xIELU constants), by name."""
    saved = set(model.state_dict())
    return {name: b for name, b in model.named_buffers() if name in saved}


def _ids(seed=0, shape=(2, 13)):
    return torch.randint(0, TINY_VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():  # no cache: Nemotron-H's hybrid cache fails in a plain forward (transformers 5.25)
        return model.eval()(ids, use_cache=False).logits


def _layer_types(model):
    return getattr(model.config, "layer_types", None) or getattr(model.config, "attention_layers", None)  # GPT-Neo


_LAYER_PREFIXES = ("model.layers.", "model.decoder.layers.", "gpt_neox.layers.", "transformer.h.",  # + OPT, NeoX, Bloom
                   "transformer.blocks.", "backbone.layers.")  # MPT, Mamba


def _split_layer(name):
    """(prefix, layer index, the rest) of a per-layer parameter name; (None, None, None) for a global one."""
    for prefix in _LAYER_PREFIXES:
        m = re.fullmatch(re.escape(prefix) + r"(\d+)\.(.+)", name)
        if m:
            return prefix, int(m.group(1)), m.group(2)
    return None, None, None


def _decoder_layers(model):
    base = model.base_model
    if base is model:  # Llama 4: its classes' base_model_prefix names the multimodal model's part, not .model
        base = model.model
    for name in ("layers", "h", "blocks"):  # most families, Bloom / GPT-J / GPT-BigCode, MPT
        if hasattr(base, name):
            return getattr(base, name)
    return base.decoder.layers  # OPT


# --------------------------------------------------------------------------- an independent reference slicer
# Written with reshapes to [heads, head_dim, ...] and the families' own module names, not with tailkd's tables.

def _heads(w, hd, heads, rows):
    """w [n_heads*hd, ...] -> the given heads, the given rows of each, flattened back."""
    return w.reshape(-1, hd, *w.shape[1:])[heads][:, rows].reshape(-1, *w.shape[1:])


GEMMA4_CLASSES = ("Gemma4ForCausalLM", "Gemma4UnifiedForCausalLM")  # the unified one: no per-layer inputs, no experts


def _expected(name, teacher, plan):
    """The value a student parameter must hold: the teacher's tensor, sliced as the student docstring says."""
    t = {**dict(teacher.named_parameters()), **_persistent_buffers(teacher)}
    prefix, i, rest = _split_layer(name)
    if prefix is not None and type(teacher).__name__ in GEMMA4_CLASSES:  # its full layers' heads of their own
        layer, c = plan["layers"][i], teacher.config
        own = {int(k): v for k, v in (_global(c, "per_layer_config") or {}).items()}.get(layer)
        if own:  # heads of global_head_dim rows (and KV heads of their own), the plan's ``full`` slices of them
            kv = own.get("num_key_value_heads", plan["KV_t"])
            full = plan["full"] or dict(hd_s=own["head_dim"], rows=list(range(own["head_dim"])),
                                        kv_heads=list(range(kv)))
            plan = {**plan, "hd_t": own["head_dim"], "KV_t": kv, **full}
    if prefix is not None and plan["per_layer"].get(plan["layers"][i]):  # a layer's own heads (Laguna's)
        plan = {**plan, **plan["per_layer"][plan["layers"][i]]}
    d, ff, hd_t = plan["d"], plan["ff"], plan["hd_t"]  # d: the residual channels kept (LongTensor)

    def rd(x, dim):  # the kept residual channels along dim
        return x.index_select(dim, d)
    if prefix is not None and isinstance(plan["q_heads"], dict):  # per teacher layer (attention_heads "active")
        layer = plan["layers"][i]
        plan = {**plan, "q_heads": plan["q_heads"].get(layer), "kv_heads": plan["kv_heads"].get(layer)}
    if prefix is None:
        w = t[name]
        n_layers = teacher.config.num_hidden_layers
        if name == "model.embed_tokens_per_layer.weight":  # Gemma 4: [vocab, layers x per-layer width]
            return w.reshape(w.shape[0], n_layers, -1)[:, plan["layers"]].reshape(w.shape[0], -1)
        if name == "model.per_layer_model_projection.weight":  # [layers x per-layer width, d]
            return rd(w.reshape(n_layers, -1, w.shape[1])[plan["layers"]].reshape(-1, w.shape[1]), 1)
        if name == "model.per_layer_projection_norm.weight":  # over one layer's block
            return w
        if name in ("model.embed_tokens.weight", "model.embeddings.weight", "lm_head.weight",
                    "model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight",
                    "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight", "transformer.wte.weight",
                    "transformer.wpe.weight", "backbone.embeddings.weight"):
            return rd(w, 1)
        return w if name == "lm_head.bias" else rd(w, 0)  # final norm weight / bias
    if m := re.fullmatch(r"self_attn\.([qk])_layernorm\.norms\.(\d+)\.(weight|bias)", rest):  # StableLM's modules
        heads = plan["q_heads"] if m[1] == "q" else plan["kv_heads"]  # per head: the teacher head's, its kept rows
        teacher_head = heads[int(m[2])]
        return t[f"{prefix}{plan['layers'][i]}.self_attn.{m[1]}_layernorm.norms.{teacher_head}.{m[3]}"][plan["rows"]]
    w = t[f"{prefix}{plan['layers'][i]}.{rest}"]
    mixer_name, _, part = rest.partition(".")
    if mixer_name in ("mamba", "mixer") and _is_mamba2(mixer := teacher.get_submodule(
            f"{prefix}{plan['layers'][i]}.{mixer_name}")):  # a Mamba-2 mixer's tensor: its kept heads
        ssm = plan["ssm"]
        return _mamba2_slice(part, w, mixer, ssm.get(plan["layers"][i]) if isinstance(ssm, dict) else ssm, rd)
    if type(teacher).__name__ in GEMMA4_CLASSES:
        if rest == "layer_scalar":  # its output scale
            return w
        if rest == "post_per_layer_input_norm.weight":  # over the residual stream
            return rd(w, 0)
        if rest.startswith("per_layer_input_gate.") or rest.startswith("per_layer_projection."):  # in / out of the
            return rd(w, 1) if rest.startswith("per_layer_input_gate.") else rd(w, 0)  # layer's per-layer input
        if rest == "router.proj.weight":  # one row per expert
            return rd(w[plan["experts"]], 1)
        if rest in ("router.scale", "router.per_expert_scale"):  # over the residual stream; one per expert
            return rd(w, 0) if rest == "router.scale" else w[plan["experts"]]
        if rest.startswith("experts."):  # the rules of the other mixtures' experts
            rest = "mlp." + rest
        elif rest.startswith("mlp.") and not plan["moe"]:  # a KV-shared layer's MLP twice as wide: twice the units
            down = rest.startswith("mlp.down_proj")
            units = ff * (w.shape[1 if down else 0] // teacher.config.intermediate_size)
            return rd(w[:, :units], 0) if down else rd(w[:units], 1)
        rest = rest.replace("feedforward_layernorm_1", "feedforward_layernorm").replace(
            "feedforward_layernorm_2", "feedforward_layernorm")  # the experts' norms: over the residual stream
    if rest.startswith("attn.c_attn"):  # GPT-BigCode: [q | k | v] with one KV head, or (no multi_query) per head
        rest = rest.replace("attn.c_attn", "self_attn.qkv_proj" if teacher.config.multi_query else "a.query_key_value")
    c = teacher.config
    if rest.startswith("self_attention.query_key_value") and getattr(c, "new_decoder_architecture", False):
        g_t = plan["H_t"] // plan["KV_t"]  # Falcon-40B: per KV head [its g_t queries | k | v]
        groups = w.reshape(plan["KV_t"], g_t + 2, hd_t, *w.shape[1:])
        kept = torch.cat([torch.cat([*(groups[k, h % g_t][plan["rows"]] for h in plan["q_heads"] if h // g_t == k),
                                     groups[k, g_t][plan["rows"]], groups[k, g_t + 1][: plan["hd_s"]]])
                          for k in plan["kv_heads"]])
        return rd(kept, 1) if rest.endswith("weight") else kept
    if rest.startswith("self_attention.query_key_value") and getattr(c, "multi_query", False):  # Falcon-7B's
        rest = rest.replace("self_attention.query_key_value", "self_attn.qkv_proj")
    if rest == "attn.qkv_proj.weight" and type(teacher).__name__ == "CodeGenForCausalLM":  # [block, q|v|k, head, row]
        per = plan["H_t"] // 4
        blocks = w.reshape(4, 3, per, hd_t, w.shape[1])
        kept = [blocks[b, part, h % per][rows] for b in range(4) for part, rows in (
                (0, plan["rows"]), (1, list(range(plan["hd_s"]))), (2, plan["rows"]))
                for h in plan["q_heads"] if h // per == b]  # each block's kept heads, q then v then k
        return rd(torch.cat(kept), 1)
    if rest.split(".")[1] == "query_key_value":  # GPT-NeoX, Persimmon: [q | k | v] blocks per head, one KV head each
        blocks = w.reshape(plan["H_t"], 3, hd_t, *w.shape[1:])[plan["q_heads"]]
        kept = torch.stack([blocks[:, 0][:, plan["rows"]], blocks[:, 1][:, plan["rows"]],
                            blocks[:, 2][:, : plan["hd_s"]]], dim=1)
        kept = kept.reshape(-1, *w.shape[1:])
        return rd(kept, 1) if rest.endswith("weight") else kept
    module, kind = rest.rsplit(".", 1)
    renamed = {"attention.dense": "self_attn.o_proj", "self_attention.dense": "self_attn.o_proj",  # GPT-NeoX, Bloom
               "mlp.dense_h_to_4h": "mlp.fc1",  # GPT-NeoX's, Bloom's, OPT's names
               "mlp.dense_4h_to_h": "mlp.fc2", "fc1": "mlp.fc1", "fc2": "mlp.fc2", "mlp.fc_in": "mlp.fc1",  # GPT-J
               "mlp.fc_out": "mlp.fc2", "attn.q_proj": "self_attn.q_proj", "attn.attention.q_proj": "self_attn.q_proj",
               "attn.attention.k_proj": "self_attn.k_proj", "attn.attention.v_proj": "self_attn.v_proj",
               "attn.attention.out_proj": "self_attn.o_proj", "attn.k_proj": "self_attn.k_proj",
               "attn.v_proj": "self_attn.v_proj", "attn.out_proj": "self_attn.o_proj",
               "attn.c_proj": "self_attn.o_proj", "attn.Wqkv": "self_attn.qkv_proj",  # GPT-BigCode, MPT
               "ffn.up_proj": "mlp.fc1", "ffn.down_proj": "mlp.fc2"}.get(module)
    rest = f"{renamed}.{kind}" if renamed else rest
    if type(teacher).__name__ in MAMBA_CLASSES and rest.startswith("mixer."):  # expand x hidden_size channels: the
        part = rest.removeprefix("mixer.")  # first ff of them (expand x the student's hidden_size)
        if part == "in_proj.weight":  # [x | z], ff channels each, over the residual stream
            x, z = w.chunk(2)
            return rd(torch.cat([x[:ff], z[:ff]]), 1)
        if part in ("out_proj.weight", "x_proj.weight"):  # reading the channels: [d, channels], [dt + 2 state, ...]
            return rd(w[:, :ff], 0) if part == "out_proj.weight" else w[:, :ff]
        return w[:ff]  # dt_proj, the convolution, A_log, D: a row per channel
    if rest.startswith("mixer."):  # Nemotron-H's one mixer per layer: the rules of its kind
        tail = rest.removeprefix("mixer.")
        kind = tail.split(".")[0]
        rest = ("mamba." if kind in ("in_proj", "out_proj", "conv1d", "dt_bias", "A_log", "D", "norm") else
                "self_attn." if kind in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp.") + tail
        rest = rest.replace("mlp.shared_experts.", "mlp.shared_expert.")  # a width of its own: Qwen's whole-width rule
    if type(teacher).__name__ == "Llama4ForCausalLM" and rest.startswith("feed_forward."):  # experts: in before out
        part, experts, ff_e = rest.removeprefix("feed_forward."), plan["experts"], plan["ff_e"]
        if part == "router.weight":  # [E, d]
            return rd(w[experts], 1)
        if part == "experts.gate_up_proj":  # [E, d, gate | up]
            gate, up = w[experts].chunk(2, dim=2)
            return rd(torch.cat([gate[..., :ff_e], up[..., :ff_e]], dim=2), 1)
        if part == "experts.down_proj":  # [E, ff, d]
            return rd(w[experts, :ff_e], 2)
        if part.startswith("shared_expert."):  # as wide as each expert: it narrows with them
            return rd(w[:, :ff_e], 0) if ".down_proj" in part else rd(w[:ff_e], 1)
        return rd(w, 0) if part.startswith("down_proj") else rd(w, 1)  # a dense layer's MLP: its own width, whole
    if type(teacher).__name__ == "DbrxForCausalLM":  # MPT's block names; experts flattened as [E x ff, d]
        if rest.startswith("ffn.experts.mlp."):
            per_expert = w.reshape(teacher.config.ffn_config.moe_num_experts, -1, w.shape[1])
            return rd(per_expert[plan["experts"], : plan["ff_e"]].reshape(-1, w.shape[1]), 1)
        if rest == "ffn.router.layer.weight":
            return rd(w[plan["experts"]], 1)
        rest = rest.replace("norm_attn_norm.attn.Wqkv", "self_attn.qkv_proj").replace(
            "norm_attn_norm.attn.out_proj", "self_attn.o_proj").replace("norm_attn_norm.", "")
    if type(teacher).__name__ == "JambaForCausalLM" and rest.startswith("feed_forward."):  # the rules of mlp.: routed
        rest = "mlp." + rest.removeprefix("feed_forward.")  # experts (their width intermediate_size), or a dense MLP
    if plan["moe"] and rest.startswith("feed_forward."):  # LFM2-MoE: the rules of the other mixtures' mlp.
        rest = "mlp." + rest.removeprefix("feed_forward.")
    if rest.startswith("block_sparse_moe."):  # Granite 4.0-H's routed experts: likewise
        rest = "mlp." + rest.removeprefix("block_sparse_moe.")
    experts, ff_e = plan["experts"], plan["ff_e"]
    if type(teacher).__name__ == "GptOssForCausalLM":
        if rest in ("mlp.router.weight", "mlp.router.bias"):  # [E, d] and [E]
            return rd(w[experts], 1) if rest.endswith("weight") else w[experts]
        if rest.startswith("mlp.experts.gate_up_proj"):  # [E, d, 2 ff] / [E, 2 ff]: (gate, up) pairs
            w = rd(w[experts], 1) if rest.endswith("proj") else w[experts]
            return w.reshape(*w.shape[:-1], -1, 2)[..., :ff_e, :].flatten(-2)
        if rest.startswith("mlp.experts.down_proj"):  # [E, ff, d] / [E, d]
            return rd(w[experts, :ff_e], 2) if rest.endswith("proj") else rd(w[experts], 1)
    if rest == "self_attn.sinks":  # GPT-OSS, Granite-SWA: one per query head
        return w[plan["q_heads"]]
    if rest in ("mlp.gate.weight", "mlp.router.weight", "mlp.gate.wg.weight", "mlp.router.gate.weight"):  # the router:
        # one row per expert
        return rd(w[experts], 1)
    if rest in ("mlp.gate.e_score_correction_bias", "mlp.expert_bias", "mlp.e_score_correction_bias"):  # per expert
        return w[experts]
    if rest == "mlp.gate.moe_statics.e_score_correction_bias":  # ERNIE 4.5's [1, E]
        return w[:, experts]
    if rest == "mlp.experts.gate_up_proj":  # [E, gate | up, d]
        gate, up = w[experts].chunk(2, dim=1)
        return rd(torch.cat([gate[:, :ff_e], up[:, :ff_e]], dim=1), 2)
    if rest == "mlp.experts.down_proj":  # [E, d, ff]
        return rd(w[experts, :, :ff_e], 1)
    if rest == "mlp.experts.up_proj":  # Nemotron-H's ungated experts [E, ff, d]
        return rd(w[experts, :ff_e], 2)
    if rest.startswith("mlp.shared_mlp."):  # HunYuan-MoE's: as wide as its experts, it narrows with them
        return rd(w[:, :ff_e], 0) if ".down_proj" in rest else rd(w[:ff_e], 1)
    if rest.startswith("mlp.shared_experts.") and getattr(teacher.config, "shared_expert_intermediate_size", None):
        return rd(w, 0) if ".down_proj" in rest else rd(w, 1)  # Laguna's: a width of its own, kept
    if rest.startswith("mlp.shared_experts."):  # one MLP of n_shared_experts routed widths: its first units
        c = teacher.config
        units = ff_e * next(getattr(c, k) for k in ("n_shared_experts", "moe_num_shared_experts", "num_shared_experts")
                            if getattr(c, k, None))
        if rest.endswith(".bias"):
            return rd(w, 0) if ".down_proj" in rest else w[:units]
        return rd(w[:, :units], 0) if ".down_proj" in rest else rd(w[:units], 1)
    if type(teacher).__name__ == "MiniMaxForCausalLM" and rest.startswith("self_attn.") and not rest.startswith(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")):  # a lightning layer's
        q, first = plan["q_heads"], list(range(plan["hd_s"]))
        if rest == "self_attn.qkv_proj.weight":  # [q | k | v] per head
            blocks = w.reshape(plan["H_t"], 3, hd_t, -1)[q]
            kept = [blocks[:, 0][:, plan["rows"]], blocks[:, 1][:, plan["rows"]], blocks[:, 2][:, first]]
            return rd(torch.stack(kept, dim=1).reshape(-1, w.shape[1]), 1)
        if rest == "self_attn.out_proj.weight":
            return rd(w, 0).reshape(len(d), -1, hd_t)[:, q][:, :, first].reshape(len(d), -1)
        if rest in ("self_attn.output_gate.weight", "self_attn.norm.weight"):  # the heads' output rows
            return _heads(w, hd_t, q, first) if rest.endswith("norm.weight") else rd(_heads(w, hd_t, q, first), 1)
        return w[:, q] if rest == "self_attn.diagonal_decay" else w[q]  # per-head decays
    if rest.startswith("self_attn.indexer."):  # DeepSeek-V3.2's DSA indexer keeps its sizes: its residual side narrows
        return rd(w, 1) if rest in ("self_attn.indexer.wk.weight", "self_attn.indexer.weights_proj.weight") else w
    if type(teacher).__name__ == "MiMoV2FlashForCausalLM" and rest in ("self_attn.v_proj.weight",
                                                                      "self_attn.o_proj.weight"):
        v_hd = teacher.config.v_head_dim  # value heads of their own size, v_hd x hd_s / hd_t rows in the student's: the
        v_s = v_hd * plan["hd_s"] // hd_t  # first rows of the kept KV heads' and of the kept query heads' blocks
        if rest == "self_attn.v_proj.weight":
            return rd(_heads(w, v_hd, plan["kv_heads"], list(range(v_s))), 1)
        return rd(w, 0).reshape(len(d), -1, v_hd)[:, plan["q_heads"], :v_s].reshape(len(d), -1)
    if (type(teacher).__name__ == "KimiLinearForCausalLM" and rest.startswith("self_attn.")
            and teacher.config.layer_types[plan["layers"][i]] == "linear_attention"):  # Kimi Delta Attention: its heads
        # whole (its latent layers' narrow as latent attention's, below), only the
        inputs = ("q_proj", "k_proj", "v_proj", "b_proj", "g_a_proj", "f_a_proj", "q_a_proj", "kv_a_proj_with_mqa",
                  "g_proj")
        if rest.endswith(tuple(f".{name}.weight" for name in inputs)):  # residual side narrows, in either kind
            return rd(w, 1)
        return rd(w, 0) if rest == "self_attn.o_proj.weight" else w
    if plan["latent"] and rest.startswith("self_attn."):  # latent attention: whole heads, the latent's sizes kept
        if rest in ("self_attn.q_proj.weight", "self_attn.q_b_proj.weight", "self_attn.kv_b_proj.weight"):
            per_head = w.reshape(plan["H_t"], -1, w.shape[1])[plan["q_heads"]].reshape(-1, w.shape[1])
            return rd(per_head, 1) if rest == "self_attn.q_proj.weight" else per_head
        if rest == "self_attn.o_proj.weight":
            return rd(w, 0).reshape(len(d), plan["H_t"], -1)[:, plan["q_heads"]].reshape(len(d), -1)
        if rest in ("self_attn.q_a_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"):
            return rd(w, 1)
        if rest in ("self_attn.q_a_layernorm.weight", "self_attn.kv_a_layernorm.weight"):
            return w
    if rest.startswith("conv."):  # LFM2's short convolution: channel by channel, in_proj = [B | C | x]
        if rest.startswith("conv.in_proj"):
            blocks = rd(w.reshape(3, -1, *w.shape[1:]), 1)
            return rd(blocks.reshape(-1, *w.shape[1:]), 1) if rest.endswith("weight") else blocks.reshape(-1)
        return rd(rd(w, 0), 1) if rest == "conv.out_proj.weight" else rd(w, 0)
    if rest.startswith("shared_mlp."):  # [gate | up] and its output: whole beside experts, else the MLP, narrowed
        units = (w.shape[1] if "output" in rest else w.shape[0] // 2) if teacher.config.num_local_experts else ff
        if "output" in rest:
            return rd(w[:, :units], 0)
        gate, up = w.chunk(2)
        return rd(torch.cat([gate[:units], up[:units]]), 1)
    if rest.startswith("mamba.") and type(teacher).__name__ == "JambaForCausalLM":  # Mamba-1: its kept channels
        ssm = plan["ssm"]
        return _mamba1_slice(rest.removeprefix("mamba."), w, ssm.get(plan["layers"][i]) if isinstance(ssm, dict)
                             else ssm, rd)
    if rest == "self_attn.g_proj.weight" and w.shape[0] == plan["H_t"]:  # LFM3's, Laguna's output gate: per head
        return rd(w[plan["q_heads"]], 1)
    if rest in ("self_attn.g_proj.weight", "self_attn.gate_proj.weight"):  # Laguna's, AFMoE's per-element gate: the
        # rows of each kept head's output
        return rd(_heads(w, hd_t, plan["q_heads"], list(range(plan["hd_s"]))), 1)
    if rest.startswith("feed_forward.") and type(teacher).__name__ == "Lfm3ForCausalLM":  # w1, w3 [ff, d]; w2 [d, ff]
        return rd(w[:, :ff], 0) if rest == "feed_forward.w2.weight" else rd(w[:ff], 1)
    if rest.startswith("feed_forward.") and type(teacher).__name__ in ("FalconH1ForCausalLM", "BambaForCausalLM"):
        rest = "mlp." + rest.removeprefix("feed_forward.")
    if rest.startswith("feed_forward."):  # LFM2's MLP: the width its model makes of intermediate_size
        c = teacher.config
        units = c.block_multiple_of * -(-int(c.block_ffn_dim_multiplier * int(2 * ff / 3)) // c.block_multiple_of)
        return rd(w[:, :units], 0) if rest == "feed_forward.w2.weight" else rd(w[:units], 1)
    if rest.startswith("linear_attn."):  # Gated DeltaNet keeps its own sizes: only the residual side narrows
        if rest.startswith(("linear_attn.in_proj_", *(f"linear_attn.{p}_proj" for p in "qkvabg"))):  # OLMo-Hybrid's
            return rd(w, 1)
        return rd(w, 0) if rest in ("linear_attn.out_proj.weight", "linear_attn.o_proj.weight") else w
    if rest in ("self_attn.q_proj.weight", "self_attn.q_gate_proj.weight") and w.shape[0] == 2 * plan["H_t"] * hd_t:
        # [query | gate] per head (Qwen3-Next, Qwen3.5; MiniCPM5-MoE's q_gate_proj)
        per_head = w.reshape(plan["H_t"], 2, hd_t, -1)[plan["q_heads"]]
        query, gate = per_head[:, 0][:, plan["rows"]], per_head[:, 1][:, : plan["hd_s"]]
        return rd(torch.cat([query, gate], dim=1).reshape(-1, w.shape[1]), 1)
    # the whole-width MLPs of a mixture (Qwen-MoE's, LFM2-MoE's w1-3): the residual side only
    whole_width = ("mlp.shared_expert", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.w")
    if rest.startswith(whole_width) and plan["moe"]:
        if rest.endswith(".bias"):
            return rd(w, 0) if ".down_proj" in rest else w
        return rd(w, 0) if ".down_proj" in rest or rest.startswith("mlp.w2") else rd(w, 1)
    module, kind = rest.rsplit(".", 1)
    q, kv, rows, first = plan["q_heads"], plan["kv_heads"], plan["rows"], list(range(plan["hd_s"]))
    cols = (lambda x: rd(x, 1)) if kind == "weight" else (lambda x: x)
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        heads = q if module.endswith("q_proj") else kv
        return cols(_heads(w, hd_t, heads, first if module.endswith("v_proj") else rows))
    if module == "self_attn.qkv_proj":  # [q | k | v] blocks
        n_q, n_kv = plan["H_t"] * hd_t, plan["KV_t"] * hd_t
        parts = (_heads(w[:n_q], hd_t, q, rows), _heads(w[n_q:n_q + n_kv], hd_t, kv, rows),
                 _heads(w[n_q + n_kv:], hd_t, kv, first))
        return cols(torch.cat(parts))  # GPT-BigCode's c_attn has a bias
    if module in ("self_attn.o_proj", "self_attn.dense", "self_attn.out_proj"):
        if kind == "bias":
            return rd(w, 0)
        return rd(w, 0).reshape(len(d), -1, hd_t)[:, q][:, :, plan.get("o_rows") or first].reshape(len(d), -1)
    if module in ("self_attn.q_norm", "self_attn.k_norm") and w.ndim == 2:  # Cohere: [heads, head_dim]
        return w[q if module.endswith("q_norm") else kv][:, rows]
    if module in ("self_attn.q_norm", "self_attn.k_norm") and w.shape[0] != hd_t:  # OLMo-2: the whole projection
        return _heads(w, hd_t, q if module.endswith("q_norm") else kv, rows)
    if module in ("self_attn.q_norm", "self_attn.k_norm", "self_attn.q_layernorm", "self_attn.k_layernorm",
                  "self_attn.query_layernorm", "self_attn.key_layernorm"):
        return w[rows]  # per head
    if module == "self_attn.attn_sub_norm":  # BitNet: the attention's output, per kept query head its first rows
        return _heads(w, hd_t, q, first)
    if module == "mlp.ffn_sub_norm":  # BitNet: the MLP's units
        return w[:ff]
    if module == "mlp.gate_up_proj":
        gate, up = w.chunk(2)
        return rd(torch.cat([gate[:ff], up[:ff]]), 1)
    if module in ("mlp.gate_proj", "mlp.up_proj", "mlp.fc1", "mlp.c_fc"):
        return cols(w[:ff])
    if module in ("mlp.down_proj", "mlp.fc2", "mlp.c_proj"):
        return rd(w[:, :ff], 0) if kind == "weight" else rd(w, 0)
    if module.endswith(("layernorm", "layer_norm", "operator_norm", "ffn_norm")) or module in (
            "norm", "ln_1", "ln_2", "norm_1", "norm_2", "ln_attn", "ln_mlp", "post_norm1", "post_norm2"):
        return rd(w, 0)
    if module == "mlp.act_fn":  # Apertus' xIELU: learned scalars
        return w
    raise AssertionError(f"the reference has no rule for {name}")


def _is_mamba2(module):
    """Whether ``module`` is a Mamba-2 mixer (heads in groups, dt per head; a Gated DeltaNet has a dt_bias too)."""
    return all(hasattr(module, name) for name in ("in_proj", "conv1d", "dt_bias", "A_log", "D", "n_groups", "head_dim"))


def _mamba2_slice(part, w, mixer, kept, rd):
    """A Mamba-2 mixer's tensor ``part`` (of the teacher's ``mixer``: in_proj = [z | x | B | C | dt], its convolution
    over [x | B | C], one dt_bias / A_log / D per head, the gated norm and out_proj over the heads' channels) keeping
    the teacher heads ``kept`` (None: all), B and C whole; ``rd`` cuts the residual side."""
    heads, hd, width = mixer.num_heads, mixer.head_dim, mixer.intermediate_size
    kept = list(range(heads)) if kept is None else kept
    channels = [h * hd + r for h in kept for r in range(hd)]
    if part.startswith("in_proj."):
        z, x, bc, dt = w.split([width, width, w.shape[0] - 2 * width - heads, heads])
        cut = torch.cat([z[channels], x[channels], bc, dt[kept]])
        return rd(cut, 1) if part.endswith("weight") else cut
    if part.startswith("conv1d."):
        x, bc = w.split([width, w.shape[0] - width])
        return torch.cat([x[channels], bc])
    if part in ("dt_bias", "A_log", "D"):
        return w[kept]
    if part == "norm.weight":
        return w[channels]
    return rd(w[:, channels], 0) if part == "out_proj.weight" else rd(w, 0)  # out_proj's bias: the residual side


def _mamba1_slice(part, w, kept, rd):
    """A Mamba-1 mixer's tensor ``part`` (Jamba's: in_proj = [x | z], every other tensor with one entry per channel
    but out_proj's and x_proj's inputs, and the dt, B and C norms over dt_rank and the state) keeping the teacher
    channels ``kept`` (None: all); ``rd`` cuts the residual side."""
    if part == "out_proj.bias":  # the residual side
        return rd(w, 0)
    kept = list(range(w.shape[0] // 2 if part.startswith("in_proj.") else w.shape[-1] if part in (
        "out_proj.weight", "x_proj.weight") else w.shape[0])) if kept is None else kept
    if part.startswith("in_proj."):
        x, z = w.chunk(2)
        return rd(torch.cat([x[kept], z[kept]]), 1) if part.endswith("weight") else torch.cat([x[kept], z[kept]])
    if part in ("out_proj.weight", "x_proj.weight"):
        return rd(w[:, kept], 0) if part == "out_proj.weight" else w[:, kept]
    if part.endswith("layernorm.weight"):
        return w
    return w[kept]  # the convolution, dt_proj, A_log, D


def _plan(teacher, layers, *, d=None, hd_s=None, q_heads=None, kv_heads=None, rows=None, ff=None, ff_e=None,
          experts=None, full=None, per_layer=None, ssm=None):
    """The reference's slices: ``d`` the residual channels, ``ff`` a dense MLP's units, ``ff_e`` and ``experts`` a
    mixture's expert width and routed experts kept (``d`` and ``experts`` a number: the first ones; or the teacher's
    indices); ``full``: Gemma 4's full attention layers' own (hd_s, rows, q_heads, kv_heads, o_rows: the rows of each
    kept head o reads); ``per_layer``: {teacher layer: its own of these} (Laguna's query heads per layer, H_t);
    ``ssm``: the Mamba-2 heads kept (None: all; or {teacher layer: its own})."""
    c = teacher.config
    hd_t = _global(c, "head_dim") or c.hidden_size // c.num_attention_heads
    hd_s = hd_s or hd_t
    kv_t = _global(c, "num_key_value_heads") or c.num_attention_heads  # OPT, GPT-NeoX: one per query head
    grouped = getattr(c, "new_decoder_architecture", False)  # Falcon-40B (transformers 5.17: no num_key_value_heads)
    kv_t = c.num_kv_heads if grouped else 1 if getattr(c, "multi_query", False) else kv_t  # GPT-BigCode's, Falcon-7B's
    # multi-query attention: one KV head
    moe = (getattr(c, "num_experts_per_tok", None) is not None and getattr(c, "num_local_experts", 1) != 0
           and "moe" in (getattr(c, "layers_block_type", None) or ["moe"])  # Granite 4.0-H, Nemotron-H: dense too
           or getattr(c, "enable_moe_block", False))  # Gemma 4's experts beside each layer's MLP
    ffn = getattr(c, "ffn_config", None)  # DBRX: a mixture's sizes in its sub-config
    if ffn is not None:
        ff_e, experts = ff_e or ffn.ffn_hidden_size, experts or ffn.moe_num_experts
    d = torch.arange(d or c.hidden_size) if d is None or isinstance(d, int) else torch.as_tensor(d)
    return dict(layers=layers, d=d, latent=hasattr(c, "kv_lora_rank"), ssm=ssm,
                ff=ff or getattr(c, "ffn_hidden_size", None) or getattr(c, "intermediate_size", None)  # Falcon's
                or 4 * c.hidden_size,  # Bloom: 4 x hidden_size
                hd_t=hd_t, hd_s=hd_s, moe=moe,
                ff_e=ff_e or getattr(c, "moe_intermediate_size", c.intermediate_size),
                experts=_first(experts or next((getattr(c, k) for k in ("num_experts", "n_routed_experts",
                                                                       "num_local_experts") if getattr(c, k, None)),
                                               None)),
                H_t=c.num_attention_heads, KV_t=kv_t,
                q_heads=q_heads if q_heads is not None else list(range(c.num_attention_heads)),
                kv_heads=kv_heads if kv_heads is not None else list(range(kv_t)),
                rows=rows if rows is not None else list(range(hd_s)), full=full,
                per_layer=per_layer if per_layer is not None else {  # Laguna's layers of other heads: all kept;
                    i: dict(H_t=h, q_heads=list(range(h))) for i, h in enumerate(  # MiMo-V2-Flash's sliding layers'
                        getattr(c, "num_attention_heads_per_layer", None) or []) if h != c.num_attention_heads} | {
                    i: dict(KV_t=2 * kv_t, kv_heads=list(range(2 * kv_t))) for i, kind in enumerate(  # twice the KV
                        c.layer_types if type(teacher).__name__ == "MiMoV2FlashForCausalLM" else [])  # heads, all kept
                    if kind == "sliding_attention"})


def _in_mlp(name):
    """Whether a parameter is the MLP's (mlp_init): under mlp. (LFM2: feed_forward.; Granite 4.0-H: two modules; OPT:
    fc1, fc2; MPT: ffn.; Gemma 4: its router and experts too)."""
    modules = ("mlp", "feed_forward", "block_sparse_moe", "shared_mlp", "fc1", "fc2", "ffn", *(f"mixer.{m}" for m in (
        "up_proj", "down_proj", "gate", "experts", "shared_experts")),  # Nemotron-H's
               "router", "experts")  # Gemma 4's, beside its MLP
    return any(f".{module}." in name for module in modules)


def _first(experts):
    """Expert indices: n -> the first n (None: a dense model)."""
    return list(range(experts)) if isinstance(experts, int) else experts


def _assert_copied_exactly(student, table, teacher, plan):
    """Every copied tensor, name by name, equals the reference slice; random ones are MLP tensors only. Persistent
    buffers (not in the table) likewise: copied, or under a random MLP the student's own."""
    actions = {row["name"]: row["action"] for row in table}
    params = dict(student.named_parameters())
    assert list(actions) == list(params)
    random_mlp = "random" in actions.values()
    for name, param in [*params.items(), *_persistent_buffers(student).items()]:
        if actions.get(name) == "random" or (name not in actions and random_mlp and _in_mlp(name)):
            assert _in_mlp(name), name
            assert not torch.equal(param, _expected(name, teacher, plan)), name
            continue
        want = _expected(name, teacher, plan)
        assert param.shape == want.shape and torch.equal(param, want), name


# --------------------------------------------------------------------------- the tables


def test_tables_name_existing_classes_and_known_axes():
    missing = {cls for family in FAMILIES.values() for cls in family.classes if not hasattr(transformers, cls)}
    assert missing <= LATER_CLASSES, missing
    for family in FAMILIES.values():
        for axes in [*family.params.values(), *family.layer_params.values()]:
            assert set(axes) <= set(AXES), (family.name, axes)
    assert set(CLASSES.values()) <= set(SUPPORTED)


# --------------------------------------------------------------------------- exact copies


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", NAMES)
def test_full_copy_is_the_teacher_bit_for_bit(family, tied):
    if tied and family == "dbrx":  # DBRX's config refuses a tied head: a student's too, in one line
        with pytest.raises(TailkdError, match=r"^DbrxConfig refuses the student's config: ValueError: "
                                              r"tie_word_embeddings is not supported for DBRX models\.$"):
            build_student(make_teacher(family), tie_embeddings=True)
        return
    teacher = make_teacher(family, tie_word_embeddings=tied)
    assert type(teacher).__name__ == CLASSES[family]
    student, table = build_student(teacher, mlp_init="copy")
    assert type(student) is type(teacher)
    assert {row["action"] for row in table} == {"copied"}
    _assert_copied_exactly(student, table, teacher, _plan(teacher, list(range(N_LAYERS))))
    assert student.config.to_dict() | {"dtype": None} == teacher.config.to_dict() | {"dtype": None}
    ids = _ids()
    assert torch.equal(_logits(student, ids), _logits(teacher, ids))  # same computation: see the module docstring


@pytest.mark.parametrize("family", NAMES)
def test_every_familys_fused_head_reproduces_its_logits(family):
    """The fused loss layer's reading of every family's tiny teacher — its final hidden states (`final_hidden`) and
    its LM head with the transforms `head_spec` names — reproduces the model's own logits (`verify_head`, within its
    stated tolerance): a family whose hidden states are not what its head reads (as Gemma 3n's AltUp streams were)
    or whose forward transforms the logits otherwise would fail here, not in a run."""
    teacher = make_teacher(family)
    ids = _ids(4, (2, 13))
    with torch.no_grad():
        assert final_hidden(teacher, ids).shape == (2, 13, teacher.config.get_text_config().hidden_size)
    verify_head(teacher, ids)


def _zero_dropped_layers(teacher, keep):
    """A copy of the teacher whose other layers add exact zeros to the residual stream."""
    model = copy.deepcopy(teacher)
    outputs = ("self_attn.o_proj.", "self_attn.dense.", "mlp.down_proj.", "mlp.fc2.", "mlp.c_proj.",
               "mlp.experts.down_proj", "mlp.shared_expert.down_proj.", "mlp.shared_experts.down_proj.",
               "linear_attn.out_proj.", "linear_attn.o_proj.", "conv.out_proj.", "self_attn.out_proj.",
               "feed_forward.w2.",
               "feed_forward.experts.down_proj", "feed_forward.down_proj.", "mamba.out_proj.",
               "block_sparse_moe.experts.down_proj", "shared_mlp.output_linear.", "mixer.o_proj.", "mixer.out_proj.",
               "mixer.down_proj.", "mixer.experts.down_proj", "mixer.shared_experts.down_proj.", "fc2.",
               "attention.dense.", "mlp.dense_4h_to_h.", "mlp.shared_mlp.down_proj.", "self_attention.dense.",
               "attn.out_proj.", "mlp.fc_out.", "attn.c_proj.", "ffn.down_proj.", "attn.attention.out_proj.",
               "feed_forward.shared_expert.down_proj.", "ffn.experts.mlp.w2", "norm_attn_norm.attn.out_proj.",
               "experts.down_proj", "per_layer_projection.")  # Gemma 4's experts, its per-layer input's way out
    with torch.no_grad():
        for name, param in model.named_parameters():
            prefix, i, rest = _split_layer(name)
            if prefix is not None and i not in keep and rest.startswith(outputs):
                param.zero_()
        for name, buffer in model.named_buffers():  # Gemma 4 scales the whole residual stream after each layer
            prefix, i, rest = _split_layer(name)
            if prefix is not None and i not in keep and rest == "layer_scalar":
                buffer.fill_(1.0)
    return model


@pytest.mark.parametrize("family", NAMES)
def test_layer_subset_copies_its_layers_and_their_settings(family):
    teacher = make_teacher(family)
    subset = SUBSETS.get(family, SUBSET)
    student, table = build_student(teacher, layers=subset, mlp_init="copy")
    _assert_copied_exactly(student, table, teacher, _plan(teacher, subset))
    assert student.config.num_hidden_layers == len(subset)
    types = _layer_types(teacher)
    if types is not None:
        assert _layer_types(student) == [types[i] for i in subset]
        assert len(set(types)) == 1 or family in SUBSETS or _layer_types(student) != types[: len(subset)]  # Falcon-H1:
        # every layer hybrid
    if family == "gpt_neo":  # its run-length attention_types spells the same layers (a reader of either agrees)
        spelled = [kind for kinds, n in student.config.attention_types for _ in range(n) for kind in kinds]
        assert spelled == _layer_types(student) == ["local", "global", "local"]
    ids = _ids(1)
    if family not in NORMED_RESIDUAL:
        assert torch.equal(_logits(student, ids), _logits(_zero_dropped_layers(teacher, subset), ids))

    random_mlp, table = build_student(teacher, layers=subset)  # the paper's default: MLP random
    assert {row["name"] for row in table if row["action"] == "random"} == {
        name for name, _ in random_mlp.named_parameters() if _in_mlp(name)}
    _assert_copied_exactly(random_mlp, table, teacher, _plan(teacher, subset))


def test_a_minicpm3_student_of_any_depth_keeps_its_residual_scale():
    """MiniCPM3's layers multiply their residual branches by scale_depth / sqrt(num_hidden_layers): for teachers of 5,
    40, 62 (MiniCPM3-4B's) and 97 layers and every student depth below, the student's scale_depth gives its layers the
    teacher's multiplier — the same float32 (the activations' dtype: torch multiplies by the scalar cast to it), and as
    a double within one ulp."""
    from tailkd.student import student_config

    for n_t in (5, 40, 62, 97):
        name, extra = CONFIGS["minicpm3"]
        with torch.device("meta"):
            teacher = transformers.AutoModelForCausalLM.from_config(
                getattr(transformers, name)(**{**_COMMON, **extra, "num_hidden_layers": n_t}))
        want = teacher.model.layers[0].residual_scale
        for n_s in range(1, n_t):
            config = student_config(teacher, num_layers=n_s)
            got = config.scale_depth / math.sqrt(config.num_hidden_layers)  # the model's own arithmetic
            assert torch.tensor(got, dtype=torch.float32) == torch.tensor(want, dtype=torch.float32), (n_t, n_s)
            assert abs(got - want) <= math.ulp(want), (n_t, n_s)


def test_falcon_h1_without_d_ssm_sets_its_students_mamba_expand():
    """Falcon-H1 without mamba_d_ssm: its Mamba-2 mixers are mamba_expand x hidden_size wide, so a student's
    mamba_expand is its heads' width over its hidden_size — the teacher's 16 heads of 8 over 32 channels: 4; 8 of them:
    2 —, bit for bit the teacher's slices (mamba_d_ssm stays unset)."""
    teacher = make_teacher("falcon_h1", mamba_d_ssm=None, mamba_n_heads=16)  # 2 x 64 = 128 = 16 heads of 8
    assert teacher.model.layers[0].mamba.intermediate_size == 128
    for ssm_heads, expand in ((None, 4), (8, 2)):
        student, table = build_student(teacher, layers=SUBSET, hidden_size=32, num_heads=2, num_kv_heads=1,
                                       intermediate_size=40, ssm_heads=ssm_heads, mlp_init="copy")
        kept = list(range(ssm_heads or 16))
        _assert_copied_exactly(student, table, teacher, _plan(teacher, SUBSET, d=32, q_heads=[0, 1], kv_heads=[0],
                                                              ff=40, ssm=kept))
        assert (student.config.mamba_d_ssm, student.config.mamba_expand) == (None, expand)
        assert student.model.layers[0].mamba.intermediate_size == 8 * len(kept)
        assert student(_ids(9)).logits.isfinite().all()


def test_published_mamba2_shapes_give_the_students_their_configs_allow():
    """Granite 4.0-H-Small's Mamba-2 widths (hidden 4096, 128 heads of 64 in one group, mamba_expand 2) and Nemotron-H
    8B's (128 heads of 64 in 8 groups, a width of their own), built on the meta device: hidden 2048 keeps Granite's
    8192 channels with mamba_expand 4, or 64 heads with 2; hidden 3072 needs 48 or 96 heads (a whole mamba_expand);
    Nemotron-H keeps 64 heads in its 8 groups whatever hidden_size, and refuses 60."""
    from tailkd.student import student_config

    granite = transformers.GraniteMoeHybridConfig(
        vocab_size=TINY_VOCAB, hidden_size=4096, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8,
        layer_types=["mamba", "attention", "mamba", "mamba"], num_local_experts=0, shared_intermediate_size=8192,
        mamba_n_heads=128, mamba_d_head=64, mamba_n_groups=1, mamba_expand=2, mamba_d_state=128)
    nemotron = transformers.NemotronHConfig(
        vocab_size=TINY_VOCAB, hidden_size=4096, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, layers_block_type=["mamba", "attention", "mamba", "mlp"], mamba_num_heads=128,
        mamba_head_dim=64, n_groups=8, ssm_state_size=128, intermediate_size=21504)
    with torch.device("meta"):
        granite, nemotron = (transformers.AutoModelForCausalLM.from_config(c) for c in (granite, nemotron))
    for ssm_heads, expand in ((None, 4), (64, 2)):
        config = student_config(granite, hidden_size=2048, ssm_heads=ssm_heads)
        assert (config.mamba_n_heads, config.mamba_expand) == (ssm_heads or 128, expand)
    with pytest.raises(TailkdError, match=r"are no whole mamba_expand x 3072: pick ssm_heads 48 or 96$"):
        student_config(granite, hidden_size=3072)
    for hidden in (4096, 3072):
        config = student_config(nemotron, hidden_size=hidden, ssm_heads=64)
        with torch.device("meta"):
            mixer = transformers.AutoModelForCausalLM.from_config(config).model.layers[0].mixer
        assert (mixer.num_heads, mixer.n_groups, mixer.intermediate_size) == (64, 8, 4096)
    with pytest.raises(TailkdError, match=r"^ssm_heads=60, but the teacher's Mamba-2 heads read B and C in 8 groups "
                                          r"\(n_groups\), each keeping as many heads: pick a multiple of 8$"):
        student_config(nemotron, ssm_heads=60)


def test_kolibri_1_1_students_keep_the_layers_whose_keys_and_values_theirs_read():
    """Kolibri 1.1's layers may read another's keys and values (kv_source_layers; no k/v projections of their own):
    here layer 4, an indexer, reads layer 1's. A student keeping 4 keeps 1 — spaced, 1 takes the place of the nearest
    kept layer (0; 2 is as near: the lower index), by influence 1 comes with 4 where both fit — and reads it at its own
    index (kv_source_layers renumbered, index_layers and mlp_only_layers too); listed layers without it are refused in
    one line. A student of the layers it keeps, every width kept, computes the teacher with its other layers zeroed."""
    from tailkd.calibrated import calibrated_layers
    from tailkd.layer_choice import layer_needs

    teacher = make_teacher("kolibri1_1", kv_source_layers=[0, 1, 2, 1, 1])
    fam = config_family(teacher.config, family_spec(teacher))
    assert layer_needs(teacher.config, fam) == ([], {3: (1,), 4: (1,)}, None)  # 3 for its pool and its keys
    student, table = build_student(teacher, num_layers=3, mlp_init="copy")
    assert {row["source"].split(".")[2] for row in table if row["source"] and ".layers." in row["source"]} == {
        "1", "2", "4"}
    c = student.config
    assert (c.layer_types, c.kv_source_layers, c.index_layers, c.mlp_only_layers) == ([X, S, X], [0, 1, 0], [0, 2], [])
    influence = {"layer_choice=influence": torch.tensor([0.5, 0.1, 0.4, 0.3, 0.9], dtype=torch.float64)}
    assert calibrated_layers(influence, 2, None, 1, layer_needs(teacher.config, fam)) == (None, [1, 4])
    assert calibrated_layers(influence, 3, None, 1, layer_needs(teacher.config, fam)) == (None, [0, 1, 4])
    with pytest.raises(TailkdError, match=r"^teacher layer 4 reads the keys and values of teacher layer 1 "
                                          r"\(kv_source_layers; it has no key and value projections of its own\), but "
                                          r"the student does not keep layer 1: keep it too \(--student.layers\)$"):
        build_student(teacher, layers=[0, 2, 4])
    ids = _ids(9)
    assert torch.equal(_logits(student, ids), _logits(_zero_dropped_layers(teacher, keep=[1, 2, 4]), ids))


def test_published_kolibri_1_1_layout_gives_a_student_its_config_allows():
    """Kolibri 1.1's layout (50 layers, every fifth indexed; of the 10 indexed layers the 2nd, 3rd and 10th read the
    1st's keys and values, the 7th to 9th the 6th's; indexers the 1st, 3rd, 4th and 6th; dense layers 0 and 1), on the
    meta device: 10 spaced layers [0, 5, 11, 16, 22, 27, 33, 38, 44, 49] keep 44's source 29 and 49's source 4 in place
    of their nearest kept layers (27, 5); the student's config reads them at its own indices."""
    from tailkd.student import student_config

    if not hasattr(transformers, "Kolibri1_1Config"):  # LATER_CLASSES
        pytest.skip(f"transformers {transformers.__version__} has no Kolibri1_1Config")
    config = transformers.Kolibri1_1Config(vocab_size=TINY_VOCAB, num_hidden_layers=50)
    with torch.device("meta"):
        teacher = transformers.AutoModelForCausalLM.from_config(config)
    c = student_config(teacher, num_layers=10)
    assert c.num_hidden_layers == 10
    assert c.layer_types == [S, X, S, S, S, X, S, S, X, X]  # teacher layers 0 4 11 16 22 29 33 38 44 49
    assert (c.kv_source_layers, c.index_layers, c.mlp_only_layers) == ([0, 1, 2, 3, 4, 5, 6, 7, 5, 1], [1, 5], [0])


def test_stablelm_per_head_qk_layernorms_follow_the_kept_heads(tmp_path):
    """StableLM with qk_layernorm (StableLM 2 12B): one q LayerNorm module per query head and one k LayerNorm per KV
    head. A student of every layer and width computes the teacher bit for bit; a student of 2 query heads on 2 KV
    heads keeps teacher query heads 0 and 2 (one per KV head), and its q norm module j is the teacher's of its j-th
    kept query head (its k norms the kept KV heads'), every other tensor the reference's; by importance the modules
    follow the heads each layer keeps (the table's, as q_proj's rows do)."""
    teacher = make_teacher("stablelm", qk_layernorm=True)
    full, table = build_student(teacher, mlp_init="copy")
    ids = _ids(10)
    assert {row["action"] for row in table} == {"copied"} and torch.equal(_logits(full, ids), _logits(teacher, ids))
    narrow = {"hidden_size": 32, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 40}
    _check_narrow_student(teacher, narrow, dict(d=32, q_heads=[0, 2], kv_heads=[0, 1], ff=40), tmp_path)
    for seed in range(7, 40):  # calibration rows under which some layer keeps other heads than the first ones
        student, table = build_student(teacher, layers=NARROW_LAYERS, mlp_init="copy", attention_heads="active",
                                       calibration=lambda seed=seed: [{"input_ids": _ids(seed, (2, 13))}], **narrow)
        kept = {int(row["name"].split(".")[2]): row["heads"] for row in table if row["name"].endswith("q_proj.weight")}
        if any(heads != [0, 2] for heads in kept.values()):
            break
    else:
        raise AssertionError("every calibration set chose the first heads")
    for j, i in enumerate(NARROW_LAYERS):
        mine, theirs = student.model.layers[j].self_attn, teacher.model.layers[i].self_attn
        for h, head in enumerate(kept[j]):
            assert torch.equal(mine.q_layernorm.norms[h].weight, theirs.q_layernorm.norms[head].weight)
            assert torch.equal(mine.k_layernorm.norms[h].weight, theirs.k_layernorm.norms[head // 2].weight)


def test_published_jamba_shapes_give_the_students_their_configs_allow():
    """Jamba 1.5 Mini's Mamba-1 widths (hidden 4096, mamba_expand 2: 8192 channels, a state of 16, dt_rank 256), on the
    meta device: hidden 2048 keeps the 8192 channels with mamba_expand 4, or 4096 with 2; hidden 3072 needs 3072 or
    6144 channels (a whole mamba_expand); dt_rank and the state stay the teacher's."""
    from tailkd.student import student_config

    jamba = transformers.JambaConfig(
        vocab_size=TINY_VOCAB, hidden_size=4096, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, num_experts=16, num_experts_per_tok=2, attn_layer_period=8, attn_layer_offset=4,
        expert_layer_period=2, expert_layer_offset=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2)
    with torch.device("meta"):
        jamba = transformers.AutoModelForCausalLM.from_config(jamba)
    for ssm_heads, expand in ((None, 4), (4096, 2)):
        config = student_config(jamba, hidden_size=2048, num_heads=16, num_kv_heads=4, ssm_heads=ssm_heads)
        assert (config.mamba_expand, config.mamba_dt_rank, config.mamba_d_state) == (expand, 256, 16)
        with torch.device("meta"):
            mixer = transformers.AutoModelForCausalLM.from_config(config).model.layers[0].mamba
        width = ssm_heads or 8192
        assert (mixer.intermediate_size, mixer.x_proj.in_features, mixer.dt_proj.out_features) == (width,) * 3
    with pytest.raises(TailkdError, match=r"are no whole mamba_expand x 3072: pick ssm_heads 3072 or 6144$"):
        student_config(jamba, hidden_size=3072, num_heads=24, num_kv_heads=8)


def test_mamba2_heads_narrow_as_the_teacher_without_them_computes():
    """Without the gated norm (Falcon-H1's mamba_rms_norm False) a Mamba-2 head's channels reach out_proj on their own:
    a student keeping 4 of 6 heads in 2 groups (each group's first 2: heads 0, 1, 3, 4; every layer, hidden_size kept)
    computes the teacher's function with the other heads' channels zeroed at out_proj's input — which a head reading
    another group's B and C, or another head's dt, A or D, would not. The scan runs in float32 (as transformers casts
    it), whose heads may be reduced in another order for another number of heads (transformers 5.17 does): ~1e3
    operations of ~6e-8 relative each between the embeddings and logits below 4 bound the difference by ~2.4e-4; the
    dropped heads move the logits by more than 1e-2."""
    teacher = make_teacher("falcon_h1", mamba_rms_norm=False, mamba_n_groups=2)
    student, _ = build_student(teacher, num_layers=5, ssm_heads=4, mlp_init="copy")
    student.eval()
    assert student.config.mamba_d_ssm == 32 and student.model.layers[0].mamba.n_groups == 2
    dropped = torch.tensor([h * 8 + r for h in (2, 5) for r in range(8)])

    def zero_dropped(module, args):
        x = args[0].clone()
        x[..., dropped] = 0
        return (x,)
    hooks = [layer.mamba.out_proj.register_forward_pre_hook(zero_dropped) for layer in teacher.model.layers]
    ids = _ids(9)
    with torch.no_grad():
        want, got = teacher(ids).logits, student(ids).logits
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        whole = teacher(ids).logits
    assert want.abs().max() < 4
    assert (got - want).abs().max() <= 2.4e-4
    assert (got - whole).abs().max() > 1e-2  # the dropped heads did contribute


def test_granite_4_dense_variant_narrows_its_shared_mlp(tmp_path):
    """Granite 4.0-H without routed experts (its 350M, 1B and Micro models): the shared MLP is the MLP, narrowed by
    intermediate_size (the first units of gate and of up, shared_intermediate_size in the student's config); no
    num_experts to set."""
    teacher = make_teacher("granitemoehybrid", num_local_experts=0)
    assert teacher.model.layers[0].block_sparse_moe is None
    full, table = build_student(teacher, mlp_init="copy")
    assert {row["action"] for row in table} == {"copied"}
    ids = _ids(9)
    assert torch.equal(_logits(full, ids), _logits(teacher, ids))
    student, table = build_student(teacher, layers=[0, 2, 3], intermediate_size=40, mlp_init="copy")
    _assert_copied_exactly(student, table, teacher, _plan(teacher, [0, 2, 3], ff=40))
    assert student.config.shared_intermediate_size == 40 and student.config.num_local_experts == 0
    with pytest.raises(TailkdError, match=r"^num_experts=2 but Granite 4\.0-H is not a mixture of experts: drop "
                                          r"num_experts$"):
        build_student(teacher, num_experts=2)


def test_nemotron_h_dense_models_narrow_their_mlp():
    """Nemotron-H without "moe" layers (Nemotron-H 8B, Nano 9B v2) has no routed experts whatever n_routed_experts
    says: intermediate_size narrows its MLP layers, num_experts is refused."""
    teacher = make_teacher("nemotron_h", layers_block_type=[L, "mlp", F, "mlp", "mlp"])
    full, table = build_student(teacher, mlp_init="copy")
    ids = _ids(10)
    assert {row["action"] for row in table} == {"copied"} and torch.equal(_logits(full, ids), _logits(teacher, ids))
    student, table = build_student(teacher, layers=[0, 1, 2], hidden_size=32, intermediate_size=40, mlp_init="copy")
    _assert_copied_exactly(student, table, teacher, _plan(teacher, [0, 1, 2], d=32, ff=40))
    assert student.config.intermediate_size == 40 and student.config.layers_block_type == [L, "mlp", F]
    with pytest.raises(TailkdError, match=r"^num_experts=2 but Nemotron-H is not a mixture of experts"):
        build_student(teacher, num_experts=2)


@pytest.mark.parametrize("family, overrides, why", [
    ("nemotron_h", {"moe_latent_size": 16}, "its experts work in a latent space of their own"),
])
def test_settings_the_tables_cannot_slice_are_refused_in_one_line(family, overrides, why):
    """A teacher setting that brings tensors no table entry slices (Family.refused_settings) is refused by name, with
    the way out, before any tensor is read (it had been a "no copy rule" error naming one parameter)."""
    key = next(iter(overrides))
    with pytest.raises(TailkdError, match=rf"^the teacher sets {key} \({re.escape(why)}\), which tailkd cannot cut "
                                          r"into a student: give the student as a folder \(--student DIR\)$"):
        build_student(make_teacher(family, **overrides))


def test_opt_with_embedding_projections_is_refused_in_one_line():
    """OPT-350m's embeddings are word_embed_proj_dim wide, projected in and out of a wider hidden_size
    (Family.hidden_keys): refused with the way out before any tensor is read, even at the teacher's sizes; where the
    two are equal (every other OPT) a student's word_embed_proj_dim follows its hidden_size."""
    teacher = make_teacher("opt", word_embed_proj_dim=32)
    assert teacher.model.decoder.project_in is not None
    with pytest.raises(TailkdError, match=r"^the teacher's word_embed_proj_dim \(32\) differs from its hidden_size "
                                          r"\(64\): its projections between the two widths are not cut by tailkd; "
                                          r"give the student as a folder \(--student DIR\)$"):
        build_student(teacher)


def test_experts_per_token_listed_per_layer_follow_the_kept_layers(tmp_path):
    """HunYuan-MoE's config may list moe_topk per layer (Hunyuan-A13B's does; its layer i routes each token to entry
    i's experts): the student's lists the kept layers' entries (teacher layers 1, 2, 4 of [2, 1, 2, 2, 1]: [1, 2, 1],
    not its own indices' [2, 1, 2]), so the student of those layers computes as the teacher with the others zeroed, bit
    for bit, and its saved config loads with the list; num_experts_per_tok sets every layer's; fewer experts than the
    largest entry are refused in one line."""
    teacher = make_teacher("hunyuan_v1_moe", moe_topk=[2, 1, 2, 2, 1])
    assert [layer.mlp.gate.top_k for layer in teacher.model.layers] == [2, 1, 2, 2, 1]
    assert teacher_dims(teacher.config, "hunyuan_v1_moe").experts_per_token == 2
    student, table = build_student(teacher, layers=SUBSET, mlp_init="copy")
    assert student.config.moe_topk == [1, 2, 1]
    assert [layer.mlp.gate.top_k for layer in student.model.layers] == [1, 2, 1]
    _assert_copied_exactly(student, table, teacher, _plan(teacher, SUBSET))
    ids = _ids(1)
    assert torch.equal(_logits(student, ids), _logits(_zero_dropped_layers(teacher, SUBSET), ids))
    student.save_pretrained(tmp_path)
    reloaded = _reload(tmp_path)
    assert [layer.mlp.gate.top_k for layer in reloaded.model.layers] == [1, 2, 1]
    assert torch.equal(_logits(reloaded, ids), _logits(student, ids))

    narrow, table = build_student(teacher, layers=SUBSET, num_experts=3, num_experts_per_tok=1, mlp_init="copy")
    assert narrow.config.moe_topk == 1
    assert [layer.mlp.gate.top_k for layer in narrow.model.layers] == [1, 1, 1]
    _assert_copied_exactly(narrow, table, teacher, _plan(teacher, SUBSET, experts=3))
    with pytest.raises(TailkdError, match=r"^num_experts=1 but each token is routed to 2 \(the teacher's "
                                          r"num_experts_per_tok, the most of any layer\): pick 2\.\.4, or set "
                                          r"num_experts_per_tok to at most 1$"):
        build_student(teacher, layers=SUBSET, num_experts=1)


def test_deepseek_v2_greedy_routing_keeps_the_first_experts():
    """DeepSeek-V2 with topk_method greedy (V2-Lite) routes over all experts whatever n_group says: the student keeps
    the first ones, any number of them."""
    teacher = make_teacher("deepseek_v2", topk_method="greedy")
    student, table = build_student(teacher, layers=SUBSET, num_experts=3, mlp_init="copy")
    _assert_copied_exactly(student, table, teacher, _plan(teacher, SUBSET, experts=3))
    assert torch.isfinite(_logits(student, _ids(11))).all()


def test_a_layer_kind_the_students_config_cannot_give_is_refused():
    """ERNIE 4.5 MoE routes every moe_layer_interval-th layer: teacher layers 1 and 3 of 0..4 with interval 2. A student
    of layers 1, 2, 3 would need routed, dense, routed layers, which no interval gives its layers 0..2: refused in one
    line before any tensor is copied (it was a KeyError on the first missing tensor); layers 0..3 keep the rhythm."""
    teacher = make_teacher("ernie4_5_moe", moe_layer_interval=2)
    assert _mlp_kinds(teacher)[:4] == ["Ernie4_5_MoeMLP", "Ernie4_5_MoeSparseMoeBlock"] * 2
    with pytest.raises(TailkdError, match=r"^the student's config cannot give its layer 0 the modules of teacher layer "
                                          r"1 \(.+ differs\): the teacher's per-layer settings do not carry over to "
                                          r"layers 1 2 3; choose other layers \(--student\.layers\)$"):
        build_student(teacher, layers=[1, 2, 3])
    student, _ = build_student(teacher, layers=[0, 1, 2, 3], mlp_init="copy")
    assert _mlp_kinds(student) == _mlp_kinds(teacher)[:4]


def test_lfm2_attention_layer_list_follows_the_layers(tmp_path):
    """LFM2 lists its attention layers twice (layer_types and full_attn_idxs): the student's full_attn_idxs are its own
    indices of the chosen attention layers, as its layer_types; saved and loaded, its layers have those kinds."""
    teacher = make_teacher("lfm2")
    student, _ = build_student(teacher, layers=SUBSET)
    assert student.config.layer_types == [F, "conv", F] and student.config.full_attn_idxs == [0, 2]
    student.save_pretrained(tmp_path / "s")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert [layer.is_attention_layer for layer in loaded.model.layers] == [True, False, True]
    assert loaded.config.full_attn_idxs == [0, 2]


def test_qwen3_window_threshold_follows_the_layers():
    teacher = make_teacher("qwen3")
    assert teacher.config.layer_types == [F, F, S, S, S] and teacher.config.max_window_layers == 2
    student, _ = build_student(teacher, layers=[0, 3, 4])
    assert student.config.layer_types == [F, S, S] and student.config.max_window_layers == 1
    rebuilt = transformers.Qwen3Config(**{**student.config.to_dict(), "layer_types": None})
    assert rebuilt.layer_types == student.config.layer_types  # the threshold alone gives the same pattern


def _mlp_kinds(model):
    return [type(getattr(layer, "mlp", None) or layer.feed_forward).__name__ for layer in model.model.layers]


@pytest.mark.parametrize("family, layers, config", [
    # sparse layers 1, 3 (decoder_sparse_step 2): teacher layers 1, 2, 4 are sparse, dense, dense
    ("qwen2_moe", SUBSET, dict(mlp_only_layers=[1, 2], decoder_sparse_step=1)),
    ("qwen2_moe", [1, 2, 3], dict(mlp_only_layers=[1], decoder_sparse_step=1)),
    ("qwen2_moe", [0, 1], dict(mlp_only_layers=[], decoder_sparse_step=2)),  # the teacher's rule says the same
    # dense layer 2 (mlp_only_layers): teacher layers 1, 2, 4 are sparse, dense, sparse
    ("qwen3_moe", SUBSET, dict(mlp_only_layers=[1], decoder_sparse_step=1)),
    ("qwen3_moe", [0, 1, 2], dict(mlp_only_layers=[2], decoder_sparse_step=1)),
    ("flint", [1, 2, 4], dict(mlp_only_layers=[], decoder_sparse_step=1)),  # dense layer 0 (Flint)
    ("flint", [0, 3, 4], dict(mlp_only_layers=[0], decoder_sparse_step=1)),
    # dense below first_k_dense_replace (GLM-4.5: 2, dots.llm1: 1): the number of chosen layers below it
    ("glm4_moe", SUBSET, dict(first_k_dense_replace=1)),
    ("glm4_moe", [2, 3], dict(first_k_dense_replace=0)),
    ("glm4_moe", [0, 1, 4], dict(first_k_dense_replace=2)),
    ("dots1", [0, 3, 4], dict(first_k_dense_replace=1, max_window_layers=1)),
    ("deepseek_v3", [0, 2, 3], dict(first_k_dense_replace=1)),
    ("deepseek_v32", [0, 2, 3], dict(first_k_dense_replace=1, mlp_layer_types=["dense", "sparse", "sparse"])),
    ("hy_v3", [0, 2, 3], dict(mlp_layer_types=["dense", "sparse", "dense"])),  # listed per layer only
    ("axk1", [1, 2, 4], {}), ("axk1", [0, 2, 3], {}),  # the kinds read from the modules (5.17 or later configs)
    ("afmoe", SUBSET, dict(num_dense_layers=0)), ("afmoe", [0, 2, 3], dict(num_dense_layers=1)),
    ("glm4_moe_lite", SUBSET, dict(mlp_layer_types=["sparse", "dense", "sparse"])),
    ("lfm2_moe", SUBSET, dict(num_dense_layers=1)),
    # routed layers 1..4: the student's routed range, start and end renumbered
    ("ernie4_5_moe", SUBSET, dict(moe_layer_start_index=0, moe_layer_end_index=2)),
    ("ernie4_5_moe", [0, 2, 3], dict(moe_layer_start_index=1, moe_layer_end_index=2)),
])
def test_moe_dense_layers_follow_the_layers(family, layers, config, tmp_path):
    """Qwen-MoE, GLM-4.5 and dots.llm1 pick a layer's MLP (routed experts or dense) by its index; the student's layer
    j must have teacher layer layers[j]'s kind. Qwen-MoE's student config lists its dense layers (``mlp_only_layers``,
    step 1) where the teacher's own settings would give another pattern, and keeps them where they give the same;
    ``first_k_dense_replace`` ("dense below layer N") counts the chosen layers below N. Saved and loaded, the
    same."""
    teacher = make_teacher(family)
    student, _ = build_student(teacher, layers=layers, mlp_init="copy")
    kinds = _mlp_kinds(teacher)
    assert _mlp_kinds(student) == [kinds[i] for i in layers]
    assert {k: getattr(student.config, k) for k in config} == config
    student.save_pretrained(tmp_path / "s")
    assert _mlp_kinds(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s")) == _mlp_kinds(student)


@pytest.mark.parametrize("family, kwargs, message", [
    ("mixtral", {"num_experts": 1}, r"^num_experts=1 but each token is routed to 2 \(the teacher's "
                                    r"num_experts_per_tok\): pick 2\.\.4, or set num_experts_per_tok to at most 1$"),
    ("qwen2_moe", {"num_experts": 5}, r"^num_experts=5 but the teacher has 4 experts: pick 1\.\.4$"),
    ("olmoe", {"num_experts": 2, "num_experts_per_tok": 3}, r"^num_experts_per_tok=3 but the student has 2 experts: "
                                                            r"pick 1\.\.2$"),
    ("gpt_oss", {"num_experts_per_tok": 0}, r"^num_experts_per_tok=0 but the student has 4 experts: pick 1\.\.4$"),
    ("qwen3_moe", {"intermediate_size": 41}, r"^intermediate_size=41 but the teacher's is 40: a student can only be "
                                             r"narrower, pick 1\.\.40$"),
    ("gemma", {"num_experts": 2}, r"^num_experts=2 but Gemma is not a mixture of experts: drop num_experts$"),
    # group-limited routing (GLM-4.5: 8 experts in n_group 2, a token's experts from topk_group 1)
    ("glm4_moe", {"num_experts": 5}, r"^num_experts=5 but the teacher routes within n_group=2 groups of experts: pick "
                                     r"a multiple of 2 \(the student keeps the first num_experts/2 of each group\)$"),
    ("glm4_moe", {"num_experts": 2, "num_experts_per_tok": 1},
     r"^num_experts=2 leaves 1 expert per group, but the router scores each of the n_group=2 groups by its top 2 "
     r"experts: pick at least 4$"),
    ("glm4_moe", {"num_experts": 4, "num_experts_per_tok": 3},
     r"^num_experts_per_tok=3 but a token's experts come from topk_group=1 of the student's groups of 2: pick at "
     r"most 2, or more experts$"),
    ("deepseek_v2", {"num_experts": 4, "num_experts_per_tok": 3},
     r"^num_experts_per_tok=3 but a token's experts come from topk_group=2 of the student's groups of 1: pick at "
     r"most 2, or more experts$"),
    # Phi-MoE's router (sparsemixer) takes 2 experts per token whatever num_experts_per_tok says: 1 gave NaN logits
    ("phimoe", {"num_experts": 1}, r"^num_experts=1 but the teacher has 4 experts and Phi-MoE's router sends each "
                                   r"token to 2: pick 2\.\.4$"),
    ("phimoe", {"num_experts_per_tok": 1}, r"^num_experts_per_tok=1 but Phi-MoE's router sends each token to 2 "
                                           r"experts whatever its config says: drop num_experts_per_tok$"),
    ("dots1", {"num_experts": 1, "num_experts_per_tok": 1},
     r"^num_experts=1 leaves 1 expert per group, but the router scores each of the n_group=1 groups by its top 2 "
     r"experts: pick at least 2$"),
    ("qwen3", {"num_experts_per_tok": 1}, r"^num_experts_per_tok=1 but Qwen3 is not a mixture of experts: drop "
                                          r"num_experts_per_tok$"),
])
def test_expert_settings_out_of_range_are_refused(family, kwargs, message):
    with pytest.raises(TailkdError, match=message):
        build_student(make_teacher(family), **kwargs)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "gpt_oss", "qwen3_5_moe", "lfm2_moe"])
def test_fewer_experts_per_token(family, tmp_path):
    """num_experts_per_tok: a top-1 student of one expert (below the teacher's 2 per token) builds, runs, saves and
    loads with its own num_experts_per_tok (the same logits); the default keeps the teacher's."""
    teacher = make_teacher(family)
    assert teacher.config.num_experts_per_tok == 2
    student, _ = build_student(teacher, layers=SUBSET, num_experts=1, num_experts_per_tok=1, mlp_init="copy")
    assert (student.config.num_experts, student.config.num_experts_per_tok) == (1, 1)
    assert torch.isfinite(_logits(student, _ids(3))).all()
    student.save_pretrained(tmp_path / "s")
    loaded = _reload(tmp_path / "s")
    assert loaded.config.num_experts_per_tok == 1
    assert torch.equal(_logits(loaded, _ids(3)), _logits(student, _ids(3)))
    assert build_student(teacher, layers=SUBSET, num_experts=3)[0].config.num_experts_per_tok == 2


# --------------------------------------------------------------------------- narrowing, per family

FULL_ROPE_16_TO_8 = [0, 2, 4, 6, 8, 10, 12, 14]  # RoPE pairs (i, i+8) of a 16-row head: teacher pairs 0, 2, 4, 6
# Gemma 4's full layers (heads of 32 rows, proportional RoPE: rotate-half over the whole head) at half the teacher's
# head_dim: pairs (i, i+16) of teacher pairs 0, 2, ..., 14, the frequencies base^(-2j / 16) of the student's pairs j
FULL_ROPE_32_TO_16 = [*range(0, 16, 2), *range(16, 32, 2)]
# MiniMax-M2's checkpoints set partial RoPE by rotary_dim, which transformers reads from 5.2x on (5.17: not at all)
_ROTARY_DIM_READ = transformers.MiniMaxM2Config(head_dim=16, rotary_dim=8).rope_parameters.get(
    "partial_rotary_factor") == 0.5
# a mixture of hidden_size 48, 4 heads of 16 on 2 KV heads and 4 experts narrowed to hidden 32, 2 heads of 8 on 1 KV
# head and 3 experts of 24 units (Kolibri-1, Flint, AFMoE, Hy3: what each keeps beside them in its NARROW comment);
# NARROW's entries are read only, so they share it
HALF_HEADS_HD8_3_EXPERTS = ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "head_dim": 8,
                             "intermediate_size": 24, "num_experts": 3},
                            dict(d=32, q_heads=[0, 1], kv_heads=[0], hd_s=8, rows=FULL_ROPE_16_TO_8, ff_e=24,
                                 experts=3))
NARROW = {  # family, build_student kwargs, reference plan overrides
    # partial rotary: 8 rotated rows -> 4 (teacher pairs 0, 2 of (i, i+4)), then the first 4 non-rotated rows
    "phi": ({"hidden_size": 32, "intermediate_size": 40},
            dict(d=32, hd_s=8, ff=40, rows=[0, 2, 4, 6, 8, 9, 10, 11])),
    "phi3": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    # 2 query heads on 2 KV heads (teacher: 2 per KV head): query heads 0 and 2, head_dim 32/2 = 16 kept
    "phi3-regroup": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 2},
                     dict(d=32, q_heads=[0, 2], kv_heads=[0, 1])),
    "gemma": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, ff=40)),  # head_dim 16 kept
    "gemma-head_dim": ({"hidden_size": 32, "head_dim": 8}, dict(d=32, hd_s=8, rows=FULL_ROPE_16_TO_8)),
    "gemma2": ({"hidden_size": 32, "head_dim": 8, "intermediate_size": 64},
               dict(d=32, hd_s=8, ff=64, rows=FULL_ROPE_16_TO_8)),
    "gemma3": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "head_dim": 8},
               dict(d=32, hd_s=8, q_heads=[0, 1], kv_heads=[0], rows=FULL_ROPE_16_TO_8)),
    "qwen3": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 2}, dict(d=32, q_heads=[0, 2], kv_heads=[0, 1])),
    "olmo2": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    "olmo3": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    "ministral": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    "seed_oss": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 2}, dict(d=32, q_heads=[0, 2], kv_heads=[0, 1])),
    # interleaved over the whole head: teacher pairs 0, 2, 4, 6 are rows (0, 1), (4, 5), (8, 9), (12, 13)
    "cohere2": ({"hidden_size": 32, "intermediate_size": 40},
                dict(d=32, hd_s=8, ff=40, rows=[0, 1, 4, 5, 8, 9, 12, 13])),
    # 2 query heads on 2 KV heads: query heads 0, 2 (their q norm rows too), head_dim 32/2 = 16 kept
    "cohere": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 2}, dict(d=32, q_heads=[0, 2], kv_heads=[0, 1])),
    # 2 query heads on 1 KV head: KV head 0's query heads 0, 1 (its k norm row only)
    "cohere-kv": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1}, dict(d=32, q_heads=[0, 1], kv_heads=[0])),
    # head_dim 8: interleaved pairs 0, 2, 4, 6 = rows (0, 1), (4, 5), (8, 9), (12, 13) of q, k and their norms
    "cohere-head_dim": ({"hidden_size": 32, "intermediate_size": 40},
                        dict(d=32, hd_s=8, ff=40, rows=[0, 1, 4, 5, 8, 9, 12, 13])),
    "exaone4": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    "apertus": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    "apertus1p5_text": ({"hidden_size": 32, "intermediate_size": 40},
                        dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    # attention-free: the mixers' channels (intermediate_size, 96) narrow as an MLP's units, hidden_size on its own
    "mamba": ({"hidden_size": 16, "intermediate_size": 40}, dict(d=16, ff=40)),
    "falcon_mamba": ({"hidden_size": 16, "intermediate_size": 40}, dict(d=16, ff=40)),
    # interleaved partial RoPE: 8 of 16 rows rotate in pairs (2p, 2p+1); 4 of 8 keep teacher pairs 0, 2 (rows 0, 1,
    # 4, 5: the frequencies the student's pairs 0, 1 rotate at), then the first 4 non-rotated rows 8..11
    "glm": ({"hidden_size": 32, "head_dim": 8, "intermediate_size": 40},
            dict(d=32, hd_s=8, ff=40, rows=[0, 1, 4, 5, 8, 9, 10, 11])),
    "glm4": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "head_dim": 8},
             dict(d=32, hd_s=8, q_heads=[0, 1], kv_heads=[0], rows=[0, 1, 4, 5, 8, 9, 10, 11])),
    "smollm3": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    # mixtures: intermediate_size narrows each routed expert, num_experts keeps the first experts (router rows too)
    "mixtral": ({"hidden_size": 32, "intermediate_size": 40, "num_experts": 2},
                dict(d=32, hd_s=8, ff_e=40, experts=2, rows=FULL_ROPE_16_TO_8)),
    "qwen2_moe": ({"hidden_size": 32, "intermediate_size": 24, "num_experts": 3},
                  dict(d=32, hd_s=8, ff_e=24, experts=3, rows=FULL_ROPE_16_TO_8)),
    "qwen3_moe": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 24, "num_experts": 2},
                  dict(d=32, q_heads=[0, 2], kv_heads=[0, 1], ff_e=24, experts=2)),
    "olmoe": ({"hidden_size": 32, "intermediate_size": 40, "num_experts": 3},
              dict(d=32, hd_s=8, ff_e=40, experts=3, rows=FULL_ROPE_16_TO_8)),
    "gpt_oss": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 40, "num_experts": 3},
                dict(d=32, q_heads=[0, 2], kv_heads=[0, 1], ff_e=40, experts=3)),
    "gpt_oss-head_dim": ({"head_dim": 8, "num_experts": 2}, dict(hd_s=8, experts=2, rows=FULL_ROPE_16_TO_8)),
    # hybrids: the full-attention layers narrow, the linear-attention layers keep their heads
    "qwen3_next": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 24, "num_experts": 3},
                   dict(d=32, q_heads=[0, 2], kv_heads=[0, 1], ff_e=24, experts=3)),
    # 4 of 16 rows rotate, pairs (i, i+2): 2 of 8 rotate, teacher pair 0 = rows 0, 2; then non-rotated rows 4..9
    "qwen3_next-head_dim": ({"head_dim": 8}, dict(hd_s=8, rows=[0, 2, 4, 5, 6, 7, 8, 9])),
    # Llama 4: interleaved RoPE on whole heads, 16 -> 8 rows: teacher pairs 0, 2, 4, 6; the shared expert narrows with
    # the routed ones, the dense layers' MLPs keep their width
    "llama4": ({"hidden_size": 32, "intermediate_size": 24, "num_experts": 3},
               dict(d=32, hd_s=8, ff_e=24, experts=3, rows=[0, 1, 4, 5, 8, 9, 12, 13])),
    "llama4-heads": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "head_dim": 8},
                     dict(d=32, hd_s=8, q_heads=[0, 1], kv_heads=[0], rows=[0, 1, 4, 5, 8, 9, 12, 13])),
    "qwen3_5": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 40},
                dict(d=32, q_heads=[0, 1], kv_heads=[0], ff=40)),
    "qwen3_5_moe": ({"hidden_size": 32, "intermediate_size": 24, "num_experts": 2}, dict(d=32, ff_e=24, experts=2)),
    # the attention layers' heads (2 on 1 KV head, head_dim 8 of hidden_size 32 / 4); the Gated DeltaNet layers keep
    # their sizes
    "olmo_hybrid": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 40},
                    dict(d=32, q_heads=[0, 1], kv_heads=[0], hd_s=16, ff=40)),
    # the attention layers' heads (2 on 1 KV head, head_dim 8); the Gated DeltaNet layers keep their sizes
    "lara_mini": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "head_dim": 8, "intermediate_size": 24,
                   "num_experts": 2}, dict(d=32, q_heads=[0, 1], kv_heads=[0], hd_s=8, rows=FULL_ROPE_16_TO_8, ff_e=24,
                                       experts=2)),
    # group-limited routing: 4 of 8 experts in n_group 2 = the first 2 of each group of 4; shared experts 2 x 24 wide
    "glm4_moe": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 24, "num_experts": 4},
                 dict(d=32, q_heads=[0, 2], kv_heads=[0, 1], ff_e=24, experts=[0, 1, 4, 5])),
    # 8 of 16 rows rotate, pairs (i, i+4): 4 of 8 rotate, teacher pairs 0, 2 = rows 0, 4, 2, 6; then rows 8..11
    "glm4_moe-head_dim": ({"head_dim": 8}, dict(hd_s=8, rows=[0, 2, 4, 6, 8, 9, 10, 11])),
    "dots1": ({"hidden_size": 32, "intermediate_size": 24, "num_experts": 2}, dict(d=32, ff_e=24, experts=2)),
    "phimoe": ({"hidden_size": 32, "intermediate_size": 40, "num_experts": 3},
               dict(d=32, hd_s=8, ff_e=40, experts=3, rows=FULL_ROPE_16_TO_8)),
    # Granite's attention_multiplier follows head_dim 16 -> 8 (see _check_narrow_student)
    "granite": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    "hyperclovax": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    "olmo": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    "starcoder2": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 2}, dict(d=32, q_heads=[0, 2], kv_heads=[0, 1])),
    # 4 of 16 rows rotate, pairs (i, i+2): 2 of 8, teacher pair 0 = rows 0, 2; then the non-rotated rows 4..9
    "stablelm": ({"hidden_size": 32, "intermediate_size": 40},
                 dict(d=32, hd_s=8, ff=40, rows=[0, 2, 4, 5, 6, 7, 8, 9])),
    # 8 of 16 rows rotate, pairs (i, i+4): 4 of 8, teacher pairs 0, 2 = rows 0, 4, 2, 6; then rows 8..11
    "nemotron": ({"hidden_size": 32, "intermediate_size": 40},
                 dict(d=32, hd_s=8, ff=40, rows=[0, 2, 4, 6, 8, 9, 10, 11])),
    "arcee": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    # the convolution's channels narrow with hidden_size; the MLP's width int(2/3 x 40) = 26, rounded up to 32
    "lfm2": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    # LFM3: head_dim kept (Qwen3's attention), its output gate following the heads; or 16 -> 8 rows, the whole head's
    # pairs under both RoPE kinds
    "lfm3": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 40},
             dict(d=32, q_heads=[0, 1], kv_heads=[0], ff=40)),
    "lfm3-head_dim": ({"head_dim": 8}, dict(hd_s=8, rows=FULL_ROPE_16_TO_8)),
    "falcon_h1": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 40},
                  dict(d=32, q_heads=[0, 1], kv_heads=[0], ff=40)),
    # hidden_size kept (its Mamba mixers are 2 x hidden_size wide); head_dim kept, so attention_multiplier too
    "granitemoehybrid": ({"num_heads": 2, "num_kv_heads": 1, "intermediate_size": 40, "num_experts": 3},
                         dict(q_heads=[0, 1], kv_heads=[0], ff_e=40, experts=3)),
    # 4 of 8 experts in n_group 2: the first 2 of each group; head_dim 16 kept
    "nemotron_h": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 24, "num_experts": 4},
                   dict(d=32, q_heads=[0, 1], kv_heads=[0], ff_e=24, experts=[0, 1, 4, 5])),
    "bamba": ({"num_heads": 2, "num_kv_heads": 1, "intermediate_size": 40}, dict(q_heads=[0, 1], kv_heads=[0], ff=40)),
    # attention_multiplier follows head_dim 16 -> 8 (see _check_narrow_student)
    "granitemoe": ({"hidden_size": 32, "intermediate_size": 40, "num_experts": 3},
                   dict(d=32, hd_s=8, ff_e=40, experts=3, rows=FULL_ROPE_16_TO_8)),
    "granitemoeshared": ({"hidden_size": 32, "num_experts": 2}, dict(d=32, hd_s=8, experts=2, rows=FULL_ROPE_16_TO_8)),
    # interleaved over the whole head: teacher pairs 0, 2, 4, 6 are rows (0, 1), (4, 5), (8, 9), (12, 13)
    "ernie4_5_moe": ({"hidden_size": 32, "head_dim": 8, "intermediate_size": 24, "num_experts": 3},
                     dict(d=32, hd_s=8, ff_e=24, experts=3, rows=[0, 1, 4, 5, 8, 9, 12, 13])),
    "lfm2_moe": ({"hidden_size": 32, "intermediate_size": 24, "num_experts": 3},
                 dict(d=32, hd_s=8, ff_e=24, experts=3, rows=FULL_ROPE_16_TO_8)),
    # interleaved over the whole head: teacher pairs 0, 2, 4, 6 are rows (0, 1), (4, 5), (8, 9), (12, 13)
    "ernie4_5": ({"hidden_size": 32, "head_dim": 8}, dict(d=32, hd_s=8, rows=[0, 1, 4, 5, 8, 9, 12, 13])),
    # latent attention narrows whole heads (their q, [k | v] and output blocks), the latent's ranks kept
    "deepseek_v3": ({"hidden_size": 32, "num_heads": 2, "intermediate_size": 24, "num_experts": 4},
                    dict(d=32, q_heads=[0, 1], ff_e=24, experts=[0, 1, 4, 5])),
    # [query | gate] per head: 2 query heads on 2 KV heads, their query rows then their gate's first rows; or head_dim 8
    "minicpm5_moe": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 24, "num_experts": 4},
                     dict(d=32, q_heads=[0, 2], kv_heads=[0, 1], ff_e=24, experts=[0, 1, 4, 5])),
    "minicpm5_moe-head_dim": ({"head_dim": 8}, dict(hd_s=8, rows=FULL_ROPE_16_TO_8)),
    # MiMo-V2-Flash: its attention whole (both kinds), the residual stream, experts (2 of each group) and their width
    "mimo_v2_flash": ({"hidden_size": 32, "intermediate_size": 24, "num_experts": 4},
                      dict(d=32, ff_e=24, experts=[0, 1, 4, 5])),
    # 2 query heads of 6 rows (of 12: partial RoPE rotates 4, pair (0, 2) kept, then the still rows 4..7): on the full
    # layers' 1 KV head both (0, 1), on the sliding layers' 2 (twice num_key_value_heads) one each (0, 2), their sinks
    # too; value heads (v_head_dim 8) of 4 rows, as head_dim 12 -> 6 scales them, their first
    "mimo_v2_flash-heads": ({"num_heads": 2, "head_dim": 6},
                            dict(hd_s=6, q_heads=[0, 1], kv_heads=[0], rows=[0, 2, 4, 5, 6, 7],
                                 per_layer={2: dict(KV_t=2, q_heads=[0, 2], kv_heads=[0, 1])})),
    "laguna": ({"hidden_size": 32, "intermediate_size": 24, "num_experts": 3}, dict(d=32, ff_e=24, experts=3)),
    # half the query heads, layer by layer: 2 on 1 KV head where the teacher has 4 on 2 (heads 0, 1), 1 where it has 2
    # (teacher layer 1: head 0); the output gate's rows (one per head) follow them
    "laguna-heads": ({"num_heads": 2, "num_kv_heads": 1},
                     dict(q_heads=[0, 1], kv_heads=[0], per_layer={1: dict(H_t=2, q_heads=[0], kv_heads=[0])})),
    # head_dim 8: its full layers (0, 3) rotate half a head (pair (0, 4) and (2, 6) of 8 rotated rows, then the still
    # rows 8..11), its sliding layer 1 all of it (FULL_ROPE_16_TO_8): each layer kind's own RoPE pairs
    "laguna-head_dim": ({"head_dim": 8},
                        dict(hd_s=8, rows=[0, 2, 4, 6, 8, 9, 10, 11],
                             per_layer={1: dict(H_t=2, q_heads=[0, 1], rows=FULL_ROPE_16_TO_8)})),
    # Gemma 4: the residual stream, the per-layer embeddings' blocks of the kept layers (1, 2, 3); the MLPs' first 40
    # units, 80 in KV-shared teacher layer 3 (twice as wide); its heads of 16 and 32 rows kept
    "gemma4": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, ff=40)),
    # 2 query heads on 1 KV head of 8 rows; the full layers' heads (32 rows: global_head_dim) halve alike (16), their
    # 2 KV heads too (1); the KV-shared layer 3 reads layer 1's kept KV head
    "gemma4-heads": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "head_dim": 8},
                     dict(d=32, hd_s=8, q_heads=[0, 1], kv_heads=[0], rows=FULL_ROPE_16_TO_8,
                          full=dict(hd_s=16, rows=FULL_ROPE_32_TO_16, kv_heads=[0]))),
    "gemma4_moe": ({"hidden_size": 32, "intermediate_size": 24, "num_experts": 3}, dict(d=32, ff_e=24, experts=3)),
    # the unified text model narrows as Gemma 4's (its full layers' heads of their own, KV-shared layer 3 reading 1)
    "gemma4_unified": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, ff=40)),
    "gemma4_unified-heads": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "head_dim": 8},
                             dict(d=32, hd_s=8, q_heads=[0, 1], kv_heads=[0], rows=FULL_ROPE_16_TO_8,
                                  full=dict(hd_s=16, rows=FULL_ROPE_32_TO_16, kv_heads=[0]))),
    # 2 query heads of 8 rows: on the sliding layers' 2 KV heads one each (heads 0, 2), on the full layers' one KV head
    # (num_global_key_value_heads) both (heads 0, 1, of 16 rows), whose keys are their values: o reads the key rows
    "gemma4_moe-heads": ({"num_heads": 2, "head_dim": 8},
                         dict(hd_s=8, q_heads=[0, 2], kv_heads=[0, 1], rows=FULL_ROPE_16_TO_8,
                              full=dict(hd_s=16, rows=FULL_ROPE_32_TO_16, q_heads=[0, 1], kv_heads=[0],
                                        o_rows=FULL_ROPE_32_TO_16))),
    # MiniMax: 2 query heads on 1 KV head (head_dim 16 kept), in the lightning layers those heads' [q | k | v] blocks,
    # gate and norm rows and decays; or head_dim 8 (RoPE pairs, the same rows in the lightning layers)
    "minimax": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 40, "num_experts": 2},
                dict(d=32, q_heads=[0, 1], kv_heads=[0], ff_e=40, experts=2)),
    "minimax-head_dim": ({"hidden_size": 32, "num_experts": 3}, dict(d=32, hd_s=8, experts=3, rows=FULL_ROPE_16_TO_8)),
    # Jamba: heads, experts and the MLP narrow (the experts and the dense MLPs one intermediate_size); its Mamba-1
    # mixers, mamba_expand x hidden_size wide, are kept whole: a narrower hidden_size gets a wider mamba_expand
    "jamba": ({"num_heads": 2, "num_kv_heads": 1, "intermediate_size": 40, "num_experts": 3},
              dict(q_heads=[0, 1], kv_heads=[0], ff=40, ff_e=40, experts=3)),
    "jamba-hidden": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1}, dict(d=32, q_heads=[0, 1], kv_heads=[0])),
    "deepseek_v32": ({"hidden_size": 32, "num_heads": 2, "intermediate_size": 24, "num_experts": 4},
                     dict(d=32, q_heads=[0, 1], ff_e=24, experts=[0, 1, 4, 5])),
    "axk1": ({"hidden_size": 32, "num_heads": 2, "intermediate_size": 24, "num_experts": 4},
             dict(d=32, q_heads=[0, 1], ff_e=24, experts=[0, 1, 4, 5])),
    "glm_moe_dsa": ({"hidden_size": 32, "num_heads": 2, "intermediate_size": 24, "num_experts": 4},
                    dict(d=32, q_heads=[0, 1], ff_e=24, experts=[0, 1, 4, 5])),
    # groups scored by their best expert: 1 of each group of 2 (experts 0, 2, 4, 6)
    "deepseek_v2": ({"hidden_size": 32, "num_heads": 2, "intermediate_size": 24, "num_experts": 4},
                    dict(d=32, q_heads=[0, 1], ff_e=24, experts=[0, 2, 4, 6])),
    "glm4_moe_lite": ({"hidden_size": 32, "num_heads": 3, "intermediate_size": 24, "num_experts": 2},
                      dict(d=32, q_heads=[0, 1, 2], ff_e=24, experts=2)),
    "ministral3": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    "cwm": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 2}, dict(d=32, q_heads=[0, 2], kv_heads=[0, 1])),
    # interleaved over the whole head: teacher pairs 0, 2, 4, 6 are rows (0, 1), (4, 5), (8, 9), (12, 13)
    "helium": ({"hidden_size": 32, "intermediate_size": 40},
               dict(d=32, hd_s=8, ff=40, rows=[0, 1, 4, 5, 8, 9, 12, 13])),
    # BitNet: head_dim hidden_size / num_heads (16 -> 8, or whole heads); the sub-norms follow the heads and the units
    "bitnet": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    "bitnet-heads": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1},
                     dict(d=32, q_heads=[0, 1], kv_heads=[0])),
    "hunyuan_v1_dense": ({"hidden_size": 32, "intermediate_size": 40},
                         dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    "jais2": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    "vaultgemma": ({"hidden_size": 32, "head_dim": 8, "intermediate_size": 64},
                   dict(d=32, hd_s=8, ff=64, rows=FULL_ROPE_16_TO_8)),
    # attention_multiplier follows head_dim 16 -> 8; the sinks of the 4 query heads kept
    "granite_swa": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    # 2 query heads on 2 KV heads: query heads 0, 2 and their sinks; head_dim (so attention_multiplier) kept
    "granitemoe_swa": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 40,
                        "num_experts": 3}, dict(d=32, q_heads=[0, 2], kv_heads=[0, 1], ff_e=40, experts=3)),
    # group-limited routing: 4 of 8 experts in n_group 2 = the first 2 of each group of 4
    "solar_open": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 24, "num_experts": 4},
                   dict(d=32, q_heads=[0, 2], kv_heads=[0, 1], ff_e=24, experts=[0, 1, 4, 5])),
    "minimax_m2": ({"hidden_size": 32, "intermediate_size": 24, "num_experts": 3}, dict(d=32, ff_e=24, experts=3)),
    # half the heads on one KV head, head_dim 8 (per-head norms' rows following), 3 experts of 24 units; the shared
    # expert keeps its own width
    "kolibri1": HALF_HEADS_HD8_3_EXPERTS,
    # half the heads on one KV head, head_dim 16 of 32 (NVFP4's blocks of 16), 3 experts of 24 units; the shared expert
    # and the dense MLP keep their widths
    "kolibri1_1": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16, "intermediate_size": 24,
                    "num_experts": 3}, dict(d=32, q_heads=[0, 1], kv_heads=[0], hd_s=16,
                                            rows=[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30], ff_e=24,
                                            experts=3)),
    # 2 heads on 1 KV head, head_dim 8: their sinks follow; 3 experts of 24 units, the shared expert kept whole
    "flint": HALF_HEADS_HD8_3_EXPERTS,
    # half the heads on one KV head, head_dim 8: the output gate's rows follow the kept heads' first rows
    "afmoe": HALF_HEADS_HD8_3_EXPERTS,
    # half the heads on one KV head, head_dim 8 (its per-head q/k norms' rows follow), 3 experts of 24 units and the
    # shared expert with them; the dense layers keep their width
    "hy_v3": HALF_HEADS_HD8_3_EXPERTS,
    # interleaved RoPE over the whole head (teacher pairs 0, 2, 4, 6); dense layers keep their width, the shared
    # expert narrows with the routed ones
    "cohere2_moe": ({"hidden_size": 32, "intermediate_size": 24, "num_experts": 3},
                    dict(d=32, hd_s=8, ff_e=24, experts=3, rows=[0, 1, 4, 5, 8, 9, 12, 13])),
    "youtu": ({"hidden_size": 32, "num_heads": 2, "intermediate_size": 40}, dict(d=32, q_heads=[0, 1], ff=40)),
    # dim_model_base 16 -> 8: the logits' divisor hidden_size / dim_model_base stays 4 (see _check_narrow_student)
    "minicpm3": ({"hidden_size": 32, "num_heads": 2, "intermediate_size": 40}, dict(d=32, q_heads=[0, 1], ff=40)),
    # 8 of 16 rows rotate, pairs (i, i+4): 4 of 8, teacher pairs 0, 2 = rows 0, 4, 2, 6; then rows 8..11, in each
    # head's [q | k | v] block, the per-head q/k LayerNorms likewise
    "persimmon": ({"hidden_size": 32, "intermediate_size": 40},
                  dict(d=32, hd_s=8, ff=40, rows=[0, 2, 4, 6, 8, 9, 10, 11])),
    "nanochat": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    "mellum": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 24, "num_experts": 2},
               dict(d=32, q_heads=[0, 2], kv_heads=[0, 1], ff_e=24, experts=2)),
    "flex_olmo": ({"hidden_size": 32, "intermediate_size": 40, "num_experts": 3},
                  dict(d=32, hd_s=8, ff_e=40, experts=3, rows=FULL_ROPE_16_TO_8)),
    # the shared MLP narrows with the experts (one intermediate_size)
    "hunyuan_v1_moe": ({"hidden_size": 32, "intermediate_size": 24, "num_experts": 3},
                       dict(d=32, hd_s=8, ff=24, ff_e=24, experts=3, rows=FULL_ROPE_16_TO_8)),
    # group-limited routing: 4 of 8 experts in n_group 2 = the first 2 of each group of 4
    "exaone_moe": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 24, "num_experts": 4},
                   dict(d=32, q_heads=[0, 2], kv_heads=[0, 1], ff_e=24, experts=[0, 1, 4, 5])),
    # interleaved RoPE on 8 of 16 rows: 4 of 8 keep teacher pairs 0, 2 (rows 0, 1, 4, 5), then rows 8..11;
    # rotary_dim 8 -> 4 (see _check_narrow_student)
    "gptj": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=[0, 1, 4, 5, 8, 9, 10, 11])),
    # multi-query: 2 query heads on the one KV head (head_dim 16 kept), or head_dim 8 (the first rows: no RoPE)
    "gpt_bigcode": ({"hidden_size": 32, "num_heads": 2}, dict(d=32, q_heads=[0, 1], kv_heads=[0])),
    "gpt_bigcode-head_dim": ({"hidden_size": 32, "intermediate_size": 40},
                             dict(d=32, hd_s=8, ff=40, rows=list(range(8)))),
    "gpt_bigcode_mha": ({"hidden_size": 32, "num_heads": 2}, dict(d=32, q_heads=[0, 1], kv_heads=[0, 1])),
    "mpt": ({"hidden_size": 32}, dict(d=32, hd_s=8, ff=128, rows=list(range(8)))),  # as Bloom's
    # Falcon-7B: 4 heads on the one KV head narrow to head_dim 8 (RoPE pairs), the MLP to 40
    "falcon": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=FULL_ROPE_16_TO_8)),
    # Falcon-40B: 1 query head per KV head (of 2): query heads 0, 2 in their groups, head_dim 16 kept; or head_dim 8
    "falcon_new": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 2}, dict(d=32, q_heads=[0, 2], kv_heads=[0, 1])),
    "falcon_new-head_dim": ({"hidden_size": 16, "num_heads": 2, "num_kv_heads": 1},  # group 0 whole, head_dim 8
                            dict(d=16, hd_s=8, q_heads=[0, 1], kv_heads=[0], rows=FULL_ROPE_16_TO_8)),
    "falcon_rw": ({"hidden_size": 32}, dict(d=32, hd_s=8, rows=list(range(8)))),  # ALiBi: first rows, as Bloom's
    # one KV head per query head: 2 heads, num_kv_heads 2 in the student's config
    "falcon_mha": ({"hidden_size": 32, "num_heads": 2}, dict(d=32, q_heads=[0, 1], kv_heads=[0, 1])),
    # ALiBi: the 4 heads kept, each its first 8 rows (no RoPE); the MLP 4 x 32 wide: the first 128 units
    "bloom": ({"hidden_size": 32}, dict(d=32, hd_s=8, ff=128, rows=list(range(8)))),
    # no RoPE: a head's first rows; word_embed_proj_dim follows hidden_size (see _check_narrow_student)
    "opt": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=list(range(8)))),
    "opt-heads": ({"hidden_size": 32, "num_heads": 2}, dict(d=32, q_heads=[0, 1], kv_heads=[0, 1])),
    # 4 of 16 rows rotate, pairs (i, i+2): 2 of 8, teacher pair 0 = rows 0, 2; then the non-rotated rows 4..9, each
    # of q, k (and v's first 8 rows) in its head's block
    "gpt_neox": ({"hidden_size": 32, "intermediate_size": 40},
                 dict(d=32, hd_s=8, ff=40, rows=[0, 2, 4, 5, 6, 7, 8, 9])),
    "gpt_neox-heads": ({"hidden_size": 32, "num_heads": 2}, dict(d=32, q_heads=[0, 1], kv_heads=[0, 1])),
    # its 8 heads kept, each 8 -> 4 rows: interleaved RoPE on 4 of 8 rows, 2 of 4 keep teacher pair 0 (rows 0, 1),
    # then the non-rotated rows 4, 5; rotary_dim 4 -> 2 (as GPT-J's, see _check_narrow_student)
    "codegen": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=4, ff=40, rows=[0, 1, 4, 5])),
    # 4 of its 8 heads: the first of each block of 2 (head_dim 8 kept)
    "codegen-heads": ({"hidden_size": 32, "num_heads": 4}, dict(d=32, q_heads=[0, 2, 4, 6], kv_heads=[0, 2, 4, 6])),
    # no RoPE: a head's first rows (head_dim 16 -> 8; no attention scale to follow it); or 2 whole heads
    "gpt_neo": ({"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40, rows=list(range(8)))),
    "gpt_neo-heads": ({"hidden_size": 32, "num_heads": 2}, dict(d=32, q_heads=[0, 1], kv_heads=[0, 1])),
    # 8 of 16 rows rotate, pairs (i, i+4): 4 of 8, teacher pairs 0, 2 = rows 0, 4, 2, 6; then rows 8..11; rotary_dim
    # 8 -> 4 (see _check_narrow_student). A transformers that reads no rotary_dim (5.17) rotates the whole head.
    # DBRX: 2 query heads on 1 KV head (head_dim 32 / 2 = 16 kept), 3 experts 24 wide; or head_dim 8 (RoPE pairs)
    "dbrx": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 24, "num_experts": 3},
             dict(d=32, q_heads=[0, 1], kv_heads=[0], ff_e=24, experts=3)),
    "dbrx-head_dim": ({"hidden_size": 32, "num_experts": 2}, dict(d=32, hd_s=8, experts=2, rows=FULL_ROPE_16_TO_8)),
    # Kimi Linear: the residual stream, experts and their width narrow; its heads of both kinds kept
    "kimi_linear": ({"hidden_size": 32, "intermediate_size": 24, "num_experts": 2}, dict(d=32, ff_e=24, experts=2)),
    # half the latent attention's heads (whole: their q, [k | v] out of the latent and output blocks) in layers 0 and
    # 3; the delta attention layers' 2 heads (linear_num_heads, q_proj and o_proj named as the latent layers') all kept
    "kimi_linear-heads": ({"num_heads": 2}, dict(q_heads=[0, 1])),
    "minimax_m2-head_dim": ({"head_dim": 8}, dict(hd_s=8, rows=[0, 2, 4, 6, 8, 9, 10, 11] if _ROTARY_DIM_READ
                                                  else FULL_ROPE_16_TO_8)),
    # Mamba-2 mixers: fewer ssm_heads keep each group's first heads (B and C whole); where a mixer is expand x
    # hidden_size wide the student's expand is their width over its hidden_size (Mamba-2's: 32 / 16 = 2; Bamba's 2)
    "mamba2": ({"hidden_size": 16, "ssm_heads": 4}, dict(d=16, ssm=[0, 1, 4, 5])),  # 2 of 4 in each of 2 groups
    "mamba2-hidden": ({"hidden_size": 16}, dict(d=16)),  # every head: expand 64 / 16 = 4
    "bamba-ssm": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "ssm_heads": 8},
                  dict(d=32, q_heads=[0, 1], kv_heads=[0], ssm=list(range(8)))),
    "falcon_h1-ssm": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "ssm_heads": 3},
                      dict(d=32, q_heads=[0, 1], kv_heads=[0], ssm=[0, 1, 2])),  # mamba_d_ssm 48 -> 24
    "granitemoehybrid-ssm": ({"ssm_heads": 8, "num_experts": 3}, dict(ssm=list(range(8)), experts=3)),  # expand 1
    "nemotron_h-ssm": ({"hidden_size": 32, "ssm_heads": 4}, dict(d=32, ssm=[0, 1, 2, 3])),
    # Jamba's Mamba-1 mixers narrow by channels (heads of one): the first 64 of 128, mamba_expand 64 / 32 = 2
    "jamba-ssm": ({"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "ssm_heads": 64},
                  dict(d=32, q_heads=[0, 1], kv_heads=[0], ssm=list(range(64)))),
}


@pytest.mark.parametrize("case", list(NARROW))
def test_narrow_student_is_the_teachers_slices(case, tmp_path):
    family = case.split("-")[0]
    kwargs, plan = NARROW[case]
    _check_narrow_student(make_teacher(family), kwargs, plan, tmp_path)


@pytest.mark.parametrize("case", [case for case, (kwargs, _) in NARROW.items() if "hidden_size" in kwargs])
def test_narrow_student_by_channel_activity_is_the_teachers_slices(case, tmp_path):
    """``hidden_channels="active"``: the same students with the residual channels of largest activity
    (`tailkd.calibration.channel_activity` over the kept layers' norms and the model's own, tested against a float64
    recomputation in tests/test_calibration.py) in place of the first ones: every tensor's residual side (embeddings,
    projections, norms, LFM2's convolution channels, latent attention's down projections, a mixture's router and
    experts) holds the reference's slices at those channels — which are not the first ones."""
    family = case.split("-")[0]
    kwargs, plan = NARROW[case]
    teacher = make_teacher(family)
    batches = [{"input_ids": _ids(7, (2, 13))}]
    layers = NARROW_LAYERS_OF.get(family, NARROW_LAYERS)
    activity, _ = channel_activity(teacher, config_family(teacher.config, family_spec(teacher)), batches, layers)
    channels = largest(activity, kwargs["hidden_size"])
    assert not torch.equal(channels, torch.arange(kwargs["hidden_size"]))
    _check_narrow_student(teacher, {**kwargs, "hidden_channels": "active", "calibration": lambda: batches},
                          {**plan, "d": channels}, tmp_path)


@pytest.mark.parametrize("case", [case for case, (kwargs, _) in NARROW.items()
                                  if "num_heads" in kwargs or "num_kv_heads" in kwargs])
def test_narrow_student_by_head_importance_is_the_teachers_slices(case, tmp_path):
    """``attention_heads="active"``: the same students with, per attention layer, the heads of largest importance
    (`tailkd.calibration.head_importance` and `kept_heads`, tested in tests/test_calibration.py) in place of the first
    ones: every attention tensor (q/k/v, fused qkv of every layout, o, gated queries, per-head norms, sinks, latent
    attention's per-head projections) holds the reference's slices of that layer's heads — which are not the first
    ones in some layer; the table names them. Gemma 4's full layers group their heads on KV heads of their own
    (num_global_key_value_heads, scaled as num_kv_heads), and its KV-shared layer 3 keeps the KV heads of layer 1,
    whose keys and values it reads, choosing its query heads among theirs (Kolibri 1.1's layer 3 likewise: its
    kv_source_layers)."""
    family, kwargs, plan, teacher, fam, t, layers = _narrow_case(case)
    reference = _plan(teacher, layers, **plan)
    n_kv = len(reference["q_heads"]) if reference["latent"] else len(reference["kv_heads"])  # latent: one per head
    own = {int(i): v for i, v in (_global(teacher.config, "per_layer_config") or {}).items()}  # Gemma 4's full layers
    full = {k: v for k, v in (plan.get("full") or {}).items() if k not in ("q_heads", "kv_heads")}
    per_layer = {i: {k: v for k, v in p.items() if k not in ("q_heads", "kv_heads")}
                 for i, p in plan.get("per_layer", {}).items()}
    reads = {3: 1} if family in ("gemma4", "gemma4_unified", "kolibri1_1") else {}  # the tiny Gemma 4's and Kolibri
    # 1.1's layer 3 reads layer 1's keys and values
    heads = getattr(teacher.config, "num_attention_heads_per_layer", None) or [t.heads] * t.layers  # Laguna's
    delta = {i for i, kind in enumerate(getattr(teacher.config, "layer_types", None) or []) if family == "kimi_linear"
             and kind == "linear_attention"}  # Kimi Linear's delta attention layers: their heads all kept
    heads = [teacher.config.linear_num_heads if i in delta else h for i, h in enumerate(heads)]

    twice = {i for i, kind in enumerate(getattr(teacher.config, "layer_types", None) or []) if family == "mimo_v2_flash"
             and kind == "sliding_attention"}  # MiMo-V2-Flash's sliding layers: twice the KV heads

    def kv_groups(i):  # (the layer's KV heads, the student's, query heads per student KV head)
        kv_i = own.get(i, {}).get("num_key_value_heads", t.kv_heads * (2 if i in twice else 1))
        n_kv_i = n_kv * kv_i // t.kv_heads
        return kv_i, n_kv_i, len(reference["q_heads"]) * heads[i] // t.heads // n_kv_i

    def groups(i):  # kept_heads' groups: CodeGen's by its 4 blocks
        return (4, 4, len(reference["q_heads"]) // 4) if family == "codegen" else kv_groups(i)
    first = {i: (plan["full"]["q_heads"] if i in own and "q_heads" in plan.get("full", {})
                 else plan.get("per_layer", {}).get(i, {}).get("q_heads", reference["q_heads"])) for i in layers}
    for seed in range(7, 40):  # calibration rows under which some layer's choice is not the first heads
        batches = [{"input_ids": _ids(seed, (2, 13))}]
        importance, _ = head_importance(teacher, fam, batches, layers, heads)
        q_heads = {i: kept_heads(v, *groups(i)).tolist() for i, v in importance.items() if i not in {*reads, *delta}}
        for i, source in reads.items():  # the KV heads of the layer read
            kv_i, _, per_kv = kv_groups(i)
            q_heads[i] = kept_heads(importance[i], *kv_groups(i), [h // (heads[i] // kv_i) for h in
                                                                    q_heads[source][::per_kv]]).tolist()
        alone = {i: kept_heads(importance[i], *groups(i)).tolist() for i in reads}  # as if it read its own
        if any(q != first[i] for i, q in q_heads.items()) and all(q_heads[i] != alone[i] for i in reads):
            break
    else:
        raise AssertionError("every calibration set chose the first heads")
    kv_heads = {i: [q[j * kv_groups(i)[2]] // (heads[i] // kv_groups(i)[0]) for j in range(kv_groups(i)[1])]
                for i, q in q_heads.items()}
    _check_narrow_student(teacher, {**kwargs, "attention_heads": "active", "calibration": lambda: batches},
                          {**plan, "q_heads": q_heads, "kv_heads": kv_heads, **({"full": full} if full else {}),
                           **({"per_layer": per_layer} if per_layer else {})}, tmp_path)


def _narrow_case(case):
    """A NARROW case's family, build_student kwargs, reference plan, tiny teacher, family table, teacher sizes and
    kept layers."""
    family = case.split("-")[0]
    kwargs, plan = NARROW[case]
    teacher = make_teacher(family)
    fam = config_family(teacher.config, family_spec(teacher))
    return family, kwargs, plan, teacher, fam, teacher_dims(teacher.config, fam), NARROW_LAYERS_OF.get(family,
                                                                                                      NARROW_LAYERS)


@pytest.mark.parametrize("case", [case for case, (kwargs, _) in NARROW.items() if "ssm_heads" in kwargs])
def test_narrow_student_by_ssm_head_importance_is_the_teachers_slices(case, tmp_path):
    """``ssm_head_choice="active"``: the same students with, per Mamba-2 layer, each group's heads of largest
    importance (`tailkd.calibration.ssm_head_importance`, tested in tests/test_calibration.py; `largest` by group) in
    place of the first ones: every mixer tensor holds the reference's slices of that layer's heads — which are not the
    first ones in some layer (the table's keys: tests/test_calibration.py)."""
    family, kwargs, plan, teacher, fam, t, layers = _narrow_case(case)
    for seed in range(7, 40):  # calibration rows under which some layer's choice is not the first heads
        batches = [{"input_ids": _ids(seed, (2, 13))}]
        importance, _ = ssm_head_importance(teacher, fam, batches, layers)
        ssm = {i: largest(v, kwargs["ssm_heads"], t.ssm_groups).tolist() for i, v in importance.items()}
        if any(heads != plan["ssm"] for heads in ssm.values()):
            break
    else:
        raise AssertionError("every calibration set chose the first heads")
    _check_narrow_student(teacher, {**kwargs, "ssm_head_choice": "active", "calibration": lambda: batches},
                          {**plan, "ssm": ssm}, tmp_path)


def test_calibrated_layers_channels_and_heads_compose():
    """The calibrated choices in one student: Ministral's layers 1 and 4 add nothing (so influence keeps 0, 2, 3), and
    of those layers the most active 32 residual channels and per layer the most important 2 query heads on 1 KV head
    — every tensor holds the reference's slices of the chosen layers at those channels and heads."""
    teacher = _zero_dropped_layers(make_teacher("ministral"), keep=[0, 2, 3])
    fam = config_family(teacher.config, family_spec(teacher))
    batches = [{"input_ids": _ids(seed, (2, 13))} for seed in (7, 8)]
    channels = largest(channel_activity(teacher, fam, batches, [0, 2, 3])[0], 32)
    importance = head_importance(teacher, fam, batches, [0, 2, 3], 4)[0]
    q_heads = {i: kept_heads(v, 2, 1, 2).tolist() for i, v in importance.items()}
    assert any(q != [0, 1] for q in q_heads.values())  # not the first heads throughout
    student, table = build_student(teacher, num_layers=3, hidden_size=32, num_heads=2, num_kv_heads=1,
                                   intermediate_size=48, mlp_init="copy", layer_choice="influence",
                                   hidden_channels="active", attention_heads="active", calibration=lambda: batches)
    plan = _plan(teacher, [0, 2, 3], d=channels, ff=48, q_heads=q_heads,
                 kv_heads={i: [q[0] // 2] for i, q in q_heads.items()})
    _assert_copied_exactly(student, table, teacher, plan)


def _rotated_qk(teacher, student, layer, head_dims, apply):
    """[(q, k)] of the teacher and the student at ``layer``: the q/k projections of 7 random positions of the
    residual stream ([1, 7, heads, head_dim], ``head_dims`` the two models'), after RoPE as ``apply(q, k, cos, sin)``
    applies it with the model's rotary embedding of that layer's kind; and the input, for the bound."""
    x = torch.randn(1, 7, teacher.config.hidden_size, generator=torch.Generator().manual_seed(3))
    kind, out = teacher.config.layer_types[layer], []
    with torch.no_grad():
        for model, hd in zip((teacher, student), head_dims):
            attn = model.model.layers[layer].self_attn
            q, k = (getattr(attn, proj)(x).view(1, 7, -1, hd) for proj in ("q_proj", "k_proj"))
            out.append(apply(q, k, *model.model.rotary_emb(x, torch.arange(7)[None], kind)))
    return out, x


def _assert_rotated_rows(student, layer, rotated, x, rows, partner):
    """The student's rotated q and k (``rotated``: `_rotated_qk`'s) equal the teacher's ``rows`` of each head, within
    `bounds.rope_rows_atol` of the products (hidden_size terms, no bias; ``partner``: each student row's RoPE
    partner)."""
    (tq, tk), (sq, sk) = rotated
    for got, want, proj in ((sq, tq[..., rows], "q_proj"), (sk, tk[..., rows], "k_proj")):
        weight = getattr(student.model.layers[layer].self_attn, proj).weight.double()
        mag = (x.double().abs() @ weight.abs().T).view(1, 7, -1, len(rows))
        bound = B.rope_rows_atol(x.shape[-1], torch.maximum(mag, mag[..., partner]))
        B.assert_within(got, want, bound, msg=f"{student.config.layer_types[layer]} {proj}")


@pytest.mark.parametrize("layer", [1, 2])  # LFM3's sliding (default RoPE) and full (proportional RoPE) layers
def test_proportional_rope_keeps_rotated_queries(layer):
    """LFM3's full attention layers rotate-half over the whole head at frequencies base^(-2i / head_dim), the last half
    of them 0 (proportional RoPE, partial_rotary_factor 0.5), its sliding layers at every frequency: student q/k after
    RoPE equal the teacher's on the rows of the whole head's pairs [0, 2, 4, 6, 8, 10, 12, 14] (head_dim 16 -> 8, hidden
    kept) in both; a partial-rotary choice (pairs of the first half, then non-rotated rows) would not. Bound: as
    test_interleaved_rope_keeps_rotated_queries' (64-term dot products, no bias)."""
    teacher = make_teacher("lfm3")  # first: it skips under a transformers without LFM3
    from transformers.models.lfm3.modeling_lfm3 import apply_rotary_pos_emb

    student, _ = build_student(teacher, head_dim=8)
    rotated, x = _rotated_qk(teacher, student, layer, (16, 8), lambda q, k, cos, sin: apply_rotary_pos_emb(
        q, k, cos, sin, unsqueeze_dim=2))
    _assert_rotated_rows(student, layer, rotated, x, FULL_ROPE_16_TO_8, [4, 5, 6, 7, 0, 1, 2, 3])
    (tq, _), (sq, _) = rotated
    assert not torch.allclose(sq, tq[..., [0, 2, 4, 6, 8, 9, 10, 11]], atol=1e-3)  # partial rotary's choice


@pytest.mark.parametrize("layer", [0, 1])  # Gemma 4's sliding (default RoPE, 16 rows) and full layers (proportional
def test_gemma4_heads_keep_their_rotated_rows(layer):  # RoPE over 32 rows, partial_rotary_factor 0.25)
    """A Gemma 4 student of head_dim 8 has full layers of 16-row heads (32 x 8 / 16): its q/k projections after RoPE
    (before the per-head norms, which renormalize over the kept rows) equal the teacher's on the rows of the whole
    head's pairs — 16 -> 8: FULL_ROPE_16_TO_8; 32 -> 16: FULL_ROPE_32_TO_16, whose student pair 1 rotates at the
    teacher's pair 2's frequency and whose pairs from 2 on stay still as the teacher's from 4 on. Bound: as
    test_proportional_rope_keeps_rotated_queries' (48-term dot products, no bias)."""
    from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb

    teacher = make_teacher("gemma4")
    student, _ = build_student(teacher, layers=[0, 1, 2, 3], head_dim=8)
    hd_t, hd_s, rows = (16, 8, FULL_ROPE_16_TO_8) if layer == 0 else (32, 16, FULL_ROPE_32_TO_16)
    rotated, x = _rotated_qk(teacher, student, layer, (hd_t, hd_s), lambda q, k, cos, sin: tuple(
        apply_rotary_pos_emb(y, cos, sin, unsqueeze_dim=2) for y in (q, k)))
    _assert_rotated_rows(student, layer, rotated, x, rows, [*range(hd_s // 2, hd_s), *range(hd_s // 2)])
    if layer == 1:  # partial rotary's choice (pairs (0, 4), (2, 6) of the first quarter, then rows 8..19) differs
        assert not torch.allclose(rotated[1][0], rotated[0][0][..., [0, 2, 4, 6, *range(8, 20)]], atol=1e-3)


@pytest.mark.parametrize("layer", [0, 1])  # Laguna's full (half of a head rotates) and sliding (all of it) layers
def test_laguna_heads_keep_each_kinds_rotated_rows(layer):
    """A Laguna student of head_dim 8: its q/k projections after RoPE (before the per-head norms) equal the teacher's
    on the rows of each layer kind's own pairs — full layers (partial_rotary_factor 0.5: 8 of 16 rows rotate) rows
    [0, 2, 4, 6] then the still 8..11, sliding layers (1) FULL_ROPE_16_TO_8; one share for both (the config's first,
    0.5) would rotate the sliding layers' rows at other frequencies. Bound: as
    test_proportional_rope_keeps_rotated_queries' (48-term dot products, no bias)."""
    from transformers.models.laguna.modeling_laguna import apply_rotary_pos_emb

    teacher = make_teacher("laguna")
    student, _ = build_student(teacher, layers=[0, 1, 3], head_dim=8)
    rows, partner = (([0, 2, 4, 6, 8, 9, 10, 11], [2, 3, 0, 1, 4, 5, 6, 7]) if layer == 0 else
                     (FULL_ROPE_16_TO_8, [4, 5, 6, 7, 0, 1, 2, 3]))
    rotated, x = _rotated_qk(teacher, student, layer, (16, 8), lambda q, k, cos, sin: apply_rotary_pos_emb(
        q, k, cos, sin, unsqueeze_dim=2))
    _assert_rotated_rows(student, layer, rotated, x, rows, partner)
    if layer == 1:  # the full layers' share (0.5) picks other rows here
        assert not torch.allclose(rotated[1][0], rotated[0][0][..., [0, 2, 4, 6, 8, 9, 10, 11]], atol=1e-3)


@pytest.mark.parametrize("attention_heads", ["first", "active"])
def test_laguna_per_element_gate_follows_the_kept_heads(attention_heads, tmp_path):
    """Laguna's output gate per element of each head's output (gating "per-element": g_proj [heads x head_dim, d])
    keeps the kept heads' rows, as o's columns: the reference slices of the narrow student, its heads first or by
    importance (which are not the first in some layer under these calibration rows), on one KV head — so teacher layer
    1's 2 query heads share it and the student keeps 1 of them (a layer's own count of heads per KV head)."""
    teacher = make_teacher("laguna", gating="per-element", num_key_value_heads=1)
    assert teacher.model.layers[1].self_attn.g_proj.weight.shape[0] == 2 * 16
    kwargs, plan = NARROW["laguna-heads"]
    if attention_heads == "active":
        fam = config_family(teacher.config, family_spec(teacher))
        batches = [{"input_ids": _ids(8, (2, 13))}]
        heads = teacher.config.num_attention_heads_per_layer
        importance, _ = head_importance(teacher, fam, batches, [0, 1, 3], heads)
        q_heads = {i: kept_heads(v, 1, 1, heads[i] // 2).tolist() for i, v in importance.items()}
        assert q_heads != {0: [0, 1], 1: [0], 3: [0, 1]}
        kwargs = {**kwargs, "attention_heads": "active", "calibration": lambda: batches}
        plan = {**plan, "q_heads": q_heads, "kv_heads": {i: [0] for i in q_heads}, "per_layer": {1: dict(H_t=2)}}
    _check_narrow_student(teacher, kwargs, plan, tmp_path)


def test_dbrx_experts_get_their_input_in_the_autocast_dtype(tmp_path):
    """transformers' DbrxExperts adds its experts' outputs into a buffer of its input's dtype (index_add_, which needs
    the two equal): under bf16 autocast a float32 student's residual stream meets bf16 outputs and the forward fails.
    Every model tailkd builds or loads passes `tailkd.models.autocast_safe`: under autocast the experts module gets
    its input in bf16 and the forward runs, without autocast its float32 input as it is (a full copy stays its teacher
    bit for bit: test_full_copy_is_the_teacher_bit_for_bit); one hook per module, however often it is applied."""
    from tailkd.models import autocast_safe, load_causal_lm

    student, _ = build_student(make_teacher("dbrx"), layers=SUBSET, mlp_init="copy")
    student.save_pretrained(tmp_path / "student")
    build_tiny_tokenizer().save_pretrained(tmp_path / "student")
    loaded, _ = load_causal_lm(tmp_path / "student")
    ids = _ids(3)
    assert [len(block.ffn.experts._forward_pre_hooks) for block in student.transformer.blocks] == [1] * 3  # built
    for model in (autocast_safe(student), loaded):
        seen = []
        for block in model.transformer.blocks:
            assert len(block.ffn.experts._forward_pre_hooks) == 1
            block.ffn.experts.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(_logits(model, ids)).all()
        _logits(model, ids)
        assert seen == [torch.bfloat16] * 3 + [torch.float32] * 3


def test_jamba_students_keep_whole_periods_spaced_or_by_influence():
    """Jamba's kinds repeat every 2 layers here (attention and experts by parity): a student of num_layers 2 keeps a
    whole period — the first spaced, or by influence the period of largest summed Block Influence. With teacher layer
    1 zeroed the layers' influence is about 0.62, 0, 0.26, 0.41 (`block_influence`, tested against float64 above):
    period 1 (layers 2, 3) sums more than period 0 although layer 0 alone has the most, so the period and not the two
    most influential layers (0, 3) is kept. A student of 3 layers is refused in one line before any calibration
    pass."""
    teacher = _zero_dropped_layers(make_teacher("jamba"), keep=[0, 2, 3, 4])
    batches = [{"input_ids": _ids(7, (2, 13))}]
    influence, _ = block_influence(teacher, config_family(teacher.config, family_spec(teacher)), batches)
    assert influence[2] + influence[3] > influence[0] + influence[1] and largest(influence, 2).tolist() == [0, 3]
    spaced, _ = build_student(teacher, num_layers=2, mlp_init="copy")
    assert torch.equal(spaced.model.layers[0].mamba.in_proj.weight, teacher.model.layers[0].mamba.in_proj.weight)
    _, table = build_student(teacher, num_layers=2, mlp_init="copy", layer_choice="influence",
                             calibration=lambda: batches)
    sources = {row["name"]: row["source"] for row in table}
    assert sources["model.layers.0.mamba.in_proj.weight"] == "model.layers.2.mamba.in_proj.weight"
    assert sources["model.layers.1.self_attn.q_proj.weight"] == "model.layers.3.self_attn.q_proj.weight"

    def no_pass():
        raise AssertionError("no calibration pass for a refused student")

    with pytest.raises(TailkdError, match=r"^num_layers=3, but the teacher's layer kinds repeat every 2 layers"):
        build_student(teacher, num_layers=3, layer_choice="influence", mlp_init="copy", calibration=no_pass)


def test_interleaved_rope_keeps_rotated_queries():
    """GLM-4's interleaved partial RoPE (pairs (2p, 2p+1) over the first half of each head): student q/k after RoPE
    equal the teacher's on the kept rows [0, 1, 4, 5, 8..11] (head_dim 16 -> 8, hidden kept: the same inputs), the
    reason for the pair choice; rotate-half's rows would not. Bound: each q/k entry a 48-term float32 dot product in
    either model (bounds.f32_dot_atol), RoPE mixing it with its pair partner (|cos| + |sin| <= sqrt 2) and rounding 3
    times, as test_student's rotate-half twin."""
    from transformers.models.glm4.modeling_glm4 import apply_rotary_pos_emb

    teacher = make_teacher("glm4")
    student, _ = build_student(teacher, head_dim=8)
    x = torch.randn(1, 7, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tq, tk = rotated_qk(teacher, x, 16, apply_rotary_pos_emb)
        sq, sk = rotated_qk(student, x, 8, apply_rotary_pos_emb)
    rows, partner = [0, 1, 4, 5, 8, 9, 10, 11], [1, 0, 3, 2, 4, 5, 6, 7]  # rotated rows 0..3 in pairs, 4..7 not
    for got, want, proj in ((sq, tq[..., rows], "q_proj"), (sk, tk[..., rows], "k_proj")):
        module = getattr(student.model.layers[1].self_attn, proj)
        mag = (x.double().abs() @ module.weight.double().abs().T + module.bias.double().abs())
        mag = mag.view(1, 7, -1, 8).transpose(1, 2)
        pair = torch.maximum(mag, mag[..., partner])
        bound = B.rope_rows_atol(49, pair)
        B.assert_within(got, want, bound, msg=proj)
    assert not torch.allclose(sq, tq[..., [0, 2, 4, 6, 8, 9, 10, 11]], atol=1e-3)  # rotate-half's choice


def _check_narrow_student(teacher, kwargs, plan, tmp_path):
    """A 3-layer student built with `kwargs` holds the reference slices (`plan`), runs, and saves/loads unchanged."""
    family = next(name for name, cls in CLASSES.items() if cls == type(teacher).__name__)
    layers = NARROW_LAYERS_OF.get(family, NARROW_LAYERS)
    student, table = build_student(teacher, layers=layers, mlp_init="copy", **kwargs)
    _assert_copied_exactly(student, table, teacher, _plan(teacher, layers, **plan))
    assert "truncated" in {row["action"] for row in table}
    config = student.config
    hd = plan.get("hd_s", _plan(teacher, layers)["hd_t"])
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (
        3, kwargs.get("hidden_size", teacher.config.hidden_size),
        kwargs.get("num_heads", teacher.config.num_attention_heads))
    attention = next((a for a in (getattr(layer, "self_attn", None) or getattr(layer, "mixer", None)  # Nemotron-H
                                  or getattr(layer, "attention", None) or getattr(layer, "self_attention", None)
                                  or getattr(layer, "attn", None)
                                  or getattr(getattr(layer, "norm_attn_norm", None), "attn", None)  # DBRX
                                  for layer in _decoder_layers(student))
                      if "Attention" in type(a).__name__), None)
    attention = getattr(attention, "attention", attention)  # GPT-Neo's attn holds its self-attention
    teacher_mixer = next((m for m in teacher.modules() if _is_mamba2(m)), None)
    if teacher_mixer is not None:  # Mamba-2 mixers: the kept heads, of the teacher's size, as wide as they are
        ssm = plan.get("ssm")
        heads = len(next(iter(ssm.values())) if isinstance(ssm, dict) else ssm or range(teacher_mixer.num_heads))
        assert {(m.num_heads, m.head_dim, m.n_groups, m.intermediate_size) for m in student.modules()
                if _is_mamba2(m)} == {(heads, teacher_mixer.head_dim, teacher_mixer.n_groups,
                                       heads * teacher_mixer.head_dim)}
    if family == "jamba":  # its Mamba-1 mixers: the kept channels (all: the teacher's 128), a whole mamba_expand
        ssm = plan.get("ssm")
        channels = len(next(iter(ssm.values())) if isinstance(ssm, dict) else ssm or range(128))
        assert {m.intermediate_size for m in student.modules() if type(m).__name__ == "JambaMambaMixer"} == {channels}
        assert config.mamba_expand == channels // config.hidden_size
    if attention is None:  # attention-free (Mamba): its mixers over the kept channels
        assert type(teacher).__name__ in MAMBA_CLASSES
        if teacher_mixer is None:  # Mamba-1's: intermediate_size of them
            assert [layer.mixer.intermediate_size for layer in student.backbone.layers] == [plan["ff"]] * 3
    elif hasattr(config, "kv_lora_rank"):  # latent attention: the head sizes and the latent's rank are the teacher's
        assert (attention.qk_head_dim, attention.kv_lora_rank) == (teacher.model.layers[0].self_attn.qk_head_dim, 16)
    elif family.startswith("gemma4"):  # its layers' heads of two sizes: each student layer's its teacher layer's,
        #  scaled as head_dim is, and their KV heads as num_kv_heads
        hd_t, kv_t = _global(teacher.config, "head_dim"), _global(teacher.config, "num_key_value_heads")
        kv = kwargs.get("num_kv_heads", kv_t)
        assert [layer.self_attn.head_dim for layer in student.model.layers] == [
            teacher.model.layers[i].self_attn.head_dim * hd // hd_t for i in layers] and len({*config.layer_types}) == 2
        assert [student.config.num_attention_heads // layer.self_attn.num_key_value_groups
                for layer in student.model.layers] == [
            teacher.config.num_attention_heads // teacher.model.layers[i].self_attn.num_key_value_groups * kv // kv_t
            for i in layers]
    else:
        assert _global(config, "head_dim") in (hd, None)
        assert (getattr(attention, "head_dim", None) or attention.head_size) == hd  # GPT-NeoX: head_size
    if family in ("gemma2", "gemma3", "vaultgemma"):  # attention scale 1/sqrt(query_pre_attn_scalar) follows head_dim
        assert config.query_pre_attn_scalar == hd  # the teacher's 16 is its head_dim
    if family.startswith("granite") or family == "hyperclovax":  # the attention scale itself, as 1/sqrt(head_dim)
        assert config.attention_multiplier == 0.05 * (16 / hd) ** 0.5
    if family == "falcon":  # its attention's KV heads are the layout's (num_kv_heads: read by the grouped one only)
        kv_heads = _plan(teacher, layers, **plan)["kv_heads"]  # per teacher layer under attention_heads "active"
        assert attention.num_kv_heads == len(next(iter(kv_heads.values())) if isinstance(kv_heads, dict) else kv_heads)
        grouped = config.new_decoder_architecture
        assert config.num_kv_heads == (attention.num_kv_heads if grouped else config.num_attention_heads)
    if family == "laguna":  # its query heads per layer: the kept layers', scaled as num_heads
        assert config.num_attention_heads_per_layer == [teacher.config.num_attention_heads_per_layer[i] * kwargs.get(
            "num_heads", 4) // 4 for i in layers]
    if family == "minicpm3":  # its muP scales: the logits' divisor, each layer's residual scale as the teacher's
        assert config.logits_scaling == teacher.config.logits_scaling == 4
        residual = [layer.residual_scale for layer in student.model.layers]
        assert residual == [teacher.model.layers[0].residual_scale] * 3 and config.scale_depth != 1.4
    if family == "opt":  # its embeddings are hidden_size wide: no projection in or out
        assert config.word_embed_proj_dim == config.hidden_size and student.model.decoder.project_in is None
    if family in ("gptj", "codegen"):  # their models read rotary_dim: the rows the copy keeps rotating, half a head
        assert config.rotary_dim == hd // 2 and attention.rotary_dim == hd // 2
    if family == "dbrx":  # its sizes in its sub-configs
        kv_heads = _plan(teacher, layers, **plan)["kv_heads"]
        expected = (len(next(iter(kv_heads.values())) if isinstance(kv_heads, dict) else kv_heads),
                    plan.get("ff_e", 40), len(_first(plan.get("experts", 4))), config.hidden_size)
        assert (config.attn_config.kv_n_heads, config.ffn_config.ffn_hidden_size, config.ffn_config.moe_num_experts,
                config.ffn_config.hidden_size) == expected
    if family == "minimax_m2":  # RoPE rows (rotary_dim) follow head_dim: half of each head rotates, as the teacher's
        assert config.rotary_dim == hd // 2
        assert config.rope_parameters.get("partial_rotary_factor") == (0.5 if _ROTARY_DIM_READ else None)
    ids = _ids(2)
    logits = _logits(student, ids)
    scored = head_ids(teacher.config) or TINY_VOCAB  # Apertus 1.5's head pruned to its first ids, the student's too
    assert logits.shape == (2, 13, scored) and torch.isfinite(logits).all()

    student.save_pretrained(tmp_path / "student")
    loaded = _reload(tmp_path / "student")
    assert type(loaded) is type(teacher) and loaded.dtype == torch.float32
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rotary_dim", "rope_parameters", "layer_rope_theta", "attention_multiplier",
                "intermediate_size", "layer_types", "query_pre_attn_scalar", "max_window_layers", "sliding_window",
                "final_logit_softcapping", "tie_word_embeddings", "num_experts", "num_experts_per_tok",
                "moe_intermediate_size", "shared_expert_intermediate_size", "mlp_only_layers", "decoder_sparse_step",
                "n_routed_experts", "n_shared_experts", "n_group", "topk_group", "first_k_dense_replace",
                "per_layer_config", "num_kv_shared_layers"):
        assert _global(loaded.config, key) == _global(config, key), key
    assert torch.equal(_logits(loaded, ids), logits)


# Phi, Phi-3 and OLMo-2 configs have no head_dim setting, but their models read config.head_dim first when a config
# carries one: the student's config must then carry the student's head_dim (same slices as without the key).
CONFIG_HEAD_DIM = {
    "phi": ({"head_dim": 16}, *NARROW["phi"]),
    "phi3": ({"head_dim": 16}, *NARROW["phi3"]),
    "olmo2": ({"head_dim": 16}, *NARROW["olmo2"]),
    # hidden kept, heads regrouped: head_dim stays the config's 16 (Llama's rule), query heads 0, 1 on KV head 0
    "phi3-heads": ({"head_dim": 16}, {"num_heads": 2, "num_kv_heads": 1}, dict(q_heads=[0, 1], kv_heads=[0])),
    # head_dim 8 != 64/4: the models use 8; hidden 32 over 4 heads keeps it, so every head is copied whole
    "phi3-decoupled": ({"head_dim": 8}, {"hidden_size": 32, "intermediate_size": 40}, dict(d=32, hd_s=8, ff=40)),
    "olmo2-decoupled": ({"head_dim": 8}, {"hidden_size": 32}, dict(d=32, hd_s=8)),
}


@pytest.mark.parametrize("case", list(CONFIG_HEAD_DIM))
def test_config_head_dim_of_derived_families(case, tmp_path):
    family = case.split("-")[0]
    overrides, kwargs, plan = CONFIG_HEAD_DIM[case]
    teacher = make_teacher(family, **overrides)
    assert teacher.model.layers[0].self_attn.head_dim == overrides["head_dim"]
    full, table = build_student(teacher, mlp_init="copy")  # no narrowing: the teacher bit for bit
    assert {row["action"] for row in table} == {"copied"} and full.config.head_dim == overrides["head_dim"]
    ids = _ids(8)
    assert torch.equal(_logits(full, ids), _logits(teacher, ids))
    _check_narrow_student(teacher, kwargs, plan, tmp_path)


@pytest.mark.parametrize("family", ["gemma", "qwen3", "gemma2", "gemma3"])
def test_hidden_size_not_a_multiple_of_heads_with_a_decoupled_head_dim(family, tmp_path):
    """head_dim 16 does not depend on hidden/heads in these families: hidden 30 over 4 heads is refused only where
    the installed transformers' config class refuses it (transformers 5: Gemma2, Gemma3), with tailkd's message."""
    teacher = make_teacher(family)
    try:
        type(teacher.config)(**{**teacher.config.to_dict(), "hidden_size": 30})
        config_accepts = True
    except Exception:
        config_accepts = False
    kwargs, plan = {"hidden_size": 30, "intermediate_size": 40}, dict(d=30, ff=40)
    if config_accepts:
        _check_narrow_student(teacher, kwargs, plan, tmp_path)
        return
    name = type(teacher.config).__name__
    with pytest.raises(TailkdError, match=rf"^hidden_size=30 is not divisible by num_heads=4, which {name} requires: "
                                          r"pick a hidden_size that is a multiple of 4 or another num_heads$"):
        build_student(teacher, **kwargs)


def test_phi2_shaped_teacher():
    """Phi-2's own settings: qk_layernorm off, partial_rotary_factor 0.4 (here 8 of 20 rows; Phi-2: 32 of 80),
    MHA (num_kv_heads follows num_heads), LM head bias."""
    teacher = make_teacher("phi", hidden_size=80, qk_layernorm=False, partial_rotary_factor=0.4,
                           num_key_value_heads=None)
    assert teacher.model.layers[0].self_attn.rotary_ndims == 8
    full, _ = build_student(teacher, mlp_init="copy")
    ids = _ids(7)
    assert torch.equal(_logits(full, ids), _logits(teacher, ids))
    student, table = build_student(teacher, layers=[0, 4], hidden_size=40, num_heads=2, mlp_init="copy")
    # head_dim 20: rows 0..7 rotate (pairs (i, i+4)); 2 MHA heads = teacher heads 0, 1
    assert student.config.num_key_value_heads == 2 and student.model.layers[0].self_attn.rotary_ndims == 8
    _assert_copied_exactly(student, table, teacher, _plan(teacher, [0, 4], d=40, q_heads=[0, 1], kv_heads=[0, 1]))
    student, table = build_student(teacher, layers=[0, 4], hidden_size=40, intermediate_size=50, mlp_init="copy")
    # head_dim 10: 4 rotated rows = teacher pairs 0, 2 of (i, i+4), then the first 6 of the 12 non-rotated rows
    _assert_copied_exactly(student, table, teacher, _plan(teacher, [0, 4], d=40, hd_s=10, ff=50,
                                                          rows=[0, 2, 4, 6, 8, 9, 10, 11, 12, 13]))
    assert student.model.layers[0].self_attn.rotary_ndims == 4
    assert torch.isfinite(_logits(student, ids)).all()


@pytest.mark.parametrize("family", NAMES)
def test_layer_subset_saves_and_loads_unchanged(family, tmp_path):
    teacher = make_teacher(family)
    subset = SUBSETS.get(family, SUBSET)
    student, _ = build_student(teacher, layers=subset, seed=3)
    student.save_pretrained(tmp_path / "s")
    loaded = _reload(tmp_path / "s")
    assert type(loaded) is type(teacher)
    assert loaded.config.num_hidden_layers == len(subset) and _layer_types(loaded) == _layer_types(student)
    reloaded = {**dict(loaded.named_parameters()), **_persistent_buffers(loaded)}
    for name, param in [*student.named_parameters(), *_persistent_buffers(student).items()]:
        assert torch.equal(reloaded[name], param), name
    ids = _ids(4)
    assert torch.equal(_logits(loaded, ids), _logits(student, ids))


# --------------------------------------------------------------------------- embeddings, soft-capping


@pytest.mark.parametrize("family", ["gemma", "phi"])  # tied (Gemma) and untied with a head bias (Phi)
def test_frozen_embeddings(family):
    teacher = make_teacher(family)
    student, table = build_student(teacher, num_layers=2, freeze_embeddings=True)
    assert {row["name"] for row in table if row["frozen"]} == {"model.embed_tokens.weight"}
    assert {n for n, p in student.named_parameters() if not p.requires_grad} == {"model.embed_tokens.weight"}
    assert freeze_student_embeddings(student) == ["model.embed_tokens.weight"]
    tied = student.get_output_embeddings().weight is student.get_input_embeddings().weight
    assert tied == (family == "gemma") and student.lm_head.weight.requires_grad == (family != "gemma")


@pytest.mark.parametrize("family,width", [("phi3", 32), ("phi", 32), ("qwen3", None)])
def test_tie_embeddings_ties_or_unties_the_students_head(family, width, tmp_path):
    """tie_embeddings=True on an untied teacher: one matrix, the teacher's input embeddings (narrowed), as MiniPLM's
    tied Qwen students; False on a tied teacher: a head of its own, a copy of the teacher's (tied) head. Either
    saves and loads with AutoModelForCausalLM with its tie and its logits; unset keeps the teacher's."""
    untied = make_teacher(family, tie_word_embeddings=False)
    student, table = build_student(untied, layers=SUBSET, hidden_size=width, tie_embeddings=True)
    emb, head = student.get_input_embeddings().weight, student.get_output_embeddings().weight
    assert student.config.tie_word_embeddings and head is emb
    d = emb.shape[1]
    torch.testing.assert_close(emb, untied.get_input_embeddings().weight[:, :d], rtol=0, atol=0)
    assert not torch.equal(emb, untied.get_output_embeddings().weight[:, :d])  # not the teacher's head
    assert "lm_head.weight" not in {row["name"] for row in table}
    if family == "phi":  # the head's bias stays a parameter of its own, copied
        torch.testing.assert_close(student.lm_head.bias, untied.lm_head.bias, rtol=0, atol=0)
    tied_teacher = make_teacher(family, tie_word_embeddings=True)
    own, _ = build_student(tied_teacher, layers=SUBSET, tie_embeddings=False)
    assert not own.config.tie_word_embeddings
    assert own.get_output_embeddings().weight is not own.get_input_embeddings().weight
    torch.testing.assert_close(own.get_output_embeddings().weight, tied_teacher.get_input_embeddings().weight,
                               rtol=0, atol=0)
    for model in (student, own):
        model.save_pretrained(tmp_path / "s")
        loaded = _reload(tmp_path / "s")
        tied = loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
        assert tied == model.config.tie_word_embeddings
        ids = _ids(4)
        assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert not build_student(untied, layers=SUBSET)[0].config.tie_word_embeddings  # unset: the teacher's


def test_gemma2_soft_capping_reaches_the_fused_head():
    teacher = make_teacher("gemma2")
    student, _ = build_student(teacher, layers=SUBSET, hidden_size=32)
    ids = _ids(5)
    for model in (teacher, student):
        assert model.config.final_logit_softcapping == 2.0
        head = model_head(model)
        assert head.spec == HeadSpec(vocab_size=TINY_VOCAB, softcap=2.0)
        assert verify_head(model, ids) <= 1e-5
        hidden = final_hidden(model.eval(), ids)
        torch.testing.assert_close(apply_head(hidden, head), _logits(model, ids), rtol=0, atol=1e-5)
        uncapped = apply_head(hidden, head._replace(spec=HeadSpec(vocab_size=TINY_VOCAB)))
        assert (uncapped - _logits(model, ids)).abs().max() > 0.5  # the cap matters at these logit sizes
    assert head_spec(make_teacher("gemma3")).softcap is None


# --------------------------------------------------------------------------- refusals


def test_unsupported_family_is_one_clear_line():
    model = transformers.AutoModelForCausalLM.from_config(transformers.XGLMConfig(
        vocab_size=64, d_model=32, num_layers=1, attention_heads=2, ffn_dim=64, max_position_embeddings=64))
    with pytest.raises(TailkdError) as err:
        build_student(model)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot build a student from a XGLMForCausalLM: supported teachers are ")
    for cls in CLASSES.values():
        assert cls in message
    assert message.endswith("; any causal LM teaches a student given as a folder (--student DIR)")


def _multimodal(family):
    """A multimodal teacher around `make_teacher(family)`'s text model (Gemma 4's ...ForConditionalGeneration without
    vision or audio towers; Gemma 3's with a one-layer SigLIP tower), holding its very weights."""
    text = make_teacher(family)
    if family == "gemma4":
        config = transformers.Gemma4Config(text_config=text.config.to_dict())
    elif family == "gemma4_unified":
        config = transformers.Gemma4UnifiedConfig(text_config=text.config.to_dict(), vision_config=None,
                                                  audio_config=None)
    else:
        config = transformers.Gemma3Config(text_config=text.config.to_dict(), mm_tokens_per_image=4,
                                           image_token_index=TINY_VOCAB + 5, vision_config=dict(
                                               hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=28, patch_size=14))
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {**{f"model.language_model.{k.removeprefix('model.')}": v for k, v in text.state_dict().items()
                if k.startswith("model.")}, "lm_head.weight": text.lm_head.weight}
    missing, unexpected = model.load_state_dict(state, strict=False)
    towers = ("model.vision_tower.", "model.multi_modal_projector.")
    assert not unexpected and all(k.startswith(towers) for k in missing)
    return model, text


def test_a_spaced_gemma4_student_keeps_the_layer_its_kv_shared_layers_read(tmp_path):
    """The tiny Gemma 4 teacher's layers 3 and 4 (full attention) reuse layer 1's keys and values: 3 spaced layers
    (0, 2, 4) keep layer 1, the one they read, in place of layer 0 (the nearest, ties to the lower index) and build
    (refused before: its layer 4 had no earlier full attention layer); a sharded teacher's skeleton reads the same."""
    from tailkd.config import StudentConfig
    from tailkd.sharded_teacher import student_source

    teacher = make_teacher("gemma4")
    student, table = build_student(teacher, num_layers=3, mlp_init="copy")
    assert [int(row["source"].split(".")[2]) for row in table if row["name"].endswith("input_layernorm.weight")] == [
        1, 2, 4]
    assert student.config.num_kv_shared_layers == 1
    teacher.save_pretrained(tmp_path / "teacher")
    build_tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    skeleton, _ = student_source(tmp_path / "teacher", StudentConfig(num_layers=3), dtype="fp32")
    assert [i for i, layer in enumerate(skeleton.model.layers) if not layer.input_layernorm.weight.is_meta] == [1, 2, 4]


@pytest.mark.parametrize("family", ["gemma4", "gemma3", "gemma4_unified"])
def test_a_multimodal_teachers_text_part_builds_the_student_its_text_model_builds(family, tmp_path):
    """Gemma 3's and Gemma 4's checkpoints are ...ForConditionalGeneration (their vision and audio towers beside a
    text model): a student is built from their text part (`tailkd.multimodal.text_teacher`: the text class sharing the
    teacher's language model and LM head), of that text class, tensor for tensor the student the text model alone
    builds — calibrated choices too, measured over the multimodal teacher's own modules —, and saves and loads as it.
    The multimodal teacher computes the text model's logits on text (bit for bit). Before, it was refused as a class
    the tables do not name."""
    from tailkd.multimodal import text_teacher

    teacher, text = _multimodal(family)
    ids = _ids(3)
    assert type(teacher).__name__.endswith("ForConditionalGeneration")
    assert torch.equal(_logits(teacher, ids), _logits(text, ids))
    view = text_teacher(teacher)
    assert type(view) is type(text) and view.model is teacher.get_decoder()
    assert text_teacher(text) is text
    batches = [{"input_ids": _ids(7, (2, 13))}]
    layers = NARROW_LAYERS_OF.get(family, NARROW_LAYERS)
    settings = dict(layers=layers, hidden_size=32, hidden_channels="active", intermediate_size=40,
                    mlp_units="active", mlp_init="copy", calibration=lambda: batches)
    (ours, table), (want, _) = (build_student(model, **settings) for model in (teacher, text))
    assert type(ours) is type(text) and {row["source"] for row in table} == {
        row["source"] for row in build_student(text, **settings)[1]}
    expected = {**dict(want.named_parameters()), **_persistent_buffers(want)}
    got = {**dict(ours.named_parameters()), **_persistent_buffers(ours)}
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name
    ours.save_pretrained(tmp_path / "student")
    assert type(_reload(tmp_path / "student")) is type(text)


def _longrope_phi3():
    factors = {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8}  # one per RoPE frequency of a 16-row head
    return make_teacher("phi3", max_position_embeddings=128, original_max_position_embeddings=64,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, **factors})


def test_mpts_explicit_softmax_scale_follows_head_dim():
    """MPT's attn_config.softmax_scale, where a config sets it, replaces 1/sqrt(head_dim): a student whose heads halve
    (hidden_size 64 -> 32, 4 heads kept) has it times sqrt(16 / 8), as 1/sqrt(head_dim) changes, and its attention
    computes with it; a student of the teacher's head_dim keeps it, and an unset one stays unset (the model's own)."""
    teacher = make_teacher("mpt", attn_config={"softmax_scale": 0.3})
    narrow, _ = build_student(teacher, layers=SUBSET, hidden_size=32)
    assert narrow.config.attn_config.softmax_scale == pytest.approx(0.3 * math.sqrt(2), rel=4 * 2.0**-53)  # 2 roundings
    assert narrow.transformer.blocks[0].attn.softmax_scale == narrow.config.attn_config.softmax_scale
    assert build_student(teacher, layers=SUBSET)[0].config.attn_config.softmax_scale == 0.3
    unset = build_student(make_teacher("mpt"), layers=SUBSET, hidden_size=32)[0]
    assert unset.config.attn_config.softmax_scale is None
    assert unset.transformer.blocks[0].attn.softmax_scale == 1 / math.sqrt(8)


def test_longrope_refuses_a_head_dim_change_only():
    teacher = _longrope_phi3()
    with pytest.raises(TailkdError, match=r"per-frequency factors \(long_factor, short_factor\) for head_dim 16.*"
                                          r"keep hidden_size/num_heads = 16") as err:
        build_student(teacher, hidden_size=32)
    assert "\n" not in str(err.value)
    full, _ = build_student(teacher, mlp_init="copy")
    ids = _ids(6)
    assert torch.equal(_logits(full, ids), _logits(teacher, ids))
    student, table = build_student(teacher, layers=[1, 4], hidden_size=32, num_heads=2, num_kv_heads=2)
    _assert_copied_exactly(student, table, teacher, _plan(teacher, [1, 4], d=32, q_heads=[0, 2], kv_heads=[0, 1]))
    assert student.config.rope_parameters["short_factor"] == [1.0] * 8


def test_a_dynamic_rope_of_one_layer_type_refuses_two_rotated_rows():
    """Gemma3's RoPE settings are per layer type ({"full_attention": {...}, "sliding_attention": {...}}): a dynamic
    (NTK) scaling of one of them refuses a student rotating 2 rows as a top-level one does (tests/test_student.py)."""
    rope = {F: {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
            S: {"rope_type": "default", "rope_theta": 10000.0}}
    teacher = make_teacher("gemma3", rope_parameters=rope)
    with pytest.raises(TailkdError, match=r"^the teacher's dynamic \(NTK\) RoPE scaling .* but a head_dim 2 "
                                          r"student rotates 2: pick a head_dim that rotates at least 4 "
                                          r"\(the teacher's is 16\)$"):
        build_student(teacher, head_dim=2)
    assert build_student(teacher, head_dim=4)[0].config.head_dim == 4


def test_gemma4_full_layers_heads_scale_with_head_dim_or_are_refused():
    """Gemma 4's full layers' heads (global_head_dim) scale as head_dim does: 20-row heads beside 16-row ones take a
    head_dim that is a multiple of 4 (16 -> 8 gives them 10 rows); 6 would give 7.5 rows and 14 17.5, refused in one
    line; where the scaled heads are whole but odd (global_head_dim 24, head_dim 6: 9 rows), RoPE's pairs refuse
    them."""
    teacher = make_teacher("gemma4", global_head_dim=20)
    student, _ = build_student(teacher, layers=[1, 2, 3], head_dim=8)
    assert [layer.self_attn.head_dim for layer in student.model.layers] == [10, 8, 10]
    for head_dim in (6, 14):
        with pytest.raises(TailkdError, match=rf"^head_dim={head_dim}, but teacher layer 1 \(Gemma 4\) has 20 "
                                              r"\(head_dim in per_layer_config\) where its config has 16, which a "
                                              rf"student scales alike \(16 -> {head_dim}\): pick a head_dim that is a "
                                              r"multiple of 4$"):
            build_student(teacher, layers=[1, 2, 3], head_dim=head_dim)
    with pytest.raises(TailkdError, match=r"^head_dim=6 gives the student's layer from teacher layer 1 heads of 9 rows "
                                          r"\(24 there, scaled as head_dim 16 -> 6\), which RoPE cannot rotate in "
                                          r"pairs: pick an even head_dim$"):
        build_student(make_teacher("gemma4", global_head_dim=24), layers=[1, 2, 3], head_dim=6)


@pytest.mark.parametrize("family, kwargs, message", [
    ("phi3", {"hidden_size": 32, "head_dim": 4}, r"Phi-3 has no head_dim setting \(it is hidden_size/num_heads = "
                                                 r"32/4\): drop head_dim=4"),
    ("gemma", {"head_dim": 32}, r"head_dim=32 but the teacher's is 16: .*pick 1\.\.16"),
    ("phi3", {"hidden_size": 30}, r"^hidden_size=30 is not divisible by num_heads=4: pick a hidden_size"),
    ("olmo2", {"hidden_size": 30, "head_dim": 6}, r"OLMo-2/3 has no head_dim setting"),
    ("gemma", {"head_dim": 7}, r"head_dim 7 is odd but RoPE needs it even: pick an even head_dim"),
    ("phi", {"hidden_size": 24}, r"head_dim 6 \(hidden_size/num_heads\) rotates 3 rows \(partial_rotary_factor 0\.5\), "
                                 r"which is odd"),
    # the fix named works: "an even multiple of num_heads" (hidden_size 8: head_dim 2) still rotated 1 row, and a
    # head_dim rotating none was called odd
    ("phi", {"hidden_size": 8}, r"^head_dim 2 \(hidden_size/num_heads\) rotates 1 rows \(partial_rotary_factor 0\.5\), "
                                r"which is odd but RoPE rotates pairs of rows: pick hidden_size and num_heads whose "
                                r"head_dim rotates an even number of rows, e\.g\. head_dim 4 \(hidden_size 16 with 4 "
                                r"heads\)$"),
    ("phi", {"hidden_size": 4}, r"^head_dim 1 \(hidden_size/num_heads\) rotates 0 rows \(partial_rotary_factor 0\.5\), "
                                r"but RoPE rotates pairs of rows: .* e\.g\. head_dim 4 \(hidden_size 16 with 4 "
                                r"heads\)$"),
    ("phi", {"num_heads": 2}, r"head_dim 32, wider than the teacher's 16"),
    # transformers' Helium: o_proj is hidden_size x hidden_size (the student's was cut to 2 heads' 32 columns: an
    # internal error)
    ("helium", {"num_heads": 2, "num_kv_heads": 1}, r"^Helium's attention output projection is hidden_size x "
                                                    r"hidden_size, so num_heads x head_dim \(2 x 16\) must equal "
                                                    r"hidden_size \(64\): narrow hidden_size with num_heads "
                                                    r"\(hidden_size 32\)$"),
    ("olmo2", {"num_kv_heads": 3}, r"num_kv_heads=3 but the teacher has 2"),
    # Mamba-2 mixers mamba_expand x hidden_size wide: 16 heads of 8 over 48 channels is no whole mamba_expand
    ("bamba", {"hidden_size": 48}, r"^hidden_size=48, but the teacher's Mamba-2 mixers are mamba_expand x "
                                   r"hidden_size wide and the student's 16 heads of 8 \(128 channels\) are no whole "
                                   r"mamba_expand x 48: pick ssm_heads 6 or 12$"),
    ("granitemoehybrid", {"hidden_size": 48, "ssm_heads": 4},
     r"^hidden_size=48, but the teacher's Mamba-2 mixers are mamba_expand x hidden_size wide and the student's 4 heads "
     r"of 8 \(32 channels\) are no whole mamba_expand x 48: pick ssm_heads 6 or 12$"),
    ("deepseek_v3", {"num_kv_heads": 2}, r"^DeepSeek-V3 has no grouped KV heads: drop num_kv_heads \(or set it to "
                                         r"num_heads=4\)$"),
    ("glm4_moe_lite", {"head_dim": 2}, r"^head_dim=2, but GLM-4.7-Flash's latent attention keeps its head sizes "
                                       r"\(qk_nope_head_dim, qk_rope_head_dim, v_head_dim\): drop head_dim$"),
    ("youtu", {"num_kv_heads": 2}, r"^Youtu-LLM has no grouped KV heads: drop num_kv_heads \(or set it to "
                                   r"num_heads=4\)$"),
    ("youtu", {"head_dim": 8}, r"^head_dim=8, but Youtu-LLM's latent attention keeps its head sizes"),
    ("codegen", {"num_heads": 6, "hidden_size": 48}, r"^num_heads=6, but CodeGen's qkv_proj holds its heads in 4 "
                                                     r"blocks \(mp_num, fixed in its code\), each keeping as many: "
                                                     r"pick a multiple of 4$"),
    ("minicpm3", {"hidden_size": 42, "num_heads": 2}, r"^hidden_size=42, but MiniCPM3's final hidden states divide "
                                                      r"by hidden_size / dim_model_base \(64 / 16\), a ratio a "
                                                      r"student keeps with a whole dim_model_base: pick a hidden_size "
                                                      r"that is a multiple of 4$"),
    ("bloom", {"num_heads": 2, "hidden_size": 32}, r"^num_heads=2, but Bloom's ALiBi slopes are set by the number of "
                                                   r"heads: keep num_heads 4 \(a narrower hidden_size narrows each "
                                                   r"head\)$"),
    ("gpt_bigcode", {"num_kv_heads": 2}, r"^GPT-BigCode's multi-query attention has one KV head: drop num_kv_heads "
                                         r"\(or set it to 1\)$"),
    ("falcon_rw", {"num_heads": 2, "hidden_size": 32}, r"^num_heads=2, but Falcon's ALiBi slopes are set by the "
                                                       r"number of heads: keep num_heads 4"),
    ("falcon", {"num_kv_heads": 2}, r"^Falcon's multi-query attention has one KV head: drop num_kv_heads"),
    ("falcon_mha", {"num_kv_heads": 2}, r"^Falcon has no grouped KV heads: drop num_kv_heads \(or set it to "
                                        r"num_heads=4\)$"),
    ("mpt", {"num_heads": 2, "hidden_size": 32}, r"^num_heads=2, but MPT's ALiBi slopes are set by the number of "
                                                 r"heads: keep num_heads 4"),
    ("bloom", {"intermediate_size": 128}, r"^Bloom has no intermediate_size setting \(its MLP is 4 x hidden_size "
                                          r"wide\): drop intermediate_size and choose hidden_size$"),
    ("kimi_linear", {"head_dim": 8}, r"^head_dim=8, but Kimi Linear's latent attention keeps its head sizes "
                                     r"\(qk_nope_head_dim, qk_rope_head_dim, v_head_dim\): drop head_dim$"),
    # OLMo-Hybrid's config needs an attention layer: teacher layers 0, 1, 3 are all Gated DeltaNet ones
    ("olmo_hybrid", {"layers": [0, 1, 3]}, r"^the student keeps no full_attention layer \(teacher layers 0 1 3\), "
                                           r"but OLMo-Hybrid's config needs a layer of each kind its layer_types "
                                           r"lists \(linear_attention, full_attention\): keep one of teacher layers 2 "
                                           r"4 too \(--student.layers\)$"),
    # GLM-5's layer 2 reuses layer 1's DSA top-k ("shared" in indexer_types): a student cannot start with it
    # Kolibri 1.1's layer 3 rescores the key pool of indexer 1 (index_layers) and reads its keys and values: a student
    # whose first indexed layer is 3 has no pool to rescore
    ("kolibri1_1", {"layers": [0, 2, 3]}, r"^teacher layer 3 reuses the key pool of an earlier layer \(index_layers: "
                                          r"an indexed_attention layer it does not list\), but the student keeps "
                                          r"none before it: keep teacher layer 1, which it reads, too "
                                          r"\(--student.layers\)$"),
    ("glm_moe_dsa", {"layers": [2, 3, 4]}, r"^teacher layer 2 reuses the DSA top-k of an earlier layer "
                                           r"\(indexer_types: shared\), but the student keeps none before it: keep "
                                           r"teacher layer 1, which it reads, too \(--student.layers\)$"),
    # MiMo-V2-Flash's KV heads are its config's num_key_value_heads (1 here; its sliding layers have twice that)
    ("mimo_v2_flash", {"num_kv_heads": 2}, r"^num_kv_heads=2 but the teacher has 1: pick 1\.\.1$"),
    # its value heads (v_head_dim 8 beside head_dim 12) scale as head_dim: 8 rows of 12 would give them 16/3
    ("mimo_v2_flash", {"head_dim": 8}, r"^head_dim=8, but MiMo-V2-Flash's value heads \(v_head_dim 8\) scale as "
                                       r"head_dim does \(12 -> 8\), to 5\.33333 rows: pick a head_dim that is a "
                                       r"multiple of 3$"),
    # Jamba's Mamba-1 mixers, mamba_expand x hidden_size channels: 128 of them over 48 is no whole mamba_expand
    ("jamba", {"hidden_size": 48}, r"^hidden_size=48, but the teacher's Mamba-1 mixers are mamba_expand x "
                                   r"hidden_size wide and the student's 128 channels \(ssm_heads\) are no whole "
                                   r"mamba_expand x 48: pick ssm_heads 48 or 96$"),
    ("jamba", {"ssm_heads": 129}, r"^ssm_heads=129 but the teacher's is 128: a student can only be narrower, pick "
                                  r"1\.\.128$"),
    # Jamba's kinds by period: a student's layer 1 is an attention layer, teacher layer 2 a Mamba one
    ("jamba", {"layers": [0, 2, 4]}, r"^the student's config cannot give its layer 1 the modules of teacher layer 2 "),
    # Laguna's layer 1 has 2 query heads on its 2 KV heads: half of them is 1 query head on 2 KV heads
    ("laguna", {"num_heads": 2}, r"^num_heads=2, num_kv_heads=2: the student's layer from teacher layer 1 would have 1 "
                                 r"query heads on 2 KV heads \(the teacher's 2 on 2, scaled as num_heads 4 -> 2, "
                                 r"num_kv_heads 2 -> 2\), which do not group: pick num_heads and num_kv_heads that "
                                 r"give every layer a multiple of its KV heads$"),
    # its sliding layers rotate all of a head (its full ones half): 9 rows would rotate 4 in one kind, 9 in the other
    ("laguna", {"head_dim": 9}, r"^head_dim=9: teacher layer 1's kind rotates 1 of a head \(partial_rotary_factor\), 9 "
                                r"rows of the student's, but RoPE rotates pairs of rows: pick a head_dim whose 1 share "
                                r"is an even number of rows \(at least 2\)$"),
    # Gemma 4's full layers have 1 KV head of their own (num_global_key_value_heads): half of the config's 2 is none
    ("gemma4_moe", {"num_heads": 2, "num_kv_heads": 1},
     r"^num_kv_heads=1, but teacher layer 1 \(Gemma 4\) has 1 \(num_key_value_heads in per_layer_config\) where its "
     r"config has 2, which a student scales alike \(2 -> 1\): pick a num_kv_heads that is a multiple of 2$"),
    # Laguna's layers of 2 query heads (of the config's 4) would have half a head under num_heads 1
    ("laguna", {"num_heads": 1, "num_kv_heads": 1},
     r"^num_heads=1, but teacher layer 1 \(Laguna\) has 2 \(num_attention_heads_per_layer\) where its config has 4, "
     r"which a student scales alike \(4 -> 1\): pick a num_heads that is a multiple of 2$"),
    # layers 3, 4 (full attention) reuse layer 1's keys and values: a student of layers 0, 2, 4 has no layer for 4 to
    # take them from (spaced, 3 of 5 layers would be those: the spaced choice takes layer 1 for 0, test_sizing)
    ("gemma4", {"layers": [0, 2, 4]}, r"^teacher layer 4 reuses the keys and values of an earlier full_attention layer "
                                      r"\(num_kv_shared_layers: its last 2 layers do\), but the student keeps none "
                                      r"before it: keep teacher layer 1 too \(--student.layers\)$"),
    # Gemma 4's last layer is always a full attention one: a student ending with sliding layer 2 would get a full one
    ("gemma4_moe", {"layers": [0, 2]}, r"^Gemma 4's last layer is a full_attention one whatever its config lists, "
                                       r"but the student's \(teacher layer 2\) is a sliding_attention one: end the "
                                       r"student's layers with one of teacher layers 1 3 4 \(--student.layers\)$"),
    # attention-free: no heads to narrow or choose
    ("mamba", {"num_heads": 2}, r"^Mamba has no attention heads: drop num_heads, num_kv_heads and head_dim$"),
    ("falcon_mamba", {"head_dim": 8}, r"^Mamba has no attention heads: drop num_heads, num_kv_heads and head_dim$"),
    ("mamba", {"num_layers": 2, "attention_heads": "active", "calibration": lambda: [{"input_ids": _ids(7, (2, 13))}]},
     r"^attention_heads=active chooses attention heads, but Mamba has none: drop it$"),
    # 8 heads of 8 in 2 groups: over 24 channels only 6 heads (3 per group) give a whole expand; over 20 none does
    ("mamba2", {"hidden_size": 24}, r"^hidden_size=24, but the teacher's Mamba-2 mixers are expand x hidden_size "
                                    r"wide and the student's 8 heads of 8 \(64 channels\) are no whole expand x 24: "
                                    r"pick ssm_heads 6$"),
    ("mamba2", {"hidden_size": 20}, r"^hidden_size=20, but the teacher's Mamba-2 mixers are expand x hidden_size "
                                    r"wide and the student's 8 heads of 8 \(64 channels\) are no whole expand x 20: "
                                    r"pick a hidden_size dividing 64$"),
    ("mamba2", {"ssm_heads": 3}, r"^ssm_heads=3, but the teacher's Mamba-2 heads read B and C in 2 groups "
                                 r"\(n_groups\), each keeping as many heads: pick a multiple of 2$"),
    ("nemotron_h", {"ssm_heads": 9}, r"^ssm_heads=9 but the teacher's is 8: a student can only be narrower, pick "
                                     r"1\.\.8$"),
    ("phi3", {"ssm_heads": 2}, r"^ssm_heads=2, but Phi-3 has no mixers ssm_heads narrows \(Mamba-2's heads, "
                               r"Jamba's Mamba-1 channels\): drop ssm_heads$"),
    # Mamba's own Mamba-1 mixers narrow by intermediate_size (its config's width of them)
    ("mamba", {"ssm_heads": 2}, r"^ssm_heads=2, but Mamba has no mixers ssm_heads narrows"),
    ("mamba2", {"intermediate_size": 16}, r"^Mamba-2 has no intermediate_size setting \(no MLP\): drop "
                                          r"intermediate_size and choose hidden_size$"),
])
def test_bad_arguments(family, kwargs, message):
    with pytest.raises(TailkdError, match=message) as err:
        build_student(make_teacher(family), **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", ["mamba", "mamba2", "jamba"])
def test_a_mamba_teacher_distils_through_the_cli(family, tmp_path, capsys):
    """tailkd distill on a Mamba or Mamba-2 teacher (no attention, no position limit: `tailkd.models.model_max_length`
    None), the fused loss layer: a 2-layer student — Mamba's of hidden 16 over 32 channels chosen by activity, Mamba-2's
    layers by influence, hidden 16 by activity, 4 of its mixers' 8 heads by importance (expand 2) — saved as its
    teacher's class with those sizes, student_init.json naming the heads kept, the run log the share of each layer's
    head importance they had (at least half: the larger half of each group's). Jamba's (one period: a Mamba-1 layer and
    an attention layer): hidden 32, 64 of its mixers' 128 channels by importance (mamba_expand 2)."""
    from tiny import read_metrics, write_corpus

    from tailkd.cli import main

    teacher = make_teacher(family)
    teacher.save_pretrained(tmp_path / "teacher")
    build_tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    narrow = {"mamba": ["--student.hidden_size", "16", "--student.intermediate_size", "32", "--student.mlp_units",
                        "active", "--student.mlp_init", "copy"],
              "mamba2": ["--student.layer_choice", "influence", "--student.hidden_size", "16",
                         "--student.hidden_channels", "active", "--student.ssm_heads", "4",
                         "--student.ssm_head_choice", "active"],
              "jamba": ["--student.hidden_size", "32", "--student.num_heads", "2", "--student.num_kv_heads", "1",
                        "--student.ssm_heads", "64", "--student.ssm_head_choice", "active"]}[family]
    assert main(["distill", "--teacher", str(tmp_path / "teacher"), "--student-layers", "2", *narrow, "--data",
                 str(write_corpus(tmp_path / "corpus.txt")), "--data.cache_dir", str(tmp_path / "cache"), "--seq-len",
                 "32", "--batch-size", "4", "--steps", "2", "--fused-loss", "on", "--out", str(tmp_path / "run")]) == 0
    held = [r for r in read_metrics(tmp_path / "run") if r["split"] == "heldout"]
    assert held and all(math.isfinite(r["kl"]) for r in held)
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 2
    if family == "mamba":
        assert (student.config.hidden_size, student.config.intermediate_size) == (16, 32)
        return
    if family == "jamba":
        assert (student.config.hidden_size, student.config.mamba_expand) == (32, 2)
        assert student.model.layers[0].mamba.intermediate_size == 64
        heads, line = 64, (r"Mamba-1 channels", r"channel output \|value\|", r"1 Mamba-1")
    else:
        assert (student.config.hidden_size, student.config.num_heads, student.config.expand) == (16, 4, 2)
        heads, line = 4, (r"Mamba-2 heads", r"head output norm", r"2 Mamba-2")
    rows = json.loads((tmp_path / "run" / "student_init.json").read_text())
    assert {len(row["ssm_heads"]) for row in rows if "ssm_heads" in row} == {heads}
    found = re.search(rf"{line[0]} kept by importance \(student\.ssm_head_choice active, student\.calibration_rows "
                      rf"64\): (\d+\.\d)%-(\d+\.\d)% of the teacher's {line[1]} in each of the {line[2]} layers\n",
                      capsys.readouterr().out)
    assert found and 50 <= float(found.group(1)) <= float(found.group(2)) <= 100


def _with_dropout(family, p=0.5):
    """A tiny model of ``family`` (as `make_teacher`) whose config holds every dropout probability it has at ``p``
    (float or int keys naming dropout or pdrop, sub-configs too) and no router jitter (PhiMoE's default 0.01 perturbs
    its training-mode forward too; not dropout, which is all `disable_dropout` switches off)."""
    from tailkd.dropout import DROPOUT_KEY

    name, extra = CONFIGS[family]
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    config = getattr(transformers, name)(**{**_COMMON, **extra})
    configs = [config, *(v for v in vars(config).values() if hasattr(v, "to_dict") and hasattr(v, "model_type"))]
    for c in configs:
        for key, value in list(vars(c).items()):
            if DROPOUT_KEY.search(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
                object.__setattr__(c, key, p)  # past strict type checks (MPT's attn_pdrop is typed int)
            elif "jitter" in key and isinstance(value, float):  # PhiMoE's router noise in training: no dropout
                object.__setattr__(c, key, 0.0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


# classes with no dropout anywhere: their training-mode forward is their eval-mode one already (transformers 5.25)
NO_DROPOUT = {"mamba", "falcon_mamba", "mamba2", "ernie4_5", "ernie4_5_moe", "lfm2", "lfm2_moe"}


@pytest.mark.parametrize("family", NAMES)
def test_disable_dropout_leaves_no_dropout_in_training_mode(family):
    """`prepare.disable_dropout` on a student of every family whose config sets every dropout probability to 0.5: in
    training mode its logits are then its eval-mode logits bit for bit (the same kernels on the same inputs, no draw
    left), while before they differed — in every family but the 7 without any dropout; its config's values come back
    inside `saved_dropouts` and go again after."""
    from tailkd.dropout import config_dropouts, disable_dropout, saved_dropouts

    model, ids = _with_dropout(family), _ids()
    before = config_dropouts(model.config)
    with torch.no_grad():
        evaluated = model.eval()(ids, use_cache=False).logits
        noisy = model.train()(ids, use_cache=False).logits
        lines = []
        originals = disable_dropout(model, log=lines.append)
        quiet = model.train()(ids, use_cache=False).logits
    assert torch.equal(quiet, evaluated), lines
    assert torch.equal(noisy, evaluated) == (family in NO_DROPOUT)  # the premise: dropout was there to switch off
    assert len(lines) == 1 and lines[0].startswith("dropout off (train.disable_dropout): ")
    assert config_dropouts(model.config) == []
    with saved_dropouts(originals):
        assert config_dropouts(model.config) == before
    assert config_dropouts(model.config) == []
