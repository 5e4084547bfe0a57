"""Distributed setup, FSDP2 sharding and sharded loading of Hugging Face safetensors checkpoints.

The same functions run on CUDA (nccl) and on CPU (gloo), under torchrun or as a plain
single process, so the CPU tests exercise the exact code used on an 8-GPU node.
"""

import atexit
import ctypes
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

# -----------------------------------------------------------------------------
# process group and device


def init_distributed():
    """Return (rank, world_size, device, mesh) from torchrun's environment.

    cuda + nccl when GPUs exist, cpu + gloo otherwise. A plain `python wrpo.py` becomes a
    world of one so that the training code has a single path.
    """
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    return rank, world, device, mesh


def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0


def is_local_master():
    """The first process of its node: it downloads models and writes the node's caches for the others."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0


def on_every_rank(ok):
    """Whether `ok` holds on every rank (each read a cache, say: on several nodes, or with a damaged copy,
    some may not); `ok` itself without a process group. Collective."""
    if not dist.is_initialized():
        return ok
    seen = torch.tensor(float(ok), device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)
    return bool(seen.item())


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)


def cleanup():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code=0):
    """End a script that has finished, its work written: run the atexit handlers, flush the streams, then
    os._exit(code), without the interpreter's teardown.

    destroy_process_group does not stop gloo's worker threads: torch's own caches (DTensor's sharding
    cache among them) keep the mesh, and with it the group, alive. Tearing the interpreter
    down under those threads now and then aborts a run that has finished ("terminate called without an
    active exception", SIGABRT), so it is skipped. (An error still exits through the teardown: it gives
    the other ranks time to reach their own message and exit code before torchrun stops them.)"""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head) or stream: nothing left to save
            pass
    ctypes.CDLL(None).fflush(None)  # C libraries' buffered output too (NCCL's logs)
    os._exit(code)


# -----------------------------------------------------------------------------
# sharded loading: every rank reads only its own slices of the safetensors files


def _checkpoint_tensors(path):
    """Map each tensor name to the safetensors file holding it (single file or sharded)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / fname for name, fname in weight_map.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(
            f"{path}: no model.safetensors or model.safetensors.index.json "
            "(only safetensors checkpoints are loaded, never pickled .bin files)"
        )
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def count_parameters(path):
    """Parameters stored in a safetensors checkpoint, read from the file headers only."""
    total = 0
    for fname in set(_checkpoint_tensors(path).values()):
        with safe_open(fname, framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def _shard_rows(dtensor):
    """Row range [start, end) of dim 0 held by this rank (FSDP2 shards dim 0 like torch.chunk)."""
    assert all(isinstance(p, Shard) and p.dim == 0 for p in dtensor.placements), dtensor.placements
    mesh = dtensor.device_mesh
    rows, world, rank = dtensor.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = math.ceil(rows / world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def _init_nonpersistent_buffers(model):
    """Recompute buffers that are not stored in checkpoints: rotary inverse frequencies, and the scale of Gemma's
    scaled word embeddings (sqrt(hidden size)).

    They were created on the meta device, so `to_empty` left them uninitialised.
    """
    for module in model.modules():
        names = getattr(module, "_non_persistent_buffers_set", set())
        if not names:
            continue
        with torch.no_grad():
            if "RotaryEmbedding" in type(module).__name__:
                model._init_weights(module)
            elif names == {"embed_scale"} and hasattr(module, "scalar_embed_scale"):  # Gemma's embeddings
                module.embed_scale.fill_(module.scalar_embed_scale)
            else:
                raise NotImplementedError(f"{type(module).__name__} has non-persistent buffers {sorted(names)} "
                                          "that sharded loading does not know how to rebuild")


@torch.no_grad()
def load_sharded_weights(model, path):
    """Fill a meta-initialised, fully_shard-ed model from a safetensors checkpoint.

    Each rank reads only the rows of each tensor that it owns (safetensors slices are
    memory-mapped), so host memory stays near one copy of the model per node instead of
    one per rank.
    """
    files = _checkpoint_tensors(path)
    tied = getattr(model.config, "tie_word_embeddings", False)
    handles = {}
    try:
        for name, param in model.state_dict().items():
            if name not in files:
                if tied and name.endswith("lm_head.weight"):
                    continue  # shares storage with the embedding, filled through it
                raise KeyError(f"{path}: checkpoint has no tensor '{name}'")
            fname = files[name]
            if fname not in handles:
                handles[fname] = safe_open(fname, framework="pt", device="cpu")
            src = handles[fname].get_slice(name)
            if isinstance(param, DTensor):
                start, end = _shard_rows(param)
                local = param.to_local()
                if end > start:
                    local.copy_(src[start:end])
            else:
                param.copy_(src[:])
    finally:
        handles.clear()


# -----------------------------------------------------------------------------
# FSDP2


def apply_fsdp(model, mesh, param_dtype, reshard_after_forward=True):
    """fully_shard each decoder layer, then the root (embedding, final norm, lm_head).

    Parameters stay in fp32 (the optimizer's master weights); FSDP casts them to
    `param_dtype` for compute. Gradients are reduced in fp32: summing bf16 gradients across
    many ranks loses the low bits of small updates, which at lr 3e-7 are most of them.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: expected decoder layers at model.model.layers")
    return list(layers)


def load_model(path, mesh, device, param_dtype, *, trainable=True, activation_checkpointing=False,
               trust_remote_code=False, attn_implementation="sdpa", compile=False):
    """Build a causal LM on the meta device, shard it, then load this rank's slices.

    `path` is a local folder or a hub id (resolved to a local snapshot first). A custom
    attn_implementation (attention.py's packed_sdpa) must be registered with transformers first.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    local = resolve_model_path(path)
    config = AutoConfig.from_pretrained(local, trust_remote_code=trust_remote_code)
    # a trained model keeps fp32 master weights; a frozen one is stored directly in the compute
    # dtype (the same values FSDP would cast to on every forward, at half the memory)
    storage_dtype = torch.float32 if trainable else param_dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=storage_dtype, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
    if activation_checkpointing:
        # non-reentrant checkpointing recomputes each layer in backward and composes with FSDP2
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})  # (the second name is the first's before transformers 5.x renamed it)
    model.config.use_cache = False
    if os.path.isfile(os.path.join(local, "generation_config.json")):  # from_config derives one from config.json,
        model.generation_config = GenerationConfig.from_pretrained(local)  # without the stop tokens that it lists
    if compile:  # per layer, before sharding: every layer has the same code, so one compiled graph serves all
        for layer in decoder_layers(model):
            layer.compile()
    apply_fsdp(model, mesh, param_dtype, reshard_after_forward=True)
    model.to_empty(device=device)
    _init_nonpersistent_buffers(model)
    load_sharded_weights(model, local)
    if trainable:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    return model


def loading_problem(path, trust_remote_code=False):
    """The one rule for loading a model folder, in every script: weights from safetensors only (never a
    pickle), and code shipped with the checkpoint (an `auto_map` in its config or tokenizer config) only
    with --trust_remote_code. Returns why `path` breaks it, or None."""
    path = Path(path)
    for name in ("config.json", "tokenizer_config.json"):
        f = path / name
        try:
            auto_map = json.loads(f.read_text(encoding="utf-8")).get("auto_map") if f.is_file() else None
        except (OSError, ValueError, AttributeError) as e:
            return f"{f} is unreadable ({e})"
        if auto_map and not trust_remote_code:
            shown = ", ".join(f"{k}: {v}" for k, v in (auto_map.items() if isinstance(auto_map, dict) else []))
            return (f"{path} ships its own code ({name}: auto_map {shown or auto_map}); it runs only with "
                    "--trust_remote_code, if you trust it")
    if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        found = f" (it has {', '.join(pickles[:3])}: pickled weights, never loaded here)" if pickles else ""
        return (f"{path} has no safetensors weights (model.safetensors or model.safetensors.index.json){found}; "
                "convert them to safetensors where you trust the files")
    return None


def resolve_model_path(path):
    """A local folder as is; otherwise download the hub snapshot's safetensors and configs."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(f"model path {path} is a file; pass the checkpoint folder")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]  # never pickled *.bin weights
    try:
        # the first rank of each node downloads into the node's cache; the others then find it there
        if is_local_master():
            snapshot_download(path, allow_patterns=patterns)
        if dist.is_initialized():
            dist.barrier()
        return snapshot_download(path, allow_patterns=patterns)
    except Exception as e:
        raise FileNotFoundError(f"model '{path}' is neither a local folder nor a reachable hub id: {e}") from e
