"""Entry point: compose the config with Hydra and call ``kimi_lab.train(cfg)``.

    python train.py attention=standard norm=layernorm seed=3 trainer.max_steps=50
    python train.py -m seed=1,2,3 moe=greedy,dense
    python train.py -m seed=1,2,3 moe=greedy,dense dry_run=true   # check and price every job, train nothing
"""

import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kimi_lab.config import ConfigError, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | dict | None:
    if cfg.dry_run:  # the dry-run callback (conf/hydra/default.yaml) keeps folders out and prints the totals
        from kimi_lab.training.preflight import preflight_job

        return preflight_job(cfg)
    from kimi_lab.training import train  # heavy imports (torch, lightning) only when training

    try:
        results = train(cfg)
    except ConfigError as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records the failed job and the sweep goes on
        logging.shutdown()
        _remove_if_only_startup_files(Path(HydraConfig.get().runtime.output_dir))
        print(f"error: {error}", file=sys.stderr)  # one line, no traceback: the config is wrong, not the code
        sys.exit(2)
    return results.get("val_loss")  # the value a sweeper minimises


def _remove_if_only_startup_files(run_dir: Path) -> None:
    """A single run refused for its config leaves no folder behind when the folder holds only what the start wrote
    (Hydra's .hydra/ and log, status.json); a folder with checkpoints or results (a resume) is kept."""
    startup = {".hydra", "status.json", "train.log", f"{HydraConfig.get().job.name}.log"}
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= startup:
        shutil.rmtree(run_dir)


if __name__ == "__main__":
    main()
