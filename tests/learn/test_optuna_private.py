"""The Optuna internals the search's resume relies on still work on the installed Optuna.

``study._sampler_random_states`` is the one place ``bonedamage.learn.study`` reads private
Optuna attributes (the TPE sampler's NumPy random states): Optuna offers no public way to
save and restore them, and a stopped study resumed must draw the suggestions of one never
stopped. These tests show that on this Optuna the states it returns are the ones the
sampler draws from, and that a stopped and resumed study suggests exactly what an
uninterrupted one does. Cheap objective, tiny space, in-memory or journal storage: seconds.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.samplers import RandomSampler, TPESampler
from optuna.trial import TrialState

from bonedamage.learn import study as search

SPACE = {"x": (0.0, 1.0), "n": (1, 6), "c": ["a", "b", "c"]}
N_STARTUP = 3


def tpe(seed: int) -> TPESampler:
    """A TPE sampler set as ``search.open_study`` sets one for worker 0 (explicitly: Optuna
    5's defaults are multivariate and constant-liar TPE)."""
    return TPESampler(
        seed=seed, n_startup_trials=N_STARTUP, multivariate=False, constant_liar=False
    )


def suggest(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "x": trial.suggest_float("x", *SPACE["x"]),
        "n": trial.suggest_int("n", *SPACE["n"]),
        "c": trial.suggest_categorical("c", SPACE["c"]),
    }


def score(p: dict[str, Any]) -> float:
    return -((p["x"] - 0.3) ** 2) - 0.01 * p["n"] + 0.1 * (p["c"] == "b")


def run(study: optuna.Study, n_trials: int, worker: int = 0, resume: bool = True) -> None:
    """What ``search.optimize`` does around each trial, with a cheap objective."""
    slots = itertools.count(search._resume(study, worker) if resume else 0)

    def objective(trial: optuna.Trial) -> float:
        slot = next(slots)
        params = suggest(trial)
        search._record_trial(trial, worker, slot)
        return score(params)

    study.optimize(objective, n_trials=n_trials)


def finished(study: optuna.Study) -> list[tuple[dict[str, Any], float | None]]:
    return [(t.params, t.value) for t in study.get_trials(states=search.FINISHED)]


def open_study(storage: Path) -> optuna.Study:
    """A study opened as the search opens it (seeded TPE, journal storage)."""
    cfg = {"seed": 11, "n_startup_trials": N_STARTUP, "storage": str(storage), "epochs": 1}
    cfg |= {"study_prefix": "bonedamage", "pruner": {"kind": "median"}}
    return search.open_study("cortical", cfg, worker=0, tag="private")


def test_optuna_is_a_release_the_private_access_was_verified_for() -> None:
    major = int(optuna.__version__.split(".")[0])
    assert major == search._OPTUNA_VERIFIED_MAJOR, (
        f"Optuna {optuna.__version__} is installed; bonedamage.learn.study."
        "_sampler_random_states reads TPESampler internals verified for Optuna "
        f"{search._OPTUNA_VERIFIED_MAJOR}.x only: re-verify them on this release (the other "
        "tests of this file must pass) and update _OPTUNA_VERIFIED_MAJOR and the pin in "
        "pyproject.toml"
    )


def test_the_random_states_are_numpy_random_states_of_this_sampler() -> None:
    sampler = tpe(1)
    states = search._sampler_random_states(sampler)
    assert len(states) == 2
    assert all(type(s) is np.random.RandomState for s in states)
    assert states[0] is not states[1]
    # the same objects every call: restoring into them restores the sampler
    assert all(a is b for a, b in zip(states, search._sampler_random_states(sampler), strict=True))


@pytest.mark.parametrize(
    ("copied", "same_startup", "same_tpe"),
    [
        ((0, 1), True, True),  # both states copied: every suggestion reproduced
        ((1,), True, False),  # the startup RandomSampler's only: startup trials only
        ((0,), False, False),  # TPE's own only: startup trials differ (and so TPE's history)
    ],
)
def test_the_sampler_draws_from_exactly_these_states(
    copied: tuple[int, ...], same_startup: bool, same_tpe: bool
) -> None:
    """Two samplers seeded differently suggest the same once given the same states."""
    studies = [optuna.create_study(sampler=tpe(seed)) for seed in (1, 2)]
    source = search._sampler_random_states(studies[0].sampler)
    target = search._sampler_random_states(studies[1].sampler)
    for i in copied:
        target[i].set_state(source[i].get_state())
    for study in studies:
        study.optimize(lambda t: score(suggest(t)), n_trials=N_STARTUP + 4)
    a, b = (finished(s) for s in studies)
    assert (a[:N_STARTUP] == b[:N_STARTUP]) is same_startup
    assert (a[N_STARTUP:] == b[N_STARTUP:]) is same_tpe


def test_restoring_a_state_reproduces_the_next_suggestion() -> None:
    """Save the states, draw a trial, restore them: the next trial draws the same point
    (in the startup phase and in the TPE phase)."""
    study = optuna.create_study(sampler=tpe(3))
    states = search._sampler_random_states(study.sampler)
    for _ in range(N_STARTUP + 2):
        saved = [s.get_state() for s in states]
        first = suggest(study.ask())  # left RUNNING: TPE ignores it (no constant liar)
        for s, state in zip(states, saved, strict=True):
            s.set_state(state)
        assert suggest(study.ask()) == first
        # finish both, so the next round sees one more observation
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            study.tell(trial.number, score(trial.params))


@pytest.mark.parametrize("stop", [1, N_STARTUP + 1], ids=["in-startup", "in-tpe"])
def test_a_stopped_and_resumed_study_suggests_what_an_uninterrupted_one_does(
    tmp_path: Path, stop: int
) -> None:
    total = 8
    uninterrupted = open_study(tmp_path / "straight.journal")
    run(uninterrupted, total)

    stopped = open_study(tmp_path / "stopped.journal")
    run(stopped, stop)
    # a killed process leaves its trial RUNNING, its parameters drawn and recorded
    trial = stopped.ask()
    suggest(trial)
    search._record_trial(trial, 0, stop)
    resumed = open_study(tmp_path / "stopped.journal")  # a new process: a fresh sampler
    run(resumed, total - stop)

    assert len(finished(resumed)) == total
    assert finished(resumed) == finished(uninterrupted)
    tags = [t.system_attrs[search.RESUME_KEY] for t in resumed.get_trials(states=search.FINISHED)]
    assert [(t["worker"], t["slot"]) for t in tags] == [(0, slot) for slot in range(total)]

    # without the restored states the resumed study draws other points: the test can tell
    control = open_study(tmp_path / "control.journal")
    run(control, stop)
    run(open_study(tmp_path / "control.journal"), total - stop, resume=False)
    assert finished(control)[:stop] == finished(uninterrupted)[:stop]
    assert finished(control)[stop:] != finished(uninterrupted)[stop:]


def test_record_trial_tags_the_trial_it_is_given() -> None:
    """The storage id of a trial is looked up by study name and number (public API): in a
    storage holding two studies, trial ids and numbers differ."""
    storage = optuna.storages.InMemoryStorage()
    other, study = (
        optuna.create_study(study_name=name, storage=storage, sampler=tpe(5))
        for name in ("other", "this")
    )
    other.optimize(lambda t: score(suggest(t)), n_trials=2)
    run(study, 3, worker=2)
    assert not any(search.RESUME_KEY in t.system_attrs for t in other.get_trials())
    trials = study.get_trials()
    assert [t._trial_id for t in trials] == [2, 3, 4]  # not their numbers 0, 1, 2
    assert [t.system_attrs[search.RESUME_KEY]["slot"] for t in trials] == [0, 1, 2]
    assert all(t.system_attrs[search.RESUME_KEY]["worker"] == 2 for t in trials)
    assert all(f"{search.RESUME_KEY}:rng:0" in t.system_attrs for t in trials)


def test_a_sampler_without_those_internals_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match=rf"Optuna {optuna.__version__}.*re-verify"):
        search._sampler_random_states(RandomSampler(seed=0))
    study = optuna.create_study(sampler=RandomSampler(seed=0))
    with pytest.raises(RuntimeError, match="RandomSampler"):
        run(study, 1)
