"""Fidelity you can see: step 1 of a run whose policy is its reference is exact (every d(y) = 0: loss ln 2, each
accuracy 1/2, each margin 0) in every layout, and `--recipe=authors` is SLIT-AI/WRPO's trainers: their scored
tokens (tests/test_chat_families.py has every family), their alpha, their SFT packing and loss."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import DEMO_MODEL, REPO, read_jsonl, torchrun

LN2 = float(np.float32(math.log(2)))  # -logsigmoid(0) in float32: what each row's loss is when d(y) = 0
EXACT = "step 1: policy == reference, max |d| = 0"


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """The demo tokenizer on a wider random Llama (hidden 256): CPU kernels round its sums differently for batches of
    other shapes (the demo model's are too small to), so a reference computed in other micro-batches shows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("wide")
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    config.update(hidden_size=256, intermediate_size=704, head_dim=64)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(DEMO_MODEL / f, path / f)
    return path


@pytest.fixture(scope="module")
def few_rows(tmp_path_factory):
    """96 training rows (6 steps of the demo config's 16) and 40 held-out rows of the demo's."""
    folder = tmp_path_factory.mktemp("rows")
    for name, n in (("train", 96), ("heldout", 40)):
        lines = (REPO / f"demo/data/{name}.jsonl").read_text().splitlines()[:n]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return [f"--data={folder / 'train.jsonl'}", f"--eval_data={folder / 'heldout.jsonl'}"]


def exact_at_step_one(rows):
    """The step-1 row and the held-out row after it (lr is 0 at step 1, so the policy is still its reference)."""
    step, held_out = rows[0], rows[-1]
    assert step["loss"] == LN2 and held_out["eval/loss"] == LN2
    for prefix, row in (("", step), ("eval/", held_out)):
        for k in ("accuracies", "source_accuracies", "target_accuracies"):
            assert row[f"{prefix}rewards/{k}"] == 0.5, (prefix, k, row[f"{prefix}rewards/{k}"])
        for k in ("margins", "chosen", "source_chosen", "target_chosen", "rejected"):
            assert row[f"{prefix}rewards/{k}"] == 0.0, (prefix, k, row[f"{prefix}rewards/{k}"])


@pytest.mark.slow
@pytest.mark.parametrize("world, dtype, packing, ref_logps", [
    (1, "float32", True, "precompute"), (1, "bfloat16", False, "precompute"), (1, "bfloat16", True, "live"),
    (2, "bfloat16", True, "precompute"), (2, "float32", False, "precompute"), (2, "bfloat16", False, "live")])
def test_step_one_is_exact_when_the_policy_is_its_reference(tmp_path, wide_model, few_rows, world, dtype, packing,
                                                           ref_logps):
    """The reference's log-probs come from the micro-batches the step runs (precomputed: the first epoch's layout;
    live: the same batch), so they are the policy's own to the bit; before, the reference pass packed other
    micro-batches, and bf16 padded runs logged accuracy 0.469, margin -4.8e-08."""
    out = tmp_path / "out"
    stdout = torchrun(world, REPO / "wrpo.py", "--config=demo/wrpo.json", f"--model={wide_model}", "--max_steps=1",
                      f"--dtype={dtype}", f"--packing={packing}", f"--ref_logps={ref_logps}", f"--out_dir={out}",
                      f"--ref_cache_dir={tmp_path / 'cache'}", "--max_tokens_per_micro_batch=600", *few_rows)
    assert EXACT in stdout
    exact_at_step_one(read_jsonl(out / "metrics.jsonl"))


def train(tmp_path, rows, name, *extra, model=DEMO_MODEL):
    import wrpo

    wrpo.main(["--config=demo/wrpo.json", *rows, f"--model={model}", "--max_steps=1", "--dtype=float32",
               f"--out_dir={tmp_path / name}", f"--ref_cache_dir={tmp_path / 'cache'}", *extra])
    return read_jsonl(tmp_path / name / "metrics.jsonl")


@pytest.mark.slow
def test_a_reference_cache_of_another_layout_is_not_read(tmp_path, few_rows, monkeypatch, capsys):
    """The reference cache's key holds the micro-batch layout: a padded run computes its own instead of reading the
    packed run's (which gave held-out accuracy 0.492 at step 0 in fp32, on the demo model)."""
    monkeypatch.chdir(REPO)
    train(tmp_path, few_rows, "packed")
    assert "(cached)" not in capsys.readouterr().out
    exact_at_step_one(train(tmp_path, few_rows, "padded", "--packing=false"))
    assert "(cached)" not in capsys.readouterr().out
    train(tmp_path, few_rows, "again", "--packing=false")
    assert capsys.readouterr().out.count("(cached)") == 2  # the same layout: both caches read


@pytest.mark.slow
def test_step_one_says_when_the_reference_is_not_the_policy(tmp_path, few_rows, monkeypatch, capsys, wide_model):
    """A reference that should be the policy but scores otherwise (here: its table shifted by 1e-3) is named with the
    largest |d|; a reference that is another model gets no line."""
    import wrpo

    monkeypatch.chdir(REPO)
    compute = wrpo.compute_reference
    monkeypatch.setattr(wrpo, "compute_reference", lambda *a: compute(*a) + 1e-3)
    train(tmp_path, few_rows, "off")
    printed = capsys.readouterr().out
    assert "warning: step 1: policy == reference, yet max |d| = 0.001, not 0" in printed and EXACT not in printed
    monkeypatch.setattr(wrpo, "compute_reference", compute)
    train(tmp_path, few_rows, "other", f"--ref_model={wide_model}")
    assert "policy == reference" not in capsys.readouterr().out
