"""kimi-lab's Hydra launcher plugin (``hydra/launcher=gpu_pool``); Hydra only loads plugins from ``hydra_plugins``."""
