"""Cross-key checks that a schema cannot express; each failure is one line naming the key and what is allowed."""

from __future__ import annotations

import math
import re

from omegaconf import DictConfig, ListConfig

from kimi_lab.config.schema import PRECISIONS, AttentionType, EvalTask
from kimi_lab.config.unknown_keys import check_unknown_keys

MOMENTUM_OPTIMIZERS: tuple[str, ...] = ("muon",)  # optimizers that read optimizer.momentum
MUON_KEYS = ("adamw_lr", "nesterov", "ns_steps", "adjust_lr_fn")  # read by muon only: null for the others


class ConfigError(ValueError):
    """An impossible config, raised before anything is built or written."""


def _check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"Invalid config: {key}={shown(value)}; allowed: {allowed}")


def shown(value) -> str:
    """``repr(value)`` for an error message, with StrEnum members (also in lists and tuples) written as the strings
    a user types (``'none'``, not ``<CheckpointPolicy.none: 'none'>``)."""
    if isinstance(value, (list, tuple, ListConfig)):
        items = [shown(v) for v in value]
        if isinstance(value, tuple):
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        return "[" + ", ".join(items) + "]"
    return str.__repr__(value) if isinstance(value, str) else repr(value)


def _in_unit_interval(value, closed_right: bool = False) -> bool:
    return 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError on the first impossible setting."""
    check_unknown_keys(cfg)  # first: a typo'd +key would otherwise pass with the defaults
    _check_model(cfg)
    _check_attention(cfg)
    _check_moe(cfg)
    _check_optimizer(cfg)
    _check_data_and_trainer(cfg)
    _check(cfg.rope.theta > 0, "rope.theta", cfg.rope.theta, "> 0")
    if cfg.rope.scaling is not None:
        _check_rope_scaling(cfg.rope.scaling)
    _check(cfg.hardware.precision in PRECISIONS, "hardware.precision", cfg.hardware.precision, ", ".join(PRECISIONS))
    _check_eval(cfg.eval)
    _check_report(cfg.report)
    chunk = cfg.hardware.loss_chunk_tokens
    _check(chunk is None or chunk > 0, "hardware.loss_chunk_tokens", chunk, "> 0 or null (full logits)")
    threads = cfg.hardware.num_threads
    _check(threads is None or threads > 0, "hardware.num_threads", threads, "> 0 or null (torch's default)")
    devices = cfg.hardware.devices
    _check(devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool) and devices > 0)
           or (isinstance(devices, (list, ListConfig)) and len(devices) > 0), "hardware.devices", devices,
           "a count > 0, a non-empty list of device indices, or auto")


def _check_rope_scaling(scaling: DictConfig) -> None:
    _check(scaling.factor >= 1.0, "rope.scaling.factor", scaling.factor, ">= 1")
    original = scaling.original_max_position_embeddings
    if original is not None:
        _check(original >= 2, "rope.scaling.original_max_position_embeddings", original,
               ">= 2 or null (= data.seq_len)")
    _check(0 < scaling.beta_slow < scaling.beta_fast, "rope.scaling.beta_slow", scaling.beta_slow,
           f"> 0 and < rope.scaling.beta_fast={scaling.beta_fast}")
    for key in ("mscale", "mscale_all_dim"):
        if scaling[key] is not None:
            _check(scaling[key] > 0, f"rope.scaling.{key}", scaling[key], "> 0 or null")


def _check_model(cfg: DictConfig) -> None:
    model, attn = cfg.model, cfg.attention
    _check(model.d_model > 0, "model.d_model", model.d_model, "> 0")
    _check(model.n_layers > 0, "model.n_layers", model.n_layers, "> 0")
    _check(model.d_ff > 0, "model.d_ff", model.d_ff, "> 0")
    _check(model.vocab_size > 0 and model.vocab_size % 64 == 0, "model.vocab_size", model.vocab_size,
           "a positive multiple of 64")
    _check(model.init_std > 0, "model.init_std", model.init_std, "> 0")
    _check(_in_unit_interval(model.dropout), "model.dropout", model.dropout, "[0, 1)")
    _check(attn.n_heads > 0, "attention.n_heads", attn.n_heads, "> 0")
    if attn.type == AttentionType.mha:  # MLA's head dims are its own keys (checked in _check_mla)
        _check(model.d_model % attn.n_heads == 0, "attention.n_heads", attn.n_heads,
               f"a divisor of model.d_model={model.d_model}")
        head_dim = model.d_model // attn.n_heads
        _check(head_dim % 2 == 0, "attention.n_heads", attn.n_heads,
               f"a value giving an even head dim for RoPE (d_model/n_heads = {head_dim})")
    if attn.n_kv_heads is not None:
        _check(0 < attn.n_kv_heads <= attn.n_heads and attn.n_heads % attn.n_kv_heads == 0,
               "attention.n_kv_heads", attn.n_kv_heads, f"null or a divisor of attention.n_heads={attn.n_heads}")
    _check(_in_unit_interval(attn.dropout), "attention.dropout", attn.dropout, "[0, 1)")
    _check(cfg.norm.eps > 0, "norm.eps", cfg.norm.eps, "> 0")


def attention_label(attn: DictConfig) -> str:
    """The label ``attention.name`` holds: ``mla`` for type=mla, else the kernel's name (the preset names)."""
    return "mla" if attn.type == AttentionType.mla else attn.kernel


def _check_attention(cfg: DictConfig) -> None:
    """The label matches the module; MLA's keys; the kernel's own limits (``kernel_limits``) on this accelerator."""
    attn = cfg.attention
    label = attention_label(attn)
    _check(attn.name == label, "attention.name", attn.name, f"'{label}', the label of attention.type={attn.type} "
           f"attention.kernel={attn.kernel} (a preset's label: select attention=standard|sdpa|flash|mla, or set "
           "attention.type / attention.kernel)")
    if attn.type == AttentionType.mla:
        _check_mla(cfg)
    # the kernel states its limits (kimi_lab.model.attention.kernels); imported here, when validating, so that
    # importing the config package imports no torch
    from kimi_lab.model.attention import kernel_limits

    limits, device = kernel_limits(attn.kernel), "cuda" if cfg.hardware.accelerator == "gpu" else "cpu"
    what, fix = f"attention.kernel={attn.kernel}", "or attention.kernel=sdpa/standard"
    if device in limits.no_dropout_on:
        _check(attn.dropout == 0, "attention.dropout", attn.dropout,
               f"0 with {what} on {device.upper()} (the kernel has no dropout there), {fix}")
    if attn.type == AttentionType.mla:
        qk_dim = attn.qk_nope_head_dim + attn.qk_rope_head_dim
        if limits.one_head_dim:  # one head dim for q, k and v: MLA zero-pads its v up to q/k's
            _check(attn.v_head_dim <= qk_dim, "attention.v_head_dim", attn.v_head_dim,
                   f"<= qk_nope_head_dim + qk_rope_head_dim = {qk_dim} with {what} (v is padded to the q/k head "
                   f"dim), {fix}")
        key, value, giving = "attention.qk_nope_head_dim", attn.qk_nope_head_dim, "qk_nope + qk_rope head dims"
    else:
        qk_dim = cfg.model.d_model // attn.n_heads
        key, value, giving = "attention.n_heads", attn.n_heads, "a value giving a head dim"
    max_dim = limits.max_head_dim.get(device)
    _check(max_dim is None or qk_dim <= max_dim, key, value,
           f"{giving} <= {max_dim} with {what} on {device.upper()} (head dim {qk_dim}), {fix}")


def _check_mla(cfg: DictConfig) -> None:
    """attention.type=mla: its dims set, no kv-head grouping, no QK-norm, a YaRN scaling MLA can apply."""
    attn = cfg.attention
    _check(not cfg.norm.qk_norm, "norm.qk_norm", cfg.norm.qk_norm,
           "false for attention.type=mla (it normalises its latents); true only for attention.type=mha")
    for key in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
        _check(attn[key] is not None and attn[key] > 0, f"attention.{key}", attn[key], "> 0 for attention.type=mla")
    rope = attn.qk_rope_head_dim
    _check(rope is not None and rope > 0 and rope % 2 == 0, "attention.qk_rope_head_dim", rope,
           "an even value > 0 for attention.type=mla (RoPE rotates pairs)")
    _check(attn.q_lora_rank is None or attn.q_lora_rank > 0, "attention.q_lora_rank", attn.q_lora_rank,
           "null (no query compression) or > 0")
    _check(attn.n_kv_heads is None, "attention.n_kv_heads", attn.n_kv_heads,
           "null for attention.type=mla (k/v come from one shared latent)")
    from kimi_lab.model.attention.mla import softmax_mscale  # MLA states which RoPE scalings it applies

    softmax_mscale(cfg.rope.scaling)


def _check_moe(cfg: DictConfig) -> None:
    moe = cfg.moe
    _check(moe.n_routed_experts >= 1, "moe.n_routed_experts", moe.n_routed_experts, ">= 1")
    _check(1 <= moe.num_experts_per_tok <= moe.n_routed_experts, "moe.num_experts_per_tok",
           moe.num_experts_per_tok, f"1 .. moe.n_routed_experts={moe.n_routed_experts}")
    _check(moe.moe_intermediate_size > 0, "moe.moe_intermediate_size", moe.moe_intermediate_size, "> 0")
    _check(moe.n_shared_experts >= 0, "moe.n_shared_experts", moe.n_shared_experts, ">= 0")
    _check(moe.routed_scaling_factor > 0, "moe.routed_scaling_factor", moe.routed_scaling_factor, "> 0")
    _check(moe.aux_loss_alpha >= 0, "moe.aux_loss_alpha", moe.aux_loss_alpha, ">= 0")
    _check(0 <= moe.first_k_dense_replace <= cfg.model.n_layers, "moe.first_k_dense_replace",
           moe.first_k_dense_replace, f"0 .. model.n_layers={cfg.model.n_layers}")
    _check_moe_groups(moe)


def _check_moe_groups(moe) -> None:
    method = moe.topk_method
    n_exp, n_group, topk_group = moe.n_routed_experts, moe.n_group, moe.topk_group
    _check(moe.bias_update_speed >= 0, "moe.bias_update_speed", moe.bias_update_speed, ">= 0")
    if method == "greedy":
        _check(n_group == 1 and topk_group == 1, "moe.n_group", n_group,
               "1 with moe.topk_method=greedy (groups need group_limited_greedy, noaux_tc or aux_tc)")
        return
    _check(n_group >= 1 and n_exp % n_group == 0, "moe.n_group", n_group,
           f"a divisor of moe.n_routed_experts={n_exp}")
    _check(1 <= topk_group <= n_group, "moe.topk_group", topk_group, f"1 .. moe.n_group={n_group}")
    reachable = topk_group * (n_exp // n_group)
    _check(moe.num_experts_per_tok <= reachable, "moe.num_experts_per_tok", moe.num_experts_per_tok,
           f"<= moe.topk_group * experts per group = {reachable}")


def _check_optimizer(cfg: DictConfig) -> None:
    opt = cfg.optimizer
    _check(opt.lr > 0, "optimizer.lr", opt.lr, "> 0")
    _check(opt.weight_decay >= 0, "optimizer.weight_decay", opt.weight_decay, ">= 0")
    _check(len(opt.betas) == 2 and all(_in_unit_interval(b) for b in opt.betas), "optimizer.betas",
           list(opt.betas), "two values in [0, 1)")
    uses_momentum = opt.name in MOMENTUM_OPTIMIZERS
    _check((opt.momentum is not None) == uses_momentum, "optimizer.momentum", opt.momentum,
           "null for adam/adamw (set optimizer.betas instead); a value in [0, 1) for momentum optimizers")
    if uses_momentum:
        _check(_in_unit_interval(opt.momentum), "optimizer.momentum", opt.momentum, "[0, 1)")
    is_muon = opt.name == "muon"
    for key in MUON_KEYS:
        _check((opt[key] is not None) == is_muon, f"optimizer.{key}", opt[key],
               "set for optimizer=muon (see conf/optimizer/muon.yaml); null for adam/adamw")
    if is_muon:
        _check(opt.adamw_lr > 0, "optimizer.adamw_lr", opt.adamw_lr, "> 0")
        _check(1 <= opt.ns_steps < 100, "optimizer.ns_steps", opt.ns_steps, "1 .. 99")
    _check(opt.eps > 0, "optimizer.eps", opt.eps, "> 0")
    _check(opt.warmup_steps >= 0, "optimizer.warmup_steps", opt.warmup_steps, ">= 0")
    _check(_in_unit_interval(opt.min_lr_ratio, closed_right=True), "optimizer.min_lr_ratio", opt.min_lr_ratio,
           "[0, 1]")


def _check_data_and_trainer(cfg: DictConfig) -> None:
    data, trainer = cfg.data, cfg.trainer
    _check(data.seq_len >= 2, "data.seq_len", data.seq_len, ">= 2")
    _check(data.batch_size >= 1, "data.batch_size", data.batch_size, ">= 1")
    for key in ("val_fraction", "test_fraction"):
        _check(0 < data[key] < 0.5, f"data.{key}", data[key], "(0, 0.5)")
    for key in ("val_tokens", "test_tokens"):
        _check(data[key] >= data.seq_len, f"data.{key}", data[key], f">= data.seq_len={data.seq_len}")
    _check(data.num_workers >= 0, "data.num_workers", data.num_workers, ">= 0")
    _check(data.num_proc is None or data.num_proc >= 1, "data.num_proc", data.num_proc, ">= 1 or null (all cores)")
    lengths = [m * data.seq_len for m in data.eval_lengths]
    _check(all(n >= 2 and n.is_integer() for n in lengths), "data.eval_lengths", list(data.eval_lengths),
           f"multiples of data.seq_len={data.seq_len} giving whole lengths >= 2")
    if lengths:
        _check(data.val_tokens >= max(lengths), "data.val_tokens", data.val_tokens,
               f">= the longest eval length {int(max(lengths))} (data.eval_lengths x data.seq_len)")
    _check(trainer.max_steps >= 1 or (trainer.max_steps == 0 and cfg.init_from is not None), "trainer.max_steps",
           trainer.max_steps, ">= 1, or 0 with init_from set (evaluate those weights without training)")
    if trainer.max_tokens is not None:
        _check(trainer.max_tokens > 0, "trainer.max_tokens", trainer.max_tokens, "> 0 or null")
    _check(trainer.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches",
           trainer.accumulate_grad_batches, ">= 1")
    for key in ("val_check_interval", "log_every_n_steps", "checkpoint_every_n_steps"):
        _check(trainer[key] >= 1, f"trainer.{key}", trainer[key], ">= 1 (optimizer steps)")
    if trainer.gradient_clip_val is not None:
        _check(trainer.gradient_clip_val > 0, "trainer.gradient_clip_val", trainer.gradient_clip_val, "> 0 or null")
    if trainer.interrupt_at_step is not None:
        _check(trainer.interrupt_at_step >= 1, "trainer.interrupt_at_step", trainer.interrupt_at_step, ">= 1 or null")
    check_resume_policy(cfg)
    _check(cfg.seed is not None and cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0")


def check_resume_policy(cfg: DictConfig) -> None:
    """resume=true continues from the run folder's last.ckpt, which trainer.save_checkpoints=none never writes (train
    calls this before it looks for the file, so the error names the cause)."""
    policy = cfg.trainer.save_checkpoints
    _check(not (cfg.resume and policy == "none"), "trainer.save_checkpoints", policy,
           "last or best with resume=true (none writes no last.ckpt to resume from)")


def _check_eval(ev: DictConfig) -> None:
    tasks = list(ev.tasks)
    if ev.name == "downstream":
        _check(len(tasks) > 0, "eval.tasks", tasks, "a non-empty list of " + ", ".join(EvalTask))
    _check(len(set(tasks)) == len(tasks), "eval.tasks", tasks, "each task at most once")
    _check(ev.limit is None or ev.limit >= 1, "eval.limit", ev.limit, "null (every item) or >= 1")
    _check(ev.batch_size >= 1, "eval.batch_size", ev.batch_size, ">= 1")


LENGTH_METRIC = re.compile(r"val_loss@[1-9][0-9]*")  # results.json val_loss_at_len[L], one report metric per length


def report_metric_names() -> tuple[list[str], list[str]]:
    """(the metrics the report tests, the metrics a declared target may name), looked up when called, so metrics
    added to the report are known here (kimi_lab.stats.metrics imports no torch)."""
    from kimi_lab.stats.metrics import CURVE_TARGETS, METRICS_BY_NAME

    return list(METRICS_BY_NAME), list(CURVE_TARGETS)


def _is_report_metric(name, known: list[str]) -> bool:
    return isinstance(name, str) and (name in known or LENGTH_METRIC.fullmatch(name) is not None)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_report(report: DictConfig) -> None:
    """report.*: what the study declares to the report, checked before training (a sweep never ends unreportable)."""
    tested, targets = report_metric_names()
    allowed = f"one of {', '.join(tested)}, or val_loss@<length> (results.json val_loss_at_len)"
    _check(_is_report_metric(report.primary_metric, tested), "report.primary_metric", report.primary_metric, allowed)
    for metric, value in report.sesoi.items():
        _check(_is_report_metric(metric, tested), f"report.sesoi.{metric}", value, f"a key that is {allowed}")
        _check(_finite(value) and value > 0, f"report.sesoi.{metric}", value, "a finite value > 0 (metric units)")
    for metric, value in report.target.items():
        _check(metric in targets, f"report.target.{metric}", value,
               f"a key that is one of {', '.join(targets)} (a metric with a validation curve in metrics.csv)")
        _check(_finite(value), f"report.target.{metric}", value, "a finite value (metric units)")
    _check(_finite(report.mde_goal) and report.mde_goal > 0, "report.mde_goal", report.mde_goal,
           "a finite value > 0 (primary-metric units)")
    seeds = list(report.tuning_seeds)
    _check(all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds), "report.tuning_seeds",
           seeds, "a list of seeds (integers >= 0)")
