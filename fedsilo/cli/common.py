"""What every ``fedsilo`` command shares: how a command fails with a message and an exit status."""

from __future__ import annotations

import sys
from typing import NoReturn

import click

__all__ = ["fail"]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: <message>`` to stderr and exit with ``code`` (2: bad usage; 1: the check failed)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)
