"""The final job: retrain the best configuration, evaluate, Grad-CAM, report, registry, pull and predict."""
