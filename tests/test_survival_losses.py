"""Cox and discrete-time losses against direct reference computations; heads and Breslow survival vs sksurv."""

import math

import numpy as np
import pytest
import torch

from histomim.multimodal.heads import (
    CoxHead,
    DiscreteTimeHead,
    discrete_risk,
    hazards_to_survival,
)
from histomim.multimodal.losses import (
    cox_partial_likelihood_loss,
    discrete_time_nll_loss,
)
from histomim.survival.curves import BreslowBaseline, discrete_survival_at
from histomim.survival.labels import split_survival, survival_from_arrays

# five patients; two events tied at t=2, one censored at t=3
RISK = torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4], dtype=torch.float64)
TIME = torch.tensor([1.0, 2.0, 2.0, 3.0, 4.0], dtype=torch.float64)
EVENT = torch.tensor([True, True, True, False, True])


def test_cox_loss_matches_hand_computed_breslow_and_efron():
    r = RISK.tolist()
    e = [math.exp(v) for v in r]
    at_1, at_2, at_4 = sum(e), e[1] + e[2] + e[3] + e[4], e[4]
    tied = e[1] + e[2]
    breslow = (r[0] - math.log(at_1)) + (r[1] + r[2] - 2 * math.log(at_2)) + (r[4] - math.log(at_4))
    efron = (
        (r[0] - math.log(at_1)) + (r[1] + r[2] - math.log(at_2) - math.log(at_2 - 0.5 * tied)) + (r[4] - math.log(at_4))
    )
    # shuffled input order must not matter
    order = torch.tensor([3, 0, 4, 2, 1])
    for ties, log_likelihood in (("breslow", breslow), ("efron", efron)):
        loss = cox_partial_likelihood_loss(RISK[order], TIME[order], EVENT[order], ties=ties)
        assert loss.item() == pytest.approx(-log_likelihood / 4, rel=1e-12)


def _reference_loss(risk, time, event, ties):
    """Textbook loop over distinct event times."""
    log_likelihood = 0.0
    for t in sorted({ti for ti, ei in zip(time, event) if ei}):
        dead = [i for i in range(len(time)) if time[i] == t and event[i]]
        at_risk = sum(math.exp(risk[k]) for k in range(len(time)) if time[k] >= t)
        tied = sum(math.exp(risk[i]) for i in dead)
        for rank, i in enumerate(dead):
            removed = rank / len(dead) * tied if ties == "efron" else 0.0
            log_likelihood += risk[i] - math.log(at_risk - removed)
    return -log_likelihood / sum(event)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_cox_loss_matches_reference_with_many_ties(ties):
    generator = torch.Generator().manual_seed(0)
    risk = torch.randn(60, generator=generator, dtype=torch.float64)
    time = torch.randint(1, 12, (60,), generator=generator).double()  # heavy ties
    event = torch.rand(60, generator=generator) < 0.6
    expected = _reference_loss(risk.tolist(), time.tolist(), event.tolist(), ties)
    assert cox_partial_likelihood_loss(risk, time, event, ties).item() == pytest.approx(expected, rel=1e-10)


def test_cox_loss_properties():
    no_ties_time = torch.arange(5, dtype=torch.float64)
    assert cox_partial_likelihood_loss(RISK, no_ties_time, EVENT, "breslow").item() == pytest.approx(
        cox_partial_likelihood_loss(RISK, no_ties_time, EVENT, "efron").item()
    )
    # shift invariance and no overflow for huge scores
    shifted = cox_partial_likelihood_loss(RISK + 1000.0, TIME, EVENT)
    assert shifted.item() == pytest.approx(cox_partial_likelihood_loss(RISK, TIME, EVENT).item())
    # a batch without events has zero loss but still backpropagates
    risk = RISK.clone().requires_grad_()
    loss = cox_partial_likelihood_loss(risk, TIME, torch.zeros(5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(risk.grad, torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="ties"):
        cox_partial_likelihood_loss(RISK, TIME, EVENT, ties="exact")
    with pytest.raises(ValueError, match="`time` must have shape"):
        cox_partial_likelihood_loss(RISK, TIME[:3], EVENT)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_gradient_descent_recovers_sksurv_cox_coefficients(ties):
    from sksurv.datasets import load_breast_cancer
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    X, y = load_breast_cancer()
    columns = ["age", "size", "X204540_at", "X221928_at"]
    features = X[columns].to_numpy()
    features = (features - features.mean(0)) / features.std(0)
    # round times to 6-month steps so that ties exist and Breslow and Efron differ
    event, time = split_survival(y)
    time = np.ceil(time / 182.0)
    y_tied = survival_from_arrays(event, time)
    reference = CoxPHSurvivalAnalysis(ties=ties).fit(features, y_tied).coef_

    x, t, e = torch.from_numpy(features), torch.from_numpy(time), torch.from_numpy(event)
    beta = torch.zeros(len(columns), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([beta], lr=1.0, max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = cox_partial_likelihood_loss(x @ beta, t, e, ties=ties)
        loss.backward()
        return loss

    optimizer.step(closure)
    np.testing.assert_allclose(beta.detach().numpy(), reference, atol=1e-4)


def test_discrete_nll_matches_porpoise_formula():
    logits = torch.tensor([[0.2, -1.0, 0.5], [1.5, 0.3, -0.7], [-0.3, 0.8, 0.1], [0.0, 0.0, 2.0]], dtype=torch.float64)
    bins = torch.tensor([1, 0, 2, 2])
    event = torch.tensor([True, False, False, True])
    h = torch.sigmoid(logits)
    s = torch.cat([torch.ones(4, 1, dtype=torch.float64), torch.cumprod(1 - h, 1)], 1)  # (B, K + 1)
    rows = torch.arange(4)
    uncensored = -event.double() * (torch.log(s[rows, bins]) + torch.log(h[rows, bins]))
    censored = -(1 - event.double()) * torch.log(s[rows, bins + 1])
    for alpha in (0.0, 0.4):
        expected = ((1 - alpha) * (censored + uncensored) + alpha * uncensored).mean()
        assert discrete_time_nll_loss(logits, bins, event, alpha).item() == pytest.approx(expected.item(), rel=1e-12)


def test_discrete_nll_is_finite_for_saturated_logits_and_validates():
    logits = torch.tensor([[60.0, -60.0], [-60.0, 60.0]], requires_grad=True)
    loss = discrete_time_nll_loss(logits, torch.tensor([1, 0]), torch.tensor([True, False]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match=r"`bin_index` must lie in \[0, 2\)"):
        discrete_time_nll_loss(logits, torch.tensor([0, 2]), torch.tensor([True, True]))
    with pytest.raises(ValueError, match="alpha"):
        discrete_time_nll_loss(logits, torch.tensor([0, 1]), torch.tensor([True, True]), alpha=1.5)


def test_heads_and_discrete_survival():
    x = torch.randn(6, 8)
    assert CoxHead(8, dropout=0.1)(x).shape == (6,)
    logits = DiscreteTimeHead(8, num_bins=4)(x)
    assert logits.shape == (6, 4)
    survival = hazards_to_survival(torch.sigmoid(logits))
    assert torch.all(survival[:, 1:] <= survival[:, :-1]) and torch.all((survival > 0) & (survival < 1))
    # uniformly higher hazards -> lower survival -> higher risk
    low, high = torch.full((1, 4), 0.1), torch.full((1, 4), 0.3)
    assert discrete_risk(high) > discrete_risk(low)
    with pytest.raises(ValueError, match="num_bins"):
        DiscreteTimeHead(8, num_bins=1)

    edges = np.array([0.0, 10.0, 20.0, np.inf])
    curve = np.array([[0.9, 0.6, 0.5]])
    np.testing.assert_allclose(
        discrete_survival_at(curve, edges, np.array([0.0, 9.9, 10.0, 25.0])), [[1.0, 1.0, 0.9, 0.6]]
    )


def test_breslow_baseline_matches_sksurv_survival_functions():
    from sksurv.datasets import load_breast_cancer
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    X, y = load_breast_cancer()
    features = X[["age", "size", "X204540_at"]].to_numpy()
    cox = CoxPHSurvivalAnalysis(ties="breslow").fit(features, y)
    risk = cox.predict(features)
    event, time = split_survival(y)
    baseline = BreslowBaseline().fit(torch.from_numpy(risk), time, event)
    times = np.quantile(time, [0.1, 0.3, 0.5, 0.7, 0.9])
    expected = np.vstack([fn(times) for fn in cox.predict_survival_function(features[:10])])
    np.testing.assert_allclose(baseline.survival(risk[:10], times), expected, rtol=1e-8)
    with pytest.raises(ValueError, match="at least one observed event"):
        BreslowBaseline().fit(risk, time, np.zeros_like(event))
