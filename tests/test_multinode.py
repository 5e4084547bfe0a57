"""Several nodes, simulated on one machine: two torchrun agents meet through the c10d rendezvous (the
README's multi-node command) and train as one 2-rank world, each "node" with caches of its own."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from conftest import REPO, read_jsonl, torchrun

pytestmark = pytest.mark.slow  # end-to-end runs: the full suite only

# as tests/test_distributed.py's SHORT_RUN, 3 steps, in fp32 (so losses agree to float32 rounding), with
# a held-out set (so both data files and both reference tables are cached)
RUN = ["--max_steps=3", "--global_batch_size=8", "--micro_batch_size=2", "--lr=1e-3", "--beta=0.1",
       "--save_dtype=float32", "--max_length=128", "--max_prompt_length=96", "--dtype=float32",
       "--eval_data=demo/data/heldout.jsonl"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
TIMEOUT = 600  # seconds for a whole 2-node run; on 2 shared CPU cores one takes ~20 s


def free_localhost_port():
    """A TCP port free on 127.0.0.1 just now (the kernel's pick for port 0), for the rendezvous endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_caches(node):
    return [f"--data_cache_dir={node / 'tokens'}", f"--ref_cache_dir={node / 'ref'}"]


def run_two_nodes(tmp_path, name, out_dir, nodes):
    """wrpo.py under two concurrent torchrun agents (--nnodes=2 --nproc_per_node=1, c10d rendezvous on
    127.0.0.1), agent i with nodes[i]'s cache folders; both must exit 0. Returns their outputs
    [(stdout, stderr)] by agent. Kills both (their process groups) when either fails or time runs out."""
    endpoint, rdzv_id = f"127.0.0.1:{free_localhost_port()}", f"wrpo-test-{name}-{uuid.uuid4().hex[:8]}"
    logs, procs, cmds = [], [], []
    try:
        for i, node in enumerate(nodes):
            # --local-addr: both "nodes" are this machine, whatever its hostname resolves to
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}",
                   "--local-addr=127.0.0.1", str(REPO / "wrpo.py"), *RUN, f"--out_dir={out_dir}",
                   *node_caches(node)]
            out, err = (open(tmp_path / f"{name}.agent{i}.{s}", "w+") for s in ("out", "err"))  # files: no pipe stalls
            logs.append((out, err))
            cmds.append(cmd)
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=err, text=True,
                                          start_new_session=True))  # its own process group: the agent and its rank
        deadline = time.monotonic() + TIMEOUT
        while True:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                break
            problem = ("agent(s) " + ", ".join(f"{i} exited {c}" for i, c in enumerate(codes) if c not in (None, 0))
                       if any(c not in (None, 0) for c in codes) else
                       f"no result within {TIMEOUT}s" if time.monotonic() > deadline else None)
            if problem:
                _kill(procs)
                pytest.fail(f"2-node run {name!r}: {problem}\n" + _outputs(cmds, logs, codes))
            time.sleep(0.5)
        outputs = []
        for out, err in logs:
            out.seek(0), err.seek(0)
            outputs.append((out.read(), err.read()))
        return outputs
    finally:
        _kill(procs)  # (nothing left to kill after a clean exit)
        for f in (f for pair in logs for f in pair):
            f.close()


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the group of the agent this test started: it and its worker
            except ProcessLookupError:
                pass
            p.wait()


def _outputs(cmds, logs, codes):
    text = []
    for i, ((out, err), cmd, code) in enumerate(zip(logs, cmds, codes)):
        out.flush(), err.flush()
        out.seek(0), err.seek(0)
        status = "still running: killed" if code is None else f"exit {code}"
        text.append(f"===== agent {i} ({status}): {' '.join(cmd)}\n--- stdout:\n{out.read()[-4000:]}\n"
                    f"--- stderr:\n{err.read()[-6000:]}")
    return "\n".join(text)


def rank0_agent(outputs):
    """The agent whose worker is global rank 0: the one that printed the run's lines (print0)."""
    printing = [i for i, (out, _) in enumerate(outputs) if "data: " in out]
    assert len(printing) == 1, f"expected exactly one agent (rank 0's) to print the data lines: {printing}\n" + \
        _show(outputs)
    return printing[0]


def _show(outputs):
    return "\n".join(f"===== agent {i}\n--- stdout:\n{out[-4000:]}\n--- stderr:\n{err[-4000:]}"
                     for i, (out, err) in enumerate(outputs))


def cache_files(node):
    """{relative path: (inode, size, mtime_ns)} of every file under a node's cache folders."""
    files = {}
    for sub in ("tokens", "ref"):
        for f in sorted((node / sub).rglob("*")) if (node / sub).is_dir() else []:
            if f.is_file():
                st = f.stat()
                files[str(f.relative_to(node))] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return files


def cache_content(path):
    """A cache file's metadata and tensors (its header's order of keys may differ between writers)."""
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        return f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()}


def losses(out_dir):
    """[(step, what, loss, reward margin)] of metrics.jsonl: the training steps' and the held-out evaluations'."""
    return [(m["step"], p or "train", m[f"{p}loss"], m[f"{p}rewards/margins"])
            for m in read_jsonl(out_dir / "metrics.jsonl") for p in ("", "eval/") if f"{p}loss" in m]


def assert_same_losses(got, want, what, tol=1e-5):
    assert [s[:2] for s in got] == [s[:2] for s in want], f"{what}: other metrics lines\n{got}\n{want}"
    assert [s for s, kind, _, _ in got if kind == "train"] == [1, 2, 3], f"{what}: {got}"  # one line per step
    for (step, kind, loss, margin), (_, _, loss1, margin1) in zip(got, want):
        assert abs(loss - loss1) <= tol and abs(margin - margin1) <= tol, \
            f"{what}, step {step} ({kind}): loss {loss} vs {loss1}, margin {margin} vs {margin1} (1 agent, 2 ranks)"


def test_two_nodes_train_as_one_world_with_node_local_caches(tmp_path):
    # the baseline: one agent running both processes, with caches of its own
    single = tmp_path / "single"
    torchrun(2, REPO / "wrpo.py", *RUN, f"--out_dir={single / 'out'}", *node_caches(single))
    want = losses(single / "out")

    nodes = [tmp_path / "node0", tmp_path / "node1"]
    first = run_two_nodes(tmp_path, "first", tmp_path / "out1", nodes)
    r0 = rank0_agent(first)
    assert "world 2 on cpu" in first[r0][0], _show(first)
    assert_same_losses(losses(tmp_path / "out1"), want, "first 2-node run")  # also: one metrics line per step

    # each node's first process wrote that node's caches, whole; both copies hold the same
    written = [cache_files(node) for node in nodes]
    for node, files in zip(nodes, written):
        names = sorted(files)
        assert len([n for n in names if n.startswith("tokens/train.jsonl.tokens-")]) == 1 and \
            len([n for n in names if n.startswith("tokens/heldout.jsonl.tokens-")]) == 1 and \
            len([n for n in names if n.startswith("ref/train.jsonl.ref-logps-")]) == 1 and \
            len([n for n in names if n.startswith("ref/heldout.jsonl.ref-logps-")]) == 1 and len(names) == 4, \
            f"{node}: expected the token caches of both data files and both reference tables, found {names}\n" + \
            _show(first)
        assert not list(node.rglob("*.tmp")), f"half-written files left in {node}: {list(node.rglob('*.tmp'))}"
    assert sorted(written[0]) == sorted(written[1])
    for name in written[0]:
        assert cache_content(nodes[0] / name) == cache_content(nodes[1] / name), f"the nodes' copies of {name} differ"
    reported = [line for line in first[r0][0].splitlines() if line.startswith(("data: ", "reference log-probs: "))]
    assert len(reported) == 4 and all(str(nodes[r0]) in line for line in reported), reported  # rank 0's node's files

    # a second run reads every cache on both nodes, rewrites none, and trains the same
    second = run_two_nodes(tmp_path, "second", tmp_path / "out2", nodes)
    r0 = rank0_agent(second)
    out = second[r0][0]
    for data_file in ("train.jsonl", "heldout.jsonl"):
        assert f"from demo/data/{data_file} in " in out and \
            f"(cached: {nodes[r0] / 'tokens' / data_file}.tokens-" in out, f"{data_file}: no cached data line\n{out}"
        assert f"reference log-probs: {nodes[r0] / 'ref' / data_file}.ref-logps-" in out, out
    assert out.count(".safetensors (cached)") == 2 and "tokenized on" not in out, out
    assert [cache_files(node) for node in nodes] == written, "a node's cache files were rewritten by the second run"
    for node in nodes:
        assert not list(node.rglob("*.tmp")), f"half-written files left in {node}: {list(node.rglob('*.tmp'))}"
    assert_same_losses(losses(tmp_path / "out2"), want, "second 2-node run (from the caches)")
