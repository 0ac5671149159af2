"""RoPE scaling: parity with transformers.modeling_rope_utils, relative-position property, dynamic NTK, CLI overrides
into the scaling node, MLA under YaRN against transformers' DeepSeek-V3."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from kimi_lab.config import validate_config
from kimi_lab.config.schema import RopeConfig
from kimi_lab.config.validate import ConfigError
from kimi_lab.model import build_model
from kimi_lab.model.rope import RotaryEmbedding, apply_rotary
from tests.helpers import compose_config, typed_cfg

rope_utils = pytest.importorskip("transformers.modeling_rope_utils")

SCALINGS = ("default", "linear", "dynamic", "yarn")


def _rope_cfg(kind: str, theta: float, factor: float, original: int, **extra):
    scaling = {"type": kind, "factor": factor, "original_max_position_embeddings": original, "beta_fast": 32.0,
               "beta_slow": 1.0, "mscale": None, "mscale_all_dim": None, **extra}
    return typed_cfg(RopeConfig, theta=theta, scaling=scaling)


def _hf(kind: str, head_dim: int, theta: float, factor: float, original: int, seq_len=None, **extra):
    """(inv_freq, attention factor) from transformers' ROPE_INIT_FUNCTIONS (HF's dynamic NTK calls the original
    length max_position_embeddings; yarn reads original_max_position_embeddings from the rope parameters)."""
    params = {"rope_type": kind, "rope_theta": theta, "factor": factor, "original_max_position_embeddings": original,
              "beta_fast": 32.0, "beta_slow": 1.0, **extra}
    config = SimpleNamespace(rope_parameters=params, head_dim=head_dim, hidden_size=head_dim, num_attention_heads=1,
                             max_position_embeddings=original, standardize_rope_params=lambda: None)
    return rope_utils.ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)


GRID = list(itertools.product((16, 64, 128), (10_000.0, 50_000.0, 500_000.0), (2.0, 4.0, 16.0), (32, 256, 4096)))


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_inv_freq_and_attention_factor_match_transformers(kind):
    worst = 0.0
    for head_dim, theta, factor, original in GRID:
        seq_lens = [None] if kind != "dynamic" else [original, 3 * original]
        for seq_len in seq_lens:
            want, want_factor = _hf(kind, head_dim, theta, factor, original, seq_len=seq_len)
            rope = RotaryEmbedding(head_dim, original, _rope_cfg(kind, theta, factor, original))
            got = rope._inv_freq(seq_len or 0).float()
            rel = ((got - want).abs() / want.abs()).max().item()
            worst = max(worst, rel)
            assert rel <= 1e-6, (head_dim, theta, factor, original, seq_len, rel)
            assert rope.attention_scaling == pytest.approx(want_factor, rel=1e-12)
    assert worst > 0 or kind == "linear"  # the comparison really ran on float32 values


def test_yarn_mscale_pair_matches_transformers():
    for factor, mscale, all_dim in [(4.0, 1.0, 1.0), (40.0, 0.707, 0.707), (8.0, 1.0, 0.5)]:
        want_freq, want = _hf("yarn", 64, 10_000.0, factor, 512, mscale=mscale, mscale_all_dim=all_dim)
        rope = RotaryEmbedding(64, 512, _rope_cfg("yarn", 10_000.0, factor, 512, mscale=mscale, mscale_all_dim=all_dim))
        assert rope.attention_scaling == pytest.approx(want, rel=1e-12)
        torch.testing.assert_close(rope._inv_freq(0).float(), want_freq, rtol=1e-6, atol=0)


def test_yarn_scales_cos_sin_by_mscale_once_and_mla_can_opt_out():
    rope = RotaryEmbedding(16, 64, _rope_cfg("yarn", 10_000.0, 4.0, 64))
    mscale = rope.attention_scaling
    assert mscale == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1.0)
    cos, sin = rope(64)
    raw_cos, raw_sin = rope(64, apply_attention_scaling=False)
    torch.testing.assert_close(cos, raw_cos * mscale)
    torch.testing.assert_close(sin, raw_sin * mscale)
    torch.testing.assert_close(raw_cos[:, 0] ** 2 + raw_sin[:, 0] ** 2, torch.ones(64))  # unscaled table: rotation
    # the table itself stays unscaled: asking twice never multiplies twice (vLLM#56446)
    torch.testing.assert_close(rope(64)[0], cos)


def test_yarn_ramp_uses_the_original_length():
    """Same factor, different original length -> different ramp; the table length (max_seq_len) does not matter."""
    a = RotaryEmbedding(32, 64, _rope_cfg("yarn", 10_000.0, 4.0, 64))
    b = RotaryEmbedding(32, 256, _rope_cfg("yarn", 10_000.0, 4.0, 64))  # extended table, same original length
    c = RotaryEmbedding(32, 64, _rope_cfg("yarn", 10_000.0, 4.0, 2048))
    torch.testing.assert_close(a._inv_freq(0), b._inv_freq(0))
    assert not torch.allclose(a._inv_freq(0), c._inv_freq(0))


@pytest.mark.parametrize("kind", SCALINGS)
def test_scores_depend_only_on_relative_position(kind):
    original = 16
    rope = RotaryEmbedding(16, original, _rope_cfg(kind, 10_000.0, 4.0, original))
    length = 64  # longer than the original length and than the table built at init
    cos, sin = rope(length)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    q_rot = apply_rotary(q.expand(1, 1, length, 16), cos, sin)[0, 0]
    k_rot = apply_rotary(k.expand(1, 1, length, 16), cos, sin)[0, 0]
    scores = q_rot @ k_rot.T  # scores[m, n] = <R_m q, R_n k>
    for m, n in [(5, 2), (3, 9), (0, 0), (10, 1)]:
        for shift in (1, 17, 50):
            torch.testing.assert_close(scores[m + shift, n + shift], scores[m, n], rtol=1e-5, atol=1e-5)
    assert (scores[5, 2] - scores[5, 3]).abs() > 1e-3


def test_dynamic_ntk_changes_nothing_within_the_original_length():
    plain = RotaryEmbedding(16, 64, _rope_cfg("default", 10_000.0, 1.0, 64))
    dynamic = RotaryEmbedding(16, 64, _rope_cfg("dynamic", 10_000.0, 4.0, 64))
    for length in (1, 17, 64):
        for a, b in zip(dynamic(length), plain(length)):
            assert torch.equal(a, b)
    long_cos, _ = dynamic(256)  # beyond: a larger base, so every non-first pair rotates more slowly
    assert long_cos.shape == (256, 16) and not torch.allclose(long_cos[:64], plain(64)[0])
    for a, b in zip(dynamic(64), plain(64)):  # and back within the original length: plain again
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_dynamic_factor_runs_each_length_at_factor_length_over_original(kind):
    """rope.scaling.dynamic_factor (YaRN sec. 3.3): within the original length plain RoPE; at T > L_orig exactly the
    static scaling of factor T / L_orig (cos, sin and the YaRN mscale; the static builders match transformers)."""
    dynamic = RotaryEmbedding(16, 32, _rope_cfg(kind, 10_000.0, 4.0, 32, dynamic_factor=True))
    plain = RotaryEmbedding(16, 32, _rope_cfg("default", 10_000.0, 1.0, 32))
    for length, factor in ((32, 1.0), (64, 2.0), (128, 4.0), (96, 3.0), (16, 1.0)):
        want = plain if factor == 1.0 else RotaryEmbedding(16, 32, _rope_cfg(kind, 10_000.0, factor, 32))
        for got, ref in zip(dynamic(length), want(length)):
            assert torch.equal(got, ref), (length, factor)
        assert dynamic.applied_factor == factor
        assert dynamic.attention_scaling == want.attention_scaling
    assert RotaryEmbedding(16, 32, _rope_cfg(kind, 10_000.0, 4.0, 32)).applied_factor == 4.0  # static: as set


def test_dynamic_ntk_reports_factor_one_within_the_original_length():
    rope = RotaryEmbedding(16, 32, _rope_cfg("dynamic", 10_000.0, 2.0, 32))
    rope(32)
    assert rope.applied_factor == 1.0
    rope(64)
    assert rope.applied_factor == 2.0


def test_tables_extend_past_max_seq_len_and_match_a_longer_table():
    short = RotaryEmbedding(16, 8, _rope_cfg("linear", 10_000.0, 2.0, 8))
    long = RotaryEmbedding(16, 128, _rope_cfg("linear", 10_000.0, 2.0, 8))
    for a, b in zip(short(100), long(100)):
        assert a.shape == (100, 16) and torch.equal(a, b)
    assert short.cos.shape[0] == 100  # cached


def test_model_runs_longer_than_training_length():
    cfg = compose_config(["rope=yarn", "model.vocab_size=1024"])
    model = build_model(cfg).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 1000, (1, 4 * cfg.data.seq_len))).logits
    assert logits.shape == (1, 128, 1024) and torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", SCALINGS)
def test_every_rope_option_composes_and_validates(kind):
    cfg = compose_config([f"rope={kind}"])
    validate_config(cfg)
    assert cfg.rope.scaling.type.value == kind and cfg.rope.scaling.original_max_position_embeddings == 32


def test_cli_overrides_into_the_scaling_node():
    """A dict into rope.scaling (once a null node, which OmegaConf could not merge into) and nested keys."""
    cfg = compose_config(["rope.scaling={type:linear,factor:2.0}"])
    assert cfg.rope.scaling.type.value == "linear" and cfg.rope.scaling.factor == 2.0
    cfg = compose_config(["rope=yarn", "rope.scaling.factor=4", "rope.theta=50000"])
    assert (cfg.rope.scaling.type.value, cfg.rope.scaling.factor, cfg.rope.theta) == ("yarn", 4.0, 50000.0)
    cfg = compose_config(["rope.scaling.type=dynamic", "rope.scaling.original_max_position_embeddings=16"])
    assert build_model(cfg).rotary.original_max_seq_len == 16
    cfg = compose_config(["rope.scaling=null"])
    assert build_model(cfg).rotary.scaling_type == "default"
    with pytest.raises(Exception, match="rope.scaling.type=ntk"):
        compose_config(["rope.scaling.type=ntk"])
    with pytest.raises(ConfigError, match="rope.scaling.beta_slow"):
        validate_config(compose_config(["rope=yarn", "rope.scaling.beta_slow=64"]))


@pytest.mark.parametrize(("mscale", "mscale_all_dim"), [(1.0, 1.0), (0.707, 1.0), (1.0, 0.707)])
def test_mla_under_yarn_matches_transformers_deepseek_v3(mscale, mscale_all_dim):
    """With both mscale keys set (DeepSeek-V2/V3 configs): softmax x m(s, mscale_all_dim)^2 and the rope slice's
    cos/sin x m(s, mscale) / m(s, mscale_all_dim), as transformers' DeepseekV3 attention and rotary embedding."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

    seq, original, dims = 64, 16, {"kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12}
    hf_scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": original, "beta_fast": 32.0,
                  "beta_slow": 1.0, "mscale": mscale, "mscale_all_dim": mscale_all_dim}
    config = transformers.DeepseekV3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                           q_lora_rank=None, rope_interleave=True, num_hidden_layers=1, vocab_size=128,
                                           max_position_embeddings=seq, rope_scaling=hf_scaling, **dims)
    config._attn_implementation = "eager"
    torch.manual_seed(5)
    hf = hf_v3.DeepseekV3Attention(config, layer_idx=0).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0, 0.2)
    x = torch.randn(2, seq, 64)
    cos, sin = hf_v3.DeepseekV3RotaryEmbedding(config)(x, torch.arange(seq)[None])
    mask = torch.full((seq, seq), torch.finfo(x.dtype).min).triu(1)[None, None]
    want = hf(x, position_embeddings=(cos, sin), attention_mask=mask)[0]

    overrides = ["attention=mla", "attention.kernel=standard", "model.d_model=64", "attention.n_heads=4",
                 f"data.seq_len={seq}", "rope=yarn", "rope.scaling.factor=4", f"rope.scaling.mscale={mscale}",
                 f"rope.scaling.original_max_position_embeddings={original}",
                 f"rope.scaling.mscale_all_dim={mscale_all_dim}", *(f"attention.{k}={v}" for k, v in dims.items())]
    model = build_model(compose_config(overrides)).eval()
    attention = model.layers[0].self_attn
    attention.load_state_dict(hf.state_dict(), strict=True)
    ours_cos, ours_sin = model.rotary(seq, apply_attention_scaling=model.scale_rotary_tables)
    with torch.no_grad():
        torch.testing.assert_close(attention(x, ours_cos, ours_sin), want, rtol=0, atol=1e-5)
