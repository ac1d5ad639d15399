"""A fair comparison on the search side: pruning within an architecture, every architecture
explored, and each architecture's parameters under their own Optuna names."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from studyfiles import derive, open_results, tiny, write_study

from hpsearch.config import StudyConfig, parse_config
from hpsearch.exploration import enqueue_missing, order
from hpsearch.optuna_private import planned_params
from hpsearch.pruning import WithinArchitecture, build_study_pruner
from hpsearch.sampling import WithinArchitecture as WithinSampler
from hpsearch.sampling import build_study_sampler
from hpsearch.space import design, from_params

ARCH = CategoricalDistribution(["cnn", "gru"])


def curve_trial(arch: str, values: list[float], state: TrialState) -> optuna.trial.FrozenTrial:
    return create_trial(
        state=state, value=values[-1] if state == TrialState.COMPLETE else None,
        params={"architecture": arch}, distributions={"architecture": ARCH},
        intermediate_values=dict(enumerate(values)),
    )


def test_a_slow_starter_is_judged_against_its_own_architecture_only() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plain = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    within = WithinArchitecture(optuna.pruners.MedianPruner(n_startup_trials=1,
                                                            n_warmup_steps=0), min_peers=4)
    results = {}
    for name, pruner in (("plain", plain), ("within", within)):
        study = optuna.create_study(direction="maximize", pruner=pruner)
        for _ in range(4):
            study.add_trial(curve_trial("cnn", [0.80, 0.90, 0.94, 0.95], TrialState.COMPLETE))
            study.add_trial(curve_trial("gru", [0.10, 0.11, 0.12, 0.60, 0.90, 0.97],
                                        TrialState.COMPLETE))
        study.enqueue_trial({"architecture": "gru"})
        trial = study.ask()
        assert trial.suggest_categorical("architecture", ["cnn", "gru"]) == "gru"
        for step, value in enumerate([0.10, 0.11, 0.12]):
            trial.report(value, step)
        results[name] = trial.should_prune()
    # Against CNNs the GRU looks hopeless; against GRUs it is on track.
    assert results == {"plain": True, "within": False}


def test_an_architecture_runs_unpruned_until_it_has_peers_of_its_own() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    within = WithinArchitecture(optuna.pruners.MedianPruner(n_startup_trials=0,
                                                            n_warmup_steps=0), min_peers=2)
    study = optuna.create_study(direction="maximize", pruner=within)
    study.add_trial(curve_trial("gru", [0.9, 0.9], TrialState.COMPLETE))
    study.enqueue_trial({"architecture": "gru"})
    trial = study.ask()
    trial.suggest_categorical("architecture", ["cnn", "gru"])
    trial.report(0.1, 0)
    assert not trial.should_prune()  # one finished GRU: too few to compare with
    study.add_trial(curve_trial("gru", [0.9, 0.9], TrialState.PRUNED))
    assert trial.should_prune()  # two: now a median exists, and 0.1 is far below it


def test_within_architecture_is_the_default_and_can_be_turned_off() -> None:
    raw = tiny(study={"pruner": {"name": "hyperband", "min_resource": 1}})
    pruner = build_study_pruner(parse_config(raw, "s.yaml"))
    # Pruning starts before the exploration minimum is reached: two peers make a comparison.
    assert isinstance(pruner, WithinArchitecture) and pruner.min_peers == 2
    raw["study"]["min_trials_to_prune"] = 3
    assert build_study_pruner(parse_config(raw, "s.yaml")).min_peers == 3  # type: ignore[attr-defined]
    raw["study"]["prune_within_architecture"] = False
    assert isinstance(build_study_pruner(parse_config(raw, "s.yaml")),
                      optuna.pruners.HyperbandPruner)
    # A threshold judges by a fixed bound, not by peers: nothing to wrap.
    raw = tiny(study={"pruner": {"name": "threshold", "lower": 0.1}})
    assert isinstance(build_study_pruner(parse_config(raw, "s.yaml")),
                      optuna.pruners.ThresholdPruner)


def test_the_gate_is_the_median_pruners_start_up() -> None:
    """``{name: median}`` as written: within an architecture it prunes once the gate lets it
    (two finished trials of its own), not after Optuna's 5 more; a study file that sets
    ``n_startup_trials``, or a study pruned across architectures, keeps Optuna's count."""
    def pruned_after_two_peers(pruner: optuna.pruners.BasePruner) -> bool:
        study = optuna.create_study(direction="maximize", pruner=pruner)
        for _ in range(2):
            study.add_trial(curve_trial("gru", [0.9, 0.9], TrialState.COMPLETE))
        study.enqueue_trial({"architecture": "gru"})
        trial = study.ask()
        trial.suggest_categorical("architecture", ["cnn", "gru"])
        trial.report(0.1, 0)
        return trial.should_prune()

    raw = tiny(study={"pruner": {"name": "median"}})
    assert pruned_after_two_peers(build_study_pruner(parse_config(raw, "s.yaml")))
    own = derive(raw, study={"pruner": {"name": "median", "n_startup_trials": 3}})
    assert not pruned_after_two_peers(build_study_pruner(parse_config(own, "s.yaml")))
    across = derive(raw, study={"prune_within_architecture": False})
    assert build_study_pruner(parse_config(across, "s.yaml"))._n_startup_trials == 5


def test_hyperband_within_an_architecture_sees_only_that_architecture() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Hyperband builds its own bracket studies from the study's storage: the view must hold.
    within = WithinArchitecture(optuna.pruners.HyperbandPruner(min_resource=1, max_resource=6),
                                min_peers=4)
    study = optuna.create_study(direction="maximize", pruner=within)
    for _ in range(6):
        study.add_trial(curve_trial("cnn", [0.80, 0.90, 0.94, 0.95, 0.95, 0.95],
                                    TrialState.COMPLETE))
    for _ in range(4):
        study.add_trial(curve_trial("gru", [0.10, 0.11, 0.12, 0.60, 0.90, 0.97],
                                    TrialState.COMPLETE))
    study.enqueue_trial({"architecture": "gru"})
    trial = study.ask()
    trial.suggest_categorical("architecture", ["cnn", "gru"])
    pruned = False
    for step, value in enumerate([0.10, 0.11, 0.12, 0.6]):
        trial.report(value, step)
        pruned = pruned or trial.should_prune()
    assert not pruned


def test_exploration_order_is_round_robin_within_the_budget() -> None:
    config = parse_config(tiny(study={"min_trials_per_architecture": 2, "n_trials": 5}), "s")
    assert order(config, Counter(), 5) == ["linear", "mlp", "cnn1d", "linear", "mlp"]
    # A rerun tops up only what is short.
    assert order(config, Counter({"linear": 2, "mlp": 1}), 10) == ["mlp", "cnn1d",
                                                                             "cnn1d"]
    assert order(config, Counter(), 0) == []


def _quarter(value: float, low: float, high: float) -> int:
    """Which quarter of [low, high] on a log scale holds ``value``."""
    return min(int(4 * math.log(value / low) / math.log(high / low)), 3)


def test_exploration_covers_each_quarter_of_every_range_and_is_seeded() -> None:
    """Four exploration trials of an architecture put one value in each quarter of every
    range (on its own scale), where four independent draws leave some quarter empty nine
    times in ten; the seed fixes them, and each architecture has its own."""
    raw = tiny(study={"n_trials": 8, "min_trials_per_architecture": 4,
                      "sampler": {"name": "tpe", "seed": 3}},
               model={"architecture": {
                   "linear": {},
                   "mlp": {"hidden": {"type": "int", "low": 4, "high": 64, "log": True},
                           "dropout": {"type": "float", "low": 0.0, "high": 0.4, "step": 0.1},
                           "depth": {"type": "categorical", "choices": [1, 2, 3, 4]}}}},
               train={"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                      "batch_size": {"type": "int", "low": 8, "high": 64, "step": 8}})
    config = parse_config(raw, "s")
    points = [p for p in queued(config) if p["architecture"] == "mlp"]
    assert points == design(config, "mlp", 4, 3)
    assert sorted(_quarter(p["lr"], 1e-4, 1e-1) for p in points) == [0, 1, 2, 3]
    assert sorted(_quarter(p["mlp.hidden"], 4, 65) for p in points) == [0, 1, 2, 3]
    assert sorted(p["mlp.depth"] for p in points) == [1, 2, 3, 4]
    assert len({p["batch_size"] for p in points}) == 4
    assert all(p["mlp.dropout"] in (0.0, 0.1, 0.2, 0.3, 0.4) for p in points)
    for p in points:  # each point is a valid trial of the space, bare names for the factory
        params = from_params(p, config)
        assert params.architecture == "mlp" and set(params.model) == {"hidden", "dropout",
                                                                       "depth"}
    # The seed fixes the design; the other architecture draws its own.
    assert design(config, "mlp", 4, 3) != design(config, "mlp", 4, 4)
    assert [p["lr"] for p in design(config, "linear", 4, 3)] != [p["lr"] for p in points]
    # A QMC sampler spreads its points itself: it is left the architecture only.
    qmc = parse_config(derive(raw, study={"sampler": {"name": "qmc", "seed": 3}}), "s")
    assert queued(qmc) == [{"architecture": a} for a in ["linear", "mlp"] * 4]
    # Past four design points the plan fixes only the architecture: the sampler, which by
    # then models that architecture's design, picks the rest.
    six = parse_config(derive(raw, study={"n_trials": 12, "min_trials_per_architecture": 6}),
                       "s")
    mlp = [p for p in queued(six) if p["architecture"] == "mlp"]
    assert mlp == [*design(six, "mlp", 4, 3), {"architecture": "mlp"}, {"architecture": "mlp"}]


def queued(config: StudyConfig) -> list[dict[str, Any]]:
    """The exploration trials a new study of ``config`` queues, in order."""
    study = optuna.create_study(direction=config.study.direction)
    enqueue_missing(study, config)
    return [planned_params(t) for t in study.get_trials(deepcopy=False)]


def startups(sampler: optuna.samplers.BaseSampler) -> tuple[int, int | None]:
    """TPE start-ups: of the architecture stage (or the only sampler), and of one
    architecture's stage (None without stages)."""
    if isinstance(sampler, WithinSampler):
        return sampler.choose._n_startup_trials, sampler._sampler("mlp")._n_startup_trials  # type: ignore[attr-defined]
    return sampler._n_startup_trials, None  # type: ignore[attr-defined]


def test_tpe_starts_modelling_once_the_exploration_is_done() -> None:
    """The exploration trials are TPE's start-up: it does not draw its own random trials
    after them (Optuna's default would, until 10 trials). The architecture stage waits for the
    whole plan, each architecture's stage for its own share of it. A study without
    exploration, or a study file that sets ``n_startup_trials``, keeps its own."""
    raw = tiny(study={"n_trials": 16, "min_trials_per_architecture": 4},
               model={"architecture": {"linear": {}, "mlp": {}}})
    assert startups(build_study_sampler(parse_config(raw, "s"))) == (8, 4)
    # Within the budget: a 6-trial study queues 6.
    six = parse_config(derive(raw, study={"n_trials": 6}), "s")
    assert startups(build_study_sampler(six)) == (6, 4)
    one = parse_config(derive(raw, model={"architecture": {"mlp": {}}}), "s")
    assert startups(build_study_sampler(one)) == (10, None)
    own = parse_config(derive(raw, study={"sampler": {"name": "tpe", "n_startup_trials": 3}}),
                       "s")
    assert startups(build_study_sampler(own)) == (3, 3)
    no_plan = parse_config(derive(raw, study={"min_trials_per_architecture": 0}), "s")
    assert startups(build_study_sampler(no_plan)) == (10, 10)
    bad = parse_config(derive(raw, study={"sampler": {"name": "tpe", "n_startup_trials": "4"}}),
                       "s")
    with pytest.raises(ValueError, match="n_startup_trials must be a whole number of trials, "
                                         "got '4'"):
        build_study_sampler(bad)


def test_sampling_within_architecture_is_the_default_for_tpe_and_can_be_turned_off() -> None:
    raw = tiny(model={"architecture": {"linear": {}, "mlp": {}}})
    assert isinstance(build_study_sampler(parse_config(raw, "s")), WithinSampler)
    off = derive(raw, study={"sample_within_architecture": False})
    assert isinstance(build_study_sampler(parse_config(off, "s")), optuna.samplers.TPESampler)
    rnd = derive(raw, study={"sampler": {"name": "random"}})
    assert isinstance(build_study_sampler(parse_config(rnd, "s")), optuna.samplers.RandomSampler)


WIDTH = {"mlp": optuna.distributions.IntDistribution(8, 512, log=True),
         "cnn1d": optuna.distributions.IntDistribution(8, 512, log=True)}
LR = optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
TWO = CategoricalDistribution(["cnn1d", "mlp"])


def trailing_widths(sampler: optuna.samplers.BaseSampler) -> tuple[list[int], int]:
    """Widths ``sampler`` proposes for the trailing architecture (mlp, best at width 40 and
    lr 3e-3) in a study the leading one (cnn1d, best at width 300 and lr 3e-2) dominates, and
    the width of the trailing architecture's best trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    rng = np.random.default_rng(0)
    for arch, best_width, best_lr, top, n in (("cnn1d", 300, 3e-2, 0.97, 16),
                                              ("mlp", 40, 3e-3, 0.70, 8)):
        for _ in range(n):
            width = int(np.exp(rng.uniform(np.log(8), np.log(512))))
            lr = float(np.exp(rng.uniform(np.log(1e-4), np.log(1e-1))))
            value = top - 0.05 * (np.log(width / best_width) ** 2 + np.log(lr / best_lr) ** 2)
            study.add_trial(create_trial(
                value=float(value), params={"architecture": arch, f"{arch}.width": width,
                                            "lr": lr},
                distributions={"architecture": TWO, f"{arch}.width": WIDTH[arch], "lr": LR}))
    widths = []
    for _ in range(20):
        study.enqueue_trial({"architecture": "mlp"})
        trial = study.ask()
        trial.suggest_categorical("architecture", ["cnn1d", "mlp"])
        widths.append(trial.suggest_int("mlp.width", 8, 512, log=True))
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        study.tell(trial, state=TrialState.FAIL)  # keep the study as it was
    mlp = [t for t in study.trials if t.params.get("architecture") == "mlp" and t.value]
    return widths, max(mlp, key=lambda t: t.value).params["mlp.width"]


def test_each_architectures_stage_sees_the_trials_added_since_its_last_sample() -> None:
    """The architecture's view is a second study object over the same storage: what it
    cached for one trial must not hide the trials finished since (TPE reads that cache
    unless it runs with a constant liar)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    raw = tiny(study={"sampler": {"name": "tpe", "seed": 0, "constant_liar": False},
                      "min_trials_per_architecture": 4},
               model={"architecture": {"cnn1d": {}, "mlp": {}}})
    study = optuna.create_study(direction="maximize",
                                sampler=build_study_sampler(parse_config(raw, "s")))

    def add(width: int, value: float) -> None:
        study.add_trial(create_trial(
            value=value, params={"architecture": "mlp", "mlp.width": width},
            distributions={"architecture": TWO, "mlp.width": WIDTH["mlp"]}))

    def proposed() -> int:
        study.enqueue_trial({"architecture": "mlp"})
        trial = study.ask()
        trial.suggest_categorical("architecture", ["cnn1d", "mlp"])
        width = trial.suggest_int("mlp.width", 8, 512, log=True)
        study.tell(trial, state=TrialState.FAIL)
        return width

    for width in (8, 10, 12, 14, 16, 20, 24, 30):
        add(width, 0.5 - abs(np.log(width / 12)))
    proposed()  # the view caches the study as it is now
    for width in (440, 450, 460):  # far better, far wider
        add(width, 0.9)
    widths = [proposed() for _ in range(9)]
    assert np.median([abs(np.log(w / 450)) for w in widths]) < 0.3, widths


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_trailing_architectures_parameters_are_modelled_on_its_own_trials() -> None:
    """Over the whole study TPE's good trials are all the leader's: it has nothing good to
    model the trailing architecture's width on and keeps sampling it broadly. Within the
    architecture, its proposals stay near its own best trial."""
    raw = tiny(study={"sampler": {"name": "tpe", "seed": 3}, "min_trials_per_architecture": 4},
               model={"architecture": {"cnn1d": {}, "mlp": {}}})
    config = parse_config(raw, "s")
    whole = optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True,
                                       n_startup_trials=8, seed=3)
    within = build_study_sampler(config)
    assert isinstance(within, WithinSampler)

    def spread(proposed: tuple[list[int], int]) -> float:
        """Median distance, in log width, of the proposals from the best trial's width."""
        widths, best = proposed
        return float(np.median([abs(np.log(w / best)) for w in widths]))

    assert spread(trailing_widths(within)) < 0.5 * spread(trailing_widths(whole))


def test_an_unseeded_study_keeps_one_design_across_reruns(tmp_path: Path) -> None:
    """Without a sampler seed the design's seed is drawn once and kept in the study, so a
    rerun that tops the architectures up fills the quarters the first run left."""
    from hpsearch.optuna_private import planned_params
    from hpsearch.run.runner import open_run_study

    url = str(tmp_path / "journal.log")
    lr = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}
    runs = []
    for n_trials in (4, 8):  # 2 of each architecture's 4, then the other 2
        raw = tiny(study={"name": "unseeded", "n_trials": n_trials,
                          "min_trials_per_architecture": 4, "sampler": {"name": "tpe"}},
                   model={"architecture": {"linear": {}, "mlp": {}}}, train={"lr": lr})
        study = open_run_study(parse_config(raw, "s"), url, "s")
        planned = [planned_params(t) for t in study.get_trials(deepcopy=False)]
        runs.append(planned)
    assert len(runs[0]) == 4 and runs[1][:4] == runs[0]
    for arch in ("linear", "mlp"):
        lrs = [p["lr"] for p in runs[1] if p["architecture"] == arch]
        assert sorted(_quarter(v, 1e-4, 1e-1) for v in lrs) == [0, 1, 2, 3], lrs


@pytest.mark.slow
def test_every_architecture_gets_its_minimum_with_two_workers(tmp_path: Path) -> None:
    # Two design points each, then a trial that takes only its architecture from the plan:
    # the workers' samplers pick its parameters from that architecture's trials.
    raw = tiny(study={"name": "explore", "n_trials": 9, "min_trials_per_architecture": 3,
                      "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2}},
               train={"max_epochs": 2})
    study_file = write_study(tmp_path, raw)
    proc = subprocess.run([sys.executable, "-m", "hpsearch.run", study_file.name,
                           "--results-dir", "res", "--workers", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trials = open_results(tmp_path / "res" / "explore").trials
    counts = Counter(t.params["architecture"] for t in trials)
    assert counts == {"linear": 3, "mlp": 3, "cnn1d": 3}, counts
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # Each architecture's own parameters are named by it in Optuna.
    names = {name for t in trials for name in t.params}
    assert {"mlp.hidden", "cnn1d.channels"} <= names and "hidden" not in names


def test_retention_keeps_a_pruned_representative_beside_the_best_complete_trial() -> None:
    from hpsearch.checkpoint.retention import select_kept

    complete = [(0, 0.50, "gru"), (1, 0.90, "cnn"), (2, 0.80, "cnn")]
    pruned = [(3, 0.70, "gru"), (4, 0.95, "cnn")]
    # top-1 (trial 1), gru's best complete (0) and representative (3), cnn's representative (4)
    assert select_kept(complete, 1, minimize=False, pruned=pruned) == {0, 1, 3, 4}
