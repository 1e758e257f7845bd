"""The container and Kubernetes files (deploy/docker, deploy/kuberay), checked as far as a machine with
no Docker daemon and no Kubernetes can: they parse, the RayService's Serve config passes Serve's own
schema and runs exactly deploy/serve.yaml's applications, its network.yaml passes NetworkConfig with the
state folder on the persistent volume, and every file names one install path."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).parents[2] / "deploy"
INSTALL = "/home/ray/meritnet"
STATE = "/home/ray/state"


def rayservice_docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text())}


def test_the_rayservice_runs_serve_yamls_applications_under_serves_schema():
    from ray.serve.schema import ServeDeploySchema

    service = rayservice_docs()["RayService"]
    inner = yaml.safe_load(service["spec"]["serveConfigV2"])
    ours = ServeDeploySchema.model_validate(inner)
    theirs = ServeDeploySchema.model_validate(yaml.safe_load((DEPLOY / "serve.yaml").read_text()))
    assert [a.model_dump() for a in ours.applications] == [a.model_dump() for a in theirs.applications]
    assert ours.http_options.host == "0.0.0.0"  # a pod is reached from outside it; api_keys below
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == __import__("ray").__version__


def test_the_rayservice_network_keeps_its_state_on_the_persistent_volume():
    from deploy.config import NetworkConfig

    docs = rayservice_docs()
    network = yaml.safe_load(docs["ConfigMap"]["data"]["network.yaml"])
    cfg = NetworkConfig(**network)
    assert Path(cfg.state_dir).is_absolute() and str(cfg.state_dir).startswith(STATE + "/")
    assert cfg.api_keys and cfg.engine.use_gpu
    served = yaml.safe_load(docs["RayService"]["spec"]["serveConfigV2"])["applications"]
    assert {a["args"]["node_id"] for a in served if "node_id" in a["args"]} == {n.node_id for n in cfg.nodes}
    head = docs["RayService"]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    assert (
        volumes[mounts[STATE]]["persistentVolumeClaim"]["claimName"]
        == docs["PersistentVolumeClaim"]["metadata"]["name"]
    )
    assert mounts[f"{INSTALL}/network.yaml"] == "network"  # where serveConfigV2's args.config points
    env = {e["name"]: e["value"] for e in head["containers"][0]["env"]}
    assert env["MERITNET_SETTLER_KEY_FILE"].startswith(STATE + "/")  # copied there mode 600 at start


def test_each_gpu_worker_group_advertises_its_accelerator_per_gpu():
    from deploy.config import NetworkConfig

    docs = rayservice_docs()
    cfg = NetworkConfig(**yaml.safe_load(docs["ConfigMap"]["data"]["network.yaml"]))
    groups = docs["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    offered = {}
    for g in groups:
        resources = yaml.safe_load(yaml.safe_load(g["rayStartParams"]["resources"]))  # KubeRay's quoting
        gpus = g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        for name, count in resources.items():
            assert count == gpus, g["groupName"]
            offered[name] = count
    assert {f"accel_{n.accelerator_type}" for n in cfg.nodes} <= set(offered)


def test_one_install_path_in_serve_yaml_cluster_yaml_dockerfile_and_rayservice():
    serve = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    assert {Path(a["args"]["config"]).parent.as_posix() for a in serve["applications"]} == {INSTALL}
    cluster = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    assert any(INSTALL in c and "ln -s" in c for c in cluster["setup_commands"])
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert f"WORKDIR {INSTALL}\n" in dockerfile and f"WORKDIR {STATE}\n" in dockerfile
    assert f'VOLUME ["{STATE}"]' in dockerfile


def test_the_dockerfile_builds_cpu_and_gpu_from_one_argument_and_runs_meritnet():
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", dockerfile, flags=re.M)
    assert {"base-cpu", "base-gpu"} <= set(re.findall(r" AS (base-\w+)", dockerfile))
    assert "FROM base-${VARIANT}" in dockerfile and 'ENTRYPOINT ["meritnet"]' in dockerfile
    for extra in ("cpu", "gpu"):
        assert f"MERITNET_EXTRA={extra}" in dockerfile
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text()
    assert "**/*.key" in ignore and "**/.meritnet*" in ignore


def test_compose_mounts_the_repositorys_prometheus_and_grafana_files():
    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"prometheus", "grafana"}
    for service in services.values():
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith(".."):  # relative to deploy/docker/: files of this repository
                assert (DEPLOY / "docker" / source).resolve().exists(), source
    grafana_dirs = {v.split(":")[1] for v in services["grafana"]["volumes"]}
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/meritnet.yml").read_text())
    assert provider["providers"][0]["options"]["path"] in grafana_dirs
