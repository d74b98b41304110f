"""The trial loop for real: DenseNet121 for an epoch, resume in a new process, Tune.

Also a checkpoint reloaded elsewhere predicts the same, and one with stray files is refused.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import CHESTXPERT_CLI, SyntheticDataset, python_json

REPO = Path(__file__).resolve().parent.parent


def chestxpert(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [CHESTXPERT_CLI, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def write_config(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.services
def test_resume_in_a_new_process_continues_from_identical_weights(
    synthetic_dataset: SyntheticDataset, tmp_path: Path, mlflow_server
) -> None:
    from chestxpert.trainable.checkpoint import load_model, read_state
    from chestxpert.trainable.train import weights_digest

    config = write_config(
        tmp_path / "tiny.yaml",
        dataset=str(synthetic_dataset.prepared),
        backbone="convnet_small",
        batch_size=32,
        learning_rate=0.001,
    )
    out = tmp_path / "run"
    common = ["--mlflow-uri", mlflow_server.url, "--experiment", "resume-test"]
    first = chestxpert(
        "train", str(config), "--out", str(out), "--set", "epochs=2", *common, cwd=tmp_path
    )
    assert "epoch 2/2" in first.stdout and (out / "checkpoint_0002").is_dir()
    saved = load_model(out / "checkpoint_0002")
    saved_digest = weights_digest(saved)
    assert read_state(out / "checkpoint_0002")["weights_sha256"] == saved_digest
    steps_per_epoch = int(saved.optimizer.iterations.numpy()) // 2

    second = chestxpert(
        "train",
        str(config),
        "--out",
        str(out),
        "--resume",
        "--set",
        "epochs=4",
        *common,
        cwd=tmp_path,
    )
    resumed = re.search(r"resumed at epoch (\d+) .*weights sha256 ([0-9a-f]{16})", second.stdout)
    assert resumed, second.stdout
    assert resumed.group(1) == "2" and resumed.group(2) == saved_digest[:16]
    assert (
        "epoch 1/4" not in second.stdout
        and "epoch 3/4" in second.stdout
        and "epoch 4/4" in second.stdout
    )
    final = load_model(out / "checkpoint_0004")
    # the optimiser state came back too: its step counter kept counting from epoch 2
    assert int(final.optimizer.iterations.numpy()) == 4 * steps_per_epoch
    history = read_state(out / "checkpoint_0004")["history"]
    assert [h["epoch"] for h in history] == [1.0, 2.0, 3.0, 4.0]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("resume-test")
    runs = client.search_runs([experiment.experiment_id])
    steps = sorted(
        m.step for run in runs for m in client.get_metric_history(run.info.run_id, "val_loss")
    )
    assert steps == [1, 2, 3, 4]


def test_checkpoint_reloaded_in_a_fresh_process_predicts_the_same(
    synthetic_dataset: SyntheticDataset, tmp_path: Path
) -> None:
    from chestxpert.cluster.endpoints import resolve
    from chestxpert.trainable.config import TrialConfig
    from chestxpert.trainable.local import train_local

    config = TrialConfig.from_dict(
        {
            "dataset": str(synthetic_dataset.prepared),
            "backbone": "convnet_small",
            "epochs": 1,
            "batch_size": 32,
        }
    )
    out = tmp_path / "run"
    endpoints = resolve(
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", workspace=tmp_path, environ={}
    )
    train_local(config, out, endpoints)
    code = (
        "import json, sys, numpy as np\n"
        "from chestxpert.trainable.checkpoint import load_model\n"
        "from chestxpert.datasets.reader import open_dataset, read_split\n"
        f"model = load_model({str(out / 'checkpoint_0001')!r}, compile=False)\n"
        f"images = read_split(open_dataset({str(synthetic_dataset.prepared)!r}), 'test')['image']\n"
        "print(json.dumps(model.predict(images, verbose=0).tolist()))\n"
    )

    def predict_in_new_process() -> np.ndarray:
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return np.array(json.loads(result.stdout.strip().splitlines()[-1]))

    first, second = predict_in_new_process(), predict_in_new_process()
    assert first.shape == (synthetic_dataset.manifest["splits"]["test"]["images"], 14)
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-6)


def test_the_train_step_is_traced_once_as_the_optimizer_is_built_before_it(
    synthetic_dataset: SyntheticDataset, tmp_path: Path, monkeypatch
) -> None:
    """Keras builds the optimizer's variables in the first step unless they exist; made there,
    inside the traced function, they make TensorFlow trace the whole step twice: half of
    DenseNet121's start-up (a first step of 45 s against 23 s at 64 px on 2 cores)."""
    from chestxpert.cluster.endpoints import resolve
    from chestxpert.trainable import train
    from chestxpert.trainable.config import TrialConfig

    config = TrialConfig.from_dict(
        {
            "dataset": str(synthetic_dataset.prepared),
            "backbone": "convnet_small",
            "image_size": 32,
            "batch_size": 8,
            "seed": 0,
        }
    )
    data = train._Data(config, resolve(workspace=tmp_path / "ws", environ={}))
    images = data.val_images[:8]
    targets = np.concatenate([data.val_labels, data.val_mask], axis=1)[:8]

    def traces_of_three_steps() -> int:
        model, _ = train._build_or_restore_here(config, data, None)
        traced = []
        step = model.train_step

        def counted(batch):  # runs only while TensorFlow traces the step
            traced.append(1)
            return step(batch)

        model.train_step = counted
        for _ in range(3):
            model.train_on_batch(images, targets)
        return len(traced)

    assert traces_of_three_steps() == 1
    monkeypatch.setattr(train, "build_optimizer", lambda model: None)  # Keras' own default
    assert traces_of_three_steps() == 2


@pytest.mark.parametrize("intruder", ["payload.pkl", "model_code.py"])
def test_checkpoint_with_unexpected_files_is_refused(tmp_path: Path, intruder: str) -> None:
    from chestxpert.trainable.checkpoint import CheckpointError, check_checkpoint_files

    (tmp_path / "model.keras").write_bytes(b"PK")
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / intruder).write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match=f"unexpected file {intruder}"):
        check_checkpoint_files(tmp_path)


@pytest.mark.services
def test_trainable_runs_as_ray_tune_trials_in_one_reused_worker(
    synthetic_dataset: SyntheticDataset, ray_cluster, tmp_path: Path
) -> None:
    """Two trials of one config, one after the other, as a sweep runs them (`reuse_actors`, the
    spec's default): the second trains in the first's worker process, from the same clean
    state, so it ends with the same weights, and it skips the process start and imports."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import json, sys\n"
        "from ray import tune\n"
        "from chestxpert.trainable.train import train\n"
        f"config = {{'dataset': {str(synthetic_dataset.prepared)!r}, "
        "'backbone': 'convnet_small', 'epochs': 2,"
        " 'batch_size': 32}\n"
        "trainable = tune.with_resources(train, {'cpu': 1})\n"
        "tuner = tune.Tuner(trainable, param_space=config, tune_config=tune.TuneConfig("
        "num_samples=2, max_concurrent_trials=1, reuse_actors=True), "
        f"run_config=tune.RunConfig(name='one', storage_path={str(tmp_path / 'storage')!r}, "
        "verbose=0))\n"
        "print(json.dumps([{'epoch': r.metrics['epoch'], 'iters': r.metrics['training_iteration'],"
        " 'pid': r.metrics['pid'], 'startup': r.metrics['startup_seconds'],"
        " 'ended': r.metrics['timestamp'],"
        " 'checkpoint': r.checkpoint.path, 'error': str(r.error)} for r in tuner.fit()]))\n"
    )
    trials = python_json([str(driver)], env=ray_cluster.client_env())
    assert len(trials) == 2
    for summary in trials:
        assert summary["error"] == "None" and summary["epoch"] == 2 and summary["iters"] == 2
    assert trials[0]["pid"] == trials[1]["pid"], "the second trial did not reuse the worker"
    states = []
    for summary in trials:
        checkpoint = Path(summary["checkpoint"])
        assert (checkpoint / "model.keras").exists()
        states.append(json.loads((checkpoint / "state.json").read_text()))
    assert [state["epoch"] for state in states] == [2, 2]
    # the reused process was reset: same seed, same weights as the fresh process trained
    assert states[0]["weights_sha256"] == states[1]["weights_sha256"]
    # a fresh worker pays the interpreter and imports, the reused one only its model
    first, second = sorted(trials, key=lambda t: t["ended"])
    assert second["startup"] < first["startup"], trials
    for state in states:
        # Ray does not size TF's thread pools: the trial did, from its 1-CPU allocation.
        assert state["runtime"]["cpus"] == 1 and state["runtime"]["intra_op_threads"] == 1
        # Our nodes start workers at nice 0, not Ray's 15 (see cluster.stack.ray_node_env).
        assert state["runtime"]["niceness"] == 0


@pytest.mark.services
def test_a_reused_worker_waits_for_its_stopped_trial_to_end(ray_cluster, tmp_path: Path) -> None:
    """A trial stopped early (ASHA, a stopper) whose thread takes longer than Tune's default
    2 s to end, as a Keras fit unwinding and system metrics flushing to MLflow can: the next
    trial still gets the worker. Without the trainable's setting the next trial fails with
    "Trainable runner reuse requires reset_config()" (and its searcher slot is never freed)."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import json, os, time\n"
        "from ray import tune\n"
        "from chestxpert.trainable.train import wait_for_stopping_trials\n"
        "def slow_to_stop(config):\n"
        "    wait_for_stopping_trials()  # what chestxpert.trainable.train.train does first\n"
        "    try:\n"
        "        for epoch in range(3):\n"
        "            tune.report({'epoch': epoch + 1, 'pid': os.getpid()})\n"
        "    finally:\n"
        "        time.sleep(5)  # a slow unwinding, past Tune's 2 s\n"
        "tuner = tune.Tuner(tune.with_resources(slow_to_stop, {'cpu': 1}),\n"
        "    param_space={'x': tune.uniform(0, 1)},\n"
        "    tune_config=tune.TuneConfig(num_samples=2, max_concurrent_trials=1,"
        " reuse_actors=True),\n"
        f"    run_config=tune.RunConfig(name='stop', storage_path={str(tmp_path / 's')!r},"
        " stop={'training_iteration': 1}, verbose=0))\n"
        "print(json.dumps([{'pid': r.metrics['pid'], 'error': str(r.error)}"
        " for r in tuner.fit()]))\n"
    )
    # without the setting Tune hangs with nothing running: a timeout here is that failure
    trials = python_json([str(driver)], env=ray_cluster.client_env(), timeout=240)
    assert [trial["error"] for trial in trials] == ["None", "None"], trials
    assert trials[0]["pid"] == trials[1]["pid"], "the second trial did not reuse the worker"
