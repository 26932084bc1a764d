"""Evaluation: generation backends, harmful-score judges, fine-tune-accuracy scorers and
the harness that runs them on a model and writes per-sample files."""
