"""Artifact paths on a Ray cluster: every model, adapter, router and merger path must resolve on every node.

The rule, checked when the app is built (`build_graph`):

- a hub id (`org/name`) is fine anywhere: each node downloads it or reads its own cache;
- an object-store URI (`s3://`, `gs://`, ...) is rejected: the engines load local directories and hub ids;
- a local path must exist where the app is built, and when the Ray cluster has more than one node:
  - a relative path is rejected unless the job ships a `runtime_env` `working_dir` (Ray then unpacks it
    on every node and replicas start inside it), because it resolves against each node's own working
    directory and exists only where the app was built;
  - an absolute path is probed on every alive node (a zero-CPU task pinned to each node), so a path that
    lives on one machine's disk and not on the shared filesystem fails here, naming field, value and node.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from deployments.config import ConfigError, GraphConfig

logger = logging.getLogger(__name__)

URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
PROBE_TIMEOUT_S = 60.0


def artifact_fields(config: GraphConfig) -> list[tuple[str, str]]:
    """(field path, value) of every artifact a replica loads."""
    out = []
    for i, s in enumerate(config.specialists):
        out.append((f"specialists.{i}.model", s.model))
        out.extend((f"specialists.{i}.adapters.{name}", path) for name, path in s.adapters.items())
    if config.router.model is not None:
        out.append(("router.model", config.router.model))
    out.append(("merger.model", config.merger.model))
    if config.merger.merger_weights is not None:
        out.append(("merger.merger_weights", config.merger.merger_weights))
    return out


def is_local(value: str) -> bool:
    """A path rather than a hub id: it looks like one, or it exists here."""
    return value.startswith((".", "/", "~")) or Path(value).exists()


def alive_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the Ray cluster this process is connected to; [] when not connected."""
    try:
        import ray
    except ImportError:  # the in-process pipeline runs without Ray
        return []
    if not ray.is_initialized():
        return []
    return [n for n in ray.nodes() if n.get("Alive")]


def _missing(paths: list[str]) -> list[str]:
    return [p for p in paths if not os.path.exists(os.path.expanduser(p))]


def missing_per_node(paths: list[str], nodes: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Node id -> the paths that do not exist on that node (a zero-CPU task pinned to each node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_missing)
    refs = {
        n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            paths
        )
        for n in nodes
    }
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    out = {}
    for node_id, ref in refs.items():
        if ref in ready:
            out[node_id] = ray.get(ref)
        else:  # a busy or dying node must not hang the build: say so and go on
            logger.warning("artifact probe on node %s did not answer within %.0fs", node_id, PROBE_TIMEOUT_S)
            ray.cancel(ref, force=True)
    return out


def check_cluster_paths(config: GraphConfig, nodes: list[dict[str, Any]] | None = None) -> None:
    """Raise ConfigError naming each artifact field whose value will not resolve on every node."""
    fields = artifact_fields(config)
    problems = []
    for name, value in fields:
        if URI.match(value):
            problems.append(
                f"{name}: {value!r} is an object-store URI, which the engines do not load; copy it to a path "
                "every node mounts, or use a hub id"
            )
    if config.merger.merger_weights and not Path(config.merger.merger_weights).expanduser().exists():
        problems.append(f"merger.merger_weights: {config.merger.merger_weights!r} does not exist")
    nodes = alive_nodes() if nodes is None else nodes
    local = [(n, v) for n, v in fields if not URI.match(v) and is_local(v)]
    if len(nodes) > 1 and local:
        import ray

        shipped = (ray.get_runtime_context().runtime_env or {}).get("working_dir")
        for name, value in local:
            if not os.path.isabs(os.path.expanduser(value)) and not shipped:
                problems.append(
                    f"{name}: {value!r} is a relative path on a {len(nodes)}-node Ray cluster: it resolves "
                    f"against each node's working directory and exists only where the app was built "
                    f"({os.getcwd()}). Use an absolute path on a filesystem every node mounts, a hub id, or "
                    "ship the files with runtime_env working_dir"
                )
        absolute = sorted({os.path.expanduser(v) for _, v in local if os.path.isabs(os.path.expanduser(v))})
        if absolute and not problems:
            labels = {n["NodeID"]: n.get("NodeManagerAddress", "") for n in nodes}
            for node_id, missing in missing_per_node(absolute, nodes).items():
                for name, value in local:
                    if os.path.expanduser(value) in missing:
                        problems.append(
                            f"{name}: {value!r} does not exist on node {node_id[:12]} ({labels[node_id]}); "
                            "every node must see it (a shared filesystem or the same image)"
                        )
    if problems:
        raise ConfigError("invalid config for this cluster:\n  " + "\n  ".join(problems))
