"""Log-probabilities of response tokens.

WRPO needs, for each response y, log pi(y|x) SUMMED over the response tokens (prompt and
padding masked out). This is the readable reference; a fused path that never builds the
full logits plugs in here.
"""

import torch

from data import IGNORE


def token_logps(logits, labels):
    """Per-token log p(label) for next-token prediction.

    logits [N, T, V]: position t predicts token t + 1. labels [N, T]: IGNORE where no loss.
    Returns logps [N, T - 1] (0 where ignored) and mask [N, T - 1] (True on response tokens).
    The softmax runs in float32 at least: bf16 log-sum-exp over 128k classes is off by ~1e-2 per token.
    """
    labels = labels[:, 1:]
    mask = labels != IGNORE
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    picked = torch.gather(logits, -1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    logps = picked - torch.logsumexp(logits, dim=-1)
    return logps * mask, mask


def sequence_logps(logits, labels):
    """Summed response log-probs per sequence: logps [N] and the token counts [N]."""
    logps, mask = token_logps(logits, labels)
    return logps.sum(-1), mask.sum(-1)


def model_sequence_logps(model, batch):
    """Run a causal LM on a collated batch; summed label log-probs [N] and token counts [N].

    A padded batch carries an attention_mask; a packed one carries position_ids that restart
    per example and no mask (see data.collate_packed). use_cache=False matters for packing:
    with a cache, transformers lets packed examples attend to each other.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"), use_cache=False)
    return sequence_logps(out.logits, batch["labels"])
