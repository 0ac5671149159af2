"""Entry point: compose the config with Hydra and call ``kimi_lab.train(cfg)``.

    python train.py attention=standard norm=layernorm seed=3 trainer.max_steps=50
    python train.py -m seed=1,2,3 moe=greedy,dense
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kimi_lab.config import ConfigError, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from kimi_lab.training import train  # heavy imports (torch, lightning) only when training

    try:
        results = train(cfg)
    except ConfigError as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records the failed job and the sweep goes on
        logging.shutdown()
        print(f"error: {error}", file=sys.stderr)  # one line, no traceback: the config is wrong, not the code
        sys.exit(2)
    return results.get("val_loss")  # the value a sweeper minimises


if __name__ == "__main__":
    main()
