"""Attention options and kernels: float64 parity (FlashAttention's 2x rule), MLA vs transformers' DeepseekV3Attention,
causality, GQA, checkpoint portability, kernel labels and the kernels' runtime errors (the config's checks:
tests/model/test_attention_config.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf

from kimi_lab.config import validate_config
from kimi_lab.config.schema import RopeConfig
from kimi_lab.model import build_model
from kimi_lab.model.attention import MultiHeadAttention, MultiHeadLatentAttention, build_attention
from kimi_lab.model.attention import kernels
from kimi_lab.model.attention.kernels import (FlashUnavailable, check_flash, flash_attention,
                                              query_blocked_attention, standard_attention)
from kimi_lab.model.rope import RotaryEmbedding
from tests.helpers import compose_config, typed_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

D_MODEL, SEQ = 64, 24
# (option, mla kernel): every MHA option and every kernel under MLA
OPTIONS = [("standard", None), ("sdpa", None), ("flash", None), ("mla", "standard"), ("mla", "sdpa"), ("mla", "flash")]
MLA_DIMS = {"kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12, "bias": False,
            "q_lora_rank": None}


def _attn_cfg(name: str, kernel: str | None = None, **extra):
    cfg = compose_config([f"attention={name}"] + ([f"attention.kernel={kernel}"] if kernel else []))
    mla_dims = MLA_DIMS if name == "mla" else {}  # a v head dim (12) != the qk head dim (24): each kernel's handling
    return OmegaConf.merge(cfg.attention, mla_dims, extra)


def _module(name, kernel=None, seed=0, rope_cfg=None, **extra):
    torch.manual_seed(seed)
    module = build_attention(D_MODEL, _attn_cfg(name, kernel, **extra), rope_cfg=rope_cfg)
    with torch.no_grad():
        for pname, param in module.named_parameters():
            if "layernorm" in pname:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0, param.shape[-1] ** -0.5 if param.dim() > 1 else 0.1)
    return module


def _reference_of(module):
    """The same weights on the explicit kernel: the float64 reference and the same-dtype math baseline."""
    ref = copy.deepcopy(module)
    ref.kernel = type(module.kernel)("standard")
    return ref


def _run(module, x, cos, sin, grad_out, dtype):
    module = copy.deepcopy(module).to(dtype)
    x = x.detach().to(dtype).clone().requires_grad_()
    out = module(x, cos, sin)
    (out * grad_out.to(dtype)).sum().backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}
    return out.double(), {n: g.double() for n, g in grads.items()}


def _inputs(module, seq=SEQ, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, seq, D_MODEL, generator=gen)
    grad_out = torch.randn(2, seq, D_MODEL, generator=gen)
    cos, sin = RotaryEmbedding(module.rope_head_dim, seq, typed_cfg(RopeConfig, theta=10000.0, scaling=None))(seq)
    return x, cos, sin, grad_out


def _max_errors(got, want):
    """Max abs error of the output and of every gradient, relative to the reference's max magnitude."""
    out, grads = got
    ref_out, ref_grads = want
    pairs = {"out": (out, ref_out), **{n: (g, ref_grads[n]) for n, g in grads.items()}}
    return {n: ((a - b).abs().max() / b.abs().max()).item() for n, (a, b) in pairs.items()}


# ------------------------------------------------------------------------------------- float64 parity (FA rule)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("name", "kernel"), OPTIONS)
def test_option_matches_float64_reference(name, kernel, dtype):
    """FlashAttention's rule: max error vs a float64 reference <= 2x the same-dtype math kernel's, output and every
    gradient (input and parameters)."""
    module = _module(name, kernel)
    reference = _reference_of(module)
    x, cos, sin, grad_out = _inputs(module)
    want = _run(reference, x, cos, sin, grad_out, torch.float64)
    got = _max_errors(_run(module, x, cos, sin, grad_out, dtype), want)
    math = _max_errors(_run(reference, x, cos, sin, grad_out, dtype), want)
    floor = 1e-6 if dtype == torch.float32 else 1e-3  # both ~0 when a kernel is the math kernel itself
    for key, err in got.items():
        assert err <= 2 * math[key] + floor, (key, err, math[key])
    assert max(got.values()) < (1e-4 if dtype == torch.float32 else 0.1)  # and the reference is not far off


def test_reference_parity_can_fail():
    """Guard: a wrong softmax scale in the kernel breaks the 2x rule (the test above can fail)."""
    module = _module("mla", "sdpa")
    module.base_scale *= 1.01
    reference = _reference_of(module)
    reference.base_scale /= 1.01
    x, cos, sin, grad_out = _inputs(module)
    want = _run(reference, x, cos, sin, grad_out, torch.float64)
    got = _max_errors(_run(module, x, cos, sin, grad_out, torch.float32), want)
    assert got["out"] > 1e-3


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("name", ["standard", "sdpa", "flash"])
def test_gqa_matches_float64_reference(name, n_kv_heads):
    module = _module(name, n_kv_heads=n_kv_heads)
    assert isinstance(module, MultiHeadAttention)
    assert module.k_proj.out_features == n_kv_heads * module.head_dim
    x, cos, sin, grad_out = _inputs(module)
    want = _run(_reference_of(module), x, cos, sin, grad_out, torch.float64)
    got = _max_errors(_run(module, x, cos, sin, grad_out, torch.float32), want)
    assert max(got.values()) < 1e-5, got


@pytest.mark.parametrize(("name", "kernel"), OPTIONS)
def test_causality_per_option(name, kernel):
    module = _module(name, kernel).eval()
    x, cos, sin, _ = _inputs(module)
    changed = x.clone()
    changed[:, 10:] += torch.randn_like(changed[:, 10:])
    with torch.no_grad():
        a, b = module(x, cos, sin), module(changed, cos, sin)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().amax() > 1e-2


@pytest.mark.parametrize(("n_kv_heads", "block"), [(4, 5), (2, 8), (1, 30)])
def test_query_blocks_equal_the_float64_reference(n_kv_heads, block):
    """Query blocks over their past keys (MLA dims: d_v != d_qk; GQA; blocks not dividing T) = one causal softmax."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 23, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, n_kv_heads, 23, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, n_kv_heads, 23, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 4, 23, 7, generator=gen, dtype=torch.float64)
    results = []
    for fn in (standard_attention, lambda *t, scale: query_blocked_attention(*t, block=block, scale=scale)):
        out = fn(q, k, v, scale=0.3)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_sdpa_runs_math_in_query_blocks(monkeypatch, dtype):
    """Where SDPA picks its math backend (MLA on CPU), T > MATH_QUERY_BLOCK runs in causal query blocks: the label
    says so, the 2x rule and causality hold."""
    monkeypatch.setattr(kernels, "MATH_QUERY_BLOCK", 7)  # SEQ 24: blocks of 7, 7, 7, 3
    module = _module("mla", "sdpa")
    x, cos, sin, grad_out = _inputs(module)
    want = _run(_reference_of(module), x, cos, sin, grad_out, torch.float64)
    got = _max_errors(_run(module, x, cos, sin, grad_out, dtype), want)
    math = _max_errors(_run(_reference_of(module), x, cos, sin, grad_out, dtype), want)
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    assert all(err <= 2 * math[key] + floor for key, err in got.items()), (got, math)
    module(x, cos, sin)
    assert module.kernel_label() == "sdpa_auto_math_cpu+query_blocks"
    test_causality_per_option("mla", "sdpa")


# ------------------------------------------------------------------------------------- MLA vs transformers


def _hf_attention(q_lora_rank, bias, interleave=True):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    config = transformers.DeepseekV3Config(
        hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
        kv_lora_rank=MLA_DIMS["kv_lora_rank"], qk_nope_head_dim=MLA_DIMS["qk_nope_head_dim"],
        qk_rope_head_dim=MLA_DIMS["qk_rope_head_dim"], v_head_dim=MLA_DIMS["v_head_dim"], attention_bias=bias,
        rope_interleave=interleave, num_hidden_layers=1, vocab_size=128, max_position_embeddings=64)
    config._attn_implementation = "eager"
    torch.manual_seed(5)
    hf = DeepseekV3Attention(config, layer_idx=0).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0, 0.2)
    return hf


def _hf_forward(hf, x, cos, sin):
    seq = x.shape[1]
    mask = torch.full((seq, seq), torch.finfo(x.dtype).min).triu(1)[None, None]  # additive causal mask
    out, _ = hf(x, position_embeddings=(cos[None], sin[None]), attention_mask=mask)
    return out


@pytest.mark.parametrize("kernel", ["standard", "sdpa", "flash"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_mla_matches_transformers_deepseek_v3(q_lora_rank, bias, kernel):
    hf = _hf_attention(q_lora_rank, bias)
    ours = _module("mla", kernel, q_lora_rank=q_lora_rank, bias=bias).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # same names and shapes, both ways
    hf.load_state_dict(ours.state_dict(), strict=True)
    x, cos, sin, _ = _inputs(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, cos, sin), _hf_forward(hf, x, cos, sin), rtol=0, atol=1e-5)


def test_mla_rope_convention_is_interleaved_as_hf_default():
    """Guard: HF with rotate_half (rope_interleave=False) differs, so the parity above pins the convention."""
    hf = _hf_attention(None, False, interleave=False)
    ours = _module("mla", "standard").eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    x, cos, sin, _ = _inputs(ours)
    with torch.no_grad():
        assert (ours(x, cos, sin) - _hf_forward(hf, x, cos, sin)).abs().max() > 1e-3


def test_mla_yarn_mscale_scales_softmax_not_cos_sin():
    """DeepSeek's rule, applied by MLA from the rope group it is built with: softmax scale x mscale^2, cos/sin plain."""
    mscale = 0.1 * math.log(4) + 1
    yarn = typed_cfg(RopeConfig, theta=10000.0, scaling={"type": "yarn", "factor": 4.0, "mscale": None,
                                                           "mscale_all_dim": None, "dynamic_factor": False})
    module = _module("mla", "standard", rope_cfg=yarn).eval()
    assert module.softmax_scale == pytest.approx((16 + 8) ** -0.5 * mscale**2) and not module.scales_rope_tables
    plain = _module("mla", "standard").eval()  # same seed, same weights, no scaling
    plain.base_scale *= mscale**2
    x, cos, sin, _ = _inputs(module)
    with torch.no_grad():
        torch.testing.assert_close(module(x, cos, sin), plain(x, cos, sin), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("mscale_all_dim", "want"), [(None, 0.1 * math.log(4) + 1), (0.707, 0.0707 * math.log(4) + 1)])
def test_mla_in_the_transformer_applies_deepseek_yarn_mscale(mscale_all_dim, want):
    overrides = ["attention=mla", "rope=yarn", "rope.scaling.factor=4"]
    if mscale_all_dim is not None:
        overrides += ["rope.scaling.mscale=0.707", f"rope.scaling.mscale_all_dim={mscale_all_dim}"]
    model = build_model(compose_config(overrides))
    assert model.rotary.cos.shape[-1] == model.layers[0].self_attn.qk_rope_head_dim  # RoPE table of rope dims
    assert all(layer.self_attn.rope_mscale == pytest.approx(want) for layer in model.layers)
    # cos/sin reach MLA unscaled, or (mscale and mscale_all_dim both set) times their ratio, here 1
    assert model.scale_rotary_tables == (mscale_all_dim is not None)
    assert model.rotary.attention_scaling == pytest.approx(1.0 if mscale_all_dim else want)
    mha = build_model(compose_config(["rope=yarn", "rope.scaling.factor=4"]))
    assert mha.scale_rotary_tables and mha.rotary.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)


def test_mla_cache_is_the_latent():
    """MLA caches kv_lora_rank + qk_rope_head_dim values per token (shared across heads): fewer than MHA's 2*H*d."""
    mla, mha = _module("mla", "sdpa"), _module("sdpa")
    assert isinstance(mla, MultiHeadLatentAttention)
    assert mla.kv_cache_values_per_token() == 32 + 8
    assert mha.kv_cache_values_per_token() == 2 * 4 * 16
    assert _module("sdpa", n_kv_heads=1).kv_cache_values_per_token() == 2 * 16


# ------------------------------------------------------------------------------------- portability and labels


def test_one_checkpoint_for_standard_sdpa_flash():
    models = {}
    for seed, name in enumerate(["standard", "sdpa", "flash"]):
        torch.manual_seed(seed)  # different weights: equal outputs must come from the loaded state dict
        models[name] = build_model(compose_config([f"attention={name}", "attention.n_kv_heads=2"])).eval()
    state = models["standard"].state_dict()
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = models["standard"](ids).logits
        for name in ("sdpa", "flash"):
            models[name].load_state_dict(state, strict=True)
            torch.testing.assert_close(models[name](ids).logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("name", "kernel", "label"), [
    ("standard", None, "math_explicit"), ("sdpa", None, "sdpa_auto_flash_cpu"), ("flash", None, "sdpa_flash_cpu"),
    ("mla", "standard", "math_explicit"), ("mla", "sdpa", "sdpa_auto_math_cpu"),  # v dim != qk dim: SDPA math
    ("mla", "flash", "sdpa_flash_cpu+pad_v"), ("standard", "flash", "sdpa_flash_cpu"),  # MHA preset, other kernel
])
def test_recorded_kernel_is_what_ran(name, kernel, label):
    overrides = [f"attention={name}"] + ([f"attention.kernel={kernel}"] if kernel else [])
    model = build_model(compose_config(overrides))
    model(torch.randint(0, 1000, (2, 16))).logits.sum().backward()
    assert model.attention_kernel() == label


def test_flash_plans_cuda_without_running():
    model = build_model(compose_config(["attention=flash"]))
    assert model.attention_kernel("cuda").startswith(("sdpa_flash_cuda", "flash_attn_2"))  # planned, not run
    with pytest.raises(FlashUnavailable, match="cannot run on device 'mps'"):
        model.attention_kernel("mps")


# ------------------------------------------------------------------------------------- impossible settings


def test_flash_runtime_errors_say_why_and_what_to_set():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(FlashUnavailable, match="no dropout.*attention.dropout=0"):
        flash_attention(q, q, q, dropout_p=0.1)
    with pytest.raises(FlashUnavailable, match="equal q/k and v head dims, got 16 and 8.*attention.kernel=sdpa"):
        flash_attention(q, q, q[..., :8])
    with pytest.raises(FlashUnavailable, match="head dims <= 256, got 320"):
        check_flash("cuda", torch.bfloat16, 320, 320, 0.0)
    with pytest.raises(FlashUnavailable, match="does not take torch.int32"):
        check_flash("cpu", torch.int32, 16, 16, 0.0)
    module = _module("flash", dropout=0.1).train()  # training forward on CPU with dropout: refused, not rerouted
    x, cos, sin, _ = _inputs(module)
    with pytest.raises(FlashUnavailable, match="no dropout"):
        module(x, cos, sin)


def test_mla_heads_need_not_divide_d_model():
    cfg = compose_config(["attention=mla", "attention.n_heads=3"])
    validate_config(cfg)  # MLA's head dims are its own keys
    assert build_model(cfg)(torch.randint(0, 100, (1, 8))).logits.shape == (1, 8, cfg.model.vocab_size)


# ------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "kernel"), [("flash", None), ("mla", "flash"), ("sdpa", None), ("mla", "sdpa")])
def test_gpu_flash_chosen_and_within_tolerance_in_bf16(name, kernel):
    module = _module(name, kernel).cuda()
    x, cos, sin, grad_out = (t.cuda() for t in _inputs(module, seq=256))
    want = _run(_reference_of(module), x, cos, sin, grad_out, torch.float64)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = _max_errors(_run(module, x, cos, sin, grad_out, torch.float32), want)
    math = _max_errors(_run(_reference_of(module), x, cos, sin, grad_out, torch.bfloat16), want)
    label = module.kernel_label()
    if "flash" in (name, kernel):
        assert label.startswith(("flash_attn_", "sdpa_flash_cuda")), label
    for key, err in got.items():
        assert err <= 2 * math[key] + 1e-3, (key, err, math[key])


@pytest.mark.gpu
def test_gpu_flash_casts_fp32_and_back():
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda") for _ in range(3))
    out = flash_attention(q, k, v)
    assert out.dtype == torch.float32
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert (out.double() - ref).abs().max() < 2e-2


@pytest.mark.gpu
def test_gpu_training_records_the_flash_kernel(tmp_path):
    from kimi_lab.training import train

    overrides = ["hardware=gpu", "attention=flash", "trainer.max_steps=4", "trainer.val_check_interval=2",
                 "optimizer.warmup_steps=1"]
    results = train(compose_config(overrides, output_dir=tmp_path / "run"))
    assert results["attention_kernel"].startswith(("flash_attn_", "sdpa_flash_cuda"))
