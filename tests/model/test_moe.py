"""MoE routing study, the layer: grouped dispatch against the reference MoE, experts, parameter counts, config
errors, bench-moe."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

from kimi_lab.bench._reference import MaskLoopMoE
from kimi_lab.config import ConfigError, validate_config
from kimi_lab.model import build_model
from kimi_lab.model.mlp import SwiGLU
from kimi_lab.model.moe import ROUTERS, MoE, grouped_linear, grouped_mm_runs
from tests.helpers import compose_config, deepseek_v3_cfg, init_normal_

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("overrides", [["moe.scoring_func=sigmoid"], ["moe=greedy"]])
def test_one_expert_top1_unscaled_is_the_dense_swiglu(overrides):
    cfg = deepseek_v3_cfg(["moe.n_routed_experts=1", "moe.num_experts_per_tok=1", "moe.n_group=1", "moe.topk_group=1",
                           "moe.n_shared_experts=0", "moe.routed_scaling_factor=1.0", "moe.moe_intermediate_size=24",
                           *overrides])
    moe = MoE(16, cfg.moe)
    init_normal_(moe)
    dense = SwiGLU(16, 24)
    with torch.no_grad():
        dense.gate_proj.weight.copy_(moe.experts.gate_up_proj[0, :24])
        dense.up_proj.weight.copy_(moe.experts.gate_up_proj[0, 24:])
        dense.down_proj.weight.copy_(moe.experts.down_proj[0])
    x = torch.randn(2, 10, 16)
    torch.testing.assert_close(moe(x), dense(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # segment form; grouped_mm
@pytest.mark.parametrize("overrides", [
    ["moe.topk_method=aux_tc", "moe.n_group=4", "moe.topk_group=2", "moe.n_shared_experts=1"],
    ["moe=greedy", "moe.n_shared_experts=0", "moe.aux_loss_alpha=0.01"],
], ids=["aux_tc-groups-shared", "greedy"])
def test_dispatch_matches_the_reference_moe_forward_grads_and_aux_loss(dtype, overrides):
    """MoE against kimi_lab.bench._reference (the per-expert loop; the bench's `loop` column): output, gradients of
    the input and of every parameter through output and balance loss, and the aux loss itself."""
    cfg = deepseek_v3_cfg(["moe.n_routed_experts=8", "moe.num_experts_per_tok=3", "moe.moe_intermediate_size=16",
                           "moe.routed_scaling_factor=2.5", "moe.n_group=1", "moe.topk_group=1", *overrides])
    validate_config(cfg)
    moe = MoE(16, cfg.moe).to(dtype).train()
    init_normal_(moe)
    reference = MaskLoopMoE(moe)
    x = torch.randn(3, 11, 16, dtype=dtype, requires_grad=True)
    assert grouped_mm_runs(x.reshape(-1, 16), moe.experts.down_proj) == (dtype == torch.float32)
    got, got_aux = moe(x), moe.aux_loss
    upstream = torch.randn_like(got)
    grads = torch.autograd.grad([got, got_aux], [x, *moe.parameters()], [upstream, torch.ones(())])
    want, want_aux = reference(x), reference.aux_loss
    want_grads = torch.autograd.grad([want, want_aux], [x, *moe.parameters()], [upstream, torch.ones(())])
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_aux, want_aux, rtol=0, atol=0)
    assert got_aux > 0
    for (name, _), g, w in zip([("x", None), *moe.named_parameters()], grads, want_grads):
        torch.testing.assert_close(g, w, **tol, msg=name)
    assert moe.experts.gate_up_proj.grad is None  # autograd.grad leaves .grad alone


def test_grouped_mm_and_segment_form_agree_with_empty_experts():
    weight = torch.randn(5, 24, 16)
    counts = torch.tensor([3, 0, 7, 0, 2])
    x = torch.randn(12, 16)
    offsets = counts.cumsum(0).to(torch.int32)
    assert grouped_mm_runs(x, weight)
    fused = grouped_linear(x, weight, offsets, counts)
    want = torch.cat([x[:3] @ weight[0].T, x[3:10] @ weight[2].T, x[10:] @ weight[4].T])
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)
    odd = torch.randn(12, 15)  # 60-byte rows: not 16-byte aligned -> segment form
    assert not grouped_mm_runs(odd, torch.randn(5, 24, 15))


def test_packed_swiglu_backward_is_the_derivative():
    """The hand-written backward of the packed gate|up SwiGLU: float64 gradcheck, and equal to autograd's."""
    from kimi_lab.model.moe.experts import PackedSwiGLU

    packed = torch.randn(7, 2 * 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(PackedSwiGLU.apply, (packed,))
    upstream = torch.randn(7, 5, dtype=torch.float64)
    got = torch.autograd.grad(PackedSwiGLU.apply(packed), packed, upstream)[0]
    gate, up = packed.chunk(2, dim=-1)
    want = torch.autograd.grad(F.silu(gate) * up, packed, upstream)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


def test_row_permutation_backward_is_the_inverse_gather():
    """The combine's permutation: float64 gradcheck, and its backward equals autograd's index_select backward."""
    from kimi_lab.model.moe.layer import RowPermutation

    perm = torch.randperm(9)
    inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(9))
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: RowPermutation.apply(t, perm, inverse), (x,))
    upstream = torch.randn(9, 4, dtype=torch.float64)
    got = torch.autograd.grad(RowPermutation.apply(x, perm, inverse), x, upstream)[0]
    want = torch.autograd.grad(x.index_select(0, perm), x, upstream)[0]
    assert torch.equal(got, want)


def test_parameter_counts_count_k_of_e_experts_and_the_shared_one():
    from kimi_lab.model import parameter_counts

    cfg = deepseek_v3_cfg(["data.seq_len=8"])
    model = build_model(cfg)
    d, hidden, n_exp, k = cfg.model.d_model, cfg.moe.moe_intermediate_size, cfg.moe.n_routed_experts, 2
    counts = parameter_counts(model)
    routed = cfg.model.n_layers * n_exp * 3 * d * hidden
    shared = cfg.model.n_layers * 3 * d * hidden
    assert sum(m.experts.gate_up_proj.numel() + m.experts.down_proj.numel() for m in model.moe_layers()) == routed
    assert counts["params_total"] - counts["params_active"] == routed * (n_exp - k) // n_exp
    assert sum(m.shared_experts.down_proj.weight.numel() for m in model.moe_layers()) * 3 == shared


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["moe=greedy", "moe.n_group=2"], "moe.n_group"),  # greedy has no groups
        (["moe.n_group=3"], "moe.n_group"),  # not a divisor of 4 experts
        (["moe.topk_group=5"], "moe.topk_group"),
        (["moe.n_group=4", "moe.topk_group=1"], "moe.num_experts_per_tok"),  # top-2 from 1 expert
        (["moe.bias_update_speed=-1e-3"], "moe.bias_update_speed"),
    ],
)
def test_gate_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"Invalid config: {key}=.*; allowed: "):
        validate_config(deepseek_v3_cfg(overrides))


def test_used_by_command_is_valid_on_the_default_moe_group():
    for method in ("noaux_tc", "aux_tc", "group_limited_greedy"):
        cfg = compose_config([f"moe.topk_method={method}"], model=None)
        validate_config(cfg)
        gate = build_model(compose_config([f"moe.topk_method={method}"])).moe_layers()[0].gate
        assert gate.method == method and gate.options is ROUTERS[method]


def test_bench_moe_writes_its_table(tmp_path, capsys):
    from kimi_lab.bench.moe import main

    out = tmp_path / "moe.csv"
    assert main(["--sizes", "small", "--batch", "2", "--seq-len", "32", "--d-model", "64", "--repeats", "1",
                 "--warmup", "0", "--out", str(out)]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["experts"], r["top_k"]) for r in rows] == [("8", "2"), ("64", "6")]
    assert all(float(r["ratio"]) > 0 and float(r["loop_ratio"]) > 0 and r["kernel"] == "grouped_mm"
               and r["size"] == "small" for r in rows)
    assert "ratio" in capsys.readouterr().out
    assert main(["--sizes", "base", "--batch", "1", "--seq-len", "16", "--repeats", "1", "--warmup", "0",
                 "--out", str(out)]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["size"], r["d_model"], r["moe_intermediate_size"], r["dense_d_ff"]) for r in rows] == [
        ("base", "384", "768", "1536"), ("base", "384", "256", "1536")]


@pytest.mark.parametrize("alpha", [1e-4, 0.0])
def test_bench_moe_pass_backpropagates_the_balance_loss_as_a_loss_term(alpha):
    """The timed pass is a training step's: the router weight gets the aux loss's gradient (none at alpha = 0)."""
    from kimi_lab.bench.moe import _moe_cfg, fwd_bwd_seconds

    cfg = _moe_cfg(4, 2, 8, "aux_tc")
    cfg.aux_loss_alpha = alpha
    torch.manual_seed(0)
    moe = MoE(16, cfg).train()
    init_normal_(moe)
    x = torch.randn(2, 5, 16, requires_grad=True)
    fwd_bwd_seconds(moe, x, torch.zeros_like(x))  # zero upstream: only the aux loss sends a gradient
    router_grad = moe.gate.weight.grad
    assert router_grad is not None and (router_grad.abs().sum() > 0) == (alpha > 0)
    assert x.grad is not None
