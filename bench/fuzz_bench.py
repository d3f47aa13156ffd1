"""Property-based fuzzing of the service's OpenAPI schema with schemathesis: count 5xx (goal 0).

    python -m bench.fuzz_bench --examples 500          # a longer run than CI's, against the zoo graph

Positive (schema-valid) and negative (schema-violating) cases for every operation, seeded and
derandomized so a run is repeatable. Prints a table and writes bench/results/fuzz.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

KEY = "fuzz-key-0123456789"


def fuzz(url: str, headers: dict[str, str], examples: int, seed: int = 0) -> dict[str, Any]:
    """Run `examples` cases per operation and generation mode; return status counts and the 5xx cases."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    raw = httpx.get(f"{url}/openapi.json", headers=headers, timeout=60).raise_for_status().json()
    schema = schemathesis.openapi.from_dict(raw)
    statuses: Counter[str] = Counter()
    errors: list[dict[str, Any]] = []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hseed(seed)
            @settings(
                max_examples=examples,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                # Auth is fixed (the corpus tests auth variants); the rest is schemathesis's to choose.
                r = case.call(base_url=url, headers={**(case.headers or {}), **headers}, timeout=120)
                statuses[f"{r.status_code // 100}xx"] += 1
                if r.status_code >= 500:
                    errors.append(
                        {"operation": case.operation.label, "status": r.status_code, "body": str(case.body)[:300]}
                    )

            with contextlib.suppress(Unsatisfiable):  # e.g. an operation without inputs has no negative cases
                run()
    return {"requests": sum(statuses.values()), "statuses": dict(statuses), "server_errors": errors}


def main(argv: list[str] | None = None) -> int:
    from bench.faults_bench import graph_args, start, stop

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path(".zoo"))
    ap.add_argument("--examples", type=int, default=300, help="examples per operation and mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/fuzz.json"))
    args = ap.parse_args(argv)
    if not (args.zoo / "zoo.json").is_file():
        from deployments.models.zoo import build_zoo

        build_zoo(args.zoo)
    key_file = Path(f"/tmp/consilium-fuzz-key-{os.getpid()}")
    key_file.write_text(KEY)
    graph = graph_args(args.zoo, max_tokens=2)
    graph["server"]["api_key_file"] = str(key_file)
    url = start(args.zoo, f"fuzz{os.getpid()}", graph=graph)
    try:
        report = fuzz(url, {"Authorization": f"Bearer {KEY}"}, args.examples, args.seed)
    finally:
        stop()
        key_file.unlink(missing_ok=True)
    print("| examples/op/mode | requests | 2xx | 4xx | 5xx |")
    print("|---|---|---|---|---|")
    s = report["statuses"]
    print(f"| {args.examples} | {report['requests']} | {s.get('2xx', 0)} | {s.get('4xx', 0)} | {s.get('5xx', 0)} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"examples": args.examples, "seed": args.seed, **report}, indent=2))
    return 0 if not report["server_errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
