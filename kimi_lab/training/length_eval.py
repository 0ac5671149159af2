"""Length generalisation: val loss of the final weights at several multiples of the training length.

Every length scores the same token budget (``data.val_tokens`` rounded down to a multiple of the longest
length): budget / longest blocks of the longest length spread evenly over the val split (validation's rule, see
kimi_lab.data.datamodule.eval_window_starts, at that length), each tiled by non-overlapping windows of every length.
A length that divides the longest therefore scores exactly the same targets, so the numbers differ only by context
length (and by RoPE's behaviour past the training length: the RoPE study's extrapolation curve). The 1x windows are
validation's own only when the longest length is seq_len: validation spreads single seq_len windows.
Each length runs the model's RoPE as configured; with ``rope.scaling.dynamic_factor`` linear and YaRN take factor
length / original length there (the RoPE study's training-free extension of a checkpoint: ``trainer.max_steps=0``
with ``init_from``), recorded per length in ``rope_factor_at_len``.
Under DDP each process scores every world_size-th window from its rank and the NLL and token sums are added over
processes (every process calls it): the same loss as one process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_lab.config.validate import ConfigError


def eval_lengths(data_cfg) -> list[int]:
    """Sorted distinct lengths data.eval_lengths x data.seq_len."""
    return sorted({round(m * data_cfg.seq_len) for m in data_cfg.eval_lengths})


def token_budget(data_cfg, n_val_tokens: int) -> int:
    """Tokens scored at every length; a clear error when the val split cannot give them at the longest length."""
    longest = eval_lengths(data_cfg)[-1]
    budget = (data_cfg.val_tokens // longest) * longest
    if budget < longest or n_val_tokens - 1 < budget:
        raise ConfigError(
            f"Invalid config: data.eval_lengths={list(data_cfg.eval_lengths)}; allowed: lengths whose longest "
            f"({longest}) fits data.val_tokens={data_cfg.val_tokens} and the val split ({n_val_tokens} tokens; "
            f"needs {max(budget, longest) + 1}): lower data.eval_lengths or data.val_tokens")
    return budget


def length_windows(datamodule, data_cfg) -> dict:
    """{length: its val EvalWindows}: the same spread blocks of the longest length, tiled at each length."""
    budget = token_budget(data_cfg, datamodule.n_tokens("val"))
    lengths = eval_lengths(data_cfg)
    return {length: datamodule.eval_windows("val", length, budget, block=lengths[-1]) for length in lengths}


@torch.no_grad()
def val_loss_at_lengths(module, trainer, datamodule, data_cfg) -> dict:
    """{"val_loss_at_len": {str(L): mean NLL}, "val_tokens_at_len": {str(L): tokens scored}} on the val split, and
    the RoPE scaling each length ran with: "rope_factor_at_len" (1 for plain RoPE; L / original length under
    ``rope.scaling.dynamic_factor``) and "rope_attention_scaling_at_len" (the YaRN mscale on cos/sin)."""
    windows_at = length_windows(datamodule, data_cfg)  # fails before moving the model when the split is short
    model = module.model.to(trainer.strategy.root_device)  # Lightning's teardown left it on the CPU
    was_training = model.training
    model.eval()
    tokens_per_batch = data_cfg.batch_size * data_cfg.seq_len  # as in training
    losses, counts, factors, mscales = {}, {}, {}, {}
    for length, windows in windows_at.items():
        batch_size = max(1, tokens_per_batch // length)
        # by hand, not Lightning's UnrepeatedDistributedSampler: a process may get no window here (one block of the
        # longest length), which that sampler refuses; the sums below need no batch from every process
        mine = range(trainer.global_rank, len(windows), trainer.world_size)
        nll, n = 0.0, 0
        for start in range(0, len(mine), batch_size):
            x, y = (torch.stack(t).to(trainer.strategy.root_device)
                    for t in zip(*(windows[i] for i in mine[start:start + batch_size])))
            with trainer.precision_plugin.forward_context():
                logits = model(x).logits.float()  # (b, L, V)
            nll += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            n += y.numel()
        nll, n = _summed_over_processes(trainer, nll, n)
        losses[str(length)], counts[str(length)] = nll / n, n
        factors[str(length)] = model.rotary.applied_factor
        mscales[str(length)] = model.rotary.attention_scaling
    model.rotary(data_cfg.seq_len)  # back to the training length's table (results.json's rope_* read it)
    model.train(was_training)
    return {"val_loss_at_len": losses, "val_tokens_at_len": counts, "rope_factor_at_len": factors,
            "rope_attention_scaling_at_len": mscales}


def _summed_over_processes(trainer, nll: float, n: int) -> tuple[float, int]:
    """(NLL, tokens) summed over the DDP processes (float64: exact for one process, which returns them as they are)."""
    sums = torch.tensor([nll, float(n)], dtype=torch.float64, device=trainer.strategy.root_device)
    sums = trainer.strategy.reduce(sums, reduce_op="sum")
    return sums[0].item(), int(sums[1].item())
