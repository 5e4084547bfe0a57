"""Weighted-Reward Preference Optimization (WRPO, Yang et al., ICLR 2025) on native FSDP2.

Demo (2 CPU processes, about a minute):
    torchrun --nproc_per_node=2 wrpo.py --config=demo/wrpo.json
One 8-GPU node, the paper's setup (policy and reference = the SFT model):
    torchrun --nproc_per_node=8 wrpo.py --model=PATH_TO_SFT --data=wrpo_train.jsonl --out_dir=out/wrpo
Settings: `--config=file.json` (optional), then `--key=value` overrides; see Config below."""

import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import batching
import data
import tokens
from checkpoint import restore, resume_state, save_checkpoint, save_final
from fsdp_utils import cleanup, is_master, load_model, print0
from lifecycle import Preempted, cli, start_run, stop_requested, stop_signals, write_run_config
from logps import model_sequence_logps, resolve_impl
from training import RESUME_FREE, MetricsLog, MetricSum, TrainConfig, clip_grad_norm, every, get_lr, load_cached, \
    nonfinite_step, parse_config, set_lr, throughput, total_steps_for


@dataclass
class Config(TrainConfig):
    # model and data (the settings both stages share, such as batch size and dtype: TrainConfig in training.py)
    ref_model: str = ""  # frozen reference; empty = the same checkpoint as `model`
    ref_logps: str = "precompute"  # precompute: one pass of the reference before training, cached; live: every step
    ref_cache_dir: str = ""  # where precomputed reference log-probs are cached; empty = next to the data file
    out_dir: str = "out/wrpo"  # metrics.jsonl, config.json and checkpoints go here
    # WRPO objective
    beta: float = 0.01  # scale of the implicit reward beta * log(pi / pi_ref)
    alpha: float = 0.1  # weight of the source response y_ws (the paper's alpha_max)
    num_sources: int = 0  # K source responses each WRPO row must have (weighted: source_weights); 0: any K >= 1
    alpha_schedule: str = "linear"  # linear: 0 -> alpha over the run; constant: alpha throughout
    loss_type: str = "sigmoid"  # sigmoid (DPO-style, the paper's), ipo, simpo (no reference; set beta ~2, gamma)
    gamma: float = 0.0  # SimPO's target reward margin
    length_normalize: bool = False  # log-probs averaged over response tokens (FuseChat-3.0's Llama; simpo's always)
    lr: float = 3e-7  # peak learning rate (AdamW)
    # sequences (global_batch_size counts rows; each row is 3 sequences, K + 2 with K sources)
    packing: bool = True  # all sequences of a micro-batch in one row, no padding; micro-batches by token budget
    max_tokens_per_micro_batch: int = 0  # with packing: tokens per forward pass (0: 3 x max_length, a paper row)
    shared_prompt: bool = True  # with packing and packed_sdpa attention: one copy of each prompt for its responses
    max_prompt_length: int = 1800  # prompt tokens kept (from the end) when a row is too long
    truncation: str = "keep_end"  # keep_end: the paper's rule; error: reject over-long rows


LOSS_TYPES = ("sigmoid", "ipo", "simpo")


def wrpo_problems(cfg):
    checks = [(cfg.beta > 0, f"beta must be > 0, got {cfg.beta}"),
              (0 <= cfg.alpha <= 1, f"alpha must be in [0, 1], got {cfg.alpha}"),
              (cfg.alpha_schedule in ("linear", "constant"),
               f"alpha_schedule must be 'linear' or 'constant', got '{cfg.alpha_schedule}'"),
              (cfg.loss_type in LOSS_TYPES, f"loss_type must be one of {', '.join(LOSS_TYPES)}, got '{cfg.loss_type}'"),
              (cfg.gamma >= 0, f"gamma must be >= 0, got {cfg.gamma}"),
              (cfg.num_sources >= 0, f"num_sources must be >= 0 (0: any), got {cfg.num_sources}"),
              (cfg.ref_logps in ("precompute", "live"),
               f"ref_logps must be 'precompute' or 'live', got '{cfg.ref_logps}'"),
              (cfg.max_tokens_per_micro_batch >= 0,
               f"max_tokens_per_micro_batch must be >= 0 (0: 3 x max_length), got {cfg.max_tokens_per_micro_batch}")]
    return [problem for ok, problem in checks if not ok] + \
        data.settings_problems("preference", cfg.max_length, cfg.truncation, cfg.max_prompt_length)


# --- the WRPO objective and its schedules

def wrpo_loss(policy_ws, policy_wt, policy_l, ref_ws, ref_wt, ref_l, *, alpha, beta, loss_type="sigmoid", gamma=0.0):
    """Per-example WRPO losses and implicit rewards (Yang et al., arXiv 2412.03187, the WRPO objective).

    Inputs are [B] tensors of log pi(y|x) SUMMED over response tokens, for the policy and the frozen reference, on
    y_ws (best source response; with K of them, their log-probs' weighted sum, so d(y_ws) is the weighted sum of
    their d), y_wt (best target response) and y_l (worst target response). With the implicit
    reward r(y) = beta * d(y), d(y) = log pi_theta(y|x) - log pi_ref(y|x), the paper's weighted reward of the
    preferred side r(x, y_w) = alpha * r(y_ws) + (1 - alpha) * r(y_wt) goes into the Bradley-Terry likelihood of
    preferring it to y_l:

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
    target_chosen, chosen (the alpha-weighted one) and rejected."""
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
    rewards = {"source_chosen": beta * d_ws.detach(), "target_chosen": beta * d_wt.detach(),
               "chosen": beta * d_chosen.detach(), "rejected": beta * d_l.detach()}
    return losses, rewards


def get_alpha(step, total_steps, alpha, schedule, recipe="default"):
    """The fusion coefficient of the paper's progressive adaptation: the source response's weight, linear from 0 at
    optimizer step 0 to `alpha` (alpha_max) at the last step; `constant` is the paper's fixed-alpha ablation. The
    authors' code divides by the number of steps, not the last step's: alpha * step / total_steps, below alpha."""
    if schedule == "constant":
        return alpha
    return alpha * min(1.0, step / max(1, total_steps if recipe == "authors" else total_steps - 1))


# --- one micro-batch: log-probs, the loss, metrics

def row_logps(model, batch, average=False):
    """Log-probs of each row's (source chosen, target chosen, rejected) responses [B, 3], summed over response tokens,
    or with average=True (SimPO; sigmoid and ipo with length_normalize) averaged over them. The source's is the
    weighted sum over the row's K source responses: sum_k w_k log pi(y_ws_k|x) (K = 1: the one's, bit for bit)."""
    logps, counts = model_sequence_logps(model, batch)
    if average:
        logps = logps / counts.clamp(min=1)
    source = (logps[batch["src"]] * batch["src_w"]).sum(-1)
    return torch.stack([source, logps[batch["wt"]], logps[batch["rej"]]], dim=-1)


def preference_forward(policy, batch, reference, idx, alpha, cfg):
    """The reference's log-probs of a micro-batch's rows (idx: their indices; reference, load_reference's: a
    precomputed [n_rows, 3] table, the live frozen model, or None for SimPO), the policy's (with grad), then the loss:
    per-row losses, rewards and policy log-probs."""
    average = cfg.loss_type == "simpo" or cfg.length_normalize
    if torch.is_tensor(reference):
        ref = reference[idx].to(batch["wt"].device)
    elif reference is not None:
        with torch.no_grad():
            ref = row_logps(reference, batch, average)
    pol = row_logps(policy, batch, average)
    ref = torch.zeros_like(pol) if reference is None else ref
    losses, rewards = wrpo_loss(*pol.unbind(-1), *ref.unbind(-1), alpha=alpha, beta=cfg.beta,
                                loss_type=cfg.loss_type, gamma=cfg.gamma)
    return losses, rewards, dict(zip(("source_chosen", "target_chosen", "rejected"), pol.detach().unbind(-1)))


def collate(rows, cfg, run):
    """A micro-batch of preference rows as tensors on the run's device, packed as cfg says, prompts shared and the
    varlen layout built where the run can take them."""
    batch = batching.collate_preference(rows, run.pad_id, cfg.packing, run.shared_prompt, run.varlen)
    return batching.to_device(batch, run.device)


def row_metrics(losses, rewards, logps):
    """Per-row [B] metrics; summed over rows and ranks, then divided by the row count. An accuracy is 1 where a chosen
    reward beats the rejected one, 1/2 on ties: an untrained policy (identical to its reference) scores 0.5."""
    won = {k: (rewards[k] > rewards["rejected"]).float() + 0.5 * (rewards[k] == rewards["rejected"]).float()
           for k in ("chosen", "source_chosen", "target_chosen")}
    return {"loss": losses.detach(), **{f"rewards/{k}": v for k, v in rewards.items()},
            "rewards/margins": rewards["chosen"] - rewards["rejected"], "rewards/accuracies": won["chosen"],
            "rewards/source_accuracies": won["source_chosen"], "rewards/target_accuracies": won["target_chosen"],
            **{f"logps/{k}": v for k, v in logps.items()}}


# --- the reference: its log-probs precomputed in one pass (and cached), or the live frozen model

def load_reference(cfg, run, train_rows, eval_rows):
    """The references of the training and held-out rows: [n_rows, 3] tables of log-probs (precompute: cached, or one
    pass of the reference model, loaded only then), the live frozen model (live), or None (SimPO has none)."""
    if cfg.loss_type == "simpo":
        return None, None
    ref_path = run.models["ref_model"]
    if cfg.ref_logps == "live":
        ref = load_model(ref_path, run.mesh, run.device, cfg, attn=run.attn, trainable=False)
        return ref, ref
    models, tables = [], []  # models: the reference, once a cache is missing

    def compute(rows, train, name):  # in the micro-batches the policy runs them: evaluate's, or the first epoch's
        models[:] = models or [load_model(ref_path, run.mesh, run.device, cfg, attn=run.attn, trainable=False)]
        batches = training_layout(rows, cfg, run) if train else no_grad_batches(
            batching.row_lengths(rows, run.shared_prompt), cfg, run)
        return {"logps": compute_reference(models[0], rows, batches, cfg, run, f"reference {name}").numpy()}, {}

    layout = f"{run.attn}|{run.varlen}|{resolve_impl(cfg.logps_impl, run.device)}|{run.world}|{run.shared_prompt}|" + (
        f"packed {token_budget(cfg)}" if cfg.packing else f"padded {cfg.micro_batch_size}") + f"|{cfg.length_normalize}"
    for data_path, rows, train in [(cfg.data, train_rows, True), (cfg.eval_data, eval_rows, False)]:
        if not rows:
            tables.append(None)
            continue
        file, key = reference_cache(cfg, layout + (f"|{cfg.seed}|{cfg.global_batch_size}" if train else ""),
                                    run.weights["ref_model"], rows, data_path)
        t0 = time.time()
        arrays, _, how = tokens.cached(file, key, lambda: compute(rows, train, Path(data_path).name),
                                       "reference log-probs", print0)
        tables.append(torch.from_numpy(arrays["logps"][:]))
        print0(f"reference log-probs: {file} (cached)" if how == "cached" else f"reference log-probs: "
               f"{file if how == 'written' else 'not cached'} ({len(rows)} rows in {time.time() - t0:.1f}s)")
    return tables[0], tables[1]


def reference_cache(cfg, layout, identity, rows, data_path):
    """(file, key) of the cache of `rows`' reference log-probs; the key covers all they depend on: the reference's
    weights (identity: checkpoint.model_identity's), the tokenized rows, the dtype and `layout` (the kernels and
    micro-batches they ran in), so a stale cache is never read."""
    h = hashlib.sha256(f"{tokens.fingerprint(rows)}|{cfg.dtype}|{layout}|{sorted(identity.items())}".encode())
    name = f"{Path(data_path).name}.ref-logps-{h.hexdigest()[:20]}.safetensors"
    return tokens.cache_folder(cfg.ref_cache_dir, data_path) / name, h.hexdigest()


@torch.no_grad()
def compute_reference(ref, rows, batches, cfg, run, desc):
    """One no-grad pass of the reference over every row, in this rank's `batches` ((indices, weights) micro-batches):
    [n_rows, 3] on CPU, the same on all ranks. Each rank fills its own rows (a short rank's padding has weight 0) and
    the sum over ranks fills them all."""
    table, quiet = torch.zeros(len(rows), 3, device=run.device), not is_master() or not sys.stderr.isatty()
    for idx, weight in tqdm(batches, desc=desc, disable=quiet):
        keep = weight > 0
        batch = collate([rows[i] for i in idx], cfg, run)
        table[torch.tensor(idx)[keep]] = row_logps(ref, batch, cfg.length_normalize).float()[keep]  # (SimPO: none)
    dist.all_reduce(table)
    return table.cpu()


def token_budget(cfg):
    """Tokens per packed micro-batch."""
    return cfg.max_tokens_per_micro_batch or 3 * cfg.max_length


def step_micro_batches(idx, lengths, cfg, run):
    """A step's rows on this rank (idx: their indices) as its micro-batches: packed by the token budget (lengths: each
    row's tokens, batching.row_lengths), else micro_batch_size rows. Collective."""
    if cfg.packing:
        return batching.micro_batches_by_tokens(idx, lengths, token_budget(cfg), run.device)
    return batching.micro_batches_by_rows(idx, cfg.micro_batch_size)


def no_grad_batches(lengths, cfg, run):
    """This rank's share of rows (lengths: their tokens, batching.row_lengths) for a no-grad pass as (indices,
    weights [B]) micro-batches, as many on every rank: the training's token budget with packing, else micro_batch_size
    rows. Collective."""
    if cfg.packing:
        return batching.eval_batches_by_tokens(lengths, token_budget(cfg), run.rank, run.world, run.device)
    return list(batching.eval_batches(len(lengths), cfg.micro_batch_size, run.rank, run.world))


def training_layout(rows, cfg, run):
    """The training rows in this rank's micro-batches of the first epoch's steps, as (indices, weights [B]), then the
    rows that epoch leaves out (its last partial batch) as no_grad_batches cuts them. Collective."""
    lengths = batching.row_lengths(rows, run.shared_prompt)
    steps = batching.train_steps(len(rows), 1, cfg.seed, cfg.global_batch_size, run.rank, run.world, len(rows))
    out = [(mb, torch.ones(len(mb))) for _, _, idx in steps for mb in step_micro_batches(idx, lengths, cfg, run)]
    left = batching.epoch_order(len(rows), cfg.seed, 0)[len(rows) // cfg.global_batch_size * cfg.global_batch_size:]
    return out + [([left[i] for i in idx], w) for idx, w in no_grad_batches([lengths[i] for i in left], cfg, run)]


def check_step_one(d, run):
    """After step 1 of a run whose reference has the policy's weights, every d(y) (d: this rank's [B] tensors of them)
    must be exactly 0 (accuracies 1/2, margins 0, the sigmoid loss ln 2); one line says whether it held. Collective."""
    worst = torch.cat(d).abs().max()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    print0("step 1: policy == reference, max |d| = 0" if worst.item() == 0 else f"warning: step 1: policy == "
           f"reference, yet max |d| = {worst.item():.3g}, not 0: the reference log-probs differ from the policy's own "
           "(a nondeterministic kernel, or a reference computed otherwise)")


# --- held-out evaluation

@torch.no_grad()
def evaluate(policy, reference, rows, alpha, cfg, run):
    """Held-out implicit-reward metrics (accuracy: the weighted chosen reward beats the rejected one),
    over all ranks. reference: as for preference_forward; cfg: the objective's settings and the batching's."""
    policy.eval()
    sums = MetricSum()
    for idx, weight in no_grad_batches(batching.row_lengths(rows, run.shared_prompt), cfg, run):
        batch = collate([rows[i] for i in idx], cfg, run)
        losses, rewards, logps = preference_forward(policy, batch, reference, idx, alpha, cfg)
        sums.add(row_metrics(losses, rewards, logps), weight.to(run.device))
    policy.train()
    return {f"eval/{k}": v for k, v in sums.mean().items()}


def held_out(policy, reference, rows, cfg, run, step, total_steps, before=None):
    """evaluate() after `step` optimizer steps (alpha as at that step), printed, and compared with the
    metrics `before` training when given; {} without rows."""
    if not rows:
        return {}
    m = evaluate(policy, reference, rows, get_alpha(step, total_steps, cfg.alpha, cfg.alpha_schedule, cfg.recipe),
                 cfg, run)
    print0(f"step {step}: held-out reward accuracy {m['eval/rewards/accuracies']:.3f} "
           f"(source {m['eval/rewards/source_accuracies']:.3f}, target {m['eval/rewards/target_accuracies']:.3f}), "
           f"margin {m['eval/rewards/margins']:.4f}")
    if before:
        print0(f"held-out reward accuracy: {before['eval/rewards/accuracies']:.3f} before -> "
               f"{m['eval/rewards/accuracies']:.3f} after")
    return m


# --- training

LOG_FIELDS = [("loss", "loss", ".4f"), ("rewards/accuracies", "acc", ".3f"), ("rewards/margins", "margin", ".4g"),
              ("alpha", "alpha", ".4f"), ("lr", "lr", ".3g"), ("grad_norm", "grad norm", ".3g"),
              ("tokens_per_s", "tok/s", ".0f"), ("mfu", "MFU", ".1%")]
RESUME_FREE_WRPO = RESUME_FREE | {"max_tokens_per_micro_batch", "ref_logps", "ref_cache_dir", "ref_model"}


def load_rows(path, cfg, run):
    """Every row of `path` read, validated and tokenized ([] without a path), through the token cache: bad rows stop
    the run here."""
    if not path:
        return []
    return load_cached(data.load_preference_rows, path, run.tokenizer, cfg.data_cache_dir, report=print0,
                       max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, truncation=cfg.truncation,
                       recipe=cfg.recipe, num_sources=cfg.num_sources, skip_invalid=cfg.skip_invalid_rows,
                       allow_special_tokens=cfg.allow_special_tokens)


def main(argv):
    # --- setup: settings, paths, tokenizer and every data row checked before a model is loaded or a file written
    cfg = parse_config(Config, argv)
    run = start_run(cfg, wrpo_problems(cfg), other_models={"ref_model": cfg.ref_model or cfg.model})
    train_rows, eval_rows = load_rows(cfg.data, cfg, run), load_rows(cfg.eval_data, cfg, run)
    total_steps = total_steps_for(len(train_rows), cfg, "rows")
    fingerprint, eval_fingerprint = tokens.fingerprint(train_rows), tokens.fingerprint(eval_rows) if eval_rows else ""
    state = resume_state(run, cfg, RESUME_FREE_WRPO, fingerprint, eval_fingerprint)
    lengths = batching.row_lengths(train_rows)  # tokens/s counts every sequence with its prompt
    packed_lengths = batching.row_lengths(train_rows, run.shared_prompt)  # the tokens a forward runs
    print_plan(cfg, run, len(train_rows), len(eval_rows), total_steps)
    write_run_config(run, cfg)
    train_reference, eval_reference = load_reference(cfg, run, train_rows, eval_rows)  # tables, a model, or None
    policy = load_model(run.model_path, run.mesh, run.device, cfg, attn=run.attn, trainable=True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, foreach=True)  # foreach: one kernel per op
    if (eval_before := (state or {}).get("eval_before")) is None:  # fresh, or another held-out set: step 0 weights
        eval_before = held_out(policy, eval_reference, eval_rows, cfg, run, 0, total_steps)
    start, skipped = restore(run, policy, optimizer, state)  # a resumed run: the checkpoint's step and skips; else 0
    log = MetricsLog(run, total_steps, start, cfg.log_every, "wrpo", LOG_FIELDS)

    # --- training loop: SIGTERM / SIGINT are caught from here to the end, so a step (or the final save) finishes
    with stop_signals(run.rank) as signals:
        for step, epoch, idx in batching.train_steps(len(train_rows), cfg.epochs, cfg.seed, cfg.global_batch_size,
                                                     run.rank, run.world, total_steps, start):
            t0 = time.time()
            lr = set_lr(optimizer, get_lr(step, total_steps, cfg.lr, cfg.warmup_ratio))
            alpha = get_alpha(step, total_steps, cfg.alpha, cfg.alpha_schedule, cfg.recipe)
            sums, seen, d = MetricSum(), [], []
            for mb in step_micro_batches(idx, packed_lengths, cfg, run):
                batch = collate([train_rows[i] for i in mb], cfg, run)
                losses, rewards, logps = preference_forward(policy, batch, train_reference, mb, alpha, cfg)
                # FSDP averages gradients over ranks: dividing by this rank's rows gives the global mean's gradient
                (losses.sum() / len(idx)).backward()
                sums.add(row_metrics(losses, rewards, logps), torch.ones_like(losses))
                seen.append(([tokens.row_name(train_rows[i]) for i in mb], losses.detach()))
                if step == 0:  # every d(y) of step 1, for check_step_one
                    d += [rewards[k] / cfg.beta for k in ("source_chosen", "target_chosen", "rejected")]
            metrics = sums.mean()
            grad_norm = clip_grad_norm(policy, cfg.grad_clip)
            if math.isfinite(metrics["loss"]) and math.isfinite(grad_norm):
                optimizer.step()
            else:  # stops, naming the rows at fault (nonfinite=stop), or leaves the weights as they are (skip)
                skipped = nonfinite_step(step + 1, metrics["loss"], grad_norm, seen, run, cfg, skipped)
            optimizer.zero_grad(set_to_none=True)
            if step == 0 and cfg.loss_type != "simpo" and run.weights["model"] == run.weights["ref_model"]:
                check_step_one(d, run)

            # --- log, evaluate, checkpoint; after SIGTERM / SIGINT on any rank, save and stop
            m = {"step": step + 1, "epoch": epoch, "lr": lr, "alpha": alpha, "grad_norm": grad_norm, **metrics,
                 **throughput(sum(lengths[i] for i in idx), t0, run, policy, sum(packed_lengths[i] for i in idx)),
                 "skipped_steps": skipped}
            if every(cfg.eval_every, step + 1, total_steps):
                m.update(held_out(policy, eval_reference, eval_rows, cfg, run, step + 1, total_steps))
            log.log(m)
            meta = {"fingerprint": fingerprint, "eval_fingerprint": eval_fingerprint, "eval_before": eval_before,
                    "skipped_steps": skipped, "models": run.weights}
            if signum := stop_requested(signals, run.device):  # quick: the resumable state only, no HF weights
                path = save_checkpoint(run, cfg, policy, optimizer, step + 1, meta, hf=False)
                raise Preempted(signum, step + 1, path)
            if every(cfg.save_every, step + 1, total_steps):
                save_checkpoint(run, cfg, policy, optimizer, step + 1, meta)

        # --- final evaluation and weights
        log.close(held_out(policy, eval_reference, eval_rows, cfg, run, total_steps, total_steps, before=eval_before))
        save_final(run, cfg, policy, total_steps, skipped)
    cleanup()


def print_plan(cfg, run, n_train, n_eval, total_steps):
    micro = (f"micro-batches of <= {token_budget(cfg)} tokens" if cfg.packing else
             f"micro-batches of {cfg.micro_batch_size} rows")
    micro += ", prompts shared by their responses" if run.shared_prompt else ""
    print0(f"{n_train} training rows, {n_eval} held-out rows; world {run.world} on {run.device.type}; "
           f"{total_steps} optimizer steps of {cfg.global_batch_size} rows ({cfg.global_batch_size // run.world} "
           f"per rank, in {micro})")


if __name__ == "__main__":
    cli(main)
