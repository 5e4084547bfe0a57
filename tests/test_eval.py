"""Evaluation: benchmark answer files field by field, the judge client against a real local HTTP
server, the win-rate statistics on judgments whose answer is known, judge-free checks, plots."""

import json
import random
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import DEMO_MODEL, REPO, QuietServer, prefer_the_longer, read_jsonl, torchrun

from eval import answers, judge

MODEL = ["--max_new_tokens=16", "--dtype=float32", "--batch_size=2", f"--model={DEMO_MODEL}"]


def write_questions(tmp_path):
    alpaca = tmp_path / "alpaca_eval.json"
    alpaca.write_text(json.dumps([{"instruction": f"What is {a} + {b}?", "dataset": "helpful_base", "output": "ref",
                                   "generator": "gpt4_turbo"} for a, b in [(2, 3), (10, 7), (4, 4), (6, 1), (9, 9)]]))
    mt = tmp_path / "mt_bench.jsonl"
    mt.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question_id": 81, "category": "writing", "turns": ["Reverse the word 'apple'.", "Now in capitals."]},
        {"question_id": 82, "category": "math", "turns": ["What is 2 + 3?", "And 5 + 6?"]},
        {"question_id": 83, "category": "reasoning", "turns": ["Sort these numbers: 3 1 2.", "Sort 9 8 7."]}]))
    ah = tmp_path / "arena_hard.jsonl"
    ah.write_text("".join(json.dumps({"question_id": f"q{i}", "category": "arena-hard-v0.1", "cluster": "c",
                                      "turns": [{"content": t}]}) + "\n"
                          for i, t in enumerate(["How many letters are in 'tiger'?", "Write 'zebra' in capitals."])))
    return alpaca, mt, ah


# -----------------------------------------------------------------------------
# answer files


def test_answer_files_have_each_benchmarks_format_and_resume(tmp_path, capsys):
    alpaca, mt, ah = write_questions(tmp_path)
    out = tmp_path / "model_outputs.json"
    answers.main(["alpaca", *MODEL, f"--questions={alpaca}", f"--out={out}"])
    rows = json.loads(out.read_text())
    assert [r["instruction"] for r in rows] == [q["instruction"] for q in json.loads(alpaca.read_text())]
    for r in rows:
        assert set(r) == {"instruction", "output", "generator", "dataset", "generation"}
        assert isinstance(r["output"], str) and r["generator"] == "model" and r["dataset"] == "helpful_base"
        assert r["generation"] == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 16, "seed": 42,
                                   "dtype": "float32", "weights": rows[0]["generation"]["weights"]}
        assert len(r["generation"]["weights"]) == 16  # eval.common.weights_id of the model's weight files
    answers.main(["alpaca", *MODEL, f"--questions={alpaca}", f"--out={out}"])  # all done: nothing regenerated
    assert "5 questions, 5 already answered" in capsys.readouterr().out and json.loads(out.read_text()) == rows

    out = tmp_path / "mt_answers.jsonl"
    answers.main(["mtbench", *MODEL, f"--questions={mt}", f"--out={out}", "--model_id=wrpo-demo"])
    rows = read_jsonl(out)
    assert [r["question_id"] for r in rows] == [81, 82, 83]
    for r in rows:
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp", "generation"}
        assert r["model_id"] == "wrpo-demo" and isinstance(r["answer_id"], str) and isinstance(r["tstamp"], float)
        assert len(r["choices"]) == 1 and r["choices"][0]["index"] == 0
        assert len(r["choices"][0]["turns"]) == 2 and all(isinstance(t, str) for t in r["choices"][0]["turns"])
    assert [r["generation"]["temperature"] for r in rows] == [0.7, 0.0, 0.0]  # FastChat's per-category values
    # the second turn answers the conversation with the model's own first answer in it (greedy: reproducible)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.common import generate

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL).eval()
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL, padding_side="left")
    first, second = rows[1]["choices"][0]["turns"]
    conv = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": first},
            {"role": "user", "content": "And 5 + 6?"}]
    assert generate(model, tok, [conv], 1, 0.0, 1.0, 16, "x")[0][0] == second

    out = tmp_path / "ah_answers.jsonl"
    answers.main(["arenahard", *MODEL, f"--questions={ah}", f"--out={out}"])
    for r in read_jsonl(out):
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp", "conv_metadata", "generation"}
        turn = r["choices"][0]["turns"][0]
        assert set(turn) == {"content", "token_len"} and turn["token_len"] == r["conv_metadata"]["token_len"]
        assert set(r["conv_metadata"]) == {"token_len", "header_count", "list_count", "bold_count"}
        assert set(r["conv_metadata"]["header_count"]) == {f"h{n}" for n in range(1, 7)}


@pytest.mark.slow
def test_answers_on_two_ranks_and_bad_questions(tmp_path):
    alpaca, mt, _ = write_questions(tmp_path)
    out = tmp_path / "two.jsonl"
    torchrun(2, "-m", "eval.answers", "mtbench", *MODEL, f"--questions={mt}", f"--out={out}")
    assert [r["question_id"] for r in read_jsonl(out)] == [81, 82, 83] and not list(tmp_path.glob("*.part-*"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["hi"]}\n{"turns": []}\n')
    with pytest.raises(SystemExit):
        answers.main(["mtbench", *MODEL, f"--questions={bad}", f"--out={tmp_path / 'x.jsonl'}"])
    with pytest.raises(SystemExit):  # AlpacaEval reads a JSON list
        answers.main(["alpaca", *MODEL, f"--questions={alpaca}", f"--out={tmp_path / 'x.jsonl'}"])


def test_markdown_counts():
    text = "# Title\n## Sub\n- a\n* b\n1. one\n**bold** and __also__\n```\n# not a header\n```"
    c = answers.markdown_counts(text)
    assert c["header_count"]["h1"] == 1 and c["header_count"]["h2"] == 1
    assert c["list_count"] == {"ordered": 1, "unordered": 2} and c["bold_count"] == {"**": 1, "__": 1}


# -----------------------------------------------------------------------------
# the judge client against a local OpenAI-compatible server


class FakeJudge(QuietServer, BaseHTTPRequestHandler):
    """Prefers the longer answer; rates an answer by its length; scripted failures and auth."""

    def do_POST(self):
        s, body = self.state, self.posted()
        with s["lock"]:
            s["requests"] += 1
            failure = s["fail"].pop(0) if s["fail"] else None
        if self.headers.get("Authorization") != "Bearer good-key":
            return self.reply(401, {"error": {"message": "invalid api key"}})
        if failure == "garbage":
            return self.reply(200, "not json", raw=True)
        if failure:
            return self.reply(failure, {"error": {"message": "busy"}}, {"Retry-After": "0"})
        text = body["messages"][-1]["content"]
        if "MALFORMED" in text:
            content = "Both are fine, I cannot decide."
        elif "<conversation with assistant A>" in text:
            content = prefer_the_longer(text)
        else:
            answer = text.rsplit("[Assistant ]\n", 1)[1]
            content = f"Fine. Rating: [[{min(10, 1 + len(answer) // 10)}]]"
        self.reply(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

    def reply(self, code, payload, headers=None, raw=False):
        data = (payload if raw else json.dumps(payload)).encode()
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    FakeJudge.state = {"requests": 0, "fail": [], "lock": threading.Lock()}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", FakeJudge.state
    httpd.shutdown()


def alpaca_answers(tmp_path, name, texts):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps([{"instruction": f"question {i}", "output": t, "generator": name}
                                for i, t in enumerate(texts)]))
    return path


def judge_with(monkeypatch, *args, key="good-key"):
    monkeypatch.setenv("JUDGE_KEY", key)
    judge.main([*args, "--api_key_env=JUDGE_KEY", "--retry_delay=0.01", "--workers=4", "--bootstrap=200"])


def test_pairwise_judging_retries_caches_and_counts(tmp_path, server, monkeypatch):
    url, state = server
    rng = random.Random(0)
    ours = ["x" * rng.randint(20, 100) for _ in range(30)]  # usually the longer answer
    base = ["y" * rng.randint(5, 60) for _ in range(30)]
    ours[3] = "MALFORMED " + ours[3]  # the judge gives no verdict for this question (both orderings)
    a, b, out = alpaca_answers(tmp_path, "ours", ours), alpaca_answers(tmp_path, "base", base), tmp_path / "pw.json"
    state["fail"] = [429, 500, 503, "garbage"]  # four transient failures before the first success
    judge_with(monkeypatch, "pairwise", f"--answers={a}", f"--baseline={b}", f"--out={out}", f"--base_url={url}")
    result = json.loads(out.read_text())
    assert state["requests"] == 60 + 4 and result["judge"] == {"model": "gpt-4o", "base_url": url, "calls": 60,
                                                                "cached": 0}
    assert result["malformed_replies"] == 2 and result["questions"] == 29
    longer = [1.0 if len(x) > len(y) else 0.5 if len(x) == len(y) else 0.0 for x, y in zip(ours, base)]
    del longer[3]
    assert result["win_rate"] == pytest.approx(100 * sum(longer) / 29)
    lo, hi = result["win_rate_ci95"]
    assert result["win_rate"] > 70 and lo < result["win_rate"] < hi and hi - lo < 50
    assert 0 <= result["lc_win_rate"] <= 100  # too few questions to pin it down: see test_length_controlled_win_rate

    judge_with(monkeypatch, "pairwise", f"--answers={a}", f"--baseline={b}", f"--out={out}", f"--base_url={url}")
    assert state["requests"] == 64 and json.loads(out.read_text())["judge"]["cached"] == 60  # never pays twice


def test_judge_auth_and_exhausted_retries_fail_clearly(tmp_path, server, monkeypatch, capsys):
    url, state = server
    a, b = alpaca_answers(tmp_path, "ours", ["a", "bb"]), alpaca_answers(tmp_path, "base", ["cc", "d"])
    args = ["pairwise", f"--answers={a}", f"--baseline={b}", f"--out={tmp_path / 'o.json'}", f"--base_url={url}"]
    with pytest.raises(SystemExit) as e:
        judge_with(monkeypatch, *args, key="wrong-key")
    assert e.value.code == 2 and "rejected the API key (HTTP 401)" in capsys.readouterr().err
    assert state["requests"] <= 4  # no retries on a bad key (at most the calls already in flight)
    state["fail"] = [503] * 100
    with pytest.raises(SystemExit):
        judge_with(monkeypatch, *args, "--retries=2")
    assert "failed 3 times; last: HTTP 503" in capsys.readouterr().err
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SystemExit):
        judge.main(args)
    assert "set the judge's API key in $OPENAI_API_KEY" in capsys.readouterr().err


def test_single_grading_mt_bench(tmp_path, server, monkeypatch):
    url, _ = server
    _, mt, _ = write_questions(tmp_path)
    ans = tmp_path / "mt_answers.jsonl"
    turns = {81: ["a" * 25, "b" * 55], 82: ["c" * 5, "MALFORMED no rating"], 83: ["d" * 95, "e" * 200]}
    ans.write_text("".join(json.dumps({"question_id": q, "answer_id": "x", "model_id": "m",
                                       "choices": [{"index": 0, "turns": t}], "tstamp": 0.0}) + "\n"
                           for q, t in turns.items()))
    out = tmp_path / "single.json"
    judge_with(monkeypatch, "single", f"--answers={ans}", f"--questions={mt}", f"--out={out}", f"--base_url={url}")
    r = json.loads(out.read_text())
    # the fake judge rates 1 + len // 10, capped at 10: 3, 6 | 1, - | 10, 10
    assert r["ratings"] == 5 and r["malformed_replies"] == 1
    assert r["per_turn"] == {"1": pytest.approx(14 / 3), "2": pytest.approx(8.0)}
    assert r["score"] == pytest.approx(30 / 5) and r["per_category"]["reasoning"] == 10.0


# -----------------------------------------------------------------------------
# statistics on judgments whose answer is known


def test_length_controlled_win_rate():
    rng = random.Random(1)
    diffs = [rng.gauss(300, 400) for _ in range(800)]  # the model is usually longer
    longer_wins = [1.0 if d > 0 else 0.0 for d in diffs]
    r = judge.win_rates(longer_wins, diffs, bootstrap=100)
    assert r["win_rate"] > 70 and 45 < r["lc_win_rate"] < 57  # all the preference is length
    better = [1.0 if rng.random() < 0.8 else 0.0 for _ in diffs]  # preferred 80% of the time, whatever the length
    r = judge.win_rates(better, diffs, bootstrap=100)
    assert abs(r["lc_win_rate"] - r["win_rate"]) < 5 and 75 < r["win_rate"] < 85
    lo, hi = r["win_rate_ci95"]
    assert lo < r["win_rate"] < hi and 3 < hi - lo < 10
    assert judge.win_rates([1.0] * 20, [5.0] * 20, bootstrap=10)["lc_win_rate"] > 95  # unanimous, equal lengths


# -----------------------------------------------------------------------------
# judge-free checks


@pytest.mark.slow
def test_implicit_reward_accuracy_matches_training_eval(tmp_path):
    """The trained model's held-out accuracy from eval/implicit_reward.py equals wrpo.py's own final
    evaluation; a model scored against itself ties everywhere (0.5)."""
    out = tmp_path / "run"
    torchrun(1, REPO / "wrpo.py", "--max_steps=4", "--global_batch_size=8", "--micro_batch_size=4", "--lr=1e-3",
             "--beta=0.1", "--alpha=0.3", "--dtype=float32", "--save_dtype=float32", "--max_length=128",
             "--max_prompt_length=96", "--eval_data=demo/data/heldout.jsonl", f"--out_dir={out}",
             f"--ref_cache_dir={tmp_path}")
    final = read_jsonl(out / "metrics.jsonl")[-1]
    common = ["--data=demo/data/heldout.jsonl", "--beta=0.1", "--alpha=0.3", "--dtype=float32",
              "--max_length=128", "--max_prompt_length=96"]
    torchrun(2, "-m", "eval.implicit_reward", f"--model={out / 'final'}", f"--ref_model={DEMO_MODEL}",
             *common, f"--out={tmp_path / 'ir.json'}")
    got = json.loads((tmp_path / "ir.json").read_text())
    assert got["rows"] == 120 and got["rewards/accuracies"] != 0.5
    for k in ("rewards/accuracies", "rewards/source_accuracies", "rewards/target_accuracies", "rewards/margins"):
        assert got[k] == pytest.approx(final[f"eval/{k}"], abs=1e-5), k
    torchrun(1, "-m", "eval.implicit_reward", f"--model={DEMO_MODEL}", f"--ref_model={DEMO_MODEL}",
             *common, f"--out={tmp_path / 'self.json'}")
    same = json.loads((tmp_path / "self.json").read_text())
    assert same["rewards/accuracies"] == 0.5 and same["rewards/margins"] == 0.0


@pytest.mark.slow
def test_reward_model_win_rate(tmp_path):
    """rm mode: both answer sets scored by a (tiny, local) reward model through eval/score.py."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=2,
                                                    num_key_value_heads=1, num_labels=1,
                                                    pad_token_id=tok.pad_token_id))
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    a = alpaca_answers(tmp_path, "ours", [f"answer {i} " * (i % 3 + 1) for i in range(12)])
    b = alpaca_answers(tmp_path, "base", [f"other {i}" for i in range(12)])
    out = tmp_path / "rm.json"
    judge.main(["rm", f"--answers={a}", f"--baseline={b}", f"--reward_model={tmp_path / 'rm'}", f"--out={out}",
                "--dtype=float32", "--bootstrap=50"])
    r = json.loads(out.read_text())
    scored = read_jsonl(tmp_path / "rm.json.scored.jsonl")
    wins = [1.0 if s[0] > s[1] else 0.5 if s[0] == s[1] else 0.0 for s in (row["scores"] for row in scored)]
    assert r["questions"] == 12 and r["win_rate"] == pytest.approx(100 * sum(wins) / 12)
    assert r["mean_reward_margin"] == pytest.approx(sum(s[0] - s[1] for s in (x["scores"] for x in scored)) / 12)


# -----------------------------------------------------------------------------
# plots


def test_plot_writes_pngs(tmp_path, monkeypatch, capsys):
    from eval import plot

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1 / s, "lr": 1e-3, "alpha": s / 10, "grad_norm": 1.0,
                                           "rewards/margins": s / 5, "rewards/accuracies": 0.5 + s / 40}) + "\n"
                               for s in range(1, 11)) + json.dumps({"step": 10, "eval/loss": 0.2}) + "\n")
    plot.main([str(metrics), f"--out_dir={tmp_path / 'plots'}"])
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["accuracies.png", "alpha.png", "grad_norm.png", "loss.png", "lr.png", "rewards.png"]
    assert all((tmp_path / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit) as e:
        plot.main([str(metrics), f"--out_dir={tmp_path / 'none'}"])
    assert e.value.code == 2 and "plotting needs matplotlib: pip install matplotlib" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# the package: one way to open inputs and outputs, python -m eval.NAME, and no torch where no model is needed


def test_eval_scripts_open_files_through_one_helper(tmp_path, capsys):
    """An input that is no regular file (a FIFO would block forever) or not UTF-8 is one line and exit 2; an output
    with a folder in its place is refused before any work, and the folder stays; a write is whole or not at all."""
    import os

    from eval import output_problem, plot, questions, read_input, write_output

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"step": 1, "loss": "\xe9"}\n')
    for call, said in [(lambda: read_input(tmp_path / "fifo"), "not a regular file"),
                       (lambda: read_input(tmp_path / "none"), "No such file"),
                       (lambda: plot.main([str(tmp_path / "latin1.jsonl")]), "not UTF-8 text (byte 22)"),
                       (lambda: questions.read_questions("mtbench", tmp_path), "not a regular file")]:
        with pytest.raises(SystemExit) as e:
            call()
        assert e.value.code == 2 and said in capsys.readouterr().err
    (tmp_path / "out" / "keep").mkdir(parents=True)
    assert output_problem(tmp_path / "out") == f"{tmp_path / 'out'} is a folder; give the file to write"
    assert output_problem(tmp_path / "latin1.jsonl", overwrite=False).endswith("exists; pass --overwrite to replace it")
    assert output_problem(tmp_path / "new.json") is None and output_problem(tmp_path / "latin1.jsonl") is None
    with pytest.raises(SystemExit) as e:  # judge: refused before it asks for an API key or reads the answers
        judge.main(["pairwise", "--answers=none.json", "--baseline=none.json", f"--out={tmp_path / 'out'}"])
    assert e.value.code == 2 and "is a folder" in capsys.readouterr().err and (tmp_path / "out" / "keep").exists()
    write_output(tmp_path / "w" / "a.txt", "first\n")

    def broken(f):
        f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_output(tmp_path / "w" / "a.txt", broken)
    assert (tmp_path / "w" / "a.txt").read_text() == "first\n" and os.listdir(tmp_path / "w") == ["a.txt"]


def test_judge_and_plot_never_import_torch(tmp_path):
    """They run where only the standard library and numpy are installed (a judging box, a laptop)."""
    import subprocess

    code = ("import sys\nfrom eval import judge, plot\n"
            "for m in (judge, plot):\n    try:\n        m.main(['--help'])\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage: python -m eval.judge" in run.stdout and "usage: python -m eval.plot" in run.stdout


@pytest.mark.slow
def test_every_eval_command_runs_as_a_module():
    import subprocess

    names = sorted(p.stem for p in (REPO / "eval").glob("*.py") if p.stem not in ("__init__", "common", "questions"))
    assert names == ["answers", "build", "generate", "implicit_reward", "judge", "plot", "score", "split"]
    for name in names:
        run = subprocess.run([sys.executable, "-m", f"eval.{name}", "--help"], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0 and f"usage: python -m eval.{name}" in run.stdout, (name, run.stderr[-2000:])
    assert not [p for p in (REPO / "eval").glob("*.py") if "sys.path" in p.read_text()]  # no path edits
