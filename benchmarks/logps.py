"""Forward + backward of token log-probs: time and peak extra memory of each implementation.

    python benchmarks/logps.py                                  # CPU: fp32, 2048 x 1024 x 128256
    python benchmarks/logps.py --dtype=bfloat16 --tokens=16384 --hidden=4096   # on a GPU
    python benchmarks/logps.py --vocab=256000 --softcap=30      # Gemma-2's soft-capped head

"Extra memory" is the peak beyond the inputs and their gradients (every method needs those).
On CUDA it comes from the allocator's peak; on CPU each measurement runs in a fresh process
and reads the kernel's resident-set high-water mark (reset through /proc/self/clear_refs).
On CUDA the table also gives the floor: 6 * tokens * hidden * vocab FLOPs at the matmul rate
measured on the same shapes.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from logps import Head, chunked_logps, naive_logps  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def rss_bytes(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def make_fn(impl, softcap=0.0):
    if softcap:  # Gemma-2's final_logit_softcapping: naive and chunked apply it (triton hands it to chunked)
        fn = make_fn(impl)
        return lambda h, w, y: fn(h, w, y, head=Head(softcap=softcap))
    if impl == "naive":
        return naive_logps
    if impl == "compiled-naive":
        return torch.compile(naive_logps)
    if impl == "chunked":
        return chunked_logps
    if impl == "triton":
        from logps import triton_logps

        return triton_logps
    raise ValueError(impl)


def measure(impl, dtype, tokens, hidden, vocab, device, repeats, softcap=0.0):
    """Median fwd+bwd seconds and peak extra bytes of one implementation."""
    torch.manual_seed(0)
    h = (torch.randn(tokens, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), device=device)
    g = torch.randn(tokens, device=device)
    fn = make_fn(impl, softcap)

    def step():
        h.grad = w.grad = None
        (fn(h, w, y) * g).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (and compilation)
    grads = h.numel() * h.element_size() + w.numel() * w.element_size()
    h.grad = w.grad = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        extra = torch.cuda.max_memory_allocated() - base - grads
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
        base = rss_bytes("VmRSS")
        step()
        extra = rss_bytes("VmHWM") - base - grads
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(extra, 0)


def matmul_rate(dtype, tokens, hidden, vocab, device):
    """FLOP/s of the three matmul shapes of the forward + backward, measured here."""
    a = torch.randn(tokens, hidden, device=device, dtype=dtype)
    b = torch.randn(vocab, hidden, device=device, dtype=dtype)
    c = torch.randn(tokens, vocab, device=device, dtype=dtype)
    ops = [lambda: a @ b.T, lambda: c @ b, lambda: c.T @ a]
    for op in ops:
        op()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for op in ops:
        op()
    torch.cuda.synchronize()
    return 6 * tokens * hidden * vocab / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--softcap", type=float, default=0.0, help="a soft-capped head (Gemma-2: 30)")
    p.add_argument("--impls", default="")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: measure one impl, print JSON
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    shape = (args.tokens, args.hidden, args.vocab)
    if args.one:
        t, extra = measure(args.one, dtype, *shape, device, args.repeats, args.softcap)
        print(json.dumps({"time": t, "extra": extra}))
        return
    impls = args.impls.split(",") if args.impls else (
        ["naive", "compiled-naive", "chunked", "triton"] if device.type == "cuda" else ["naive", "chunked"])
    results = {}
    for impl in impls:
        if device.type == "cuda":
            results[impl] = measure(impl, dtype, *shape, device, args.repeats, args.softcap)
        else:  # a fresh process per implementation, so one's allocations do not hide another's peak
            out = subprocess.run([sys.executable, __file__, f"--one={impl}", f"--dtype={args.dtype}",
                                  f"--tokens={args.tokens}", f"--hidden={args.hidden}", f"--vocab={args.vocab}",
                                  f"--repeats={args.repeats}", f"--softcap={args.softcap}"], capture_output=True,
                                 text=True, check=True,
                                 env={**os.environ})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[impl] = (r["time"], r["extra"])
    floor = 6 * args.tokens * args.hidden * args.vocab / matmul_rate(dtype, *shape, device) \
        if device.type == "cuda" else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    capped = f"; head soft-capped at {args.softcap:g}" if args.softcap else ""
    print(f"device: {name}; torch {torch.__version__}{capped}")
    cols = "| impl | dtype | tokens | hidden | vocab | fwd+bwd s | extra MiB | time / naive | extra / naive |"
    print(cols + (" time / floor |" if floor else ""))
    print("|---" * (9 + bool(floor)) + "|")
    t_naive, m_naive = results.get("naive", (None, None))
    for impl, (t, extra) in results.items():
        row = (f"| {impl} | {args.dtype} | {args.tokens} | {args.hidden} | {args.vocab} | {t:.3f} | "
               f"{extra / 2**20:.0f} | {t / t_naive:.2f} | {extra / m_naive:.1%} |" if t_naive else "")
        print(row + (f" {t / floor:.2f} |" if floor else ""))
    if floor:
        print(f"floor (6*tokens*hidden*vocab at the measured matmul rate): {floor:.3f} s")


if __name__ == "__main__":
    main()
