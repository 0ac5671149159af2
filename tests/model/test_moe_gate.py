"""MoE routing study, the gate: DeepSeek-V3 router vs transformers, bias balancing, balance losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimi_lab.config import validate_config
from kimi_lab.model import build_model
from kimi_lab.model.moe import MoE, Router, sequence_balance_loss, update_expert_biases
from kimi_lab.training.expert_bias import ExpertBiasUpdate
from tests.helpers import deepseek_v3_cfg, init_normal_

pytestmark = pytest.mark.usefixtures("one_thread")


def sorted_routing(idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing with each token's k experts in ascending id order (top-k with sorted=False has no set order)."""
    order = idx.argsort(dim=-1)
    return idx.gather(1, order), weights.gather(1, order)


# ----------------------------------------------------------------------------------------------- gate vs transformers


def _gate_overrides(scoring: str, n_group: int, topk_group: int, norm: bool) -> list[str]:
    return [f"moe.scoring_func={scoring}", "moe.n_routed_experts=16", "moe.num_experts_per_tok=4",
            f"moe.n_group={n_group}", f"moe.topk_group={topk_group}", f"moe.norm_topk_prob={norm}",
            "moe.routed_scaling_factor=2.5"]


def _hf_router_pair(scoring: str, n_group: int, topk_group: int, norm: bool, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hf_cfg = transformers.DeepseekV3Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4,
                                           n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
                                           routed_scaling_factor=2.5, moe_intermediate_size=16)
    torch.manual_seed(seed)
    hf = DeepseekV3TopkRouter(hf_cfg)
    with torch.no_grad():
        hf.weight.normal_(0, 0.3)
        hf.e_score_correction_bias.copy_(torch.randn(16) * 0.05)
        hf.e_score_correction_bias[[0, 5, 6]] = -8.0  # strongly negative: these experts can never be chosen
    cfg = deepseek_v3_cfg(_gate_overrides(scoring, n_group, topk_group, norm))
    validate_config(cfg)
    ours = Router(32, cfg.moe)
    ours.load_state_dict(hf.state_dict(), strict=True)  # weight + e_score_correction_bias, 1:1
    return hf, ours


def _hf_route(hf, x, scoring: str, monkeypatch):
    """transformers' router is sigmoid-only: for softmax, its one scoring call is swapped for softmax over experts."""
    with monkeypatch.context() as patch:
        if scoring == "softmax":
            patch.setattr(torch.Tensor, "sigmoid", lambda t: t.softmax(dim=-1))
        _, weights, idx = hf(x)
    return idx, weights


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
@pytest.mark.parametrize(("n_group", "topk_group"), [(1, 1), (4, 2), (8, 3)])
@pytest.mark.parametrize("norm", [True, False])
def test_gate_matches_transformers_deepseek_v3_router(scoring, n_group, topk_group, norm, monkeypatch):
    hf, ours = _hf_router_pair(scoring, n_group, topk_group, norm)
    x = torch.randn(2, 64, 32)
    want_idx, want_w = sorted_routing(*_hf_route(hf, x, scoring, monkeypatch))
    routing = ours(x)
    got_idx, got_w = sorted_routing(routing.expert_idx, routing.weights)
    assert torch.equal(got_idx, want_idx)
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-6)
    assert not torch.isin(got_idx, torch.tensor([0, 5, 6])).any()  # the bias did select
    assert routing.weights.dtype == torch.float32
    # the bias steers selection: without it (aux_tc, same weights) some tokens pick other experts
    unbiased = Router(32, deepseek_v3_cfg([*_gate_overrides(scoring, n_group, topk_group, norm),
                                           "moe.topk_method=aux_tc"]).moe)
    unbiased.load_state_dict(ours.state_dict())
    assert not torch.equal(sorted_routing(unbiased(x).expert_idx, unbiased(x).weights)[0], want_idx)


def test_group_limited_greedy_matches_transformers_deepseek_v2_router():
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    hf_cfg = transformers.DeepseekV2Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                                           topk_group=2, topk_method="group_limited_greedy",
                                           routed_scaling_factor=1.5, moe_intermediate_size=16)
    hf = DeepseekV2TopkRouter(hf_cfg)
    torch.nn.init.normal_(hf.weight, std=0.3)
    cfg = deepseek_v3_cfg(["moe.topk_method=group_limited_greedy", "moe.scoring_func=softmax",
                           "moe.n_routed_experts=16", "moe.num_experts_per_tok=4", "moe.norm_topk_prob=false",
                           "moe.routed_scaling_factor=1.5"])
    ours = Router(32, cfg.moe)
    ours.load_state_dict({**hf.state_dict(), "e_score_correction_bias": torch.zeros(16)}, strict=True)
    x = torch.randn(128, 32)
    _, hf_w, hf_idx = hf(x)
    routing = ours(x)
    got, want = sorted_routing(routing.expert_idx, routing.weights), sorted_routing(hf_idx, hf_w)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)


def test_masked_groups_lose_even_against_negative_scores():
    """With every biased score negative, a 0-fill (instead of -inf) would hand the top-k to masked experts."""
    cfg = deepseek_v3_cfg(["moe.n_routed_experts=16", "moe.num_experts_per_tok=4", "moe.n_group=4", "moe.topk_group=1"])
    gate = Router(32, cfg.moe)
    init_normal_(gate)
    with torch.no_grad():
        gate.e_score_correction_bias.fill_(-5.0)
    x = torch.randn(200, 32)
    routing = gate(x)
    biased = (torch.sigmoid(x.double() @ gate.weight.double().T) - 5.0).view(200, 4, 4)
    best_group = biased.topk(2, dim=-1).values.sum(-1).argmax(dim=-1)  # (N,) the one kept group
    assert torch.equal(routing.expert_idx // 4, best_group[:, None].expand(-1, 4))


def test_moe_layer_matches_transformers_deepseek_v3_moe():
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_cfg = transformers.DeepseekV3Config(hidden_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                                           topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                                           moe_intermediate_size=16, n_shared_experts=2)
    hf = DeepseekV3MoE(hf_cfg)
    init_normal_(hf, std=0.2)
    with torch.no_grad():
        hf.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    cfg = deepseek_v3_cfg(["moe.n_routed_experts=8", "moe.num_experts_per_tok=2", "moe.n_group=4", "moe.topk_group=2",
                           "moe.routed_scaling_factor=2.5", "moe.moe_intermediate_size=16", "moe.n_shared_experts=2"])
    ours = MoE(32, cfg.moe)
    assert ours.state_dict().keys() == hf.state_dict().keys()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(3, 20, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- bias update


def test_bias_update_rule_on_global_counts():
    """Lightning-free: the callback sums counts over ranks (strategy.reduce), moves the bias once, zeroes counts."""
    model = build_model(deepseek_v3_cfg(["data.seq_len=8"]))
    model.train()
    model(torch.randint(0, 100, (2, 8)))
    local = [m.gate.bias_counts.clone() for m in model.moe_layers()]
    assert all(c.sum() == 2 * 8 * 2 for c in local)  # B*T*k assignments
    other_rank = torch.tensor([[0.0, 0.0, 0.0, 90.0]] * 2)  # (L, E) counts of a second rank

    class Strategy:
        reduced = 0

        def reduce(self, tensor, reduce_op):
            assert reduce_op == "sum"
            Strategy.reduced += 1
            return tensor + other_rank

    trainer = type("Trainer", (), {"strategy": Strategy()})()
    module = type("Module", (), {"model": model})()
    callback = ExpertBiasUpdate()
    callback.on_before_optimizer_step(trainer, module, optimizer=None)
    assert callback.updates == 1 and Strategy.reduced == 1  # one all-reduce for all layers
    gamma = 1e-3
    for layer, counts in zip(model.moe_layers(), local):
        total = counts + other_rank[0]
        delta = gamma * torch.sign(total.mean() - total)
        torch.testing.assert_close(layer.gate.e_score_correction_bias, delta - delta.mean(), rtol=0, atol=1e-9)
        assert layer.gate.e_score_correction_bias[3] < 0  # the overloaded expert is pushed down
        assert layer.gate.bias_counts.sum() == 0
        assert layer.tokens_per_expert.sum() == 2 * 8 * 2  # the load monitor's counts are left alone


def test_bias_is_a_checkpointed_buffer_without_gradient():
    model = build_model(deepseek_v3_cfg(["data.seq_len=8"]))
    gate = model.moe_layers()[0].gate
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 4))
    state = model.state_dict()
    assert "layers.0.mlp.gate.e_score_correction_bias" in state and "layers.0.mlp.gate.bias_counts" not in state
    assert state["layers.0.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert all(p is not gate.e_score_correction_bias for p in model.parameters())
    assert model.to(torch.bfloat16).moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32
    model.float()
    out = model(torch.randint(0, 100, (2, 8)))
    (out.logits.square().mean() + out.aux_loss).backward()
    assert gate.e_score_correction_bias.grad is None and not gate.e_score_correction_bias.requires_grad
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_load_counts_stay_exact_fp32_under_bf16_weights():
    """precision=bf16-true casts the model: the per-step load statistics must still count tokens exactly (a bf16
    buffer rounds 8,229 to 8,256)."""
    model = build_model(deepseek_v3_cfg(["data.seq_len=8"])).to(torch.bfloat16).train()
    layer = model.moe_layers()[0]
    for name in ("tokens_per_expert", "aux_loss_sum", "n_forwards", "eval_tokens_per_expert"):
        assert getattr(layer, name).dtype == torch.float32, name
    layer.tokens_per_expert += 8229
    layer.tokens_per_expert += torch.ones(4, dtype=torch.int64)
    assert layer.tokens_per_expert.tolist() == [8230.0] * 4


def test_bias_changes_the_output_only_through_selection():
    cfg = deepseek_v3_cfg(["moe.n_routed_experts=8", "moe.n_group=1", "moe.topk_group=1",
                           "moe.moe_intermediate_size=16"])
    moe = MoE(16, cfg.moe)
    init_normal_(moe)
    x = torch.randn(2, 30, 16)
    base = moe(x)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.fill_(0.5)  # same shift for every expert: same selection
    torch.testing.assert_close(moe(x), base, rtol=0, atol=0)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.3)
    routing, shifted = moe.gate(x), moe(x)
    # the weights are the unbiased scores of the (new) selection
    scores = torch.sigmoid(x.reshape(-1, 16) @ moe.gate.weight.T).gather(1, routing.expert_idx)
    torch.testing.assert_close(routing.weights, scores / scores.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)
    same = (moe.gate.__class__(16, cfg.moe).requires_grad_(False), )  # fresh gate: bias 0
    same[0].weight.copy_(moe.gate.weight)
    unchanged = (same[0](x).expert_idx.sort(-1).values == routing.expert_idx.sort(-1).values).all(-1)  # (N,)
    assert 0 < unchanged.sum() < unchanged.numel()
    torch.testing.assert_close(shifted.reshape(-1, 16)[unchanged], base.reshape(-1, 16)[unchanged])


@pytest.mark.parametrize("n_experts", [16, 64])
def test_bias_balances_a_skewed_router(n_experts):
    """Synthetic router with a strong per-expert preference: MaxVio falls to <= 0.2 within 300 bias updates."""
    cfg = deepseek_v3_cfg([f"moe.n_routed_experts={n_experts}", "moe.num_experts_per_tok=4", "moe.n_group=1",
                           "moe.topk_group=1", "moe.aux_loss_alpha=0"])
    gate = Router(32, cfg.moe).train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(n_experts, 32, generator=gen) * 0.05)
        gate.weight[:, 0] = torch.linspace(-1.0, 1.0, n_experts)  # feature 0 == 0.5: logit offsets in [-0.5, 0.5]
    maxvio = []
    for _ in range(300):
        x = torch.randn(256 * n_experts, 32, generator=gen)  # ~1000 assignments per expert: sampling noise ~3 %
        x[:, 0] = 0.5
        counts = gate(x).counts.double()
        maxvio.append(((counts.max() - counts.mean()) / counts.mean()).item())
        update_expert_biases([type("Layer", (), {"gate": gate})()])
    assert maxvio[0] > 1.0  # strongly skewed at the start
    first = next(i for i, v in enumerate(maxvio) if v <= 0.2)
    assert first < 300 and sum(maxvio[-20:]) / 20 <= 0.2, (first, maxvio[-20:])  # reached, and it stays there
    assert gate.e_score_correction_bias[-1] < 0 < gate.e_score_correction_bias[0]


# ----------------------------------------------------------------------------------------------- balance losses


def test_sequence_balance_loss_closed_form():
    n_seqs, seq_len, n_experts, top_k = 3, 7, 6, 2
    scores = torch.rand(n_seqs * seq_len, n_experts, dtype=torch.float64)
    idx = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(n_seqs * seq_len)])
    want = 0.0
    for b in range(n_seqs):
        total = 0.0
        for i in range(n_experts):
            rows = range(b * seq_len, (b + 1) * seq_len)
            f = n_experts / (top_k * seq_len) * sum(int(i in idx[t].tolist()) for t in rows)
            p = sum(scores[t, i].item() / scores[t].sum().item() for t in rows) / seq_len
            total += f * p
        want += total / n_seqs
    assert sequence_balance_loss(scores, idx, n_seqs).item() == pytest.approx(want, rel=1e-12)
    uniform = torch.full((4, 4), 0.3, dtype=torch.float64)
    assert sequence_balance_loss(uniform, torch.tensor([[0], [1], [2], [3]]), 1).item() == pytest.approx(1.0)


def test_aux_tc_loss_is_alpha_times_sequence_loss_with_gradient():
    cfg = deepseek_v3_cfg(["moe.topk_method=aux_tc", "moe.aux_loss_alpha=0.3"])
    gate = Router(16, cfg.moe)
    init_normal_(gate)
    x = torch.randn(2, 9, 16)
    routing = gate(x)
    scores = torch.sigmoid(x.reshape(-1, 16) @ gate.weight.T)
    torch.testing.assert_close(routing.aux_loss, 0.3 * sequence_balance_loss(scores, routing.expert_idx, 2))
    routing.aux_loss.backward()
    assert gate.weight.grad.abs().sum() > 0  # through P_i


@pytest.mark.parametrize("alpha", [0.0, 0.01])
def test_aux_tc_equals_noaux_tc_with_zero_gamma(alpha):
    """Same selection and loss; noaux_tc differs only by the bias, which gamma = 0 freezes at 0."""
    runs = []
    for method in ("aux_tc", "noaux_tc"):
        cfg = deepseek_v3_cfg([f"moe.topk_method={method}", "moe.bias_update_speed=0", f"moe.aux_loss_alpha={alpha}",
                               "data.seq_len=8", "model.vocab_size=256"])
        torch.manual_seed(0)
        model = build_model(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
        losses = []
        for _ in range(3):
            out = model(ids)
            loss = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            update_expert_biases(model.moe_layers())
            losses.append(loss.detach())
        runs.append(torch.stack(losses))
    assert torch.equal(runs[0], runs[1])


def test_the_load_monitor_checkpoints_the_final_bias():
    """A run resumed from a checkpoint already at max_steps takes no step: results.json's expert_bias must still be
    the bias the checkpoint's last step logged (it was [])."""
    from kimi_lab.training.callbacks import ExpertLoadMonitor

    monitor = ExpertLoadMonitor()
    monitor.run_counts, monitor.late_maxvio_sums = [torch.tensor([3.0, 5.0])], [0.25]
    monitor.aux_loss_sums, monitor.n_steps = [1e-4], 1
    monitor.last_bias = [[0.001, -0.001]]
    resumed = ExpertLoadMonitor()
    resumed.load_state_dict(monitor.state_dict())
    assert resumed.summary()["expert_bias"] == [[0.001, -0.001]] == monitor.summary()["expert_bias"]
