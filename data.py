"""What training reads: reading, validating, tokenizing and truncating rows; batching them over steps,
ranks and micro-batches; packing and collating them into tensors.

A row (the released `AALF/ultrafeedback_wrpo` shape, see README):

    {"prompt_id": "...",
     "prompt":   [{"role": "user", "content": x}]          # or a plain string
     "chosen":   [{"role": "assistant", "content": y_ws},  # source response (weight alpha)
                  {"role": "assistant", "content": y_wt}], # target response (weight 1 - alpha)
     "rejected": [{"role": "assistant", "content": y_l}]}

A row whose `chosen` has one element is a plain DPO pair (chosen, rejected). SFT also reads
chat rows {"messages": [...]}. Every row is validated before training starts; all bad rows are
reported as file:line. Building such rows from scored samples (and splitting prompts between
SFT and WRPO) is the fusion-data pipeline's job: eval/split.py, eval/build.py.
"""

import bisect
import errno
import hashlib
import json
import math
import re
import stat
import time
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError

from checkpoint import write_atomic
from fsdp_utils import is_local_master, on_every_rank

IGNORE = -100  # label of tokens that get no loss (prompt, padding)
ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 50


class DataError(ValueError):
    """A user-facing problem with the data; the message names file:line and reason."""


class RowError(ValueError):
    """A problem with one row. hint: what the user can do about it, shown once after the list of bad rows."""

    def __init__(self, reason, hint=""):
        super().__init__(reason)
        self.hint = hint


SKIP_HINT = "fix them, or pass --skip_invalid_rows=true to train without them"  # the trainers' hint
SPECIAL_TOKENS_HINT = "special tokens in the text: pass --allow_special_tokens to keep them as control tokens"
SYSTEM_HINT = ("this chat template takes no system turn (Gemma-2's and Mistral v0.1/v0.2's take none): put its text at "
               "the start of the first user turn")


@dataclass
class PreferenceRow:
    """A tokenized WRPO row (or DPO pair): one prompt and its responses."""

    prompt_ids: list  # chat-template tokens of the prompt, ending with the assistant header
    responses: list  # token lists: chosen[0], (chosen[1]), rejected; each ends with end-of-turn
    n_chosen: int  # 2 for WRPO rows, 1 for DPO pairs
    where: str  # "file:line", for error messages
    prompt_id: str = ""


@dataclass
class Sequence:
    """A tokenized sequence with its labels: an SFT example, or one prompt + response of a preference row."""

    ids: list  # one whole sequence (an SFT conversation, or a prompt + one response)
    labels: list  # ids where the loss applies, IGNORE elsewhere (always IGNORE at position 0)
    where: str
    start: int = 0  # position id of the first token (> 0: continues a shared prompt, see attention.py)


# -----------------------------------------------------------------------------
# reading files


def _json_error(text, e, what):
    """(line, reason) of a JSONDecodeError. A text cut short fails past its end (after the trailing
    newline, so "line n + 1, column 1"): report where the text ended instead."""
    msg, end = e.msg.removesuffix(" at"), len(text.rstrip(" \t\r\n"))  # "Unterminated string starting at"
    if e.pos < end:
        return e.lineno, f"{msg} at column {e.colno}"
    line, column = text.count("\n", 0, end) + 1, end - text.rfind("\n", 0, end)
    return line, f"{msg} at the end of the {what}, column {column}"


def _parse_json(line):
    """json.loads of one .jsonl line, with every way a line can be broken turned into a RowError."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise RowError(f"malformed JSON ({_json_error(line, e, 'line')[1]})") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise RowError(f"malformed JSON ({str(e).split(':')[0]})") from None
    except RecursionError:
        raise RowError("malformed JSON (nested too deeply)") from None


def data_files(path):
    """The data files of `path`: the file itself, or a folder's .jsonl, .json and .parquet files, sorted.
    DataError for a path that is missing, unreadable, an empty folder, or not a regular file."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet")) \
            if stat.S_ISDIR(mode) else [path]
        modes = [f.stat().st_mode for f in files]
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise DataError(f"{path}: no such file or folder") from None
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not files:
        raise DataError(f"{path}: folder has no .jsonl, .json or .parquet files")
    for f, mode in zip(files, modes):
        if not stat.S_ISREG(mode):  # never open it: opening a FIFO blocks until something writes to it
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
                "a socket" if stat.S_ISSOCK(mode) else "a device"
            raise DataError(f"{f}: not a regular file ({kind}); give a data file or a folder of them")
    return files


def read_records(path, share=(0, 1)):
    """Return [(where, record_or_RowError)] from a .jsonl/.json/.parquet file or a folder of them.

    share=(k, n): only the k-th of n contiguous shares of the records (a rank's); the lines of a .jsonl
    outside it are counted, never parsed.
    """
    files = data_files(path)
    if share[1] == 1 or any(f.suffix != ".jsonl" for f in files):  # whole files (.json, .parquet), then cut
        records = [rec for f in files for rec in _read_file(f)]
        return records[len(records) * share[0] // share[1] : len(records) * (share[0] + 1) // share[1]]
    counts = [_count_lines(f) for f in files]
    lo = sum(counts) * share[0] // share[1]  # this share: records lo .. hi - 1 of all the files'
    hi = sum(counts) * (share[0] + 1) // share[1]
    out, first = [], 0  # first: the number of the file's first record
    for f, n in zip(files, counts):
        if first < hi and first + n > lo:
            out += _read_file(f, range(lo - first, hi - first))
        first += n
    return out


def _blank(raw):
    """Whether a .jsonl line is blank (skipped, not a record): whitespace only, Unicode's included."""
    return not raw.decode("utf-8", "replace").strip()


def _count_lines(path):
    """Records in a .jsonl file: its lines that are not blank."""
    try:
        with open(path, "rb") as f:
            return sum(1 for raw in f if not _blank(raw))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_file(path, keep=None):
    """The (where, record_or_RowError) of one data file; of a .jsonl file, only the records numbered in `keep`."""
    try:
        if path.suffix == ".jsonl":
            out, k = [], -1
            with open(path, "rb") as f:
                for i, raw in enumerate(f, 1):
                    if _blank(raw):
                        continue
                    k += 1
                    if keep is not None and k not in keep:
                        continue
                    try:
                        out.append((f"{path}:{i}", _parse_json(raw.decode("utf-8").rstrip("\r\n"))))
                    except UnicodeDecodeError as e:
                        out.append((f"{path}:{i}", RowError(f"not valid UTF-8 (byte {e.start + 1})")))
                    except RowError as e:
                        out.append((f"{path}:{i}", e))
            return out
        if path.suffix == ".json":
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
                rows = json.loads(text)
            except UnicodeDecodeError as e:
                line = raw.count(b"\n", 0, e.start) + 1
                raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start + 1})") from None
            except json.JSONDecodeError as e:
                line, reason = _json_error(text, e, "file")
                raise DataError(f"{path}:{line}: malformed JSON ({reason})") from None
            except ValueError as e:  # an integer of more than 4300 digits
                raise DataError(f"{path}: malformed JSON ({str(e).split(':')[0]})") from None
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
    return valid_text(text, name)


def valid_text(text, name):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RowError(f"{name} is not valid text (an unpaired surrogate escape such as \\ud800)") from None
    return text


def prompt_messages(prompt):
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
    messages = prompt_messages(row["prompt"])
    chosen, rejected = row["chosen"], row["rejected"]
    if not isinstance(chosen, list) or len(chosen) not in (1, 2):
        raise RowError("chosen must be a list of 1 (DPO) or 2 (WRPO: source, target) responses")
    if not isinstance(rejected, list) or len(rejected) != 1:
        raise RowError("rejected must be a list of exactly 1 response")
    texts = [_content(m, "chosen", i, "assistant") for i, m in enumerate(chosen)]
    texts.append(_content(rejected[0], "rejected", 0, "assistant"))
    return messages, texts, len(chosen), prompt_id_text(row.get("prompt_id", ""))


def prompt_id_text(prompt_id):
    """A prompt_id as text: a string or an integer (JSON true/false is neither, though bool is an int)."""
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)):
        raise RowError(f"prompt_id must be a string or an integer, got {type(prompt_id).__name__}")
    return valid_text(prompt_id, "prompt_id") if isinstance(prompt_id, str) else str(prompt_id)


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


def text_fields(row, chat):
    """Names of a validated row's texts, in the order of its messages and then its responses."""
    if chat:
        return [f"messages[{i}]" for i in range(len(row["messages"]))]
    prompt = ["prompt"] if isinstance(row["prompt"], str) else [f"prompt[{i}]" for i in range(len(row["prompt"]))]
    return prompt + [f"chosen[{i}]" for i in range(len(row["chosen"]))] + ["rejected[0]"]


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


def special_tokens(tokenizer):
    """The tokenizer's special-token strings: BOS, EOS, pad, and added ones such as <|im_end|>."""
    tokens = {str(t) for t in tokenizer.all_special_tokens}
    tokens |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return set(filter(None, tokens))


def special_tokens_finder(tokenizer):
    """A compiled regex matching any of the tokenizer's special-token strings, or None.

    Text holding one (`<|eot_id|><|start_header_id|>user`) is tokenized as those control tokens,
    which would inject turns into training. The regex is the tokens' trie, so a scan tries one
    branch per character rather than all 256 of Llama-3's tokens at every "<|".
    """
    trie = {}
    for token in special_tokens(tokenizer):
        node = trie
        for ch in token:
            node = node.setdefault(ch, {})
        node[""] = {}  # a token ends here

    def pattern(node):  # a token ending here is optional (?), so the longest token matches
        alts = [re.escape(ch) + pattern(child) for ch, child in sorted(node.items()) if ch]
        if not alts or len(alts) == 1 and "" not in node:
            return "".join(alts)
        return "(?:" + "|".join(alts) + ")" + ("?" if "" in node else "")

    return re.compile(pattern(trie)) if trie else None


def check_special_tokens(finder, fields, texts):
    """A RowError naming the first text (and field) that holds a special-token string."""
    for field, text in zip(fields, texts):
        found = finder.search(text)
        if found:
            raise RowError(f"{field} holds the special token {found.group()!r}", hint=SPECIAL_TOKENS_HINT)


def render(tokenizer, messages, **kwargs):
    """The chat template's text of messages; a template that refuses them (raise_exception) is a RowError."""
    from jinja2 import TemplateError  # what transformers renders chat templates with

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as e:
        hint = SYSTEM_HINT if takes_it_without_system(tokenizer, messages, kwargs) else ""
        raise RowError(f"the chat template refuses this row ({e})", hint=hint) from None


def takes_it_without_system(tokenizer, messages, kwargs):
    """Whether the template refused these messages only for their system turns."""
    from jinja2 import TemplateError

    rest = [m for m in messages if m["role"] != "system"]
    if len(rest) == len(messages) or not rest:
        return bool(messages) and not rest  # no system turn; or nothing but system turns, refused
    try:
        return bool(tokenizer.apply_chat_template(rest, tokenize=False, **kwargs))
    except TemplateError:
        return False


def turn_end(tokenizer):
    """(the id of the special token that ends an assistant turn, the tokens of the whitespace the template
    writes after it), or None when the template writes no whitespace after a special token there.

    ChatML ends a turn with "<|im_end|>\n", Gemma with "<end_of_turn>\n", Zephyr with "</s>\n". That
    whitespace leads into the next turn: a model stops at the end-of-turn token and never generates it,
    so it is not scored (scored_length). Found once per tokenizer, from a rendered probe turn."""
    probe = "wrpo-probe-reply"
    try:
        text = render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}])
    except RowError:
        return None
    after = text[text.rfind(probe) + len(probe):] if probe in text else ""
    end = after.rstrip()
    token = max((t for t in special_tokens(tokenizer) if end.endswith(t)), key=len, default=None)
    if token is None or end == after:
        return None
    space = tokenizer(after[len(end):], add_special_tokens=False)["input_ids"]  # after a special token: alone
    return tokenizer.convert_tokens_to_ids(token), space


def scored_length(reply, end):
    """How many of an assistant turn's tokens are scored: all, less the whitespace after its end-of-turn
    token (end: turn_end's)."""
    if end is not None:
        token, space = end
        n = len(reply) - len(space)
        if n > 0 and reply[n:] == space and reply[n - 1] == token:
            return n
    return len(reply)


def encode(tokenizer, messages, responses, end):
    """Prompt tokens and per-response tokens, all from the tokenizer's chat template.

    prompt = template(messages, add_generation_prompt=True); each response is the rest of
    template(messages + [assistant response]) up to its end-of-turn token (end: turn_end's).
    """
    texts = [render(tokenizer, messages, add_generation_prompt=True)]
    for r in responses:
        texts.append(render(tokenizer, messages + [{"role": "assistant", "content": r}]))
    # the template adds BOS itself; verbose=False: no warning about rows over the model's length, truncate cuts them
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    prompt = ids[0]
    out = []
    for full in ids[1:]:
        if full[: len(prompt)] != prompt:
            raise RowError("the chat template does not render the prompt as a prefix of prompt + response")
        if len(full) == len(prompt):
            raise RowError("a response renders to no tokens")
        reply = full[len(prompt):]
        out.append(reply[: scored_length(reply, end)])
    return prompt, out


def encode_chat(tokenizer, messages, end):
    """Tokens of a whole conversation and a mask of its assistant tokens.

    Rendered turn by turn: each assistant turn is what template(messages[:k + 1]) adds to
    template(messages[:k], add_generation_prompt=True), i.e. the reply and its end-of-turn
    token, never the header before it nor whitespace after it (end: turn_end's).
    """
    ids, mask = [], []
    for k, msg in enumerate(messages):
        before = render(tokenizer, messages[:k], add_generation_prompt=msg["role"] == "assistant") if k else ""
        after = render(tokenizer, messages[: k + 1])
        head, full = tokenizer([before, after], add_special_tokens=False, verbose=False)["input_ids"]
        if full[: len(ids)] != ids or full[: len(head)] != head:
            raise RowError(f"the chat template does not render messages[:{k}] as a prefix of messages[:{k + 1}]")
        added = full[len(head):]
        scored = scored_length(added, end) if msg["role"] == "assistant" else 0
        mask += [False] * (len(head) - len(ids)) + [True] * scored + [False] * (len(added) - scored)
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


def convert_rows(path, convert, skip_invalid=False, report=print, hint="fix or remove them"):
    """convert(record) for every record of `path`; every bad row is reported, as file:line: reason.

    Bad rows stop the run (DataError listing them, then `hint`: what the caller's user can do,
    "" for nothing), or with skip_invalid=True are left out, and `report` gets one line with
    their count and the first few. The rows' own hints (RowError.hint) follow, once each.
    """
    out, errors, row_hints = _convert(read_records(path), convert, out=[])
    report_bad_rows(path, errors, row_hints, len(out), skip_invalid, report, hint)
    return out


def _convert(records, convert, out):
    """convert() each (where, record) into out (a list, or a _RowsBuilder); the errors and rows' hints."""
    errors, row_hints = [], []
    for where, rec in records:
        try:
            if isinstance(rec, RowError):
                raise rec
            out.append(convert(rec, where))
        except RowError as e:
            errors.append(f"{where}: {e}")
            if e.hint and e.hint not in row_hints:
                row_hints.append(e.hint)
        except RecursionError:  # a record nested deeply enough to exhaust the stack while checking it
            errors.append(f"{where}: nested too deeply")
    return out, errors, row_hints


def report_bad_rows(path, errors, row_hints, n_good, skip_invalid, report, hint):
    """convert_rows' rule for bad rows: a DataError listing them, or with skip_invalid one reported line. Returns
    that line ("" without bad rows)."""
    message = ""
    if errors and skip_invalid:
        shown = "\n  ".join(errors[:5]) + ("\n  ..." if len(errors) > 5 else "")
        hints = "".join(f"\n({h})" for h in row_hints)
        message = f"skipped {len(errors)} bad row(s) of {path} (skip_invalid_rows):\n  {shown}{hints}"
        report(message)
    elif errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        hints = "".join(f"\n({h})" for h in ([hint] if hint else []) + row_hints)
        raise DataError(f"{len(errors)} bad row(s) in {path}:\n  {shown}{more}{hints}")
    if not n_good:
        raise DataError(f"{path}: no rows" + (" left after skipping the bad ones" if errors else ""))
    return message


def load_preference_rows(path, tokenizer, *, max_length=2048, max_prompt_length=1800, truncation="keep_end",
                         skip_invalid=False, report=print, allow_special_tokens=False, hint=SKIP_HINT, cache=None):
    """Read, validate and tokenize every row, as TokenRows. Raises DataError listing every bad row (see
    convert_rows). Under torch.distributed the ranks share the work; with `cache` (a folder) the result is
    cached there and memory-mapped (see load_tokenized).

    truncation: "keep_end" applies the paper's rule (see `truncate`); "error" reports rows
    longer than max_length as bad rows instead. Text holding the tokenizer's special-token
    strings is a bad row, unless allow_special_tokens (then they become those control tokens).
    """
    if not 0 < max_prompt_length < max_length:
        raise DataError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
    if truncation not in ("keep_end", "error"):
        raise DataError(f"truncation must be 'keep_end' or 'error', got '{truncation}'")
    check_tokenizer(tokenizer)

    special = None if allow_special_tokens else special_tokens_finder(tokenizer)
    end = turn_end(tokenizer)

    def convert(rec, where):
        messages, texts, n_chosen, prompt_id = validate_row(rec)
        if special:
            check_special_tokens(special, text_fields(rec, False), [m["content"] for m in messages] + texts)
        prompt, responses = encode(tokenizer, messages, texts, end)
        length = len(prompt) + max(len(r) for r in responses)
        if truncation == "error" and length > max_length:
            raise RowError(f"prompt + longest response is {length} tokens, over max_length {max_length}")
        prompt, responses = truncate(prompt, responses, max_length, max_prompt_length)
        return PreferenceRow(prompt, responses, n_chosen, where, prompt_id)

    settings = dict(kind="preference", max_length=max_length, max_prompt_length=max_prompt_length,
                    truncation=truncation, allow_special_tokens=allow_special_tokens, skip_invalid=skip_invalid)
    return load_tokenized(path, tokenizer, convert, settings, report, hint, cache)


def load_sft_examples(path, tokenizer, *, max_length=2048, loss_on="assistant", truncation="keep_start",
                      skip_invalid=False, report=print, allow_special_tokens=False, hint=SKIP_HINT, cache=None):
    """Read, validate and tokenize SFT rows (chat rows, or WRPO rows trained on prompt + y_ws), as TokenRows
    of Sequences; shared by ranks and cached as in load_preference_rows.

    loss_on: "assistant" scores every assistant turn (end-of-turn token included); "all" scores
    every token after the first, the paper's setting. truncation: "keep_start" cuts an example
    to its first max_length tokens; "error" reports longer examples as bad rows. Special-token
    strings in the text: as in load_preference_rows.
    """
    if loss_on not in ("assistant", "all"):
        raise DataError(f"loss_on must be 'assistant' or 'all', got '{loss_on}'")
    if truncation not in ("keep_start", "error"):
        raise DataError(f"truncation must be 'keep_start' or 'error', got '{truncation}'")
    check_tokenizer(tokenizer)

    special = None if allow_special_tokens else special_tokens_finder(tokenizer)
    end = turn_end(tokenizer)

    def convert(rec, where):
        messages = sft_messages(rec)
        if special:
            check_special_tokens(special, text_fields(rec, "messages" in rec), [m["content"] for m in messages])
        ids, mask = encode_chat(tokenizer, messages, end)
        if len(ids) > max_length:
            if truncation == "error":
                raise RowError(f"conversation is {len(ids)} tokens, over max_length {max_length}")
            ids, mask = ids[:max_length], mask[:max_length]
        labels = [t if (m or loss_on == "all") else IGNORE for t, m in zip(ids, mask)]
        labels[0] = IGNORE  # nothing predicts an example's first token
        if all(t == IGNORE for t in labels):
            raise RowError(f"no assistant token within max_length {max_length}")
        return Sequence(ids, labels, where)

    settings = dict(kind="sft", max_length=max_length, loss_on=loss_on, truncation=truncation,
                    allow_special_tokens=allow_special_tokens, skip_invalid=skip_invalid)
    return load_tokenized(path, tokenizer, convert, settings, report, hint, cache)


# -----------------------------------------------------------------------------
# tokenized rows, held flat: tokenized once by all ranks together, cached in a file each node memory-maps


class TokenRows:
    """Tokenized rows held as flat arrays, about 4 bytes per token (5 for SFT) instead of Python lists of
    ints; rows[i] builds the i-th PreferenceRow (or SFT Sequence), with lists, when a batch needs it.

        tokens   int32 [n_tokens]       the tokens of every piece, back to back
        offsets  int64 [n_pieces + 1]   where each piece starts: a preference row's pieces are its
                                        prompt then its responses; an SFT example is one piece
        firsts   int64 [n_rows + 1]     the first piece of each row
        scored   uint8 [n_tokens]       SFT only: 1 where the label is the token, 0 where it is IGNORE

    The arrays may be read-only maps of a cache file, which the page cache holds once per node.
    """

    def __init__(self, kind, arrays, where, prompt_ids):
        self.kind, self.arrays, self.where, self.prompt_ids = kind, arrays, where, prompt_ids
        self.tokens, self.offsets, self.firsts = arrays["tokens"], arrays["offsets"], arrays["firsts"]

    def __len__(self):
        return len(self.where)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices, and IndexError past the end
        spans = [(int(self.offsets[k]), int(self.offsets[k + 1])) for k in range(self.firsts[i], self.firsts[i + 1])]
        pieces = [self.tokens[s:e].tolist() for s, e in spans]
        if self.kind == "sft":
            (s, e), = spans
            return Sequence(pieces[0], self._labels(s, e).tolist(), self.where[i])
        return PreferenceRow(pieces[0], pieces[1:], len(pieces) - 2, self.where[i], self.prompt_ids[i])

    def _labels(self, start, end):
        """An SFT example's labels from its token span: the token where scored, else IGNORE."""
        return np.where(self.arrays["scored"][start:end] != 0, self.tokens[start:end], IGNORE)

    def lengths(self, shared_prompt=False):
        """Tokens of each row as training lays it out: row_length() of every row (an SFT example's length)."""
        n = np.diff(self.offsets)
        if self.kind == "sft" or not len(self):
            return n
        first = self.firsts[:-1]
        prompt, responses, n_responses = n[first], np.add.reduceat(n, first) - n[first], np.diff(self.firsts) - 1
        return prompt + responses + n_responses - 1 if shared_prompt else n_responses * prompt + responses

    def parts(self):
        """Per row, its token lists as fingerprint() hashes them (numpy arrays)."""
        for i in range(len(self)):
            pieces = [self.tokens[self.offsets[k] : self.offsets[k + 1]] for k in range(self.firsts[i],
                                                                                         self.firsts[i + 1])]
            if self.kind == "sft":
                yield [pieces[0], self._labels(self.offsets[self.firsts[i]], self.offsets[self.firsts[i] + 1])]
            else:
                yield [np.array([len(pieces) - 2]), *pieces]


class _RowsBuilder:
    """Collects converted rows into TokenRows' arrays, a row at a time (its lists live only meanwhile)."""

    def __init__(self, kind):
        self.kind, self.where, self.prompt_ids = kind, [], []
        self.tokens, self.scored, self.offsets, self.firsts = array("i"), array("B"), array("q", [0]), array("q", [0])

    def append(self, row):
        if self.kind == "sft":
            pieces = [row.ids]
            self.scored.extend(label != IGNORE for label in row.labels)
        else:
            pieces = [row.prompt_ids, *row.responses]
            self.prompt_ids.append(row.prompt_id)
        for p in pieces:
            self.tokens.extend(p)
            self.offsets.append(len(self.tokens))
        self.firsts.append(len(self.offsets) - 1)
        self.where.append(row.where)

    def part(self):
        arrays = dict(tokens=np.frombuffer(self.tokens, np.int32), offsets=np.frombuffer(self.offsets, np.int64),
                      firsts=np.frombuffer(self.firsts, np.int64))
        if self.kind == "sft":
            arrays["scored"] = np.frombuffer(self.scored, np.uint8)
        return arrays, self.where, self.prompt_ids


def _join(kind, parts):
    """TokenRows of the ranks' parts, in order: each part's offsets shifted past the tokens before it."""
    tokens = [len(a["tokens"]) for a, _, _ in parts]
    pieces = [len(a["offsets"]) - 1 for a, _, _ in parts]
    arrays = dict(
        tokens=np.concatenate([a["tokens"] for a, _, _ in parts]),
        offsets=np.concatenate([[0]] + [a["offsets"][1:] + sum(tokens[:r]) for r, (a, _, _) in enumerate(parts)]),
        firsts=np.concatenate([[0]] + [a["firsts"][1:] + sum(pieces[:r]) for r, (a, _, _) in enumerate(parts)]))
    if kind == "sft":
        arrays["scored"] = np.concatenate([a["scored"] for a, _, _ in parts])
    return TokenRows(kind, arrays, [w for _, where, _ in parts for w in where],
                     [p for _, _, ids in parts for p in ids])


def load_tokenized(path, tokenizer, convert, settings, report, hint, cache):
    """The rows of `path`, converted (validated, tokenized) by convert(record, where), as TokenRows.

    Under torch.distributed the ranks share the work (convert_on_all_ranks), so the rows and the bad-row
    report are the same as one process's. With `cache` (a folder), the first process of each node writes
    the rows there, named by a hash of all they depend on (token_cache_path), and every rank memory-maps
    that file; a later run finds it and skips the tokenizer. A damaged or stale cache is never used.
    """
    t0 = time.time()
    file = token_cache_path(path, tokenizer, settings, cache) if cache is not None else None
    rows, skipped = read_token_cache(file, settings["kind"], report) if file and file.exists() else (None, "")
    if on_every_rank(rows is not None):
        if skipped:
            report(skipped)
        report(f"data: {len(rows)} rows from {path} in {time.time() - t0:.1f}s (cached: {file})")
        return rows
    rows, errors, row_hints = convert_on_all_ranks(path, convert, settings["kind"])
    skipped = report_bad_rows(path, errors, row_hints, len(rows), settings["skip_invalid"], report, hint)
    world = dist.get_world_size() if dist.is_initialized() else 1
    how = f"tokenized on {world} rank{'s' if world > 1 else ''}"
    if file:
        if is_local_master():  # the first process of each node writes the node's copy
            write_token_cache(file, rows, skipped, report)
        if dist.is_initialized():
            dist.barrier()  # the file is whole (or was not written) before any rank looks for it
        mapped, _ = read_token_cache(file, settings["kind"], report=lambda _: None) if file.exists() else (None, "")
        if on_every_rank(mapped is not None):  # one copy per node, in the page cache, instead of one per rank
            rows, how = mapped, f"{how}; cached in {file}"
    report(f"data: {len(rows)} rows from {path} in {time.time() - t0:.1f}s ({how})")
    return rows


def convert_on_all_ranks(path, convert, kind):
    """(TokenRows, bad rows' errors, their hints) of every record of `path`: each rank converts a contiguous
    share of the records and all gather the shares, in order. Collective."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    builder, errors, row_hints = _convert(read_records(path, share=(rank, world)), convert, out=_RowsBuilder(kind))
    parts = [(builder.part(), errors, row_hints)]
    if world > 1:
        parts, mine = [None] * world, parts[0]
        dist.all_gather_object(parts, mine)
    rows = _join(kind, [part for part, _, _ in parts])
    return (rows, [e for _, errs, _ in parts for e in errs],
            list(dict.fromkeys(h for _, _, hints in parts for h in hints)))


CACHE_FORMAT = 1  # the cache file's layout (the code that fills it is in the key too)


def cache_folder(setting, data_path):
    """Where a cache of `data_path` goes: the folder a setting names, or beside the data (in a data folder)."""
    data_path = Path(data_path)
    return Path(setting) if setting else data_path if data_path.is_dir() else data_path.parent


def token_cache_path(path, tokenizer, settings, folder):
    """The cache file of `path`'s tokenized rows in `folder`, named by a hash of everything the rows depend on:
    the data files' content (and the path, which names the rows), the tokenizer (its full serialization or
    its files, and its chat template), the settings of convert (truncation, lengths, ...), the code of this
    file and the tokenizer libraries' versions."""
    import tokenizers
    import transformers

    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **settings, "path": str(path),
                                   "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
                                  sort_keys=True).encode())
    h.update(Path(__file__).read_bytes())  # this file's code converts the rows: an edit (a fork's ablation) counts
    h.update(tokenizer_digest(tokenizer).encode())
    for f in data_files(path):
        h.update(f"{f.name}:".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(2**24):
                h.update(chunk)
    return Path(folder) / f"{Path(path).name}.tokens-{h.hexdigest()[:20]}.safetensors"


def tokenizer_digest(tokenizer):
    """A digest of what decides a tokenizer's output here: its chat template, special tokens, and its fast
    tokenizer's full serialization (else the tokenizer files of its folder)."""
    h = hashlib.sha256(f"{type(tokenizer).__name__}|{tokenizer.chat_template}|"
                       f"{sorted(map(str, tokenizer.all_special_tokens))}|".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        folder = Path(tokenizer.name_or_path)
        for f in sorted(folder.iterdir()) if folder.is_dir() else []:
            if f.is_file() and not f.name.startswith(("config", "generation_config", "model", "pytorch_model")) \
                    and f.suffix in (".json", ".model", ".txt", ".jinja", ".tiktoken"):
                h.update(f.name.encode() + b":" + f.read_bytes())
    return h.hexdigest()


def write_token_cache(file, rows, skipped, report):
    """Write TokenRows as a safetensors file (the arrays, their CRC-32s, rows' names as metadata), whole or not
    at all (write_atomic, under a name of this process's own: nodes sharing a folder may write it at once)."""
    from safetensors.numpy import save_file

    metadata = {"format": str(CACHE_FORMAT), "kind": rows.kind, "where": json.dumps(rows.where),
                "prompt_ids": json.dumps(rows.prompt_ids), "skipped": skipped,
                "crc32": json.dumps({k: zlib.crc32(np.ascontiguousarray(a)) for k, a in rows.arrays.items()})}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(file, lambda tmp: save_file({k: np.ascontiguousarray(a) for k, a in rows.arrays.items()}, tmp,
                                                 metadata=metadata), private=True)
    except (OSError, SafetensorError) as e:  # (safetensors reports a full disk as a SafetensorError)
        report(f"data: tokenized rows not cached ({file.parent}: {getattr(e, 'strerror', None) or e})")


def read_token_cache(file, kind, report):
    """(TokenRows memory-mapped from a cache file, its skipped-rows message), or (None, "") when the file is
    damaged (reported): unreadable, inconsistent arrays, or bytes that do not match their CRC-32s."""
    dtypes = {"I32": np.int32, "I64": np.int64, "U8": np.uint8}
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n < 2**27 else None
        if not isinstance(header, dict):
            raise ValueError("no safetensors header")
        meta = header.pop("__metadata__", {})
        arrays = {}
        for name, info in header.items():
            (start, end), dtype = info["data_offsets"], np.dtype(dtypes[info["dtype"]])
            count = (end - start) // dtype.itemsize
            arrays[name] = np.memmap(file, dtype, "r", offset=8 + n + start, shape=(count,)) if count else \
                np.zeros(0, dtype)
        crcs, where, prompt_ids = (json.loads(meta[k]) for k in ("crc32", "where", "prompt_ids"))
        rows = TokenRows(meta["kind"], arrays, where, prompt_ids)
        problem = ("another kind of rows" if meta["kind"] != kind or meta["format"] != str(CACHE_FORMAT) else
                   "bytes that do not match their CRC-32" if any(zlib.crc32(a) != crcs[k] for k, a in arrays.items())
                   else "inconsistent arrays" if not _consistent(rows) else None)
    except (OSError, ValueError, KeyError, TypeError) as e:  # (json.JSONDecodeError is a ValueError)
        problem = f"unreadable ({e})"
    if problem:
        report(f"data: the cache {file} is damaged ({problem}); tokenizing again")
        return None, ""
    return rows, meta["skipped"]


def _consistent(rows):
    a = rows.arrays
    return (len(a["firsts"]) == len(rows) + 1 and a["firsts"][0] == 0 and a["firsts"][-1] == len(a["offsets"]) - 1
            and a["offsets"][0] == 0 and a["offsets"][-1] == len(a["tokens"]) and (np.diff(a["offsets"]) >= 0).all()
            and (np.diff(a["firsts"]) >= (1 if rows.kind == "sft" else 3)).all()
            and (rows.kind != "sft" or len(a["scored"]) == len(a["tokens"]))
            and (rows.kind == "sft" or len(rows.prompt_ids) == len(rows)))


# -----------------------------------------------------------------------------
# batching: rows over optimizer steps and ranks, micro-batches, and the one packer


def pack(sizes, capacity):
    """Item indices grouped into bins that hold at most `capacity` in total: best-fit decreasing (largest
    item first, each into the fullest bin it fits). An item over capacity gets a bin of its own.

    Packs SFT examples into sequences, a micro-batch's sequences into rows, and rows into
    micro-batches of a token budget.
    """
    bins, open_bins = [], []  # open_bins: sorted (room left, bin index) of the bins with room
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        k = bisect.bisect_left(open_bins, (sizes[i], -1))  # the fullest bin with room for item i
        room, b = open_bins.pop(k) if k < len(open_bins) else (capacity, len(bins))
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        if room - sizes[i] > 0:
            bisect.insort(open_bins, (room - sizes[i], b))
    return bins


def train_steps(n_rows, epochs, seed, global_batch, rank, world, total_steps, start=0):
    """Yield (step, epoch, the indices of this rank's rows) for the optimizer steps start .. total_steps - 1.

    Each epoch's order is a seeded permutation; each step takes the next `global_batch` rows and
    rank r gets the r-th contiguous slice of them. So ranks never share a row, any world size
    sees the same rows in the same step, and a resumed run sees the rows it would have seen. A
    last partial batch of an epoch is dropped.
    """
    per_rank = global_batch // world
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for first in range(0, n_rows - global_batch + 1, global_batch):
            if step >= total_steps:
                return
            if step >= start:
                yield step, epoch, perm[first + rank * per_rank : first + (rank + 1) * per_rank]
            step += 1


def micro_batches_by_rows(idx, size):
    """One step's rows on this rank (idx: their indices) as micro-batches of `size` rows, the same count on
    every rank."""
    return [idx[i : i + size] for i in range(0, len(idx), size)]


def micro_batches_by_tokens(idx, lengths, budget, device):
    """One step's rows on this rank (idx: their indices) packed into micro-batches of at most `budget`
    tokens (lengths: tokens per row of the data), then as many micro-batches as every other rank has.
    Collective."""
    return same_count_on_all_ranks([[idx[i] for i in b] for b in pack([lengths[i] for i in idx], budget)], device)


def same_count_on_all_ranks(batches, device):
    """Split the largest micro-batches until every rank has as many as the rank with the most.

    FSDP gathers parameters in every forward pass, so all ranks must run the same number of
    them. Ranks hold equally many rows, so splitting down to one row each always suffices.
    """
    most = torch.tensor(len(batches), device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    batches = list(batches)
    while len(batches) < most.item():
        big = batches.pop(max(range(len(batches)), key=lambda i: len(batches[i])))
        batches += [big[: len(big) // 2], big[len(big) // 2 :]]
    return batches


def rank_share(n_items, rank, world):
    """Rank r's contiguous share of n held-out items, as many on every rank: (indices, weights), where a short
    rank ends with item 0 at weight 0 (FSDP's collectives need the same number of forward passes)."""
    per_rank = math.ceil(n_items / world)
    positions = range(rank * per_rank, (rank + 1) * per_rank)
    return [i if i < n_items else 0 for i in positions], [float(i < n_items) for i in positions]


def eval_batches(n_items, micro_batch, rank, world):
    """This rank's share of n held-out items (rank_share), in micro-batches of (indices, weights [B])."""
    idx, weights = rank_share(n_items, rank, world)
    for start in range(0, len(idx), micro_batch):
        yield idx[start : start + micro_batch], torch.tensor(weights[start : start + micro_batch])


def eval_batches_by_tokens(lengths, budget, rank, world, device):
    """eval_batches of a token budget (lengths: tokens of each item): the share packed as micro_batches_by_tokens
    packs a step's rows. The no-grad passes (reference log-probs, held-out metrics) then run the training's
    micro-batches: with micro_batch_size=1, a row per forward would leave a GPU mostly idle. Collective."""
    idx, weights = rank_share(len(lengths), rank, world)
    share = micro_batches_by_tokens(list(range(len(idx))), [lengths[i] for i in idx], budget, device)  # positions
    return [([idx[j] for j in b], torch.tensor([weights[j] for j in b])) for b in share]


# -----------------------------------------------------------------------------
# collation: sequences -> input_ids, labels, position_ids (packed) or attention_mask (padded)


def row_sequences(row, shared_prompt=False):
    """A preference row as its sequences: prompt + each response, scored on the response.

    shared_prompt: one copy of the prompt, [prompt + y1], [prompt[-1] + y2], [prompt[-1] + y3],
    to be packed back to back. The later ones start at position len(prompt) - 1, so that under
    attention.packed_sdpa they attend to the prompt before them; their repeated last prompt
    token is what predicts their first response token.
    """
    p = row.prompt_ids
    if not shared_prompt:
        return [Sequence(p + r, [IGNORE] * len(p) + r, row.where) for r in row.responses]
    first, *rest = row.responses
    return [Sequence(p + first, [IGNORE] * len(p) + first, row.where)] + [
        Sequence(p[-1:] + r, [IGNORE] + r, row.where, start=len(p) - 1) for r in rest]


def row_length(row, shared_prompt=False):
    """Tokens of a row's sequences (as laid out by row_sequences)."""
    return sum(len(s.ids) for s in row_sequences(row, shared_prompt))


def collate_preference(rows, pad_id, packed=False, shared_prompt=False):
    """The sequences of a micro-batch of preference rows, and where each row's three are.

    packed: the sequences back to back in rows as wide as the longest of them (`pack`), with
    position ids restarting per sequence (see collate_packed). shared_prompt (packed only): each
    row's sequences stay together, sharing one copy of the prompt (row_sequences). Otherwise one
    right-padded row per sequence with an attention_mask. Either way the index tensors ws, wt,
    rej [B] select each row's source-chosen, target-chosen and rejected sequence; for DPO rows
    ws == wt.
    """
    if shared_prompt and not packed:
        raise ValueError("shared_prompt needs packed=True")
    ws, wt, rej, n = [], [], [], 0
    for row in rows:
        ws.append(n)
        wt.append(n + row.n_chosen - 1)
        rej.append(n + row.n_chosen)
        n += len(row.responses)
    if not packed:
        seqs = [s for row in rows for s in row_sequences(row)]
        return {**collate_padded(seqs, pad_id), "ws": torch.tensor(ws), "wt": torch.tensor(wt),
                "rej": torch.tensor(rej)}
    # units that must stay whole in a packed row: a row's sequences when they share a prompt, else each sequence
    units, k = [], 0
    for row in rows:
        seqs = list(zip(range(k, k + len(row.responses)), row_sequences(row, shared_prompt)))
        units += [seqs] if shared_prompt else [[x] for x in seqs]
        k += len(seqs)
    size = [sum(len(s.ids) for _, s in u) for u in units]
    packed_rows = [[x for u in b for x in units[u]] for b in pack(size, max(size))]
    segment = {k: i for i, (k, _) in enumerate(x for row in packed_rows for x in row)}  # collate_packed's numbering
    remap = lambda idx: torch.tensor([segment[k] for k in idx])  # noqa: E731
    return {**collate_packed([[s for _, s in row] for row in packed_rows], pad_id, segments=True),
            "ws": remap(ws), "wt": remap(wt), "rej": remap(rej)}


def collate_packed(rows, pad_id, segments=False):
    """Rows of several sequences each -> input_ids, position_ids, labels [R, T].

    Position ids restart at 0 for every sequence, and no attention mask is passed: transformers
    then builds a block-causal mask, so tokens never attend across a sequence boundary. This
    only holds with use_cache=False (with a cache the sequences attend to each other). Padding at
    the end of a row is one more segment, with labels IGNORE. With segments=True, `segments`
    [R, T] numbers the sequences 0, 1, ... across all rows (-1 on padding) and `n_seqs` counts
    them, so that log-probs are summed per sequence rather than per row.
    """
    T = max(sum(len(s.ids) for s in row) for row in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)
    seg_ids = torch.full((len(rows), T), -1, dtype=torch.long)
    seq = 0
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s.ids)
            input_ids[r, at : at + n] = torch.tensor(s.ids)
            labels[r, at : at + n] = torch.tensor(s.labels)
            position_ids[r, at : at + n] = torch.arange(s.start, s.start + n)
            seg_ids[r, at : at + n] = seq
            at, seq = at + n, seq + 1
        position_ids[r, at:] = torch.arange(T - at)
    out = dict(input_ids=input_ids, position_ids=position_ids, labels=labels)
    return {**out, "segments": seg_ids, "n_seqs": seq} if segments else out


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


# -----------------------------------------------------------------------------
# names and fingerprints


def row_name(row):
    """How messages name a row: file:line, and its prompt_id when it has one."""
    pid = getattr(row, "prompt_id", "")
    return f"{row.where} ({pid})" if pid else row.where


def fingerprint(rows, groups=None):
    """A digest of tokenized rows (TokenRows, or lists of PreferenceRows or Sequences), in order, and of how
    they are grouped (SFT's packed sequences): any change to the data, the tokenizer or its chat template,
    the truncation settings or the packing changes it."""
    h = hashlib.sha256()
    parts = rows.parts() if isinstance(rows, TokenRows) else (
        [[row.n_chosen], row.prompt_ids, *row.responses] if isinstance(row, PreferenceRow) else [row.ids, row.labels]
        for row in rows)
    for row in parts:
        for p in row:
            h.update(np.asarray(p, dtype=np.int64).tobytes() + b"|")  # (the bytes of array("q", p))
        h.update(b";")
    for group in groups or []:
        h.update(array("q", group).tobytes() + b";")
    return f"{len(rows)} rows, sha256 {h.hexdigest()[:20]}"


def row_lengths(rows, shared_prompt=False):
    """row_length() of each row (an SFT Sequence's length), from TokenRows' offsets without building rows."""
    if isinstance(rows, TokenRows):
        return rows.lengths(shared_prompt).tolist()
    return [len(r.ids) if isinstance(r, Sequence) else row_length(r, shared_prompt) for r in rows]
