"""A private local Ray cluster with Serve's HTTP proxy on a free loopback port, for the Serve tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from bench.common import free_port


@contextlib.contextmanager
def local_serve(**ray_kwargs: Any) -> Iterator[str]:
    """Start Ray (never attaching to a running cluster) and Serve; yield the base URL; shut both down."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, **ray_kwargs)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
