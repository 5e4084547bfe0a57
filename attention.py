"""Causal attention over packed rows, one sequence at a time: the `packed_sdpa` implementation.

A packed row holds several sequences back to back (batching.collate_packed). transformers' `sdpa` keeps them apart
with a block mask over the whole row, so every row costs T^2 attention however short its sequences, and the mask
disables the kernels' causal block skipping. `packed_sdpa` attends within each sequence, from the position ids
(batching.sequences): a sequence starting at position 0 begins a group and attends causally to itself; one starting
at p > 0 continues its group, attending to the group's first p tokens too. That is shared-prompt packing
(batching.row_sequences): [prompt, y1, prompt[-1], y2, prompt[-1], y3], y2 and y3 restarting at len(prompt) - 1.

On CUDA in fp16/bf16, one flash varlen call per layer takes the whole micro-batch (its layout built by collate:
batching.varlen_layout; `use_varlen` decides, after a self-check); otherwise causal sdpa runs on each sequence. No
attention mask is used: rows carry their padding at the end, as this project's batches do."""

import weakref

import torch
import torch.nn.functional as F

from batching import check_continuation, sequences, varlen_layout
from fsdp_utils import print0

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_kernel  # tests substitute an emulation
except ImportError:  # torch without it: the per-sequence path only
    _varlen_kernel = None

NAME = "packed_sdpa"
_last = (lambda: None, None)  # (weak reference to a position_ids tensor, its sequences per row)
_use_varlen = {}  # device -> use_varlen's answer, decided once per process


# --- varlen: one flash-attention call over all the micro-batch's sequences

def _varlen_accepts(query):
    """Whether the flash kernel takes these inputs: CUDA, fp16/bf16, head dims a multiple of 8, <= 256 (tests patch)."""
    D = query.shape[-1]
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 256


def _varlen_sdpa(query, key, value, scaling, layout):
    """query [B, H, T, D], key and value [B, Hkv, T, D], layout: varlen_layout's entries -> [B, T, H, D]."""
    B, H, T, D = query.shape
    q = query.transpose(1, 2).reshape(B * T, H, D)  # the rows as one stream of tokens
    k, v = (x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (key, value))
    if (index := layout.get("varlen_k_index")) is not None:  # a prompt's keys, again before each continuation
        k, v = k.index_select(0, index), v.index_select(0, index)
    # window (-1, 0) is causal, aligned bottom-right where a range has more keys than queries: query j of a
    # continuation sees the p prefix keys and its own keys up to j
    out = _varlen_kernel(q, k, v, layout["varlen_cu_seq_q"], layout["varlen_cu_seq_k"], layout["varlen_max_q"],
                         layout["varlen_max_k"], scale=scaling, window_size=(-1, 0), enable_gqa=k.shape[1] != H)
    return out.view(B, T, H, D)


# --- per sequence: causal sdpa on each, in a Python loop

def _per_sequence_sdpa(query, key, value, position_ids, scaling, drop):
    """query [B, H, T, D], key and value [B, Hkv, T, D], position_ids [B or 1, T] -> [B, T, H, D]."""
    global _last
    B, H, T, _ = query.shape
    if _last[0]() is not position_ids:  # every layer gets the same position_ids tensor: one host sync per forward
        _last = (weakref.ref(position_ids), [sequences(row) for row in position_ids.tolist()])
    rows = _last[1] * B if len(_last[1]) < B else _last[1]  # one row of position ids shared by the batch
    if key.shape[1] != H:  # grouped-query attention (enable_gqa would fall back to the math kernel on CPU)
        key, value = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (key, value))
    out = []
    for seqs, q_row, k_row, v_row in zip(rows, query, key, value):  # q_row, k_row, v_row: [H, T, D]
        # split, not slicing: its backward is one concatenation, not a full-size zero tensor per piece
        pieces = [x.split([e - s for s, e, _ in seqs], dim=1) for x in (q_row, k_row, v_row)]
        parts, first = [], None
        for i, ((s, e, p), q, k, v) in enumerate(zip(seqs, *pieces)):
            q, k, v = q[None], k[None], v[None]  # [1, H, n, D]: the CPU flash kernel wants a batch dim
            if p == 0:  # a new group
                first = i
                parts.append(F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True, scale=scaling))
                continue
            check_continuation(p, None if first is None else seqs[first])
            k = torch.cat([pieces[1][first][None, :, :p], k], dim=2)
            v = torch.cat([pieces[2][first][None, :, :p], v], dim=2)
            n = e - s  # query i sees the p prefix tokens and its own sequence up to i
            mask = torch.ones(n, p + n, dtype=torch.bool, device=q.device).tril(p)
            parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=scaling))
        out.append(torch.cat(parts, dim=2))
    return torch.cat(out).transpose(1, 2).contiguous()


@torch.compiler.disable  # a Python loop over data-dependent lengths: left out of compiled layers
def packed_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None, **kwargs):
    """query [B, H, T, D], key and value [B, Hkv, T, D] -> output [B, T, H, D], no weights: one varlen kernel call
    with varlen_layout's entries among the kwargs, else (or for fp32, dropout) sdpa per sequence."""
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if kwargs.get("softcap") or (window and window < query.shape[2]):  # a window over the row is full attention
        raise ValueError(f"{NAME} does not implement sliding windows or soft-capping; use attn_implementation=auto")
    drop = dropout if module.training else 0.0
    if "varlen_cu_seq_q" in kwargs and not drop and _varlen_accepts(query):  # the kernel has no dropout
        return _varlen_sdpa(query, key, value, scaling, kwargs), None
    if position_ids is None:
        raise ValueError(f"{NAME} needs position_ids in attention, which {type(module).__name__} does not pass; "
                         "use attn_implementation=sdpa")
    return _per_sequence_sdpa(query, key, value, position_ids, scaling, drop), None


# --- choosing the path: a self-check of the kernel, once per process

def varlen_self_check(device):
    """(ok, message): whether the varlen kernel gives the per-sequence path's outputs and gradients on `device`, on a
    small bf16 batch with shared prompts and grouped-query heads. Never raises."""
    if device.type != "cuda":
        return False, f"flash varlen needs CUDA, not {device.type}"
    if _varlen_kernel is None:
        return False, "this torch has no torch.nn.attention.varlen"
    try:
        return _check_against_per_sequence(device, torch.bfloat16)
    except Exception as e:  # any failure of the kernel means the other path
        return False, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _check_against_per_sequence(device, dtype):
    """The varlen path in `dtype` against the per-sequence path in fp32 (outputs, q, k, v gradients): within 4x the
    per-sequence path's own error in `dtype` + 1e-2. bf16 moves these O(1) values by ~1e-2, a wrong layout by O(1)."""
    # row 0: a group, 2 continuations of it, then padding; row 1: two groups
    position_ids = torch.tensor([[*range(12), *range(7, 12), *range(7, 11), *range(3)], [*range(15), *range(9)]])
    layout = {k: v.to(device) if torch.is_tensor(v) else v for k, v in varlen_layout(position_ids).items()}
    (R, T), H, Hkv, D = position_ids.shape, 4, 2, 64
    g = torch.Generator().manual_seed(0)  # a generator of its own: the caller's random stream stays as it was
    q, k, v = (torch.randn(R, h, T, D, generator=g) for h in (H, Hkv, Hkv))
    grad_out = torch.randn(R, T, H, D, generator=g)

    def run(attend, as_dtype):
        leaves = [x.to(device, as_dtype, copy=True).requires_grad_() for x in (q, k, v)]  # fresh leaves per run
        with torch.enable_grad():
            out = attend(*leaves)
            out.backward(grad_out.to(device, as_dtype))
        return [out.float()] + [x.grad.float() for x in leaves]

    per_sequence = lambda q, k, v: _per_sequence_sdpa(q, k, v, position_ids.to(device), D**-0.5, 0.0)  # noqa: E731
    want, baseline = run(per_sequence, torch.float32), run(per_sequence, dtype)
    got = run(lambda q, k, v: _varlen_sdpa(q, k, v, D**-0.5, layout), dtype)
    for name, a, b, base in zip(("output", "query grad", "key grad", "value grad"), got, want, baseline):
        err, tol = (a - b).abs().max().item(), 4 * (base - b).abs().max().item() + 1e-2
        if not err <= tol:  # NaN fails too
            return False, f"self-check failed: {name} off by {err:.3g} (tolerance {tol:.3g})"
    return True, "self-check passed"


def use_varlen(device):
    """Whether batches on `device` carry varlen_layout's entries: CUDA, and the self-check passed (once per process)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if str(device) not in _use_varlen:
        ok, message = varlen_self_check(device)
        print0(f"attention: flash varlen ({message})" if ok else
               f"attention: varlen unavailable ({message}); using {NAME}'s per-sequence sdpa")
        _use_varlen[str(device)] = ok
    return _use_varlen[str(device)]


def register():
    """Make `attn_implementation="packed_sdpa"` available to transformers models (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_sdpa)


def known(name):
    """Whether transformers (packed_sdpa registered) takes this attn_implementation, or it is "auto" (choose); hub
    kernels ("org/repo") are left for transformers to fetch and check."""
    from transformers import AttentionInterface

    register()
    return name in ("auto", "eager") or name in AttentionInterface().valid_keys() or "/" in name


def choose(name, config, max_length):
    """(the attn_implementation to load, a line saying why, or "" when it is the one asked). "auto": packed_sdpa where
    the model takes it (no soft-capped attention logits as Gemma-2's, no sliding window under max_length, sdpa-style
    attention), else sdpa or eager, under which packing stays exact too (masked by position ids)."""
    from transformers import AutoModelForCausalLM

    if name != "auto":
        return name, ""
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)  # (None: a model of its own code)
    sdpa = getattr(model_class, "_supports_sdpa", False)
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    problem = ("its attention logits are soft-capped" if getattr(config, "attn_logit_softcapping", None) else
               f"its sliding window of {window} tokens is shorter than max_length {max_length}"
               if window and window < max_length else
               f"{model_class.__name__} takes no sdpa-style attention" if model_class and not sdpa else None)
    fallback = "sdpa" if sdpa else "eager"
    return (NAME, "") if problem is None else (fallback, f"attention: {fallback}, not {NAME}, because {problem}")
