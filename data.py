"""WRPO data: reading, validating, tokenizing, truncating, sharding and batching rows.

A row (the released `AALF/ultrafeedback_wrpo` shape, see README):

    {"prompt_id": "...",
     "prompt":   [{"role": "user", "content": x}]          # or a plain string
     "chosen":   [{"role": "assistant", "content": y_ws},  # source response (weight alpha)
                  {"role": "assistant", "content": y_wt}], # target response (weight 1 - alpha)
     "rejected": [{"role": "assistant", "content": y_l}]}

A row whose `chosen` has one element is a plain DPO pair (chosen, rejected). SFT also reads
chat rows {"messages": [...]}. Every row is validated before training starts; all bad rows are
reported as file:line.

    python data.py split --data=rows.jsonl --out_dir=DIR   # 1/3 SFT rows, 2/3 WRPO rows (or prompts)
    python data.py build --sources A.jsonl B.jsonl [--target T.jsonl] [--prompts P.jsonl] --out rows.jsonl
        # from scored samples (eval/score.py): WRPO rows, or without --target SFT rows (prompt + y_ws)
"""

import argparse
import hashlib
import json
import math
import os
import random
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100  # label of tokens that get no loss (prompt, padding)
ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 50


class DataError(ValueError):
    """A user-facing problem with the data; the message names file:line and reason."""


class RowError(ValueError):
    pass


@dataclass
class Example:
    prompt_ids: list  # chat-template tokens of the prompt, ending with the assistant header
    responses: list  # token lists: chosen[0], (chosen[1]), rejected; each ends with end-of-turn
    n_chosen: int  # 2 for WRPO rows, 1 for DPO pairs
    where: str  # "file:line", for error messages
    prompt_id: str = ""


# -----------------------------------------------------------------------------
# reading files


def _parse_json(text):
    """json.loads, with every way a line can be broken turned into a RowError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RowError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise RowError("malformed JSON (nested too deeply)") from None


def read_records(path):
    """Return [(where, record_or_RowError)] from a .jsonl/.json/.parquet file or a folder of them."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
        if not files:
            raise DataError(f"{path}: folder has no .jsonl, .json or .parquet files")
        return [rec for f in files for rec in read_records(f)]
    try:
        if path.suffix == ".jsonl":
            out = []
            with open(path, "rb") as f:
                for i, raw in enumerate(f, 1):
                    try:
                        line = raw.decode("utf-8")
                        if line.strip():
                            out.append((f"{path}:{i}", _parse_json(line)))
                    except UnicodeDecodeError as e:
                        out.append((f"{path}:{i}", RowError(f"not valid UTF-8 (byte {e.start + 1})")))
                    except RowError as e:
                        out.append((f"{path}:{i}", e))
            return out
        if path.suffix == ".json":
            try:
                rows = json.loads(path.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not valid UTF-8 (byte {e.start + 1})") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{path}: malformed JSON (nested too deeply)") from None
            if not isinstance(rows, list):
                raise DataError(f"{path}: a .json data file must hold a list of rows")
            return [(f"{path}:row {i}", r) for i, r in enumerate(rows)]
        if path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
            try:
                table = pq.read_table(path)
            except Exception as e:  # pyarrow's errors have no common base besides Exception
                raise DataError(f"{path}: not a readable parquet file ({e})") from None
            return [(f"{path}:row {i}", r) for i, r in enumerate(table.to_pylist())]
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    raise DataError(f"{path}: unsupported data file type '{path.suffix}' (use .jsonl, .json or .parquet)")


# -----------------------------------------------------------------------------
# validation: one row -> (prompt messages, responses, n_chosen, prompt_id)


def _content(msg, field, i, want_role):
    """Text of a message given as a plain string or a {"role", "content"} dict."""
    if isinstance(msg, str):
        text = msg
    elif isinstance(msg, dict):
        if "content" not in msg:
            raise RowError(f"{field}[{i}] has no 'content'")
        role = msg.get("role", want_role)
        if role != want_role:
            raise RowError(f"{field}[{i}] has role '{role}', expected '{want_role}'")
        text = msg["content"]
        if not isinstance(text, str):
            raise RowError(f"{field}[{i}].content must be a string, got {type(text).__name__}")
    else:
        raise RowError(f"{field}[{i}] must be a message dict or a string, got {type(msg).__name__}")
    return _checked_text(text, f"{field}[{i}]")


def _checked_text(text, name):
    if not text.strip():
        raise RowError(f"{name} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RowError(f"{name} is not valid text (an unpaired surrogate escape such as \\ud800)") from None
    return text


def _prompt_messages(prompt):
    if isinstance(prompt, str):
        return [{"role": "user", "content": _checked_text(prompt, "prompt")}]
    if not isinstance(prompt, list) or not prompt:
        raise RowError("prompt must be a non-empty string or list of messages")
    messages = []
    for i, msg in enumerate(prompt):
        if isinstance(msg, dict):
            role = msg.get("role")
            if role not in ROLES:
                raise RowError(f"prompt[{i}] has role {role!r}, expected one of {', '.join(ROLES)}")
        else:  # plain strings alternate user, assistant, user, ...
            role = "user" if i % 2 == 0 else "assistant"
        messages.append({"role": role, "content": _content(msg, "prompt", i, role)})
    if messages[-1]["role"] != "user":
        raise RowError(f"prompt must end with a user turn, ends with '{messages[-1]['role']}'")
    return messages


def validate_row(row):
    """Check one record; return (prompt messages, [chosen..., rejected] texts, n_chosen, prompt_id)."""
    if not isinstance(row, dict):
        raise RowError(f"row must be a JSON object, got {type(row).__name__}")
    for field in ("prompt", "chosen", "rejected"):
        if field not in row:
            raise RowError(f"missing field '{field}'")
    messages = _prompt_messages(row["prompt"])
    chosen, rejected = row["chosen"], row["rejected"]
    if not isinstance(chosen, list) or len(chosen) not in (1, 2):
        raise RowError("chosen must be a list of 1 (DPO) or 2 (WRPO: source, target) responses")
    if not isinstance(rejected, list) or len(rejected) != 1:
        raise RowError("rejected must be a list of exactly 1 response")
    texts = [_content(m, "chosen", i, "assistant") for i, m in enumerate(chosen)]
    texts.append(_content(rejected[0], "rejected", 0, "assistant"))
    prompt_id = row.get("prompt_id", "")
    if not isinstance(prompt_id, (str, int)):
        raise RowError(f"prompt_id must be a string, got {type(prompt_id).__name__}")
    return messages, texts, len(chosen), str(prompt_id)


def validate_chat(row):
    """A chat row {"messages": [...]} for SFT: valid roles, non-empty turns, at least one assistant turn."""
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise RowError("messages must be a non-empty list")
    out = []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict):
            raise RowError(f"messages[{i}] must be a {{'role', 'content'}} dict, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise RowError(f"messages[{i}] has role {role!r}, expected one of {', '.join(ROLES)}")
        out.append({"role": role, "content": _content(msg, "messages", i, role)})
    if not any(m["role"] == "assistant" for m in out):
        raise RowError("messages has no assistant turn to learn from")
    return out


def sft_messages(row):
    """SFT conversation of a row: a chat row's messages, or a WRPO row's prompt + chosen[0] (y_ws)."""
    if not isinstance(row, dict):
        raise RowError(f"row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return validate_chat(row)
    messages, texts, _, _ = validate_row(row)
    return messages + [{"role": "assistant", "content": texts[0]}]


# -----------------------------------------------------------------------------
# tokenization and truncation


def check_tokenizer(tokenizer, name=""):
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer {name} has no chat template; WRPO renders rows with it")


def encode(tokenizer, messages, responses):
    """Prompt tokens and per-response tokens, all from the tokenizer's chat template.

    prompt = template(messages, add_generation_prompt=True); each response is the rest of
    template(messages + [assistant response]), so it includes the end-of-turn token.
    """
    texts = [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)]
    for r in responses:
        texts.append(tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": r}], tokenize=False))
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template adds BOS itself
    prompt = ids[0]
    out = []
    for full in ids[1:]:
        if full[: len(prompt)] != prompt:
            raise RowError("the chat template does not render the prompt as a prefix of prompt + response")
        if len(full) == len(prompt):
            raise RowError("a response renders to no tokens")
        out.append(full[len(prompt):])
    return prompt, out


def encode_chat(tokenizer, messages):
    """Tokens of a whole conversation and a mask of its assistant tokens.

    Rendered turn by turn: each assistant turn is what template(messages[:k + 1]) adds to
    template(messages[:k], add_generation_prompt=True), i.e. the reply and its end-of-turn
    token, never the header before it.
    """
    ids, mask = [], []
    for k, msg in enumerate(messages):
        before = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=msg["role"] == "assistant",
                                               tokenize=False) if k else ""
        after = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        head, full = tokenizer([before, after], add_special_tokens=False)["input_ids"]
        if full[: len(ids)] != ids or full[: len(head)] != head:
            raise RowError(f"the chat template does not render messages[:{k}] as a prefix of messages[:{k + 1}]")
        is_reply = msg["role"] == "assistant"
        mask += [False] * (len(head) - len(ids)) + [is_reply] * (len(full) - len(head))
        ids = full
    return ids, mask


def truncate(prompt, responses, max_length, max_prompt_length):
    """The reference code's rule, joint over all responses of the row.

    If prompt + the longest response exceeds max_length, keep the last max_prompt_length
    prompt tokens; if it is still too long, cut every response to
    max_length - max_prompt_length tokens.
    """
    longest = max(len(r) for r in responses)
    if len(prompt) + longest > max_length:
        prompt = prompt[-max_prompt_length:]
    if len(prompt) + longest > max_length:
        responses = [r[: max_length - max_prompt_length] for r in responses]
    return prompt, responses


def convert_rows(path, convert, skip_invalid=False, report=print):
    """convert(record) for every record of `path`; every bad row is reported, as file:line: reason.

    Bad rows stop the run (DataError listing them), or with skip_invalid=True are left out, and
    `report` gets one line with their count and the first few.
    """
    out, errors = [], []
    for where, rec in read_records(path):
        try:
            if isinstance(rec, RowError):
                raise rec
            out.append(convert(rec, where))
        except RowError as e:
            errors.append(f"{where}: {e}")
        except RecursionError:  # a record nested deeply enough to exhaust the stack while checking it
            errors.append(f"{where}: nested too deeply")
    if errors and skip_invalid:
        shown = "\n  ".join(errors[:5]) + ("\n  ..." if len(errors) > 5 else "")
        report(f"skipped {len(errors)} bad row(s) of {path} (skip_invalid_rows):\n  {shown}")
    elif errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise DataError(f"{len(errors)} bad row(s) in {path}:\n  {shown}{more}\n(fix them, or pass "
                        "--skip_invalid_rows=true to train without them)")
    if not out:
        raise DataError(f"{path}: no rows" + (" left after skipping the bad ones" if errors else ""))
    return out


def load_dataset(path, tokenizer, *, max_length=2048, max_prompt_length=1800, truncation="keep_end",
                 skip_invalid=False, report=print):
    """Read, validate and tokenize every row. Raises DataError listing every bad row (see convert_rows).

    truncation: "keep_end" applies the paper's rule (see `truncate`); "error" reports rows
    longer than max_length as bad rows instead.
    """
    if not 0 < max_prompt_length < max_length:
        raise DataError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
    if truncation not in ("keep_end", "error"):
        raise DataError(f"truncation must be 'keep_end' or 'error', got '{truncation}'")
    check_tokenizer(tokenizer)

    def convert(rec, where):
        messages, texts, n_chosen, prompt_id = validate_row(rec)
        prompt, responses = encode(tokenizer, messages, texts)
        length = len(prompt) + max(len(r) for r in responses)
        if truncation == "error" and length > max_length:
            raise RowError(f"prompt + longest response is {length} tokens, over max_length {max_length}")
        prompt, responses = truncate(prompt, responses, max_length, max_prompt_length)
        return Example(prompt, responses, n_chosen, where, prompt_id)

    return convert_rows(path, convert, skip_invalid, report)


@dataclass
class Sequence:
    ids: list  # one whole sequence (an SFT conversation, or a prompt + one response)
    labels: list  # ids where the loss applies, IGNORE elsewhere (always IGNORE at position 0)
    where: str
    start: int = 0  # position id of the first token (> 0: continues a shared prompt, see attention.py)


def load_sft_dataset(path, tokenizer, *, max_length=2048, loss_on="assistant", truncation="keep_start",
                     skip_invalid=False, report=print):
    """Read, validate and tokenize SFT rows (chat rows, or WRPO rows trained on prompt + y_ws).

    loss_on: "assistant" scores every assistant turn (end-of-turn token included); "all" scores
    every token after the first, the paper's setting. truncation: "keep_start" cuts an example
    to its first max_length tokens; "error" reports longer examples as bad rows.
    """
    if loss_on not in ("assistant", "all"):
        raise DataError(f"loss_on must be 'assistant' or 'all', got '{loss_on}'")
    if truncation not in ("keep_start", "error"):
        raise DataError(f"truncation must be 'keep_start' or 'error', got '{truncation}'")
    check_tokenizer(tokenizer)

    def convert(rec, where):
        ids, mask = encode_chat(tokenizer, sft_messages(rec))
        if len(ids) > max_length:
            if truncation == "error":
                raise RowError(f"conversation is {len(ids)} tokens, over max_length {max_length}")
            ids, mask = ids[:max_length], mask[:max_length]
        labels = [t if (m or loss_on == "all") else IGNORE for t, m in zip(ids, mask)]
        labels[0] = IGNORE  # nothing predicts an example's first token
        if all(t == IGNORE for t in labels):
            raise RowError(f"no assistant token within max_length {max_length}")
        return Sequence(ids, labels, where)

    return convert_rows(path, convert, skip_invalid, report)


def pack(lengths, max_length, seed):
    """Group examples into rows of at most max_length tokens (next-fit after a seeded shuffle).

    Returns a list of rows, each a list of example indices. Examples are never split.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    rows, current, used = [], [], 0
    for i in order:
        if current and used + lengths[i] > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        rows.append(current)
    return rows


def collate_packed(rows, pad_id, segments=False):
    """Rows of several sequences each -> input_ids, position_ids, labels [R, T].

    Position ids restart at 0 for every sequence, and no attention mask is passed: transformers
    then builds a block-causal mask, so tokens never attend across a sequence boundary. This
    only holds with use_cache=False (with a cache the sequences attend to each other). Padding at
    the end of a row is one more segment, with labels IGNORE. With segments=True, `segments`
    [R, T] numbers the sequences 0, 1, ... across all rows (-1 on padding) and `n_seqs` counts
    them, so that log-probs are summed per sequence rather than per row.
    """
    T = max(sum(len(ex.ids) for ex in row) for row in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)
    seg_ids = torch.full((len(rows), T), -1, dtype=torch.long)
    seq = 0
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            n = len(ex.ids)
            input_ids[r, at : at + n] = torch.tensor(ex.ids)
            labels[r, at : at + n] = torch.tensor(ex.labels)
            position_ids[r, at : at + n] = torch.arange(ex.start, ex.start + n)
            seg_ids[r, at : at + n] = seq
            at, seq = at + n, seq + 1
        position_ids[r, at:] = torch.arange(T - at)
    out = dict(input_ids=input_ids, position_ids=position_ids, labels=labels)
    return {**out, "segments": seg_ids, "n_seqs": seq} if segments else out


def row_sequences(ex, shared_prompt=False):
    """A preference row as its sequences: prompt + each response, scored on the response.

    shared_prompt: one copy of the prompt, [prompt + y1], [prompt[-1] + y2], [prompt[-1] + y3],
    to be packed back to back. The later ones start at position len(prompt) - 1, so that under
    attention.packed_sdpa they attend to the prompt before them; their repeated last prompt
    token is what predicts their first response token.
    """
    p = ex.prompt_ids
    if not shared_prompt:
        return [Sequence(p + r, [IGNORE] * len(p) + r, ex.where) for r in ex.responses]
    first, *rest = ex.responses
    return [Sequence(p + first, [IGNORE] * len(p) + first, ex.where)] + [
        Sequence(p[-1:] + r, [IGNORE] + r, ex.where, start=len(p) - 1) for r in rest]


def row_length(ex, shared_prompt=False):
    """Tokens of a row's sequences (as laid out by row_sequences)."""
    return sum(len(s.ids) for s in row_sequences(ex, shared_prompt))


def collate(examples, pad_id, packed=False, shared_prompt=False):
    """The sequences of a micro-batch of preference rows, and where each row's three are.

    packed: the sequences back to back in rows as wide as the longest of them (first fit,
    longest first, so rows come out nearly full), with position ids restarting per sequence
    (see collate_packed). shared_prompt (packed only): each row's sequences stay together,
    sharing one copy of the prompt (row_sequences). Otherwise one right-padded row per sequence
    with an attention_mask. Either way the index tensors ws, wt, rej [B] select each row's
    source-chosen, target-chosen and rejected sequence; for DPO rows ws == wt.
    """
    if shared_prompt and not packed:
        raise ValueError("shared_prompt needs packed=True")
    ws, wt, rej, n = [], [], [], 0
    for ex in examples:
        ws.append(n)
        wt.append(n + ex.n_chosen - 1)
        rej.append(n + ex.n_chosen)
        n += len(ex.responses)
    if not packed:
        seqs = [s for ex in examples for s in row_sequences(ex)]
        return {**collate_padded(seqs, pad_id), "ws": torch.tensor(ws), "wt": torch.tensor(wt),
                "rej": torch.tensor(rej)}
    # units that must stay whole in a row: a row's sequences when they share a prompt, else each sequence
    units, k = [], 0
    for ex in examples:
        seqs = row_sequences(ex, shared_prompt)
        numbered = list(zip(range(k, k + len(seqs)), seqs))
        units += [numbered] if shared_prompt else [[x] for x in numbered]
        k += len(seqs)
    size = [sum(len(s.ids) for _, s in u) for u in units]
    width = max(size)
    rows, fill = [], []
    for u in sorted(range(len(units)), key=lambda u: -size[u]):
        r = next((r for r in range(len(rows)) if fill[r] + size[u] <= width), len(rows))
        if r == len(rows):
            rows.append([])
            fill.append(0)
        rows[r] += units[u]
        fill[r] += size[u]
    segment = {k: i for i, (k, _) in enumerate(x for row in rows for x in row)}  # collate_packed's numbering
    remap = lambda idx: torch.tensor([segment[k] for k in idx])  # noqa: E731
    return {**collate_packed([[s for _, s in row] for row in rows], pad_id, segments=True),
            "ws": remap(ws), "wt": remap(wt), "rej": remap(rej)}


def collate_padded(seqs, pad_id):
    """One right-padded row per sequence: input_ids, attention_mask, labels [N, T]."""
    T = max(len(s.ids) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s.ids)] = torch.tensor(s.ids)
        labels[i, : len(s.ids)] = torch.tensor(s.labels)
        attention_mask[i, : len(s.ids)] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def token_budget_batches(rows, lengths, budget):
    """Split one rank's rows into micro-batches of at most `budget` tokens (longest rows first).

    Grouping rows of similar length fills each budget well; a row longer than the budget gets a
    micro-batch of its own.
    """
    batches, current, used = [], [], 0
    for i in sorted(rows, key=lambda i: -lengths[i]):
        if current and used + lengths[i] > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    return batches + [current] if current else batches


def row_name(ex):
    """How messages name a row: file:line, and its prompt_id when it has one."""
    pid = getattr(ex, "prompt_id", "")
    return f"{ex.where} ({pid})" if pid else ex.where


def fingerprint(examples):
    """A digest of tokenized rows (Examples or Sequences), in order: any change to the data, the
    tokenizer or its chat template, or the truncation settings changes it."""
    h = hashlib.sha256()
    for ex in examples:
        parts = [[ex.n_chosen], ex.prompt_ids, *ex.responses] if isinstance(ex, Example) else [ex.ids, ex.labels]
        for p in parts:
            h.update(array("q", p).tobytes() + b"|")
        h.update(b";")
    return f"{len(examples)} rows, sha256 {h.hexdigest()[:20]}"


# -----------------------------------------------------------------------------
# sharding across ranks and batching


def step_batches(n_rows, *, epoch, seed, global_batch, micro_batch, rank, world):
    """For each optimizer step of one epoch, this rank's micro-batches (lists of row indices).

    The epoch's order is a seeded permutation; each step takes the next `global_batch` rows
    and rank r gets the r-th contiguous slice of them, so ranks never share a row and any
    world size sees the same rows in the same optimizer step. A last partial batch is dropped.
    """
    per_rank = global_batch // world
    assert per_rank * world == global_batch and per_rank % micro_batch == 0
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    for step in range(n_rows // global_batch):
        start = step * global_batch + rank * per_rank
        rows = perm[start : start + per_rank]
        yield [rows[i : i + micro_batch] for i in range(0, per_rank, micro_batch)]




# -----------------------------------------------------------------------------
# command line: python data.py split ...


def prompt_id_of(row):
    """The row's prompt_id, or one derived from its prompt text (the same on every machine)."""
    pid = row.get("prompt_id")
    if pid not in (None, ""):
        return str(pid)
    text = json.dumps(row.get("prompt"), sort_keys=True, ensure_ascii=False)
    return "sha256-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def in_sft_part(prompt_id, fraction, seed):
    """A seeded hash of the prompt id decides, so the split ignores row order and file layout."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split(path, out_dir, *, sft_fraction=1 / 3, seed=42, overwrite=False):
    """Write out_dir/sft.jsonl (about sft_fraction of the prompts) and out_dir/wrpo.jsonl (the rest).

    The paper fine-tunes on y_ws for one third of the prompts and runs WRPO on the other two
    thirds. Rows (WRPO rows, chat rows or bare prompts) keep their content; rows without a
    prompt_id get the derived one.
    """
    if not 0 < sft_fraction < 1:
        raise DataError(f"sft_fraction must be in (0, 1), got {sft_fraction}")
    def checked(rec, where):  # WRPO rows, chat rows, or bare prompts ({"prompt": ...}) are all split by prompt
        if not isinstance(rec, dict):
            raise RowError(f"row must be a JSON object, got {type(rec).__name__}")
        if "messages" in rec:
            validate_chat(rec)
        elif "chosen" in rec or "rejected" in rec:
            validate_row(rec)
        elif "prompt" not in rec:
            raise RowError("missing field 'prompt'")
        else:
            _prompt_messages(rec["prompt"])
        return rec

    records = convert_rows(path, checked)
    out_dir = Path(out_dir)
    targets = {"sft": out_dir / "sft.jsonl", "wrpo": out_dir / "wrpo.jsonl"}
    if not overwrite and any(t.exists() for t in targets.values()):
        raise DataError(f"{out_dir} already holds a split; pass --overwrite to replace it")
    parts = {"sft": [], "wrpo": []}
    for rec in records:
        rec = {"prompt_id": prompt_id_of(rec), **{k: v for k, v in rec.items() if k != "prompt_id"}}
        parts["sft" if in_sft_part(rec["prompt_id"], sft_fraction, seed) else "wrpo"].append(rec)
    for name, target in targets.items():
        write_jsonl(parts[name], target)  # never a half-written file under the final name
    print(f"{len(records)} rows -> {len(parts['sft'])} SFT rows ({targets['sft']}), "
          f"{len(parts['wrpo'])} WRPO rows ({targets['wrpo']})")
    return {name: len(rows) for name, rows in parts.items()}


def write_jsonl(rows, path):
    """All rows or nothing: written beside the target, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_scored(path):
    """Scored samples (eval/score.py): {prompt_id: (prompt, [(score, text, model)...])}, every row checked."""
    def checked(rec, where):
        if not isinstance(rec, dict):
            raise RowError(f"row must be a JSON object, got {type(rec).__name__}")
        for field in ("prompt", "responses", "scores"):
            if field not in rec:
                raise RowError(f"missing field '{field}'" + (" (score the file with eval/score.py first)"
                                                             if field == "scores" else ""))
        _prompt_messages(rec["prompt"])
        texts, scores = rec["responses"], rec["scores"]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise RowError("responses must be a non-empty list of strings")
        number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E731
        if not isinstance(scores, list) or len(scores) != len(texts) or not all(map(number, scores)):
            raise RowError(f"scores must be a list of {len(texts)} finite numbers, one per response")
        model = str(rec.get("model", Path(path).stem))
        return prompt_id_of(rec), rec["prompt"], [(float(x), t, model) for x, t in zip(scores, texts) if t.strip()]

    out = {}  # empty responses (a sample that stopped at once) are left out: no row may hold one
    for pid, prompt, samples in convert_rows(path, checked):
        out.setdefault(pid, (prompt, []))[1].extend(samples)  # a prompt may come in several rows
    return out


def build(sources, out, *, target=None, prompts=None, overwrite=False):
    """WRPO rows (with `target`) or SFT rows (without) from scored samples; returns the summary.

    y_ws = the best-scored response over every source file; y_wt and y_l = the best and worst
    of the target's non-empty samples. Prompts whose target samples all score the same (or
    with fewer than two non-empty ones) carry no preference and are dropped, as are prompts
    missing from the sources. Without a target, each
    prompt becomes a chat row prompt + y_ws (SFT on the sources' best). `prompts` (any rows with
    prompt ids, e.g. one part of `split`) restricts the output to those prompts.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} exists; pass --overwrite to replace it")
    source = {}
    for path in sources:
        for pid, (prompt, samples) in read_scored(path).items():
            if samples:
                source.setdefault(pid, (prompt, []))[1].extend(samples)
    keep = None if prompts is None else {prompt_id_of(rec) for _, rec in read_records(prompts)
                                         if isinstance(rec, dict)}
    stats = {"rows": 0, "no_source": 0, "tied": 0, "not_in_prompts": 0, "wins": {}, "scores": {}}
    rows = []

    def add_score(role, x):
        stats["scores"][role] = stats["scores"].get(role, 0.0) + x

    def best_source(pid):
        score, text, model = max(source[pid][1], key=lambda s: s[0])  # first of the best on ties
        stats["wins"][model] = stats["wins"].get(model, 0) + 1
        add_score("y_ws", score)
        return score, text, model

    if target is None:
        for pid, (prompt, _) in source.items():
            if keep is not None and pid not in keep:
                stats["not_in_prompts"] += 1
                continue
            score, text, model = best_source(pid)
            messages = _prompt_messages(prompt) + [{"role": "assistant", "content": text}]
            rows.append({"prompt_id": pid, "messages": messages, "source_model": model, "score": score})
    else:
        for pid, (prompt, samples) in read_scored(target).items():
            if keep is not None and pid not in keep:
                stats["not_in_prompts"] += 1
                continue
            if pid not in source:
                stats["no_source"] += 1
                continue
            if len(samples) < 2:
                stats["tied"] += 1  # fewer than two non-empty samples: no preference either
                continue
            hi, lo = max(samples, key=lambda s: s[0]), min(samples, key=lambda s: s[0])
            if hi[0] == lo[0]:
                stats["tied"] += 1
                continue
            ws = best_source(pid)
            add_score("y_wt", hi[0])
            add_score("y_l", lo[0])
            rows.append({"prompt_id": pid, "prompt": _prompt_messages(prompt),
                         "chosen": [{"role": "assistant", "content": ws[1]}, {"role": "assistant", "content": hi[1]}],
                         "rejected": [{"role": "assistant", "content": lo[1]}],
                         "source_model": ws[2], "scores": {"y_ws": ws[0], "y_wt": hi[0], "y_l": lo[0]}})
    if not rows:
        raise DataError(f"no rows to write: {stats['no_source']} prompts without source responses, "
                        f"{stats['tied']} without a target preference (tied, or < 2 samples), "
                        f"{stats['not_in_prompts']} outside --prompts")
    write_jsonl(rows, out)
    stats["rows"] = len(rows)
    stats["scores"] = {k: v / len(rows) for k, v in stats["scores"].items()}
    kind = "WRPO" if target else "SFT"
    print(f"{len(rows)} {kind} rows -> {out}; dropped: {stats['no_source']} without source responses, "
          f"{stats['tied']} without a target preference (tied, or < 2 samples), "
          f"{stats['not_in_prompts']} outside --prompts")
    print("mean scores: " + ", ".join(f"{k} {v:.4g}" for k, v in stats["scores"].items()))
    print("best source response by model: " + ", ".join(
        f"{m} {n} ({n / len(rows):.0%})" for m, n in sorted(stats["wins"].items(), key=lambda x: -x[1])))
    return stats


def main(argv):
    parser = argparse.ArgumentParser(prog="data.py", description="WRPO data tools")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("split", help="split WRPO rows into an SFT part and a preference part by prompt_id")
    p.add_argument("--data", required=True, help="WRPO rows (.jsonl, .json, .parquet or a folder)")
    p.add_argument("--out_dir", required=True, help="writes sft.jsonl and wrpo.jsonl here")
    p.add_argument("--sft_fraction", type=float, default=1 / 3, help="share of prompts for SFT (paper: 1/3)")
    p.add_argument("--seed", type=int, default=42, help="seed of the hash that assigns prompts")
    p.add_argument("--overwrite", action="store_true", help="replace an existing split in out_dir")
    b = commands.add_parser("build", help="WRPO rows (or SFT rows) from scored source and target samples")
    b.add_argument("--sources", nargs="+", required=True, help="scored samples of the source models (eval/score.py)")
    b.add_argument("--target", help="scored samples of the SFT target; without it, SFT rows (prompt + y_ws)")
    b.add_argument("--prompts", help="only the prompts in this file (e.g. one part of `split`)")
    b.add_argument("--out", required=True, help="the .jsonl file to write")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        if args.command == "split":
            split(args.data, args.out_dir, sft_fraction=args.sft_fraction, seed=args.seed, overwrite=args.overwrite)
        else:
            build(args.sources, args.out, target=args.target, prompts=args.prompts, overwrite=args.overwrite)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
