"""Downstream zero-shot evaluation (``eval=downstream``): HellaSwag, PIQA, ARC-Easy/Challenge by log-likelihood
multiple choice (acc, acc_norm), LAMBADA last-word accuracy and perplexity. ``python -m kimi_lab.evaluation RUN_DIR``
scores an existing run folder's checkpoint."""

from kimi_lab.evaluation.runner import evaluate, evaluate_model, score_items, transformer_scorer
from kimi_lab.evaluation.scoring import (Request, Scorer, encode_pair, from_logits, last_word_metrics,
                                         loglikelihoods, model_inputs, multiple_choice_metrics)
from kimi_lab.evaluation.tasks import INSTALL_COMMAND, Item, load_task, parse_task, source_root

__all__ = ["INSTALL_COMMAND", "Item", "Request", "Scorer", "encode_pair", "evaluate", "evaluate_model",
           "from_logits", "last_word_metrics", "load_task", "loglikelihoods", "model_inputs",
           "multiple_choice_metrics", "parse_task", "score_items", "source_root", "transformer_scorer"]
