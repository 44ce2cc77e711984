"""Hyperparameter search: Hydra overrides -> an Optuna study whose trials are ordinary runs."""
