"""Subcommands of ``mirage``, one module per pipeline stage; :mod:`mirage.commands.registry` lists them.

A command module holds argument adders (``add_*_args``) and handlers ``(cfg, args) -> exit status``
that parse, run preflight checks, call :mod:`mirage.pipeline` and print. Handlers import the
pipeline when they run, not at module import: it loads Ray, MLflow and torch (seconds), and the
parser, built from every command module, must answer ``mirage --help`` fast.
"""
