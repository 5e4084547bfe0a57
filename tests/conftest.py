import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# the triton kernels run on CPU through triton's interpreter (fp32 only); set before triton loads
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "demo" / "model"
sys.path.insert(0, str(REPO))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (torchrun, subprocesses, training); "
                            "the fast tier is `python -m pytest -q -m \"not slow\" tests`")


def torchrun(nproc, script, *args, timeout=600):
    """Run `script` under torchrun with `nproc` CPU ranks; return its stdout, fail with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


class QuietServer:
    """Mixin for a test's HTTP handler: no request log, and the posted JSON body."""

    state = {}

    def log_message(self, *args):
        pass

    def posted(self):
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))


def prefer_the_longer(text):
    """A fake pairwise judge's reply to a request of eval.judge: it prefers the longer answer."""
    import re

    a, b = (re.search(rf"\[Assistant {x}\]\n(.*?)\n</conversation", text, re.S).group(1) for x in "AB")
    return "Reasoning... " + ("[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]")


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def release_out_dir_locks():
    """A run's out_dir lock lasts as long as its process; a run called in-process ends with its test."""
    yield
    import lifecycle

    lifecycle.release_locks()


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL)
