"""The eval/ scripts as careful as the trainers (issue 22): an output never is, holds or lies inside an input; a
resume never mixes two models' or settings' rows; a prompt_id names one prompt; no input blocks (a FIFO) or loads
a pickle or a truncated file; outputs are checked before any work; a torn last metrics line and a UTF-8 BOM are
read. Each failure is one line, exit 2, no traceback. In-process (main([...])) where the exit code says it all."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import DEMO_MODEL, REPO, read_jsonl
from eval import answers, build, generate, implicit_reward, judge, plot, read_input, score, split

GEN = ["--num_samples=2", "--max_new_tokens=4", "--batch_size=4", "--dtype=float32"]


def refused(capsys, call, *needles):
    """call() ends in one `error:` line naming every needle, exit 2, no traceback; returns that line."""
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in errors[0], (needle, errors[0])
    return errors[0]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompts(path, n=3):
    rows = [json.loads(x) for x in (DEMO_MODEL.parent / "data" / "heldout.jsonl").read_text().splitlines()[:n]]
    return write_jsonl(path, [{"prompt_id": r["prompt_id"], "prompt": r["prompt"]} for r in rows])


def model_copy(folder, nudge=0.0):
    """demo/model copied to `folder`; nudge != 0: one weight changed, the same shapes (another model)."""
    shutil.copytree(DEMO_MODEL, folder)
    if nudge:
        from safetensors.torch import load_file, save_file

        weights = load_file(folder / "model.safetensors")
        name = sorted(weights)[0]
        weights[name] = weights[name] + nudge
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture
def no_hang():
    """A call that blocks (opening a FIFO waits for a writer) fails the test after 60 s instead of hanging it."""
    def hung(*_):
        raise TimeoutError("blocked: an input that is no regular file was opened")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# -----------------------------------------------------------------------------
# section 1: an output that is an input, holds one or lies inside an input folder is refused before any work


def test_an_output_equal_to_an_input_is_refused_and_the_input_kept(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "key")
    a = tmp_path / "A.json"
    a.write_text(json.dumps([{"instruction": "q", "output": "x"}]))
    p = prompts(tmp_path / "P.jsonl")
    d = tmp_path / "d.jsonl"
    shutil.copy(DEMO_MODEL.parent / "data" / "heldout.jsonl", d)
    s = write_jsonl(tmp_path / "S.jsonl", [{"prompt_id": "p", "prompt": "q", "responses": ["x"], "scores": [1.0]}])
    before = {f: f.read_bytes() for f in (a, p, d, s)}
    unreachable = "--base_url=http://127.0.0.1:9/v1"
    cases = [
        (lambda: judge.main(["pairwise", f"--answers={a}", f"--baseline={a}", f"--out={a}", unreachable]), a),
        (lambda: judge.main(["pairwise", f"--answers={a}", f"--baseline={a}", f"--out={tmp_path / 'j.json'}",
                             f"--cache={a}", unreachable]), a),  # the judgment cache is appended to: an output
        (lambda: implicit_reward.main([f"--model={DEMO_MODEL}", f"--ref_model={DEMO_MODEL}", f"--data={d}",
                                       f"--out={d}"]), d),
        (lambda: generate.main([f"--model={DEMO_MODEL}", f"--prompts={p}", f"--out={p}", *GEN]), p),
        (lambda: score.main([f"--reward_model={DEMO_MODEL}", f"--data={s}", f"--out={s}"]), s),
        (lambda: answers.main(["alpaca", f"--model={DEMO_MODEL}", f"--questions={a}", f"--out={a}"]), a),
        (lambda: build.main(["--sources", str(s), f"--out={s}", "--overwrite"]), s),
    ]
    for call, path in cases:
        refused(capsys, call, f"{path} is also an input ({path})")
    assert {f: f.read_bytes() for f in before} == before
    cache = tmp_path / "c.jsonl"  # the result over the cache
    refused(capsys, lambda: judge.main(["pairwise", f"--answers={a}", f"--baseline={a}", f"--out={cache}",
                                        f"--cache={cache}", unreachable]), f"{cache} is also an input ({cache})")


def test_an_output_inside_an_input_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "prompts"
    folder.mkdir()
    prompts(folder / "p.jsonl")
    model = model_copy(tmp_path / "m")
    inside = folder / "samples.jsonl"
    refused(capsys, lambda: generate.main([f"--model={DEMO_MODEL}", f"--prompts={folder}", f"--out={inside}", *GEN]),
            f"{inside} lies inside the input folder {folder}")
    refused(capsys, lambda: generate.main([f"--model={model}", f"--prompts={folder / 'p.jsonl'}",
                                           f"--out={model / 's.jsonl'}", *GEN]), f"{model / 's.jsonl'} lies inside")
    refused(capsys, lambda: implicit_reward.main([f"--model={DEMO_MODEL}", f"--ref_model={model}",
                                                  "--data=demo/data/heldout.jsonl", f"--out={model / 'ir.json'}"]),
            f"{model / 'ir.json'} lies inside the input folder {model}")
    metrics = tmp_path / "plots" / "loss.png"  # (a metrics file where a figure would go)
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 1.0}) + "\n")
    refused(capsys, lambda: plot.main([str(metrics), f"--out_dir={metrics.parent}"]),
            f"{metrics} is also an input ({metrics})")
    assert sorted(os.listdir(folder)) == ["p.jsonl"] and not (model / "s.jsonl").exists()


def test_split_into_its_own_data_folder_is_refused_even_with_overwrite(tmp_path, capsys):
    data = tmp_path / "D"
    data.mkdir()
    lines = (DEMO_MODEL.parent / "data" / "train.jsonl").read_text().splitlines(keepends=True)[:48]
    (data / "rows.jsonl").write_text("".join(lines))
    for extra in ([], ["--overwrite"]):  # the second run would read its own sft.jsonl and wrpo.jsonl: every row twice
        refused(capsys, lambda: split.main([f"--data={data}", f"--out_dir={data}", *extra]),
                f"{data / 'sft.jsonl'} lies inside the input folder {data}")
    assert os.listdir(data) == ["rows.jsonl"]
    split.main([f"--data={data / 'rows.jsonl'}", f"--out_dir={data}"])  # beside a data file is fine
    assert sorted(os.listdir(data)) == ["rows.jsonl", "sft.jsonl", "wrpo.jsonl"]


# -----------------------------------------------------------------------------
# section 2: a prompt_id names one prompt; a resume keeps only rows made as this run makes them


def scored(pid, prompt, texts, scores):
    return {"prompt_id": pid, "prompt": prompt, "responses": texts, "scores": scores, "model": "m"}


def test_build_refuses_one_prompt_id_for_two_prompts(tmp_path, capsys):
    poem = "Write a poem about cats. " * 5  # a long text is shortened
    both = write_jsonl(tmp_path / "src.jsonl", [scored("p1", "Capital of France?", ["Paris."], [1.0]),
                                                scored("p1", poem, ["Cats purr softly..."], [2.0])])
    line = refused(capsys, lambda: build.main(["--sources", str(both), f"--out={tmp_path / 'o.jsonl'}"]),
                   f"{both}:2: prompt_id 'p1' names two different prompts", "'Capital of France?' at " + f"{both}:1",
                   "'Write a poem about cats. Write a poem about cats. Write a...' here")
    assert poem.strip() not in line
    france = write_jsonl(tmp_path / "a.jsonl", [scored("p1", "Capital of France?", ["Paris."], [1.0])])
    cats = write_jsonl(tmp_path / "b.jsonl", [scored("p1", [{"role": "user", "content": "Write a poem about cats."}],
                                                     ["Cats purr softly...", "Meow."], [2.0, 0.5])])
    refused(capsys, lambda: build.main(["--sources", str(france), str(cats), f"--out={tmp_path / 'o.jsonl'}"]),
            f"{cats}:1: prompt_id 'p1' names two different prompts", f"at {france}:1")
    # the case: the target's prompt is not the source's, so y_ws would answer another prompt
    refused(capsys, lambda: build.main(["--sources", str(cats), f"--target={france}", f"--out={tmp_path / 'o.jsonl'}"]),
            f"{france}:1: prompt_id 'p1' names two different prompts", "'Write a poem about cats.' at")
    assert not (tmp_path / "o.jsonl").exists()
    same = write_jsonl(tmp_path / "same.jsonl", [scored("p1", [{"role": "user", "content": "Capital of France?"}],
                                                        ["Paris!", "Lyon."], [3.0, 0.0])])
    build.main(["--sources", str(france), f"--target={same}", f"--out={tmp_path / 'o.jsonl'}"])  # a string = a turn
    assert read_jsonl(tmp_path / "o.jsonl")[0]["chosen"][0]["content"] == "Paris."


def test_generate_resume_refuses_another_model_under_the_same_name(tmp_path, capsys, monkeypatch):
    """The README's loop with org1/tiny and org2/tiny: both write tiny.jsonl; the second refuses (or with --overwrite
    starts over) instead of keeping the first model's samples. The same model by another path resumes."""
    first, second = model_copy(tmp_path / "org1" / "tiny"), model_copy(tmp_path / "org2" / "tiny", nudge=0.01)
    p = prompts(tmp_path / "p.jsonl")
    out = tmp_path / "tiny.jsonl"
    generate.main([f"--model={first}", f"--prompts={p}", f"--out={out}", *GEN])
    made = out.read_bytes()
    rows = read_jsonl(out)
    assert rows[0]["model"] == "tiny" and rows[0]["generation"]["dtype"] == "float32"
    assert len(rows[0]["generation"]["weights"]) == 16
    refused(capsys, lambda: generate.main([f"--model={second}", f"--prompts={p}", f"--out={out}", *GEN]),
            f"{out} holds 3 row(s) made otherwise", "generation.weights (the model's weights) was", "--overwrite")
    refused(capsys, lambda: generate.main([f"--model={first}", f"--prompts={p}", f"--out={out}", *GEN,
                                           "--temperature=1.0"]), "generation.temperature was 0.8, now 1.0")
    edited = write_jsonl(tmp_path / "edited.jsonl", [{**r, "prompt": "another prompt"} if i == 1 else r
                                                     for i, r in enumerate(read_jsonl(p))])
    refused(capsys, lambda: generate.main([f"--model={first}", f"--prompts={edited}", f"--out={out}", *GEN]),
            "1 row(s)", "prompt was")
    assert out.read_bytes() == made
    monkeypatch.chdir(tmp_path)  # the same model by a relative path: resumed, nothing generated again
    generate.main(["--model=org1/tiny", f"--prompts={p}", f"--out={out}", *GEN])
    assert "3 prompts, 3 already done" in capsys.readouterr().out and out.read_bytes() == made
    generate.main([f"--model={second}", f"--prompts={p}", f"--out={out}", *GEN, "--overwrite"])
    again = read_jsonl(out)
    assert [r["prompt_id"] for r in again] == [r["prompt_id"] for r in rows]
    assert again[0]["generation"]["weights"] != rows[0]["generation"]["weights"]


def test_score_resume_refuses_another_reward_model_or_other_responses(tmp_path, capsys):
    from test_score import reward_model

    from safetensors.torch import load_file, save_file

    rm, other = reward_model(tmp_path / "rm"), tmp_path / "rm2"
    shutil.copytree(rm, other)  # another reward model: one weight changed
    weights = load_file(other / "model.safetensors")
    weights["score.weight"] = weights["score.weight"] + 0.5
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    rows = [{"prompt_id": f"p{i}", "prompt": f"question {i}", "responses": [f"a{i}", f"b{i}"]} for i in range(3)]
    data = write_jsonl(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    score.main([f"--reward_model={rm}", f"--data={data}", f"--out={out}", "--dtype=float32"])
    assert read_jsonl(out)[0]["scoring"]["max_length"] == 4096
    made = out.read_bytes()
    refused(capsys, lambda: score.main([f"--reward_model={other}", f"--data={data}", f"--out={out}",
                                        "--dtype=float32"]), "scoring.weights (the model's weights) was")
    regenerated = write_jsonl(tmp_path / "again.jsonl", [{**r, "responses": ["new", "texts"]} if i == 2 else r
                                                         for i, r in enumerate(rows)])
    refused(capsys, lambda: score.main([f"--reward_model={rm}", f"--data={regenerated}", f"--out={out}",
                                        "--dtype=float32"]), "1 row(s)", "prompt_id 'p2'", "responses was")
    assert out.read_bytes() == made
    score.main([f"--reward_model={rm}", f"--data={regenerated}", f"--out={out}", "--dtype=float32", "--overwrite"])
    assert read_jsonl(out)[2]["responses"] == ["new", "texts"]


def test_answers_resume_refuses_another_model(tmp_path, capsys):
    first, second = model_copy(tmp_path / "a" / "tiny"), model_copy(tmp_path / "b" / "tiny", nudge=0.01)
    questions = tmp_path / "alpaca_eval.json"
    questions.write_text(json.dumps([{"instruction": f"Say {w}.", "dataset": "d"} for w in ("hi", "bye")]))
    out = tmp_path / "model_outputs.json"
    common = [f"--questions={questions}", f"--out={out}", "--max_new_tokens=4", "--dtype=float32"]
    answers.main(["alpaca", f"--model={first}", *common])
    made = out.read_bytes()
    refused(capsys, lambda: answers.main(["alpaca", f"--model={second}", *common]),
            "2 row(s) made otherwise", "generation.weights (the model's weights)")
    refused(capsys, lambda: answers.main(["alpaca", f"--model={first}", *common, "--model_id=other"]),
            'generator was "tiny", now "other"')
    assert out.read_bytes() == made
    answers.main(["alpaca", f"--model={second}", *common, "--overwrite"])
    assert json.loads(out.read_text())[0]["generation"] != json.loads(made)[0]["generation"]


# -----------------------------------------------------------------------------
# section 4: no input that is not a regular file is ever opened (a FIFO would block forever)


def test_fifos_are_refused_at_once(tmp_path, capsys, monkeypatch, no_hang):
    monkeypatch.setenv("OPENAI_API_KEY", "key")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    good = tmp_path / "A.json"
    good.write_text(json.dumps([{"instruction": "q", "output": "x"}]))
    out = tmp_path / "o.jsonl"
    for call, said in [
        (lambda: judge.main(["pairwise", f"--answers={fifo}", f"--baseline={good}", f"--out={tmp_path / 'j.json'}"]),
         f"cannot read {fifo}: not a regular file"),
        (lambda: judge.main(["pairwise", f"--answers={good}", f"--baseline={good}", f"--out={tmp_path / 'j.json'}",
                             f"--cache={fifo}"]), f"{fifo} is a FIFO"),
        (lambda: plot.main([str(fifo), f"--out_dir={tmp_path / 'plots'}"]), "not a regular file"),
        (lambda: answers.main(["mtbench", f"--model={DEMO_MODEL}", f"--questions={fifo}", f"--out={out}"]),
         "not a regular file"),
        (lambda: generate.main([f"--model={DEMO_MODEL}", f"--prompts={fifo}", f"--out={out}", *GEN]), "a FIFO"),
        (lambda: generate.main([f"--model={DEMO_MODEL}", f"--prompts={good}", f"--out={fifo}", *GEN]),
         f"{fifo} is a FIFO"),  # a resume would read it
        (lambda: score.main([f"--reward_model={DEMO_MODEL}", f"--data={fifo}", f"--out={out}"]), "a FIFO"),
        (lambda: build.main(["--sources", str(fifo), f"--out={out}"]), "a FIFO"),
        (lambda: split.main([f"--data={fifo}", f"--out_dir={tmp_path / 's'}"]), "a FIFO"),
        (lambda: implicit_reward.main([f"--model={DEMO_MODEL}", f"--ref_model={DEMO_MODEL}", f"--data={fifo}"]),
         "a FIFO"),
    ]:
        refused(capsys, call, said)
    assert not out.exists()


# -----------------------------------------------------------------------------
# section 5 and 6: the loading rule before any load (pickles through an index, truncated files), outputs before work


def pickled_through_index(folder):
    """demo/model whose model.safetensors.index.json maps every tensor to a torch.save file."""
    from safetensors.torch import load_file

    model_copy(folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model-00001-of-00001.bin")
    index = {"metadata": {}, "weight_map": {name: "pytorch_model-00001-of-00001.bin" for name in weights}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_a_pickle_through_an_index_is_refused_before_loading(tmp_path, capsys):
    indexed = pickled_through_index(tmp_path / "indexed")
    p = prompts(tmp_path / "p.jsonl", 1)
    said = "maps tensors to 'pytorch_model-00001-of-00001.bin', not a safetensors file"
    refused(capsys, lambda: generate.main([f"--model={indexed}", f"--prompts={p}", f"--out={tmp_path / 'o.jsonl'}",
                                           *GEN]), "cannot load the model", said)
    refused(capsys, lambda: implicit_reward.main([f"--model={DEMO_MODEL}", f"--ref_model={indexed}",
                                                  "--data=demo/data/heldout.jsonl", "--dtype=float32"]),
            "cannot load the reference model", said)
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([{"instruction": "hi"}]))
    refused(capsys, lambda: answers.main(["alpaca", f"--model={indexed}", f"--questions={questions}",
                                          f"--out={tmp_path / 'a.json'}"]), said)
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "a.json").exists()


def test_a_truncated_model_in_generate_is_one_line(tmp_path):
    model = model_copy(tmp_path / "cut")
    weights = model / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    p = prompts(tmp_path / "p.jsonl", 1)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "eval.generate", f"--model={model}", f"--prompts={p}",
                          f"--out={tmp_path / 'o.jsonl'}", *GEN], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.startswith("error: cannot load the model: ") and len(run.stderr.strip().splitlines()) == 1
    assert f"{weights} is not a whole safetensors file" in run.stderr and not (tmp_path / "o.jsonl").exists()


def test_outputs_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "key")
    folder = tmp_path / "DIR"
    (folder / "keep").mkdir(parents=True)
    p = prompts(tmp_path / "p.jsonl", 1)
    a = tmp_path / "A.json"
    a.write_text(json.dumps([{"instruction": "q", "output": "x"}]))
    missing = tmp_path / "no-such-model"  # the output is refused first: the model is never looked at
    for call in [
        lambda: generate.main([f"--model={missing}", f"--prompts={p}", f"--out={folder}", *GEN]),
        lambda: implicit_reward.main([f"--model={missing}", f"--ref_model={missing}",
                                      "--data=demo/data/heldout.jsonl", f"--out={folder}"]),
        lambda: judge.main(["pairwise", f"--answers={a}", f"--baseline={a}", f"--out={folder}",
                            "--base_url=http://127.0.0.1:9/v1"]),  # no judge call is made
        lambda: score.main([f"--reward_model={missing}", f"--data={p}", f"--out={folder}"]),
        lambda: answers.main(["alpaca", f"--model={missing}", f"--questions={a}", f"--out={folder}"]),
    ]:
        refused(capsys, call, f"{folder} is a folder")
    refused(capsys, lambda: plot.main([str(tmp_path / "no-metrics.jsonl"), f"--out_dir={a}"]),
            f"{a} is a file; --out_dir is the folder")
    (tmp_path / "notes.txt").write_text("a file\n")
    under_a_file = tmp_path / "notes.txt" / "x.json"  # a file where a folder must be: the judge called (paid) first
    for call in [
        lambda: judge.main(["pairwise", f"--answers={a}", f"--baseline={a}", f"--out={under_a_file}",
                            "--base_url=http://127.0.0.1:9/v1"]),
        lambda: generate.main([f"--model={missing}", f"--prompts={p}", f"--out={under_a_file}", *GEN]),
        lambda: implicit_reward.main([f"--model={missing}", f"--ref_model={missing}",
                                      "--data=demo/data/heldout.jsonl", f"--out={under_a_file}"]),
    ]:
        refused(capsys, call, f"cannot write {under_a_file}: {tmp_path / 'notes.txt'} is not a folder")
    assert os.listdir(folder) == ["keep"] and os.listdir(tmp_path / "DIR" / "keep") == []
    assert not list(tmp_path.glob("*.tmp"))


# -----------------------------------------------------------------------------
# section 7: a crashed run's torn last metrics line, and a UTF-8 byte-order mark


def test_plot_drops_a_torn_last_line_and_reads_a_bom(tmp_path, capsys):
    rows = "".join(json.dumps({"step": s, "loss": 1 / s, "lr": 1e-3}) + "\n" for s in range(1, 4))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b"\xef\xbb\xbf" + rows.encode() + b'{"step": 4, "lo')
    plot.main([str(metrics), f"--out_dir={tmp_path / 'plots'}"])
    out = capsys.readouterr()
    assert f"{metrics}:4: dropped the last line" in out.err and "figures ->" in out.out
    assert (tmp_path / "plots" / "loss.png").exists()
    metrics.write_text('{"step": 1, "lo\n' + rows)  # not the last line: an error, by file:line
    refused(capsys, lambda: plot.main([str(metrics), f"--out_dir={tmp_path / 'plots'}"]), f"{metrics}:1: not a metrics")


def test_a_bom_is_accepted_wherever_eval_reads_a_file(tmp_path, capsys):
    from eval.questions import read_questions

    bom = b"\xef\xbb\xbf"
    q = tmp_path / "question.jsonl"
    q.write_bytes(bom + json.dumps({"question_id": 1, "category": "math", "turns": ["1+1?"]}).encode() + b"\n")
    assert read_questions("mtbench", q)[0]["id"] == 1
    a = tmp_path / "A.json"
    a.write_bytes(bom + json.dumps([{"instruction": "q", "output": "x"}]).encode())
    assert judge.read_answers(a, None) == {"q": (["q"], ["x"])}
    assert read_input(a).startswith("[")
    (tmp_path / "bad").write_bytes(bom + b"ok \xe9")  # a bad byte is still placed right: the file's 7th
    refused(capsys, lambda: read_input(tmp_path / "bad"), "not UTF-8 text (byte 7)")


# -----------------------------------------------------------------------------
# Ctrl-C: one line and exit 130, at once (not after the judge's requests in flight), no traceback


def test_ctrl_c_stops_at_once_with_one_line(tmp_path):
    import socket
    import threading
    import time

    listener, held = socket.create_server(("127.0.0.1", 0)), []  # a judge endpoint that never answers

    def accept():
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:  # closed: the test is over
                return

    threading.Thread(target=accept, daemon=True).start()
    a = tmp_path / "A.json"
    a.write_text(json.dumps([{"instruction": "q", "output": "x"}]))
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    cmd = [sys.executable, "-m", "eval.judge", "pairwise", f"--answers={a}", f"--baseline={a}",
           f"--out={tmp_path / 'j.json'}", f"--base_url=http://127.0.0.1:{listener.getsockname()[1]}/v1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**env, "OPENAI_API_KEY": "key"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(held) < 2 and time.monotonic() < deadline:  # both orderings asked, both waiting
            time.sleep(0.05)
        assert len(held) == 2
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and err == "stopped by SIGINT (Ctrl-C)\n", err
        assert time.monotonic() - start < 5 and not (tmp_path / "j.json").exists()
    finally:
        proc.kill()
        listener.close()
        for conn in held:
            conn.close()
