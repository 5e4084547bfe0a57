import pytest
import torch
from safetensors.torch import save_file

from fsdp_utils import _checkpoint_tensors, resolve_model_path


def test_only_safetensors_checkpoints_are_read(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="only safetensors checkpoints are loaded"):
        _checkpoint_tensors(tmp_path)
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, tmp_path / "model.safetensors")
    assert _checkpoint_tensors(tmp_path) == {"a": tmp_path / "model.safetensors", "b": tmp_path / "model.safetensors"}


def test_model_path_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="pass the checkpoint folder"):
        resolve_model_path(str(tmp_path / "weights.safetensors"))
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a reachable hub id"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a reachable hub id"):
        resolve_model_path("no-such-org/no-such-model")


def test_exit_process_flushes_runs_atexit_and_keeps_the_code(tmp_path):
    """It skips the interpreter's teardown, but nothing a script wrote or registered is lost."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    script = tmp_path / "s.py"
    script.write_text(
        "import atexit, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from fsdp_utils import exit_process\n"
        f"atexit.register(lambda: open({str(tmp_path / 'atexit')!r}, 'w').write('ran'))\n"
        "atexit.register(lambda: print('from atexit'))\n"
        "sys.stdout.write('buffered, no newline; ')\n"
        "sys.stderr.write('err too')\n"
        "exit_process(3)\n"
        "print('never')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: block-buffered
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "buffered, no newline; from atexit\n", "err too")
    assert (tmp_path / "atexit").read_text() == "ran"
