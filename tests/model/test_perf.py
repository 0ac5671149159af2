"""Performance options: chunked loss (parity + memory), activation checkpointing, torch.compile against eager (graph
breaks included), and `python -m kimi_lab.bench train --quick` run in process (its timed steps and report)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from kimi_lab.bench.attention import HeapPeak
from kimi_lab.model import build_model
from kimi_lab.model.loss import linear_cross_entropy
from kimi_lab.training.module import compile_model
from tests.helpers import compose_config


@pytest.mark.parametrize("chunk", [1, 8, 36, 37])
def test_chunked_cross_entropy_matches_full_logits_in_float64(chunk):
    """Value and both gradients equal F.cross_entropy on full logits (float64), chunks that do and do not divide N."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 64, (37,))
    ref = F.cross_entropy(F.linear(hidden, weight), targets)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, chunk) * 3.0  # a non-unit upstream gradient
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert loss.dtype == torch.float64 and torch.allclose(loss, 3.0 * ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, 3.0 * want, rtol=0, atol=1e-12)


def test_chunked_cross_entropy_without_grad_and_under_bf16_autocast():
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(40, 16), torch.randn(128, 16), torch.randint(0, 128, (40,))
    ref = F.cross_entropy(F.linear(hidden, weight), targets)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(hidden, weight, targets, 16), ref, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_ref = F.cross_entropy(F.linear(hidden, weight).float(), targets)
        bf16 = linear_cross_entropy(hidden, weight, targets, 16)
    assert bf16.dtype == torch.float32 and torch.allclose(bf16, bf16_ref, atol=1e-4)


def test_chunked_cross_entropy_peak_memory_is_under_a_quarter_of_the_full_logits():
    """B*T = 16k tokens, vocab 32k: the loss's forward+backward heap peak stays <= 0.25x the full fp32 logits (N, V)
    alone (2 GiB; the full-logits path also holds their log-softmax and gradient, so its own peak is ~3x that)."""
    n_tokens, vocab, dim, chunk = 16384, 32768, 16, 2048
    torch.manual_seed(0)
    hidden = torch.randn(n_tokens, dim, requires_grad=True)
    weight = (0.02 * torch.randn(vocab, dim)).requires_grad_()
    targets = torch.randint(0, vocab, (n_tokens,))
    with HeapPeak() as heap:
        linear_cross_entropy(hidden, weight, targets, chunk).backward()
    full_logits_bytes = n_tokens * vocab * 4
    assert heap.peak - heap.base <= 0.25 * full_logits_bytes
    assert heap.peak - heap.base >= chunk * vocab * 4  # it did hold one (chunk, V) block: the sampler saw it


def _grads(cfg, ids):
    torch.manual_seed(0)
    model = build_model(cfg).train()
    out = model(ids[:, :-1], return_hidden=True)
    loss = linear_cross_entropy(out.hidden, model.lm_head.weight, ids[:, 1:], None) + out.aux_loss
    loss.backward()
    return model, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("moe", ["greedy", "deepseek_v3", "dense"])
def test_activation_checkpointing_gives_the_same_gradients_and_counts_tokens_once(moe, one_thread):
    ids = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(1))
    plain, loss, grads = _grads(compose_config([f"moe={moe}"]), ids)
    ckpt, loss_ckpt, grads_ckpt = _grads(compose_config([f"moe={moe}", "hardware.activation_checkpointing=true"]), ids)
    assert ckpt.activation_checkpointing and torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], rtol=0, atol=1e-7), name
    for a, b in zip(plain.moe_layers(), ckpt.moe_layers()):  # the recompute in backward is not counted again
        assert torch.equal(a.tokens_per_expert, b.tokens_per_expert) and a.tokens_per_expert.sum() == 2 * 16 * 2
        assert torch.equal(a.n_forwards, b.n_forwards) and torch.equal(a.aux_loss_sum, b.aux_loss_sum)
        if hasattr(a.gate, "bias_counts"):  # noaux_tc: the bias moves from counts taken once per forward
            assert torch.equal(a.gate.bias_counts, b.gate.bias_counts) and a.gate.bias_counts.sum() == 2 * 16 * 2


def _compiled_matches_eager(overrides):
    ids = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(1))
    eager, loss, grads = _grads(compose_config(overrides), ids)
    torch.manual_seed(0)
    model = build_model(compose_config(overrides)).train()
    model.compile()
    for _ in range(2):  # two steps: the second reuses the compiled graph
        model.zero_grad()
        out = model(ids[:, :-1], return_hidden=True)
        compiled = linear_cross_entropy(out.hidden, model.lm_head.weight, ids[:, 1:], None) + out.aux_loss
        compiled.backward()
    assert torch.allclose(compiled.detach(), loss, atol=1e-5)
    for name, param in model.named_parameters():  # state_dict names unchanged by compile (no _orig_mod.)
        assert torch.allclose(param.grad, grads[name], atol=1e-5), name


def test_compile_smoke(one_thread):
    _compiled_matches_eager(["moe=dense", "attention=flash"])


@pytest.mark.parametrize("attention", ["sdpa", "mla"])
def test_compiled_bf16_model_has_no_graph_break(attention, one_thread):
    """Under bf16 autocast torch.compile traces the whole MoE model: the grouped GEMM, the gate (no ContextVar
    read), the SwiGLU and SDPA (no backend query for the kernel label or the query blocks) stay in one graph instead
    of breaking in every layer."""
    torch._dynamo.reset()
    model = build_model(compose_config(["moe=deepseek_v3", f"attention={attention}", "data.seq_len=512"])).train()
    ids = torch.randint(0, 1000, (1, 301), generator=torch.Generator().manual_seed(1))  # > MATH_QUERY_BLOCK
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(ids[:, :-1])
    assert explained.graph_break_count == 0, [str(r.reason).splitlines()[0] for r in explained.break_reasons]


def test_compile_with_activation_checkpointing_matches_eager_and_counts_tokens_once(one_thread):
    """hardware.compile with hardware.activation_checkpointing: blocks compiled one by one inside the checkpoint
    (dynamo cannot trace the checkpoint's context_fn); gradients equal eager's, the recompute counts no tokens."""
    torch._dynamo.reset()
    ids = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(1))
    plain, _, grads = _grads(compose_config(["moe=deepseek_v3"]), ids)
    torch.manual_seed(0)
    model = build_model(compose_config(["moe=deepseek_v3", "hardware.activation_checkpointing=true"])).train()
    compile_model(model)
    for _ in range(2):  # the second step runs the cached graphs (forward, and the recompute's own variant)
        model.zero_grad()
        out = model(ids[:, :-1], return_hidden=True)
        (linear_cross_entropy(out.hidden, model.lm_head.weight, ids[:, 1:], None) + out.aux_loss).backward()
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, grads[name], atol=1e-5), name
    for a, b in zip(plain.moe_layers(), model.moe_layers()):  # two forwards counted, the recomputes not
        assert torch.equal(2 * a.tokens_per_expert, b.tokens_per_expert) and torch.equal(
            2 * a.gate.bias_counts, b.gate.bias_counts)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["attention=standard"], ["attention=sdpa"], ["attention=mla"],
                                       ["moe=deepseek_v3"], ["moe=greedy", "moe.n_shared_experts=1"]])
def test_compile_every_option(overrides, one_thread):
    _compiled_matches_eager(overrides)


def test_bench_train_quick_runs_end_to_end(tmp_path, one_thread):
    from kimi_lab.bench.train import main

    assert main(["--quick", "--tiny", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("*.json")
    data = json.loads(report.read_text())
    rows = data["rows"]
    assert {r["arm"] for r in rows} >= {"default", "plain_pytorch_dense"}
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["step_time_ms"] > 0 and row["flops_per_token"] > 0
        assert 0 < row["mfu"] and row["peak_mem_mb"] > 0
    assert data["matmul_peak_tflops"] > 0 and data["loader_tokens_per_s"] > 0
    assert report.with_suffix(".md").exists()
    from kimi_lab.bench.train import loss_chunking_check

    loss = loss_chunking_check("cpu", n_tokens=1024, vocab=2048, dim=16, chunk=128, repeats=1)
    assert loss["memory_ratio"] < 0.5 and loss["full_ms"] > 0 and loss["chunked_ms"] > 0
