"""benchmarks/gpu_check.sh: the first-GPU-day check. Its --dry-run runs gpu_check.py's steps on CPU (the demo
model and data, gloo): the same commands as on the GPU, so that CI catches a step that broke before a GPU does."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
STEPS = ["1. model and data", "2. varlen self-check", "3. sft.py (torchrun)", "4. wrpo.py: SIGTERM, --resume=auto",
         "5. from_pretrained + forward", "6. eval.generate", "7. WRPO tokens/s, MFU"]


def summary(stdout):
    """The final table's rows as (check, result, detail)."""
    table = stdout.rpartition("| check | result | detail |\n|---|---|---|\n")[2]
    return [tuple(cell.strip() for cell in line.strip().strip("|").split("|", 2))
            for line in table.splitlines() if line.startswith("| ")]


@pytest.mark.slow
def test_dry_run_passes(tmp_path):
    demo_data = sorted(os.listdir(REPO / "demo" / "data"))
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", f"--work_dir={tmp_path}"], cwd=REPO,
                          env={**ENV, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=420)
    rows = summary(proc.stdout)
    log = f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert [check for check, _, _ in rows] == ["gpu_check.py"] + STEPS, log
    assert all(result in ("PASS", "SKIP") for _, result, _ in rows), log
    assert dict((check, result) for check, result, _ in rows)["2. varlen self-check"] == "SKIP", log  # CUDA's
    assert proc.returncode == 0, log
    assert (tmp_path / "wrpo" / "final" / "config.json").exists()
    assert sorted(os.listdir(REPO / "demo" / "data")) == demo_data  # the reference cache went to the work dir


def test_a_failing_part_is_reported_and_fails_the_run():
    """The script goes on past a failing part, and the summary and the exit code say so."""
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env={**ENV, "PYTHON": "false"},
                          capture_output=True, text=True, timeout=60)
    rows = summary(proc.stdout)
    assert len(rows) == 1 and rows[0][:2] == ("gpu_check.py", "FAIL") and rows[0][2].startswith("exit 1 after"), \
        proc.stdout
    assert proc.returncode == 1


def test_steps_past_the_time_given_are_skipped_and_listed(tmp_path):
    """With --seconds spent, every step still gets its line (SKIP, saying why) rather than vanishing."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--seconds=5",
                           f"--work_dir={tmp_path}"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    rows = summary(proc.stdout)
    assert [check for check, _, _ in rows] == STEPS, proc.stdout
    assert all(result == "SKIP" and "are spent" in detail for _, result, detail in rows), proc.stdout
    assert proc.returncode == 0
