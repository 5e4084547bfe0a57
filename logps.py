"""Log-probabilities of label tokens, without materialising the full logits: WRPO and SFT need one number per scored
token, log p(y_t) = logit(y_t) - logsumexp(logits), where Llama-3's logits of one 2048-token sequence are 1 GB in
fp32 and the readable path keeps several such tensors for backward. `token_logps` computes them three ways:

  naive    lm_head matmul -> float32 log_softmax -> gather. The reference.
  chunked  an autograd.Function over chunks of the vocabulary: the forward keeps only each token's log-sum-exp and
           target logit; the backward recomputes each chunk's logits. Extra memory: a fixed budget (CHUNK_BYTES).
  triton   (CUDA) a kernel computes the online log-sum-exp and target logit tile by tile, never writing logits to
           memory; the backward is the chunked one.

`auto` picks triton on CUDA when it is installed, chunked otherwise. Positions labelled IGNORE are dropped before any
matmul. Sequence log-probs are the per-token values SUMMED."""

import types
from contextlib import suppress
from dataclasses import dataclass

import torch

IGNORE = -100  # the label of a token that gets no loss (prompt, padding): log-prob 0, and no matmul spent on it
IMPLS = ("auto", "naive", "chunked", "triton")
CHUNK_BYTES = 32 * 2**20  # fp32 logits of one vocabulary chunk; bounds the chunked path's extra memory
POISON = False  # tests set it: outputs start as NaN, so an element that is never written shows up


def new_output(shape, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON else out


# --- the three implementations: hidden [N, H], weight [V, H], labels [N] -> log p(labels) [N] fp32

def _acc(t):
    """float32, or float64 for float64 inputs (gradient checks): the dtype softmax math runs in."""
    return torch.promote_types(t.dtype, torch.float32)


@dataclass(frozen=True, eq=False)
class Head:
    """What some models do to hidden @ W^T before the softmax: logits = softcap * tanh((h W^T + bias) * scale /
    softcap). A bias (some heads have one), a scale (Cohere's logit_scale, Granite's 1 / logits_scaling) and
    soft-capping (Gemma-2's final_logit_softcapping); the plain head is Head()."""

    bias: torch.Tensor = None
    scale: float = 1.0
    softcap: float = None

    @property
    def plain(self):
        return self.bias is None and self.scale == 1.0 and not self.softcap

    def logits(self, hidden, weight, cols=slice(None)):
        """The logits of a slice of the vocabulary, in the softmax's dtype."""
        z = (hidden @ weight[cols].T).to(_acc(hidden))
        if self.bias is not None:
            z = z + self.bias[cols].to(z.dtype)
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z

    def backward(self, dz, z):
        """dz (the gradient of a chunk's final logits z), in place, into the gradient of h W^T + bias."""
        if self.softcap:
            dz.mul_(1 - (z / self.softcap) ** 2)  # d(c tanh(u / c)) / du = 1 - tanh^2
        if self.scale != 1.0:
            dz.mul_(self.scale)
        return dz


PLAIN = Head()


def naive_logps(hidden, weight, labels, chunk=None, head=PLAIN):  # chunk: unused, the paths share one signature
    return torch.log_softmax(head.logits(hidden, weight), dim=-1).gather(-1, labels[:, None]).squeeze(-1)


class ChunkedLogps(torch.autograd.Function):
    """Forward: an online log-sum-exp over chunks of the vocabulary, and the target logit from the chunk that holds it.
    Backward: with z = h W^T, p = softmax(z) and upstream grad g, dz = g (onehot(y) - p); each chunk's logits are
    recomputed (kept when one chunk spans the vocabulary) and give its rows of grad_W = dz^T h in one matmul and dz W
    to grad_h. A Head's bias, scale and soft-cap apply to each chunk's logits, and their derivatives to its dz."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk=None, lse_target=None, head=PLAIN, bias=None):
        # bias: head.bias again, as an input of its own so that autograd gives it a gradient
        # vocabulary columns per chunk: `chunk`, or as many as keep one chunk's fp32 logits in CHUNK_BYTES
        cols = min(weight.shape[0], chunk or max(128, CHUNK_BYTES // (4 * max(1, hidden.shape[0]))))
        kept = None
        if lse_target is None:  # the triton path computes these itself
            lse = torch.full((hidden.shape[0],), float("-inf"), dtype=_acc(hidden), device=hidden.device)
            target = torch.zeros_like(lse)
            for v in range(0, weight.shape[0], cols):
                z = head.logits(hidden, weight, slice(v, v + cols))
                lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
                here = (labels >= v) & (labels < v + z.shape[1])
                picked = z.gather(-1, (labels - v).clamp(0, z.shape[1] - 1)[:, None]).squeeze(-1)
                target += torch.where(here, picked, 0.0)
            if cols >= weight.shape[0]:  # one chunk: its logits fit the budget, keep them rather than recompute
                kept = z
        else:
            lse, target = lse_target
        ctx.save_for_backward(hidden, weight, labels, lse, kept)
        ctx.cols, ctx.head = cols, head
        return target - lse

    @staticmethod
    def backward(ctx, grad):
        (hidden, weight, labels, lse, kept), head = ctx.saved_tensors, ctx.head
        g = grad.to(lse.dtype)
        grad_h = torch.zeros(hidden.shape, dtype=lse.dtype, device=hidden.device)
        grad_w = new_output(weight.shape, weight.dtype, weight.device)
        grad_b = new_output(head.bias.shape, head.bias.dtype, head.bias.device) if head.bias is not None else None
        for v in range(0, weight.shape[0], ctx.cols):
            w = weight[v : v + ctx.cols]
            z = kept if kept is not None else head.logits(hidden, weight, slice(v, v + ctx.cols))
            dz = (z - lse[:, None]).exp_().mul_(-g[:, None])  # -g p
            rows = torch.nonzero((labels >= v) & (labels < v + w.shape[0])).squeeze(-1)
            dz[rows, labels[rows] - v] += g[rows]  # + g onehot(y)
            dz = head.backward(dz, z)
            if grad_b is not None:
                grad_b[v : v + ctx.cols] = dz.sum(0)
            dz = dz.to(hidden.dtype)
            torch.mm(dz.T, hidden, out=grad_w[v : v + ctx.cols])
            if dz.dtype == grad_h.dtype:
                grad_h.addmm_(dz, w)
            else:
                grad_h += dz @ w
        return grad_h.to(hidden.dtype), grad_w, None, None, None, None, grad_b


def chunked_logps(hidden, weight, labels, chunk=None, head=PLAIN):
    return ChunkedLogps.apply(hidden, weight, labels, chunk, None, head, head.bias)


def triton_logps(hidden, weight, labels, chunk=None, head=PLAIN):
    if not head.plain:  # the kernel computes plain logits: a bias, scale or soft-cap takes the chunked path
        return chunked_logps(hidden, weight, labels, chunk, head)
    from triton_logps import lse_and_target

    lse, target = (new_output((hidden.shape[0],), torch.float32, hidden.device) for _ in range(2))
    lse_and_target(hidden, weight, labels, lse, target)
    return ChunkedLogps.apply(hidden, weight, labels, chunk, (lse, target))


def resolve_impl(impl, device):
    if impl not in IMPLS:
        raise ValueError(f"logps_impl must be one of {', '.join(IMPLS)}, got '{impl}'")
    if impl == "auto" and device.type == "cuda":
        with suppress(ImportError):
            import triton  # noqa: F401
            return "triton"
    return "chunked" if impl == "auto" else impl


def token_logps(hidden, weight, labels, impl="auto", chunk=None, head=PLAIN):
    """log p(labels) [...] float32 under logits = hidden [..., H] @ weight [V, H].T (as `head` transforms them), 0
    where labels == IGNORE: those positions are dropped before the matmul, so prompt and padding cost nothing."""
    impl = resolve_impl(impl, hidden.device)
    mask = labels != IGNORE
    out = torch.zeros(labels.shape, dtype=_acc(hidden), device=hidden.device)
    if mask.any():
        fn = {"naive": naive_logps, "chunked": chunked_logps, "triton": triton_logps}[impl]
        out = out.masked_scatter(mask, fn(hidden[mask], weight, labels[mask], chunk, head))
    return out


# --- causal LMs: label log-probs straight from the decoder's hidden states

def model_head(model):
    """The model's head as a Head (bias, logit_scale, logits_scaling, final_logit_softcapping, as their forwards
    apply them), or None when the fused paths cannot express it (no Linear lm_head after a `model.model`)."""
    head, cfg = getattr(model, "lm_head", None), model.config
    if not isinstance(head, torch.nn.Linear) or not hasattr(model, "model"):
        return None
    scale = float(getattr(cfg, "logit_scale", None) or 1.0) / float(getattr(cfg, "logits_scaling", None) or 1.0)
    return Head(head.bias, scale, getattr(cfg, "final_logit_softcapping", None) or None)


def attach_label_logps(model, impl="auto"):
    """Give `model` a `label_logps(input_ids, labels, attention_mask, position_ids)` method: the decoder's hidden states
    scored by `token_logps`, or by the model's own logits for a head model_head cannot express. An FSDP forward
    method: the root unit's parameters (embedding, norm, lm_head) are gathered for it, as for `forward`."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    def label_logps(self, input_ids, labels, attention_mask=None, position_ids=None, **attention_kwargs):
        # attention_kwargs (batching.varlen_layout's entries) travel through the decoder to its attention function
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                      **attention_kwargs)
        if (head := model_head(self)) is None:
            return logits_token_logps(self(**kwargs).logits, labels)
        hidden = self.model(**kwargs).last_hidden_state
        return token_logps(hidden[:, :-1], self.lm_head.weight, labels[:, 1:], impl=impl, head=head)

    model.label_logps = types.MethodType(label_logps, model)
    register_fsdp_forward_method(model, "label_logps")
    return model


def logits_token_logps(logits, labels):
    """The readable reference from full logits [N, T, V] (position t predicts token t + 1) and labels [N, T]:
    per-token log p(label) [N, T - 1], float32 at least, 0 where ignored."""
    labels = labels[:, 1:]
    mask = labels != IGNORE
    logits = logits[:, :-1].to(_acc(logits))
    picked = torch.gather(logits, -1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)) * mask


def model_sequence_logps(model, batch):
    """Summed label log-probs per sequence [N] and scored-token counts [N]: per row of a padded batch, or per segment of
    a packed one (batching.collate_packed: its varlen_ entries go to attention). The model needs attach_label_logps."""
    logps = model.label_logps(batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                              batch.get("position_ids"), **{k: v for k, v in batch.items() if k.startswith("varlen_")})
    scored = batch["labels"][:, 1:] != IGNORE
    if "segments" not in batch:  # one sequence per row
        return logps.sum(-1), scored.sum(-1)
    # several sequences per row: sum each token into its sequence (label-aligned, like logps)
    seg = batch["segments"][:, 1:].clamp(min=0).flatten()  # padding scores 0, so any bin will do
    sums = logps.new_zeros(batch["n_seqs"]).index_add(0, seg, logps.flatten())
    counts = torch.zeros(batch["n_seqs"], dtype=torch.long, device=seg.device)
    return sums, counts.index_add_(0, seg, scored.flatten().long())
