"""Subcommands of ``mirage``, one module per pipeline stage; importing registers them."""

from mirage.commands import config, data, extract, serve, sweep, train, video  # noqa: F401
