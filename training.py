"""What sft.py and wrpo.py share: settings, run setup, the optimizer step, logging, checkpoints.

Each script keeps its own training loop, readable top to bottom; the pieces here are the ones
that would otherwise be written twice.
"""

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import data
from fsdp_utils import DTYPES, init_distributed, is_master, load_model, print0, resolve_model_path, \
    save_hf_checkpoint
from logprobs import IMPLS, resolve_impl


@dataclass
class TrainConfig:
    """Settings both stages share; each script's Config adds its own (model, data, lr, ...)."""

    overwrite: bool = False  # replace a finished or failed run already in out_dir
    trust_remote_code: bool = False  # only for models whose code you trust
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
    save_every: int = 0  # HF checkpoint every N steps (0: only the final one)
    save_dtype: str = "bfloat16"  # dtype of saved weights


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
    for key in ("dtype", "save_dtype"):
        if getattr(cfg, key) not in DTYPES:
            problems.append(f"{key} must be one of {', '.join(DTYPES)}, got '{getattr(cfg, key)}'")
    if cfg.logprobs not in IMPLS:
        problems.append(f"logprobs must be one of {', '.join(IMPLS)}, got '{cfg.logprobs}'")
    if cfg.activation_checkpointing not in ("auto", "true", "false"):
        problems.append(f"activation_checkpointing must be auto, true or false, got '{cfg.activation_checkpointing}'")
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
    n_params: int = 0  # of the trained model, for MFU


def start_run(cfg, problems=()):
    """Process group, settings, output folder, model path and tokenizer; nothing written yet.

    Runs before any data is read, so every user error surfaces in seconds.
    """
    rank, world, device, mesh = init_distributed()
    problems = list(problems) + config_problems(cfg, world)
    if problems:
        raise ConfigError("bad config:\n  " + "\n  ".join(problems))
    out_dir = Path(cfg.out_dir)
    if (out_dir / "metrics.jsonl").exists() and not cfg.overwrite:
        raise ConfigError(f"out_dir {out_dir} already holds a run; pass another --out_dir, or --overwrite=true "
                          "to replace it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError("permission denied")
    except OSError as e:
        raise ConfigError(f"out_dir {out_dir} is not writable: {e}") from None
    model_path = resolve(cfg.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Run(rank, world, device, mesh, out_dir, model_path, tokenizer, pad_id)


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
    """Record the resolved settings once the data has validated."""
    dist.barrier()  # every rank has checked out_dir before rank 0 writes into it
    if is_master():
        (run.out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


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


def training_steps(n_examples, cfg, run, total_steps):
    """Yield (step, epoch, this rank's micro-batches of example indices) for every optimizer step."""
    step = 0
    for epoch in range(cfg.epochs):
        for micro_batches in data.step_batches(n_examples, epoch=epoch, seed=cfg.seed,
                                               global_batch=cfg.global_batch_size, micro_batch=cfg.micro_batch_size,
                                               rank=run.rank, world=run.world):
            if step >= total_steps:
                return
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


def optimizer_step(policy, optimizer, grad_clip):
    """Clip the global gradient norm (over all shards), step, clear; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip or float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


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

    fields: (metric key, label, format) shown in the bar and the printed line.
    """

    def __init__(self, run, cfg, total_steps, desc, fields):
        self.cfg, self.total, self.fields = cfg, total_steps, fields
        self.file = self.bar = None
        self.t_start = self.t_last = time.time()
        if is_master():
            from tqdm import tqdm

            self.file = open(run.out_dir / "metrics.jsonl", "w")
            # a live bar on a terminal; in a log file only the `log_every` lines
            self.bar = tqdm(total=total_steps, desc=desc, dynamic_ncols=True, disable=not sys.stderr.isatty())

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
            print0(f"trained {self.total} steps in {self.t_last - self.t_start:.1f}s")


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


def end_step(run, cfg, policy, logger, m, run_eval, total_steps):
    """After optimizer step m["step"]: periodic evaluation, the metrics row, periodic checkpoint."""
    step = m["step"]
    if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
        m.update(run_eval(step))
    logger.log(m)
    if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
        save_checkpoint(run, cfg, policy, f"step_{step:06d}", step)


def finish_run(run, cfg, policy, logger, run_eval, total_steps):
    """Final evaluation (logged), then the final checkpoint; returns the evaluation's metrics."""
    final = run_eval(total_steps)
    if final:
        logger.log({"step": total_steps, **final})
    logger.close()
    save_checkpoint(run, cfg, policy, "final", total_steps)
    return final


def save_checkpoint(run, cfg, policy, name, step):
    """A Hugging Face checkpoint of the policy at out_dir/name, with the settings that made it."""
    path = run.out_dir / name
    save_hf_checkpoint(policy, path, tokenizer=run.tokenizer, dtype=DTYPES[cfg.save_dtype],
                       train_config={**dataclasses.asdict(cfg), "step": step, "world_size": run.world})
    print0(f"saved {path}")


def run_main(main):
    """Run a script's main; user errors end with one message (from rank 0) and exit code 2."""
    try:
        main(sys.argv[1:])
    except (ConfigError, data.DataError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
