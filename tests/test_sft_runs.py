"""sft.py for real: 2 ranks vs 1 rank, and the demo pipeline split -> sft -> wrpo."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, read_jsonl, torchrun

pytestmark = pytest.mark.slow  # end-to-end runs: the full suite only

SHORT_SFT = ["--data=demo/data/heldout.jsonl", "--max_length=128", "--global_batch_size=8", "--micro_batch_size=2",
             "--max_steps=4", "--lr=1e-3", "--dtype=float32", "--save_dtype=float32", "--warmup_ratio=0"]


def test_sft_two_ranks_match_one_rank(tmp_path):
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"sft{world}"
        torchrun(world, REPO / "sft.py", *SHORT_SFT, f"--out_dir={out}")
        runs[world] = (read_jsonl(out / "metrics.jsonl"), load_file(out / "final" / "model.safetensors"))
    (m1, w1), (m2, w2) = runs[1], runs[2]
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2, 3, 4]
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
    assert m1[-1]["loss"] < m1[0]["loss"] - 0.1
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-6


def test_demo_pipeline_split_sft_wrpo(tmp_path):
    """The README's pipeline, shortened: the SFT checkpoint is WRPO's policy and reference."""
    import subprocess
    import sys

    split_dir, sft_dir, wrpo_dir = tmp_path / "split", tmp_path / "sft", tmp_path / "wrpo"
    subprocess.run([sys.executable, "-m", "eval.split", "--data=demo/data/train.jsonl", f"--out_dir={split_dir}"],
                   cwd=REPO, check=True, capture_output=True)
    out = torchrun(2, REPO / "sft.py", "--config=demo/sft.json", f"--data={split_dir / 'sft.jsonl'}",
                   f"--out_dir={sft_dir}", "--epochs=6")
    before, after = (float(x) for x in out.split("held-out loss: ")[1].split(" after")[0].split(" before -> "))
    assert after < before - 1.0

    from transformers import AutoModelForCausalLM

    sft_model = AutoModelForCausalLM.from_pretrained(sft_dir / "final")
    assert torch.isfinite(sft_model(torch.tensor([[1, 2, 3]])).logits).all()
    assert json.loads((sft_dir / "final" / "train_config.json").read_text())["packing"] is True

    out = torchrun(2, REPO / "wrpo.py", "--config=demo/wrpo_after_sft.json", f"--model={sft_dir / 'final'}",
                   f"--data={split_dir / 'wrpo.jsonl'}", f"--out_dir={wrpo_dir}", "--epochs=1",
                   f"--ref_cache_dir={tmp_path / 'cache'}")
    # policy and reference both start as the SFT model: every implicit reward is exactly 0
    assert "step 0: held-out reward accuracy 0.500 (source 0.500, target 0.500), margin 0.0000" in out
    final = read_jsonl(wrpo_dir / "metrics.jsonl")[-1]
    assert final["eval/rewards/accuracies"] > 0.6
    assert json.loads((wrpo_dir / "config.json").read_text())["model"] == str(sft_dir / "final")
