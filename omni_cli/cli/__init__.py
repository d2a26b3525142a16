"""The `omni` command: parses options, builds objects, and calls one function per command.

`shared.py` holds the Typer app, the shared options and `main`; each family of commands registers
itself on the app from its own module (imported here, so `omni_cli.cli.app` lists them all).
Importing this package never imports torch.
"""

# Registers the commands, in the order `omni --help` lists them: talking first.
from omni_cli.cli import talk, serve, models, training, research  # noqa: F401, I001
from omni_cli.cli.shared import app, fail, main

__all__ = ["app", "fail", "main"]
