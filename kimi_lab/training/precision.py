"""fp32 matmul precision of a job: TF32 tensor cores on CUDA under ``hardware.tf32``, IEEE fp32 everywhere else.

``torch.set_float32_matmul_precision("high")`` lets CUDA run fp32 matmuls (every matmul of a ``32-true`` run; under
bf16 autocast the few kept in fp32, such as the MoE router's gate) on TF32 tensor cores, several times the fp32
rate on an H100, with a 10-bit mantissa and fp32 range. CPU jobs always get ``"highest"``: torch maps ``"high"``
onto oneDNN's reduced-precision CPU matmul too, and CPU results stay IEEE fp32. Every job sets the value, so a job
in a shared sweep process never runs with the previous job's setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from omegaconf import DictConfig


def wanted_matmul_precision(cfg: DictConfig) -> str:
    """``"high"`` (TF32) for ``hardware.tf32=true`` on ``accelerator=gpu``, else ``"highest"`` (tf32 is ignored
    on CPU)."""
    return "high" if cfg.hardware.tf32 and cfg.hardware.accelerator == "gpu" else "highest"


def configure_matmul_precision(cfg: DictConfig) -> str:
    """Sets torch's fp32 matmul precision for this job (once, before the model is built); returns the value set,
    which ``current()`` reads back for results.json."""
    precision = wanted_matmul_precision(cfg)
    torch.set_float32_matmul_precision(precision)
    return precision


@contextlib.contextmanager
def matmul_precision(cfg: DictConfig) -> Iterator[str]:
    """``configure_matmul_precision`` for the duration of a job, then the process's previous value again (tests
    and in-process sweeps leave the global as they found it)."""
    before = torch.get_float32_matmul_precision()
    try:
        yield configure_matmul_precision(cfg)
    finally:
        torch.set_float32_matmul_precision(before)


def current() -> str:
    """The fp32 matmul precision in force (results.json ``fp32_matmul_precision``): ``"highest"`` (IEEE fp32) or
    ``"high"`` (TF32 on CUDA)."""
    return torch.get_float32_matmul_precision()
