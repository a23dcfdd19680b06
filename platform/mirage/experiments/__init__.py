"""Declared experiments: a grid of config overrides, seeds and methods (:mod:`.spec`), how a trained
model is scored on each split (:mod:`.scoring`), and the tables and figures of a finished experiment
(:mod:`.report`). Core: no Ray, no MLflow; running one is :mod:`mirage.pipeline.experiment`.
"""
