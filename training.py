"""What sft.py and wrpo.py share to train: settings, the learning-rate schedule, the pieces of an optimizer step
(clipping, the finiteness check), metrics (sums over ranks, metrics.jsonl, throughput) and rows through the token
cache (load_cached). Each script's main holds its own loop and every decision in it; nothing here calls back."""

import dataclasses
import hashlib
import importlib.util
import inspect
import json
import math
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import attention
import data
import tokens
from checkpoint import newest_checkpoint, write_atomic
from fsdp_utils import DTYPES, is_master, print0
from logps import IMPLS


@dataclass
class TrainConfig:
    """Settings both stages share; each script's Config adds its own and sets its defaults."""

    model: str = "demo/model"  # the model to train: local folder or hub id
    data: str = "demo/data/train.jsonl"  # training rows: .jsonl, .json, .parquet or a folder of them
    eval_data: str = ""  # held-out rows, evaluated before and after training; empty = no evaluation
    data_cache_dir: str = ""  # where tokenized rows are cached, one file per data file and settings; empty: by the data
    out_dir: str = "out/run"  # metrics.jsonl, config.json and checkpoints go here
    overwrite: bool = False  # replace the run already in out_dir (its metrics and step checkpoints)
    resume: str = ""  # auto: continue from the newest complete checkpoint in out_dir (if any); or a checkpoint folder
    trust_remote_code: bool = False  # only for models whose code you trust
    skip_invalid_rows: bool = False  # leave bad data rows out (counted) instead of stopping before training
    allow_special_tokens: bool = False  # text's special tokens (<|eot_id|>, ...) stay control tokens; else a bad row
    recipe: str = "default"  # default: this project's; authors: SLIT-AI/WRPO's trainers (README, "Differences from...")
    # optimisation
    lr: float = 1e-6  # peak learning rate (AdamW)
    warmup_ratio: float = 0.1  # fraction of optimizer steps of linear warmup, then cosine to 0
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    global_batch_size: int = 128  # examples per optimizer step, split evenly over the ranks
    micro_batch_size: int = 1  # examples per rank per forward pass (WRPO's packing: per evaluation pass only)
    epochs: int = 1
    max_steps: int = -1  # stop after this many optimizer steps (-1: run all epochs)
    seed: int = 42  # data order
    max_length: int = 2048  # tokens per sequence
    # systems
    dtype: str = "bfloat16"  # compute dtype under FSDP mixed precision; master weights stay fp32
    activation_checkpointing: str = "auto"  # auto: on with CUDA (as in the paper), off on CPU
    attn_implementation: str = "auto"  # auto: packed_sdpa where the model takes it, else sdpa or eager; or any HF name
    logps_impl: str = "auto"  # label log-probs path: auto (triton on CUDA, else chunked), chunked, triton, naive
    compile: bool = False  # torch.compile each decoder layer: faster GPU steps after a compile of minutes
    # logging and checkpoints
    log_every: int = 10  # print a line every N steps (metrics.jsonl gets every step)
    eval_every: int = 0  # held-out evaluation every N steps (0: only before and after training)
    save_every: int = 0  # checkpoint every N steps: HF weights + resumable state (0: only at the end and on SIGTERM)
    keep_last: int = 2  # step checkpoints kept, newest first (0: all); final/ is always kept
    save_dtype: str = "bfloat16"  # dtype of saved weights
    nonfinite: str = "stop"  # non-finite loss or gradient norm: stop (naming the step and rows) or skip the step
    wandb_project: str = ""  # also log metrics and settings to Weights & Biases (WANDB_MODE=offline: to files)
    wandb_run_name: str = ""  # its run's name (empty: wandb's); a resumed run continues its wandb run
    wandb_tags: str = ""  # comma-separated


# settings a resumed run may change: they decide speed, logging and output, not the math of the run (`data` is
# compared by its tokenized rows instead of its path, the models by their weights); each script adds its own
RESUME_FREE = {"resume", "overwrite", "out_dir", "model", "data", "eval_data", "data_cache_dir", "micro_batch_size",
               "activation_checkpointing", "attn_implementation", "logps_impl", "compile", "dtype", "log_every",
               "eval_every", "save_every", "keep_last", "save_dtype", "nonfinite", "skip_invalid_rows",
               "allow_special_tokens", "trust_remote_code", "wandb_project", "wandb_run_name", "wandb_tags"}


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
        if want is float and not math.isfinite(raw):
            raise ConfigError(f"{source}: {key} must be a finite number, got {raw!r}")
        return raw

    for arg in sorted(argv, key=lambda a: not a.startswith("--config=")):  # config files first, then overrides
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
    if cfg.global_batch_size < 1 or cfg.global_batch_size % world:  # every rank takes as many rows a step
        problems.append(f"global_batch_size {cfg.global_batch_size} must be a multiple of the world size {world}")
    least = {"micro_batch_size": 1, "epochs": 1, "max_length": 1, "log_every": 1, "eval_every": 0, "save_every": 0,
             "keep_last": 0, "grad_clip": 0, "weight_decay": 0}
    for key, low in least.items():
        if getattr(cfg, key) < low:
            problems.append(f"{key} must be >= {low}, got {getattr(cfg, key)}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        problems.append(f"max_steps must be -1 (all epochs) or >= 1, got {cfg.max_steps}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            problems.append(f"{key} must be in [0, 1), got {getattr(cfg, key)}")
    for key, valid in (("dtype", DTYPES), ("save_dtype", DTYPES), ("logps_impl", IMPLS),
                       ("recipe", ("default", "authors")), ("activation_checkpointing", ("auto", "true", "false"))):
        if getattr(cfg, key) not in valid:
            problems.append(f"{key} must be one of {', '.join(valid)}, got '{getattr(cfg, key)}'")
    if cfg.nonfinite not in ("stop", "skip"):
        problems.append(f"nonfinite must be 'stop' or 'skip', got '{cfg.nonfinite}'")
    if cfg.resume and cfg.overwrite:
        problems.append("resume and overwrite exclude each other: continue the run, or replace it")
    if cfg.wandb_project and importlib.util.find_spec("wandb") is None:
        problems.append("wandb_project needs wandb, which is not installed (pip install wandb)")
    if not attention.known(cfg.attn_implementation):
        problems.append(f"attn_implementation '{cfg.attn_implementation}' is not one transformers knows "
                        f"({attention.NAME}, sdpa, eager, flex_attention, flash_attention_2, ...)")
    return problems


def get_lr(step, total_steps, lr, warmup_ratio):
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to 0. The Hugging Face cosine
    schedule of the paper's runs: 0 at step 0, `lr` at the end of warmup, 0 at step `total_steps`."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def on_rank0(fn):
    """Collective: fn() on rank 0 alone; a ConfigError or OSError it raises is raised on every rank as a ConfigError,
    so that no rank waits in a collective for one that failed."""
    box = [None]  # rank 0's error, if any
    if is_master():
        try:
            fn()
        except (ConfigError, OSError) as e:
            box = [str(e)]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise ConfigError(box[0])


def total_steps_for(n_examples, cfg, what):
    steps = n_examples // cfg.global_batch_size * cfg.epochs
    if steps == 0:
        raise data.DataError(f"{cfg.data} gives {n_examples} {what}, fewer than global_batch_size "
                             f"{cfg.global_batch_size}")
    return min(steps, cfg.max_steps) if cfg.max_steps > 0 else steps


# --- the pieces of an optimizer step

def every(n, step, total_steps):
    """Whether a periodic evaluation or save is due after `step`: every n steps (n = 0: never), but not after the last
    step, which the end of the run evaluates and saves anyway."""
    return n > 0 and step % n == 0 and step < total_steps


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def clip_grad_norm(model, max_norm):
    """Clip the gradients to a global norm of max_norm (0: no clipping); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


class TrainingError(RuntimeError):
    """The run stopped on a fault (a non-finite loss or gradient norm); exit code 3."""


def nonfinite_step(step, loss, grad_norm, seen, run, cfg, skipped):
    """A step whose loss or gradient norm is not finite: names its rows at fault (seen: per micro-batch, this rank's row
    names and losses); stop raises TrainingError before the weights change, skip returns the new count of skips."""
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


# --- metrics, logging and throughput

def global_sum(x, device):
    t = torch.tensor(float(x), device=device)
    dist.all_reduce(t)
    return t.item()


class MetricSum:
    """Weighted sums of per-example metrics over micro-batches, then over ranks with one all_reduce; in float64, so that
    a mean of equal values is that value (step 1 of a run whose policy is its reference: loss ln 2, exactly)."""

    def __init__(self):
        self.sums, self.weight = {}, 0.0

    def add(self, metrics, weight):
        """metrics: name -> [B] tensor; weight: [B] (1 per row, tokens per sequence, 0 for padding rows)."""
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.double() * weight).sum()
        self.weight = self.weight + weight.sum()

    def mean(self):
        keys = sorted(self.sums)
        t = torch.stack([self.sums[k] for k in keys] + [torch.as_tensor(self.weight).double()])
        dist.all_reduce(t)
        return {k: (t[i] / t[-1]).item() for i, k in enumerate(keys)}


class MetricsLog:
    """Rank 0: one JSONL row per optimizer step, a tqdm bar on a terminal, a line every `log_every` steps, and with
    wandb_project the rows to wandb. fields: (metric key, label, format) shown in bar and line. A resumed run
    (start > 0) keeps its first `start` steps' rows."""

    def __init__(self, run, total_steps, start, log_every, desc, fields):
        self.total, self.start, self.log_every, self.fields = total_steps, start, log_every, fields
        self.file = self.bar = self.write_error = self.wandb = None
        self.t_start = self.t_last = time.time()
        on_rank0(lambda: self._open(run, desc))

    def _open(self, run, desc):
        """metrics.jsonl: a resumed run's rows up to its checkpoint's step kept (rows past it were never saved, and a
        line that is not a JSON row, torn by a crash mid-append, is dropped with a note), then opened to append."""
        from tqdm import tqdm

        path, kept, torn = run.out_dir / "metrics.jsonl", [], 0
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if self.start and path.exists() else []
        for line in lines:
            try:
                step = json.loads(line).get("step", 0)
            except (ValueError, AttributeError):  # malformed, or JSON but not an object
                torn += bool(line.strip())
                continue
            if type(step) is int and step <= self.start:
                kept.append(line)
        if torn:
            print0(f"{path}: dropped {torn} unreadable line(s), left by a crash while writing")
        try:
            write_atomic(path, "".join(line + "\n" for line in kept))
            self.file = open(path, "a")
        except OSError as e:
            raise OSError(f"cannot write {path}: {e.strerror or e}") from None
        self.bar = tqdm(total=self.total, initial=self.start, desc=desc, dynamic_ncols=True,
                        disable=not sys.stderr.isatty())
        self.wandb = wandb_run(run, self.start > 0)

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
        if self.wandb:
            self.wandb.log(m, step=m["step"])
        if "step" not in m or "lr" not in m:  # an evaluation-only row
            return
        self.bar.update(1)
        self.bar.set_postfix({label: format(m[key], fmt) for key, label, fmt in self.fields if key in m})
        if m["step"] % self.log_every == 0 or m["step"] == self.total:
            parts = [f"{label} {m[key]:{fmt}}" for key, label, fmt in self.fields if key in m]
            self.bar.write(f"step {m['step']}/{self.total} | " + " | ".join(parts))

    def close(self, final_eval=None):
        if final_eval:
            self.log({"step": self.total, **final_eval})
        if self.file is not None:
            self.bar.close()
            self.file.close()
            print0(f"trained steps {self.start + 1}-{self.total} in {self.t_last - self.t_start:.1f}s"
                   if self.start else f"trained {self.total} steps in {self.t_last - self.t_start:.1f}s")
        if self.wandb:
            self.wandb.finish()


def wandb_run(run, resumed):
    """The wandb run (wandb_project set) that gets the metrics rows, its config the run's settings; its id is kept in
    out_dir/wandb_run_id, so a resumed run continues it. wandb is imported only here."""
    s, id_file = run.settings, run.out_dir / "wandb_run_id"
    if not s["wandb_project"]:
        return None
    run_id = id_file.read_text().strip() if resumed and id_file.exists() else f"{time.time_ns():x}"
    write_atomic(id_file, run_id)
    try:
        import wandb

        return wandb.init(project=s["wandb_project"], name=s["wandb_run_name"] or None, id=run_id, resume="allow",
                          tags=[t for t in s["wandb_tags"].split(",") if t] or None, config=s, dir=run.out_dir)
    except Exception as e:  # wandb's errors (no login, no network in online mode) share no base but Exception
        raise ConfigError(f"wandb: cannot start run {run_id} of project {s['wandb_project']} ({e}); WANDB_MODE="
                          "offline logs to files for a later `wandb sync`") from None


# dense bf16 peak FLOP/s by device name, for MFU
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_memory_gib(device):
    """This rank's peak so far: allocated GPU memory, or the CPU process's resident-set high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # (in KiB on Linux)


def throughput(tokens, t0, run, model, computed=None):
    """Tokens/s over all ranks since t0, step time, peak memory, and on GPU the MFU: 6 x parameters x tokens the model
    ran (`computed`: fewer with shared prompts) per second over the peak bf16 rate, recomputation not counted."""
    total = global_sum(tokens, run.device)
    dt = time.time() - t0
    out = {"tokens_per_s": total / dt, "step_time_s": dt, "peak_memory_gib": peak_memory_gib(run.device)}
    name = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else ""
    if peak := next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None):
        ran = total if computed is None else global_sum(computed, run.device)
        n_params = sum(p.numel() for p in model.parameters())
        out["mfu"] = 6 * n_params * ran / dt / (peak * run.world)
    return out


# --- the token cache: a data file tokenized once, for every later run (tokens.cached)

CACHE_FILE = re.compile(r"\.(tokens|ref-logps)-\w+\.safetensors")  # the caches' names (tokens.py, wrpo.py)


def load_cached(load, path, tokenizer, folder, report=print, **settings):
    """load(path, tokenizer, **settings) (data.load_preference_rows or load_sft_examples) through the token cache in
    `folder` ("": beside the data), named by a hash of all the rows depend on: the data files' content and path, the
    tokenizer (its full serialization and chat template), the settings, the code of data.py and tokens.py, and the
    tokenizer libraries' versions. A repeated or resumed run skips the tokenizer."""
    import tokenizers
    import transformers

    t0, h = time.time(), hashlib.sha256()
    bound = inspect.signature(load).bind(path, tokenizer, **settings)
    bound.apply_defaults()  # the settings as load sees them, given or not
    settings_used = {k: v for k, v in bound.arguments.items() if k not in ("path", "tokenizer", "report", "hint")}
    for part in [load.__name__, json.dumps(settings_used), str(path), tokens.tokenizer_digest(tokenizer),
                 transformers.__version__, tokenizers.__version__, Path(data.__file__), Path(tokens.__file__),
                 *(files := data.data_files(path))]:
        if isinstance(part, Path):  # a file's name and content
            h.update(part.name.encode() + b":")
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        else:
            h.update(f"{part}|".encode())
    file = tokens.cache_folder(folder, path) / f"{Path(path).name}.tokens-{h.hexdigest()[:20]}.safetensors"
    rows, how = tokens.cached_rows(file, h.hexdigest(), lambda: load(path, tokenizer, report=report, **settings),
                                   report)
    world = dist.get_world_size() if dist.is_initialized() else 1
    tokenized = f"tokenized on {world} rank{'s' if world > 1 else ''}"
    how = {"cached": f"cached: {file}", "written": f"{tokenized}; cached in {file}", "computed": tokenized}[how]
    report(f"data: {len(rows)} rows from {path} in {time.time() - t0:.1f}s ({how})")
    if Path(path).is_dir():  # a folder: name what was read, and what was not (but the caches written into it)
        others = sorted(p.name for p in Path(path).iterdir() if p not in files and not CACHE_FILE.search(p.name))
        report(f"data: read {', '.join(f.name for f in files)} from {path}" +
               (f"; skipped {', '.join(others)} (not .jsonl, .json or .parquet)" if others else ""))
    return rows
