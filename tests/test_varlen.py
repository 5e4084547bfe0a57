"""attention.py's varlen path: the layout built at collate time, run through an emulation of varlen_attn's
documented contract on CPU, gives the per-sequence path's attention and the padded model's log-probs."""

import pytest
import torch
import torch.nn.functional as F

import attention
import batching
import data
from conftest import DEMO_MODEL
from logps import attach_label_logps
from training import TrainConfig
from test_packing import logps_and_grads
from test_packing import rows as heldout_rows


def emulated_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                         enable_gqa=False, top_left=False):
    """torch.nn.attention.varlen.varlen_attn as its docstring describes it, sdpa per range: query [Tq, H, D],
    key and value [Tk, Hkv, D], ranges cut by cu_seq_q and cu_seq_k. window_size (-1, 0) is causal, aligned
    bottom-right: query j of a range of n queries and m keys sees keys 0 .. m - n + j. top_left: the wrong
    alignment, for the self-check to catch."""
    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32 and type(max_q) is type(max_k) is int
    assert window_size == (-1, 0), "packed_sdpa's attention is causal"
    H, Hkv = query.shape[1], key.shape[1]
    assert H == Hkv or enable_gqa and H % Hkv == 0
    q_lens, k_lens = cu_seq_q.diff().tolist(), cu_seq_k.diff().tolist()
    assert cu_seq_q[0] == cu_seq_k[0] == 0 and len(q_lens) == len(k_lens)
    assert sum(q_lens) == len(query) and sum(k_lens) == len(key) == len(value)
    assert max(q_lens) == max_q and max(k_lens) == max_k
    key, value = (x.repeat_interleave(H // Hkv, dim=1) for x in (key, value))
    out = []
    for q, k, v in zip(query.split(q_lens), key.split(k_lens), value.split(k_lens)):
        n, m = len(q), len(k)
        mask = torch.ones(n, m, dtype=torch.bool).tril(0 if top_left else m - n)
        out.append(F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)), attn_mask=mask,
                                                  scale=scale).transpose(0, 1))
    return torch.cat(out)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The emulation stands in for the flash kernel and takes any inputs; the list counts its calls."""
    calls = []

    def kernel(*args, **kwargs):
        calls.append(1)
        return emulated_varlen_attn(*args, **kwargs)

    monkeypatch.setattr(attention, "_varlen_kernel", kernel)
    monkeypatch.setattr(attention, "_varlen_accepts", lambda query: True)
    return calls


def random_ids(g, n):
    return torch.randint(10, 99, (n,), generator=g).tolist()


def preference_rows(g):
    """WRPO rows and a DPO row (2 responses), of mixed lengths, one with a 1-token prompt."""
    shapes = [(5, [40, 3, 2]), (3, [4, 30]), (8, [2, 2, 20]), (1, [7, 5, 9])]
    return [data.PreferenceRow(random_ids(g, p), [random_ids(g, n) for n in ns], len(ns) - 1, f"x:{i}")
            for i, (p, ns) in enumerate(shapes)]


def batches():
    """Position ids of every layout the trainers make: SFT-style packed rows with padding, packed
    preference rows (WRPO and DPO), and shared-prompt rows."""
    g = torch.Generator().manual_seed(0)
    seq = lambda n: data.Sequence(random_ids(g, n), [data.IGNORE] + random_ids(g, n - 1), "x")  # noqa: E731
    sft = batching.collate_packed([[seq(5), seq(9)], [seq(14)], [seq(3)], [seq(1), seq(6), seq(2)]], pad_id=0)
    packed = batching.collate_preference(preference_rows(g), pad_id=0, packed=True)
    shared = batching.collate_preference(preference_rows(g), pad_id=0, packed=True, shared_prompt=True)
    return {"sft": sft["position_ids"], "packed": packed["position_ids"], "shared": shared["position_ids"]}


# -----------------------------------------------------------------------------
# the layout


def test_layout_by_hand():
    # row 0: a 4-token group, a 2-token continuation of its first 2 tokens, a 2-token group;
    # row 1: sequences of 3 and 4 tokens and 1 padding token
    layout = batching.varlen_layout(torch.tensor([[0, 1, 2, 3, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2, 3, 0]]))
    assert layout["varlen_cu_seq_q"].tolist() == [0, 4, 6, 8, 11, 15, 16]
    assert layout["varlen_cu_seq_k"].tolist() == [0, 4, 8, 10, 13, 17, 18]  # the continuation: 2 + 2 keys
    assert layout["varlen_cu_seq_q"].dtype == layout["varlen_cu_seq_k"].dtype == torch.int32
    assert layout["varlen_k_index"].tolist() == [0, 1, 2, 3, 0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert (layout["varlen_max_q"], layout["varlen_max_k"]) == (4, 4)
    # no continuation: the keys are the queries' tokens, nothing to gather
    plain = batching.varlen_layout(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]))
    assert "varlen_k_index" not in plain and plain["varlen_cu_seq_k"].tolist() == [0, 3, 5, 10] \
        == plain["varlen_cu_seq_q"].tolist()
    assert (plain["varlen_max_q"], plain["varlen_max_k"]) == (5, 5)


def test_a_continuation_longer_than_its_group_is_an_error():
    with pytest.raises(ValueError, match="only 2 tokens"):  # continues position 3 of a 2-token group
        batching.varlen_layout(torch.tensor([[0, 1, 3, 4, 5, 6]]))
    with pytest.raises(ValueError, match="first sequence starts at position 2"):  # groups do not span rows
        batching.varlen_layout(torch.tensor([[0, 1, 2], [2, 3, 4]]))
    q = torch.randn(1, 2, 4, 8)
    for pos in ([[3, 4, 5, 6]], [[2, 3, 0, 1]]):  # a row opening with a continuation: no group to continue
        with pytest.raises(ValueError, match="first sequence starts at position"):
            batching.varlen_layout(torch.tensor(pos))
        with pytest.raises(ValueError, match="first sequence starts at position"):  # the same rule per sequence
            attention.packed_sdpa(torch.nn.Module(), q, q, q, None, position_ids=torch.tensor(pos))


# -----------------------------------------------------------------------------
# attention: the varlen path against the per-sequence one


@pytest.mark.parametrize("kind", ["sft", "packed", "shared"])
def test_varlen_attention_and_gradients_equal_per_sequence_sdpa(kind, kernel_calls):
    position_ids = batches()[kind]
    layout = batching.varlen_layout(position_ids)
    assert ("varlen_k_index" in layout) == (kind == "shared")
    (R, T), H, Hkv, D = position_ids.shape, 4, 2, 8
    assert R > 1 and (position_ids[:, -1] < T - 1).any()  # several rows, some ending in padding
    module = torch.nn.Module()
    results = []
    for kwargs in ({"position_ids": position_ids}, {"position_ids": position_ids, **layout}):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(R, h, T, D, generator=g, requires_grad=True) for h in (H, Hkv, Hkv))
        out, weights = attention.packed_sdpa(module, q, k, v, None, scaling=0.3, **kwargs)
        assert weights is None and out.shape == (R, T, H, D)
        out.backward(torch.randn(out.shape, generator=g))
        results.append([out, q.grad, k.grad, v.grad])
    assert len(kernel_calls) == 1  # one call for the whole batch, and only with the layout
    for want, got in zip(*results):
        torch.testing.assert_close(got, want)


def test_without_an_accepting_kernel_the_layout_is_ignored(monkeypatch):
    """fp32 on CPU is not for the flash kernel, and it has no dropout: the per-sequence path serves both."""
    monkeypatch.setattr(attention, "_varlen_kernel", lambda *a, **k: pytest.fail("the kernel was called"))
    position_ids = batches()["shared"]
    layout = batching.varlen_layout(position_ids)
    q = torch.randn(position_ids.shape[0], 2, position_ids.shape[1], 8)
    module = torch.nn.Module().eval()
    out, _ = attention.packed_sdpa(module, q, q, q, None, position_ids=position_ids, **layout)
    want, _ = attention.packed_sdpa(module, q, q, q, None, position_ids=position_ids)
    torch.testing.assert_close(out, want)
    monkeypatch.setattr(attention, "_varlen_accepts", lambda query: True)
    torch.manual_seed(0)
    out, _ = attention.packed_sdpa(module.train(), q, q, q, None, dropout=0.5, position_ids=position_ids, **layout)
    assert out.shape == want.shape


# -----------------------------------------------------------------------------
# the model: log-probs and gradients through logps.model_sequence_logps


def test_varlen_model_logps_and_gradients_equal_padded_sdpa(tmp_path, tokenizer, kernel_calls):
    """As tests/test_packing.py, for the varlen path: the tiny Llama (GQA, 2 layers) in fp32, plain, and sharded
    with FSDP and activation checkpointing as the trainers load it (the layout must reach the attention
    function through label_logps, FSDP's forward method and the checkpointed layers' recompute)."""
    from transformers import AutoModelForCausalLM

    import fsdp_utils

    attention.register()
    examples = heldout_rows(tmp_path, tokenizer)
    _, _, device, mesh = fsdp_utils.init_distributed()

    def plain(attn=attention.NAME):
        return attach_label_logps(AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32,
                                                                       attn_implementation=attn))

    def sharded():
        cfg = TrainConfig(dtype="float32", activation_checkpointing="true")
        return fsdp_utils.load_model(DEMO_MODEL, mesh, device, cfg, attn=attention.NAME)

    padded = batching.collate_preference(examples, tokenizer.pad_token_id)
    lp_pad, c_pad, g_pad = logps_and_grads(plain("sdpa"), padded)
    assert lp_pad.shape == (5, 3)
    layers = 2
    for make, shared, calls in [(plain, False, layers), (plain, True, layers), (sharded, True, 2 * layers)]:
        batch = batching.collate_preference(examples, tokenizer.pad_token_id, packed=True, shared_prompt=shared)
        batch.update(batching.varlen_layout(batch["position_ids"]))
        kernel_calls.clear()
        lp, c, g = logps_and_grads(make(), batch)
        key = f"{make.__name__} shared={shared}"
        assert len(kernel_calls) == calls, key  # once per layer, and once more per layer's recompute
        assert c.tolist() == c_pad.tolist(), key
        torch.testing.assert_close(lp, lp_pad, rtol=1e-5, atol=1e-5, msg=key)
        assert g.keys() == g_pad.keys()
        for name in g_pad:
            torch.testing.assert_close(g[name], g_pad[name], rtol=1e-4, atol=1e-6, msg=f"{key} {name}")


# -----------------------------------------------------------------------------
# choosing the path


def test_the_self_check_passes_a_right_kernel_and_fails_a_wrong_one(monkeypatch):
    ok, message = attention.varlen_self_check(torch.device("cpu"))
    assert not ok and "CUDA" in message
    if not torch.cuda.is_available():  # the check itself fails on a device that is not there, and says why
        ok, message = attention.varlen_self_check(torch.device("cuda"))
        assert not ok and message
    for dtype in (torch.float32, torch.bfloat16):
        monkeypatch.setattr(attention, "_varlen_kernel", emulated_varlen_attn)
        assert attention._check_against_per_sequence(torch.device("cpu"), dtype) == (True, "self-check passed")
        monkeypatch.setattr(attention, "_varlen_kernel", lambda *a, **k: emulated_varlen_attn(*a, **k, top_left=True))
        ok, message = attention._check_against_per_sequence(torch.device("cpu"), dtype)
        assert not ok and message.startswith("self-check failed: output off by"), message


def test_use_varlen_is_decided_once_per_process(monkeypatch, capsys):
    monkeypatch.setattr(attention, "_use_varlen", {})
    assert attention.use_varlen(torch.device("cpu")) is False
    checks = []

    def check(device, result):
        checks.append(device)
        return result

    monkeypatch.setattr(attention, "varlen_self_check", lambda d: check(d, (True, "self-check passed")))
    assert attention.use_varlen("cuda:0") and attention.use_varlen(torch.device("cuda:0"))
    assert len(checks) == 1 and capsys.readouterr().out == "attention: flash varlen (self-check passed)\n"
    monkeypatch.setattr(attention, "varlen_self_check", lambda d: check(d, (False, "RuntimeError: no kernel")))
    assert not attention.use_varlen("cuda:1") and not attention.use_varlen("cuda:1")
    assert len(checks) == 2 and capsys.readouterr().out == \
        "attention: varlen unavailable (RuntimeError: no kernel); using packed_sdpa's per-sequence sdpa\n"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen kernel needs CUDA")
def test_the_real_kernel_passes_its_self_check():
    assert attention.varlen_self_check(torch.device("cuda")) == (True, "self-check passed")
