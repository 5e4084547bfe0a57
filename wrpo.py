"""Weighted-Reward Preference Optimization (WRPO, Yang et al., ICLR 2025) on native FSDP2.

Demo (2 CPU processes, about a minute):
    torchrun --nproc_per_node=2 wrpo.py --config=demo/wrpo.json
One 8-GPU node, the paper's setup (policy and reference = the SFT model):
    torchrun --nproc_per_node=8 wrpo.py --model=PATH_TO_SFT --data=wrpo_train.jsonl --out_dir=out/wrpo
Settings: `--config=file.json` (optional), then `--key=value` overrides; see Config below.
"""

import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import attention
import data
from fsdp_utils import DTYPES, cleanup, is_master, load_model, print0
from logprobs import model_sequence_logps
from training import MetricSum, RunGuard, TrainConfig, eval_batches, get_lr, load_policy, parse_config, \
    resolve, resume_state, run_main, same_count_on_all_ranks, set_lr, start_run, throughput, to_device, \
    total_steps_for, training_steps, write_run_config


@dataclass
class Config(TrainConfig):
    # model and data (shared settings such as batch size and dtype: TrainConfig in training.py)
    model: str = "demo/model"  # policy init: local folder or hub id (the paper: the SFT model)
    ref_model: str = ""  # frozen reference; empty = the same checkpoint as `model`
    ref_logps: str = "precompute"  # precompute: one pass of the reference before training, cached; live: every step
    ref_cache_dir: str = ""  # where precomputed reference log-probs are cached; empty = next to the data file
    data: str = "demo/data/train.jsonl"  # WRPO rows: .jsonl, .json, .parquet or a folder of them
    eval_data: str = ""  # held-out WRPO rows for reward accuracy; empty = no evaluation
    out_dir: str = "out/wrpo"  # metrics.jsonl, config.json and checkpoints go here
    # WRPO objective
    beta: float = 0.01  # scale of the implicit reward beta * log(pi / pi_ref)
    alpha: float = 0.1  # weight of the source response y_ws (the paper's alpha_max)
    alpha_schedule: str = "linear"  # linear: 0 -> alpha over the run; constant: alpha throughout
    loss_type: str = "sigmoid"  # sigmoid (DPO-style, the paper's), ipo, simpo (no reference; set beta ~2, gamma)
    gamma: float = 0.0  # SimPO's target reward margin
    lr: float = 3e-7  # peak learning rate (AdamW)
    # sequences (global_batch_size counts rows; each row is 3 sequences)
    packing: bool = True  # all sequences of a micro-batch in one row, no padding; micro-batches by token budget
    max_tokens_per_micro_batch: int = 0  # with packing: tokens per forward pass (0: 3 x max_length, one full row)
    shared_prompt: bool = True  # with packing and packed_sdpa attention: one copy of each prompt for its responses
    max_prompt_length: int = 1800  # prompt tokens kept (from the end) when a row is too long
    truncation: str = "keep_end"  # keep_end: the paper's rule; error: reject over-long rows


LOSS_TYPES = ("sigmoid", "ipo", "simpo")


def wrpo_problems(cfg):
    problems = []
    if cfg.beta <= 0:
        problems.append(f"beta must be > 0, got {cfg.beta}")
    if not 0 <= cfg.alpha <= 1:
        problems.append(f"alpha must be in [0, 1], got {cfg.alpha}")
    if cfg.alpha_schedule not in ("linear", "constant"):
        problems.append(f"alpha_schedule must be 'linear' or 'constant', got '{cfg.alpha_schedule}'")
    if cfg.loss_type not in LOSS_TYPES:
        problems.append(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got '{cfg.loss_type}'")
    if cfg.gamma < 0:
        problems.append(f"gamma must be >= 0, got {cfg.gamma}")
    if not 0 < cfg.max_prompt_length < cfg.max_length:
        problems.append(f"need 0 < max_prompt_length < max_length, got {cfg.max_prompt_length}, {cfg.max_length}")
    if cfg.ref_logps not in ("precompute", "live"):
        problems.append(f"ref_logps must be 'precompute' or 'live', got '{cfg.ref_logps}'")
    return problems


# -----------------------------------------------------------------------------
# the WRPO objective and its schedules


def wrpo_loss(policy_ws, policy_wt, policy_l, ref_ws, ref_wt, ref_l, *, alpha, beta, loss_type="sigmoid", gamma=0.0):
    """Per-example WRPO losses and implicit rewards.

    Inputs are [B] tensors of log pi(y|x) SUMMED over response tokens, for the policy and the
    frozen reference, on y_ws (best source response), y_wt (best target response) and y_l
    (worst target response). With d(y) = log pi_theta(y|x) - log pi_ref(y|x):

        L = -log sigmoid( beta * ( alpha * d(y_ws) + (1 - alpha) * d(y_wt) - d(y_l) ) )

    alpha = 0 is DPO on (y_wt, y_l); alpha = 1 is DPO on (y_ws, y_l). The blended reward
    moves the preferred side from the target's own best response towards the source's.

    The same weighted margin h = alpha * d(y_ws) + (1 - alpha) * d(y_wt) - d(y_l) in the
    paper's ablation objectives (loss_type):
        sigmoid  -log sigmoid(beta * h)               DPO's, the default (above)
        ipo      (h - 1 / (2 * beta))^2               IPO: regress the margin to a target
        simpo    -log sigmoid(beta * h - gamma)       SimPO: the caller passes length-averaged
                                                      log-probs and zero reference log-probs

    Returns losses [B] and a dict of detached [B] rewards beta * d(.): source_chosen,
    target_chosen, chosen (the alpha-weighted one) and rejected.
    """
    d_ws = policy_ws - ref_ws
    d_wt = policy_wt - ref_wt
    d_l = policy_l - ref_l
    d_chosen = alpha * d_ws + (1 - alpha) * d_wt
    h = d_chosen - d_l
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "simpo":
        losses = -F.logsigmoid(beta * h - gamma)
    else:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got '{loss_type}'")
    rewards = {
        "source_chosen": beta * d_ws.detach(),
        "target_chosen": beta * d_wt.detach(),
        "chosen": beta * d_chosen.detach(),
        "rejected": beta * d_l.detach(),
    }
    return losses, rewards


def get_alpha(step, total_steps, alpha, schedule):
    """Weight of the source response: linear from 0 at step 0 to `alpha` at the last step."""
    if schedule == "constant":
        return alpha
    return alpha * min(1.0, step / max(1, total_steps - 1))


# -----------------------------------------------------------------------------
# one micro-batch, metrics, evaluation


def row_logps(model, batch, average=False):
    """Log-probs of each row's (source chosen, target chosen, rejected) responses: [B, 3].

    Summed over response tokens, or with average=True (SimPO) divided by their count.
    """
    logps, counts = model_sequence_logps(model, batch)
    if average:
        logps = logps / counts.clamp(min=1)
    return torch.stack([logps[batch["ws"]], logps[batch["wt"]], logps[batch["rej"]]], dim=-1)


def preference_forward(policy, batch, ref_logps, alpha, beta, loss_type="sigmoid", gamma=0.0):
    """Policy log-probs (with grad) of every sequence, then the loss against ref_logps [B, 3].

    SimPO has no reference: its log-probs are length-averaged and ref_logps is ignored.
    """
    simpo = loss_type == "simpo"
    pol = row_logps(policy, batch, average=simpo)
    ref_logps = torch.zeros_like(pol) if simpo else ref_logps
    losses, rewards = wrpo_loss(*pol.unbind(-1), *ref_logps.unbind(-1), alpha=alpha, beta=beta, loss_type=loss_type,
                                gamma=gamma)
    logps = dict(zip(("source_chosen", "target_chosen", "rejected"), pol.detach().unbind(-1)))
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


@torch.no_grad()
def evaluate(policy, reference, examples, cfg, run, alpha):
    """Held-out implicit-reward metrics (accuracy = the weighted chosen reward beats the rejected)."""
    policy.eval()
    sums = MetricSum()
    for idx, weight in eval_batches(len(examples), cfg.micro_batch_size, run):
        batch = data.collate([examples[i] for i in idx], run.pad_id, cfg.packing, cfg.shared_prompt)
        batch = to_device(batch, run.device)
        losses, rewards, logps = preference_forward(policy, batch, reference(batch, idx), alpha, cfg.beta,
                                                     cfg.loss_type, cfg.gamma)
        sums.add(row_metrics(losses, rewards, logps), weight)
    policy.train()
    return {f"eval/{k}": v for k, v in sums.mean().items()}


# -----------------------------------------------------------------------------
# reference log-probs: one pass before training (cached), or the live model every step


def reference_cache_path(cfg, ref_path, examples, data_path):
    """Cache file for the reference log-probs of `examples`, named by a hash of all they depend on.

    That is the reference checkpoint (its files' names, sizes and modification times), the
    tokenized rows themselves (so the data, tokenizer, chat template and truncation settings)
    and the compute settings. Any change gives a new name, so a stale cache is never read.
    """
    h = hashlib.sha256()
    ref = Path(ref_path)
    for f in sorted(ref.glob("*.safetensors")) + sorted(ref.glob("*.json")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(data.fingerprint(examples).encode())
    h.update(f"{cfg.dtype}:{cfg.attn_implementation}".encode())
    data_path = Path(data_path)
    folder = Path(cfg.ref_cache_dir) if cfg.ref_cache_dir else (data_path if data_path.is_dir() else data_path.parent)
    return folder / f"{data_path.name}.ref-logps-{h.hexdigest()[:20]}.safetensors"


@torch.no_grad()
def compute_reference(ref, examples, cfg, run, desc):
    """One no-grad pass of the reference over every row: [n_rows, 3] on CPU, the same on all ranks."""
    per_rank = math.ceil(len(examples) / run.world)
    mine = torch.zeros(per_rank, 3, device=run.device)
    at = 0
    for idx, _ in tqdm(list(eval_batches(len(examples), cfg.micro_batch_size, run)), desc=desc,
                       disable=not is_master() or not sys.stderr.isatty()):
        batch = data.collate([examples[i] for i in idx], run.pad_id, cfg.packing, cfg.shared_prompt)
        batch = to_device(batch, run.device)
        mine[at : at + len(idx)] = row_logps(ref, batch).float()
        at += len(idx)
    parts = [torch.zeros_like(mine) for _ in range(run.world)]
    dist.all_gather(parts, mine)  # rank r holds rows [r * per_rank, (r + 1) * per_rank)
    return torch.cat(parts)[: len(examples)].cpu()


def precomputed_reference(load_ref, ref_path, datasets, cfg, run):
    """Reference log-probs [n_rows, 3] for each (data path, rows), from the cache or one pass.

    The reference model is loaded only when a cache is missing, and freed afterwards.
    """
    tables, ref = [], None
    for data_path, examples in datasets:
        path = reference_cache_path(cfg, ref_path, examples, data_path)
        if path.exists():
            print0(f"reference log-probs: {path} (cached)")
            tables.append(load_file(path)["logps"])
            continue
        if ref is None:
            ref = load_ref()
        t0 = time.time()
        table = compute_reference(ref, examples, cfg, run, f"reference {Path(data_path).name}")
        if is_master():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                save_file({"logps": table}, tmp, metadata={"data": str(data_path), "reference": str(ref_path)})
                os.replace(tmp, path)  # never a half-written cache under the final name
                print0(f"reference log-probs: {path} ({len(examples)} rows in {time.time() - t0:.1f}s)")
            except OSError as e:
                print0(f"reference log-probs: computed, not cached ({path.parent} not writable: {e})")
        tables.append(table)
    del ref  # the reference is never needed again
    return tables


# -----------------------------------------------------------------------------
# training

LOG_FIELDS = [("loss", "loss", ".4f"), ("rewards/accuracies", "acc", ".3f"), ("rewards/margins", "margin", ".4g"),
              ("alpha", "alpha", ".4f"), ("lr", "lr", ".3g"), ("grad_norm", "grad norm", ".3g"),
              ("tokens_per_s", "tok/s", ".0f"), ("mfu", "MFU", ".1%")]


def main(argv):
    # --- setup: settings, paths and tokenizer checked before anything is read or written
    cfg = parse_config(Config, argv)
    run = start_run(cfg, wrpo_problems(cfg))
    ref_path = resolve(cfg.ref_model) if cfg.ref_model else run.model_path
    rows_per_rank = cfg.global_batch_size // run.world
    cfg.shared_prompt = cfg.shared_prompt and cfg.packing and cfg.attn_implementation == attention.NAME  # else off

    # --- data: every row validated before any model is loaded
    load = lambda path: data.load_dataset(path, run.tokenizer, max_length=cfg.max_length,  # noqa: E731
                                          max_prompt_length=cfg.max_prompt_length, truncation=cfg.truncation,
                                          skip_invalid=cfg.skip_invalid_rows, report=print0)
    train_rows = load(cfg.data)
    eval_rows = load(cfg.eval_data) if cfg.eval_data else []
    total_steps = total_steps_for(len(train_rows), cfg, "rows")
    fingerprint = data.fingerprint(train_rows)
    state = resume_state(run, cfg, fingerprint)  # a resumed run must continue the same run
    lengths = [data.row_length(ex) for ex in train_rows]  # tokens/s counts every sequence's prompt
    packed_lengths = [data.row_length(ex, cfg.shared_prompt) for ex in train_rows]  # what the budget holds
    budget = cfg.max_tokens_per_micro_batch or 3 * cfg.max_length
    micro = f"micro-batches of <= {budget} tokens" if cfg.packing else f"micro-batches of {cfg.micro_batch_size} rows"
    micro += ", prompts shared by their responses" if cfg.shared_prompt else ""
    print0(f"{len(train_rows)} training rows, {len(eval_rows)} held-out rows; world {run.world} on "
           f"{run.device.type}; {total_steps} optimizer steps of {cfg.global_batch_size} rows "
           f"({rows_per_rank} per rank, in {micro})")
    write_run_config(run, cfg)

    # --- models: frozen sharded reference (or its cached log-probs), sharded policy (fp32 master weights)
    def load_ref():
        return load_model(ref_path, run.mesh, run.device, DTYPES[cfg.dtype], trainable=False,
                          trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation,
                          logprobs=cfg.logprobs)

    if cfg.loss_type == "simpo":  # no reference model at all
        train_ref = eval_ref = lambda batch, rows: None  # noqa: E731
    elif cfg.ref_logps == "live":
        ref = load_ref()

        @torch.no_grad()
        def train_ref(batch, rows):
            return row_logps(ref, batch)
        eval_ref = train_ref
    else:
        datasets = [(cfg.data, train_rows)] + ([(cfg.eval_data, eval_rows)] if eval_rows else [])
        tables = precomputed_reference(load_ref, ref_path, datasets, cfg, run)
        train_ref = lambda batch, rows: tables[0][rows].to(run.device)  # noqa: E731
        eval_ref = lambda batch, rows: tables[-1][rows].to(run.device)  # noqa: E731
    policy, optimizer = load_policy(run, cfg)

    def run_eval(step):
        if not eval_rows:
            return {}
        m = evaluate(policy, eval_ref, eval_rows, cfg, run, get_alpha(step, total_steps, cfg.alpha, cfg.alpha_schedule))
        print0(f"step {step}: held-out reward accuracy {m['eval/rewards/accuracies']:.3f} "
               f"(source {m['eval/rewards/source_accuracies']:.3f}, target {m['eval/rewards/target_accuracies']:.3f}), "
               f"margin {m['eval/rewards/margins']:.4f}")
        return m

    # --- training loop (resumed: from the checkpoint's step, with its weights and optimizer state)
    with RunGuard(run, cfg, policy, optimizer, run_eval, total_steps, fingerprint, state, "wrpo", LOG_FIELDS) as guard:
        for step, epoch, micro_batches in training_steps(len(train_rows), cfg, run, total_steps, guard.start):
            t0 = time.time()
            lr = set_lr(optimizer, get_lr(step, total_steps, cfg.lr, cfg.warmup_ratio))
            alpha = get_alpha(step, total_steps, cfg.alpha, cfg.alpha_schedule)
            if cfg.packing:  # regroup this rank's rows by token budget instead of row count
                rows = [i for mb in micro_batches for i in mb]
                micro_batches = same_count_on_all_ranks(data.token_budget_batches(rows, packed_lengths, budget), run)
            sums, tokens, computed, seen = MetricSum(), 0, 0, []
            for rows in micro_batches:
                batch = data.collate([train_rows[i] for i in rows], run.pad_id, cfg.packing, cfg.shared_prompt)
                batch = to_device(batch, run.device)
                tokens += sum(lengths[i] for i in rows)
                computed += sum(packed_lengths[i] for i in rows)
                losses, rewards, logps = preference_forward(policy, batch, train_ref(batch, rows), alpha, cfg.beta,
                                                             cfg.loss_type, cfg.gamma)
                # FSDP averages gradients over ranks, so dividing by this rank's rows per step
                # yields the gradient of the mean loss over the global batch
                (losses.sum() / rows_per_rank).backward()
                sums.add(row_metrics(losses, rewards, logps), torch.ones_like(losses))
                seen.append(([data.row_name(train_rows[i]) for i in rows], losses.detach()))
            metrics = sums.mean()
            grad_norm = guard.step(step, metrics["loss"], seen)  # clip, then update only if all is finite

            # --- log, evaluate, checkpoint (and stop here after SIGTERM / SIGINT)
            m = {"step": step + 1, "epoch": epoch, "lr": lr, "alpha": alpha, "grad_norm": grad_norm, **metrics,
                 **throughput(tokens, t0, run, computed)}
            guard.end_step(m)

        # --- final evaluation and checkpoint
        eval_after = guard.finish()
    if eval_rows:
        print0(f"held-out reward accuracy: {guard.eval_before['eval/rewards/accuracies']:.3f} before -> "
               f"{eval_after['eval/rewards/accuracies']:.3f} after")
    cleanup()


if __name__ == "__main__":
    run_main(main)
