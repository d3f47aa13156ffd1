"""Subcommands registered by the router, fusion, adapter and serve parts of the CLI."""

from __future__ import annotations

import argparse
from collections.abc import Callable

REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = []
