"""GPU checks (marker `gpu`; skipped without CUDA): bf16-mixed training runs and records the CUDA memory peak; the
training-batch window of that peak is tested on any machine with a faked allocator."""

from __future__ import annotations

import json

import pytest
import torch

from kimi_lab.training import train
from tests.helpers import compose_config


@pytest.mark.gpu
def test_tiny_run_on_gpu_in_bf16(tmp_path):
    overrides = ["hardware=gpu", "trainer.max_steps=6", "trainer.val_check_interval=3", "optimizer.warmup_steps=2"]
    results = train(compose_config(overrides, output_dir=tmp_path / "gpu"))
    assert results["status"] == "completed"
    assert results["peak_mem_kind"] == "cuda_max_allocated" and results["peak_mem_mb"] > 0
    assert results["val_loss"] < 11.0
    assert json.loads((tmp_path / "gpu" / "status.json").read_text())["status"] == "completed"


@pytest.mark.gpu
def test_router_is_fp32_under_cuda_autocast():
    from kimi_lab.model.moe import Router

    cfg = compose_config([])
    router = Router(64, cfg.moe).cuda()
    torch.nn.init.normal_(router.weight, std=0.02)
    x = torch.randn(32, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        routing = router(x.bfloat16())
    assert routing.weights.dtype == torch.float32


@pytest.mark.gpu
def test_grouped_experts_on_cuda_bf16_autocast_match_fp32():
    """The fused grouped GEMM on CUDA under bf16 autocast (sm80+) against the fp32 segment form."""
    from kimi_lab.model.moe import MoE, grouped_mm_runs

    cfg = compose_config(["moe=deepseek_v3", "moe.n_routed_experts=8", "moe.moe_intermediate_size=64"])
    moe = MoE(64, cfg.moe).cuda()
    for param in moe.parameters():
        torch.nn.init.normal_(param, std=0.1)
    x = torch.randn(4, 32, 64, device="cuda")
    want = moe.double()(x.double()).float()
    moe.float()
    assert grouped_mm_runs(x.reshape(-1, 64).bfloat16(), moe.experts.down_proj.bfloat16()) == (
        torch.cuda.get_device_capability() >= (8, 0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = moe(x)
    got.float().sum().backward()
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)
    assert moe.experts.gate_up_proj.grad is not None and moe.experts.gate_up_proj.grad.dtype == torch.float32


def test_cuda_peak_is_the_training_batches_only(monkeypatch):
    """Runs everywhere (the allocator is faked): the peak is reset at each training batch's start and read at its
    end, so a larger allocation outside the batches (validation, test, downstream) never enters peak_mem_mb."""
    from types import SimpleNamespace

    from kimi_lab.training.callbacks import MemoryWindow

    allocator = {"current": 100, "peak": 100}

    def reset(device=None):
        allocator["peak"] = allocator["current"]

    def allocate(n):
        allocator["current"] += n
        allocator["peak"] = max(allocator["peak"], allocator["current"])

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocator["peak"])
    window, module = MemoryWindow(), SimpleNamespace(device=torch.device("cuda", 0))
    for activations in (50, 70):  # two training batches: weights (100) + activations, freed at the end
        window.on_train_batch_start(None, module, None, 0)
        allocate(activations)
        allocate(-activations)
        window.on_train_batch_end(None, module, None, None, 0)
    allocate(500)  # a validation pass building full logits
    allocate(-500)
    assert window.cuda_peak_bytes == 170
    window.on_train_batch_start(None, module, None, 0)  # the next batch starts from the current level, not 600
    window.on_train_batch_end(None, module, None, None, 0)
    assert window.cuda_peak_bytes == 170
    cpu = MemoryWindow()
    cpu.on_train_batch_start(None, SimpleNamespace(device=torch.device("cpu")), None, 0)
    assert cpu.cuda_peak_bytes == 0
