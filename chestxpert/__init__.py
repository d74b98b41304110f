"""ChestXpert: hyperparameter sweeps for multi-label chest X-ray classification on Ray.

The app layer: `chestxpert.cli` and `chestxpert.demo` wire the parts together. The parts
live in the repository's top-level folders and import as `chestxpert.cluster`,
`chestxpert.datasets`, `chestxpert.trainable`, `chestxpert.sweeps` and `chestxpert.results`.
"""

__version__ = "0.2.0"

# Every process that runs our code (the CLI, Ray trial workers, tasks) imports this package
# first: TensorFlow's start-up lines are hidden from here on (cluster/quiet.py).
from chestxpert.cluster.quiet import quiet_tensorflow  # noqa: E402

quiet_tensorflow()
