"""attn_implementation=auto: packed_sdpa where the model takes it, else what transformers accepts for it, with
packing still exact (no token attends across sequences) and shared prompts off."""

import json

import pytest
import torch

import attention
import batching
from conftest import DEMO_MODEL, REPO, read_jsonl, torchrun
from logps import attach_label_logps
from test_packing import logps_and_grads, rows

COMMON = dict(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)


def config(kind):
    import transformers as tf

    if kind == "llama":
        return tf.LlamaConfig(**COMMON)
    if kind == "qwen2":  # a sliding_window in its config that it does not use
        return tf.Qwen2Config(**COMMON, sliding_window=16, use_sliding_window=False)
    if kind == "mistral, window over max_length":
        return tf.MistralConfig(**COMMON, sliding_window=4096)
    if kind == "mistral, window of 24":
        return tf.MistralConfig(**COMMON, sliding_window=24)
    if kind == "gemma2":  # soft-capped attention logits, a sliding window, no sdpa-style attention
        return tf.Gemma2Config(**COMMON, head_dim=8, sliding_window=24)
    raise ValueError(kind)


@pytest.mark.parametrize("kind,want,why", [
    ("llama", "packed_sdpa", ""), ("qwen2", "packed_sdpa", ""), ("mistral, window over max_length", "packed_sdpa", ""),
    ("mistral, window of 24", "sdpa", "sliding window of 24 tokens is shorter than max_length 128"),
    ("gemma2", "eager", "attention logits are soft-capped")])
def test_auto_takes_packed_sdpa_where_the_model_can(kind, want, why):
    name, note = attention.choose("auto", config(kind), max_length=128)
    assert name == want and (why in note if why else note == "")
    assert attention.choose("sdpa", config(kind), 128) == ("sdpa", "")  # a name given is kept
    assert attention.known("auto")


def test_a_window_over_the_row_counts_as_full_attention():
    q = torch.randn(1, 2, 6, 4)
    module = torch.nn.Module()
    module.sliding_window = 6  # no query is 6 tokens past a key of its row: full attention
    out, _ = attention.packed_sdpa(module, q, q, q, None, position_ids=torch.arange(6)[None])
    torch.testing.assert_close(out.transpose(1, 2), torch.nn.functional.scaled_dot_product_attention(
        q, q, q, is_causal=True))
    module.sliding_window = 5
    with pytest.raises(ValueError, match="sliding windows"):
        attention.packed_sdpa(module, q, q, q, None, position_ids=torch.arange(6)[None])


@pytest.mark.parametrize("kind", ["gemma2", "mistral, window of 24"])
def test_packing_stays_exact_under_the_fallback(tmp_path, tokenizer, kind):
    """Packed rows under the fallback attention give the padded rows' log-probs and gradients: no token
    attends across a sequence boundary (and the sliding window still applies within a sequence)."""
    import transformers as tf

    cfg = config(kind)
    name, _ = attention.choose("auto", cfg, max_length=128)
    cfg._attn_implementation = name
    examples = rows(tmp_path, tokenizer)
    assert max(len(r.prompt_ids) + max(map(len, r.responses)) for r in examples) > 24  # longer than the window
    results = {}
    for packed in (False, True):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        attach_label_logps(model, "chunked")
        results[packed] = logps_and_grads(model, batching.collate_preference(examples, tokenizer.pad_token_id, packed))
    (lp_pad, c_pad, g_pad), (lp_packed, c_packed, g_packed) = results[False], results[True]
    assert (c_pad == c_packed).all()
    torch.testing.assert_close(lp_packed, lp_pad, rtol=1e-4, atol=1e-4)
    for n in g_pad:
        torch.testing.assert_close(g_packed[n], g_pad[n], rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.slow
def test_a_gemma2_model_trains_with_the_default_settings(tmp_path):
    """The default attn_implementation (auto) on a model packed_sdpa cannot serve: a line saying what runs
    instead, shared prompts off, and a run that trains and saves (transformers refuses sdpa for Gemma-2)."""
    import transformers as tf

    model_dir = tmp_path / "gemma2"
    torch.manual_seed(0)
    tf.Gemma2ForCausalLM(config("gemma2")).save_pretrained(model_dir)
    tok = tf.AutoTokenizer.from_pretrained(DEMO_MODEL)
    tok.save_pretrained(model_dir)
    cfg_json = json.loads((model_dir / "config.json").read_text())
    assert cfg_json["final_logit_softcapping"] and cfg_json["attn_logit_softcapping"]
    out = torchrun(1, REPO / "wrpo.py", f"--model={model_dir}", f"--out_dir={tmp_path / 'out'}", "--max_steps=2",
                   "--global_batch_size=4", "--max_length=128", "--max_prompt_length=96", "--dtype=float32",
                   f"--data_cache_dir={tmp_path / 'cache'}", f"--ref_cache_dir={tmp_path / 'cache'}")
    assert "attention: eager, not packed_sdpa, because its attention logits are soft-capped; shared prompts " \
           "are off" in out
    assert [m["step"] for m in read_jsonl(tmp_path / "out" / "metrics.jsonl") if "lr" in m] == [1, 2]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["attn_implementation"] == "eager"
    tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")


def test_gemma2_loads_sharded_as_from_pretrained_does(tmp_path):
    """Sharded loading rebuilds Gemma's non-persistent embedding scale (sqrt(hidden)): the same logits."""
    import transformers as tf

    from fsdp_utils import init_distributed, load_model
    from training import TrainConfig

    torch.manual_seed(0)
    tf.Gemma2ForCausalLM(config("gemma2")).save_pretrained(tmp_path)
    _, _, device, mesh = init_distributed()
    sharded = load_model(tmp_path, mesh, device, TrainConfig(dtype="float32"), attn="eager", trainable=False)
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    embed = sharded.model.embed_tokens
    assert embed.embed_scale.item() == pytest.approx(COMMON["hidden_size"] ** 0.5)
    ids = torch.randint(0, 640, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sharded(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
