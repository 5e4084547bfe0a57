"""Split rows between the paper's two stages by prompt: about one third for SFT, the rest for WRPO.

    python -m eval.split --data=rows.jsonl --out_dir=DIR       # DIR/sft.jsonl and DIR/wrpo.jsonl

Rows are WRPO rows, chat rows ({"messages": [...]}) or bare prompts ({"prompt_id", "prompt"}), every
one checked (file:line errors). A seeded hash of each row's prompt_id (derived from the prompt text
when a row has none) picks its part, so the split does not depend on row order or file layout.
"""

import argparse
import hashlib
import json
from pathlib import Path

from data import DataError, RowError, prompt_id_text, prompt_messages, validate_chat, validate_row
from eval import cli, fail, outputs_problem
from eval.common import convert_rows, prompt_id_of, write_jsonl


def in_sft_part(prompt_id, fraction, seed):
    """A seeded hash of the prompt id decides, so the split ignores row order and file layout."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def checked(rec, where):
    """A WRPO row, a chat row or a bare prompt, validated; all are split by their prompt."""
    if not isinstance(rec, dict):
        raise RowError(f"row must be a JSON object, got {type(rec).__name__}")
    if rec.get("prompt_id") is not None:  # none (or null): derived from the prompt
        prompt_id_text(rec["prompt_id"])
    if "messages" in rec:
        validate_chat(rec)
    elif "chosen" in rec or "rejected" in rec:
        validate_row(rec)
    elif "prompt" not in rec:
        raise RowError("missing field 'prompt'")
    else:
        prompt_messages(rec["prompt"])
    try:  # rows are written back whole, extra fields too
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RowError("holds text that cannot be written (an unpaired surrogate escape such as \\ud800)") from None
    return rec


def split(path, out_dir, *, sft_fraction=1 / 3, seed=42, overwrite=False):
    """Write out_dir/sft.jsonl (about sft_fraction of the prompts) and out_dir/wrpo.jsonl (the rest).

    The paper fine-tunes on y_ws for one third of the prompts and runs WRPO on the other two
    thirds. Rows keep their content; rows without a prompt_id get the derived one.
    """
    if not 0 < sft_fraction < 1:
        raise DataError(f"sft_fraction must be in (0, 1), got {sft_fraction}")
    out_dir = Path(out_dir)
    targets = {"sft": out_dir / "sft.jsonl", "wrpo": out_dir / "wrpo.jsonl"}
    # before any work: never over (or inside) the data, whose folder a rerun would read back with the split in it
    if problem := outputs_problem(targets.values(), [path], overwrite, "pick another --out_dir"):
        raise DataError(problem)
    records = convert_rows(path, checked, hint="fix or remove them; nothing was written")
    parts = {"sft": [], "wrpo": []}
    for rec in records:
        rec = {"prompt_id": prompt_id_of(rec), **{k: v for k, v in rec.items() if k != "prompt_id"}}
        parts["sft" if in_sft_part(rec["prompt_id"], sft_fraction, seed) else "wrpo"].append(rec)
    try:
        for name, target in targets.items():
            write_jsonl(parts[name], target)  # never a half-written file under the final name
    except OSError as e:  # e.g. out_dir under a file, or read-only
        raise DataError(f"cannot write the split to {out_dir} ({e.strerror or e})") from None
    print(f"{len(records)} rows -> {len(parts['sft'])} SFT rows ({targets['sft']}), "
          f"{len(parts['wrpo'])} WRPO rows ({targets['wrpo']})")
    return {name: len(rows) for name, rows in parts.items()}


def main(argv):
    ap = argparse.ArgumentParser(prog="python -m eval.split", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="rows with a prompt (.jsonl, .json, .parquet or a folder)")
    ap.add_argument("--out_dir", required=True, help="writes sft.jsonl and wrpo.jsonl here")
    ap.add_argument("--sft_fraction", type=float, default=1 / 3, help="share of prompts for SFT (paper: 1/3)")
    ap.add_argument("--seed", type=int, default=42, help="seed of the hash that assigns prompts")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing split in out_dir")
    args = ap.parse_args(argv)
    try:
        split(args.data, args.out_dir, sft_fraction=args.sft_fraction, seed=args.seed, overwrite=args.overwrite)
    except DataError as e:
        fail(str(e))


if __name__ == "__main__":
    cli(main)
