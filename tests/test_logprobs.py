import torch

from data import IGNORE
from logprobs import sequence_logps, token_logps


def test_summed_logps_equal_naive_loop():
    g = torch.Generator().manual_seed(0)
    N, T, V = 3, 11, 37
    logits = torch.randn(N, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, :4] = IGNORE  # prompt
    labels[1, 7:] = IGNORE  # padding
    labels[2, :] = IGNORE  # nothing to score
    got, counts = sequence_logps(logits, labels)
    for n in range(N):
        total, count = 0.0, 0
        for t in range(1, T):  # logits at t - 1 predict token t
            if labels[n, t] != IGNORE:
                probs = torch.softmax(logits[n, t - 1], dim=-1)
                total += torch.log(probs[labels[n, t]]).item()
                count += 1
        assert abs(got[n].item() - total) < 1e-9
        assert counts[n].item() == count
    assert got[2].item() == 0.0


def test_bf16_logits_are_scored_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 50, generator=g).bfloat16()
    labels = torch.randint(0, 50, (2, 6), generator=g)
    logps, mask = token_logps(logits, labels)
    assert logps.dtype == torch.float32 and mask.all()
    ref = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, labels[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logps.double(), ref, rtol=0, atol=1e-5)
