"""First GPU day: will a real run work on this machine? One command, a few minutes on one H100/H200.

    python -m benchmarks.gpu_check               # CUDA: a ~1.5B random-init Llama, UltraFeedback-like rows, bf16
    python -m benchmarks.gpu_check --dry-run     # CPU: the same commands on the demo model and data (~1 minute)

`bash benchmarks/gpu_check.sh` runs it after the GPU kernel tests, before the benchmarks. Each step is one
line of the summary table (PASS, FAIL or SKIP, with its time), has a timeout (SETTINGS) and prints each command
it runs; a failed step does not stop the ones after it (a later step takes the newest model there is: WRPO's
final/, else SFT's, else the initial one).

1. model and data: a random-init Llama of train_step's gpu shape (hidden 2048, 16 layers, 32 heads, 8 kv
   heads, intermediate 8192, vocab 128256) saved as safetensors with the demo tokenizer, and synthetic rows of
   UltraFeedback-like lengths (train_step.make_data): chat rows for SFT, WRPO rows for WRPO. The dry run
   takes demo/model and demo/data/train.jsonl (for both stages: sft.py trains on WRPO rows' chosen[0]).
2. varlen self-check: attention.varlen_self_check(device), PASS or FAIL as it says; on CPU a SKIP (CUDA's kernel).
3. sft: `torchrun sft.py`, a few steps (nccl, bf16, activation checkpointing, triton log-probs), final/.
4. wrpo: `torchrun wrpo.py` from the SFT model (its own reference: step 1 must print "step 1: policy ==
   reference, max |d| = 0", every d(y) exactly 0 in bf16 on this GPU) with save_every=2; SIGTERM to torchrun once
   metrics.jsonl reaches step 3: the workers save a resumable checkpoint and torchrun exits 1 (README's exit-code table;
   the workers' own code is 143); the same command with --resume=auto then trains to the end: the metrics
   rows up to the checkpoint kept as they were, steps 1..N contiguous, final/ written.
5. from_pretrained: AutoModelForCausalLM loads the final model on the device; one forward, finite logits.
6. eval.generate: 8 prompts, one greedy sample each; 8 rows written.
7. throughput: median tokens/s and MFU (CUDA only) of the WRPO steps, each run's first step left out.

Outputs go to a temporary folder, deleted at the end, or to --work_dir, kept; never into the repo.
Exit 0 when no line is FAIL, else 1.
"""

import argparse
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {
    # the first GPU: ~1.5B parameters, UltraFeedback-like rows (~950 tokens, prompt once), a real run's settings
    "gpu": dict(dtype="bfloat16", logps_impl="triton", sft_rows=128, wrpo_rows=192, wrpo_steps=6,
                sft=["--max_length=2048", "--global_batch_size=8", "--max_steps=3", "--lr=1e-5"],  # ~5 rows/sequence
                wrpo=["--max_length=2048", "--max_prompt_length=1800", "--global_batch_size=32", "--lr=1e-6"],
                shutdown_timeout=120,  # torchrun's grace for the SIGTERM save: ~18 GB of fp32 weights and AdamW
                timeout=dict(model_and_data=150, sft=180, wrpo=360, from_pretrained=120, generate=150, varlen=60,
                             throughput=10)),
    # CI, on CPU: the same commands on the demo model and data, in about a minute on 2 cores
    "dry-run": dict(dtype="float32", logps_impl="chunked", wrpo_steps=8,
                    sft=["--max_length=128", "--global_batch_size=8", "--micro_batch_size=4", "--max_steps=3",
                         "--lr=1e-3"],
                    wrpo=["--max_length=128", "--max_prompt_length=96", "--global_batch_size=16",
                          "--micro_batch_size=8", "--lr=1e-3"],
                    shutdown_timeout=30,
                    timeout=dict(model_and_data=30, sft=90, wrpo=150, from_pretrained=60, generate=60, varlen=30,
                                 throughput=10)),
}
STOP_AT_STEP = 3  # SIGTERM once metrics.jsonl has this step


class Failed(Exception):
    """A step's one-line failure."""


class Skipped(Exception):
    """A step that does not apply on this machine."""


# -----------------------------------------------------------------------------
# running commands


def run(cmd, log, c, poll=None):
    """Run `cmd` from the repo root with its output in `log`; its exit code. poll(proc) is called every 0.1 s.
    When the step's time is up (an exception from the alarm) the command is stopped: SIGTERM, which torchrun
    forwards to its workers, then SIGKILL after the grace period."""
    cmd = [str(x) for x in cmd]
    print("+ " + shlex.join(cmd), flush=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=c.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                if poll:
                    poll(proc)
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(c.grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                print("\n".join(log.read_text(errors="replace").splitlines()[-40:]), flush=True)
    return proc.returncode


def command_failed(what, code, log):
    """The log's tail on the console; a Failed naming the error line (the project's `error: ...` first)."""
    lines = Path(log).read_text(errors="replace").splitlines()
    print("\n".join(lines[-40:]), flush=True)
    errors = [x for x in lines if x.startswith("error") or re.match(r"[\w.]*(Error|Exception): ", x)]
    errors = [x for x in errors if "ChildFailedError" not in x] or [x for x in lines if x.strip()] or ["no output"]
    return Failed(f"{what} exited {code}: {errors[-1].strip()[:200]} (log: {log})")


def torchrun(c, script, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            f"--shutdown-timeout={c.s['shutdown_timeout']}", script, *args]


def step_rows(out_dir):
    """metrics.jsonl's training rows (an evaluation-only row has no lr), as (step, raw line)."""
    path = out_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:  # a line being written
            continue
        if "lr" in row:
            rows.append((row["step"], line))
    return rows


def newest_model(c):
    """This run's WRPO final model, else its SFT one, else the initial one: later steps still run after a failed
    one (and never take a model an earlier run left in --work_dir)."""
    if not (path := c.wrpo_final or c.sft_final or c.model):
        raise Failed("no model: step 1 failed")
    return path


# -----------------------------------------------------------------------------
# the steps; each returns its detail, or raises Failed / Skipped


def model_and_data(c):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    if c.dry_run:
        c.model, c.sft_data = REPO / "demo" / "model", REPO / "demo" / "data" / "train.jsonl"
        c.wrpo_data = c.sft_data
    else:
        import torch

        from benchmarks import train_step

        p = {**train_step.PRESETS["gpu"], "rows": c.s["sft_rows"] + c.s["wrpo_rows"]}
        with torch.device(c.device):  # random init on the GPU: seconds, not a minute of CPU
            tokenizer = train_step.make_model(c.work, p)
        torch.cuda.empty_cache()
        rows_path, _ = train_step.make_data(c.work, p, tokenizer, epoch_rows=0)
        rows = [json.loads(x) for x in rows_path.read_text().splitlines()]
        c.model, c.sft_data, c.wrpo_data = c.work / "model", c.work / "sft.jsonl", c.work / "wrpo.jsonl"
        sft = [{"messages": r["prompt"] + r["chosen"][:1]} for r in rows[:c.s["sft_rows"]]]  # chat rows
        c.sft_data.write_text("".join(json.dumps(r) + "\n" for r in sft))
        c.wrpo_data.write_text("".join(json.dumps(r) + "\n" for r in rows[c.s["sft_rows"]:]))
    params = 0
    for f in c.model.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            params += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    tokenizer = AutoTokenizer.from_pretrained(c.model)
    rows = [json.loads(x) for x in c.wrpo_data.read_text().splitlines()]
    tokens = [len(tokenizer(" ".join(m["content"] for m in r["prompt"] + r["chosen"] + r["rejected"])).input_ids)
              for r in rows]
    return f"{c.model}: {params:,} parameters; {len(rows)} WRPO rows, {statistics.mean(tokens):.0f} tokens on average"


def sft(c):
    out = c.work / "sft"
    log = c.work / "sft.log"
    code = run(torchrun(c, "sft.py", f"--model={c.model}", f"--data={c.sft_data}", f"--out_dir={out}",
                        "--overwrite=true", *c.common, *c.s["sft"]), log, c)
    if code:
        raise command_failed("sft.py", code, log)
    if not (out / "final" / "config.json").exists():
        raise Failed(f"no {out / 'final'}")
    c.sft_final = out / "final"
    return f"{len(step_rows(out))} steps, {out / 'final'} written"


def wrpo(c):
    out, log1, log2 = c.work / "wrpo", c.work / "wrpo.log", c.work / "wrpo_resume.log"
    total, model = c.s["wrpo_steps"], newest_model(c)
    args = [f"--model={model}", f"--data={c.wrpo_data}", f"--out_dir={out}", f"--ref_cache_dir={c.work / 'ref_cache'}",
            f"--max_steps={total}", "--save_every=2", "--keep_last=1", "--beta=0.1", *c.common, *c.s["wrpo"]]
    sent = []

    def preempt(proc):  # as a scheduler does: SIGTERM to the launcher
        if not sent and max((s for s, _ in step_rows(out)), default=0) >= STOP_AT_STEP:
            proc.send_signal(signal.SIGTERM)
            sent.append(True)

    code = run(torchrun(c, "wrpo.py", *args, "--overwrite=true"), log1, c, poll=preempt)
    if not sent:
        raise command_failed(f"wrpo.py, before step {STOP_AT_STEP} (no SIGTERM sent),", code, log1)
    saved = re.search(r"stopped by SIGTERM after step (\d+); saved (.+?)\. Rerun", log1.read_text(errors="replace"))
    if code != 1 or not saved:  # README: torchrun exits 1 after a SIGTERM; the workers saved and exited 143
        raise command_failed("wrpo.py after SIGTERM (expected exit 1 and 'stopped by SIGTERM ... saved')", code,
                             log1)
    invariant = next((x for x in log1.read_text(errors="replace").splitlines() if "policy == reference" in x), "")
    if not invariant.endswith("policy == reference, max |d| = 0"):  # the reference is the policy: d(y) = 0 exactly
        raise Failed(f"step 1 is not exact: {invariant.strip() or 'no invariant line'}")
    stopped, checkpoint = int(saved[1]), REPO / saved[2]
    if not (checkpoint / "trainer_state.json").exists():
        raise Failed(f"SIGTERM after step {stopped}: {checkpoint} has no trainer_state.json")
    kept = [line for s, line in step_rows(out) if s <= stopped]
    code = run(torchrun(c, "wrpo.py", *args, "--resume=auto"), log2, c)
    if code:
        raise command_failed("wrpo.py --resume=auto", code, log2)
    rows = step_rows(out)
    if [s for s, _ in rows] != list(range(1, total + 1)):
        raise Failed(f"metrics.jsonl steps {[s for s, _ in rows]}, expected 1..{total}")
    if [line for _, line in rows[:stopped]] != kept:  # a run that started again from step 0 rewrites them
        raise Failed(f"the resumed run did not continue from step {stopped}: metrics rows 1-{stopped} changed")
    if not (out / "final" / "config.json").exists():
        raise Failed(f"no {out / 'final'}")
    c.wrpo_final, c.resumed_at = out / "final", stopped
    return (f"from {model.parent.name}/{model.name}; step 1 exact (every d(y) = 0); SIGTERM at step {STOP_AT_STEP}: "
            f"torchrun exit 1, saved "
            f"{checkpoint.name}; --resume=auto: steps {stopped + 1}-{total}, metrics 1-{total} contiguous, final/")


def from_pretrained(c):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = newest_model(c)
    dtype = getattr(torch, c.s["dtype"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(c.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name three primary colours."}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(c.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    finite = bool(torch.isfinite(logits).all())
    del model
    if c.device.type == "cuda":
        torch.cuda.empty_cache()
    if not finite:
        raise Failed(f"{path}: non-finite logits")
    return f"{path.parent.name}/{path.name}, {dtype}, on {c.device}: logits {tuple(logits.shape)} finite"


def generate(c):
    prompts, out, log = c.work / "prompts.jsonl", c.work / "generated.jsonl", c.work / "generate.log"
    prompts.write_text("".join(c.wrpo_data.read_text().splitlines(keepends=True)[:8]))
    out.unlink(missing_ok=True)
    code = run([sys.executable, "-m", "eval.generate", f"--model={newest_model(c)}", f"--prompts={prompts}",
                f"--out={out}", "--num_samples=1", "--temperature=0", "--max_new_tokens=32",
                f"--dtype={c.s['dtype']}"], log, c)
    if code:
        raise command_failed("eval.generate", code, log)
    rows = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    if len(rows) != 8 or any(len(r["responses"]) != 1 for r in rows):
        raise Failed(f"{out}: {len(rows)} rows, expected 8 with one response each")
    return f"8 rows, {sum(len(r['responses'][0]) for r in rows)} characters generated"


def varlen(c):
    import attention

    self_check = getattr(attention, "varlen_self_check", None)
    if self_check is None:
        raise Failed("missing: attention.varlen_self_check")
    ok, message = self_check(c.device)
    if not ok and c.device.type == "cpu":  # the kernel is CUDA's: the dry run only calls it
        raise Skipped(message)
    if not ok:
        raise Failed(message)
    return message


def throughput(c):
    rows = [json.loads(line) for s, line in step_rows(c.work / "wrpo") if s not in (1, c.resumed_at + 1)]
    if not rows:
        raise Failed("no steady-state WRPO steps in metrics.jsonl")
    tokens = statistics.median(r["tokens_per_s"] for r in rows)
    memory = max(r["peak_memory_gib"] for r in rows)
    detail = f"median of {len(rows)} steps: {tokens:,.0f} tokens/s, peak memory {memory:.1f} GiB"
    if c.device.type != "cuda":
        return detail + ", MFU n/a on CPU"
    if "mfu" not in rows[0]:
        return detail + ", MFU n/a (device not in training.PEAK_BF16_FLOPS)"
    mfu = statistics.median(r["mfu"] for r in rows)
    if mfu < 0.10:  # a ~1.5B Llama on one H100 should be well above this
        raise Failed(detail + f", MFU {mfu:.1%}: under 10%, something is off")
    return detail + f", MFU {mfu:.1%}"


STEPS = [("1. model and data", model_and_data), ("2. varlen self-check", varlen), ("3. sft.py (torchrun)", sft),
         ("4. wrpo.py: SIGTERM, --resume=auto", wrpo), ("5. from_pretrained + forward", from_pretrained),
         ("6. eval.generate", generate), ("7. WRPO tokens/s, MFU", throughput)]  # the quick self-check early


def timed_out(signum, frame):  # SIGALRM: the step's time is up
    raise Failed("timed out")


# -----------------------------------------------------------------------------
# the summary


def main():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: the demo model and data, about a minute")
    ap.add_argument("--work_dir", default="", help="where outputs go (kept); default: a temporary folder")
    ap.add_argument("--summary", default="", help="also write the table's rows here, after every step")
    ap.add_argument("--seconds", type=int, default=0, help="time for all the steps (0: only their own timeouts); "
                    "a step gets what is left of it at most, and a step with under 10 s left is skipped")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stops the child on the way out
    signal.signal(signal.SIGALRM, timed_out)

    import torch

    s = SETTINGS["dry-run" if args.dry_run else "gpu"]
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; on CPU run it with --dry-run")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if args.dry_run:  # CPU even on a GPU machine: gloo, as in CI
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    device = torch.device("cpu" if args.dry_run else "cuda")
    rows, started = [], time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.work_dir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        common = [f"--dtype={s['dtype']}", f"--logps_impl={s['logps_impl']}", "--activation_checkpointing=true",
                  "--log_every=1", f"--data_cache_dir={work / 'data_cache'}"]  # never beside the demo's data
        c = SimpleNamespace(dry_run=args.dry_run, s=s, env=env, device=device, common=common, work=work,
                            grace=s["shutdown_timeout"] + 15, model=None, sft_data=None, wrpo_data=None,
                            sft_final=None, wrpo_final=None, resumed_at=0)
        where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
        print(f"gpu_check: {where}, torch {torch.__version__}; outputs in {work}", flush=True)
        for name, step in STEPS:
            print(f"\n== {name}", flush=True)
            t0, limit = time.time(), s["timeout"][step.__name__]
            left = int(args.seconds - (t0 - started)) if args.seconds else limit
            signal.alarm(max(1, min(limit, left)))
            try:
                if left < 10:
                    raise Skipped(f"not run: the {args.seconds} s of --seconds are spent")
                result, detail = "PASS", step(c)
            except Skipped as e:
                result, detail = "SKIP", str(e)
            except Exception as e:  # a failed step is one line of the table; the steps after it still run
                if not isinstance(e, Failed):
                    traceback.print_exc()
                result, detail = "FAIL", str(e) if isinstance(e, Failed) else f"{type(e).__name__}: {e}"
            finally:
                signal.alarm(0)
            detail = " ".join(detail.split()).replace("|", "/")[:300]
            rows.append(f"| {name} | {result} | {detail} ({time.time() - t0:.1f} s) |")
            print(rows[-1], flush=True)
            if args.summary:
                Path(args.summary).write_text("".join(r + "\n" for r in rows))
    print("\n| check | result | detail |\n|---|---|---|\n" + "\n".join(rows), flush=True)
    sys.exit(1 if any("| FAIL |" in r for r in rows) else 0)


if __name__ == "__main__":
    main()
