"""The fusion-data commands: eval.split (prompts between SFT and WRPO) and eval.build (WRPO and SFT rows from
scored source and target samples)."""

import json
import random

import pytest

import data
from data import DataError
from eval import build
from eval.split import split
from test_sft_data import WRPO_ROW, write_jsonl


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scored(pid, prompt, texts, scores, model):
    row = {"prompt": prompt, "responses": texts, "scores": scores, "model": model}
    return {"prompt_id": pid, **row} if pid is not None else row


def read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_rows_take_the_best_source_and_the_best_and_worst_target(tmp_path, capsys):
    a = write(tmp_path / "a.jsonl", [scored("p1", "one?", ["a1", "a2"], [0.2, 0.9], "A"),
                                     scored("p2", "two?", ["a3"], [0.5], "A"),
                                     scored("p3", "three?", ["a4", ""], [0.1, 5.0], "A"),  # empty: ignored
                                     scored("p5", "five?", ["a5"], [0.1], "A")])
    b = write(tmp_path / "b.jsonl", [scored("p1", "one?", ["b1"], [0.7], "B"),
                                     scored("p2", "two?", ["b2", "b3"], [0.8, 0.6], "B")])
    t = write(tmp_path / "t.jsonl", [scored("p1", "one?", ["t1", "t2", "t3"], [0.3, -0.2, 0.5], "T"),
                                     scored("p2", "two?", ["t4", "t5"], [0.4, 0.4], "T"),  # tied: no preference
                                     scored("p3", "three?", ["t6", "t7"], [1.0, 2.0], "T"),
                                     scored("p4", "four?", ["t8", "t9"], [1.0, 2.0], "T"),  # no source response
                                     scored("p5", "five?", ["", "t10"], [9.0, 1.0], "T")])  # one non-empty sample
    out = tmp_path / "rows.jsonl"
    stats = build.build([a, b], out, target=t)
    rows = read(out)
    assert [r["prompt_id"] for r in rows] == ["p1", "p3"]
    r1 = rows[0]
    assert r1["prompt"] == [{"role": "user", "content": "one?"}]
    assert [m["content"] for m in r1["chosen"]] == ["a2", "t3"] and r1["rejected"][0]["content"] == "t2"
    assert r1["source_model"] == "A" and r1["scores"] == {"y_ws": 0.9, "y_wt": 0.5, "y_l": -0.2}
    assert rows[1]["chosen"][0]["content"] == "a4"  # the empty source response scored 5.0 but is no response
    assert stats["tied"] == 2 and stats["no_source"] == 1 and stats["rows"] == 2 and stats["wins"] == {"A": 2}
    assert stats["scores"]["y_ws"] == pytest.approx((0.9 + 0.1) / 2)
    printed = capsys.readouterr().out
    assert "2 WRPO rows" in printed and "2 without a target preference" in printed and "A 2 (100%)" in printed
    examples = data.load_preference_rows(out, _tokenizer())  # the rows are valid training rows
    assert len(examples) == 2 and examples[0].n_chosen == 2


def _tokenizer():
    from transformers import AutoTokenizer

    from conftest import DEMO_MODEL

    return AutoTokenizer.from_pretrained(DEMO_MODEL)


def test_one_source_missing_prompt_ids_and_sft_rows(tmp_path):
    # no prompt ids anywhere: the same prompt text gives the same derived id in every file
    src = write(tmp_path / "src.jsonl", [scored(None, [{"role": "user", "content": "hi"}], ["s1", "s2"], [1, 3], "S"),
                                         scored(None, "bye", ["s3"], [2], "S")])
    tgt = write(tmp_path / "tgt.jsonl", [scored(None, [{"role": "user", "content": "hi"}], ["x", "y"], [0, 1], "T")])
    build.build([src], tmp_path / "w.jsonl", target=tgt)
    rows = read(tmp_path / "w.jsonl")
    assert len(rows) == 1 and rows[0]["prompt_id"].startswith("sha256-")
    assert [m["content"] for m in rows[0]["chosen"]] == ["s2", "y"] and rows[0]["rejected"][0]["content"] == "x"

    build.build([src], tmp_path / "sft.jsonl")  # no target: SFT rows, prompt + y_ws
    sft = read(tmp_path / "sft.jsonl")
    assert [r["messages"][-1]["content"] for r in sft] == ["s2", "s3"]
    assert sft[1]["messages"] == [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "s3"}]
    assert [data.sft_messages(r)[-1]["role"] for r in sft] == ["assistant", "assistant"]  # valid SFT rows

    only = write(tmp_path / "only.jsonl", [{"prompt": "bye"}])  # --prompts: e.g. one part of a split
    stats = build.build([src], tmp_path / "sft2.jsonl", prompts=only)
    assert stats["not_in_prompts"] == 1
    assert [r["messages"][0]["content"] for r in read(tmp_path / "sft2.jsonl")] == ["bye"]

    with pytest.raises(data.DataError, match="exists"):
        build.build([src], tmp_path / "sft.jsonl")
    before = (tmp_path / "sft.jsonl").read_bytes()
    with pytest.raises(data.DataError, match="no rows to write"):  # all tied
        build.build([src], tmp_path / "sft.jsonl", target=write(tmp_path / "tie.jsonl", [
            scored(None, "bye", ["u", "v"], [1, 1], "T")]), overwrite=True)
    assert (tmp_path / "sft.jsonl").read_bytes() == before  # nothing written earlier is lost


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "q", "responses": ["a"]}, "missing field 'scores' (score the file with eval/score.py first)"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1.0]}, "scores must be a list of 2 finite numbers"),
    ({"prompt": "q", "responses": ["a"], "scores": [float("nan")]}, "scores must be a list of 1 finite numbers"),
    ({"prompt": "q", "responses": ["a"], "scores": [True]}, "scores must be a list of 1 finite numbers"),
    ({"prompt": "q", "responses": [], "scores": []}, "responses must be a non-empty list of strings"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "responses": ["a"], "scores": [1]},
     "prompt must end with a user turn"),
    ({"responses": ["a"], "scores": [1]}, "missing field 'prompt'"),
])
def test_bad_scored_rows_name_file_line_and_reason(tmp_path, row, reason):
    good = scored("g", "fine", ["a"], [1.0], "S")
    path = write(tmp_path / "s.jsonl", [good, row])
    with pytest.raises(data.DataError) as e:
        build.build([path], tmp_path / "out.jsonl")
    assert f"{path}:2: {reason}" in str(e.value)
    assert not (tmp_path / "out.jsonl").exists()


def test_build_command_line(tmp_path, capsys):
    src = write(tmp_path / "src.jsonl", [scored("p", "q", ["a", "b"], [0, 1], "S")])
    tgt = write(tmp_path / "tgt.jsonl", [scored("p", "q", ["c", "d"], [0, 1], "T")])
    build.main(["--sources", str(src), "--target", str(tgt), "--out", str(tmp_path / "o.jsonl")])
    assert read(tmp_path / "o.jsonl")[0]["chosen"][1]["content"] == "d"
    with pytest.raises(SystemExit) as e:
        build.main(["--sources", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.jsonl")])
    assert e.value.code == 2 and "missing.jsonl: no such file" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# eval.split

def rows_for_split(n):
    rows = []
    for i in range(n):
        row = dict(WRPO_ROW, prompt=[{"role": "user", "content": f"question {i}"}], prompt_id=f"id-{i}")
        if i % 10 == 0:
            del row["prompt_id"]  # derived from the prompt text
        rows.append(row)
    return rows


def test_split_is_deterministic_disjoint_complete_and_order_free(tmp_path):
    rows = rows_for_split(300)
    counts = split(write_jsonl(tmp_path / "all.jsonl", rows), tmp_path / "a")
    sft = [json.loads(x) for x in (tmp_path / "a" / "sft.jsonl").read_text().splitlines()]
    pref = [json.loads(x) for x in (tmp_path / "a" / "wrpo.jsonl").read_text().splitlines()]
    assert counts == {"sft": len(sft), "wrpo": len(pref)} and len(sft) + len(pref) == 300
    ids_sft, ids_pref = {r["prompt_id"] for r in sft}, {r["prompt_id"] for r in pref}
    assert not ids_sft & ids_pref and len(ids_sft | ids_pref) == 300
    assert 70 < len(sft) < 130  # about a third
    assert all(r["prompt_id"].startswith("sha256-") for r in sft + pref if not r["prompt_id"].startswith("id-"))

    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    split(write_jsonl(tmp_path / "shuffled.jsonl", shuffled), tmp_path / "b")
    again_sft = {json.loads(x)["prompt_id"] for x in (tmp_path / "b" / "sft.jsonl").read_text().splitlines()}
    assert again_sft == ids_sft  # same prompts on each side, whatever the row order
    other_seed = split(write_jsonl(tmp_path / "all2.jsonl", rows), tmp_path / "c", seed=7)
    other_sft = {json.loads(x)["prompt_id"] for x in (tmp_path / "c" / "sft.jsonl").read_text().splitlines()}
    assert other_sft != ids_sft and other_seed["sft"] + other_seed["wrpo"] == 300

    with pytest.raises(DataError, match=r"sft\.jsonl exists; pass --overwrite to replace it"):
        split(tmp_path / "all.jsonl", tmp_path / "a")
    write_jsonl(tmp_path / "bad.jsonl", rows[:2] + ['{"prompt": "x", "chosen": ["a"]}', '{"prompt": ""}'])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: missing field 'rejected'(.|\n)*bad\.jsonl:4: prompt is empty"):
        split(tmp_path / "bad.jsonl", tmp_path / "d")
    assert not (tmp_path / "d").exists()
    write_jsonl(tmp_path / "prompts.jsonl", ['{"prompt": "x"}', '{"prompt_id": "7", "prompt": "y"}'])
    assert sum(split(tmp_path / "prompts.jsonl", tmp_path / "e").values()) == 2  # bare prompts split too


def test_chat_rows_without_ids_are_split_by_their_prompt(tmp_path):
    """A chat row's derived id comes from its turns before the last reply: distinct prompts get distinct
    ids (and land on both sides), the same prompt with another reply gets the same id."""
    chat = lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}  # noqa: E731
    rows = [chat(f"question {i}", f"answer {i}") for i in range(60)] + [chat("question 0", "another answer")]
    split(write_jsonl(tmp_path / "chat.jsonl", rows), tmp_path / "s")
    parts = {name: [json.loads(x) for x in (tmp_path / "s" / f"{name}.jsonl").read_text().splitlines()]
             for name in ("sft", "wrpo")}
    ids = [r["prompt_id"] for part in parts.values() for r in part]
    assert len(ids) == 61 and len(set(ids)) == 60 and parts["sft"] and parts["wrpo"]
    same = [r for part in parts.values() for r in part if r["messages"][0]["content"] == "question 0"]
    assert len(same) == 2 and same[0]["prompt_id"] == same[1]["prompt_id"]


# -----------------------------------------------------------------------------
# eval.build beyond the paper: K weighted sources (FuseRL), same-source pairs (FuseChat-3.0)

def three_sources(tmp_path):
    """p1: A's best 0.9, C's 0.8, B's 0.7; p2: only A. The target prefers t1 to t2 on both."""
    srcs = [write(tmp_path / "a.jsonl", [scored("p1", "one?", ["a1", "a2"], [0.2, 0.9], "A"),
                                         scored("p2", "two?", ["a3"], [0.5], "A")]),
            write(tmp_path / "b.jsonl", [scored("p1", "one?", ["b1"], [0.7], "B")]),
            write(tmp_path / "c.jsonl", [scored("p1", "one?", ["c1", "c2"], [0.8, 0.1], "C")])]
    tgt = write(tmp_path / "t.jsonl", [scored("p1", "one?", ["t1", "t2"], [0.6, 0.3], "T"),
                                       scored("p2", "two?", ["t1", "t2"], [0.6, 0.3], "T")])
    return srcs, tgt


def test_top_k_sources_take_each_best_models_best_with_uniform_or_softmax_weights(tmp_path, capsys):
    import math

    srcs, tgt = three_sources(tmp_path)
    stats = build.build(srcs, tmp_path / "k2.jsonl", target=tgt, top_k_sources=2)
    (row,) = read(tmp_path / "k2.jsonl")  # p2 has one source model: dropped
    assert [m["content"] for m in row["chosen"]] == ["a2", "c1", "t1"] and row["rejected"][0]["content"] == "t2"
    assert row["source_model"] == ["A", "C"] and row["scores"] == {"y_ws": [0.9, 0.8], "y_wt": 0.6, "y_l": 0.3}
    assert row["source_weights"] == [0.5, 0.5]
    assert stats["few_sources"] == 1 and stats["wins"] == {"A": 1, "C": 1}
    assert "1 with fewer than 2 source models" in capsys.readouterr().out
    build.build(srcs, tmp_path / "k3.jsonl", target=tgt, top_k_sources=3, source_weights="softmax", temperature=0.1)
    (row,) = read(tmp_path / "k3.jsonl")
    assert [m["content"] for m in row["chosen"]] == ["a2", "c1", "b1", "t1"]
    z = 1 + math.exp(-1) + math.exp(-2)  # exp((0.9, 0.8, 0.7) - 0.9) / 0.1)
    assert row["source_weights"] == pytest.approx([1 / z, math.exp(-1) / z, math.exp(-2) / z], abs=1e-12)
    rows = data.load_preference_rows(tmp_path / "k3.jsonl", _tokenizer(), num_sources=3)  # training rows
    assert rows[0].n_chosen == 4 and rows[0].source_weights == pytest.approx(row["source_weights"], abs=0)


def test_one_top_source_is_the_papers_build_byte_for_byte(tmp_path):
    srcs, tgt = three_sources(tmp_path)
    build.build(srcs, tmp_path / "paper.jsonl", target=tgt)
    build.build(srcs, tmp_path / "k1.jsonl", target=tgt, top_k_sources=1, source_weights="softmax")
    assert (tmp_path / "paper.jsonl").read_bytes() == (tmp_path / "k1.jsonl").read_bytes()
    assert [m["content"] for m in read(tmp_path / "paper.jsonl")[0]["chosen"]] == ["a2", "t1"]


def test_same_source_pairs_keep_one_models_best_and_worst_within_the_gap_band(tmp_path, capsys):
    a = write(tmp_path / "a.jsonl", [scored("p1", "one?", ["a1", "a2", "a3"], [0.50, 0.55, 0.52], "A"),
                                     scored("p2", "two?", ["a4", "a5"], [0.5, 0.505], "A"),
                                     scored("p3", "three?", ["a6", "a7"], [0.6, 0.65], "A")])
    b = write(tmp_path / "b.jsonl", [scored("p1", "one?", ["b1", "b2"], [0.9, 0.3], "B"),
                                     scored("p3", "three?", ["b3", "b4"], [0.62, 0.7], "B")])
    stats = build.build([a, b], tmp_path / "dpo.jsonl", pairs="same_source", min_gap=0.01, max_gap=0.1)
    rows = read(tmp_path / "dpo.jsonl")
    assert [r["prompt_id"] for r in rows] == ["p1", "p3"]  # p2's gap 0.005 is below the band
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"], r["source_model"]) for r in rows] == [
        ("a2", "a1", "A"), ("b4", "b3", "B")]  # p1: B's gap 0.6 is above it; p3: both in it, B's best is higher
    assert rows[0]["scores"] == {"chosen": 0.55, "rejected": 0.50} and len(rows[0]["chosen"]) == 1
    assert stats["no_pair"] == 1 and stats["wins"] == {"A": 1, "B": 1}
    assert "2 DPO rows" in capsys.readouterr().out
    dpo = data.load_preference_rows(tmp_path / "dpo.jsonl", _tokenizer())
    assert [r.n_chosen for r in dpo] == [1, 1]
    build.main(["--sources", str(a), str(b), "--pairs=same_source", "--out", str(tmp_path / "all.jsonl")])
    assert [r["source_model"] for r in read(tmp_path / "all.jsonl")] == ["B", "A", "B"]  # no band: the best pair


@pytest.mark.parametrize("args,message", [
    (["--top_k_sources=2"], "--top_k_sources builds WRPO rows: it needs --target"),
    (["--top_k_sources=0", "--target=T"], "--top_k_sources must be >= 1"),
    (["--source_weights=rank", "--target=T"], "--source_weights must be uniform or softmax"),
    (["--temperature=0", "--target=T"], "--temperature must be > 0"),
    (["--pairs=same_source", "--target=T"], "--pairs=same_source pairs the sources' own samples: drop --target"),
    (["--pairs=same_source", "--min_gap=0.2", "--max_gap=0.1"], r"need 0 <= --min_gap <= --max_gap, got 0.2, 0.1"),
    (["--pairs=best"], "--pairs must be target or same_source"),
    (["--target=T", "--min_gap=0.1"], "--min_gap and --max_gap bound the same-source pairs: they need --pairs")])
def test_build_settings_are_checked_before_reading(tmp_path, capsys, args, message):
    src = write(tmp_path / "src.jsonl", [scored("p", "q", ["a", "b"], [0, 1], "S")])
    tgt = write(tmp_path / "T", [scored("p", "q", ["c", "d"], [0, 1], "T")])
    args = [a.replace("=T", f"={tgt}") for a in args]
    with pytest.raises(SystemExit) as e:
        build.main(["--sources", str(src), "--out", str(tmp_path / "o.jsonl"), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
