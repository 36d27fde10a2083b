"""cluster.yaml: valid for Ray's cluster launcher, and shaped the way README "Scaling out" says."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import REPO

SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_matches_rays_schema(cluster):
    jsonschema.validate(cluster, SCHEMA)  # as written
    # as `ray up` sees it: merged with the provider's defaults, then validated
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_schema_rejects_a_misspelled_key(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["ray.worker.gpu"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_head_and_an_autoscaling_gpu_worker_group(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert len(workers) == 1
    gpu = workers[0]
    assert gpu["min_workers"] < gpu["max_workers"] <= cluster["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # AWS GPU families
    assert "gpu" in cluster["docker"]["image"]


def test_nodes_install_the_project_and_share_storage_and_mlflow(cluster):
    assert "." in cluster["file_mounts"].values()
    mount = next(k for k, v in cluster["file_mounts"].items() if v == ".")
    assert any("pip install" in c and mount in c for c in cluster["setup_commands"])
    env = " ".join(cluster["docker"]["run_options"])
    for var in ("REID_PLATFORM_HOME=/mnt/shared/", "MLFLOW_TRACKING_URI=http"):
        assert f"--env {var}" in env
    assert any("mount" in c and "/mnt/shared" in c for c in cluster["initialization_commands"])
