"""kimi-lab ``Transformer`` <-> transformers ``*ForCausalLM``: pick the target, map the config and the state dict.

Registry ``FAMILIES``: transformers ``model_type`` -> the module that maps it (config both ways, state dict both
ways). The HF model is built with ``AutoModelForCausalLM.from_config`` and loaded with ``strict=True``, so a
missing or extra tensor fails the export instead of leaving a randomly initialised weight behind.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch
from omegaconf import DictConfig

from kimi_lab.export import deepseek, mha
from kimi_lab.export.common import check_common, is_dense, refuse, routing_of
from kimi_lab.export.run import structured_config
from kimi_lab.model import Transformer, build_model

FAMILIES: dict[str, ModuleType] = {
    "llama": mha, "qwen3": mha, "qwen2_moe": mha, "qwen3_moe": mha,
    "deepseek_v3": deepseek, "deepseek_v2": deepseek,
}


def require_transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError("kimi_lab.export needs transformers>=5: pip install -e '.[hf]'") from err
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"kimi_lab.export needs transformers>=5 (rope_parameters, 3-D expert banks); found "
                          f"{transformers.__version__}: pip install -e '.[hf]'")
    return transformers


def eos_id(cfg: DictConfig) -> int | None:
    """The tokenizer's <|endoftext|> id (the document separator), if the vocabulary holds it."""
    from kimi_lab.data.tokenizer import tokenizer_for

    eot = tokenizer_for(cfg.data).eot_id
    return eot if eot < cfg.model.vocab_size else None


def target(cfg: DictConfig, state: dict) -> str:
    """The transformers model_type that computes exactly our model, or UnsupportedExport naming the component."""
    check_common(cfg)
    routing = None if is_dense(cfg) else routing_of(cfg.moe)
    if cfg.attention.type == "mla":
        return deepseek.choose(cfg, routing)
    return mha.choose(cfg, routing, state)


def to_hf(cfg: DictConfig, model: Transformer):
    """Our model -> a transformers ``*ForCausalLM`` (eval mode, fp32) computing the same logits."""
    transformers = require_transformers()
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    model_type = target(cfg, state)
    routing = None if is_dense(cfg) else routing_of(cfg.moe)
    family = FAMILIES[model_type]
    kwargs = family.hf_config(model_type, cfg, routing, eos_id(cfg))
    hf_config = transformers.AutoConfig.for_model(model_type, **kwargs)
    with warnings.catch_warnings():  # zero-width shared experts: "Initializing zero-element tensors is a no-op"
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    _load_strict(hf_model, family.to_hf_state(model_type, state, cfg, routing), model_type)
    return hf_model.eval()


def _load_strict(module: torch.nn.Module, state: dict, what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{what}: state dict mismatch; missing {missing[:5]}, unexpected {unexpected[:5]}")


def from_hf(hf_model) -> tuple[DictConfig, Transformer]:
    """A transformers causal LM of a supported family -> (our config, our Transformer in eval mode)."""
    hf_config = hf_model.config
    model_type = hf_config.model_type
    if model_type not in FAMILIES:
        raise refuse("model_type", model_type, f"kimi-lab imports {sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    groups = family.from_hf(model_type, hf_config)
    cfg = structured_config(groups)
    model = build_model(cfg)
    state = family.from_hf_state(model_type, {k: v.detach() for k, v in hf_model.state_dict().items()}, groups)
    _load_strict(model, state, f"import of {model_type}")
    return cfg, model.eval()
