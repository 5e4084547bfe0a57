"""Everything written to disk that a run must not lose: checkpoints, resuming, and the reference log-prob cache.

A step checkpoint is out_dir/step_NNNNNN/:
    model.safetensors, config.json, tokenizer files, train_config.json   Hugging Face weights (hf=True)
    state/                     fp32 master weights and AdamW state, one shard per rank (torch.distributed.checkpoint)
    trainer_state.json         step, settings, data fingerprint, every rank's random generators, the script's
                               own fields (meta) and every file with its size; written last: the completion marker
final/ is the Hugging Face folder alone. Every file and folder is written under a temporary name and renamed
when complete (write_atomic), so a crash at any point leaves the older ones as they were.
"""

import base64
import copy
import dataclasses
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, \
    set_state_dict
from torch.distributed.fsdp import FSDPModule

from fsdp_utils import DTYPES, is_master, print0

STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"step_(\d{6,})")


class ResumeError(ValueError):
    """A checkpoint this run cannot continue from (missing, incomplete, or from other settings); exit code 2."""


class RunFinished(Exception):
    """--resume=auto found the run in out_dir already finished: nothing to do (exit 0)."""


# -----------------------------------------------------------------------------
# atomic writes: a temporary name, then one rename


def write_atomic(path, write, collective=False):
    """Write `path`, a file or a folder, whole or not at all: under path.tmp, then renamed over `path`.

    write: the text, or a function that writes the temporary path. collective=True: every rank
    calls this, and write(tmp) with it (a sharded save); rank 0 alone clears and renames.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    owner = is_master() or not collective
    if owner and tmp.is_dir():  # left by a crash
        shutil.rmtree(tmp)
    elif owner:
        tmp.unlink(missing_ok=True)
    if collective:
        dist.barrier()
    if callable(write):
        write(tmp)
    else:
        tmp.write_text(write, encoding="utf-8")
    if collective:
        dist.barrier()
    if owner:
        if path.is_dir():  # a folder cannot be renamed over another: the old one goes first
            shutil.rmtree(path)
        os.replace(tmp, path)
    if collective:
        dist.barrier()
    return path


# -----------------------------------------------------------------------------
# Hugging Face weights: gathered on rank 0, written as safetensors


def write_hf_weights(model, folder, *, tokenizer=None, train_config=None, dtype=torch.bfloat16,
                     max_shard_bytes=5 * 2**30):
    """Gather the full state dict on rank 0 (CPU-offloaded) and write a Hugging Face checkpoint into `folder`.
    Collective: every rank must call it."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_master():
        folder = Path(folder)
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
    dist.barrier()


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
    save_hf_checkpoint(model, path, **export_settings(run, cfg, step))
    print0(f"saved {path}" + (f" ({skipped} non-finite steps skipped)" if skipped else ""))


# -----------------------------------------------------------------------------
# resumable state: sharded model and optimizer (torch.distributed.checkpoint), random generators


def save_state(model, optimizer, folder):
    """The fp32 master weights and AdamW state, each rank writing its own shards into `folder`. Collective.
    DCP files load on any number of ranks (they are resharded)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load_state(model, optimizer, folder):
    """Fill a sharded model and its optimizer from save_state's files. Collective."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
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
    as_tensor = lambda b: torch.frombuffer(bytearray(base64.b64decode(b)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(as_tensor(s["torch"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(as_tensor(s["cuda"]))


# -----------------------------------------------------------------------------
# step checkpoints: save, find, check, restore, prune


def save_checkpoint(run, cfg, policy, optimizer, step, meta, hf=True):
    """out_dir/step_NNNNNN: HF weights (hf=True) and the resumable state, written atomically. Collective.

    meta: the script's own fields for trainer_state.json (e.g. the data fingerprint). Uses run.out_dir,
    run.tokenizer, run.world, cfg.save_dtype and cfg.keep_last. Older complete checkpoints beyond
    keep_last are deleted only after this one is complete.
    """
    folder = run.out_dir / f"step_{step:06d}"
    if checkpoint_problem(folder) is None:  # saved already (a run resumed here and stopped at once)
        return folder

    def write(tmp):
        if hf:
            write_hf_weights(policy, tmp, **export_settings(run, cfg, step))
        save_state(policy, optimizer, tmp / "state")
        rngs = [None] * run.world
        dist.all_gather_object(rngs, rng_state())
        if is_master():  # the completion marker, last: it lists every file written before it
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            state = {"step": step, "world_size": run.world, "config": dataclasses.asdict(cfg), "rng": rngs,
                     "files": files, **meta}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")

    write_atomic(folder, write, collective=True)  # an incomplete folder under this name (a damaged copy) is replaced
    if is_master():
        prune(run.out_dir, step, cfg.keep_last)
        print0(f"saved {folder}" + ("" if hf else " (resumable state only)"))
    dist.barrier()
    return folder


def checkpoint_problem(folder):
    """None for a complete checkpoint folder, else why it is not one."""
    state_file = Path(folder) / STATE_FILE
    if not state_file.is_file():
        return f"no {STATE_FILE} (the save did not finish)"
    try:
        state = json.loads(state_file.read_text())
        files = state["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {STATE_FILE}"
    for name, size in files.items():
        f = Path(folder) / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{name} is missing or truncated"
    return None


def step_checkpoints(out_dir):
    """[(step, folder)] of the step_NNNNNN folders in out_dir, oldest first (complete or not)."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("step_*") if (m := STEP_DIR.fullmatch(p.name))]
    return sorted(found) if Path(out_dir).is_dir() else []


def newest_checkpoint(out_dir):
    """The newest complete step checkpoint in out_dir, or None."""
    complete = [f for _, f in step_checkpoints(out_dir) if checkpoint_problem(f) is None]
    return complete[-1] if complete else None


def find_resume(resume, out_dir):
    """The checkpoint folder to continue from (resume: "", "auto" or a folder); None to start at step 0."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise ResumeError(f"--resume={resume}: no such checkpoint folder")
        problem = checkpoint_problem(path)
        if problem:
            raise ResumeError(f"--resume={resume}: not a complete checkpoint ({problem})")
        return path
    if (out_dir / "final").is_dir():
        raise RunFinished(f"the run in {out_dir} already finished ({out_dir / 'final'}); nothing to resume "
                          "(pass another --out_dir, or --overwrite=true to train again)")
    for step, folder in reversed(step_checkpoints(out_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        print0(f"resume: skipping {folder}: {problem}")
    if (out_dir / "metrics.jsonl").exists():
        print0(f"resume: no complete checkpoint in {out_dir}; starting again from step 0")
    return None


def resume_state(folder, config, fingerprint, free):
    """The trainer state of checkpoint `folder` (None: a fresh run), after checking that this run may continue it.

    Refuses, naming each field, when a setting that decides the run's math changed (every key of
    `config` but those in `free`) or the data's fingerprint did. Only reads JSON: call it before
    loading any model.
    """
    if folder is None:
        return None
    state = json.loads((folder / STATE_FILE).read_text())
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
    """After checkpoint `newest` completed: drop complete ones beyond the newest keep_last (0: keep all),
    and leftovers older than it (crashed saves' .tmp folders, damaged copies)."""
    complete = []
    for step, folder in step_checkpoints(out_dir):
        if checkpoint_problem(folder) is None:
            complete.append(folder)
        elif step < newest:
            shutil.rmtree(folder)
    for folder in complete[: -keep_last] if keep_last else []:
        shutil.rmtree(folder)
    for folder in Path(out_dir).glob("step_*.tmp"):
        shutil.rmtree(folder)


# -----------------------------------------------------------------------------
# the reference log-prob cache (wrpo.py names it by a hash of everything it depends on)


def save_reference_logps(path, logps, metadata):
    """Write a [n_rows, 3] table of reference log-probs; a cache that cannot be written is only reported."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: save_file({"logps": logps}, tmp, metadata=metadata))
        return True
    except OSError as e:
        print0(f"reference log-probs: computed, not cached ({path.parent} not writable: {e})")
        return False


def load_reference_logps(path):
    return load_file(path)["logps"]
