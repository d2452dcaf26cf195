"""Temperature scaling of constrained annotation's scores, fit on held-out cells (Guo et al., ICML 2017).

Label probabilities read from a language model are overconfident: on the validation splits of the shared datasets,
the models :func:`sc_c2s.tl.finetune` trains gave their chosen label a mean probability of 0.88 to 0.99 where 0.74
to 0.95 of the cells were right. Dividing the log-probabilities by one temperature before the softmax keeps every
cell's ranking of the labels and brings the probabilities in line with how often the labels are right.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

#: Range of the fitted temperature. It never sharpens the scores: held-out cells that are all right do not say how
#: confident the model should be, and would drive a fit without a floor to its lowest bound.
BOUNDS = (1.0, 100.0)


def fit_temperature(loglik: np.ndarray, truth: np.ndarray) -> float:
    """Temperature that minimises the mean negative log-likelihood of the true labels.

    Parameters
    ----------
    loglik
        Log-likelihood (or log-probability) of each label for each cell, cells × labels.
    truth
        Column of each cell's true label in `loglik`.

    Examples
    --------
    Two labels 4 nats apart and the first right for 3 cells of 4: the fitted probability of the first is 3/4, so
    ``4 / T = log(3)``, ``T = 3.641``.

    >>> loglik = np.array([[0.0, -4.0]] * 4)
    >>> round(fit_temperature(loglik, np.array([0, 0, 0, 1])), 3)
    3.641
    """
    rows = np.arange(len(truth))

    def nll(temperature: float) -> float:
        return -float(log_softmax(loglik / temperature, axis=1)[rows, truth].mean())

    fit = minimize_scalar(nll, bounds=BOUNDS, method="bounded", options={"xatol": 1e-4})
    # the bounded search stops short of its bounds: the floor itself where it is at least as good
    return BOUNDS[0] if nll(BOUNDS[0]) <= fit.fun else float(fit.x)
