"""The chat templates of the families WRPO targets, through the data path: each prompt renders as a prefix of
prompt + response, a reply is scored on exactly its text and its end-of-turn token, BOS and EOS are never doubled,
system turns are kept or refused by file:line, and multi-turn SFT masks every assistant turn and nothing else."""

import pytest

from batching import collate_preference
from chat_families import FAMILIES, QWEN_SYSTEM, build_tokenizer
from data import IGNORE, SYSTEM_HINT, DataError, load_preference_rows, load_sft_examples, render
from test_data import write_jsonl

TURNS = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, how can I help"},
         {"role": "user", "content": "What is two plus three?"}]
REPLIES = ["Five.", "The answer is five", "Six, I think"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    fam = FAMILIES[request.param]
    return request.param, fam, build_tokenizer(fam)


def wrpo_row(prompt, replies=REPLIES):
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": r} for r in replies[:2]],
            "rejected": [{"role": "assistant", "content": replies[2]}]}


def spans(labels):
    """The runs of scored positions in a label list, as (start, end) pairs."""
    out, start = [], None
    for i, t in enumerate(labels + [IGNORE]):
        if t != IGNORE and start is None:
            start = i
        elif t == IGNORE and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize("turns", [TURNS[:1], TURNS], ids=["one turn", "three turns"])
def test_a_reply_is_its_text_and_end_of_turn(tmp_path, family, turns):
    name, fam, tok = family
    rows = load_preference_rows(write_jsonl(tmp_path / "d.jsonl", [wrpo_row(turns)]), tok, report=lambda *a: None)
    row = rows[0]
    prompt_text = render(tok, turns, add_generation_prompt=True)
    assert row.prompt_ids == tok(prompt_text, add_special_tokens=False)["input_ids"]
    end, bos, eos = (tok.convert_tokens_to_ids(t) if t else None for t in (fam.end, fam.bos, fam.eos))
    for reply, ids in zip(REPLIES, row.responses):
        assert tok.decode(ids) == reply + fam.end  # the reply and its end-of-turn token, nothing after
        full = tok(render(tok, turns + [{"role": "assistant", "content": reply}]), add_special_tokens=False)
        seq = row.prompt_ids + ids
        assert full["input_ids"][: len(seq)] == seq  # the prompt is a prefix of prompt + response
        assert tok.decode(full["input_ids"][len(seq):]).strip() == ""  # only the template's newline is left out
        assert ids.count(end) == 1 and ids[-1] == end
        assert ids.count(eos) == (eos == end)  # no EOS after the end-of-turn token (Mistral's is its EOS)
        if bos is None:
            assert tok.bos_token is None
        else:
            assert tok("Hi")["input_ids"][0] == bos  # the tokenizer adds one when asked, as the real ones do
            assert seq.count(bos) == 1 and seq[0] == bos  # the template's BOS, not a second one from the tokenizer
    text = tok.decode(row.prompt_ids)
    if name == "llama3.1":  # the default system header with the knowledge cut-off and the date
        assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
                               "Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>")
    if name == "qwen2.5":  # the default system prompt, inserted when none is given
        assert text.startswith(f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    if name == "gemma2":  # the assistant's turns are the model's
        assert text.endswith("<start_of_turn>model\n")
        assert "<start_of_turn>assistant" not in text and ("<start_of_turn>model\nHello" in text) == (len(turns) > 1)


def test_system_turns_are_kept_or_refused_by_file_line(tmp_path, family):
    name, fam, tok = family
    system = [{"role": "system", "content": "Answer briefly."}]
    path = write_jsonl(tmp_path / "d.jsonl", [wrpo_row(TURNS), wrpo_row(system + TURNS)])
    if not fam.system:
        why = "System role not supported" if name == "gemma2" else "Conversation roles must alternate"
        with pytest.raises(DataError, match=rf"d\.jsonl:2: the chat template refuses this row \({why}") as e:
            load_preference_rows(path, tok, report=lambda *a: None)
        assert SYSTEM_HINT in str(e.value)
        chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": system + TURNS[:2]}])
        with pytest.raises(DataError, match=rf"c\.jsonl:1: the chat template refuses this row \({why}"):
            load_sft_examples(chat, tok, report=lambda *a: None)
        return
    plain, with_system = load_preference_rows(path, tok, report=lambda *a: None)
    text = tok.decode(with_system.prompt_ids)
    assert text.count("Answer briefly.") == 1 and "Answer briefly." not in tok.decode(plain.prompt_ids)
    assert QWEN_SYSTEM not in text  # a given system turn replaces Qwen's default one
    assert with_system.responses == plain.responses


@pytest.mark.parametrize("bad", [[TURNS[0], TURNS[0]], [TURNS[1], TURNS[0]]], ids=["two user turns", "starts with "
                                                                                   "the assistant"])
def test_roles_that_do_not_alternate_are_refused_where_the_template_says_so(tmp_path, family, bad):
    name, fam, tok = family
    path = write_jsonl(tmp_path / "d.jsonl", [wrpo_row(TURNS), wrpo_row(bad)])
    if name in ("gemma2", "mistral"):
        with pytest.raises(DataError, match=r"d\.jsonl:2: the chat template refuses this row \(Conversation roles "
                                            r"must alternate user/assistant"):
            load_preference_rows(path, tok, report=lambda *a: None)
    else:
        assert len(load_preference_rows(path, tok, report=lambda *a: None)) == 2


def test_multi_turn_sft_scores_each_reply_and_its_end_of_turn(tmp_path, family):
    name, fam, tok = family
    system = [{"role": "system", "content": "Answer briefly."}] if fam.system else []
    messages = system + TURNS + [{"role": "assistant", "content": "Five."}, {"role": "user", "content": "Thanks"},
                                 {"role": "assistant", "content": "Sure"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}, wrpo_row(TURNS[:1])])
    chat, from_wrpo = load_sft_examples(path, tok, report=lambda *a: None)
    assert chat.ids == tok(render(tok, messages), add_special_tokens=False)["input_ids"]  # the whole conversation
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [tok.decode(chat.ids[a:b]) for a, b in spans(chat.labels)] == [r + fam.end for r in replies]
    assert all(chat.labels[a:b] == chat.ids[a:b] for a, b in spans(chat.labels))
    # a WRPO row trains on prompt + its source response, scored on that reply alone
    assert [tok.decode(from_wrpo.ids[a:b]) for a, b in spans(from_wrpo.labels)] == [REPLIES[0] + fam.end]
    everything = load_sft_examples(path, tok, loss_on="all", report=lambda *a: None)[0]
    assert spans(everything.labels) == [(1, len(chat.ids))]  # the paper's setting: every token after the first


PLAIN_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
                  "{% if add_generation_prompt %}### assistant:\n{% endif %}")  # no end-of-turn token


def test_only_whitespace_after_the_templates_own_end_of_turn_token_is_left_out(tmp_path):
    tok = build_tokenizer(FAMILIES["chatml"])
    quiet = dict(report=lambda *a: None)
    replies = ["Five", "Hi", "Six, I think"]  # "Hi" is one token
    row = load_preference_rows(write_jsonl(tmp_path / "a.jsonl", [wrpo_row(TURNS[:1], replies)]), tok, **quiet)[0]
    assert [tok.decode(r) for r in row.responses] == [r + "<|im_end|>" for r in replies] and len(row.responses[1]) == 2
    tok.chat_template = PLAIN_TEMPLATE  # no special token ends a turn: the reply and the template's "\n\n"
    special = ["Five<|im_end|>", "Five<|im_end|> ", "Six"]  # a special token of the reply's own is not a turn's end
    path = write_jsonl(tmp_path / "b.jsonl", [wrpo_row(TURNS[:1]), wrpo_row(TURNS[:1], special)])
    rows = load_preference_rows(path, tok, allow_special_tokens=True, **quiet)
    assert [[tok.decode(r) for r in row.responses] for row in rows] == [
        [r + "\n\n" for r in REPLIES], [r + "\n\n" for r in special]]
    chat = {"messages": TURNS + [{"role": "assistant", "content": "Five."}]}
    seq = load_sft_examples(write_jsonl(tmp_path / "c.jsonl", [chat]), tok, **quiet)[0]
    assert [tok.decode(seq.ids[a:b]) for a, b in spans(seq.labels)] == ["Hello, how can I help\n\n", "Five.\n\n"]
    tok.chat_template = (  # Zephyr's: each turn ends with EOS and a newline
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    row = load_preference_rows(write_jsonl(tmp_path / "z.jsonl", [wrpo_row(TURNS[:1])]), tok, **quiet)[0]
    assert [tok.decode(r) for r in row.responses] == [r + tok.eos_token for r in REPLIES]


def test_a_template_that_writes_todays_date_renders_it(tmp_path):
    """Llama-3.2's template writes today's date into its system header (transformers' strftime_now)."""
    import time

    tok = build_tokenizer(FAMILIES["llama3.1"])
    tok.chat_template = tok.chat_template.replace('set date_string = "26 Jul 2024"',
                                                  'set date_string = strftime_now("%d %b %Y")')
    row = load_preference_rows(write_jsonl(tmp_path / "d.jsonl", [wrpo_row(TURNS[:1])]), tok, report=lambda *a: None)[0]
    assert f"Today Date: {time.strftime('%d %b %Y')}\n" in tok.decode(row.prompt_ids)
    assert [tok.decode(r) for r in row.responses] == [r + "<|eot_id|>" for r in REPLIES]


def test_a_pad_token_equal_to_eos_never_hides_a_scored_eos(tmp_path):
    tok = build_tokenizer(FAMILIES["chatml"])
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    row = load_preference_rows(write_jsonl(tmp_path / "d.jsonl", [wrpo_row(TURNS[:1])]), tok, report=lambda *a: None)[0]
    padded = collate_preference([row], pad_id=eos)
    for i, reply in enumerate(row.responses):
        n = len(row.prompt_ids) + len(reply)
        assert padded["labels"][i, n - 1] == eos and padded["attention_mask"][i, :n].all()  # the reply's own EOS
        assert (padded["input_ids"][i, n:] == eos).all() and (padded["labels"][i, n:] == IGNORE).all()
        assert not padded["attention_mask"][i, n:].any()
    packed = collate_preference([row], pad_id=eos, packed=True, shared_prompt=True)
    scored = packed["labels"][packed["labels"] != IGNORE]
    assert scored.tolist() == [t for reply in row.responses for t in reply]  # every reply token, EOS included


HEADER = {"llama3.1": "<|start_header_id|>assistant<|end_header_id|>\n\n", "qwen2.5": "<|im_start|>assistant\n",
          "gemma2": "<start_of_turn>model\n", "mistral": "", "chatml": "<|im_start|>assistant\n"}
AFTER_TURN = {"llama3.1": "", "qwen2.5": "\n", "gemma2": "\n", "mistral": "", "chatml": "\n"}  # after the turn's end


def test_the_authors_recipe_scores_header_reply_turn_and_an_eos(tmp_path, family):
    """--recipe=authors, SLIT-AI/WRPO's tokenize_row: the prompt is the template's text of the prompt turns; each
    response all the template adds for it (the assistant header, the reply, its end of turn and whatever follows)
    and the tokenizer's EOS appended, all scored. Their SFT (TRL's packing) tokenizes the conversation's text with
    the tokenizer's special tokens (a second BOS where the template writes one), then EOS, every token scored."""
    name, fam, tok = family
    path = write_jsonl(tmp_path / "d.jsonl", [wrpo_row(TURNS)])
    default, authors = (load_preference_rows(path, tok, recipe=r, report=lambda *a: None)[0]
                        for r in ("default", "authors"))
    assert authors.prompt_ids == tok(render(tok, TURNS), add_special_tokens=False)["input_ids"]
    header = default.prompt_ids[len(authors.prompt_ids):]
    assert default.prompt_ids[: len(authors.prompt_ids)] == authors.prompt_ids and tok.decode(header) == HEADER[name]
    eos = tok.convert_tokens_to_ids(fam.eos)
    for reply, scored, ids in zip(REPLIES, default.responses, authors.responses):
        full = tok(render(tok, TURNS + [{"role": "assistant", "content": reply}]), add_special_tokens=False)
        assert authors.prompt_ids + ids == full["input_ids"] + [eos]  # the whole conversation, then EOS
        assert ids[: len(header)] == header and ids[len(header): len(header) + len(scored)] == scored
        assert tok.decode(ids[len(header) + len(scored):]) == AFTER_TURN[name] + fam.eos
        assert tok.decode(scored) == reply + fam.end  # the default: the reply and its end of turn only
    sft = load_sft_examples(path, tok, recipe="authors", report=lambda *a: None)[0]
    text = render(tok, TURNS + [{"role": "assistant", "content": REPLIES[0]}])
    assert sft.ids == tok(text)["input_ids"] + [eos] and sft.labels == [IGNORE] + sft.ids[1:]
    if fam.bos:  # the template's BOS and the tokenizer's, as TRL's packed SFTTrainer gets them
        assert tok.decode(sft.ids[:3]).startswith(2 * fam.bos) and not tok.decode(sft.ids[:3]).startswith(3 * fam.bos)
    else:
        assert tok.bos_token is None and sft.ids[: len(authors.prompt_ids)] == authors.prompt_ids
