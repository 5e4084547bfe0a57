"""What the eval scripts share: user errors, loading a model with its chat template, batched
generation, and resumable multi-rank output.

Output: each rank appends its finished rows (one per prompt) to its own part file beside the output, so
a crash loses at most the batch in flight; a rerun reads back what exists (the output and any
part files, of any world size) and skips those prompts; at the end rank 0 merges everything into
the output, written beside it and renamed, and removes the parts. A row is kept only if it was made as
this run would make it (resumed_rows): each row records its settings and the weights_id of its model (and
a scored row the responses it scored), and a rerun whose settings, model or input differ from any row's
refuses, naming what differs, unless --overwrite (start over). Rows are keyed by `prompt_id`
(or another field, e.g. a benchmark's `question_id`); an output ending in .json is one JSON
list (AlpacaEval's format), any other JSON lines.
"""

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from eval import fail, read_input, write_output
from fsdp_utils import loading_problem, resolve_model_path


def convert_rows(path, convert, skip_invalid=False, report=print, hint="fix or remove them"):
    """[convert(record, where)] of every record of `path` (the fusion pipeline's and the benchmarks' rows); a bad row
    is a RowError of convert's, and all of them are reported as file:line as the trainers report theirs."""
    errors, row_hints = [], []
    out = list(data.convert_records(data.read_records(path), convert, errors, row_hints))
    data.report_bad_rows(path, errors, row_hints, len(out), skip_invalid, report, hint)
    return out


def local_model(path, *, what, trust_remote_code):
    """The local folder of model `path` (a hub id's snapshot is downloaded), or a one-line error: a bad path, or a
    folder that breaks the loading rule of every script (fsdp_utils.loading_problem: whole safetensors weights only,
    never a pickle, even through an index; shipped code only with --trust_remote_code). Checked before any loading."""
    try:
        local = resolve_model_path(path)
    except (OSError, ValueError) as e:
        fail(f"cannot load the {what} {path}: {str(e).splitlines()[0]}")
    if problem := loading_problem(local, trust_remote_code):
        fail(f"cannot load the {what}: {problem}")
    return local


def weights_id(local):
    """A short name for the weights of the model folder `local`, whatever its path: a digest of each weight file's
    size and CRC-32 (checkpoint.model_identity). A resume compares it, so that another model under the same path or
    folder name never mixes into an output. Collective: every rank calls it."""
    from checkpoint import model_identity

    identity = json.dumps(model_identity(local), sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def load_for_eval(local, auto_class, *, what, padding_side, dtype, device, trust_remote_code):
    """(model, tokenizer) for inference from `local`, a folder local_model checked, or a one-line error: its files
    unreadable to transformers, or a tokenizer without a chat template."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code)
        model = auto_class.from_pretrained(local, dtype=dtype, trust_remote_code=trust_remote_code,
                                           use_safetensors=True).to(device).eval()
    except (OSError, ValueError) as e:  # bad files, or custom code transformers refuses
        fail(f"cannot load the {what} {local}: {str(e).splitlines()[0]}")
    if tokenizer.chat_template is None:
        fail(f"{local}: the tokenizer has no chat template")
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@torch.no_grad()
def generate(model, tokenizer, conversations, num_samples, temperature, top_p, max_new_tokens, seed_key):
    """`num_samples` replies to each conversation (a list of messages ending with a user turn),
    rendered with the chat template and left-padded into one generate call. temperature 0 is
    greedy. The sampling is seeded from `seed_key`, so the same batch gives the same text."""
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    torch.manual_seed(int.from_bytes(hashlib.sha256(seed_key.encode()).digest()[:8], "big") % 2**63)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
        dict(do_sample=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                         pad_token_id=tokenizer.pad_token_id, **sampling)
    new = out[:, enc["input_ids"].shape[1]:]  # left padding: every prompt ends at the same column
    decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [[t.strip() for t in decoded[i * num_samples : (i + 1) * num_samples]] for i in range(len(texts))]


def model_name(path):
    """A model's name for output files: its folder, or for a trainer's output (final/, step_N/) the run's."""
    path = Path(str(path).rstrip("/"))
    if path.name == "final" or path.name.startswith("step_"):
        return path.parent.name + ("" if path.name == "final" else f"-{path.name}")
    return path.name


def parts(out):
    return sorted(out.parent.glob(f"{out.name}.part-*"))


def done_rows(out, key="prompt_id"):
    """{row[key]: row} already written, in `out` and in the part files of an interrupted run."""
    rows = {}
    if out.suffix == ".json" and out.exists():
        try:
            rows = {row[key]: row for row in json.loads(read_input(out))}
        except (json.JSONDecodeError, KeyError, TypeError):
            fail(f"{out} exists and is not a list of answers with '{key}': move it away, or pick another --out")
    for path in ([] if out.suffix == ".json" else [out]) + parts(out):
        if not path.exists():
            continue
        for line in read_input(path, errors="replace").splitlines():  # (a crash may tear the last)
            try:
                row = json.loads(line)
                rows[row[key]] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a line torn by a crash: that prompt is done again
    return rows


def resumed_rows(out, key, made_with, overwrite):
    """The rows a rerun keeps: {row[key]: row} of `out` and its part files (done_rows), each checked against
    made_with(row) -> {field: value}, what a row of this run holds besides its content (the settings, the model's
    weights_id, the data it was made from). A row made otherwise fails the run, naming what differs: a resume never
    mixes two models' or two settings' rows in one file. overwrite: start over, none kept (rank 0 removes the old
    output and part files first). Collective."""
    if overwrite:
        if dist.get_rank() == 0:
            try:
                for path in [out] + parts(out):
                    path.unlink(missing_ok=True)
            except OSError as e:  # (the other ranks stop with this one: torchrun ends them)
                fail(f"cannot remove {e.filename} for --overwrite ({e.strerror or e})")
        dist.barrier()  # no rank appends to a part file before it is gone
        return {}
    rows = done_rows(out, key)
    changed = [(row[key], diff) for row in rows.values() if (diff := differences(row, made_with(row)))]
    if changed:
        pid, diff = changed[0]
        fail(f"{out} holds {len(changed)} row(s) made otherwise than this run would make them (first, {key} {pid!r}: "
             f"{'; '.join(diff)}); pass --overwrite to start over, or give another --out")
    return rows


def differences(row, wanted):
    """What of `wanted` ({field: value}, one level into dicts) `row` does not hold, in words: "field was X, now Y"."""
    def shown(x):
        text = "none recorded" if x is None else json.dumps(x, ensure_ascii=False)
        return text if len(text) <= 60 else text[:57] + "..."

    def named(name):  # (weights_id's digest says little by itself)
        return f"{name} (the model's weights)" if name.endswith(".weights") else name

    out = []
    for field, want in wanted.items():
        have = row.get(field)
        if isinstance(want, dict) and isinstance(have, dict):
            out += [f"{named(f'{field}.{k}')} was {shown(have.get(k))}, now {shown(v)}"
                    for k, v in want.items() if have.get(k) != v]
        elif have != want:
            out.append(f"{field} was {shown(have)}, now {shown(want)}")
    return out


def open_part(out, rank, world):
    """This rank's part file, for appending; a torn last line is closed off first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    f = open(out.with_name(f"{out.name}.part-{rank:03d}-of-{world:03d}"), "a", encoding="utf-8")
    if f.tell():
        with open(f.name, "rb") as check:
            check.seek(-1, os.SEEK_END)
            if check.read(1) != b"\n":
                f.write("\n")
    return f


def append(f, row):
    f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_rows(out, todo, chunk, process, rank, world):
    """process(items) -> output rows, over this rank's `todo` in chunks of `chunk` items.

    Each chunk's rows are appended to the rank's part file as soon as they exist, so a crash
    loses at most one chunk; a progress bar shows prompts/s. Returns when every rank is done.
    """
    t0 = time.time()
    bar = tqdm(total=len(todo), desc=f"rank {rank}", unit="prompt", disable=not sys.stderr.isatty(), position=rank)
    with open_part(out, rank, world) as part:
        for i in range(0, len(todo), chunk):
            items = todo[i : i + chunk]
            for row in process(items):
                append(part, row)
            part.flush()
            bar.update(len(items))
            bar.set_postfix(prompts_per_s=f"{(i + len(items)) / (time.time() - t0):.2f}")
    bar.close()
    if world > 1:
        dist.barrier()


def merge(out, prompt_ids, key="prompt_id"):
    """Rank 0, after every rank is done: `out` = the rows in prompt order (others already there after)."""
    rows = done_rows(out, key)
    missing = [pid for pid in prompt_ids if pid not in rows]
    if missing:
        fail(f"{len(missing)} prompts have no output row (first: {missing[0]})")
    wanted = set(prompt_ids)
    ordered = [rows[pid] for pid in prompt_ids] + [r for pid, r in rows.items() if pid not in wanted]
    if out.suffix == ".json":
        write_output(out, json.dumps(ordered, indent=2, ensure_ascii=False) + "\n")
    else:
        write_jsonl(ordered, out)
    for path in parts(out):
        path.unlink()


def write_jsonl(rows, path):
    """All rows or nothing (eval.write_output), one JSON object per line."""
    write_output(path, lambda f: f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def prompt_id_of(row):
    """The row's prompt_id, or one derived from its prompt (the same on every machine): the `prompt`, or
    for a chat row the turns before its last assistant reply."""
    pid = row.get("prompt_id")
    if pid not in (None, ""):
        return data.prompt_id_text(pid)  # a string or an integer; a RowError (file:line) otherwise
    prompt = row.get("prompt")
    if prompt is None and isinstance(row.get("messages"), list):
        turns = row["messages"]
        replies = [i for i, m in enumerate(turns) if isinstance(m, dict) and m.get("role") == "assistant"]
        prompt = turns[: replies[-1]] if replies else turns
    text = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return "sha256-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]  # (never fails)
