"""deploy/kuberay/: the manifests validate strictly against the KubeRay v1.7 CRD schemas (as
`kubectl apply --validate=strict` has the API server do), broken copies fail with the path of
what is wrong, the RayService's Serve config is what `serve build` writes, and the manifests
agree with the configs and the app they run."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

sys.path.insert(0, str(REPO / "deploy" / "kuberay"))
import render  # noqa: E402
import validate  # noqa: E402

from reid_platform.config import load_config  # noqa: E402

KUBERAY = REPO / "deploy" / "kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
SERVICE = KUBERAY / "rayservice-retrieval.yaml"
TRAIN = KUBERAY / "rayjob-train.yaml"
SWEEP = KUBERAY / "rayjob-sweep.yaml"


def doc(path: Path) -> dict:
    (only,) = validate.load_documents(path)
    return only


def test_the_crds_are_the_kuberay_v1_7_ones():
    schemas = validate.load_crds(str(validate.DEFAULT_CRDS))
    assert {("ray.io/v1", "RayJob"), ("ray.io/v1", "RayService")} <= set(schemas)
    spec = schemas[("ray.io/v1", "RayService")]["properties"]["spec"]["properties"]
    assert spec["serveConfigV2"] == {"type": "string"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_strictly(path):
    assert validate.validate_file(path) == []


def _set(path: str, value):
    """A mutation setting a dotted path (list indexes as numbers) in a manifest."""
    def apply(manifest: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = manifest
        for part in parents:
            node = node[part]
        node[last] = value
    return apply


def _drop(path: str):
    def apply(manifest: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = manifest
        for part in parents:
            node = node[part]
        del node[last]
    return apply


HEAD = "spec.rayClusterConfig.headGroupSpec"
WORKER = "spec.rayClusterConfig.workerGroupSpecs.0"
CONTAINER = f"{HEAD}.template.spec.containers.0"


@pytest.mark.parametrize(("path", "mutate", "message"), [
    (SERVICE, _set(f"{WORKER}.replicas", "one"),
     "spec.rayClusterConfig.workerGroupSpecs[0].replicas: 'one' is not of type 'integer'"),
    (SERVICE, _set(f"{CONTAINER}.imagePullPolicyy", "Always"),
     "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0]: unknown field "
     "'imagePullPolicyy'"),
    (SERVICE, _set("spec.serveConfigV3", "x"), "spec: unknown field 'serveConfigV3'"),
    (SERVICE, _set("metadata.lables", {"a": "b"}), "metadata: unknown field 'lables'"),
    (SERVICE, _set("spec.serveConfigV2", {"applications": []}),
     "spec.serveConfigV2: {'applications': []} is not of type 'string'"),
    (SERVICE, _drop(f"{HEAD}.template"),
     "spec.rayClusterConfig.headGroupSpec: 'template' is a required property"),
    (SERVICE, _set(f"{CONTAINER}.resources.limits.cpu", "four"),
     "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].resources.limits.cpu: "
     "'four' does not match"),
    (SERVICE, _set(f"{CONTAINER}.ports.0.containerPort", 2**31),
     "containers[0].ports[0].containerPort: 2147483648 is not a 'int32'"),
    (SERVICE, _set("apiVersion", "ray.io/v2"), "no served CRD for apiVersion 'ray.io/v2'"),
    (SERVICE, _drop("metadata.name"), "metadata.name: Required value"),
    (TRAIN, _set("spec.shutdownAfterJobFinishes", "yes please"),
     "spec.shutdownAfterJobFinishes: 'yes please' is not of type 'boolean'"),
    (TRAIN, _set("spec.rayClusterSpec.workerGroupSpecs", {"groupName": "gpu"}),
     "spec.rayClusterSpec.workerGroupSpecs: {'groupName': 'gpu'} is not of type 'array'"),
    (TRAIN, _set("spec.deletionStrategy", {"onSuccess": {"policy": "DeleteCluster"}}),
     "spec.deletionStrategy: Invalid value: deletionStrategy requires either BOTH onSuccess and "
     "onFailure"),
    (SWEEP, _set("spec.rayClusterSpec.autoscalerOptions.idleTimeoutSecond", 60),
     "spec.rayClusterSpec.autoscalerOptions: unknown field 'idleTimeoutSecond'"),
])
def test_broken_copies_fail_naming_the_field(path, mutate, message):
    broken = copy.deepcopy(doc(path))
    mutate(broken)
    errors = validate.validate_document(broken)
    assert any(message in e for e in errors), errors


def test_duplicate_keys_and_the_cli(tmp_path, capsys):
    text = TRAIN.read_text()
    duplicated = tmp_path / "dup.yaml"
    twice = "  backoffLimit: 0\n  backoffLimit: 1\n"
    duplicated.write_text(text.replace("  backoffLimit: 0\n", twice))
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text(text.replace("ttlSecondsAfterFinished", "ttlSecondsAfterFinish"))
    assert validate.main([str(TRAIN)]) == 0
    assert validate.main([str(duplicated)]) == 1
    assert "duplicate field 'backoffLimit'" in capsys.readouterr().err
    assert validate.main([str(misspelt), str(TRAIN)]) == 1
    err = capsys.readouterr().err
    assert "RayJob/reid-train: spec: unknown field 'ttlSecondsAfterFinish'" in err


def test_render_replaces_only_the_serve_config():
    text = SERVICE.read_text()
    embedded = render.embedded_config(text)
    assert render.replace_block(text, embedded) == text
    changed = render.replace_block(text, embedded.replace("max_k: 100", "max_k: 50"))
    assert render.embedded_config(changed) == embedded.replace("max_k: 100", "max_k: 50")
    before, after = text.splitlines(), changed.splitlines()
    assert len(before) == len(after)
    assert [i for i, (a, b) in enumerate(zip(before, after)) if a != b] == [
        i for i, line in enumerate(before) if "max_k: 100" in line
    ]


def test_serve_config_is_a_valid_deploy_config_of_the_app():
    from ray.serve.schema import ServeDeploySchema

    from serve_apps.retrieval import RetrievalArgs

    service = doc(SERVICE)
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "serve_apps.retrieval:build_app"
    RetrievalArgs.model_validate(app["args"])
    shards = int(service["metadata"]["annotations"][render.SHARDS_ANNOTATION])
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"Embedder", "RetrievalIngress",
                                *(f"shard_{i}" for i in range(shards))}
    assert deployments["Embedder"]["ray_actor_options"]["num_gpus"] == 1.0
    assert config["http_options"]["port"] == 8000  # the port KubeRay's serve Service targets
    assert service["spec"]["serveConfigV2"].splitlines()[2].startswith(
        "# This file was generated using the `serve build` command on Ray v2.60")


@pytest.mark.slow
def test_serve_config_is_what_serve_build_writes(ray_session):
    """Build the app with the manifest's args and run Ray Serve's `serve build` on it: the
    embedded config must be exactly its output (else: python deploy/kuberay/render.py)."""
    text = SERVICE.read_text()
    args, shards = render.manifest_app(text)
    nodes = render.cluster_nodes(text)  # the head (0 CPUs) and the GPU node (8 CPUs, 1 GPU)
    assert nodes == [{"CPU": 0.0, "GPU": 0.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert render.serve_build(args, shards, nodes) == render.embedded_config(text), (
        "deploy/kuberay/rayservice-retrieval.yaml is stale: run python deploy/kuberay/render.py"
    )


@pytest.mark.slow
def test_render_sizes_the_app_to_the_manifests_cluster(ray_session):
    """The app is checked against the RayService's nodes, not the machine rendering it: more
    Embedder CPUs than the GPU node has is refused naming both."""
    from serve_apps.retrieval import ResourceFitError

    text = SERVICE.read_text()
    args, shards = render.manifest_app(text)
    with pytest.raises(ResourceFitError, match="its largest node has 8"):
        render.serve_build({**args, "embedder_num_cpus": 12}, shards, render.cluster_nodes(text))


def _container(pod_spec: dict) -> dict:
    (container,) = pod_spec["containers"]
    return container


def test_manifests_agree_with_the_configs_and_the_app():
    service = doc(SERVICE)
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    # the index is on the serving node's hostPath volume, mounted where the app looks for it
    mounts = {m["mountPath"]: m["name"] for m in _container(worker)["volumeMounts"]}
    volumes = {v["name"]: v for v in worker["volumes"]}
    assert "hostPath" in volumes[mounts[app["args"]["index_dir"]]]
    gpus = int(_container(worker)["resources"]["limits"]["nvidia.com/gpu"])
    assert app["args"]["num_gpus"] <= gpus
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replica away from the index

    for path, config_file in ((TRAIN, "configs/market1501_bot.yaml"),
                              (SWEEP, "configs/sweep.yaml")):
        job = doc(path)
        assert f"--config {config_file}" in job["spec"]["entrypoint"]
        config = load_config(REPO / config_file)
        group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        limits = _container(group["template"]["spec"])["resources"]["limits"]
        node_gpus, node_cpus = int(limits["nvidia.com/gpu"]), int(limits["cpu"])
        trial_gpus = config.train.num_workers
        concurrent = config.tune.max_concurrent if path == SWEEP else 1
        assert trial_gpus * concurrent <= node_gpus * group["maxReplicas"]
        workers_per_node = min(node_gpus, trial_gpus * concurrent)  # one GPU per worker
        assert workers_per_node * config.train.cpus_per_worker <= node_cpus
        env = {e["name"]: e.get("value") for e in _container(
            job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"])["env"]}
        assert env["REID_PLATFORM_HOME"].startswith("/mnt/shared/")
        assert env["MLFLOW_TRACKING_URI"].startswith("http://")
