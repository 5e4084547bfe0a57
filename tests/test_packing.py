"""Padding-free packing of preference rows: same log-probs and gradients as padded batches."""

import json

import pytest
import torch

import attention
import batching
import data
from conftest import DEMO_MODEL
from logps import attach_label_logps, model_sequence_logps
from wrpo import wrpo_loss


def row_length(row, shared_prompt=False):
    """Tokens of a row's sequences, as batching.row_sequences lays them out."""
    return sum(len(s.ids) for s in batching.row_sequences(row, shared_prompt))


def rows(tmp_path, tokenizer, n=5):
    lines = [json.loads(x) for x in (DEMO_MODEL.parent / "data" / "heldout.jsonl").read_text().splitlines()[:n]]
    lines[1]["chosen"] = lines[1]["chosen"][:1]  # a DPO row among WRPO rows
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return data.load_preference_rows(path, tokenizer)


# (attention, collate mode): transformers' sdpa with its padding and block masks, and packed_sdpa
# (attention.py) on padded rows, packed rows and rows whose responses share one copy of the prompt
MODES = [("sdpa", "padded"), ("sdpa", "packed"), ("packed_sdpa", "padded"), ("packed_sdpa", "packed"),
         ("packed_sdpa", "shared")]


def logps_and_grads(model, batch):
    """Each row's (ws, wt, rej) log-probs and counts [B, 3], and the parameters' gradients of a WRPO loss."""
    logps, counts = model_sequence_logps(model, batch)
    ref = logps.detach() - 1.0  # any fixed reference
    i = batch["src"][:, 0], batch["wt"], batch["rej"]  # one source per row
    losses, _ = wrpo_loss(*(logps[j] for j in i), *(ref[j] for j in i), alpha=0.3, beta=0.5)
    losses.sum().backward()
    by_row = lambda t: torch.stack([t[j] for j in i], -1)  # noqa: E731  [B, 3], whatever the sequence order
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters()}  # (a DTensor's under FSDP)
    return by_row(logps.detach()), by_row(counts), grads


def test_packed_and_padded_batches_give_the_same_logps_and_gradients(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    attention.register()
    examples = rows(tmp_path, tokenizer)
    results = {}
    for attn, mode in MODES:
        model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32, attn_implementation=attn)
        attach_label_logps(model)
        batch = batching.collate_preference(examples, tokenizer.pad_token_id, packed=mode != "padded",
                                        shared_prompt=mode == "shared")
        assert ("attention_mask" in batch) == (mode == "padded")
        results[attn, mode] = logps_and_grads(model, batch)
    lp_pad, c_pad, g_pad = results["sdpa", "padded"]  # the plain reference
    assert lp_pad.shape == (5, 3)
    for key, (lp, c, g) in results.items():
        assert c.tolist() == c_pad.tolist(), key
        torch.testing.assert_close(lp, lp_pad, rtol=1e-5, atol=1e-5, msg=str(key))
        for name in g_pad:
            torch.testing.assert_close(g[name], g_pad[name], rtol=1e-4, atol=1e-6, msg=f"{key} {name}")
    packed_batch = batching.collate_preference(examples, tokenizer.pad_token_id, packed=True)
    n_rows, width = packed_batch["input_ids"].shape
    longest = max(len(ex.prompt_ids) + len(r) for ex in examples for r in ex.responses)
    assert width == longest and n_rows <= 14  # rows as wide as the longest sequence
    assert int((packed_batch["segments"] >= 0).sum()) == sum(row_length(ex) for ex in examples)
    shared = batching.collate_preference(examples, tokenizer.pad_token_id, packed=True, shared_prompt=True)
    saved = sum(row_length(ex) - row_length(ex, shared_prompt=True) for ex in examples)
    assert int((shared["segments"] >= 0).sum()) == sum(row_length(ex) for ex in examples) - saved
    assert saved == sum((len(ex.prompt_ids) - 1) * (len(ex.responses) - 1) for ex in examples) > 0


def test_packed_sdpa_reads_sequences_off_position_ids():
    assert batching.sequences([0, 1, 2, 0, 1, 5, 6, 0]) == [(0, 3, 0), (3, 5, 0), (5, 7, 5), (7, 8, 0)]
    assert batching.sequences([3, 4]) == [(0, 2, 3)]
    q = torch.randn(1, 2, 6, 4)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="only 2 tokens"):  # continues position 3 of a 2-token group
        attention.packed_sdpa(module, q, q, q, None, position_ids=torch.tensor([[0, 1, 3, 4, 5, 6]]))
    with pytest.raises(ValueError, match="needs position_ids"):
        attention.packed_sdpa(module, q, q, q, None)
    # a continuation sees its group's prefix and itself: the same output as the unshared sequence
    k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    out, _ = attention.packed_sdpa(module, q, k, v, None, position_ids=torch.tensor([[0, 1, 2, 3, 2, 3]]))
    alone = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, [0, 1, 4, 5]], k[:, :, [0, 1, 4, 5]], v[:, :, [0, 1, 4, 5]], is_causal=True)
    torch.testing.assert_close(out[:, 4:].transpose(1, 2), alone[:, :, 2:])


def test_micro_batches_by_rows_or_token_budget(monkeypatch):
    monkeypatch.setattr(data.dist, "all_reduce", lambda t, op=None: None)  # one rank: nothing to even out
    rows = [7, 3, 9, 1, 4, 0, 8]  # one step's rows on this rank (indices into the data)
    lengths = {7: 50, 3: 10, 9: 300, 1: 40, 4: 40, 0: 90, 8: 5}
    assert batching.micro_batches_by_rows(rows, 3) == [[7, 3, 9], [1, 4, 0], [8]]  # in order
    batches = batching.micro_batches_by_tokens(rows, lengths, budget=100, device=torch.device("cpu"))
    assert sorted(i for b in batches for i in b) == sorted(rows)
    assert [9] in batches  # longer than the budget: alone
    assert all(sum(lengths[i] for i in b) <= 100 for b in batches if len(b) > 1)
    assert batches == [[9], [0, 3], [7, 1, 8], [4]]  # batching.pack's best fit, of the rows' lengths


@pytest.mark.parametrize("world", [1, 2, 3])
def test_no_grad_passes_take_token_budget_micro_batches(monkeypatch, world):
    lengths = [50, 10, 300, 40, 40, 90, 5, 70, 20, 35, 60]  # 11 rows: with 2 or 3 ranks the last is short
    device = torch.device("cpu")
    monkeypatch.setattr(data.dist, "all_reduce", lambda t, op=None: None)
    most = max(len(batching.eval_batches_by_tokens(lengths, 100, r, world, device)) for r in range(world))
    monkeypatch.setattr(data.dist, "all_reduce", lambda t, op=None: t.fill_(most))  # every rank runs `most`
    seen = []
    for rank in range(world):
        batches = batching.eval_batches_by_tokens(lengths, 100, rank, world, device)
        assert len(batches) == most
        for idx, weight in batches:
            assert sum(lengths[i] for i in idx) <= 100 or len(idx) == 1  # an over-long row alone
            seen += [i for i, w in zip(idx, weight.tolist()) if w == 1.0]
            assert all(i == 0 for i, w in zip(idx, weight.tolist()) if w == 0.0)  # padding: row 0, weight 0
    assert sorted(seen) == list(range(len(lengths)))  # every row once with weight 1


def test_same_count_on_all_ranks_splits_the_largest(monkeypatch):
    monkeypatch.setattr(data.dist, "all_reduce", lambda t, op=None: t.fill_(5))  # another rank has 5
    out = batching.same_count_on_all_ranks([[1, 2, 3, 4], [5], [6, 7]], torch.device("cpu"))
    assert len(out) == 5 and sorted(i for b in out for i in b) == [1, 2, 3, 4, 5, 6, 7]
    assert all(b for b in out)


def test_reference_cache_is_keyed_by_everything_it_depends_on(tmp_path, tokenizer):
    import copy

    import tokens
    from wrpo import Config, reference_cache

    cfg = Config(ref_cache_dir=str(tmp_path / "cache"))
    examples = rows(tmp_path, tokenizer)
    weights = {"model.safetensors": "690000:0a1b2c3d", "config.json": "700:12345678"}  # checkpoint.model_identity's
    path = lambda c=cfg, ex=examples, layout="sdpa|padded 1", identity=weights: reference_cache(  # noqa: E731
        c, layout, identity, ex, tmp_path / "rows.jsonl")
    base = path()
    assert base == path() and base[0].parent == tmp_path / "cache" and base[0].name.startswith("rows.jsonl.ref-logps-")
    assert base[0].name.endswith(f"-{base[1][:20]}.safetensors")  # named by its key
    assert path(ex=tokens.build_rows("preference", examples[:-1])) != base  # other data
    reweighted = [copy.copy(r) for r in examples]
    reweighted[0].source_weights = [0.5]  # (no valid row has it: the key sees the weights)
    assert path(ex=tokens.build_rows("preference", reweighted)) != base  # other source weights
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = tok.chat_template.replace("<|eot_id|>", "<|end_of_text|>")
    retokenized = data.load_preference_rows(tmp_path / "rows.jsonl", tok)
    assert path(ex=retokenized) != base  # other tokenizer or chat template
    truncated = data.load_preference_rows(tmp_path / "rows.jsonl", tokenizer, max_length=24, max_prompt_length=16)
    assert path(ex=truncated) != base  # other truncation settings
    assert path(c=Config(ref_cache_dir=cfg.ref_cache_dir, dtype="float32")) != base  # other compute dtype
    assert path(layout="packed_sdpa|padded 1") != base and path(layout="sdpa|padded 2") != base  # other batches
    assert path(identity={**weights, "model.safetensors": "690000:0a1b2c3e"}) != base  # other reference weights
    assert reference_cache(Config(), "sdpa", weights, examples, tmp_path / "rows.jsonl")[0].parent == tmp_path


def test_packed_rows_combine_sequences_and_index_them_right():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    rand = lambda n: torch.randint(10, 99, (n,), generator=g).tolist()  # noqa: E731
    examples = [data.PreferenceRow(rand(p), [rand(a), rand(b), rand(c)], 2, f"x:{i}")
                for i, (p, a, b, c) in enumerate([(5, 40, 3, 2), (3, 4, 30, 6), (8, 2, 2, 20), (4, 7, 5, 9)])]
    batch = batching.collate_preference(examples, pad_id=0, packed=True)
    width = batch["input_ids"].shape[1]
    assert width == 45 and batch["input_ids"].shape[0] < 12  # short sequences share rows
    for i, ex in enumerate(examples):
        for key, response in zip(("src", "wt", "rej"), ex.responses):
            where = batch["segments"] == batch[key][i].reshape(-1)[0]  # (src: one source per row)
            assert batch["input_ids"][where].tolist() == ex.prompt_ids + response
            assert (batch["position_ids"][where] == torch.arange(len(ex.prompt_ids) + len(response))).all()


def test_shared_prompt_rows_keep_each_rows_sequences_together():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    rand = lambda n: torch.randint(10, 99, (n,), generator=g).tolist()  # noqa: E731
    examples = [data.PreferenceRow(rand(p), [rand(a), rand(b), rand(c)][: 2 if i == 1 else 3], 2 if i != 1 else 1,
                                   f"x:{i}")
                for i, (p, a, b, c) in enumerate([(5, 40, 3, 2), (3, 4, 30, 6), (8, 2, 2, 20), (1, 7, 5, 9)])]
    batch = batching.collate_preference(examples, pad_id=0, packed=True, shared_prompt=True)
    assert batch["input_ids"].shape[1] == 5 + 40 + 4 + 3  # the widest row: one whole example
    for i, ex in enumerate(examples):
        p = ex.prompt_ids
        for key, response in zip(("src", "wt", "rej"), [ex.responses[0]] * (3 - len(ex.responses)) + ex.responses):
            where = batch["segments"] == batch[key][i].reshape(-1)[0]  # (src: one source per row)
            first = response is ex.responses[0]
            ids = p + response if first else p[-1:] + response
            assert batch["input_ids"][where].tolist() == ids
            start = 0 if first else len(p) - 1
            assert batch["position_ids"][where].tolist() == list(range(start, start + len(ids)))
            assert batch["labels"][where].tolist() == [data.IGNORE] * (len(ids) - len(response)) + response
    with pytest.raises(ValueError, match="packed"):
        batching.collate_preference(examples, pad_id=0, shared_prompt=True)


def test_the_reference_cache_is_read_only_when_every_rank_sees_it(tmp_path, monkeypatch):
    """All ranks read the cache or all compute: a rank that computes while another reads would pair its
    collectives with the wrong ones (several nodes without a shared folder, or a cache being written)."""
    import fsdp_utils

    path = tmp_path / "rows.jsonl.ref-logps-x.safetensors"
    path.write_bytes(b"cache")
    monkeypatch.setattr(fsdp_utils.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(fsdp_utils.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(fsdp_utils.dist, "all_reduce", lambda t, op=None: None)  # one rank: it sees the file
    assert fsdp_utils.on_every_rank(path.exists())
    other_rank_misses_it = lambda t, op=None: t.fill_(0) if op == fsdp_utils.dist.ReduceOp.MIN else None  # noqa: E731
    monkeypatch.setattr(fsdp_utils.dist, "all_reduce", other_rank_misses_it)
    assert not fsdp_utils.on_every_rank(path.exists())
