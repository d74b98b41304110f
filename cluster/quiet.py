"""Quiet start-up: TensorFlow, absl and CUDA print lines on every process that imports TensorFlow
(oneDNN, missing CUDA drivers, cuInit errors) that no user acts on; hidden unless verbose.

TF_CPP_MIN_LOG_LEVEL does not hide them: TensorFlow 2.21 writes them through absl before absl's
logging is initialised. So the first import of TensorFlow in a process runs with its C-level
stderr captured, and every captured line that is not known start-up noise is written back.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# "1": keep every start-up line (`chestxpert --verbose` sets it; Ray workers inherit it).
VERBOSE_ENV = "CHESTXPERT_VERBOSE"

NOISE = re.compile(
    r"oneDNN custom operations|cudart_stub|Could not find cuda drivers|cuInit|"
    r"cpu_feature_guard|To enable the following instructions|rebuild TensorFlow with|"
    r"All log messages before absl::InitializeLog|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation_placer|TF-TRT Warning|cuda_(dnn|fft|blas)\.cc"
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_environment() -> dict[str, str]:
    """Variables for a process started elsewhere (a Ray worker): quiet unless verbose here."""
    return {VERBOSE_ENV: "1"} if verbose() else {"TF_CPP_MIN_LOG_LEVEL": "2"}


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Capture file descriptor 2 (what C++ code writes too) and write back the lines that are
    not start-up noise when the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not NOISE.search(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class _QuietTensorFlowImport:
    """A meta-path finder that lets the normal finders locate `tensorflow` and wraps the
    module's execution (and its first device query, where cuInit complains) in
    `filtered_stderr`. It removes itself at the first import."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != "tensorflow":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if verbose() or spec is None or spec.loader is None:
            return spec
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        logging.getLogger("absl").setLevel(logging.ERROR)
        execute = spec.loader.exec_module

        def exec_module(module) -> None:
            with filtered_stderr():
                execute(module)
                module.config.list_physical_devices("GPU")

        spec.loader.exec_module = exec_module  # this spec's own loader instance only
        return spec


def quiet_tensorflow() -> None:
    """Make this process's first `import tensorflow` drop TensorFlow's start-up lines (unless
    CHESTXPERT_VERBOSE=1 then). Cheap and idempotent; TensorFlow already imported is left."""
    if "tensorflow" in sys.modules:
        return
    if not any(isinstance(finder, _QuietTensorFlowImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())
