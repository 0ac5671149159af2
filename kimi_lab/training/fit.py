"""One job's training: build the data, model and trainer, fit, evaluate the final weights, and return the results
(rank zero) or a short dict (the other DDP processes)."""

from __future__ import annotations

import dataclasses
import logging

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from kimi_lab.bench._norm_profile import profile_norms
from kimi_lab.data import LMDataModule
from kimi_lab.data.tokenizer import check_model_vocab
from kimi_lab.evaluation import evaluate_model, load_task
from kimi_lab.training import malloc
from kimi_lab.training.callbacks import RunStopped
from kimi_lab.training.init_weights import load_model_weights
from kimi_lab.training.length_eval import token_budget, val_loss_at_lengths
from kimi_lab.training.lifecycle import overrides, steps_and_tokens, without_run_control
from kimi_lab.training.module import LanguageModelModule
from kimi_lab.training.precision import matmul_precision
from kimi_lab.training.results import RunOutcome, run_results
from kimi_lab.training.rundir import PeakRSS, RunDir
from kimi_lab.training.trainer import RunCallbacks, build_trainer

log = logging.getLogger(__name__)

HPARAM_METRICS = ("val_loss", "val_ppl", "val_acc", "test_loss", "best_val_loss", "tokens_per_s", "peak_mem_mb",
                  "train_time_s", "moe_maxvio_val")


def fit_and_evaluate(cfg: DictConfig, run: RunDir, ckpt_path: str | None) -> dict:
    """Train and evaluate under the job's thread count, allocator and matmul precision (restored afterwards)."""
    threads_before = torch.get_num_threads()  # sweep jobs share a process: never leak a job's setting
    if cfg.hardware.num_threads is not None:
        torch.set_num_threads(cfg.hardware.num_threads)
    try:
        with (malloc.retained(cfg.hardware.malloc_retain and cfg.hardware.accelerator == "cpu"),
              matmul_precision(cfg)):  # TF32 under hardware.tf32 on CUDA, before the model is built
            return _run_trainer(cfg, run, ckpt_path)
    finally:
        torch.set_num_threads(threads_before)


def _run_trainer(cfg: DictConfig, run: RunDir, ckpt_path: str | None) -> dict:
    trainer, callbacks = build_trainer(cfg, run)
    run.rank = trainer.global_rank  # the strategy's ranks (launcher_rank read the environment before they existed)
    # each process on its own device before any CUDA work: Lightning's call, which fit would make only later
    trainer.strategy.accelerator.setup_device(trainer.strategy.root_device)
    max_steps, tokens_per_step = steps_and_tokens(cfg, trainer.world_size)
    datamodule = _datamodule(cfg, trainer, max_steps)
    if trainer.is_global_zero:
        _prepare_downstream(cfg)  # fail before training when the benchmark files are missing

    L.seed_everything(cfg.seed, workers=True, verbose=False)  # seed 0 is a valid seed
    rss = PeakRSS()  # CPU memory counts from here: the model, optimizer and activations, not the data pipeline
    module = LanguageModelModule(cfg, max_steps=max_steps)
    if cfg.init_from is not None and ckpt_path is None:  # a resume restores its own weights
        log.info("weights from %s", load_model_weights(module.model, cfg.init_from))
    # the kernel planned on the configured device (raises now if attention=flash cannot run there); results.json
    # records the one the training forwards actually ran
    kernel = module.model.attention_kernel("cuda" if cfg.hardware.accelerator == "gpu" else "cpu")
    norm_profile = {}
    if trainer.is_global_zero:  # results.json's: on rank zero's own device
        norm_profile = profile_norms(module.model, cfg.data.batch_size, cfg.data.seq_len,
                                     trainer.strategy.root_device)
        log.info("attention kernel: %s | %s steps x %s tokens | output: %s", kernel, max_steps, tokens_per_step,
                 run.path)
    trainer.fit_loop.epoch_loop.max_steps = max_steps  # token budget known only once world_size is
    outcome = RunOutcome(cfg, run, module, callbacks, datamodule, kernel, rss, norm_profile, overrides())

    with rss:
        callbacks.memory.rss = rss  # samples during training batches only
        try:
            _fit(trainer, module, datamodule, ckpt_path, callbacks)
        except RunStopped as stop:  # interrupted (continue with resume=true) or diverged
            if not trainer.is_global_zero:
                return {**_other_process_results(trainer, callbacks, stop.status), **stop.extra}
            _log_stop(stop, run, callbacks)
            return {**run_results(dataclasses.replace(outcome, status=stop.status)), **stop.extra}
        if callbacks.last_ckpt is not None:  # trainer.save_checkpoints last or best
            trainer.save_checkpoint(callbacks.last_ckpt, weights_only=False)
        test_metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        length_metrics = _length_generalisation(cfg, module, trainer, datamodule)  # every process: summed over them
    if not trainer.is_global_zero:  # no collective follows: the others end here, rank zero goes on alone
        return _other_process_results(trainer, callbacks, "completed")
    results = run_results(outcome)
    results.update({k: float(v) for k, v in test_metrics.items()})
    results.update(length_metrics)
    results.update(_downstream(cfg, module, trainer))  # after PeakRSS: peak_mem_mb stays the training peak
    _log_hparams(trainer, cfg, results)
    return results


def _datamodule(cfg: DictConfig, trainer: L.Trainer, max_steps: int) -> LMDataModule:
    """The data module, its cache opened (built when missing, under a file lock) and checked before training: the
    tokenizer against the model's vocabulary, eval windows for every process, the length eval's val budget."""
    samples_per_step = cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * trainer.world_size
    datamodule = LMDataModule(cfg.data, cache_dir=cfg.paths.data_dir, seed=cfg.seed,
                              num_train_samples=max(max_steps, 1) * samples_per_step)  # 0 steps: evaluation only
    check_model_vocab(cfg.model.vocab_size, datamodule.tokenizer)  # before the cache is opened or built
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.check_eval_shards(trainer.world_size)
    if cfg.data.eval_lengths:  # fail before training, not after it, when the val split is too short
        token_budget(cfg.data, datamodule.n_tokens("val"))
    return datamodule


def _fit(trainer: L.Trainer, module, datamodule, ckpt_path: str | None, callbacks: RunCallbacks) -> None:
    """Train, then validate the final step when the schedule did not (BestCheckpoint sees that validation too)."""
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if not callbacks.metrics.val_history or callbacks.metrics.val_history[-1]["step"] != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)


def _log_stop(stop: RunStopped, run: RunDir, callbacks: RunCallbacks) -> None:
    if stop.status != "interrupted":
        log.warning("%s: %s: run folder %s", stop.status, stop, run.path)
    elif callbacks.last_ckpt is None:
        log.warning("%s: %s; no checkpoint to continue from (trainer.save_checkpoints=none): run folder %s",
                    stop.status, stop, run.path)
    else:
        command = " ".join([*without_run_control(overrides()), "resume=true", f"hydra.run.dir={run.path}"])
        log.warning("%s: %s; continue with: python train.py %s", stop.status, stop, command)


def _other_process_results(trainer: L.Trainer, callbacks: RunCallbacks, status: str) -> dict:
    """What a DDP process other than rank zero returns: the reduced final val_loss, nothing written."""
    vals = callbacks.metrics.val_history
    return {"status": status, "global_rank": trainer.global_rank, "val_loss": vals[-1]["val_loss"] if vals else None}


def _log_hparams(trainer: L.Trainer, cfg: DictConfig, results: dict) -> None:
    """TensorBoard HParams: the resolved config (flattened by Lightning) with the run's final metrics as hp/*,
    so the HParams tab of a sweep folder compares its jobs."""
    metrics = {f"hp/{k}": float(results[k]) for k in HPARAM_METRICS if isinstance(results.get(k), (int, float))}
    metrics |= {f"hp/downstream/{task}/{k}": float(v) for task, scores in results.get("downstream", {}).items()
                for k, v in scores.items() if k in ("acc", "acc_norm", "ppl")}
    params = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics)
            logger.finalize("success")


def _length_generalisation(cfg: DictConfig, module, trainer: L.Trainer, datamodule) -> dict:
    if not cfg.data.eval_lengths:
        return {}
    return val_loss_at_lengths(module, trainer, datamodule, cfg.data)


def _prepare_downstream(cfg: DictConfig) -> None:
    if cfg.eval.name == "downstream":
        for task in cfg.eval.tasks:
            load_task(task, cfg.paths.data_dir, cfg.eval.limit)  # builds the item cache once


def _downstream(cfg: DictConfig, module, trainer: L.Trainer) -> dict:
    """eval=downstream: zero-shot benchmarks on the final weights (the ones test_loss scores) -> {"downstream": ...}."""
    if cfg.eval.name != "downstream":
        return {}
    device = trainer.strategy.root_device
    model = module.model.to(device)  # Lightning's teardown left it on the CPU
    return {"downstream": evaluate_model(model, cfg.eval, cfg.data, cfg.paths.data_dir, device=device,
                                         forward_context=trainer.precision_plugin.forward_context)}
