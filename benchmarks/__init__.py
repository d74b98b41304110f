"""Benchmarks (`make bench`, `python -m benchmarks [--smoke] [NAME ...]`): each module compares two
ways of doing one thing, side by side in one run, and prints both and their ratio.

Not tests, and not shipped: numbers vary ±20% run to run on a shared 2-core machine, so
they are printed, never asserted. `--smoke` runs each at a tiny size, which
tests/test_benchmarks.py does so that none of them rots.
"""

from __future__ import annotations

from types import ModuleType

from benchmarks import (
    asha,
    demo_report,
    demo_stages,
    driver,
    input_pipeline,
    journal,
    mlflow_job_runner,
    parquet_vs_png,
    prepare_memory,
    s3_startup,
    scale,
    shard_cache,
    startup_per_backbone,
    step_after_pipeline,
    tune_trial,
)

# In the order `python -m benchmarks` runs them; each module has `run(smoke: bool) -> None`.
BENCHMARKS: dict[str, ModuleType] = {
    module.__name__.rsplit(".", 1)[1]: module
    for module in (
        parquet_vs_png,
        input_pipeline,
        step_after_pipeline,
        prepare_memory,
        mlflow_job_runner,
        s3_startup,
        tune_trial,
        startup_per_backbone,
        asha,
        driver,
        journal,
        shard_cache,
        scale,
        demo_report,
        demo_stages,
    )
}
