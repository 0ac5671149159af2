"""Muon + AdamW in one optimizer: NS spectrum, parity with torch.optim.Muon (2-D and per expert slice), routing of
every parameter, decoupled weight decay, state round trip."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.optim._muon import _zeropower_via_newtonschulz

from kimi_lab.config import validate_config
from kimi_lab.config.schema import OptimizerConfig
from kimi_lab.config.validate import ConfigError
from kimi_lab.model import build_model
from kimi_lab.optim import build_optimizer, build_scheduler
from kimi_lab.optim.muon import NS_COEFFICIENTS, MuonWithAdamW, batched_newton_schulz, build_muon, split_parameters
from tests.helpers import compose_config, typed_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def _opt_cfg(**overrides):
    base = dict(name="muon", lr=0.02, adamw_lr=3e-3, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=5,
                adjust_lr_fn="original", betas=[0.9, 0.95], eps=1e-8)
    return typed_cfg(OptimizerConfig, **{**base, **overrides})


class BankModel(nn.Module):
    """The MoE engineer's layout: experts as 3-D banks (E, out, in), plus a 2-D matrix and AdamW-side params."""

    def __init__(self, experts=3, hidden=8, inter=6, vocab=11):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.norm = nn.RMSNorm(hidden)
        self.gate = nn.Linear(hidden, experts, bias=False)  # router
        self.o_proj = nn.Linear(hidden, hidden, bias=True)
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inter, hidden))  # (E, 2I, H)
        self.experts.down_proj = nn.Parameter(torch.randn(experts, hidden, inter))  # (E, H, I)

    def forward(self, ids):
        x = self.norm(self.embed_tokens(ids))  # (B, T, H)
        gate, up = torch.einsum("bth,eih->ebti", x, self.experts.gate_up_proj).chunk(2, dim=-1)
        y = torch.einsum("ebti,ehi->bth", nn.functional.silu(gate) * up, self.experts.down_proj)
        return self.o_proj(y) * self.gate(x).softmax(-1).sum(-1, keepdim=True)


def test_update_singular_values_for_a_random_512x2048_gradient():
    torch.manual_seed(0)
    grad = torch.randn(512, 2048)
    for update in (batched_newton_schulz(grad.unsqueeze(0), ns_steps=5)[0],
                   _zeropower_via_newtonschulz(grad, NS_COEFFICIENTS, 5, 1e-7)):
        s = torch.linalg.svdvals(update.float())
        assert 0.68 <= s.min().item() and s.max().item() <= 1.14, (s.min().item(), s.max().item())


def test_batched_ns_matches_torch_per_slice():
    torch.manual_seed(1)
    grads = torch.randn(4, 24, 40)
    got = batched_newton_schulz(grads, ns_steps=5)
    for g, out in zip(grads, got):
        torch.testing.assert_close(out.float(), _zeropower_via_newtonschulz(g, NS_COEFFICIENTS, 5, 1e-7).float(),
                                   rtol=0, atol=2e-2)  # bf16 iterations: bmm vs mm rounding
    tall = batched_newton_schulz(grads.transpose(1, 2), ns_steps=5)  # (E, 40, 24): transposed inside
    torch.testing.assert_close(tall.float(), got.transpose(1, 2).float(), rtol=0, atol=2e-2)


def _step(model, opt, ids, steps=1):
    for _ in range(steps):
        opt.zero_grad()
        model(ids).float().pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_matches_torch_muon_on_a_plain_2d_parameter(adjust):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.Tanh(), nn.Linear(32, 16, bias=False))
    ref, start = copy.deepcopy(model), copy.deepcopy(model)
    ours = build_muon(model, _opt_cfg(adjust_lr_fn=adjust, weight_decay=0.1))
    theirs = torch.optim.Muon(ref.parameters(), lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                              ns_steps=5, adjust_lr_fn=adjust)
    x = torch.randn(64, 16)
    _step(model, ours, x, steps=3)
    _step(ref, theirs, x, steps=3)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(model.parameters(), start.parameters()))  # it moved


@pytest.mark.parametrize("nesterov", [True, False])
def test_expert_banks_match_torch_muon_on_each_slice_and_half(nesterov):
    torch.manual_seed(3)
    model = BankModel()
    kinds = {k: [n for n, _ in v] for k, v in split_parameters(model).items()}
    assert kinds["muon_expert_bank"] == ["experts.gate_up_proj", "experts.down_proj"]  # never silently AdamW
    assert kinds["muon"] == ["o_proj.weight"]
    assert sorted(kinds["adamw"]) == ["embed_tokens.weight", "gate.weight", "norm.weight", "o_proj.bias"]
    opt = build_muon(model, _opt_cfg(nesterov=nesterov, weight_decay=0.1))
    # reference: torch.optim.Muon on every 2-D slice (gate_up split into its gate and up halves)
    gate_up, down = model.experts.gate_up_proj, model.experts.down_proj
    slices = [nn.Parameter(h.detach().clone()) for e in gate_up for h in e.chunk(2, dim=0)]
    slices += [nn.Parameter(e.detach().clone()) for e in down]
    ref = torch.optim.Muon(slices, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov, ns_steps=5,
                           adjust_lr_fn="original")
    ids = torch.randint(0, 11, (4, 9))
    for _ in range(3):
        opt.zero_grad()
        model(ids).pow(2).mean().backward()
        grads = [h.clone() for e in gate_up.grad for h in e.chunk(2, dim=0)] + [e.clone() for e in down.grad]
        for p, g in zip(slices, grads):
            p.grad = g
        before = [p.detach().clone() for p in slices]
        opt.step()
        ref.step()
        got = [h for e in gate_up.detach() for h in e.chunk(2, dim=0)] + list(down.detach())
        for g, want, old in zip(got, slices, before):
            torch.testing.assert_close(g, want.detach(), rtol=0, atol=1e-4)
            assert (g - old).abs().max() > 1e-3  # every slice moved


def test_every_hidden_matrix_gets_an_orthogonalised_update():
    cfg = compose_config(["optimizer=muon", "model.vocab_size=1024", "optimizer.weight_decay=0",
                          "moe.n_shared_experts=1",
                          "optimizer.lr=0.02", "optimizer.adjust_lr_fn=original", "optimizer.warmup_steps=0"])
    torch.manual_seed(4)
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.optimizer)
    kinds = split_parameters(model)
    hidden = [(n, p) for n, p in model.named_parameters() if p.ndim == 2 and not any(
        k in n for k in ("embed_tokens", "lm_head", "norm")) and not n.endswith("mlp.gate.weight")]
    assert {n for n, _ in hidden} == {n for n, _ in kinds["muon"]}
    assert any("shared_experts" in n for n, _ in hidden)
    # routed experts are 3-D banks (E, out, in): per-expert Muon (ExpertBankMuon), checked slice by slice above
    assert {n.rsplit(".", 1)[-1] for n, _ in kinds["muon_expert_bank"]} == {"gate_up_proj", "down_proj"}
    before = {n: p.detach().clone() for n, p in hidden}
    ids = torch.randint(0, 1000, (4, 32))
    opt.zero_grad()
    out = model(ids)
    (out.logits.logsumexp(-1).mean() + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in hidden}
    opt.step()
    for name, p in hidden:
        update = (before[name] - p.detach()) / (0.02 * math.sqrt(max(1, p.shape[0] / p.shape[1])))
        nesterov = grads[name].lerp(grads[name] * 0.05, 0.95)  # first step: buf = (1 - mu) g
        want = _zeropower_via_newtonschulz(nesterov, NS_COEFFICIENTS, 5, 1e-7).float()
        torch.testing.assert_close(update, want, rtol=0, atol=1e-5, msg=name)
        assert update.abs().max() > 1e-2, name


def test_zero_gradient_and_lr_times_wd_half_scales_by_exactly_one_half():
    torch.manual_seed(5)
    model = BankModel()
    opt = build_muon(model, _opt_cfg(lr=0.5, adamw_lr=0.5, weight_decay=1.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        want = before[name] if p.ndim < 2 else 0.5 * before[name]  # no decay on 1-D gains and biases
        assert torch.equal(p.detach(), want), name


def test_state_dict_round_trip_continues_bit_for_bit():
    torch.manual_seed(6)
    model = BankModel()
    opt = build_muon(model, _opt_cfg(weight_decay=0.1))
    sched = build_scheduler(opt, typed_cfg(OptimizerConfig, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1), 10)
    ids = torch.randint(0, 11, (4, 9))
    for _ in range(3):
        _step(model, opt, ids)
        sched.step()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    saved_sched = copy.deepcopy(sched.state_dict())
    assert len(saved_opt["state"]) == len(list(model.parameters()))
    assert {g["kind"] for g in saved_opt["param_groups"]} == {"muon", "muon_expert_bank", "adamw"}

    clone = BankModel()
    clone.load_state_dict(saved_model)
    opt2 = build_muon(clone, _opt_cfg(weight_decay=0.1))
    sched2 = build_scheduler(opt2, typed_cfg(OptimizerConfig, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1), 10)
    opt2.load_state_dict(copy.deepcopy(saved_opt))
    sched2.load_state_dict(saved_sched)
    # the sub-optimizers see the loaded groups and state (not the fresh ones they were built with)
    for sub in opt2.optimizers:
        assert sub.state is opt2.state and all(any(g is h for h in opt2.param_groups) for g in sub.param_groups)
    for _ in range(3):
        _step(model, opt, ids)
        sched.step()
        _step(clone, opt2, ids)
        sched2.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    for (ka, va), (kb, vb) in zip(opt.state_dict()["state"].items(), opt2.state_dict()["state"].items()):
        assert ka == kb and all(torch.equal(va[k], vb[k]) for k in va)


def test_load_state_dict_into_a_stepped_optimizer_takes_the_loaded_state():
    """Rolling an optimizer that has already stepped back to a saved state: momentum and moments are the saved
    ones, not the sub-optimizers' own pre-load state copied back over them."""
    torch.manual_seed(7)
    model = BankModel()
    opt = build_muon(model, _opt_cfg())
    ids = torch.randint(0, 11, (4, 9))
    for _ in range(2):
        _step(model, opt, ids)
    saved = copy.deepcopy(opt.state_dict())
    for _ in range(2):
        _step(model, opt, ids)
    opt.load_state_dict(copy.deepcopy(saved))
    for (key, want), got in zip(saved["state"].items(), opt.state_dict()["state"].values()):
        assert want.keys() == got.keys()
        assert all(torch.equal(torch.as_tensor(want[k]), torch.as_tensor(got[k])) for k in want), key
    for sub in opt.optimizers:
        assert sub.state is opt.state


def test_one_optimizer_object_with_per_group_base_lr():
    cfg = compose_config(["optimizer=muon", "optimizer.warmup_steps=4", "optimizer.lr=0.02", "optimizer.adamw_lr=3e-3"])
    validate_config(cfg)
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.optimizer)
    assert isinstance(opt, MuonWithAdamW) and isinstance(opt, torch.optim.Optimizer)
    sched = build_scheduler(opt, cfg.optimizer, max_steps=20)
    lrs = {g["kind"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"muon": 0.02 / 4, "muon_expert_bank": 0.02 / 4, "adamw": 3e-3 / 4})
    # muon, the two expert-bank groups (down_proj, gate_up_proj split in halves), adamw decay / no-decay
    assert sched.base_lrs == [0.02, 0.02, 0.02, 3e-3, 3e-3]


@pytest.mark.parametrize(("overrides", "key"), [
    (["optimizer=muon", "optimizer.momentum=null"], "optimizer.momentum"),
    (["optimizer=muon", "optimizer.ns_steps=0"], "optimizer.ns_steps"),
    (["optimizer=adamw", "optimizer.nesterov=true"], "optimizer.nesterov"),
])
def test_bad_muon_settings_fail_with_one_line(overrides, key):
    with pytest.raises(ConfigError, match=key):
        validate_config(compose_config(overrides))


@pytest.mark.gpu
def test_batched_ns_on_cuda_matches_torch_per_slice():
    torch.manual_seed(7)
    grads = torch.randn(4, 64, 96, device="cuda")
    got = batched_newton_schulz(grads, ns_steps=5)
    for g, out in zip(grads, got):
        want = _zeropower_via_newtonschulz(g, NS_COEFFICIENTS, 5, 1e-7)
        torch.testing.assert_close(out.float(), want.float(), rtol=0, atol=2e-2)
    model = BankModel().cuda()
    opt = build_muon(model, _opt_cfg(weight_decay=0.1))
    _step(model, opt, torch.randint(0, 11, (4, 9), device="cuda"), steps=2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
