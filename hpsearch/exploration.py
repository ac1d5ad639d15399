"""The exploration plan: the trials every architecture gets before the sampler allocates freely.

Each architecture gets ``study.min_trials_per_architecture`` trials, queued round-robin with
``enqueue_trial`` so they are ordinary trials the sampler learns from. Their parameters are the
points of a Latin hypercube over the architecture's space (``space.design``). The plan is
checked on every run, so rerunning with a higher ``n_trials`` tops up an architecture that is
still short.

The plan is the sampler's start-up: TPE's own random start-up trials would only repeat it, so
TPE begins to model the study once the plan is done (:func:`startup_trials`,
``sampling.build_study_sampler``).
"""

from __future__ import annotations

import secrets
from collections import Counter
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpsearch import attrs
from hpsearch.config import StudyConfig
from hpsearch.optuna_private import planned_params, storage_of, study_id
from hpsearch.space import design
from hpsearch.storage.trials import counted

# Design points per architecture by default: one in each quarter of every range.
DESIGN_POINTS = 4


def explored(trials: list[FrozenTrial]) -> Counter[str]:
    """Trials per architecture that explore it: finished, running or queued, not failed."""
    planned = (planned_params(t) for t in trials if t.state != TrialState.FAIL)
    return Counter(str(p[attrs.ARCHITECTURE]) for p in planned if attrs.ARCHITECTURE in p)


def order(config: StudyConfig, have: Counter[str], budget: int) -> list[str]:
    """Architectures to queue, round-robin, so that each gets ``min_trials_per_architecture``
    trials, within the ``budget`` of trials this run may still start."""
    archs = list(config.model.architecture)
    # A grid or brute-force search visits every architecture by itself, and refuses trials
    # whose other parameters are left to it.
    if len(archs) < 2 or config.study.sampler.name in ("grid", "bruteforce"):
        return []
    need = config.study.min_trials_per_architecture
    have = Counter({a: have.get(a, 0) for a in archs})
    queued: list[str] = []
    for _ in range(need):
        for arch in archs:
            if have[arch] < need and len(queued) < budget:
                have[arch] += 1
                queued.append(arch)
    return queued


def startup_trials(config: StudyConfig) -> int:
    """How many trials the plan queues in a new study (0 where there is no plan)."""
    return len(order(config, Counter(), config.study.n_trials))


def designed(config: StudyConfig) -> int:
    """How many of each architecture's exploration trials are design points: the sampler's
    ``n_startup_trials`` where the study file sets it, else ``DESIGN_POINTS``, at most
    ``min_trials_per_architecture``. The rest take only their architecture from the plan, so
    the sampler, modelling that architecture's design points, picks their parameters."""
    own = (config.study.sampler.model_extra or {}).get("n_startup_trials", DESIGN_POINTS)
    if not isinstance(own, int) or isinstance(own, bool) or own < 0:
        raise ValueError(f"n_startup_trials must be a whole number of trials, got {own!r}")
    return min(config.study.min_trials_per_architecture, own)


def design_seed(study: optuna.Study, config: StudyConfig) -> int:
    """The seed of the hypercube: the sampler's, or one drawn for an unseeded study and kept
    in it, so that a rerun topping an architecture up continues the same design."""
    if config.study.sampler.seed is not None:
        return config.study.sampler.seed
    storage, sid = storage_of(study), study_id(study)
    seed = storage.get_study_system_attrs(sid).get(attrs.EXPLORATION_SEED)
    if seed is None:
        seed = secrets.randbits(32)
        storage.set_study_system_attr(sid, attrs.EXPLORATION_SEED, seed)
    return int(seed)


def enqueue_missing(study: optuna.Study, config: StudyConfig) -> int:
    """Queue the exploration trials the study still lacks; returns how many. Run under the
    study lock, so nodes starting at once do not each queue them."""
    trials = study.get_trials(deepcopy=False)
    have = explored(trials)
    queued = order(config, have, config.study.n_trials - counted(trials))
    if not queued:
        return 0
    seed = design_seed(study, config)
    size = designed(config)
    designs: dict[str, list[dict[str, Any]]] = {}
    for arch in queued:
        # Past the design (and for QMC, which spreads its points itself) the plan fixes the
        # architecture only: Optuna's enqueue takes partial parameters and the sampler
        # samples the rest.
        params: dict[str, Any] = {attrs.ARCHITECTURE: arch}
        if have[arch] < size and config.study.sampler.name != "qmc":
            if arch not in designs:
                designs[arch] = design(config, arch, size, seed)
            params = designs[arch][have[arch]]
        study.enqueue_trial(params)
        have[arch] += 1
    return len(queued)
