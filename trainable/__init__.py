"""The Ray Tune trial: backbone registry, weighted loss, full-validation metrics, checkpoints."""
