"""Each target family end to end on 2 ranks with the default settings: a tiny model of its architecture with its
quirks (tied or padded embeddings, no pad token or pad == EOS, soft-capping, sliding windows), loaded sharded, its
chat template; sft.py, then wrpo.py from the SFT model, then the result through from_pretrained."""

import json

import pytest
import torch

from chat_families import FAMILIES, build_model, build_tokenizer, write_rows
from conftest import REPO, read_jsonl, torchrun
from fsdp_utils import _checkpoint_tensors

pytestmark = pytest.mark.slow  # end-to-end runs: the full suite only

SETTINGS = ["--max_length=128", "--global_batch_size=4", "--epochs=2", "--max_steps=2", "--lr=1e-3",
            "--dtype=float32", "--save_dtype=float32"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_trains_saves_and_loads(tmp_path, name):
    import transformers as tf

    fam = FAMILIES[name]
    tok = build_tokenizer(fam)
    start = build_model(fam, tok, tmp_path / "start")
    assert (tmp_path / "start" / "model.safetensors.index.json").exists()  # sharded: each rank reads its slices
    rows = write_rows(tmp_path / "rows.jsonl", system="Answer briefly." if fam.system else None)
    cache = [f"--data_cache_dir={tmp_path / 'cache'}"]
    torchrun(2, REPO / "sft.py", f"--model={tmp_path / 'start'}", f"--data={rows}", f"--out_dir={tmp_path / 'sft'}",
             "--warmup_ratio=0", *SETTINGS, *cache)
    out = torchrun(2, REPO / "wrpo.py", f"--model={tmp_path / 'sft' / 'final'}", f"--data={rows}",
                   f"--eval_data={rows}", f"--out_dir={tmp_path / 'wrpo'}", f"--ref_cache_dir={tmp_path / 'ref'}",
                   "--max_prompt_length=96", *SETTINGS, *cache)
    if name == "gemma2":  # soft-capped attention: transformers' eager attention, packed, no shared prompts
        assert "attention: eager, not packed_sdpa, because its attention logits are soft-capped" in out
    for run in ("sft", "wrpo"):
        metrics = [m for m in read_jsonl(tmp_path / run / "metrics.jsonl") if "lr" in m]
        assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] == m["loss"] for m in metrics)
        assert not (tmp_path / run / "run.lock").exists()  # released on the way out (fsdp_utils.exit_process)

    final = tmp_path / "wrpo" / "final"
    model = tf.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    assert type(model).__name__ == type(start).__name__
    assert model.config.vocab_size == start.config.vocab_size == len(tok) + fam.vocab_extra  # Qwen's extra rows
    tied = fam.quirks.get("tie_word_embeddings", start.config.tie_word_embeddings)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    assert ("lm_head.weight" in _checkpoint_tensors(final)) == (not tied)
    for key, value in fam.quirks.items():
        assert getattr(model.config, key) == value, key
    assert model.generation_config.eos_token_id == start.generation_config.eos_token_id  # Gemma's two stop tokens
    moved = [k for k, v in start.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert moved, "training changed no weight"

    saved = tf.AutoTokenizer.from_pretrained(final)
    assert saved.chat_template == tok.chat_template and saved.pad_token == tok.pad_token  # no pad token invented
    assert saved("Hi there")["input_ids"] == tok("Hi there")["input_ids"]
    prompt = saved.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)
    with torch.no_grad():
        new = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=saved.eos_token_id)
        logits = model(**prompt).logits
    assert new.shape[1] > prompt["input_ids"].shape[1]
    if "final_logit_softcapping" in fam.quirks:
        assert logits.abs().max() < fam.quirks["final_logit_softcapping"]
    assert json.loads((tmp_path / "wrpo" / "config.json").read_text())["attn_implementation"] == (
        "eager" if name == "gemma2" else "packed_sdpa")
