"""Loading WRPO data at the paper's scale: time and resident memory of tokenizing 40k rows, and of a cached start.

    python benchmarks/data_load.py                       # 40k rows, the demo tokenizer
    python benchmarks/data_load.py --rows=4000 --before=/tmp/before   # also time an older checkout (no load_cached)

Rows are synthetic and UltraFeedback-like: a prompt of about 160 tokens and three responses of about 370 each,
about 1300 tokens per row (the words are common English ones; the demo's small tokenizer splits them into
about 4 tokens each, so the texts have fewer words than real ones of these lengths). Each line of the table is
a fresh process (or a 2-rank torchrun) that calls training.load_cached(data.load_preference_rows, ...) as
wrpo.py does (cache: a folder of its own for each first load, the same folder for the cached load) and reports
the wall time of the call and its memory: RSS growth per rank, and PSS growth summed over ranks (PSS splits
pages shared by processes, such as a memory-mapped cache, between them: their sum is what the node holds).
Bytes per token divide by the tokens the rows hold.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is that for it as with was on be by this are or from at which but not have an they you "
         "were their one all we can her has there been if more when will would who so no model data answer question "
         "method result value system function number example first time people water between because different "
         "through important problem however following information provide approach consider process within general "
         "specific analysis research student history science language computer network energy health market policy "
         "education").split()


def make_rows(path, n):
    rng = random.Random(0)

    def text(lo, hi):  # words, about 4 tokens each with the demo tokenizer
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt_id": str(i), "prompt": [{"role": "user", "content": text(30, 50)}],
                                "chosen": [{"role": "assistant", "content": text(85, 100)} for _ in range(2)],
                                "rejected": [{"role": "assistant", "content": text(85, 100)}]}) + "\n")


def memory():
    """(RSS, PSS) of this process in bytes, from /proc."""
    rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    pss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/smaps_rollup") if line.startswith("Pss:"))
    return rss, pss


def driver(args):
    """One measurement, in this process (a rank of a torchrun, or alone): load the rows, report time and memory."""
    sys.path.insert(0, args.code)
    import inspect

    import torch.distributed as dist
    from transformers import AutoTokenizer

    import data

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    tokenizer = AutoTokenizer.from_pretrained(REPO / "demo" / "model")
    import training

    settings = dict(max_length=2048, max_prompt_length=1800, report=lambda *a: None)
    if hasattr(training, "load_cached"):  # this code: the token cache is a wrapper around the loader
        load = lambda: training.load_cached(data.load_preference_rows, args.data, tokenizer, args.cache,  # noqa
                                            **settings)
    else:  # older code: the loader caches (cache=) or not
        kwargs = {"cache": args.cache} if "cache" in inspect.signature(data.load_preference_rows).parameters else {}
        load = lambda: data.load_preference_rows(args.data, tokenizer, **settings, **kwargs)  # noqa: E731
    if dist.is_initialized():
        dist.barrier()
    before, t0 = memory(), time.time()
    rows = load()
    seconds, after = time.time() - t0, memory()
    offsets = getattr(rows, "offsets", None)  # tokens stored (a prompt once per row)
    held = int(offsets[-1]) if offsets is not None else sum(len(r.prompt_ids) + sum(map(len, r.responses))
                                                            for r in rows)
    mine = dict(seconds=seconds, rows=len(rows), tokens=held, rss=after[0] - before[0], pss=after[1] - before[1])
    every = [mine]
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("RESULT " + json.dumps(every))
    if dist.is_initialized():
        dist.destroy_process_group()


def measure(data_path, cache, ranks, code=REPO):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    script = [str(Path(__file__).resolve()), "--driver", f"--data={data_path}", f"--cache={cache}", f"--code={code}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *script] \
        if ranks > 1 else [sys.executable, *script]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    every = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    r = every[0]
    return dict(seconds=max(e["seconds"] for e in every), wall=wall, rows=r["rows"], tokens=r["tokens"],
                rss=sum(e["rss"] for e in every) / len(every), pss=sum(e["pss"] for e in every))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--before", default="", help="a checkout of the code before the cache, timed as 'before'")
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--code", default=str(REPO), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver:
        return driver(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_path = tmp / "rows.jsonl"
        make_rows(data_path, args.rows)
        mib = data_path.stat().st_size / 2**20
        runs = []
        if args.before:
            runs.append((f"before ({Path(args.before).name}): first load, 1 rank",
                         measure(data_path, tmp / "c0", 1, code=args.before)))
        runs.append(("first load, 1 rank", measure(data_path, tmp / "c1", 1)))
        runs.append(("first load, 2 ranks", measure(data_path, tmp / "c2", 2)))
        runs.append(("cached load, 1 rank", measure(data_path, tmp / "c1", 1)))
        runs.append(("cached load, 2 ranks", measure(data_path, tmp / "c2", 2)))
    r0 = runs[0][1]
    print(f"{args.rows} rows ({mib:.0f} MiB of JSON lines), {r0['tokens'] / r0['rows']:.0f} tokens per row "
          f"({r0['tokens'] / 1e6:.1f}M tokens held), the demo tokenizer; torch.distributed on gloo, CPU")
    print("| load | load s | process wall s | rows/s | RSS growth per rank | B/token (RSS) | PSS growth, all ranks "
          "| B/token (PSS) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in runs:
        print(f"| {name} | {r['seconds']:.1f} | {r['wall']:.1f} | {r['rows'] / r['seconds']:.0f} | "
              f"{r['rss'] / 2**20:.0f} MiB | {r['rss'] / r['tokens']:.1f} | {r['pss'] / 2**20:.0f} MiB | "
              f"{r['pss'] / r['tokens']:.1f} |")


if __name__ == "__main__":
    main()
