"""What sft.py and wrpo.py share: settings, run setup, the optimizer step, logging, checkpoints,
resuming, preemption and non-finite steps.

Each script keeps its own training loop, readable top to bottom; the pieces here are the ones
that would otherwise be written twice.
"""

import base64
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import data
from fsdp_utils import DTYPES, count_parameters, init_distributed, is_master, load_model, load_sharded_state, \
    print0, resolve_model_path, save_hf_checkpoint, save_sharded_state, write_hf_checkpoint
from logprobs import IMPLS, resolve_impl


@dataclass
class TrainConfig:
    """Settings both stages share; each script's Config adds its own (model, data, lr, ...)."""

    overwrite: bool = False  # replace the run already in out_dir (its metrics and step checkpoints)
    resume: str = ""  # auto: continue from the newest complete checkpoint in out_dir (if any); or a checkpoint folder
    trust_remote_code: bool = False  # only for models whose code you trust
    skip_invalid_rows: bool = False  # leave bad data rows out (counted) instead of stopping before training
    # optimisation
    warmup_ratio: float = 0.1  # fraction of optimizer steps of linear warmup, then cosine to 0
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    global_batch_size: int = 128  # examples per optimizer step = micro_batch_size * grad_accum * world
    micro_batch_size: int = 1  # examples per rank per forward pass
    epochs: int = 1
    max_steps: int = -1  # stop after this many optimizer steps (-1: run all epochs)
    seed: int = 42  # data order
    max_length: int = 2048  # tokens per sequence
    # systems
    dtype: str = "bfloat16"  # compute dtype under FSDP mixed precision; master weights stay fp32
    activation_checkpointing: str = "auto"  # auto: on with CUDA (as in the paper), off on CPU
    attn_implementation: str = "packed_sdpa"  # attention.py: sdpa per packed sequence; or sdpa, eager, ...
    logprobs: str = "auto"  # label log-prob path: auto (triton on CUDA, else chunked), chunked, triton, naive
    compile: bool = False  # torch.compile each decoder layer: faster GPU steps after a compile of minutes
    # logging and checkpoints
    log_every: int = 10  # print a line every N steps (metrics.jsonl gets every step)
    eval_every: int = 0  # held-out evaluation every N steps (0: only before and after training)
    save_every: int = 0  # checkpoint every N steps: HF weights + resumable state (0: only at the end and on SIGTERM)
    keep_last: int = 2  # step checkpoints kept, newest first (0: all); final/ is always kept
    save_dtype: str = "bfloat16"  # dtype of saved weights
    nonfinite: str = "stop"  # non-finite loss or gradient norm: stop (naming the step and rows) or skip the step


class ConfigError(ValueError):
    """A user-facing problem with settings, paths or the output folder."""


def parse_config(cls, argv):
    """`--config=file.json` first, then `--key=value` overrides, each checked against the field type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}

    def convert(key, raw, source):
        if key not in fields:
            raise ConfigError(f"{source}: unknown setting '{key}' (valid: {', '.join(fields)})")
        want = fields[key].type
        if isinstance(raw, str) and want is not str:
            low = raw.lower()
            if want is bool and low in ("true", "false", "1", "0", "yes", "no"):
                return low in ("true", "1", "yes")
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                raise ConfigError(f"{source}: {key} must be {want.__name__}, got {raw!r}") from None
        if want is float and isinstance(raw, int) and not isinstance(raw, bool):
            raw = float(raw)
        if type(raw) is not want:
            raise ConfigError(f"{source}: {key} must be {want.__name__}, got {raw!r}")
        return raw

    for arg in argv:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
            try:
                loaded = json.loads(Path(path).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"--config={path}: cannot read JSON config: {e}") from None
            values.update({k: convert(k, v, path) for k, v in loaded.items()})
    for arg in argv:
        if arg.startswith("--config="):
            continue
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"expected --key=value, got '{arg}'")
        key, raw = arg[2:].split("=", 1)
        values[key] = convert(key, raw, "command line")
    return cls(**values)


def config_problems(cfg, world):
    """Problems with the shared settings; each script adds its own."""
    problems = []
    if cfg.lr <= 0 or not 0 <= cfg.warmup_ratio < 1:
        problems.append(f"need lr > 0 and 0 <= warmup_ratio < 1, got {cfg.lr}, {cfg.warmup_ratio}")
    if cfg.micro_batch_size < 1 or cfg.global_batch_size % (cfg.micro_batch_size * world):
        problems.append(f"global_batch_size {cfg.global_batch_size} must be a multiple of micro_batch_size "
                        f"{cfg.micro_batch_size} x world size {world}")
    for key in ("epochs", "max_length", "log_every"):
        if getattr(cfg, key) < 1:
            problems.append(f"{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("eval_every", "save_every", "keep_last", "grad_clip", "weight_decay"):
        if getattr(cfg, key) < 0:
            problems.append(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        problems.append(f"max_steps must be -1 (all epochs) or >= 1, got {cfg.max_steps}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            problems.append(f"{key} must be in [0, 1), got {getattr(cfg, key)}")
    for key in ("dtype", "save_dtype"):
        if getattr(cfg, key) not in DTYPES:
            problems.append(f"{key} must be one of {', '.join(DTYPES)}, got '{getattr(cfg, key)}'")
    if cfg.logprobs not in IMPLS:
        problems.append(f"logprobs must be one of {', '.join(IMPLS)}, got '{cfg.logprobs}'")
    if cfg.activation_checkpointing not in ("auto", "true", "false"):
        problems.append(f"activation_checkpointing must be auto, true or false, got '{cfg.activation_checkpointing}'")
    if cfg.nonfinite not in ("stop", "skip"):
        problems.append(f"nonfinite must be 'stop' or 'skip', got '{cfg.nonfinite}'")
    if cfg.resume and cfg.overwrite:
        problems.append("resume and overwrite exclude each other: continue the run, or replace it")
    return problems


def get_lr(step, total_steps, lr, warmup_ratio):
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to 0.

    Same curve as the Hugging Face cosine schedule the paper's runs used: 0 at step 0,
    `lr` at the end of warmup, 0 at step `total_steps` (just after the last update).
    """
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -----------------------------------------------------------------------------
# run setup


@dataclass
class Run:
    rank: int
    world: int
    device: torch.device
    mesh: object
    out_dir: Path
    model_path: str  # resolved local folder of cfg.model
    tokenizer: object
    pad_id: int
    resume_from: Path = None  # the checkpoint this run continues from, if any
    n_params: int = 0  # of the trained model, for MFU


class RunFinished(Exception):
    """--resume=auto found the run in out_dir already finished: nothing to do (exit 0)."""


def start_run(cfg, problems=()):
    """Process group, settings, output folder, checkpoint to resume, model path and tokenizer.

    Runs before any data is read, so every user error surfaces in seconds; nothing is written yet.
    """
    rank, world, device, mesh = init_distributed()
    problems = list(problems) + config_problems(cfg, world)
    if problems:
        raise ConfigError("bad config:\n  " + "\n  ".join(problems))
    out_dir = Path(cfg.out_dir)
    resume_from = find_resume(cfg, out_dir)
    if (out_dir / "metrics.jsonl").exists() and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"out_dir {out_dir} already holds a run; pass --resume=auto to continue it, another "
                          "--out_dir, or --overwrite=true to replace it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError("permission denied")
    except OSError as e:
        raise ConfigError(f"out_dir {out_dir} is not writable: {e}") from None
    model_path = resolve(cfg.model)
    check_free_space(out_dir, model_path, cfg)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Run(rank, world, device, mesh, out_dir, model_path, tokenizer, pad_id, resume_from)


def check_free_space(out_dir, model_path, cfg):
    """Refuse to start when out_dir cannot hold one checkpoint and the final weights; warn when it
    cannot hold keep_last + 1 checkpoints (the newest are written before the oldest go)."""
    try:
        params = count_parameters(model_path)
    except Exception as e:  # no safetensors files, or a damaged header: say so before any data is read
        raise ConfigError(f"model error: {model_path}: cannot read its safetensors weights ({e})") from None
    save_bytes = DTYPES[cfg.save_dtype].itemsize
    # resumable state: fp32 master weights and AdamW's two fp32 moments; plus the HF weights
    checkpoint = params * (12 + save_bytes)
    need = checkpoint + params * save_bytes  # one checkpoint (at least on SIGTERM) and final/
    free = shutil.disk_usage(out_dir).free
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    if free < need:
        raise ConfigError(f"out_dir {out_dir} has {gib(free)} free; this model ({params / 1e6:.1f}M parameters) "
                          f"needs about {gib(need)}: one resumable checkpoint ({gib(checkpoint)}: fp32 weights and "
                          f"AdamW state, and {cfg.save_dtype} weights) and the final weights")
    if cfg.save_every and cfg.keep_last and free < (cfg.keep_last + 1) * checkpoint + params * save_bytes:
        print0(f"warning: out_dir {out_dir} has {gib(free)} free; keep_last={cfg.keep_last} checkpoints of "
               f"{gib(checkpoint)} each may not fit")


def resolve(path):
    try:
        return resolve_model_path(path)
    except OSError as e:
        raise ConfigError(f"model error: {e}") from None


def total_steps_for(n_examples, cfg, what):
    steps = n_examples // cfg.global_batch_size * cfg.epochs
    if steps == 0:
        raise data.DataError(f"{cfg.data} gives {n_examples} {what}, fewer than global_batch_size "
                             f"{cfg.global_batch_size}")
    return min(steps, cfg.max_steps) if cfg.max_steps > 0 else steps


def write_run_config(run, cfg):
    """Record the resolved settings once the data has validated; --overwrite drops the old run's
    step checkpoints here, so that --resume=auto can never pick one of them up."""
    dist.barrier()  # every rank has checked out_dir before rank 0 writes into it
    if is_master():
        if cfg.overwrite:
            for _, folder in step_checkpoints(run.out_dir):
                shutil.rmtree(folder)
        write_atomic(run.out_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def load_policy(run, cfg):
    """The trained model (sharded, fp32 master weights) and its AdamW optimizer."""
    checkpointing = cfg.activation_checkpointing == "true" or (
        cfg.activation_checkpointing == "auto" and run.device.type == "cuda")
    policy = load_model(run.model_path, run.mesh, run.device, DTYPES[cfg.dtype], trainable=True,
                        activation_checkpointing=checkpointing, trust_remote_code=cfg.trust_remote_code,
                        attn_implementation=cfg.attn_implementation, logprobs=cfg.logprobs, compile=cfg.compile)
    # foreach: one kernel per op over all parameters (torch picks it on CUDA, not on CPU)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, foreach=True)
    run.n_params = n_params = sum(p.numel() for p in policy.parameters())
    print0(f"policy: {n_params / 1e6:.2f}M parameters, compute {cfg.dtype}, "
           f"activation checkpointing {'on' if checkpointing else 'off'}, "
           f"log-probs {resolve_impl(cfg.logprobs, run.device)}")
    return policy, optimizer


# -----------------------------------------------------------------------------
# the pieces of one optimizer step


def training_steps(n_examples, cfg, run, total_steps, start=0):
    """Yield (step, epoch, this rank's micro-batches of example indices) for every optimizer step
    from `start` on: the order is a function of the seed and the step, so a resumed run sees the
    rows it would have seen."""
    step = 0
    for epoch in range(cfg.epochs):
        for micro_batches in data.step_batches(n_examples, epoch=epoch, seed=cfg.seed,
                                               global_batch=cfg.global_batch_size, micro_batch=cfg.micro_batch_size,
                                               rank=run.rank, world=run.world):
            if step >= total_steps:
                return
            if step >= start:
                yield step, epoch, micro_batches
            step += 1


def eval_batches(n_items, micro_batch, run):
    """This rank's share of n held-out items, in micro-batches of (indices, weights [B]).

    Every rank yields the same number of micro-batches (FSDP's collectives need it); ranks short
    of items repeat item 0 with weight 0.
    """
    per_rank = math.ceil(n_items / run.world)
    for start in range(0, per_rank, micro_batch):
        idx = [run.rank * per_rank + start + j for j in range(min(micro_batch, per_rank - start))]
        weight = torch.tensor([float(i < n_items) for i in idx], device=run.device)
        yield [i if i < n_items else 0 for i in idx], weight


def same_count_on_all_ranks(batches, run):
    """Split the largest micro-batches until every rank has as many as the rank with the most.

    FSDP gathers parameters in every forward pass, so all ranks must run the same number of
    them. Ranks hold equally many rows, so splitting down to one row each always suffices.
    """
    most = torch.tensor(len(batches), device=run.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    batches = list(batches)
    while len(batches) < most.item():
        big = batches.pop(max(range(len(batches)), key=lambda i: len(batches[i])))
        batches += [big[: len(big) // 2], big[len(big) // 2 :]]
    return batches


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def global_sum(x, device):
    t = torch.tensor(float(x), device=device)
    dist.all_reduce(t)
    return t.item()


class MetricSum:
    """Weighted sums of per-example metrics over micro-batches, then over ranks with one all_reduce."""

    def __init__(self):
        self.sums, self.weight = {}, 0.0

    def add(self, metrics, weight):
        """metrics: name -> [B] tensor; weight: [B] (1 per row, tokens per sequence, 0 for padding rows)."""
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.float() * weight).sum()
        self.weight = self.weight + weight.sum()

    def mean(self):
        keys = sorted(self.sums)
        t = torch.stack([self.sums[k] for k in keys] + [torch.as_tensor(self.weight).float()])
        dist.all_reduce(t)
        return {k: (t[i] / t[-1]).item() for i, k in enumerate(keys)}


# -----------------------------------------------------------------------------
# logging and checkpoints


class StepLogger:
    """Rank 0: one JSONL row per optimizer step, a tqdm bar on a terminal, a line every `log_every` steps.

    fields: (metric key, label, format) shown in the bar and the printed line. A resumed run
    (start > 0) keeps the rows of its first `start` steps and appends after them.
    """

    def __init__(self, run, cfg, total_steps, desc, fields, start=0):
        self.cfg, self.total, self.fields, self.start = cfg, total_steps, fields, start
        self.file = self.bar = None
        self.t_start = self.t_last = time.time()
        if is_master():
            from tqdm import tqdm

            path = run.out_dir / "metrics.jsonl"
            kept = []
            if start and path.exists():  # rows past the checkpoint were never saved: drop them
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= start]
            write_atomic(path, "".join(line + "\n" for line in kept))
            self.file = open(path, "a")
            # a live bar on a terminal; in a log file only the `log_every` lines
            self.bar = tqdm(total=total_steps, initial=start, desc=desc, dynamic_ncols=True,
                            disable=not sys.stderr.isatty())

    def log(self, m):
        if "lr" in m:
            self.t_last = time.time()
        if self.file is None:
            return
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        if "step" not in m or "lr" not in m:  # an evaluation-only row
            return
        self.bar.update(1)
        self.bar.set_postfix({label: format(m[key], fmt) for key, label, fmt in self.fields if key in m})
        if m["step"] % self.cfg.log_every == 0 or m["step"] == self.total:
            parts = [f"{label} {m[key]:{fmt}}" for key, label, fmt in self.fields if key in m]
            self.bar.write(f"step {m['step']}/{self.total} | " + " | ".join(parts))

    def close(self):
        if self.file is not None:
            self.bar.close()
            self.file.close()
            print0(f"trained steps {self.start + 1}-{self.total} in {self.t_last - self.t_start:.1f}s"
                   if self.start else f"trained {self.total} steps in {self.t_last - self.t_start:.1f}s")


def write_atomic(path, text):
    """Write a text file under a temporary name, then rename it: never a half-written file."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# dense bf16 peak FLOP/s by device name, for MFU
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory_gib(device):
    """This rank's peak so far: allocated GPU memory, or the CPU process's resident-set high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines() if Path("/proc/self/status").exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def throughput(tokens, t0, run, computed=None):
    """Tokens per second over all ranks since t0, the step time, and on GPU the MFU.

    MFU = 6 x parameters x computed tokens/s over the devices' peak bf16 rate: the trained
    model's forward and backward only (recomputation and the reference's forward are not
    counted). `computed` is the tokens the model ran when fewer than `tokens` (shared prompts).
    """
    total = global_sum(tokens, run.device)
    dt = time.time() - t0
    out = {"tokens_per_s": total / dt, "step_time_s": dt, "peak_memory_gib": peak_memory_gib(run.device)}
    peak = peak_flops(run.device)
    if peak and run.n_params:
        ran = total if computed is None else global_sum(computed, run.device)
        out["mfu"] = 6 * run.n_params * ran / dt / (peak * run.world)
    return out


# -----------------------------------------------------------------------------
# checkpoints: out_dir/step_NNNNNN = HF weights + resumable state, complete only with its marker

STATE_FILE = "trainer_state.json"  # written last: the completion marker, listing every file and its size
STEP_DIR = re.compile(r"step_(\d{6,})")
# settings a resumed run may change: they decide speed, logging and output, not the math of the run
# (`data` is compared by its tokenized rows instead of its path)
RESUME_FREE = {"resume", "overwrite", "out_dir", "data", "eval_data", "micro_batch_size", "max_tokens_per_micro_batch",
               "activation_checkpointing", "attn_implementation", "logprobs", "compile", "dtype", "log_every",
               "eval_every", "save_every", "keep_last", "save_dtype", "nonfinite", "skip_invalid_rows",
               "trust_remote_code", "ref_cache_dir", "ref_logps"}


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


def find_resume(cfg, out_dir):
    """The checkpoint folder to continue from (--resume), None to start at step 0."""
    if not cfg.resume:
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if not path.is_dir():
            raise ConfigError(f"--resume={cfg.resume}: no such checkpoint folder")
        problem = checkpoint_problem(path)
        if problem:
            raise ConfigError(f"--resume={cfg.resume}: not a complete checkpoint ({problem})")
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


def resume_state(run, cfg, fingerprint):
    """The checkpoint's trainer state, after checking that this run may continue it; None for a fresh run.

    Refuses (naming each field) when a setting that decides the run's math changed, or the data's
    tokenized rows did. Only reads JSON: call it before loading any model.
    """
    if run.resume_from is None:
        return None
    state = json.loads((run.resume_from / STATE_FILE).read_text())
    saved = state["config"]
    changed = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now" for k, v in dataclasses.asdict(cfg).items()
               if k not in RESUME_FREE and saved.get(k) != v]
    if state["fingerprint"] != fingerprint:
        changed.append(f"data: {state['fingerprint']} in the checkpoint, {fingerprint} now")
    if changed:
        raise ConfigError(f"cannot resume from {run.resume_from}: settings that decide the run changed:\n  " +
                          "\n  ".join(changed) + "\n(restore them, or start a new run in another --out_dir)")
    return state


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


def restore(run, policy, optimizer, state):
    """Load a checkpoint's weights, optimizer state and random generators; returns its step (0 if none)."""
    if state is None:
        return 0
    load_sharded_state(policy, optimizer, run.resume_from / "state")
    if state["world_size"] == run.world:
        set_rng_state(state["rng"][run.rank])
    else:  # the data order does not depend on the world size; only the per-rank generators do
        print0(f"resume: world size {state['world_size']} -> {run.world}: random generators start afresh")
    print0(f"resumed from {run.resume_from} at step {state['step']}")
    return state["step"]


def save_checkpoint(run, cfg, policy, optimizer, step, extra, hf=True):
    """out_dir/step_NNNNNN: HF weights (hf=True) and the resumable state, written atomically. Collective.

    Everything goes into step_NNNNNN.tmp: the HF files, the sharded model and optimizer state
    (state/, torch.distributed.checkpoint) and last trainer_state.json (step, settings, data
    fingerprint, random generators, every file with its size); then the folder is renamed. A
    crash at any point leaves the older checkpoints as they were. Older complete checkpoints
    beyond keep_last are deleted only after this one is complete.
    """
    final = run.out_dir / f"step_{step:06d}"
    if checkpoint_problem(final) is None:  # saved already (a run resumed here and stopped at once)
        return final
    tmp = final.with_name(final.name + ".tmp")
    if is_master() and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    if hf:
        write_hf_checkpoint(policy, tmp, tokenizer=run.tokenizer, dtype=DTYPES[cfg.save_dtype],
                            train_config={**dataclasses.asdict(cfg), "step": step, "world_size": run.world})
    save_sharded_state(policy, optimizer, tmp / "state")
    rngs = [None] * run.world
    dist.all_gather_object(rngs, rng_state())
    if is_master():
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        state = {"step": step, "world_size": run.world, "config": dataclasses.asdict(cfg), "rng": rngs,
                 "files": files, **extra}
        write_atomic(tmp / STATE_FILE, json.dumps(state, indent=1) + "\n")
        if final.exists():  # an incomplete folder under this name (a damaged copy): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(run.out_dir, step, cfg.keep_last)
        print0(f"saved {final}" + ("" if hf else " (resumable state only)"))
    dist.barrier()
    return final


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
# the guarded loop: optimizer steps that stop or skip on non-finite values, checkpoints, SIGTERM


class TrainingError(RuntimeError):
    """The run stopped on a fault (a non-finite loss or gradient norm); exit code 3."""


class Preempted(RuntimeError):
    """SIGTERM/SIGINT: the step finished and a checkpoint was saved; exit code 128 + signal."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


class RunGuard:
    """What stands between a long run and a lost one; both training loops use it.

    - step(): clip gradients, then update the weights only if the loss and the gradient norm
      are finite on every rank. Otherwise stop with the step and the rows of the micro-batches
      at fault (nonfinite=stop, weights untouched) or skip the step (nonfinite=skip, counted).
    - end_step(): log, evaluate and checkpoint every save_every steps; after SIGTERM or SIGINT
      (on any rank; all ranks agree) finish the step, save, and raise Preempted.
    Creating it starts the run: it loads the checkpoint's state when resuming (`state` from
    resume_state; `start` is then its step), else evaluates before training, and opens the
    metrics log. Used as a context manager around the loop: the signal handlers live as long as it.
    """

    def __init__(self, run, cfg, policy, optimizer, run_eval, total_steps, fingerprint, state, desc, log_fields):
        self.run, self.cfg, self.policy, self.optimizer = run, cfg, policy, optimizer
        self.run_eval, self.total_steps, self.fingerprint = run_eval, total_steps, fingerprint
        self.start = restore(run, policy, optimizer, state)  # 0 for a fresh run
        self.eval_before = state["eval_before"] if state else run_eval(0)  # kept in every checkpoint
        self.skipped = state["skipped_steps"] if state else 0
        self.logger = StepLogger(run, cfg, total_steps, desc, log_fields, self.start)
        self.signals, self.previous = [], {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _on_signal(self, signum, frame):
        self.signals.append(signum)
        if len(self.signals) == 1:
            print(f"rank {self.run.rank}: got {signal.Signals(signum).name}; saving after this step "
                  "(a third signal stops at once)", file=sys.stderr, flush=True)
        elif len(self.signals) >= 3:
            raise KeyboardInterrupt

    def step(self, step, loss, rows_and_losses):
        """Clip, check, update. loss: the step's mean loss over all ranks; rows_and_losses: this
        rank's (row names, per-row losses) per micro-batch. Returns the gradient norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip or float("inf"))
        norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        if math.isfinite(loss) and math.isfinite(norm):
            self.optimizer.step()
        else:
            self._nonfinite(step + 1, loss, norm, rows_and_losses)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _nonfinite(self, step, loss, norm, rows_and_losses):
        bad = [name for names, losses in rows_and_losses
               for name, x in zip(names, losses.float().reshape(len(names), -1)) if not torch.isfinite(x).all()]
        every = [name for names, _ in rows_and_losses for name in names]
        gathered = [None] * self.run.world
        dist.all_gather_object(gathered, bad or every)
        rows = [name for part in gathered for name in part]
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
        where = "rows with a non-finite loss" if not math.isfinite(loss) else "the step's rows"
        listed = ", ".join(rows[:20]) + (f" and {len(rows) - 20} more" if len(rows) > 20 else "")
        if self.cfg.nonfinite == "skip":
            self.skipped += 1
            print0(f"step {step}: {what}; step skipped (weights not updated; {self.skipped} skipped so far); "
                   f"{where}: {listed}")
            return
        newest = [f for _, f in step_checkpoints(self.run.out_dir) if checkpoint_problem(f) is None]
        raise TrainingError(f"step {step}: {what}; stopped without updating the weights. {where}: {listed}. "
                            f"Newest checkpoint: {newest[-1] if newest else 'none'}. Lower lr, check those rows, "
                            "or pass --nonfinite=skip to skip such steps")

    def end_step(self, m):
        """After optimizer step m["step"]: periodic evaluation, the metrics row, checkpoints, preemption."""
        cfg, step = self.cfg, m["step"]
        m["skipped_steps"] = self.skipped
        if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps:
            m.update(self.run_eval(step))
        self.logger.log(m)
        received = torch.tensor(float(self.signals[0] if self.signals else 0), device=self.run.device)
        dist.all_reduce(received, op=dist.ReduceOp.MAX)  # one rank's signal stops every rank
        if received.item():
            signum = int(received.item())
            path = self.save(step, hf=False)  # quick: a scheduler's grace period is short
            raise Preempted(f"stopped by {signal.Signals(signum).name} after step {step}; saved {path}. Rerun the "
                            "same command with --resume=auto to continue", signum)
        if cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps:
            self.save(step)

    def save(self, step, hf=True):
        extra = {"skipped_steps": self.skipped, "eval_before": self.eval_before, "fingerprint": self.fingerprint}
        return save_checkpoint(self.run, self.cfg, self.policy, self.optimizer, step, extra, hf)

    def finish(self):
        """Final evaluation (logged), then the final HF checkpoint; returns the evaluation's metrics."""
        final = self.run_eval(self.total_steps)
        if final:
            self.logger.log({"step": self.total_steps, **final})
        self.logger.close()
        path = self.run.out_dir / "final"
        save_hf_checkpoint(self.policy, path, tokenizer=self.run.tokenizer, dtype=DTYPES[self.cfg.save_dtype],
                           train_config={**dataclasses.asdict(self.cfg), "step": self.total_steps,
                                         "world_size": self.run.world})
        print0(f"saved {path}" + (f" ({self.skipped} non-finite steps skipped)" if self.skipped else ""))
        return final


def run_main(main):
    """Run a script's main. User errors exit 2, faults 3, preemption 128 + signal; one message, from rank 0."""
    quiet = os.environ.get("RANK", "0") != "0"
    try:
        main(sys.argv[1:])
    except (ConfigError, data.DataError) as e:
        quiet or print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunFinished as e:
        quiet or print(e)
    except TrainingError as e:
        quiet or print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except Preempted as e:
        quiet or print(e, file=sys.stderr)
        sys.exit(128 + e.signum)
