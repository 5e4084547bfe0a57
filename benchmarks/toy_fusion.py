"""Implicit model fusion in miniature, on 2 CPU cores: the paper's pipeline with this project's scripts.

    python benchmarks/toy_fusion.py                     # 3 seeds, the table (about 20 minutes)
    python benchmarks/toy_fusion.py --seeds=1 --quick   # one short seed (what CI runs)

Four string tasks with checkable answers (reverse, sort, upper-case, shift each letter to the
next); a graded reward (difflib similarity of the answer to the right one, 0..1) stands in for
the reward model. The target, a tiny character-level Llama, is pre-trained on answers from a
weak teacher that makes one systematic mistake per task most of the time (copies instead of
reversing, sorts backwards, capitalises only the first letter, shifts the wrong way): it learns
the tasks' format and both behaviours, and answers with the mistake. Three "source models" are
programs, each reliable on two tasks and sloppy on the others, so no single source is best
everywhere. Then, with the project's own scripts: eval.split, eval.build of SFT rows (prompt +
y_ws), sft.py, eval.generate (the SFT target samples 5 answers per prompt), scoring, eval.build
of WRPO rows, and wrpo.py three times from the same SFT checkpoint: DPO (alpha fixed at
0), WRPO (alpha 0 -> alpha_max) and the constant-alpha ablation. Beyond the paper, from the
same checkpoint: WRPO with K = 3 source responses per row (one per source model, uniform or
softmax weights: eval.build --top_k_sources=3), and DPO on FuseChat-3.0's same-source pairs
(eval.build --pairs=same_source: one source model's best and worst sample of a WRPO prompt,
their score gap in a band). Every model answers the
held-out prompts greedily (eval.generate); the table is the mean reward per task. A second
table shows the preference runs' implicit rewards beta * log(pi / pi_ref) of y_ws, y_wt and y_l
over their last epoch: how far each objective moved the source responses' likelihood.
"""

import argparse
import difflib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LETTERS = "abcdefgh"
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
TASKS = {
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "upper": lambda s: s.upper(),
    "shift": lambda s: "".join(ALPHABET[(ALPHABET.index(c) + 1) % 26] for c in s),  # each letter to the next
}
# the target's teacher: one systematic mistake per task (the skill gap the sources can fill)
BUGS = {
    "reverse": lambda s: s,  # copies instead of reversing
    "sort": lambda s: "".join(sorted(s, reverse=True)),  # sorts the wrong way round
    "upper": lambda s: s[:1].upper() + s[1:],  # capitalises only the first letter
    "shift": lambda s: "".join(ALPHABET[(ALPHABET.index(c) - 1) % 26] for c in s),  # shifts the wrong way
}
# source -> error rate per task: each is reliable on two tasks and sloppy on the other two
SOURCES = {"source-a": {"reverse": 0.03, "sort": 0.03, "upper": 0.5, "shift": 0.5},
           "source-b": {"reverse": 0.5, "sort": 0.5, "upper": 0.03, "shift": 0.03},
           "source-c": {"reverse": 0.25, "sort": 0.25, "upper": 0.25, "shift": 0.25}}
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|pad|>", "<unk>"]
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :\n"


def make_prompt(rng):
    return rng.choice(list(TASKS)), "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def answer(prompt_text):
    task, arg = prompt_text.split(": ", 1)
    return TASKS[task](arg)


def weak_answer(rng, prompt_text, bug_rate):
    """The target's teacher: the task's systematic mistake with probability bug_rate, else right."""
    task, arg = prompt_text.split(": ", 1)
    return (BUGS if rng.random() < bug_rate else TASKS)[task](arg)


def reward(prompt_text, response):
    """Graded: 1 for the right answer, less the further the response is from it."""
    return difflib.SequenceMatcher(None, response.strip(), answer(prompt_text)).ratio()


def sloppy(rng, text, p):
    """Each character replaced with probability p, dropped with probability p / 2."""
    out = []
    for ch in text:
        r = rng.random()
        if r < p / 2:
            continue
        out.append(rng.choice(LETTERS) if r < p else ch)
    return "".join(out) or text[:1]


def task_of(row):
    return row["prompt"][-1]["content"].split(":")[0]


def write_jsonl(rows, path):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def call(*cmd, log):
    """A project script as a subprocess (like a user would run it); its output goes to the log."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, env=env, capture_output=True, text=True)
    log.write(f"$ {' '.join(map(str, cmd))}\n{proc.stdout}{proc.stderr}# {time.time() - t0:.1f}s\n\n")
    log.flush()
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr[-3000:]}")


def make_target(folder, seed):
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    sys.path.insert(0, str(REPO / "demo"))
    from make_demo import CHAT_TEMPLATE

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + list(CHARS))}, unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        pad_token="<|pad|>", unk_token="<unk>", chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def score_file(samples, out):
    """The programmatic reward in eval/score.py's output format."""
    rows = [json.loads(x) for x in Path(samples).read_text().splitlines()]
    for r in rows:
        r["scores"] = [reward(r["prompt"][-1]["content"], t) for t in r["responses"]]
    return write_jsonl(rows, out)


def evaluate(model, heldout, folder, name, log):
    out = folder / f"answers-{name}.jsonl"
    call("-m", "eval.generate", f"--model={model}", f"--prompts={heldout}", f"--out={out}", "--num_samples=1",
        "--temperature=0", "--max_new_tokens=12", "--batch_size=64", "--dtype=float32", "--overwrite", log=log)
    per_task = {}
    for r in (json.loads(x) for x in out.read_text().splitlines()):
        per_task.setdefault(task_of(r), []).append(reward(r["prompt"][-1]["content"], r["responses"][0]))
    scores = {t: statistics.mean(v) for t, v in sorted(per_task.items())}
    return {"all": statistics.mean(scores.values()), **scores}


def last_epoch_rewards(metrics):
    """Mean implicit rewards beta * log(pi / pi_ref) of y_ws, y_wt and y_l over a run's last epoch."""
    rows = [json.loads(x) for x in Path(metrics).read_text().splitlines()]
    rows = [r for r in rows if "lr" in r and r["epoch"] == rows[-1]["epoch"]]
    keys = {"y_ws": "rewards/source_chosen", "y_wt": "rewards/target_chosen", "y_l": "rewards/rejected"}
    return {role: statistics.mean(r[k] for r in rows) for role, k in keys.items()}


def one_seed(seed, folder, args, log):
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n = args.prompts
    prompts = [make_prompt(rng) for _ in range(n + args.heldout + args.pretrain)]
    rows = [{"prompt_id": f"p{seed}-{i:05d}", "prompt": [{"role": "user", "content": f"{t}: {a}"}]}
            for i, (t, a) in enumerate(prompts)]
    train, heldout, pre = rows[:n], rows[n : n + args.heldout], rows[n + args.heldout :]
    write_jsonl(train, folder / "prompts.jsonl")
    heldout_path = write_jsonl(heldout, folder / "heldout.jsonl")
    common = ["--dtype=float32", "--save_dtype=float32", "--max_length=48", f"--seed={seed}", "--log_every=1000",
              "--overwrite=true"]

    # the target: a tiny Llama pre-trained on the weak teacher's answers to other prompts
    make_target(folder / "target", seed)
    write_jsonl([{"messages": r["prompt"] + [{"role": "assistant",
                                              "content": weak_answer(rng, r["prompt"][0]["content"], args.bug_rate)}]}
                 for r in pre], folder / "pretrain.jsonl")
    call("sft.py", f"--model={folder / 'target'}", f"--data={folder / 'pretrain.jsonl'}",
        f"--out_dir={folder / 'pretrained'}", "--lr=3e-3", "--global_batch_size=64", "--micro_batch_size=64",
        f"--epochs={args.pretrain_epochs}", *common, log=log)
    target = folder / "pretrained" / "final"

    # the sources: K samples per prompt, scored
    scored = []
    for name, errors in SOURCES.items():
        src_rows = []
        for r in train:
            text = r["prompt"][0]["content"]
            right = answer(text)
            src_rows.append({**r, "model": name, "responses": [sloppy(rng, right, errors[text.split(':')[0]])
                                                                for _ in range(args.k)]})
        scored.append(score_file(write_jsonl(src_rows, folder / f"{name}.jsonl"), folder / f"{name}.scored.jsonl"))

    # the paper's pipeline
    call("-m", "eval.split", f"--data={folder / 'prompts.jsonl'}", f"--out_dir={folder / 'split'}", "--overwrite",
        log=log)
    call("-m", "eval.build", "--sources", *scored, f"--prompts={folder / 'split' / 'sft.jsonl'}",
        f"--out={folder / 'sft_rows.jsonl'}", "--overwrite", log=log)
    call("sft.py", f"--model={target}", f"--data={folder / 'sft_rows.jsonl'}", f"--out_dir={folder / 'sft'}",
        f"--lr={args.sft_lr}", "--global_batch_size=16", "--micro_batch_size=16", f"--epochs={args.sft_epochs}",
        *common, log=log)
    sft = folder / "sft" / "final"
    call("-m", "eval.generate", f"--model={sft}", f"--prompts={folder / 'split' / 'wrpo.jsonl'}",
        f"--out={folder / 'target_samples.jsonl'}", f"--num_samples={args.k}", "--max_new_tokens=12",
        "--batch_size=64", "--dtype=float32", f"--seed={seed}", "--overwrite", log=log)
    score_file(folder / "target_samples.jsonl", folder / "target_scored.jsonl")
    call("-m", "eval.build", "--sources", *scored, f"--target={folder / 'target_scored.jsonl'}",
        f"--out={folder / 'wrpo_rows.jsonl'}", "--overwrite", log=log)
    for weights in ("uniform", "softmax"):  # K = 3: each source model's best response
        call("-m", "eval.build", "--sources", *scored, f"--target={folder / 'target_scored.jsonl'}",
            "--top_k_sources=3", f"--source_weights={weights}", f"--temperature={args.temperature}",
            f"--out={folder / f'wrpo_rows_k3_{weights}.jsonl'}", "--overwrite", log=log)
    call("-m", "eval.build", "--sources", *scored, "--pairs=same_source", f"--min_gap={args.min_gap}",
        f"--max_gap={args.max_gap}", f"--prompts={folder / 'split' / 'wrpo.jsonl'}",
        f"--out={folder / 'same_source_rows.jsonl'}", "--overwrite", log=log)

    models, rewards = {"Target": target, "Target-SFT": sft}, {}
    variants = {"Target-SFT-DPO": ["--alpha=0"],
                "Target-SFT-WRPO": [f"--alpha={args.alpha}"],
                "Target-SFT-WRPO (constant alpha)": [f"--alpha={args.alpha}", "--alpha_schedule=constant"],
                "Target-SFT-WRPO K=3 uniform": [f"--alpha={args.alpha}", "--num_sources=3",
                                                f"--data={folder / 'wrpo_rows_k3_uniform.jsonl'}"],
                "Target-SFT-WRPO K=3 softmax": [f"--alpha={args.alpha}", "--num_sources=3",
                                                f"--data={folder / 'wrpo_rows_k3_softmax.jsonl'}"],
                "Target-SFT-DPO same-source pairs": ["--alpha=0", f"--data={folder / 'same_source_rows.jsonl'}"]}
    for name, extra in variants.items():
        out = folder / name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "")
        call("wrpo.py", f"--model={sft}", f"--data={folder / 'wrpo_rows.jsonl'}", f"--out_dir={out}",
            f"--beta={args.beta}", f"--lr={args.lr}", "--global_batch_size=16", "--micro_batch_size=16",
            f"--epochs={args.wrpo_epochs}", f"--ref_cache_dir={folder}", "--max_prompt_length=32", *common, *extra,
            log=log)
        models[name] = out / "final"
        rewards[name] = last_epoch_rewards(out / "metrics.jsonl")
    results = {name: evaluate(path, heldout_path, folder, name.replace(" ", "_"), log) for name, path in models.items()}
    n_rows = {name: len((folder / f"{name}.jsonl").read_text().splitlines())
              for name in ("wrpo_rows", "wrpo_rows_k3_uniform", "same_source_rows")}
    return results, rewards, n_rows


def main(argv):
    ap = argparse.ArgumentParser(prog="benchmarks/toy_fusion.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out_dir", default="out/toy_fusion")
    ap.add_argument("--quick", action="store_true", help="fewer prompts and epochs (the CI check)")
    ap.add_argument("--prompts", type=int, default=1500, help="training prompts (split 1/3 SFT, 2/3 WRPO)")
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--pretrain", type=int, default=32000, help="prompts with the weak teacher's answers")
    ap.add_argument("--pretrain_epochs", type=int, default=1)
    ap.add_argument("--bug_rate", type=float, default=0.92, help="how often the target's teacher errs")
    ap.add_argument("--sft_epochs", type=int, default=1)
    ap.add_argument("--sft_lr", type=float, default=1e-3)
    ap.add_argument("--wrpo_epochs", type=int, default=2)
    ap.add_argument("--k", type=int, default=5, help="samples per prompt, sources and target")
    ap.add_argument("--alpha", type=float, default=0.5, help="alpha_max of WRPO and the constant-alpha ablation")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-4, help="DPO / WRPO learning rate")
    ap.add_argument("--temperature", type=float, default=0.1, help="K = 3 softmax weights ~ exp(reward / this)")
    ap.add_argument("--min_gap", type=float, default=0.05, help="same-source pairs: the smallest reward gap kept")
    ap.add_argument("--max_gap", type=float, default=0.5, help="same-source pairs: the largest reward gap kept")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.heldout, args.pretrain, args.wrpo_epochs = 120, 32, 320, 1
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    per_seed, per_seed_rewards = [], []
    with open(out_dir / "log.txt", "w") as log:
        for seed in range(args.seeds):
            results, rewards, n_rows = one_seed(seed, out_dir / f"seed{seed}", args, log)
            per_seed.append(results)
            per_seed_rewards.append(rewards)
            print(f"seed {seed}: {n_rows['wrpo_rows']} WRPO rows, {n_rows['wrpo_rows_k3_uniform']} with K = 3, "
                  f"{n_rows['same_source_rows']} same-source pairs; " +
                  ", ".join(f"{m} {r['all']:.3f}" for m, r in results.items()), flush=True)
    print(f"\nheld-out task score (mean reward 0..1, greedy answers), mean +- std over {args.seeds} seed(s); "
          f"{time.time() - t0:.0f}s")
    table = print_table(per_seed)
    print(f"\nimplicit rewards beta * log(pi / pi_ref) on the training rows, mean over the last epoch (beta "
          f"{args.beta}), mean +- std over {args.seeds} seed(s)")
    print_table(per_seed_rewards)
    (out_dir / "results.json").write_text(json.dumps({"args": vars(args), "per_seed": per_seed,
                                                      "per_seed_rewards": per_seed_rewards}, indent=1))
    return table


def print_table(per_seed):
    """A markdown table of per-seed {row: {column: value}}, mean +- std over seeds; returns the values."""
    columns = list(next(iter(per_seed[0].values())))
    table = {m: {c: [r[m][c] for r in per_seed] for c in columns} for m in per_seed[0]}
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for m, cols in table.items():
        cells = [f"{statistics.mean(v):.3f}" + (f" +- {statistics.stdev(v):.3f}" if len(v) > 1 else "")
                 for v in cols.values()]
        print(f"| {m} | " + " | ".join(cells) + " |")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
