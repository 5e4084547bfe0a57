"""WRPO optimizer-step throughput: the plain baseline against the fast paths, same model and data.

    python benchmarks/train_step.py                 # CPU: a tiny Llama, lengths scaled down 4x
    python benchmarks/train_step.py --preset=cpu-wide-head
    python benchmarks/train_step.py --preset=gpu    # one GPU: a ~1.2B Llama, bf16, UltraFeedback-like lengths

(a) baseline: padded micro-batches, live reference model, naive log-probs (full logits),
    transformers' sdpa attention with the padding mask: the plain setup
(b) precomputed reference log-probs, padding-free packing, fused log-probs, packed_sdpa
    attention (attention.py: sdpa per packed sequence); and (b) with transformers' sdpa, whose
    block mask spans whole packed rows
(c) the default: (b) plus shared-prompt packing, one copy of each prompt for its three responses

Each variant is a real `python wrpo.py` run (one process) on synthetic rows whose lengths follow
a skewed (log-normal) distribution like UltraFeedback's: prompts ~20-400 tokens, responses
~50-1000 (divided by 4 on CPU). Reported: median optimizer-step time and tokens/s over the steps
after the first of every run (the variants run in turn, `--repeats` times), the peak memory
(GPU: allocated; CPU: resident set), and on GPU the MFU. Tokens are the rows' three sequences
without padding, the prompt counted once per sequence in every variant, (c) included.
"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESETS = {
    # model (Llama), data and batch settings
    # a decoder-dominated profile like a real Llama's (the head is ~19% of the FLOPs; Llama-3-8B: ~7%)
    "cpu": dict(hidden=256, layers=6, heads=8, kv_heads=4, intermediate=688, vocab=4096, scale=4, rows=96,
                global_batch=8, micro_batch=2, max_length=512, max_prompt_length=128, dtype="float32", steps=9),
    # the same data with a head-dominated tiny model (the head is ~84% of the FLOPs)
    "cpu-wide-head": dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=352, vocab=16384, scale=4,
                          rows=48, global_batch=8, micro_batch=2, max_length=512, max_prompt_length=128,
                          dtype="float32", steps=5),
    "gpu": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, scale=1, rows=320,
                global_batch=32, micro_batch=1, max_length=2048, max_prompt_length=1800, dtype="bfloat16", steps=6),
}
VARIANTS = {
    "(a) baseline": ["--ref_logps=live", "--packing=false", "--logps_impl=naive", "--attn_implementation=sdpa"],
    "(b) packed": ["--ref_logps=precompute", "--packing=true", "--logps_impl=auto", "--shared_prompt=false"],
    "(b) packed, sdpa attention": ["--ref_logps=precompute", "--packing=true", "--logps_impl=auto",
                                   "--attn_implementation=sdpa"],
    "(c) = default: shared prompt": ["--ref_logps=precompute", "--packing=true", "--logps_impl=auto",
                                     "--shared_prompt=true"],
}


def lognormal_length(rng, lo, hi, scale):
    """Skewed lengths: most short, a long tail, clipped to [lo, hi] tokens, divided by scale."""
    x = rng.lognormvariate(0, 0.8) * (lo * 3)
    return max(1, int(min(hi, max(lo, x)) / scale))


def make_data(folder, p, tokenizer):
    rng = random.Random(0)
    words = [w for w in sorted(tokenizer.get_vocab()) if w.isalpha() and len(w) > 2][:400] or ["word"]

    def text(n_tokens):  # about n tokens of random words
        return " ".join(rng.choice(words) for _ in range(max(1, n_tokens // 2)))

    rows = []
    for i in range(p["rows"]):
        prompt = text(lognormal_length(rng, 20, 400, p["scale"]))
        responses = [text(lognormal_length(rng, 50, 1000, p["scale"])) for _ in range(3)]
        rows.append({"prompt_id": str(i), "prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": r} for r in responses[:2]],
                     "rejected": [{"role": "assistant", "content": responses[2]}]})
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_model(folder, p):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(REPO / "demo" / "model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=max(p["vocab"], len(tokenizer)), hidden_size=p["hidden"],
                         intermediate_size=p["intermediate"], num_hidden_layers=p["layers"],
                         num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).to(torch.bfloat16 if p["dtype"] == "bfloat16" else torch.float32).save_pretrained(
        folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return tokenizer


def time_variant(name, args, folder, data, p):
    """One `python wrpo.py` run: its per-step metrics after the first step, and the reference pass time."""
    out = folder / re.sub(r"\W+", "_", name)
    cmd = [sys.executable, "wrpo.py", f"--model={folder / 'model'}", f"--data={data}", f"--out_dir={out}",
           f"--ref_cache_dir={folder / 'cache'}", f"--global_batch_size={p['global_batch']}",
           f"--micro_batch_size={p['micro_batch']}", f"--max_length={p['max_length']}",
           f"--max_prompt_length={p['max_prompt_length']}", f"--dtype={p['dtype']}", f"--max_steps={p['steps']}",
           "--lr=1e-5", "--beta=0.1", "--log_every=1000", "--overwrite=true", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ})
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]  # skip the first
    pre = re.search(r"\((\d+) rows in ([\d.]+)s\)", proc.stdout)
    return steps, float(pre.group(2)) if pre else None


def summary(steps, precompute):
    return {
        "step_s": statistics.median(m["step_time_s"] for m in steps),
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steps),
        "peak_gib": max(m["peak_memory_gib"] for m in steps),
        "mfu": statistics.median(m["mfu"] for m in steps) if "mfu" in steps[0] else None,
        "precompute_s": precompute,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu", choices=list(PRESETS))
    ap.add_argument("--repeats", type=int, default=2, help="rounds over all variants, interleaved (noise)")
    args = ap.parse_args()
    p = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer = make_model(folder, p)
        data = make_data(folder, p, tokenizer)
        steps, precompute = {name: [] for name in VARIANTS}, {}
        for _ in range(args.repeats):  # interleaved, so that a slow spell of a shared machine hits all variants
            for name, a in VARIANTS.items():
                s, pre = time_variant(name, a, folder, data, p)
                steps[name] += s
                precompute[name] = precompute.get(name) or pre  # the first run fills the cache
        results = {name: summary(steps[name], precompute[name]) for name in VARIANTS}
    base = results["(a) baseline"]
    print(f"preset {args.preset}: Llama hidden {p['hidden']}, {p['layers']} layers, vocab {p['vocab']}, "
          f"{p['dtype']}; {p['rows']} rows, global batch {p['global_batch']}, {p['steps']} steps x "
          f"{args.repeats} runs")
    print("| variant | step s | tokens/s | vs (a) | peak memory GiB | MFU | reference pass s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        pre = f"{r['precompute_s']:.1f}" if r["precompute_s"] is not None else "-"
        speedup = r["tokens_per_s"] / base["tokens_per_s"]
        print(f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {speedup:.2f}x | {r['peak_gib']:.2f} | {mfu} "
              f"| {pre} |")


if __name__ == "__main__":
    main()
