"""No way to lose or corrupt work: faults injected into a finished demo run's files (torn metrics, damaged
trainer states, checkpoints and reference caches), a second run into the same out_dir, a launcher killed
under its workers, and a disk that fills up mid-save. Each must be noticed and survived, never trusted."""

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, read_jsonl

RUN = ["--global_batch_size=4", "--micro_batch_size=2", "--dtype=float32", "--save_dtype=float32", "--max_length=128",
       "--max_prompt_length=96", "--lr=1e-3", "--log_every=1", "--max_steps=6", "--save_every=2", "--keep_last=0"]
COMPARED = ["loss", "grad_norm", "rewards/margins", "logps/rejected"]


def rows48(folder):
    """The first 48 demo rows (a quick reference pass), in folder/rows.jsonl."""
    path = folder / "rows.jsonl"
    if not path.exists():
        demo = (REPO / "demo" / "data" / "train.jsonl").read_text().splitlines()
        path.write_text("".join(x + "\n" for x in demo[:48]))
    return path


def train(out, cache, *extra):
    """wrpo.py in this process, on the 48 rows kept in `cache` (the reference log-probs are cached there)."""
    import wrpo

    wrpo.main([*RUN, f"--data={rows48(cache)}", f"--out_dir={out}", f"--ref_cache_dir={cache}", *extra])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One uninterrupted 6-step run on 48 demo rows (checkpoints at steps 2 and 4, then final/)."""
    root = tmp_path_factory.mktemp("base")
    (root / "cache").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        train(root / "out", root / "cache")
    return root


def file_crc(path):
    import checkpoint

    return checkpoint.crc32([Path(path).read_bytes()])


def copy_run(base, tmp_path, drop=("final",)):
    """The base run's folder as a crash before its end left it: the rows of steps 5-6 logged, not saved."""
    out = tmp_path / "out"
    shutil.copytree(base / "out", out, ignore=shutil.ignore_patterns("run.lock"))
    for name in drop:
        shutil.rmtree(out / name)
    return out


def steps(out):
    return [m for m in read_jsonl(out / "metrics.jsonl") if "lr" in m]


def same_metrics(a, b):
    ra, rb = steps(a), steps(b)
    assert [m["step"] for m in ra] == [m["step"] for m in rb] == list(range(1, 7))
    for x, y in zip(ra, rb):
        assert all(x[k] == y[k] for k in COMPARED), (x["step"], x, y)


def garble(path, offset_from_end=64):
    """Flip bytes inside a file without changing its size (silent corruption)."""
    b = bytearray(path.read_bytes())
    for i in range(len(b) - offset_from_end, len(b) - offset_from_end + 8):
        b[i] ^= 0x5A
    path.write_bytes(bytes(b))


# -----------------------------------------------------------------------------
# 1. a torn metrics.jsonl and malformed trainer states


def test_resume_cuts_a_torn_metrics_file_back_and_continues(base, tmp_path, monkeypatch, capsys):
    root = base
    out = copy_run(root, tmp_path)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[2:2] = ["garbage", "[1, 2]"]  # a line that is not JSON, and JSON that is not a row
    (out / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "lo')  # a partial last line
    monkeypatch.chdir(REPO)
    train(out, root / "cache", "--resume=auto")
    assert "dropped 3 unreadable line(s)" in capsys.readouterr().out
    same_metrics(root / "out", out)  # steps 5-6 trained again, to the same numbers, each logged once


@pytest.mark.parametrize("damage,reason", [
    (lambda s: s.pop("config"), "no 'config'"),
    (lambda s: s.__setitem__("step", "4"), "'step' must be int"),
    (lambda s: s["rng"][0].__setitem__("torch", "AAAA"), "a damaged rng entry"),
    (lambda s: s["rng"][0].__setitem__("python", "x"), "a damaged rng entry"),
    (lambda s: s.__setitem__("rng", []), "one rng entry per rank"),
    (lambda s: s["files"].__setitem__("model.safetensors", "big"), "a damaged files entry"),
    (lambda s: s.__setitem__("skipped_steps", None), "'skipped_steps' must be int"),
    (lambda s: s.pop("crc32"), "no 'crc32'"),  # every checkpoint has its files' CRC-32s: none is taken on trust
])
def test_a_malformed_trainer_state_is_skipped_with_its_reason(base, tmp_path, damage, reason):
    import checkpoint

    folder = tmp_path / "step_000004"
    shutil.copytree(base / "out" / "step_000004", folder)
    assert checkpoint.checkpoint_problem(folder) is None
    state = json.loads((folder / "trainer_state.json").read_text())
    damage(state)
    (folder / "trainer_state.json").write_text(json.dumps(state))
    problem = checkpoint.checkpoint_problem(folder)
    assert problem.startswith("unreadable trainer_state.json") and reason in problem
    for text in ("[1, 2]", '{"step": 4, "wor', ""):
        (folder / "trainer_state.json").write_text(text)
        assert checkpoint.checkpoint_problem(folder).startswith("unreadable trainer_state.json")


def test_resume_auto_falls_back_past_a_malformed_trainer_state(base, tmp_path, monkeypatch, capsys):
    root = base
    out = copy_run(root, tmp_path)
    state = json.loads((out / "step_000004" / "trainer_state.json").read_text())
    state["rng"][0]["numpy"] = "broken"
    (out / "step_000004" / "trainer_state.json").write_text(json.dumps(state))
    monkeypatch.chdir(REPO)
    train(out, root / "cache", "--resume=auto")
    printed = capsys.readouterr().out
    assert f"skipping {out / 'step_000004'}: unreadable trainer_state.json (a damaged rng entry)" in printed
    assert f"resumed from {out / 'step_000002'} at step 2" in printed
    same_metrics(root / "out", out)


# -----------------------------------------------------------------------------
# 2. the reference log-prob cache: checked against its shape and CRC-32, recomputed when damaged


def test_a_damaged_reference_cache_is_recomputed_never_trusted(tmp_path):
    """tokens.cached, the one procedure of both caches, as the reference log-probs use it: a file is read only when
    it holds the key asked for and every array matches its CRC-32; anything else is recomputed, and said."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    import tokens

    table, said, computed = np.random.default_rng(0).standard_normal((10, 3), dtype=np.float32), [], []
    path = tmp_path / "rows.jsonl.ref-logps-0.safetensors"

    def read(key="k"):
        compute = lambda: computed.append(1) or ({"logps": table}, {"data": "rows.jsonl"})  # noqa: E731
        arrays, meta, how = tokens.cached(path, key, compute, "reference log-probs", said.append)
        assert np.array_equal(arrays["logps"][:], table) and meta["data"] == "rows.jsonl"
        return how

    assert read() == "written" and read() == "cached" and len(computed) == 1
    good, meta = path.read_bytes(), safe_open(path, "np").metadata()
    cases = {
        "garbled": (lambda: garble(path, 16), "logps does not match its CRC-32"),  # the same size: values only
        "truncated": (lambda: path.write_bytes(good[: len(good) // 2]), "unreadable"),
        "empty": (lambda: path.write_bytes(b""), "unreadable"),
        "other key": (lambda: save_file({"logps": table}, path, {**meta, "key": "x"}), "computed for another key"),
        "no key": (lambda: save_file({"logps": table}, path), "computed for another key"),
        "no CRC": (lambda: save_file({"logps": table}, path, {"key": "k"}), "logps does not match its CRC-32"),
        "another array": (lambda: save_file({"x": table}, path, meta), "x does not match its CRC-32"),
    }
    for name, (damage, problem) in cases.items():
        path.write_bytes(good)
        damage()
        said.clear()
        assert read() == "written", name  # computed again, and the file rewritten whole
        assert len(said) == 1 and said[0].startswith(f"reference log-probs: the cache {path} is damaged ({problem}")
        assert said[0].endswith("; computing it again"), name
        assert np.array_equal(load_file(path)["logps"], table) and safe_open(path, "np").metadata()["key"] == "k"
    assert read("another key") == "written"  # (the file's name is the caller's: another key, another name)


def test_a_garbled_reference_cache_gives_the_true_loss(base, tmp_path, monkeypatch, capsys):
    root = base
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache", cache)  # the rows and their cached reference log-probs
    [cached] = cache.glob("*.ref-logps-*.safetensors")
    garble(cached, 16)
    monkeypatch.chdir(REPO)
    train(tmp_path / "out", cache, "--max_steps=1")
    assert "is damaged (logps does not match its CRC-32); computing it again" in capsys.readouterr().out
    # policy == reference at step 1: the loss is ln 2 exactly as in the clean run (a wrong cache gave 0.69288)
    assert steps(tmp_path / "out")[0]["loss"] == steps(root / "out")[0]["loss"]
    assert math.isclose(steps(tmp_path / "out")[0]["loss"], math.log(2), rel_tol=1e-6)
    from safetensors.numpy import load_file

    clean = next((root / "cache").glob("*.ref-logps-*.safetensors"))
    assert (load_file(cached)["logps"] == load_file(clean)["logps"]).all()  # rewritten whole, and sound again
    assert len(list(cache.glob("*.ref-logps-*.safetensors"))) == 1


# -----------------------------------------------------------------------------
# 3. checkpoints: CRC-32s read back after writing, verified before resuming


def test_checkpoint_crcs_are_read_back_and_match_the_files(base):
    for step in (2, 4):
        folder = base / "out" / f"step_{step:06d}"
        state = json.loads((folder / "trainer_state.json").read_text())
        assert set(state["crc32"]) == set(state["files"]) and any(n.startswith("state/") for n in state["crc32"])
        assert all(file_crc(folder / n) == c for n, c in state["crc32"].items())


def test_resume_auto_skips_a_silently_damaged_checkpoint(base, tmp_path, monkeypatch, capsys):
    from checkpoint import ResumeError

    root = base
    out = copy_run(root, tmp_path)
    shard = sorted((out / "step_000004" / "state").glob("*.distcp"))[0]
    garble(shard, shard.stat().st_size // 2)  # the same size: only a checksum can tell
    monkeypatch.chdir(REPO)
    with pytest.raises(ResumeError, match=f"not a complete checkpoint \\(state/{shard.name} does not match its CRC"):
        train(out, root / "cache", f"--resume={out / 'step_000004'}")
    train(out, root / "cache", "--resume=auto")
    printed = capsys.readouterr().out
    assert f"skipping {out / 'step_000004'}: state/{shard.name} does not match its CRC-32" in printed
    assert f"resumed from {out / 'step_000002'} at step 2" in printed
    same_metrics(root / "out", out)
    # set aside, never a checkpoint again; the resumed run wrote step 4 anew, sound
    assert (out / "step_000004.damaged" / "state" / shard.name).exists()
    import checkpoint

    assert checkpoint.checkpoint_problem(out / "step_000004") is None
    assert file_crc(out / "step_000004" / "state" / shard.name) != file_crc(
        out / "step_000004.damaged" / "state" / shard.name)


def test_prune_drops_the_checkpoints_of_an_abandoned_timeline(base, tmp_path):
    """A run resumed from step 2 while step 4 exists: once it saves, step 4 belongs to a timeline it left."""
    import checkpoint

    out = copy_run(base, tmp_path)
    shutil.copytree(out / "step_000002", out / "step_000001")
    checkpoint.prune(out, 2, keep_last=1)
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000002", "step_000004.abandoned"]  # kept, aside


def test_folders_set_aside_are_pruned_once_older_than_every_checkpoint_kept(base, tmp_path):
    """step_N.damaged (and .abandoned) folders were never removed: a long run with a damaged checkpoint kept its copy
    forever. They now go as the checkpoints they outlived do (keep_last): step_4.damaged once step 4 is saved anew."""
    import checkpoint

    out = copy_run(base, tmp_path)
    for name in ("step_000001.damaged", "step_000003.abandoned", "step_000004.damaged", "step_000005.damaged"):
        shutil.copytree(out / "step_000002", out / name)
    checkpoint.prune(out, 4, keep_last=1)
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000004", "step_000005.damaged"]
    checkpoint.prune(out, 4, keep_last=0)  # keep all: nothing more goes
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000004", "step_000005.damaged"]


# -----------------------------------------------------------------------------
# 4. one run per out_dir, and no worker outlives its launcher


def test_a_second_run_into_a_locked_out_dir_is_refused_naming_the_holder(tmp_path, monkeypatch, capsys):
    import socket

    from training import ConfigError

    out = tmp_path / "out"
    out.mkdir()
    hold = ("import sys, time; from pathlib import Path; sys.path.insert(0, '.'); import fsdp_utils, lifecycle; "
            "fsdp_utils.init_distributed(); lifecycle.lock_out_dir(Path(sys.argv[1])); print('held', flush=True); "
            "time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.chdir(REPO)
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {holder.pid} on host "
                                              f"{socket.gethostname()}, since"):
            train(out, tmp_path)
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, stale
        holder.wait()
    assert (out / "run.lock").exists()
    train(out, tmp_path, "--max_steps=1")
    assert f"taking over the lock of a run that ended without releasing it (pid {holder.pid}" in capsys.readouterr().out


def test_the_launchers_death_is_one_signal_however_often_it_comes():
    """The kernel may send SIGHUP once per thread of a dying torchrun; only SIGTERM / SIGINT count towards
    'a third signal stops at once' (a user insisting)."""
    from lifecycle import stop_signals

    with stop_signals(0) as received:
        for sig in [signal.SIGHUP] * 3 + [signal.SIGTERM] * 2:
            os.kill(os.getpid(), sig)
        assert received == [signal.SIGHUP, signal.SIGTERM, signal.SIGTERM]  # no KeyboardInterrupt yet
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # (the handler runs at the next bytecode; this is never reached)


@pytest.mark.slow
def test_workers_stop_and_save_when_their_launcher_is_killed(tmp_path):
    """SIGKILL to torchrun alone (its workers run in sessions of their own): they must not train on."""
    from test_resume import descendants, start, torchrun_cmd, wait_for

    import checkpoint

    out, log = tmp_path / "out", tmp_path / "log"
    proc = start(log, *torchrun_cmd(2, "wrpo.py"), *RUN, "--max_steps=-1", "--epochs=200", "--save_every=0",
                 f"--data={rows48(tmp_path)}", f"--out_dir={out}", f"--ref_cache_dir={tmp_path}")
    wait_for(proc, log, lambda: (out / "metrics.jsonl").exists() and len(steps(out)) >= 2)
    workers = [p for p in descendants(proc.pid) if p != proc.pid]
    assert len(workers) >= 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for p in workers:  # the kernel may announce the death once per thread of the launcher: still one stop
        for _ in range(3):
            os.kill(p, signal.SIGHUP)
    deadline = time.time() + 120
    while any(os.path.exists(f"/proc/{p}") for p in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{p}") for p in workers), log.read_text()[-8000:]
    saved = checkpoint.newest_checkpoint(out)  # they saved on the way out, as on SIGTERM
    assert saved is not None and checkpoint.checkpoint_problem(saved) is None, log.read_text()[-8000:]
    assert not (out / "run.lock").exists()  # released
    n = len(steps(out))
    time.sleep(2)
    assert len(steps(out)) == n  # nothing trains on


# -----------------------------------------------------------------------------
# 5. a full disk: leftovers are removed before the space is counted, a failed save leaves nothing partial and one
# clear line


def test_interrupted_saves_are_removed_before_the_free_space_is_counted(tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    out = tmp_path / "out"
    leftover = out / "step_000009.tmp"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "__0_0.distcp").write_bytes(bytes(8 << 20))
    usage = namedtuple("usage", "total used free")  # a disk with 1000 bytes free, and the leftover's 8 MiB once gone
    free = lambda: 1000 + (0 if leftover.exists() else 8 << 20)  # noqa: E731
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, free()))
    monkeypatch.chdir(REPO)
    train(out, tmp_path, "--max_steps=1", "--resume=auto")
    printed = capsys.readouterr().out
    assert f"removed {out / 'step_000009.tmp'}, left by a save that was interrupted" in printed
    assert not (out / "step_000009.tmp").exists() and (out / "final").exists()


def test_disk_full_mid_save_is_one_line_and_leaves_no_partial_folder(base, tmp_path, monkeypatch):
    import checkpoint
    import fsdp_utils
    from checkpoint import SaveError

    root = base
    real = fsdp_utils.save_file

    def full_disk(tensors, path, **kw):
        if "step_000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path, **kw)

    monkeypatch.setattr(fsdp_utils, "save_file", full_disk)
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    with pytest.raises(SaveError, match=f"cannot save {out / 'step_000004'}: No space left on device .*removed the "
                                        f"partial folder. Older checkpoints are untouched \\(newest: "
                                        f"{out / 'step_000002'}\\)") as e:
        train(out, root / "cache")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "run.lock", "step_000002"]
    assert checkpoint.checkpoint_problem(out / "step_000002") is None


def test_a_full_disk_inside_torch_save_is_named(tmp_path, monkeypatch):
    """torch.save's own writer reports a failed write only as "unexpected pos": the OSError is recovered."""
    from torch.distributed.fsdp import fully_shard

    import checkpoint
    import fsdp_utils
    from inject_enospc import FullDisk

    _, _, _, mesh = fsdp_utils.init_distributed()
    model = fully_shard(torch.nn.Linear(64, 64), mesh=mesh)  # tensors only: every byte goes through torch.save
    real_init = checkpoint._ErrorKeepingWriter.__init__
    monkeypatch.setattr(checkpoint._ErrorKeepingWriter, "__init__",
                        lambda self, f, fs: real_init(self, FullDisk(f), fs))
    fs = checkpoint._ErrorKeepingFileSystem()
    with open(tmp_path / "t.pt", "wb") as f, pytest.raises(RuntimeError, match="unexpected pos"):
        torch.save(torch.zeros(1000), checkpoint._ErrorKeepingWriter(f, fs))  # the OSError inside is swallowed...
    assert fs.error.errno == errno.ENOSPC  # ...but the writer kept it
    with pytest.raises(OSError) as e:
        checkpoint.save_state(model, torch.optim.AdamW(model.parameters()), tmp_path / "state")
    assert e.value.errno == errno.ENOSPC and checkpoint.reason(e.value).startswith("No space left on device (")


@pytest.mark.slow
def test_disk_full_on_one_rank_stops_every_rank_with_one_message(base, tmp_path):
    """rank 1 alone fails inside the sharded save: no rank may hang in a collective; torchrun returns 1, the
    workers exit 3, rank 0 prints the one message."""
    root = base
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ENOSPC_RANK": "1",
           "ENOSPC_IN": "step_000004"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "tests/inject_enospc.py", *RUN, f"--data={rows48(root / 'cache')}", f"--out_dir={out}",
                           f"--ref_cache_dir={root / 'cache'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]  # torchrun's own code for a failed worker
    assert "exitcode  : 3" in proc.stderr  # the workers' code, in torchrun's table
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot save {out / 'step_000004'}: No space left on "
                                                     f"device ({out / 'step_000004.tmp' / 'state' / '__1_0.distcp'})")
    assert proc.stderr.count("Traceback") == 1  # torchrun's own (ChildFailedError); none from the workers
    assert not (out / "step_000004.tmp").exists() and (out / "step_000002" / "trainer_state.json").exists()


# -----------------------------------------------------------------------------
# 7. one loading rule: safetensors only, shipped code only with --trust_remote_code; 9. torchrun's exit codes


def odd_models(tmp_path):
    """(a folder with pickled weights only, a folder whose config asks for its own code)."""
    pickled, custom = tmp_path / "pickled", tmp_path / "custom"
    shutil.copytree(REPO / "demo" / "model", pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    shutil.copytree(REPO / "demo" / "model", custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (custom / "config.json").write_text(json.dumps(config))
    return pickled, custom


def test_the_loading_rule(tmp_path):
    from fsdp_utils import loading_problem

    pickled, custom = odd_models(tmp_path)
    assert loading_problem(REPO / "demo" / "model") is None
    assert "pytorch_model.bin: pickled weights, never loaded" in loading_problem(pickled, trust_remote_code=True)
    assert "ships its own code" in loading_problem(custom) and loading_problem(custom, trust_remote_code=True) is None
    tokenizer_code = tmp_path / "custom_tokenizer"
    shutil.copytree(REPO / "demo" / "model", tokenizer_code)
    config = json.loads((tokenizer_code / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tok.Fast", None]}
    (tokenizer_code / "tokenizer_config.json").write_text(json.dumps(config))
    assert "tokenizer_config.json: auto_map AutoTokenizer" in loading_problem(tokenizer_code)


@pytest.mark.slow
def test_every_eval_script_keeps_the_loading_rule_without_a_prompt(tmp_path):
    pickled, custom = odd_models(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "a", "prompt": "hi", "responses": ["x", "y"]}) + "\n")
    heldout = REPO / "demo" / "data" / "heldout.jsonl"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    for args, message in [
        (["eval.generate", f"--model={pickled}", f"--prompts={prompts}", f"--out={tmp_path / 'g.jsonl'}"],
         "no safetensors weights"),
        (["eval.generate", f"--model={custom}", f"--prompts={prompts}", f"--out={tmp_path / 'g.jsonl'}"],
         "ships its own code"),
        (["eval.score", f"--reward_model={pickled}", f"--data={prompts}", f"--out={tmp_path / 's.jsonl'}"],
         "no safetensors weights"),
        (["eval.implicit_reward", f"--model={custom}", f"--ref_model={REPO / 'demo' / 'model'}", f"--data={heldout}"],
         "ships its own code"),
        (["eval.implicit_reward", f"--model={REPO / 'demo' / 'model'}", f"--ref_model={pickled}", f"--data={heldout}"],
         "no safetensors weights"),
    ]:
        # stdin stays open and silent: a "run the custom code? [y/N]" prompt would hang until the timeout
        proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                              input="", timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "[y/N]" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_torchrun_reports_a_user_error_as_one_line_from_rank_0(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "wrpo.py", "--lr=-1", f"--out_dir={tmp_path / 'out'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1  # torchrun's code for any failed worker
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == ["error: bad config:"]
    assert proc.stderr.count("need lr > 0") == 1  # rank 1 stays quiet
    assert proc.stderr.count("exitcode  : 2") == 2  # each worker's own code, in torchrun's table
