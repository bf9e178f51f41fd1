"""cluster.yaml passes Ray's own autoscaler config validation (the schema `ray up` applies)."""
import copy
import os

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import fillout_defaults, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cluster():
    with open(os.path.join(REPO, "cluster.yaml")) as fh:
        return yaml.safe_load(fh)


def test_cluster_yaml_is_valid(cluster):
    validate_config(fillout_defaults(copy.deepcopy(cluster)))


def test_head_runs_no_tasks_and_gpu_workers_scale_from_zero(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert any("--num-cpus=0" in c for c in cluster["head_start_ray_commands"])
    workers = [v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]]
    assert workers and all(w["min_workers"] == 0 and w["max_workers"] >= 1 for w in workers)
    assert any(w["node_config"]["InstanceType"].startswith(("g5", "p4d")) for w in workers)
    assert any("pip install -e ." in c for c in cluster["setup_commands"])


def test_validation_catches_a_typo(cluster):
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["head"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(fillout_defaults(bad))
