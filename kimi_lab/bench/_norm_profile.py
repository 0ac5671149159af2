"""Norm profiling shared by ``bench norm`` and results.json (``norm_kernel``, ``norm_fwd_bwd_ms``): which aten kernels
a norm dispatches to, the input shape each norm layer sees, and their forward+backward time."""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


def profile_norms(model: nn.Module, batch_size: int, seq_len: int, device: torch.device) -> dict:
    """Norm kernel (fused / composite) and fwd+bwd ms of all norm layers at the run's (B, T, D), on ``device``
    (copies: the model itself stays put); results.json reads it against the training step time."""
    shapes = norm_input_shapes(model, batch_size, seq_len)  # MLA / qk-norms differ
    norms = [copy.deepcopy(m).to(device) for m in norm_layers(model)]
    return {"norm_kernel": norm_kernel(norms[0], device), "norm_fwd_bwd_ms": norm_fwd_bwd_ms(norms, shapes)}


def norm_kernel(norm: nn.Module, device: torch.device | str = "cpu") -> str:
    """Which aten kernels one forward of ``norm`` dispatches to on ``device``: fused (one op) or composite.

    On CPU in torch 2.13 torch.nn.RMSNorm is a composite (pow, mean, add, rsqrt, mul, mul) while LayerNorm is
    one fused native_layer_norm, so CPU timings of the two compare kernels, not methods.
    """
    probe = copy.deepcopy(norm).to(device)
    x = torch.randn(2, 3, probe.normalized_shape[-1], device=device)
    with _OpRecorder() as recorder, torch.no_grad():
        probe(x)
    ops = [op for op in recorder.ops if op not in ("aten.detach", "aten.view", "aten._to_copy")]
    kind = "fused" if len(ops) == 1 else "composite"
    return f"torch.nn.{type(norm).__name__}: {kind} on {torch.device(device).type} ({', '.join(ops)})"


class _OpRecorder(TorchDispatchMode):
    """Records the aten op of every call that reaches dispatch (composite-implicit ops arrive decomposed)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]


def median_ms(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones; on CUDA each timed call
    waits for the device at both edges, so kernels are timed, not their launches."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def norm_input_shapes(model: nn.Module, batch_size: int, seq_len: int) -> list[tuple[int, ...] | None]:
    """The input shape of each of ``norm_layers(model)`` in a forward of ``batch_size`` sequences of ``seq_len``
    tokens (None for a norm that forward never calls): block norms see (B, T, D), MLA's latent norms (B, T, rank),
    qk-norms (B, T, H, head_dim). Pre-hooks on one eval, no-grad forward of a single sequence; dim 0 is the batch."""
    norms, shapes = norm_layers(model), {}

    def record(module: nn.Module, args: tuple) -> None:
        shapes.setdefault(module, (batch_size, *args[0].shape[1:]))

    handles = [norm.register_forward_pre_hook(record) for norm in norms]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():  # .forward: eager even when hardware.compile compiled the model's __call__
            model.forward(torch.zeros(1, seq_len, dtype=torch.long, device=next(model.parameters()).device),
                          return_hidden=True)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [shapes.get(norm) for norm in norms]


def norm_fwd_bwd_ms(norms: list[nn.Module], input_shapes: list[tuple[int, ...] | None], repeats: int = 5) -> float:
    """Median ms of forward+backward of all ``norms``, each on a random input of its shape (``norm_input_shapes``;
    None: skipped), on the norms' own device."""
    device = next(norms[0].parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        pairs = []
        for norm, shape in zip(norms, input_shapes):
            if shape is not None:
                x = torch.randn(shape, device=device, requires_grad=True)
                pairs.append((norm, x, torch.randn_like(x)))

        def step():
            for norm, x, grad in pairs:
                norm(x).backward(grad)

        ms = median_ms(step, device, repeats)
    for norm in norms:
        norm.zero_grad(set_to_none=True)
    return ms
