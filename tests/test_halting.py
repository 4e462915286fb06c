"""PALBERT's halting objective (eecompile.halting): the distribution over exits and the minimiser of the loss."""

from __future__ import annotations

import numpy as np
import pytest

from eecompile.errors import EECompileError
from eecompile.halting import check_halting, geometric_prior, halting_distribution, palbert_loss


def test_halting_distribution_is_lambda_times_survival() -> None:
    torch = pytest.importorskip("torch")
    lam = torch.tensor([[0.2, 0.5, 0.9], [0.0, 1.0, 0.3]])
    p = halting_distribution(torch, lam).numpy()
    want = [[0.2, 0.8 * 0.5, 0.8 * 0.5 * 0.9, 0.8 * 0.5 * 0.1], [0.0, 1.0, 0.0, 0.0]]
    np.testing.assert_allclose(p, want, atol=1e-7)
    # The Q-exit gate's cumulative probability of having halted is the sum of p up to the exit.
    np.testing.assert_allclose(np.cumsum(p, 1)[:, :3], 1 - np.cumprod(1 - lam.numpy(), 1), atol=1e-6)
    np.testing.assert_allclose(geometric_prior(0.25, 3), [0.25, 0.1875, 0.140625, 0.421875])


def test_the_loss_is_minimised_by_the_gibbs_distribution() -> None:
    """min_p sum_i p_i L_i + beta KL(p || prior) is at p_i = prior_i exp(-L_i / beta) / Z: free lambdas trained
    on it reach that distribution (the exit with the smallest loss gets the most mass)."""
    torch = pytest.importorskip("torch")
    losses = torch.tensor([[0.05, 0.3, 0.0], [0.8, 0.1, 0.4]])
    beta, prior = 0.2, torch.tensor(geometric_prior(0.5, 2), dtype=torch.float32)
    z = torch.zeros(2, 2, requires_grad=True)
    opt = torch.optim.LBFGS([z], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def step():  # noqa: ANN202 - LBFGS's closure gives it the loss tensor
        opt.zero_grad()
        loss = palbert_loss(torch, torch.sigmoid(z), losses, prior, beta)
        loss.backward()
        return loss

    opt.step(step)
    got = halting_distribution(torch, torch.sigmoid(z)).detach().numpy()
    gibbs = prior.numpy() * np.exp(-losses.numpy() / beta)
    np.testing.assert_allclose(got, gibbs / gibbs.sum(1, keepdims=True), atol=2e-3)


@pytest.mark.parametrize(("beta", "hazard", "option"), [(0.0, 0.5, "--halting-beta 0.0"),
                                                          (0.1, 1.0, "--halting-prior 1.0"),
                                                          (float("nan"), 0.5, "--halting-beta nan"),
                                                          (0.1, -0.2, "--halting-prior -0.2")])
def test_bad_halting_settings_are_refused_naming_the_option(beta: float, hazard: float, option: str) -> None:
    with pytest.raises(EECompileError, match=rf"train-heads {option}: .* give e\.g\. 0\.(1|5) \(the default\)"):
        check_halting(beta, hazard)
