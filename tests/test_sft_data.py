import json
import random

import pytest
import torch

import data
from batching import collate_packed, pack
from conftest import DEMO_MODEL
from data import IGNORE, DataError, load_sft_examples
from logps import attach_label_logps, logits_token_logps, model_sequence_logps

CHAT = {"messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6"},
]}
WRPO_ROW = {"prompt_id": "a", "prompt": [{"role": "user", "content": "Reverse 'cat'."}],
            "chosen": [{"role": "assistant", "content": "Backwards it is tac."},
                       {"role": "assistant", "content": "tac"}],
            "rejected": [{"role": "assistant", "content": "cat"}]}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def scored_text(tokenizer, ex):
    return tokenizer.decode([t for t in ex.labels if t != IGNORE])


def test_loss_mask_is_exactly_the_assistant_turns(tmp_path, tokenizer):
    chat, wrpo = load_sft_examples(write_jsonl(tmp_path / "d.jsonl", [CHAT, WRPO_ROW]), tokenizer)
    assert tokenizer.decode(chat.ids) == tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    # each assistant turn with its end-of-turn token, and nothing else (no headers, no user text)
    assert scored_text(tokenizer, chat) == "It is 4.<|eot_id|>6<|eot_id|>"
    on = [t != IGNORE for t in chat.labels]
    assert sum(on[i] and not on[i - 1] for i in range(1, len(on))) == 2  # two contiguous scored runs
    assert all(lab in (IGNORE, t) for t, lab in zip(chat.ids, chat.labels))  # labels are the tokens themselves
    # a WRPO row trains on prompt + chosen[0] (y_ws)
    assert scored_text(tokenizer, wrpo) == "Backwards it is tac.<|eot_id|>"


def test_loss_on_all_scores_every_token_but_the_first(tmp_path, tokenizer):
    (ex,) = load_sft_examples(write_jsonl(tmp_path / "d.jsonl", [CHAT]), tokenizer, loss_on="all")
    assert ex.labels[0] == IGNORE and ex.labels[1:] == ex.ids[1:]


def test_truncation_and_bad_rows(tmp_path, tokenizer):
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 60}]}
    (ex,) = load_sft_examples(write_jsonl(tmp_path / "d.jsonl", [long]), tokenizer, max_length=32)
    assert len(ex.ids) == len(ex.labels) == 32
    with pytest.raises(DataError, match=r"d\.jsonl:1: conversation is \d+ tokens, over max_length 32"):
        load_sft_examples(tmp_path / "d.jsonl", tokenizer, max_length=32, truncation="error")
    long_prompt = {"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]}
    bad = [long_prompt,
           {"messages": []},
           {"messages": [{"role": "user", "content": "only a question"}]},
           {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
           {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
           {"messages": ["x", "y"]},
           {"prompt": "x", "chosen": [], "rejected": ["y"]}]
    with pytest.raises(DataError) as err:
        load_sft_examples(write_jsonl(tmp_path / "bad.jsonl", bad), tokenizer, max_length=32)
    msg = str(err.value)
    for line, reason in [(1, "no assistant token within max_length 32"), (2, "messages must be a non-empty list"),
                         (3, "messages has no assistant turn"), (4, "messages[0] has role 'robot'"),
                         (5, r"messages[1] is empty"), (6, "messages[0] must be a {'role', 'content'} dict"),
                         (7, "chosen must be a list of 1")]:
        assert f"bad.jsonl:{line}: {reason}" in msg, (line, msg)


def test_pack_keeps_every_item_once_within_capacity_and_fills_bins():
    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(200)]
    rows = pack(lengths, 128)
    flat = [i for row in rows for i in row]
    assert sorted(flat) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert sum(lengths) / (len(rows) * 128) > 0.95  # best-fit decreasing leaves little room unused
    assert pack(lengths, 128) == rows  # deterministic: the data order is decided elsewhere (train_steps)
    assert pack([200, 10], 128) == [[0], [1]]  # an item over capacity gets a bin of its own
    # by hand, capacity 100, largest first into the fullest bin with room: 300 is over capacity (alone); 90 and 50
    # open bins; the first 40 joins the 50 (room 10 left); the second opens a bin; 10 fills the 90 (of the two
    # bins with room 10, the first); 5 goes to 50 + 40, now the fullest bin with room
    assert pack([50, 10, 300, 40, 40, 90, 5], 100) == [[2], [5, 1], [0, 3, 6], [4]]


def test_packed_forward_equals_unpacked(tokenizer):
    """Per-token log-probs of each example inside a packed row equal the example run alone (fp32)."""
    from transformers import AutoModelForCausalLM

    model = attach_label_logps(AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval())
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (9, 5, 13, 7, 4):
        ids = torch.randint(0, len(tokenizer), (n,), generator=g).tolist()
        examples.append(data.Sequence(ids, [IGNORE] + ids[1:], "x"))
    rows = [examples[:3], examples[3:]]  # two packed rows of different fill, so the second is padded
    batch = collate_packed(rows, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 27)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        logps = logits_token_logps(packed, batch["labels"])
        mask = batch["labels"][:, 1:] != IGNORE
        for r, row in enumerate(rows):
            at = 0
            for ex in row:
                n = len(ex.ids)
                alone = model(input_ids=torch.tensor([ex.ids]), use_cache=False).logits
                want = logits_token_logps(alone, torch.tensor([ex.labels]))
                # position at + t - 1 of the packed row predicts the example's token t
                torch.testing.assert_close(logps[r, at:at + n - 1], want[0], rtol=0, atol=1e-5)
                at += n
        assert mask.sum() == sum(len(ex.ids) - 1 for ex in examples)  # no cross-example predictions
        summed, counts = model_sequence_logps(model, batch)  # the fused path, straight from hidden states
        torch.testing.assert_close(summed, logps.sum(-1), rtol=1e-5, atol=1e-5)
        assert counts.tolist() == mask.sum(-1).tolist()
        # pinned: with a cache, transformers lets packed examples attend to each other
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits
        assert (leaky[0, 9:] - packed[0, 9:]).abs().max() > 1e-3
