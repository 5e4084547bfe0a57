"""Faults a user meets: bad settings, paths and data (each with its own message, never a traceback),
a disk too small, and non-finite losses (stop, or skip)."""

import json
import math
import os
import random
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import DEMO_MODEL, REPO, read_jsonl

DEMO_ROWS = (REPO / "demo" / "data" / "train.jsonl").read_text().splitlines()


def plain(script, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


# -----------------------------------------------------------------------------
# non-finite steps: a model with one corrupted (NaN) embedding row, for a character only one row uses

RUN = ["--global_batch_size=4", "--micro_batch_size=2", "--max_steps=6", "--dtype=float32", "--save_dtype=float32",
       "--max_length=128", "--save_every=1", "--keep_last=0", "--lr=1e-3"]


def poisoned(tmp_path, step):
    """(model, data): the model's embedding of the byte token of '§' is NaN, and the one row that
    contains '§' falls into optimizer step `step` (1-based) of RUN's data order."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    import batching

    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, model)
    token = AutoTokenizer.from_pretrained(model).convert_tokens_to_ids("§")
    weights = load_file(model / "model.safetensors")
    weights["model.embed_tokens.weight"][token] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    rows = [json.loads(x) for x in DEMO_ROWS[:24]]
    steps = batching.train_steps(len(rows), 1, 42, 4, 0, 1, len(rows) // 4)
    order = [i for _, _, step_rows in steps for i in step_rows]
    bad = order[(step - 1) * 4 + 1]
    rows[bad]["chosen"][0]["content"] += " §"  # y_ws: both WRPO and SFT (which trains on it) read it
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, path, f"{path}:{bad + 1} ({rows[bad]['prompt_id']})"


@pytest.mark.slow
@pytest.mark.parametrize("script,extra", [("wrpo.py", ["--max_prompt_length=96"]),  # packed rows
                                          ("sft.py", ["--packing=false"])])
def test_nonfinite_loss_stops_naming_step_and_rows(tmp_path, script, extra):
    model, rows, name = poisoned(tmp_path, step=3)
    out = tmp_path / "run"
    proc = plain(script, *RUN, *extra, f"--model={model}", f"--data={rows}", f"--out_dir={out}")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "error: step 3: loss nan; stopped without updating the weights" in proc.stderr
    assert f"rows with a non-finite loss: {name.split(' (')[0] if script == 'sft.py' else name}." in proc.stderr
    assert f"Newest checkpoint: {out / 'step_000002'}" in proc.stderr
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl") if "lr" in m] == [1, 2]
    assert not (out / "final").exists() and not (out / "step_000003").exists()  # nothing after the fault saved


def test_nonfinite_steps_skipped_when_asked(tmp_path, capsys):
    import wrpo

    model, rows, name = poisoned(tmp_path, step=3)
    out = tmp_path / "run"
    wrpo.main([*RUN, "--max_prompt_length=96", "--nonfinite=skip", f"--model={model}", f"--data={rows}",
               f"--out_dir={out}"])
    stdout = capsys.readouterr().out
    assert "step 3: loss nan; step skipped" in stdout and name in stdout
    assert "(1 non-finite steps skipped)" in stdout
    metrics = [m for m in read_jsonl(out / "metrics.jsonl") if "lr" in m]
    assert [m["skipped_steps"] for m in metrics] == [0, 0, 1, 1, 1, 1]
    assert all(math.isfinite(m["loss"]) for i, m in enumerate(metrics) if i != 2)  # the other steps train
    w2, w3, w4 = (load_file(out / f"step_00000{k}" / "model.safetensors") for k in (2, 3, 4))
    same = lambda a, b: bool(((a == b) | (a.isnan() & b.isnan())).all())  # noqa: E731 (the NaN row stays NaN)
    assert all(same(w2[k], w3[k]) for k in w2)  # the skipped step left the weights as they were
    assert not all(same(w3[k], w4[k]) for k in w3)  # and training went on


def test_preemption_saves_the_resumable_state_only_even_on_a_save_step(tmp_path, monkeypatch):
    """A stop request is checked before the periodic save: on a save_every step the quick state-only
    checkpoint is written, not the HF weights first (a scheduler's grace period is short)."""
    import signal

    import wrpo
    from lifecycle import Preempted

    monkeypatch.chdir(REPO)
    checks = []
    monkeypatch.setattr(wrpo, "stop_requested", lambda received, device: checks.append(1) or (
        signal.SIGTERM if len(checks) == 2 else 0))  # SIGTERM seen by some rank during step 2
    out = tmp_path / "run"
    with pytest.raises(Preempted) as e:
        wrpo.main([*RUN, "--max_prompt_length=96", f"--out_dir={out}", f"--ref_cache_dir={tmp_path}"])
    assert e.value.signum == signal.SIGTERM and "stopped by SIGTERM after step 2" in str(e.value)
    assert (out / "step_000001" / "model.safetensors").exists()  # save_every=1: the step before, whole
    assert (out / "step_000002" / "trainer_state.json").exists()
    assert not (out / "step_000002" / "model.safetensors").exists()  # the preemption save: state only
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl") if "lr" in m] == [1, 2]


def test_overwrite_drops_the_old_runs_checkpoints_so_a_resume_continues_the_new_one(tmp_path, monkeypatch):
    """--overwrite=true removes the old step checkpoints and final/: if the new run is preempted, the
    requeued --resume=auto continues it, rather than taking the old final/ for the end of this run."""
    import signal

    import wrpo
    from lifecycle import Preempted

    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    args = [*RUN, "--max_steps=3", "--max_prompt_length=96", f"--out_dir={out}", f"--ref_cache_dir={tmp_path}"]
    wrpo.main(args)
    assert (out / "final").exists() and (out / "step_000002").exists()
    monkeypatch.setattr(wrpo, "stop_requested", lambda received, device: signal.SIGTERM)  # preempted at step 1
    with pytest.raises(Preempted):
        wrpo.main([*args, "--overwrite=true", "--lr=2e-3"])
    assert not (out / "final").exists() and not (out / "step_000002").exists()  # the old run's are gone
    assert (out / "step_000001" / "trainer_state.json").exists()  # the new run's preemption save
    monkeypatch.setattr(wrpo, "stop_requested", lambda received, device: 0)
    wrpo.main([*args, "--resume=auto", "--lr=2e-3"])
    assert (out / "final").exists() and [m["step"] for m in read_jsonl(out / "metrics.jsonl") if "lr" in m] == [1, 2, 3]


# -----------------------------------------------------------------------------
# bad input: one table, each case with the message it must get (in-process: these fail before any model)


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def row(**change):
    r = json.loads(DEMO_ROWS[0])
    r.update(change)
    return json.dumps(r)


BAD = [
    # settings
    (["--beta=0"], "beta must be > 0"),
    (["--alpha=1.5"], r"alpha must be in \[0, 1\]"),
    (["--micro_batch_size=0"], "micro_batch_size must be >= 1"),
    (["--epochs=0"], "epochs must be >= 1"),
    (["--max_steps=0"], "max_steps must be -1"),
    (["--keep_last=-1"], "keep_last must be >= 0"),
    (["--nonfinite=ignore"], "nonfinite must be 'stop' or 'skip'"),
    (["--adam_beta2=1.0"], r"adam_beta2 must be in \[0, 1\)"),
    (["--lr=fast"], "lr must be float"),
    (["--max_prompt_length=4096"], "max_prompt_length"),
    (["--bogus=1"], "unknown setting 'bogus'"),
    (["--lr=Infinity"], "lr must be a finite number"),
    (["--config={tmp}/list.json"], "must hold one JSON object of settings, got list"),
    (["--config={tmp}/nan.json"], "lr must be a finite number"),
    (["--config={tmp}/fifo.json"], "not a regular file"),  # a FIFO would block the read forever
    (["--attn_implementation=foo", "--data={tmp}/none.jsonl"], "attn_implementation 'foo' is not one"),  # first
    (["--max_tokens_per_micro_batch=-5"], "max_tokens_per_micro_batch must be >= 0"),
    # paths
    (["--model={tmp}/no_model"], "model error"),
    (["--data={tmp}/none.jsonl"], r"none\.jsonl: no such file or folder"),
    (["--data={tmp}/rows.txt"], "unsupported data file type '.txt'"),
    (["--out_dir={tmp}/rows.txt/sub"], "is not writable"),
    (["--resume={tmp}"], "not a complete checkpoint"),
    (["--resume={tmp}/finished/final"], "final/ is the finished run's weights, a Hugging Face folder without"),
    (["--model={tmp}/pickled"], r"no safetensors weights .*it has pytorch_model\.bin: pickled weights, never loaded"),
    (["--model={tmp}/custom"], r"ships its own code \(config\.json: auto_map AutoModelForCausalLM: x\.Y\).*--trust"),
    (["--ref_model={tmp}/custom"], r"ships its own code"),
    # data rows, each named file:line
    (["--data={tmp}/bad_json.jsonl"], r"bad_json\.jsonl:2: malformed JSON"),
    (["--data={tmp}/missing.jsonl"], r"missing\.jsonl:1: missing field 'rejected'"),
    (["--data={tmp}/role.jsonl"], r"role\.jsonl:1: chosen\[0\] has role 'user', expected 'assistant'"),
    (["--data={tmp}/empty.jsonl"], r"empty\.jsonl:1: rejected\[0\] is empty"),
    (["--data={tmp}/utf8.jsonl"], r"utf8\.jsonl:1: not valid UTF-8"),
    (["--data={tmp}/surrogate.jsonl"], r"surrogate\.jsonl:1: prompt is not valid text"),
    (["--data={tmp}/deep.jsonl"], r"deep\.jsonl:1: malformed JSON \(nested too deeply\)"),
    (["--data={tmp}/long.jsonl", "--truncation=error"], r"long\.jsonl:1: prompt \+ longest response is \d+ tokens"),
    (["--data={tmp}/blank.jsonl"], r"blank\.jsonl: no rows"),
]


@pytest.fixture
def bad_files(tmp_path):
    long = json.loads(DEMO_ROWS[0])
    long["prompt"] = "word " * 3000
    write(tmp_path, "rows.txt", ["x"])
    write(tmp_path, "bad_json.jsonl", [DEMO_ROWS[0], '{"prompt": "hi", "chosen": [', DEMO_ROWS[1]])
    write(tmp_path, "missing.jsonl", [json.dumps({k: v for k, v in json.loads(DEMO_ROWS[0]).items()
                                                  if k != "rejected"})])
    write(tmp_path, "role.jsonl", [row(chosen=[{"role": "user", "content": "a"}, "b"])])
    write(tmp_path, "empty.jsonl", [row(rejected=[{"role": "assistant", "content": "  "}])])
    write(tmp_path, "utf8.jsonl", [b'{"prompt": "caf\xe9", "chosen": ["a", "b"], "rejected": ["c"]}'])
    write(tmp_path, "surrogate.jsonl", ['{"prompt": "bad \\ud800 text", "chosen": ["a", "b"], "rejected": ["c"]}'])
    write(tmp_path, "deep.jsonl", ["[" * 100000 + "]" * 100000])
    write(tmp_path, "long.jsonl", [json.dumps(long)])
    write(tmp_path, "blank.jsonl", ["", "  "])
    write(tmp_path, "list.json", ['[{"lr": 1e-6}]'])
    write(tmp_path, "nan.json", ['{"lr": NaN}'])
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "finished" / "final").mkdir(parents=True)
    (tmp_path / "finished" / "final" / "config.json").write_text("{}")
    import shutil

    shutil.copytree(DEMO_MODEL, tmp_path / "pickled", ignore=shutil.ignore_patterns("*.safetensors"))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"a pickle, never opened")
    shutil.copytree(DEMO_MODEL, tmp_path / "custom")
    config = json.loads((tmp_path / "custom" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "x.Y"}
    (tmp_path / "custom" / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("args,message", BAD, ids=[a[0].split("=")[0] + ":" + m[:24] for a, m in BAD])
def test_bad_input_gets_its_own_message(bad_files, monkeypatch, args, message):
    import wrpo
    from checkpoint import ResumeError
    from data import DataError
    from training import ConfigError

    monkeypatch.chdir(REPO)
    args = [a.replace("{tmp}", str(bad_files)) for a in args]
    with pytest.raises((ConfigError, DataError, ResumeError), match=message):
        wrpo.main([f"--out_dir={bad_files / 'out'}", *args])
    assert not (bad_files / "out" / "config.json").exists()  # nothing written for a run that never started


@pytest.mark.slow
def test_bad_input_through_the_command_line(bad_files):
    """The same errors from a script itself: exit 2, one message, no traceback (wrpo.py's: test_distributed)."""
    proc = plain("sft.py", f"--data={bad_files / 'bad_json.jsonl'}", f"--out_dir={bad_files / 'out'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "bad_json.jsonl:2: malformed JSON" in proc.stderr and "--skip_invalid_rows=true" in proc.stderr


def test_skip_invalid_rows(bad_files, capsys, monkeypatch):
    import data
    import sft
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    path = write(bad_files, "mixed.jsonl", DEMO_ROWS[:5] + ["{oops", row(chosen=[]), row(rejected=["x", "y"])])
    with pytest.raises(data.DataError, match=r"3 bad row\(s\)"):
        data.load_preference_rows(path, tok)
    rows = data.load_preference_rows(path, tok, skip_invalid=True)
    assert len(rows) == 5
    assert "skipped 3 bad row(s)" in capsys.readouterr().out
    monkeypatch.chdir(REPO)
    sft.main([f"--data={path}", "--skip_invalid_rows=true", "--global_batch_size=1", "--max_steps=1",
              f"--out_dir={bad_files / 'sft'}"])
    assert "skipped 3 bad row(s)" in capsys.readouterr().out and (bad_files / "sft" / "final").exists()


def test_low_disk_space_refused_at_start(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import wrpo
    from training import ConfigError

    monkeypatch.chdir(REPO)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ConfigError, match=r"has 1000 B free; this model \([\d.]+M parameters\) needs about [\d.]+ MiB"):
        wrpo.main([f"--out_dir={tmp_path / 'out'}"])


def test_fuzzed_jsonl_never_gives_a_traceback(tmp_path):
    """Randomly corrupted rows: every one is either read or reported as file:line, nothing else escapes."""
    import data
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    rng = random.Random(0)
    junk = [None, 0, -1.5, True, "", " ", [], {}, [None], {"role": 3}, "\ud800", "x" * 5, [{"content": None}],
            {"role": "assistant"}, [[["deep"]]], float("nan")]

    def corrupt(line):
        r = rng.random()
        if r < 0.2:  # cut the line short, or drop / insert bytes
            b = line.encode()
            i = rng.randrange(len(b))
            return rng.choice([b[:i], b[:i] + b[i + 1:], b[:i] + bytes([rng.randrange(256)]) + b[i:]])
        rec = json.loads(line)
        if r < 0.5:  # replace a field, or a message inside one, with junk
            key = rng.choice(["prompt", "chosen", "rejected", "prompt_id"])
            if isinstance(rec.get(key), list) and rec[key] and rng.random() < 0.5:
                rec[key][rng.randrange(len(rec[key]))] = rng.choice(junk)
            else:
                rec[key] = rng.choice(junk)
        elif r < 0.7:  # drop a field
            rec.pop(rng.choice(list(rec)))
        elif r < 0.85:  # a wrong role
            msgs = rec["chosen"] + rec["rejected"]
            rng.choice(msgs)["role"] = rng.choice(["user", "system", "tool", "", None])
        else:
            return rng.choice([json.dumps(rec, allow_nan=True), json.dumps([rec]), "null", "[]", '"text"'])
        return json.dumps(rec, allow_nan=True)

    reported = 0
    for i in range(150):
        lines = [corrupt(line) if rng.random() < 0.5 else line for line in rng.sample(DEMO_ROWS, 12)]
        path = write(tmp_path, f"fuzz{i}.jsonl", lines)
        for load in (data.load_preference_rows, data.load_sft_examples):
            try:
                extra = {"max_prompt_length": 256} if load is data.load_preference_rows else {}
                load(path, tok, max_length=512, **extra)
            except data.DataError as e:
                reported += 1
                assert f"{path}:" in str(e)
    assert reported >= 240  # nearly every file has some bad row


def test_fuzzed_configs_never_give_a_traceback(tmp_path):
    """Random config files and --key=value overrides: each is accepted or refused with a ConfigError naming the
    setting, never anything else (a TypeError, a NaN slipping through, a hang on a strange file)."""
    import dataclasses

    import wrpo
    from training import ConfigError, config_problems, parse_config

    rng = random.Random(0)
    keys = [f.name for f in dataclasses.fields(wrpo.Config)] + ["bogus", "logprobs", ""]
    junk = [None, True, False, 0, 1, -1, 2**70, 0.5, -0.0, 1e309, float("nan"), "", "x", "auto", "NaN", "-Infinity",
            "1e-3", "true", "[]", "{}", [], {}, [1], {"a": 1}, "\u0000", "packed_sdpa", "linear", "stop"]
    refused = accepted = 0
    for i in range(400):
        config = {rng.choice(keys): rng.choice(junk) for _ in range(rng.randrange(4))}
        text = rng.choice([json.dumps(config, allow_nan=True), json.dumps([config]), "null", '"lr"', "{", "1"])
        path = tmp_path / f"c{i}.json"
        path.write_text(text)
        argv = [f"--config={path}"] if rng.random() < 0.7 else []
        argv += [f"--{rng.choice(keys)}={rng.choice(junk)}" for _ in range(rng.randrange(3))]
        try:
            cfg = parse_config(wrpo.Config, argv)
            problems = config_problems(cfg, 2) + wrpo.wrpo_problems(cfg)
        except ConfigError as e:
            refused += 1
            assert str(e).strip() and "Traceback" not in str(e)
            continue
        accepted += 1
        assert all(math.isfinite(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.type is float)
        assert all(isinstance(p, str) and p for p in problems)
    assert refused > 300 and accepted > 20  # the fuzz reaches both sides
