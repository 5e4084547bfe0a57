"""WRPO data: reading, validating, tokenizing, truncating, sharding and batching rows.

A row (the released `AALF/ultrafeedback_wrpo` shape, see README):

    {"prompt_id": "...",
     "prompt":   [{"role": "user", "content": x}]          # or a plain string
     "chosen":   [{"role": "assistant", "content": y_ws},  # source response (weight alpha)
                  {"role": "assistant", "content": y_wt}], # target response (weight 1 - alpha)
     "rejected": [{"role": "assistant", "content": y_l}]}

A row whose `chosen` has one element is a plain DPO pair (chosen, rejected).
Every row is validated before training starts; all bad rows are reported as file:line.
"""

import json
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
    if path.suffix == ".jsonl":
        out = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append((f"{path}:{i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    out.append((f"{path}:{i}", RowError(f"malformed JSON ({e.msg} at column {e.colno})")))
        return out
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json data file must hold a list of rows")
        return [(f"{path}:row {i}", r) for i, r in enumerate(rows)]
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        return [(f"{path}:row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
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
    if not text.strip():
        raise RowError(f"{field}[{i}] is empty")
    return text


def _prompt_messages(prompt):
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError("prompt is empty")
        return [{"role": "user", "content": prompt}]
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


def load_dataset(path, tokenizer, *, max_length=2048, max_prompt_length=1800, truncation="keep_end"):
    """Read, validate and tokenize every row. Raises DataError listing every bad row.

    truncation: "keep_end" applies the paper's rule (see `truncate`); "error" reports rows
    longer than max_length as bad rows instead.
    """
    if not 0 < max_prompt_length < max_length:
        raise DataError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
    if truncation not in ("keep_end", "error"):
        raise DataError(f"truncation must be 'keep_end' or 'error', got '{truncation}'")
    check_tokenizer(tokenizer)
    examples, errors = [], []
    for where, rec in read_records(path):
        try:
            if isinstance(rec, RowError):
                raise rec
            messages, texts, n_chosen, prompt_id = validate_row(rec)
            prompt, responses = encode(tokenizer, messages, texts)
            length = len(prompt) + max(len(r) for r in responses)
            if truncation == "error" and length > max_length:
                raise RowError(f"prompt + longest response is {length} tokens, over max_length {max_length}")
            prompt, responses = truncate(prompt, responses, max_length, max_prompt_length)
            examples.append(Example(prompt, responses, n_chosen, where, prompt_id))
        except RowError as e:
            errors.append(f"{where}: {e}")
    if errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise DataError(f"{len(errors)} bad row(s) in {path}:\n  {shown}{more}")
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


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


def collate(examples, pad_id):
    """Right-padded tensors holding every response of every row (prompt repeated per response).

    Returns input_ids, attention_mask, labels [N, T] (labels are IGNORE outside responses) and
    index tensors ws, wt, rej [B] selecting each row's source-chosen, target-chosen and rejected
    sequence; for DPO rows ws == wt.
    """
    seqs, labels, ws, wt, rej = [], [], [], [], []
    for ex in examples:
        base = len(seqs)
        for r in ex.responses:
            seqs.append(ex.prompt_ids + r)
            labels.append([IGNORE] * len(ex.prompt_ids) + r)
        ws.append(base)
        wt.append(base + ex.n_chosen - 1)
        rej.append(base + ex.n_chosen)
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    label_t = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        input_ids[i, : len(s)] = torch.tensor(s)
        label_t[i, : len(s)] = torch.tensor(lab)
        attention_mask[i, : len(s)] = 1
    index = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=label_t,
                ws=index(ws), wt=index(wt), rej=index(rej))
