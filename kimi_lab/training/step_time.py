"""What a job will cost, without training it: the model's size on the meta device, and one measured training step
and one measured evaluation forward of the real model on random tokens of the run's (batch_size, seq_len).

Both are cached per distinct model config (``model_key``): a sweep over seeds or learning rates measures once.
The estimate leaves out the corpus build, checkpoint writes, ``hardware.compile`` (the step runs eager) and
``eval=downstream``.
Its torch and model imports sit inside the functions: Hydra loads this module with the dry-run callback at every
start (``--help`` included).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from unittest import mock

from omegaconf import DictConfig, OmegaConf

# optimizer keys that change what a step costs (the rest are numbers the same kernels read)
OPTIMIZER_COST_KEYS = ("name", "ns_steps", "nesterov")


def model_key(cfg: DictConfig) -> str:
    """The config that decides the model's shape and a step's cost: seeds, learning rates, paths, loggers and
    report keys aside."""
    keep = {g: OmegaConf.to_container(cfg[g], resolve=True, enum_to_str=True)
            for g in ("model", "attention", "norm", "moe", "rope", "hardware")}
    keep["optimizer"] = {k: cfg.optimizer[k] for k in OPTIMIZER_COST_KEYS}
    keep["data"] = {k: cfg.data[k] for k in ("seq_len", "batch_size")}
    return json.dumps(keep, sort_keys=True)


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside is moved to the meta device as it is registered, so a model of any size is
    built without its memory or its init (accelerate's ``init_empty_weights``, written out: accelerate is no
    dependency). Buffers stay real: RoPE builds its cos/sin tables on the CPU."""
    import torch  # lazy: see the module docstring

    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


_SIZES: dict[str, dict] = {}
_TIMES: dict[str, StepTime] = {}


def model_size(cfg: DictConfig) -> dict:
    """``params_total``, ``params_embedding``, ``params_active`` and ``flops_per_token`` (kimi_lab.model.stats) of the
    model built on the meta device."""
    key = model_key(cfg)
    if key not in _SIZES:
        from kimi_lab.model import build_model, flops_per_token, parameter_counts  # lazy: see the module docstring

        from kimi_lab.model.transformer import Transformer  # lazy: see the module docstring

        # no init: a meta tensor has no values (and the init's per-parameter generators need a real device)
        with parameters_on_meta(), mock.patch.object(Transformer, "_init_weights", lambda *args: None):
            model = build_model(cfg)
        flops = flops_per_token(model, cfg.data.seq_len, cfg.model.d_model, cfg.model.n_layers)
        _SIZES[key] = {**parameter_counts(model), "flops_per_token": flops}
    return _SIZES[key]


@dataclass(frozen=True)
class StepTime:
    micro_batch_s: float  # forward + backward of one micro-batch
    optimizer_s: float  # optimizer.step + zero_grad
    eval_forward_s: float  # one no-grad forward of a (batch_size, seq_len) batch with its loss
    device: str


def step_time(cfg: DictConfig) -> StepTime:
    """Measured once per distinct model config, after a one-row warm-up step (optimizer state and lazy init are not
    timed): one micro-batch's forward + backward, one optimizer step and one evaluation forward at full size."""
    key = model_key(cfg)
    if key not in _TIMES:
        _TIMES[key] = _measure(cfg)
    return _TIMES[key]


def _measure(cfg: DictConfig) -> StepTime:
    import torch  # lazy: see the module docstring

    from kimi_lab.model import build_model  # lazy: see the module docstring
    from kimi_lab.model.loss import linear_cross_entropy
    from kimi_lab.optim import build_optimizer
    from kimi_lab.training import malloc

    on_gpu = cfg.hardware.accelerator == "gpu" and torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    threads = torch.get_num_threads()
    if cfg.hardware.num_threads is not None and not on_gpu:
        torch.set_num_threads(cfg.hardware.num_threads)
    try:
        model = build_model(cfg).to(device)
        optimizer = build_optimizer(model, cfg.optimizer)
        generator = torch.Generator().manual_seed(0)
        shape = (cfg.data.batch_size, cfg.data.seq_len + 1)
        tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=generator).to(device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        autocast = _autocast(cfg.hardware.precision, device)

        def micro_batch(rows: int | None = None):  # as LanguageModelModule.training_step
            with autocast:
                out = model(inputs[:rows], return_hidden=True)
                loss = linear_cross_entropy(out.hidden, model.lm_head.weight, targets[:rows],
                                            cfg.hardware.loss_chunk_tokens)
            (loss + out.aux_loss).backward()

        def optimizer_step():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def eval_forward():  # as LanguageModelModule._eval_step: full logits, summed CE
            with torch.no_grad(), autocast:
                logits = model(inputs).logits.float().flatten(0, 1)
                torch.nn.functional.cross_entropy(logits, targets.flatten(), reduction="sum")

        with malloc.retained(cfg.hardware.malloc_retain and not on_gpu):  # as the run's CPU memory
            micro_batch(rows=1)
            optimizer_step()  # warm-up on one row: optimizer state and lazy init are not timed
            return StepTime(_timed(micro_batch, device), _timed(optimizer_step, device),
                            _timed(eval_forward, device), device.type)
    finally:
        torch.set_num_threads(threads)


def _autocast(precision: str, device):
    import torch  # lazy: see the module docstring

    if precision in ("bf16-mixed", "16-mixed"):
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()  # 32-true; bf16-true runs in fp32 here (an overestimate)


def _timed(fn, device) -> float:
    """Seconds of one call of ``fn``, waiting for the device at both edges."""
    from kimi_lab.bench._norm_profile import median_ms  # lazy: see the module docstring

    return median_ms(fn, device, repeats=1, warmup=0) / 1000.0


def estimated_seconds(cfg: DictConfig, steps: int, timing: StepTime) -> float:
    """Training steps (``accumulate`` micro-batches and one optimizer step each) plus every evaluation pass the run
    makes: a validation every ``val_check_interval`` steps and at the last step, the test split, and one pass per
    ``data.eval_lengths`` entry (each scores about ``val_tokens``)."""
    accumulate = cfg.trainer.accumulate_grad_batches
    train_s = steps * (accumulate * timing.micro_batch_s + timing.optimizer_s)
    every = cfg.trainer.val_check_interval
    validations = steps // every + (1 if steps % every else 0)
    eval_tokens = (validations + len(cfg.data.eval_lengths)) * cfg.data.val_tokens + cfg.data.test_tokens
    batch_tokens = cfg.data.batch_size * cfg.data.seq_len
    return train_s + math.ceil(eval_tokens / batch_tokens) * timing.eval_forward_s
