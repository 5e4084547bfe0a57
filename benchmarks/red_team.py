"""The outside red team's failure cases, reproduced against one checkout: one markdown table.

    python benchmarks/red_team.py                       # the checkout holding this script
    python benchmarks/red_team.py --repo=/tmp/before    # another checkout (e.g. a worktree of an older commit)
    python benchmarks/red_team.py --only=3 --out=red_team.md --keep

--only runs some cases: ids or their start (--only=3, --only=5a,8c), else a substring of the titles
(--only=cache); --out also writes the table to a file;
--keep leaves the scratch folder (its path is printed). Run it once per checkout to put "before" and "after"
side by side: every case runs the checkout's own commands (wrpo.py, torchrun, python -m eval.*) in a fresh
temporary folder, on the CPU (CUDA_VISIBLE_DEVICES=""), each with a hard timeout: a command still running at
its timeout is killed with its children, and that is its result. One case failing never stops the others.

Every training run uses the same small settings: the first 48 rows of demo/data/train.jsonl, 4 rows a step,
float32, 6 steps, a checkpoint every 2 (see SMALL). Cases that need a finished run copy one built once.
Each row gives the case, the exit status (killed: the timeout), the wall time and a one-line outcome: the
first `error:` line (with the line after it when it ends in ':'), else "Traceback: <the exception>", plus
the measured fact the case is about. Paths are shown as TMP (the scratch folder) and REPO.

Cases (the ids of --only):
  1  resume after a torn metrics.jsonl line (1a torn row, 1b `xyz`, 1c `[1, 2]`): steps 1..6 once each?
  2  resume past a malformed trainer_state.json in step_000004 (2a no config, 2b a bad rng, 2c step "4")
  3  a damaged reference-log-prob cache (3a 8 bytes flipped: the step-1 loss, ln 2 if the cache is
     refused; 3b half, 3c empty, 3d logps [48, 2], 3e key "x"). These runs take all 48 rows in their one
     step, so that the flipped values (rows 46 and 47) are in it
  4  4a 8 bytes flipped in step_000004's optimizer state, then --resume=auto; 4b --resume=OUT/final
  5  5a a second torchrun launch into an out_dir in use; 5b SIGKILL of torchrun alone: do its workers go on?
  6  a full disk (tmpfs; needs root): 6a too small to start; 6b space for one checkpoint of two, then resume
  7  the loading rule: 7a pickled weights in eval.generate; 7b, 7c a config with auto_map (shipped code)
  8  bad input: 8a-8h to wrpo.py, 8i eval.split, 8j eval.build
  9  torchrun's exit status and messages when every rank refuses the settings
"""

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_REPO = Path(__file__).resolve().parent.parent
LN2 = math.log(2)
MAX_OUTCOME = 140  # characters of an error line shown

# the small run every case starts from; a case overrides some keys (None drops one)
SMALL = {"global_batch_size": 4, "micro_batch_size": 2, "dtype": "float32", "save_dtype": "float32",
         "max_length": 128, "max_prompt_length": 96, "lr": "1e-3", "max_steps": 6, "save_every": 2, "keep_last": 0}
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


class CaseError(Exception):
    """A case could not be set up (no finished base run, no root for mount, ...): its row says why."""


@dataclass
class Row:
    id: str
    what: str
    code: object = "-"  # exit status, "killed" at the timeout, "-" when nothing ran
    wall: float = None
    outcome: str = ""


@dataclass
class Proc:
    """A finished (or killed) command: exit code, output, wall seconds."""
    code: object
    out: str
    err: str
    wall: float
    timeout: float
    timed_out: bool = False

    @property
    def text(self):
        return self.out + "\n" + self.err


@dataclass
class Ctx:
    repo: Path
    tmp: Path
    rows48: Path = None
    cache: Path = None  # the reference-log-prob cache the runs share (TMP/cache)
    ref_file: Path = None  # the base run's cache file in it
    base: object = None  # the finished base run's out_dir, or the CaseError that building it met
    orphans: set = field(default_factory=set)  # worker pids seen, killed at the end if still alive


# -----------------------------------------------------------------------------
# processes: run with a hard timeout, kill a whole tree


def env_for(repo):
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(repo)}


def proc_table():
    """{pid: (ppid, state)} of every process, from /proc/*/stat."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            rest = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
            table[int(name)] = (int(rest[1]), rest[0])
    return table


def descendants(pid):
    children = {}
    for p, (ppid, _) in proc_table().items():
        children.setdefault(ppid, []).append(p)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid):
    """Running (a zombie counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def kill_tree(pid, ctx=None):
    """SIGKILL pid and every descendant (torchrun's workers run in sessions of their own)."""
    tree = descendants(pid)
    if ctx is not None:
        ctx.orphans.update(tree)
    for p in [pid] + tree:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Started:
    """A command started in the background: cwd = the repo, output to files."""

    def __init__(self, ctx, args, stdin=subprocess.DEVNULL):
        self.ctx, self.t0, self.result = ctx, time.monotonic(), None
        self.out, self.err = tempfile.TemporaryFile(dir=ctx.tmp), tempfile.TemporaryFile(dir=ctx.tmp)
        self.p = subprocess.Popen([sys.executable, *map(str, args)], cwd=ctx.repo, env=env_for(ctx.repo),
                                  stdin=stdin, stdout=self.out, stderr=self.err, start_new_session=True)

    @property
    def pid(self):
        return self.p.pid

    def finish(self, timeout):
        """Wait up to `timeout` s from the start; past it kill the tree. Returns a Proc (the same one on a
        second call)."""
        if self.result is not None:
            return self.result
        try:
            code = self.p.wait(max(0.1, timeout - (time.monotonic() - self.t0)))
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_tree(self.p.pid, self.ctx)
            self.p.wait()
            code, timed_out = "killed", True
        wall = time.monotonic() - self.t0
        if self.p.stdin:
            self.p.stdin.close()
        texts = []
        for f in (self.out, self.err):
            f.seek(0)
            texts.append(f.read().decode("utf-8", "replace"))
            f.close()
        self.result = Proc(code, texts[0], texts[1], wall, timeout, timed_out)
        return self.result


def run(ctx, args, timeout, stdin=subprocess.DEVNULL):
    return Started(ctx, args, stdin).finish(timeout)


# -----------------------------------------------------------------------------
# what a command said


def trim(s, n=MAX_OUTCOME):
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def first_error(text):
    """The first `error:` line (and the next one when it ends in ':'), or None."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        s = re.sub(r"^\[\w+\]:", "", line.strip()).strip()  # torchrun may prefix worker lines
        if s.startswith("error:"):
            if s.endswith(":") and i + 1 < len(lines):
                s += " " + lines[i + 1].strip()
            return trim(s)
    return None


def last_exception(text):
    """The last line that names an exception (ValueError: ..., json.decoder.JSONDecodeError: ...), or None."""
    found = None
    for line in text.splitlines():
        s = re.sub(r"^\[\w+\]:", "", line.strip()).strip()
        if re.match(r"^([\w.]+\.)?\w*(Error|Exception|Exit|Interrupt|Failure)\b(:|$)", s):
            found = s
    return found


def summary(p):
    """What went wrong, in one line: the timeout, the first error: line, or the traceback's exception."""
    if p.timed_out:
        return f"still running at {p.timeout:.0f} s, killed"
    if err := first_error(p.text):
        return err
    if "Traceback" in p.text and (exc := last_exception(p.text)):
        return "Traceback: " + trim(exc)
    if p.code not in (0, "killed"):
        lines = [x for x in p.err.splitlines() if x.strip()]
        return "exit without message" + (f" (last line: {trim(lines[-1], 100)})" if lines else "")
    return None


def printed(p, pattern, n=MAX_OUTCOME):
    """The first line of the output matching regex `pattern`, trimmed to n characters, or None."""
    for line in p.text.splitlines():
        if re.search(pattern, line):
            return trim(line.strip(), n)
    return None


def resumed_from(p):
    """The step a run started from (0: from scratch), from its closing 'trained ...' line; None: no such line."""
    if m := re.search(r"trained steps (\d+)-\d+", p.out):
        return int(m.group(1)) - 1
    if re.search(r"trained \d+ steps", p.out):
        return 0
    return None


def step_rows(path):
    """(metric rows with an integer step and a loss, count of other non-empty lines) of a metrics.jsonl."""
    rows, other = [], 0
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return [], 0
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            other += bool(line.strip())
            continue
        if isinstance(r, dict) and type(r.get("step")) is int and "loss" in r:
            rows.append(r)
        else:
            other += 1
    return rows, other


def steps_fact(out_dir, want=range(1, 7)):
    rows, other = step_rows(Path(out_dir) / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    if sorted(steps) == list(want) and not other:
        return f"metrics.jsonl: steps {want[0]}..{want[-1]} once each"
    return f"metrics.jsonl: steps {steps}" + (f" and {other} unreadable line(s)" if other else "") + " (wrong)"


# -----------------------------------------------------------------------------
# runs and files


def wrpo_args(ctx, out_dir, **over):
    settings = {"data": ctx.rows48, **SMALL, "ref_cache_dir": ctx.cache, "out_dir": out_dir, **over}
    return ["wrpo.py"] + [f"--{k}={v}" for k, v in settings.items() if v is not None]


def wrpo(ctx, out_dir, timeout=90, **over):
    return run(ctx, wrpo_args(ctx, out_dir, **over), timeout)


def scratch(ctx, name):
    folder = ctx.tmp / name
    folder.mkdir(parents=True)
    return folder


def base_run(ctx):
    """The finished small run (built once): its out_dir; the shared cache then holds its reference log-probs."""
    if ctx.base is None:
        out = ctx.tmp / "base"
        p = wrpo(ctx, out, timeout=180)
        files = sorted(ctx.cache.glob("*.ref-logps-*.safetensors"))
        if p.code != 0 or not (out / "final").is_dir() or len(files) != 1:
            ctx.base = CaseError(f"no finished base run: {summary(p) or 'no final/ or no cache file'}")
        else:
            ctx.base, ctx.ref_file = out, files[0]
    if isinstance(ctx.base, CaseError):
        raise ctx.base
    return ctx.base


def copy_base(ctx, name, drop_final=True):
    """A copy of the finished run in TMP/name/out (without run.lock), final/ removed unless drop_final=False."""
    dst = ctx.tmp / name / "out"
    shutil.copytree(base_run(ctx), dst, ignore=shutil.ignore_patterns("run.lock"))
    if drop_final:
        shutil.rmtree(dst / "final")
    return dst


def flip_bytes(path, offset, n=8):
    """XOR n bytes at `offset` with 0xFF: same size, different content."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(n)
        f.seek(offset)
        f.write(bytes(x ^ 0xFF for x in b))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows48(ctx):
    return [json.loads(line) for line in ctx.rows48.read_text().splitlines()]


@contextmanager
def tmpfs(folder, size):
    """A tmpfs of `size` mounted on folder, unmounted afterwards; CaseError without root."""
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if r.returncode:
        raise CaseError(f"skipped: needs root ({trim(r.stderr, 80)})")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def folder_size(folder):
    """Bytes a folder takes on tmpfs: each file rounded up to 4 KiB pages."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in Path(folder).rglob("*") if f.is_file())


def outcome(p, *facts):
    """summary (if any) then the facts, '; '-joined."""
    return "; ".join(x for x in (summary(p), *facts) if x)


# -----------------------------------------------------------------------------
# the cases: each returns a list of Rows (code and wall of the command the case is about)


def resume_torn_metrics(ctx, id, what, line):
    out = copy_base(ctx, id)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(line)
    p = wrpo(ctx, out, resume="auto")
    return [Row(id, what, p.code, p.wall, outcome(p, printed(p, r"dropped \d+ unreadable"), steps_fact(out)))]


def resume_bad_state(ctx, id, what, damage):
    out = copy_base(ctx, id)
    path = out / "step_000004" / "trainer_state.json"
    state = json.loads(path.read_text())
    damage(state)
    path.write_text(json.dumps(state, indent=1) + "\n")
    p = wrpo(ctx, out, resume="auto")
    start = resumed_from(p)
    return [Row(id, what, p.code, p.wall, outcome(p, printed(p, r"skipping"),
                                                  None if start is None else f"resumed from step {start}"))]


def damaged_cache(ctx, id, what, damage):
    base_run(ctx)
    cache = scratch(ctx, id) / "cache"
    cache.mkdir()
    path = cache / ctx.ref_file.name
    shutil.copy(ctx.ref_file, path)
    damage(path)
    out = ctx.tmp / id / "out"  # one step over all 48 rows: every cached value is used
    p = wrpo(ctx, out, ref_cache_dir=cache, max_steps=1, global_batch_size=48, save_every=0)
    facts = []
    said = printed(p, r"^reference log-probs", n=10_000) or ""
    if "damaged" in said:
        m = re.search(r"is damaged \((.*)\); computing", said)
        facts.append("cache refused" + (f" ({trim(m.group(1), 80)})" if m else ""))
    elif p.code == 0:
        facts.append("cache used" if said.endswith("(cached)") else "reference computed")
    rows, _ = step_rows(out / "metrics.jsonl")
    if rows:
        loss = rows[0]["loss"]
        verdict = "= ln 2" if abs(loss - LN2) < 1e-6 else f"!= ln 2 = {LN2:.6f}: wrong"
        facts.append(f"step-1 loss {loss:.6f} ({verdict})")
    return [Row(id, what, p.code, p.wall, outcome(p, *facts))]


def flip_near_end(path):
    flip_bytes(path, path.stat().st_size - 16)


def truncate_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_empty(path):
    path.write_bytes(b"")


def other_tensor(key, shape):
    def damage(path):
        import torch
        from safetensors.torch import save_file

        save_file({key: torch.zeros(shape)}, str(path))
    return damage


def damaged_optimizer_state(ctx, id, what):
    out = copy_base(ctx, id)
    shard = out / "step_000004" / "state" / "__0_0.distcp"
    flip_bytes(shard, shard.stat().st_size // 2)
    p = wrpo(ctx, out, resume="auto")
    rows, _ = step_rows(out / "metrics.jsonl")
    nan = [r["step"] for r in rows if not math.isfinite(r["loss"])]
    start = resumed_from(p)
    return [Row(id, what, p.code, p.wall, outcome(
        p, printed(p, r"skipping"), None if start is None else f"resumed from step {start}",
        f"NaN loss at steps {nan}" if nan else "no NaN loss", loss_change(base_run(ctx), out)))]


def loss_change(reference, out):
    """How far the losses of run `out` are from those of the undamaged run `reference`, step by step."""
    want = {r["step"]: r["loss"] for r in step_rows(Path(reference) / "metrics.jsonl")[0]}
    got = {r["step"]: r["loss"] for r in step_rows(Path(out) / "metrics.jsonl")[0]}
    diffs = {s: abs(got[s] - want[s]) for s in sorted(set(want) & set(got))}
    if not diffs:
        return None
    changed = [s for s, d in diffs.items() if not d <= 0]  # NaN counts as changed
    if not changed:
        return "losses identical to the undamaged run's"
    return f"losses differ from the undamaged run's at steps {changed} (max {max(diffs.values()):.2g})"


def resume_from_final(ctx, id, what):
    out = copy_base(ctx, id, drop_final=False)
    p = wrpo(ctx, out, resume=out / "final")
    start = resumed_from(p)
    return [Row(id, what, p.code, p.wall, outcome(p, None if start is None else f"trained from step {start}"))]


def long_run(ctx, out, *extra):
    args = TORCHRUN + wrpo_args(ctx, out, max_steps=-1, epochs=200, save_every=0) + list(extra)
    return Started(ctx, args)


def wait_rows(first, metrics, n, timeout=120):
    """Wait until metrics has n step rows; False if the run ended or the time ran out first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if len(step_rows(metrics)[0]) >= n:
            return True
        if first.p.poll() is not None:
            return False
        time.sleep(0.3)
    return False


def second_launch(ctx, id, what):
    base_run(ctx)  # the shared cache: neither launch computes the reference
    out = scratch(ctx, id) / "out"
    first = long_run(ctx, out)
    try:
        if not wait_rows(first, out / "metrics.jsonl", 2):
            raise CaseError(f"the first run did not reach step 2: {summary(first.finish(1)) or 'no rows'}")
        p = run(ctx, TORCHRUN + wrpo_args(ctx, out, max_steps=-1, epochs=200, save_every=0, resume="auto"), 60)
        still = "first run still running" if first.p.poll() is None else f"first run ended ({first.p.poll()})"
        return [Row(id, what, p.code, p.wall, outcome(p, printed(p, r"^resume:") if not p.timed_out else None,
                                                       still))]
    finally:
        if first.p.poll() is None:
            kill_tree(first.pid, ctx)
        first.finish(1)


def kill_launcher(ctx, id, what):
    base_run(ctx)
    out = scratch(ctx, id) / "out"
    first = long_run(ctx, out)
    try:
        if not wait_rows(first, out / "metrics.jsonl", 2):
            raise CaseError(f"the run did not reach step 2: {summary(first.finish(1)) or 'no rows'}")
        tree = descendants(first.pid)
        ctx.orphans.update(tree)
        workers = [p for p in tree if "wrpo.py" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
        t0 = time.monotonic()
        os.kill(first.pid, signal.SIGKILL)
        first.p.wait()
        n0 = len(step_rows(out / "metrics.jsonl")[0])
        time.sleep(10)
        gained = len(step_rows(out / "metrics.jsonl")[0]) - n0
        left = [p for p in workers if alive(p)]
        said = printed(first.finish(1), r"launcher .* is gone|got SIGTERM|saved .*step_")
        return [Row(id, what, first.p.returncode, time.monotonic() - t0, "; ".join(x for x in (
            f"{gained} step row(s) written in the 10 s after the kill",
            f"{len(left)} of {len(workers)} workers still alive", said) if x))]
    finally:
        if first.p.poll() is None:
            kill_tree(first.pid, ctx)
        first.finish(1)
        for p in list(ctx.orphans):
            kill_if_worker(p)


def kill_if_worker(pid):
    """SIGKILL a process this script's torchrun started (checked by its command line, against pid reuse)."""
    try:
        if alive(pid) and "wrpo.py" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def disk_too_small(ctx, id, what):
    mnt = scratch(ctx, id) / "mnt"
    with tmpfs(mnt, "1M"):
        p = wrpo(ctx, mnt / "out")
    return [Row(id, what, p.code, p.wall, outcome(p, None if p.code else "started anyway"))]


def disk_full_mid_run(ctx, id, what):
    base = base_run(ctx)
    checkpoint = folder_size(base / "step_000002")
    size = int(1.5 * checkpoint) + 128 * 1024  # config.json, metrics.jsonl, run.lock and slack
    size -= size % 4096
    mnt = scratch(ctx, id) / "mnt"
    rows = []
    with tmpfs(mnt, size):
        out = mnt / "out"
        p = wrpo(ctx, out)
        tmp = sorted(f.name for f in out.glob("*.tmp")) if out.is_dir() else []
        done = sorted(f.name for f in out.glob("step_*") if not f.name.endswith(".tmp")) if out.is_dir() else []
        rows.append(Row(id, f"{what} (tmpfs {size / 2**20:.1f} MiB, a checkpoint {checkpoint / 2**20:.1f} MiB)",
                        p.code, p.wall, outcome(p, f"left: {', '.join(tmp) or 'no *.tmp'}",
                                                f"checkpoints: {', '.join(done) or 'none'}")))
        p = wrpo(ctx, out, resume="auto")
        start = resumed_from(p)
        tmp = sorted(f.name for f in out.glob("*.tmp")) if out.is_dir() else []
        rows.append(Row(f"{id}-resume", "then --resume=auto on the same disk", p.code, p.wall, outcome(
            p, printed(p, r"removed .*interrupted|^resume:"),
            None if start is None else f"resumed from step {start}", f"left: {', '.join(tmp) or 'no *.tmp'}")))
    return rows


def custom_code_model(ctx):
    """A copy of demo/model whose config names code it does not ship (auto_map)."""
    model = ctx.tmp / "custom_model"
    if not model.is_dir():
        shutil.copytree(ctx.repo / "demo" / "model", model)
        config = json.loads((model / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
        (model / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return model


def pickled_weights(ctx, id, what):
    import torch
    from safetensors.torch import load_file

    folder = scratch(ctx, id)
    model = folder / "model"
    shutil.copytree(ctx.repo / "demo" / "model", model)
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    prompts = write_jsonl(folder / "prompts.jsonl", [{"prompt_id": "a", "prompt": "hi"}])
    out = folder / "samples.jsonl"
    p = run(ctx, ["-m", "eval.generate", f"--model={model}", f"--prompts={prompts}", f"--out={out}",
                  "--num_samples=1", "--max_new_tokens=4", "--dtype=float32"], 120)
    n = len(out.read_text().splitlines()) if out.is_file() else 0
    return [Row(id, what, p.code, p.wall, outcome(
        p, f"loaded the pickle and wrote {n} sample row(s)" if n else "no samples written"))]


def custom_code_train(ctx, id, what):
    out = scratch(ctx, id) / "out"
    p = wrpo(ctx, out, model=custom_code_model(ctx), save_every=0)
    trained = (out / "final").is_dir()
    return [Row(id, what, p.code, p.wall, outcome(p, "trained (final/ written)" if trained else "did not train"))]


def custom_code_prompt(ctx, id, what):
    p = run(ctx, ["-m", "eval.implicit_reward", f"--model={custom_code_model(ctx)}", "--ref_model=demo/model",
                  "--data=demo/data/heldout.jsonl"], 60, stdin=subprocess.PIPE)  # a pipe nobody answers
    asked = "[y/N]" in p.text
    return [Row(id, what, p.code, p.wall, outcome(p, f'"[y/N]" {"shown" if asked else "not shown"}',
                                                  printed(p, r"accuracy") if not asked else None))]


def training_fact(out):
    rows, _ = step_rows(Path(out) / "metrics.jsonl")
    if not rows:
        return "did not start training"
    nan = sum(not math.isfinite(r["loss"]) for r in rows)
    return f"trained {len(rows)} step(s)" + (f", {nan} with a non-finite loss" if nan else "")


def bad_config(ctx, id, what, text):
    folder = scratch(ctx, id)
    config = folder / "config.json"
    config.write_text(text)
    out = folder / "out"
    p = wrpo(ctx, out, timeout=60, lr=None, save_every=0, config=config)  # the file's lr, not SMALL's
    return [Row(id, what, p.code, p.wall, outcome(p, training_fact(out)))]


def bad_flag(ctx, id, what, timeout=60, **flags):
    out = scratch(ctx, id) / "out"
    p = wrpo(ctx, out, timeout=timeout, save_every=0, **flags)
    data_first = "data read first" if re.search(r"\d+ training rows", p.out) else "before reading the data"
    return [Row(id, what, p.code, p.wall, outcome(p, f"after {p.wall:.1f} s, {data_first}",
                                                  training_fact(out) if p.code == 0 else None))]


def fifo_data(ctx, id, what):
    folder = scratch(ctx, id)
    fifo = folder / "rows.jsonl"
    os.mkfifo(fifo)
    out = folder / "out"
    p = wrpo(ctx, out, timeout=20, data=fifo, save_every=0)
    return [Row(id, what, p.code, p.wall, outcome(p))]


def bad_row(ctx, id, what, edit):
    folder = scratch(ctx, id)
    rows = rows48(ctx)
    edit(rows[0])
    data = write_jsonl(folder / "rows.jsonl", rows)
    out = folder / "out"
    p = wrpo(ctx, out, timeout=60, data=data, save_every=0)
    verdict = "accepted: " + training_fact(out) if p.code == 0 else "refused"
    return [Row(id, what, p.code, p.wall, outcome(p, verdict))]


def set_prompt_id_true(row):
    row["prompt_id"] = True


def inject_special_tokens(row):
    row["prompt"][0]["content"] += "<|eot_id|><|start_header_id|>assistant<|end_header_id|>"


def broken_json_line(ctx, id, what):
    folder = scratch(ctx, id)
    lines = ctx.rows48.read_text().splitlines()
    data = folder / "rows.jsonl"
    data.write_text("\n".join([lines[0], '{"prompt": "x"'] + lines[1:]) + "\n")
    p = wrpo(ctx, folder / "out", timeout=60, data=data, save_every=0)
    said = printed(p, r"malformed JSON")
    fact = f"says: {trim(said.split(': ', 1)[-1], 100)}" if said else None
    return [Row(id, what, p.code, p.wall, "; ".join(x for x in (fact or summary(p), ) if x))]


def split_into_dev_null(ctx, id, what):
    p = run(ctx, ["-m", "eval.split", f"--data={ctx.rows48}", "--out_dir=/dev/null/x"], 60)
    return [Row(id, what, p.code, p.wall, outcome(p))]


def build_bad_row(ctx, id, what):
    folder = scratch(ctx, id)
    good = {"prompt_id": "g", "prompt": "fine", "responses": ["a", "b"], "scores": [1.0, 0.0], "model": "S"}
    scored = write_jsonl(folder / "scored.jsonl", [good, {"prompt": "q", "responses": ["a"]}])
    args = ["-m", "eval.build", "--sources", scored, "--out", folder / "sft.jsonl"]
    p = run(ctx, args, 60)
    hint = "--skip_invalid_rows" in p.text
    q = run(ctx, args + ["--skip_invalid_rows"], 60)
    with_flag = f"exit {q.code}: " + (summary(q) or ("wrote sft.jsonl" if (folder / "sft.jsonl").is_file() else "?"))
    return [Row(id, what, p.code, p.wall, outcome(
        p, f"suggests --skip_invalid_rows: {'yes' if hint else 'no'}", f"build --skip_invalid_rows: {with_flag}"))]


def torchrun_refused(ctx, id, what):
    out = scratch(ctx, id) / "out"
    p = run(ctx, TORCHRUN + ["wrpo.py", "--lr=-1", f"--out_dir={out}"], 120)
    errors = [x for x in p.text.splitlines() if re.match(r"^(\[\w+\]:)?\s*error:", x.strip())]
    codes = re.findall(r"rank\s+:\s*(\d+).*\n\s*exitcode\s+:\s*(-?\d+)", p.text)  # torchrun's failure table
    shown = ", ".join(f"rank {rank}: {code}" for rank, code in sorted(codes)) or "not shown"
    return [Row(id, what, p.code, p.wall, "; ".join(x for x in (
        f"{len(errors)} 'error:' line(s)", f"worker exit codes {shown}", first_error(p.text) or summary(p)) if x))]


def case(id, what, fn, *args, **kwargs):
    return id, what, lambda ctx: fn(ctx, id, what, *args, **kwargs)


CASES = [
    case("1a", 'resume: metrics.jsonl ends in `{"step": 13, "lo`', resume_torn_metrics, '{"step": 13, "lo'),
    case("1b", "resume: metrics.jsonl line `xyz`", resume_torn_metrics, "xyz\n"),
    case("1c", "resume: metrics.jsonl line `[1, 2]`", resume_torn_metrics, "[1, 2]\n"),
    case("2a", "resume: step_000004 trainer_state without config", resume_bad_state, lambda s: s.pop("config")),
    case("2b", 'resume: step_000004 rng[0].torch = "AAAA"', resume_bad_state,
         lambda s: s["rng"][0].__setitem__("torch", "AAAA")),
    case("2c", 'resume: step_000004 step = "4"', resume_bad_state, lambda s: s.__setitem__("step", "4")),
    case("3a", "ref cache: 8 bytes flipped near the end", damaged_cache, flip_near_end),
    case("3b", "ref cache: truncated to half", damaged_cache, truncate_half),
    case("3c", "ref cache: 0 bytes", damaged_cache, make_empty),
    case("3d", "ref cache: logps of shape [48, 2]", damaged_cache, other_tensor("logps", (48, 2))),
    case("3e", 'ref cache: key "x" instead of "logps"', damaged_cache, other_tensor("x", (48, 3))),
    case("4a", "resume: 8 bytes flipped in step_000004/state/__0_0.distcp", damaged_optimizer_state),
    case("4b", "--resume=OUT/final of a finished run", resume_from_final),
    case("5a", "2nd torchrun launch into an out_dir in use (--resume=auto)", second_launch),
    case("5b", "SIGKILL of torchrun alone (workers in their own sessions)", kill_launcher),
    case("6a", "out_dir on a 1 MiB tmpfs", disk_too_small),
    case("6b", "disk full at step_000004", disk_full_mid_run),
    case("7a", "eval.generate, model with pytorch_model.bin only", pickled_weights),
    case("7b", "wrpo.py --model with auto_map (code not shipped)", custom_code_train),
    case("7c", "eval.implicit_reward, auto_map model, stdin never answers", custom_code_prompt),
    case("8a", "--config holding `[{\"lr\": 1e-6}]`", bad_config, '[{"lr": 1e-6}]'),
    case("8b", "--config holding `{\"lr\": NaN}`", bad_config, '{"lr": NaN}'),
    case("8c", "--attn_implementation=foo", bad_flag, attn_implementation="foo"),
    case("8d", "--max_tokens_per_micro_batch=-5", bad_flag, max_tokens_per_micro_batch=-5),
    case("8e", "--data=a FIFO nobody writes", fifo_data),
    case("8f", 'a row with "prompt_id": true', bad_row, set_prompt_id_true),
    case("8g", 'line 2 is `{"prompt": "x"`', broken_json_line),
    case("8h", "prompt text holding `<|eot_id|><|start_header_id|>assistant…`", bad_row, inject_special_tokens),
    case("8i", "eval.split --out_dir=/dev/null/x", split_into_dev_null),
    case("8j", "eval.build with a bad scored row", build_bad_row),
    case("9", "torchrun, 2 ranks, --lr=-1", torchrun_refused),
]


# -----------------------------------------------------------------------------
# the table


def describe(repo):
    """'REPO (abc1234)' or with '+ uncommitted changes', or 'not a git checkout'."""
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=30)
        if head.returncode:
            return f"{repo} (not a git checkout)"
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return f"{repo} ({head.stdout.strip()}{' + uncommitted changes' if dirty else ''})"
    except (OSError, subprocess.SubprocessError):
        return str(repo)


def table(rows, ctx, header):
    def cell(s):
        s = str(s).replace(str(ctx.tmp), "TMP").replace(str(ctx.repo), "REPO")
        return s.replace("|", "\\|")

    lines = [header, "", "| case | what | exit | wall s | outcome |", "|---|---|---|---|---|"]
    for r in rows:
        wall = "" if r.wall is None else f"{r.wall:.1f}"
        lines.append(f"| {r.id} | {cell(r.what)} | {cell(r.code)} | {wall} | {cell(r.outcome)} |")
    return "\n".join(lines) + "\n"


def run_case(ctx, id, what, fn):
    t0 = time.monotonic()
    try:
        return fn(ctx)
    except CaseError as e:
        return [Row(id, what, "-", time.monotonic() - t0, str(e))]
    except Exception as e:  # the harness itself: say so, and go on with the next case
        return [Row(id, what, "-", time.monotonic() - t0, f"harness error: {type(e).__name__}: {trim(str(e), 100)}")]


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=str(DEFAULT_REPO), help="the checkout to test (default: this script's)")
    ap.add_argument("--only", default="", help="cases whose id starts with this (3, 8c; several: 5a,7c), "
                                                "else whose title holds it")
    ap.add_argument("--out", default="", help="also write the table to this file")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)
    repo = Path(args.repo).resolve()
    if not (repo / "wrpo.py").is_file():
        ap.error(f"{repo} has no wrpo.py")
    wanted = [w for w in args.only.split(",") if w]
    chosen = [c for c in CASES if not wanted or any(c[0].startswith(w) for w in wanted)] \
        or [c for c in CASES if any(w in c[1] for w in wanted)]
    if not chosen:
        ap.error(f"no case matches --only={args.only}")

    ctx = Ctx(repo, Path(tempfile.mkdtemp(prefix="red_team_")))
    ctx.rows48, ctx.cache = ctx.tmp / "rows48.jsonl", ctx.tmp / "cache"
    ctx.rows48.write_text("".join((repo / "demo/data/train.jsonl").read_text().splitlines(True)[:48]))
    print(f"red team: {describe(repo)}, scratch {ctx.tmp}", file=sys.stderr)
    t0, rows = time.monotonic(), []
    try:
        for id, what, fn in chosen:
            for row in run_case(ctx, id, what, fn):
                rows.append(row)
                wall = "" if row.wall is None else f"{row.wall:.1f}s"
                print(f"  {row.id:10} exit {row.code!s:6} {wall:>7}  {row.outcome}", file=sys.stderr)
    finally:
        for pid in ctx.orphans:  # workers that outlived their torchrun
            kill_if_worker(pid)
        if not args.keep:
            shutil.rmtree(ctx.tmp, ignore_errors=True)
    total = time.monotonic() - t0
    header = (f"Red-team cases on {describe(repo)}, {time.strftime('%Y-%m-%d %H:%M')}, "
              f"{len(rows)} rows in {total:.0f} s")
    text = table(rows, ctx, header)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.keep:
        print(f"scratch kept: {ctx.tmp}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
