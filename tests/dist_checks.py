"""Sharded loading and checkpoint round trips, run under torchrun by test_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_checks.py OUT_DIR

Rank 0 writes OUT_DIR/results.json; the test asserts on it.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fsdp_utils import _checkpoint_tensors, cleanup, init_distributed, load_model, write_hf_weights  # noqa: E402
from training import TrainConfig  # noqa: E402


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def main(out):
    rank, world, device, mesh = init_distributed()
    results = {"world": world}
    ids = torch.randint(0, 97, (3, 13), generator=torch.Generator().manual_seed(0))
    for tied in (False, True):
        path = out / f"tiny_tied{tied}"
        if rank == 0:
            torch.manual_seed(1)
            # odd sizes so that dim 0 does not split evenly across ranks (and one rank can hold 0 rows)
            cfg = LlamaConfig(vocab_size=97, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
            LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="20KB")  # several shards + an index
        dist.barrier()
        n_files = len(set(_checkpoint_tensors(path).values()))

        model = load_model(str(path), mesh, device, TrainConfig(dtype="float32"))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            ref_sd = ref.state_dict()
            results[f"load_tied{tied}"] = {
                "files": n_files,
                "same_keys": sorted(ref_sd) == sorted(full),
                "max_diff": max(max_diff(ref_sd[k], full[k]) for k in ref_sd),
                "logits_diff": max_diff(ref(ids).logits, model(ids).logits.detach()),
            }
        else:
            model(ids)  # FSDP forward is collective

        # change the weights with one optimizer step, then save and reload with from_pretrained
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(ids).logits.square().mean().backward()
        opt.step()
        with torch.no_grad():
            trained = model(ids).logits
        write_hf_weights(model, out / f"saved_fp32_tied{tied}", dtype=torch.float32, max_shard_bytes=30_000)
        if rank == 0:
            reloaded = AutoModelForCausalLM.from_pretrained(out / f"saved_fp32_tied{tied}", dtype=torch.float32)
            with torch.no_grad():
                results[f"save_fp32_tied{tied}"] = {
                    "logits_diff": max_diff(reloaded(ids).logits, trained),
                    "files": len(set(_checkpoint_tensors(out / f"saved_fp32_tied{tied}").values())),
                    "changed": max_diff(trained, ref(ids).logits) > 1e-4,
                }
        dist.barrier()

    # bf16 training computes with bf16 copies of the fp32 master weights; a bf16 checkpoint
    # holds exactly those copies, so it reproduces the trained model's bf16 logits
    path = out / "saved_fp32_tiedFalse"
    model = load_model(str(path), mesh, device, TrainConfig(dtype="bfloat16"))
    with torch.no_grad():
        bf16_logits = model(ids).logits
    write_hf_weights(model, out / "saved_bf16", dtype=torch.bfloat16)
    if rank == 0:
        reloaded = AutoModelForCausalLM.from_pretrained(out / "saved_bf16", dtype=torch.bfloat16)
        config = json.loads((out / "saved_bf16" / "config.json").read_text())
        with torch.no_grad():
            results["save_bf16"] = {"logits_diff": max_diff(reloaded(ids).logits, bf16_logits),
                                    "logits_dtype": str(bf16_logits.dtype),
                                    "architectures": config["architectures"], "dtype": config.get("dtype")}
        (out / "results.json").write_text(json.dumps(results, indent=2))
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
