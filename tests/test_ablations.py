"""Beyond the paper, for ablation forks: K weighted source responses per row (FuseRL), length-normalised DPO and IPO
(FuseChat-3.0's Llama runs), and wandb tracking. K = 1 is the paper, bit for bit; the weighted source term is checked
by hand, through every layout, and in real runs on 1 and 2 ranks. (eval.build's rows: tests/test_fusion_data.py.)"""

import json
import math

import pytest
import torch

import batching
import data
import wrpo
from conftest import DEMO_MODEL, REPO, read_jsonl, torchrun


def k_source_rows(n, ks, seed=0):
    """n rows of the demo's training data with K sources each (ks cycles): the row's own source response, then the
    source responses of the rows after it; rows 1, 4, 7, ... give weights (differing per row), the others none."""
    lines = [json.loads(x) for x in (REPO / "demo/data/train.jsonl").read_text().splitlines()]
    out = []
    for i in range(n):
        row, k = dict(lines[i]), ks[i % len(ks)]
        sources = [lines[(i + j) % len(lines)]["chosen"][0] for j in range(k)]
        row["chosen"] = sources + [row["chosen"][-1]]
        if k > 1 and i % 3 == 1:
            raw = [1.0 + ((seed + i + j) % 4) for j in range(k)]
            row["source_weights"] = [x / sum(raw) for x in raw]
        out.append(row)
    return out


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_k_source_rows_load_with_their_weights_and_keep_them_through_the_cache(tmp_path, tokenizer):
    from training import load_cached

    rows = k_source_rows(6, [1, 2, 3])
    rows[5]["chosen"] = rows[5]["chosen"][-1:]  # a DPO pair among them
    rows[5].pop("source_weights", None)
    path = write_rows(tmp_path / "k.jsonl", rows)
    for attempt in ("tokenized", "cached"):
        loaded = load_cached(data.load_preference_rows, path, tokenizer, "", report=lambda m: None)
        got = [(r.n_chosen, r.source_weights) for r in loaded]
        assert got == [(2, [1.0]), (3, rows[1]["source_weights"]), (4, [1 / 3] * 3), (2, [1.0]),
                       (3, rows[4]["source_weights"]), (1, [1.0])], attempt
        assert [len(r.responses) for r in loaded] == [3, 4, 5, 3, 4, 2]
    assert list(tmp_path.glob("k.jsonl.tokens-*.safetensors"))


def test_num_sources_refuses_a_row_with_another_k(tmp_path, tokenizer):
    rows = k_source_rows(5, [2, 2, 3, 2, 2])
    rows[4]["chosen"] = rows[4]["chosen"][-1:]  # a DPO pair: no source
    rows[4].pop("source_weights")
    path = write_rows(tmp_path / "k.jsonl", rows)
    assert len(data.load_preference_rows(path, tokenizer)) == 5  # 0: any K
    assert len(data.load_preference_rows(path, tokenizer, num_sources=0)) == 5
    with pytest.raises(data.DataError, match=r"2 bad row[\s\S]*k\.jsonl:3: chosen has 3 source response\(s\) before "
                       r"the target; num_sources is 2\n  \S*k\.jsonl:5: chosen has 0 source[\s\S]*--num_sources=0"):
        data.load_preference_rows(path, tokenizer, num_sources=2)


def test_bad_source_weights_stop_the_trainer_with_exit_2_and_file_line(tmp_path):
    import subprocess
    import sys

    rows = k_source_rows(16, [2])
    rows[3]["source_weights"] = [0.7, 0.7]
    path = write_rows(tmp_path / "bad.jsonl", rows)
    proc = subprocess.run([sys.executable, "wrpo.py", "--config=demo/wrpo.json", f"--data={path}", "--eval_data=",
                           f"--out_dir={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "bad.jsonl:4: source_weights must sum to 1, they sum to 1.4" in proc.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_wandb_run_that_cannot_start_is_a_config_error(tmp_path, monkeypatch):
    import types

    import wandb

    import training

    def refuse(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    run = types.SimpleNamespace(settings={"wandb_project": "p", "wandb_run_name": "", "wandb_tags": ""},
                                out_dir=tmp_path)
    with pytest.raises(training.ConfigError, match=r"wandb: cannot start run \w+ of project p \(api_key not "
                                                   r"configured \(no-tty\)\); WANDB_MODE=offline"):
        training.wandb_run(run, resumed=False)
    assert (tmp_path / "wandb_run_id").exists()
    assert training.wandb_run(types.SimpleNamespace(settings={"wandb_project": ""}, out_dir=tmp_path), False) is None


def fake_logps(monkeypatch, tables):
    """model_sequence_logps of the fake models 'policy' and 'ref': fixed (sums, counts) per sequence."""
    monkeypatch.setattr(wrpo, "model_sequence_logps", lambda model, batch: tables[model])


def test_k3_loss_is_the_weighted_sum_of_the_sources_implicit_rewards(monkeypatch):
    """Sequences: sources y_ws_1..3, y_wt, y_l. Policy sums (-4, -6, -2, -5, -3), reference (-3, -5, -3, -4, -2): d =
    (-1, -1, 1, -1, -1). Weights (0.5, 0.3, 0.2): the source term 0.5 (-1) + 0.3 (-1) + 0.2 (1) = -0.6; alpha 0.5:
    h = 0.5 (-0.6) + 0.5 (-1) - (-1) = 0.2; beta 2: loss = log(1 + e^-0.4), reward of the sources 2 (-0.6) = -1.2."""
    counts = torch.tensor([2, 3, 1, 5, 3])
    fake_logps(monkeypatch, {"policy": (torch.tensor([-4.0, -6.0, -2.0, -5.0, -3.0]), counts),
                             "ref": (torch.tensor([-3.0, -5.0, -3.0, -4.0, -2.0]), counts)})
    batch = {"src": torch.tensor([[0, 1, 2]]), "src_w": torch.tensor([[0.5, 0.3, 0.2]]), "wt": torch.tensor([3]),
             "rej": torch.tensor([4])}
    cfg = wrpo.Config(beta=2.0)
    ref = wrpo.row_logps("ref", batch)
    torch.testing.assert_close(ref, torch.tensor([[0.5 * -3 + 0.3 * -5 + 0.2 * -3, -4.0, -2.0]]))
    for reference in ("ref", ref):  # the live reference, and its precomputed table
        losses, rewards, logps = wrpo.preference_forward("policy", batch, reference, [0], 0.5, cfg)
        torch.testing.assert_close(losses, torch.tensor([math.log(1 + math.exp(-0.4))]))
        torch.testing.assert_close(rewards["source_chosen"], torch.tensor([-1.2]))
        torch.testing.assert_close(rewards["chosen"], torch.tensor([2 * (0.5 * -0.6 + 0.5 * -1)]))
        torch.testing.assert_close(logps["source_chosen"], torch.tensor([-4.2]))  # the weighted sum of the sources'
    metrics = wrpo.row_metrics(losses, rewards, logps)
    assert metrics["rewards/source_accuracies"].item() == 1.0  # -1.2 beats the rejected's -2
    assert metrics["rewards/accuracies"].item() == 1.0  # -1.6 beats -2


@pytest.mark.parametrize("loss_type,expected", [("sigmoid", math.log(1 + math.exp(-15))), ("ipo", 1.45 ** 2)])
def test_length_normalised_dpo_and_ipo(monkeypatch, loss_type, expected):
    """A DPO pair (FuseChat-3.0's LN-DPO): chosen sums -4 over 2 tokens, rejected -3 over 1; the reference -3 and -1.
    Averaged: d(y_w) = -2 - (-1.5) = -0.5, d(y_l) = -3 - (-1) = -2, h = 1.5; beta 10: sigmoid log(1 + e^-15), ipo
    (1.5 - 1 / 20)^2 = 1.45^2. Summed instead, h = -1 + 2 = 1."""
    counts = torch.tensor([2, 1])
    fake_logps(monkeypatch, {"policy": (torch.tensor([-4.0, -3.0]), counts),
                             "ref": (torch.tensor([-3.0, -1.0]), counts)})
    batch = {"src": torch.tensor([[0]]), "src_w": torch.tensor([[1.0]]), "wt": torch.tensor([0]),
             "rej": torch.tensor([1])}
    cfg = wrpo.Config(beta=10.0, alpha=0.0, loss_type=loss_type, length_normalize=True)
    torch.testing.assert_close(wrpo.row_logps("ref", batch, average=True), torch.tensor([[-1.5, -1.5, -1.0]]))
    losses, rewards, _ = wrpo.preference_forward("policy", batch, "ref", [0], 0.0, cfg)
    torch.testing.assert_close(losses, torch.tensor([expected]))
    torch.testing.assert_close(rewards["chosen"] - rewards["rejected"], torch.tensor([15.0]))
    summed = wrpo.Config(beta=10.0, alpha=0.0, loss_type=loss_type)
    _, rewards, _ = wrpo.preference_forward("policy", batch, "ref", [0], 0.0, summed)
    torch.testing.assert_close(rewards["chosen"] - rewards["rejected"], torch.tensor([10.0]))


def test_num_sources_must_not_be_negative():
    assert any("num_sources must be >= 0" in p for p in wrpo.wrpo_problems(wrpo.Config(num_sources=-1)))


@pytest.fixture(scope="module")
def demo_policy():
    from transformers import AutoModelForCausalLM

    import attention
    from logps import attach_label_logps

    attention.register()
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32, attn_implementation="packed_sdpa")
    attach_label_logps(model)
    return model


def test_one_source_is_bit_identical_to_the_papers_source_term(tmp_path, tokenizer, demo_policy):
    """K = 1: the weighted source term is the one response's log-prob exactly, and so is its gradient."""
    rows = data.load_preference_rows(write_rows(tmp_path / "k1.jsonl", k_source_rows(6, [1])), tokenizer)
    for packed, shared in ((False, False), (True, False), (True, True)):
        batch = batching.collate_preference(list(rows), tokenizer.pad_token_id, packed, shared)
        assert batch["src"].shape == (6, 1) and (batch["src_w"] == 1).all()
        logps, _ = wrpo.model_sequence_logps(demo_policy, batch)
        old = torch.stack([logps[batch["src"][:, 0]], logps[batch["wt"]], logps[batch["rej"]]], dim=-1)
        assert torch.equal(wrpo.row_logps(demo_policy, batch), old)

        def grads(source_term):
            demo_policy.zero_grad()
            source_term().sum().backward()
            return [p.grad.clone() for p in demo_policy.parameters()]

        old = grads(lambda: wrpo.model_sequence_logps(demo_policy, batch)[0][batch["src"][:, 0]])
        new = grads(lambda: wrpo.row_logps(demo_policy, batch)[:, 0])
        assert all(torch.equal(a, b) for a, b in zip(old, new))


def test_every_layout_gives_the_same_weighted_logps_at_any_k(tmp_path, tokenizer, demo_policy):
    """Rows of K = 1, 2 and 3 and a DPO pair in one micro-batch: padded, packed and packed with shared prompts give
    each row's weighted source term within 1e-5, and it is the weighted sum of its sources' own log-probs."""
    lines = k_source_rows(7, [1, 2, 3])
    lines[6]["chosen"] = lines[6]["chosen"][-1:]
    lines[6].pop("source_weights", None)
    table = data.load_preference_rows(write_rows(tmp_path / "k.jsonl", lines), tokenizer)
    rows, out = list(table), {}
    with torch.no_grad():
        for packed, shared in ((False, False), (True, False), (True, True)):
            batch = batching.collate_preference(rows, tokenizer.pad_token_id, packed, shared)
            assert batch["src"].shape == (7, 3)
            if shared:  # each prompt once for its K + 2 responses (each later response repeats its last token)
                n = sum(len(r.prompt_ids) + sum(map(len, r.responses)) + len(r.responses) - 1 for r in rows)
                assert int((batch["segments"] >= 0).sum()) == n == sum(batching.row_lengths(table, True))
            out[packed, shared] = wrpo.row_logps(demo_policy, batch)
        for (packed, shared), got in out.items():
            torch.testing.assert_close(got, out[False, False], atol=1e-5, rtol=0)
        for i, row in enumerate(rows):  # each row alone, each of its sources alone
            one = batching.collate_preference([row], tokenizer.pad_token_id)
            logps, _ = wrpo.model_sequence_logps(demo_policy, one)
            k = len(row.source_weights)
            want = sum(w * logps[j] for j, w in zip(range(k) if row.n_chosen > 1 else [0], row.source_weights))
            torch.testing.assert_close(out[False, False][i, 0], want, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 3])
def test_k_sources_train_the_same_packed_on_two_ranks_as_padded_on_one(tmp_path, k):
    """fp32, 4 steps: the padded baseline (live reference) on 1 rank, packed with shared prompts (precomputed
    reference) on 1 and 2 ranks; losses, margins and source log-probs within 1e-5, final weights within 1e-5."""
    from safetensors.torch import load_file

    train = write_rows(tmp_path / "train.jsonl", k_source_rows(32, [k], seed=k))
    common = ["--config=demo/wrpo.json", f"--data={train}", "--eval_data=", "--max_steps=4", "--global_batch_size=8",
              "--lr=1e-3", "--beta=0.1", "--dtype=float32", "--save_dtype=float32", f"--num_sources={k}",
              f"--ref_cache_dir={tmp_path}", "--max_length=128", "--max_prompt_length=96"]
    runs = {}
    for name, world, extra in (("padded", 1, ["--packing=false", "--micro_batch_size=2", "--ref_logps=live"]),
                               ("shared1", 1, ["--max_tokens_per_micro_batch=300"]),
                               ("shared2", 2, ["--max_tokens_per_micro_batch=300"])):
        out = tmp_path / name
        stdout = torchrun(world, REPO / "wrpo.py", *common, *extra, f"--out_dir={out}")
        assert "prompts shared by their responses" in stdout or name == "padded"
        runs[name] = read_jsonl(out / "metrics.jsonl"), load_file(out / "final" / "model.safetensors")
    base, w0 = runs["padded"]
    assert base[-1]["loss"] < base[0]["loss"]  # it trained
    for name in ("shared1", "shared2"):
        rows, w = runs[name]
        for a, b in zip(base, rows):
            for key in ("loss", "rewards/margins", "logps/source_chosen", "rewards/source_chosen"):
                assert abs(a[key] - b[key]) <= 1e-5, (name, a["step"], key, a[key], b[key])
        assert max((w0[n] - w[n]).abs().max().item() for n in w0) <= 1e-5, name


@pytest.mark.slow
def test_length_normalised_reference_is_cached_under_its_own_key(tmp_path):
    """A precomputed length-normalised reference gives the live one's losses; a run without length_normalize does not
    read that cache; eval.implicit_reward --length_normalize gives the run's own held-out metrics."""
    common = ["--config=demo/wrpo.json", "--eval_data=", "--max_steps=3", "--global_batch_size=8", "--lr=1e-3",
              "--beta=10", "--dtype=float32", f"--ref_cache_dir={tmp_path}", f"--data_cache_dir={tmp_path}"]
    losses = {}
    heldout = ["--eval_data=demo/data/heldout.jsonl", "--save_dtype=float32"]
    for name, extra in (("precompute", ["--length_normalize", *heldout]),
                        ("live", ["--length_normalize", "--ref_logps=live"]), ("summed", [])):
        stdout = torchrun(1, REPO / "wrpo.py", *common, *extra, f"--out_dir={tmp_path / name}")
        if name == "summed":
            assert "(cached)" not in stdout.split("reference log-probs:")[-1].splitlines()[0]
        losses[name] = [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "lr" in r]
    assert losses["precompute"] == pytest.approx(losses["live"], abs=1e-6)
    assert losses["precompute"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses["summed"][1:] != pytest.approx(losses["precompute"][1:], abs=1e-3)  # another objective
    final = read_jsonl(tmp_path / "precompute" / "metrics.jsonl")[-1]
    torchrun(1, "-m", "eval.implicit_reward", f"--model={tmp_path / 'precompute' / 'final'}",
             f"--ref_model={DEMO_MODEL}", "--data=demo/data/heldout.jsonl", "--beta=10", "--alpha=0.1",
             "--dtype=float32", "--max_length=128", "--max_prompt_length=96", "--length_normalize",
             f"--out={tmp_path / 'ir.json'}")
    got = json.loads((tmp_path / "ir.json").read_text())
    assert got["length_normalize"] and got["rewards/accuracies"] != 0.5
    for k in ("rewards/accuracies", "rewards/source_accuracies", "rewards/margins", "loss"):
        assert got[k] == pytest.approx(final[f"eval/{k}"], abs=1e-5), k


@pytest.mark.slow
def test_wandb_offline_gets_the_rows_and_settings_on_rank_0_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    args = ["--config=demo/wrpo.json", "--eval_data=", "--max_steps=4", "--global_batch_size=8", "--save_every=2",
            "--wandb_project=wrpo-test", "--wandb_run_name=k1-run", "--wandb_tags=toy,k1", f"--out_dir={out}",
            f"--ref_cache_dir={tmp_path}", f"--data_cache_dir={tmp_path}"]

    def logged(run_id):  # the offline runs' files, oldest first: wandb's records hold each value's JSON text
        return [f.read_bytes() for f in sorted(out.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))]

    torchrun(2, REPO / "wrpo.py", *args)
    run_id = (out / "wandb_run_id").read_text()
    (first,) = logged(run_id)  # rank 0 alone
    rows = read_jsonl(out / "metrics.jsonl")
    for row in rows:
        assert json.dumps(row["loss"]).encode() in first and json.dumps(row["grad_norm"]).encode() in first
    for text in (b"wrpo-test", b"k1-run", b"toy", b"rewards/source_accuracies", b"length_normalize"):
        assert text in first, text
    shutil.rmtree(out / "final")  # as if it had been killed after step 2's checkpoint
    stdout = torchrun(1, REPO / "wrpo.py", *args, "--resume=auto")
    assert "resum" in stdout.lower() and (out / "wandb_run_id").read_text() == run_id
    first_again, second = logged(run_id)  # the same run id: wandb continues that run
    resumed = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in resumed if "lr" in r] == [1, 2, 3, 4] and first_again == first
    for row in resumed[2:]:
        assert json.dumps(row["loss"]).encode() in second


def test_wandb_is_imported_only_when_set_and_its_absence_is_a_settings_problem(monkeypatch):
    import importlib.util
    import subprocess
    import sys

    code = ("import sys, sft, wrpo, training; wrpo.wrpo_problems(wrpo.Config()); "
            "training.config_problems(wrpo.Config(), 1); assert 'wandb' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    import training

    assert not any("wandb" in p for p in training.config_problems(wrpo.Config(wandb_project="p"), 1))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "wandb_project needs wandb, which is not installed (pip install wandb)" in training.config_problems(
        wrpo.Config(wandb_project="p"), 1)
