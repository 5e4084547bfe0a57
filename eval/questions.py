"""The benchmarks' question files, read and checked: AlpacaEval 2's JSON list, MT-Bench's and Arena-Hard's JSONL.

eval/answers.py answers them; eval/judge.py reads them for the questions' categories and turns. No torch here.
"""

import json
from pathlib import Path

from eval import fail, read_input


def read_questions(benchmark, path):
    """[{"id", "turns": [str, ...], "category" or "dataset"}] from a question file, every question checked."""
    path, text = Path(path), read_input(path)
    try:
        if benchmark == "alpaca":
            rows = json.loads(text)
            if not isinstance(rows, list):
                raise ValueError("expected a JSON list of {instruction, dataset} rows")
            numbered = [(f"{path}:row {i}", r) for i, r in enumerate(rows)]
        else:
            lines = enumerate(text.splitlines(), 1)
            numbered = [(f"{path}:{i}", json.loads(line)) for i, line in lines if line.strip()]
    except ValueError as e:
        fail(f"{path}: not a {benchmark} question file ({str(e).splitlines()[0]})")
    questions, errors = [], []
    for where, q in numbered:
        try:
            questions.append(_question(benchmark, q))
        except ValueError as e:
            errors.append(f"{where}: {e}")
    if errors:
        fail(f"{len(errors)} bad question(s) in {path}:\n  " + "\n  ".join(errors[:20]))
    if not questions:
        fail(f"{path}: no questions")
    ids = [q["id"] for q in questions]
    if len(set(ids)) != len(ids):
        fail(f"{path}: a question appears twice")
    return questions


def _text(x, what):
    if not isinstance(x, str) or not x.strip():
        raise ValueError(f"{what} must be a non-empty string")
    return x


def _question(benchmark, q):
    if not isinstance(q, dict):
        raise ValueError(f"a question must be a JSON object, got {type(q).__name__}")
    if benchmark == "alpaca":
        instruction = _text(q.get("instruction"), "instruction")
        return {"id": instruction, "turns": [instruction], "dataset": q.get("dataset", "")}
    if "question_id" not in q or not isinstance(q.get("turns"), list) or not q["turns"]:
        raise ValueError("needs question_id and a non-empty list of turns")
    # MT-Bench's turns are strings, Arena-Hard's {"content": ...}; either is read
    turns = [_text(t.get("content") if isinstance(t, dict) else t, "every turn") for t in q["turns"]]
    return {"id": q["question_id"], "turns": turns, "category": q.get("category", "")}
