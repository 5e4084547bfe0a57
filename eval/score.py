"""Score every sampled response with a reward model; adds `scores` beside `responses`.

    python -m eval.score --reward_model=PATH_OR_HUB_ID --data=samples.jsonl --out=scored.jsonl
    torchrun --nproc_per_node=8 -m eval.score --reward_model=RLHFlow/ArmoRM-Llama3-8B-v0.1 \\
        --trust_remote_code --data=samples.jsonl --out=scored.jsonl          # the paper's scorer

Input: eval/generate.py's rows ({"prompt_id", "prompt", "responses": [...], ...}). Each response
is scored as the conversation prompt + {"role": "assistant", "content": response}, rendered with
the reward model's chat template. Any AutoModelForSequenceClassification with one output works
(its logit is the score); a model whose output has a `score` field (ArmoRM's custom code, with
--trust_remote_code) gives that. Conversations longer than --max_length keep their first
--max_length tokens (counted in the summary).

Output: the input rows with "scores" (one float per response), "reward_model" (its folder's name) and
"scoring": {"weights", "max_length", "dtype"} (weights: eval.common.weights_id of the reward model).

Batched by length, split over ranks by prompt, resumable like eval/generate.py
(eval/common.py): prompts already scored in --out are skipped, if scored by the same reward model
(weights) with the same settings, and their prompt and responses are still --data's; any other row
stops the run, naming what differs; --overwrite starts over instead.
"""

import argparse
import time
from pathlib import Path

import torch

import data
from eval import cli, fail, outputs_problem
from eval.common import convert_rows, load_for_eval, local_model, merge, prompt_id_of, resumed_rows, weights_id, \
    write_rows
from fsdp_utils import DTYPES, cleanup, exit_process, init_distributed, is_master, print0


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m eval.score", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reward_model", required=True, help="local folder or hub id")
    ap.add_argument("--data", required=True, help="sampled responses (eval/generate.py)")
    ap.add_argument("--out", required=True, help="the .jsonl file to write (or to resume)")
    ap.add_argument("--batch_size", type=int, default=8, help="conversations per forward pass")
    ap.add_argument("--max_length", type=int, default=4096, help="tokens per conversation")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--trust_remote_code", action="store_true", help="run the model's own code (e.g. ArmoRM)")
    ap.add_argument("--overwrite", action="store_true",
                    help="start over: drop the rows already in --out (by default a rerun resumes them)")
    args = ap.parse_args(argv)
    if args.batch_size < 1 or args.max_length < 2:
        ap.error("--batch_size must be >= 1 and --max_length >= 2")
    return args


def read_samples(path):
    """The rows to score, every one checked (file:line errors)."""
    def checked(rec, where):
        if not isinstance(rec, dict):
            raise data.RowError(f"row must be a JSON object, got {type(rec).__name__}")
        for field in ("prompt", "responses"):
            if field not in rec:
                raise data.RowError(f"missing field '{field}'")
        data.prompt_messages(rec["prompt"])
        texts = rec["responses"]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise data.RowError("responses must be a non-empty list of strings")
        return {**rec, "prompt_id": prompt_id_of(rec)}

    rows = convert_rows(path, checked)
    if len({r["prompt_id"] for r in rows}) != len(rows):
        fail(f"{path}: a prompt_id appears twice; one row per prompt")
    return rows


@torch.no_grad()
def score_batch(model, tokenizer, conversations, max_length, device):
    """Reward of each conversation (a list of messages): a float per conversation."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                    add_special_tokens=False).to(device)
    out = model(**enc)
    score = getattr(out, "score", None)
    if score is None:
        if out.logits.shape[-1] != 1:
            fail(f"the reward model has {out.logits.shape[-1]} outputs; a scalar reward (1 output) is needed")
        score = out.logits[:, 0]
    return score.float().flatten().tolist()


def main(argv):
    args = parse_args(argv)
    rank, world, device, _ = init_distributed()
    out = Path(args.out)
    if problem := outputs_problem([out], [args.data, args.reward_model]):
        fail(problem)
    try:
        rows = read_samples(args.data)
    except data.DataError as e:
        fail(str(e))
    local = local_model(args.reward_model, what="reward model", trust_remote_code=args.trust_remote_code)
    scoring = {"weights": weights_id(local), "max_length": args.max_length, "dtype": args.dtype}
    given = {r["prompt_id"]: {"prompt": r["prompt"], "responses": r["responses"]} for r in rows}
    done = resumed_rows(out, "prompt_id", lambda row: {"scoring": scoring, **given.get(row["prompt_id"], {})},
                        args.overwrite)
    todo = [r for i, r in enumerate(rows) if i % world == rank and r["prompt_id"] not in done]
    print0(f"{len(rows)} prompts, {len(done)} already scored; {world} rank(s)")

    from transformers import AutoModelForSequenceClassification

    model, tokenizer = load_for_eval(local, AutoModelForSequenceClassification, what="reward model",
                                     padding_side="right", dtype=DTYPES[args.dtype], device=device,
                                     trust_remote_code=args.trust_remote_code)
    if getattr(model.config, "pad_token_id", None) is None:  # it finds each sequence's last token by the pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    name = Path(str(args.reward_model).rstrip("/")).name

    truncated = []  # per chunk: conversations longer than --max_length

    def rows_of(chunk):
        """Scores for a chunk of rows: its (row, response) conversations sorted by length, so batches pad little."""
        convs = [(r, k, data.prompt_messages(row["prompt"]) + [{"role": "assistant", "content": t}])
                 for r, row in enumerate(chunk) for k, t in enumerate(row["responses"])]
        lengths = [len(tokenizer(tokenizer.apply_chat_template(c, tokenize=False), add_special_tokens=False)
                       ["input_ids"]) for _, _, c in convs]
        truncated.append(sum(n > args.max_length for n in lengths))
        order = sorted(range(len(convs)), key=lambda j: -lengths[j])
        scores = [[None] * len(row["responses"]) for row in chunk]
        for b in range(0, len(order), args.batch_size):
            batch = [convs[j] for j in order[b : b + args.batch_size]]
            for (r, k, _), s in zip(batch, score_batch(model, tokenizer, [c for _, _, c in batch], args.max_length,
                                                       device)):
                scores[r][k] = s
        return [{**row, "scores": s, "reward_model": name, "scoring": scoring} for row, s in zip(chunk, scores)]

    t0 = time.time()
    write_rows(out, todo, 64, rows_of, rank, world)
    if is_master():
        merge(out, [r["prompt_id"] for r in rows])
        print0(f"{len(rows)} prompts scored -> {out} (rank 0: {len(todo)} prompts in {time.time() - t0:.1f}s, "
               f"{sum(truncated)} conversations cut to {args.max_length} tokens)")
    cleanup()


if __name__ == "__main__":
    cli(main)
    exit_process(0)  # not the interpreter's teardown: see fsdp_utils.exit_process
