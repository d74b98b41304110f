"""The sweep's Optuna study in a database: where it lives, how to open it without printing its
password, and what `chestxpert sweep study` reads back from it (the searcher is study_search.py).

The study outlives the driver: optuna-dashboard, `sweep study` and any Optuna script can open it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from chestxpert.cluster.errors import UserError
from chestxpert.cluster.mlflow_runs import safe_uri

STUDY_STORAGE_ENV = "CHESTXPERT_STUDY_STORAGE"
STUDY_DB = "optuna.db"  # the default: one SQLite file in the workspace, one study per sweep
# The spec record's keys: where the study is (never with a password) and its name.
STUDY_STORAGE_KEY = "study_storage"
STUDY_NAME_KEY = "study_name"
# User attributes on each Optuna trial: the Tune trial it is, and (on a resume) that the
# driver that started it died before Tune recorded the trial.
TUNE_TRIAL_ID = "tune_trial_id"
ABANDONED = "abandoned"
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")


class StudyError(UserError, RuntimeError):
    """A study that cannot be opened or would be mixed with another; the message says why."""


@dataclass(frozen=True)
class StudyPlan:
    """Where a sweep's study lives: `storage` is the URL without a password (safe to print and
    record), `name` the study's name (`<sweep>-<UTC start>`) and `source` where the URL came
    from."""

    storage: str
    name: str
    source: str

    def record(self) -> dict[str, str]:
        """The spec-record keys that let later commands find the study."""
        return {STUDY_STORAGE_KEY: self.storage, STUDY_NAME_KEY: self.name}


def uses_optuna(spec) -> bool:
    """Whether the sweep samples with Optuna: a spec without a space just repeats one config."""
    return spec.search.algorithm == "optuna" and bool(spec.space)


def storage_problem(url: str) -> str | None:
    """Why `url` cannot be a study storage in a spec, or None: an RDB URL Optuna opens
    (sqlite, postgresql, mysql, with an optional +driver) and no password in it."""
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme not in RDB_SCHEMES:
        return (
            f"{url!r} is not a database URL; expected sqlite:////abs/path/optuna.db or "
            "postgresql+psycopg2://USER@HOST:5432/DB"
        )
    if urlsplit(url).password:
        return (
            f"{safe_uri(url)} carries a password, and the spec is recorded in storage and "
            f"MLflow; leave it out (PostgreSQL reads PGPASSWORD or ~/.pgpass) or give the whole "
            f"URL in {STUDY_STORAGE_ENV} instead"
        )
    return None


def plan_study(
    spec, workspace: Path, recorded: dict[str, Any] | None, started: float | None = None
) -> StudyPlan | None:
    """The study a sweep writes, or None when it does not sample with Optuna.

    A resumed sweep keeps the study it recorded. A new one uses `search.study_storage`, else
    $CHESTXPERT_STUDY_STORAGE, else `optuna.db` in the workspace, and a study named after the
    sweep and the UTC second it started (`started`, default now): a sweep name can come back
    (another storage, a deleted sweep) and one database serves many storages. A name the
    database already holds is refused: its trials would mix with this sweep's.
    """
    if recorded is not None:
        if not recorded.get(STUDY_STORAGE_KEY):
            return None  # begun before studies were stored: its searcher keeps it in memory
        return StudyPlan(recorded[STUDY_STORAGE_KEY], recorded[STUDY_NAME_KEY], "recorded")
    if not uses_optuna(spec):
        return None
    if spec.search.study_storage:
        url, source = spec.search.study_storage, "spec"
    elif os.environ.get(STUDY_STORAGE_ENV):
        url, source = os.environ[STUDY_STORAGE_ENV], "env"
    else:
        url, source = f"sqlite:///{workspace / STUDY_DB}", "default"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    plan = StudyPlan(safe_uri(url), f"{spec.name}-{stamp}", source)
    if study_exists(plan.storage, plan.name):
        raise StudyError(
            f"{plan.storage} already holds an Optuna study named {plan.name!r}: a sweep of "
            "that name started in the same second; start this one again"
        )
    return plan


def storage_url(storage: str) -> str:
    """The URL to connect with: $CHESTXPERT_STUDY_STORAGE when it names the same database (it
    may hold the password), else `storage` itself. Never print the result."""
    configured = os.environ.get(STUDY_STORAGE_ENV)
    return configured if configured and safe_uri(configured) == storage else storage


def open_storage(storage: str, create: bool = True):
    """An `optuna.storages.RDBStorage` on `storage` (a safe URL); errors name only the safe URL.

    A SQLite file that does not exist is made when `create`, else it is a StudyError.
    """
    import optuna

    parts = urlsplit(storage)
    if parts.scheme.startswith("sqlite") and parts.path.startswith("/"):
        database = Path(parts.path[1:]) if parts.path.startswith("//") else None
        if database is not None and not database.exists():
            if not create:
                raise StudyError(f"no study database at {database}: {storage} does not exist")
            database.parent.mkdir(parents=True, exist_ok=True)
    url = storage_url(storage)
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=None)
    except Exception as err:  # driver errors differ by database; say which one, not the secret
        said = " ".join(str(err).replace(url, storage).split())[:300]
        raise StudyError(
            f"cannot open the Optuna study storage {storage} ({type(err).__name__}: {said}); "
            f"check the database is reachable and set {STUDY_STORAGE_ENV} (or PGPASSWORD) with "
            "its password"
        ) from None


def study_exists(storage: str, name: str, opened=None) -> bool:
    """Whether `storage` holds a study `name` (False for a SQLite file not made yet); `opened`
    is its RDBStorage when the caller has one."""
    parts = urlsplit(storage)
    if opened is None and parts.scheme.startswith("sqlite") and not Path(parts.path[1:]).exists():
        return False
    try:
        (opened or open_storage(storage)).get_study_id_from_name(name)
    except KeyError:
        return False
    return True


def _plain(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def study_summary(storage: str, name: str, top: int = 5) -> dict[str, Any]:
    """The study as plain values for `sweep study`: counts by state, the `top` best complete
    trials, every trial, and the hyperparameter importances (None with a reason when Optuna
    cannot compute them, e.g. before two trials completed)."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=open_storage(storage, create=False))
    except KeyError:
        raise StudyError(f"{storage} holds no Optuna study named {name!r}") from None
    trials = study.get_trials(deepcopy=False)
    rows = [
        {
            "number": t.number,
            "tune_trial_id": t.user_attrs.get(TUNE_TRIAL_ID),
            "state": t.state.name,
            "value": _plain(t.value) if t.values else None,
            "epochs": t.last_step,
            "params": t.params,
            "abandoned": bool(t.user_attrs.get(ABANDONED)),
        }
        for t in trials
    ]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
    complete.sort(key=lambda r: r["value"], reverse=maximize)
    importances, reason = None, None
    if len(complete) < 2:  # Optuna answers one trial with equal shares, none with {}
        reason = f"{len(complete)} complete trial(s); importances need at least two"
    else:
        try:
            importances = {
                key: float(value)
                for key, value in optuna.importance.get_param_importances(study).items()
            } or None
            reason = None if importances else "no searched parameter varies"
        except (ValueError, RuntimeError) as err:
            reason = str(err)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return {
        "study": name,
        "storage": storage,
        "direction": study.direction.name.lower(),
        "counts": counts,
        "best": complete[:top],
        "importances": importances,
        "importances_unavailable": reason,
        "trials": rows,
    }


def format_study(summary: dict[str, Any], metric: str) -> str:
    """`sweep study`'s text: counts, the best complete trials, the importances, and how to open
    the study in optuna-dashboard."""
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(summary["counts"].items()))
    lines = [
        f"study {summary['study']} in {summary['storage']} ({summary['direction']} {metric}): "
        f"{len(summary['trials'])} trials ({counts or 'none'})"
    ]
    if summary["best"]:
        lines.append(f"best complete trials ({metric}):")
        for row in summary["best"]:
            params = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in row["params"].items()
            )
            lines.append(
                f"  #{row['number']:<3d} {row['tune_trial_id'] or '-':12s} "
                f"{row['value']:.4f}  {params}"
            )
    else:
        lines.append("no trial has completed yet")
    if summary["importances"]:
        lines.append("hyperparameter importances:")
        for key, value in summary["importances"].items():
            lines.append(f"  {key:24s} {value:.3f}")
    else:
        lines.append(f"importances: not available ({summary['importances_unavailable']})")
    lines.append(f"browse it: optuna-dashboard {summary['storage']}")
    return "\n".join(lines) + "\n"
