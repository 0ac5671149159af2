"""Multi-head / grouped-query attention families: Llama, Qwen3 (dense) and Qwen2-MoE, Qwen3-MoE (softmax top-k).

Our MHA uses Llama's parameter names (``q_proj k_proj v_proj o_proj``, per-head ``q_norm``/``k_norm`` as Qwen3),
HF's ``rotate_half`` RoPE and SwiGLU ``gate_proj up_proj down_proj``; the experts are transformers' 3-D banks
(``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)), so every weight maps 1:1 under the ``model.`` prefix.
Differences handled here (checked, never approximated):
- QK-norm: Qwen3/Qwen3-MoE always have it (RMSNorm over head_dim, as ours); Llama/Qwen2-MoE never.
- Attention biases: ours is one switch for q/k/v/o (Llama/Qwen3 ``attention_bias``); Qwen2-MoE has q/k/v biases
  (``qkv_bias``) and no o_proj bias, so it takes ours only when o_proj.bias is all zeros.
- Qwen2-MoE's shared expert is sigmoid-gated (``shared_expert_gate``); ours are ungated, so only
  ``n_shared_experts=0`` exports (as a zero-width shared expert, whose output is exactly 0).
"""

from __future__ import annotations

import torch

from kimi_lab.export.common import Routing, check_hf_common, refuse, rope_from_hf, rope_parameters

_SELECTION_BIAS = ".mlp.gate.e_score_correction_bias"
_O_BIAS = ".self_attn.o_proj.bias"


def base_config(cfg, eos_token_id: int | None) -> dict:
    """HF config keys shared by the four MHA targets."""
    d_model, n_heads = cfg.model.d_model, cfg.attention.n_heads
    rope, max_pos = rope_parameters(cfg.rope, cfg.data.seq_len, mla=False)
    return dict(vocab_size=cfg.model.vocab_size, hidden_size=d_model, num_hidden_layers=cfg.model.n_layers,
                num_attention_heads=n_heads, num_key_value_heads=cfg.attention.n_kv_heads or n_heads,
                head_dim=d_model // n_heads, intermediate_size=cfg.model.d_ff, hidden_act="silu",
                rms_norm_eps=cfg.norm.eps, tie_word_embeddings=cfg.model.tie_embeddings,
                rope_parameters=rope, max_position_embeddings=max_pos, initializer_range=cfg.model.init_std,
                attention_dropout=cfg.attention.dropout, bos_token_id=None, pad_token_id=None,
                eos_token_id=eos_token_id)


def choose(cfg, routing: Routing | None, state: dict) -> str:
    """model_type for an MHA model (routing None: all layers dense); raises for what none computes."""
    qk_norm, bias = cfg.norm.qk_norm, cfg.attention.bias
    if routing is None:
        return "qwen3" if qk_norm else "llama"
    if routing.scoring != "softmax" or routing.bias or routing.group_rule != "none":
        raise refuse("moe.topk_method/scoring_func", (cfg.moe.topk_method, cfg.moe.scoring_func),
                     "with MHA/GQA attention only the softmax top-k router exports (Qwen2-MoE/Qwen3-MoE); the "
                     "DeepSeek sigmoid / biased / group-limited gate exports only with attention=mla (DeepSeek-V3)")
    if routing.scale != 1.0:
        raise refuse("moe.routed_scaling_factor", routing.scale,
                     "Qwen2-MoE/Qwen3-MoE have no routed scaling factor (1.0 only)")
    if cfg.moe.n_shared_experts > 0:
        raise refuse("moe.n_shared_experts", cfg.moe.n_shared_experts,
                     "Qwen2-MoE gates its shared expert by sigmoid(shared_expert_gate(x)) and Qwen3-MoE has none; "
                     "kimi-lab's shared experts are ungated, so only 0 exports with MHA attention")
    if qk_norm:
        return "qwen3_moe"
    if bias:
        nonzero = [k for k, v in state.items() if k.endswith(_O_BIAS) and bool(v.abs().max() > 0)]
        if nonzero:
            raise refuse("attention.bias", True, f"Qwen2-MoE has q/k/v biases but no o_proj bias, and {nonzero[0]} "
                         "is nonzero")
    return "qwen2_moe"


def hf_config(model_type: str, cfg, routing: Routing | None, eos_token_id: int | None) -> dict:
    config = base_config(cfg, eos_token_id)
    bias = cfg.attention.bias
    if model_type in ("llama", "qwen3", "qwen3_moe"):
        config["attention_bias"] = bias
    if model_type == "llama":
        config["mlp_bias"] = False
    if routing is not None:
        config.update(num_experts=cfg.moe.n_routed_experts, num_experts_per_tok=cfg.moe.num_experts_per_tok,
                      moe_intermediate_size=cfg.moe.moe_intermediate_size, norm_topk_prob=routing.renorm,
                      decoder_sparse_step=1, mlp_only_layers=list(range(cfg.moe.first_k_dense_replace)),
                      router_aux_loss_coef=cfg.moe.aux_loss_alpha)
    if model_type == "qwen2_moe":
        config.update(qkv_bias=bias, shared_expert_intermediate_size=0)
    return config


def to_hf_state(model_type: str, state: dict, cfg, routing: Routing | None) -> dict:
    """Our state dict -> the HF one (``model.`` prefix; Qwen2-MoE: no o_proj bias, a zero-width shared expert).
    The gate's ``e_score_correction_bias`` is left out: these families have none, and ``choose`` admits only gates
    that never read it (aux_tc, group_limited_greedy keeping every group)."""
    out = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in state.items()
           if not (model_type == "qwen2_moe" and k.endswith(_O_BIAS)) and not k.endswith(_SELECTION_BIAS)}
    if model_type == "qwen2_moe":
        d_model, ref = cfg.model.d_model, state["embed_tokens.weight"]
        for i in range(cfg.moe.first_k_dense_replace, cfg.model.n_layers):
            prefix = f"model.layers.{i}.mlp."
            out[prefix + "shared_expert.gate_proj.weight"] = ref.new_zeros(0, d_model)
            out[prefix + "shared_expert.up_proj.weight"] = ref.new_zeros(0, d_model)
            out[prefix + "shared_expert.down_proj.weight"] = ref.new_zeros(d_model, 0)
            out[prefix + "shared_expert_gate.weight"] = ref.new_zeros(1, d_model)
    return out


# ------------------------------------------------------------------------------------------------- import


def from_hf(model_type: str, hf) -> dict:
    """An HF config of an MHA family -> our config groups (plain dicts)."""
    check_hf_common(hf)
    d_model, n_heads = int(hf.hidden_size), int(hf.num_attention_heads)
    head_dim = getattr(hf, "head_dim", None) or d_model // n_heads
    if head_dim * n_heads != d_model:
        raise refuse("head_dim", head_dim, f"kimi-lab's MHA uses hidden_size / num_attention_heads = "
                     f"{d_model // n_heads}")
    n_kv = int(getattr(hf, "num_key_value_heads", None) or n_heads)
    bias = bool(getattr(hf, "qkv_bias", False) if model_type == "qwen2_moe" else getattr(hf, "attention_bias", False))
    groups = {
        "model": _model_group(hf, int(hf.intermediate_size)),
        "attention": {"name": "sdpa", "n_heads": n_heads, "n_kv_heads": None if n_kv == n_heads else n_kv,
                      "dropout": float(getattr(hf, "attention_dropout", 0.0) or 0.0), "bias": bias},
        "norm": {"name": "rmsnorm", "eps": float(hf.rms_norm_eps), "qk_norm": model_type in ("qwen3", "qwen3_moe")},
        "rope": rope_from_hf(hf.rope_parameters, int(hf.max_position_embeddings), mla=False),
        "moe": {"name": "dense"},
    }
    if model_type in ("qwen2_moe", "qwen3_moe"):
        groups["moe"] = _moe_group(model_type, hf)
    return groups


def _model_group(hf, d_ff: int) -> dict:
    return {"name": f"hf-{hf.model_type}", "d_model": int(hf.hidden_size), "n_layers": int(hf.num_hidden_layers),
            "d_ff": d_ff, "vocab_size": int(hf.vocab_size), "tie_embeddings": bool(hf.tie_word_embeddings),
            "init_std": float(getattr(hf, "initializer_range", 0.02)), "dropout": 0.0}


def _moe_group(model_type: str, hf) -> dict:
    n_layers, step = int(hf.num_hidden_layers), int(getattr(hf, "decoder_sparse_step", 1))
    dense = sorted(getattr(hf, "mlp_only_layers", None) or [])
    if step != 1 or dense != list(range(len(dense))):
        raise refuse("mlp_only_layers/decoder_sparse_step", (dense, step),
                     "kimi-lab makes only the first k layers dense (moe.first_k_dense_replace)")
    if model_type == "qwen2_moe" and int(hf.shared_expert_intermediate_size) > 0:
        raise refuse("shared_expert_intermediate_size", int(hf.shared_expert_intermediate_size),
                     "Qwen2-MoE's shared expert is gated by sigmoid(shared_expert_gate(x)); kimi-lab's shared "
                     "experts are ungated")
    if int(hf.num_experts) == 0:
        raise refuse("num_experts", 0, "a MoE config without experts; use a dense architecture")
    return {"name": "moe" if len(dense) < n_layers else "dense", "topk_method": "greedy", "scoring_func": "softmax",
            "n_routed_experts": int(hf.num_experts), "num_experts_per_tok": int(hf.num_experts_per_tok),
            "moe_intermediate_size": int(hf.moe_intermediate_size), "n_shared_experts": 0,
            "norm_topk_prob": bool(hf.norm_topk_prob), "routed_scaling_factor": 1.0,
            "aux_loss_alpha": float(getattr(hf, "router_aux_loss_coef", 0.01)), "first_k_dense_replace": len(dense),
            "n_group": 1, "topk_group": 1}


def from_hf_state(model_type: str, hf_state: dict, groups: dict) -> dict:
    """HF state dict -> ours (strip ``model.``, drop Qwen2-MoE's zero-width shared expert, zero o_proj biases)."""
    out = {}
    for key, value in hf_state.items():
        if model_type == "qwen2_moe" and ".mlp.shared_expert" in key:
            continue
        out[key.removeprefix("model.")] = value
    if model_type == "qwen2_moe" and groups["attention"]["bias"]:
        for i in range(groups["model"]["n_layers"]):
            out[f"layers.{i}{_O_BIAS}"] = torch.zeros(groups["model"]["d_model"], dtype=out["norm.weight"].dtype)
    return out
