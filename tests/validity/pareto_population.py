"""A synthetic early-exit population whose risks are known in closed form for ANY threshold vector.

Four exits (three thresholds). Each sample has an independent confidence ``c_l ~ U(0, 1)`` at
each of the first three exits; what it loses by leaving at exit ``l`` depends on ``c_l``:

* ``gap`` (signed 0-1, like prediction_gap): wrong at exit ``l`` with probability
  ``b_l (1 - c_l)^2``; the full model is wrong with probability ``f``, independently.
* ``consistency`` (0-1): disagrees with the full model at exit ``l`` with probability
  ``d_l (1 - c_l)^k_l``; the first exit is miscalibrated (``k_0 = 0``: it disagrees with
  probability ``d_0`` whatever its confidence), so a threshold per exit (a high bar at the
  first exit, lower ones later) beats every scalar threshold.
* ``continuous`` (in [0, 1], like an SSIM drop): ``(1 - c_l) s_l z`` with ``z ~ U(0, 1)``.

Under a vector ``t`` a sample reaches exit ``l`` with probability ``prod_{j<l} min(t_j, 1)``
and leaves there when ``c_l >= t_l``, so every risk is a sum of one-dimensional integrals:

    gap          sum_l reach_l b_l (1 - t_l)^3 / 3  +  reach_last f  -  f
    consistency  sum_l reach_l d_l (1 - t_l)^(k_l + 1) / (k_l + 1)
    mean of the continuous loss   sum_l reach_l s_l (1 - t_l)^2 / 4
    P(continuous > tau)           sum_l reach_l I(1 - t_l, tau / s_l),
                                  I(Y, a) = (Y - a) - a log(Y / a) for Y > a, else 0
    cost         sum_l reach_l (1 - t_l) cost_l + reach_last cost_last
"""

from __future__ import annotations

import numpy as np

GAP_B = np.array([0.6, 0.3, 0.15])
GAP_F = 0.1
CONSISTENCY_D = np.array([0.15, 0.3, 0.3])
CONSISTENCY_K = np.array([0.0, 2.0, 2.0])
CONTINUOUS_S = np.array([0.9, 0.6, 0.3])
EXIT_COST = np.array([1.0, 2.0, 3.0, 4.0])
N_EXITS = 4


def draw(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n i.i.d. samples: confidences (n, 4) and the absolute per-exit losses (n, 4) of each risk."""
    conf = np.ones((n, N_EXITS))
    conf[:, :-1] = rng.random((n, N_EXITS - 1))
    early = 1.0 - conf[:, :-1]  # (n, 3)
    gap = np.zeros((n, N_EXITS))
    gap[:, :-1] = rng.random((n, N_EXITS - 1)) < GAP_B * early**2
    gap[:, -1] = rng.random(n) < GAP_F
    consistency = np.zeros((n, N_EXITS))
    consistency[:, :-1] = rng.random((n, N_EXITS - 1)) < CONSISTENCY_D * early**CONSISTENCY_K
    continuous = np.zeros((n, N_EXITS))
    continuous[:, :-1] = early * CONTINUOUS_S * rng.random((n, N_EXITS - 1))
    return {"conf": conf, "gap": gap, "consistency": consistency, "continuous": continuous}


def _parts(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reach (M, 4), y = 1 - t clipped (M, 3), reach_last (M,))."""
    t = np.clip(np.asarray(vectors, dtype=float), 0.0, 1.0)  # inf -> 1: the exit never fires
    stay = t  # P(c_l < t_l)
    reach = np.ones((len(t), N_EXITS))
    reach[:, 1:] = np.cumprod(stay, axis=1)
    return reach, 1.0 - t, reach[:, -1]


def true_risks(vectors: np.ndarray, *, tolerance: float = 0.1) -> dict[str, np.ndarray]:
    """Population risks of every vector (M, 3): a dict of (M,) arrays."""
    reach, y, reach_last = _parts(vectors)
    early = reach[:, :-1]
    a = tolerance / CONTINUOUS_S  # (3,)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(y > a, (y - a) - a * np.log(np.where(y > a, y / a, 1.0)), 0.0)
    return {
        "gap": (early * GAP_B * y**3 / 3).sum(1) + reach_last * GAP_F - GAP_F,
        "consistency": (early * CONSISTENCY_D * y ** (CONSISTENCY_K + 1) / (CONSISTENCY_K + 1)).sum(
            1
        ),
        "continuous": (early * CONTINUOUS_S * y**2 / 4).sum(1),
        "exceedance": (early * tail).sum(1),
    }


def true_cost(vectors: np.ndarray) -> np.ndarray:
    reach, y, reach_last = _parts(vectors)
    return (reach[:, :-1] * y * EXIT_COST[:-1]).sum(1) + reach_last * EXIT_COST[-1]
