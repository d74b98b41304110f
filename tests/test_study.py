"""The sweep's Optuna study in a database: the searcher driven with the calls Tune makes (ASHA's
stop, a driver killed between snapshots, its resume from Tune's pickles), and `sweep study`
reading a stored sweep. The real sweeps behind these calls are in test_sweeps.py (a study
read with `sweep study --json`) and test_sweep_drills.py (a killed and resumed driver).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chestxpert.sweeps.spec import SpecError, parse_spec
from chestxpert.sweeps.study import (
    ABANDONED,
    STUDY_STORAGE_ENV,
    TUNE_TRIAL_ID,
    StudyError,
    plan_study,
    study_summary,
)

SPEC = """\
name: lr-study
dataset: /data/prepared
trial: {epochs: 3}
search:
  num_samples: 4
  points_to_evaluate: [{learning_rate: 0.001, dropout: 0.1}]
space:
  learning_rate: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
  dropout: {type: uniform, low: 0.0, high: 0.5}
scheduler: {type: asha, max_t: 3, grace_period: 1, reduction_factor: 2}
"""


def _searcher(spec, storage: str, study_name: str):
    """The searcher as `sweep run` builds it, pickled and unpickled as tuner.pkl carries it."""
    import optuna
    from ray import cloudpickle

    from chestxpert.sweeps.study_search import StudySearch

    searcher = StudySearch(
        storage,
        study_name,
        max_t=spec.scheduler.max_t,
        metric=spec.metric,
        mode=spec.mode,
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2),
        points_to_evaluate=spec.search.points_to_evaluate,
    )
    return searcher, cloudpickle.dumps(searcher)


def _epoch(value: float, epoch: int) -> dict:
    return {"val_auc_macro": value, "training_iteration": epoch}


def _study(storage: str, name: str):
    import optuna

    from chestxpert.sweeps.study import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def study_storage(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """(the URL recorded and printed, the secret that must never be written): SQLite in the
    workspace, or PostgreSQL with its password only in $CHESTXPERT_STUDY_STORAGE."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ws' / 'optuna.db'}", "no-secret-in-sqlite"
    from chestxpert.cluster.mlflow_runs import safe_uri
    from chestxpert.cluster.mlflow_server import postgres_store_uri

    server = request.getfixturevalue("postgres_server")
    database = f"optuna_{tmp_path.name[-12:].lower().replace('-', '_')}"
    admin = server.connect()
    admin.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{database}"')
    admin.close()
    url = postgres_store_uri(server.user, server.password, "127.0.0.1", server.port, database)
    monkeypatch.setenv(STUDY_STORAGE_ENV, url)
    return safe_uri(url), server.password


def test_a_killed_driver_resumes_the_same_study_without_duplicates(
    study_storage: tuple[str, str], tmp_path: Path
) -> None:
    storage, secret = study_storage
    spec = parse_spec(SPEC)
    plan = plan_study(spec, tmp_path / "ws", None, started=0)
    assert plan.name == "lr-study-19700101-000000" and plan.storage == storage
    searcher, tuner_pkl = _searcher(spec, storage, plan.name)
    # What Tune does: the search space first, then trials; ASHA stops t2 at epoch 2 (Tune
    # passes that result to on_trial_complete only), t1 runs to max_t, t3 is running.
    searcher.set_search_properties(spec.metric, spec.mode, spec.param_space())
    assert searcher.suggest("t1") == {"learning_rate": 0.001, "dropout": 0.1}  # the point
    searcher.suggest("t2")
    searcher.suggest("t3")
    for epoch, value in enumerate((0.60, 0.70), start=1):
        searcher.on_trial_result("t1", _epoch(value, epoch))
    searcher.on_trial_result("t2", _epoch(0.55, 1))
    searcher.on_trial_complete("t2", _epoch(0.52, 2))
    searcher.on_trial_complete("t1", _epoch(0.75, 3))
    searcher.on_trial_result("t3", _epoch(0.58, 1))
    snapshot = tmp_path / "searcher-state.pkl"
    searcher.save(str(snapshot))  # Tune's snapshot; then t4 starts and the driver is killed
    searcher.suggest("t4")
    searcher.on_trial_complete("t3", _epoch(0.66, 3))  # t3 ends after the snapshot
    searcher._ot_study.ask()  # killed inside the next suggest: asked, not tied to a Tune trial

    for written in (tuner_pkl, snapshot.read_bytes()):
        assert secret.encode() not in written and storage.encode() in written
    trials = {t.user_attrs.get(TUNE_TRIAL_ID): t for t in _study(storage, plan.name).trials}
    assert (trials["t2"].state.name, trials["t2"].value) == ("PRUNED", 0.52)
    assert trials["t2"].intermediate_values == {1: 0.55, 2: 0.52}
    assert (trials["t1"].state.name, trials["t1"].value) == ("COMPLETE", 0.75)
    assert trials["t1"].intermediate_values == {1: 0.60, 2: 0.70, 3: 0.75}
    with pytest.raises(StudyError, match="already holds an Optuna study named 'lr-study-1970"):
        plan_study(spec, tmp_path / "ws", None, started=0)  # its trials would mix with these

    # The resume: Tune unpickles tuner.pkl, sets the space, restores the snapshot, and runs t3
    # again from its checkpoint (Tune's snapshot had it running) and new trials for the rest.
    from ray import cloudpickle

    resumed = cloudpickle.loads(tuner_pkl)
    resumed.set_search_properties(spec.metric, spec.mode, spec.param_space())
    resumed.restore(str(snapshot))
    for epoch in (2, 3):  # t3 ended in the study already: it keeps its first result
        resumed.on_trial_result("t3", _epoch(0.60, epoch))
    resumed.on_trial_complete("t3", _epoch(0.61, 3))
    resumed.suggest("t5")
    resumed.on_trial_complete("t5", _epoch(0.50, 1))
    resumed.suggest("t6")
    resumed.on_trial_result("t6", _epoch(0.40, 1))
    resumed.on_trial_complete("t6", None, error=True)

    study = _study(storage, plan.name)
    trials = {t.user_attrs.get(TUNE_TRIAL_ID): t for t in study.trials}
    assert len(study.trials) == len(trials) == 7, "a trial in the study twice"
    assert {k: (t.state.name, t.value) for k, t in trials.items()} == {
        "t1": ("COMPLETE", 0.75),
        "t2": ("PRUNED", 0.52),
        "t3": ("COMPLETE", 0.66),
        "t4": ("FAIL", None),
        "t5": ("PRUNED", 0.50),
        "t6": ("FAIL", None),
        None: ("FAIL", None),
    }
    assert [k for k, t in trials.items() if t.user_attrs.get(ABANDONED)] == ["t4", None]
    assert sum(t.params.get("learning_rate") == 0.001 for t in study.trials) == 1, (
        "the point to evaluate was queued again on resume"
    )
    summary = study_summary(storage, plan.name)
    assert [row["tune_trial_id"] for row in summary["best"]] == ["t1", "t3"]
    assert summary["counts"] == {"COMPLETE": 2, "PRUNED": 2, "FAIL": 3}


def test_the_spec_refuses_a_study_storage_with_a_password() -> None:
    bad = SPEC.replace(
        "  num_samples: 4\n",
        "  num_samples: 4\n  study_storage: postgresql://u:hunter2@db/optuna\n",
    )
    with pytest.raises(SpecError) as raised:
        parse_spec(bad)
    message = str(raised.value)
    assert "line 6: search.study_storage: postgresql://db/optuna carries a password" in message
    assert "PGPASSWORD" in message
    assert "hunter2" not in message
    with pytest.raises(SpecError, match="not a database URL"):
        parse_spec(
            SPEC.replace("  num_samples: 4\n", "  num_samples: 4\n  study_storage: s3://b/x\n")
        )
    good = SPEC.replace(
        "  num_samples: 4\n", "  num_samples: 4\n  study_storage: sqlite:////tmp/o.db\n"
    )
    assert parse_spec(good).search.study_storage == "sqlite:////tmp/o.db"


def test_sweep_study_reads_the_stored_sweep_and_its_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import optuna
    from optuna.distributions import FloatDistribution

    from chestxpert.cli import main
    from chestxpert.cluster.endpoints import resolve
    from chestxpert.sweeps.layout import SPEC_FILE, locate
    from chestxpert.sweeps.study import open_storage

    spec = parse_spec(SPEC)
    storage = f"sqlite:///{tmp_path / 'ws' / 'optuna.db'}"
    endpoints = resolve(workspace=tmp_path / "ws", storage=str(tmp_path / "storage"), environ={})
    plan = plan_study(spec, endpoints.workspace, None)
    assert plan.storage == storage and plan.source == "default"
    record = {"spec": spec.to_plain_dict(), "raw": spec.model_dump(mode="json"), **plan.record()}
    locate(endpoints, spec.name).write_json(SPEC_FILE, record)
    study = optuna.create_study(
        study_name=plan.name, storage=open_storage(storage), direction="maximize"
    )
    searched = {
        "learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
        "dropout": FloatDistribution(0.0, 0.5),
    }
    complete, pruned = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    for number, (lr, dropout, value, state) in enumerate(
        [(1e-3, 0.1, 0.7, complete), (3e-3, 0.4, 0.8, complete), (1e-4, 0.2, 0.6, complete)]
        + [(5e-4, 0.3, 0.5, pruned)]
    ):
        trial = optuna.trial.create_trial(
            params={"learning_rate": lr, "dropout": dropout},
            distributions=searched,
            value=value,
            intermediate_values={1: value},
            user_attrs={TUNE_TRIAL_ID: f"t{number}"},
            state=state,
        )
        study.add_trial(trial)

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "ray_auth_token"))
    argv = ["--workspace", str(tmp_path / "ws"), "sweep", "study", spec.name]
    argv += ["--storage", str(tmp_path / "storage")]
    assert main([*argv, "--json", "--top", "2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "lr-study" and shown["study"] == plan.name
    assert shown["storage"] == storage
    assert shown["metric"] == "val_auc_macro" and shown["direction"] == "maximize"
    assert shown["counts"] == {"COMPLETE": 3, "PRUNED": 1}
    assert [(r["tune_trial_id"], r["value"]) for r in shown["best"]] == [("t1", 0.8), ("t0", 0.7)]
    assert set(shown["importances"]) == {"learning_rate", "dropout"}
    assert abs(sum(shown["importances"].values()) - 1) < 1e-6
    pruned = next(r for r in shown["trials"] if r["state"] == "PRUNED")
    assert (pruned["value"], pruned["epochs"]) == (0.5, 1)
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "best complete trials (val_auc_macro):" in text and "hyperparameter importances:" in text
    assert f"optuna-dashboard {storage}" in text


def test_sweep_study_of_a_random_search_says_it_keeps_none() -> None:
    spec = parse_spec(SPEC.replace("search:\n", "search:\n  algorithm: random\n"))
    assert plan_study(spec, Path("/nonexistent"), None) is None
    with pytest.raises(StudyError, match="no study database at"):
        study_summary("sqlite:////nonexistent/optuna.db", "lr-study")
