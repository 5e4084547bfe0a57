"""Checkpoints: how a run is saved and resumed, and how neither loses work. A step checkpoint is out_dir/step_NNNNNN/:
    model.safetensors, config.json, tokenizer files, train_config.json   Hugging Face weights (hf=True)
    state/               fp32 master weights and AdamW state, a shard per rank (torch.distributed.checkpoint)
    trainer_state.json   step, settings, data fingerprint, every rank's random generators, the script's own fields
                         and every file with its size and CRC-32; written last, it marks the checkpoint complete
final/ is the Hugging Face folder alone. Under all of it, atomic writes: a file or folder is written under a temporary
name and renamed when complete, so a crash at any point leaves the older ones as they were."""

import base64
import dataclasses
import glob
import json
import os
import random
import re
import shutil
import socket
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from fsdp_utils import DTYPES, is_master, on_every_rank, print0, weight_files, write_hf_weights

STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"step_(\d{6,})")
SET_ASIDE = re.compile(r"step_(\d{6,})\.(damaged|abandoned)")  # never resumed from; pruned as they age


class ResumeError(ValueError):
    """A checkpoint this run cannot continue from (missing, incomplete, or from other settings); exit code 2."""


class RunFinished(Exception):
    """--resume=auto found the run in out_dir already finished: nothing to do (exit 0)."""


class SaveError(RuntimeError):
    """A save failed (a full disk, say): its partial folder is gone, older checkpoints are untouched. On every rank."""


# --- save and resume

def save_checkpoint(run, cfg, policy, optimizer, step, meta, hf=True):
    """out_dir/step_NNNNNN: HF weights (hf=True) and the resumable state, written atomically; meta: the script's own
    fields for trainer_state.json. Collective: a failed write raises SaveError on every rank, leaving no folder."""
    folder = run.out_dir / f"step_{step:06d}"
    if run.resume_from and folder.resolve() == run.resume_from.resolve():  # saved already: resumed here, stopped
        return folder

    def write(tmp):
        if hf:
            collectively(lambda: write_hf_weights(policy, tmp, **export_settings(run, cfg, step)))
        collectively(lambda: save_state(policy, optimizer, tmp / "state"))
        names = [sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())]
        dist.broadcast_object_list(names, src=0)  # every rank reads back its share of rank 0's list of files
        crcs, rngs = file_crcs(tmp, names[0]), [None] * run.world
        dist.all_gather_object(rngs, rng_state())

        def completion_marker():  # last: it lists every file written before it, with its size and CRC-32
            if unreadable := [f"{n} is {c}" for n, c in crcs.items() if c.startswith("unreadable")]:
                raise OSError(f"cannot read back {', '.join(unreadable)}")
            state = {"step": step, "world_size": run.world, "config": dataclasses.asdict(cfg), "rng": rngs,
                     "files": {n: (tmp / n).stat().st_size for n in names[0]}, "crc32": crcs, **meta}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")

        collectively(lambda: is_master() and completion_marker())

    _save(folder, write, "save")  # an incomplete folder under this name (a damaged copy) is replaced
    if is_master():
        prune(run.out_dir, step, cfg.keep_last)
        print0(f"saved {folder}" + ("" if hf else " (resumable state only)"))
    dist.barrier()
    return folder


def save_final(run, cfg, model, step, skipped=0):
    """out_dir/final: the trained weights as a Hugging Face folder (cfg.save_dtype), with the settings. Collective."""
    path, settings = run.out_dir / "final", export_settings(run, cfg, step)
    _save(path, lambda tmp: collectively(lambda: write_hf_weights(model, tmp, **settings)), "write")
    print0(f"saved {path}" + (f" ({skipped} non-finite steps skipped)" if skipped else ""))


def find_resume(resume, out_dir):
    """The checkpoint folder to continue from (resume: "", "auto" or a folder), or None. Collective: auto takes the
    newest that verifies (usable), naming each one skipped and why, and sets it aside."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise ResumeError(f"--resume={resume}: no such checkpoint folder")
        if not (path / STATE_FILE).exists() and (path / "config.json").is_file() and path.name == "final":
            raise ResumeError(f"--resume={resume}: final/ is the finished run's weights, a Hugging Face folder "
                              "without trainer state: resume from a step_NNNNNN folder, or pass it as --model to "
                              "train on as a new run")
        if problems := usable(path):
            raise ResumeError(f"--resume={resume}: not a complete checkpoint ({'; '.join(problems)})")
        return path
    if (out_dir / "final").is_dir():
        raise RunFinished(f"the run in {out_dir} already finished ({out_dir / 'final'}); nothing to resume "
                          "(pass another --out_dir, or --overwrite=true to train again)")
    candidates = [[folder for _, folder in step_checkpoints(out_dir)]]
    dist.broadcast_object_list(candidates, src=0)  # every rank walks the same list (usable is collective)
    for folder in reversed(candidates[0]):
        if not (problems := usable(folder)):
            return folder
        print0(f"resume: skipping {folder}: {'; '.join(problems)}")
        if is_master():  # never taken for a checkpoint again, nor counted by prune, which drops it once old
            set_aside(folder, ".damaged")
        dist.barrier()
    if (out_dir / "metrics.jsonl").exists():
        print0(f"resume: no usable checkpoint in {out_dir}; starting again from step 0")
    return None


def resume_state(run, cfg, free, fingerprint, eval_fingerprint):
    """The trainer state of the checkpoint run.resume_from (None: a fresh run), refused, naming each, if a setting that
    decides the run's math (a field of cfg not in `free`), the data's fingerprint or a model's weights (run.weights)
    changed. Another held-out set may come in: the state then has no "eval_before" (it was another set's)."""
    folder, config, weights = run.resume_from, dataclasses.asdict(cfg), run.weights  # (weights: collective)
    if folder is None:
        return None
    state = read_state(folder)
    saved = state["config"]
    changed = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now" for k, v in sorted(config.items())
               if k not in free and saved.get(k) != v]
    if state["fingerprint"] != fingerprint:
        changed.append(f"data: {state['fingerprint']} in the checkpoint, {fingerprint} now")
    for key, now in weights.items():  # by content: the same model by another path resumes, another model does not
        then = state["models"].get(key, {})
        if diff := [f"{n}: {then.get(n, 'absent')} then, {now.get(n, 'absent')} now" for n in sorted({*then, *now})
                    if then.get(n) != now.get(n)]:
            changed.append(f"{key}: the weights of {config[key] or config['model']} changed since the checkpoint "
                           f"(size:CRC-32 of {'; '.join(diff[:2])})")
    if changed:
        raise ResumeError(f"cannot resume from {folder}: settings that decide the run changed:\n  " +
                          "\n  ".join(changed) + "\n(restore them, or start a new run in another --out_dir)")
    if state["eval_fingerprint"] != eval_fingerprint:
        print0("resume: the held-out set is not the checkpoint's; its 'before' is computed again")
        del state["eval_before"]
    return state


def restore(run, policy, optimizer, state):
    """Collective: load run.resume_from (trainer `state`: None for a fresh run) into the weights, the optimizer state
    and the random generators; returns its step and skipped steps, or (0, 0)."""
    if state is None:
        return 0, 0
    loaded = dict(zip(("model", "optim"), get_state_dict(policy, optimizer)))  # the shapes to fill, for this world size
    try:
        dcp.load(loaded, checkpoint_id=str(run.resume_from / "state"))
    except CheckpointException as e:
        raise ResumeError(f"cannot load {run.resume_from / 'state'}: {reason(e)}") from None
    set_state_dict(policy, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    if state["world_size"] == run.world:
        set_rng_state(state["rng"][run.rank])
    else:  # the data order does not depend on the world size; only the per-rank generators do
        print0(f"resume: world size {state['world_size']} -> {run.world}: random generators start afresh")
    print0(f"resumed from {run.resume_from} at step {state['step']}")
    return state["step"], state["skipped_steps"]


# --- what a checkpoint holds: Hugging Face weights, sharded state (torch.distributed.checkpoint), random generators

def export_settings(run, cfg, step):
    """What every Hugging Face folder of a run carries: the tokenizer, the save dtype and the settings at `step`."""
    return dict(tokenizer=run.tokenizer, dtype=DTYPES[cfg.save_dtype],
                train_config={**run.settings, "step": step, "world_size": run.world})


def save_state(model, optimizer, folder):
    """Collective: the fp32 master weights and AdamW state, a shard per rank into `folder` (loadable on any world)."""
    writer = dcp.FileSystemWriter(folder)
    if type(getattr(writer, "fs", None)) is FileSystem:  # (another torch may write through something else)
        writer.fs = _ErrorKeepingFileSystem()
    try:
        dcp.save(dict(zip(("model", "optim"), get_state_dict(model, optimizer))), storage_writer=writer)
    except (Exception, CheckpointException) as e:  # (CheckpointException is a BaseException)
        if error := getattr(writer.fs, "error", None):  # torch.save's writer turns a full disk into "unexpected
            raise error from e  # pos": the OSError it met says what happened
        raise


class _ErrorKeepingFileSystem(FileSystem):
    """torch.distributed.checkpoint's local file system, whose files keep the OSError a write met in `error`."""

    @contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as f:
            yield _ErrorKeepingWriter(f, self) if "w" in mode else f


class _ErrorKeepingWriter:
    """A file open for writing whose writes keep the OSError they meet in fs.error: torch.save's writer swallows it.
    (Not an io.BufferedWriter itself: torch.save writes to those through their file descriptor.)"""

    def __init__(self, f, fs):
        self.f, self.fs = f, fs

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.fs.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def rng_state():
    """This rank's random generators as JSON-able values."""
    np_state = np.random.get_state()
    out = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
           "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
           "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        out["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return out


def set_rng_state(s, check=False):
    """Load one rank's generators (rng_state's); check=True: into throwaway ones, raising where the load would."""
    py, nprs = (random.Random(), np.random.RandomState()) if check else (random, np.random)
    py.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    nprs.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    saved = lambda key: torch.frombuffer(bytearray(base64.b64decode(s[key], validate=True)), dtype=torch.uint8)  # noqa
    (torch.Generator() if check else torch.default_generator).set_state(saved("torch"))
    if "cuda" in s and torch.cuda.is_available():
        torch.Generator("cuda").set_state(saved("cuda")) if check else torch.cuda.set_rng_state(saved("cuda"))


# --- verification: a checkpoint is complete when its state file is sound and every file matches its size and CRC-32

STATE_FIELDS = {"step": int, "world_size": int, "config": dict, "rng": list, "files": dict, "crc32": dict,
                "fingerprint": str, "eval_fingerprint": str, "eval_before": dict, "skipped_steps": int,
                "models": dict}  # (the scripts' meta included)


def read_state(folder):
    """The trainer state of a checkpoint folder, checked field by field; ValueError says what is wrong."""
    state = json.loads((Path(folder) / STATE_FILE).read_text())
    if not isinstance(state, dict):
        raise ValueError("not a JSON object")
    for key, kind in STATE_FIELDS.items():
        if key not in state:
            raise ValueError(f"no '{key}'")
        if type(state[key]) is not kind:
            raise ValueError(f"'{key}' must be {kind.__name__}, got {state[key]!r:.40}")
    if state["step"] < 1:
        raise ValueError(f"step must be >= 1, got {state['step']}")
    if state["world_size"] < 1 or len(state["rng"]) != state["world_size"]:
        raise ValueError(f"needs one rng entry per rank ({state['world_size']})")
    try:
        for rng in state["rng"]:
            set_rng_state(rng, check=True)
    except Exception:
        raise ValueError("a damaged rng entry") from None
    for name, size in state["files"].items():
        if type(size) is not int or ".." in Path(name).parts or Path(name).is_absolute():
            raise ValueError(f"a damaged files entry ({name!r:.40})")
    return state


def checkpoint_problem(folder):
    """None for a complete checkpoint folder (its state file sound, every file at its size), else why not: quick."""
    if not (Path(folder) / STATE_FILE).is_file():
        return f"no {STATE_FILE} (the save did not finish)"
    try:
        state = read_state(folder)
    except (OSError, ValueError) as e:  # malformed JSON, or not UTF-8, included
        return f"unreadable {STATE_FILE} ({e.strerror if isinstance(e, OSError) else str(e).splitlines()[0]})"
    return next((f"{name} is missing or truncated" for name, size in state["files"].items()
                 if not (Path(folder) / name).is_file() or (Path(folder) / name).stat().st_size != size), None)


def usable(folder):
    """Collective: why checkpoint `folder` cannot be resumed from ([] if it can): rank 0's quick check
    (checkpoint_problem), then every file against its CRC-32, the ranks sharing the reading."""
    problem = checkpoint_problem(folder) if dist.get_rank() == 0 else None
    box = [problem, read_state(folder) if dist.get_rank() == 0 and not problem else None]
    dist.broadcast_object_list(box, src=0)  # every rank takes rank 0's view: there is a collective below
    problem, state = box
    if problem:
        return [problem]
    found, recorded = file_crcs(folder, state["files"]), state["crc32"]
    return sorted(f"{n} is {c}" if c.startswith("unreadable") else f"{n} has no recorded CRC-32" if n not in recorded
                  else f"{n} does not match its CRC-32 (damaged after it was written)"
                  for n, c in found.items() if c != recorded.get(n))


def file_crcs(folder, names):
    """{name: CRC-32, or "unreadable (why)"} of the files `names` of `folder`, the ranks sharing the reading.
    Collective: every rank gets them all. The one CRC path: a save reads back what it wrote, a resume checks it."""
    mine, rank, world = {}, dist.get_rank(), dist.get_world_size()
    for i, name in enumerate(sorted(names)):
        writer = re.match(r"state/__(\d+)_", name)  # a rank's state shard: read where it was written (a page cache)
        if (int(writer.group(1)) if writer else i) % world != rank:
            continue
        try:
            with open(Path(folder) / name, "rb") as f:
                mine[name] = crc32(iter(lambda: f.read(1 << 24), b""))
        except OSError as e:
            mine[name] = f"unreadable ({e.strerror or e})"
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {name: crc for part in parts for name, crc in part.items()}


def model_identity(path):
    """{file: "SIZE:CRC-32"} of the weight files and config.json of model folder `path`: what names the model whatever
    its path, so that a resume (or eval.generate's) notices another model under it. Collective: a shared reading."""
    names = weight_files(path) + (["config.json"] if (Path(path) / "config.json").is_file() else [])
    crcs = file_crcs(path, names)
    return {name: f"{(Path(path) / name).stat().st_size}:{crcs[name]}" for name in names}


def crc32(chunks):
    """The CRC-32 (8 hex digits) of a stream of bytes-like chunks: a file's blocks, or an array's pieces."""
    crc = 0
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


# --- the checkpoints of out_dir: listing, setting aside, pruning

def step_checkpoints(out_dir):
    """[(step, folder)] of the step_NNNNNN folders in out_dir, oldest first (complete or not)."""
    return sorted((int(m.group(1)), p) for p in Path(out_dir).glob("step_*") if (m := STEP_DIR.fullmatch(p.name)))


def newest_checkpoint(out_dir):
    """The newest complete step checkpoint in out_dir, or None (sizes checked, not CRCs)."""
    return next((f for _, f in reversed(step_checkpoints(out_dir)) if checkpoint_problem(f) is None), None)


def _save(folder, write, verb):
    """write_atomic of a folder of out_dir that every rank writes; on failure, a SaveError that says what is left."""
    try:
        write_atomic(folder, write, collective=True)
    except SaveError as e:
        newest = newest_checkpoint(folder.parent)
        note = (f"Older checkpoints are untouched (newest: {newest}); once the cause is fixed (a full disk: free "
                "space), rerun with --resume=auto" if newest else "There is no older checkpoint to resume from")
        raise SaveError(f"cannot {verb} {folder}: {e}; removed the partial folder. {note}") from None


def remove_partial_saves(out_dir):
    """Remove the folders of saves a crash interrupted (step_N.tmp, final.tmp): never complete; out_dir is locked."""
    for folder in sorted(Path(out_dir).glob("step_*.tmp")) + sorted(Path(out_dir).glob("final.tmp")):
        shutil.rmtree(folder, ignore_errors=True)
        print0(f"removed {folder}, left by a save that was interrupted")


def set_aside(folder, suffix):
    """Rename step_N to step_N{suffix}, replacing an older one; only reported if it fails (it is skipped anyway)."""
    aside = folder.with_name(folder.name + suffix)
    try:
        shutil.rmtree(aside) if aside.is_dir() else aside.unlink(missing_ok=True)
        folder.rename(aside)
        print0(f"moved {folder} to {aside}")
    except OSError as e:
        print0(f"warning: cannot move {folder} aside ({e.strerror or e}); it stays, never resumed from")


def prune(out_dir, newest, keep_last):
    """After checkpoint `newest` completed: drop complete ones beyond the newest keep_last (0: keep all), incomplete
    ones older than it, and set aside newer ones (step_N.abandoned): a run this one resumed before them left them.
    Folders set aside (damaged, abandoned) go once no newer than every checkpoint kept, as those they outlived."""
    complete = []
    for step, folder in step_checkpoints(out_dir):
        if step > newest:
            set_aside(folder, ".abandoned")
        elif checkpoint_problem(folder) is None:
            complete.append((step, folder))
        elif step < newest:
            shutil.rmtree(folder)
    for _, folder in complete[: -keep_last] if keep_last else []:
        shutil.rmtree(folder)
    oldest_kept = complete[-keep_last:][0][0] if keep_last and complete else 0
    for folder in Path(out_dir).glob("step_*.*"):
        if (m := SET_ASIDE.fullmatch(folder.name)) and int(m.group(1)) <= oldest_kept:
            shutil.rmtree(folder, ignore_errors=True)


# --- writes that all ranks agree on, whole or not at all

def reason(e):
    """One line for an exception met while writing: the OSError inside (no space left on device, ...), if any."""
    if isinstance(e, CheckpointException):  # torch.distributed.checkpoint wraps each rank's exception
        inner = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        return next((reason(x) for x in inner if isinstance(x, BaseException)), str(e).splitlines()[0])
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} ({e.filename})" if e.filename else e.strerror
    if e.__cause__ or e.__context__:
        return reason(e.__cause__ or e.__context__)
    return (str(e).splitlines() or [type(e).__name__])[0]


def collectively(fn):
    """fn() on every rank, then all agree: if it failed on any (rank 0 alone writes some files), every rank raises
    SaveError with the reasons, so that no rank waits forever for one that failed in the next collective."""
    try:
        out, error = fn(), None
    except (Exception, CheckpointException) as e:  # (CheckpointException is a BaseException)
        out, error = None, reason(e)
    if on_every_rank(error is None):  # a plain tensor collective each save; the messages travel only after a failure
        return out
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = dict.fromkeys(e for e in errors if e)  # DCP gives every rank the same one: say it once
    raise SaveError("; ".join(failed if len(failed) == 1 else [f"rank {r}: {e}" for r, e in enumerate(errors) if e]))


def write_atomic(path, write, collective=False, private=False):
    """Write `path`, a file or folder, whole or not at all: under path.tmp (write: the text, or a function writing it),
    renamed over `path`. collective: every rank writes, rank 0 clears and renames. private: a name of this process's
    own (path.HOST-PID.tmp), for a cache that the nodes may write at once into a folder they share (tokens._write);
    once written, the temporary files of this host's writers that died writing are removed."""
    path = Path(path)
    host = f"{path.name}.{socket.gethostname()}-"
    tmp = path.with_name(host + f"{os.getpid()}.tmp" if private else path.name + ".tmp")
    owner = is_master() or not collective
    sync = dist.barrier if collective else lambda: None
    if owner:  # left by a crash
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    sync()
    try:
        write(tmp) if callable(write) else tmp.write_text(write, encoding="utf-8")
    except BaseException:  # a failed write leaves nothing behind (collective: every rank gets here, see collectively)
        if owner:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    sync()
    if owner:
        if tmp.is_dir() and path.is_dir():  # a folder cannot be renamed over another: the old one goes first
            shutil.rmtree(path)
        os.replace(tmp, path)
    sync()
    for dead in path.parent.glob(glob.escape(host) + "*.tmp") if private else []:
        try:
            os.kill(int(dead.name[len(host) : -len(".tmp")]), 0)  # signal 0: only whether the process exists
        except ProcessLookupError:
            dead.unlink(missing_ok=True)
        except (ValueError, PermissionError):  # not a pid; another user's process
            pass
    return path
