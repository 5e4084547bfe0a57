"""WRPO rows (or SFT rows) from scored samples: the last step of building fusion data.

    python -m eval.build --sources fusion/scored/*.jsonl --target=fusion/target_scored.jsonl --out=wrpo.jsonl
    python -m eval.build --sources fusion/scored/*.jsonl --prompts=split/sft.jsonl --out=sft.jsonl  # SFT rows
    python -m eval.build --sources ... --target=... --top_k_sources=3 --source_weights=softmax --out=k3.jsonl
    python -m eval.build --sources ... --pairs=same_source --min_gap=0.01 --max_gap=0.1 --out=dpo.jsonl

Input: eval/score.py's rows ({"prompt_id", "prompt", "responses", "scores", "model"}), one file per
source model and one for the SFT target's own samples. y_ws is the best-scored response over every
source file; y_wt and y_l the best and worst of the target's. Prints the rows kept and dropped, the
mean score of each role and how often each source model supplied y_ws.

Beyond the paper:
- --top_k_sources=K (FuseRL): the best response of each of the K source models whose best scores highest, best
  first, then y_wt; their weights (`source_weights`) uniform, or a softmax of their scores / --temperature. Rows
  list K source_model names and y_ws scores; a prompt with fewer than K source models is dropped.
- --pairs=same_source (FuseChat-3.0): DPO rows from the sources alone, chosen the best and rejected the worst
  sample of one source model, kept when their score gap is in [--min_gap, --max_gap]; of several models in the
  band, the one whose best scores highest.

A prompt_id names one prompt: rows (of any file, source or target) that give one prompt_id two different
prompts are refused, by file:line, naming both texts; never a y_ws answering another prompt.
"""

import argparse
import math
from pathlib import Path

from data import DataError, RowError, prompt_messages, valid_text
from eval import cli, fail, outputs_problem
from eval.common import convert_rows, prompt_id_of, write_jsonl

HINT = "fix or remove them; nothing was written"


def finite_number(x):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:  # an integer too large for a float
        return False


def shortened(messages, width=60):
    """A prompt in a few words, for messages: its turns' text, cut to `width` characters."""
    text = " / ".join(" ".join(m["content"].split()) for m in messages)
    return text if len(text) <= width else text[: width - 3] + "..."


def same_prompt(pid, known, messages, where):
    """DataError unless prompt `messages` (at file:line `where`) is the one prompt_id `pid` already names: `known`,
    (messages, file:line). A prompt_id names one prompt, or the rows built from it answer another."""
    if known[0] != messages:
        raise DataError(f"{where}: prompt_id {pid!r} names two different prompts: {shortened(known[0])!r} at "
                        f"{known[1]} and {shortened(messages)!r} here; give each prompt its own prompt_id")


def add_prompt(table, pid, prompt, where, samples):
    """table[pid] = (prompt messages, where it was first seen, samples), the samples of rows with the same prompt_id
    gathered, their prompt the same (same_prompt)."""
    messages = prompt_messages(prompt)
    known = table.setdefault(pid, (messages, where, []))
    same_prompt(pid, known, messages, where)
    known[2].extend(samples)


def read_scored(path, table=None):
    """Scored samples (eval/score.py) added to `table`: {prompt_id: (prompt messages, file:line, [(score, text,
    model)...])}, every row checked, one prompt per prompt_id (add_prompt)."""
    def checked(rec, where):
        if not isinstance(rec, dict):
            raise RowError(f"row must be a JSON object, got {type(rec).__name__}")
        for field in ("prompt", "responses", "scores"):
            if field not in rec:
                raise RowError(f"missing field '{field}'" + (" (score the file with eval/score.py first)"
                                                             if field == "scores" else ""))
        prompt_messages(rec["prompt"])
        pid = prompt_id_of(rec)  # a given one checked (a string or an integer), else derived from the prompt
        texts, scores = rec["responses"], rec["scores"]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise RowError("responses must be a non-empty list of strings")
        for i, text in enumerate(texts):
            valid_text(text, f"responses[{i}]")
        if not isinstance(scores, list) or len(scores) != len(texts) or not all(map(finite_number, scores)):
            raise RowError(f"scores must be a list of {len(texts)} finite numbers, one per response")
        model = valid_text(str(rec.get("model", Path(path).stem)), "model")
        return pid, rec["prompt"], where, [(float(x), t, model) for x, t in zip(scores, texts) if t.strip()]

    table = {} if table is None else table  # empty responses (a sample that stopped at once) are left out
    for pid, prompt, where, samples in convert_rows(path, checked, hint=HINT):
        add_prompt(table, pid, prompt, where, samples)  # a prompt may come in several rows
    return table


def read_prompt_ids(path):
    """The prompt ids of `path`'s rows (any rows with a prompt_id, a prompt or messages), every row checked."""
    def checked(rec, where):
        if not isinstance(rec, dict):
            raise RowError(f"row must be a JSON object, got {type(rec).__name__}")
        if rec.get("prompt_id") in (None, "") and "prompt" not in rec and "messages" not in rec:
            raise RowError("has no 'prompt_id', 'prompt' or 'messages' to take a prompt id from")
        return prompt_id_of(rec)

    return set(convert_rows(path, checked, hint=HINT))


def best_sources(samples, stats, k=1):
    """[(score, text, model)] of the best sample of each of the k source models whose best scores highest, best
    first (on ties the earlier sample, so k = 1 is the best sample of all), counted in stats; None below k models."""
    best = {}  # model -> (its best sample, where it is in samples)
    for i, (score, text, model) in enumerate(samples):
        if model not in best or score > best[model][0][0]:
            best[model] = (score, text, model), i
    ranked = [sample for sample, _ in sorted(best.values(), key=lambda x: (-x[0][0], x[1]))][:k]
    if len(ranked) < k:
        return None
    for score, _, model in ranked:
        stats["wins"][model] = stats["wins"].get(model, 0) + 1
        stats["scores"]["y_ws"] = stats["scores"].get("y_ws", 0.0) + score / k
    return ranked


def weights_of(scores, how, temperature):
    """The source responses' weights: uniform, or softmax(score / temperature)."""
    if how == "uniform":
        return [1 / len(scores)] * len(scores)
    exp = [math.exp((s - max(scores)) / temperature) for s in scores]
    return [e / sum(exp) for e in exp]


def in_prompts(table, keep, stats):
    """The (prompt_id, entry) items of `table` whose prompt is in `keep` (all when keep is None); the others counted."""
    for pid, entry in table.items():
        if keep is None or pid in keep:
            yield pid, entry
        else:
            stats["not_in_prompts"] += 1


def sft_rows(source, keep, stats):
    """A chat row prompt + y_ws for each source prompt (in keep, unless keep is None)."""
    rows = []
    for pid, (prompt, _, samples) in in_prompts(source, keep, stats):
        (score, text, model), = best_sources(samples, stats)
        messages = prompt_messages(prompt) + [{"role": "assistant", "content": text}]
        rows.append({"prompt_id": pid, "messages": messages, "source_model": model, "score": score})
    return rows


def wrpo_rows(source, target, keep, stats, k=1, weights="uniform", temperature=1.0):
    """A WRPO row for each target prompt with (k) source responses and a preference among its samples."""
    rows = []
    for pid, (prompt, _, samples) in in_prompts(target, keep, stats):
        if pid not in source:
            stats["no_source"] += 1
            continue
        if len(samples) < 2:  # fewer than two non-empty samples: no preference either
            stats["tied"] += 1
            continue
        hi, lo = max(samples, key=lambda s: s[0]), min(samples, key=lambda s: s[0])
        if hi[0] == lo[0]:
            stats["tied"] += 1
            continue
        if (ws := best_sources(source[pid][2], stats, k)) is None:
            stats["few_sources"] += 1
            continue
        for role, score in (("y_wt", hi[0]), ("y_l", lo[0])):
            stats["scores"][role] = stats["scores"].get(role, 0.0) + score
        scores, models = [s for s, _, _ in ws], [m for _, _, m in ws]
        rows.append({"prompt_id": pid, "prompt": prompt_messages(prompt),
                     "chosen": [{"role": "assistant", "content": text} for _, text, _ in ws] +
                               [{"role": "assistant", "content": hi[1]}],
                     "rejected": [{"role": "assistant", "content": lo[1]}],
                     "source_model": models if k > 1 else models[0],
                     "scores": {"y_ws": scores if k > 1 else scores[0], "y_wt": hi[0], "y_l": lo[0]},
                     **({"source_weights": weights_of(scores, weights, temperature)} if k > 1 else {})})
    return rows


def same_source_rows(source, keep, stats, min_gap, max_gap):
    """FuseChat-3.0's DPO pairs: for each prompt, the best and the worst sample of one source model, their score gap
    in [min_gap, max_gap] (and > 0); of several models in the band, the one whose best scores highest."""
    rows = []
    for pid, (prompt, _, samples) in in_prompts(source, keep, stats):
        pairs = []
        for model in dict.fromkeys(m for _, _, m in samples):
            own = [s for s in samples if s[2] == model]
            hi, lo = max(own, key=lambda s: s[0]), min(own, key=lambda s: s[0])
            if 0 < hi[0] - lo[0] and min_gap <= hi[0] - lo[0] <= max_gap:
                pairs.append((hi, lo))
        if not pairs:
            stats["no_pair"] += 1
            continue
        hi, lo = max(pairs, key=lambda p: p[0][0])
        stats["wins"][hi[2]] = stats["wins"].get(hi[2], 0) + 1
        for role, score in (("chosen", hi[0]), ("rejected", lo[0])):
            stats["scores"][role] = stats["scores"].get(role, 0.0) + score
        rows.append({"prompt_id": pid, "prompt": prompt_messages(prompt),
                     "chosen": [{"role": "assistant", "content": hi[1]}],
                     "rejected": [{"role": "assistant", "content": lo[1]}],
                     "source_model": hi[2], "scores": {"chosen": hi[0], "rejected": lo[0]}})
    return rows


def build(sources, out, *, target=None, prompts=None, overwrite=False, top_k_sources=1, source_weights="uniform",
          temperature=1.0, pairs="target", min_gap=0.0, max_gap=math.inf):
    """WRPO rows (with `target`) or SFT rows (without) from scored samples, or with pairs="same_source" DPO rows from
    the sources alone (same_source_rows); returns the summary. The other settings: see the module's doc.

    y_ws = the best-scored response over every source file (top_k_sources: the best of each of the K best source
    models, best_sources); y_wt and y_l = the best and worst
    of the target's non-empty samples. Prompts whose target samples all score the same (or
    with fewer than two non-empty ones) carry no preference and are dropped, as are prompts
    missing from the sources. Without a target, each prompt becomes a chat row prompt + y_ws
    (SFT on the sources' best). `prompts` (any rows with prompt ids, e.g. one part of
    eval.split) restricts the output to those prompts.
    """
    out = Path(out)
    if problem := settings_problem(target, top_k_sources, source_weights, temperature, pairs, min_gap, max_gap):
        raise DataError(problem)
    if problem := outputs_problem([out], [*sources, target, prompts], overwrite, "--out is the .jsonl file to write"):
        raise DataError(problem)
    source = {}
    for path in sources:
        read_scored(path, source)
    own = read_scored(target) if target else {}  # the target's samples
    for pid, (prompt, where, _) in own.items():  # y_ws must answer the target's prompt
        if pid in source:
            same_prompt(pid, source[pid], prompt, where)
    source = {pid: entry for pid, entry in source.items() if entry[2]}  # (a prompt without a non-empty response)
    keep = None if prompts is None else read_prompt_ids(prompts)
    stats = {"rows": 0, "no_source": 0, "tied": 0, "not_in_prompts": 0, "few_sources": 0, "no_pair": 0, "wins": {},
             "scores": {}}
    if pairs == "same_source":
        rows, kind = same_source_rows(source, keep, stats, min_gap, max_gap), "DPO"
        dropped = (f"{stats['no_pair']} without a source model's pair in the gap band [{min_gap}, {max_gap}], "
                   f"{stats['not_in_prompts']} outside --prompts")
    else:
        rows = wrpo_rows(source, own, keep, stats, top_k_sources, source_weights, temperature) if target else \
            sft_rows(source, keep, stats)
        kind = "WRPO" if target else "SFT"
        dropped = (f"{stats['no_source']} without source responses, {stats['tied']} without a target preference "
                   f"(tied, or < 2 samples), {stats['not_in_prompts']} outside --prompts" +
                   (f", {stats['few_sources']} with fewer than {top_k_sources} source models" if target else ""))
    if not rows:
        raise DataError(f"no rows to write: {dropped}")
    try:
        write_jsonl(rows, out)
    except OSError as e:  # e.g. --out under a file, or in a read-only folder
        raise DataError(f"cannot write {out} ({e.strerror or e})") from None
    stats["rows"] = len(rows)
    stats["scores"] = {k: v / len(rows) for k, v in stats["scores"].items()}
    print(f"{len(rows)} {kind} rows -> {out}; dropped: {dropped}")
    print("mean scores: " + ", ".join(f"{k} {v:.4g}" for k, v in stats["scores"].items()))
    print(("pairs by model: " if kind == "DPO" else "best source response by model: " if top_k_sources == 1 else
           f"source responses by model ({top_k_sources} per row): ") + ", ".join(
        f"{m} {n} ({n / len(rows):.0%})" for m, n in sorted(stats["wins"].items(), key=lambda x: -x[1])))
    return stats


def settings_problem(target, top_k, weights, temperature, pairs, min_gap, max_gap):
    """What is wrong with build's settings, or ""."""
    checks = [(top_k >= 1, f"--top_k_sources must be >= 1, got {top_k}"),
              (top_k == 1 or target and pairs == "target", "--top_k_sources builds WRPO rows: it needs --target"),
              (weights in ("uniform", "softmax"), f"--source_weights must be uniform or softmax, got {weights}"),
              (temperature > 0, f"--temperature must be > 0, got {temperature}"),
              (pairs in ("target", "same_source"), f"--pairs must be target or same_source, got {pairs}"),
              (pairs == "target" or not target, "--pairs=same_source pairs the sources' own samples: drop --target"),
              (0 <= min_gap <= max_gap, f"need 0 <= --min_gap <= --max_gap, got {min_gap}, {max_gap}"),
              (pairs == "same_source" or (min_gap, max_gap) == (0, math.inf),
               "--min_gap and --max_gap bound the same-source pairs: they need --pairs=same_source")]
    return next((problem for ok, problem in checks if not ok), "")


def main(argv):
    ap = argparse.ArgumentParser(prog="python -m eval.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", nargs="+", required=True, help="scored samples of the source models (eval/score.py)")
    ap.add_argument("--target", help="scored samples of the SFT target; without it, SFT rows (prompt + y_ws)")
    ap.add_argument("--prompts", help="only the prompts in this file (e.g. one part of eval.split)")
    ap.add_argument("--out", required=True, help="the .jsonl file to write")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--top_k_sources", type=int, default=1, help="K source responses per WRPO row (FuseRL): the best "
                    "of each of the K best source models")
    ap.add_argument("--source_weights", default="uniform", help="their weights: uniform or softmax (of the scores)")
    ap.add_argument("--temperature", type=float, default=1.0, help="the softmax's: weights ~ exp(score / temperature)")
    ap.add_argument("--pairs", default="target", help="target: the paper's WRPO rows; same_source: FuseChat-3.0's "
                    "DPO pairs, the best and worst sample of one source model")
    ap.add_argument("--min_gap", type=float, default=0.0, help="same_source: the smallest score gap kept")
    ap.add_argument("--max_gap", type=float, default=math.inf, help="same_source: the largest score gap kept")
    args = ap.parse_args(argv)
    try:
        build(args.sources, args.out, target=args.target, prompts=args.prompts, overwrite=args.overwrite,
              top_k_sources=args.top_k_sources, source_weights=args.source_weights, temperature=args.temperature,
              pairs=args.pairs, min_gap=args.min_gap, max_gap=args.max_gap)
    except DataError as e:
        fail(str(e))


if __name__ == "__main__":
    cli(main)
