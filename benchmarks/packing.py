"""How full the packer makes SFT sequences and WRPO micro-batches, on UltraFeedback-like lengths (no model, no data).

    python benchmarks/packing.py            # a few seconds; the numbers quoted in batching.py's docstring

SFT: 20,000 examples of log-normal length (median ~450 tokens, at most 2048) into sequences of max_length 2048, by
batching.pack (best-fit decreasing) against next-fit in shuffled order. WRPO: 6,000 rows of a ~160-token prompt and
three ~370-token responses (log-normal, clipped at 1800 and 2048 - prompt), the paper's global batch of 128 rows on
8 ranks (16 rows per rank and step) cut into micro-batches of the default budget (3 x 2048 tokens) by
batching.micro_batches_by_tokens, with and without shared prompts; "fill" is the tokens of the rows over the budget
of the micro-batches they took, "padding" the padding collate_preference adds to make each micro-batch's packed
rows as wide as its longest.
"""

import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import batching  # noqa: E402
from tokens import PreferenceRow  # noqa: E402


def lognormal(rng, median, hi):
    return max(1, min(hi, int(rng.lognormvariate(0, 0.6) * median)))


def next_fit(sizes, capacity):
    bins, room = [], 0
    for s in sizes:
        if not bins or s > room:
            bins.append([])
            room = capacity
        bins[-1].append(s)
        room -= s
    return bins


def sft_table(rng):
    sizes = [lognormal(rng, 450, 2048) for _ in range(20_000)]
    shuffled = sizes[:]
    rng.shuffle(shuffled)
    print("| SFT packing, 20,000 examples into sequences of 2048 tokens | sequences | full |")
    print("|---|---|---|")
    for name, n in (("next-fit, shuffled order", len(next_fit(shuffled, 2048))),
                    ("best-fit decreasing (batching.pack)", len(batching.pack(sizes, 2048)))):
        print(f"| {name} | {n:,} | {sum(sizes) / (n * 2048):.1%} |")


def wrpo_table(rng):
    rows = []
    for i in range(6000):
        prompt = lognormal(rng, 160, 1800)
        rows.append(PreferenceRow([1] * prompt, [[2] * lognormal(rng, 370, 2048 - prompt) for _ in range(3)], 2,
                                  f"x:{i}"))
    budget, per_rank = 3 * 2048, 16
    print("\n| WRPO micro-batches, 16 rows per rank and step, budget 6144 tokens | micro-batches per step | fill "
          "| padding |")
    print("|---|---|---|---|")
    for shared in (False, True):
        lengths = [sum(len(s.ids) for s in batching.row_sequences(r, shared)) for r in rows]
        n_mb = tokens = padded = 0
        for first in range(0, len(rows) - per_rank + 1, per_rank):
            idx = list(range(first, first + per_rank))
            for mb in batching.micro_batches_by_tokens(idx, lengths, budget, torch.device("cpu")):
                batch = batching.collate_preference([rows[i] for i in mb], 0, packed=True, shared_prompt=shared)
                n_mb, tokens = n_mb + 1, tokens + sum(lengths[i] for i in mb)
                padded += int((batch["segments"] < 0).sum())
        steps = len(rows) // per_rank
        print(f"| {'shared prompts' if shared else 'each response with its prompt'} | {n_mb / steps:.2f} "
              f"| {tokens / (n_mb * budget):.1%} | {padded / (tokens + padded):.1%} |")


def main():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # micro_batches_by_tokens agrees
    sft_table(random.Random(0))
    wrpo_table(random.Random(0))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
