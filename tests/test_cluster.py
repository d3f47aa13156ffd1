"""The council on a multi-node Ray cluster (head + 3 GPU workers on this machine), and the KubeRay manifest.

The cluster tests share one cluster and run in order: placement, every proxy, autoscaling, then a node
loss (destructive, so last). bench/cluster_bench.py measures the same things at length.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bench.cluster_bench import (
    CODE,
    MEDICAL,
    ROLE_LABEL,
    TWO,
    Load,
    LocalCluster,
    check_proxies,
    cluster_args,
    deploy,
    placement,
    replica_counts,
    start_cluster,
    wait_for,
)
from deployments.config import ConfigError, load_graph_config, parse_graph_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local(zoo: Path) -> Iterator[LocalCluster]:
    c = start_cluster(workers=3, gpus_per_worker=2)
    try:
        deploy(cluster_args(zoo))
        yield c
    finally:
        c.shutdown()


def node_labels() -> dict[str, dict[str, str]]:
    import ray

    return {n["NodeID"]: n.get("Labels") or {} for n in ray.nodes() if n["Alive"]}


# ---- placement and proxies ------------------------------------------------------------------------


@pytest.mark.serve
@pytest.mark.cluster
def test_specialists_hold_distinct_gpus_on_gpu_nodes(local: LocalCluster) -> None:
    from ray import serve

    rows = placement()
    labels = node_labels()
    specialists = [r for r in rows if r["deployment"].startswith("specialist-")]
    assert {r["deployment"] for r in specialists} == {"specialist-medical", "specialist-code", "specialist-general"}
    for r in specialists:
        assert len(r["gpus"]) == 1, r
        assert labels[r["node_id"]][ROLE_LABEL] == "gpu-worker", r  # the head has no GPUs
    held = [(r["node_id"], r["gpus"][0]) for r in specialists]
    assert len(set(held)) == len(held), f"two replicas share a GPU: {held}"
    # What the replica itself sees matches what the raylet granted (one replica each so far).
    for r in specialists:
        seen = serve.get_deployment_handle(r["deployment"], app_name="consilium").gpu_ids.remote().result()
        assert seen == [str(r["gpus"][0])]
    # max_replicas_per_node=1: the two ingress replicas sit on two different nodes.
    routers = [r["node_id"] for r in rows if r["deployment"] == "router"]
    assert len(routers) == 2 and len(set(routers)) == 2


@pytest.mark.serve
@pytest.mark.cluster
def test_every_nodes_proxy_answers(local: LocalCluster) -> None:
    rows = check_proxies(local)
    assert len(rows) == 4 and len({r["port"] for r in rows}) == 4
    for r in rows:
        # The process listening on that node's port is that node's Serve proxy actor, and it answered.
        assert r["listener_pid"] == r["proxy_pid"] is not None, r
        assert r["status"] == 200 and r["used"] == "medical", r


# ---- autoscaling ----------------------------------------------------------------------------------


@pytest.mark.serve
@pytest.mark.cluster
def test_autoscaling_scales_up_under_a_step_and_back_down(local: LocalCluster) -> None:
    med = "specialist-medical"
    load = Load(lambda: list(local.ports.values()), [MEDICAL], deadline_s=60)
    try:
        load.set(8)
        assert wait_for(lambda: replica_counts().get(med, 0) >= 3, 150) is not None, replica_counts()
        new = [r for r in placement() if r["deployment"] == med]
        assert len({r["node_id"] for r in new}) == 3  # one per node (max_replicas_per_node=1)
        assert len({(r["node_id"], r["gpus"][0]) for r in new}) == 3
        served_before = len(load.outcomes)
        wait_for(lambda: len(load.outcomes) >= served_before + 20, 30)
    finally:
        load.stop()
    assert wait_for(lambda: replica_counts().get(med, 0) == 1, 90) is not None, replica_counts()
    statuses = [o.status for o in load.outcomes]
    assert statuses and all(s == "ok" for s in statuses), {s: statuses.count(s) for s in set(statuses)}


# ---- node loss (last: it removes a node) -----------------------------------------------------------


@pytest.mark.serve
@pytest.mark.cluster
def test_node_loss_under_load_loses_no_request(local: LocalCluster) -> None:
    rows = placement()
    specialists_on = {r["node_id"] for r in rows if r["deployment"].startswith("specialist-")}
    victim = next(n for n in local.workers if n in specialists_on)
    gone = sorted(r["deployment"] for r in rows if r["node_id"] == victim)
    wanted = replica_counts()
    load = Load(lambda: list(local.ports.values()), [MEDICAL, CODE, TWO, "hello there"], deadline_s=120)
    try:
        load.set(4)
        wait_for(lambda: len(load.outcomes) >= 8, 30)
        local.remove_worker(victim)
        back = wait_for(lambda: _replaced(wanted, victim), 120)
        assert back is not None, f"lost {gone}; replicas now {replica_counts()}"
        after = len(load.outcomes)
        wait_for(lambda: len(load.outcomes) >= after + 8, 30)
    finally:
        load.stop()
    statuses = [o.status for o in load.outcomes]
    assert "lost" not in statuses, [o.error for o in load.outcomes if o.status == "lost"]
    assert max(o.end - o.start for o in load.outcomes) < 125  # bounded: nothing hung
    assert all(r["node_id"] != victim for r in placement())


def _replaced(wanted: dict[str, int], dead: str) -> bool:
    import ray

    if dead in {n["NodeID"] for n in ray.nodes() if n["Alive"]}:
        return False
    have: dict[str, int] = {}
    for r in placement():
        have[r["deployment"]] = have.get(r["deployment"], 0) + 1
    running = replica_counts()
    return all(min(have.get(d, 0), running.get(d, 0)) >= n for d, n in wanted.items())


# ---- artifact paths on every node ------------------------------------------------------------------


@pytest.mark.serve
@pytest.mark.cluster
def test_relative_artifact_path_is_rejected_on_a_multi_node_cluster(local: LocalCluster, zoo: Path) -> None:
    from deployments.app import build_graph

    args = cluster_args(zoo)
    rel = os.path.relpath(zoo / "code")
    args["specialists"][1]["model"] = rel
    with pytest.raises(ConfigError) as err:
        build_graph(parse_graph_config(args))
    msg = str(err.value)
    assert f"specialists.1.model: {rel!r} is a relative path on a" in msg
    assert "runtime_env working_dir" in msg


@pytest.mark.serve
@pytest.mark.cluster
def test_absolute_paths_are_probed_on_every_node(local: LocalCluster, zoo: Path) -> None:
    import ray

    from deployments.paths import missing_per_node

    nodes = [n for n in ray.nodes() if n["Alive"]]
    out = missing_per_node([str(zoo / "t5"), "/nonexistent/consilium/model"], nodes)
    assert set(out) == {n["NodeID"] for n in nodes} and len(out) >= 3
    assert all(missing == ["/nonexistent/consilium/model"] for missing in out.values())


def test_object_store_uris_are_rejected_and_hub_ids_pass() -> None:
    from deployments.paths import check_cluster_paths

    config = load_graph_config(REPO / "serve_config.yaml")
    two_nodes = [{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": True}]
    check_cluster_paths(config, nodes=two_nodes)  # hub ids: every node can load them
    bad = config.model_copy(deep=True)
    bad.merger.model = "s3://bucket/flan-t5"
    with pytest.raises(ConfigError, match=r"merger\.model: 's3://bucket/flan-t5' is an object-store URI"):
        check_cluster_paths(bad, nodes=two_nodes)


def test_one_node_keeps_relative_paths_and_a_missing_merger_weights_dir_is_named(zoo: Path) -> None:
    from deployments.paths import check_cluster_paths

    args = cluster_args(zoo)
    args["specialists"][0]["model"] = os.path.relpath(zoo / "medical")
    config = parse_graph_config(args)
    check_cluster_paths(config, nodes=[{"NodeID": "only", "Alive": True}])  # `serve run` on one machine
    args["merger"]["merger_weights"] = str(zoo / "no-such-merger")
    with pytest.raises(ConfigError, match=r"merger\.merger_weights: '.*no-such-merger' does not exist"):
        check_cluster_paths(parse_graph_config(args), nodes=[{"NodeID": "only", "Alive": True}])


# ---- KubeRay manifest -----------------------------------------------------------------------------


def test_rayservice_carries_serve_config_and_fits_its_pods() -> None:
    manifest = yaml.safe_load((REPO / "deploy" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == serve_config
    cluster_spec = manifest["spec"]["rayClusterConfig"]
    assert cluster_spec["enableInTreeAutoscaling"] is True

    def pod(group: dict) -> tuple[float, float]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        return float(limits["cpu"]), float(limits.get("nvidia.com/gpu", 0))

    groups = cluster_spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups if pod(g)[1] > 0]
    assert gpu_groups, "no GPU worker group"
    config = parse_graph_config(serve_config)
    parts = [s.deployment for s in config.specialists] + [config.merger.deployment, config.server.deployment]
    demand = 0.0
    for opts in parts:
        # Every replica fits in one pod of some group (head has num-cpus 0: it runs no replicas).
        assert any(opts.num_cpus <= pod(g)[0] and opts.num_gpus <= pod(g)[1] for g in groups), opts
        most = opts.autoscaling.max_replicas if opts.autoscaling else (opts.num_replicas or 1)
        demand += most * opts.num_gpus
    gpus_at_max = sum(g["maxReplicas"] * pod(g)[1] for g in gpu_groups)
    assert gpus_at_max >= demand, f"GPU groups reach {gpus_at_max} GPUs; the config can ask for {demand}"
    assert cluster_spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


# ---- placement and autoscaling options reach Serve -------------------------------------------------


def test_placement_and_autoscaling_options_reach_serve() -> None:
    from deployments.config import DeploymentOptions

    opts = DeploymentOptions.model_validate(
        {
            "num_gpus": 1,
            "max_replicas_per_node": 1,
            "graceful_shutdown_timeout_s": 330,
            "autoscaling": {"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 1, "downscale_delay_s": 4},
        }
    ).serve_options()
    assert opts["max_replicas_per_node"] == 1 and opts["graceful_shutdown_timeout_s"] == 330
    # Unset knobs are left out, so Serve keeps its own defaults for them.
    assert opts["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 2.0,
        "upscale_delay_s": 1,
        "downscale_delay_s": 4,
    }
    assert not {"max_replicas_per_node", "graceful_shutdown_timeout_s"} & set(DeploymentOptions().serve_options())


def test_look_back_shorter_than_metrics_interval_is_a_config_error() -> None:
    args = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    args["specialists"][0]["deployment"]["autoscaling"]["look_back_period_s"] = 5
    with pytest.raises(ConfigError, match=r"specialists\.0\.deployment\.autoscaling: .*look_back_period_s=5"):
        parse_graph_config(args)
