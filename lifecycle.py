"""A run's life from start to exit: the checks before anything is read or written, the out_dir lock, what happens when
the launcher dies or a signal arrives, and the exit codes (cli): 0 done (or nothing left to do), 2 a user error
(settings, paths, data, a checkpoint that does not fit; one line from rank 0, no traceback), 3 a fault during the run
(a non-finite step, a save that failed), 128 + N stopped by signal N after saving a checkpoint."""

import atexit
import ctypes
import dataclasses
import fcntl
import functools
import importlib.util
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import attention
import data
from checkpoint import ResumeError, RunFinished, SaveError, find_resume, model_identity, remove_partial_saves, \
    step_checkpoints, write_atomic
from fsdp_utils import DTYPES, count_parameters, exit_process, init_distributed, loading_problem, print0, \
    resolve_model_path
from paths import path_clash
from training import ConfigError, TrainingError, config_problems, on_rank0


@dataclass
class Run:
    """One training run: this process's place in it, the folder it writes, and what it starts from."""

    rank: int
    world: int
    device: torch.device
    mesh: object
    out_dir: Path
    model_path: str  # resolved local folder of cfg.model
    tokenizer: object
    pad_id: int
    resume_from: Path = None  # the checkpoint this run continues from, if any
    attn: str = "sdpa"  # the attn_implementation the models are loaded with (cfg's "auto" made this model's)
    shared_prompt: bool = False  # whether a preference row's responses share one copy of its prompt
    varlen: bool = False  # whether packed batches carry the flash varlen layout (attention.use_varlen)
    settings: dict = None  # cfg as the run resolved it: what config.json and each train_config.json record
    models: dict = None  # {"model": its local folder, and each of other_models'}

    @functools.cached_property
    def weights(self):
        """{the keys of models: checkpoint.model_identity}: a resume refuses a model changed under its path. Read on
        first use (collective: every rank uses it at once), after the data checked: a few seconds for 8B weights."""
        identities = {p: model_identity(p) for p in sorted(set(self.models.values()))}  # (one read per folder)
        return {k: identities[p] for k, p in self.models.items()}


def start_run(cfg, problems=(), other_models=None):
    """Process group, settings, out_dir (locked), checkpoint to resume, models (cfg.model, other_models: {setting:
    model}), attention, tokenizer: every user error surfaces here in seconds, before data is read or a file written."""
    rank, world, device, mesh = init_distributed()
    exit_with_launcher()
    problems = list(problems) + config_problems(cfg, world) + unavailable(cfg, device)
    given = {"model": cfg.model, **(other_models or {})}  # {setting: the model it names}
    if clash := path_clash([cfg.out_dir], [*given.values(), cfg.data, cfg.eval_data]):  # (--overwrite deletes in it)
        problems.append(f"out_dir {clash}")
    if problems:
        raise ConfigError("bad config:\n  " + "\n  ".join(problems))
    out_dir = Path(cfg.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError("permission denied")
    except OSError as e:
        raise ConfigError(f"out_dir {out_dir} is not writable: {e}") from None
    lock_out_dir(out_dir)  # before anything in out_dir is read or changed: no second run writes beside this one
    resume_from = find_resume(cfg.resume, out_dir)
    if (out_dir / "metrics.jsonl").exists() and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"out_dir {out_dir} already holds a run; pass --resume=auto to continue it, another "
                          "--out_dir, or --overwrite=true to replace it")
    try:  # each model a local folder (a hub id's snapshot, downloaded once per node) that loads by the rules; a
        local = {m: resolve_model_path(m) for m in dict.fromkeys(given.values())}  # reference that is the model: once
    except OSError as e:
        raise ConfigError(f"model error: {e}") from None
    if problem := next(filter(None, (loading_problem(p, cfg.trust_remote_code) for p in local.values())), None):
        raise ConfigError(f"model error: {problem}")
    models = {k: local[m] for k, m in given.items()}
    model_path = models["model"]
    attn, shared_prompt, varlen = resolve_attention(cfg, model_path, device)
    on_rank0(lambda: remove_partial_saves(out_dir))  # never complete: their space is free for this run
    on_rank0(lambda: check_free_space(out_dir, model_path, cfg))  # rank 0 decides for all: one answer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # config.json records the attention that runs and whether prompts are shared; a resume compares what was asked
    settings = {**dataclasses.asdict(cfg), "attn_implementation": attn} | (
        {"shared_prompt": shared_prompt} if hasattr(cfg, "shared_prompt") else {})
    return Run(rank, world, device, mesh, out_dir, model_path, tokenizer, pad_id, resume_from, attn, shared_prompt,
               varlen, settings, models)


def unavailable(cfg, device):
    """The implementations asked for that cannot run here, each naming what can: caught at start, not as the model loads
    (flash_attention_2 on CPU), compiles (flex_attention has no CPU backward) or steps (triton without a GPU)."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available, is_triton_available

    problems, attn, here = [], cfg.attn_implementation, "a GPU" if device.type == "cuda" else device.type.upper()
    if device.type != "cuda" and attn not in ("auto", attention.NAME, "sdpa", "eager"):
        problems.append(f"attn_implementation {attn} does not run on {here}: use auto, {attention.NAME}, sdpa or eager")
    elif attn in ("flash_attention_2", "flash_attention_3") and not importlib.util.find_spec("kernels") and not (
            is_flash_attn_2_available() if attn == "flash_attention_2" else is_flash_attn_3_available()):
        problems.append(f"attn_implementation {attn}: neither its package (flash-attn) nor `kernels` (the hub's "
                        f"build) is installed; use auto, {attention.NAME}, sdpa, eager or flex_attention")
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"  # (tests: fp32 on CPU)
    if cfg.logps_impl == "triton" and not (is_triton_available() and (device.type == "cuda" or interpreted)):
        problems.append(f"logps_impl triton needs a GPU and the triton package (here: {here}); use auto, chunked or "
                        "naive")
    return problems


def resolve_attention(cfg, model_path, device):
    """(the attn_implementation to load, whether responses share their prompt, whether packed batches take the flash
    varlen path), "auto" made this model's. Says why in one line where what was asked is not run."""
    from transformers import AutoConfig

    attention.register()
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    attn, note = attention.choose(cfg.attn_implementation, config, cfg.max_length)
    asked = getattr(cfg, "shared_prompt", False)
    shared = asked and cfg.packing and attn == attention.NAME
    if asked and not shared:
        note += "; " if note else f"attention: {attn}; "
        note += "shared prompts are off (they need packing and packed_sdpa)"
    if note:
        print0(note)
    return attn, shared, attn == attention.NAME and cfg.dtype != "float32" and attention.use_varlen(device)


def write_run_config(run, cfg):
    """config.json: the run's settings, once the data has validated; --overwrite drops the old run's checkpoints."""
    def write():
        if cfg.overwrite:  # step ones and final/: a rerun with --resume=auto must take up none of them
            for folder in [f for _, f in step_checkpoints(run.out_dir)] + [run.out_dir / "final"]:
                shutil.rmtree(folder, ignore_errors=True)
        try:
            write_atomic(run.out_dir / "config.json", json.dumps(run.settings, indent=2) + "\n")
        except OSError as e:
            raise OSError(f"cannot write {run.out_dir / 'config.json'}: {e.strerror or e}") from None

    on_rank0(write)  # (broadcast: every rank has checked out_dir before rank 0 writes into it)


_locks = {}  # out_dir -> the open lock file of a run in this process (tests run several in one process)


def lock_out_dir(out_dir):
    """Collective: rank 0 holds out_dir/run.lock (flock: it dies with its process) until exit; a second run into out_dir
    stops here, naming the holder. (On NFS with local locks, or Lustre without -o flock, it guards one node.)"""
    path = (out_dir / "run.lock").resolve()
    on_rank0(lambda: str(path) in _locks or _lock(path))  # (held already: a run before this one, in-process)


def _lock(path):
    """Take the lock on `path` for this process; ConfigError naming the holder when another process has it."""
    try:
        while True:
            f = open(path, "a+", encoding="utf-8", errors="replace")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "holder unknown"
                f.close()
                raise ConfigError(f"out_dir {path.parent} is in use by another run ({holder}); wait for it to end "
                                  "or stop it, or pass another --out_dir") from None
            except OSError as e:  # a file system without locks
                f.close()
                print0(f"warning: cannot lock {path} ({e.strerror}); nothing stops a second run into {path.parent}")
                return
            if _same_file(path, f) is not False:
                break
            f.close()  # its holder ended and removed it between our open and our lock: lock the new file
        f.seek(0)
        if stale := f.read().strip():
            print0(f"out_dir {path.parent}: taking over the lock of a run that ended without releasing it ({stale})")
        f.truncate(0)
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(sys.argv)[:300]}\n")
        f.flush()
    except OSError as e:  # run.lock is a folder, or not ours to open
        raise OSError(f"cannot lock {path}: {e.strerror or e}") from None
    _locks[str(path)] = f


def lock_lost():
    """Why this process's out_dir lock no longer guards out_dir, or None: its file was removed or replaced (rm
    run.lock), so that a second run may be starting in out_dir. Checked every step (stop_requested)."""
    return next((f"{path} was removed or replaced while this run held it: another run may be writing into "
                 f"{Path(path).parent}; stopped without saving (resume later from its newest checkpoint)"
                 for path, f in _locks.items() if _same_file(path, f) is False), None)


def _same_file(path, f):
    """Whether `path` is still the open file f: True, False (gone or another), or None (no inode numbers to tell)."""
    try:
        st, mine = os.stat(path), os.fstat(f.fileno())
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:  # (a stale NFS handle, a permission): nothing to tell by
        return None
    return None if not st.st_ino else (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


@atexit.register
def release_locks():
    """At exit (or after a run called in-process): remove each lock file still this run's, then let go of its lock (in
    this order, so that no other run ever locks a file about to disappear)."""
    while _locks:
        path, f = _locks.popitem()
        if _same_file(path, f) is not False:
            Path(path).unlink(missing_ok=True)
        f.close()


_launcher = None  # torchrun's pid, the parent of this worker


def exit_with_launcher():
    """Under torchrun: end this worker when its launcher dies, not train on beside a requeued run: on Linux the kernel
    sends SIGHUP (saved and stopped as on preemption); elsewhere stop_requested sees the new parent pid."""
    global _launcher
    if "TORCHELASTIC_RUN_ID" not in os.environ or _launcher is not None:
        return
    _launcher = os.getppid()
    if sys.platform.startswith("linux"):  # (the kernel watches the thread that started us: torchrun's main one)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGHUP)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != _launcher:  # it died before the call above
            os.kill(os.getpid(), signal.SIGHUP)


def check_free_space(out_dir, model_path, cfg):
    """Refuse to start when out_dir cannot hold one checkpoint and the final weights; warn when it cannot hold
    keep_last + 1 checkpoints (the newest are written before the oldest go)."""
    try:
        params = count_parameters(model_path)
    except Exception as e:  # no safetensors files, or a damaged header: say so before any data is read
        raise ConfigError(f"model error: {model_path}: cannot read its safetensors weights ({e})") from None
    final = params * DTYPES[cfg.save_dtype].itemsize  # the HF weights
    checkpoint = params * 12 + final  # and the resumable state: fp32 master weights and AdamW's two fp32 moments
    need = checkpoint + final  # one checkpoint (at least on SIGTERM) and final/
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise ConfigError(f"out_dir {out_dir} has {human_bytes(free)} free; this model ({params / 1e6:.1f}M "
                          f"parameters) needs about {human_bytes(need)}: one resumable checkpoint "
                          f"({human_bytes(checkpoint)}: fp32 weights and AdamW state, and {cfg.save_dtype} weights) "
                          "and the final weights")
    if cfg.save_every and cfg.keep_last and free < (cfg.keep_last + 1) * checkpoint + final:
        print0(f"warning: out_dir {out_dir} has {human_bytes(free)} free; keep_last={cfg.keep_last} "
               f"checkpoints of {human_bytes(checkpoint)} each may not fit")


def human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class Preempted(RuntimeError):
    """SIGTERM/SIGINT/SIGHUP: the step finished and a checkpoint was saved; exit code 128 + signal."""

    def __init__(self, signum, step, path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; saved {path}. Rerun the "
                         "same command with --resume=auto to continue")
        self.signum = signum


@contextmanager
def stop_signals(rank):
    """While inside, SIGTERM, SIGINT and SIGHUP (the launcher died) are recorded, not obeyed, so that the loop can
    finish its step and save (stop_requested); a third signal stops at once. Yields the list of signals received."""
    received, previous = [], {}

    def on_signal(signum, frame):
        if signum == signal.SIGHUP and signum in received:
            return  # the launcher's death can arrive once per thread of the dying launcher: one is enough
        received.append(signum)
        if len(received) == 1:
            print(f"rank {rank}: got {signal.Signals(signum).name}; saving after this step "
                  "(a third signal stops at once)", file=sys.stderr, flush=True)
        elif len([s for s in received if s != signal.SIGHUP]) >= 3:  # a user insisting, not the launcher
            raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_requested(received, device):
    """The signal number if any rank received SIGTERM, SIGINT or SIGHUP (its launcher died), else 0; TrainingError
    when the out_dir lock was lost (lock_lost). Collective: all ranks stop together."""
    # the launcher is gone: on Linux the kernel's SIGHUP says so; this check, everywhere else
    if not received and _launcher is not None and os.getppid() != _launcher:
        if os.environ.get("LOCAL_RANK") == "0":
            print(f"the launcher (pid {_launcher}) is gone; saving after this step", file=sys.stderr, flush=True)
        received.append(signal.SIGHUP)
    lost = lock_lost()  # (rank 0 holds the lock) out_dir is no longer this run's alone: stop, saving nothing
    signum = torch.tensor([float(received[0] if received else 0), float(lost is not None)], device=device)
    dist.all_reduce(signum, op=dist.ReduceOp.MAX)
    signum, lost_anywhere = signum.tolist()  # (one copy to the host)
    if lost_anywhere:
        raise TrainingError(lost or "out_dir's lock was lost on rank 0; stopped without saving")
    return int(signum)


def cli(main):
    """Run a script's main on the command line, with the exit codes above: one message, from rank 0."""
    quiet = os.environ.get("RANK", "0") != "0"

    def report(message, code, out=sys.stderr):
        # torchrun sends SIGTERM to the others as soon as one worker exits: rank 0 finishes its message first, and
        # the quiet ranks, which met the same error, give it the time to get there (it may lag on a busy host)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not quiet:
            print(message, file=out, flush=True)
        elif code in (2, 3):
            time.sleep(3)
        return code

    try:
        main(sys.argv[1:])
        code = 0
    except (ConfigError, ResumeError, data.DataError) as e:
        code = report(f"error: {e}", 2)
    except RunFinished as e:
        code = report(str(e), 0, sys.stdout)
    except (TrainingError, SaveError) as e:
        code = report(f"error: {e}", 3)
    except Preempted as e:
        code = report(str(e), 128 + e.signum)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (data, the reference pass), or a third one inside
        code = report("stopped by SIGINT (Ctrl-C); nothing saved since the last checkpoint", 128 + signal.SIGINT)
    if code:
        sys.exit(code)  # an error: through the interpreter's teardown (see exit_process)
    exit_process(0)
