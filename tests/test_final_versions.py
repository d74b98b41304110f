"""`chestxpert final` publishes atomically and keeps the previous model, with real processes: a
`final` killed mid-retrain (SIGKILL) leaves `pull-best --final` serving the previous model or
saying there is none; a worse model is kept as a version, not promoted, unless `--promote`; a
registration that MLflow refused (a real server stopped) is finished later by `final --finish`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from chestxpert.cluster.processes import free_port, stop_group
from chestxpert.cluster.stack import StackOptions, start_mlflow
from chestxpert.sweeps.layout import SPEC_FILE, SUMMARY_FILE
from tests.conftest import CHESTXPERT_CLI, REPO, short_tmpdir

pytestmark = pytest.mark.services

SWEEP = "tiny-final"
QUICK = ["--local", "--epochs", "1", "--bootstrap", "100"]


def copy_sweep(finished: dict, root: Path, model_name: str, with_final: bool) -> dict[str, str]:
    """The finished sweep copied to its own storage (with or without its final models) and
    registered under its own model name, so each test moves only its own `champion`.

    Its best configuration names convnet_small instead of densenet_tiny: these tests are about
    how a version is published, kept and registered, which is the same for every backbone, and
    convnet_small's graph builds in a fraction of the time in each of their six retrains.
    """
    source = finished["root"] / "storage" / SWEEP
    target = root / "storage" / SWEEP
    shutil.copytree(source, target, ignore=None if with_final else shutil.ignore_patterns("final"))
    recorded = json.loads((target / SPEC_FILE).read_text())
    recorded["raw"]["model_name"] = model_name
    (target / SPEC_FILE).write_text(json.dumps(recorded))
    summary = json.loads((target / SUMMARY_FILE).read_text())
    assert summary["best_config"]["backbone"] == "densenet_tiny"
    summary["best_config"]["backbone"] = "convnet_small"
    (target / SUMMARY_FILE).write_text(json.dumps(summary))
    return {
        **finished["env"],
        "CHESTXPERT_STORAGE": str(root / "storage"),
        "CHESTXPERT_WORKSPACE": str(root / "ws"),
    }


def cli(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHESTXPERT_CLI, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def pulled_model(env: dict[str, str], to: Path, *flags: str) -> bytes:
    """`pull-best tiny-final --final [flags]` into a fresh `to`; the model.keras it fetched."""
    shutil.rmtree(to, ignore_errors=True)
    ok(cli("pull-best", SWEEP, "--final", "--to", str(to), *flags, env=env))
    return (to / "model" / "model.keras").read_bytes()


def new_uploads(final: Path, since_ns: int) -> list[Path]:
    """model.keras files under `final/` written after `since_ns`, wherever the retrain puts them."""
    found = []
    for path in final.rglob("model.keras"):
        try:
            if path.stat().st_mtime_ns > since_ns:
                found.append(path)
        except FileNotFoundError:
            pass  # replaced while we looked
    return found


def start_final(env: dict[str, str], log: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [CHESTXPERT_CLI, "final", SWEEP, *flags],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def wait_for_upload(proc: subprocess.Popen, final: Path, since_ns: int, log: Path) -> list[Path]:
    """Poll storage until the retrain has uploaded an epoch's model (at most 10 minutes)."""
    deadline = time.monotonic() + 600
    while not (uploads := new_uploads(final, since_ns)):
        assert proc.poll() is None, f"final ended before uploading an epoch:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no epoch uploaded in 10 min:\n{log.read_text()}"
        time.sleep(0.05)
    return uploads


def version_uri(root: Path, number: int) -> str:
    return (root / "storage" / SWEEP / "final" / "versions" / str(number)).as_uri()


@pytest.mark.parametrize("previous", [True, False], ids=["previous-final", "no-final-yet"])
def test_sigkill_mid_retrain_leaves_the_previous_final_model(
    finished_sweep: dict, tmp_path: Path, previous: bool
) -> None:
    env = copy_sweep(finished_sweep, tmp_path, "tiny-final-drill", with_final=previous)
    final = tmp_path / "storage" / SWEEP / "final"
    final.mkdir(exist_ok=True)
    before = pulled_model(env, tmp_path / "before") if previous else None
    pointer = final / "current.json"
    pointed = pointer.read_bytes() if pointer.exists() else None

    log = tmp_path / "final.log"
    since = time.time_ns()
    proc = start_final(env, log, "--local", "--epochs", "6", "--bootstrap", "100")
    try:
        uploads = wait_for_upload(proc, final, since, log)
        os.kill(proc.pid, signal.SIGKILL)  # mid-retrain: epochs 2 to 6 are still to come
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    after = cli("pull-best", SWEEP, "--final", "--to", str(tmp_path / "after"), env=env)
    if previous:
        assert ok(after) and (tmp_path / "after" / "model" / "model.keras").read_bytes() == before
        assert (pointer.read_bytes() if pointer.exists() else None) == pointed
    else:
        assert after.returncode == 3, after.stdout + after.stderr
        assert (
            "no final model yet" in after.stderr and "chestxpert final tiny-final" in after.stderr
        )
        assert "Traceback" not in after.stderr and not (tmp_path / "after" / "model").exists()
    assert "version 2" not in after.stdout and not (final / "versions" / "2").exists()
    assert all("staging" in path.relative_to(final).parts for path in uploads), uploads

    # The next command cleans up what the killed retrain left and changes nothing else.
    finished = ok(cli("final", SWEEP, "--finish", env=env))
    assert "removed final/staging/" in finished and "nothing to finish" in finished
    assert not list((final / "staging").iterdir())
    if previous:
        assert pulled_model(env, tmp_path / "again") == before


def test_a_worse_model_is_kept_as_a_version_and_promote_forces_it(
    finished_sweep: dict, tmp_path: Path
) -> None:
    import mlflow

    model_name = "tiny-final-promote"
    env = copy_sweep(finished_sweep, tmp_path, model_name, with_final=True)
    final = tmp_path / "storage" / SWEEP / "final"
    # A champion nothing can beat: version 1 recorded with a validation AUC of 1.0.
    pointer = json.loads((final / "current.json").read_text())
    pointer.update(value=1.0, model_name=model_name)
    (final / "current.json").write_text(json.dumps(pointer))
    champion_bytes = pulled_model(env, tmp_path / "v1")

    out = ok(cli("final", SWEEP, *QUICK, env=env))
    assert "kept, not promoted: version 2 (val_auc_macro 0." in out
    assert "< 1.0000 of version 1, the champion)" in out
    assert f"pull-best {SWEEP} --final --version 2" in out
    assert json.loads((final / "current.json").read_text()) == pointer
    assert pulled_model(env, tmp_path / "current") == champion_bytes
    kept = pulled_model(env, tmp_path / "v2", "--version", "2")
    assert kept == (final / "versions" / "2" / "model" / "model.keras").read_bytes()
    assert kept != champion_bytes
    client = mlflow.MlflowClient(tracking_uri=finished_sweep["mlflow"])
    (registered,) = client.search_model_versions(f"name = '{model_name}'")
    assert registered.tags["chestxpert.final_version"] == version_uri(tmp_path, 2)
    assert not client.get_registered_model(model_name).aliases, "champion did not move"

    # --finish decides the same again, registering nothing twice; --finish --promote forces it.
    assert "kept, not promoted: version 2" in ok(cli("final", SWEEP, "--finish", env=env))
    assert len(client.search_model_versions(f"name = '{model_name}'")) == 1
    out = ok(cli("final", SWEEP, "--finish", "--promote", env=env))
    assert "champion: version 2 (val_auc_macro" in out and "of version 1: --promote" in out
    assert client.get_model_version_by_alias(model_name, "champion").version == registered.version
    assert json.loads((final / "current.json").read_text())["version"] == 2
    assert pulled_model(env, tmp_path / "promoted") == kept

    # Again a champion nothing can beat, now version 2: `final --promote` replaces it.
    pointer = json.loads((final / "current.json").read_text())
    pointer.update(value=1.0)
    (final / "current.json").write_text(json.dumps(pointer))
    out = ok(cli("final", SWEEP, *QUICK, "--promote", env=env))
    assert "champion: version 3 (val_auc_macro" in out and "of version 2: --promote" in out
    current = json.loads((final / "current.json").read_text())
    champion = client.get_model_version_by_alias(model_name, "champion")
    assert current["version"] == 3 and current["registered_version"] == champion.version
    assert champion.tags["chestxpert.final_version"] == version_uri(tmp_path, 3)
    assert "test_auc_macro" in client.get_run(champion.run_id).data.metrics
    assert (
        pulled_model(env, tmp_path / "v3")
        == (final / "versions" / "3" / "model" / "model.keras").read_bytes()
    )
    assert pulled_model(env, tmp_path / "v2-again", "--version", "2") == kept


def test_a_registration_mlflow_refused_is_finished_later(
    finished_sweep: dict, tmp_path: Path
) -> None:
    import mlflow

    model_name = "tiny-final-finish"
    env = copy_sweep(finished_sweep, tmp_path, model_name, with_final=False)
    final = tmp_path / "storage" / SWEEP / "final"
    ws = short_tmpdir("cxmlf")
    artifacts = (ws / "storage").as_uri()
    server = start_mlflow(StackOptions(workspace=ws, mlflow_port=free_port()), artifacts)
    try:
        env["MLFLOW_TRACKING_URI"] = server["url"]
        log = tmp_path / "final.log"
        since = time.time_ns()
        proc = start_final(env, log, "--local", "--epochs", "4", "--bootstrap", "100")
        try:
            # MLflow is needed only once the version is published: stop it during the retrain.
            wait_for_upload(proc, final, since, log)
            stop_group(server["pid"], server["start_time"])
            proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out = log.read_text()
        assert proc.returncode == 3, out
        error = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(error) == 1 and "Traceback" not in out, out
        assert "version 1 of tiny-final is published in storage" in error[0]
        assert f"MLflow at {server['url']} failed" in error[0]
        assert "`chestxpert final tiny-final --finish`" in error[0]
        assert (final / "versions" / "1" / "SHA256SUMS").is_file()
        assert not (final / "current.json").exists(), "the pointer waits for the registration"
        assert not list((final / "staging").iterdir()), "staging is removed once published"
        refused = cli("pull-best", SWEEP, "--final", "--to", str(tmp_path / "none"), env=env)
        assert refused.returncode == 3 and "--finish" in refused.stderr, refused.stderr
        published = pulled_model(env, tmp_path / "v1", "--version", "1")

        # The same store, served again (on a new port): finish registers and promotes.
        server = start_mlflow(StackOptions(workspace=ws, mlflow_port=free_port()), artifacts)
        env["MLFLOW_TRACKING_URI"] = server["url"]
        out = ok(cli("final", SWEEP, "--finish", env=env))
        assert "champion: version 1 (val_auc_macro" in out and "had no final model" in out
        client = mlflow.MlflowClient(tracking_uri=server["url"])
        champion = client.get_model_version_by_alias(model_name, "champion")
        pointer = json.loads((final / "current.json").read_text())
        assert pointer["version"] == 1 and pointer["registered_version"] == champion.version
        assert champion.tags["chestxpert.final_version"] == version_uri(tmp_path, 1)
        run = client.get_run(champion.run_id)
        assert run.data.tags["chestxpert.role"] == "final" and "test_auc_macro" in run.data.metrics
        assert pulled_model(env, tmp_path / "current") == published

        again = ok(cli("final", SWEEP, "--finish", env=env))
        assert "nothing to finish" in again
        assert len(client.search_model_versions(f"name = '{model_name}'")) == 1
    finally:
        stop_group(server["pid"], server["start_time"])
