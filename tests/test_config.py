import json

import pytest

from training import ConfigError, config_problems, parse_config
from wrpo import Config, wrpo_problems


def test_defaults_are_the_papers():
    c = Config()
    assert (c.beta, c.alpha, c.alpha_schedule, c.lr, c.warmup_ratio) == (0.01, 0.1, "linear", 3e-7, 0.1)
    assert (c.global_batch_size, c.epochs, c.max_length, c.max_prompt_length, c.seed) == (128, 1, 2048, 1800, 42)
    assert (c.grad_clip, c.dtype) == (1.0, "bfloat16")


def test_overrides_are_typed(tmp_path):
    c = parse_config(Config, ["--beta=0.05", "--epochs=2", "--trust_remote_code=true", "--lr=1", "--out_dir=x"])
    assert c.beta == 0.05 and c.epochs == 2 and c.trust_remote_code is True and c.lr == 1.0 and c.out_dir == "x"
    assert isinstance(c.lr, float)
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"beta": 0.2, "epochs": 3, "data": "d.jsonl"}))
    c = parse_config(Config, [f"--config={cfg_file}", "--epochs=4"])  # the command line wins
    assert (c.beta, c.epochs, c.data) == (0.2, 4, "d.jsonl")
    c = parse_config(Config, ["--trust_remote_code", "--allow_special_tokens"])  # a bare flag is true, as in eval/
    assert c.trust_remote_code is True and c.allow_special_tokens is True


@pytest.mark.parametrize("args,msg", [
    (["--epochs=1.5"], "epochs must be int"),
    (["--beta=high"], "beta must be float"),
    (["--trust_remote_code=maybe"], "trust_remote_code must be bool"),
    (["--nope=1"], "unknown setting 'nope'"),
    (["--beta"], "expected --key=value"),  # only a true/false setting may stand alone
    (["beta=1"], "expected --key=value"),
    (["--config=/no/such.json"], "cannot read JSON config"),
])
def test_bad_overrides(args, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_config(Config, args)


def test_bad_json_config_value(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"epochs": "two"}))
    with pytest.raises(ConfigError, match=r"c\.json: epochs must be int"):
        parse_config(Config, [f"--config={cfg_file}"])


@pytest.mark.parametrize("overrides,world,msg", [
    ({"beta": 0.0}, 1, "beta must be > 0"),
    ({"alpha": 1.5}, 1, r"alpha must be in \[0, 1\]"),
    ({"alpha_schedule": "cosine"}, 1, "alpha_schedule must be"),
    ({"global_batch_size": 13, "micro_batch_size": 4}, 2, "global_batch_size 13 must be a multiple of the world size"),
    ({"micro_batch_size": 0}, 1, "micro_batch_size must be >= 1"),
    ({"dtype": "fp8"}, 1, "dtype must be one of"),
    ({"recipe": "paper"}, 1, "recipe must be one of default, authors, got 'paper'"),
    ({"activation_checkpointing": "yes"}, 1, "activation_checkpointing must be"),
])
def test_config_problems(overrides, world, msg):
    import re

    cfg = Config(**overrides)
    problems = wrpo_problems(cfg) + config_problems(cfg, world)
    assert len(problems) == 1 and re.search(msg, problems[0]), problems
    fine = Config(global_batch_size=16, micro_batch_size=4)
    assert wrpo_problems(fine) + config_problems(fine, 2) == []


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("name", ["wrpo.json", "wrpo_after_sft.json", "sft.json"])
def test_demo_configs_fit_every_world_size(name, world):
    """The card's own command, torchrun --nproc_per_node=8 wrpo.py --config=demo/wrpo.json, was refused because
    micro_batch_size 8 x 8 ranks did not divide global_batch_size 16, though packing never uses it: a micro-batch
    count that does not divide a rank's rows leaves a smaller last micro-batch instead."""
    import data
    import sft
    from conftest import REPO

    def sft_problems(c):
        return data.settings_problems("sft", c.max_length, c.truncation, loss_on=c.loss_on)

    cls, extra = (sft.Config, sft_problems) if name == "sft.json" else (Config, wrpo_problems)
    cfg = parse_config(cls, [f"--config={REPO / 'demo' / name}"])
    assert extra(cfg) + config_problems(cfg, world) == []


def test_readme_documents_every_setting():
    import dataclasses

    from conftest import REPO

    import sft

    readme = (REPO / "README.md").read_text()
    fields = dataclasses.fields(Config) + dataclasses.fields(sft.Config)
    missing = [f.name for f in fields if f"`{f.name}`" not in readme]
    assert not missing, f"README settings table lacks {missing}"
