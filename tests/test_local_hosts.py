"""The namespaced multi-host cluster (cluster/local_hosts.py): hosts are separate (own /tmp, own
process table, code read-only), the workers joined the head, the laptop reaches the head's dashboard
and the bucket, and a lost host takes its processes and disk with it while a fresh one joins."""
import json
import os
import shlex
import time

import pytest

from cluster import local_hosts as hosts

pytestmark = pytest.mark.timeout(900)

ALIVE_NODES = ("import json, ray; ray.init(address='auto', logging_level='ERROR'); "
               "print(json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")


def on(name, command):
    """stdout of a command on a host; fails the test on a non-zero exit."""
    done = hosts.run(name, command, env=hosts.s3_env(), check=False, timeout=300)
    assert done.returncode == 0, f"{name}: {command}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def alive_nodes():
    return json.loads(on("head", f"python -c {shlex.quote(ALIVE_NODES)}").strip().splitlines()[-1])


def test_hosts_are_separate(local_hosts):
    on("head", "echo head > /tmp/marker")
    assert on("worker1", "cat /tmp/marker 2>/dev/null || echo none").strip() == "none"
    assert on("head", "ls /tmp/ray/session_latest >/dev/null && cat /tmp/marker").strip() == "head"
    for name in ("head", "worker1", "worker2", "store", "laptop"):
        assert on(name, "cat /proc/1/comm").strip() == "sleep", f"{name} has no PID namespace of its own"
        assert on(name, f"touch {hosts.REPO}/x 2>/dev/null && echo writable || echo read-only").strip() == "read-only"
    assert on("worker1", "pgrep -c gcs_server || true").strip() == "0"  # the head's processes are not in view
    assert on("head", "pgrep -c raylet").strip() == "1"


def test_workers_joined_and_laptop_reaches_head_and_store(local_hosts):
    assert alive_nodes() == sorted(hosts.ip(n) for n in ("head", "worker1", "worker2"))
    on("laptop", f"python -c \"import urllib.request as r; r.urlopen('http://{hosts.ip('head')}:"
                 f"{hosts.DASHBOARD_PORT}/api/version', timeout=5)\"")
    buckets = on("laptop", "python -c \"import boto3; print([b['Name'] for b in "
                           "boto3.client('s3').list_buckets()['Buckets']])\"")
    assert hosts.BUCKET in buckets


def test_lost_host_takes_its_processes_and_disk_and_a_fresh_one_joins(local_hosts):
    on("worker2", "echo w2 > /tmp/marker")
    members = _members(hosts.load_state()["worker2"])
    assert len(members) > 2  # PID 1, the raylet and its helpers
    hosts.lose_host("worker2")
    time.sleep(1)
    assert "worker2" not in hosts.load_state()
    assert not [p for p in members if os.path.exists(f"/proc/{p}")]
    hosts.start_worker("worker2")  # same name, fresh host: empty /tmp
    assert on("worker2", "cat /tmp/marker 2>/dev/null || echo none").strip() == "none"
    deadline = time.time() + 180
    while hosts.ip("worker2") not in alive_nodes() and time.time() < deadline:
        time.sleep(5)
    assert hosts.ip("worker2") in alive_nodes()


def _members(pid1):
    """Pids (seen from here) of every process in the PID namespace whose PID 1 is pid1."""
    namespace = os.readlink(f"/proc/{pid1}/ns/pid")
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") == namespace:
                members.append(int(pid))
        except OSError:
            pass
    return members
