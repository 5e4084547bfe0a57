"""Judge answers locally: an LLM judge behind any OpenAI-compatible endpoint, or a reward model.

    # pairwise against a baseline's answers (AlpacaEval- / Arena-Hard-style), both orderings
    OPENAI_API_KEY=... python -m eval.judge pairwise --answers=model_outputs.json --baseline=gpt4_turbo.json \\
        --base_url=https://api.openai.com/v1 --judge_model=gpt-4o --out=judged.json
    python -m eval.judge pairwise --answers=A.jsonl --baseline=B.jsonl --questions=question.jsonl ...
    # MT-Bench-style single-answer grading, 1-10 per turn
    python -m eval.judge single --answers=mt_bench/model_answer/wrpo.jsonl --questions=mt_bench/question.jsonl ...
    # judge-free: a reward model's win rate (eval/score.py does the scoring)
    python -m eval.judge rm --answers=A.json --baseline=B.json --reward_model=PATH_OR_HUB_ID --out=rm.json

Answers are eval/answers.py's files (or the benchmarks' own: AlpacaEval's JSON list of
{instruction, output}, MT-Bench / Arena-Hard answer JSONL with --questions). The endpoint is
POST {base_url}/chat/completions; the key comes from the environment variable --api_key_env
(standard-library HTTP, no SDK). Calls run in parallel (--workers), are retried with exponential
backoff on 429, 5xx and broken replies (not HTTP, cut short, a dropped connection), honouring
Retry-After (seconds or an HTTP date) up to --max_retry_wait, and every reply is cached (--cache,
one JSON line per call keyed by a hash of the request), so a rerun never pays twice. --timeout
bounds each whole try (connect, TLS, send, status, headers, body), however slowly the server
drips its bytes: at the deadline the connection is shut down and the try counts as failed.
--max_reply_bytes bounds a reply's body (a judge's reply is a few kB; a server that sends more
would fill the memory and the cache): a longer one is a failed try too. A rejected key stops at
once; so does any other 4xx. A reply without a verdict is counted as malformed and left out.

rm mode scores both answer sets afresh each run (eval/score.py --overwrite), into OUT.pairs.jsonl
and OUT.scored.jsonl beside --out. No output (--out, the cache, those two) may be, hold or lie
inside an input (eval.path_clash); all are checked before any work.

Scores: win rate = the mean over questions of 1 (win), 1/2 (tie), 0 (loss), each averaged over
the two orderings, with a bootstrap 95% interval over questions; the length-controlled win rate
is AlpacaEval 2's idea: a logistic model of the preference with a length term
tanh(length difference / its std) is fitted (numpy, Newton's method), and the win rate is read
off with the length difference set to zero (without AlpacaEval's per-instruction difficulty
term, which needs many models' judgments). Like AlpacaEval's, it needs hundreds of questions:
with a few dozen, a judge that goes by length alone separates the data and the fit is loose.
"""

import argparse
import email.utils
import hashlib
import http.client
import json
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from eval import cli, fail, outputs_problem, path_clash, read_input, write_output
from eval.questions import read_questions as read_question_file


class JudgeError(RuntimeError):
    """The endpoint cannot be used (bad key, refused request, retries exhausted)."""


# -----------------------------------------------------------------------------
# a deadline for a whole HTTP request
#
# urllib's timeout bounds each socket operation, not the request: a server that drips one byte a
# second never trips it. So each try gets a Deadline, and http.client opens its socket through
# the Deadline, which keeps a handle on it; when the time is up a threading.Timer shuts the socket
# down and whatever read or write is blocked on it fails at once (a proxy's CONNECT tunnel, a TLS
# handshake, the status line, the headers, the body). Not cut short: the DNS lookup, and the connect
# to a host with several addresses that all stall (each is tried for the time left).


class Deadline:
    """Shuts down the connection it opened `seconds` from now, unless close()d first."""

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds
        self.lock, self.sock, self.fired = threading.Lock(), None, False
        self.timer = threading.Timer(seconds, self.fire)
        self.timer.daemon = True  # never holds up the interpreter's exit
        self.timer.start()

    def expired(self):
        return self.fired or time.monotonic() >= self.end

    def connect(self, address, timeout, *args):
        """socket.create_connection, for http.client: within the time left, and watched."""
        left = self.end - time.monotonic()
        if left <= 0:  # (after a slow DNS lookup, or at a redirect)
            raise TimeoutError("no time left to connect")
        sock = socket.create_connection(address, min(timeout, left), *args)
        with self.lock:
            if self.sock is not None:  # a redirect opened a new connection
                self.sock.close()
            # our own handle on the connection: it outlives the object `sock` once TLS wraps it
            # (ssl detaches it), and shutting it down cuts the connection under any TLS layer
            self.sock = sock.dup()
            if self.expired():
                self._cut()
        return sock

    def fire(self):
        with self.lock:
            self.fired = True
            if self.sock is not None:
                self._cut()

    def _cut(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # closed already

    def close(self):
        self.timer.cancel()
        with self.lock:
            if self.sock is not None:
                self.sock.close()


class _Watched:
    """An http.client connection that opens its socket through a Deadline."""

    def __init__(self, *args, deadline, **kwargs):
        super().__init__(*args, **kwargs)
        # http.client opens every socket through this attribute (its own test hook), before any
        # proxy tunnel or TLS handshake
        self._create_connection = deadline.connect


class _HTTPConnection(_Watched, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Watched, http.client.HTTPSConnection):
    pass


class _DeadlineHandler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """urllib's HTTP and HTTPS handlers (so proxies, redirects and errors work as ever), with
    connections opened through `deadline`."""

    def __init__(self, deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(_HTTPConnection, req, deadline=self.deadline)

    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req, context=self._context, deadline=self.deadline)


def retry_after_seconds(value):
    """The wait a Retry-After header asks for, in seconds (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # neither: the exponential backoff applies
    return max(0.0, when.timestamp() - time.time())  # (a date without a zone is taken as local time)


# -----------------------------------------------------------------------------
# the client: OpenAI-compatible chat completions over urllib, retried and cached


class JudgeClient:
    def __init__(self, base_url, model, api_key, cache, *, retries=6, retry_delay=1.0, timeout=300.0,
                 max_retry_wait=60.0, temperature=0.0, max_tokens=2048, max_reply_bytes=2**20):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.retries, self.retry_delay = model, api_key, retries, retry_delay
        self.timeout, self.max_retry_wait, self.max_reply_bytes = timeout, max_retry_wait, max_reply_bytes
        self.temperature, self.max_tokens = temperature, max_tokens
        self.cache_path, self.cache, self.lock = Path(cache), {}, threading.Lock()
        self.calls = self.hits = 0
        if self.cache_path.exists():  # (read_input: never a FIFO; a crash may tear the last line mid-character)
            for line in read_input(self.cache_path, errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.cache[entry["key"]] = entry["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line torn by a crash: that call is made again

    def complete(self, messages):
        """The judge's reply to `messages`, from the cache or the endpoint."""
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        with self.lock:
            if key in self.cache:
                self.hits += 1
                return self.cache[key]
        reply = self._post(body)
        with self.lock:
            self.calls += 1
            self.cache[key] = reply
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "model": self.model, "reply": reply}, ensure_ascii=False) + "\n")
        return reply

    def _post(self, body):
        """The reply's text, after up to `retries` retries; JudgeError when there is none to be had."""
        data = json.dumps(body).encode()
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                backoff = self.retry_delay * 2 ** (attempt - 1) * (1 + 0.25 * random.random())
                time.sleep(min(self.max_retry_wait, backoff if last[1] is None else last[1]))
            reply, last = self._try(data)
            if last is None:
                return reply
        raise JudgeError(f"the judge endpoint {self.url} failed {self.retries + 1} times; last: {last[0]}")

    def _try(self, data):
        """One request: (the reply's text, None), or (None, (what went wrong, the wait the server
        asked for or None)) for a failure worth retrying; JudgeError for one that is not."""
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"}
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        deadline = Deadline(self.timeout)
        opener = urllib.request.build_opener(_DeadlineHandler(deadline))
        try:
            with opener.open(request, timeout=self.timeout) as response:
                body = response.read(self.max_reply_bytes + 1)  # never more: a bound on memory and on the cache
                if len(body) <= self.max_reply_bytes and response.length:  # (read(n) returns a short body quietly)
                    raise http.client.IncompleteRead(body, response.length)
            if len(body) > self.max_reply_bytes:
                why = f"a reply longer than --max_reply_bytes={self.max_reply_bytes}"
            else:
                content = json.loads(body.decode("utf-8"))["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError("content is not text")
                return content, None
        except urllib.error.HTTPError as e:
            try:
                detail = " ".join(e.read(4096).decode("utf-8", "replace")[:300].split())  # on one line
            except (http.client.HTTPException, OSError):
                detail = ""  # the error's body was cut short (or cut off by the deadline)
            if e.code in (401, 403):
                raise JudgeError(f"the judge endpoint {self.url} rejected the API key (HTTP {e.code}): {detail}")
            if e.code != 429 and e.code < 500:
                raise JudgeError(f"the judge endpoint {self.url} refused the request (HTTP {e.code}): {detail}")
            return None, (f"HTTP {e.code}", retry_after_seconds(e.headers.get("Retry-After")))
        except urllib.error.URLError as e:  # (before OSError: it is one) no connection, or none sent
            why = f"no connection ({e.reason})"
        except (http.client.HTTPException, OSError) as e:  # not HTTP, cut short, dropped, or timed out
            why = f"a broken reply ({e!r})"
        except (ValueError, KeyError, IndexError, TypeError) as e:  # a body that is not a completion
            why = f"a malformed response ({e})"
        finally:
            deadline.close()
        return None, (f"no reply within --timeout={self.timeout:g} s" if deadline.expired() else why, None)


def call_all(client, requests, workers):
    """Replies to every request (a list of messages), in order, `workers` at a time."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return list(pool.map(client.complete, requests))
    except JudgeError as e:
        fail(str(e))
    finally:  # no waiting for the calls in flight here: a Ctrl-C (eval.cli) stops at once
        pool.shutdown(wait=False, cancel_futures=True)


# -----------------------------------------------------------------------------
# answers and questions -> {id: (user turns, assistant turns)}


def read_answers(path, questions):
    """{id: (questions' turns, answer turns)} from an AlpacaEval list or an answer JSONL."""
    path, text = Path(path), read_input(path)
    try:
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    except ValueError as e:
        fail(f"{path}: not an answer file ({str(e).splitlines()[0]})")
    out = {}
    for i, r in enumerate(rows if isinstance(rows, list) else [None]):
        where = f"{path}:{i + 1}"
        if isinstance(r, dict) and isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str):
            out[r["instruction"]] = ([r["instruction"]], [r["output"]])
        elif isinstance(r, dict) and "question_id" in r and isinstance(r.get("choices"), list) and r["choices"]:
            turns = [t["content"] if isinstance(t, dict) else t for t in r["choices"][0].get("turns", [])]
            if questions is None:
                fail(f"{path} holds answers by question_id: pass --questions (the benchmark's question file)")
            if r["question_id"] not in questions:
                fail(f"{where}: question_id {r['question_id']!r} is not in the question file")
            if not turns or not all(isinstance(t, str) for t in turns):
                fail(f"{where}: choices[0].turns must be a non-empty list of answers")
            out[r["question_id"]] = (questions[r["question_id"]]["turns"], turns)
        else:
            fail(f"{where}: neither an AlpacaEval answer {{instruction, output}} nor an answer row "
                 "{question_id, choices: [{turns}]}")
    return out


def read_questions(path):
    """{question_id: question} from an MT-Bench or Arena-Hard question file, checked as eval/answers.py does."""
    return None if path is None else {q["id"]: q for q in read_question_file("mtbench", path)}


# -----------------------------------------------------------------------------
# prompts and verdicts

PAIRWISE_SYSTEM = (
    "You are an impartial judge of AI assistants. You will see a user's conversation with two assistants, A "
    "and B. Decide which one served the user better: helpful, correct, complete and clear. The order in which "
    "they are shown and their length must not sway you. Explain your reasoning briefly, then end with your "
    "verdict in exactly this form: [[A]] if A is better, [[B]] if B is better, [[C]] for a tie.")
SINGLE_SYSTEM = (
    "You are an impartial judge of an AI assistant. Rate the assistant's reply to the user's last message "
    "for helpfulness, correctness, depth and clarity{reference}. Explain briefly, then end with your rating "
    "from 1 to 10 in exactly this form: Rating: [[5]]")
VERDICT = re.compile(r"\[\[([ABC])\]\]")
RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")


def show(user_turns, answers, name):
    return "\n\n".join(f"[User]\n{u}\n\n[Assistant {name}]\n{a}" for u, a in zip(user_turns, answers))


def pairwise_request(user_turns, first, second):
    text = (f"<conversation with assistant A>\n{show(user_turns, first, 'A')}\n</conversation with assistant A>\n\n"
            f"<conversation with assistant B>\n{show(user_turns, second, 'B')}\n</conversation with assistant B>")
    return [{"role": "system", "content": PAIRWISE_SYSTEM}, {"role": "user", "content": text}]


def verdict(reply):
    """'A', 'B', 'C' (tie) from the last [[X]] of the reply, or None."""
    found = VERDICT.findall(reply)
    return found[-1] if found else None


def single_request(user_turns, answers, turn, reference=None):
    ref = "; compare it with the reference answer" if reference else ""
    conv = show(user_turns[: turn + 1], answers[: turn + 1], "")
    text = conv + (f"\n\n[Reference answer to the last message]\n{reference}" if reference else "")
    return [{"role": "system", "content": SINGLE_SYSTEM.format(reference=ref)}, {"role": "user", "content": text}]


def rating(reply):
    found = RATING.findall(reply)
    value = float(found[-1]) if found else None
    return value if value is not None and 1 <= value <= 10 else None


# -----------------------------------------------------------------------------
# statistics


def bootstrap_interval(scores, stat, samples, seed):
    """95% percentile interval of stat(resampled indices) over `samples` resamples of the questions."""
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, len(scores), len(scores))) for _ in range(samples)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def fit_length_model(y, length_diff, l2=1e-3, iters=100):
    """(intercept, slope) of P(model preferred) = sigmoid(a + b * tanh(d / std(d))), fitted to soft
    labels y in [0, 1] by Newton's method, with a small ridge on the slope (the fit stays finite
    when the length alone separates the preferences)."""
    y, d = np.asarray(y, float), np.asarray(length_diff, float)
    std = d.std()
    x = np.tanh(d / std) if std > 0 else np.zeros_like(d)
    X = np.stack([np.ones_like(x), x], 1)
    w = np.zeros(2)
    ridge = np.diag([1e-6, l2]) * len(y)  # (a wisp on the intercept keeps a unanimous judge finite)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(X @ w)))
        grad = X.T @ (p - y) + ridge @ w
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def win_rates(scores, length_diff, bootstrap=1000, seed=0):
    """Win rate and length-controlled win rate (both in %), each with a bootstrap 95% interval.

    scores: per question, 1 win / 0.5 tie / 0 loss (averaged over orderings); length_diff: the
    answer's length minus the baseline's, in characters.
    """
    s, d = np.asarray(scores, float), np.asarray(length_diff, float)
    lc = lambda idx: 100 / (1 + np.exp(-fit_length_model(s[idx], d[idx])[0]))  # noqa: E731
    return {"win_rate": 100 * float(s.mean()),
            "win_rate_ci95": [100 * v for v in bootstrap_interval(s, lambda idx: s[idx].mean(), bootstrap, seed)],
            "lc_win_rate": float(lc(np.arange(len(s)))),
            "lc_win_rate_ci95": bootstrap_interval(s, lc, min(bootstrap, 300), seed),
            "questions": len(s)}


# -----------------------------------------------------------------------------
# the three modes


def read_pair(args):
    """(our answers, the baseline's answers, the ids answered in both)."""
    questions = read_questions(args.questions)
    ours, base = read_answers(args.answers, questions), read_answers(args.baseline, questions)
    ids = [i for i in ours if i in base]
    if not ids:
        fail(f"no question is answered in both {args.answers} and {args.baseline}")
    return ours, base, ids


def pairwise(args, client):
    ours, base, ids = read_pair(args)
    requests = []
    for i in ids:  # both orderings cancel the judge's position bias
        user = ours[i][0]
        requests += [pairwise_request(user, ours[i][1], base[i][1]), pairwise_request(user, base[i][1], ours[i][1])]
    replies = call_all(client, requests, args.workers)
    per_question, malformed = [], 0
    for k, i in enumerate(ids):
        first, second = verdict(replies[2 * k]), verdict(replies[2 * k + 1])
        malformed += (first is None) + (second is None)
        got = [{"A": 1.0, "B": 0.0, "C": 0.5}[first]] if first else []
        got += [{"A": 0.0, "B": 1.0, "C": 0.5}[second]] if second else []
        if got:
            length = sum(map(len, ours[i][1])) - sum(map(len, base[i][1]))
            per_question.append({"id": i, "score": sum(got) / len(got), "verdicts": [first, second],
                                 "length_diff": length})
    if not per_question:
        fail("no judge reply had a verdict ([[A]], [[B]] or [[C]]); check --judge_model")
    result = win_rates([q["score"] for q in per_question], [q["length_diff"] for q in per_question],
                       args.bootstrap, args.seed)
    return {**result, "malformed_replies": malformed, "per_question": per_question}


def single(args, client):
    questions = read_questions(args.questions)
    if questions is None:
        fail("single-answer grading needs --questions (MT-Bench's question.jsonl)")
    ours = read_answers(args.answers, questions)
    refs = read_answers(args.references, questions) if args.references else {}
    jobs = [(i, t) for i in ours for t in range(len(ours[i][1]))]
    requests = [single_request(*ours[i], t, refs[i][1][t] if i in refs and t < len(refs[i][1]) and
                               questions[i].get("category") in args.reference_categories else None)
                for i, t in jobs]
    replies = call_all(client, requests, args.workers)
    ratings = [(i, t, rating(r)) for (i, t), r in zip(jobs, replies)]
    valid = [(i, t, r) for i, t, r in ratings if r is not None]
    if not valid:
        fail("no judge reply had a rating ([[1]] to [[10]]); check --judge_model")
    by = lambda f: {k: float(np.mean([r for i, t, r in valid if f(i, t) == k]))  # noqa: E731
                    for k in sorted({f(i, t) for i, t, _ in valid}, key=str)}
    return {"score": float(np.mean([r for _, _, r in valid])), "per_turn": by(lambda i, t: t + 1),
            "per_category": by(lambda i, t: questions[i].get("category", "")), "ratings": len(valid),
            "malformed_replies": len(ratings) - len(valid),
            "per_question": [{"id": i, "turn": t + 1, "rating": r} for i, t, r in ratings]}


def reward_model(args):
    """Score both answer sets with eval/score.py (first turn), then the reward model's win rate."""
    from eval import score

    ours, base, ids = read_pair(args)
    pairs, scored = rm_files(Path(args.out))
    rows = [{"prompt_id": str(k), "prompt": [{"role": "user", "content": ours[i][0][0]}],
             "responses": [ours[i][1][0], base[i][1][0]]} for k, i in enumerate(ids)]
    write_output(pairs, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    score.main([f"--reward_model={args.reward_model}", f"--data={pairs}", f"--out={scored}",
                f"--dtype={args.dtype}", f"--batch_size={args.batch_size}", "--overwrite"]
               + (["--trust_remote_code"] if args.trust_remote_code else []))
    if os.environ.get("RANK", "0") != "0":
        sys.exit(0)
    got = {r["prompt_id"]: r["scores"] for r in map(json.loads, read_input(scored).splitlines())}
    margins = [got[str(k)][0] - got[str(k)][1] for k in range(len(ids))]
    s = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    lengths = [len(ours[i][1][0]) - len(base[i][1][0]) for i in ids]
    return {**win_rates(s, lengths, args.bootstrap, args.seed), "mean_reward_margin": float(np.mean(margins)),
            "per_question": [{"id": i, "score": x, "reward_margin": m} for i, x, m in zip(ids, s, margins)]}


def rm_files(out):
    """rm mode's own files beside --out: the answer pairs to score, and their scores."""
    return out.with_name(out.name + ".pairs.jsonl"), out.with_name(out.name + ".scored.jsonl")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m eval.judge", description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("pairwise", "single", "rm"))
    ap.add_argument("--answers", required=True, help="the model's answers")
    ap.add_argument("--baseline", help="the baseline's answers (pairwise, rm)")
    ap.add_argument("--questions", help="the question file, for answers keyed by question_id")
    ap.add_argument("--references", help="(single) reference answers, used for --reference_categories")
    ap.add_argument("--reference_categories", default="math,reasoning,coding")
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--base_url", default="https://api.openai.com/v1", help="OpenAI-compatible endpoint")
    ap.add_argument("--judge_model", default="gpt-4o")
    ap.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the key")
    ap.add_argument("--cache", default="", help="judgment cache (default: beside --out)")
    ap.add_argument("--workers", type=int, default=8, help="parallel requests")
    ap.add_argument("--retries", type=int, default=6)
    ap.add_argument("--retry_delay", type=float, default=2.0, help="first backoff in seconds (doubles)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds for a whole request (connect, send, status, headers, body); then it is retried")
    ap.add_argument("--max_retry_wait", type=float, default=60.0,
                    help="longest wait in seconds between tries: caps a server's Retry-After and the backoff")
    ap.add_argument("--max_tokens", type=int, default=2048, help="of the judge's reply")
    ap.add_argument("--max_reply_bytes", type=int, default=2**20,
                    help="longest reply body read (bytes); a longer one counts as a failed try")
    ap.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% intervals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reward_model", help="(rm) local folder or hub id")
    ap.add_argument("--dtype", default="bfloat16", help="(rm)")
    ap.add_argument("--batch_size", type=int, default=8, help="(rm)")
    ap.add_argument("--trust_remote_code", action="store_true", help="(rm)")
    args = ap.parse_args(argv)
    if args.mode in ("pairwise", "rm") and not args.baseline:
        ap.error(f"{args.mode} needs --baseline")
    if args.mode == "rm" and not args.reward_model:
        ap.error("rm needs --reward_model")
    if args.workers < 1 or args.retries < 0 or args.bootstrap < 1 or args.max_reply_bytes < 1:
        ap.error("--workers, --bootstrap and --max_reply_bytes must be >= 1 and --retries >= 0")
    if not args.timeout > 0 or not args.max_retry_wait >= 0:
        ap.error("--timeout must be > 0 and --max_retry_wait >= 0")
    args.reference_categories = set(args.reference_categories.split(","))
    return args


def main(argv):
    args = parse_args(argv)
    out = Path(args.out)
    inputs = [args.answers, args.baseline, args.questions, args.references]
    if args.mode == "rm":
        made, inputs = list(rm_files(out)), inputs + [args.reward_model]
    else:  # the judgment cache: read, then appended to
        made = [Path(args.cache or out.with_name(out.name + ".cache.jsonl"))]
    if problem := outputs_problem([out, *made], inputs) or path_clash([out], made):
        fail(problem)
    if args.mode == "rm":
        result = reward_model(args)
    else:
        key = os.environ.get(args.api_key_env)
        if not key:
            fail(f"set the judge's API key in ${args.api_key_env} (or name another variable with --api_key_env)")
        client = JudgeClient(args.base_url, args.judge_model, key, made[0], retries=args.retries,
                             retry_delay=args.retry_delay, timeout=args.timeout, max_retry_wait=args.max_retry_wait,
                             max_tokens=args.max_tokens, max_reply_bytes=args.max_reply_bytes)
        result = (pairwise if args.mode == "pairwise" else single)(args, client)
        result["judge"] = {"model": args.judge_model, "base_url": args.base_url, "calls": client.calls,
                           "cached": client.hits}
    try:
        write_output(out, json.dumps({"mode": args.mode, "answers": args.answers, "baseline": args.baseline,
                                      **result}, indent=1, ensure_ascii=False) + "\n")
    except OSError as e:  # e.g. a read-only folder: the judgments stay in the cache
        fail(f"cannot write {out} ({e.strerror or e})")
    summary = {k: v for k, v in result.items() if k not in ("per_question",)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    cli(main)
