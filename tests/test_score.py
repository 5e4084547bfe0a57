"""eval.score with tiny local reward models: values, batching, resuming, ranks, custom code, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import DEMO_MODEL, REPO, read_jsonl, torchrun

pytestmark = pytest.mark.slow  # end-to-end runs: the full suite only
SCORE = ["-m", "eval.score"]
# a reward model whose own code returns an output with a `score` field, as ArmoRM's does
CUSTOM_CODE = '''
from dataclasses import dataclass

import torch
from transformers import LlamaForSequenceClassification
from transformers.utils import ModelOutput


@dataclass
class ToyRewardOutput(ModelOutput):
    score: torch.Tensor = None
    logits: torch.Tensor = None


class ToyRewardModel(LlamaForSequenceClassification):
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        logits = super().forward(input_ids=input_ids, attention_mask=attention_mask).logits
        return ToyRewardOutput(score=10 * logits[:, 0], logits=logits)
'''


def reward_model(folder, num_labels=1, custom=False):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=num_labels,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if custom:
        (folder / "modeling_toy.py").write_text(CUSTOM_CODE)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForSequenceClassification": "modeling_toy.ToyRewardModel"}
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def samples(tmp_path, n=5, name="samples.jsonl"):
    rows = [json.loads(x) for x in (DEMO_MODEL.parent / "data" / "heldout.jsonl").read_text().splitlines()[:n]]
    out = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "model": "toy",
            "responses": [m["content"] for m in r["chosen"] + r["rejected"]]} for r in rows]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path, out


def score(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *SCORE, "--dtype=float32", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def direct_scores(rm_path, row):
    """One conversation at a time, no padding: what the batched scores must equal."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm_path)
    model = AutoModelForSequenceClassification.from_pretrained(rm_path, dtype=torch.float32).eval()
    out = []
    for text in row["responses"]:
        conv = tok.apply_chat_template(row["prompt"] + [{"role": "assistant", "content": text}], tokenize=False)
        with torch.no_grad():
            out.append(model(**tok(conv, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item())
    return out


def test_scores_match_unbatched_and_resume(tmp_path):
    rm = reward_model(tmp_path / "rm")
    path, rows = samples(tmp_path)
    out = tmp_path / "scored.jsonl"
    first3, _ = samples(tmp_path, 3, "first3.jsonl")
    proc = score(f"--reward_model={rm}", f"--data={first3}", f"--out={out}", "--batch_size=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = score(f"--reward_model={rm}", f"--data={path}", f"--out={out}", "--batch_size=2")
    assert proc.returncode == 0 and "5 prompts, 3 already scored" in proc.stdout
    scored = read_jsonl(out)
    assert [r["prompt_id"] for r in scored] == [r["prompt_id"] for r in rows]
    for got, row in zip(scored, rows):
        assert got["responses"] == row["responses"] and got["model"] == "toy" and got["reward_model"] == "rm"
        assert len(got["scores"]) == 3 and len(set(got["scores"])) > 1
        assert got["scores"] == pytest.approx(direct_scores(rm, row), abs=1e-5)  # padding changes nothing

    two = tmp_path / "two.jsonl"
    torchrun(2, *SCORE, f"--reward_model={rm}", f"--data={path}", f"--out={two}", "--dtype=float32", timeout=300)
    flat = lambda rows: [s for r in rows for s in r["scores"]]  # noqa: E731
    assert flat(read_jsonl(two)) == pytest.approx(flat(scored), abs=1e-5)


def test_custom_code_reward_model_needs_trust_remote_code(tmp_path):
    rm = reward_model(tmp_path / "armo_like", custom=True)
    path, rows = samples(tmp_path, 2)
    refused = score(f"--reward_model={rm}", f"--data={path}", f"--out={tmp_path / 'a.jsonl'}")
    custom = "ships its own code (config.json: auto_map AutoModelForSequenceClassification: modeling_toy.ToyRewardModel"
    assert refused.returncode == 2 and custom in refused.stderr
    assert "Traceback" not in refused.stderr
    ok = score(f"--reward_model={rm}", f"--data={path}", f"--out={tmp_path / 'a.jsonl'}", "--trust_remote_code")
    assert ok.returncode == 0, ok.stderr[-3000:]
    got = read_jsonl(tmp_path / "a.jsonl")[0]["scores"]
    assert got == pytest.approx([10 * s for s in direct_scores(rm, rows[0])], abs=1e-4)  # its `score` field


def test_bad_input(tmp_path):
    two_labels = reward_model(tmp_path / "rm2", num_labels=2)
    path, _ = samples(tmp_path, 1)
    proc = score(f"--reward_model={two_labels}", f"--data={path}", f"--out={tmp_path / 'o.jsonl'}")
    assert proc.returncode == 2 and "2 outputs; a scalar reward" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "responses": "not a list"}\n{"responses": ["a"]}\n')
    proc = score(f"--reward_model={two_labels}", f"--data={bad}", f"--out={tmp_path / 'o.jsonl'}")
    assert proc.returncode == 2 and f"{bad}:1: responses must be a non-empty list" in proc.stderr
    assert f"{bad}:2: missing field 'prompt'" in proc.stderr
    proc = score(f"--reward_model={tmp_path / 'nope'}", f"--data={path}", f"--out={tmp_path / 'o.jsonl'}")
    assert proc.returncode == 2 and "cannot load the reward model" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()
