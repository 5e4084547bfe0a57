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

A second table is what the user waits for: end-to-end, one more run per variant (after the per-step
rounds) that trains one whole epoch (no --max_steps) over the preset's `epoch_rows` rows (--epoch_rows;
0 skips these runs), each in a fresh folder with its own copy of the data (the tokenized rows' cache,
beside the data, starts empty) and a new empty --ref_cache_dir, so that every cache is cold and the
reference pass runs every time for the variants that precompute. Its columns:
    end-to-end s       wall time of the `python wrpo.py` process, launch to exit
    data s             reading and tokenizing the rows: wrpo.py's `data: N rows from PATH in X.Xs ...`
                       line ("-" when it prints none: that time is then in "other")
    reference pass s   the precompute pass: its `reference log-probs: PATH (N rows in X.Xs)` line
                       ("-" for the live reference, whose forwards are in the training steps)
    training s         the sum of step_time_s over all of metrics.jsonl's steps, the first included
    other s            the rest: interpreter start, imports, model loading, evaluation, the final save
    rows/s             the rows trained (steps x global batch) over end-to-end s
"""

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESETS = {
    # model (Llama), data and batch settings
    # a decoder-dominated profile like a real Llama's (the head is ~19% of the FLOPs; Llama-3-8B: ~7%)
    "cpu": dict(hidden=256, layers=6, heads=8, kv_heads=4, intermediate=688, vocab=4096, scale=4, rows=96,
                global_batch=8, micro_batch=2, max_length=512, max_prompt_length=128, dtype="float32", steps=9,
                epoch_rows=48),
    # the same data with a head-dominated tiny model (the head is ~84% of the FLOPs)
    "cpu-wide-head": dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=352, vocab=16384, scale=4,
                          rows=48, global_batch=8, micro_batch=2, max_length=512, max_prompt_length=128,
                          dtype="float32", steps=5, epoch_rows=48),
    "gpu": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, scale=1, rows=320,
                global_batch=32, micro_batch=1, max_length=2048, max_prompt_length=1800, dtype="bfloat16", steps=6,
                epoch_rows=320),
}
# epoch_rows: the rows (the first of the preset's) of the end-to-end runs, one epoch of them (cpu: 6 steps,
# half the rows, to keep the whole benchmark to a few minutes on 2 cores)
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


def make_data(folder, p, tokenizer, epoch_rows):
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
    epoch_path = folder / "epoch_rows.jsonl"  # the end-to-end runs' rows
    epoch_path.write_text("".join(json.dumps(r) + "\n" for r in rows[:epoch_rows]))
    return path, epoch_path


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


def run_wrpo(name, args, model, data, out, ref_cache, p, max_steps=None):
    """One `python wrpo.py` process: its stdout, the step rows of its metrics.jsonl, and its wall time."""
    cmd = [sys.executable, "wrpo.py", f"--model={model}", f"--data={data}", f"--out_dir={out}",
           f"--ref_cache_dir={ref_cache}", f"--global_batch_size={p['global_batch']}",
           f"--micro_batch_size={p['micro_batch']}", f"--max_length={p['max_length']}",
           f"--max_prompt_length={p['max_prompt_length']}", f"--dtype={p['dtype']}",
           *([f"--max_steps={max_steps}"] if max_steps else []),
           "--lr=1e-5", "--beta=0.1", "--log_every=1000", "--overwrite=true", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ})
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return proc.stdout, [m for m in rows if "step_time_s" in m], wall  # not the evaluation-only rows


def reference_pass_s(stdout):
    """The precompute pass's seconds from its `reference log-probs: PATH (N rows in X.Xs)` lines; None if none."""
    times = [float(t) for _, t in re.findall(r"^reference log-probs: .*\((\d+) rows in ([\d.]+)s\)\s*$", stdout,
                                             re.M)]
    return sum(times) if times else None


def data_s(stdout):
    """Loading the rows: the seconds of wrpo.py's `data: N rows from PATH in X.Xs (...)` lines (None if none),
    and whether they all came from a cache."""
    lines = re.findall(r"^data: .* in ([\d.]+)s \((.*)\)\s*$", stdout, re.M)  # "(cached: FILE)" or "(tokenized ...)"
    if not lines:
        return None, False
    return sum(float(t) for t, _ in lines), all(how.startswith("cached") for _, how in lines)


def time_variant(name, args, folder, data, p):
    """One `python wrpo.py` run: its per-step metrics after the first step, and the reference pass time."""
    out = folder / re.sub(r"\W+", "_", name)
    stdout, steps, _ = run_wrpo(name, args, folder / "model", data, out, folder / "cache", p, p["steps"])
    return steps[1:], reference_pass_s(stdout)  # skip the first step


def end_to_end(name, args, folder, data, p):
    """One `python wrpo.py` run of one epoch over `data`, every cache cold: its wall time and phases."""
    run_dir = Path(tempfile.mkdtemp(dir=folder, prefix="e2e_"))  # a fresh folder: its own data copy, empty caches
    shutil.copy(data, run_dir / data.name)
    (run_dir / "ref-cache").mkdir()
    stdout, steps, wall = run_wrpo(name, args, folder / "model", run_dir / data.name, run_dir / "out",
                                   run_dir / "ref-cache", p)
    load_s, cached = data_s(stdout)
    ref_s = reference_pass_s(stdout)
    train_s = sum(m["step_time_s"] for m in steps)
    return {"wall_s": wall, "data_s": load_s, "data_cached": cached, "ref_s": ref_s, "train_s": train_s,
            "steps": len(steps), "other_s": wall - (load_s or 0) - (ref_s or 0) - train_s,
            "rows_per_s": len(steps) * p["global_batch"] / wall}


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
    ap.add_argument("--epoch_rows", type=int, default=None,
                    help="rows of the end-to-end runs, one epoch each (default: the preset's; 0: no end-to-end runs)")
    args = ap.parse_args()
    p = PRESETS[args.preset]
    epoch_rows = p["epoch_rows"] if args.epoch_rows is None else args.epoch_rows
    if epoch_rows and not p["global_batch"] <= epoch_rows <= p["rows"]:
        raise SystemExit(f"--epoch_rows must be 0 or in [{p['global_batch']}, {p['rows']}], got {epoch_rows}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer = make_model(folder, p)
        data, epoch_data = make_data(folder, p, tokenizer, epoch_rows)
        steps, precompute = {name: [] for name in VARIANTS}, {}
        for _ in range(args.repeats):  # interleaved, so that a slow spell of a shared machine hits all variants
            for name, a in VARIANTS.items():
                s, pre = time_variant(name, a, folder, data, p)
                steps[name] += s
                precompute[name] = precompute.get(name) or pre  # the first run fills the cache
        results = {name: summary(steps[name], precompute[name]) for name in VARIANTS}
        e2e = {name: end_to_end(name, a, folder, epoch_data, p) for name, a in VARIANTS.items()} if epoch_rows else {}
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
    if not e2e:
        return
    n_steps = epoch_rows // p["global_batch"]
    print()
    print(f"end-to-end: one run per variant of one epoch over {epoch_rows} rows = {n_steps} steps of "
          f"{p['global_batch']} rows, each with a cold data copy and an empty reference cache; wall time from "
          f"launch to exit")
    print(f"| variant | end-to-end s | data s | reference pass s | training s ({n_steps} steps) | other s | rows/s "
          f"| vs (a) |")
    print("|---|---|---|---|---|---|---|---|")
    base = e2e["(a) baseline"]
    for name, r in e2e.items():
        load = "-" if r["data_s"] is None else f"{r['data_s']:.1f}" + (" (cached)" if r["data_cached"] else "")
        ref = "-" if r["ref_s"] is None else f"{r['ref_s']:.1f}"
        train = f"{r['train_s']:.1f}" + (f" ({r['steps']} steps)" if r["steps"] != n_steps else "")
        print(f"| {name} | {r['wall_s']:.1f} | {load} | {ref} | {train} | {r['other_s']:.1f} | {r['rows_per_s']:.2f} "
              f"| {base['wall_s'] / r['wall_s']:.2f}x |")


if __name__ == "__main__":
    main()
