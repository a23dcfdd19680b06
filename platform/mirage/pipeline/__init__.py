"""Orchestration: what runs in what order (inputs, sweep -> ensemble -> registry, predictions).

Modules here call the core (data, features, model, train, ...), the Ray layer
(``mirage.distributed``) and the MLflow layer (``mirage.tracking``); they import neither Ray
nor MLflow themselves.
"""
