"""Norms at the study's eps values against float64 formulas; the kernel label and the timing helpers."""

from __future__ import annotations

import json

import pytest
import torch

from kimi_lab.bench import norm as bench_norm
from kimi_lab.bench._norm_profile import norm_fwd_bwd_ms, norm_kernel
from kimi_lab.model.norm import build_norm
from tests.helpers import compose_config


def _reference(name: str, x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """Ba et al. 2016 eq. 3-4 / Zhang & Sennrich 2019 eq. 4, written out in float64."""
    if name == "rmsnorm":
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    centred = x - x.mean(-1, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * weight + bias


@pytest.mark.parametrize("name", ["layernorm", "rmsnorm"])
def test_study_eps_values_match_float64_formula_and_matter(name):
    x = torch.randn(4, 7, 32, dtype=torch.float64) * 1e-4  # mean square ~1e-8: eps 1e-6 vs 1e-8 is visible
    outs = {}
    for eps in (1e-6, 1e-8):
        norm = build_norm(compose_config([f"norm={name}", f"norm.eps={eps}"]).norm, 32).double()
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 2.0, 32, dtype=torch.float64))
            if name == "layernorm":
                norm.bias.copy_(torch.linspace(-1.0, 1.0, 32, dtype=torch.float64))
        bias = getattr(norm, "bias", None)
        outs[eps] = norm(x)
        torch.testing.assert_close(outs[eps], _reference(name, x, norm.weight, bias, eps), rtol=1e-10, atol=1e-12)
    assert (outs[1e-6] - outs[1e-8]).abs().max() > 0.1


def test_norm_kernel_names_fused_or_composite():
    rms = norm_kernel(torch.nn.RMSNorm(16))
    ln = norm_kernel(torch.nn.LayerNorm(16))
    assert ln == "torch.nn.LayerNorm: fused on cpu (aten.native_layer_norm)"
    assert rms.startswith("torch.nn.RMSNorm: ") and "aten." in rms and " on cpu " in rms


def test_norm_timing_and_bench_main(capsys):
    norms = [torch.nn.RMSNorm(16) for _ in range(3)]
    assert norm_fwd_bwd_ms(norms, [(2, 8, 16)] * 3, repeats=2) > 0
    assert all(n.weight.grad is None for n in norms)  # timing leaves no gradients behind
    assert bench_norm.main(["model=tiny", "norm=layernorm", "data.batch_size=2", "model.vocab_size=1024"]) == 0
    out = json.loads(capsys.readouterr().out)
    # two separately timed quantities: their ratio depends on the machine's load, so only its definition is asserted
    assert out["norm_kernel"].startswith("torch.nn.LayerNorm: fused")
    assert out["norm_fwd_bwd_ms"] > 0 and out["model_fwd_bwd_ms"] > 0
    assert out["norm_time_share"] == pytest.approx(out["norm_fwd_bwd_ms"] / out["model_fwd_bwd_ms"])


@pytest.mark.parametrize("overrides", [
    ["attention=mla"], ["norm.qk_norm=true"], ["attention=mla", "attention.q_lora_rank=48"]])
def test_norm_input_shapes_follow_each_norm(overrides):
    """Block norms see (B, T, D); MLA's latent norms (B, T, rank); qk-norms (B, T, H, head_dim) — so the norm
    profile of a run times every norm at its own width (a single (B, T, D) input crashed MLA runs)."""
    from kimi_lab.model import build_model
    from kimi_lab.bench._norm_profile import norm_input_shapes, norm_layers
    from tests.helpers import compose_config

    model = build_model(compose_config(overrides))
    shapes = dict(zip(norm_layers(model), norm_input_shapes(model, 3, 16)))
    assert model.training and all(shape is not None for shape in shapes.values())
    d_model = model.norm.normalized_shape[0]
    widths = {shape[-1] for shape in shapes.values()}
    assert d_model in widths and len(widths) > 1
    assert all(shape[:2] == (3, 16) and shape[-1] == norm.normalized_shape[0] for norm, shape in shapes.items())
    assert norm_fwd_bwd_ms(list(shapes), list(shapes.values()), repeats=1) > 0


@pytest.mark.gpu
def test_norm_kernel_and_timing_on_cuda():
    layer_norm = norm_kernel(torch.nn.LayerNorm(64), "cuda")
    assert layer_norm.startswith("torch.nn.LayerNorm: fused on cuda")
    rms = norm_kernel(torch.nn.RMSNorm(64), "cuda")  # fused (aten._fused_rms_norm) where torch has it for CUDA
    assert rms.startswith("torch.nn.RMSNorm: ") and " on cuda " in rms
    assert norm_fwd_bwd_ms([torch.nn.RMSNorm(64).cuda() for _ in range(3)], [(4, 128, 64)] * 3) > 0


@pytest.mark.parametrize("attention", ["standard", "sdpa"])
def test_qk_norm_normalises_each_head_of_q_and_k(attention):
    """QK-norm makes attention invariant to the scale of q_proj/k_proj (per head); without it the scale matters."""
    from kimi_lab.model import build_model

    x = torch.randint(0, 1000, (2, 16))
    outs = {}
    for qk_norm in (True, False):
        cfg = compose_config([f"attention={attention}", f"norm.qk_norm={str(qk_norm).lower()}", "norm.eps=1e-12",
                              "model.vocab_size=1024"])
        torch.manual_seed(0)
        model = build_model(cfg).double().eval()
        attn = model.layers[0].self_attn
        assert isinstance(attn.q_norm, torch.nn.RMSNorm) == qk_norm and attn.q_norm is not attn.k_norm
        with torch.no_grad():
            before = model(x).logits
            attn.q_proj.weight.mul_(7.0)
            attn.k_proj.weight.mul_(0.3)
            outs[qk_norm] = (before, model(x).logits)
    torch.testing.assert_close(*outs[True], rtol=1e-9, atol=1e-9)
    assert (outs[False][0] - outs[False][1]).abs().max() > 1e-3


def test_qk_norm_is_rejected_for_mla():
    from kimi_lab.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="norm.qk_norm"):
        validate_config(compose_config(["attention=mla", "norm.qk_norm=true"]))
