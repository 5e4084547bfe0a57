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
