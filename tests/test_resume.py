"""Crash, preemption and resume, for real: 2-rank torchrun runs killed with SIGKILL or stopped with
SIGTERM, resumed with --resume=auto, compared step by step with uninterrupted runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, read_jsonl, torchrun

pytestmark = pytest.mark.slow  # end-to-end runs: the full suite only

RUN = ["--max_steps=12", "--save_every=3", "--global_batch_size=8", "--micro_batch_size=2", "--lr=1e-3",
       "--dtype=float32", "--save_dtype=float32", "--max_length=128", "--max_prompt_length=96", "--log_every=1"]
SFT_RUN = ["--data=demo/data/train.jsonl", "--max_length=128", "--global_batch_size=4", "--lr=1e-3"]
COMPARED = ["loss", "grad_norm", "lr", "alpha", "rewards/margins", "rewards/accuracies", "logps/rejected"]


def start(log, *cmd):
    """A job in its own session (a scheduler's view of it), output to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, *map(str, cmd)], cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def descendants(pid):
    """pid and every process below it (torchrun starts its workers in sessions of their own)."""
    children = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(p))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def kill_tree(pid):
    for p in descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def worker(job, rank):
    """The pid of the job's worker with this RANK."""
    for p in descendants(job):
        try:
            env = open(f"/proc/{p}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return p
    raise AssertionError(f"no worker with RANK={rank}")


def torchrun_cmd(world, script):
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", script]


def wait_for(proc, log, ready, timeout=300):
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the point to interrupt it\n"
                        f"{log.read_text()[-4000:]}")
        if time.time() - t0 > timeout:
            kill_tree(proc.pid)
            pytest.fail("timed out waiting for the run")
        time.sleep(0.02)


def steps_logged(out):
    path = out / "metrics.jsonl"
    return [m["step"] for m in read_jsonl(path) if "lr" in m] if path.exists() else []


def same_run(a, b, keys):
    """Per-step metrics of two runs, compared exactly (fp32: the same operations in the same order)."""
    ra, rb = [m for m in read_jsonl(a / "metrics.jsonl") if "lr" in m], [m for m in read_jsonl(b / "metrics.jsonl")
                                                                         if "lr" in m]
    assert [m["step"] for m in ra] == [m["step"] for m in rb] == list(range(1, len(ra) + 1))
    for x, y in zip(ra, rb):
        for k in keys:
            if k in x:
                assert x[k] == y[k], (x["step"], k, x[k], y[k])
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(tmp_path):
    cache = f"--ref_cache_dir={tmp_path / 'cache'}"
    full, broken = tmp_path / "full", tmp_path / "broken"
    torchrun(2, REPO / "wrpo.py", *RUN, f"--out_dir={full}", cache)

    # kill -9 the whole job once step 6's checkpoint is complete (steps 7+ may have run: they are lost)
    log = tmp_path / "broken.log"
    proc = start(log, *torchrun_cmd(2, "wrpo.py"), *RUN, f"--out_dir={broken}", cache)
    wait_for(proc, log, lambda: (broken / "step_000006" / "trainer_state.json").exists())
    kill_tree(proc.pid)  # the whole job dies at once, as when a node goes down
    proc.wait()
    time.sleep(0.5)  # the workers are not our children: give the kernel a moment to reap them
    assert not (broken / "final").exists() and max(steps_logged(broken)) < 12

    # a save that crashed (a .tmp folder) and a checkpoint truncated after it was written:
    # auto-resume must skip both and continue from step 6
    shutil.copytree(broken / "step_000006", broken / "step_000007")
    shard = next((broken / "step_000007" / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (broken / "step_000008.tmp" / "state").mkdir(parents=True)

    out = torchrun(2, REPO / "wrpo.py", *RUN, f"--out_dir={broken}", cache, "--resume=auto")
    assert "skipping" in out and "step_000007" in out and "truncated" in out
    assert f"resumed from {broken / 'step_000006'} at step 6" in out
    same_run(full, broken, COMPARED)
    # keep_last=2: the two newest step checkpoints; the crashed save's leftover is gone, the damaged one set aside
    assert sorted(p.name for p in broken.iterdir()) == ["config.json", "final", "metrics.jsonl", "step_000006",
                                                       "step_000007.damaged", "step_000009"]
    state = json.loads((broken / "step_000009" / "trainer_state.json").read_text())
    assert state["step"] == 9 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert (broken / "step_000009" / "model.safetensors").exists()  # each checkpoint is also an HF model

    # a finished run: --resume=auto has nothing to do and says so (lifecycle.cli exits 0)
    import wrpo
    from checkpoint import RunFinished

    with pytest.raises(RunFinished, match="already finished"):
        wrpo.main([*RUN, f"--out_dir={broken}", "--resume=auto"])


def test_resume_refuses_changed_settings_and_data_and_reshards(tmp_path, monkeypatch):
    """The checks run in-process (world 1) on trainer_state.json, before any model is loaded; then
    the 1-rank checkpoint is resumed on 2 ranks."""
    import wrpo
    from checkpoint import ResumeError
    from training import ConfigError

    monkeypatch.chdir(REPO)  # the same relative model and data paths as the run being resumed
    out = tmp_path / "run"
    wrpo.main([*RUN, "--max_steps=4", f"--out_dir={out}", f"--ref_cache_dir={tmp_path}"])
    uninterrupted = load_file(out / "final" / "model.safetensors")
    shutil.rmtree(out / "final")  # as if it had been killed after step 3's checkpoint
    base = [*RUN, "--max_steps=4", f"--out_dir={out}", "--resume=auto"]
    with pytest.raises(ResumeError, match=r"global_batch_size: 8 in the checkpoint, 16 now"):
        wrpo.main(base + ["--global_batch_size=16"])
    changed = r"beta: 0.01 in the checkpoint, 0.02 now\n  lr: 0.001 in the checkpoint, 0.002 now"
    with pytest.raises(ResumeError, match=changed):
        wrpo.main(base + ["--lr=2e-3", "--beta=0.02"])
    rows = (REPO / "demo" / "data" / "train.jsonl").read_text().splitlines()
    (tmp_path / "other.jsonl").write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # same rows, other order
    with pytest.raises(ResumeError, match=r"data: 480 rows, sha256 \w+ in the checkpoint, 480 rows, sha256 \w+ now"):
        wrpo.main(base + [f"--data={tmp_path / 'other.jsonl'}"])
    with pytest.raises(ResumeError, match=r"not a complete checkpoint \(no trainer_state.json"):
        wrpo.main([*RUN, f"--out_dir={tmp_path / 'x'}", f"--resume={out}"])
    with pytest.raises(ResumeError, match="no such checkpoint folder"):
        wrpo.main([*RUN, f"--out_dir={tmp_path / 'x'}", f"--resume={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="resume and overwrite exclude each other"):
        wrpo.main(base + ["--overwrite=true"])
    # settings that only change speed or logging may change, the data file may move, and the
    # world size may change: DCP reshards the 1-rank state for 2 ranks
    shutil.copy(REPO / "demo" / "data" / "train.jsonl", tmp_path / "moved.jsonl")
    import lifecycle

    lifecycle.release_locks()  # out_dir's lock, held by the runs above as their own processes would until exit
    stdout = torchrun(2, REPO / "wrpo.py", *base, "--micro_batch_size=4", "--log_every=2",
                      f"--data={tmp_path / 'moved.jsonl'}", f"--ref_cache_dir={tmp_path}")
    assert "world size 1 -> 2" in stdout and "at step 3" in stdout
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl") if "lr" in m] == [1, 2, 3, 4]
    resharded = load_file(out / "final" / "model.safetensors")
    # the one step on 2 ranks sums in another order: fp32 rounding, magnified by Adam near zero gradients
    assert max((uninterrupted[k] - resharded[k]).abs().max().item() for k in resharded) <= 1e-5


def test_sigterm_saves_exits_and_resumes_sft(tmp_path):
    """SFT shares the machinery: SIGTERM to one rank stops both (they agree at the end of every
    step), which finish the step, save the resumable state and exit 143; --resume=auto then
    continues as if nothing had happened."""
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    args = [*SFT_RUN, "--max_steps=20", "--dtype=float32", "--save_dtype=float32", "--log_every=1"]
    torchrun(2, REPO / "sft.py", *args, f"--out_dir={full}")
    log = tmp_path / "stopped.log"
    proc = start(log, *torchrun_cmd(2, "sft.py"), *args, f"--out_dir={stopped}")
    wait_for(proc, log, lambda: len(steps_logged(stopped)) >= 3)
    os.kill(worker(proc.pid, 1), signal.SIGTERM)  # one rank only: the ranks agree at the end of the step
    assert proc.wait(timeout=120) != 0
    out = log.read_text()
    assert "stopped by SIGTERM after step" in out and "--resume=auto" in out, out[-3000:]
    step = max(steps_logged(stopped))
    assert step < 20 and not (stopped / "final").exists()
    saved = stopped / f"step_{step:06d}"
    assert (saved / "trainer_state.json").exists() and not (saved / "model.safetensors").exists()  # state only

    out = torchrun(2, REPO / "sft.py", *args, f"--out_dir={stopped}", "--resume=auto")
    assert f"at step {step}" in out
    same_run(full, stopped, ["loss", "grad_norm", "lr"])


def test_plain_process_sigterm_exit_code(tmp_path):
    """Without torchrun: SIGTERM -> save -> exit 128 + 15; SIGINT works the same (exit 130)."""
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        out, log = tmp_path / sig.name, tmp_path / f"{sig.name}.log"
        proc = start(log, "sft.py", *SFT_RUN, "--max_steps=60", f"--out_dir={out}")
        wait_for(proc, log, lambda: len(steps_logged(out)) >= 2)
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == code, log.read_text()[-3000:]
        assert "Traceback" not in log.read_text() and f"stopped by {sig.name}" in log.read_text()
        step = max(steps_logged(out))
        assert (out / f"step_{step:06d}" / "trainer_state.json").exists()


def test_signal_during_the_final_save_is_caught_and_the_run_finishes(tmp_path):
    """The signal catcher covers the end of the run too: SIGTERM while final/ is written (and the final
    evaluation) does not kill the process; the weights are saved and the run ends as finished."""
    out = tmp_path / "run"
    code = ("import os, signal, sys\nimport wrpo\n"
            "save_final = wrpo.save_final\n"
            "def interrupted(*args, **kwargs):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, while the final weights are written\n"
            "    return save_final(*args, **kwargs)\n"
            "wrpo.save_final = interrupted\n"
            "wrpo.cli(wrpo.main)\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *RUN[:1], "--max_steps=2", "--global_batch_size=8",
                           "--max_length=128", "--max_prompt_length=96", f"--out_dir={out}",
                           f"--ref_cache_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "got SIGTERM" in proc.stderr and (out / "final" / "model.safetensors").exists()
