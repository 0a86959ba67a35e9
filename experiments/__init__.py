"""Experiment tooling on top of the apps: the in-process reference trainer, resumable Hydra
sweeps of real `flwr run` jobs, the paper's figures and tables, and memory measurement."""
