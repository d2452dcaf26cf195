from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sc_c2s.tl import _finetune, _pairs


@pytest.fixture
def obs() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    n = 300
    return pd.DataFrame(
        {
            "cell_type": rng.choice(["B", "T", "Mono"], n),
            "donor": rng.choice(["d1", "d2"], n),
            "condition": rng.choice(["ctrl", "IFN", "LPS"], n),
        },
        index=[f"c{i}" for i in range(n)],
    )


def test_pairs_stay_within_groups_and_are_seeded(obs):
    design = _pairs.design(
        obs, condition_key="condition", control="ctrl", pair_by=["cell_type", "donor"], usable=np.ones(len(obs), bool)
    )
    assert (obs["condition"].iloc[design.perturbed] != "ctrl").all()
    assert design.perturbations == obs["condition"].iloc[design.perturbed].tolist()
    assert set(design.perturbations) == {"IFN", "LPS"}
    first = design.pairs.draw(np.random.default_rng(0))
    np.testing.assert_array_equal(first, design.pairs.draw(np.random.default_rng(0)))
    second = design.pairs.draw(np.random.default_rng(1))
    assert (first != second).any()  # redrawn with another stream
    for controls in (first, second):
        assert (obs["condition"].iloc[controls] == "ctrl").all()
        for column in ("cell_type", "donor"):
            np.testing.assert_array_equal(
                obs[column].iloc[controls].to_numpy(), obs[column].iloc[design.perturbed].to_numpy()
            )


def test_draws_cover_every_control_of_the_group(obs):
    design = _pairs.design(
        obs, condition_key="condition", control="ctrl", pair_by="cell_type", usable=np.ones(300, bool)
    )
    rng = np.random.default_rng(0)
    drawn = np.concatenate([design.pairs.draw(rng) for _ in range(50)])
    is_control = (obs["condition"] == "ctrl").to_numpy()
    assert set(drawn) == set(np.flatnonzero(is_control))


def test_only_usable_cells_are_paired(obs):
    """Held-out cells and cells without genes (`usable` False) are neither trained on nor drawn as controls."""
    usable = np.random.default_rng(2).random(len(obs)) < 0.6
    design = _pairs.design(obs, condition_key="condition", control="ctrl", pair_by="cell_type", usable=usable)
    assert usable[design.perturbed].all()
    drawn = np.concatenate([design.pairs.draw(np.random.default_rng(seed)) for seed in range(20)])
    assert usable[drawn].all()


def test_training_pairs_are_drawn_from_the_seeded_stream(obs, monkeypatch):
    """The control of each perturbed cell comes from finetune's seeded stream: the same seed, the same pairs."""
    monkeypatch.setattr(_finetune._samples, "encode_perturbation", lambda tokenizer, controls, *_, **__: controls)
    design = _pairs.design(
        obs, condition_key="condition", control="ctrl", pair_by="cell_type", usable=np.ones(300, bool)
    )
    words = [[f"cell{i}"] for i in range(len(obs))]

    def pairs(seed):
        rng = np.random.default_rng(seed)
        return _finetune._pair_samples(None, words, design, rng, n_genes=1, upper=True, max_length=64)

    expected = [words[i] for i in design.pairs.draw(np.random.default_rng(0))]
    assert pairs(0) == pairs(0) == expected
    assert pairs(1) != expected


def test_groups_without_controls_are_left_out(obs):
    obs.loc[(obs["cell_type"] == "B") & (obs["condition"] == "ctrl"), "condition"] = "IFN"
    design = _pairs.design(
        obs, condition_key="condition", control="ctrl", pair_by="cell_type", usable=np.ones(300, bool)
    )
    assert "B" not in set(obs["cell_type"].iloc[design.perturbed])
    everything = _pairs.design(obs, condition_key="condition", control="ctrl", pair_by=None, usable=np.ones(300, bool))
    assert len(everything.perturbed) == int((obs["condition"] != "ctrl").sum())


def test_bad_design_is_refused(obs):
    usable = np.ones(300, bool)
    with pytest.raises(ValueError, match="`control='control'` is not a value"):
        _pairs.design(obs, condition_key="condition", control="control", pair_by=None, usable=usable)
    with pytest.raises(KeyError, match="pair_by='tissue'"):
        _pairs.design(obs, condition_key="condition", control="ctrl", pair_by="tissue", usable=usable)
    only_controls = obs.assign(condition="ctrl")
    with pytest.raises(ValueError, match="No perturbed cell"):
        _pairs.design(only_controls, condition_key="condition", control="ctrl", pair_by=None, usable=usable)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda o: o.assign(condition=o["condition"].where(o.index != "c3")), r"obs\['condition'\] has 1 missing"),
        (lambda o: o.assign(condition=o["condition"].replace("LPS", " ")), "empty or multi-line conditions"),
        (lambda o: o.assign(condition=o["condition"].replace("LPS", "L\nPS")), "empty or multi-line conditions"),
        (lambda o: o.assign(donor=o["donor"].where(o.index != "c5")), r"obs columns \['donor'\] of `pair_by` have"),
    ],
    ids=["missing condition", "empty condition", "two-line condition", "missing group"],
)
def test_conditions_and_groups_a_prompt_cannot_name_are_refused(obs, change, match):
    """A perturbation's name goes into one line of the prompt, and a pair into one group: no value, no pair."""
    with pytest.raises(ValueError, match=match):
        _pairs.design(
            change(obs),
            condition_key="condition",
            control="ctrl",
            pair_by=["cell_type", "donor"],
            usable=np.ones(300, bool),
        )
