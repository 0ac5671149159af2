"""What every converter shares: the refusal error, RoPE scaling <-> ``rope_parameters``, routing semantics.

A converter is only written where the transformers forward computes the same function as ours; anything else is
refused with :class:`UnsupportedExport`, which names the component, its value and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kimi_lab.config.validate import shown


class UnsupportedExport(ValueError):
    """No faithful transformers equivalent (export) or no faithful kimi-lab equivalent (import)."""


def refuse(component: str, value: Any, why: str) -> UnsupportedExport:
    return UnsupportedExport(f"cannot convert {component}={shown(value)}: {why}")


# ------------------------------------------------------------------------------------------------------ RoPE


def rope_parameters(rope_cfg, seq_len: int, mla: bool) -> tuple[dict, int]:
    """Our ``rope`` group -> (transformers 5.x ``rope_parameters``, ``max_position_embeddings``).

    MHA (Llama/Qwen): HF multiplies cos/sin by the YaRN attention factor exactly as ``rope.attention_factor``.
    MLA (DeepSeek-V2/V3): HF scales the softmax by m(s, mscale_all_dim)^2 and cos/sin by m(s, mscale) /
    m(s, mscale_all_dim); ours does the same when both are set (``mla.scales_rope_tables``), so they are written
    as they are; otherwise ours leaves cos/sin plain and scales the softmax by m(s, A)^2 with A = ``mscale_all_dim``
    or 1 (``mla.softmax_mscale``), written as mscale = mscale_all_dim = A (cos/sin factor 1, softmax as ours).
    Dynamic NTK: HF measures the length against ``max_position_embeddings``, so that is our original length.
    """
    scaling = rope_cfg.scaling
    kind = "default" if scaling is None else scaling.type
    params: dict[str, Any] = {"rope_type": kind, "rope_theta": rope_cfg.theta}
    if kind == "default":
        return params, seq_len
    factor = scaling.factor
    original = scaling.original_max_position_embeddings or seq_len
    params["factor"] = factor
    if kind == "linear":
        return params, max(seq_len, math.ceil(original * factor))
    if kind == "dynamic":
        return params, original
    params.update(original_max_position_embeddings=original, beta_fast=scaling.beta_fast,
                  beta_slow=scaling.beta_slow, truncate=True)
    if mla and not (scaling.mscale and scaling.mscale_all_dim):
        all_dim = scaling.mscale_all_dim or 1.0
        params.update(mscale=all_dim, mscale_all_dim=all_dim)
    else:
        for key in ("mscale", "mscale_all_dim"):
            if scaling[key] is not None:
                params[key] = scaling[key]
    return params, max(seq_len, math.ceil(original * factor))


def _yarn_m(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_from_hf(params: dict, max_position_embeddings: int, mla: bool) -> dict:
    """transformers ``rope_parameters`` -> our ``rope`` group (a plain dict); refuses what ours cannot compute."""
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear", "dynamic", "yarn"):
        raise refuse("rope_parameters.rope_type", kind, "kimi-lab implements default, linear, dynamic and yarn")
    theta = float(params["rope_theta"])
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise refuse("rope_parameters.partial_rotary_factor", params["partial_rotary_factor"],
                     "kimi-lab rotates the whole head (MHA) or the whole rope slice (MLA)")
    scaling: dict[str, Any] = {"type": kind, "factor": float(params.get("factor") or 1.0),
                               "original_max_position_embeddings": None, "beta_fast": 32.0, "beta_slow": 1.0,
                               "mscale": None, "mscale_all_dim": None}
    if kind == "dynamic":
        scaling["original_max_position_embeddings"] = int(max_position_embeddings)
    if kind == "yarn":
        _yarn_from_hf(params, scaling, max_position_embeddings, mla)
    return {"name": kind, "theta": theta, "scaling": scaling}


def _yarn_from_hf(params: dict, scaling: dict, max_position_embeddings: int, mla: bool) -> None:
    original = int(params.get("original_max_position_embeddings") or max_position_embeddings)
    if params.get("factor") is None:  # HF: factor = max_position_embeddings / original
        scaling["factor"] = max_position_embeddings / original
    factor = scaling["factor"]
    if not params.get("truncate", True):
        raise refuse("rope_parameters.truncate", False, "kimi-lab's YaRN ramp always floors/ceils its bounds")
    scaling.update(original_max_position_embeddings=original, beta_fast=float(params.get("beta_fast") or 32),
                   beta_slow=float(params.get("beta_slow") or 1))
    mscale, all_dim = params.get("mscale"), params.get("mscale_all_dim")
    explicit = params.get("attention_factor")
    both = bool(mscale and all_dim)
    ratio = _yarn_m(factor, mscale) / _yarn_m(factor, all_dim) if both else None
    if mla:  # ours: cos/sin x the ratio when both are set, else plain; softmax x m(factor, mscale_all_dim or 1)^2
        hf_rope_factor = explicit if explicit is not None else (ratio if both else _yarn_m(factor, 1.0))
        if not math.isclose(hf_rope_factor, ratio if both else 1.0) or (not all_dim and factor > 1):
            raise refuse("rope_parameters.mscale", (mscale, all_dim),
                         "MLA in kimi-lab scales cos/sin by m(factor, mscale) / m(factor, mscale_all_dim) when both "
                         "are set (as DeepSeek-V3's config), else not at all, and its softmax by "
                         "m(factor, mscale_all_dim)^2")
        scaling.update(mscale=float(mscale) if both else None, mscale_all_dim=float(all_dim) if all_dim else None)
        return
    ours = ratio if both else _yarn_m(factor, 1.0)
    if explicit is not None and not math.isclose(float(explicit), ours):
        raise refuse("rope_parameters.attention_factor", explicit,
                     f"kimi-lab derives it from factor/mscale/mscale_all_dim (here {ours:.6g})")
    scaling.update(mscale=float(mscale) if mscale else None, mscale_all_dim=float(all_dim) if all_dim else None)


# --------------------------------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class Routing:
    """What a router computes, independent of how it is coded: scores = scoring(x W^T); selection on
    scores (+ bias if ``bias``), restricted to the best ``topk_group`` of ``n_group`` groups ranked by ``group_rule``
    (``none``: no restriction, ``max``: best expert, ``top2sum``: sum of the two best); weights = the selected
    unbiased scores, renormalised over the k if ``renorm``, times ``scale``."""

    scoring: str  # softmax | sigmoid
    bias: bool
    group_rule: str  # none | max | top2sum
    n_group: int
    topk_group: int
    renorm: bool
    scale: float


def routing_of(moe_cfg) -> Routing:
    """The routing semantics of our ``moe`` group (``Router`` with ``topk_method`` greedy, or a DeepSeek gate)."""
    method, top_k = moe_cfg.topk_method, moe_cfg.num_experts_per_tok
    n_group, topk_group = moe_cfg.n_group, moe_cfg.topk_group
    per_group = moe_cfg.n_routed_experts // n_group
    if method == "greedy":  # the greedy router renormalises only when k > 1
        renorm, rule = moe_cfg.norm_topk_prob and top_k > 1, "none"
    else:  # the DeepSeek gates renormalise always (k = 1: weight 1); V3 group score = sum of the top min(2, E/G)
        renorm = moe_cfg.norm_topk_prob
        rule = "max" if method == "group_limited_greedy" or per_group == 1 else "top2sum"
    if topk_group >= n_group:
        rule, n_group, topk_group = "none", 1, 1
    return Routing(moe_cfg.scoring_func, method == "noaux_tc", rule, n_group, topk_group, renorm,
                   moe_cfg.routed_scaling_factor)


def is_dense(cfg) -> bool:
    """Every layer a dense SwiGLU (moe=dense, or first_k_dense_replace covering all layers)."""
    return cfg.moe.name == "dense" or cfg.moe.first_k_dense_replace >= cfg.model.n_layers


def check_common(cfg) -> None:
    """What no target family can take: LayerNorm (every export target is RMSNorm-only)."""
    if cfg.norm.name != "rmsnorm":
        raise refuse("norm.name", cfg.norm.name,
                     "every transformers target (Llama, Qwen2/3-MoE, DeepSeek-V2/V3) uses RMSNorm; LayerNorm has "
                     "no faithful equivalent there. Export supports norm=rmsnorm")


def check_hf_common(hf_config) -> None:
    """Import checks shared by all families: SwiGLU with SiLU, no MLP biases, no sliding window."""
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise refuse("hidden_act", act, "kimi-lab's MLPs and experts are SwiGLU with SiLU")
    if getattr(hf_config, "use_sliding_window", False):
        raise refuse("use_sliding_window", True, "kimi-lab attention is full causal attention")
    if getattr(hf_config, "mlp_bias", False):
        raise refuse("mlp_bias", True, "kimi-lab MLPs have no biases")
