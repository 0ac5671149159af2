"""Attention study tooling: `make bench-attention` writes every option with its kernel, KV-cache size and peak
memory; every point of the attention study's sweep grid composes, validates and builds its attention."""

from __future__ import annotations

import csv
import itertools

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from kimi_lab.config import validate_config
from kimi_lab.model.attention import build_attention
from tests.helpers import CONF_DIR, DATA_DIR, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------------- benchmark


def test_attention_bench_writes_every_option(tmp_path):
    from kimi_lab.bench.attention import HeapPeak, _parse, main, paired_mla_check

    args = ["--seq-lens", "32", "64", "--heads", "2", "--head-dim", "16", "--repeats", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    with (tmp_path / "attention.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["option"] for r in rows} == {"standard", "sdpa", "flash", "mla:standard",
                                                               "mla:sdpa", "mla:flash"}
    kernels = {r["option"]: r["kernel"] for r in rows}
    assert kernels["flash"] == "sdpa_flash_cpu" and kernels["mla:flash"] == "sdpa_flash_cpu+pad_v"
    mla = next(r for r in rows if r["option"] == "mla:sdpa")
    assert (int(mla["qk_head_dim"]), int(mla["v_head_dim"])) == (24, 16)
    assert int(mla["kv_cache_bytes_per_token"]) == (4 * 16 + 8) * 4  # fp32 latent + rope key
    assert all(float(r["fwd_bwd_ms"]) > 0 and float(r["tflops"]) > 0 for r in rows)
    assert all(float(r["peak_mem_mb"]) >= 0 for r in rows) and rows[0]["peak_mem_kind"] == "cpu_malloc_sampled"
    with HeapPeak() as heap:
        block = torch.ones(16 * 2**20 // 4)  # 16 MiB
    # the sampled peak sees the 16 MiB block; other threads may free a few bytes meanwhile (seen: 16 MiB - 16 B)
    assert heap.peak - heap.base >= 15 * 2**20 and block.sum() > 0
    lines = paired_mla_check(_parse(["--heads", "2", "--head-dim", "16"]), rounds=1)
    assert [line.split("kernel ")[1].split(":")[0] for line in lines] == ["standard", "sdpa", "flash"]
    assert "sdpa_flash_cpu+pad_v vs sdpa_flash_cpu" in lines[2]


# ------------------------------------------------------------------------------------- study configs


@pytest.mark.parametrize("experiment", ["attention", "attention_cpu"])
def test_attention_study_grid_composes(experiment):
    """Every point of the sweep grid (hydra.sweeper.params) composes, validates and builds its attention; the
    context arms step the same tokens (tests/config/test_study_designs.py: sizes and the common eval length)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        full = compose(config_name="config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = {key: str(value).split(",") for key, value in full.hydra.sweeper.params.items()}
    assert params["attention"] == ["standard", "flash", "mla"] and len(params["seed"]) >= 3
    assert len(params["context"]) == 3 and "data.batch_size" not in params
    for attention, context in itertools.product(params["attention"], params["context"]):
        overrides = [f"experiment={experiment}", f"attention={attention}", f"context={context}",
                     f"paths.data_dir={DATA_DIR}"]
        cfg = compose_config(overrides, model=None)
        validate_config(cfg)
        assert cfg.model.name == ("base" if experiment == "attention" else "tiny")
        assert getattr(cfg.attention.name, "value", cfg.attention.name) == attention
        assert cfg.data.seq_len * cfg.data.batch_size == (32768 if experiment == "attention" else 1024)
        module = build_attention(int(cfg.model.d_model), cfg.attention)
        if attention == "mla":  # equal heads; GPU: nope = v = MHA head dim, rope half of it; CPU: q/k head = MHA's
            head_dim = cfg.model.d_model // cfg.attention.n_heads
            nope = head_dim if experiment == "attention" else head_dim // 2
            assert (module.qk_nope_head_dim, module.v_head_dim, module.rope_head_dim) == (nope, head_dim,
                                                                                          head_dim // 2)
