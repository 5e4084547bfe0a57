"""The judge client against servers that misbehave: replies dripped a byte at a time, a huge
Retry-After, non-HTTP garbage, a body cut short, a dripped TLS handshake. Each run is
`python -m eval.judge` in a subprocess with a hard timeout, so a client that hangs fails the test
instead of hanging it; each must end in seconds, with a one-line error (exit 2) or a right result."""

import email.utils
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import REPO, QuietServer, prefer_the_longer
from eval import judge

DRIP = 0.5  # seconds between the dripped bytes


class Misbehaving(QuietServer, BaseHTTPRequestHandler):
    """An OpenAI-compatible judge that prefers the longer answer, after the scripted faults:
    state["script"] is a list of faults, one per request (then "ok"); "forever" repeats the
    next fault for every request."""

    def do_POST(self):
        s, body = self.state, self.posted()
        with s["lock"]:
            s["tries"].append((body["messages"][-1]["content"], time.monotonic()))
            script = s["script"]
            fault = script[1] if script[:1] == ["forever"] else script.pop(0) if script else "ok"
        try:
            self.answer(fault, body)
        except OSError:
            pass  # the client hung up (as it should, on a drip): stop dripping

    def answer(self, fault, body):
        content = prefer_the_longer(body["messages"][-1]["content"])
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        if fault == "garbage":  # not HTTP at all
            self.wfile.write(b"SSH-2.0-OpenSSH_9.6 this is not HTTP\r\n\r\n")
        elif fault == "short":  # a Content-Length larger than the body, then the connection closes
            self.wfile.write(head.replace(b"Content-Length: ", b"Content-Length: 1") + data)
        elif fault == "drip":  # the whole reply, one byte at a time
            for i in range(len(head + data)):
                self.wfile.write((head + data)[i:i + 1])
                self.wfile.flush()
                time.sleep(DRIP)
        elif fault == "drip_body":  # status and headers at once, then the body one byte at a time
            self.wfile.write(head)
            for i in range(len(data)):
                self.wfile.flush()
                time.sleep(DRIP)
                self.wfile.write(data[i:i + 1])
        elif fault == "huge":  # a whole completion of 3 MiB, its verdict at the end (a runaway or hostile server)
            flood = {"choices": [{"message": {"role": "assistant", "content": "x" * 3 * 2**20 + content}}]}
            huge = json.dumps(flood).encode()
            self.wfile.write(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(huge)}\r\n\r\n"
                             .encode() + huge)
        elif fault.startswith("429"):  # "429 <Retry-After>"
            busy = b'{"error": {"message": "rate limited"}}'
            self.wfile.write(f"HTTP/1.1 429 Too Many Requests\r\nRetry-After: {fault[4:]}\r\n"
                             f"Content-Length: {len(busy)}\r\n\r\n".encode() + busy)
        else:
            assert fault == "ok", fault
            self.wfile.write(head + data)


@pytest.fixture
def server():
    Misbehaving.state = {"script": [], "tries": [], "lock": threading.Lock()}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", Misbehaving.state
    httpd.shutdown()
    httpd.server_close()


def run_judge(tmp_path, url, *args, env=None, hard_timeout=30):
    """(exit status, stdout, stderr, seconds, result JSON or None) of one question judged both ways:
    ours is the longer answer, so a working judge scores it a win in both orderings."""
    for name, text in (("ours", "a long and careful answer"), ("base", "short")):
        (tmp_path / f"{name}.json").write_text(json.dumps([{"instruction": "question 0", "output": text}]))
    out = tmp_path / "judged.json"
    out.unlink(missing_ok=True)
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if "proxy" not in k.lower()}
    env["OPENAI_API_KEY"] = "good-key"
    cmd = [sys.executable, "-m", "eval.judge", "pairwise", f"--answers={tmp_path / 'ours.json'}",
           f"--baseline={tmp_path / 'base.json'}", f"--out={out}", f"--cache={tmp_path / 'cache.jsonl'}",
           f"--base_url={url}", "--bootstrap=10", "--retry_delay=0.05", *args]
    start = time.monotonic()
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=hard_timeout)
    seconds = time.monotonic() - start
    return run.returncode, run.stdout, run.stderr, seconds, json.loads(out.read_text()) if out.exists() else None


def tries(state):
    """{request: the times the server saw it}: each request is one of the two orderings."""
    out = {}
    for request, t in state["tries"]:
        out.setdefault(request, []).append(t)
    return out


def assert_tried(state, times):
    """Every request the server saw (the run stops at the first one that fails for good, but the
    other ordering may already be in flight) was tried `times` times."""
    assert tries(state) and all(len(t) == times for t in tries(state).values()), tries(state)


def assert_clean_failure(code, err, *needles):
    """Exit 2 with one line `error: ...` naming each needle, and no traceback."""
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err


def assert_right_result(code, err, result):
    assert code == 0, err
    assert result["per_question"][0]["verdicts"] == ["A", "B"] and result["win_rate"] == 100.0
    assert result["judge"]["calls"] == 2


# -----------------------------------------------------------------------------
# --timeout bounds the whole request


@pytest.mark.parametrize("fault", ["drip", "drip_body"])
def test_a_dripped_reply_times_out_as_a_whole(tmp_path, server, fault):
    url, state = server
    state["script"] = ["forever", fault]
    code, _, err, seconds, _ = run_judge(tmp_path, url, "--timeout=1", "--retries=1")
    # the reply would take 40 s or more to drip; each read gets a byte within DRIP < --timeout, so
    # only a deadline for the whole request can end a try after 1 s
    assert_clean_failure(code, err, "failed 2 times", "no reply within --timeout=1 s")
    assert_tried(state, 2)  # the timed-out try was retried once
    assert 2 <= seconds < 10, seconds  # two 1 s tries (both orderings at once), a 0.05 s backoff, Python's start


def test_a_dripped_reply_then_a_good_one(tmp_path, server):
    url, state = server
    state["script"] = ["drip_body"]
    code, _, err, seconds, result = run_judge(tmp_path, url, "--timeout=1", "--retries=1", "--workers=1")
    assert_right_result(code, err, result)
    assert len(state["tries"]) == 3 and seconds < 10, seconds


def test_the_deadline_leaves_no_thread_behind(tmp_path, server):
    """In-process: a try cut off by the deadline ends after --timeout, and its Timer thread ends."""
    url, state = server
    state["script"] = ["forever", "drip"]
    client = judge.JudgeClient(url, "gpt-4o", "good-key", tmp_path / "cache.jsonl", retries=0, timeout=0.5)
    start = time.monotonic()
    with pytest.raises(judge.JudgeError, match=r"failed 1 times; last: no reply within --timeout=0.5 s"):
        client.complete(judge.pairwise_request(["q"], ["x"], ["y"]))
    assert 0.5 <= time.monotonic() - start < 2
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if isinstance(t, threading.Timer)]


# -----------------------------------------------------------------------------
# Retry-After: honoured, and capped by --max_retry_wait


def test_a_huge_retry_after_is_capped(tmp_path, server):
    url, state = server
    state["script"] = ["forever", "429 100000"]
    code, _, err, seconds, _ = run_judge(tmp_path, url, "--max_retry_wait=1", "--retries=1")
    assert_clean_failure(code, err, "failed 2 times; last: HTTP 429")
    assert_tried(state, 2)
    assert all(0.9 < t[1] - t[0] < 3 for t in tries(state).values())  # min(100000, --max_retry_wait=1) s
    assert seconds < 10, seconds


def test_retry_after_is_honoured(tmp_path, server):
    url, state = server
    state["script"] = ["429 1"]
    code, _, err, seconds, result = run_judge(tmp_path, url, "--retries=1", "--workers=1")
    assert_right_result(code, err, result)
    first, second = tries(state).values()  # (one at a time: --workers=1)
    assert len(first) == 2 and first[1] - first[0] > 0.9  # the server's 1 s, not the 0.05 s backoff
    assert len(second) == 1
    assert seconds < 10, seconds


def test_retry_after_values():
    seconds = judge.retry_after_seconds
    assert seconds("100000") == 100000 and seconds("0") == 0 and seconds(None) is None
    assert 28 < seconds(email.utils.formatdate(time.time() + 30, usegmt=True)) <= 30  # an HTTP date
    assert seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # in the past: retry now
    assert seconds("soon") is None and seconds("-5") == 0  # unreadable: the backoff applies


# -----------------------------------------------------------------------------
# replies that are not HTTP, or cut short: retried like a 5xx


@pytest.mark.parametrize("fault, why", [("garbage", "BadStatusLine"), ("short", "IncompleteRead")])
def test_broken_replies_are_retried_then_fail_cleanly(tmp_path, server, fault, why):
    url, state = server
    state["script"] = ["forever", fault]
    code, _, err, seconds, _ = run_judge(tmp_path, url, "--retries=2")
    assert_clean_failure(code, err, "failed 3 times; last: a broken reply", why)
    assert_tried(state, 3)
    assert seconds < 10, seconds


@pytest.mark.parametrize("fault", ["garbage", "short"])
def test_a_broken_reply_then_a_good_one(tmp_path, server, fault):
    url, state = server
    state["script"] = [fault]
    code, _, err, seconds, result = run_judge(tmp_path, url, "--retries=1", "--workers=1")
    assert_right_result(code, err, result)
    assert len(state["tries"]) == 3 and seconds < 10, seconds


# -----------------------------------------------------------------------------
# --max_reply_bytes bounds a reply's body (memory, cache): a longer one is a failed try, retried


@pytest.mark.parametrize("fault, args, bound", [("huge", [], 2**20), ("ok", ["--max_reply_bytes=50"], 50)])
def test_a_reply_over_max_reply_bytes_is_a_failed_try(tmp_path, server, fault, args, bound):
    url, state = server
    state["script"] = ["forever", fault]
    code, _, err, seconds, _ = run_judge(tmp_path, url, "--retries=1", *args)
    assert_clean_failure(code, err, f"failed 2 times; last: a reply longer than --max_reply_bytes={bound}")
    assert_tried(state, 2)
    assert not (tmp_path / "cache.jsonl").exists() and seconds < 10, seconds


def test_a_huge_reply_then_a_good_one(tmp_path, server):
    url, state = server
    state["script"] = ["huge"]
    code, _, err, seconds, result = run_judge(tmp_path, url, "--retries=1", "--workers=1")
    assert_right_result(code, err, result)
    assert len(state["tries"]) == 3 and (tmp_path / "cache.jsonl").stat().st_size < 10_000


# -----------------------------------------------------------------------------
# TLS (the default endpoint is https): the deadline also cuts a dripped reply and a dripped handshake


@pytest.fixture
def tls(tmp_path):
    """(an SSLContext for a server on 127.0.0.1, the CA file its clients need)."""
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command for a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True, timeout=30)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert


def test_tls_a_dripped_reply_then_a_good_one(tmp_path, server, tls):
    context, cert = tls
    _, state = server
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    # (each request's thread does its handshake at its first read, not the accepting thread)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        state["script"] = ["drip"]
        code, _, err, seconds, result = run_judge(tmp_path, f"https://127.0.0.1:{httpd.server_address[1]}/v1",
                                                  "--timeout=1", "--retries=1", "--workers=1",
                                                  env={"SSL_CERT_FILE": str(cert)})
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert_right_result(code, err, result)
    assert len(state["tries"]) == 3 and seconds < 10, seconds


@pytest.fixture
def tls_drip():
    """The URL of a server that starts a TLS handshake record of 16 KiB, then drips its bytes."""
    listener, stop = socket.create_server(("127.0.0.1", 0)), threading.Event()
    listener.settimeout(0.05)

    def drip(conn):
        with conn:
            try:
                conn.sendall(b"\x16\x03\x03\x40\x00")  # a handshake record, 16384 bytes long
                while not stop.wait(DRIP):
                    conn.sendall(b"\0")
            except OSError:
                pass  # the client hung up

    def serve():
        while not stop.is_set():
            try:
                threading.Thread(target=drip, args=(listener.accept()[0],), daemon=True).start()
            except TimeoutError:
                pass

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    yield f"https://127.0.0.1:{listener.getsockname()[1]}/v1"
    stop.set()
    server.join()
    listener.close()


def test_tls_a_dripped_handshake_times_out(tmp_path, tls_drip):
    # (CPython's ssl already bounds a whole handshake by the socket's timeout; this keeps it bounded
    # under the deadline, and reported as the timeout it is)
    code, _, err, seconds, _ = run_judge(tmp_path, tls_drip, "--timeout=1", "--retries=1")
    assert_clean_failure(code, err, "failed 2 times", "no reply within --timeout=1 s")
    assert 2 <= seconds < 10, seconds
