"""Fidelity you can see: step 1 of a run whose policy is its reference is exact (every d(y) = 0: loss ln 2, each
accuracy 1/2, each margin 0) in every layout, and `--recipe=authors` is SLIT-AI/WRPO's trainers: their scored
tokens (tests/test_chat_families.py has every family), their alpha, their SFT packing and loss."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import DEMO_MODEL, REPO, read_jsonl, torchrun

LN2 = float(np.float32(math.log(2)))  # -logsigmoid(0) in float32: what each row's loss is when d(y) = 0
EXACT = "step 1: policy == reference, max |d| = 0"


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """The demo tokenizer on a wider random Llama (hidden 256): CPU kernels round its sums differently for batches of
    other shapes (the demo model's are too small to), so a reference computed in other micro-batches shows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("wide")
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    config.update(hidden_size=256, intermediate_size=704, head_dim=64)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(DEMO_MODEL / f, path / f)
    return path


@pytest.fixture(scope="module")
def few_rows(tmp_path_factory):
    """100 training rows (6 steps of the demo config's 16, and 4 rows the first epoch leaves out: the reference pass
    computes those as the held-out rows are) and 40 held-out rows of the demo's."""
    folder = tmp_path_factory.mktemp("rows")
    for name, n in (("train", 100), ("heldout", 40)):
        lines = (REPO / f"demo/data/{name}.jsonl").read_text().splitlines()[:n]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return [f"--data={folder / 'train.jsonl'}", f"--eval_data={folder / 'heldout.jsonl'}"]


def exact_at_step_one(rows):
    """The step-1 row and the held-out row after it: lr is 0 at step 1, so the policy is still its reference, and that
    evaluation is the one before training, exactly (which the runs print to 3 decimals)."""
    step, held_out = rows[0], rows[-1]
    assert step["loss"] == LN2 and held_out["eval/loss"] == LN2
    for prefix, row in (("", step), ("eval/", held_out)):
        for k in ("accuracies", "source_accuracies", "target_accuracies"):
            assert row[f"{prefix}rewards/{k}"] == 0.5, (prefix, k, row[f"{prefix}rewards/{k}"])
        for k in ("margins", "chosen", "source_chosen", "target_chosen", "rejected"):
            assert row[f"{prefix}rewards/{k}"] == 0.0, (prefix, k, row[f"{prefix}rewards/{k}"])


@pytest.mark.slow
@pytest.mark.parametrize("world, dtype, packing, ref_logps", [
    (1, "float32", True, "precompute"), (1, "bfloat16", False, "precompute"), (1, "bfloat16", True, "live"),
    (2, "bfloat16", True, "precompute"), (2, "float32", False, "precompute"), (2, "bfloat16", False, "live"),
    (2, "bfloat16", "unshared", "precompute")])
def test_step_one_is_exact_when_the_policy_is_its_reference(tmp_path, wide_model, few_rows, world, dtype, packing,
                                                           ref_logps):
    """The reference's log-probs come from the micro-batches the step runs (precomputed: the first epoch's layout;
    live: the same batch), so they are the policy's own to the bit; before, the reference pass packed other
    micro-batches, and bf16 padded runs logged accuracy 0.469, margin -4.8e-08."""
    out = tmp_path / "out"
    stdout = torchrun(world, REPO / "wrpo.py", "--config=demo/wrpo.json", f"--model={wide_model}", "--max_steps=1",
                      f"--dtype={dtype}", f"--packing={bool(packing)}", f"--shared_prompt={packing != 'unshared'}",
                      f"--ref_logps={ref_logps}", f"--out_dir={out}",
                      f"--ref_cache_dir={tmp_path / 'cache'}", "--max_tokens_per_micro_batch=600", *few_rows)
    assert EXACT in stdout and "step 0: held-out reward accuracy 0.500 (source 0.500, target 0.500)" in stdout
    exact_at_step_one(read_jsonl(out / "metrics.jsonl"))


def train(tmp_path, rows, name, *extra, model=DEMO_MODEL, steps=1):
    import wrpo

    wrpo.main(["--config=demo/wrpo.json", *rows, f"--model={model}", f"--max_steps={steps}", "--dtype=float32",
               f"--out_dir={tmp_path / name}", f"--ref_cache_dir={tmp_path / 'cache'}", *extra])
    return read_jsonl(tmp_path / name / "metrics.jsonl")


@pytest.mark.slow
def test_a_reference_cache_of_another_layout_is_not_read(tmp_path, few_rows, monkeypatch, capsys):
    """The reference cache's key holds the micro-batch layout: a padded run computes its own instead of reading the
    packed run's (which gave held-out accuracy 0.492 at step 0 in fp32, on the demo model)."""
    monkeypatch.chdir(REPO)
    train(tmp_path, few_rows, "packed")
    assert "(cached)" not in capsys.readouterr().out
    exact_at_step_one(train(tmp_path, few_rows, "padded", "--packing=false"))
    assert "(cached)" not in capsys.readouterr().out
    train(tmp_path, few_rows, "again", "--packing=false")
    assert capsys.readouterr().out.count("(cached)") == 2  # the same layout: both caches read


@pytest.mark.slow
def test_step_one_says_when_the_reference_is_not_the_policy(tmp_path, few_rows, monkeypatch, capsys, wide_model):
    """A reference that should be the policy but scores otherwise (here: its table shifted by 1e-3) is named with the
    largest |d|; a reference that is another model gets no line."""
    import wrpo

    monkeypatch.chdir(REPO)
    compute = wrpo.compute_reference
    monkeypatch.setattr(wrpo, "compute_reference", lambda *a: compute(*a) + 1e-3)
    train(tmp_path, few_rows, "off")
    printed = capsys.readouterr().out
    assert "warning: step 1: policy == reference, yet max |d| = 0.001, not 0" in printed and EXACT not in printed
    monkeypatch.setattr(wrpo, "compute_reference", compute)
    train(tmp_path, few_rows, "other", f"--ref_model={wide_model}")
    train(tmp_path, few_rows, "simpo", "--loss_type=simpo", "--beta=2.0")  # no reference at all
    assert "policy == reference" not in capsys.readouterr().out


@pytest.mark.slow
def test_each_recipe_logs_its_alpha(tmp_path, few_rows, monkeypatch):
    monkeypatch.chdir(REPO)
    for recipe, last in (("default", 2), ("authors", 3)):  # alpha_max * k / (T - 1), theirs alpha_max * k / T
        rows = train(tmp_path, few_rows, recipe, f"--recipe={recipe}", steps=3)
        assert [r["alpha"] for r in rows if "alpha" in r] == [0.1 * min(1.0, k / last) for k in range(3)]


def test_the_authors_alpha_is_alpha_max_times_k_over_t():
    from wrpo import get_alpha

    T = 12  # their LinearDecayScheduler(0, alpha, 0, T).get_value(global_step), to the bit
    assert [get_alpha(k, T, 0.1, "linear", "authors") for k in range(T)] == [0 + (0.1 - 0) * (k / T) for k in range(T)]
    assert get_alpha(T - 1, T, 0.1, "linear", "authors") < 0.1 == get_alpha(T - 1, T, 0.1, "linear")
    assert get_alpha(5, T, 0.1, "constant", "authors") == 0.1


def test_the_authors_recipe_on_the_demo_template(tmp_path, tokenizer):
    """Llama-3's template: the default scores each reply and its <|eot_id|>; the authors' recipe also the assistant
    header before it (their prompt ends at the user's <|eot_id|>) and a second <|eot_id|> (the tokenizer's EOS)."""
    import data

    row = {"prompt": "Hi there", "chosen": ["Five.", "Six"], "rejected": ["No"]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    scored = {}
    for recipe in ("default", "authors"):
        r = data.load_preference_rows(path, tokenizer, recipe=recipe, report=lambda *a: None)[0]
        scored[recipe] = [[tokenizer.decode([t]) for t in resp] for resp in r.responses]
        assert tokenizer.decode(r.prompt_ids[-1:]) == ("\n" if recipe == "default" else "<|eot_id|>")
    assert "".join(scored["default"][0]) == "Five.<|eot_id|>"
    assert "".join(scored["authors"][0]) == "<|start_header_id|>assistant<|end_header_id|>\n\nFive.<|eot_id|><|eot_id|>"
    header = [tokenizer.decode([t]) for t in tokenizer("<|start_header_id|>assistant<|end_header_id|>\n\n",
                                                       add_special_tokens=False)["input_ids"]]
    assert scored["authors"] == [header + d + ["<|eot_id|>"] for d in scored["default"]]
    sft = data.load_sft_examples(path, tokenizer, recipe="authors", report=lambda *a: None)[0]
    assert tokenizer.decode(sft.ids) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there"
                                         "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nFive.<|eot_id|>"
                                         "<|eot_id|>")
    assert sft.labels == [data.IGNORE] + sft.ids[1:]  # every token scored


def test_the_authors_sft_packing_is_one_stream_cut_into_sequences(tmp_path):
    import tokens
    from sft import concatenated

    examples = tokens.build_rows("sft", [tokens.Sequence(list(range(10 * i, 10 * i + n)), [0] * n, f"f:{i + 1}")
                                         for i, n in enumerate([3, 5, 4, 2])])  # 14 tokens
    seqs = concatenated(examples, 4, "f")
    assert [s.ids for s in seqs] == [[0, 1, 2, 10], [11, 12, 13, 14], [20, 21, 22, 23]]  # the last 2 dropped
    assert all(s.labels == [-100] + s.ids[1:] for s in seqs)
    assert [s.where for s in seqs] == ["f:1 .. f:2", "f:2", "f:3"]  # the rows each one spans
    import data

    with pytest.raises(data.DataError, match="f: 14 tokens, short of one whole sequence of 16"):
        concatenated(examples, 16, "f")


@pytest.mark.slow
def test_the_authors_sft_step_is_the_plain_causal_loss_of_its_sequences(tmp_path, monkeypatch, tokenizer):
    """Step 1 of sft.py --recipe=authors is Hugging Face's own loss of the step's sequences: the mean over every token
    but the first of a plain causal forward, attending across the examples in a sequence."""
    import batching
    import data
    import sft
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(REPO)
    rows = "demo/data/heldout.jsonl"
    sft.main(["--recipe=authors", f"--data={rows}", "--max_steps=1", "--dtype=float32", "--global_batch_size=8",
              "--micro_batch_size=4", "--max_length=128", f"--out_dir={tmp_path / 'out'}"])
    logged = read_jsonl(tmp_path / "out" / "metrics.jsonl")[0]["loss"]
    seqs = sft.concatenated(data.load_sft_examples(rows, tokenizer, recipe="authors", report=print), 128, rows)
    _, _, idx = next(batching.train_steps(len(seqs), 1, 42, 8, 0, 1, 1))
    ids = torch.tensor([seqs[i].ids for i in idx])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)(input_ids=ids, labels=ids).loss
    assert math.isclose(logged, expected.item(), rel_tol=1e-5), (logged, expected.item())


def test_the_authors_recipe_needs_an_eos_token(tmp_path, tokenizer):
    import copy

    import data

    tok = copy.deepcopy(tokenizer)
    tok.eos_token = None
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "chosen": ["a"], "rejected": ["b"]}) + "\n")
    for load in (data.load_preference_rows, data.load_sft_examples):
        with pytest.raises(data.DataError, match="recipe authors appends EOS to each text, and tokenizer .* has none"):
            load(path, tok, recipe="authors", report=lambda *a: None)
    assert len(data.load_preference_rows(path, tok, report=lambda *a: None)) == 1  # the default needs none


def test_the_authors_recipe_truncates_with_the_header_and_eos_counted(tmp_path, tokenizer):
    """Their tokenize_row appends the EOS before it truncates, and its responses start with the header: when prompt +
    the longest response is over max_length, the prompt keeps its last max_prompt_length tokens, then each response
    its first max_length - max_prompt_length, so a long reply loses its EOS first."""
    import data

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "Hi there " * 12, "chosen": ["Five " * 30, "Six"], "rejected": ["No"]}))
    load = lambda n, p: data.load_preference_rows(path, tokenizer, recipe="authors", max_length=n,  # noqa: E731
                                                  max_prompt_length=p, report=lambda *a: None)[0]
    whole, cut = load(4096, 4000), load(40, 24)
    assert len(whole.prompt_ids) > 24 and len(whole.responses[0]) > 16
    assert cut.prompt_ids == whole.prompt_ids[-24:] and cut.responses == [r[:16] for r in whole.responses]
    assert whole.responses[0][-1] == tokenizer.eos_token_id and cut.responses[0][-1] != tokenizer.eos_token_id
