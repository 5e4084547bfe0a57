"""Real multi-process runs on gloo: sharded loading, checkpoints, 2 ranks vs 1 rank, the demo."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, read_jsonl, torchrun

pytestmark = pytest.mark.slow  # end-to-end runs: the full suite only

SHORT_RUN = ["--max_steps=5", "--global_batch_size=8", "--micro_batch_size=2", "--lr=1e-3", "--beta=0.1",
             "--save_dtype=float32", "--max_length=128", "--max_prompt_length=96"]


def test_sharded_loading_and_hf_checkpoints(tmp_path):
    torchrun(2, REPO / "tests" / "dist_checks.py", tmp_path)
    r = json.loads((tmp_path / "results.json").read_text())
    for tied in (False, True):
        load = r[f"load_tied{tied}"]
        assert load["files"] > 1  # read through the sharded index
        assert load["same_keys"] and load["max_diff"] == 0.0 and load["logits_diff"] == 0.0
        saved = r[f"save_fp32_tied{tied}"]
        assert saved["changed"] and saved["files"] > 1
        assert saved["logits_diff"] <= 1e-6
    assert r["save_bf16"]["logits_dtype"] == "torch.bfloat16" and r["save_bf16"]["logits_diff"] == 0.0
    assert r["save_bf16"]["architectures"] == ["LlamaForCausalLM"] and r["save_bf16"]["dtype"] == "bfloat16"


def _train(tmp_path, world, dtype, *extra):
    out = tmp_path / f"{dtype}_{world}"
    torchrun(world, REPO / "wrpo.py", *SHORT_RUN, f"--dtype={dtype}", f"--out_dir={out}",
             f"--ref_cache_dir={tmp_path / 'cache'}", *extra)
    return read_jsonl(out / "metrics.jsonl"), load_file(out / "final" / "model.safetensors")


# fp32: the two runs differ only in the order sums are taken (4 micro-batches on one rank vs 2
# per rank plus an all-reduce; attention per sequence and over a shared prompt), so they agree to
# float32 rounding: losses within 1e-5, weights within 1e-5 (1% of one Adam step of lr 1e-3;
# Adam's normalised update magnifies rounding where a gradient is near zero).
# bf16: the same rounding differences in the fp32 master weights occasionally flip the last bit
# of their bf16 copies. The losses (~0.6, where one bf16 ulp is 2^-8 * 0.5 ~ 2e-3) must agree
# within that ulp; weights within 5e-3, a few Adam steps of lr 1e-3 (Adam's normalised update can
# change sign where a gradient is near zero, so one step can differ by up to 2 * lr).
# The 1-rank run is the plain baseline: the live reference model, padded micro-batches of 2 rows,
# the naive full-logits path, transformers' sdpa with a padding mask. The 2-rank run is the fast
# path: precomputed reference log-probs, packed micro-batches of at most 200 tokens (so ranks run
# uneven splits and must even out their counts), packed_sdpa attention per sequence, the fused
# chunked log-probs (the lm_head gathered by FSDP for it), activation checkpointing, and in fp32
# shared-prompt packing too. None of it may change the math.
@pytest.mark.parametrize("dtype,loss_tol,weight_tol,shared", [("float32", 1e-5, 1e-5, "true"),
                                                              ("bfloat16", 2e-3, 5e-3, "false")])
def test_two_ranks_match_one_rank(tmp_path, dtype, loss_tol, weight_tol, shared):
    m1, w1 = _train(tmp_path, 1, dtype, "--ref_logps=live", "--logps_impl=naive", "--packing=false",
                  "--attn_implementation=sdpa")
    m2, w2 = _train(tmp_path, 2, dtype, "--logps_impl=chunked", "--activation_checkpointing=true",
                  "--max_tokens_per_micro_batch=200", f"--shared_prompt={shared}")
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2, 3, 4, 5]
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) <= loss_tol, (a["step"], a["loss"], b["loss"])
        assert abs(a["rewards/margins"] - b["rewards/margins"]) <= loss_tol
    assert m1[-1]["loss"] < m1[0]["loss"] - 0.01  # it trained
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= weight_tol
    for key in ["loss", "rewards/source_chosen", "rewards/target_chosen", "rewards/chosen", "rewards/rejected",
                "rewards/margins", "rewards/accuracies", "rewards/source_accuracies", "rewards/target_accuracies",
                "logps/source_chosen", "logps/target_chosen", "logps/rejected", "alpha", "lr", "grad_norm",
                "tokens_per_s"]:
        assert key in m2[-1], key
    assert m2[0]["alpha"] == 0.0 and m2[-1]["alpha"] == pytest.approx(0.1)


def test_demo_command_trains_and_improves_heldout_accuracy(tmp_path):
    """The README's demo command, shortened to one epoch."""
    out = tmp_path / "demo"
    stdout = torchrun(2, REPO / "wrpo.py", "--config=demo/wrpo.json", "--epochs=1", f"--out_dir={out}",
                      f"--ref_cache_dir={tmp_path / 'cache'}")
    assert "held-out reward accuracy: 0.500 before" in stdout
    final = read_jsonl(out / "metrics.jsonl")[-1]
    assert final["eval/rewards/accuracies"] > 0.7, final
    saved = json.loads((out / "final" / "train_config.json").read_text())
    assert saved["epochs"] == 1 and saved["world_size"] == 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


def _plain(*args):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "wrpo.py", *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_plain_python_single_process_and_user_errors(tmp_path):
    out = tmp_path / "plain"
    cache = f"--ref_cache_dir={tmp_path / 'cache'}"
    ok = _plain(*SHORT_RUN, "--max_steps=2", "--save_every=1", f"--out_dir={out}", cache)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "(cached)" not in ok.stdout and len(list((tmp_path / "cache").glob("*.ref-logps-*.safetensors"))) == 1
    rerun = _plain(*SHORT_RUN, "--max_steps=1", f"--out_dir={tmp_path / 'plain2'}", cache)
    assert rerun.returncode == 0 and "(cached)" in rerun.stdout  # the second run reads the cache
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "final", "metrics.jsonl", "step_000001"]
    assert json.loads((out / "step_000001" / "train_config.json").read_text())["step"] == 1
    step1, final = (load_file(out / name / "model.safetensors") for name in ("step_000001", "final"))
    assert any(not torch.equal(step1[k], final[k]) for k in final)
    before = (out / "final" / "model.safetensors").read_bytes()

    again = _plain(*SHORT_RUN, f"--out_dir={out}")  # never clobber an earlier run
    assert again.returncode == 2 and "already holds a run" in again.stderr and "Traceback" not in again.stderr
    assert (out / "final" / "model.safetensors").read_bytes() == before

    (tmp_path / "bad.jsonl").write_text('{"prompt": "hi", "chosen": ["a", "b"], "rejected": []}\n')
    bad_data = _plain(f"--data={tmp_path / 'bad.jsonl'}", f"--out_dir={tmp_path / 'y'}")
    assert bad_data.returncode == 2 and "Traceback" not in bad_data.stderr
    assert f"{tmp_path / 'bad.jsonl'}:1: rejected must be a list of exactly 1 response" in bad_data.stderr

    # every other kind of bad input, with its message: tests/test_faults.py


def test_compiled_layers_give_the_same_losses(tmp_path):
    """--compile=true (torch.compile per decoder layer) changes speed, not the numbers (fp32)."""
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / f"compile_{flag}"
        torchrun(1, REPO / "wrpo.py", *SHORT_RUN, "--max_steps=3", "--dtype=float32", f"--compile={flag}",
                 f"--out_dir={out}", f"--ref_cache_dir={tmp_path / 'cache'}")
        runs[flag] = [m["loss"] for m in read_jsonl(out / "metrics.jsonl")]
    assert len(runs["true"]) == 3 and max(abs(a - b) for a, b in zip(runs["true"], runs["false"])) <= 1e-5


@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_loss_variants_train(tmp_path, loss):
    """The ablation objectives run end to end; SimPO never loads or computes a reference."""
    extra = ["--beta=2.0", "--gamma=0.5", "--lr=3e-3"] if loss == "simpo" else []
    proc = _plain(*SHORT_RUN, f"--loss_type={loss}", f"--out_dir={tmp_path / loss}", f"--ref_cache_dir={tmp_path}",
                 *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("reference log-probs" in proc.stdout) == (loss != "simpo")
    losses = [m["loss"] for m in read_jsonl(tmp_path / loss / "metrics.jsonl")]
    assert len(losses) == 5 and losses[-1] < losses[0]  # it trains
    bad = _plain(f"--loss_type={loss}x", f"--out_dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "loss_type must be one of sigmoid, ipo, simpo" in bad.stderr
