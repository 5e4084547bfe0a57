import math

import pytest
import torch
import torch.nn.functional as F

from training import get_lr
from wrpo import get_alpha, row_metrics, wrpo_loss


def _dpo(pc, pr, rc, rr, beta):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def test_hand_computed_values():
    """beta = 0.5, alpha = 0.25.

    row 0: policy (ws, wt, l) = (-1, -2, -3), reference = (-1.5, -1, -2)
        d_ws = 0.5, d_wt = -1, d_l = -1
        weighted chosen = 0.25 * 0.5 + 0.75 * (-1) = -0.625
        z = 0.5 * (-0.625 - (-1)) = 0.1875,  loss = -log sigmoid(0.1875) = log(1 + e^-0.1875)
        rewards: source 0.25, target -0.5, chosen -0.3125, rejected -0.5
    row 1: everything 0, so z = 0 and loss = log 2, every reward 0.
    """
    pol = torch.tensor([[-1.0, 0.0], [-2.0, 0.0], [-3.0, 0.0]])
    ref = torch.tensor([[-1.5, 0.0], [-1.0, 0.0], [-2.0, 0.0]])
    losses, rewards = wrpo_loss(*pol, *ref, alpha=0.25, beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([math.log(1 + math.exp(-0.1875)), math.log(2)]))
    torch.testing.assert_close(rewards["source_chosen"], torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(rewards["target_chosen"], torch.tensor([-0.5, 0.0]))
    torch.testing.assert_close(rewards["chosen"], torch.tensor([-0.3125, 0.0]))
    torch.testing.assert_close(rewards["rejected"], torch.tensor([-0.5, 0.0]))


def test_alpha_endpoints_are_dpo():
    g = torch.Generator().manual_seed(1)
    pws, pwt, pl, rws, rwt, rl = (torch.randn(7, generator=g, dtype=torch.float64) * 20 for _ in range(6))
    beta = 0.1
    loss0, _ = wrpo_loss(pws, pwt, pl, rws, rwt, rl, alpha=0.0, beta=beta)
    loss1, _ = wrpo_loss(pws, pwt, pl, rws, rwt, rl, alpha=1.0, beta=beta)
    torch.testing.assert_close(loss0, _dpo(pwt, pl, rwt, rl, beta))
    torch.testing.assert_close(loss1, _dpo(pws, pl, rws, rl, beta))
    loss_mid, _ = wrpo_loss(pws, pwt, pl, rws, rwt, rl, alpha=0.5, beta=beta)
    assert not torch.allclose(loss_mid, loss0)


def test_gradients_match_hand_derivation_and_finite_differences():
    """dL/dz = -sigmoid(-z); dz/d(policy ws, wt, l) = beta * (alpha, 1 - alpha, -1); reference: the negatives."""
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(6)]
    alpha, beta = 0.3, 0.7
    losses, _ = wrpo_loss(*inputs, alpha=alpha, beta=beta)
    losses.sum().backward()
    pws, pwt, pl, rws, rwt, rl = (t.detach() for t in inputs)
    z = beta * (alpha * (pws - rws) + (1 - alpha) * (pwt - rwt) - (pl - rl))
    dz = -torch.sigmoid(-z)
    expected = [dz * beta * alpha, dz * beta * (1 - alpha), -dz * beta]
    expected += [-e for e in expected]
    for t, e in zip(inputs, expected):
        torch.testing.assert_close(t.grad, e, rtol=1e-12, atol=1e-12)
    fresh = [t.detach().clone().requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(lambda *x: wrpo_loss(*x, alpha=alpha, beta=beta)[0], fresh)


def test_accuracies_are_per_row_for_any_batch_size():
    """The reference code broadcast target accuracy wrongly for batch > 1; here each row is its own."""
    losses = torch.zeros(3)
    rewards = {"source_chosen": torch.tensor([1.0, -1.0, 0.0]), "target_chosen": torch.tensor([-1.0, 2.0, 0.0]),
               "chosen": torch.tensor([0.5, 0.0, 0.0]), "rejected": torch.tensor([0.0, 0.0, 0.0])}
    logps = {"source_chosen": torch.zeros(3), "target_chosen": torch.zeros(3), "rejected": torch.zeros(3)}
    m = row_metrics(losses, rewards, logps)
    torch.testing.assert_close(m["rewards/source_accuracies"], torch.tensor([1.0, 0.0, 0.5]))
    torch.testing.assert_close(m["rewards/target_accuracies"], torch.tensor([0.0, 1.0, 0.5]))
    torch.testing.assert_close(m["rewards/accuracies"], torch.tensor([1.0, 0.5, 0.5]))
    torch.testing.assert_close(m["rewards/margins"], torch.tensor([0.5, 0.0, 0.0]))


def test_lr_schedule():
    """100 steps, warmup ratio 0.1 -> 10 warmup steps; peak 1e-3.

    step 0: 0; step 5: half the peak; step 10 (end of warmup): peak;
    step 55 (halfway through the 90 cosine steps): peak / 2; step 99 (last update): peak * (1 + cos(pi * 89/90)) / 2.
    """
    lr = 1e-3
    assert get_lr(0, 100, lr, 0.1) == 0.0
    assert math.isclose(get_lr(5, 100, lr, 0.1), 0.5e-3)
    assert math.isclose(get_lr(10, 100, lr, 0.1), 1e-3)
    assert math.isclose(get_lr(55, 100, lr, 0.1), 0.5e-3)
    assert math.isclose(get_lr(99, 100, lr, 0.1), lr * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert get_lr(100, 100, lr, 0.1) == 0.0
    assert math.isclose(get_lr(0, 100, lr, 0.0), lr)  # no warmup
    # warmup steps round up, as in the Hugging Face schedule: ceil(0.1 * 311) = 32
    assert get_lr(31, 311, lr, 0.1) < lr and math.isclose(get_lr(32, 311, lr, 0.1), lr)


def test_alpha_schedule():
    """Linear from 0 at step 0 to alpha at the last step (total - 1); constant ignores the step."""
    assert get_alpha(0, 311, 0.1, "linear") == 0.0
    assert math.isclose(get_alpha(155, 311, 0.1, "linear"), 0.05)
    assert math.isclose(get_alpha(310, 311, 0.1, "linear"), 0.1)
    assert math.isclose(get_alpha(400, 311, 0.1, "linear"), 0.1)  # clamped
    assert get_alpha(0, 311, 0.1, "constant") == 0.1 == get_alpha(310, 311, 0.1, "constant")
    assert get_alpha(0, 1, 0.1, "linear") == 0.0


def test_loss_variants_hand_computed():
    """The same rows as test_hand_computed_values: weighted margin h = -0.625 - (-1) = 0.375 (row 1: 0).

    ipo:   (h - 1 / (2 beta))^2 = (0.375 - 1)^2 = 0.390625; row 1: (0 - 1)^2 = 1
    simpo: -log sigmoid(beta h - gamma), gamma 0.3: log(1 + e^0.1125); row 1: log(1 + e^0.3)
    """
    pol = torch.tensor([[-1.0, 0.0], [-2.0, 0.0], [-3.0, 0.0]])
    ref = torch.tensor([[-1.5, 0.0], [-1.0, 0.0], [-2.0, 0.0]])
    ipo, rewards = wrpo_loss(*pol, *ref, alpha=0.25, beta=0.5, loss_type="ipo")
    torch.testing.assert_close(ipo, torch.tensor([0.390625, 1.0]))
    torch.testing.assert_close(rewards["chosen"], torch.tensor([-0.3125, 0.0]))  # rewards do not depend on the loss
    simpo, _ = wrpo_loss(*pol, *ref, alpha=0.25, beta=0.5, loss_type="simpo", gamma=0.3)
    torch.testing.assert_close(simpo, torch.tensor([math.log(1 + math.exp(0.1125)), math.log(1 + math.exp(0.3))]))
    sigmoid, _ = wrpo_loss(*pol, *ref, alpha=0.25, beta=0.5, loss_type="simpo", gamma=0.0)
    torch.testing.assert_close(sigmoid, wrpo_loss(*pol, *ref, alpha=0.25, beta=0.5)[0])  # gamma 0: DPO's form
    with pytest.raises(ValueError, match="loss_type"):
        wrpo_loss(*pol, *ref, alpha=0.25, beta=0.5, loss_type="hinge")


def test_simpo_uses_length_averaged_logps_and_no_reference(monkeypatch):
    """Sequences (ws, wt, l) sum to (-4, -6, -3) over (2, 3, 1) tokens: averages (-2, -2, -3).

    alpha 0.5, beta 2, gamma 0.5: h = 0.5 (-2) + 0.5 (-2) - (-3) = 1, loss = log(1 + e^-(2 - 0.5)).
    """
    import wrpo

    sums, counts = torch.tensor([-4.0, -6.0, -3.0]), torch.tensor([2, 3, 1])
    monkeypatch.setattr(wrpo, "model_sequence_logps", lambda model, batch: (sums, counts))
    batch = {"src": torch.tensor([[0]]), "src_w": torch.tensor([[1.0]]), "wt": torch.tensor([1]),
             "rej": torch.tensor([2])}
    simpo = wrpo.Config(beta=2.0, loss_type="simpo", gamma=0.5)
    losses, rewards, logps = wrpo.preference_forward(None, batch, None, [0], 0.5, simpo)
    torch.testing.assert_close(losses, torch.tensor([math.log(1 + math.exp(-1.5))]))
    torch.testing.assert_close(logps["rejected"], torch.tensor([-3.0]))
    torch.testing.assert_close(rewards["source_chosen"], torch.tensor([-4.0]))  # beta x average log-prob
    losses, _, _ = wrpo.preference_forward(None, batch, torch.tensor([[-1.0, -1.0, -1.0]]), [0], 0.5,
                                           wrpo.Config(beta=2.0))
    # sigmoid: summed log-probs minus the reference: d = (-3, -5, -2), h = 0.5 (-3) + 0.5 (-5) + 2 = -2
    torch.testing.assert_close(losses, -F.logsigmoid(torch.tensor([2.0 * -2.0])))
