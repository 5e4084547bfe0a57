"""Fidelity in numbers: which tokens each recipe scores, a 12-step run in each, and the step-1 invariant.

    python benchmarks/fidelity.py     # about 2 minutes on 2 CPU cores

1. Scored tokens: one WRPO row (prompt "Hi there", replies "Five." / "Six" / "No") through the demo's chat template and
   each family's of tests/chat_families.py, with --recipe=default and --recipe=authors: the prompt's last tokens and
   the tokens scored of the first reply; and what the authors' SFT tokenizes.
2. Runs: the setup of the outside comparison with the authors' trainer, on the demo model (Llama-3's template): 96 rows,
   12 steps of 8 rows, lr 5e-6, cosine with warmup ratio 0.1, beta 0.01, alpha_max 0.1, fp32, one process. Both
   recipes, and each of the authors' two differences alone (their alpha; their scored tokens); step 1's values as
   logged, exactly, and how far each run's final weights are from the default's, over how far the default's moved.
3. The invariant line, on the demo config (1 step) in fp32 and bf16.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def scored_tokens(folder):
    from chat_families import FAMILIES, build_tokenizer
    from transformers import AutoTokenizer

    import data

    row = {"prompt": "Hi there", "chosen": ["Five.", "Six"], "rejected": ["No"]}
    path = folder / "row.jsonl"
    path.write_text(json.dumps(row) + "\n")
    tokenizers = {"demo (Llama-3)": AutoTokenizer.from_pretrained(REPO / "demo/model")}
    tokenizers.update({name: build_tokenizer(fam) for name, fam in FAMILIES.items()})
    show = lambda tok, ids: "".join(tok.decode([t]) for t in ids).replace("\n", "\\n")  # noqa: E731
    print("| template | recipe | the prompt ends | scored tokens of the reply \"Five.\" |\n|---|---|---|---|")
    for name, tok in tokenizers.items():
        for recipe in ("default", "authors"):
            r = data.load_preference_rows(path, tok, recipe=recipe, report=lambda *a: None)[0]
            print(f"| {name} | {recipe} | `...{show(tok, r.prompt_ids[-4:])}` | `{show(tok, r.responses[0])}` |")
    print("\n| template | the authors' SFT text, tokenized (every token scored but the first) |\n|---|---|")
    for name, tok in tokenizers.items():
        ex = data.load_sft_examples(path, tok, recipe="authors", report=lambda *a: None)[0]
        print(f"| {name} | `{show(tok, ex.ids[:3])}...{show(tok, ex.ids[-3:])}` |")


def run(folder, name, *args):
    import lifecycle
    import wrpo

    out = folder / name
    wrpo.main(["--data=" + str(folder / "rows96.jsonl"), "--max_steps=12", "--global_batch_size=8",
               "--micro_batch_size=8", "--lr=5e-6", "--beta=0.01", "--alpha=0.1", "--dtype=float32",
               "--save_dtype=float32", "--max_length=128", "--max_prompt_length=96", "--log_every=12",
               f"--out_dir={out}", f"--ref_cache_dir={folder / 'cache'}", *args])
    lifecycle.release_locks()
    from safetensors.torch import load_file

    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0]), load_file(out / "final/model.safetensors")


def twelve_steps(folder):
    import wrpo
    from safetensors.torch import load_file

    lines = (REPO / "demo/data/train.jsonl").read_text().splitlines()[:96]
    (folder / "rows96.jsonl").write_text("\n".join(lines) + "\n")
    start = load_file(REPO / "demo/model/model.safetensors")
    get_alpha = wrpo.get_alpha
    runs = {"default": run(folder, "default"), "authors": run(folder, "authors", "--recipe=authors")}
    wrpo.get_alpha = lambda s, t, a, sched, recipe="default": get_alpha(s, t, a, sched, "authors")
    runs["default + their alpha"] = run(folder, "alpha")
    wrpo.get_alpha = lambda s, t, a, sched, recipe="default": get_alpha(s, t, a, sched, "default")
    runs["authors but our alpha"] = run(folder, "tokens", "--recipe=authors")
    wrpo.get_alpha = get_alpha
    moved = torch.sqrt(sum(((runs["default"][1][k] - start[k]) ** 2).sum() for k in start))
    print("\n| run | step 1: loss | accuracies | margins | rewards/chosen | logps/target_chosen | grad norm | final "
          "weights: distance from default's / default's update |\n|---|---|---|---|---|---|---|---|")
    for name, (first, weights) in runs.items():
        apart = torch.sqrt(sum(((weights[k] - runs["default"][1][k]) ** 2).sum() for k in start)) / moved
        print(f"| {name} | {first['loss']!r} | {first['rewards/accuracies']!r} | {first['rewards/margins']!r} | "
              f"{first['rewards/chosen']!r} | {first['logps/target_chosen']!r} | {first['grad_norm']:.6g} | "
              f"{apart.item():.3g} |")
    from transformers import AutoTokenizer

    eot = AutoTokenizer.from_pretrained(REPO / "demo/model").convert_tokens_to_ids("<|eot_id|>")  # the demo's EOS
    head = runs["authors"][1]["lm_head.weight"] - runs["default"][1]["lm_head.weight"]
    print(f"\nlm_head: the <|eot_id|> row holds {(head[eot] ** 2).sum() / (head ** 2).sum():.0%} of the squared "
          "difference between the authors' and the default's weights")


def invariant_lines(folder):
    import subprocess

    for dtype in ("float32", "bfloat16"):
        out = subprocess.run([sys.executable, "wrpo.py", "--config=demo/wrpo.json", "--max_steps=1",
                              f"--dtype={dtype}", f"--out_dir={folder / dtype}", f"--ref_cache_dir={folder / 'c'}"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
        line = next(x for x in out.splitlines() if "policy == reference" in x)
        print(f"demo, {dtype}: {line}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        scored_tokens(Path(tmp))
        twelve_steps(Path(tmp))
        print()
        invariant_lines(Path(tmp))
