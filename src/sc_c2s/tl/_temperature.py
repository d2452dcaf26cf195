"""The sampling temperature that :func:`sc_c2s.tl.generate` uses with a model :func:`sc_c2s.tl.finetune` trained."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scanpy import logging as logg

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData
    from mudata import MuData

    from sc_c2s.models._model import C2SModel

#: Temperatures tried, the model's own distribution first: it is kept unless another one does better.
TEMPERATURES = (1.0, 0.7, 0.5)
#: Cells generated at each temperature, shared among the cell types as the training cells are.
N_CELLS = 200


def choose_temperature(
    adata: AnnData | MuData,
    c2s_model: C2SModel,
    *,
    labels: pd.Series,
    label_key: str,
    random_state: int,
    mod: str | None,
) -> tuple[float, dict[str, float]] | None:
    """Choose among :data:`TEMPERATURES` the one whose generated cells come closest to the real cells, by MMD.

    At each temperature, :data:`N_CELLS` cells are generated (same seed), shared among the types of `labels`
    (the cells `adata` trained on, with their held-out ones; in the order of the types' names) in proportion to
    their cells; :func:`sc_c2s.tl.score_generation` compares them with the real cells of `adata` (seeded with
    `random_state` modulo ``2**32``, the range of scikit-learn's seeds), and the lowest MMD, averaged over types,
    wins. Types with fewer real cells than it scores (``MIN_REAL_CELLS``) are left out, and each other type gets at
    least that many generated cells.

    Returns
    -------
    The temperature and the MMD of each (keyed by the temperature as a string), or ``None`` when no type has
    enough cells.
    """
    from sc_c2s._utils._validate import LEGACY_SEED_LIMIT

    from ._generate import generate
    from ._score_generation import MIN_REAL_CELLS, score_generation

    counts = labels.value_counts().sort_index()
    counts = counts[counts >= MIN_REAL_CELLS]
    if counts.empty:
        return None
    request = {str(t): max(MIN_REAL_CELLS, round(N_CELLS * n / counts.sum())) for t, n in counts.items()}
    start = logg.info(
        f"    choosing generate's temperature among {', '.join(map(str, TEMPERATURES))}: "
        f"{sum(request.values())} cells each"
    )
    mmd = {}
    for temperature in TEMPERATURES:
        generated = generate(
            adata,
            model=c2s_model,
            cell_types=request,
            temperature=temperature,
            random_state=random_state,
            mod=mod,
        )
        table = score_generation(
            adata, generated, label_key=label_key, random_state=random_state % LEGACY_SEED_LIMIT, mod=mod
        )
        mmd[str(temperature)] = round(float(table.loc["overall", "mmd"]), 5)
    chosen = min(TEMPERATURES, key=lambda t: mmd[str(t)])
    logg.info(f"    temperature {chosen} (MMD to the real cells: {mmd})", time=start)
    return chosen, mmd
