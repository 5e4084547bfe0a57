"""The trainers against a careless user (outside red team, round 3): inputs never destroyed, models and held-out
sets never silently mixed up on resume. In-process runs of the demo model (world 1)."""

import re
import shutil

import pytest

from conftest import DEMO_MODEL, REPO

SMALL = ["--global_batch_size=4", "--micro_batch_size=2", "--dtype=float32", "--save_dtype=float32",
         "--max_length=128", "--max_prompt_length=96", "--lr=1e-3", "--save_every=2", "--log_every=1"]
SFT = ["--global_batch_size=4", "--micro_batch_size=2", "--dtype=float32", "--save_dtype=float32",
       "--max_length=128", "--lr=1e-3", "--save_every=2", "--data=demo/data/heldout.jsonl"]


@pytest.fixture
def rows(tmp_path):
    """The first 48 demo rows, in a file of the test's own (its token cache beside it)."""
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join((REPO / "demo/data/train.jsonl").read_text().splitlines()[:48]) + "\n")
    return path


def train(tmp_path, out, *extra, model=DEMO_MODEL, data=None, steps=4):
    import wrpo

    wrpo.main([*SMALL, f"--model={model}", f"--data={data}", f"--out_dir={out}", f"--max_steps={steps}",
               f"--ref_cache_dir={tmp_path / 'ref'}", *extra])


@pytest.mark.parametrize("given", ["--model=OUT/final", "--ref_model=OUT/final", "--model=OUT/step_000002",
                                   "--model=OUT"])
def test_overwrite_never_deletes_an_input_model(tmp_path, monkeypatch, rows, given):
    """--overwrite drops out_dir's checkpoints and final/: a model given from inside out_dir (or out_dir itself) is
    refused before anything is touched, naming both paths; it used to be deleted, then the run died."""
    from training import ConfigError

    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    train(tmp_path, out, data=rows)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    flag, path = given.replace("OUT", str(out)).split("=")
    with pytest.raises(ConfigError, match=rf"out_dir {re.escape(str(out))} holds the input {re.escape(path)}|"
                                          rf"out_dir {re.escape(str(out))} is also an input"):
        train(tmp_path, out, "--overwrite=true", f"{flag}={path}", data=rows)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if "run.lock" not in p.name) == \
        [p for p in before if "run.lock" not in p]


def test_sft_refuses_an_out_dir_inside_its_model_or_data(tmp_path, monkeypatch):
    import sft
    from training import ConfigError

    monkeypatch.chdir(REPO)
    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, model)
    with pytest.raises(ConfigError, match=rf"out_dir {re.escape(str(model / 'run'))} lies inside the input folder"):
        sft.main([*SFT, f"--model={model}", f"--out_dir={model / 'run'}", "--max_steps=1"])
    with pytest.raises(ConfigError, match="is also an input"):
        sft.main([*SFT, f"--model={model}", "--out_dir=demo/data/heldout.jsonl", "--max_steps=1"])
    assert not (model / "run").exists() and sorted(p.name for p in model.iterdir()) == \
        sorted(p.name for p in DEMO_MODEL.iterdir())


def test_resume_refuses_a_model_replaced_under_its_path_and_takes_it_by_another_path(tmp_path, monkeypatch, rows):
    """Only the path string was compared: weights copied over the model's file were resumed from, and the reference
    recomputed from them. Now the weights are compared (size and CRC-32 of each file); the same weights by another
    path (relative for absolute) resume."""
    from checkpoint import ResumeError

    monkeypatch.chdir(tmp_path)
    shutil.copytree(DEMO_MODEL, tmp_path / "m")
    out = tmp_path / "out"
    train(tmp_path, out, model="m", data=rows, steps=6)
    shutil.rmtree(out / "final")  # as if killed after step 4's checkpoint
    good = (tmp_path / "m" / "model.safetensors").read_bytes()
    shutil.copy(out / "step_000002" / "model.safetensors", tmp_path / "m" / "model.safetensors")  # same shapes
    with pytest.raises(ResumeError, match=r"model: the weights of m changed since the checkpoint \(size:CRC-32 of "
                                          r"model.safetensors: \d+:\w{8} then, \d+:\w{8} now\)"):
        train(tmp_path, out, "--resume=auto", model="m", data=rows, steps=6)
    with pytest.raises(ResumeError, match=r"ref_model: the weights of \S+ changed"):
        train(tmp_path, out, "--resume=auto", "--ref_model=m", model=DEMO_MODEL, data=rows, steps=6)
    (tmp_path / "m" / "model.safetensors").write_bytes(good)
    train(tmp_path, out, "--resume=auto", model=tmp_path / "m", data=rows, steps=6)  # absolute now, relative then
    assert (out / "final" / "model.safetensors").is_file()


def test_sft_resumed_with_another_eval_set_recomputes_before(tmp_path, monkeypatch, capsys):
    """"before" is the held-out loss of the starting weights on this run's held-out set: a resume with another
    --eval_data computes it (before loading the checkpoint) rather than print the old set's value as this one's."""
    import sft

    monkeypatch.chdir(REPO)
    lines = (REPO / "demo/data/train.jsonl").read_text().splitlines()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(lines[:12]) + "\n")
    b.write_text("\n".join(lines[12:20]) + "\n")

    def before(out, *extra):
        sft.main([*SFT, f"--out_dir={out}", "--max_steps=4", *extra])
        return re.findall(r"held-out loss: (\S+) before", capsys.readouterr().out)[-1]

    fresh_b = before(tmp_path / "fresh", f"--eval_data={b}")
    out = tmp_path / "run"
    before(out, f"--eval_data={a}")
    shutil.rmtree(out / "final")  # killed after step 2's checkpoint
    assert before(out, f"--eval_data={b}", "--resume=auto") == fresh_b


def test_a_data_folder_takes_any_case_and_names_every_file(tmp_path, tokenizer):
    """a.jsonl + b.JSONL: b.JSONL was left out without a word (24 rows of 48 trained). Now suffixes match in any
    case, and the files read and skipped are named (not the caches written beside them)."""
    import data
    import training

    lines = (REPO / "demo/data/train.jsonl").read_text().splitlines()
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(lines[:24]) + "\n")
    (folder / "b.JSONL").write_text("\n".join(lines[24:48]) + "\n")
    (folder / "notes.txt").write_text("not data\n")
    for _ in range(2):  # the second run reads the cache written in the folder by the first
        said = []
        rows = training.load_cached(data.load_preference_rows, folder, tokenizer, "", report=said.append,
                                    max_length=128, max_prompt_length=96)
        assert len(rows) == 48
        assert said[-1] == f"data: read a.jsonl, b.JSONL from {folder}; skipped notes.txt (not .jsonl, .json or " \
            ".parquet)"


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_byte_order_mark_at_the_start_of_a_data_file_is_accepted(tmp_path, tokenizer, suffix):
    import json

    import data

    lines = (REPO / "demo/data/train.jsonl").read_text().splitlines()[:3]
    text = "\n".join(lines) + "\n" if suffix == ".jsonl" else json.dumps([json.loads(x) for x in lines])
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    rows = data.load_preference_rows(path, tokenizer, max_length=128, max_prompt_length=96)
    assert len(rows) == 3


@pytest.mark.slow
def test_ctrl_c_before_training_is_one_line(tmp_path):
    """Ctrl-C during the reference pass (or the data loading before it) gave a KeyboardInterrupt traceback; now one
    line and exit 130, as a signal during training does."""
    import os
    import signal
    import subprocess
    import sys

    lines = (REPO / "demo/data/train.jsonl").read_text().splitlines()
    (tmp_path / "big.jsonl").write_text("\n".join(lines * 4) + "\n")  # a reference pass of some seconds
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "wrpo.py", f"--data={tmp_path / 'big.jsonl'}", "--dtype=float32",
                             f"--out_dir={tmp_path / 'out'}", f"--ref_cache_dir={tmp_path}", "--max_steps=2"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "training rows" in line:  # printed just before the reference pass starts
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "stopped by SIGINT (Ctrl-C); nothing saved" in err
    assert not list(tmp_path.glob("*.ref-logps-*"))  # no reference cache half written


@pytest.mark.parametrize("flag,said", [
    ("--attn_implementation=flash_attention_2", "attn_implementation flash_attention_2 does not run on CPU: use auto"),
    ("--attn_implementation=flex_attention", "attn_implementation flex_attention does not run on CPU"),
    ("--logps_impl=triton", r"logps_impl triton needs a GPU and the triton package \(here: CPU\)"),
])
def test_an_implementation_this_machine_lacks_is_refused_at_start(tmp_path, monkeypatch, flag, said):
    """They failed later with a traceback: an ImportError as the model loaded, a compile error, "0 active drivers" at
    the first step. (The tests' TRITON_INTERPRET=1, which runs the kernel on CPU in fp32, is unset here.)"""
    import wrpo
    from training import ConfigError

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match=said):
        wrpo.main([flag, f"--out_dir={tmp_path / 'out'}", "--max_steps=1"])
    assert not (tmp_path / "out").exists()  # refused before out_dir was made


def test_a_lock_file_removed_or_replaced_is_noticed_and_never_unlinked_for_its_new_owner(tmp_path):
    """rm OUT/run.lock let a second run in beside a live one, and the first, at exit, unlinked the second's lock."""
    import lifecycle
    from fsdp_utils import init_distributed

    init_distributed()  # (a world of one, as a plain `python wrpo.py`)
    lifecycle.lock_out_dir(tmp_path)
    assert lifecycle.lock_lost() is None
    (tmp_path / "run.lock").unlink()
    assert "run.lock was removed or replaced while this run held it" in lifecycle.lock_lost()
    (tmp_path / "run.lock").write_text("pid 1 on host other: a second run\n")  # the second run's new lock file
    assert "removed or replaced" in lifecycle.lock_lost()
    lifecycle.release_locks()
    assert (tmp_path / "run.lock").read_text() == "pid 1 on host other: a second run\n"


@pytest.mark.slow
def test_a_run_whose_lock_is_removed_stops_without_saving(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "wrpo.py", *SMALL, "--max_steps=100", "--save_every=1000",
                             f"--out_dir={out}", f"--ref_cache_dir={tmp_path}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            (out / "run.lock").unlink()
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert f"{out / 'run.lock'} was removed or replaced while this run held it" in err and "Traceback" not in err
    assert not list(out.glob("step_*")) and not (out / "final").exists()
