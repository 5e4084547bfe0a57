import copy
import json

import pytest
import torch

import data
from batching import collate_preference, train_steps
from data import IGNORE, DataError, load_preference_rows
from tokens import truncate


def wrpo_row(prompt="What is 2 + 2?", ws="Adding 2 and 2 gives 4.", wt="4", rej="5", **extra):
    return {"prompt_id": "p", "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": ws}, {"role": "assistant", "content": wt}],
            "rejected": [{"role": "assistant", "content": rej}], **extra}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_template_rendering_and_loss_mask(tmp_path, tokenizer):
    row = wrpo_row()
    (ex,) = load_preference_rows(write_jsonl(tmp_path / "d.jsonl", [row]), tokenizer)
    messages = row["prompt"]
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(ex.prompt_ids) == prompt_text
    assert prompt_text.startswith("<|begin_of_text|>") and prompt_text.endswith("<|end_header_id|>\n\n")
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for ids, text in zip(ex.responses, ["Adding 2 and 2 gives 4.", "4", "5"]):
        assert ids[-1] == eot  # the end-of-turn token is scored
        assert tokenizer.decode(ids) == text + "<|eot_id|>"
    assert ex.n_chosen == 2

    batch = collate_preference([ex, ex], pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    assert batch["src"].tolist() == [[0], [3]] and batch["wt"].tolist() == [1, 4] and batch["rej"].tolist() == [2, 5]
    assert batch["src_w"].tolist() == [[1.0], [1.0]]
    P = len(ex.prompt_ids)
    for i, r in enumerate(ex.responses * 2):
        lab, mask = batch["labels"][i], batch["attention_mask"][i]
        assert (lab[:P] == IGNORE).all()
        assert lab[P:P + len(r)].tolist() == r
        assert (lab[P + len(r):] == IGNORE).all()  # padding
        assert mask.sum() == P + len(r)
        assert batch["input_ids"][i, :P + len(r)].tolist() == ex.prompt_ids + r


def test_dpo_rows_score_their_one_chosen_as_both(tmp_path, tokenizer):
    row = wrpo_row()
    row["chosen"] = row["chosen"][1:]
    (ex,) = load_preference_rows(write_jsonl(tmp_path / "d.jsonl", [row]), tokenizer)
    assert ex.n_chosen == 1 and len(ex.responses) == 2
    batch = collate_preference([ex], pad_id=0)
    assert batch["src"].tolist() == [batch["wt"].tolist()] == [[0]] and batch["rej"].tolist() == [1]


def test_plain_string_messages(tmp_path, tokenizer):
    row = {"prompt": "Hi there", "chosen": ["Hello!", "Hey."], "rejected": ["Go away."]}
    (ex,) = load_preference_rows(write_jsonl(tmp_path / "d.jsonl", [row]), tokenizer)
    ref_row = wrpo_row("Hi there", "Hello!", "Hey.", "Go away.")
    (ref,) = load_preference_rows(write_jsonl(tmp_path / "e.jsonl", [ref_row]), tokenizer)
    assert ex.prompt_ids == ref.prompt_ids and ex.responses == ref.responses


def test_truncation_branches():
    """max_length 10, max_prompt_length 6 (responses cut to 10 - 6 = 4)."""
    P = list(range(100, 108))  # 8 prompt tokens
    fits = truncate(P[:4], [[1, 2], [3, 4, 5]], 10, 6)
    assert fits == (P[:4], [[1, 2], [3, 4, 5]])  # 4 + 3 <= 10: untouched
    prompt_cut = truncate(P, [[1, 2], [3, 4, 5, 6]], 10, 6)
    assert prompt_cut == (P[-6:], [[1, 2], [3, 4, 5, 6]])  # 8 + 4 > 10 -> keep last 6; 6 + 4 fits
    both_cut = truncate(P, [[1, 2], [1, 2, 3, 4, 5, 6, 7]], 10, 6)
    assert both_cut == (P[-6:], [[1, 2], [1, 2, 3, 4]])  # 6 + 7 > 10 -> every response cut to 4
    # the rule is joint: the longest response decides, a short prompt is still kept whole
    short_prompt = truncate(P[:3], [[1], list(range(12))], 10, 6)
    assert short_prompt == (P[:3], [[1], list(range(4))])


def test_truncation_in_load_preference_rows(tmp_path, tokenizer):
    long_prompt = " ".join(["apple"] * 40)
    row = wrpo_row(prompt=long_prompt, ws="word " * 30)
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    (ex,) = load_preference_rows(path, tokenizer, max_length=48, max_prompt_length=32)
    assert len(ex.prompt_ids) == 32
    prompt_text = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    full_prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert len(full_prompt) > 32
    assert ex.prompt_ids == full_prompt[-32:]  # the END of the prompt is kept
    assert max(len(r) for r in ex.responses) <= 16
    with pytest.raises(DataError, match=r"d\.jsonl:1: prompt \+ longest response is \d+ tokens, over max_length 48"):
        load_preference_rows(path, tokenizer, max_length=48, max_prompt_length=32, truncation="error")


BAD_ROWS = [
    ('{"prompt": "x", "chosen": ["a"]', "malformed JSON"),
    ('["not", "an", "object"]', "row must be a JSON object"),
    (json.dumps({"chosen": ["a"], "rejected": ["b"]}), "missing field 'prompt'"),
    (json.dumps({"prompt": "x", "rejected": ["b"]}), "missing field 'chosen'"),
    (json.dumps({"prompt": "x", "chosen": ["a"]}), "missing field 'rejected'"),
    (json.dumps({"prompt": "x", "chosen": "a", "rejected": ["b"]}), "chosen must be a list of 1"),
    (json.dumps({"prompt": "x", "chosen": [], "rejected": ["b"]}), "chosen must be a list of 1"),
    (json.dumps({"prompt": "x", "chosen": ["a", "b", "c"], "rejected": ["d"], "source_weights": [0.5, 0.4]}),
     "source_weights must sum to 1, they sum to 0.9"),
    (json.dumps({"prompt": "x", "chosen": ["a", "b", "c"], "rejected": ["d"], "source_weights": [1.0]}),
     r"source_weights must be a list of 2 numbers in \[0, 1\], one per source response before the target, got \[1.0\]"),
    (json.dumps({"prompt": "x", "chosen": ["a", "b", "c"], "rejected": ["d"], "source_weights": [1.5, -0.5]}),
     r"source_weights must be a list of 2 numbers in \[0, 1\]"),
    (json.dumps({"prompt": "x", "chosen": ["a", "b"], "rejected": ["d"], "source_weights": [True]}),
     r"source_weights must be a list of 1 numbers in \[0, 1\]"),
    (json.dumps({"prompt": "x", "chosen": ["a"], "rejected": ["d"], "source_weights": [1.0]}),
     r"source_weights given, but a row with one chosen response \(DPO\) has no source response"),
    (json.dumps({"prompt": "x", "chosen": ["a"], "rejected": ["b", "c"]}), "rejected must be a list of exactly 1"),
    (json.dumps({"prompt": "x", "chosen": [{"role": "user", "content": "a"}], "rejected": ["b"]}),
     r"chosen\[0\] has role 'user', expected 'assistant'"),
    (json.dumps({"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                 "chosen": ["a"], "rejected": ["b"]}), "prompt must end with a user turn"),
    (json.dumps({"prompt": [{"role": "bot", "content": "x"}], "chosen": ["a"], "rejected": ["b"]}),
     r"prompt\[0\] has role 'bot'"),
    (json.dumps({"prompt": "x", "chosen": ["a", "  "], "rejected": ["b"]}), r"chosen\[1\] is empty"),
    (json.dumps({"prompt": "x", "chosen": ["a"], "rejected": [{"role": "assistant", "content": ""}]}),
     r"rejected\[0\] is empty"),
    (json.dumps({"prompt": "", "chosen": ["a"], "rejected": ["b"]}), "prompt is empty"),
    (json.dumps({"prompt": [], "chosen": ["a"], "rejected": ["b"]}), "prompt must be a non-empty"),
    (json.dumps({"prompt": "x", "chosen": [{"role": "assistant", "content": 3}], "rejected": ["b"]}),
     r"chosen\[0\]\.content must be a string"),
    (json.dumps({"prompt": "x", "chosen": [{"role": "assistant"}], "rejected": ["b"]}),
     r"chosen\[0\] has no 'content'"),
    (json.dumps({"prompt": "x", "chosen": [7], "rejected": ["b"]}), r"chosen\[0\] must be a message dict or a string"),
    (json.dumps({"prompt_id": [1], "prompt": "x", "chosen": ["a"], "rejected": ["b"]}), "prompt_id must be a string"),
]


@pytest.mark.parametrize("line,reason", BAD_ROWS)
def test_each_bad_row_names_file_line_and_reason(tmp_path, tokenizer, line, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [wrpo_row(), "", wrpo_row(), line])
    with pytest.raises(DataError, match=rf"1 bad row\(s\)[\s\S]*bad\.jsonl:4: {reason}"):
        load_preference_rows(path, tokenizer)


def test_all_bad_rows_are_reported(tmp_path, tokenizer):
    lines = [wrpo_row()] + [line for line, _ in BAD_ROWS]
    with pytest.raises(DataError) as err:
        load_preference_rows(write_jsonl(tmp_path / "bad.jsonl", lines), tokenizer)
    msg = str(err.value)
    assert f"{len(BAD_ROWS)} bad row(s)" in msg
    for i in range(len(BAD_ROWS)):
        assert f"bad.jsonl:{i + 2}:" in msg


def test_template_that_does_not_prefix_is_rejected(tmp_path, tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = tok.chat_template.replace("\n\n{% endif %}", "\n\nSure:{% endif %}")
    assert "Sure:" in tok.chat_template
    with pytest.raises(DataError, match=r"d\.jsonl:1: the chat template does not render the prompt as a prefix"):
        load_preference_rows(write_jsonl(tmp_path / "d.jsonl", [wrpo_row()]), tok)
    tok.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        load_preference_rows(write_jsonl(tmp_path / "d.jsonl", [wrpo_row()]), tok)


def test_file_formats_and_paths(tmp_path, tokenizer):
    rows = [wrpo_row(prompt=f"q{i}") for i in range(3)]
    (tmp_path / "set").mkdir()
    write_jsonl(tmp_path / "set" / "a.jsonl", rows[:2])
    (tmp_path / "set" / "b.json").write_text(json.dumps(rows[2:]))
    (tmp_path / "set" / "notes.txt").write_text("ignored")
    from_folder = load_preference_rows(tmp_path / "set", tokenizer)
    from_jsonl = load_preference_rows(write_jsonl(tmp_path / "all.jsonl", rows), tokenizer)
    assert [e.prompt_ids for e in from_folder] == [e.prompt_ids for e in from_jsonl]
    assert from_folder[2].where.endswith("b.json:row 0")
    with pytest.raises(DataError, match="no such file or folder"):
        load_preference_rows(tmp_path / "missing.jsonl", tokenizer)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported data file type '.csv'"):
        load_preference_rows(tmp_path / "x.csv", tokenizer)
    (tmp_path / "obj.json").write_text('{"prompt": "x"}')
    with pytest.raises(DataError, match="must hold a list of rows"):
        load_preference_rows(tmp_path / "obj.json", tokenizer)
    (tmp_path / "broken.json").write_text('[{"prompt": "x",\n  ]')
    with pytest.raises(DataError, match=r"broken\.json:2: malformed JSON"):
        load_preference_rows(tmp_path / "broken.json", tokenizer)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_preference_rows(tmp_path / "empty.jsonl", tokenizer)


def test_parquet(tmp_path, tokenizer, monkeypatch):
    rows = [wrpo_row(prompt=f"q{i}") for i in range(2)]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pa = None
    if pa is not None:
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
        got = load_preference_rows(tmp_path / "d.parquet", tokenizer)
        want = load_preference_rows(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer)
        assert [e.responses for e in got] == [e.responses for e in want]
    else:
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
    import builtins
    real_import = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(DataError, match=r"needs pyarrow \(pip install pyarrow\)"):
        load_preference_rows(tmp_path / "d.parquet", tokenizer)


def test_config_validation_errors(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [wrpo_row()])
    with pytest.raises(DataError, match="max_prompt_length"):
        load_preference_rows(path, tokenizer, max_length=10, max_prompt_length=10)
    with pytest.raises(DataError, match="truncation must be"):
        load_preference_rows(path, tokenizer, truncation="keep_start")


def test_train_steps_shard_disjoint_deterministic_rows():
    n, G, epochs = 50, 12, 2
    steps = lambda rank=0, world=1, seed=3, total=99, start=0: list(  # noqa: E731
        train_steps(n, epochs, seed, G, rank, world, total, start))
    one = steps()
    assert [(s, e) for s, e, _ in one] == [(s, s // (n // G)) for s in range(epochs * (n // G))]  # last partial dropped
    assert all(len(rows) == G for _, _, rows in one)
    for world in (2, 3):
        per_rank = [steps(r, world) for r in range(world)]
        for step in range(len(one)):
            rows = [i for r in range(world) for i in per_rank[r][step][2]]
            assert len(rows) == len(set(rows)) == G  # disjoint across ranks
            assert sorted(rows) == sorted(one[step][2])  # same rows per step, any world size
    assert steps() == one and steps(seed=4) != one
    assert one[0][2] != one[n // G][2]  # another order in the next epoch
    for epoch in range(epochs):
        seen = [i for _, e, rows in one if e == epoch for i in rows]
        assert len(set(seen)) == len(seen) == (n // G) * G  # an epoch never repeats a row
    assert steps(total=5) == one[:5] and steps(total=5, start=3) == one[3:5]  # a resumed run: the same rows


def test_collate_pads_with_pad_id():
    ex = data.PreferenceRow(prompt_ids=[1, 2], responses=[[3], [4, 5, 6], [7]], n_chosen=2, where="x:1")
    batch = collate_preference([ex], pad_id=99)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 99, 99], [1, 2, 4, 5, 6], [1, 2, 7, 99, 99]]
    assert batch["labels"].tolist()[0] == [IGNORE, IGNORE, 3, IGNORE, IGNORE]
    assert batch["input_ids"].dtype == torch.long
