"""The fusion-data pipeline and the evaluation, run from the repository root as modules:

    python -m eval.split ...            prompts -> an SFT part and a WRPO part (by prompt_id)
    torchrun --nproc_per_node=8 -m eval.generate ...   samples of a model for each prompt
    torchrun --nproc_per_node=8 -m eval.score ...      reward-model scores of the samples
    python -m eval.build ...            WRPO rows (or SFT rows) from the scored samples
    torchrun --nproc_per_node=8 -m eval.answers ...    AlpacaEval 2, MT-Bench, Arena-Hard answers
    python -m eval.judge ...            local judging: an LLM judge over HTTP, or a reward model
    python -m eval.implicit_reward ...  held-out implicit-reward accuracy of a policy
    python -m eval.plot ...             curves of a run's metrics.jsonl

judge (but for its rm mode), plot and questions do not import torch: they run where only the standard library
and numpy are installed. Every script opens the inputs and outputs a user names through the helpers below: an input
is read only when it is a regular file (a FIFO would block, a folder is none; a UTF-8 byte-order mark is dropped),
the outputs are checked before any work (outputs_problem: none is, holds or lies inside an input, none is a folder
or a FIFO) and written whole or not at all, never over a folder. A model is loaded only after the one loading rule
(eval.common.local_model). Ctrl-C is one line and exit 130 (cli).
"""

import os
import stat
import sys
from pathlib import Path

from paths import BOM, kind, path_clash  # (the trainers' rules too)


def fail(message):
    """A user error: one line on stderr and exit status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_input(path, errors="strict"):
    """The text of the input file `path`, or fail() saying why not: missing, not a regular file (never opened: a FIFO
    would block), unreadable, or not UTF-8 (errors="replace": bad bytes read as U+FFFD, for files a crash may have
    torn mid-character). A leading UTF-8 byte-order mark is dropped."""
    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            fail(f"cannot read {path}: not a regular file")
        raw = path.read_bytes()
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}")
    skip = len(BOM) if raw.startswith(BOM) else 0
    try:
        return raw[skip:].decode("utf-8", errors)
    except UnicodeDecodeError as e:
        fail(f"{path}: not UTF-8 text (byte {skip + e.start + 1})")


def output_problem(path, overwrite=True, what="give the file to write", folder=False):
    """Why `path` cannot be an output file (folder=True: an output folder), or None; checked before any work. A folder
    in a file's place is never removed, nor a file in a folder's; a FIFO or a device is no output (a resume would read
    it, and block); a file there is replaced only with overwrite. A new one needs its nearest existing folder to be
    a folder this process may write in."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):  # a new file: where it would be made
        above = next(p for p in Path(os.path.abspath(path)).parents if os.path.lexists(p))
        if not above.is_dir():
            return f"cannot write {path}: {above} is not a folder"
        return None if os.access(above, os.W_OK | os.X_OK) else f"cannot write {path}: {above} is not writable"
    except OSError as e:  # a folder on the way that may not be looked into
        return f"cannot write {path} ({e.strerror or e})"
    if folder:
        return None if stat.S_ISDIR(mode) else f"{path} is {kind(mode)}; {what}"
    if not stat.S_ISREG(mode):
        return f"{path} is {kind(mode)}; {what}"
    return None if overwrite else f"{path} exists; pass --overwrite to replace it"


def outputs_problem(outputs, inputs, overwrite=True, what="give the file to write"):
    """Why the files `outputs` cannot be written, or None: the first of path_clash (an output that is, holds or lies
    inside an input) and each output's output_problem. Every script checks this before any work; None entries are
    left out (an optional path not given)."""
    outputs = [o for o in outputs if o]
    return path_clash(outputs, inputs) or next(filter(None, (output_problem(o, overwrite, what) for o in outputs)),
                                               None)


def cli(main):
    """`python -m eval.NAME`: main(the command line arguments); Ctrl-C ends it at once with one line (from rank 0) and
    exit status 130 (128 + SIGINT, as a shell reports it), never a KeyboardInterrupt traceback. Every file is closed
    by then (the `with` blocks unwound; outputs are whole or absent): a rerun of generate, score or answers resumes
    what the part files hold."""
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("stopped by SIGINT (Ctrl-C)", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # now: not after the judge's requests in flight (its threads), nor the teardown of torch's


def write_output(path, write):
    """Write the file `path` whole or not at all: into a temporary file beside it (its folder made first), renamed
    over it when complete. write: the text, or a function that writes the open file. Raises OSError. (The trainers'
    checkpoint.write_atomic does the same, but imports torch, which judge and plot must run without.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f) if callable(write) else f.write(write)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
