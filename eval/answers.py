"""Answers to the paper's benchmarks, in the files their official judges read.

    python -m eval.answers alpaca --model=out/wrpo/final --questions=alpaca_eval.json --out=model_outputs.json
    python -m eval.answers mtbench --model=out/wrpo/final --questions=mt_bench/question.jsonl \\
        --out=mt_bench/model_answer/wrpo.jsonl
    python -m eval.answers arenahard --model=out/wrpo/final --questions=arena-hard-v0.1/question.jsonl \\
        --out=arena-hard-v0.1/model_answer/wrpo.jsonl
    torchrun --nproc_per_node=8 -m eval.answers ...        # questions split over ranks

The question files are the benchmarks' own (download them; their paths are arguments):
- alpaca: AlpacaEval 2's `alpaca_eval.json`, a list of {instruction, dataset, ...}. Output: the
  `model_outputs.json` that `alpaca_eval --model_outputs` reads, a list of
  {instruction, output, generator, dataset}.
- mtbench: FastChat's MT-Bench `question.jsonl` ({question_id, category, turns: [q1, q2]}). The
  second turn is asked after the model's own first answer. Output: FastChat's answer JSONL,
  {question_id, answer_id, model_id, choices: [{index: 0, turns: [a1, a2]}], tstamp}. Decoding
  follows FastChat's per-category temperatures (writing and roleplay 0.7, stem and humanities
  0.1, the rest greedy) unless --temperature is given.
- arenahard: Arena-Hard-Auto v0.1's `question.jsonl` ({question_id, category, turns: [{content}]}).
  Output: its answer JSONL, {question_id, answer_id, model_id, choices: [{index: 0, turns:
  [{content, token_len}]}], tstamp, conv_metadata: {token_len, header_count, list_count,
  bold_count}}; token_len counts the model's own tokens (the official script uses tiktoken's).

Every answer row also records how it was made (`generation`): {temperature, top_p, max_new_tokens, seed, dtype,
weights} (weights: eval.common.weights_id, a digest of the model's weight files). The model's chat template
renders each conversation; batches are left-padded; a rerun skips the questions already answered
(eval/common.py) by the same model (weights, name) with the same settings, and stops, naming what differs,
at an answer made otherwise; --overwrite starts over instead.
"""

import argparse
import hashlib
import json
import re
import time
from pathlib import Path

from eval import cli, fail, outputs_problem
from eval.common import generate, load_for_eval, local_model, merge, model_name, resumed_rows, weights_id, write_rows
from eval.questions import read_questions
from fsdp_utils import DTYPES, cleanup, exit_process, init_distributed, is_master, print0

# FastChat's MT-Bench sampling temperature per question category (0: greedy)
MTBENCH_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                       "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
BENCHMARKS = ("alpaca", "mtbench", "arenahard")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m eval.answers", description=__doc__.split("\n\n")[0])
    ap.add_argument("benchmark", choices=BENCHMARKS)
    ap.add_argument("--model", required=True, help="local folder or hub id")
    ap.add_argument("--questions", required=True, help="the benchmark's question file")
    ap.add_argument("--out", required=True, help="the answer file to write (or to resume)")
    ap.add_argument("--model_id", default="", help="the name in the answers (default: the model folder's name)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="0 = greedy (default for alpaca and arenahard; mtbench: per category)")
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--max_new_tokens", type=int, default=None, help="default: 2048 (mtbench 1024)")
    ap.add_argument("--batch_size", type=int, default=8, help="questions per generate call")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--trust_remote_code", action="store_true")
    ap.add_argument("--overwrite", action="store_true",
                    help="start over: drop the answers already in --out (by default a rerun resumes them)")
    args = ap.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 1024 if args.benchmark == "mtbench" else 2048
    if args.batch_size < 1 or args.max_new_tokens < 1:
        ap.error("--batch_size and --max_new_tokens must be >= 1")
    if (args.temperature is not None and args.temperature < 0) or not 0 < args.top_p <= 1:
        ap.error("--temperature must be >= 0 and --top_p in (0, 1]")
    return args


# -----------------------------------------------------------------------------
# answers in each benchmark's format


def markdown_counts(text):
    """Arena-Hard's style metadata: headers, list items and bold spans, code blocks left out."""
    text = re.sub(r"```[^`]*```", "", text)
    count = lambda pattern, flags=0: len(re.findall(pattern, text, flags))  # noqa: E731
    return {"header_count": {f"h{n}": count(rf"^#{{{n}}}\s", re.M) for n in range(1, 7)},
            "list_count": {"ordered": count(r"^\s*\d+\.\s", re.M), "unordered": count(r"^\s*[-*+]\s", re.M)},
            "bold_count": {"**": count(r"\*\*[^*\n]+\*\*"), "__": count(r"__[^_\n]+__")}}


def answer_row(benchmark, q, replies, model_id, settings, tokenizer):
    if benchmark == "alpaca":
        return {"instruction": q["id"], "output": replies[0], "generator": model_id, "dataset": q["dataset"],
                "generation": settings}
    answer_id = hashlib.sha256(f"{model_id}:{q['id']}:{json.dumps(settings)}".encode()).hexdigest()[:22]
    row = {"question_id": q["id"], "answer_id": answer_id, "model_id": model_id}
    if benchmark == "mtbench":
        return {**row, "choices": [{"index": 0, "turns": replies}], "tstamp": time.time(), "generation": settings}
    lens = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies]
    return {**row, "choices": [{"index": 0, "turns": [{"content": r, "token_len": n} for r, n in zip(replies, lens)]}],
            "tstamp": time.time(), "conv_metadata": {"token_len": lens[-1], **markdown_counts(replies[-1])},
            "generation": settings}


KEYS = {"alpaca": "instruction", "mtbench": "question_id", "arenahard": "question_id"}


def main(argv):
    args = parse_args(argv)
    rank, world, device, _ = init_distributed()
    out, key = Path(args.out), KEYS[args.benchmark]
    if problem := outputs_problem([out], [args.questions, args.model]):
        fail(problem)
    if args.benchmark == "alpaca" and out.suffix != ".json":
        fail("AlpacaEval reads a JSON list: give --out a .json name (e.g. model_outputs.json)")
    questions = read_questions(args.benchmark, args.questions)
    local = local_model(args.model, what="model", trust_remote_code=args.trust_remote_code)
    model_id = args.model_id or model_name(args.model)
    fixed = {"top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "seed": args.seed, "dtype": args.dtype,
             "weights": weights_id(local)}
    by_id = {q["id"]: q for q in questions}

    def temperature(q):
        if args.temperature is not None:
            return args.temperature
        return MTBENCH_TEMPERATURE.get(q["category"], 0.7) if args.benchmark == "mtbench" else 0.0

    def settings(t):
        return {"temperature": t, **fixed}

    def made_with(row):  # (a question no longer in the file: its answer's own temperature is taken as asked)
        q = by_id.get(row[key])
        t = temperature(q) if q else (row.get("generation") or {}).get("temperature")
        return {"generator" if args.benchmark == "alpaca" else "model_id": model_id, "generation": settings(t)}

    done = resumed_rows(out, key, made_with, args.overwrite)
    todo = [q for i, q in enumerate(questions) if i % world == rank and q["id"] not in done]
    print0(f"{args.benchmark}: {len(questions)} questions, {len(done)} already answered; {world} rank(s)")

    from transformers import AutoModelForCausalLM

    model, tokenizer = load_for_eval(local, AutoModelForCausalLM, what="model", padding_side="left",
                                     dtype=DTYPES[args.dtype], device=device, trust_remote_code=args.trust_remote_code)

    def rows_of(chunk):
        """Answer a chunk of questions turn by turn; each later turn follows the model's own answers."""
        rows = []
        for t in sorted({temperature(q) for q in chunk}):  # one generate call per temperature
            group = [q for q in chunk if temperature(q) == t]
            convs, replies = [[] for _ in group], [[] for _ in group]
            for turn in range(max(len(q["turns"]) for q in group)):
                active = [i for i, q in enumerate(group) if turn < len(q["turns"])]
                for i in active:
                    convs[i].append({"role": "user", "content": group[i]["turns"][turn]})
                texts = generate(model, tokenizer, [convs[i] for i in active], 1, t, args.top_p, args.max_new_tokens,
                                 f"{args.seed}:{turn}:{','.join(str(group[i]['id']) for i in active)}")
                for i, (text,) in zip(active, texts):
                    convs[i].append({"role": "assistant", "content": text})
                    replies[i].append(text)
            rows += [answer_row(args.benchmark, q, r, model_id, settings(t), tokenizer) for q, r in zip(group, replies)]
        order = {q["id"]: i for i, q in enumerate(chunk)}
        return sorted(rows, key=lambda r: order[r[key]])

    t0 = time.time()
    write_rows(out, todo, args.batch_size, rows_of, rank, world)
    if is_master():
        merge(out, [q["id"] for q in questions], key)
        print0(f"{len(questions)} answers -> {out} (rank 0: {len(todo)} in {time.time() - t0:.1f}s)")
    cleanup()


if __name__ == "__main__":
    cli(main)
    exit_process(0)  # not the interpreter's teardown: see fsdp_utils.exit_process
