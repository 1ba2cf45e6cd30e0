"""cluster.yaml (AWS) and cluster-local.yaml (your own hosts) as Ray's cluster launcher reads them,
and the promises they make: the head hosts the trial processes, nothing but SSH faces the internet,
and the environment the nodes export is the one the study commands read."""
import os
import re

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from nvae_platform.defaults import DATA_ENV, STORAGE_ENV
from nvae_platform.study.runner import TRIAL_DRIVER_RESOURCE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("cluster.yaml", "cluster-local.yaml")


def _load(name):
    with open(os.path.join(REPO, name)) as f:
        return yaml.safe_load(f)


def _commands(config):
    return [c for key in ("setup_commands", "head_setup_commands", "head_start_ray_commands",
                          "worker_start_ray_commands") for c in config.get(key, [])]


@pytest.mark.parametrize("name", CONFIGS)
def test_the_launcher_accepts_the_config(name):
    """What `ray up` does before it contacts a cloud or a host: fill in the provider's defaults, then
    validate against the launcher's JSON schema."""
    prepared = prepare_config(_load(name))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", CONFIGS)
def test_the_head_hosts_the_trial_processes_and_listens_on_loopback_only(name):
    config = _load(name)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    if config["provider"]["type"] == "aws":
        types = config["available_node_types"]
        head = types[config["head_node_type"]]["resources"]
        assert head["CPU"] == 0 and head[TRIAL_DRIVER_RESOURCE] >= 100
        workers = [t for n, t in types.items() if n != config["head_node_type"]]
        assert all(TRIAL_DRIVER_RESOURCE not in t["resources"] and t["min_workers"] == 0 for t in workers)
        assert all("IamInstanceProfile" in t["node_config"] for t in workers)  # they write checkpoints to S3
        assert not config["provider"]["security_group"].get("IpPermissions")  # only Ray's SSH + intra-cluster rules
    else:
        assert f'"{TRIAL_DRIVER_RESOURCE}"' in head_start
    assert "start_tracking_server.sh" in head_start
    with open(os.path.join(REPO, "cluster/start_tracking_server.sh")) as f:
        # loopback unless NVAE_TRACKING_HOST says otherwise (only cluster/local_hosts.py's private bridge does)
        assert '--host "${NVAE_TRACKING_HOST:-127.0.0.1}"' in f.read()
    from nvae_platform.record.tracking_server import build_parser
    assert build_parser().get_default("host") == "127.0.0.1"


@pytest.mark.parametrize("name", CONFIGS)
def test_the_nodes_export_what_the_study_commands_read_and_every_file_named_exists(name):
    config = _load(name)
    assert config["file_mounts"] == {"~/nvae": "."}  # run `ray up` from the repository root
    commands = " ".join(_commands(config))
    for path in re.findall(r"~/nvae/(\S+\.(?:sh|py))", commands):
        assert os.path.exists(os.path.join(REPO, path)), path
    assert f"export {DATA_ENV}=" in commands
    with open(os.path.join(REPO, "cluster/setup_head.sh")) as f:
        head_env = f.read()
    for variable in (STORAGE_ENV, "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert f"export {variable}=" in head_env
    storage = re.search(r"setup_head\.sh (\S+)", commands).group(1)
    assert storage.startswith("s3://") if config["provider"]["type"] == "aws" else storage.startswith("/")
