"""Distributed setup, and a model's way in and out: FSDP2 sharding, sharded loading of Hugging Face safetensors
checkpoints, and the gathered full weights written back as one. The same functions run on CUDA (nccl) and on CPU
(gloo), under torchrun or as a plain single process, so the CPU tests exercise the code an 8-GPU node runs."""

import atexit
import copy
import ctypes
import json
import math
import os
import sys
from contextlib import suppress
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from logps import attach_label_logps, resolve_impl

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


# --- process group and device

def init_distributed():
    """(rank, world size, device, mesh) from torchrun's environment: cuda + nccl where GPUs are, else cpu + gloo. A
    plain `python wrpo.py` is a world of one, so that the training code has a single path."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # under torchrun, from its environment; else a world of one, its store in memory
        alone = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda and not alone else None, **alone)
    world = dist.get_world_size()
    return dist.get_rank(), world, device, init_device_mesh(device.type, (world,))


def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0


def is_local_master():
    """The first process of its node: it downloads models and writes the node's caches for the others."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0


def on_every_rank(ok):
    """Whether `ok` holds on every rank (each read a cache, say); `ok` itself without a process group. Collective."""
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
    """End a finished script: atexit handlers, streams flushed, then os._exit(code), without the teardown that now and
    then aborts a finished run (SIGABRT) under gloo's threads, which destroy_process_group does not stop. (An error
    still exits through it: the other ranks then reach their own message and exit code before torchrun stops them.)"""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # a closed pipe (| head) or stream: nothing left to save
            stream.flush()
    ctypes.CDLL(None).fflush(None)  # C libraries' buffered output too (NCCL's logs)
    os._exit(code)


# --- the way in: built on the meta device, sharded, then every rank reads only its own slices of the weights

def load_model(path, mesh, device, cfg, *, attn="sdpa", trainable=True):
    """A causal LM from a local folder of safetensors weights, sharded over `mesh`, with a `label_logps` method: the
    policy (trainable: fp32 master weights) or a frozen model. cfg: TrainConfig's; attn: an attn_implementation."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    param_dtype = DTYPES[cfg.dtype]
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    # 1) on the meta device: shapes, no memory. A trained model keeps fp32 master weights; a frozen one is stored
    #    directly in the compute dtype (the values FSDP would cast to in every forward, at half the memory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if trainable else param_dtype,
                                                 trust_remote_code=cfg.trust_remote_code, attn_implementation=attn)
    model.config.use_cache = False
    if os.path.isfile(os.path.join(path, "generation_config.json")):  # from_config derives one from config.json,
        model.generation_config = GenerationConfig.from_pretrained(path)  # without the stop tokens that it lists
    # 2) activation checkpointing: each decoder layer recomputed in backward (non-reentrant: it composes with FSDP2)
    checkpointing = trainable and (cfg.activation_checkpointing == "true" or (
        cfg.activation_checkpointing == "auto" and device.type == "cuda"))
    if checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})  # (the second name is the first's before transformers 5.x renamed it)
    # 3) compile each decoder layer, before sharding: every layer has the same code, so one compiled graph serves all
    if cfg.compile and trainable:
        for layer in decoder_layers(model):
            layer.compile()
    apply_fsdp(model, mesh, param_dtype)  # 4) shard: fully_shard each decoder layer, then the root
    model.to_empty(device=device)  # 5) this rank's shards allocated on the device, uninitialised
    _init_nonpersistent_buffers(model)  # 6) the buffers no checkpoint holds, recomputed (rotary, Gemma's scale)
    load_sharded_weights(model, path)  # 7) this rank's rows of each tensor, from memory-mapped safetensors files
    model.train(trainable).requires_grad_(trainable)  # frozen: eval mode (no dropout), no gradients
    if trainable:
        print0(f"policy: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, compute {cfg.dtype}, "
               f"activation checkpointing {'on' if checkpointing else 'off'}, "
               f"log-probs {resolve_impl(cfg.logps_impl, device)}")
    return attach_label_logps(model, cfg.logps_impl)


def apply_fsdp(model, mesh, param_dtype, reshard_after_forward=True):
    """fully_shard each decoder layer, then the root (embedding, final norm, lm_head). Parameters stay in fp32 (the
    optimizer's master weights); FSDP casts them to `param_dtype` for compute. Gradients are reduced in fp32: summing
    bf16 gradients over many ranks loses the low bits of small updates, which at lr 3e-7 are most of them."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for module in [*decoder_layers(model), model]:
        fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)


def decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: expected decoder layers at model.model.layers")
    return list(layers)


@torch.no_grad()
def load_sharded_weights(model, path):
    """Fill a meta-initialised, fully_shard-ed model from a safetensors checkpoint: each rank reads only its own rows
    of each tensor (memory-mapped slices), so host memory stays near one copy of the model per node."""
    files = _checkpoint_tensors(path)
    tied = getattr(model.config, "tie_word_embeddings", False)
    handles = {fname: safe_open(fname, framework="pt", device="cpu") for fname in set(files.values())}
    for name, param in model.state_dict().items():
        if name not in files:
            if tied and name.endswith("lm_head.weight"):
                continue  # shares storage with the embedding, filled through it
            raise KeyError(f"{path}: checkpoint has no tensor '{name}'")
        src = handles[files[name]].get_slice(name)
        if isinstance(param, DTensor):  # this rank's rows of dim 0, which FSDP2 shards like torch.chunk
            assert all(isinstance(p, Shard) and p.dim == 0 for p in param.placements), param.placements
            rows, chunk = param.shape[0], math.ceil(param.shape[0] / param.device_mesh.size())
            start = min(param.device_mesh.get_local_rank() * chunk, rows)
            if (end := min(start + chunk, rows)) > start:
                param.to_local().copy_(src[start:end])
        else:
            param.copy_(src[:])


def _checkpoint_tensors(path):
    """Map each tensor name to the safetensors file holding it (single file or sharded)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {name: path / fname for name, fname in _weight_map(index).items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                                "checkpoints are loaded, never pickled .bin files)")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


@torch.no_grad()
def _init_nonpersistent_buffers(model):
    """Recompute the buffers no checkpoint holds, left uninitialised by `to_empty`: rotary and Gemma's embed_scale."""
    for module in model.modules():
        names = getattr(module, "_non_persistent_buffers_set", set())
        if names and "RotaryEmbedding" in type(module).__name__:
            model._init_weights(module)
        elif names == {"embed_scale"} and hasattr(module, "scalar_embed_scale"):  # Gemma's embeddings
            module.embed_scale.fill_(module.scalar_embed_scale)
        elif names:
            raise NotImplementedError(f"{type(module).__name__} has non-persistent buffers {sorted(names)} "
                                      "that sharded loading does not know how to rebuild")


def count_parameters(path):
    """Parameters stored in a safetensors checkpoint, read from the file headers only."""
    total = 0
    for fname in set(_checkpoint_tensors(path).values()):
        with safe_open(fname, framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def loading_problem(path, trust_remote_code=False):
    """Why the folder `path` breaks the one loading rule of every script, or None: weights from safetensors only
    (never a pickle), code shipped with the checkpoint (an `auto_map` in its configs) only with --trust_remote_code."""
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
    try:  # each weight file whole: safetensors' reader checks its header against its size (here, not as it loads)
        for file in (path / name for name in weight_files(path)):
            if not file.is_file():
                return f"{file} is missing (or not a regular file)"
            with safe_open(file, framework="np"):
                pass
    except (OSError, SafetensorError) as e:
        return f"{file} is not a whole safetensors file ({getattr(e, 'strerror', None) or e})"
    except ValueError as e:  # an unreadable index, or one that maps tensors to a pickle
        return str(e)
    return None


def weight_files(path):
    """The names of the weight files of model folder `path`: model.safetensors, or the files its index maps tensors
    to. ValueError when the index is unreadable or names anything but a safetensors file of the folder (a pickle)."""
    index = Path(path) / "model.safetensors.index.json"
    return sorted(set(_weight_map(index).values())) if index.is_file() else ["model.safetensors"]


def _weight_map(index):
    """{tensor: weight file name} of a model.safetensors.index.json, each a safetensors file of its folder."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} is unreadable ({type(e).__name__}: {e})") from None
    if bad := [n for n in names if not isinstance(n, str) or not n.endswith(".safetensors") or Path(n).name != n]:
        raise ValueError(f"{index} maps tensors to {bad[0]!r}, not a safetensors file of {index.parent}: weights "
                         "are loaded from safetensors only, never from a pickle")
    return weight_map


def resolve_model_path(path):
    """A local folder as is; otherwise download the hub snapshot's safetensors and configs."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(f"model path {path} is a file; pass the checkpoint folder")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]  # never pickled *.bin weights
    try:  # the first rank of each node downloads into the node's cache; the others then find it there
        if is_local_master():
            snapshot_download(path, allow_patterns=patterns)
        if dist.is_initialized():
            dist.barrier()
        return snapshot_download(path, allow_patterns=patterns)
    except Exception as e:
        raise FileNotFoundError(f"model '{path}' is neither a local folder nor a reachable hub id: {e}") from e


# --- the way out: the full weights gathered on rank 0, written as a Hugging Face folder

def write_hf_weights(model, folder, *, tokenizer=None, train_config=None, dtype=torch.bfloat16,
                     max_shard_bytes=5 * 2**30):
    """The full weights gathered on rank 0 (CPU-offloaded), written there as a Hugging Face folder (safetensors shards
    with an index, configs, tokenizer). Collective; a failed write raises on rank 0 alone (checkpoint.collectively)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_master():
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if getattr(model.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    shards, size = [{}], 0
    for name in list(state):  # one tensor at a time, so fp32 and save-dtype copies never coexist whole
        t = state[name] = state[name].to(dtype).contiguous()
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][name], size = t, size + t.nbytes
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(files, shards):
        save_file(shard, folder / file, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
                 "weight_map": {name: file for file, shard in zip(files, shards) for name in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = copy.deepcopy(model.config)
    # fully_shard swaps in a subclass (FSDPLlamaForCausalLM); record the model's own class
    config.architectures = [next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__]
    config.dtype = dtype
    config.use_cache = True  # training turned it off; generation wants it
    for part in (config, getattr(model, "generation_config", None), tokenizer):  # (None: absent, or not given)
        if part is not None:
            part.save_pretrained(folder)
    if train_config is not None:
        (folder / "train_config.json").write_text(json.dumps(train_config, indent=2) + "\n")
