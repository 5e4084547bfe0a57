"""The CPU fusion benchmark end to end, shortened: one seed, few prompts and epochs."""

import json
import random

import pytest

from conftest import REPO


@pytest.mark.slow
def test_toy_fusion_pipeline_runs_end_to_end(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import toy_fusion

    table = toy_fusion.main(["--seeds=1", "--quick", f"--out_dir={tmp_path}"])
    models = ["Target", "Target-SFT", "Target-SFT-DPO", "Target-SFT-WRPO", "Target-SFT-WRPO (constant alpha)",
              "Target-SFT-WRPO K=3 uniform", "Target-SFT-WRPO K=3 softmax", "Target-SFT-DPO same-source pairs"]
    assert list(table) == models
    for cols in table.values():
        assert set(cols) == {"all", "reverse", "shift", "sort", "upper"}
        assert all(0.0 <= v[0] <= 1.0 for v in cols.values())
    seed = tmp_path / "seed0"
    rows = [json.loads(x) for x in (seed / "wrpo_rows.jsonl").read_text().splitlines()]
    assert rows and all(r["scores"]["y_wt"] > r["scores"]["y_l"] for r in rows)
    assert all(r["scores"]["y_ws"] >= 0.9 for r in rows)  # the best of three sources x 5 samples
    for name in ("Target-SFT-DPO", "Target-SFT-WRPO", "Target-SFT-WRPO_constant_alpha"):
        alphas = [json.loads(x)["alpha"] for x in (seed / name / "metrics.jsonl").read_text().splitlines()
                  if "alpha" in json.loads(x)]
        assert {"Target-SFT-DPO": alphas[-1] == 0.0, "Target-SFT-WRPO": alphas[0] == 0.0 < alphas[-1] == 0.5,
                "Target-SFT-WRPO_constant_alpha": alphas[0] == alphas[-1] == 0.5}[name], (name, alphas)
    for weights in ("uniform", "softmax"):  # one source response of each source model, weighted
        rows = [json.loads(x) for x in (seed / f"wrpo_rows_k3_{weights}.jsonl").read_text().splitlines()]
        assert rows and all(len(r["chosen"]) == 4 and sorted(r["source_model"]) == sorted(toy_fusion.SOURCES)
                            for r in rows)
        assert all(abs(sum(r["source_weights"]) - 1) < 1e-9 for r in rows)
        uniform = all(r["source_weights"] == [1 / 3] * 3 for r in rows)
        assert uniform == (weights == "uniform")
    pairs = [json.loads(x) for x in (seed / "same_source_rows.jsonl").read_text().splitlines()]
    assert pairs and all(0.05 <= r["scores"]["chosen"] - r["scores"]["rejected"] <= 0.5 for r in pairs)
    results = json.loads((tmp_path / "results.json").read_text())
    rewards = results["per_seed_rewards"][0]
    assert list(rewards) == models[2:] and all(set(r) == {"y_ws", "y_wt", "y_l"} for r in rewards.values())
    assert all(r["y_wt"] > r["y_l"] for r in rewards.values())  # every preference run separated its pairs


def test_reward_and_sources():
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import toy_fusion

    assert toy_fusion.answer("reverse: abc") == "cba" and toy_fusion.answer("shift: abz") == "bca"
    assert toy_fusion.answer("sort: cab") == "abc" and toy_fusion.answer("upper: abc") == "ABC"
    # the target's teacher: right or its task's one systematic mistake, about bug_rate of the time wrong
    teacher = [toy_fusion.weak_answer(rng, "sort: cab", 0.8) for rng in [random.Random(i) for i in range(500)]]
    assert set(teacher) == {"abc", "cba"} and 0.7 < teacher.count("cba") / 500 < 0.9
    assert {toy_fusion.BUGS[t]("abc") for t in toy_fusion.TASKS} == {"abc", "cba", "Abc", "zab"}
    assert toy_fusion.reward("reverse: abcd", "dcba") == 1.0
    assert 0 < toy_fusion.reward("reverse: abcd", "dcbx") < 1 and toy_fusion.reward("reverse: abcd", "") == 0
    rng = random.Random(0)
    good = [toy_fusion.reward("sort: hgfedcba", toy_fusion.sloppy(rng, "abcdefgh", 0.03)) for _ in range(200)]
    bad = [toy_fusion.reward("sort: hgfedcba", toy_fusion.sloppy(rng, "abcdefgh", 0.5)) for _ in range(200)]
    assert sum(good) / 200 > 0.9 > 0.7 > sum(bad) / 200  # an expert is reliable, a non-expert sloppy
