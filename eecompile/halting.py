"""PALBERT's halting probabilities, trained jointly over a run of Q-exits.

Balagansky and Gavrilov 2022, "PALBERT: Teaching ALBERT to Ponder" (NeurIPS); the objective is PonderNet's (Banino,
Balaguer and Blundell 2021, "PonderNet: Learning to Ponder"). Exit i of E early exits gives lambda_i, the probability
of halting there once the sample got there; the halting distribution over the E + 1 exits (the final exit last) is

    p_i = lambda_i * prod_{j<i} (1 - lambda_j)   (i <= E),      p_{E+1} = prod_{j<=E} (1 - lambda_j),

and a sample's loss, for per-exit losses L_i (``train-heads``: each exit's distillation loss to the final exit, plus
cross-entropy when there are labels; the final exit's own loss is its cross-entropy, 0 without labels), is

    sum_i p_i L_i + beta * KL(p || p_G),

with p_G the geometric prior of hazard lambda_p truncated at the final exit (p_G,i = lambda_p (1 - lambda_p)^(i-1),
the final exit the rest, (1 - lambda_p)^E). Over p the minimum is at p_i proportional to p_G,i exp(-L_i / beta) (a
Gibbs distribution), so ``beta`` is the loss scale that separates the exits: an exit whose answer is close to the
final exit's gets a large lambda. The Q-exit gate then leaves at the first exit where 1 - prod_{j<=i}(1 - lambda_j)
(= sum_{j<=i} p_j, the probability of having halted) reaches the shared threshold q, which ``calibrate`` chooses.

Tensors are torch's (imported by the caller, :func:`eecompile.train.train_heads`); :func:`geometric_prior` is numpy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from eecompile.errors import EECompileError

DEFAULT_BETA = 0.1
"""KL weight: the loss scale (nats) at which halting at an exit becomes e times less likely."""
DEFAULT_HAZARD = 0.5
"""lambda_p of the geometric prior: the prior probability of halting at each exit once there."""
_EPS = 1e-6


def check_halting(beta: float, hazard: float) -> None:
    """Raise :class:`EECompileError` naming the option (``--halting-beta``, ``--halting-prior``) unless ``beta`` is
    finite and > 0 and ``hazard`` is in (0, 1)."""
    if not (math.isfinite(beta) and beta > 0):
        raise EECompileError(f"train-heads --halting-beta {beta}: the KL weight of PALBERT's objective (a loss scale, "
                             f"nats) must be a positive number; give e.g. {DEFAULT_BETA} (the default)")
    if not 0.0 < hazard < 1.0:
        raise EECompileError(f"train-heads --halting-prior {hazard}: the geometric prior's halting probability per "
                             f"exit (lambda_p) must lie strictly between 0 and 1; give e.g. {DEFAULT_HAZARD} (the "
                             f"default)")


def geometric_prior(hazard: float, n_early: int) -> np.ndarray:
    """p_G over ``n_early`` early exits and the final exit (float64 [n_early + 1], sums to 1)."""
    i = np.arange(n_early)
    return np.append(hazard * (1.0 - hazard) ** i, (1.0 - hazard) ** n_early)


def halting_distribution(torch: Any, lams: Any) -> Any:
    """p [B, E + 1] from lambda [B, E] (values in [0, 1])."""
    survive = torch.cumprod(1.0 - lams, dim=1)  # probability of not having halted after exit i
    before = torch.cat([torch.ones_like(lams[:, :1]), survive[:, :-1]], dim=1)
    return torch.cat([lams * before, survive[:, -1:]], dim=1)


def palbert_loss(torch: Any, lams: Any, losses: Any, prior: Any, beta: float) -> Any:
    """Mean over the batch of ``sum_i p_i L_i + beta KL(p || prior)``; ``lams`` [B, E], ``losses`` [B, E + 1] (the
    final exit last), ``prior`` [E + 1]."""
    p = halting_distribution(torch, lams.clamp(_EPS, 1.0 - _EPS))
    kl = (p * (torch.log(p.clamp_min(_EPS)) - torch.log(prior))).sum(1)
    return ((p * losses).sum(1) + beta * kl).mean()
