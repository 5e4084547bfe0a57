"""Everything written to disk that a run must not lose: checkpoints, resuming, and the reference log-prob cache.

A step checkpoint is out_dir/step_NNNNNN/:
    model.safetensors, config.json, tokenizer files, train_config.json   Hugging Face weights (hf=True)
    state/                     fp32 master weights and AdamW state, one shard per rank (torch.distributed.checkpoint)
    trainer_state.json         step, settings, data fingerprint, every rank's random generators, the script's
                               own fields (meta) and every file with its size and CRC-32; written last: the
                               completion marker
final/ is the Hugging Face folder alone. Every file and folder is written under a temporary name and renamed
when complete (write_atomic), so a crash at any point leaves the older ones as they were. Each rank computes
the CRC-32 of its state shards as it writes them; resuming checks every file against its CRC first and skips
a damaged checkpoint for the newest one that verifies.
"""

import base64
import copy
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, \
    set_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.fsdp import FSDPModule

from fsdp_utils import DTYPES, is_master, on_every_rank, print0

STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"step_(\d{6,})")


class ResumeError(ValueError):
    """A checkpoint this run cannot continue from (missing, incomplete, or from other settings); exit code 2."""


class RunFinished(Exception):
    """--resume=auto found the run in out_dir already finished: nothing to do (exit 0)."""


class SaveError(RuntimeError):
    """A checkpoint or the final weights could not be written (e.g. the disk is full); the partial folder is gone
    and older checkpoints are untouched. Raised on every rank."""


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


def all_ok(error=None):
    """Collective: every rank passes the reason it failed (or None) and all raise SaveError if any failed, so that
    a write that failed on one rank never leaves the others waiting in the next collective."""
    if on_every_rank(error is None):  # a plain tensor collective each save; the messages travel only after a failure
        return
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = dict.fromkeys(e for e in errors if e)  # DCP gives every rank the same one: say it once
    if len(failed) > 1:
        failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
    if failed:
        raise SaveError("; ".join(failed))


# -----------------------------------------------------------------------------
# atomic writes: a temporary name, then one rename


def write_atomic(path, write, collective=False, private=False):
    """Write `path`, a file or a folder, whole or not at all: under path.tmp, then renamed over `path`.

    write: the text, or a function that writes the temporary path. collective=True: every rank
    calls this, and write(tmp) with it (a sharded save); rank 0 alone clears and renames.
    private=True: the temporary name is this process's own (path.HOST-PID.tmp), for a cache that
    the nodes of a run may write at once into a folder they share.
    """
    path = Path(path)
    tmp = path.with_name(path.name + (f".{socket.gethostname()}-{os.getpid()}" if private else "") + ".tmp")
    owner = is_master() or not collective
    if owner and tmp.is_dir():  # left by a crash
        shutil.rmtree(tmp)
    elif owner:
        tmp.unlink(missing_ok=True)
    if collective:
        dist.barrier()
    try:
        if callable(write):
            write(tmp)
        else:
            tmp.write_text(write, encoding="utf-8")
    except BaseException:  # a failed write leaves nothing behind (collective: every rank gets here, see all_ok)
        if owner:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    if collective:
        dist.barrier()
    if owner:
        if tmp.is_dir() and path.is_dir():  # a folder cannot be renamed over another: the old one goes first
            shutil.rmtree(path)
        os.replace(tmp, path)
        if private:
            _remove_orphans(path)
    if collective:
        dist.barrier()
    return path


def _remove_orphans(path):
    """The private temporary files of `path` (write_atomic) that this host's processes left when they died while
    writing it; another host's, or a live process's, are left alone."""
    prefix = f"{path.name}.{socket.gethostname()}-"
    for tmp in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        pid = tmp.name[len(prefix) : -len(".tmp")]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


# -----------------------------------------------------------------------------
# Hugging Face weights: gathered on rank 0, written as safetensors


def write_hf_weights(model, folder, *, tokenizer=None, train_config=None, dtype=torch.bfloat16,
                     max_shard_bytes=5 * 2**30):
    """Gather the full state dict on rank 0 (CPU-offloaded) and write a Hugging Face checkpoint into `folder`.
    Collective: every rank must call it."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    error = None
    try:
        if is_master():
            _write_hf_folder(model, state, Path(folder), tokenizer, train_config, dtype, max_shard_bytes)
    except Exception as e:  # rank 0 alone writes: tell the others, which would otherwise wait for it forever
        error = reason(e)
    all_ok(error)


def _write_hf_folder(model, state, folder, tokenizer, train_config, dtype, max_shard_bytes):
    folder.mkdir(parents=True, exist_ok=True)
    if getattr(model.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    for k in list(state):  # one tensor at a time, so fp32 and save-dtype copies never coexist whole
        state[k] = state[k].to(dtype).contiguous()
    _write_safetensors(state, folder, max_shard_bytes)
    config = copy.deepcopy(model.config)
    # fully_shard swaps in a subclass (FSDPLlamaForCausalLM); record the model's own class
    config.architectures = [next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__]
    config.dtype = dtype
    config.use_cache = True  # training turned it off; generation wants it
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if train_config is not None:
        (folder / "train_config.json").write_text(json.dumps(train_config, indent=2) + "\n")


def _write_safetensors(state, folder, max_shard_bytes):
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_hf_checkpoint(model, folder, **kwargs):
    """write_hf_weights, atomically: into folder.tmp, renamed to `folder` when complete. Collective."""
    write_atomic(folder, lambda tmp: write_hf_weights(model, tmp, **kwargs), collective=True)


def export_settings(run, cfg, step):
    """What every Hugging Face folder of a run carries: the tokenizer, the save dtype and the settings at `step`."""
    return dict(tokenizer=run.tokenizer, dtype=DTYPES[cfg.save_dtype],
                train_config={**dataclasses.asdict(cfg), "step": step, "world_size": run.world})


def save_final(run, cfg, model, step, skipped=0):
    """out_dir/final: the trained weights as a Hugging Face folder (cfg.save_dtype), with the settings. Collective."""
    path = run.out_dir / "final"
    try:
        save_hf_checkpoint(model, path, **export_settings(run, cfg, step))
    except SaveError as e:
        raise SaveError(f"cannot write {path}: {e}; removed the partial folder. {_newest_note(run.out_dir)}") from None
    print0(f"saved {path}" + (f" ({skipped} non-finite steps skipped)" if skipped else ""))


# -----------------------------------------------------------------------------
# resumable state: sharded model and optimizer (torch.distributed.checkpoint), random generators


def save_state(model, optimizer, folder):
    """The fp32 master weights and AdamW state, each rank writing its own shards into `folder`. Collective.
    DCP files load on any number of ranks (they are resharded). Returns {file name: CRC-32} of the files
    this rank wrote, computed as they were written."""
    model_state, optim_state = get_state_dict(model, optimizer)
    writer = dcp.FileSystemWriter(folder)
    if type(getattr(writer, "fs", None)) is FileSystem:  # else (another torch) the CRCs are read back afterwards
        writer.fs = _Crc32FileSystem()
    try:
        dcp.save({"model": model_state, "optim": optim_state}, storage_writer=writer)
    except (Exception, CheckpointException) as e:  # (CheckpointException is a BaseException)
        if error := getattr(getattr(writer, "fs", None), "error", None):  # torch.save's writer turns a full
            raise error from e  # disk into "unexpected pos": the OSError it met says what happened
        raise
    return getattr(writer.fs, "crcs", {})


def load_state(model, optimizer, folder):
    """Fill a sharded model and its optimizer from save_state's files. Collective."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except CheckpointException as e:
        raise ResumeError(f"cannot load {folder}: {reason(e)} (one saved before CRC-32s were kept may be "
                          "damaged: resume from an older one with --resume=PATH)") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def rng_state():
    """This rank's random generators as JSON-able values."""
    np_state = np.random.get_state()
    out = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
           "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
           "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        out["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return out


def set_rng_state(s):
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    torch.set_rng_state(_bytes_tensor(s["torch"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(_bytes_tensor(s["cuda"]))


# -----------------------------------------------------------------------------
# checksums: the CRC-32 of every file, computed as it is written, checked before resuming


def file_crc32(path, chunk=1 << 24):
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


class _Crc32Writer:
    """A file open for writing that keeps the CRC-32 of every byte written through it, and the OSError a
    write met (fs.error: torch.save's writer reports it only as a wrong file position)."""

    def __init__(self, f, fs):
        self.f, self.fs, self.crc = f, fs, 0

    def write(self, b):
        if self.crc is not None:
            self.crc = zlib.crc32(b, self.crc)
        try:
            return self.f.write(b)
        except OSError as e:
            self.fs.error = e
            raise

    def seek(self, *args):  # a writer that goes back invalidates the running CRC: the file is read back instead
        self.crc = None
        return self.f.seek(*args)

    def __getattr__(self, name):
        return getattr(self.f, name)


class _Crc32FileSystem(FileSystem):
    """torch.distributed.checkpoint's local file system, keeping {file name: CRC-32} of what this rank writes."""

    def __init__(self):
        super().__init__()
        self.crcs, self.error = {}, None

    @contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as f:
            if "w" not in mode:
                yield f
                return
            stream = _Crc32Writer(f, self)
            yield stream
        self.crcs[Path(path).name] = f"{stream.crc:08x}" if stream.crc is not None else file_crc32(path)

    def rename(self, path, new_path):  # the metadata file is written as .metadata.tmp, then renamed
        super().rename(path, new_path)
        if Path(path).name in self.crcs:
            self.crcs[Path(new_path).name] = self.crcs.pop(Path(path).name)


def usable(folder):
    """Collective: why checkpoint `folder` cannot be resumed from ([] if it can). Rank 0's quick check
    (checkpoint_problem), then every file against its CRC-32, the ranks sharing the reading."""
    box = [None, None]
    if dist.get_rank() == 0:
        box[0] = checkpoint_problem(folder)
        box[1] = None if box[0] else read_state(folder)
    dist.broadcast_object_list(box, src=0)  # every rank takes rank 0's view: there is a collective below
    problem, state = box
    if problem:
        return [problem]
    crcs = state.get("crc32")
    if crcs is None:  # written before checksums existed: its sizes were checked, which is all it records
        return []
    mine = []
    for name in sorted(state["files"])[dist.get_rank()::dist.get_world_size()]:
        try:
            if name not in crcs:
                mine.append(f"{name} has no recorded CRC-32")
            elif file_crc32(Path(folder) / name) != crcs[name]:
                mine.append(f"{name} does not match its CRC-32 (damaged after it was written)")
        except OSError as e:
            mine.append(f"{name} is unreadable ({e.strerror or e})")
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, mine)
    return sorted(p for part in found for p in part)


# -----------------------------------------------------------------------------
# step checkpoints: save, find, check, restore, prune


def save_checkpoint(run, cfg, policy, optimizer, step, meta, hf=True):
    """out_dir/step_NNNNNN: HF weights (hf=True) and the resumable state, written atomically. Collective.

    meta: the script's own fields for trainer_state.json (the data fingerprint, eval_before, skipped_steps).
    Uses run.out_dir, run.tokenizer, run.world, cfg.save_dtype and cfg.keep_last. Older complete checkpoints
    beyond keep_last are deleted only after this one is complete. A write that fails (a full disk) raises
    SaveError on every rank and leaves no partial folder.
    """
    folder = run.out_dir / f"step_{step:06d}"
    if run.resume_from and folder.resolve() == run.resume_from.resolve():  # saved already: resumed here, stopped
        return folder

    def write(tmp):
        if hf:
            write_hf_weights(policy, tmp, **export_settings(run, cfg, step))
        try:
            crcs, error = save_state(policy, optimizer, tmp / "state"), None
        except (Exception, CheckpointException) as e:  # (a BaseException) DCP's, on every rank when one failed
            crcs, error = {}, reason(e)
        all_ok(error)
        per_rank = [None] * run.world
        dist.all_gather_object(per_rank, (rng_state(), crcs))
        error = None
        if is_master():  # the completion marker, last: it lists every file written before it, with its CRC
            try:
                written = {f"state/{name}": crc for _, part in per_rank for name, crc in part.items()}
                files, crc32 = {}, {}
                for f in sorted(tmp.rglob("*")):
                    if f.is_file():
                        name = str(f.relative_to(tmp))
                        files[name] = f.stat().st_size
                        crc32[name] = written.get(name) or file_crc32(f)  # rank 0's HF files: read back, cached
                state = {"step": step, "world_size": run.world, "config": dataclasses.asdict(cfg),
                         "rng": [rng for rng, _ in per_rank], "files": files, "crc32": crc32, **meta}
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
            except Exception as e:
                error = reason(e)
        all_ok(error)

    try:  # an incomplete folder under this name (a damaged copy) is replaced
        write_atomic(folder, write, collective=True)
    except SaveError as e:
        raise SaveError(f"cannot save {folder}: {e}; removed the partial folder. {_newest_note(run.out_dir)}") \
            from None
    if is_master():
        prune(run.out_dir, step, cfg.keep_last)
        print0(f"saved {folder}" + ("" if hf else " (resumable state only)"))
    dist.barrier()
    return folder


def _newest_note(out_dir):
    newest = newest_checkpoint(out_dir)
    return (f"Older checkpoints are untouched (newest: {newest}); once the cause is fixed (a full disk: free space), "
            "rerun with --resume=auto" if newest else "There is no older checkpoint to resume from")


# the fields of trainer_state.json that resuming reads, with their types (the scripts' meta included)
STATE_FIELDS = {"step": int, "world_size": int, "config": dict, "rng": list, "files": dict,
                "fingerprint": str, "eval_before": dict, "skipped_steps": int}


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
    for rng in state["rng"]:
        try:
            _check_rng(rng)
        except Exception:
            raise ValueError("a damaged rng entry") from None
    for name, size in state["files"].items():
        if type(size) is not int or ".." in Path(name).parts or Path(name).is_absolute():
            raise ValueError(f"a damaged files entry ({name!r:.40})")
    if not isinstance(state.get("crc32", {}), dict):
        raise ValueError("'crc32' must be a dict")
    return state


def _check_rng(s):
    """Load one rank's saved generators into throwaway ones: raises if set_rng_state would."""
    random.Random().setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    np.random.RandomState().set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    torch.Generator().set_state(_bytes_tensor(s["torch"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.Generator("cuda").set_state(_bytes_tensor(s["cuda"]))


def _bytes_tensor(b64):
    return torch.frombuffer(bytearray(base64.b64decode(b64, validate=True)), dtype=torch.uint8)


def checkpoint_problem(folder):
    """None for a complete checkpoint folder (its state file is sound, every file there at its size), else why
    it is not one. Quick: reads no weights (usable checks their content)."""
    if not (Path(folder) / STATE_FILE).is_file():
        return f"no {STATE_FILE} (the save did not finish)"
    try:
        state = read_state(folder)
    except (OSError, UnicodeDecodeError) as e:
        return f"unreadable {STATE_FILE} ({e.strerror if isinstance(e, OSError) else e})"
    except ValueError as e:  # malformed JSON included
        return f"unreadable {STATE_FILE} ({str(e).splitlines()[0]})"
    for name, size in state["files"].items():
        f = Path(folder) / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{name} is missing or truncated"
    return None


def step_checkpoints(out_dir):
    """[(step, folder)] of the step_NNNNNN folders in out_dir, oldest first (complete or not)."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("step_*") if (m := STEP_DIR.fullmatch(p.name))]
    return sorted(found) if Path(out_dir).is_dir() else []


def partial_saves(out_dir):
    """Folders of saves that a crash interrupted (step_N.tmp, final.tmp): never complete, safe to remove while
    out_dir is locked."""
    return sorted(Path(out_dir).glob("step_*.tmp")) + sorted(Path(out_dir).glob("final.tmp"))


def remove_partial_saves(out_dir):
    for folder in partial_saves(out_dir):
        shutil.rmtree(folder, ignore_errors=True)
        print0(f"removed {folder}, left by a save that was interrupted")


def newest_checkpoint(out_dir):
    """The newest complete step checkpoint in out_dir, or None (sizes checked, not CRCs)."""
    complete = [f for _, f in step_checkpoints(out_dir) if checkpoint_problem(f) is None]
    return complete[-1] if complete else None


def find_resume(resume, out_dir):
    """The checkpoint folder to continue from (resume: "", "auto" or a folder); None to start at step 0.

    Collective (every rank calls it): the candidates are checked against their CRCs, the ranks sharing the
    reading. auto takes the newest that verifies, naming each one skipped and why.
    """
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
        problems = usable(folder)
        if not problems:
            return folder
        print0(f"resume: skipping {folder}: {'; '.join(problems)}")
        set_aside(folder)
    if (out_dir / "metrics.jsonl").exists():
        print0(f"resume: no usable checkpoint in {out_dir}; starting again from step 0")
    return None


def set_aside(folder):
    """Collective: rename a checkpoint that cannot be resumed to step_N.damaged (kept for a look, never taken
    for a checkpoint again), so that the run can write step_N anew and prune never counts it."""
    if is_master():
        _move_aside(folder, ".damaged")
    dist.barrier()


def _move_aside(folder, suffix):
    """Rename step_N to step_N{suffix}, replacing an older one; only reported if it fails (it is skipped anyway)."""
    aside = folder.with_name(folder.name + suffix)
    try:
        shutil.rmtree(aside) if aside.is_dir() else aside.unlink(missing_ok=True)
        folder.rename(aside)
        print0(f"moved {folder} to {aside}")
    except OSError as e:
        print0(f"warning: cannot move {folder} aside ({e.strerror or e}); it stays, never resumed from")


def resume_state(folder, config, fingerprint, free):
    """The trainer state of checkpoint `folder` (None: a fresh run), after checking that this run may continue it.

    Refuses, naming each field, when a setting that decides the run's math changed (every key of
    `config` but those in `free`) or the data's fingerprint did. Only reads JSON: call it before
    loading any model.
    """
    if folder is None:
        return None
    state = read_state(folder)
    saved = state["config"]
    changed = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now" for k, v in sorted(config.items())
               if k not in free and saved.get(k) != v]
    if state["fingerprint"] != fingerprint:
        changed.append(f"data: {state['fingerprint']} in the checkpoint, {fingerprint} now")
    if changed:
        raise ResumeError(f"cannot resume from {folder}: settings that decide the run changed:\n  " +
                          "\n  ".join(changed) + "\n(restore them, or start a new run in another --out_dir)")
    return state


def restore(run, policy, optimizer, state):
    """Load the checkpoint run.resume_from (its trainer `state`): weights, optimizer state, random generators.
    Returns its step, or 0 for a fresh run (state None). Collective."""
    if state is None:
        return 0
    load_state(policy, optimizer, run.resume_from / "state")
    if state["world_size"] == run.world:
        set_rng_state(state["rng"][run.rank])
    else:  # the data order does not depend on the world size; only the per-rank generators do
        print0(f"resume: world size {state['world_size']} -> {run.world}: random generators start afresh")
    print0(f"resumed from {run.resume_from} at step {state['step']}")
    return state["step"]


def prune(out_dir, newest, keep_last):
    """After checkpoint `newest` completed: drop complete ones beyond the newest keep_last (0: keep all) and
    leftovers older than it (crashed saves' .tmp folders, damaged copies). Any newer than it were left by a
    run this one resumed before their step (another timeline): renamed step_N.abandoned, never resumed from."""
    complete = []
    for step, folder in step_checkpoints(out_dir):
        if step > newest:
            _move_aside(folder, ".abandoned")
        elif checkpoint_problem(folder) is None:
            complete.append(folder)
        elif step < newest:
            shutil.rmtree(folder)
    for folder in complete[: -keep_last] if keep_last else []:
        shutil.rmtree(folder)
    remove_partial_saves(out_dir)


# -----------------------------------------------------------------------------
# the reference log-prob cache (wrpo.py names it by a hash of everything it depends on)


def save_reference_logps(path, logps, metadata):
    """Write a [n_rows, 3] table of reference log-probs, with its CRC-32 for load_reference_logps;
    a cache that cannot be written is only reported."""
    metadata = {**metadata, "crc32": _tensor_crc32(logps)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: save_file({"logps": logps}, tmp, metadata=metadata), private=True)
        return True
    except (OSError, SafetensorError) as e:  # (safetensors reports a full disk as a SafetensorError)
        print0(f"reference log-probs: computed, not cached ({path.parent} not writable: {e})")
        return False


def load_reference_logps(path, n_rows):
    """The cached [n_rows, 3] table, or None (printed) when the file is damaged: unreadable, another shape,
    or values that do not match the CRC-32 stored with them. The caller then computes it again."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            logps = f.get_tensor("logps") if "logps" in f.keys() else None
    except (OSError, SafetensorError, ValueError) as e:
        problem = f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    else:
        want = [n_rows, 3]
        if logps is None:
            problem = "it has no 'logps' tensor"
        elif list(logps.shape) != want or logps.dtype != torch.float32:
            problem = f"holds {list(logps.shape)} {logps.dtype}, expected {want} float32"
        elif metadata.get("crc32") != _tensor_crc32(logps):
            problem = "its values do not match their CRC-32" if "crc32" in metadata else "it has no CRC-32"
        else:
            return logps
    print0(f"reference log-probs: {path} is damaged ({problem}); computing them again")
    return None


def _tensor_crc32(t):
    return f"{zlib.crc32(t.contiguous().numpy().tobytes()):08x}"
