"""Multi-head latent attention families: DeepSeek-V3 (sigmoid gate) and DeepSeek-V2 (softmax gate).

Our MLA, MoE, gate and experts use transformers' ``DeepseekV3*`` module and parameter names (``q_proj`` or
``q_a_proj q_a_layernorm q_b_proj``, ``kv_a_proj_with_mqa kv_a_layernorm kv_b_proj o_proj``; ``mlp.gate.weight``,
``mlp.gate.e_score_correction_bias``, ``mlp.experts.gate_up_proj`` (E, 2I, H), ``mlp.experts.down_proj`` (E, H, I),
``mlp.shared_experts.*``), and the first ``first_k_dense_replace`` layers are dense SwiGLUs of width ``d_ff``
(HF ``intermediate_size``), so weights map 1:1 under ``model.``. RoPE on interleaved pairs as DeepSeek: V3 with
``rope_interleave=True``; V2 rotates complex pairs and keeps them interleaved, a permutation of ours applied to q
and k alike, so q.k is unchanged.

Routing (see ``common.Routing``): HF DeepSeek-V3 = sigmoid scores + ``e_score_correction_bias`` for selection,
groups ranked by the sum of their two best biased scores, always-renormalised (``norm_topk_prob``) weights times
``routed_scaling_factor``. Our ``noaux_tc`` is exactly that; ``aux_tc`` and sigmoid ``greedy`` are that with a
zero bias (and one group); ``group_limited_greedy`` ranks groups by their best score, which V3 cannot, unless no
group is dropped. HF DeepSeek-V2 = softmax scores, ``greedy`` or max-score ``group_limited_greedy``, never
renormalised (its ``norm_topk_prob`` is not read), times ``routed_scaling_factor``.
"""

from __future__ import annotations

import torch

from kimi_lab.export.common import Routing, check_hf_common, refuse, rope_from_hf, rope_parameters

_BIAS = ".mlp.gate.e_score_correction_bias"


def choose(cfg, routing: Routing | None) -> str:
    """model_type for an MLA model (routing None: all layers dense -> V3 with every layer dense)."""
    if routing is None:
        return "deepseek_v3"
    if routing.scoring == "sigmoid":
        if routing.group_rule == "max" and cfg.moe.topk_method != "group_limited_greedy":
            raise refuse("moe.n_group", cfg.moe.n_group, "one expert per group: transformers' DeepSeek-V3 "
                         "scores a group by its two best experts and needs >= 2 experts per group")
        if routing.group_rule == "max":
            raise refuse("moe.topk_method", "group_limited_greedy",
                         "DeepSeek-V3 ranks groups by the sum of their two best scores, DeepSeek-V2's max-score "
                         "group rule exists only with softmax scores in transformers; set moe.topk_group >= "
                         "moe.n_group (no group dropped), moe.topk_method=noaux_tc/aux_tc, or scoring_func=softmax")
        return "deepseek_v3"
    if routing.bias or routing.group_rule == "top2sum":
        raise refuse("moe.topk_method", cfg.moe.topk_method,
                     "with softmax scores only DeepSeek-V2's gate exists in transformers: greedy or max-score "
                     "group_limited_greedy, no selection bias, no top-2-sum group rule")
    if routing.renorm:
        raise refuse("moe.norm_topk_prob", True, "DeepSeek-V2's softmax gate never renormalises the top-k weights in "
                     "transformers; export needs norm_topk_prob=false (or num_experts_per_tok=1 with greedy)")
    return "deepseek_v2"


def hf_config(model_type: str, cfg, routing: Routing | None, eos_token_id: int | None) -> dict:
    attn, moe = cfg.attention, cfg.moe
    n_layers, n_heads = cfg.model.n_layers, attn.n_heads
    rope, max_pos = rope_parameters(cfg.rope, cfg.data.seq_len, mla=True)
    config = dict(vocab_size=cfg.model.vocab_size, hidden_size=cfg.model.d_model, num_hidden_layers=n_layers,
                  num_attention_heads=n_heads, num_key_value_heads=n_heads, intermediate_size=cfg.model.d_ff,
                  hidden_act="silu", rms_norm_eps=cfg.norm.eps,
                  tie_word_embeddings=cfg.model.tie_embeddings,
                  rope_parameters=rope, max_position_embeddings=max_pos, initializer_range=cfg.model.init_std,
                  attention_dropout=attn.dropout, attention_bias=attn.bias,
                  q_lora_rank=attn.q_lora_rank,
                  kv_lora_rank=attn.kv_lora_rank, qk_nope_head_dim=attn.qk_nope_head_dim,
                  qk_rope_head_dim=attn.qk_rope_head_dim, v_head_dim=attn.v_head_dim,
                  n_routed_experts=moe.n_routed_experts, num_experts_per_tok=moe.num_experts_per_tok,
                  moe_intermediate_size=moe.moe_intermediate_size, n_shared_experts=moe.n_shared_experts,
                  first_k_dense_replace=n_layers if routing is None else moe.first_k_dense_replace,
                  n_group=1 if routing is None else routing.n_group,
                  topk_group=1 if routing is None else routing.topk_group,
                  routed_scaling_factor=1.0 if routing is None else routing.scale,
                  norm_topk_prob=bool(routing and routing.renorm), bos_token_id=None, pad_token_id=None,
                  eos_token_id=eos_token_id)
    if model_type == "deepseek_v3":
        config.update(rope_interleave=True, num_mtp_layers=0)
    else:
        config["topk_method"] = "group_limited_greedy" if routing and routing.group_rule == "max" else "greedy"
    return config


def to_hf_state(model_type: str, state: dict, cfg, routing: Routing | None) -> dict:
    """``model.`` prefix; V3: zero bias unless ours selects with it, zero-width shared experts when there are none;
    V2: no bias buffer."""
    out = {}
    for key, value in state.items():
        if key.endswith(_BIAS) and (model_type == "deepseek_v2" or routing is None):
            continue
        if key.endswith(_BIAS) and not routing.bias:
            value = torch.zeros_like(value)
        out["lm_head.weight" if key == "lm_head.weight" else f"model.{key}"] = value
    first_moe = cfg.model.n_layers if routing is None else cfg.moe.first_k_dense_replace
    for i in range(first_moe, cfg.model.n_layers):
        prefix = f"model.layers.{i}.mlp."
        if model_type == "deepseek_v3" and prefix + "gate.e_score_correction_bias" not in out:
            out[prefix + "gate.e_score_correction_bias"] = torch.zeros(cfg.moe.n_routed_experts)
        if cfg.moe.n_shared_experts == 0:
            out.update(_zero_shared(prefix, cfg.model.d_model, state["embed_tokens.weight"]))
    return out


def _zero_shared(prefix: str, d_model: int, ref: torch.Tensor) -> dict:
    """HF always builds shared experts of width moe_intermediate_size * n_shared_experts: 0 wide outputs exactly 0."""
    return {prefix + "shared_experts.gate_proj.weight": ref.new_zeros(0, d_model),
            prefix + "shared_experts.up_proj.weight": ref.new_zeros(0, d_model),
            prefix + "shared_experts.down_proj.weight": ref.new_zeros(d_model, 0)}


# ------------------------------------------------------------------------------------------------- import


def from_hf(model_type: str, hf) -> dict:
    check_hf_common(hf)
    n_heads, n_layers = int(hf.num_attention_heads), int(hf.num_hidden_layers)
    if int(getattr(hf, "num_key_value_heads", None) or n_heads) != n_heads:
        raise refuse("num_key_value_heads", hf.num_key_value_heads, "MLA shares one latent; it must equal "
                     "num_attention_heads")
    if model_type == "deepseek_v3" and not getattr(hf, "rope_interleave", True):
        raise refuse("rope_interleave", False, "kimi-lab's MLA rotates interleaved pairs (DeepSeek's layout)")
    first_dense = min(int(hf.first_k_dense_replace or 0), n_layers)
    groups = {
        "model": {"name": f"hf-{model_type}", "d_model": int(hf.hidden_size), "n_layers": n_layers,
                  "d_ff": int(hf.intermediate_size), "vocab_size": int(hf.vocab_size),
                  "tie_embeddings": bool(hf.tie_word_embeddings),
                  "init_std": float(getattr(hf, "initializer_range", 0.02)), "dropout": 0.0},
        "attention": {"name": "mla", "type": "mla", "kernel": "sdpa", "n_heads": n_heads, "n_kv_heads": None,
                      "dropout": float(getattr(hf, "attention_dropout", 0.0) or 0.0), "bias": bool(hf.attention_bias),
                      "q_lora_rank": None if hf.q_lora_rank is None else int(hf.q_lora_rank),
                      "kv_lora_rank": int(hf.kv_lora_rank), "qk_nope_head_dim": int(hf.qk_nope_head_dim),
                      "qk_rope_head_dim": int(hf.qk_rope_head_dim), "v_head_dim": int(hf.v_head_dim)},
        "norm": {"name": "rmsnorm", "eps": float(hf.rms_norm_eps), "qk_norm": False},
        "rope": rope_from_hf(hf.rope_parameters, int(hf.max_position_embeddings), mla=True),
        "moe": _moe_group(model_type, hf, first_dense),
    }
    return groups


def _moe_group(model_type: str, hf, first_dense: int) -> dict:
    n_group, topk_group = int(hf.n_group or 1), int(hf.topk_group or 1)
    common = {"name": "moe" if first_dense < int(hf.num_hidden_layers) else "dense",
              "n_routed_experts": int(hf.n_routed_experts), "num_experts_per_tok": int(hf.num_experts_per_tok),
              "moe_intermediate_size": int(hf.moe_intermediate_size), "n_shared_experts": int(hf.n_shared_experts),
              "routed_scaling_factor": float(hf.routed_scaling_factor), "first_k_dense_replace": first_dense}
    if model_type == "deepseek_v3":
        return {**common, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": n_group,
                "topk_group": topk_group, "norm_topk_prob": bool(hf.norm_topk_prob), "aux_loss_alpha": 1e-4}
    method = hf.topk_method or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise refuse("topk_method", method, "transformers' DeepSeek-V2 gate computes greedy or group_limited_greedy")
    grouped = method == "group_limited_greedy"
    return {**common, "topk_method": method, "scoring_func": "softmax", "norm_topk_prob": False,
            "n_group": n_group if grouped else 1, "topk_group": topk_group if grouped else 1}


def from_hf_state(model_type: str, hf_state: dict, groups: dict) -> dict:
    """Strip ``model.``; drop zero-width shared experts; V2 group_limited_greedy: our gate's (unused) zero bias."""
    moe = groups["moe"]
    out = {}
    for key, value in hf_state.items():
        if ".shared_experts." in key and moe["n_shared_experts"] == 0:
            continue
        out[key.removeprefix("model.")] = value
    if model_type == "deepseek_v2" and moe["topk_method"] != "greedy" and moe["name"] == "moe":
        for i in range(moe["first_k_dense_replace"], groups["model"]["n_layers"]):
            out[f"layers.{i}{_BIAS}"] = torch.zeros(moe["n_routed_experts"])
    return out
