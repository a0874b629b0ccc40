"""When a run counts as diverged: non-finite, or stuck far above the uniform guess; the same in both engines."""

import math

import pytest
import torch
from conftest import LECTURE_SEED

from actgrad.training import loop as reference
from actgrad.training.divergence import NON_FINITE, DivergenceRule
from actgrad.training.engine import train_batched
from actgrad.training.networks import LECTURE_NETWORKS

UNIFORM = -math.log(1 / 27)


def test_the_limit_is_a_multiple_of_the_uniform_guess_and_the_rule_says_so():
    rule = DivergenceRule(loss_multiple=10, window=1000)
    assert rule.loss_limit == pytest.approx(10 * UNIFORM) and round(rule.loss_limit, 2) == 32.96
    assert rule.window_rule == "loss above 10 × the uniform guess (32.96) for 1,000 steps"
    with pytest.raises(ValueError, match="window"):
        DivergenceRule(window=0)
    with pytest.raises(ValueError, match="loss_multiple"):
        DivergenceRule(loss_multiple=0)


def test_a_non_finite_loss_fires_at_once():
    rule = DivergenceRule(window=5)
    for bad in (float("nan"), float("inf"), float("-inf")):
        [found] = rule.first(torch.tensor([3.0, 2.5, bad, 2.0]), 0, 0)
        assert found.step == 2 and found.rule == NON_FINITE


def test_the_window_rule_needs_every_loss_of_the_window_above_the_limit():
    rule = DivergenceRule(loss_multiple=2, window=4)  # limit 6.59
    high, low = 100.0, 3.0
    assert rule.first(torch.tensor([high, high, high, low, high, high, high]), 0, 0) == [None]  # broken stretch
    [found] = rule.first(torch.tensor([low, high, high, high, high, high]), 0, 0)
    assert found.step == 4 and found.rule == rule.window_rule  # the window's last step
    # exactly at the limit is not above it
    assert rule.first(torch.full((10,), rule.loss_limit), 0, 0) == [None]


def test_the_window_reaches_back_into_steps_already_checked():
    """Checked every 3 steps, a stretch that began before the last check still counts."""
    rule = DivergenceRule(loss_multiple=2, window=4)
    losses = torch.tensor([3.0, 3.0, 50.0, 50.0, 50.0, 50.0, 3.0])
    assert rule.first(losses[:3], 0, 0) == [None]
    start = max(0, 3 - rule.history())
    [found] = rule.first(losses[start:6], start, 3)
    assert found.step == 5
    # and a stretch that fired before the checked part is not reported again there
    assert rule.first(torch.tensor([50.0] * 5 + [3.0, 3.0]), 0, 5) == [None]


def test_columns_are_models():
    rule = DivergenceRule(loss_multiple=2, window=2)
    losses = torch.tensor([[3.0, 3.0, 3.0], [3.0, 50.0, float("nan")], [3.0, 50.0, 3.0]])
    found = rule.first(losses, 0, 0)
    assert found[0] is None and (found[1].step, found[1].rule) == (2, rule.window_rule)
    assert (found[2].step, found[2].rule) == (1, NON_FINITE)


def test_a_badly_initialised_net_that_recovers_is_not_flagged(splits):
    """The lecture's `original` init starts at loss 27.9, confidently wrong, and trains normally."""
    Xtr, Ytr = splits["splits"]["train"]
    spec = dict(LECTURE_NETWORKS["shallow"], init={"C": 1, "W1": 1, "b1": 1, "W2": 1, "b2": 1})
    net, g = reference.init_network(spec, LECTURE_SEED, 3)
    res = reference.train_reference(net, g, Xtr, Ytr, steps=1200, batch_size=32, lr_schedule=spec["lr_schedule"])
    assert res.losses[0] > 27 and res.diverged_at is None and res.diverged_rule is None
    assert res.steps_done == 1200


@pytest.mark.parametrize("engine", ["reference", "batched"])
def test_a_deep_net_stuck_far_above_the_uniform_guess_is_flagged(engine, splits):
    """Issue 18's case: no BatchNorm, gain 1000, lr 100 sits near loss 579 and used to be reported ok."""
    Xtr, Ytr = splits["splits"]["train"]
    spec = dict(LECTURE_NETWORKS["deep"], gain=1000.0)
    schedule = [{"from_step": 0, "lr": 100.0}]
    net, g = reference.init_network(spec, 1, 3)
    if engine == "reference":
        res = reference.train_reference(net, g, Xtr, Ytr, steps=1500, batch_size=32, lr_schedule=schedule)
    else:
        [res] = train_batched([net], [g], Xtr, Ytr, steps=1500, batch_size=32, lr_schedule=schedule)
    assert torch.isfinite(res.losses).all() and res.losses[1:].min() > 10 * UNIFORM
    assert res.diverged_at == 1000 and res.steps_done == 1001  # losses above the limit from step 1 on
    assert res.diverged_rule == "loss above 10 × the uniform guess (32.96) for 1,000 steps"


def test_both_engines_agree_on_where_and_why(splits):
    Xtr, Ytr = splits["splits"]["train"]
    rule = DivergenceRule(loss_multiple=10, window=30)
    spec = dict(LECTURE_NETWORKS["deep"], n_layers=2, n_hidden=32, gain=1000.0)
    schedule = [{"from_step": 0, "lr": 100.0}]
    nets, gens = zip(*[reference.init_network(spec, seed, 3) for seed in (1, 2)])
    batched = train_batched(list(nets), list(gens), Xtr, Ytr, steps=200, batch_size=32, lr_schedule=schedule,
                            divergence=rule, divergence_check_every=25)
    for seed, res in zip((1, 2), batched):
        net, g = reference.init_network(spec, seed, 3)
        ref = reference.train_reference(net, g, Xtr, Ytr, steps=200, batch_size=32, lr_schedule=schedule,
                                    divergence=rule, divergence_check_every=25)
        assert (res.diverged_at, res.diverged_rule, res.steps_done) == (ref.diverged_at, ref.diverged_rule,
                                                                        ref.steps_done)
        assert res.diverged_rule is not None
