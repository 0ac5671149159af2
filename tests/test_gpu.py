"""GPU checks (marker `gpu`; skipped without CUDA): bf16-mixed training runs and records the CUDA memory peak."""

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
    from kimi_lab.model.moe import GreedyRouter

    cfg = compose_config([])
    router = GreedyRouter(64, cfg.moe).cuda()
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
