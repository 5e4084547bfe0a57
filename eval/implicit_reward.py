"""Judge-free check: does a trained model prefer held-out chosen responses to rejected ones by its
implicit reward beta * log(pi / pi_ref)?

    python -m eval.implicit_reward --model=out/wrpo/final --ref_model=out/sft/final --data=heldout.jsonl
    torchrun --nproc_per_node=8 -m eval.implicit_reward --model=... --ref_model=... --data=...

Rows are WRPO rows (or DPO pairs). Reported, as in training's held-out evaluation (wrpo.py's
`evaluate`, reused here): accuracy (the alpha-weighted chosen reward beats the rejected one),
source and target accuracies (y_ws, y_wt against y_l, independent of alpha and beta), reward
margins and mean log-probs. A model equal to its reference scores 0.5 (ties count half).
"""

import argparse
import json

import data
import wrpo
from eval import cli, fail, outputs_problem, write_output
from eval.common import local_model
from fsdp_utils import DTYPES, cleanup, exit_process, init_distributed, is_master, load_model, print0
from lifecycle import Run, resolve_attention


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m eval.implicit_reward", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the trained policy: local folder or hub id")
    ap.add_argument("--ref_model", required=True, help="its reference (the paper: the SFT model)")
    ap.add_argument("--data", required=True, help="held-out WRPO rows (.jsonl, .json, .parquet or a folder)")
    ap.add_argument("--beta", type=float, default=0.01, help="scales the reported rewards, not the accuracies")
    ap.add_argument("--alpha", type=float, default=0.1, help="weight of y_ws in the weighted accuracy")
    ap.add_argument("--max_length", type=int, default=2048)
    ap.add_argument("--max_prompt_length", type=int, default=1800)
    ap.add_argument("--max_tokens_per_micro_batch", type=int, default=0,
                    help="tokens per forward pass and rank, rows packed with shared prompts (0: 3 x max_length)")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--length_normalize", action="store_true",
                    help="log-probs averaged over response tokens, as a run with --length_normalize trained")
    ap.add_argument("--out", default="", help="also write the metrics here (JSON)")
    ap.add_argument("--trust_remote_code", action="store_true", help="run code shipped with the models")
    ap.add_argument("--allow_special_tokens", action="store_true",
                    help="keep special-token strings in the rows' text as control tokens (else such rows are refused)")
    args = ap.parse_args(argv)
    if args.beta <= 0 or not 0 <= args.alpha <= 1 or args.max_tokens_per_micro_batch < 0:
        ap.error("need beta > 0, 0 <= alpha <= 1 and max_tokens_per_micro_batch >= 0")
    if not 0 < args.max_prompt_length < args.max_length:
        ap.error("need 0 < max_prompt_length < max_length")
    return args


def main(argv):
    args = parse_args(argv)
    if args.out and (problem := outputs_problem([args.out], [args.data, args.model, args.ref_model])):
        fail(problem)  # before any work: never after it, with a stray temporary file
    rank, world, device, mesh = init_distributed()
    from transformers import AutoTokenizer

    # the loading rule of every script (safetensors only, never through an index to a pickle; whole files; shipped
    # code only if trusted), checked before anything loads
    paths = [local_model(p, what=what, trust_remote_code=args.trust_remote_code)
             for p, what in ((args.model, "model"), (args.ref_model, "reference model"))]
    try:
        tokenizer = AutoTokenizer.from_pretrained(paths[0], trust_remote_code=args.trust_remote_code)
        rows = data.load_preference_rows(args.data, tokenizer, max_length=args.max_length,
                                         max_prompt_length=args.max_prompt_length,
                                         allow_special_tokens=args.allow_special_tokens, hint="fix or remove them")
    except (OSError, ValueError) as e:  # bad paths (OSError) or data (DataError is a ValueError)
        fail(str(e))
    # the objective, the batching and the model setup as in training: WRPO's own settings
    cfg = wrpo.Config(beta=args.beta, alpha=args.alpha, max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
                      dtype=args.dtype, trust_remote_code=args.trust_remote_code, max_length=args.max_length,
                      max_prompt_length=args.max_prompt_length, length_normalize=args.length_normalize)
    attn, shared_prompt, varlen = resolve_attention(cfg, paths[0], device)  # this model's, as training resolves it
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    run = Run(rank, world, device, mesh, None, paths[0], tokenizer, pad_id, attn=attn, shared_prompt=shared_prompt,
              varlen=varlen)
    policy, reference = (load_model(p, mesh, device, cfg, attn=attn, trainable=False) for p in paths)
    m = wrpo.evaluate(policy, reference, rows, args.alpha, cfg, run)  # the live reference model
    m = {k.removeprefix("eval/"): v for k, v in m.items()}
    print0(f"{len(rows)} rows of {args.data}: accuracy {m['rewards/accuracies']:.3f} (alpha {args.alpha}), "
           f"source {m['rewards/source_accuracies']:.3f}, target {m['rewards/target_accuracies']:.3f}, "
           f"margin {m['rewards/margins']:.4g} (beta {args.beta})")
    if args.out and is_master():
        summary = {"model": args.model, "ref_model": args.ref_model, "data": args.data, "rows": len(rows),
                   "beta": args.beta, "alpha": args.alpha, "length_normalize": args.length_normalize, **m}
        try:
            write_output(args.out, json.dumps(summary, indent=1) + "\n")
        except OSError as e:  # e.g. a read-only folder
            fail(f"cannot write {args.out} ({e.strerror or e})")
    cleanup()


if __name__ == "__main__":
    cli(main)
    exit_process(0)  # not the interpreter's teardown: see fsdp_utils.exit_process
