"""Multi-node council on one machine: placement, proxies on every node, autoscaling under a load step, node loss.

    python -m bench.cluster_bench [--zoo .zoo] [--workers 3] [--step-clients 8] [--ha] [--ray-default-health-checks]

Starts a head and N worker Ray nodes in-process (ray.cluster_utils.Cluster: separate raylets, logical
GPUs, node labels), deploys configs/zoo.yaml's graph on the zoo with one GPU per specialist replica,
then prints a timeline (offered load, replicas per deployment, p50 latency, errors) every few seconds
while it steps the load up and down and removes a worker node. Writes bench/results/cluster.json
(cluster_ha.json with --ha). tests/test_cluster.py reuses the helpers below.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.common import free_port

REPO = Path(__file__).resolve().parents[1]
ROLE_LABEL = "consilium.io/role"
NODE_LABEL = "consilium.io/node"
SPECIALIST_DEPLOYMENTS = ("specialist-medical", "specialist-code", "specialist-general")


@dataclass
class LocalCluster:
    """A head and worker raylets on this machine; each worker's Serve proxy gets its own HTTP port."""

    cluster: Any
    head_port: int
    worker_ports: dict[str, int] = field(default_factory=dict)  # node id -> proxy HTTP port
    workers: dict[str, Any] = field(default_factory=dict)  # node id -> ray._private.node.Node

    @property
    def ports(self) -> dict[str, int]:
        """Node id -> the port its proxy listens on (head included; removed workers dropped)."""
        return {self.head_id: self.head_port, **self.worker_ports}

    @property
    def head_id(self) -> str:
        return self.cluster.head_node.node_id

    def add_worker(self, index: int, num_gpus: int, num_cpus: float) -> str:
        # On one machine every proxy would bind the same port (Ray sets SO_REUSEPORT and the kernel
        # spreads connections among them). Ray reads RAY_SERVE_WORKER_PROXY_HTTP_PORT in each worker
        # node's proxy process, which inherits the raylet's environment, which is ours at add_node time.
        port = free_port()
        os.environ["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(port)
        try:
            node = self.cluster.add_node(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                labels={ROLE_LABEL: "gpu-worker", NODE_LABEL: f"worker-{index}"},
            )
        finally:
            del os.environ["RAY_SERVE_WORKER_PROXY_HTTP_PORT"]
        self.worker_ports[node.node_id] = port
        self.workers[node.node_id] = node
        return node.node_id

    def remove_worker(self, node_id: str) -> None:
        self.cluster.remove_node(self.workers.pop(node_id), allow_graceful=False)
        self.worker_ports.pop(node_id, None)

    def shutdown(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self.cluster.shutdown()


# Ray's defaults declare a node dead after 5 missed health checks 3 s apart (plus a 10 s timeout), and
# calls in flight to actors there wait for that verdict. These settings (documented Ray system config)
# bring detection to about 3 s; `--ray-default-health-checks` measures with Ray's own defaults.
FAST_FAILURE_DETECTION = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


def start_cluster(
    workers: int = 3,
    gpus_per_worker: int = 2,
    worker_cpus: float = 4,
    head_cpus: float = 2,
    fast_failure_detection: bool = True,
) -> LocalCluster:
    """Head (no GPUs: specialists cannot land there) + `workers` GPU nodes; connects this process to it."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    head_port = free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": head_cpus,
            "num_gpus": 0,
            "labels": {ROLE_LABEL: "head", NODE_LABEL: "head"},
            "include_dashboard": False,
            "_system_config": FAST_FAILURE_DETECTION if fast_failure_detection else {},
        },
    )
    local = LocalCluster(cluster, head_port)
    for i in range(workers):
        local.add_worker(i, gpus_per_worker, worker_cpus)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    serve.start(proxy_location="EveryNode", http_options={"host": "127.0.0.1", "port": head_port})
    return local


def cluster_args(zoo: Path, autoscaled: str | None = "medical", max_replicas: int = 3, ha: bool = False) -> dict:
    """configs/zoo.yaml's graph on `zoo`: one logical GPU per specialist replica, light CPU shares.

    The `autoscaled` specialist scales between 1 and `max_replicas` with short delays so a bench or a
    test can watch it act; every specialist keeps at most one replica per node (max_replicas_per_node).
    With `ha`, every specialist keeps at least two replicas, so losing one node leaves each one served.
    """
    low = 2 if ha else 1
    args = yaml.safe_load((REPO / "configs" / "zoo.yaml").read_text())["applications"][0]["args"]
    # The text graph only: the vision specialist would take GPUs this placement drill counts on (docs/vision.md).
    args["specialists"] = [s for s in args["specialists"] if "image" not in s.get("modalities", ["text"])]
    for spec in args["specialists"]:
        spec["model"] = spec["model"].replace(".zoo", str(zoo))
        spec["adapters"] = {k: v.replace(".zoo", str(zoo)) for k, v in spec.get("adapters", {}).items()}
        spec["deployment"].update(num_cpus=0.05, num_gpus=1, max_replicas_per_node=1, num_replicas=low)
        if spec["name"] == autoscaled:
            spec["deployment"].pop("num_replicas")
            spec["deployment"].update(
                max_ongoing_requests=4,
                autoscaling={
                    "min_replicas": low,
                    "max_replicas": max_replicas,
                    "target_ongoing_requests": 1,
                    "upscale_delay_s": 1,
                    "downscale_delay_s": 4,
                    "look_back_period_s": 4,
                    "metrics_interval_s": 1,
                },
            )
    args["merger"]["model"] = str(zoo / "t5")
    args["merger"]["deployment"]["num_cpus"] = 0.05
    # Two ingress replicas on different nodes: losing one node must not take the HTTP entry point with it.
    args["server"]["deployment"].update(num_cpus=0.05, num_replicas=2, max_replicas_per_node=1)
    return copy.deepcopy(args)


def deploy(args: dict, name: str = "consilium") -> None:
    from ray import serve

    from deployments.app import build_graph
    from deployments.config import parse_graph_config

    serve.run(build_graph(parse_graph_config(args)), name=name, route_prefix="/")


def placement(app: str = "consilium") -> list[dict[str, Any]]:
    """One row per live replica of `app`: deployment, node (label), node id, GPU ids the raylet granted it.

    Read from the GCS actor table (the raylet's resource_mapping is the GPU assignment itself), so it
    needs no dashboard and no cooperation from the replica.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    labels = {n["NodeID"]: n.get("Labels") or {} for n in ray.nodes() if n["Alive"]}
    accessor = state._connect_and_get_accessor()
    rows = []
    for raw in accessor.get_actor_table(None, "ALIVE"):
        a = gcs_pb2.ActorTableData.FromString(raw)
        prefix, _, rest = a.class_name.partition(":")
        app_name, _, deployment = rest.partition(":")
        if prefix != "ServeReplica" or app_name != app:
            continue
        node_id = a.address.node_id.hex()
        gpus = sorted(int(i.index) for m in a.resource_mapping if m.name == "GPU" for i in m.resource_ids)
        rows.append(
            {
                "deployment": deployment,
                "replica": a.name.rsplit("#", 1)[-1],
                "node": labels.get(node_id, {}).get(NODE_LABEL, node_id[:8]),
                "gpus": gpus,
                "node_id": node_id,
                "pid": a.pid,
            }
        )
    return sorted(rows, key=lambda r: (r["deployment"], r["node"]))


def proxies() -> dict[str, int]:
    """Node id -> pid of the Serve proxy actor on that node."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    out = {}
    for raw in state._connect_and_get_accessor().get_actor_table(None, "ALIVE"):
        a = gcs_pb2.ActorTableData.FromString(raw)
        if a.class_name == "ProxyActor":
            out[a.address.node_id.hex()] = a.pid
    return out


def replica_counts(app: str = "consilium", state: str = "RUNNING") -> dict[str, int]:
    """Deployment -> replicas in `state` (RUNNING, STARTING, ...), from the Serve controller."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {}
    return {name: d.replica_states.get(state, 0) for name, d in status.deployments.items()}


def app_healthy(app: str = "consilium") -> bool:
    from ray import serve

    status = serve.status().applications.get(app)
    return (
        status is not None
        and status.status == "RUNNING"
        and all(d.status == "HEALTHY" for d in status.deployments.values())
    )


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.5) -> float | None:
    """Seconds until predicate() held, or None after timeout_s."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if predicate():
            return time.perf_counter() - t0
        time.sleep(interval_s)
    return None


def listening_pid(port: int) -> int | None:
    """The pid that listens on 127.0.0.1:port (our own processes, so no privileges needed)."""
    import psutil

    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port:
            return c.pid
    return None


def check_proxies(local: LocalCluster, timeout_s: float = 60) -> list[dict[str, Any]]:
    """Each node's proxy: its port, that the process listening there is that node's ProxyActor, a chat answer."""
    import httpx
    import ray

    pids: dict[str, int] = {}

    def all_up() -> bool:  # proxies start lazily on worker nodes
        pids.update(proxies())
        return all(n in pids for n in local.ports)

    wait_for(all_up, timeout_s)
    labels = {n["NodeID"]: (n.get("Labels") or {}).get(NODE_LABEL) for n in ray.nodes()}
    rows = []
    for node_id, port in local.ports.items():
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda url=url: _get_ok(f"{url}/-/healthz"), timeout_s)
        r = httpx.post(f"{url}/v1/chat/completions", json=body(MEDICAL, "auto"), timeout=60)
        rows.append(
            {
                "node": labels.get(node_id, node_id[:8]),
                "port": port,
                "proxy_pid": pids.get(node_id),
                "listener_pid": listening_pid(port),
                "status": r.status_code,
                "used": ",".join(r.json().get("routing", {}).get("used", [])) if r.status_code == 200 else "",
            }
        )
    return rows


def _get_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


MEDICAL = "What are the early symptoms of hypertension?"
CODE = "How do I reverse a linked list in Rust?"
TWO = "Write a Python script that parses patient records and flags patients with diabetes."
RETRY_STATUS = {408, 429, 500, 502, 503, 504}  # what the openai client retries, plus a refused connection


def body(prompt: str, model: str = "auto", max_tokens: int = 16) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}


@dataclass
class Outcome:
    start: float
    end: float
    status: str  # ok | degraded | lost
    attempts: int
    error: str = ""


class Load:
    """Closed-loop clients that spread requests over every live proxy and retry like the openai client.

    A request is retried (another proxy, backoff) on a refused connection, 408/429/5xx, until its
    deadline; a 200 whose routing lists failed specialists counts as degraded; no 200 by the deadline
    is lost. Nothing waits forever: every attempt has a timeout and every request a deadline.
    """

    def __init__(self, ports: Callable[[], list[int]], prompts: list[str], deadline_s: float = 90.0) -> None:
        self.ports, self.prompts, self.deadline_s = ports, prompts, deadline_s
        self.outcomes: list[Outcome] = []
        self.concurrency = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._tasks: dict[int, Any] = {}
        self._next = 0

    def set(self, concurrency: int, prompts: list[str] | None = None) -> None:
        """Run `concurrency` clients; clients above it finish their request and stop."""
        if prompts is not None:
            self.prompts = prompts
        self.concurrency = concurrency
        self._tasks = {i: t for i, t in self._tasks.items() if not t.done()}
        for i in range(concurrency):
            if i not in self._tasks:
                self._tasks[i] = asyncio.run_coroutine_threadsafe(self._client(i), self._loop)

    def stop(self) -> None:
        self.concurrency = 0
        for t in self._tasks.values():
            t.result(timeout=self.deadline_s + 30)
        self._tasks = {}
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _client(self, index: int) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=30) as client:
            i = index
            while index < self.concurrency:
                i += 1
                self.outcomes.append(await self._one(client, self.prompts[i % len(self.prompts)]))

    async def _one(self, client: Any, prompt: str) -> Outcome:
        import httpx

        t0 = time.perf_counter()
        attempts, error, backoff = 0, "", 0.25
        while time.perf_counter() - t0 < self.deadline_s:
            ports = self.ports()
            self._next += 1
            port = ports[self._next % len(ports)]
            attempts += 1
            try:
                left = self.deadline_s - (time.perf_counter() - t0)
                r = await client.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", json=body(prompt), timeout=max(min(30.0, left), 1.0)
                )
                if r.status_code == 200:
                    failed = r.json()["routing"]["failed"]
                    status = "degraded" if failed else "ok"
                    return Outcome(t0, time.perf_counter(), status, attempts, ",".join(failed))
                error = f"{r.status_code}: {r.text[:120]}"
                if r.status_code not in RETRY_STATUS:
                    break
            except httpx.HTTPError as err:
                error = f"{type(err).__name__}: {err}"[:160]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
        return Outcome(t0, time.perf_counter(), "lost", attempts, error)


class Timeline:
    """Prints a row every `every_s` seconds: phase, offered load, replicas per deployment, p50, errors."""

    def __init__(self, load: Load, every_s: float = 3.0) -> None:
        self.load, self.every_s = load, every_s
        self.rows: list[dict[str, Any]] = []
        self.phase = "start"
        self.t0 = time.perf_counter()
        self._seen = 0
        self._last = self.t0
        self.header = False

    def tick(self) -> dict[str, Any]:
        from bench.common import percentile

        now = time.perf_counter()
        done = self.load.outcomes[self._seen :]
        self._seen += len(done)
        counts = replica_counts()
        starting = replica_counts(state="STARTING")
        row = {
            "t_s": round(now - self.t0, 1),
            "phase": self.phase,
            "clients": self.load.concurrency,
            "done": len(done),
            "req_s": round(len(done) / max(now - self._last, 1e-9), 2),
            "p50_ms": round(percentile([(o.end - o.start) * 1000 for o in done], 50), 1) if done else None,
            "retried": sum(o.attempts > 1 for o in done),
            "degraded": sum(o.status == "degraded" for o in done),
            "lost": sum(o.status == "lost" for o in done),
            # running replicas, "+n" while n more are starting
            **{
                d.removeprefix("specialist-"): f"{counts.get(d, 0)}" + (f"+{starting[d]}" if starting.get(d) else "")
                for d in (*SPECIALIST_DEPLOYMENTS, "merger", "router")
            },
        }
        self._last = now
        self.rows.append(row)
        if not self.header:
            print("  ".join(f"{k:>9}" for k in row), flush=True)
            self.header = True
        print("  ".join(f"{v!s:>9}" for v in row.values()), flush=True)
        return row

    def run_until(self, predicate: Callable[[], bool], timeout_s: float) -> float | None:
        """Tick until predicate() holds (checked every 0.5 s); seconds it took, or None on timeout."""
        t0 = time.perf_counter()
        next_tick = t0
        while time.perf_counter() - t0 < timeout_s:
            if time.perf_counter() >= next_tick:
                self.tick()
                next_tick += self.every_s
            if predicate():
                return time.perf_counter() - t0
            time.sleep(0.5)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zoo", default=".zoo")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--step-clients", type=int, default=8, help="closed-loop clients during the load step")
    ap.add_argument("--loss-clients", type=int, default=4, help="clients while a node is removed")
    ap.add_argument("--ha", action="store_true", help="two replicas of every specialist (3 GPUs per worker)")
    ap.add_argument(
        "--ray-default-health-checks", action="store_true", help="keep Ray's node failure detection (about 15-30 s)"
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench.common import print_table, save

    t0 = time.perf_counter()
    local = start_cluster(
        workers=args.workers,
        gpus_per_worker=3 if args.ha else 2,
        fast_failure_detection=not args.ray_default_health_checks,
    )
    zoo = Path(args.zoo).resolve()
    if not (zoo / "zoo.json").exists():
        raise SystemExit(f"no zoo at {zoo}: run `python -m deployments.cli zoo build {args.zoo}` first")
    try:
        deploy(cluster_args(zoo, ha=args.ha))
        startup_s = time.perf_counter() - t0
        place = placement()
        print_table("replica placement after deploy", [{k: v for k, v in r.items() if k != "node_id"} for r in place])
        proxy_rows = check_proxies(local)
        print_table("every node's proxy answers (proxy_pid from the GCS, listener_pid from the socket)", proxy_rows)

        load = Load(lambda: list(local.ports.values()), [MEDICAL])
        tl = Timeline(load)
        tl.phase = "idle"
        tl.tick()
        med = "specialist-medical"
        tl.phase = "step"
        load.set(args.step_clients, [MEDICAL])
        up_s = tl.run_until(lambda: replica_counts().get(med, 0) >= 3, 180)
        # Hold the step; CPU each replica burns from now on is serving, not start-up (imports, loading).
        before = {r["pid"]: _cpu(r["pid"]) for r in placement() if r["deployment"] == med}
        tl.run_until(lambda: False, 10)
        served = [
            {
                "replica": r["replica"],
                "node": r["node"],
                "gpus": r["gpus"],
                "cpu_s_while_held": round(_cpu(r["pid"]) - before.get(r["pid"], 0.0), 2),
            }
            for r in placement()
            if r["deployment"] == med
        ]
        tl.phase = "stop"
        load.set(0)
        low = 2 if args.ha else 1
        down_s = tl.run_until(lambda: replica_counts().get(med, 0) <= low, 120)
        print_table("medical replicas while the step was held for 10 s (CPU seconds each spent serving)", served)

        # Node loss: the worker with the most replicas of our app goes away under load.
        tl.phase = "loss"
        load.set(args.loss_clients, [MEDICAL, CODE, TWO, "hello, how are you today?"])
        tl.run_until(lambda: False, 6)
        per_node: dict[str, int] = {}
        for r in placement():
            if r["node_id"] != local.head_id:
                per_node[r["node_id"]] = per_node.get(r["node_id"], 0) + 1
        victim = max(per_node, key=per_node.get)
        lost_replicas = [r for r in placement() if r["node_id"] == victim]
        wanted = replica_counts()
        print(f"removing {lost_replicas[0]['node']} with {[r['deployment'] for r in lost_replicas]}", flush=True)
        t_remove = time.perf_counter()
        n_before = len(load.outcomes)
        local.remove_worker(victim)
        tl.phase = "recover"
        detect_s = tl.run_until(lambda: victim not in _alive_nodes(), 120)
        whole_s = tl.run_until(lambda: _whole(wanted, victim), 180)
        whole_s = None if whole_s is None or detect_s is None else whole_s + detect_s
        tl.phase = "after"
        tl.run_until(lambda: False, 6)
        load.stop()
        tl.tick()
        after_place = placement()
        print_table(
            "replica placement after the node loss",
            [{k: v for k, v in r.items() if k != "node_id"} for r in after_place],
        )

        outcomes = load.outcomes
        during = outcomes[n_before:]
        summary = [
            {"measure": "startup: cluster + deploy, s", "value": round(startup_s, 1)},
            {"measure": f"scale up {low} -> 3 replicas under the step, s", "value": _r(up_s)},
            {"measure": f"scale down 3 -> {low} after the step, s", "value": _r(down_s)},
            {"measure": "node loss -> Ray declares the node dead, s", "value": _r(detect_s)},
            {"measure": "node loss -> every lost replica running elsewhere, s", "value": _r(whole_s)},
            {"measure": "requests sent", "value": len(outcomes)},
            {"measure": "requests ok", "value": sum(o.status == "ok" for o in outcomes)},
            {
                "measure": "requests degraded (200, a specialist listed failed)",
                "value": sum(o.status == "degraded" for o in outcomes),
            },
            {"measure": "requests that needed a retry", "value": sum(o.attempts > 1 for o in outcomes)},
            {"measure": "requests lost", "value": sum(o.status == "lost" for o in outcomes)},
            {
                "measure": "requests from node loss on: sent / retried / degraded / lost",
                "value": " / ".join(
                    str(n)
                    for n in (
                        len(during),
                        sum(o.attempts > 1 for o in during),
                        sum(o.status == "degraded" for o in during),
                        sum(o.status == "lost" for o in during),
                    )
                ),
            },
            {
                "measure": "longest request from node loss on, s",
                "value": round(max((o.end - o.start for o in during), default=0), 2),
            },
        ]
        print_table("summary", summary)
        errors = sorted({o.error for o in outcomes if o.error})[:10]
        if errors:
            print("failures seen (degraded: the specialists that failed; lost: the last error):", *errors, sep="\n  ")
        path = save(
            "cluster_ha" if args.ha else "cluster",
            summary,
            placement=[{k: v for k, v in r.items() if k != "node_id"} for r in place],
            proxies=proxy_rows,
            step_replicas=served,
            removed_node=lost_replicas[0]["node"] if lost_replicas else None,
            removed_replicas=[r["deployment"] for r in lost_replicas],
            placement_after_loss=[{k: v for k, v in r.items() if k != "node_id"} for r in after_place],
            timeline=tl.rows,
            errors=errors,
            t_remove_s=round(t_remove - tl.t0, 1),
        )
        print("saved", path)
    finally:
        local.shutdown()


def _alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _whole(wanted: dict[str, int], dead: str) -> bool:
    """Ray has declared the node dead and every deployment runs at least its pre-loss replica count elsewhere."""
    if dead in _alive_nodes():
        return False
    have: dict[str, int] = {}
    for r in placement():
        if r["node_id"] != dead:
            have[r["deployment"]] = have.get(r["deployment"], 0) + 1
    running = replica_counts()
    return all(min(have.get(d, 0), running.get(d, 0)) >= n for d, n in wanted.items())


def _cpu(pid: int) -> float:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return round(t.user + t.system, 2)
    except psutil.Error:
        return 0.0


def _r(x: float | None) -> float | str:
    return round(x, 1) if x is not None else "timeout"


if __name__ == "__main__":
    main()
