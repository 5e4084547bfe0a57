"""eval.generate on the tiny demo model: shapes, determinism, resuming, ranks, bad input."""

import json
import os
import subprocess
import sys

import pytest

from conftest import DEMO_MODEL, REPO, read_jsonl, torchrun

pytestmark = pytest.mark.slow  # end-to-end runs: the full suite only

GEN = ["-m", "eval.generate"]
FAST = ["--num_samples=3", "--max_new_tokens=12", "--batch_size=2", "--dtype=float32", f"--model={DEMO_MODEL}"]


def prompts(tmp_path, n=5, name="prompts.jsonl"):
    rows = [json.loads(x) for x in (DEMO_MODEL.parent / "data" / "heldout.jsonl").read_text().splitlines()[:n]]
    path = tmp_path / name
    path.write_text("".join(json.dumps({"prompt_id": r["prompt_id"], "prompt": r["prompt"]}) + "\n" for r in rows))
    return path, [r["prompt_id"] for r in rows]


def generate(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *GEN, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_samples_are_shaped_deterministic_and_resumable(tmp_path):
    path, ids = prompts(tmp_path)
    first3, _ = prompts(tmp_path, 3, "first3.jsonl")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (a, b):
        proc = generate(*FAST, f"--prompts={path}", f"--out={out}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(a)
    assert [r["prompt_id"] for r in rows] == ids
    assert all(len(r["responses"]) == 3 and all(isinstance(t, str) for t in r["responses"]) for r in rows)
    assert rows[0]["model"] == "model" and rows[0]["generation"]["temperature"] == 0.8
    assert rows[0]["prompt"][-1]["role"] == "user"
    assert a.read_text() == b.read_text()  # same command, same seed: same samples
    assert len({t for r in rows for t in r["responses"]}) > 5  # sampled, not one repeated text
    assert not list(tmp_path.glob("*.part-*"))  # merged and removed

    # resume: 3 prompts done, then the full file; an interrupted part file's torn last line is redone
    c = tmp_path / "c.jsonl"
    assert generate(*FAST, f"--prompts={first3}", f"--out={c}").returncode == 0
    done = read_jsonl(c)
    torn = c.with_name(c.name + ".part-000-of-001")
    torn.write_text(json.dumps(rows[3]) + "\n" + '{"prompt_id": "' + ids[4] + '", "respo')
    proc = generate(*FAST, f"--prompts={path}", f"--out={c}")
    assert proc.returncode == 0 and "5 prompts, 4 already done" in proc.stdout
    resumed = read_jsonl(c)
    assert [r["prompt_id"] for r in resumed] == ids and resumed[:3] == done and resumed[3] == rows[3]
    assert len(resumed[4]["responses"]) == 3 and not torn.exists()


def test_two_ranks_split_the_prompts(tmp_path):
    path, ids = prompts(tmp_path)
    out = tmp_path / "two.jsonl"
    torchrun(2, *GEN, *FAST, f"--prompts={path}", f"--out={out}", timeout=300)
    rows = read_jsonl(out)
    assert [r["prompt_id"] for r in rows] == ids and all(len(r["responses"]) == 3 for r in rows)
    assert not list(tmp_path.glob("*.part-*"))


def test_bad_prompts_and_settings(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": [{"role": "assistant", "content": "x"}]}\n{"text": "y"}\n')
    proc = generate(*FAST, f"--prompts={bad}", f"--out={tmp_path / 'o.jsonl'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bad}:2: prompt must end with a user turn" in proc.stderr
    assert f"{bad}:3: missing field 'prompt'" in proc.stderr
    greedy = generate(*FAST, "--temperature=0", f"--prompts={bad}", f"--out={tmp_path / 'o.jsonl'}")
    assert greedy.returncode == 2 and "--num_samples=1" in greedy.stderr
    good, _ = prompts(tmp_path, 1)
    missing = generate(*FAST, f"--model={tmp_path / 'nope'}", f"--prompts={good}", f"--out={tmp_path / 'o.jsonl'}")
    assert missing.returncode == 2 and "cannot load the model" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "o.jsonl").exists()
