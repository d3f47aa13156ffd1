"""Subcommands registered by the router, fusion, adapter and serve parts of the CLI."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from deployments.adapters_cli import register as register_adapter
from fusion.cli import register as register_fusion
from router.cli import register as register_router

REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [register_router, register_fusion, register_adapter]
