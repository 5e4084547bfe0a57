"""1 rank vs 2 ranks on the same global batch: per-step losses and final weights.

    python benchmarks/rank_parity.py [--steps=5]

Runs wrpo.py on the demo data under torchrun (CPU, gloo) in float32 and bfloat16 compute and
prints one table. Gradient accumulation makes up the difference: 4 micro-batches on 1 rank,
2 per rank on 2 ranks.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent


def run(world, dtype, steps, out):
    args = [f"--max_steps={steps}", "--global_batch_size=8", "--micro_batch_size=2", "--lr=1e-3", "--beta=0.1",
            "--max_length=128", "--max_prompt_length=96", "--save_dtype=float32", f"--dtype={dtype}",
            f"--out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                    "wrpo.py", *args], cwd=REPO, env=env, check=True, capture_output=True)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in metrics], load_file(out / "final" / "model.safetensors")


def main():
    steps = int(next((a.split("=")[1] for a in sys.argv[1:] if a.startswith("--steps=")), 5))
    print("| dtype | step | loss, 1 rank | loss, 2 ranks | abs diff |")
    print("|---|---|---|---|---|")
    weights = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            (l1, w1), (l2, w2) = (run(n, dtype, steps, Path(tmp) / f"{dtype}{n}") for n in (1, 2))
            for i, (a, b) in enumerate(zip(l1, l2), 1):
                print(f"| {dtype} | {i} | {a:.7f} | {b:.7f} | {abs(a - b):.2e} |")
            weights[dtype] = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    for dtype, diff in weights.items():
        print(f"{dtype}: max |weight difference| after {steps} steps: {diff:.2e}")


if __name__ == "__main__":
    main()
