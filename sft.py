"""Supervised fine-tuning of the target on the best source responses, the first stage: the paper fine-tunes on y_ws
for one third of the prompts (`python -m eval.split`), then runs WRPO on the rest from, and referenced to, this model.

Demo (2 CPU processes):
    python -m eval.split --data=demo/data/train.jsonl --out_dir=out/demo-split
    torchrun --nproc_per_node=2 sft.py --config=demo/sft.json
One 8-GPU node, the paper's setup:
    torchrun --nproc_per_node=8 sft.py --model=meta-llama/Meta-Llama-3-8B-Instruct --data=split/sft.jsonl \
        --out_dir=out/sft
Settings: `--config=file.json` (optional), then `--key=value` overrides; see Config below."""

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

import batching
import data
import tokens
from checkpoint import restore, resume_state, save_checkpoint, save_final
from fsdp_utils import cleanup, load_model, print0
from lifecycle import Preempted, cli, start_run, stop_requested, stop_signals, write_run_config
from logps import IGNORE, model_sequence_logps
from training import RESUME_FREE, MetricsLog, MetricSum, TrainConfig, clip_grad_norm, every, get_lr, global_sum, \
    load_cached, nonfinite_step, parse_config, set_lr, throughput, total_steps_for


@dataclass
class Config(TrainConfig):
    # model and data (the settings both stages share, such as batch size and dtype: TrainConfig in training.py)
    data: str = "demo/data/train.jsonl"  # chat rows {"messages": [...]} or WRPO rows (trains on prompt + chosen[0])
    out_dir: str = "out/sft"  # metrics.jsonl, config.json and checkpoints go here
    lr: float = 7e-6  # peak learning rate (AdamW)
    # sequences (global_batch_size and micro_batch_size count sequences of up to max_length tokens)
    packing: bool = True  # several whole examples per sequence, attention kept within each (as in the paper)
    loss_on: str = "assistant"  # assistant: assistant turns only; all: every token (the paper's setting)
    truncation: str = "keep_start"  # keep_start: cut long examples to max_length; error: reject them


@torch.no_grad()
def held_out(policy, examples, seqs, cfg, run, step, before=None):
    """Mean per-token loss on held-out examples (seqs: their grouping into sequences) over all ranks, printed, and
    compared with the metrics `before` training when given; {} without examples."""
    if not examples:
        return {}
    policy.eval()
    sums = MetricSum()
    for idx, weight in batching.eval_batches(len(seqs), cfg.micro_batch_size, run.rank, run.world):
        batch = batching.collate_packed([[examples[e] for e in seqs[i]] for i in idx], run.pad_id, varlen=run.varlen)
        logps, counts = model_sequence_logps(policy, batching.to_device(batch, run.device))  # summed per packed row
        sums.add({"loss": -logps / counts.clamp(min=1)}, counts * weight.to(run.device))
    policy.train()
    m = {f"eval/{k}": v for k, v in sums.mean().items()}
    print0(f"step {step}: held-out loss {m['eval/loss']:.4f}")
    if before:
        print0(f"held-out loss: {before['eval/loss']:.4f} before -> {m['eval/loss']:.4f} after")
    return m


LOG_FIELDS = [("loss", "loss", ".4f"), ("lr", "lr", ".3g"), ("grad_norm", "grad norm", ".3g"),
              ("tokens_per_s", "tok/s", ".0f"), ("mfu", "MFU", ".1%")]


def load_examples(path, cfg, run):
    """(examples, sequences: packed into max_length tokens, or one each) of the rows of `path`; ([], []) if none."""
    if not path:
        return [], []
    examples = load_cached(data.load_sft_examples, path, run.tokenizer, cfg.data_cache_dir, report=print0,
                           max_length=cfg.max_length, loss_on=cfg.loss_on, truncation=cfg.truncation, recipe=cfg.recipe,
                           skip_invalid=cfg.skip_invalid_rows, allow_special_tokens=cfg.allow_special_tokens)
    if cfg.recipe == "authors":  # sequences already
        examples = concatenated(examples, cfg.max_length, path)
    return examples, (batching.pack(batching.row_lengths(examples), cfg.max_length)
                      if cfg.packing and cfg.recipe != "authors" else [[i] for i in range(len(examples))])


def concatenated(examples, length, path):
    """The authors' packing (TRL's ConstantLengthDataset): the examples' tokens back to back, cut into sequences of
    `length` tokens, a last partial one dropped; each is one stream, attended across its examples, scored on every
    token but its first, and named by the rows it spans."""
    n, ends = len(examples.tokens) // length * length, examples.offsets[1:]
    if n == 0:
        raise data.DataError(f"{path}: {len(examples.tokens)} tokens, short of one whole sequence of {length}")
    starts = np.arange(0, n, length)
    spans = zip(np.searchsorted(ends, starts, "right"), np.searchsorted(ends, starts + length - 1, "right"))
    print0(f"data: the authors' recipe: {len(examples)} examples of {path} in {len(starts)} sequences of {length} "
           f"tokens ({len(examples.tokens) - n} left over); packing, loss_on and truncation do not apply")
    arrays = dict(tokens=examples.tokens[:n], offsets=np.append(starts, n), firsts=np.arange(len(starts) + 1),
                  scored=(np.arange(n) % length != 0).astype(np.uint8))
    where = [examples.where[a] + ("" if a == b else f" .. {examples.where[b]}") for a, b in spans]
    return tokens.TokenRows("sft", arrays, where, [])


def main(argv):
    # --- setup: settings, paths, tokenizer and every data row checked before the model is loaded or a file written
    cfg = parse_config(Config, argv)
    run = start_run(cfg, data.settings_problems("sft", cfg.max_length, cfg.truncation, loss_on=cfg.loss_on))
    (examples, seqs), (eval_examples, eval_seqs) = (load_examples(p, cfg, run) for p in (cfg.data, cfg.eval_data))
    total_steps = total_steps_for(len(seqs), cfg, "sequences")
    fingerprint = tokens.fingerprint(examples, seqs if cfg.packing else None)  # the rows, and how they are packed
    eval_fingerprint = tokens.fingerprint(eval_examples, eval_seqs if cfg.packing else None) if eval_examples else ""
    state = resume_state(run, cfg, RESUME_FREE, fingerprint, eval_fingerprint)
    print_plan(cfg, run, examples, seqs, len(eval_examples), total_steps)
    write_run_config(run, cfg)
    policy = load_model(run.model_path, run.mesh, run.device, cfg, attn=run.attn, trainable=True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, foreach=True)  # foreach: one kernel per op
    if (eval_before := (state or {}).get("eval_before")) is None:  # fresh, or another held-out set: step 0 weights
        eval_before = held_out(policy, eval_examples, eval_seqs, cfg, run, 0)
    start, skipped = restore(run, policy, optimizer, state)  # a resumed run: the checkpoint's step and skips; else 0
    log = MetricsLog(run, total_steps, start, cfg.log_every, "sft", LOG_FIELDS)

    # --- training loop: SIGTERM / SIGINT are caught from here to the end, so a step (or the final save) finishes
    with stop_signals(run.rank) as signals:
        for step, epoch, idx in batching.train_steps(len(seqs), cfg.epochs, cfg.seed, cfg.global_batch_size,
                                                     run.rank, run.world, total_steps, start):
            t0 = time.time()
            lr = set_lr(optimizer, get_lr(step, total_steps, cfg.lr, cfg.warmup_ratio))
            micro_batches = batching.micro_batches_by_rows(idx, cfg.micro_batch_size)  # of sequences
            groups = [[[examples[e] for e in seqs[i]] for i in mb] for mb in micro_batches]
            batches = [batching.collate_packed(g, run.pad_id, varlen=run.varlen) for g in groups]
            # the step's loss is the mean over every loss token of the global batch: count them first
            n_loss = global_sum(sum(int((b["labels"] != IGNORE).sum()) for b in batches), run.device)
            sums, seen = MetricSum(), []
            for group, batch in zip(groups, batches):
                logps, counts = model_sequence_logps(policy, batching.to_device(batch, run.device))  # per packed row
                (-logps.sum() * run.world / n_loss).backward()  # FSDP averages gradients over ranks: hence world
                sums.add({"loss": -logps.detach() / counts.clamp(min=1)}, counts)
                seen.append(([", ".join(ex.where for ex in seq) for seq in group], -logps.detach()))
            metrics, grad_norm = sums.mean(), clip_grad_norm(policy, cfg.grad_clip)
            if math.isfinite(metrics["loss"]) and math.isfinite(grad_norm):
                optimizer.step()
            else:  # stops, naming the rows at fault (nonfinite=stop), or leaves the weights as they are (skip)
                skipped = nonfinite_step(step + 1, metrics["loss"], grad_norm, seen, run, cfg, skipped)
            optimizer.zero_grad(set_to_none=True)

            # --- log, evaluate, checkpoint; after SIGTERM / SIGINT on any rank, save and stop
            n_tokens = sum(len(ex.ids) for g in groups for seq in g for ex in seq)
            m = {"step": step + 1, "epoch": epoch, "lr": lr, "grad_norm": grad_norm, **metrics,
                 **throughput(n_tokens, t0, run, policy), "skipped_steps": skipped}
            if every(cfg.eval_every, step + 1, total_steps):
                m.update(held_out(policy, eval_examples, eval_seqs, cfg, run, step + 1))
            log.log(m)
            meta = {"fingerprint": fingerprint, "eval_fingerprint": eval_fingerprint, "eval_before": eval_before,
                    "skipped_steps": skipped, "models": run.weights}
            if signum := stop_requested(signals, run.device):  # quick: the resumable state only, no HF weights
                path = save_checkpoint(run, cfg, policy, optimizer, step + 1, meta, hf=False)
                raise Preempted(signum, step + 1, path)
            if every(cfg.save_every, step + 1, total_steps):
                save_checkpoint(run, cfg, policy, optimizer, step + 1, meta)

        # --- final evaluation and weights
        log.close(held_out(policy, eval_examples, eval_seqs, cfg, run, total_steps, before=eval_before))
        save_final(run, cfg, policy, total_steps, skipped)
    cleanup()


def print_plan(cfg, run, examples, seqs, n_eval, total_steps):
    fill = sum(batching.row_lengths(examples)) / (len(seqs) * cfg.max_length)
    train, held = ((f"{len(seqs)} sequences", "sequences") if cfg.recipe == "authors" else  # (concatenated's already)
                   (f"{len(examples)} examples in {len(seqs)} sequences", "examples"))
    print0(f"{train} ({fill:.0%} of max_length {cfg.max_length} used), {n_eval} held-out {held}; world {run.world} "
           f"on {run.device.type}; {total_steps} optimizer steps of {cfg.global_batch_size} sequences")


if __name__ == "__main__":
    cli(main)
