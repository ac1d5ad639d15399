"""Sampler and pruner built from the study file."""

from __future__ import annotations

import warnings

import optuna

from hpsearch.config import PrunerConfig, SamplerConfig
from hpsearch.samplers import build_pruner, build_sampler


def test_tpe_defaults_suit_a_conditional_space_and_parallel_workers() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampler = build_sampler(SamplerConfig(name="tpe", seed=3), seed_offset=1000)
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.OptunaWarning)]
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert (sampler._multivariate, sampler._group, sampler._constant_liar) == (True, True, True)
    # Seeded per worker: two offsets draw different first points.
    a = build_sampler(SamplerConfig(name="tpe", seed=3), seed_offset=0)
    b = build_sampler(SamplerConfig(name="tpe", seed=3), seed_offset=1000)
    assert a._rng.rng.random() != b._rng.rng.random()


def test_study_file_keys_override_the_tpe_defaults() -> None:
    sampler = build_sampler(SamplerConfig(name="tpe", constant_liar=False, multivariate=False,
                                          group=False))
    assert (sampler._multivariate, sampler._group, sampler._constant_liar) == (False, False, False)
    assert isinstance(build_sampler(SamplerConfig(name="random")), optuna.samplers.RandomSampler)


def test_pruner_from_config() -> None:
    pruner = build_pruner(PrunerConfig(name="patient", patience=2,
                                       wrapped=PrunerConfig(name="median")))
    assert isinstance(pruner, optuna.pruners.PatientPruner)
