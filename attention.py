"""Causal attention over packed rows, one sequence at a time: the `packed_sdpa` implementation.

A packed row holds several sequences back to back (data.collate_packed). transformers' `sdpa`
keeps them apart with a block mask over the whole row, so every row costs T^2 attention
however short its sequences are, and the mask disables the kernels' causal block skipping.
`packed_sdpa` reads the sequences off the position ids instead and runs causal sdpa on each,
so attention costs what the sequences alone would cost. Rules, from the position ids:

  - a sequence starts wherever the position does not continue the previous one (p != prev + 1);
  - one starting at position 0 begins a group and attends causally to itself;
  - one starting at position p > 0 continues its group: it attends to the group's first p
    tokens and causally to itself. This is shared-prompt packing (data.collate with
    shared_prompt=True): [prompt, y1, prompt[-1], y2, prompt[-1], y3], where y2 and y3 restart
    at position len(prompt) - 1 and see the one copy of the prompt, as if each were alone with it.

The attention mask transformers would build is not used (none is registered for this name):
rows must carry their padding at the end, as all of this project's batches do. Padded rows
without position ids are one causal sequence each, which is exact for their real tokens.
"""

import weakref

import torch
import torch.nn.functional as F

NAME = "packed_sdpa"
_last = (lambda: None, None)  # (weak reference to a position_ids tensor, its sequences per row)


def sequences(position_ids):
    """(start, end, first position) of each sequence in a row of position ids (a 1-D list)."""
    starts = [t for t in range(len(position_ids)) if t == 0 or position_ids[t] != position_ids[t - 1] + 1]
    ends = starts[1:] + [len(position_ids)]
    return [(s, e, position_ids[s]) for s, e in zip(starts, ends)]


def _sequences_per_row(position_ids):
    """sequences() of each row; every layer gets the same position_ids tensor, so one host sync per forward."""
    global _last
    if _last[0]() is not position_ids:
        _last = (weakref.ref(position_ids), [sequences(row) for row in position_ids.tolist()])
    return _last[1]


@torch.compiler.disable  # a Python loop over data-dependent lengths: left out of compiled layers
def packed_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None, **kwargs):
    """query [B, H, T, D], key and value [B, Hkv, T, D] -> output [B, T, H, D], no weights."""
    if kwargs.get("sliding_window") or kwargs.get("softcap") or getattr(module, "sliding_window", None):
        raise ValueError(f"{NAME} does not implement sliding windows or soft-capping; use attn_implementation=sdpa")
    B, H, T, _ = query.shape
    if position_ids is None:
        raise ValueError(f"{NAME} needs position_ids in attention, which {type(module).__name__} does not pass; "
                         "use attn_implementation=sdpa")
    rows = _sequences_per_row(position_ids)
    rows = rows * B if len(rows) < B else rows  # one row of position ids shared by the batch
    if key.shape[1] != H:  # grouped-query attention: repeat the kv heads (enable_gqa would fall back to
        # the math kernel on CPU)
        key, value = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (key, value))
    drop = dropout if module.training else 0.0
    out = []
    for b, (q_row, k_row, v_row) in enumerate(zip(query, key, value)):  # [H, T, D] each
        seqs = rows[b]
        # split, not slicing: its backward is one concatenation, not a full-size zero tensor per piece
        pieces = [x.split([e - s for s, e, _ in seqs], dim=1) for x in (q_row, k_row, v_row)]
        parts, first = [], 0
        for i, ((s, e, p), q, k, v) in enumerate(zip(seqs, *pieces)):
            q, k, v = q[None], k[None], v[None]  # [1, H, n, D]: the CPU flash kernel wants a batch dim
            if p == 0:  # a new group
                first = i
                parts.append(F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True, scale=scaling))
                continue
            if p > seqs[first][1] - seqs[first][0]:
                raise ValueError(f"{NAME}: a sequence continues position {p} of a group whose first sequence has "
                                 f"only {seqs[first][1] - seqs[first][0]} tokens")
            k = torch.cat([pieces[1][first][None, :, :p], k], dim=2)
            v = torch.cat([pieces[2][first][None, :, :p], v], dim=2)
            n = e - s  # query i sees the p prefix tokens and its own sequence up to i
            mask = torch.ones(n, p + n, dtype=torch.bool, device=q.device).tril(p)
            parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=scaling))
        out.append(torch.cat(parts, dim=2))
    out = torch.cat(out)
    return out.transpose(1, 2).contiguous(), None


def register():
    """Make `attn_implementation="packed_sdpa"` available to transformers models (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_sdpa)


def known(name):
    """Whether transformers (with packed_sdpa registered) accepts this attn_implementation; hub kernels
    ("org/repo") are left for transformers to fetch and check."""
    from transformers import AttentionInterface

    register()
    return name == "eager" or name in AttentionInterface().valid_keys() or "/" in name
