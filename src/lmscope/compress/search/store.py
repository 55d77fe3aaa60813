"""Where the search keeps every evaluation: an optuna study (SQLite file in ``--out``, or in memory).

Each fitness evaluation is one optuna trial (params: the level of every unit; values: bytes and KL; user
attributes: stage, per-window KL sums, what produced it). A killed search is ``--resume``d by replaying the
deterministic strategy against the stored trials, so it continues exactly where it stopped. optuna brings
the durable storage, its schema and tooling (``optuna-dashboard sqlite:///found/search.db`` shows the
trials); the strategy itself is EvoPress's, which no optuna sampler implements.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import LmscopeError

STUDY = "lmscope-search"


def _optuna():
    try:
        import optuna
    except ModuleNotFoundError:
        raise LmscopeError(
            "lmscope search needs optuna, which is not installed", "pip install 'lmscope[search]'"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class TrialStore:
    """Stored evaluations, keyed by (configuration, stage)."""

    def __init__(self, path: str | Path | None, space, settings: dict, resume: bool = False):
        optuna = _optuna()
        self.space = space
        self._dist = {u.name: optuna.distributions.CategoricalDistribution(space.levels) for u in space.units}
        storage = f"sqlite:///{Path(path).resolve()}" if path is not None else None
        if resume:
            if path is None or not Path(path).is_file():
                raise LmscopeError(
                    f"there is no search to resume in '{path}'", "run it first without --resume"
                )
            self.study = optuna.load_study(study_name=STUDY, storage=storage)
            saved = self.study.user_attrs.get("settings")
            if saved != json.loads(json.dumps(settings)):
                diff = sorted(k for k in settings if saved is None or saved.get(k) != settings[k])
                raise LmscopeError(
                    f"--resume with different settings than the stored search ({', '.join(diff)})",
                    "repeat the first run's options, or choose another --out",
                )
        else:
            if path is not None and Path(path).exists():
                raise LmscopeError(
                    f"'{path}' already holds a search",
                    "pass --resume to continue it, or choose another --out",
                )
            self.study = optuna.create_study(
                study_name=STUDY, storage=storage, directions=["minimize", "minimize"]
            )
            self.study.set_user_attr("settings", json.loads(json.dumps(settings)))
        self.results: dict[tuple[tuple[str, ...], int], dict] = {}
        for t in self.study.get_trials(deepcopy=False):
            if t.values is None:
                continue
            config = tuple(t.params[u.name] for u in space.units)
            self.results[(config, int(t.user_attrs["stage"]))] = {
                "kl": float(t.values[1]),
                "bytes": int(t.values[0]),
                "window_kl": list(t.user_attrs["window_kl"]),
                "origin": t.user_attrs.get("origin", ""),
            }

    def get(self, config, stage: int) -> dict | None:
        return self.results.get((tuple(config), stage))

    def put(self, config, stage: int, kl: float, nbytes: int, window_kl: list[float], origin: str) -> None:
        optuna = _optuna()
        trial = optuna.trial.create_trial(
            params=self.space.as_dict(config),
            distributions=self._dist,
            values=[float(nbytes), float(kl)],
            user_attrs={"stage": stage, "window_kl": list(window_kl), "origin": origin},
        )
        self.study.add_trial(trial)  # committed to SQLite now: a kill loses at most the running evaluation
        self.results[(tuple(config), stage)] = {
            "kl": kl,
            "bytes": nbytes,
            "window_kl": list(window_kl),
            "origin": origin,
        }
