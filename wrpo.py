"""Weighted-Reward Preference Optimization (WRPO, Yang et al., ICLR 2025) on native FSDP2.

Demo (2 CPU processes, a few minutes):
    torchrun --nproc_per_node=2 wrpo.py --config=demo/wrpo.json
One 8-GPU node, the paper's setup (policy and reference = the SFT model):
    torchrun --nproc_per_node=8 wrpo.py --model=PATH_TO_SFT --data=wrpo_train.jsonl --out_dir=out/wrpo
Settings: `--config=file.json` (optional), then `--key=value` overrides; see Config below.
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
import torch.nn.functional as F

import data
from fsdp_utils import DTYPES, cleanup, init_distributed, is_master, load_model, print0, \
    resolve_model_path, save_hf_checkpoint
from logprobs import model_sequence_logps


@dataclass
class Config:
    # model and data
    model: str = "demo/model"  # policy init: local folder or hub id (the paper: the SFT model)
    ref_model: str = ""  # frozen reference; empty = the same checkpoint as `model`
    data: str = "demo/data/train.jsonl"  # WRPO rows: .jsonl, .json, .parquet or a folder of them
    eval_data: str = ""  # held-out WRPO rows for reward accuracy; empty = no evaluation
    out_dir: str = "out/wrpo"  # metrics.jsonl, config.json and checkpoints go here
    overwrite: bool = False  # replace a finished or failed run already in out_dir
    trust_remote_code: bool = False  # only for models whose code you trust
    # WRPO objective
    beta: float = 0.01  # scale of the implicit reward beta * log(pi / pi_ref)
    alpha: float = 0.1  # weight of the source response y_ws (the paper's alpha_max)
    alpha_schedule: str = "linear"  # linear: 0 -> alpha over the run; constant: alpha throughout
    # optimisation
    lr: float = 3e-7  # peak learning rate (AdamW)
    warmup_ratio: float = 0.1  # fraction of optimizer steps of linear warmup, then cosine to 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    global_batch_size: int = 128  # rows per optimizer step = micro_batch_size * grad_accum * world
    micro_batch_size: int = 1  # rows per rank per forward pass (each row = 3 sequences)
    epochs: int = 1
    max_steps: int = -1  # stop after this many optimizer steps (-1: run all epochs)
    seed: int = 42  # data order
    # sequences
    max_length: int = 2048  # prompt + response tokens
    max_prompt_length: int = 1800  # prompt tokens kept (from the end) when a row is too long
    truncation: str = "keep_end"  # keep_end: the paper's rule; error: reject over-long rows
    # systems
    dtype: str = "bfloat16"  # compute dtype under FSDP mixed precision; master weights stay fp32
    activation_checkpointing: str = "auto"  # auto: on with CUDA (as in the paper), off on CPU
    attn_implementation: str = "sdpa"
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

    args = list(argv)
    for arg in args:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
            try:
                loaded = json.loads(Path(path).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"--config={path}: cannot read JSON config: {e}") from None
            values.update({k: convert(k, v, path) for k, v in loaded.items()})
    for arg in args:
        if arg.startswith("--config="):
            continue
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"expected --key=value, got '{arg}'")
        key, raw = arg[2:].split("=", 1)
        values[key] = convert(key, raw, "command line")
    return cls(**values)


def check_config(cfg, world):
    problems = []
    if cfg.beta <= 0:
        problems.append(f"beta must be > 0, got {cfg.beta}")
    if not 0 <= cfg.alpha <= 1:
        problems.append(f"alpha must be in [0, 1], got {cfg.alpha}")
    if cfg.alpha_schedule not in ("linear", "constant"):
        problems.append(f"alpha_schedule must be 'linear' or 'constant', got '{cfg.alpha_schedule}'")
    if cfg.lr <= 0 or not 0 <= cfg.warmup_ratio < 1:
        problems.append(f"need lr > 0 and 0 <= warmup_ratio < 1, got {cfg.lr}, {cfg.warmup_ratio}")
    if cfg.micro_batch_size < 1 or cfg.global_batch_size % (cfg.micro_batch_size * world):
        problems.append(f"global_batch_size {cfg.global_batch_size} must be a multiple of micro_batch_size "
                        f"{cfg.micro_batch_size} x world size {world}")
    for key in ("dtype", "save_dtype"):
        if getattr(cfg, key) not in DTYPES:
            problems.append(f"{key} must be one of {', '.join(DTYPES)}, got '{getattr(cfg, key)}'")
    if cfg.activation_checkpointing not in ("auto", "true", "false"):
        problems.append(f"activation_checkpointing must be auto, true or false, got '{cfg.activation_checkpointing}'")
    if problems:
        raise ConfigError("bad config:\n  " + "\n  ".join(problems))


# -----------------------------------------------------------------------------
# the WRPO objective and its schedules


def wrpo_loss(policy_ws, policy_wt, policy_l, ref_ws, ref_wt, ref_l, *, alpha, beta):
    """Per-example WRPO losses and implicit rewards.

    Inputs are [B] tensors of log pi(y|x) SUMMED over response tokens, for the policy and the
    frozen reference, on y_ws (best source response), y_wt (best target response) and y_l
    (worst target response). With d(y) = log pi_theta(y|x) - log pi_ref(y|x):

        L = -log sigmoid( beta * ( alpha * d(y_ws) + (1 - alpha) * d(y_wt) - d(y_l) ) )

    alpha = 0 is DPO on (y_wt, y_l); alpha = 1 is DPO on (y_ws, y_l). The blended reward
    moves the preferred side from the target's own best response towards the source's.

    Returns losses [B] and a dict of detached [B] rewards beta * d(.): source_chosen,
    target_chosen, chosen (the alpha-weighted one) and rejected.
    """
    d_ws = policy_ws - ref_ws
    d_wt = policy_wt - ref_wt
    d_l = policy_l - ref_l
    d_chosen = alpha * d_ws + (1 - alpha) * d_wt
    losses = -F.logsigmoid(beta * (d_chosen - d_l))
    rewards = {
        "source_chosen": beta * d_ws.detach(),
        "target_chosen": beta * d_wt.detach(),
        "chosen": beta * d_chosen.detach(),
        "rejected": beta * d_l.detach(),
    }
    return losses, rewards


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


def get_alpha(step, total_steps, alpha, schedule):
    """Weight of the source response: linear from 0 at step 0 to `alpha` at the last step."""
    if schedule == "constant":
        return alpha
    return alpha * min(1.0, step / max(1, total_steps - 1))


# -----------------------------------------------------------------------------
# one micro-batch, metrics, evaluation


def preference_forward(policy, ref, batch, alpha, beta):
    """Log-probs of every sequence under policy (with grad) and reference, then the WRPO loss."""
    policy_logps, _ = model_sequence_logps(policy, batch)
    with torch.no_grad():
        ref_logps, _ = model_sequence_logps(ref, batch)
    ws, wt, rej = batch["ws"], batch["wt"], batch["rej"]
    losses, rewards = wrpo_loss(policy_logps[ws], policy_logps[wt], policy_logps[rej],
                                ref_logps[ws], ref_logps[wt], ref_logps[rej], alpha=alpha, beta=beta)
    logps = {"source_chosen": policy_logps[ws].detach(), "target_chosen": policy_logps[wt].detach(),
             "rejected": policy_logps[rej].detach()}
    return losses, rewards, logps


def _won(a, b):
    """1 where a > b, 1/2 on ties: an untrained policy (identical to its reference) scores 0.5."""
    return (a > b).float() + 0.5 * (a == b).float()


def row_metrics(losses, rewards, logps):
    """Per-row [B] metrics; summed over rows and ranks, then divided by the row count."""
    m = {"loss": losses.detach()}
    m.update({f"rewards/{k}": v for k, v in rewards.items()})
    m["rewards/margins"] = rewards["chosen"] - rewards["rejected"]
    m["rewards/accuracies"] = _won(rewards["chosen"], rewards["rejected"])
    m["rewards/source_accuracies"] = _won(rewards["source_chosen"], rewards["rejected"])
    m["rewards/target_accuracies"] = _won(rewards["target_chosen"], rewards["rejected"])
    m.update({f"logps/{k}": v for k, v in logps.items()})
    return m


class MetricSum:
    """Sums per-row metrics over micro-batches, then over ranks with one all_reduce."""

    def __init__(self):
        self.sums, self.rows = {}, 0.0

    def add(self, metrics, weight):
        """metrics: name -> [B] tensor; weight: [B], 0 for rows that only pad a batch."""
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.float() * weight).sum()
        self.rows = self.rows + weight.sum()

    def mean(self):
        keys = sorted(self.sums)
        t = torch.stack([self.sums[k] for k in keys] + [self.rows])
        dist.all_reduce(t)
        return {k: (t[i] / t[-1]).item() for i, k in enumerate(keys)}


@torch.no_grad()
def evaluate(policy, ref, examples, cfg, alpha, pad_id, device, rank, world):
    """Held-out implicit-reward metrics (accuracy = weighted chosen reward beats rejected).

    Every rank runs the same number of forward passes (FSDP's collectives need it): ranks
    short of rows repeat row 0 with weight 0.
    """
    policy.eval()
    per_rank = math.ceil(len(examples) / world)
    acc = MetricSum()
    for start in range(0, per_rank, cfg.micro_batch_size):
        idx = [rank * per_rank + start + j for j in range(min(cfg.micro_batch_size, per_rank - start))]
        weight = torch.tensor([1.0 if i < len(examples) else 0.0 for i in idx], device=device)
        batch = data.collate([examples[i if i < len(examples) else 0] for i in idx], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        losses, rewards, logps = preference_forward(policy, ref, batch, alpha, cfg.beta)
        acc.add(row_metrics(losses, rewards, logps), weight)
    policy.train()
    return {f"eval/{k}": v for k, v in acc.mean().items()}


# -----------------------------------------------------------------------------
# training


def main(argv):
    # --- setup
    cfg = parse_config(Config, argv)
    rank, world, device, mesh = init_distributed()
    check_config(cfg, world)
    grad_accum = cfg.global_batch_size // (cfg.micro_batch_size * world)
    rows_per_rank = cfg.global_batch_size // world
    param_dtype = DTYPES[cfg.dtype]
    checkpointing = cfg.activation_checkpointing == "true" or (
        cfg.activation_checkpointing == "auto" and device.type == "cuda")
    out_dir = Path(cfg.out_dir)
    if (out_dir / "metrics.jsonl").exists() and not cfg.overwrite:
        raise ConfigError(f"out_dir {out_dir} already holds a run; pass another --out_dir, or --overwrite=true "
                         "to replace it")
    try:
        model_path = resolve_model_path(cfg.model)
        ref_path = resolve_model_path(cfg.ref_model) if cfg.ref_model else model_path
    except OSError as e:
        raise ConfigError(f"model error: {e}") from None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError("permission denied")
    except OSError as e:
        raise ConfigError(f"out_dir {out_dir} is not writable: {e}") from None

    # --- data: every row validated before any model is loaded
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    load = lambda path: data.load_dataset(path, tokenizer, max_length=cfg.max_length,  # noqa: E731
                                          max_prompt_length=cfg.max_prompt_length, truncation=cfg.truncation)
    train_rows = load(cfg.data)
    eval_rows = load(cfg.eval_data) if cfg.eval_data else []
    steps_per_epoch = len(train_rows) // cfg.global_batch_size
    if steps_per_epoch == 0:
        raise data.DataError(f"{cfg.data} has {len(train_rows)} rows, "
                             f"fewer than global_batch_size {cfg.global_batch_size}")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)
    print0(f"{len(train_rows)} training rows, {len(eval_rows)} held-out rows; world {world} on {device.type}, "
           f"global batch {cfg.global_batch_size} = {cfg.micro_batch_size} x {grad_accum} accum x {world} ranks; "
           f"{total_steps} optimizer steps")

    dist.barrier()  # every rank has checked out_dir before rank 0 writes into it
    if is_master():
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    # --- models: sharded policy (fp32 master weights) and frozen sharded reference
    load_kw = dict(trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)
    policy = load_model(model_path, mesh, device, param_dtype, trainable=True,
                        activation_checkpointing=checkpointing, **load_kw)
    ref = load_model(ref_path, mesh, device, param_dtype, trainable=False, **load_kw)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    n_params = sum(p.numel() for p in policy.parameters())
    print0(f"policy: {n_params / 1e6:.2f}M parameters, compute {cfg.dtype}, "
           f"activation checkpointing {'on' if checkpointing else 'off'}")

    def run_eval(step):
        if not eval_rows:
            return {}
        alpha = get_alpha(step, total_steps, cfg.alpha, cfg.alpha_schedule)
        m = evaluate(policy, ref, eval_rows, cfg, alpha, pad_id, device, rank, world)
        print0(f"step {step}: held-out reward accuracy {m['eval/rewards/accuracies']:.3f} "
               f"(source {m['eval/rewards/source_accuracies']:.3f}, target {m['eval/rewards/target_accuracies']:.3f}), "
               f"margin {m['eval/rewards/margins']:.4f}")
        return m

    def save(name, step):
        path = out_dir / name
        save_hf_checkpoint(policy, path, tokenizer=tokenizer, dtype=DTYPES[cfg.save_dtype],
                           train_config={**dataclasses.asdict(cfg), "step": step, "world_size": world})
        print0(f"saved {path}")

    # --- training loop
    eval_before = run_eval(0)
    metrics_file = open(out_dir / "metrics.jsonl", "w") if is_master() else None
    bar = None
    if is_master():
        from tqdm import tqdm
        # a live bar on a terminal; in a log file only the `log_every` lines
        bar = tqdm(total=total_steps, desc="wrpo", dynamic_ncols=True, disable=not sys.stderr.isatty())
    step, t_start = 0, time.time()
    for epoch in range(cfg.epochs):
        batches = data.step_batches(len(train_rows), epoch=epoch, seed=cfg.seed, global_batch=cfg.global_batch_size,
                                    micro_batch=cfg.micro_batch_size, rank=rank, world=world)
        for micro_batches in batches:
            if step >= total_steps:
                break
            t0 = time.time()
            lr = get_lr(step, total_steps, cfg.lr, cfg.warmup_ratio)
            alpha = get_alpha(step, total_steps, cfg.alpha, cfg.alpha_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums, tokens = MetricSum(), 0
            for rows in micro_batches:
                batch = data.collate([train_rows[i] for i in rows], pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                tokens += int(batch["attention_mask"].sum())
                losses, rewards, logps = preference_forward(policy, ref, batch, alpha, cfg.beta)
                # FSDP averages gradients over ranks, so dividing by this rank's rows per step
                # yields the gradient of the mean loss over the global batch
                (losses.sum() / rows_per_rank).backward()
                sums.add(row_metrics(losses, rewards, logps), torch.ones_like(losses))
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or float("inf"))
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # --- log
            m = sums.mean()
            tok = torch.tensor(float(tokens), device=device)
            dist.all_reduce(tok)
            dt = time.time() - t0
            m.update(step=step, epoch=epoch, lr=lr, alpha=alpha, grad_norm=grad_norm.item(),
                     tokens_per_s=tok.item() / dt, step_time_s=dt)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                m.update(run_eval(step))
            if is_master():
                metrics_file.write(json.dumps(m) + "\n")
                metrics_file.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['rewards/accuracies']:.2f}",
                                margin=f"{m['rewards/margins']:.3g}", alpha=f"{alpha:.3f}")
                if step % cfg.log_every == 0 or step == total_steps:
                    bar.write(f"step {step}/{total_steps} | loss {m['loss']:.4f} | acc {m['rewards/accuracies']:.3f} "
                              f"| margin {m['rewards/margins']:.4g} | alpha {alpha:.4f} | lr {lr:.3g} "
                              f"| grad norm {m['grad_norm']:.3g} | {m['tokens_per_s']:.0f} tok/s")

            # --- checkpoint
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save(f"step_{step:06d}", step)
    if bar is not None:
        bar.close()

    # --- final evaluation and checkpoint
    eval_after = run_eval(total_steps)
    if is_master():
        if eval_rows:
            final = {"step": total_steps, **eval_after}
            metrics_file.write(json.dumps(final) + "\n")
            print0(f"held-out reward accuracy: {eval_before['eval/rewards/accuracies']:.3f} before -> "
                   f"{eval_after['eval/rewards/accuracies']:.3f} after")
        metrics_file.close()
        print0(f"trained {total_steps} steps in {time.time() - t_start:.1f}s")
    save("final", total_steps)
    cleanup()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, data.DataError) as e:
        # user error: one clear message (from rank 0 only), no traceback
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
