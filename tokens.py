"""Tokenized rows (a preference row's truncation, by the paper's rule), the token table (TokenRows: a data file's rows
in flat arrays, about 4 bytes per token where Python lists of ints take 25-45) and `cached`, the one procedure of both
caches: the tokenized rows (training.load_cached) and the reference log-probs (wrpo.load_reference)."""

import hashlib
import json
import re
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from checkpoint import crc32, write_atomic
from fsdp_utils import is_local_master, on_every_rank
from logps import IGNORE


@dataclass
class PreferenceRow:
    """A tokenized WRPO row (or DPO pair): one prompt and its responses."""

    prompt_ids: list  # chat-template tokens of the prompt, ending with the assistant header (authors' recipe: before)
    responses: list  # token lists: the chosen ones, then rejected; each ends with end-of-turn (authors': then EOS)
    n_chosen: int  # K + 1 for WRPO rows (K sources, then the target), 1 for DPO pairs
    where: str  # "file:line", for error messages
    prompt_id: str = ""
    source_weights: list = (1.0,)  # the K sources' weights (a DPO pair's chosen response is its own source)


@dataclass
class Sequence:
    """A tokenized sequence with its labels: an SFT example, or one prompt + response of a preference row."""

    ids: list  # one whole sequence (an SFT conversation, or a prompt + one response)
    labels: list  # ids where the loss applies, IGNORE elsewhere (always IGNORE at position 0)
    where: str
    start: int = 0  # position id of the first token (> 0: continues a shared prompt, see attention.py)


def truncate(prompt, responses, max_length, max_prompt_length):
    """The reference code's rule, joint over the row's responses: if prompt + the longest response exceeds max_length,
    keep the last max_prompt_length prompt tokens; if still too long, cut each response to the rest."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest > max_length:
        prompt = prompt[-max_prompt_length:]
    if len(prompt) + longest > max_length:
        responses = [r[: max_length - max_prompt_length] for r in responses]
    return prompt, responses


# --- the token table

class TokenRows:
    """Tokenized rows as flat arrays; rows[i] builds the i-th PreferenceRow (or SFT Sequence) when a batch needs it.
        tokens   int32 [n_tokens]       the tokens of every piece, back to back
        offsets  int64 [n_pieces + 1]   where each piece starts: a preference row's prompt, then each response; an
                                        SFT example is one piece
        firsts   int64 [n_rows + 1]     the first piece of each row
        weights  float64 [n_pieces]     preference rows only: a source response's weight, 0 for the other pieces
        scored   uint8 [n_tokens]       SFT only: 1 where the label is the token, 0 where it is IGNORE
    where: each row's file:line; skipped: the report of bad rows left out."""

    def __init__(self, kind, arrays, where, prompt_ids, skipped=""):
        self.kind, self.arrays, self.where, self.prompt_ids, self.skipped = kind, arrays, where, prompt_ids, skipped
        self.tokens, self.scored, self.weights = arrays["tokens"], arrays.get("scored"), arrays.get("weights")
        self.offsets, self.firsts = arrays["offsets"], arrays["firsts"]

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
            return Sequence(pieces[0], np.where(self.scored[s:e] != 0, pieces[0], IGNORE).tolist(), self.where[i])
        k = max(1, len(pieces) - 3)  # sources: K, or a DPO pair's one chosen response
        weights = self.weights[self.firsts[i] + 1 : self.firsts[i] + 1 + k].tolist()
        return PreferenceRow(pieces[0], pieces[1:], len(pieces) - 2, self.where[i], self.prompt_ids[i], weights)


def build_rows(kind, rows):
    """TokenRows of converted rows, an iterable of PreferenceRows or SFT Sequences: each row's lists live only while
    it is copied in."""
    tokens, scored, offsets, firsts = array("i"), array("B"), array("q", [0]), array("q", [0])
    where, prompt_ids, weights = [], [], array("d")
    for row in rows:
        if kind == "sft":
            pieces = [row.ids]
            scored.extend(label != IGNORE for label in row.labels)
        else:
            pieces = [row.prompt_ids, *row.responses]
            prompt_ids.append(row.prompt_id)
            weights.extend([0.0, *row.source_weights] + [0.0] * (len(pieces) - 1 - len(row.source_weights)))
        for p in pieces:
            tokens.extend(p)
            offsets.append(len(tokens))
        firsts.append(len(offsets) - 1)
        where.append(row.where)
    arrays = dict(tokens=np.frombuffer(tokens, np.int32), offsets=np.frombuffer(offsets, np.int64),
                  firsts=np.frombuffer(firsts, np.int64))
    if kind == "sft":
        arrays["scored"] = np.frombuffer(scored, np.uint8)
    else:
        arrays["weights"] = np.frombuffer(weights, np.float64)
    return TokenRows(kind, arrays, where, prompt_ids)


def row_name(row):
    """How messages name a row: file:line, and its prompt_id when it has one."""
    pid = getattr(row, "prompt_id", "")
    return f"{row.where} ({pid})" if pid else row.where


def fingerprint(rows, groups=None):
    """A digest of tokenized rows and of how they are grouped (SFT's packed sequences): any change to the data, the
    tokenizer or its chat template, the truncation settings or the packing changes it. A resume compares it."""
    h = hashlib.sha256(rows.kind.encode())
    for name in sorted(rows.arrays):
        for piece in _pieces(rows.arrays[name]):
            h.update(piece)
    for group in groups or []:
        h.update(np.asarray(group, np.int64).tobytes() + b";")
    return f"{len(rows)} rows, sha256 {h.hexdigest()[:20]}"


def _pieces(a, n=1 << 24):
    """An array in pieces of n elements along its first dimension."""
    return (np.ascontiguousarray(a[i : i + n]) for i in range(0, len(a), n))


# --- the cache procedure

def cached(file, key, compute, what, report):
    """(arrays, metadata, how): `file`'s, or compute()'s where no copy of it verifies. Collective.

    1. `file` is named after `key`, a digest of everything its content depends on; its metadata holds the key too.
    2. Every rank reads it if it verifies: the key it holds is `key`, each array matches its CRC-32. A damaged file
       is reported and never used.
    3. If any rank has no such file (another node's cache, say), all compute it: compute() is collective and returns
       (arrays, metadata), the same on every rank. The first process of each node writes the node's copy, whole or
       not at all; a folder that cannot take it is reported, and costs only the next run the same compute.
    4. A file read is copied into each rank's memory at once: one rewritten in place later (cp over it) cannot pull
       the data from under the run, as it would from a mapped file (SIGBUS when it shrinks).
    how: "cached" (read), "written" (computed, and each node's copy written) or "computed" (not cached)."""
    found = _read(file, key, what, report) if file.exists() else None
    if on_every_rank(found is not None):
        return (*found, "cached")
    arrays, metadata = compute()
    written = _write(file, key, arrays, metadata, what, report) if is_local_master() else True
    return arrays, metadata, "written" if on_every_rank(written) else "computed"


def _write(file, key, arrays, metadata, what, report):
    """The arrays as a safetensors file, with the key and their CRC-32s in its metadata, under a temporary name of
    this process's own (nodes sharing a folder may write it at once; write_atomic's private). Whether it was written."""
    arrays = {k: np.ascontiguousarray(a) for k, a in arrays.items()}
    metadata = {**metadata, "key": key, "crc32": json.dumps({k: crc32([a]) for k, a in arrays.items()})}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(file, lambda tmp: save_file(arrays, tmp, metadata=metadata), private=True)
        return True
    except (OSError, SafetensorError) as e:  # (safetensors reports a full disk as a SafetensorError)
        report(f"{what}: not cached ({file.parent}: {getattr(e, 'strerror', None) or e})")
        return False


def _read(file, key, what, report):
    """(arrays read into memory, metadata), or None when it does not verify (reported)."""
    try:
        with safe_open(file, framework="np") as f:
            metadata, arrays = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        crcs = json.loads(metadata.get("crc32", "{}"))
        problem = ("computed for another key" if metadata.get("key") != key else
                   next((f"{k} does not match its CRC-32" for k, a in arrays.items()
                         if crcs.get(k) != crc32(_pieces(a))), None))
    except (OSError, SafetensorError, ValueError) as e:  # (json.JSONDecodeError is a ValueError)
        problem = f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if problem:
        report(f"{what}: the cache {file} is damaged ({problem}); computing it again")
        return None
    return arrays, metadata


def cached_rows(file, key, load, report):
    """(TokenRows, how) through the cache procedure (`cached`), load() computing them: the file holds their arrays,
    and as metadata their kind, names, prompt_ids and the report of bad rows left out, said again when read."""
    def compute():
        rows = load()
        return rows.arrays, {"kind": rows.kind, "where": json.dumps(rows.where),
                             "prompt_ids": json.dumps(rows.prompt_ids), "skipped": rows.skipped}

    arrays, meta, how = cached(file, key, compute, "tokenized rows", report)
    rows = TokenRows(meta["kind"], arrays, json.loads(meta["where"]), json.loads(meta["prompt_ids"]), meta["skipped"])
    if how == "cached" and rows.skipped:
        report(rows.skipped)  # the bad rows left out, as when they were tokenized
    return rows, how


def cache_folder(setting, data_path):
    """Where a cache of `data_path` goes: the folder a setting names, or beside the data (in a data folder)."""
    data_path = Path(data_path)
    return Path(setting) if setting else data_path if data_path.is_dir() else data_path.parent


def special_tokens(tokenizer):
    """The tokenizer's special-token strings: BOS, EOS, pad, and added ones such as <|im_end|>."""
    found = {str(t) for t in tokenizer.all_special_tokens}
    found |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return set(filter(None, found))


def special_tokens_finder(tokenizer):
    """A regex matching the tokenizer's special-token strings (or None), which text must not hold: they would forge
    turns. It is their trie: a scan tries a branch per character, not Llama-3's 256 tokens at each "<|" (70x faster)."""
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
