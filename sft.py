"""Supervised fine-tuning of the target on the best source responses: the first stage of WRPO.

The paper fine-tunes the target on y_ws for one third of the prompts (`python data.py split`),
then runs WRPO on the other two thirds starting from, and referenced to, this SFT model.

Demo (2 CPU processes):
    python data.py split --data=demo/data/train.jsonl --out_dir=out/demo-split
    torchrun --nproc_per_node=2 sft.py --config=demo/sft.json
One 8-GPU node, the paper's setup:
    torchrun --nproc_per_node=8 sft.py --model=meta-llama/Meta-Llama-3-8B-Instruct --data=split/sft.jsonl \
        --out_dir=out/sft
Settings: `--config=file.json` (optional), then `--key=value` overrides; see Config below.
"""

import time
from dataclasses import dataclass

import torch

import data
from fsdp_utils import cleanup, print0
from logprobs import model_sequence_logps
from training import MetricSum, RunGuard, TrainConfig, eval_batches, get_lr, global_sum, load_policy, \
    parse_config, resume_state, run_main, set_lr, start_run, throughput, to_device, total_steps_for, \
    training_steps, write_run_config


@dataclass
class Config(TrainConfig):
    # model and data (shared settings such as batch size and dtype: TrainConfig in training.py)
    model: str = "demo/model"  # the target model to fine-tune: local folder or hub id
    data: str = "demo/data/train.jsonl"  # chat rows {"messages": [...]} or WRPO rows (trains on prompt + chosen[0])
    eval_data: str = ""  # held-out rows of the same kinds; their loss is reported before and after training
    out_dir: str = "out/sft"  # metrics.jsonl, config.json and checkpoints go here
    lr: float = 7e-6  # peak learning rate (AdamW)
    # sequences (global_batch_size and micro_batch_size count sequences of up to max_length tokens)
    packing: bool = True  # several whole examples per sequence, attention kept within each (as in the paper)
    loss_on: str = "assistant"  # assistant: assistant turns only; all: every token (the paper's setting)
    truncation: str = "keep_start"  # keep_start: cut long examples to max_length; error: reject them


def sft_problems(cfg):
    problems = []
    if cfg.loss_on not in ("assistant", "all"):
        problems.append(f"loss_on must be 'assistant' or 'all', got '{cfg.loss_on}'")
    if cfg.truncation not in ("keep_start", "error"):
        problems.append(f"truncation must be 'keep_start' or 'error', got '{cfg.truncation}'")
    return problems


def group_examples(examples, cfg):
    """The sequences SFT trains on: packed groups of examples, or one example each."""
    if cfg.packing:
        return data.pack([len(ex.ids) for ex in examples], cfg.max_length, cfg.seed)
    return [[i] for i in range(len(examples))]


def token_nll(policy, batch):
    """Summed negative log-likelihood of the label tokens of each sequence [N], and their counts [N]."""
    logps, counts = model_sequence_logps(policy, batch)
    return -logps, counts


@torch.no_grad()
def evaluate(policy, examples, seqs, cfg, run):
    """Mean per-token loss on held-out examples."""
    policy.eval()
    sums = MetricSum()
    for idx, weight in eval_batches(len(seqs), cfg.micro_batch_size, run):
        groups = [[examples[e] for e in seqs[i]] for i in idx]
        nll, counts = token_nll(policy, to_device(data.collate_packed(groups, run.pad_id), run.device))
        sums.add({"loss": nll / counts.clamp(min=1)}, counts * weight)
    policy.train()
    return {f"eval/{k}": v for k, v in sums.mean().items()}


LOG_FIELDS = [("loss", "loss", ".4f"), ("lr", "lr", ".3g"), ("grad_norm", "grad norm", ".3g"),
              ("tokens_per_s", "tok/s", ".0f"), ("mfu", "MFU", ".1%")]


def main(argv):
    # --- setup: settings, paths and tokenizer checked before anything is read or written
    cfg = parse_config(Config, argv)
    run = start_run(cfg, sft_problems(cfg))

    # --- data: every row validated before the model is loaded
    load = lambda path: data.load_sft_dataset(path, run.tokenizer, max_length=cfg.max_length,  # noqa: E731
                                              loss_on=cfg.loss_on, truncation=cfg.truncation,
                                              skip_invalid=cfg.skip_invalid_rows, report=print0)
    examples = load(cfg.data)
    eval_examples = load(cfg.eval_data) if cfg.eval_data else []
    seqs, eval_seqs = group_examples(examples, cfg), group_examples(eval_examples, cfg)
    total_steps = total_steps_for(len(seqs), cfg, "sequences")
    fingerprint = data.fingerprint(examples)
    state = resume_state(run, cfg, fingerprint)  # a resumed run must continue the same run
    fill = sum(len(ex.ids) for ex in examples) / (len(seqs) * cfg.max_length)
    print0(f"{len(examples)} examples in {len(seqs)} sequences ({fill:.0%} of max_length {cfg.max_length} used), "
           f"{len(eval_examples)} held-out examples; world {run.world} on {run.device.type}; "
           f"{total_steps} optimizer steps of {cfg.global_batch_size} sequences")
    write_run_config(run, cfg)

    # --- model
    policy, optimizer = load_policy(run, cfg)

    def run_eval(step):
        if not eval_examples:
            return {}
        m = evaluate(policy, eval_examples, eval_seqs, cfg, run)
        print0(f"step {step}: held-out loss {m['eval/loss']:.4f}")
        return m

    # --- training loop (resumed: from the checkpoint's step, with its weights and optimizer state)
    with RunGuard(run, cfg, policy, optimizer, run_eval, total_steps, fingerprint, state, "sft", LOG_FIELDS) as guard:
        for step, epoch, micro_batches in training_steps(len(seqs), cfg, run, total_steps, guard.start):
            t0 = time.time()
            lr = set_lr(optimizer, get_lr(step, total_steps, cfg.lr, cfg.warmup_ratio))
            groups = [[[examples[e] for e in seqs[i]] for i in rows] for rows in micro_batches]
            batches = [data.collate_packed(g, run.pad_id) for g in groups]
            # the step's loss is the mean over every loss token of the global batch: count them first
            n_loss = global_sum(sum(int((b["labels"] != data.IGNORE).sum()) for b in batches), run.device)
            sums, seen = MetricSum(), []
            for group, batch in zip(groups, batches):
                nll, counts = token_nll(policy, to_device(batch, run.device))
                # FSDP averages gradients over ranks, hence the factor world
                (nll.sum() * run.world / n_loss).backward()
                sums.add({"loss": nll.detach() / counts.clamp(min=1)}, counts)
                seen.append(([", ".join(ex.where for ex in seq) for seq in group], nll.detach()))
            metrics = sums.mean()
            grad_norm = guard.step(step, metrics["loss"], seen)  # clip, then update only if all is finite

            # --- log, evaluate, checkpoint (and stop here after SIGTERM / SIGINT)
            tokens = sum(len(ex.ids) for g in groups for seq in g for ex in seq)
            m = {"step": step + 1, "epoch": epoch, "lr": lr, "grad_norm": grad_norm, **metrics,
                 **throughput(tokens, t0, run)}
            guard.end_step(m)

        # --- final evaluation and checkpoint
        eval_after = guard.finish()
    if eval_examples:
        print0(f"held-out loss: {guard.eval_before['eval/loss']:.4f} before -> {eval_after['eval/loss']:.4f} after")
    cleanup()


if __name__ == "__main__":
    run_main(main)
