"""The fusion-data pipeline and the evaluation, run from the repository root as modules:

    python -m eval.split ...            prompts -> an SFT part and a WRPO part (by prompt_id)
    torchrun --nproc_per_node=8 -m eval.generate ...   samples of a model for each prompt
    torchrun --nproc_per_node=8 -m eval.score ...      reward-model scores of the samples
    python -m eval.build ...            WRPO rows (or SFT rows) from the scored samples
    torchrun --nproc_per_node=8 -m eval.answers ...    AlpacaEval 2, MT-Bench, Arena-Hard answers
    python -m eval.judge ...            local judging: an LLM judge over HTTP, or a reward model
    python -m eval.implicit_reward ...  held-out implicit-reward accuracy of a policy
    python -m eval.plot ...             curves of a run's metrics.jsonl

judge (but for its rm mode), plot and questions do not import torch: they run where only the standard library
and numpy are installed.
"""

import sys


def fail(message):
    """A user error: one line on stderr and exit status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
