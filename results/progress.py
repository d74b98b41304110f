"""Progress of a long job in stages: one line when a stage starts, one when it ends with its
elapsed seconds, so a user watching `chestxpert final` knows what it is doing and for how long."""

from __future__ import annotations

import time


class Stages:
    """Prints `<job>: <stage> ...` at each start and `<job>: <stage> done in N.N s` at its end.

    Starting a stage ends the one before; `end()` ends the last. Lines go to stdout, flushed
    (a Ray job's log shows them as they happen).
    """

    def __init__(self, job: str) -> None:
        self.job = job
        self._current: tuple[str, float] | None = None
        self.seconds: dict[str, float] = {}  # each ended stage's elapsed seconds

    def start(self, stage: str, detail: str = "") -> None:
        self.end()
        print(f"{self.job}: {stage}{f' ({detail})' if detail else ''} ...", flush=True)
        self._current = (stage, time.monotonic())

    def end(self) -> None:
        if self._current is None:
            return
        stage, started = self._current
        self._current = None
        self.seconds[stage] = time.monotonic() - started
        print(f"{self.job}: {stage} done in {self.seconds[stage]:.1f} s", flush=True)
