"""Sample K responses per prompt from a Hugging Face model, with its chat template.

    python -m eval.generate --model=PATH_OR_HUB_ID --prompts=prompts.jsonl --out=samples.jsonl
    torchrun --nproc_per_node=8 -m eval.generate --model=... --prompts=... --out=...   # prompts split by rank

Prompts: any rows with a `prompt` (a string or a list of messages ending with a user turn) and
optionally a `prompt_id`: WRPO rows, bare prompts, one part of `python -m eval.split`.
Output, one line per prompt: {"prompt_id", "prompt", "responses": [K strings], "model", "generation"}, where
"generation" is how the responses were made: {"num_samples", "temperature", "top_p", "max_new_tokens", "seed",
"dtype", "weights"} (weights: eval.common.weights_id, a digest of the weight files' sizes and CRC-32s, the same
for the same weights under any path). Defaults are the paper's: K = 5, temperature 0.8, top-p 0.95.

Resumable (eval/common.py): prompts already in --out, or in the per-rank part files of an
interrupted run, are skipped; rank 0 merges the parts into --out at the end. Only rows made by
the same model (weights) with the same settings and name, for the same prompt text, are kept: any
other row in --out stops the run, naming what differs; --overwrite starts over instead.
A batch's sampling is seeded from --seed and its prompt ids, so a rerun of the same command with
the same batches writes the same text.
"""

import argparse
import time
from pathlib import Path

import data
from eval import cli, fail, outputs_problem
from eval.common import convert_rows, generate, load_for_eval, local_model, merge, model_name, prompt_id_of, \
    resumed_rows, weights_id, write_rows
from fsdp_utils import DTYPES, cleanup, exit_process, init_distributed, is_master, print0


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="local folder or hub id")
    ap.add_argument("--prompts", required=True, help="rows with a prompt (.jsonl, .json, .parquet or a folder)")
    ap.add_argument("--out", required=True, help="the .jsonl file to write (or to resume)")
    ap.add_argument("--num_samples", type=int, default=5, help="samples per prompt (paper: 5)")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy, one sample")
    ap.add_argument("--top_p", type=float, default=0.95)
    ap.add_argument("--max_new_tokens", type=int, default=1024)
    ap.add_argument("--batch_size", type=int, default=8, help="prompts per generate call (x n sequences)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--model_name", default="", help="the `model` field of the output (default: the folder name)")
    ap.add_argument("--trust_remote_code", action="store_true")
    ap.add_argument("--overwrite", action="store_true",
                    help="start over: drop the rows already in --out (by default a rerun resumes them)")
    args = ap.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        ap.error("--num_samples, --batch_size and --max_new_tokens must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        ap.error("--temperature must be >= 0 and --top_p in (0, 1]")
    if args.temperature == 0 and args.num_samples > 1:
        ap.error("--temperature=0 is greedy decoding: one sample per prompt, so --num_samples=1")
    return args


def read_prompts(path):
    """[(prompt_id, prompt messages)] in file order, every row checked (file:line errors)."""
    def checked(rec, where):
        if not isinstance(rec, dict) or "prompt" not in rec:
            raise data.RowError("missing field 'prompt'")
        return prompt_id_of(rec), data.prompt_messages(rec["prompt"])

    prompts = convert_rows(path, checked)
    seen = set()
    for pid, _ in prompts:
        if pid in seen:
            raise data.DataError(f"{path}: prompt_id {pid!r} appears twice")
        seen.add(pid)
    return prompts


def main(argv):
    args = parse_args(argv)
    rank, world, device, _ = init_distributed()
    out = Path(args.out)
    if problem := outputs_problem([out], [args.prompts, args.model]):
        fail(problem)
    try:
        prompts = read_prompts(args.prompts)
    except data.DataError as e:
        fail(str(e))
    local = local_model(args.model, what="model", trust_remote_code=args.trust_remote_code)
    name = args.model_name or model_name(args.model)
    settings = {"num_samples": args.num_samples, "temperature": args.temperature, "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens, "seed": args.seed, "dtype": args.dtype,
                "weights": weights_id(local)}
    asked = dict(prompts)  # a kept row answers the prompt of its prompt_id that --prompts holds now

    def made_with(row):
        return {"model": name, "generation": settings, **({"prompt": asked[pid]} if (pid := row["prompt_id"]) in asked
                                                            else {})}

    done = resumed_rows(out, "prompt_id", made_with, args.overwrite)
    todo = [p for i, p in enumerate(prompts) if i % world == rank and p[0] not in done]
    print0(f"{len(prompts)} prompts, {len(done)} already done; {world} rank(s), {args.num_samples} samples each")

    from transformers import AutoModelForCausalLM

    model, tokenizer = load_for_eval(local, AutoModelForCausalLM, what="model", padding_side="left",
                                     dtype=DTYPES[args.dtype], device=device, trust_remote_code=args.trust_remote_code)

    def rows_of(batch):
        texts = generate(model, tokenizer, [messages for _, messages in batch], args.num_samples, args.temperature,
                         args.top_p, args.max_new_tokens, f"{args.seed}:{','.join(pid for pid, _ in batch)}")
        return [{"prompt_id": pid, "prompt": messages, "responses": responses, "model": name, "generation": settings}
                for (pid, messages), responses in zip(batch, texts)]

    t0 = time.time()
    write_rows(out, todo, args.batch_size, rows_of, rank, world)
    if is_master():
        merge(out, [pid for pid, _ in prompts])
        print0(f"{len(prompts)} prompts x {args.num_samples} samples -> {out} ({len(todo)} generated on rank 0 in "
               f"{time.time() - t0:.1f}s)")
    cleanup()


if __name__ == "__main__":
    cli(main)
    exit_process(0)  # not the interpreter's teardown: see fsdp_utils.exit_process
