"""GPU defaults: TF32 for fp32 matmuls on CUDA (hardware.tf32), the chunked head loss in bf16 with fp32
accumulation, and `make gpu-check` (benchmarks/gpu_check.sh: its no-GPU exit, its commands, its summary)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError
from torch.utils._python_dispatch import TorchDispatchMode

from kimi_lab.config import validate_config
from kimi_lab.model.loss import linear_cross_entropy
from kimi_lab.training.precision import matmul_precision, wanted_matmul_precision
from tests.helpers import CONF_DIR, DATA_DIR, REPO_ROOT, compose_config

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("overrides, want", [
    (["hardware=gpu"], "high"), (["hardware=ddp"], "high"), (["hardware=cpu"], "highest"),
    (["hardware=gpu", "hardware.tf32=false"], "highest"),
    (["hardware=cpu", "hardware.tf32=true"], "highest"),  # ignored on CPU: IEEE fp32 always
    (["hardware=gpu", "hardware.accelerator=cpu"], "highest"),
])
def test_tf32_is_asked_for_on_gpu_only(overrides, want):
    assert wanted_matmul_precision(compose_config(overrides)) == want


def test_matmul_precision_sets_torchs_flag_for_the_job_and_restores_it():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # what an earlier job in the same process might have left
    try:
        with matmul_precision(compose_config(["hardware=gpu"])) as precision:
            assert precision == torch.get_float32_matmul_precision() == "high"
            assert torch.backends.cuda.matmul.allow_tf32
        with matmul_precision(compose_config(["hardware=cpu"])) as precision:
            assert precision == torch.get_float32_matmul_precision() == "highest"
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


def test_tf32_key_takes_a_bool_only():
    with pytest.raises((ConfigCompositionException, ValidationError), match=r"hardware\.tf32"):
        compose_config(["hardware.tf32=maybe"])


@pytest.mark.gpu
def test_tf32_runs_fp32_matmuls_on_tensor_cores():
    """Under hardware=gpu an fp32 matmul carries TF32's 10-bit-mantissa error, far above IEEE fp32's."""
    a, b = torch.randn(1024, 1024, device="cuda"), torch.randn(1024, 1024, device="cuda")
    want = a.double() @ b.double()
    errors = {}
    for hardware in ("gpu", "cpu"):  # cpu: the "highest" a CPU job sets, here applied to a CUDA matmul
        with matmul_precision(compose_config([f"hardware={hardware}"])):
            errors[hardware] = ((a @ b).double() - want).abs().max().item()
    assert errors["gpu"] > 20 * errors["cpu"], errors


class _Recorder(TorchDispatchMode):
    """Every aten op's name, input dtypes and output (dtype, numel), after autocast has cast its inputs."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((func.__name__, [a.dtype for a in args if isinstance(a, torch.Tensor)],
                         [(o.dtype, o.numel()) for o in outs if isinstance(o, torch.Tensor)]))
        return out


def _head_problem(device: str, n_tokens=96, dim=32, vocab=512):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n_tokens, dim, generator=gen).to(device)
    weight = (0.3 * torch.randn(vocab, dim, generator=gen)).to(device)
    targets = torch.randint(0, vocab, (n_tokens,), generator=gen).to(device)
    return hidden, weight, targets


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_loss_under_bf16_autocast_matches_float64_value_and_gradients(device):
    hidden, weight, targets = _head_problem(device)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = F.cross_entropy(F.linear(h64, w64), targets)
    want.backward()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()  # fp32 master weights
    with torch.autocast(device, dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, targets, chunk_tokens=40)  # chunks of 40, 40, 16 tokens
    got.backward()
    assert got.dtype == h.grad.dtype == w.grad.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-3, atol=0)  # bf16 eps 2^-8, fp32 sums
    for grad, ref in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert (grad.double() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_chunked_loss_under_bf16_runs_the_head_in_bf16_and_never_holds_fp32_logits():
    """Every head matmul (a vocab-sized operand or result) gets bf16 operands, and no fp32 tensor is larger than
    one chunk's logits or the head-weight gradient, both far below the full (N, V) logits."""
    n_tokens, dim, vocab, chunk = 96, 32, 512, 40
    hidden, weight, targets = _head_problem("cpu", n_tokens, dim, vocab)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    recorder = _Recorder()
    with torch.autocast("cpu", dtype=torch.bfloat16), recorder:
        loss = linear_cross_entropy(h, w, targets, chunk_tokens=chunk)
    loss.backward()
    matmuls = [op for op in recorder.ops if op[0].split(".")[0] in ("mm", "addmm", "bmm")]
    assert len(matmuls) == 3 * 3  # logits, hidden gradient, weight gradient for each of 3 chunks
    assert all(dtypes[-2:] == [torch.bfloat16] * 2 for _, dtypes, _ in matmuls), matmuls
    fp32_sizes = [numel for _, _, outs in recorder.ops for dtype, numel in outs if dtype == torch.float32]
    assert max(fp32_sizes) <= max(chunk * vocab, vocab * dim) < n_tokens * vocab


# make gpu-check

def _script(tmp_path, **env):
    run_env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "gpu_check"), **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=run_env, capture_output=True, text=True,
                          timeout=120)


def test_gpu_check_stops_with_one_line_without_a_cuda_device(tmp_path):
    proc = _script(tmp_path, CUDA_VISIBLE_DEVICES="")  # no device visible, on any machine
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA device visible" in proc.stderr, proc.stderr
    assert not (tmp_path / "gpu_check").exists()
    bad = _script(tmp_path, GPU_CHECK_DRY="yes")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "gpu-check: Invalid GPU_CHECK_DRY=yes; allowed: 0 (run) or 1 (print the commands)"


def _dry_run_commands(tmp_path) -> dict[str, list[str]]:
    proc = _script(tmp_path, GPU_CHECK_DRY="1")
    assert proc.returncode == 0, proc.stderr
    commands = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    return {name: shlex.split(cmd) for name, cmd in commands.items()}


def test_gpu_check_dry_run_commands_parse(tmp_path):
    """GPU_CHECK_DRY=1 prints the steps; each benchmark's arguments parse, the train arms and sizes exist, every
    job of the sweep composes and validates, and the launcher is gpu_pool with 2 jobs on device 0."""
    import importlib

    from kimi_lab.bench import train as bench_train

    commands = _dry_run_commands(tmp_path)
    assert list(commands) == ["data", "pytest_gpu", "attention", "moe", "train", "sweep", "summary"]
    assert commands["pytest_gpu"][1:5] == ["-m", "pytest", "-m", "gpu"]
    for name in ("attention", "moe", "train"):
        cmd = commands[name]
        assert cmd[1:4] == ["-m", "kimi_lab.bench", name]
        args = importlib.import_module(f"kimi_lab.bench.{name}")._parse(cmd[4:])  # argparse exits on a bad one
    assert set(args.arms) <= {*bench_train.ARMS, *bench_train.GPU_ARMS}
    assert all((CONF_DIR / "model" / f"{size}.yaml").exists() or size in bench_train.GPU_SIZES for size in args.sizes)
    assert commands["summary"][1:3] == ["-m", "kimi_lab.bench._gpu_check"]
    sweep = commands["sweep"]
    assert sweep[1:3] == ["train.py", "-m"]
    overrides = [o for o in sweep[3:] if not o.startswith("hydra.sweep.dir=")]
    (axis,) = [o for o in overrides if "," in o.split("=", 1)[1] and not o.startswith("hydra.launcher.devices")]
    key, values = axis.split("=", 1)
    for value in values.split(","):
        job = [o for o in overrides if o != axis] + [f"{key}={value}", f"paths.data_dir={DATA_DIR}"]
        cfg = _compose_with_hydra(job)
        validate_config(cfg)
        assert cfg.hydra.launcher._target_.endswith("GpuPoolLauncher")
        assert (list(cfg.hydra.launcher.devices), cfg.hydra.launcher.jobs_per_device) == ([0], 2)
        assert cfg.hardware.accelerator.value == "gpu" and cfg.hardware.tf32


def _compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


def _train_report() -> dict:
    row = {"step_time_ms": 30.0, "achieved_tflops": 90.0, "mfu": 0.12, "peak_mem_mb": 3000.0,
           "optimizer_step_share": 0.05, "flops_per_token": 160_000_000}
    rows = [{**row, "size": "base", "arm": "default", "tokens_per_s": 4000.0},
            {**row, "size": "base", "arm": "moe=dense", "tokens_per_s": 4200.0}]
    return {"date": "2026-11-25T10:00:00+00:00", "device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "threads": 16,
            "dtype": "bf16-mixed", "matmul_peak_tflops": 750.0, "matmul_peaks_tflops": [750.0],
            "flops_formula": "6 * N + attention", "rows": rows, "loader_tokens_per_s_by_size": {"base": 2e7}}


def _fake_gpu_check_folder(out):
    """A gpu-check folder: the attention and MoE CSVs from the real benchmarks (CPU, tiny sizes; MoE under bf16
    autocast), the other pieces written as the script and its commands write them."""
    from kimi_lab.bench import attention, moe
    from kimi_lab.bench._train_report import markdown

    (out / "train").mkdir(parents=True)
    (out / "steps.tsv").write_text("step\trc\tseconds\tlimit_s\ndata\t0\t2\t30\npytest_gpu\t1\t40\t90\n"
                                   "sweep\t124\t120\t120\n")
    (out / "environment.txt").write_text("Tue Nov 25 nvidia-smi table\ntorch 2.13.0 cuda 12.8 device NVIDIA H100\n")
    (out / "pytest_gpu.xml").write_text(
        '<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="0" tests="2">'
        '<testcase classname="tests.model.test_gpu" name="test_a"/>'
        '<testcase classname="tests.model.test_gpu" name="test_b">'
        '<failure message="boom"/></testcase></testsuite></testsuites>')
    assert attention.main(["--seq-lens", "64", "--batch", "1", "--heads", "2", "--head-dim", "16", "--repeats", "1",
                           "--options", "sdpa", "--device", "cpu", "--out", str(out / "attention")]) == 0
    assert moe.main(["--sizes", "small", "--batch", "2", "--seq-len", "32", "--d-model", "64", "--repeats", "1",
                     "--warmup", "0", "--device", "cpu", "--dtype", "bfloat16", "--out", str(out / "moe.csv")]) == 0
    report = _train_report()
    (out / "train" / "2026-11-25-nvidia-h100.json").write_text(json.dumps(report))
    (out / "train" / "2026-11-25-nvidia-h100.md").write_text(markdown(report))
    for job, (seed, rate) in enumerate([(1, 3000.0), (2, 2800.0)]):
        (out / "sweep" / str(job)).mkdir(parents=True)
        (out / "sweep" / str(job) / "results.json").write_text(json.dumps({
            "status": "completed", "seed": seed, "steps": 300, "tokens_per_s": rate, "step_time_ms": 4.1,
            "peak_mem_mb": 2500.0, "val_loss": 6.5, "host": {"cuda_visible_devices": "0"}}))
    (out / "sweep" / "nvidia_smi.csv").write_text(
        "2026/11/25 10:00:00.000, 70, 6000, 81559\n2026/11/25 10:00:00.500, 90, 10000, 81559\n2026/11/25 10:00:01")


def test_gpu_check_summary_tables_checks_and_packing(tmp_path):
    from kimi_lab.bench._gpu_check import main

    out = tmp_path / "gpu_check"
    _fake_gpu_check_folder(out)
    assert main([str(out)]) == 0
    summary = (out / "summary.md").read_text()
    assert "torch 2.13.0 cuda 12.8 device NVIDIA H100" in summary
    assert "162 s of the 240 s their limits allow" in summary and "| sweep | failed (exit 124) | 120 | 120 |" in summary
    assert "2 tests: 1 failed" in summary and "- failed: `tests.model.test_gpu::test_b`" in summary
    assert "| sdpa | `sdpa_" in summary and "no row (not run or refused)" in summary  # fp32, head dim 16: no check
    assert "| small | 8 / 2 | 64 |" in summary and "cpu, bfloat16" in summary
    assert "| base | `default` |" in summary  # the train report's own table
    assert "| 1 | 2 | 0 | completed | 300 | 2,800 |" in summary
    assert "5,800 tokens/s summed over 2 jobs vs 4,000 for one job alone" in summary and "1.45x" in summary
    assert "GPU busy 80 % on average" in summary and "5,000 MiB per job" in summary
    assert "up to 14 such jobs per device" in summary  # floor(0.9 * 81,559 / 5,000)
    assert (out / "gpu_check.png").stat().st_size > 0
