"""A Tune driver for the checkpoint-retention drill (tests/test_sweep_drills.py): one trial
whose scores rank its second checkpoint below the best two once the third registers, with the
sweep's own retention (`sweeps.run` builds Tune the same way).

`python retention_drill_driver.py run|resume STORAGE MARKS`: on the first run, the trial waits
until Tune's experiment state in storage names its second checkpoint, reports its third and
fourth (`tune.report` returns once the driver has handled the report: the retention ran on
the fourth with the second below the best two), touches MARKS/killable and sleeps, so
the test can SIGKILL the driver before the next snapshot (TUNE_GLOBAL_CHECKPOINT_S apart). A
resumed trial touches MARKS/restored-<epoch>. With TUNE_KEEPS=1 the driver uses Tune's own
`num_to_keep` instead and stops after the third, to show the resume that loses the trial.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import ray
from ray import tune

from chestxpert.sweeps.layout import SweepLocation
from chestxpert.sweeps.retention import CheckpointRetention
from chestxpert.sweeps.status import newest_experiment_state

NAME = "retention"
SCORES = [0.9, 0.1, 0.5, 0.6, 0.7]  # val_auc_macro of epochs 1-5
KEEP = 2


def _location(storage: str) -> SweepLocation:
    return SweepLocation(pafs.LocalFileSystem(), storage, NAME, f"file://{storage}/{NAME}")


def resume_checkpoints(location: SweepLocation) -> dict[str, str | None] | None:
    """Trial id -> the checkpoint folder (`checkpoint_000001`) a resume would restore the trial
    from, per Tune's newest experiment state in storage; None while there is none (or it is
    mid-upload). Tune's own decoder, which unpickles the trial's checkpoint bookkeeping."""
    from ray.tune.utils.serialization import TuneFunctionDecoder

    info = newest_experiment_state(location)
    if info is None:
        return None
    decoder = functools.partial(TuneFunctionDecoder, allow_cloudpickle=True)
    try:
        with location.fs.open_input_stream(info.path) as stream:
            data = json.loads(stream.read())
    except (OSError, ValueError):
        return None
    named = {}
    for trial_state, run_metadata in data["trial_data"]:
        manager = json.loads(run_metadata, cls=decoder)["checkpoint_manager"]
        latest = manager.latest_checkpoint_result
        checkpoint = latest.checkpoint if latest is not None else None
        named[json.loads(trial_state)["trial_id"]] = (
            checkpoint.path.rsplit("/", 1)[-1] if checkpoint else None
        )
    return named


def _wait_until_state_names(location: SweepLocation, checkpoint_folder: str) -> None:
    while list((resume_checkpoints(location) or {}).values()) != [checkpoint_folder]:
        time.sleep(0.1)


def train(config: dict) -> None:
    marks = Path(config["marks"])
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = json.loads((Path(folder) / "epoch.json").read_text())["epoch"]
        (marks / f"restored-{start}").touch()
    for epoch in range(start + 1, len(SCORES) + 1):
        folder = Path(tempfile.mkdtemp())
        (folder / "epoch.json").write_text(json.dumps({"epoch": epoch}))
        # Returns once the driver has registered this checkpoint and asks for the next epoch.
        tune.report(
            {"val_auc_macro": SCORES[epoch - 1], "epoch": epoch},
            checkpoint=tune.Checkpoint.from_directory(str(folder)),
        )
        shutil.rmtree(folder)
        if checkpoint is None and epoch == 2:
            _wait_until_state_names(_location(config["storage"]), "checkpoint_000001")
        if checkpoint is None and epoch == config["kill_after"]:
            (marks / "killable").touch()
            time.sleep(600)


def main() -> None:
    action, storage, marks = sys.argv[1:4]
    ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING")
    location = _location(storage)
    retention = CheckpointRetention(location, KEEP, "val_auc_macro", "max")
    # TUNE_KEEPS=1: Tune's own num_to_keep instead (what sweeps.run used before), for contrast.
    tune_keeps = os.environ.get("TUNE_KEEPS") == "1"
    trainable = tune.with_resources(train, {"cpu": 1})
    if action == "run":
        tuner = tune.Tuner(
            trainable,
            # Tune's own num_to_keep (2) forces a snapshot at a trial's second checkpoint since
            # the last one, so its window closes after the third.
            param_space={"storage": storage, "marks": marks, "kill_after": 3 if tune_keeps else 4},
            tune_config=tune.TuneConfig(metric="val_auc_macro", mode="max", num_samples=1),
            run_config=tune.RunConfig(
                name=NAME,
                storage_path=storage,
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=KEEP if tune_keeps else None,
                    checkpoint_score_attribute="val_auc_macro",
                    checkpoint_score_order="max",
                ),
                callbacks=[] if tune_keeps else [retention],
                verbose=0,
            ),
        )
    else:
        tuner = tune.Tuner.restore(location.path, trainable=trainable, resume_unfinished=True)
        if not tune_keeps:  # as sweeps.run does: the pickled callback is inert
            tuner._local_tuner.get_run_config().callbacks = [retention]
    results = tuner.fit()
    print(
        json.dumps(
            [
                {"epoch": r.metrics.get("epoch"), "error": str(r.error) if r.error else None}
                for r in results
            ]
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
