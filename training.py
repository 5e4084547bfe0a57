"""What sft.py and wrpo.py share, as plain functions: settings, starting a run, the learning-rate
schedule, the pieces of an optimizer step (clipping, the finiteness check, stop signals), metrics,
throughput and exit codes.

Each script's main holds its own loop and every decision in it; nothing here calls back into a script.
"""

import atexit
import ctypes
import dataclasses
import fcntl
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import attention
import data
from checkpoint import ResumeError, RunFinished, SaveError, find_resume, newest_checkpoint, partial_saves, \
    remove_partial_saves, step_checkpoints, write_atomic
from fsdp_utils import DTYPES, count_parameters, exit_process, init_distributed, is_master, load_model, \
    loading_problem, print0, resolve_model_path
from logps import IMPLS, attach_label_logps, resolve_impl


@dataclass
class TrainConfig:
    """Settings both stages share; each script's Config adds its own and sets its defaults."""

    model: str = "demo/model"  # the model to train: local folder or hub id
    data: str = "demo/data/train.jsonl"  # training rows: .jsonl, .json, .parquet or a folder of them
    eval_data: str = ""  # held-out rows, evaluated before and after training; empty = no evaluation
    data_cache_dir: str = ""  # where tokenized rows are cached, one file per data file and settings; empty = next
    # to the data. Each node's first process writes its own copy, which all its ranks memory-map
    out_dir: str = "out/run"  # metrics.jsonl, config.json and checkpoints go here
    overwrite: bool = False  # replace the run already in out_dir (its metrics and step checkpoints)
    resume: str = ""  # auto: continue from the newest complete checkpoint in out_dir (if any); or a checkpoint folder
    trust_remote_code: bool = False  # only for models whose code you trust
    skip_invalid_rows: bool = False  # leave bad data rows out (counted) instead of stopping before training
    allow_special_tokens: bool = False  # text holding the tokenizer's special tokens (<|eot_id|>, ...) keeps them
    # as control tokens; by default such a row is a bad row, as it would forge chat turns
    # optimisation
    lr: float = 1e-6  # peak learning rate (AdamW)
    warmup_ratio: float = 0.1  # fraction of optimizer steps of linear warmup, then cosine to 0
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    global_batch_size: int = 128  # examples per optimizer step = micro_batch_size * grad_accum * world
    micro_batch_size: int = 1  # examples per rank per forward pass (WRPO's packing: per evaluation pass only)
    epochs: int = 1
    max_steps: int = -1  # stop after this many optimizer steps (-1: run all epochs)
    seed: int = 42  # data order
    max_length: int = 2048  # tokens per sequence
    # systems
    dtype: str = "bfloat16"  # compute dtype under FSDP mixed precision; master weights stay fp32
    activation_checkpointing: str = "auto"  # auto: on with CUDA (as in the paper), off on CPU
    attn_implementation: str = "auto"  # auto: packed_sdpa (attention.py) where the model takes it, else sdpa or
    # eager, said at start; or any name transformers knows
    logps_impl: str = "auto"  # label log-probs path: auto (triton on CUDA, else chunked), chunked, triton, naive
    compile: bool = False  # torch.compile each decoder layer: faster GPU steps after a compile of minutes
    # logging and checkpoints
    log_every: int = 10  # print a line every N steps (metrics.jsonl gets every step)
    eval_every: int = 0  # held-out evaluation every N steps (0: only before and after training)
    save_every: int = 0  # checkpoint every N steps: HF weights + resumable state (0: only at the end and on SIGTERM)
    keep_last: int = 2  # step checkpoints kept, newest first (0: all); final/ is always kept
    save_dtype: str = "bfloat16"  # dtype of saved weights
    nonfinite: str = "stop"  # non-finite loss or gradient norm: stop (naming the step and rows) or skip the step


# settings a resumed run may change: they decide speed, logging and output, not the math of the run (`data` is
# compared by its tokenized rows instead of its path); each script adds its own
RESUME_FREE = {"resume", "overwrite", "out_dir", "data", "eval_data", "data_cache_dir", "micro_batch_size",
               "activation_checkpointing", "attn_implementation", "logps_impl", "compile", "dtype", "log_every",
               "eval_every", "save_every", "keep_last", "save_dtype", "nonfinite", "skip_invalid_rows",
               "allow_special_tokens", "trust_remote_code"}


RENAMED = {"logprobs": "logps_impl"}  # old setting names, to point a user's old config at the new one


class ConfigError(ValueError):
    """A user-facing problem with settings, paths or the output folder."""


def parse_config(cls, argv):
    """`--config=file.json` first, then `--key=value` overrides, each checked against the field type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}

    def convert(key, raw, source):
        if key not in fields:
            renamed = f" (renamed {RENAMED[key]})" if key in RENAMED else ""
            raise ConfigError(f"{source}: unknown setting '{key}'{renamed} (valid: {', '.join(fields)})")
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
        if want is float and not math.isfinite(raw):
            raise ConfigError(f"{source}: {key} must be a finite number, got {raw!r}")
        return raw

    for arg in argv:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
            if Path(path).exists() and not Path(path).is_file():  # a folder, or a FIFO that would never end
                raise ConfigError(f"--config={path}: not a regular file; give a JSON file of settings")
            try:
                loaded = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:  # unreadable, malformed JSON or not UTF-8
                raise ConfigError(f"--config={path}: cannot read JSON config: {e}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"--config={path}: must hold one JSON object of settings, "
                                  f"got {type(loaded).__name__}")
            values.update({k: convert(k, v, path) for k, v in loaded.items()})
    for arg in argv:
        if arg.startswith("--config="):
            continue
        if arg[2:] in fields and fields[arg[2:]].type is bool:
            arg += "=true"  # a bare --flag switches a true/false setting on
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
    if cfg.logps_impl not in IMPLS:
        problems.append(f"logps_impl must be one of {', '.join(IMPLS)}, got '{cfg.logps_impl}'")
    if cfg.activation_checkpointing not in ("auto", "true", "false"):
        problems.append(f"activation_checkpointing must be auto, true or false, got '{cfg.activation_checkpointing}'")
    if cfg.nonfinite not in ("stop", "skip"):
        problems.append(f"nonfinite must be 'stop' or 'skip', got '{cfg.nonfinite}'")
    if cfg.resume and cfg.overwrite:
        problems.append("resume and overwrite exclude each other: continue the run, or replace it")
    if not attention.known(cfg.attn_implementation):
        problems.append(f"attn_implementation '{cfg.attn_implementation}' is not one transformers knows "
                        f"({attention.NAME}, sdpa, eager, flex_attention, flash_attention_2, ...)")
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
# starting a run: everything checked before any data is read or anything written


@dataclass
class Run:
    """One training run: this process's place in it, the folder it writes, and what it starts from."""

    rank: int
    world: int
    device: torch.device
    mesh: object
    out_dir: Path
    model_path: str  # resolved local folder of cfg.model
    tokenizer: object
    pad_id: int
    resume_from: Path = None  # the checkpoint this run continues from, if any


def start_run(cfg, problems=(), other_models=()):
    """Process group, settings, the output folder (locked for this run), the checkpoint to resume, model path
    and tokenizer. other_models: more models the script loads (a reference), checked like cfg.model.

    Runs before any data is read, so every user error surfaces in seconds; nothing is written yet but
    out_dir itself and its lock file (and the leftovers of interrupted saves are removed).
    """
    rank, world, device, mesh = init_distributed()
    exit_with_launcher()
    problems = list(problems) + config_problems(cfg, world)
    if problems:
        raise ConfigError("bad config:\n  " + "\n  ".join(problems))
    out_dir = Path(cfg.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError("permission denied")
    except OSError as e:
        raise ConfigError(f"out_dir {out_dir} is not writable: {e}") from None
    lock_out_dir(out_dir)  # before anything in out_dir is read or changed: no second run writes beside this one
    resume_from = find_resume(cfg.resume, out_dir)
    if (out_dir / "metrics.jsonl").exists() and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"out_dir {out_dir} already holds a run; pass --resume=auto to continue it, another "
                          "--out_dir, or --overwrite=true to replace it")
    model_path = resolve_model(cfg.model)
    for path in [model_path] + [resolve_model(m) for m in other_models if m]:
        if problem := loading_problem(path, cfg.trust_remote_code):
            raise ConfigError(f"model error: {problem}")
    resolve_attention(cfg, model_path)
    on_rank0(lambda: check_free_space(out_dir, model_path, cfg))  # rank 0 decides for all: one answer
    on_rank0(lambda: remove_partial_saves(out_dir))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Run(rank, world, device, mesh, out_dir, model_path, tokenizer, pad_id, resume_from)


def resolve_attention(cfg, model_path):
    """cfg.attn_implementation "auto" made this model's (attention.choose, which says why when it is not
    packed_sdpa); and shared prompts, where cfg has them, off unless packing and packed_sdpa are both on."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    cfg.attn_implementation, note = attention.choose(cfg.attn_implementation, config, cfg.max_length)
    shared = getattr(cfg, "shared_prompt", False)
    if shared and not (cfg.packing and cfg.attn_implementation == attention.NAME):
        cfg.shared_prompt = False
        note += "; " if note else f"attention: {cfg.attn_implementation}; "
        note += "shared prompts are off (they need packing and packed_sdpa)"
    if note:
        print0(note)


LOCK_FILE = "run.lock"
_locks = {}  # out_dir -> the open lock file of a run in this process (tests run several in one process)


def on_rank0(fn):
    """Collective: fn() on rank 0 alone; a ConfigError or OSError it raises is raised on every rank (as a
    ConfigError), so that no rank waits for another in a collective after a failure only one saw."""
    error = None
    if is_master():
        try:
            fn()
        except (ConfigError, OSError) as e:
            error = str(e)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise ConfigError(box[0])


def lock_out_dir(out_dir):
    """Collective: rank 0 holds out_dir/run.lock until this process exits, and a second run into the same
    out_dir stops here, naming the holder. The lock is the kernel's (flock): it dies with its process however
    that ends, so a holder that was killed leaves only a stale file, which the next run takes over. (On NFS
    mounted with local locks, or Lustre without -o flock, it guards one node only.)"""
    path = (out_dir / LOCK_FILE).resolve()
    on_rank0(lambda: str(path) in _locks or _lock(path))  # (held already: a run before this one, in-process)


def _lock(path):
    """Take the lock on `path` for this process; ConfigError naming the holder when another process has it."""
    try:
        while True:
            f = open(path, "a+", encoding="utf-8", errors="replace")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "holder unknown"
                f.close()
                raise ConfigError(f"out_dir {path.parent} is in use by another run ({holder}); wait for it to end "
                                  "or stop it, or pass another --out_dir") from None
            except OSError as e:  # a file system without locks
                f.close()
                print0(f"warning: cannot lock {path} ({e.strerror}); nothing stops a second run into {path.parent}")
                return
            try:
                if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            f.close()  # its holder ended and removed it between our open and our lock: lock the new file
        f.seek(0)
        if stale := f.read().strip():
            print0(f"out_dir {path.parent}: taking over the lock of a run that ended without releasing it ({stale})")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(sys.argv)[:300]}\n")
        f.flush()
    except OSError as e:  # run.lock is a folder, or not ours to open
        raise OSError(f"cannot lock {path}: {e.strerror or e}") from None
    _locks[str(path)] = f


@atexit.register
def release_locks():
    """At exit (or after a run called in-process): remove each lock file, then let go of its lock (in this
    order, so that no other run ever locks a file about to disappear)."""
    while _locks:
        _, f = _locks.popitem()
        Path(f.name).unlink(missing_ok=True)
        f.close()


_launcher = None  # torchrun's pid, the parent of this worker


def exit_with_launcher():
    """Under torchrun: end this worker when its launcher dies (a scheduler's SIGKILL, say) rather than train on
    unsupervised beside a requeued run. On Linux the kernel sends SIGHUP then (the loop saves and exits as on
    preemption); elsewhere stop_requested notices the new parent pid at the next step."""
    global _launcher
    if "TORCHELASTIC_RUN_ID" not in os.environ or _launcher is not None:
        return
    _launcher = os.getppid()
    if sys.platform.startswith("linux"):  # (the kernel watches the thread that started us: torchrun's main one)
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGHUP)
        if os.getppid() != _launcher:  # it died before the call above
            os.kill(os.getpid(), signal.SIGHUP)


def launcher_gone():
    return _launcher is not None and os.getppid() != _launcher


def folder_bytes(folder):
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def human_bytes(n):
    """1.5 GiB, 12.0 MiB, 800 B: a unit that fits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def check_free_space(out_dir, model_path, cfg):
    """Refuse to start when out_dir cannot hold one checkpoint and the final weights; warn when it
    cannot hold keep_last + 1 checkpoints (the newest are written before the oldest go). The partial
    folders of interrupted saves count as free: the run removes them next (remove_partial_saves)."""
    try:
        params = count_parameters(model_path)
    except Exception as e:  # no safetensors files, or a damaged header: say so before any data is read
        raise ConfigError(f"model error: {model_path}: cannot read its safetensors weights ({e})") from None
    save_bytes = DTYPES[cfg.save_dtype].itemsize
    # resumable state: fp32 master weights and AdamW's two fp32 moments; plus the HF weights
    checkpoint = params * (12 + save_bytes)
    need = checkpoint + params * save_bytes  # one checkpoint (at least on SIGTERM) and final/
    leftovers = partial_saves(out_dir)
    reclaimable = sum(folder_bytes(f) for f in leftovers)
    free = shutil.disk_usage(out_dir).free + reclaimable
    note = f" (counting {human_bytes(reclaimable)} of interrupted saves, to be removed)" if leftovers else ""
    if free < need:
        raise ConfigError(f"out_dir {out_dir} has {human_bytes(free)} free{note}; this model ({params / 1e6:.1f}M "
                          f"parameters) needs about {human_bytes(need)}: one resumable checkpoint "
                          f"({human_bytes(checkpoint)}: fp32 weights and AdamW state, and {cfg.save_dtype} weights) "
                          "and the final weights")
    if cfg.save_every and cfg.keep_last and free < (cfg.keep_last + 1) * checkpoint + params * save_bytes:
        print0(f"warning: out_dir {out_dir} has {human_bytes(free)} free{note}; keep_last={cfg.keep_last} "
               f"checkpoints of {human_bytes(checkpoint)} each may not fit")


def resolve_model(path):
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
    checkpoints here (step ones and final/), so that --resume=auto can never pick one of them up."""
    def write():
        if cfg.overwrite:  # and final/: a rerun with --resume=auto must not take the old run for finished
            for folder in [f for _, f in step_checkpoints(run.out_dir)] + [run.out_dir / "final"]:
                shutil.rmtree(folder, ignore_errors=True)
        try:
            write_atomic(run.out_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        except OSError as e:
            raise OSError(f"cannot write {run.out_dir / 'config.json'}: {e.strerror or e}") from None

    on_rank0(write)  # (broadcast: every rank has checked out_dir before rank 0 writes into it)


def load_sharded_model(path, mesh, device, cfg, trainable):
    """The policy (trainable: fp32 master weights, activation checkpointing as set) or a frozen model,
    sharded over `mesh`, with cfg's attention and log-probs paths (attention.py, logps.py)."""
    attention.register()
    checkpointing = trainable and (cfg.activation_checkpointing == "true" or (
        cfg.activation_checkpointing == "auto" and device.type == "cuda"))
    uses_flash_varlen(cfg, device)  # on CUDA: the attention self-check, and its line, before the first batch
    model = load_model(path, mesh, device, DTYPES[cfg.dtype], trainable=trainable,
                       activation_checkpointing=checkpointing, trust_remote_code=cfg.trust_remote_code,
                       attn_implementation=cfg.attn_implementation, compile=cfg.compile and trainable)
    if trainable:
        print0(f"policy: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, compute {cfg.dtype}, "
               f"activation checkpointing {'on' if checkpointing else 'off'}, "
               f"log-probs {resolve_impl(cfg.logps_impl, device)}")
    return attach_label_logps(model, cfg.logps_impl)


# -----------------------------------------------------------------------------
# the pieces of an optimizer step


def every(n, step, total_steps):
    """Whether a periodic evaluation or save is due after `step`: every n steps (n = 0: never), but never after
    the last step, which the end of the run evaluates and saves anyway."""
    return n > 0 and step % n == 0 and step < total_steps


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def uses_flash_varlen(cfg, device):
    """Whether packed batches take attention's flash varlen path: packed_sdpa attention in half precision, on
    CUDA, once its self-check passed (attention.use_varlen, which prints which path runs)."""
    return cfg.attn_implementation == attention.NAME and cfg.dtype != "float32" and attention.use_varlen(device)


def collated(batch, cfg, device):
    """A collated batch on `device`; a packed one (position ids) with the varlen path's layout, computed here
    on the host so that no layer waits for it (attention.varlen_layout)."""
    if "position_ids" in batch and uses_flash_varlen(cfg, device):
        batch.update(attention.varlen_layout(batch["position_ids"]))
    return to_device(batch, device)


def clip_grad_norm(model, max_norm):
    """Clip the gradients to a global norm of max_norm (0: no clipping); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


class TrainingError(RuntimeError):
    """The run stopped on a fault (a non-finite loss or gradient norm); exit code 3."""


def nonfinite_step(step, loss, grad_norm, seen, run, cfg, skipped):
    """A step whose loss or gradient norm is not finite (both are global: every rank gets here).

    Names the rows at fault (seen: this rank's (row names, per-row losses) per micro-batch; those
    with a non-finite loss, else all of the step's). nonfinite=stop raises TrainingError before the
    weights change; nonfinite=skip prints them and returns the new count of skipped steps.
    """
    bad = [name for names, losses in seen
           for name, x in zip(names, losses.float().reshape(len(names), -1)) if not torch.isfinite(x).all()]
    gathered = [None] * run.world
    dist.all_gather_object(gathered, bad or [name for names, _ in seen for name in names])
    rows = [name for part in gathered for name in part]
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    where = "rows with a non-finite loss" if not math.isfinite(loss) else "the step's rows"
    listed = ", ".join(rows[:20]) + (f" and {len(rows) - 20} more" if len(rows) > 20 else "")
    if cfg.nonfinite == "skip":
        print0(f"step {step}: {what}; step skipped (weights not updated; {skipped + 1} skipped so far); "
               f"{where}: {listed}")
        return skipped + 1
    raise TrainingError(f"step {step}: {what}; stopped without updating the weights. {where}: {listed}. "
                        f"Newest checkpoint: {newest_checkpoint(run.out_dir) or 'none'}. Lower lr, check those "
                        "rows, or pass --nonfinite=skip to skip such steps")


class Preempted(RuntimeError):
    """SIGTERM/SIGINT/SIGHUP: the step finished and a checkpoint was saved; exit code 128 + signal."""

    def __init__(self, signum, step, path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; saved {path}. Rerun the "
                         "same command with --resume=auto to continue")
        self.signum = signum


@contextmanager
def stop_signals(rank):
    """While inside, SIGTERM, SIGINT and SIGHUP (the launcher died) are recorded instead of stopping the
    process, so that the loop can finish its step and save (stop_requested); a third signal stops at once.
    Yields the list of signals received."""
    received, previous = [], {}

    def on_signal(signum, frame):
        if signum == signal.SIGHUP and signum in received:
            return  # the launcher's death can arrive once per thread of the dying launcher: one is enough
        received.append(signum)
        if len(received) == 1:
            print(f"rank {rank}: got {signal.Signals(signum).name}; saving after this step "
                  "(a third signal stops at once)", file=sys.stderr, flush=True)
        elif len([s for s in received if s != signal.SIGHUP]) >= 3:  # a user insisting, not the launcher
            raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_requested(received, device):
    """The signal number if any rank received SIGTERM, SIGINT or SIGHUP (its launcher died), else 0:
    collective, so all ranks stop together."""
    if not received and launcher_gone():  # the kernel's SIGHUP covers Linux; this, everywhere else
        if os.environ.get("LOCAL_RANK") == "0":
            print(f"the launcher (pid {_launcher}) is gone; saving after this step", file=sys.stderr, flush=True)
        received.append(signal.SIGHUP)
    signum = torch.tensor(float(received[0] if received else 0), device=device)
    dist.all_reduce(signum, op=dist.ReduceOp.MAX)
    return int(signum.item())


# -----------------------------------------------------------------------------
# metrics, logging and throughput


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


def kept_metrics(path, start):
    """The lines of metrics.jsonl up to step `start` (a resumed run's checkpoint). Rows past it were never saved,
    and a line that is not a JSON row (torn by a crash mid-append) is dropped, with a note."""
    kept, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
            step = row.get("step", 0)
        except (ValueError, AttributeError):  # malformed, or JSON but not an object
            torn += bool(line.strip())
            continue
        if type(step) is int and step <= start:
            kept.append(line)
    if torn:
        print0(f"{path}: dropped {torn} unreadable line(s), left by a crash while writing")
    return kept


class MetricsLog:
    """Rank 0: one JSONL row per optimizer step, a tqdm bar on a terminal, a line every `log_every` steps.

    fields: (metric key, label, format) shown in the bar and the printed line. A resumed run
    (start > 0) keeps the rows of its first `start` steps and appends after them.
    """

    def __init__(self, run, total_steps, start, log_every, desc, fields):
        self.total, self.start, self.log_every, self.fields = total_steps, start, log_every, fields
        self.file = self.bar = self.write_error = None
        self.t_start = self.t_last = time.time()
        on_rank0(lambda: self._open(run.out_dir / "metrics.jsonl", desc))

    def _open(self, path, desc):
        from tqdm import tqdm

        kept = kept_metrics(path, self.start) if self.start else []
        try:
            write_atomic(path, "".join(line + "\n" for line in kept))
            self.file = open(path, "a")
        except OSError as e:
            raise OSError(f"cannot write {path}: {e.strerror or e}") from None
        # a live bar on a terminal; in a log file only the `log_every` lines
        self.bar = tqdm(total=self.total, initial=self.start, desc=desc, dynamic_ncols=True,
                        disable=not sys.stderr.isatty())

    def log(self, m):
        if "lr" in m:
            self.t_last = time.time()
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(m) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: train on (the next checkpoint save stops cleanly if it persists)
            if self.write_error is None:
                print0(f"warning: cannot write {self.file.name} ({e.strerror or e}); its rows are lost until it can")
            self.write_error = e
        if "step" not in m or "lr" not in m:  # an evaluation-only row
            return
        self.bar.update(1)
        self.bar.set_postfix({label: format(m[key], fmt) for key, label, fmt in self.fields if key in m})
        if m["step"] % self.log_every == 0 or m["step"] == self.total:
            parts = [f"{label} {m[key]:{fmt}}" for key, label, fmt in self.fields if key in m]
            self.bar.write(f"step {m['step']}/{self.total} | " + " | ".join(parts))

    def close(self, final_eval=None):
        """Write the final evaluation's row (if any) and the run's time."""
        if final_eval:
            self.log({"step": self.total, **final_eval})
        if self.file is not None:
            self.bar.close()
            self.file.close()
            print0(f"trained steps {self.start + 1}-{self.total} in {self.t_last - self.t_start:.1f}s"
                   if self.start else f"trained {self.total} steps in {self.t_last - self.t_start:.1f}s")


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


def throughput(tokens, t0, run, model, computed=None):
    """Tokens per second over all ranks since t0, the step time, and on GPU the MFU.

    MFU = 6 x parameters x computed tokens/s over the devices' peak bf16 rate: the trained
    model's forward and backward only (recomputation and the reference's forward are not
    counted). `computed` is the tokens the model ran when fewer than `tokens` (shared prompts).
    """
    total = global_sum(tokens, run.device)
    dt = time.time() - t0
    out = {"tokens_per_s": total / dt, "step_time_s": dt, "peak_memory_gib": peak_memory_gib(run.device)}
    peak = peak_flops(run.device)
    if peak:
        ran = total if computed is None else global_sum(computed, run.device)
        n_params = sum(p.numel() for p in model.parameters())
        out["mfu"] = 6 * n_params * ran / dt / (peak * run.world)
    return out


def cli(main):
    """Run a script's main on the command line. User errors exit 2, faults 3, preemption 128 + signal;
    one message, from rank 0."""
    quiet = os.environ.get("RANK", "0") != "0"

    def report(message, code, out=sys.stderr):
        # torchrun sends SIGTERM to the others as soon as one worker exits: rank 0 finishes its message first
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        quiet or print(message, file=out, flush=True)
        return code

    try:
        main(sys.argv[1:])
        code = 0
    except (ConfigError, ResumeError, data.DataError) as e:
        code = report(f"error: {e}", 2)
    except RunFinished as e:
        code = report(str(e), 0, sys.stdout)
    except (TrainingError, SaveError) as e:
        code = report(f"error: {e}", 3)
    except Preempted as e:
        code = report(str(e), 128 + e.signum)
    if code:
        sys.exit(code)  # an error: through the interpreter's teardown (see exit_process)
    exit_process(0)
