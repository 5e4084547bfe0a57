"""The outside red team's failure cases, reproduced against one checkout: one markdown table.

    python benchmarks/red_team.py                       # the checkout holding this script
    python benchmarks/red_team.py --repo=/tmp/before    # another checkout (e.g. a worktree of an older commit)
    python benchmarks/red_team.py --only=3 --out=red_team.md --keep

--only runs some cases: ids or their start (--only=3, --only=5a,8c; --only=1 is 1a-1c, not 10a-16f), else a
substring of the titles (--only=cache); --out also writes the table to a file;
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
Round 3 (issue 22; the judge's endpoint is a local HTTP server in a thread of this script):
  10 inputs destroyed: 10a-10c wrpo.py --overwrite=true with the model or reference inside OUT (final/,
     step_000004), 10d the same with sft.py: deleted?; 10e-10g an eval output that is its input (judge,
     implicit_reward, generate): overwritten?; 10h eval.split into its own input folder, twice: rows read
  11 silent mix-ups: 11a resume after another model was copied over M's weights (losses of steps 5-6 against
     the uninterrupted run's); 11b eval.build, one prompt_id for two prompts (y_ws); 11c eval.generate's resume,
     two models sharing a basename; 11d a token cache copied over another's name (whose rows train); 11e a data
     folder of a.jsonl and b.JSONL (rows trained); 11f sft.py resumed with another --eval_data ("before")
  12 the out_dir lock bypassed: rm OUT/run.lock under a 2-rank run, then --resume=auto into OUT: does it start,
     where do the first run's rows go, is there a run.lock once the first run stops?
  13 unbounded or hanging: 13a a huge judge reply (peak RSS, cache size); 13b-13d a FIFO as the input of
     eval.judge, eval.plot, eval.answers
  14 pickled weights through model.safetensors.index.json: 14a eval.generate, 14b a hostile pickle (did its
     code run?), 14c eval.implicit_reward
  15 tracebacks: 15a-15c an attention or log-prob implementation the CPU lacks; 15d truncated weights in
     eval.generate; 15e-15h an output that is a folder (a file for plot's --out_dir): refused before the work?;
     15i the token cache truncated to 0 bytes under a 2-rank run (how the workers end); 15j, 15k SIGINT while
     wrpo.py reads 4,800 rows and while it computes their reference log-probs
  16 rough edges: 16a, 16b demo/wrpo.json on 8 and 4 ranks; 16c step_N.damaged and keep_last; 16d the model
     path spelled absolute on resume; 16e eval.plot of a torn metrics.jsonl; 16f a UTF-8 BOM in the data
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


def default_sigint():
    """In the child: SIGINT as a terminal's Ctrl-C finds it. A shell starts background jobs (`... &`) with SIGINT
    ignored, which their children inherit: the Ctrl-C cases would measure nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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

    def __init__(self, ctx, args, stdin=subprocess.DEVNULL, env=None):
        self.ctx, self.t0, self.result = ctx, time.monotonic(), None
        self.out, self.err = tempfile.TemporaryFile(dir=ctx.tmp), tempfile.TemporaryFile(dir=ctx.tmp)
        self.p = subprocess.Popen([sys.executable, *map(str, args)], cwd=ctx.repo, env={**env_for(ctx.repo),
                                  **(env or {})}, stdin=stdin, stdout=self.out, stderr=self.err, start_new_session=True,
                                  preexec_fn=default_sigint)

    @property
    def pid(self):
        return self.p.pid

    def so_far(self):
        """What it has printed until now, stdout then stderr."""
        if self.result is not None:
            return self.result.text
        return "\n".join(os.pread(f.fileno(), 1 << 24, 0).decode("utf-8", "replace") for f in (self.out, self.err))

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


def run(ctx, args, timeout, stdin=subprocess.DEVNULL, env=None):
    return Started(ctx, args, stdin, env).finish(timeout)


# -----------------------------------------------------------------------------
# what a command said


def trim(s, n=MAX_OUTCOME):
    s = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", s).split())  # (without a terminal's colour codes)
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


# -----------------------------------------------------------------------------
# round 3 (issue 22): inputs destroyed, silent mix-ups, the lock, unbounded input, pickles through an index,
# tracebacks, rough edges


def sft_args(ctx, out_dir, **over):
    """sft.py with the small settings (SMALL less the WRPO-only keys) on the same 48 rows."""
    settings = {"data": ctx.rows48, **SMALL, "max_prompt_length": None, "out_dir": out_dir, **over}
    return ["sft.py"] + [f"--{k}={v}" for k, v in settings.items() if v is not None]


def fate(path, before):
    """What became of the file `path`, whose bytes were `before`: unchanged, overwritten or gone."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} gone"
    now = path.read_bytes()
    return f"{path.name} unchanged" if now == before else \
        f"{path.name} overwritten ({len(before)} -> {len(now)} bytes, input lost)"


def heldout_rows(ctx, path, rows=slice(0, 8)):
    """Some held-out WRPO rows of the demo, as a .jsonl file."""
    lines = (ctx.repo / "demo/data/heldout.jsonl").read_text().splitlines(True)[rows]
    path.write_text("".join(lines))
    return path


def prompt_rows(path, n=4):
    return write_jsonl(path, [{"prompt_id": f"q{i}", "prompt": f"Say the number {i}."} for i in range(n)])


def generate_args(model, prompts, out):
    return ["-m", "eval.generate", f"--model={model}", f"--prompts={prompts}", f"--out={out}", "--num_samples=1",
            "--temperature=0", "--max_new_tokens=8", "--dtype=float32"]


def implicit_reward_args(model, data, *extra):
    return ["-m", "eval.implicit_reward", f"--model={model}", "--ref_model=demo/model", f"--data={data}",
            "--dtype=float32", "--max_length=128", "--max_prompt_length=96", *extra]


class FakeJudge:
    """An OpenAI-style chat-completions endpoint on 127.0.0.1, served by a thread of this process: every POST is
    answered with one completion, "[[A]]" after `pad` bytes of filler; calls counts them."""

    def __init__(self, pad=0):
        self.body = b'{"choices": [{"message": {"role": "assistant", "content": "' + b"x" * pad + b' [[A]]"}}]}'
        self.calls = 0

    def __enter__(self):
        import http.server
        import threading

        judge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                judge.calls += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(judge.body)))
                self.end_headers()
                try:
                    view = memoryview(judge.body)
                    for i in range(0, len(view), 1 << 20):
                        self.wfile.write(view[i : i + (1 << 20)])
                except OSError:
                    pass  # the client went away

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


JUDGE_ENV = {"OPENAI_API_KEY": "red-team", "no_proxy": "*", "NO_PROXY": "*"}


def answer_files(folder, n=1):
    """(A.json, B.json): AlpacaEval answer lists of the model and its baseline, n questions."""
    ours = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(n)]
    base = [{"instruction": f"Question {i}?", "output": f"Baseline {i}."} for i in range(n)]
    a, b = folder / "A.json", folder / "B.json"
    a.write_text(json.dumps(ours, indent=1) + "\n")
    b.write_text(json.dumps(base, indent=1) + "\n")
    return a, b


def judge_args(judge, answers, baseline, out, *extra):
    return ["-m", "eval.judge", "pairwise", f"--answers={answers}", f"--baseline={baseline}", f"--base_url={judge.url}",
            "--judge_model=fake", f"--out={out}", "--retries=0", "--workers=1", "--bootstrap=10", *extra]


# the command under a parent that reports its peak resident set (the high-water mark of its waited-for child)
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print(f'peak_rss_kib {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr); "
            "sys.exit(code if code >= 0 else 128 - code)")


def with_peak_rss(args):
    return ["-c", PEAK_RSS, sys.executable, *args]


def peak_rss_mib(p):
    m = re.search(r"peak_rss_kib (\d+)", p.err)
    return int(m.group(1)) / 1024 if m else None


def mib(path):
    return Path(path).stat().st_size / 2**20 if Path(path).is_file() else 0.0


# --- 10: inputs destroyed or overwritten

def overwrite_input(ctx, id, what, script, key, inside):
    """--overwrite=true into OUT, with the model (or reference) taken from inside OUT."""
    out = copy_base(ctx, id, drop_final=False)
    model = out / inside
    maker = wrpo_args if script == "wrpo.py" else sft_args
    p = run(ctx, maker(ctx, out, overwrite="true", **{key: model}), 120)
    kept = (model / "model.safetensors").is_file()
    return [Row(id, what, p.code, p.wall, outcome(p, f"OUT/{inside} {'intact' if kept else 'deleted'}"))]


def judge_over_answers(ctx, id, what):
    folder = scratch(ctx, id)
    a, b = answer_files(folder)
    before = a.read_bytes()
    with FakeJudge() as judge:
        p = run(ctx, judge_args(judge, a, b, a), 60, env=JUDGE_ENV)
    return [Row(id, what, p.code, p.wall, outcome(p, f"{judge.calls} judge call(s)", fate(a, before)))]


def reward_over_data(ctx, id, what):
    folder = scratch(ctx, id)
    d = heldout_rows(ctx, folder / "d.jsonl")
    before = d.read_bytes()
    p = run(ctx, implicit_reward_args("demo/model", d, f"--out={d}"), 120)
    return [Row(id, what, p.code, p.wall, outcome(p, fate(d, before)))]


def generate_over_prompts(ctx, id, what):
    folder = scratch(ctx, id)
    prompts = prompt_rows(folder / "P.jsonl")
    before = prompts.read_bytes()
    p = run(ctx, generate_args("demo/model", prompts, prompts), 120)
    said = printed(p, r"generated")
    made = re.search(r"\((\d+) generated", said or "")
    return [Row(id, what, p.code, p.wall, outcome(p, f"{made.group(1)} generated" if made else None,
                                                  fate(prompts, before)))]


def split_into_input(ctx, id, what):
    folder = scratch(ctx, id) / "D"
    folder.mkdir()
    shutil.copy(ctx.rows48, folder / "rows.jsonl")
    args = ["-m", "eval.split", f"--data={folder}", f"--out_dir={folder}"]
    first = run(ctx, args, 60)
    p = run(ctx, args + ["--overwrite"], 60)
    read = lambda q: (m := re.search(r"^(\d+) rows ->", q.out, re.MULTILINE)) and f"{m.group(1)} rows read"  # noqa: E731
    return [Row(id, what, p.code, p.wall, outcome(
        p, f"1st run: exit {first.code}, {read(first) or summary(first) or '?'}",
        f"2nd run: {read(p) or 'nothing read'} (48 in the data)"))]


# --- 11: silent mix-ups

def model_replaced(ctx, id, what):
    """Train --model=M for 6 steps, go back to step 4 (final/ removed), put another model's weights (same shape) in
    M, resume."""
    other = base_run(ctx) / "final" / "model.safetensors"  # the demo model after 6 steps: same shape, other weights
    folder = scratch(ctx, id)
    model = folder / "M"
    shutil.copytree(ctx.repo / "demo" / "model", model)
    out = folder / "out"
    first = wrpo(ctx, out, model=model)
    if first.code != 0:
        raise CaseError(f"the run from M failed: {summary(first)}")
    want = {r["step"]: r["loss"] for r in step_rows(out / "metrics.jsonl")[0]}
    shutil.rmtree(out / "final")  # --resume=auto takes step_000004
    shutil.copy(other, model / "model.safetensors")
    p = wrpo(ctx, out, model=model, resume="auto")
    got = {r["step"]: r["loss"] for r in step_rows(out / "metrics.jsonl")[0]}
    start = resumed_from(p)
    losses = lambda d: "/".join(f"{d[s]:.3f}" if s in d else "-" for s in (5, 6))  # noqa: E731
    return [Row(id, what, p.code, p.wall, outcome(
        p, None if start is None else f"resumed from step {start}; steps 5-6 loss {losses(got)} "
                                      f"(uninterrupted {losses(want)})"))]


def build_shared_prompt_id(ctx, id, what):
    folder = scratch(ctx, id)
    source = write_jsonl(folder / "source.jsonl", [
        {"prompt_id": "p1", "prompt": "Capital of France?", "responses": ["Paris."], "scores": [0.5], "model": "S"},
        {"prompt_id": "p1", "prompt": "Write a poem about cats.", "responses": ["Cats purr softly in the sun."],
         "scores": [0.9], "model": "S"}])
    target = write_jsonl(folder / "target.jsonl", [
        {"prompt_id": "p1", "prompt": "Capital of France?", "responses": ["Paris is the capital.", "London."],
         "scores": [0.8, 0.1], "model": "T"}])
    out = folder / "wrpo.jsonl"
    p = run(ctx, ["-m", "eval.build", "--sources", source, f"--target={target}", f"--out={out}"], 60)
    facts = []
    for row in (json.loads(x) for x in out.read_text().splitlines()) if out.is_file() else []:
        asked = row["prompt"][-1]["content"]
        facts.append(f"row for {asked!r} has y_ws {row['chosen'][0]['content']!r}")
    return [Row(id, what, p.code, p.wall, outcome(p, *facts))]


def generate_same_basename(ctx, id, what):
    folder = scratch(ctx, id)
    models = [folder / "org1" / "tiny", folder / "org2" / "tiny"]
    for m in models:
        shutil.copytree(ctx.repo / "demo" / "model", m)
    shutil.copy(base_run(ctx) / "final" / "model.safetensors", models[1] / "model.safetensors")  # other weights
    prompts = prompt_rows(folder / "prompts.jsonl")
    out = folder / "src" / "tiny.jsonl"  # the README's loop: --out=fusion/src/$(basename $M).jsonl
    first = run(ctx, generate_args(models[0], prompts, out), 120)
    if first.code != 0 or not out.is_file():
        raise CaseError(f"the first model's run failed: {summary(first)}")
    before = out.read_bytes()
    p = run(ctx, generate_args(models[1], prompts, out), 120)
    done = printed(p, r"already done")
    made = re.search(r"\((\d+) generated", p.out)
    kept = "the file keeps org1/tiny's samples" if out.read_bytes() == before else "samples replaced"
    return [Row(id, what, p.code, p.wall, outcome(
        p, trim(done, 60) if done else None, f"{made.group(1)} generated" if made else None, kept))]


def step1_rejected_logps(out):
    rows, _ = step_rows(Path(out) / "metrics.jsonl")
    return rows[0].get("logps/rejected") if rows else None


def token_cache_swapped(ctx, id, what):
    folder = scratch(ctx, id)
    tok = folder / "tokens"
    lines = (ctx.repo / "demo/data/train.jsonl").read_text().splitlines(True)
    a, b = folder / "a.jsonl", folder / "b.jsonl"
    a.write_text("".join(lines[:48]))
    b.write_text("".join(lines[48:96]))
    logps = {}
    for name, path in (("a", a), ("b", b)):
        q = wrpo(ctx, folder / f"out_{name}", data=path, data_cache_dir=tok, max_steps=1, save_every=0)
        if q.code != 0:
            raise CaseError(f"the run on {path.name} failed: {summary(q)}")
        logps[name] = step1_rejected_logps(folder / f"out_{name}")
    cache_a, cache_b = (next(tok.glob(f"{n}.jsonl.tokens-*.safetensors")) for n in ("a", "b"))
    shutil.copy(cache_b, cache_a)
    out = folder / "out"
    p = wrpo(ctx, out, data=a, data_cache_dir=tok, max_steps=1, save_every=0)
    got = step1_rejected_logps(out)
    refused = re.search(r"tokenized rows: the cache .* is damaged \((.*)\)", p.out)
    said = f"cache refused ({refused.group(1)})" if refused else \
        "cache used: " + re.sub(r" in [\d.]+s", "", printed(p, r"^data: ") or "?").replace(f"{folder}/", "")
    used = "b's rows" if got == logps["b"] else "a's rows" if got == logps["a"] else f"neither ({got})"
    return [Row(id, what, p.code, p.wall, outcome(p, said, f"trained on {used}"))]


def mixed_case_suffixes(ctx, id, what):
    folder = scratch(ctx, id)
    data = folder / "data"
    data.mkdir()
    lines = ctx.rows48.read_text().splitlines(True)
    (data / "a.jsonl").write_text("".join(lines[:24]))
    (data / "b.JSONL").write_text("".join(lines[24:]))
    p = wrpo(ctx, folder / "out", data=data, data_cache_dir=folder / "tokens", max_steps=1, save_every=0)
    m = re.search(r"^(\d+) training rows", p.out, re.MULTILINE)
    return [Row(id, what, p.code, p.wall, outcome(
        p, f"{m.group(1)} of 48 rows trained" if m else None,
        f"b.JSONL {'named' if 'b.JSONL' in p.text else 'never named'}"))]


def held_out_before(p):
    """The 'before' value of the closing 'held-out loss: X before -> Y after' line, else None."""
    m = re.search(r"held-out loss: ([\d.]+) before", p.out)
    return float(m.group(1)) if m else None


def sft_eval_data_changed(ctx, id, what):
    folder = scratch(ctx, id)
    e1, e2 = heldout_rows(ctx, folder / "e1.jsonl", slice(0, 16)), heldout_rows(ctx, folder / "e2.jsonl", slice(16, 32))
    out, small = folder / "out", dict(global_batch_size=2, micro_batch_size=1, data_cache_dir=folder / "tokens")
    first = run(ctx, sft_args(ctx, out, eval_data=e1, **small), 120)
    if first.code != 0 or not (out / "step_000004").is_dir():
        raise CaseError(f"the SFT run failed: {summary(first) or 'no step_000004'}")
    shutil.rmtree(out / "final")  # --resume=auto takes step_000004
    truth = run(ctx, sft_args(ctx, folder / "fresh", eval_data=e2, max_steps=1, save_every=0, **small), 120)
    p = run(ctx, sft_args(ctx, out, eval_data=e2, resume="auto", **small), 120)
    start = resumed_from(p)
    return [Row(id, what, p.code, p.wall, outcome(
        p, None if start is None else f"resumed from step {start}",
        f"'before' shown {held_out_before(p)}; the old set's {held_out_before(first)}, the new set's "
        f"{held_out_before(truth) if truth.code == 0 else 'unknown'}"))]


# --- 12: the out_dir lock

def writers_of(pids, path):
    """[(pid, fd link)] of the processes holding `path` open (a deleted file reads 'PATH (deleted)')."""
    found = []
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith(str(path)):
                    found.append((pid, fd, link))
        except OSError:
            continue
    return found


def lock_bypassed(ctx, id, what):
    """While a 2-rank run trains into OUT: rm OUT/run.lock, launch --resume=auto into OUT, then stop the first run."""
    base_run(ctx)
    out = scratch(ctx, id) / "out"
    metrics = out / "metrics.jsonl"
    first = long_run(ctx, out, "--save_every=10")  # (keep_last=0: no checkpoint pruned under the 2nd run's load)
    second = None
    try:
        if not wait_rows(first, metrics, 12) or not (out / "step_000010").is_dir():
            raise CaseError(f"the first run did not reach step 12: {summary(first.finish(1)) or 'no rows'}")
        (out / "run.lock").unlink()
        second = Started(ctx, TORCHRUN + wrpo_args(ctx, out, max_steps=-1, epochs=200, save_every=10, resume="auto"))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120 and second.p.poll() is None and "resumed from" not in second.so_far():
            time.sleep(0.3)
        said = second.so_far()
        if second.p.poll() is not None or "resumed from" not in said:
            p = second.finish(1)
            return [Row(id, what, p.code, p.wall, outcome(p, "2nd run did not start"))]
        m = re.search(r"resumed from \S+ at step (\d+)", said)
        start = int(m.group(1)) if m else 0
        workers = [q for q in descendants(first.pid) if "wrpo.py" in Path(f"/proc/{q}/cmdline").read_bytes().decode(
            errors="replace")]
        t0, deleted = time.monotonic(), []
        while time.monotonic() - t0 < 30 and not deleted and first.p.poll() is None and second.p.poll() is None:
            time.sleep(1)  # both train into OUT, until the 2nd has replaced metrics.jsonl (or 30 s)
            deleted = [(q, fd) for q, fd, link in writers_of(workers, metrics) if link.endswith("(deleted)")]
        lost = [r["step"] for r in step_rows(f"/proc/{deleted[0][0]}/fd/{deleted[0][1]}")[0] if r["step"] > start] \
            if deleted else []
        ended = first.p.poll() is not None  # (the 2nd run may have removed its save in progress, or set it aside)
        if not ended:
            os.kill(first.pid, signal.SIGTERM)  # the first run saves and stops; its exit releases "its" lock
        f = first.finish(90)
        how = f"had ended by itself (exit {f.code}: {summary(f) or 'no message'})" if ended else \
            f"stopped by SIGTERM (torchrun exit {f.code})"
        lock = "present" if (out / "run.lock").exists() else "gone"
        code = "running" if second.p.poll() is None else second.p.poll()
        return [Row(id, what, code, time.monotonic() - second.t0, "; ".join(x for x in (
            f"2nd run started: resumed from step {start} of the live run",
            f"the 1st run writes to a deleted metrics.jsonl: its rows past step {start} ({len(lost)}) lost" if deleted
            else None if ended else "the 1st run still writes OUT/metrics.jsonl",
            f"1st run {how}: run.lock {lock}, "
            f"2nd run {'still running' if code == 'running' else 'ended'}") if x))]
    finally:
        for started in (first, second):
            if started is not None:
                if started.p.poll() is None:
                    kill_tree(started.pid, ctx)
                started.finish(1)


# --- 13: unbounded or hanging

HUGE_REPLY_MB = 400


def judge_huge_reply(ctx, id, what):
    folder = scratch(ctx, id)
    a, b = answer_files(folder)
    out = folder / "judged.json"
    with FakeJudge(pad=HUGE_REPLY_MB * 2**20) as judge:
        p = run(ctx, with_peak_rss(judge_args(judge, a, b, out)), 300, env=JUDGE_ENV)
    cache = folder / "judged.json.cache.jsonl"
    rss = peak_rss_mib(p)
    return [Row(id, f"{what} ({HUGE_REPLY_MB} MB reply, 1 question: 2 calls)", p.code, p.wall, outcome(
        p, f"{judge.calls} call(s) answered", f"peak RSS {rss:.0f} MiB" if rss else None,
        f"cache {mib(cache):.0f} MiB", f"result {'written' if out.is_file() else 'not written'}"))]


def fifo_input(ctx, id, what, make_args, timeout=30):
    folder = scratch(ctx, id)
    fifo = folder / "fifo"
    os.mkfifo(fifo)
    with FakeJudge() as judge:
        p = run(ctx, make_args(folder, fifo, judge), timeout, env=JUDGE_ENV)
    verdict = f"blocked until the timeout ({timeout} s)" if p.timed_out else "refused" if p.code else "exit 0"
    return [Row(id, what, p.code, p.wall, "; ".join(x for x in (verdict, None if p.timed_out else summary(p)) if x))]


def judge_fifo_args(folder, fifo, judge):
    _, b = answer_files(folder)
    return judge_args(judge, fifo, b, folder / "judged.json")


def plot_fifo_args(folder, fifo, judge):
    return ["-m", "eval.plot", fifo, f"--out_dir={folder / 'plots'}"]


def answers_fifo_args(folder, fifo, judge):
    return ["-m", "eval.answers", "mtbench", "--model=demo/model", f"--questions={fifo}",
            f"--out={folder / 'answers.jsonl'}", "--dtype=float32", "--max_new_tokens=4"]


# --- 14: pickles through an index

class Hostile:
    """Unpickling this calls open(path, "w"): the file it creates shows that the pickle's code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def indexed_pickle(ctx, folder, marker=None):
    """A copy of demo/model whose model.safetensors.index.json maps every tensor to weights.bin, a torch.save file
    (of the weights, or with marker: of a Hostile object)."""
    import torch
    from safetensors.torch import load_file

    model = folder / "model"
    shutil.copytree(ctx.repo / "demo" / "model", model)
    weights = load_file(str(model / "model.safetensors"))
    torch.save(weights if marker is None else {k: Hostile(str(marker)) for k in weights}, model / "weights.bin")
    (model / "model.safetensors").unlink()
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
             "weight_map": {k: "weights.bin" for k in weights}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    return model


def generate_indexed_pickle(ctx, id, what, hostile=False):
    folder = scratch(ctx, id)
    marker = folder / "pickle-code-ran" if hostile else None
    model = indexed_pickle(ctx, folder, marker)
    out = folder / "samples.jsonl"
    p = run(ctx, generate_args(model, prompt_rows(folder / "prompts.jsonl"), out), 120)
    n = len(out.read_text().splitlines()) if out.is_file() else 0
    facts = [f"loaded the pickle, {n} sample row(s) written" if n else "no samples written"]
    if hostile:
        facts.append(f"its code {'ran' if marker.exists() else 'did not run'}")
    return [Row(id, what, p.code, p.wall, outcome(p, *facts))]


def reward_indexed_pickle(ctx, id, what):
    folder = scratch(ctx, id)
    model = indexed_pickle(ctx, folder)
    p = run(ctx, implicit_reward_args(model, heldout_rows(ctx, folder / "d.jsonl")), 120)
    return [Row(id, what, p.code, p.wall, outcome(p, printed(p, r"accuracy") if p.code == 0 else None))]


# --- 15: tracebacks where a one-line error belongs

def impl_unavailable(ctx, id, what, timeout=240, **flags):
    out = scratch(ctx, id) / "out"
    p = wrpo(ctx, out, timeout=timeout, max_steps=1, save_every=0, **flags)
    data_first = "after the data" if re.search(r"\d+ training rows", p.out) else "before the data"
    return [Row(id, what, p.code, p.wall, outcome(p, f"{data_first}, after {p.wall:.0f} s"))]


def generate_truncated_weights(ctx, id, what):
    folder = scratch(ctx, id)
    model = folder / "model"
    shutil.copytree(ctx.repo / "demo" / "model", model)
    truncate_half(model / "model.safetensors")
    p = run(ctx, generate_args(model, prompt_rows(folder / "prompts.jsonl"), folder / "samples.jsonl"), 120)
    return [Row(id, what, p.code, p.wall, outcome(p))]


def stray_tmp(folder, name):
    return sorted(f.name for f in folder.glob(f"{name}*.tmp"))


def output_is_folder(ctx, id, what, script):
    folder = scratch(ctx, id)
    target = folder / "DIR"
    target.mkdir()
    with FakeJudge() as judge:
        if script == "generate":
            args = generate_args("demo/model", prompt_rows(folder / "prompts.jsonl"), target)
        elif script == "implicit_reward":
            args = implicit_reward_args("demo/model", heldout_rows(ctx, folder / "d.jsonl"), f"--out={target}")
        else:
            a, b = answer_files(folder, n=3)
            args = judge_args(judge, a, b, target)
        p = run(ctx, args, 120, env=JUDGE_ENV)
    work = f"{judge.calls} judge call(s) made" if script == "judge" else \
        printed(p, r"generated|accuracy") and "the work was done first"
    left = stray_tmp(folder, "DIR")
    return [Row(id, what, p.code, p.wall, outcome(p, work, f"left {', '.join(left)}" if left else None))]


def plot_into_file(ctx, id, what):
    folder = scratch(ctx, id)
    target = folder / "FILE"
    target.write_text("not a folder\n")
    p = run(ctx, ["-m", "eval.plot", base_run(ctx) / "metrics.jsonl", f"--out_dir={target}"], 60)
    return [Row(id, what, p.code, p.wall, outcome(p))]


def torchrun_failures(p):
    """'rank R: exitcode C (SIGNAME)' from torchrun's failure table, or None."""
    found = re.findall(r"rank\s+:\s*(\d+).*?\n\s*exitcode\s+:\s*(-?\d+)", p.text, re.DOTALL)
    if not found:
        return None
    name = lambda c: f" ({signal.Signals(-int(c)).name})" if int(c) < 0 else ""  # noqa: E731
    return ", ".join(f"rank {r}: exitcode {c}{name(c)}" for r, c in sorted(set(found)))


def token_cache_truncated(ctx, id, what):
    """A 2-rank run of 60 steps reads its token cache; the file is truncated to 0 bytes under it after step 2."""
    base_run(ctx)
    folder = scratch(ctx, id)
    tok, out = folder / "tokens", folder / "out"
    started = Started(ctx, TORCHRUN + wrpo_args(ctx, out, max_steps=60, save_every=0, log_every=1) +
                      [f"--data_cache_dir={tok}"])  # minutes of steps on 2 cores; a SIGBUS comes within one
    try:
        if not wait_rows(started, out / "metrics.jsonl", 2):
            raise CaseError(f"the run did not reach step 2: {summary(started.finish(1)) or 'no rows'}")
        files = sorted(tok.glob("*.tokens-*.safetensors"))
        if not files:
            raise CaseError(f"no token cache in {tok}")
        os.truncate(files[0], 0)
        p = started.finish(90)
    finally:
        if started.p.poll() is None:
            kill_tree(started.pid, ctx)
        started.finish(1)
    messages = [x for x in p.text.splitlines() if re.search(r"^(\[\w+\]:)?\s*error:", x.strip())]
    saved = sorted(f.name for f in out.glob("step_*"))
    steps = len(step_rows(out / "metrics.jsonl")[0])
    return [Row(id, what, p.code, p.wall, "; ".join(x for x in (
        "still training at the timeout" if p.timed_out else torchrun_failures(p) or f"exit {p.code}, {steps} steps",
        f"workers say: {trim(messages[0], 80)}" if messages else "no error: line from the workers",
        f"saved {', '.join(saved)}" if saved else "no save") if x))]


def big_data(ctx):
    """4,800 rows: the demo's 480 ten times, prompt_ids made unique; about 2.5 s to tokenize, 10 s of reference."""
    path = ctx.tmp / "rows4800.jsonl"
    if not path.exists():
        rows = [json.loads(x) for x in (ctx.repo / "demo/data/train.jsonl").read_text().splitlines()]
        write_jsonl(path, [{**r, "prompt_id": f"{r['prompt_id']}-{k}"} for k in range(10) for r in rows])
    return path


def holds_open(pid, path):
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def ctrl_c(ctx, id, what, during):
    """One `python wrpo.py` on 4,800 rows, SIGINT while it reads the data (the data file is open) or once the
    reference pass began (after the plan line)."""
    folder = scratch(ctx, id)
    data = big_data(ctx)
    started = Started(ctx, wrpo_args(ctx, folder / "out", data=data, data_cache_dir=folder / "tokens",
                                     ref_cache_dir=folder / "ref", max_steps=1, save_every=0))
    try:
        t0, sent = time.monotonic(), None
        while time.monotonic() - t0 < 120 and started.p.poll() is None:
            if during == "data" and holds_open(started.pid, data):
                sent = "while the data file was open"
            elif during == "reference" and re.search(r"\d+ training rows", started.so_far()):
                time.sleep(1)
                sent = "1 s into the reference pass"
            if sent:
                os.kill(started.pid, signal.SIGINT)
                break
            time.sleep(0.01)
        p = started.finish(60)
    finally:
        if started.p.poll() is None:
            kill_tree(started.pid, ctx)
        started.finish(1)
    if not sent:
        return [Row(id, what, p.code, p.wall, outcome(p, "no SIGINT sent: the moment never came"))]
    if during == "reference" and re.search(r"^reference log-probs", p.out, re.MULTILINE):
        sent += " (too late: the pass had ended)"
    if p.code == -signal.SIGINT:
        sent += ", died of it (a shell's 130)"
    tb = "Traceback printed" if "Traceback" in p.text else "no traceback"
    lines = [x for x in p.err.splitlines() if x.strip()]
    return [Row(id, what, p.code, p.wall, "; ".join(x for x in (
        f"SIGINT {sent}", tb, f"last line: {trim(lines[-1], 70)}" if lines else "nothing printed") if x))]


# --- 16: smaller rough edges

def demo_on_ranks(ctx, id, what, n):
    folder = scratch(ctx, id)
    args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "wrpo.py",
            "--config=demo/wrpo.json", "--max_steps=2", "--save_every=0", f"--out_dir={folder / 'out'}",
            f"--data_cache_dir={folder / 'tokens'}", f"--ref_cache_dir={folder / 'ref'}"]
    p = run(ctx, args, 480)
    rows, _ = step_rows(folder / "out" / "metrics.jsonl")
    trained = [r for r in rows if "lr" in r]
    if trained:
        fact = f"trained {len(trained)} steps (step-{trained[-1]['step']} loss {trained[-1]['loss']:.4f})"
    elif p.code not in (0, "killed"):  # (rank 0 may be stopped by torchrun before its message is out)
        fact = "refused; " + (first_error(p.text) or "no error: line, only torchrun's ChildFailedError")
    else:
        fact = summary(p)
    return [Row(id, what, p.code, p.wall, fact)]


def damaged_not_pruned(ctx, id, what):
    """step_000004 (the newest: the last step saves only final/) damaged, --resume=auto --keep_last=1: it is set aside
    as step_000004.damaged, the run resumes from step 2 and saves a new step_000004; is the .damaged one pruned?"""
    out = copy_base(ctx, id)
    shard = out / "step_000004" / "state" / "__0_0.distcp"
    flip_bytes(shard, shard.stat().st_size // 2)
    p = wrpo(ctx, out, resume="auto", keep_last=1)
    left = sorted(f.name for f in out.iterdir() if f.name.startswith("step_"))
    size = sum(folder_size(out / n) for n in left if n.endswith(".damaged")) / 2**20
    return [Row(id, what, p.code, p.wall, outcome(
        p, f"left with keep_last=1: {', '.join(left)}" + (f" (.damaged: {size:.1f} MiB kept)" if size else "")))]


def model_path_spelled_otherwise(ctx, id, what):
    out = copy_base(ctx, id)  # final/ removed: --resume=auto takes step_000004 (the last step saves only final/)
    p = wrpo(ctx, out, resume="auto", model=ctx.repo / "demo" / "model")  # the base run named it demo/model
    start = resumed_from(p)
    return [Row(id, what, p.code, p.wall, outcome(p, f"resumed from step {start}" if start is not None else None))]


def plot_torn_metrics(ctx, id, what):
    folder = scratch(ctx, id)
    metrics = folder / "metrics.jsonl"
    metrics.write_text((base_run(ctx) / "metrics.jsonl").read_text() + '{"step": 7, "lo')
    p = run(ctx, ["-m", "eval.plot", metrics, f"--out_dir={folder / 'plots'}"], 90)
    n = len(list((folder / "plots").glob("*.png"))) if (folder / "plots").is_dir() else 0
    return [Row(id, what, p.code, p.wall, outcome(p, f"{n} figures written"))]


def bom_data(ctx, id, what):
    folder = scratch(ctx, id)
    data = folder / "rows.jsonl"
    data.write_text("\ufeff" + ctx.rows48.read_text(), encoding="utf-8")
    out = folder / "out"
    p = wrpo(ctx, out, data=data, max_steps=1, save_every=0)
    return [Row(id, what, p.code, p.wall, outcome(p, "accepted: " + training_fact(out) if p.code == 0 else "refused"))]



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
    case("10a", "wrpo.py --out_dir=OUT --model=OUT/final --overwrite=true", overwrite_input, "wrpo.py", "model",
         "final"),
    case("10b", "wrpo.py --out_dir=OUT --ref_model=OUT/final --overwrite=true", overwrite_input, "wrpo.py",
         "ref_model", "final"),
    case("10c", "wrpo.py --out_dir=OUT --model=OUT/step_000004 --overwrite=true", overwrite_input, "wrpo.py", "model",
         "step_000004"),
    case("10d", "sft.py --out_dir=OUT --model=OUT/final --overwrite=true", overwrite_input, "sft.py", "model", "final"),
    case("10e", "eval.judge --answers=A.json --out=A.json", judge_over_answers),
    case("10f", "eval.implicit_reward --data=d.jsonl --out=d.jsonl", reward_over_data),
    case("10g", "eval.generate --prompts=P.jsonl --out=P.jsonl", generate_over_prompts),
    case("10h", "eval.split --data=D --out_dir=D, twice (2nd with --overwrite)", split_into_input),
    case("11a", "resume after another model (same shape) was copied over M/model.safetensors", model_replaced),
    case("11b", 'eval.build: prompt_id "p1" for two different prompts', build_shared_prompt_id),
    case("11c", "eval.generate, README loop: org1/tiny then org2/tiny into src/tiny.jsonl", generate_same_basename),
    case("11d", "token cache of b.jsonl copied over a.jsonl's cache name", token_cache_swapped),
    case("11e", "--data=a folder of a.jsonl (24 rows) and b.JSONL (24 rows)", mixed_case_suffixes),
    case("11f", "sft.py resumed with another --eval_data", sft_eval_data_changed),
    case("12", "2-rank run: rm OUT/run.lock, 2nd launch --resume=auto, then stop the 1st", lock_bypassed),
    case("13a", "eval.judge, a local endpoint answering a huge completion", judge_huge_reply),
    case("13b", "eval.judge --answers=FIFO", fifo_input, judge_fifo_args),
    case("13c", "eval.plot FIFO", fifo_input, plot_fifo_args),
    case("13d", "eval.answers mtbench --questions=FIFO", fifo_input, answers_fifo_args, timeout=60),
    case("14a", "eval.generate, index.json mapping tensors to a torch.save file", generate_indexed_pickle),
    case("14b", "eval.generate, index.json mapping tensors to a hostile pickle", generate_indexed_pickle, hostile=True),
    case("14c", "eval.implicit_reward, index.json mapping tensors to a torch.save file", reward_indexed_pickle),
    case("15a", "--attn_implementation=flash_attention_2 on CPU", impl_unavailable,
         attn_implementation="flash_attention_2"),
    case("15b", "--logps_impl=triton on CPU", impl_unavailable, logps_impl="triton"),
    case("15c", "--attn_implementation=flex_attention on CPU", impl_unavailable, attn_implementation="flex_attention"),
    case("15d", "eval.generate, model.safetensors truncated to half", generate_truncated_weights),
    case("15e", "eval.generate --out=DIR (an existing folder)", output_is_folder, "generate"),
    case("15f", "eval.implicit_reward --out=DIR (an existing folder)", output_is_folder, "implicit_reward"),
    case("15g", "eval.judge --out=DIR (an existing folder)", output_is_folder, "judge"),
    case("15h", "eval.plot --out_dir=FILE (an existing file)", plot_into_file),
    case("15i", "2-rank run: its token cache truncated to 0 bytes after step 2", token_cache_truncated),
    case("15j", "Ctrl-C (SIGINT) during data loading, python wrpo.py, 4,800 rows", ctrl_c, "data"),
    case("15k", "Ctrl-C (SIGINT) during the reference pass, python wrpo.py, 4,800 rows", ctrl_c, "reference"),
    case("16a", "torchrun --nproc_per_node=8 wrpo.py --config=demo/wrpo.json --max_steps=2", demo_on_ranks, 8),
    case("16b", "torchrun --nproc_per_node=4 wrpo.py --config=demo/wrpo.json --max_steps=2", demo_on_ranks, 4),
    case("16c", "resume past a damaged step_000004 with --keep_last=1: step_N.damaged pruned?", damaged_not_pruned),
    case("16d", "resume with --model=REPO/demo/model (the run named it demo/model)", model_path_spelled_otherwise),
    case("16e", "eval.plot of a metrics.jsonl whose last line is torn", plot_torn_metrics),
    case("16f", "a UTF-8 BOM at the start of the data file", bom_data),
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


def id_matches(id, wanted):
    """--only: the id itself or its variants (1 picks 1a-1c, not 10a-16f; 10 picks 10a-10h)."""
    return id.startswith(wanted) and not id[len(wanted):][:1].isdigit()


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
    chosen = [c for c in CASES if not wanted or any(id_matches(c[0], w) for w in wanted)] \
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
