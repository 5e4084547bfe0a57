"""Tokenized rows held flat (tokens.TokenRows), shared by ranks, and cached in a file each node writes once and each
rank reads (training.load_cached, through tokens.cached: the procedure the reference log-probs' cache shares)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import batching
import data
import tokens
import training
from conftest import REPO
from data import DataError, load_preference_rows, load_sft_examples
from test_data import wrpo_row, write_jsonl

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                     {"role": "assistant", "content": "Goodbye, see you."}]}


def rows_file(tmp_path, n=12):
    rows = [wrpo_row(f"Question {i}: what is {i} + {i}?", f"It is {2 * i}, since {i} + {i} = {2 * i}.", str(2 * i),
                     str(i), prompt_id=f"q{i}") for i in range(n)]
    rows[3]["chosen"] = rows[3]["chosen"][:1]  # a DPO row: two pieces after its prompt, not three
    return write_jsonl(tmp_path / "rows.jsonl", rows)


def as_lists(rows):
    return [(r.prompt_ids, r.responses, r.n_chosen, r.where, r.prompt_id) if isinstance(r, data.PreferenceRow)
            else (r.ids, r.labels, r.where, r.start) for r in rows]


def cached_rows(path, tokenizer, cache, report=None, sft=False, **settings):
    """training.load_cached of load_sft_examples (sft) or load_preference_rows (with the tests' lengths by default)."""
    load = data.load_sft_examples if sft else data.load_preference_rows
    settings = settings or ({} if sft else dict(max_length=64, max_prompt_length=16))
    return training.load_cached(load, path, tokenizer, cache, report=report or (lambda _: None), **settings)


def row_length(row, shared_prompt=False):
    return sum(len(s.ids) for s in batching.row_sequences(row, shared_prompt))


def one_at_a_time(tmp_path, path, load):
    """Each row of `path` loaded from a file of its own: the lists TokenRows must give back."""
    return [load(write_jsonl(tmp_path / f"one{i}.jsonl", [line]))[0]
            for i, line in enumerate(path.read_text().splitlines())]


def test_token_rows_give_back_what_convert_made(tmp_path, tokenizer):
    path = rows_file(tmp_path)
    load = lambda p: load_preference_rows(p, tokenizer, max_length=64, max_prompt_length=16)  # noqa: E731
    rows, lists = load(path), one_at_a_time(tmp_path, path, load)
    assert isinstance(rows, tokens.TokenRows) and rows.tokens.dtype == np.int32 and len(rows) == 12
    assert [r[:3] + r[4:] for r in as_lists(rows)] == [r[:3] + r[4:] for r in as_lists(lists)]
    assert [r.where for r in rows] == [f"{path}:{i}" for i in range(1, 13)]
    assert rows[3].n_chosen == 1 and len(rows[3].responses) == 2 and rows[-1].prompt_id == "q11"
    assert as_lists(rows[2:5]) == as_lists([rows[2], rows[3], rows[4]])
    with pytest.raises(IndexError):
        rows[12]
    # lengths from the flat arrays equal those of the lists; the fingerprint sees any token and any row boundary
    for shared in (False, True):
        assert batching.row_lengths(rows, shared) == [row_length(r, shared) for r in lists]
    assert rows.tokens.nbytes == 4 * sum(len(r.prompt_ids) + sum(map(len, r.responses)) for r in lists)
    same = tokens.build_rows("preference", list(rows))
    assert tokens.fingerprint(same) == tokens.fingerprint(rows)
    changed = list(rows)
    changed[7].responses[0][-1] += 1
    assert tokens.fingerprint(tokens.build_rows("preference", changed)) != tokens.fingerprint(rows)
    moved = list(rows)  # the same tokens, one of them moved from a prompt to its response
    moved[4].responses[0].insert(0, moved[4].prompt_ids.pop())
    assert tokens.fingerprint(tokens.build_rows("preference", moved)) != tokens.fingerprint(rows)


def test_sft_token_rows_keep_their_labels(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT, wrpo_row(), CHAT])
    for loss_on in ("assistant", "all"):
        rows = load_sft_examples(path, tokenizer, max_length=48, loss_on=loss_on)
        lists = one_at_a_time(tmp_path, path, lambda p: load_sft_examples(p, tokenizer, max_length=48,
                                                                           loss_on=loss_on))
        assert [(r.ids, r.labels) for r in rows] == [(r.ids, r.labels) for r in lists]
        ignored = rows[0].labels.count(data.IGNORE)  # the first token always; with "assistant", the other turns too
        assert ignored > 1 if loss_on == "assistant" else ignored == 1
        assert batching.row_lengths(rows) == [len(r.ids) for r in lists]
        assert tokens.fingerprint(rows, [[0, 1], [2]]) != tokens.fingerprint(rows, [[0], [1, 2]])  # the packing


def test_the_cache_is_written_once_and_read_back(tmp_path, tokenizer):
    path, cache, said = rows_file(tmp_path), tmp_path / "cache", []
    first = cached_rows(path, tokenizer, cache, said.append)
    (file,) = cache.glob("rows.jsonl.tokens-*.safetensors")
    assert "tokenized on 1 rank; cached in" in said[-1] and not list(cache.glob("*.tmp"))
    mtime = file.stat().st_mtime_ns
    again = cached_rows(path, tokenizer, cache, said.append)
    assert f"(cached: {file})" in said[-1] and file.stat().st_mtime_ns == mtime
    fresh = load_preference_rows(path, tokenizer, max_length=64, max_prompt_length=16)
    assert as_lists(again) == as_lists(first) == as_lists(fresh)
    assert tokens.fingerprint(again) == tokens.fingerprint(first) == tokens.fingerprint(fresh)
    assert batching.row_lengths(again, True) == batching.row_lengths(fresh, True)
    meta = safe_open(file, "np").metadata()  # the key it was computed for is in the file, and is checked
    assert file.name.split("-")[-1].split(".")[0] == meta["key"][:20] and meta["kind"] == "preference"
    with open(file, "r+b") as f:  # cut in place (cp over it) while the rows are in use: a mapped file would SIGBUS
        f.truncate(100)
    assert as_lists(again) == as_lists(fresh)


def test_another_files_cache_under_this_name_is_refused(tmp_path, tokenizer):
    """The key a cache was computed for is in the file: b.jsonl's cache copied over a.jsonl's name is never read as
    a.jsonl's rows (the red team saw b's rows trained as "48 rows from a.jsonl (cached)")."""
    a = rows_file(tmp_path)
    b = write_jsonl(tmp_path / "b.jsonl", [wrpo_row(f"Other {i}?", "Yes.", "No.", "Maybe.") for i in range(5)])
    cache, said = tmp_path / "cache", []
    cached_rows(a, tokenizer, cache)
    cached_rows(b, tokenizer, cache)
    (a_file,), (b_file,) = cache.glob("rows.jsonl.tokens-*"), cache.glob("b.jsonl.tokens-*")
    shutil.copy(b_file, a_file)
    rows = cached_rows(a, tokenizer, cache, said.append)
    assert "damaged (computed for another key)" in said[0] and len(rows) == 12
    assert as_lists(rows) == as_lists(load_preference_rows(a, tokenizer, max_length=64, max_prompt_length=16))


@pytest.mark.parametrize("change", ["content", "settings", "template", "kind", "code", "path"])
def test_a_stale_cache_is_never_used(tmp_path, tokenizer, change, monkeypatch):
    path, cache = rows_file(tmp_path), tmp_path / "cache"
    load = lambda tok, n=64, sft=False: cached_rows(  # noqa: E731
        path, tok, cache, sft=sft, **({"max_length": n} if sft else {"max_length": n, "max_prompt_length": 16}))
    before = load(tokenizer)
    if change == "content":  # one character, the same size and a restored mtime: the content decides
        stat = path.stat()
        path.write_text(path.read_text().replace("Question 5", "Question 6"))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        after = load(tokenizer)
        assert after[5].prompt_ids != before[5].prompt_ids
    elif change == "settings":
        after = load(tokenizer, n=40)
        assert max(batching.row_lengths(after)) < max(batching.row_lengths(before))
    elif change == "template":
        other = shutil.copytree(REPO / "demo" / "model", tmp_path / "tok",
                                ignore=shutil.ignore_patterns("*.safetensors"))
        tpl = other / "chat_template.jinja"
        tpl.write_text(tpl.read_text().replace("<|start_header_id|>", "<|start_header_id|> "))
        from transformers import AutoTokenizer

        after = load(AutoTokenizer.from_pretrained(other))
        assert after[0].prompt_ids != before[0].prompt_ids
    elif change == "kind":
        after = load(tokenizer, sft=True)
        assert isinstance(after[0], data.Sequence)
    elif change == "code":  # a fork that edits how rows are converted (here: a comment) never reads old tokens
        edited = tmp_path / "data.py"
        edited.write_text(Path(data.__file__).read_text() + "\n# an ablation\n")
        monkeypatch.setattr(data, "__file__", str(edited))
        load(tokenizer)
    else:  # the same content elsewhere: the rows' names (file:line) are another path's
        moved = tmp_path / "moved"
        moved.mkdir()
        path = shutil.copy(path, moved / "rows.jsonl")
        assert load(tokenizer)[0].where == f"{path}:1"
    assert len(list(cache.glob("rows.jsonl.tokens-*.safetensors"))) == 2  # a new file, the old one untouched


def rewrite(file, tensors, metadata):
    from safetensors.numpy import save_file

    file.unlink()  # a new file: rows loaded before may still map the old one
    save_file(tensors, file, metadata=metadata)


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "header", "key", "crc"])
def test_a_damaged_cache_is_refused_and_rewritten(tmp_path, tokenizer, damage):
    path, cache, said = rows_file(tmp_path), tmp_path / "cache", []
    good = as_lists(cached_rows(path, tokenizer, cache))
    (file,) = cache.glob("*.tokens-*")
    raw = bytearray(file.read_bytes())
    if damage in ("key", "crc"):  # a sound file of another key; a CRC-32 that is not its array's
        arrays, meta = load_file(file), safe_open(file, "np").metadata()
        meta = {**meta, "key": "0" * 64} if damage == "key" else {
            **meta, "crc32": json.dumps({**json.loads(meta["crc32"]), "offsets": "00000000"})}
        rewrite(file, arrays, meta)
    else:
        if damage == "flip":
            raw[-9] ^= 0x40  # a token in the last piece
        elif damage == "truncate":
            raw = raw[: len(raw) // 2]
        elif damage == "empty":
            raw = b""
        else:
            raw[8:12] = b"!!!!"
        file.unlink()  # a new file: the loaded rows above may still map the old one
        file.write_bytes(bytes(raw))
    rows = cached_rows(path, tokenizer, cache, said.append)
    problem = {"flip": "tokens does not match its CRC-32", "key": "computed for another key",
               "crc": "offsets does not match its CRC-32"}.get(damage, "unreadable")
    assert any(f"tokenized rows: the cache {file} is damaged ({problem}" in s and "computing it again" in s
               for s in said), said
    assert as_lists(rows) == good
    again = []
    cached_rows(path, tokenizer, cache, again.append)
    assert "(cached:" in again[-1]  # rewritten whole


def test_an_unwritable_cache_folder_only_costs_the_cache(tmp_path, tokenizer):
    path, said = rows_file(tmp_path), []
    (tmp_path / "file").write_text("")
    rows = cached_rows(path, tokenizer, tmp_path / "file" / "c", said.append)
    assert len(rows) == 12 and any("tokenized rows: not cached" in s for s in said)
    assert "(tokenized on 1 rank)" in said[-1]


FULL_DISK = """
import resource, signal, sys
import torch
sys.path.insert(0, {repo!r})
import numpy as np
import data, tokens, training
from pathlib import Path
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained({model!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.RLIM_INFINITY))  # a disk that fills up mid-file
said = []
rows = training.load_cached(data.load_preference_rows, {path!r}, tok, {cache!r}, report=said.append, max_length=64,
                        max_prompt_length=16)
print(len(rows), "|".join(said))
table = {{"logps": np.zeros((1000, 3), np.float32)}}
_, _, how = tokens.cached(Path({cache!r}) / "ref.safetensors", "k", lambda: (table, {{}}), "reference log-probs",
                          print)
print(how)
"""


def test_a_cache_the_disk_cannot_hold_is_only_reported(tmp_path):
    """A full disk fails a safetensors write with its own error type, not OSError: still only reported."""
    path, cache = rows_file(tmp_path), tmp_path / "cache"
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK.format(repo=str(REPO), model=str(REPO / "demo" / "model"), path=str(path),
                                       cache=str(cache)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    rows_line = next(line for line in lines if line.startswith("12 "))  # the 12 rows, and what was said
    assert "tokenized rows: not cached" in rows_line and "(tokenized on 1 rank)" in rows_line
    assert lines[-1] == "computed" and any("reference log-probs: not cached" in line for line in lines)
    assert not list(cache.glob("*")) or all(not f.name.endswith(".tmp") for f in cache.iterdir())


def test_temporary_files_of_dead_writers_are_removed(tmp_path, tokenizer):
    path, cache = rows_file(tmp_path), tmp_path / "cache"
    cached_rows(path, tokenizer, cache)
    (file,) = cache.glob("*.tokens-*")
    host = socket.gethostname()
    dead, live, other = (cache / f"{file.name}.{h}-{pid}.tmp" for h, pid in
                         [(host, 2**22 + 7), (host, os.getppid()), ("elsewhere", 2**22 + 7)])
    for f in (dead, live, other):
        f.write_bytes(b"half a cache")
    file.unlink()
    cached_rows(path, tokenizer, cache)
    assert not dead.exists() and live.exists() and other.exists()  # only this host's dead writer's


def test_skipped_rows_are_reported_again_from_the_cache(tmp_path, tokenizer):
    rows = [wrpo_row(), {"prompt": "x"}, wrpo_row("Why?"), "not json"]
    path, cache = write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "cache"
    for _ in range(2):
        said = []
        out = cached_rows(path, tokenizer, cache, said.append, skip_invalid=True)
        assert len(out) == 2 and said[0].startswith("skipped 2 bad row(s)") and f"{path}:4" in said[0]
    assert "(cached:" in said[-1]
    with pytest.raises(DataError, match="2 bad row"):  # without skipping: refused, and nothing cached for it
        cached_rows(path, tokenizer, cache, max_length=2048)
    assert len(list(cache.glob("*.tokens-*"))) == 1


def test_shares_of_the_records_cover_them_in_order(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"i": 0}, "", {"i": 1}, "{bad", {"i": 3}])
    write_jsonl(folder / "b.jsonl", [{"i": 4}, {"i": 5}, "", ""])
    (folder / "c.json").write_text(json.dumps([{"i": 6}]))
    whole = data.read_records(folder)
    assert len(whole) == 7
    for world in (1, 2, 3, 5, 9):
        shares = [data.read_records(folder, share=(k, world)) for k in range(world)]
        assert [r for s in shares for r in s] == whole or str([r for s in shares for r in s]) == str(whole)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    jsonl = [data.read_records(folder / "a.jsonl", share=(k, 2)) for k in range(2)]
    assert [w for w, _ in jsonl[0]] == [f"{folder / 'a.jsonl'}:1", f"{folder / 'a.jsonl'}:3"]
    assert [w for w, _ in jsonl[1]] == [f"{folder / 'a.jsonl'}:4", f"{folder / 'a.jsonl'}:5"]
    assert isinstance(jsonl[1][0][1], data.RowError)  # a bad line belongs to the share that holds it


def test_no_warning_about_rows_longer_than_the_model(tmp_path, tokenizer, capfd):
    long = " ".join(["word"] * 2 * tokenizer.model_max_length)
    rows = load_preference_rows(write_jsonl(tmp_path / "long.jsonl", [wrpo_row(long)]), tokenizer,
                                max_length=4 * tokenizer.model_max_length, max_prompt_length=64)
    assert len(rows[0].prompt_ids) > tokenizer.model_max_length  # longer than the model's, kept whole
    load_sft_examples(write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": long},
                                                                       {"role": "assistant", "content": "ok"}]}]),
                      tokenizer, max_length=4 * tokenizer.model_max_length)
    out, err = capfd.readouterr()
    assert "Token indices sequence length" not in out + err


DRIVER = """
import json, sys
import torch.distributed as dist
sys.path.insert(0, {repo!r})
import batching, data, tokens, training
from transformers import AutoTokenizer
dist.init_process_group("gloo")
tok = AutoTokenizer.from_pretrained({model!r})
said = []
try:
    rows = training.load_cached(data.load_preference_rows, {path!r}, tok, {cache!r}, report=said.append, max_length=64,
                            max_prompt_length=16, skip_invalid={skip})
    out = dict(fingerprint=tokens.fingerprint(rows), said=said, lengths=batching.row_lengths(rows, True))
except data.DataError as e:
    out = dict(error=str(e))
json.dump(out, open({out!r} + str(dist.get_rank()), "w"))
dist.destroy_process_group()
"""


def load_under_torchrun(tmp_path, ranks, path, cache, skip=False):
    script = tmp_path / "driver.py"
    out = str(tmp_path / f"out{ranks}-")
    script.write_text(DRIVER.format(repo=str(REPO), model=str(REPO / "demo" / "model"), path=str(path),
                                    cache=str(cache), skip=skip, out=out))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                    str(script)], env=env, check=True, capture_output=True, timeout=300)
    return [json.loads(open(out + str(r)).read()) for r in range(ranks)]


@pytest.mark.slow
def test_ranks_share_the_work_and_agree_with_one_process(tmp_path, tokenizer):
    path = rows_file(tmp_path, n=15)
    one = load_preference_rows(path, tokenizer, max_length=64, max_prompt_length=16)
    r1, r2 = load_under_torchrun(tmp_path, 2, path, tmp_path / "cache2")
    assert r1["fingerprint"] == r2["fingerprint"] == tokens.fingerprint(one)
    assert r1["lengths"] == batching.row_lengths(one, True)
    assert "tokenized on 2 ranks; cached in" in r1["said"][-1]
    (file,) = (tmp_path / "cache2").glob("*.tokens-*")  # the same file one process writes
    cached_rows(path, tokenizer, tmp_path / "cache1")
    assert [f.name for f in (tmp_path / "cache1").glob("*.tokens-*")] == [file.name]
    one_file, two_files = (tmp_path / "cache1" / file.name, file)
    assert safe_open(one_file, "np").metadata() == safe_open(two_files, "np").metadata()  # (any order in the header)
    a, b = load_file(one_file), load_file(two_files)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    r1, r2 = load_under_torchrun(tmp_path, 2, path, tmp_path / "cache2")
    assert "(cached:" in r1["said"][-1] and r1["fingerprint"] == tokens.fingerprint(one)
    # bad rows in both ranks' shares: one report, in file order, the same on every rank and as one process's
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1], rows[13] = {"prompt": "x"}, "not json"
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as one_error:
        load_preference_rows(bad, tokenizer, max_length=64, max_prompt_length=16)
    r1, r2 = load_under_torchrun(tmp_path, 2, bad, tmp_path / "cache3")
    assert r1["error"] == r2["error"] == str(one_error.value)
    assert r1["error"].index(f"{bad}:2") < r1["error"].index(f"{bad}:14")
    r1, _ = load_under_torchrun(tmp_path, 2, bad, tmp_path / "cache3", skip=True)
    assert r1["said"][0].startswith("skipped 2 bad row(s)") and len(r1["lengths"]) == 13
