"""Builds the Serve application from a validated graph config: `serve run configs/zoo.yaml` calls build_app."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray.serve import Application

from deployments.config import ConfigError, GraphConfig, parse_graph_config
from deployments.council import load_router
from deployments.logging_setup import serve_logging_options
from deployments.merger import MergerDeployment
from deployments.paths import check_cluster_paths
from deployments.router_ingress import RouterIngress
from deployments.specialist import SpecialistDeployment

logger = logging.getLogger(__name__)


def _check_local_paths(config: GraphConfig) -> None:
    """A path-looking model that does not exist is a config error now, not a replica crash later."""

    def looks_local(p: str) -> bool:
        return p.startswith((".", "/", "~")) or Path(p).exists()

    problems = []
    for i, s in enumerate(config.specialists):
        if looks_local(s.model) and not Path(s.model).expanduser().exists():
            problems.append(f"specialists.{i}.model: {s.model!r} does not exist")
        for name, path in s.adapters.items():
            if looks_local(path) and not Path(path).expanduser().exists():
                problems.append(f"specialists.{i}.adapters.{name}: {path!r} does not exist")
    if looks_local(config.merger.model) and not Path(config.merger.model).expanduser().exists():
        problems.append(f"merger.model: {config.merger.model!r} does not exist")
    if problems:
        hint = " (for the tiny zoo run `consilium zoo build .zoo` first)" if ".zoo" in " ".join(problems) else ""
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems) + hint)


def build_app(args: dict[str, Any]) -> Application:
    """What `serve run` calls with the config file's `args`: validate everything, then bind the graph."""
    return build_graph(parse_graph_config(args, source="application args"))


def build_graph(config: GraphConfig, engine_overrides: dict[str, str | type] | None = None) -> Application:
    """Bind specialists (one deployment per group), merger and router ingress for a validated config.

    engine_overrides (group name -> engine class) lets tests inject engines without patching.
    """
    _check_local_paths(config)
    check_cluster_paths(config)  # on a multi-node cluster every artifact must resolve on every node
    try:
        load_router(config)  # domains must map onto specialists: fail at build time, not per request
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"invalid config: router: {err}") from None
    log_opts = serve_logging_options()  # CONSILIUM_LOG_FORMAT=json: every replica logs JSON lines
    handles = {}
    for group, members in config.groups().items():
        opts = members[0].deployment
        # The ingress's per-specialist bound (max_ongoing + max_queued per replica) refuses first; Ray's queue,
        # the backstop, gets one replica's max_ongoing more, because its view of a replica counts requests the
        # ingress already let go (cancelled, finished): measured 339 in flight vs 256 queued (docs/engines.md).
        handles[group] = SpecialistDeployment.options(
            name=f"specialist-{group}", **opts.serve_options(queue_slack=opts.max_ongoing_requests), **log_opts
        ).bind(
            [m.model_dump() for m in members],
            (engine_overrides or {}).get(group),
        )
    merger = MergerDeployment.options(**config.merger.deployment.serve_options(), **log_opts).bind(
        config.merger.model_dump()
    )
    ingress = RouterIngress.options(name="router", **config.server.deployment.serve_options(), **log_opts)
    logger.info("graph: %d specialist deployment(s) %s, merger, router", len(handles), sorted(handles))
    return ingress.bind(config.model_dump(), handles, merger)
