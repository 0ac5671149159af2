"""``train(cfg) -> dict``: validate, build data/model/trainer, fit, evaluate, write the run folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kimi_lab.config import ConfigError, validate_config
from kimi_lab.config.validate import check_resume_policy
from kimi_lab.training.resume import check_resume_config, resume_checkpoint
from kimi_lab.training.rundir import RunDir, git_commit, launcher_rank

log = logging.getLogger(__name__)


def resolve_output_dir(cfg: DictConfig) -> Path:
    """``paths.output_dir`` (Hydra's job folder by default; tests pass their own)."""
    return Path(str(cfg.paths.output_dir))


def train(cfg: DictConfig) -> dict:
    """Run one training job; always leaves status.json saying completed, diverged, interrupted or failed (a diverged
    run returns normally, so a sweep goes on). Under DDP every process runs it; only global rank zero writes the run
    folder and runs the single-process evaluations (the others return a short dict once the last collective ends)."""
    run = RunDir(resolve_output_dir(cfg), rank=launcher_rank())
    if cfg.sweep.skip_completed:
        previous = _finished_results(run)
        if previous is not None and _same_job(previous):
            log.info("skipping: %s already holds a completed run of these overrides (sweep.skip_completed)", run.path)
            return previous
        if previous is not None:  # job folders are numbered by grid position: another grid lands on finished runs
            raise ConfigError(
                f"Invalid config: sweep.skip_completed=true; {run.path} holds a finished run of other overrides "
                f"({_listed(previous.get('overrides', []))}), this job is ({_listed(_overrides())}); allowed: "
                "relaunch the sweep's own command (same grid, same order) or another hydra.sweep.dir (its results "
                "are untouched; Hydra rewrote its .hydra/ files, the report identifies it by results.json)")
    ckpt_path = _resume_point(cfg, run)  # before anything in the folder is written
    commit = git_commit() if run.writes else None  # the code the job starts with, not what the tree holds at its end
    run.write_status("running", pid=os.getpid(), git_commit=commit)
    try:
        validate_config(cfg)
        _check_device(cfg)
        run.write_config(cfg)
        results = {**_fit_and_evaluate(cfg, run, ckpt_path), "git_commit": commit}
        run.write_results(results)
        run.write_status(results["status"], **{k: results[k] for k in ("diverged_at_step",) if k in results})
    except BaseException as error:  # KeyboardInterrupt too: the folder must say it did not complete
        run.write_failure(error)
        if not isinstance(error, ConfigError):  # a refused config is reported in one line by the caller
            log.error("run failed: %s: %s (details in %s)", type(error).__name__, error, run.status_json)
        _release_frames(error)
        raise
    if run.writes:
        log.info("%s: results in %s", results["status"], run.path)
    else:
        log.info("%s: rank %d wrote nothing; rank zero writes %s", results["status"], run.rank, run.path)
    return results


def _check_device(cfg: DictConfig) -> None:
    """hardware=gpu/ddp on a machine without CUDA: one line naming the key (Lightning's own error is a traceback)."""
    import torch

    if _value(cfg.hardware.accelerator) == "gpu" and not torch.cuda.is_available():
        raise ConfigError(f"Invalid config: hardware.accelerator=gpu (hardware={cfg.hardware.name}); allowed: cpu on "
                          "this machine, torch sees no CUDA device (hardware=cpu)")


def _resume_point(cfg: DictConfig, run: RunDir) -> str | None:
    """The checkpoint a resume continues from, checked before the folder is touched: a wrong resume command (other
    overrides, a finished run) leaves the run's status, results and config as they were. Only a folder with no run
    record (no results.json) gets status failed, as any job that fails."""
    try:
        check_resume_policy(cfg)  # resume=true with trainer.save_checkpoints=none: the cause, not "no last.ckpt"
        previous = _finished_results(run)
        if cfg.resume and cfg.ckpt_path is None and previous is not None:
            raise ConfigError(f"Invalid config: resume=true; {run.path} holds a {previous['status']} run, nothing to "
                              "resume; allowed: resume=true on an interrupted or failed run's folder (the finished "
                              "run's record is kept)")
        ckpt_path = resume_checkpoint(cfg, run.path)
        if ckpt_path is not None:
            check_resume_config(cfg, ckpt_path)  # before config_resolved.yaml is rewritten with other values
        return ckpt_path
    except BaseException as error:
        if not run.results_json.exists():
            run.write_failure(error)
        raise


def _release_frames(error: BaseException) -> None:
    """A sweep keeps a failed job's exception (Hydra's JobReturn) until it ends: clear its frames' locals, so the
    model, optimizer and activations they hold do not stay in (GPU) memory under the jobs that follow."""
    import gc
    import traceback

    traceback.clear_frames(error.__traceback__)
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


FINISHED = ("completed", "diverged")  # outcomes sweep.skip_completed keeps; failed and interrupted jobs run again


def _finished_results(run: RunDir) -> dict | None:
    """The folder's results.json if it records a finished run (completed, or diverged: deterministic, it would
    diverge again)."""
    import json

    if not run.results_json.exists() or not run.status_json.exists():
        return None
    try:
        status = json.loads(run.status_json.read_text())["status"]
        previous = json.loads(run.results_json.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return previous if isinstance(previous, dict) and status in FINISHED and previous.get("status") == status else None


def _listed(overrides: list[str]) -> str:
    return " ".join(_without_run_control(overrides)) or "no overrides"


def _same_job(previous: dict) -> bool:
    """Whether a finished run had this job's overrides (run-control ones such as sweep.skip_completed aside)."""
    return _without_run_control(previous.get("overrides", [])) == _without_run_control(_overrides())


def _without_run_control(overrides: list[str]) -> list[str]:
    """The overrides that say what a job trains (sweep.skip_completed, resume=true, ... dropped)."""
    from kimi_lab.config.schema import RUN_CONTROL_KEYS, override_key

    return [o for o in overrides if override_key(o) not in RUN_CONTROL_KEYS]


def steps_and_tokens(cfg: DictConfig, world_size: int) -> tuple[int, int]:
    """(max optimizer steps, tokens per optimizer step); a token budget overrides max_steps."""
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.trainer.accumulate_grad_batches * world_size
    if cfg.trainer.max_tokens is None:
        return int(cfg.trainer.max_steps), tokens_per_step
    max_steps = int(cfg.trainer.max_tokens) // tokens_per_step
    if max_steps < 1:
        raise ConfigError(f"Invalid config: trainer.max_tokens={cfg.trainer.max_tokens}; allowed: >= one step "
                          f"of {tokens_per_step} tokens (batch_size * seq_len * accumulate * devices)")
    return max_steps, tokens_per_step


def _fit_and_evaluate(cfg: DictConfig, run: RunDir, ckpt_path: str | None) -> dict:
    import torch

    from kimi_lab.training import malloc
    from kimi_lab.training.precision import matmul_precision

    threads_before = torch.get_num_threads()  # sweep jobs share a process: never leak a job's setting
    if cfg.hardware.num_threads is not None:
        torch.set_num_threads(int(cfg.hardware.num_threads))
    try:
        with (malloc.retained(bool(cfg.hardware.malloc_retain) and _value(cfg.hardware.accelerator) == "cpu"),
              matmul_precision(cfg)):  # TF32 under hardware.tf32 on CUDA, before the model is built
            return _run_trainer(cfg, run, ckpt_path)
    finally:
        torch.set_num_threads(threads_before)


def _run_trainer(cfg: DictConfig, run: RunDir, ckpt_path: str | None) -> dict:
    import lightning as L

    from kimi_lab.training.trainer import build_trainer

    trainer, callbacks = build_trainer(cfg, run)
    run.rank = trainer.global_rank  # the strategy's ranks (launcher_rank read the environment before they existed)
    # each process on its own device before any CUDA work: Lightning's call, which fit would make only later
    trainer.strategy.accelerator.setup_device(trainer.strategy.root_device)
    max_steps, tokens_per_step = steps_and_tokens(cfg, trainer.world_size)
    datamodule = _datamodule(cfg, trainer, max_steps)
    if trainer.is_global_zero:
        _prepare_downstream(cfg)  # fail before training when the benchmark files are missing

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # seed 0 is a valid seed
    from kimi_lab.training.module import LanguageModelModule
    from kimi_lab.training.rundir import PeakRSS

    rss = PeakRSS()  # CPU memory counts from here: the model, optimizer and activations, not the data pipeline
    module = LanguageModelModule(cfg, max_steps=max_steps)
    if cfg.init_from is not None and ckpt_path is None:  # a resume restores its own weights
        from kimi_lab.training.init_weights import load_model_weights

        log.info("weights from %s", load_model_weights(module.model, cfg.init_from))
    # the kernel planned on the configured device (raises now if attention=flash cannot run there); results.json
    # records the one the training forwards actually ran
    kernel = module.model.attention_kernel("cuda" if _value(cfg.hardware.accelerator) == "gpu" else "cpu")
    norm_profile = {}
    if trainer.is_global_zero:  # results.json's: on rank zero's own device
        norm_profile = _profile_norms(cfg, module.model, trainer.strategy.root_device)
        log.info("attention kernel: %s | %s steps x %s tokens | output: %s", kernel, max_steps, tokens_per_step,
                 run.path)
    trainer.fit_loop.epoch_loop.max_steps = max_steps  # token budget known only once world_size is

    from kimi_lab.training.callbacks import RunStopped
    from kimi_lab.training.results import run_results

    with rss:
        callbacks.memory.rss = rss  # samples during training batches only
        try:
            _fit(trainer, module, datamodule, ckpt_path, callbacks)
        except RunStopped as stop:  # interrupted (continue with resume=true) or diverged
            if not trainer.is_global_zero:
                return {**_other_process_results(trainer, callbacks, stop.status), **stop.extra}
            _log_stop(stop, run, callbacks)
            return {**run_results(cfg, run, module, callbacks, datamodule, kernel, rss, norm_profile, stop.status,
                                  _overrides()),
                    **stop.extra}
        if callbacks.last_ckpt is not None:  # trainer.save_checkpoints last or best
            trainer.save_checkpoint(callbacks.last_ckpt, weights_only=False)
        test_metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        length_metrics = _length_generalisation(cfg, module, trainer, datamodule)  # every process: summed over them
    if not trainer.is_global_zero:  # no collective follows: the others end here, rank zero goes on alone
        return _other_process_results(trainer, callbacks, "completed")
    results = run_results(cfg, run, module, callbacks, datamodule, kernel, rss, norm_profile, "completed", _overrides())
    results.update({k: float(v) for k, v in test_metrics.items()})
    results.update(length_metrics)
    results.update(_downstream(cfg, module, trainer))  # after PeakRSS: peak_mem_mb stays the training peak
    _log_hparams(trainer, cfg, results)
    return results


def _datamodule(cfg: DictConfig, trainer, max_steps: int):
    """The data module, its cache opened (built when missing, under a file lock) and checked before training: the
    tokenizer against the model's vocabulary, eval windows for every process, the length eval's val budget."""
    from kimi_lab.data import LMDataModule
    from kimi_lab.data.tokenizer import check_model_vocab

    samples_per_step = cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * trainer.world_size
    datamodule = LMDataModule(cfg.data, cache_dir=str(cfg.paths.data_dir), seed=int(cfg.seed),
                              num_train_samples=max(max_steps, 1) * samples_per_step)  # 0 steps: evaluation only
    check_model_vocab(int(cfg.model.vocab_size), datamodule.tokenizer)  # before the cache is opened or built
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.check_eval_shards(trainer.world_size)
    if cfg.data.eval_lengths:  # fail before training, not after it, when the val split is too short
        from kimi_lab.training.length_eval import token_budget

        token_budget(cfg.data, datamodule.n_tokens("val"))
    return datamodule


def _log_stop(stop, run: RunDir, callbacks) -> None:
    if stop.status != "interrupted":
        log.warning("%s: %s: run folder %s", stop.status, stop, run.path)
    elif callbacks.last_ckpt is None:
        log.warning("%s: %s; no checkpoint to continue from (trainer.save_checkpoints=none): run folder %s",
                    stop.status, stop, run.path)
    else:
        command = " ".join([*_without_run_control(_overrides()), "resume=true", f"hydra.run.dir={run.path}"])
        log.warning("%s: %s; continue with: python train.py %s", stop.status, stop, command)


def _other_process_results(trainer, callbacks, status: str) -> dict:
    """What a DDP process other than rank zero returns: the reduced final val_loss, nothing written."""
    vals = callbacks.metrics.val_history
    return {"status": status, "global_rank": trainer.global_rank, "val_loss": vals[-1]["val_loss"] if vals else None}


def _fit(trainer, module, datamodule, ckpt_path: str | None, callbacks) -> None:
    """Train, then validate the final step when the schedule did not (BestCheckpoint sees that validation too)."""
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if not callbacks.metrics.val_history or callbacks.metrics.val_history[-1]["step"] != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)


HPARAM_METRICS = ("val_loss", "val_ppl", "val_acc", "test_loss", "best_val_loss", "tokens_per_s", "peak_mem_mb",
                  "train_time_s", "moe_maxvio_val")


def _log_hparams(trainer, cfg: DictConfig, results: dict) -> None:
    """TensorBoard HParams: the resolved config (flattened by Lightning) with the run's final metrics as hp/*,
    so the HParams tab of a sweep folder compares its jobs."""
    from lightning.pytorch.loggers import TensorBoardLogger

    metrics = {f"hp/{k}": float(results[k]) for k in HPARAM_METRICS if isinstance(results.get(k), (int, float))}
    metrics |= {f"hp/downstream/{task}/{k}": float(v) for task, scores in results.get("downstream", {}).items()
                for k, v in scores.items() if k in ("acc", "acc_norm", "ppl")}
    params = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics)
            logger.finalize("success")


def _length_generalisation(cfg: DictConfig, module, trainer, datamodule) -> dict:
    if not cfg.data.eval_lengths:
        return {}
    from kimi_lab.training.length_eval import val_loss_at_lengths

    return val_loss_at_lengths(module, trainer, datamodule, cfg.data)


def _prepare_downstream(cfg: DictConfig) -> None:
    if _value(cfg.eval.name) == "downstream":
        from kimi_lab.evaluation import load_task

        for task in cfg.eval.tasks:
            load_task(task, str(cfg.paths.data_dir), cfg.eval.limit)  # builds the item cache once


def _downstream(cfg: DictConfig, module, trainer) -> dict:
    """eval=downstream: zero-shot benchmarks on the final weights (the ones test_loss scores) -> {"downstream": ...}."""
    if _value(cfg.eval.name) != "downstream":
        return {}
    from kimi_lab.evaluation import evaluate_model

    device = trainer.strategy.root_device
    model = module.model.to(device)  # Lightning's teardown left it on the CPU
    return {"downstream": evaluate_model(model, cfg.eval, cfg.data, str(cfg.paths.data_dir), device=device,
                                         forward_context=trainer.precision_plugin.forward_context)}


def _profile_norms(cfg: DictConfig, model, device) -> dict:
    """Norm kernel (fused / composite) and fwd+bwd ms of all norm layers at the run's (B, T, D), on this process's
    device (copies: the model itself stays put); read against the training step time in ``_norm_summary``."""
    import copy

    from kimi_lab.model.norm import norm_fwd_bwd_ms, norm_input_shapes, norm_kernel, norm_layers

    shapes = norm_input_shapes(model, int(cfg.data.batch_size), int(cfg.data.seq_len))  # MLA / qk-norms differ
    norms = [copy.deepcopy(m).to(device) for m in norm_layers(model)]
    return {"norm_kernel": norm_kernel(norms[0], device), "norm_fwd_bwd_ms": norm_fwd_bwd_ms(norms, shapes)}


def _value(option):
    return getattr(option, "value", option)


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return []
