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
is read only when it is a regular file (a FIFO would block, a folder is none), an output is checked before any work
and written whole or not at all, never over a folder.
"""

import os
import stat
import sys
from pathlib import Path


def fail(message):
    """A user error: one line on stderr and exit status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_input(path):
    """The text of the input file `path`, or fail() saying why not: missing, not a regular file (never opened: a FIFO
    would block), unreadable, or not UTF-8."""
    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            fail(f"cannot read {path}: not a regular file")
        return path.read_text(encoding="utf-8")
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}")
    except UnicodeDecodeError as e:
        fail(f"{path}: not UTF-8 text (byte {e.start + 1})")


def output_problem(path, overwrite=True, what="give the file to write"):
    """Why `path` cannot be an output file, or None; checked before any work. A folder in its place is never removed;
    a file there is replaced only with overwrite."""
    path = Path(path)
    try:
        if path.is_dir():
            return f"{path} is a folder; {what}"
        if path.exists() and not overwrite:
            return f"{path} exists; pass --overwrite to replace it"
    except OSError as e:  # a folder on the way that may not be looked into
        return f"cannot write {path} ({e.strerror or e})"
    return None


def path_clash(outputs, inputs):
    """Why writing `outputs` (files or folders) could destroy or feed on `inputs`, or None: an output that is an input
    (by any path: links are followed), holds one in its folder, or lies inside an input folder. Checked before any
    work, by every script and by the trainers; paths that do not exist yet compare by their resolved names."""
    def same(a, b):
        try:
            return a.samefile(b)
        except OSError:  # one does not exist
            return a == b

    for out in map(Path, filter(None, outputs)):
        o = out.resolve()
        for given in map(Path, filter(None, inputs)):
            i = given.resolve()
            if same(o, i):
                return f"{out} is also an input ({given}); give the output another path"
            if o in i.parents:
                return f"{out} holds the input {given}; give the output a path outside it"
            if i in o.parents:
                return f"{out} lies inside the input folder {given}; give the output a path outside it"
    return None


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
