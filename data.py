"""How a data file becomes token ids: rows read, validated, rendered with the chat template, tokenized and truncated
into TokenRows (tokens.py; training.load_cached keeps them for the next run). A row (see README):

    {"prompt_id": "...",
     "prompt":   [{"role": "user", "content": x}]          # or a plain string
     "chosen":   [{"role": "assistant", "content": y_ws},  # source response (weight alpha); or K of them,
                  {"role": "assistant", "content": y_wt}], # target response (weight 1 - alpha)
     "rejected": [{"role": "assistant", "content": y_l}],
     "source_weights": [w_1, ..., w_K]}                     # optional: K sources' weights, summing to 1 (uniform)

A row whose `chosen` has one element is a plain DPO pair (chosen, rejected). SFT also reads chat rows
{"messages": [...]}. Every row is validated before training starts; all bad rows are reported as file:line."""

import errno
import json
import math
import stat
from pathlib import Path

import torch.distributed as dist
from jinja2 import TemplateError  # what transformers renders chat templates with

import tokens
from paths import BOM, kind
from tokens import IGNORE, PreferenceRow, Sequence

ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 50


class DataError(ValueError):
    """A user-facing problem with the data; the message names file:line and reason."""


class RowError(ValueError):
    """A problem with one row. hint: what the user can do, shown once after the list of bad rows; line: where in a
    whole .json file's text."""

    def __init__(self, reason, hint="", line=None):
        super().__init__(reason)
        self.hint, self.line = hint, line


SKIP_HINT = "fix them, or pass --skip_invalid_rows=true to train without them"  # the trainers' hint
SPECIAL_TOKENS_HINT = "special tokens in the text: pass --allow_special_tokens to keep them as control tokens"
SYSTEM_HINT = ("this chat template takes no system turn (Gemma-2's and Mistral v0.1/v0.2's take none): put its text at "
               "the start of the first user turn")


# --- reading files: (file:line, record) pairs

SUFFIXES = (".jsonl", ".json", ".parquet")  # of data files, in any case (.JSONL too)


def data_files(path):
    """The data files of `path`: the file itself, or a folder's .jsonl, .json and .parquet files, sorted.
    DataError for a path that is missing, unreadable, an empty folder, or not a regular file."""
    path = Path(path)
    try:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES) if path.is_dir() else [path]
        modes = [f.stat().st_mode for f in files]
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise DataError(f"{path}: no such file or folder") from None
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not files:
        raise DataError(f"{path}: folder has no .jsonl, .json or .parquet files")
    for f, mode in zip(files, modes):
        if not stat.S_ISREG(mode):  # never open it: opening a FIFO blocks until something writes to it
            raise DataError(f"{f}: not a regular file ({kind(mode)}); give a data file or a folder of them")
    return files


def read_records(path, share=(0, 1)):
    """[(where, record or RowError)] of a .jsonl/.json/.parquet file or a folder of them; share=(k, n): only the k-th
    of n contiguous shares of the records (a rank's), whose .jsonl lines outside it are counted, never parsed."""
    files, (k, n) = data_files(path), share
    try:
        if n == 1 or any(f.suffix.lower() != ".jsonl" for f in files):  # whole files (.json, .parquet), then cut
            records = [rec for f in files for rec in _read_file(f)]
            return records[len(records) * k // n : len(records) * (k + 1) // n]
        counts = [sum(1 for _ in _lines(f)) for f in files]
        lo, hi = sum(counts) * k // n, sum(counts) * (k + 1) // n  # this share: records lo .. hi - 1 of all the files'
        out, first = [], 0  # first: the number of the file's first record
        for f, count in zip(files, counts):
            if first < hi and first + count > lo:
                out += _read_file(f, range(lo - first, hi - first))
            first += count
        return out
    except OSError as e:
        raise DataError(f"{e.filename or path}: cannot read ({e.strerror or e})") from None


def _lines(path):
    """(line number, bytes) of each record of a .jsonl file: its lines but blank ones (Unicode's whitespace too), and
    without the byte-order mark some editors put at the start of a UTF-8 file."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            raw = raw.removeprefix(BOM) if i == 1 else raw
            if raw.decode("utf-8", "replace").strip():
                yield i, raw


def _read_file(path, keep=None):
    """The (where, record_or_RowError) of one data file; of a .jsonl file, only the records numbered in `keep`."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        for k, (i, raw) in enumerate(_lines(path)):
            if keep is None or k in keep:
                try:
                    out.append((f"{path}:{i}", _parse_json(raw.rstrip(b"\r\n"), "line")))
                except RowError as e:
                    out.append((f"{path}:{i}", e))
        return out
    if suffix == ".json":
        try:
            rows = _parse_json(path.read_bytes().removeprefix(BOM), "file")
        except RowError as e:
            raise DataError(f"{path}:{e.line}: {e}" if e.line else f"{path}: {e}") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json data file must hold a list of rows")
        return [(f"{path}:row {i}", r) for i, r in enumerate(rows)]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's errors have no common base besides Exception
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        return [(f"{path}:row {i}", r) for i, r in enumerate(table.to_pylist())]
    raise DataError(f"{path}: unsupported data file type '{path.suffix}' (use .jsonl, .json or .parquet)")


def _parse_json(raw, what):
    """The JSON value of a .jsonl line's or a .json file's bytes; any way they are broken is a RowError, with the line
    (of a file). A text cut short fails past its end: the error says where the text ended."""
    try:
        text = raw.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise RowError(f"not valid UTF-8 (byte {e.start + 1})", line=raw.count(b"\n", 0, e.start) + 1) from None
    except json.JSONDecodeError as e:
        msg, end = e.msg.removesuffix(" at"), len(text.rstrip(" \t\r\n"))  # "Unterminated string starting at"
        if e.pos < end:
            raise RowError(f"malformed JSON ({msg} at column {e.colno})", line=e.lineno) from None
        line, column = text.count("\n", 0, end) + 1, end - text.rfind("\n", 0, end)
        raise RowError(f"malformed JSON ({msg} at the end of the {what}, column {column})", line=line) from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise RowError(f"malformed JSON ({str(e).split(':')[0]})") from None
    except RecursionError:
        raise RowError("malformed JSON (nested too deeply)") from None


# --- validation: one record -> (prompt messages, responses, n_chosen, prompt_id, source weights)

def _content(msg, field, i, want_role):
    """Text of a message given as a plain string or a {"role", "content"} dict."""
    if isinstance(msg, str):
        text = msg
    elif isinstance(msg, dict):
        if "content" not in msg:
            raise RowError(f"{field}[{i}] has no 'content'")
        if (role := msg.get("role", want_role)) != want_role:
            raise RowError(f"{field}[{i}] has role '{role}', expected '{want_role}'")
        if not isinstance(text := msg["content"], str):
            raise RowError(f"{field}[{i}].content must be a string, got {type(text).__name__}")
    else:
        raise RowError(f"{field}[{i}] must be a message dict or a string, got {type(msg).__name__}")
    if not text.strip():
        raise RowError(f"{field}[{i}] is empty")
    return valid_text(text, f"{field}[{i}]")


def valid_text(text, name):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RowError(f"{name} is not valid text (an unpaired surrogate escape such as \\ud800)") from None
    return text


def prompt_messages(prompt):
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError("prompt is empty")
        return [{"role": "user", "content": valid_text(prompt, "prompt")}]
    if not isinstance(prompt, list) or not prompt:
        raise RowError("prompt must be a non-empty string or list of messages")
    messages = []
    for i, msg in enumerate(prompt):
        if isinstance(msg, dict):
            if (role := msg.get("role")) not in ROLES:
                raise RowError(f"prompt[{i}] has role {role!r}, expected one of {', '.join(ROLES)}")
        else:  # plain strings alternate user, assistant, user, ...
            role = "user" if i % 2 == 0 else "assistant"
        messages.append({"role": role, "content": _content(msg, "prompt", i, role)})
    if messages[-1]["role"] != "user":
        raise RowError(f"prompt must end with a user turn, ends with '{messages[-1]['role']}'")
    return messages


def validate_row(row, num_sources=0):
    """Check one record; return (prompt messages, [chosen..., rejected] texts, n_chosen, prompt_id, source weights).
    A WRPO row has K source responses, then the target's (K = num_sources, or any K >= 1 for 0); a DPO pair's one
    chosen response is its own source, of weight 1."""
    if not isinstance(row, dict):
        raise RowError(f"row must be a JSON object, got {type(row).__name__}")
    for field in ("prompt", "chosen", "rejected"):
        if field not in row:
            raise RowError(f"missing field '{field}'")
    messages = prompt_messages(row["prompt"])
    chosen, rejected = row["chosen"], row["rejected"]
    if not isinstance(chosen, list) or not chosen:
        raise RowError("chosen must be a list of 1 (DPO) or K + 1 (WRPO: K sources, then the target) responses")
    if num_sources and len(chosen) - 1 != num_sources:  # (a DPO pair too: 0 sources)
        raise RowError(f"chosen has {len(chosen) - 1} source response(s) before the target; num_sources is "
                       f"{num_sources}", hint="--num_sources=0 takes rows of any number of sources")
    if not isinstance(rejected, list) or len(rejected) != 1:
        raise RowError("rejected must be a list of exactly 1 response")
    texts = [_content(m, "chosen", i, "assistant") for i, m in enumerate(chosen)]
    texts.append(_content(rejected[0], "rejected", 0, "assistant"))
    weights = source_weights(row.get("source_weights"), max(1, len(chosen) - 1), len(chosen) > 1)
    return messages, texts, len(chosen), prompt_id_text(row.get("prompt_id", "")), weights


def source_weights(weights, k, wrpo):
    """The K source responses' weights: uniform when not given; else K numbers in [0, 1] that sum to 1."""
    if weights is None:
        return [1 / k] * k
    if not wrpo:
        raise RowError("source_weights given, but a row with one chosen response (DPO) has no source response")
    if not isinstance(weights, list) or len(weights) != k or not all(type(w) in (int, float) and 0 <= w <= 1
                                                                     for w in weights):  # (not NaN, nor a bool)
        raise RowError(f"source_weights must be a list of {k} numbers in [0, 1], one per source response before the "
                       f"target, got {json.dumps(weights)[:80]}")
    if abs(math.fsum(weights) - 1) > 1e-6:
        raise RowError(f"source_weights must sum to 1, they sum to {math.fsum(weights):.6g}")
    return [float(w) for w in weights]


def prompt_id_text(prompt_id):
    """A prompt_id as text: a string or an integer (JSON true/false is neither, though bool is an int)."""
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)):
        raise RowError(f"prompt_id must be a string or an integer, got {type(prompt_id).__name__}")
    return valid_text(prompt_id, "prompt_id") if isinstance(prompt_id, str) else str(prompt_id)


def validate_chat(row):
    """A chat row {"messages": [...]} for SFT: valid roles, non-empty turns, at least one assistant turn."""
    if not isinstance(row["messages"], list) or not row["messages"]:
        raise RowError("messages must be a non-empty list")
    out = []
    for i, msg in enumerate(row["messages"]):
        if not isinstance(msg, dict):
            raise RowError(f"messages[{i}] must be a {{'role', 'content'}} dict, got {type(msg).__name__}")
        if (role := msg.get("role")) not in ROLES:
            raise RowError(f"messages[{i}] has role {role!r}, expected one of {', '.join(ROLES)}")
        out.append({"role": role, "content": _content(msg, "messages", i, role)})
    if not any(m["role"] == "assistant" for m in out):
        raise RowError("messages has no assistant turn to learn from")
    return out


def sft_messages(row):
    """SFT conversation of a row: a chat row's messages, or a WRPO row's prompt + chosen[0] (y_ws)."""
    if isinstance(row, dict) and "messages" in row:
        return validate_chat(row)
    messages, texts, *_ = validate_row(row)
    return messages + [{"role": "assistant", "content": texts[0]}]


# --- the chat template: messages -> tokens

def check_special_tokens(finder, row, texts, chat=False):
    """A RowError naming the first text of a validated row (a chat row's messages; else its prompt's, then its
    responses', in order) that holds a special-token string, and the field it is in."""
    names = lambda f: [f] if isinstance(row[f], str) else [f"{f}[{i}]" for i in range(len(row[f]))]  # noqa: E731
    fields = names("messages") if chat else names("prompt") + names("chosen") + names("rejected")
    for field, text in zip(fields, texts):
        if found := finder.search(text):
            raise RowError(f"{field} holds the special token {found.group()!r}", hint=SPECIAL_TOKENS_HINT)


def render(tokenizer, messages, **kwargs):
    """The chat template's text of messages; a template that refuses them (raise_exception) is a RowError."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as e:
        hint = SYSTEM_HINT if takes_it_without_system(tokenizer, messages, kwargs) else ""
        raise RowError(f"the chat template refuses this row ({e})", hint=hint) from None


def takes_it_without_system(tokenizer, messages, kwargs):
    """Whether the template refused these messages only for their system turns."""
    rest = [m for m in messages if m["role"] != "system"]
    if len(rest) == len(messages) or not rest:
        return bool(messages) and not rest  # no system turn; or nothing but system turns, refused
    try:
        return bool(tokenizer.apply_chat_template(rest, tokenize=False, **kwargs))
    except TemplateError:
        return False


def turn_end(tokenizer):
    """(the special token ending an assistant turn, the tokens of the whitespace after it), or None without any: the
    "\n" of ChatML's "<|im_end|>\n" leads into the next turn, a model stops before it, so it is not scored."""
    probe = "wrpo-probe-reply"
    try:
        text = render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}])
    except RowError:
        return None
    after = text[text.rfind(probe) + len(probe):] if probe in text else ""
    end = after.rstrip()
    token = max((t for t in tokens.special_tokens(tokenizer) if end.endswith(t)), key=len, default=None)
    if token is None or end == after:
        return None
    space = tokenizer(after[len(end):], add_special_tokens=False)["input_ids"]  # after a special token: alone
    return tokenizer.convert_tokens_to_ids(token), space


def scored_length(reply, end):
    """How many of an assistant turn's tokens are scored: all but the whitespace after its end-of-turn token."""
    if end is not None:
        token, space = end
        n = len(reply) - len(space)
        if n > 0 and reply[n:] == space and reply[n - 1] == token:
            return n
    return len(reply)


def encode(tokenizer, messages, responses, end, recipe="default"):
    """(prompt tokens, each response's tokens) from the chat template: the prompt is template(messages,
    add_generation_prompt=True); a response, the rest of template(messages + [it]) up to its end-of-turn token. The
    authors' recipe (their tokenize_row): the prompt is template(messages); a response all the rest, then EOS."""
    authors = recipe == "authors"
    texts = [render(tokenizer, messages, add_generation_prompt=not authors)]
    texts += [render(tokenizer, messages + [{"role": "assistant", "content": r}]) for r in responses]
    # the template adds BOS itself; verbose=False: no warning about rows over the model's length, truncate cuts them
    prompt, *fulls = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    out = []
    for full in fulls:
        if full[: len(prompt)] != prompt:
            raise RowError("the chat template does not render the prompt as a prefix of prompt + response")
        if len(full) == len(prompt):
            raise RowError("a response renders to no tokens")
        reply = full[len(prompt):]
        out.append(reply + [tokenizer.eos_token_id] if authors else reply[: scored_length(reply, end)])
    return prompt, out


def encode_chat(tokenizer, messages, end):
    """(tokens of a conversation, a mask of its assistant tokens), rendered turn by turn: an assistant turn is what
    template(messages[:k + 1]) adds to template(messages[:k], add_generation_prompt=True), up to its end-of-turn
    token: never the header before it, nor whitespace after it."""
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


# --- every row of a file, as TokenRows

def settings_problems(kind, max_length, truncation, max_prompt_length=0, loss_on="assistant", recipe="default",
                      tokenizer=None):
    """What is wrong with the settings of load_preference_rows (kind "preference") or load_sft_examples ("sft"), and
    with the tokenizer if given: the one check, for the scripts' configs and the loaders. [] if nothing."""
    keep = "keep_end" if kind == "preference" else "keep_start"
    problems = [] if truncation in (keep, "error") else [f"truncation must be '{keep}' or 'error', got '{truncation}'"]
    if kind == "preference" and not 0 < max_prompt_length < max_length:
        problems.append(f"need 0 < max_prompt_length < max_length, got {max_prompt_length}, {max_length}")
    if kind == "sft" and loss_on not in ("assistant", "all"):
        problems.append(f"loss_on must be 'assistant' or 'all', got '{loss_on}'")
    if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        problems.append(f"tokenizer {tokenizer.name_or_path} has no chat template; rows are rendered with it")
    if tokenizer is not None and recipe == "authors" and tokenizer.eos_token_id is None:
        problems.append(f"recipe authors appends EOS to each text, and tokenizer {tokenizer.name_or_path} has none")
    return problems


def load_preference_rows(path, tokenizer, *, max_length=2048, max_prompt_length=1800, truncation="keep_end",
                         recipe="default", num_sources=0, skip_invalid=False, allow_special_tokens=False,
                         report=print, hint=SKIP_HINT):
    """Every row of `path` read, validated and tokenized as TokenRows of PreferenceRows (convert_all); truncation
    "keep_end": the paper's rule (tokens.truncate), "error": a bad row. So is text holding a special-token string."""
    if problems := settings_problems("preference", max_length, truncation, max_prompt_length, recipe=recipe,
                                     tokenizer=tokenizer):
        raise DataError("; ".join(problems))
    special = None if allow_special_tokens else tokens.special_tokens_finder(tokenizer)
    end = turn_end(tokenizer)

    def convert(rec, where):
        messages, texts, n_chosen, prompt_id, weights = validate_row(rec, num_sources)
        if special:
            check_special_tokens(special, rec, [m["content"] for m in messages] + texts)
        prompt, responses = encode(tokenizer, messages, texts, end, recipe)
        length = len(prompt) + max(len(r) for r in responses)
        if truncation == "error" and length > max_length:
            raise RowError(f"prompt + longest response is {length} tokens, over max_length {max_length}")
        prompt, responses = tokens.truncate(prompt, responses, max_length, max_prompt_length)
        return PreferenceRow(prompt, responses, n_chosen, where, prompt_id, weights)

    return convert_all(path, convert, "preference", skip_invalid, report, hint)


def load_sft_examples(path, tokenizer, *, max_length=2048, loss_on="assistant", truncation="keep_start",
                      recipe="default", skip_invalid=False, allow_special_tokens=False, report=print, hint=SKIP_HINT):
    """SFT rows (chat rows, or WRPO rows as prompt + y_ws) read, validated and tokenized as TokenRows of Sequences.
    loss_on "assistant": every assistant turn and its end-of-turn token scored, "all": every token (the paper);
    truncation "keep_start": an example cut to its first max_length tokens, "error": a bad row. The authors' recipe
    (TRL's packed SFTTrainer): the text tokenized with special tokens, then EOS, all scored, uncut (sft.py cuts)."""
    if problems := settings_problems("sft", max_length, truncation, loss_on=loss_on, recipe=recipe,
                                     tokenizer=tokenizer):
        raise DataError("; ".join(problems))
    special = None if allow_special_tokens else tokens.special_tokens_finder(tokenizer)
    end = turn_end(tokenizer)

    def convert(rec, where):
        messages = sft_messages(rec)
        if special:
            check_special_tokens(special, rec, [m["content"] for m in messages], chat="messages" in rec)
        if recipe == "authors":
            ids = tokenizer(render(tokenizer, messages), verbose=False)["input_ids"] + [tokenizer.eos_token_id]
            return Sequence(ids, [IGNORE] + ids[1:], where)
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

    return convert_all(path, convert, "sft", skip_invalid, report, hint)


def convert_all(path, convert, kind, skip_invalid, report, hint):
    """TokenRows of every record of `path` converted by convert(record, where), bad rows reported. Collective: each
    rank converts a contiguous share, and all gather the shares in order, so rows and report are one process's."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    errors, row_hints = [], []
    mine = tokens.build_rows(kind, convert_records(read_records(path, (rank, world)), convert, errors, row_hints))
    parts = [(mine, errors, row_hints)] * world
    if world > 1:
        dist.all_gather_object(parts, parts[rank])
    rows = mine if world == 1 else tokens.build_rows(kind, (row for p, _, _ in parts for row in p))  # in rank order
    errors, hints = [e for p in parts for e in p[1]], list(dict.fromkeys(h for p in parts for h in p[2]))
    rows.skipped = report_bad_rows(path, errors, hints, len(rows), skip_invalid, report, hint)
    return rows


def convert_records(records, convert, errors, row_hints):
    """convert() of each good (where, record); a bad one's "file:line: reason" goes to errors, its hint to row_hints."""
    for where, rec in records:
        try:
            if isinstance(rec, RowError):
                raise rec
            yield convert(rec, where)
        except RowError as e:
            errors.append(f"{where}: {e}")
            if e.hint and e.hint not in row_hints:
                row_hints.append(e.hint)
        except RecursionError:  # a record nested deeply enough to exhaust the stack while checking it
            errors.append(f"{where}: nested too deeply")


def report_bad_rows(path, errors, row_hints, n_good, skip_invalid, report, hint):
    """Bad rows stop the run: a DataError listing them, then `hint` (the caller's advice) and the rows' own. With
    skip_invalid they are left out, and the line that `report` gets (their count and the first few) is returned."""
    message = ""
    if errors and skip_invalid:
        shown = "\n  ".join(errors[:5]) + ("\n  ..." if len(errors) > 5 else "")
        message = f"skipped {len(errors)} bad row(s) of {path} (skip_invalid_rows):\n  {shown}" + "".join(
            f"\n({h})" for h in row_hints)
        report(message)
    elif errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        hints = "".join(f"\n({h})" for h in ([hint] if hint else []) + row_hints)
        raise DataError(f"{len(errors)} bad row(s) in {path}:\n  {shown}{more}{hints}")
    if not n_good:
        raise DataError(f"{path}: no rows" + (" left after skipping the bad ones" if errors else ""))
    return message
