import pytest
import torch

import logps
from data import IGNORE
from logps import (attach_label_logps, chunked_logps, logits_token_logps, model_sequence_logps,
                      naive_logps, token_logps, triton_logps)

# the kernel tests run where the kernels do: on the GPU when there is one, else on CPU (interpreter)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

SHAPES = [  # tokens, hidden, vocab, vocab chunk
    (1, 8, 17, None),  # a batch of one token
    (37, 24, 101, 101),  # one chunk: its logits are kept for backward, not recomputed
    (37, 24, 101, 32),  # odd sizes, vocab not a multiple of the chunk
    (64, 16, 300, 128),
    (5, 40, 1000, 999),  # a last chunk of one column
]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(logps, "POISON", True)


def inputs(tokens, hidden, vocab, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    h = torch.randn(tokens, hidden, generator=g, dtype=dtype).to(DEVICE).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype).to(DEVICE).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g).to(DEVICE)
    up = torch.randn(tokens, generator=g, dtype=torch.float32).to(DEVICE)
    return h, w, y, up


def value_and_grads(fn, h, w, y, up):
    h.grad = w.grad = None
    out = fn(h, w, y)
    (out * up).sum().backward()
    return out.detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("fused", [chunked_logps, triton_logps], ids=["chunked", "triton"])
@pytest.mark.parametrize("tokens,hidden,vocab,chunk", SHAPES)
def test_fused_matches_naive_fp32(fused, tokens, hidden, vocab, chunk):
    """triton runs under TRITON_INTERPRET=1 on CPU (fp32 only there); on a GPU, the real kernel."""
    h, w, y, up = inputs(tokens, hidden, vocab, torch.float32)
    want = value_and_grads(naive_logps, h, w, y, up)
    got = value_and_grads(lambda *a: fused(*a, chunk), h, w, y, up)
    for a, b in zip(got, want):
        assert not a.isnan().any()  # every element written (outputs start as NaN)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_bf16_matches_naive_bf16():
    h, w, y, up = inputs(48, 32, 500, torch.float32)
    h, w = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    want = value_and_grads(naive_logps, h, w, y, up)
    got = value_and_grads(lambda *a: chunked_logps(*a, 96), h, w, y, up)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=2e-2)  # logits rounded to bf16 in both
    for a, b in zip(got[1:], want[1:]):  # each path rounds its own bf16 sums: 2% of the largest gradient
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())


def test_float64_gradcheck_of_chunked():
    h, w, y, _ = inputs(6, 5, 23)
    assert torch.autograd.gradcheck(lambda h, w: chunked_logps(h, w, y, 7), (h, w))  # recomputed logits
    assert torch.autograd.gradcheck(lambda h, w: chunked_logps(h, w, y), (h, w))  # one chunk, kept logits


@pytest.mark.parametrize("impl", ["naive", "chunked", "triton"])
def test_ignored_positions_cost_nothing_and_score_zero(impl):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    hidden = torch.randn(3, 9, 16, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(50, 16, generator=g).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 50, (3, 9), generator=g).to(DEVICE)
    labels[0, :4] = IGNORE
    labels[2] = IGNORE  # a row with nothing to score
    out = token_logps(hidden, w, labels, impl=impl)
    assert out.shape == labels.shape and (out[labels == IGNORE] == 0).all()
    want = naive_logps(hidden[labels != IGNORE], w, labels[labels != IGNORE])
    torch.testing.assert_close(out[labels != IGNORE], want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert (hidden.grad[labels == IGNORE] == 0).all() and hidden.grad[labels != IGNORE].abs().sum() > 0
    none = token_logps(hidden, w, torch.full_like(labels, IGNORE), impl=impl)
    assert (none == 0).all()


def test_chunked_under_torch_compile():
    h, w, y, up = inputs(20, 16, 200, torch.float32)
    want = value_and_grads(naive_logps, h, w, y, up)
    compiled = torch.compile(lambda h, w, y: chunked_logps(h, w, y, 64), backend="aot_eager")
    got = value_and_grads(compiled, h, w, y, up)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_logits_reference_equals_naive_loop():
    g = torch.Generator().manual_seed(0)
    N, T, V = 3, 11, 37
    logits = torch.randn(N, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, :4] = IGNORE  # prompt
    labels[1, 7:] = IGNORE  # padding
    labels[2, :] = IGNORE  # nothing to score
    got = logits_token_logps(logits, labels).sum(-1)
    for n in range(N):
        total = 0.0
        for t in range(1, T):  # logits at t - 1 predict token t
            if labels[n, t] != IGNORE:
                total += torch.log(torch.softmax(logits[n, t - 1], dim=-1)[labels[n, t]]).item()
        assert abs(got[n].item() - total) < 1e-9
    assert got[2].item() == 0.0


@pytest.mark.parametrize("impl", ["naive", "chunked", "triton"])
def test_model_label_logps_equal_full_logits(impl):
    """The decoder + fused head path equals log_softmax of the model's own logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    attach_label_logps(model, impl)
    ids = torch.randint(0, 97, (2, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels[1, 9:] = IGNORE
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    summed, counts = model_sequence_logps(model, batch)
    want = logits_token_logps(model(input_ids=ids, attention_mask=mask).logits, labels).sum(-1)
    torch.testing.assert_close(summed, want, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [7, 4]


# -----------------------------------------------------------------------------
# heads with a bias, a logit scale or soft-capping (Gemma-2, Cohere, Granite): inside the fused paths

HEADS = {"bias": dict(bias=True), "scale": dict(scale=0.0625), "softcap": dict(softcap=3.0),
         "all three": dict(bias=True, scale=2.5, softcap=5.0)}


def a_head(vocab, dtype, bias=False, scale=1.0, softcap=None):
    b = torch.randn(vocab, generator=torch.Generator().manual_seed(1), dtype=dtype).to(DEVICE).requires_grad_() \
        if bias else None
    return logps.Head(b, scale, softcap)


def by_hand(h, w, y, head):
    """The head's logits written out, for the reference: softcap * tanh((h W^T + b) * scale / softcap)."""
    z = h @ w.T + (head.bias if head.bias is not None else 0)
    z = z * head.scale
    z = head.softcap * torch.tanh(z / head.softcap) if head.softcap else z
    return torch.log_softmax(z.to(torch.promote_types(z.dtype, torch.float32)), -1).gather(-1, y[:, None])[:, 0]


@pytest.mark.parametrize("fused", [chunked_logps, triton_logps], ids=["chunked", "triton (falls back)"])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("chunk", [None, 64])  # one chunk (logits kept) or several (recomputed in backward)
def test_fused_heads_match_naive_with_gradients(fused, head, chunk):
    h, w, y, up = inputs(40, 24, 300, torch.float32, seed=3)
    head = a_head(300, torch.float32, **HEADS[head])
    with_bias = [head.bias] if head.bias is not None else []

    def grads(fn):
        for t in [h, w] + with_bias:
            t.grad = None
        out = fn(h, w, y)
        (out * up).sum().backward()
        return [out.detach()] + [t.grad.clone() for t in [h, w] + with_bias]

    want = grads(lambda h, w, y: by_hand(h, w, y, head))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5)
               for a, b in zip(grads(lambda h, w, y: naive_logps(h, w, y, head=head)), want))
    got = grads(lambda h, w, y: fused(h, w, y, chunk, head))
    for a, b in zip(got, want):
        assert not a.isnan().any()  # every element written (outputs start as NaN)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    plain = chunked_logps(h, w, y, chunk).detach()
    assert not torch.allclose(plain, got[0], atol=1e-3)  # the head changed the log-probs


def test_float64_gradcheck_of_a_chunked_head():
    h, w, y, _ = inputs(6, 5, 23, seed=4)
    head = a_head(23, torch.float64, bias=True, scale=1.7, softcap=2.0)
    for chunk in (7, None):  # recomputed, and kept, logits
        assert torch.autograd.gradcheck(
            lambda h, w, b: chunked_logps(h, w, y, chunk, logps.Head(b, head.scale, head.softcap)), (h, w, head.bias))


def tiny(kind):
    """A tiny model of each head kind, random weights, fp32."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    if kind == "gemma2 (softcap)":
        config = tf.Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0, attn_implementation="eager")
        return tf.Gemma2ForCausalLM(config)
    if kind == "cohere (logit_scale)":
        return tf.CohereForCausalLM(tf.CohereConfig(**common, logit_scale=0.5))
    if kind == "granite (logits_scaling)":
        return tf.GraniteForCausalLM(tf.GraniteConfig(**common, logits_scaling=4.0))
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=False))
    model.lm_head = torch.nn.Linear(32, 97, bias=True)  # a head with a bias
    return model


@pytest.mark.parametrize("kind", ["gemma2 (softcap)", "cohere (logit_scale)", "granite (logits_scaling)",
                                  "llama, head with a bias"])
def test_model_heads_take_the_fused_path_and_equal_the_models_logits(kind, monkeypatch):
    model = tiny(kind)
    assert not logps.model_head(model).plain
    attach_label_logps(model, "chunked")
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    batch = {"input_ids": ids, "labels": labels}
    want = logits_token_logps(model(input_ids=ids).logits, labels).sum(-1)
    want.sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setattr(logps, "logits_token_logps", None)  # the fused path, never the full logits
    got, _ = model_sequence_logps(model, batch)
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-4, atol=1e-6, msg=n)
