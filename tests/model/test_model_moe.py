"""MoE layer tests: the router's options, the Switch balance loss, dropless dispatch against the reference MoE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimi_lab.bench._reference import MaskLoopMoE
from kimi_lab.model.moe import MoE, Router, load_balance_loss
from tests.helpers import compose_config, init_normal_

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- router


def _router(overrides=(), d_model=8):
    cfg = compose_config(list(overrides))
    router = Router(d_model, cfg.moe)
    init_normal_(router, std=1.0)
    return router, cfg


def _reference_probs(router, x):
    return torch.softmax(x.double() @ router.weight.double().T, dim=-1)


@pytest.mark.parametrize("top_k", [2, 3])
def test_router_normalised_weights_sum_to_scaling_factor(top_k):
    router, _ = _router([f"moe.num_experts_per_tok={top_k}", "moe.routed_scaling_factor=2.5"])
    x = torch.randn(50, 8, dtype=torch.bfloat16)
    routing = router(x)
    assert routing.weights.dtype == torch.float32 and routing.expert_idx.shape == (50, top_k)
    torch.testing.assert_close(routing.weights.sum(-1), torch.full((50,), 2.5))
    probs = _reference_probs(router, x.float())
    top = probs.topk(top_k, dim=-1)
    assert torch.equal(routing.expert_idx, top.indices)  # the k largest softmax probabilities, in order
    want = top.values / top.values.sum(-1, keepdim=True) * 2.5
    torch.testing.assert_close(routing.weights.double(), want, rtol=1e-5, atol=1e-6)


def test_router_raw_weights_without_normalisation():
    router, _ = _router(["moe.norm_topk_prob=false", "moe.routed_scaling_factor=1.5"])
    x = torch.randn(40, 8)
    routing = router(x)
    top = _reference_probs(router, x).topk(2, dim=-1)
    assert torch.equal(routing.expert_idx, top.indices)
    torch.testing.assert_close(routing.weights.double(), top.values * 1.5, rtol=1e-5, atol=1e-6)
    assert (routing.weights.sum(-1) < 1.5 - 1e-2).any()  # raw top-2 probs are not renormalised


def test_router_computes_in_float32():
    router, _ = _router()
    router.double()
    x64 = torch.randn(20, 8, dtype=torch.float64)
    routing = router(x64)
    assert routing.weights.dtype == torch.float32  # float64 input and weight are cast down
    routing16 = router(x64.to(torch.bfloat16))
    assert routing16.weights.dtype == torch.float32
    assert routing.aux_loss.dtype == torch.float32
    assert routing.counts.sum() == 20 * 2
    assert torch.equal(routing.counts, torch.bincount(routing.expert_idx.flatten(), minlength=4))


def test_router_stays_float32_under_autocast():
    router, _ = _router(d_model=64)
    with torch.no_grad():
        router.weight.mul_(0.02)  # init_std-sized gate, as in the model
    x = torch.randn(2048, 64)
    want = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
    assert got.weights.dtype == torch.float32
    assert torch.equal(got.expert_idx, want.expert_idx)
    torch.testing.assert_close(got.weights, want.weights)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy", "noaux_tc", "aux_tc"])
def test_router_state_dict_per_topk_method(method):
    """Checkpoints and transformers' DeepseekV3TopkRouter load 1:1: the DeepSeek gates carry the fp32 selection
    bias (zeros unless noaux_tc moves it), the greedy router its weight only."""
    cfg = compose_config(["moe=deepseek_v3", f"moe.topk_method={method}", "moe.n_group=1", "moe.topk_group=1"])
    router = Router(8, cfg.moe).to(torch.bfloat16)
    state = router.state_dict()
    want = ["weight"] if method == "greedy" else ["weight", "e_score_correction_bias"]
    assert list(state) == want and state["weight"].dtype == torch.bfloat16
    assert method == "greedy" or state["e_score_correction_bias"].dtype == torch.float32
    assert router.updates_bias == (method == "noaux_tc")


@pytest.mark.parametrize(("method", "want_weight_one"), [("greedy", False), ("aux_tc", True)])
def test_router_top1_renormalises_only_for_deepseek_gates(method, want_weight_one):
    """norm_topk_prob at k = 1: the DeepSeek gates give weight 1 (DeepseekV3TopkRouter); greedy keeps the score
    as its weight, so the router learns through the output (Switch)."""
    cfg = compose_config(["moe=deepseek_v3", f"moe.topk_method={method}", "moe.n_group=1", "moe.topk_group=1",
                          "moe.num_experts_per_tok=1", "moe.norm_topk_prob=true", "moe.scoring_func=softmax"])
    router = Router(8, cfg.moe)
    init_normal_(router, std=1.0)
    x = torch.randn(20, 8)
    routing = router(x)
    top = _reference_probs(router, x).max(dim=-1)
    assert torch.equal(routing.expert_idx[:, 0], top.indices)
    want = torch.ones(20, dtype=torch.float64) if want_weight_one else top.values
    torch.testing.assert_close(routing.weights[:, 0].double(), want, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------- balance loss


def test_load_balance_loss_hand_computed():
    # E=4, N=3 tokens, k=2 -> 6 assignments
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    expert_idx = torch.tensor([[0, 1], [1, 2], [0, 3]])
    # f = counts/6 = [2, 2, 1, 1]/6;  P = column means = [0.75, 1.15, 0.65, 0.45]/3
    # E * sum f_i P_i = 4 * (2*0.75 + 2*1.15 + 0.65 + 0.45) / 18 = 4 * 4.9 / 18
    got = load_balance_loss(probs, expert_idx, 4)
    assert got.item() == pytest.approx(4 * 4.9 / 18, rel=1e-12)


def test_load_balance_loss_uniform_and_collapse():
    n_experts, n_tokens = 4, 8
    uniform = torch.full((n_tokens, n_experts), 1.0 / n_experts)
    balanced = torch.arange(n_tokens * 2).reshape(n_tokens, 2) % n_experts
    assert load_balance_loss(uniform, balanced, n_experts).item() == pytest.approx(1.0)
    collapsed_probs = F.one_hot(torch.zeros(n_tokens, dtype=torch.long), n_experts).float()
    collapsed_idx = torch.zeros(n_tokens, 1, dtype=torch.long)
    assert load_balance_loss(collapsed_probs, collapsed_idx, n_experts).item() == pytest.approx(n_experts)


def test_router_aux_loss_is_alpha_times_balance_loss():
    router, cfg = _router(["moe.aux_loss_alpha=0.3"])
    x = torch.randn(30, 8)
    routing = router(x)
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    want = 0.3 * load_balance_loss(probs, routing.expert_idx, 4)
    torch.testing.assert_close(routing.aux_loss, want)
    routing.aux_loss.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0  # gradient through P_i


# ----------------------------------------------------------------------------------------------- MoE dispatch


def _moe(overrides=(), d_model=16):
    cfg = compose_config(["moe.moe_intermediate_size=24", *overrides])
    moe = MoE(d_model, cfg.moe)
    init_normal_(moe, std=0.3)
    return moe


def test_moe_gradients_reach_experts_and_gate():
    moe = _moe()
    x = torch.randn(4, 16, 16)
    out = moe(x)
    counts = moe.gate(x.reshape(-1, 16)).counts
    assert (counts > 0).all()
    (out * torch.randn_like(out)).sum().backward()  # no aux loss: the gate gradient must come via the weights
    for i in range(moe.n_experts):
        for name, param in moe.experts.named_parameters():
            assert param.grad is not None and param.grad[i].abs().sum() > 0, f"expert {i} {name}"
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_model_keeps_no_graph_after_a_training_step():
    """The summed aux loss carries the graph; the layers keep none, so a trained model deep-copies (EMA, SWA)."""
    import copy

    from kimi_lab.model import build_model

    model = build_model(compose_config(["moe=deepseek_v3", "moe.topk_method=aux_tc"])).train()
    out = model(torch.randint(0, 100, (2, 16)))
    assert out.aux_loss.requires_grad and out.aux_loss > 0
    (out.logits.float().mean() + out.aux_loss).backward()
    assert all(not m.aux_loss.requires_grad for m in model.moe_layers())
    twin = copy.deepcopy(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_moe_tokens_per_expert_counts_training_only():
    moe = _moe()
    x = torch.randn(2, 12, 16)
    counts = moe.gate(x.reshape(-1, 16)).counts
    moe.train()
    moe(x)
    moe(x)
    assert torch.equal(moe.tokens_per_expert, 2 * counts.float())
    assert moe.tokens_per_expert.sum() == 2 * 24 * 2  # 2 passes * N * k
    moe.eval()
    moe(x)
    assert torch.equal(moe.tokens_per_expert, 2 * counts.float())
    assert "tokens_per_expert" not in moe.state_dict()


def test_moe_is_dropless_under_collapse():
    moe = _moe()
    n_tokens = 40
    x = torch.randn(1, n_tokens, 16) * 0.1
    x[..., 0] = 5.0  # shared positive feature the gate keys on
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0, 0], moe.gate.weight[1, 0], moe.gate.weight[2:, 0] = 4.0, 2.0, -4.0
        routing, want, got = moe.gate(x), MaskLoopMoE(moe)(x), moe(x)
    assert routing.counts.tolist() == [n_tokens, n_tokens, 0, 0]  # every token on experts 0 and 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.abs().amax() > 1e-3
