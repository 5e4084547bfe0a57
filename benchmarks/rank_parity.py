"""1 rank vs 2 ranks on the same global batch: per-step losses and final weights.

    python benchmarks/rank_parity.py [--steps=5]

Runs wrpo.py (float32 and bfloat16 compute) and sft.py (float32, packed) on the demo data under
torchrun (CPU, gloo) and prints one table. Gradient accumulation makes up the difference:
4 micro-batches on 1 rank, 2 per rank on 2 ranks.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent


STAGE_ARGS = {
    "wrpo.py": ["--beta=0.1", "--max_prompt_length=96"],
    "sft.py": ["--data=demo/data/heldout.jsonl"],
}


def train(script, world, dtype, steps, out):
    args = [f"--max_steps={steps}", "--global_batch_size=8", "--micro_batch_size=2", "--lr=1e-3", "--max_length=128",
            "--save_dtype=float32", f"--dtype={dtype}", f"--out_dir={out}", *STAGE_ARGS[script]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                    script, *args], cwd=REPO, env=env, check=True, capture_output=True)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in metrics], load_file(out / "final" / "model.safetensors")


def main():
    steps = int(next((a.split("=")[1] for a in sys.argv[1:] if a.startswith("--steps=")), 5))
    print("| script | dtype | step | loss, 1 rank | loss, 2 ranks | abs diff |")
    print("|---|---|---|---|---|---|")
    weights = {}
    with tempfile.TemporaryDirectory() as tmp:
        for script, dtype in (("wrpo.py", "float32"), ("wrpo.py", "bfloat16"), ("sft.py", "float32")):
            (l1, w1), (l2, w2) = (train(script, n, dtype, steps, Path(tmp) / f"{script}{dtype}{n}") for n in (1, 2))
            for i, (a, b) in enumerate(zip(l1, l2), 1):
                print(f"| {script} | {dtype} | {i} | {a:.7f} | {b:.7f} | {abs(a - b):.2e} |")
            weights[script, dtype] = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    for (script, dtype), diff in weights.items():
        print(f"{script} {dtype}: max |weight difference| after {steps} steps: {diff:.2e}")


if __name__ == "__main__":
    main()
