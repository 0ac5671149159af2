"""Model-level tests: causality, kernel parity, norms, RoPE, MoE placement, parameter counts, init, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kimi_lab.model import build_model, flops_per_token, parameter_counts
from kimi_lab.model.attention.kernels import sdpa_attention, standard_attention
from kimi_lab.model.mlp import SwiGLU
from kimi_lab.model.moe import MoE
from kimi_lab.model.rope import RotaryEmbedding, apply_rotary, default_inv_freq, linear_inv_freq
from kimi_lab.optim import build_optimizer
from tests.helpers import compose_config, group_options

ATTENTIONS = group_options("attention")
KERNELS = {"standard": standard_attention, "sdpa": sdpa_attention}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(overrides=(), seed: int = 0):
    cfg = compose_config(list(overrides))
    torch.manual_seed(seed)
    return build_model(cfg), cfg


# ----------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("moe", ["greedy", "dense"])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_causality(attention, moe):
    model, cfg = _model([f"attention={attention}", f"moe={moe}"])
    model.eval()
    gen = torch.Generator().manual_seed(1)
    seq_len, p = cfg.data.seq_len, 11
    ids = torch.randint(0, 1000, (2, seq_len), generator=gen)
    changed = ids.clone()
    changed[:, p + 1 :] = torch.randint(1000, 2000, (2, seq_len - p - 1), generator=gen)
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert a.dtype == torch.float32
    torch.testing.assert_close(a[:, : p + 1], b[:, : p + 1], rtol=0, atol=1e-6)
    assert (a[:, p + 1 :] - b[:, p + 1 :]).abs().amax() > 1e-3  # the future positions do see the change


# ----------------------------------------------------------------------------------------------- kernels


def _reference_attention(q, k, v, scale=None):
    """float64 loop reference: softmax over keys j <= i of q_i.k_j * scale, kv heads repeated for GQA."""
    q, k, v = q.double(), k.double(), v.double()
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)  # kv head h // n_rep serves query head h
    v = v.repeat_interleave(n_rep, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    seq_len = q.shape[2]
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    for i in range(seq_len):
        scores = torch.einsum("bhd,bhjd->bhj", q[:, :, i], k[:, :, : i + 1]) * scale
        out[:, :, i] = torch.einsum("bhj,bhjd->bhd", scores.softmax(dim=-1), v[:, :, : i + 1])
    return out


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_matches_float64_reference(kernel, n_kv_heads, scale):
    gen = torch.Generator().manual_seed(n_kv_heads)
    batch, n_heads, seq_len, head_dim = 2, 4, 9, 8
    q = torch.randn(batch, n_heads, seq_len, head_dim, generator=gen)
    k = torch.randn(batch, n_kv_heads, seq_len, head_dim, generator=gen)
    v = torch.randn(batch, n_kv_heads, seq_len, head_dim, generator=gen)
    grad_out = torch.randn(batch, n_heads, seq_len, head_dim, generator=gen)

    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = KERNELS[kernel](*inputs, scale=scale)
    (out * grad_out).sum().backward()

    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = _reference_attention(*ref_inputs, scale=scale)
    (ref * grad_out.double()).sum().backward()

    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip("qkv", inputs, ref_inputs):
        assert got.grad.shape == want.grad.shape, name
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5, msg=f"grad of {name}")


@pytest.mark.parametrize("n_kv_heads", [1, 4])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_float64_is_float64(kernel, n_kv_heads):
    """The kernels must not round through float32 when given float64 (the reference role of `standard`)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 6, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, n_kv_heads, 6, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    out = KERNELS[kernel](q, k, v)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _reference_attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_reference_is_causal_and_not_trivial():
    """Guard the guard: the reference differs from a non-causal softmax, so the parity test can fail."""
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    full = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1) @ v
    ref = _reference_attention(q, k, v)
    torch.testing.assert_close(ref[:, :, -1], full[:, :, -1])  # last row sees every key
    assert (ref[:, :, 0] - full[:, :, 0]).abs().amax() > 1e-3
    torch.testing.assert_close(ref[:, :, 0], v[:, :, 0])  # first position attends to itself only


@pytest.mark.parametrize("n_kv_heads", ["null", 2])
def test_model_standard_vs_sdpa_parity(n_kv_heads):
    common = [f"attention.n_kv_heads={n_kv_heads}"]
    standard, _ = _model(["attention=standard", *common], seed=3)
    sdpa, _ = _model(["attention=sdpa", *common], seed=4)  # different seed: the weights must come from the load
    assert standard.attention_kernel() != sdpa.attention_kernel()
    sdpa.load_state_dict(standard.state_dict(), strict=True)
    standard.eval(), sdpa.eval()
    ids = torch.randint(0, 32768, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids).logits, standard(ids).logits, rtol=0, atol=1e-5)
        standard.double(), sdpa.double()
        a, b = standard(ids), sdpa(ids)
    assert a.logits.dtype == torch.float64
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(b.aux_loss, a.aux_loss, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_gqa_in_model(n_kv_heads):
    model, cfg = _model([f"attention.n_kv_heads={n_kv_heads}"])
    head_dim = cfg.model.d_model // cfg.attention.n_heads
    for layer in model.layers:
        attn = layer.self_attn
        assert attn.n_kv_heads == n_kv_heads
        assert attn.q_proj.out_features == cfg.attention.n_heads * head_dim
        assert attn.k_proj.out_features == attn.v_proj.out_features == n_kv_heads * head_dim
    out = model(torch.randint(0, 100, (2, 16)))
    assert out.logits.shape == (2, 16, cfg.model.vocab_size) and torch.isfinite(out.logits).all()


# ----------------------------------------------------------------------------------------------- norms


# the float64 formulas of both norms at the study's eps values: tests/model/test_norm.py


@pytest.mark.parametrize("norm", group_options("norm"))
def test_norm_eps_reaches_every_model_norm(norm):
    for qk_norm, count in ((False, 2 * 2 + 1), (True, 2 * 4 + 1)):  # two per block + final (+ q_norm, k_norm)
        model, _ = _model([f"norm={norm}", "norm.eps=0.125", f"norm.qk_norm={str(qk_norm).lower()}"])
        norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))]
        assert len(norms) == count
        assert all(m.eps == 0.125 for m in norms)


# ----------------------------------------------------------------------------------------------- RoPE


def _rope(overrides=(), head_dim=16, max_len=64):
    cfg = compose_config(list(overrides))
    return RotaryEmbedding(head_dim, max_len, cfg.rope)


def test_rope_preserves_norms():
    rope = _rope()
    cos, sin = rope(64)
    x = torch.randn(2, 3, 64, 16, dtype=torch.float64)
    rotated = apply_rotary(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=1e-6)
    assert (rotated[:, :, 1:] - x[:, :, 1:]).abs().amax() > 1e-2  # position 0 is the identity, others rotate
    torch.testing.assert_close(rotated[:, :, 0], x[:, :, 0])


def test_rope_dot_product_depends_on_relative_offset_only():
    rope = _rope()
    cos, sin = rope(64)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    q_rot = apply_rotary(q.expand(1, 1, 64, 16), cos, sin)[0, 0]  # q at every position
    k_rot = apply_rotary(k.expand(1, 1, 64, 16), cos, sin)[0, 0]
    scores = q_rot @ k_rot.T  # scores[m, n] = <R_m q, R_n k>
    for m, n in [(5, 2), (3, 9), (0, 0), (10, 1)]:
        for shift in (1, 7, 30):
            torch.testing.assert_close(scores[m + shift, n + shift], scores[m, n], rtol=1e-5, atol=1e-5)
    assert (scores[5, 2] - scores[5, 3]).abs() > 1e-3  # but it does depend on the offset


def test_rope_linear_scaling_is_position_interpolation():
    factor = 2.0
    cfg = compose_config(["rope=linear"])
    assert cfg.rope.scaling.factor == factor
    torch.testing.assert_close(linear_inv_freq(16, 10000.0, cfg.rope.scaling), default_inv_freq(16, 10000.0) / factor)
    model, _ = _model(["rope=linear"])  # wired through build_model, table length = data.seq_len
    plain, _ = _model(["rope=default"])
    assert model.rotary.cos.shape == plain.rotary.cos.shape == (32, 16)
    t = torch.arange(16)
    torch.testing.assert_close(model.rotary.cos[(factor * t).long()], plain.rotary.cos[t], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.rotary.sin[(factor * t).long()], plain.rotary.sin[t], rtol=0, atol=1e-6)
    assert (model.rotary.cos[1:] - plain.rotary.cos[1:]).abs().amax() > 1e-2


def test_rope_theta_changes_the_table():
    a, b = _rope(["rope.theta=10000"]), _rope(["rope.theta=500000"])
    torch.testing.assert_close(a.cos[0], b.cos[0])  # position 0: no rotation
    assert (a.cos[1:] - b.cos[1:]).abs().amax() > 1e-2
    # the first pair always rotates at 1 rad / position; the last pair is slower with the larger base
    torch.testing.assert_close(a.cos[:, 0], b.cos[:, 0])
    assert torch.all(b.cos[1:, 7] > a.cos[1:, 7])


def test_rope_extends_past_the_table_length():
    short, long = _rope(max_len=8), _rope(max_len=16)
    for a, b in zip(short(9), long(9)):  # longer sequences (length-generalisation evals) get the same table
        assert a.shape == (9, 16) and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- MoE placement


def test_first_k_dense_replace():
    model, cfg = _model(["moe.first_k_dense_replace=1"])
    assert isinstance(model.layers[0].mlp, SwiGLU) and model.layers[0].mlp.up_proj.out_features == cfg.model.d_ff
    assert isinstance(model.layers[1].mlp, MoE)
    assert model.moe_layers() == [model.layers[1].mlp]
    out, layer_aux = _forward_with_layer_aux_losses(model, torch.randint(0, 100, (2, 8)))
    assert out.aux_loss.item() > 0 and len(layer_aux) == 1
    torch.testing.assert_close(out.aux_loss, layer_aux[0])

    dense, _ = _model(["moe=dense"])
    assert dense.moe_layers() == [] and all(isinstance(layer.mlp, SwiGLU) for layer in dense.layers)
    out = dense(torch.randint(0, 100, (2, 8)))
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0

    moe, _ = _model([])
    assert len(moe.moe_layers()) == 2
    out, layer_aux = _forward_with_layer_aux_losses(moe, torch.randint(0, 100, (2, 8)))
    assert len(layer_aux) == 2
    torch.testing.assert_close(out.aux_loss, sum(layer_aux))


def _forward_with_layer_aux_losses(model, ids):
    """The model's output and each MoE layer's aux loss as the layer set it (the model then clears them)."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(mod.aux_loss)) for m in model.moe_layers()]
    try:
        return model(ids), seen
    finally:
        for hook in hooks:
            hook.remove()


# ----------------------------------------------------------------------------------------------- parameter counts


def test_parameter_counts_by_hand():
    model, cfg = _model([])
    d, vocab, n_layers = cfg.model.d_model, cfg.model.vocab_size, cfg.model.n_layers
    n_exp, top_k, hidden = cfg.moe.n_routed_experts, cfg.moe.num_experts_per_tok, cfg.moe.moe_intermediate_size
    per_expert = 3 * d * hidden
    per_layer = 4 * d * d + 2 * d + n_exp * d + n_exp * per_expert  # attn, 2 rmsnorm gains, router, experts
    total = vocab * d + n_layers * per_layer + d
    counts = parameter_counts(model)
    assert counts["params_total"] == total  # tied lm_head counted once
    assert counts["params_embedding"] == vocab * d
    assert counts["params_active"] == total - n_layers * (n_exp - top_k) * per_expert

    untied, _ = _model(["model.tie_embeddings=false"])
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert parameter_counts(untied)["params_total"] == total + vocab * d
    # FLOPs: the head is one matmul whether or not it shares the embedding's weight; the embedding is a lookup
    seq_len, head_dim = cfg.data.seq_len, d // cfg.attention.n_heads
    matmuls = (counts["params_active"] - vocab * d) + vocab * d  # active non-embedding params + the (V, D) head
    attention = n_layers * 6 * seq_len * cfg.attention.n_heads * 2 * head_dim
    for m in (model, untied):
        assert flops_per_token(m, seq_len, d, n_layers) == 6 * matmuls + attention


def test_dense_arm_matches_top2_active_ffn_params():
    moe, cfg = _model(["model=small", "data.seq_len=8"])
    dense, dense_cfg = _model(["model=small", "moe=dense", "data.seq_len=8"])
    assert dense_cfg.model.d_ff == 2 * cfg.moe.moe_intermediate_size and cfg.moe.num_experts_per_tok == 2
    router = sum(m.gate.weight.numel() for m in moe.moe_layers())
    assert router == cfg.model.n_layers * cfg.moe.n_routed_experts * cfg.model.d_model
    assert parameter_counts(moe)["params_active"] - router == parameter_counts(dense)["params_active"]
    assert parameter_counts(moe)["params_total"] > parameter_counts(dense)["params_total"]


# ----------------------------------------------------------------------------------------------- init


def test_init_scales():
    model, cfg = _model(["model=small", "data.seq_len=8", "attention.bias=true"])
    std, n_layers = cfg.model.init_std, cfg.model.n_layers
    residual_std = std / math.sqrt(2 * n_layers)
    checked = {"residual": 0, "other": 0}
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(param == 0), name
        elif param.dim() == 1:
            assert torch.all(param == 1), name  # norm gains
        elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
            assert param.std().item() == pytest.approx(residual_std, rel=0.05), name
            checked["residual"] += 1
        else:
            assert param.std().item() == pytest.approx(std, rel=0.05), name
            assert param.mean().abs().item() < std / 10, name
            checked["other"] += 1
    assert checked["residual"] == n_layers * 2  # o_proj and the (E, H, I) down_proj bank
    assert checked["other"] > checked["residual"]


def test_init_is_seeded():
    a, _ = _model([], seed=5)
    b, _ = _model([], seed=5)
    c, _ = _model([], seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    weights = [k for k in sa if sa[k].dim() >= 2]
    assert weights and all(not torch.equal(sa[k], sc[k]) for k in weights)


def test_shared_parameters_start_equal_across_arms():
    """Init does not depend on what other modules drew: for one seed, an MLA arm and an MHA arm, or a LayerNorm arm,
    start with the same embedding and the same FFN weights; another seed changes them."""
    arms = {"mha": _model([])[0], "mla": _model(["attention=mla"])[0], "layernorm": _model(["norm=layernorm"])[0],
            "other_seed": _model([], seed=1)[0]}
    states = {arm: model.state_dict() for arm, model in arms.items()}
    shared = [k for k in states["mha"] if k.startswith("embed_tokens") or ".mlp." in k]
    assert len(shared) > 3
    for key in shared:
        assert torch.equal(states["mla"][key], states["mha"][key]), key
        assert torch.equal(states["layernorm"][key], states["mha"][key]), key
        assert states["mha"][key].dim() < 2 or not torch.equal(states["other_seed"][key], states["mha"][key]), key


# ----------------------------------------------------------------------------------------------- learning


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_loss_falls_on_repeating_pattern(attention):
    cfg = compose_config([f"attention={attention}", "model.vocab_size=64", "optimizer.lr=3e-3"])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(model, cfg.optimizer)
    pattern = torch.randperm(64)[:8]  # period-8 sequence of distinct random ids in [0, 64)
    offsets = torch.arange(8)
    batch = pattern[(offsets[:, None] + torch.arange(cfg.data.seq_len + 1)[None]) % 8]  # (8, T+1), every phase
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def loss_fn():
        out = model(inputs)
        return F.cross_entropy(out.logits.reshape(-1, 64), targets.reshape(-1)), out.aux_loss

    first = None
    for _ in range(60):
        ce, aux = loss_fn()
        first = ce.item() if first is None else first
        optimizer.zero_grad()
        (ce + aux).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        final = loss_fn()[0].item()
    assert first == pytest.approx(math.log(64), abs=0.3)  # starts at chance
    assert final < 1.0, f"cross-entropy {first:.3f} -> {final:.3f}"
