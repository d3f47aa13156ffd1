"""The `consilium` command line: zoo, generate, router, fusion, adapter, serve and front subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deployments.config import GraphConfig


class CLIError(Exception):
    """A user mistake on the command line: printed as one line, exit status 2."""


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _unit_float(lo: float, hi: float, lo_open: bool = False) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if x < lo or x > hi or (lo_open and x == lo):
            bracket = "(" if lo_open else "["
            raise argparse.ArgumentTypeError(f"{value!r} is outside {bracket}{lo}, {hi}]")
        return x

    return parse


def _name_eq_dir(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    if not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"adapter directory {path!r} does not exist")
    return name, path


def _existing_path(value: str) -> Path:
    p = Path(value)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"path {value!r} does not exist")
    return p


# ---- zoo ------------------------------------------------------------------------------------------


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from deployments.models.zoo import build_zoo

    paths = build_zoo(args.dir, seed=args.seed)
    for name, path in paths.items():
        print(f"{name:16s} {path}")
    return 0


# ---- generate -------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    import asyncio

    from deployments.config import EngineConfig
    from deployments.engines.base import EngineInputError, GenerationRequest, SamplingParams
    from deployments.engines.hf import HFEngine

    adapters = dict(args.adapter_dir or [])
    engine = HFEngine(EngineConfig(model=str(args.model), quantization=args.quantization, adapters=adapters))
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed
    )
    request = GenerationRequest(
        messages=({"role": "user", "content": args.prompt},), params=params, adapter=args.adapter
    )
    try:
        if args.stream:

            async def run() -> None:
                async for delta in engine.stream(request):
                    print(delta.text, end="", flush=True)
                print()

            asyncio.run(run())
        else:
            result = engine.generate_sync(request)
            print(result.text)
            print(
                f"[{result.prompt_tokens} prompt + {result.completion_tokens} completion tokens, "
                f"finish={result.finish_reason}]",
                file=sys.stderr,
            )
    except EngineInputError as err:
        raise CLIError(str(err)) from None
    return 0


# ---- config ---------------------------------------------------------------------------------------


def cmd_config_check(args: argparse.Namespace) -> int:
    from deployments.config import ConfigError, load_graph_config

    try:
        cfg = load_graph_config(args.path)
    except ConfigError as err:
        raise CLIError(str(err)) from None
    print(json.dumps({"specialists": [s.name for s in cfg.specialists], "groups": list(cfg.groups())}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Validate the config (errors name the field), then hand over to `serve run` in the foreground; with
    --front, HAProxy first takes the config's address and Serve's proxy moves behind it on loopback."""
    import os
    import shutil

    from deployments.config import ConfigError, load_graph_config

    try:
        config = load_graph_config(args.config)
    except ConfigError as err:
        raise CLIError(str(err)) from None
    if args.serve_port is not None and not args.front:
        raise CLIError("--serve-port only applies with --front")
    serve_bin = shutil.which("serve") or str(Path(sys.executable).parent / "serve")
    run = Path(args.config)
    if args.front:
        run = _start_front(args, config)
    print(f"consilium: starting {args.config} (first start takes a minute: every replica loads its model)")
    sys.stdout.flush()  # exec replaces this process: what is buffered would be lost
    os.execv(serve_bin, [serve_bin, "run", str(run)])
    return 0  # not reached


def _start_front(args: argparse.Namespace, config: GraphConfig) -> Path:
    """Start HAProxy on the config's address (it stops when `serve run` exits) and return the Serve config
    to run instead: the same, with its HTTP proxy on 127.0.0.1:--serve-port (default: the port + 1)."""
    import tempfile

    import yaml

    from deployments.front import FrontError, behind_front, plan_front, serve_settings, start_haproxy, write_front

    data = yaml.safe_load(Path(args.config).read_text())
    try:
        moved, listen, inner = behind_front(data, args.serve_port)
        route_prefix, _ = serve_settings(data)
        plan = plan_front(config, listen=listen, backends=(inner,), route_prefix=route_prefix)
        work = Path(tempfile.mkdtemp(prefix="consilium-front-"))
        cfg = write_front(plan, work / "front")
        run = work / "serve_config.yaml"
        run.write_text(yaml.safe_dump(moved, sort_keys=False))
        start_haproxy(cfg, listen, die_with_parent=True)
    except FrontError as err:
        raise CLIError(str(err)) from None
    print(
        f"consilium: front (HAProxy) on {listen}, refusing completions past {plan.max_inflight} in flight; "
        f"Serve's proxy behind it on {inner} ({cfg})"
    )
    return run


def cmd_front(args: argparse.Namespace) -> int:
    """Write an HAProxy front for a config (deployments/front.py) and check it with `haproxy -c` when installed."""
    import shutil
    import subprocess

    import yaml

    from deployments.config import ConfigError, load_graph_config
    from deployments.front import FrontError, parse_address, plan_front, serve_settings, write_front

    try:
        config = load_graph_config(args.config)
        route_prefix, serve_proxy = serve_settings(yaml.safe_load(Path(args.config).read_text()))
        backends = tuple(parse_address(b, "--backend") for b in args.backend or ())
        plan = plan_front(
            config,
            listen=parse_address(args.listen, "--listen"),
            backends=backends or (serve_proxy or parse_address("127.0.0.1:8000", "--backend"),),
            route_prefix=route_prefix,
            max_inflight=args.max_inflight,
            metrics=parse_address(args.metrics_listen, "--metrics-listen") if args.metrics_listen else None,
        )
        cfg = write_front(plan, Path(args.out))
    except (ConfigError, FrontError) as err:
        raise CLIError(str(err)) from None
    haproxy = shutil.which("haproxy")
    if haproxy is not None:
        check = subprocess.run([haproxy, "-c", "-q", "-f", str(cfg)], capture_output=True, text=True, timeout=60)
        if check.returncode != 0:
            raise CLIError(f"haproxy -c rejected {cfg}: {(check.stderr or check.stdout).strip()}")
    backends_text = ", ".join(str(b) for b in plan.backends)
    print(
        f"consilium: wrote {cfg}: listens on {plan.listen}, forwards to Serve at {backends_text}, refuses "
        f"completions past {plan.max_inflight} in flight"
        + (f", metrics at http://{plan.metrics}/metrics" if plan.metrics else "")
        + ("" if haproxy else " (haproxy not installed: not checked)")
    )
    print(f"run it with: haproxy -f {cfg}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="consilium", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="the tiny local model zoo").add_subparsers(dest="zoo_cmd", required=True)
    zb = zoo.add_parser("build", help="write the tiny zoo (seconds, deterministic)")
    zb.add_argument("dir", help="output directory")
    zb.add_argument("--seed", type=int, default=0)
    zb.set_defaults(func=cmd_zoo_build)

    gen = sub.add_parser("generate", help="generate from one model with the HF engine")
    gen.add_argument("--model", type=_existing_path, required=True, help="checkpoint directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--quantization", choices=["none", "nf4", "int8"], default="none")
    gen.add_argument(
        "--adapter-dir", action="append", type=_name_eq_dir, metavar="NAME=DIR", help="load a LoRA adapter"
    )
    gen.add_argument("--adapter", help="adapter name to use for this prompt")
    gen.add_argument("--temperature", type=_unit_float(0, 2), default=0.7)
    gen.add_argument("--top-p", type=_unit_float(0, 1, lo_open=True), default=0.9)
    gen.add_argument("--max-new-tokens", type=_positive_int, default=64)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stream", action="store_true")
    gen.set_defaults(func=cmd_generate)

    cfg = sub.add_parser("config", help="configuration tools").add_subparsers(dest="config_cmd", required=True)
    cc = cfg.add_parser("check", help="validate a graph or Serve config file")
    cc.add_argument("path")
    cc.set_defaults(func=cmd_config_check)

    srv = sub.add_parser("serve", help="run the Serve graph of a config in the foreground")
    srv.add_argument("config", type=_existing_path, help="Serve config file, e.g. configs/embedded.yaml")
    srv.add_argument(
        "--front",
        action="store_true",
        help="run the HAProxy front (see `front`) on the config's address, Serve's proxy behind it on loopback",
    )
    srv.add_argument(
        "--serve-port",
        type=_positive_int,
        help="with --front: the loopback port Serve's proxy moves to (default: the config's port + 1)",
    )
    srv.set_defaults(func=cmd_serve)

    fr = sub.add_parser("front", help="write an HAProxy front that refuses completions past the service's capacity")
    fr.add_argument("config", type=_existing_path, help="the Serve config the service runs, e.g. serve_config.yaml")
    fr.add_argument("--out", required=True, help="directory for haproxy.cfg and the response files it reads")
    fr.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT the front listens on (default %(default)s)")
    fr.add_argument(
        "--backend",
        action="append",
        metavar="HOST:PORT",
        help="a Serve HTTP proxy (repeatable, one per node); default: the config's http_options, else 127.0.0.1:8000",
    )
    fr.add_argument(
        "--max-inflight",
        type=_positive_int,
        help="completions in flight to Serve past which the front refuses; default: server.max_inflight_requests "
        "(or the derived ingress bound) x the ingress's replicas (max_replicas with autoscaling)",
    )
    fr.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve HAProxy's Prometheus metrics (the front's refusals, completions in flight) at HOST:PORT/metrics",
    )
    fr.set_defaults(func=cmd_front)

    # Subcommands owned by the other parts; their modules import nothing heavy at module level.
    from deployments.models.adapters_cli import register as register_adapter
    from deployments.models.cli import register as register_models
    from fusion.cli import register as register_fusion
    from router.cli import register as register_router

    for register in (register_router, register_fusion, register_adapter, register_models):
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except CLIError as err:
        print(f"consilium: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
