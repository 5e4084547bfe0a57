"""How rows become batches: their order over optimizer steps and ranks, micro-batches, the one packer, and collation
into tensors (with the varlen attention layout of a packed batch). Measured by benchmarks/packing.py:

- Exact order. Each epoch is a seeded permutation; step k takes its next global_batch_size rows, rank r the r-th
  slice of them, on any number of ranks. Packing only decides how a rank's rows of a step are cut into
  micro-batches, never which rows a step has, so a resumed run sees the rows it would have seen.
- No cropping. The packer never cuts a sequence (a row is truncated once, by the paper's rule: tokens.truncate); one
  longer than a bin gets a bin of its own.
- Fill. `pack` is best-fit decreasing: 20,000 SFT examples of UltraFeedback-like lengths (median ~450 tokens) fill
  sequences of 2048 tokens 99.8% (5,250 sequences; next-fit in shuffled order: 82.7%, 6,333). A WRPO step's 16 rows
  per rank fill micro-batches of 6144 tokens 86%: 4.6 micro-batches with shared prompts, 5.7 without; a micro-batch's
  packed rows are as wide as its longest, which adds 12% padding (18% without shared prompts).
- Same count everywhere. Every rank runs as many forward passes per step as the rank with the most (FSDP gathers
  parameters in each), splitting its largest micro-batches to get there."""

import bisect
import math

import numpy as np
import torch
import torch.distributed as dist

from tokens import IGNORE, Sequence


# --- rows over optimizer steps, ranks and micro-batches

def train_steps(n_rows, epochs, seed, global_batch, rank, world, total_steps, start=0):
    """(step, epoch, this rank's rows) for optimizer steps start .. total_steps - 1: each epoch a seeded permutation,
    each step its next `global_batch` rows, rank r their r-th slice; a last partial batch of an epoch is dropped."""
    per_rank = global_batch // world
    step = 0
    for epoch in range(epochs):
        perm = epoch_order(n_rows, seed, epoch)
        for first in range(0, n_rows - global_batch + 1, global_batch):
            if step >= total_steps:
                return
            if step >= start:
                yield step, epoch, perm[first + rank * per_rank : first + (rank + 1) * per_rank]
            step += 1


def epoch_order(n_rows, seed, epoch):
    """The rows in the order an epoch takes them: a permutation seeded by seed + epoch."""
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def micro_batches_by_rows(idx, size):
    """One step's rows on this rank (idx: their indices) as micro-batches of `size` rows: as many on every rank."""
    return [idx[i : i + size] for i in range(0, len(idx), size)]


def micro_batches_by_tokens(idx, lengths, budget, device):
    """One step's rows on this rank (idx: their indices) packed into micro-batches of at most `budget` tokens
    (lengths: tokens per row of the data), as many as on the rank with the most. Collective."""
    return same_count_on_all_ranks([[idx[i] for i in b] for b in pack([lengths[i] for i in idx], budget)], device)


def same_count_on_all_ranks(batches, device):
    """Split the largest micro-batches until every rank has as many as the rank with the most (ranks hold equally
    many rows, so splitting down to one row each always suffices)."""
    most = torch.tensor(len(batches), device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    batches = list(batches)
    while len(batches) < most.item():
        big = batches.pop(max(range(len(batches)), key=lambda i: len(batches[i])))
        batches += [big[: len(big) // 2], big[len(big) // 2 :]]
    return batches


def rank_share(n_items, rank, world):
    """Rank r's contiguous share of n held-out items, as many on every rank: (indices, weights), where a short
    rank ends with item 0 at weight 0 (FSDP's collectives need the same number of forward passes)."""
    per_rank = math.ceil(n_items / world)
    positions = range(rank * per_rank, (rank + 1) * per_rank)
    return [i if i < n_items else 0 for i in positions], [float(i < n_items) for i in positions]


def eval_batches(n_items, micro_batch, rank, world):
    """This rank's share of n held-out items (rank_share), in micro-batches of (indices, weights [B])."""
    idx, weights = rank_share(n_items, rank, world)
    for start in range(0, len(idx), micro_batch):
        yield idx[start : start + micro_batch], torch.tensor(weights[start : start + micro_batch])


def eval_batches_by_tokens(lengths, budget, rank, world, device):
    """eval_batches of a token budget (lengths: tokens of each item), packed as a step's rows are: the no-grad passes
    (reference log-probs, held-out metrics) run the training's micro-batches, not one row at a time. Collective."""
    idx, weights = rank_share(len(lengths), rank, world)
    share = micro_batches_by_tokens(list(range(len(idx))), [lengths[i] for i in idx], budget, device)  # positions
    return [([idx[j] for j in b], torch.tensor([weights[j] for j in b])) for b in share]


def pack(sizes, capacity):
    """Item indices in bins of at most `capacity` in total, best-fit decreasing (largest first, each into the fullest
    bin it fits, one over capacity alone): SFT examples into sequences, sequences into rows, rows into micro-batches."""
    bins, open_bins = [], []  # open_bins: sorted (room left, bin index) of the bins with room
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        k = bisect.bisect_left(open_bins, (sizes[i], -1))  # the fullest bin with room for item i
        room, b = open_bins.pop(k) if k < len(open_bins) else (capacity, len(bins))
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        if room - sizes[i] > 0:
            bisect.insort(open_bins, (room - sizes[i], b))
    return bins


# --- collation: sequences -> input_ids, labels, position_ids (packed) or attention_mask (padded)

def row_sequences(row, shared_prompt=False):
    """A preference row's sequences, prompt + each response, scored on the response. shared_prompt: [prompt + y1],
    [prompt[-1] + y2], [prompt[-1] + y3], packed back to back: the later ones start at position len(prompt) - 1,
    attending to the prompt before them (attention.packed_sdpa); the repeated token predicts their first one."""
    p = row.prompt_ids
    return [Sequence(p[-1:] + r, [IGNORE] + r, row.where, start=len(p) - 1) if shared_prompt and j else
            Sequence(p + r, [IGNORE] * len(p) + r, row.where) for j, r in enumerate(row.responses)]


def row_lengths(rows, shared_prompt=False):
    """Tokens of each row of TokenRows as row_sequences lays it out, read off the offsets: a preference row's prompt
    once per response, or once in all with shared_prompt (its later responses repeat the prompt's last token)."""
    n = np.diff(rows.offsets)
    if rows.kind == "sft" or not len(rows):
        return n.tolist()
    first = rows.firsts[:-1]
    prompt, responses, n_responses = n[first], np.add.reduceat(n, first) - n[first], np.diff(rows.firsts) - 1
    return (prompt + responses + n_responses - 1 if shared_prompt else n_responses * prompt + responses).tolist()


def collate_preference(rows, pad_id, packed=False, shared_prompt=False, varlen=False):
    """A micro-batch of preference rows: packed, their sequences back to back in rows as wide as the longest (`pack`,
    collate_packed), a row's together with shared_prompt; else one right-padded row per sequence. wt, rej [B] index
    each row's target-chosen and rejected sequence, src [B, K] its K source sequences and src_w [B, K] their weights
    (K: the most of any row; a row with fewer has weight 0 for the rest; a DPO pair's one source is wt)."""
    if shared_prompt and not packed:
        raise ValueError("shared_prompt needs packed=True")
    # units: what must stay whole in a packed row, a row's (number, sequence) pairs when they share a prompt, else each
    src, src_w, wt, rej, units, n = [], [], [], [], [], 0
    k = max(len(row.source_weights) for row in rows)
    for row in rows:  # (a row with fewer sources: its first again, of weight 0)
        src.append([n + j for j in range(len(row.source_weights))] + [n] * (k - len(row.source_weights)))
        src_w.append([*row.source_weights] + [0.0] * (k - len(row.source_weights)))
        wt.append(n + row.n_chosen - 1)
        rej.append(n + row.n_chosen)
        seqs = list(enumerate(row_sequences(row, shared_prompt), n))
        units += [seqs] if shared_prompt else [[x] for x in seqs]
        n += len(seqs)
    index = dict(src=torch.tensor(src), src_w=torch.tensor(src_w), wt=torch.tensor(wt), rej=torch.tensor(rej))
    if not packed:
        batch = collate_packed([[s] for u in units for _, s in u], pad_id, segments=True)  # one right-padded row each
        return dict(input_ids=batch["input_ids"], attention_mask=(batch["segments"] >= 0).long(),
                    labels=batch["labels"], **index)
    size = [sum(len(s.ids) for _, s in u) for u in units]
    packed_rows = [[x for u in b for x in units[u]] for b in pack(size, max(size))]
    segment = {k: i for i, (k, _) in enumerate(x for row in packed_rows for x in row)}  # collate_packed's numbering
    for key in ("src", "wt", "rej"):
        index[key].apply_(segment.__getitem__)
    return {**collate_packed([[s for _, s in row] for row in packed_rows], pad_id, segments=True, varlen=varlen),
            **index}


def collate_packed(rows, pad_id, segments=False, varlen=False):
    """Rows of sequences -> input_ids, position_ids, labels [R, T]. Position ids restart (at 0, or a sequence's start)
    per sequence and no mask is passed: transformers builds a block-causal one (use_cache=False; with a cache they
    attend to each other). segments: `segments` [R, T] numbers the sequences (-1 on a row's end padding) and `n_seqs`
    counts them, for sums per sequence. varlen: also varlen_layout's entries, computed here on the host."""
    T = max(sum(len(s.ids) for s in row) for row in rows)
    input_ids, labels, position_ids, seg_ids = (torch.full((len(rows), T), fill, dtype=torch.long)
                                                for fill in (pad_id, IGNORE, 0, -1))
    seq = 0
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s.ids)
            input_ids[r, at : at + n] = torch.tensor(s.ids)
            labels[r, at : at + n] = torch.tensor(s.labels)
            position_ids[r, at : at + n] = torch.arange(s.start, s.start + n)
            seg_ids[r, at : at + n] = seq
            at, seq = at + n, seq + 1
        position_ids[r, at:] = torch.arange(T - at)
    out = dict(input_ids=input_ids, position_ids=position_ids, labels=labels)
    if segments:
        out.update(segments=seg_ids, n_seqs=seq)
    return {**out, **varlen_layout(position_ids)} if varlen else out


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# --- the varlen layout of a packed batch (attention.py reads it)

def sequences(position_ids):
    """(start, end, first position) of each sequence in a row of position ids (a 1-D list): a sequence starts wherever
    the position does not continue the previous one."""
    starts = [t for t in range(len(position_ids)) if t == 0 or position_ids[t] != position_ids[t - 1] + 1]
    ends = starts[1:] + [len(position_ids)]
    return [(s, e, position_ids[s]) for s, e in zip(starts, ends)]


def check_continuation(p, first):
    """A sequence starting at position p > 0 needs a group before it in its row (first: the group's first
    sequence as (start, end, position), or None) with at least p tokens."""
    if first is None:
        raise ValueError(f"packed_sdpa: a row's first sequence starts at position {p}; only a sequence after "
                         "the start of its group (position 0) in the same row may continue it")
    if p > first[1] - first[0]:
        raise ValueError(f"packed_sdpa: a sequence continues position {p} of a group whose first sequence has "
                         f"only {first[1] - first[0]} tokens")


def varlen_layout(position_ids):
    """The varlen attention path's entries, from a batch's position ids [R, T] flattened into one stream of sequences
    (a row's padding one more). Query range i is sequence i; key range i the same, after its group's first p tokens
    for a sequence continuing one at position p. varlen_cu_seq_q, varlen_cu_seq_k int32 [N + 1]: where each
    sequence's queries and keys start; varlen_max_q, varlen_max_k: the longest; varlen_k_index int64: the key
    stream's tokens, only when some sequence continues a group."""
    R, T = position_ids.shape
    q_lens, k_lens, k_runs = [], [], []  # k_runs: (first token, count) runs of the flattened stream
    for r, row in enumerate(position_ids.tolist()):
        first = None
        for s, e, p in sequences(row):
            if p == 0:
                first = (s, e, p)
            else:
                check_continuation(p, first)
                k_runs.append((r * T + first[0], p))
            k_runs.append((r * T + s, e - s))
            q_lens.append(e - s)
            k_lens.append(e - s + p)
    cumsum = lambda n: torch.tensor([0] + n, dtype=torch.int32).cumsum(0, dtype=torch.int32)  # noqa: E731
    out = dict(varlen_cu_seq_q=cumsum(q_lens), varlen_cu_seq_k=cumsum(k_lens), varlen_max_q=max(q_lens),
               varlen_max_k=max(k_lens))
    if k_lens != q_lens:  # some continuation: its keys are gathered; otherwise the keys are the queries' tokens
        out["varlen_k_index"] = torch.cat([torch.arange(s, s + n) for s, n in k_runs])
    return out
