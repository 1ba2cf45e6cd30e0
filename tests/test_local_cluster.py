"""Separate hosts on one machine, and studies on them as a user at scale runs them
(cluster/local_hosts.py: every host its own network, PID and mount namespace, no writable folder
shared). First the hosts themselves: separate (own /tmp, own process table, code read-only), the
workers joined the head, the laptop reaches the head's dashboard and the bucket, and a lost host
takes its processes and disk with it while a fresh one joins. Then the studies. The head was set up by
cluster/setup_head.sh and cluster/start_tracking_server.sh (PostgreSQL, MLflow with basic auth, its
artifacts proxied to the bucket); storage is s3:// on the store host's S3 server; the study is
submitted from the laptop host with `ray job submit` and no storage or tracking flag: the driver reads
the environment setup_head.sh exported. Each test asserts what MLflow and the bucket hold afterwards."""
import json
import os
import re
import shlex
import time

import pytest

from cluster import local_hosts as hosts
from nvae_platform.train.checkpoints import CHECKPOINT_FILE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def local_hosts():
    """The cluster (store, head with its services, two workers, laptop) up for this module, down
    afterwards; skipped, saying why, where hosts cannot be made (not root, a tool missing)."""
    why = hosts.unavailable()
    if why:
        pytest.skip(why)
    hosts.up(workers=2)
    try:
        yield hosts
    finally:
        hosts.down()


ALIVE_NODES = ("import json, ray; ray.init(address='auto', logging_level='ERROR'); "
               "print(json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")


def on_host(name, command):
    """stdout of a command on a host; fails the test on a non-zero exit."""
    done = hosts.run(name, command, env=hosts.s3_env(), check=False, timeout=300)
    assert done.returncode == 0, f"{name}: {command}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def alive_nodes():
    return json.loads(on_host("head", f"python -c {shlex.quote(ALIVE_NODES)}").strip().splitlines()[-1])


def test_hosts_are_separate(local_hosts):
    on_host("head", "echo head > /tmp/marker")
    assert on_host("worker1", "cat /tmp/marker 2>/dev/null || echo none").strip() == "none"
    assert on_host("head", "ls /tmp/ray/session_latest >/dev/null && cat /tmp/marker").strip() == "head"
    for name in ("head", "worker1", "worker2", "store", "laptop"):
        assert on_host(name, "cat /proc/1/comm").strip() == "sleep", f"{name} has no PID namespace of its own"
        assert on_host(name, f"touch {hosts.REPO}/x 2>/dev/null && echo writable || echo read-only").strip() == "read-only"
    assert on_host("worker1", "pgrep -c gcs_server || true").strip() == "0"  # the head's processes are not in view
    assert on_host("head", "pgrep -c raylet").strip() == "1"


def test_workers_joined_and_laptop_reaches_head_and_store(local_hosts):
    assert alive_nodes() == sorted(hosts.ip(n) for n in ("head", "worker1", "worker2"))
    on_host("laptop", f"python -c \"import urllib.request as r; r.urlopen('http://{hosts.ip('head')}:"
                 f"{hosts.DASHBOARD_PORT}/api/version', timeout=5)\"")
    buckets = on_host("laptop", "python -c \"import boto3; print([b['Name'] for b in "
                           "boto3.client('s3').list_buckets()['Buckets']])\"")
    assert hosts.BUCKET in buckets


def test_lost_host_takes_its_processes_and_disk_and_a_fresh_one_joins(local_hosts):
    on_host("worker2", "echo w2 > /tmp/marker")
    members = _members(hosts.load_state()["worker2"])
    assert len(members) > 2  # PID 1, the raylet and its helpers
    hosts.lose_host("worker2")
    time.sleep(1)
    assert "worker2" not in hosts.load_state()
    assert not [p for p in members if os.path.exists(f"/proc/{p}")]
    hosts.start_worker("worker2")  # same name, fresh host: empty /tmp
    assert on_host("worker2", "cat /tmp/marker 2>/dev/null || echo none").strip() == "none"
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

EPOCHS = 3
# Smoke scale, the digits set. Each test runs its own levels: a study's folder is named by its plan
# (not by its MLflow experiment), so two tests with one plan would share their trials.
STUDY = "studies/ablation_sr.py"
# The outage study's (outage_study). Its record shows the first trial finished some 40 s after it did
# (the tracking server's catch-up after its outage), while the second trial trains: 5 epochs leave
# that trial epochs to go when the first job is stopped, and, in the second job, to lose a host in.
OUTAGE_EPOCHS = 5


def on(hosts, name, command, timeout=900, env=None):
    """stdout of a command on a host with the laptop's environment (the bucket, the tracking server);
    fails the test on a non-zero exit."""
    done = hosts.run(name, command, env={**hosts.s3_env(), **hosts.cluster_env(), **(env or {})}, check=False,
                     timeout=timeout)
    assert done.returncode == 0, f"{name}: {command}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def probe(hosts, *args, timeout=900):
    """tests/cluster_probe.py on the laptop, its JSON answer."""
    return json.loads(on(hosts, "laptop", f"python {hosts.REPO}/tests/cluster_probe.py "
                                          + " ".join(map(shlex.quote, map(str, args))), timeout=timeout))


def dashboard(hosts):
    return f"http://{hosts.ip('head')}:{hosts.DASHBOARD_PORT}"


def submit(hosts, job_id, experiment, *flags, own_folder=True, epochs=EPOCHS):
    """`ray job submit --no-wait` from the laptop: the study, 2 workers per trial (one per worker host).
    own_folder: storage under the head's NVAE_STORAGE_PATH in a prefix named by the experiment, since
    the tests' studies share their study folder (one identity: study, scale, --set and workers), and
    a trial one test ended would not be trained again by the next; else the head's storage as it is."""
    folder = f"--storage-path {hosts.STORAGE}/{experiment} " if own_folder else ""
    command = (f"ray job submit --address {dashboard(hosts)} --submission-id {job_id} --no-wait -- "
               f"python {hosts.REPO}/{STUDY} --workers-per-trial 2 --set epochs={epochs} --experiment {experiment} "
               + folder + " ".join(flags))
    deadline = time.time() + 240  # the head's job agent registers a while after its dashboard answers
    while True:
        done = hosts.run("laptop", command, env={**hosts.s3_env(), **hosts.cluster_env()}, check=False, timeout=300)
        if "No available agent to submit job" not in done.stderr or time.time() > deadline:
            break
        time.sleep(5)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def job_end(hosts, job_id, timeout=900):
    """{status, logs} of the job once it has ended."""
    return probe(hosts, "job", dashboard(hosts), job_id, "--timeout", timeout, timeout=timeout + 120)


def check_complete(runs, trials, epochs=EPOCHS):
    """1 finished parent, `trials` finished children, every per-epoch metric at each epoch once, no
    metric twice at a step. Returns the children."""
    parents = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
    assert len(parents) == 1 and parents[0]["status"] == "FINISHED", [(r["name"], r["status"]) for r in parents]
    assert len(children) == trials, [r["name"] for r in children]
    for run in children:
        assert run["status"] == "FINISHED" and run["tags"]["nvae.status"] == "finished", run["name"]
        for key, steps in run["steps"].items():
            assert len(steps) == len(set(steps)), f"{run['name']}: {key} logged twice at a step: {steps}"
        per_epoch = [key for key in run["steps"] if key.startswith(("train_", "val_"))]
        assert "train_bpd" in per_epoch and "val_bpd" in per_epoch
        for key in per_epoch:
            assert run["steps"][key] == list(range(epochs)), f"{run['name']}: {key} at steps {run['steps'][key]}"
    return children


def bucket_listing(hosts, prefix):
    """Keys under s3://BUCKET/prefix, from the laptop."""
    script = ("import boto3, sys; pages = boto3.client('s3').get_paginator('list_objects_v2')"
              ".paginate(Bucket=sys.argv[1], Prefix=sys.argv[2]); "
              "print('\\n'.join(o['Key'] for p in pages for o in p.get('Contents', [])))")
    return on(hosts, "laptop", f"python -c {shlex.quote(script)} {hosts.BUCKET} {prefix}").split()


@pytest.fixture(scope="module")
def outage_study(local_hosts):
    """One study of two trials (one after the other, 2 workers each, spanning the two worker hosts),
    submitted with no storage or tracking flag, through what a long job meets. Once the first trial
    has an epoch recorded, the tracking server is gone for 30 s, then, once it is back, the store
    refuses every connection for 20 s; once that trial has finished, `ray job stop` (SIGTERM to the
    driver); the same study submitted again trains only the second trial, and once that trial has an
    epoch more recorded, worker2 is lost (every process SIGKILLed, its disk gone) and a fresh host
    joins in its place. What was seen on the way: {finished: the first trial, stopped: that job's end,
    before: the record after it, lost: the second trial as worker2 was lost, end: the second job's end,
    runs: the record after it}."""
    flags = ("--levels", "sr_lambda=0.0,0.01")
    submit(local_hosts, "stopped-1", "stopped", *flags, own_folder=False, epochs=OUTAGE_EPOCHS)
    wait_for_trial(local_hosts, "stopped")
    local_hosts.stop_tracking_server()
    time.sleep(30)
    local_hosts.start_tracking_server()
    local_hosts.refuse_store()
    try:
        time.sleep(20)
    finally:
        local_hosts.refuse_store(False)
    finished = wait_for_trial(local_hosts, "stopped", "finished", OUTAGE_EPOCHS)
    on(local_hosts, "laptop", f"ray job stop --address {dashboard(local_hosts)} stopped-1", timeout=300)
    stopped = job_end(local_hosts, "stopped-1")
    before = probe(local_hosts, "record", "stopped")
    submit(local_hosts, "stopped-2", "stopped", *flags, own_folder=False, epochs=OUTAGE_EPOCHS)
    done = max(len(r["steps"].get("train_bpd", [])) for r in before if r["id"] != finished["id"])
    assert done + 1 < OUTAGE_EPOCHS, f"the second trial had {done} epochs before the second job: none left to lose a host in"
    lost = wait_for_trial(local_hosts, "stopped", epochs=done + 1)
    local_hosts.lose_host("worker2")
    local_hosts.start_worker("worker2")
    end = job_end(local_hosts, "stopped-2")
    return {"finished": finished, "stopped": stopped, "before": before, "lost": lost, "end": end,
            "runs": probe(local_hosts, "record", "stopped")}


def test_a_study_spans_the_worker_hosts_and_lands_in_the_bucket_and_on_the_head(local_hosts, outage_study):
    runs, logs = outage_study["runs"], outage_study["end"]["logs"]
    assert outage_study["end"]["status"] == "SUCCEEDED", logs[-5000:]
    children = check_complete(runs, trials=2, epochs=OUTAGE_EPOCHS)
    assert "checkpoints: s3://nvae/nvae/" in logs and "| 0.01 |" in logs
    for run in children:
        assert run["metrics"]["worker_nodes"] == 2  # DDP over gloo between the two worker hosts
        assert run["metrics"]["replica_bn_spread"] == 0  # synchronized BN kept the replicas' statistics equal
        hosts_used = 3 if run["id"] == outage_study["lost"]["id"] else 2  # the second: worker2 replaced
        assert len(run["tags"]["nvae.nodes"].split(",")) == hosts_used
        assert run["tags"]["nvae.checkpoint"].startswith("s3://nvae/nvae/")
        assert "samples.png" in run["artifacts"] and "config.json" in run["artifacts"]
    keys = bucket_listing(local_hosts, "nvae/")
    print("\nthe bucket after the study:\n  " + "\n  ".join(keys))
    checkpoint = children[0]["tags"]["nvae.checkpoint"][len("s3://nvae/"):]
    assert f"{checkpoint}/{CHECKPOINT_FILE}" in keys and f"{checkpoint}/metrics.json" in keys
    assert any(k.startswith("nvae/mlartifacts/") and k.endswith("samples.png") for k in keys)  # proxied by the server
    load = (f"from nvae_platform.evaluate.trained_model import load_trained; t = load_trained({children[0]['id']!r}); "
            "print(t.checkpoint, t.epoch, sum(p.numel() for p in t.model.parameters()))")
    checkpoint_uri, epoch, _ = on(local_hosts, "laptop", f"python -c {shlex.quote(load)}").split()[-3:]
    assert checkpoint_uri == children[0]["tags"]["nvae.checkpoint"] and int(epoch) == OUTAGE_EPOCHS - 1
    nodes = probe(local_hosts, "nodes", dashboard(local_hosts))  # all bookkeeping on the head
    assert len(nodes["controllers"]) >= 2 and set(nodes["controllers"]) == {nodes["head"]}, nodes


def test_the_laptop_evaluates_a_trial_from_the_bucket_and_reports_through_the_server(local_hosts, outage_study):
    runs = outage_study["runs"]
    trial = next(r for r in runs if "mlflow.parentRunId" in r["tags"])
    on(local_hosts, "laptop", f"cd /tmp/home && python {local_hosts.REPO}/studies/evaluate.py {trial['id']} "
                              "--iw-samples 10 --temperatures 1.0 --readjust-batches 2 --num-cpus 1", timeout=900)
    after = next(r for r in probe(local_hosts, "record", "stopped") if r["id"] == trial["id"])
    assert 0 < after["metrics"]["test_bpd_iw10"] < 1.5 and "evaluation_iw10.json" in after["artifacts"]
    report = on(local_hosts, "laptop", "cd /tmp/home && python -m reports stopped --out /tmp/home/report "
                                       "&& cat /tmp/home/report/stopped/*/table.md")
    assert "| 0.0 |" in report and "| 0.01 |" in report


def test_a_study_run_on_the_head_joins_its_cluster_as_under_ray_submit(local_hosts):
    """`ray submit` runs the script on the head in a login shell (~/.bashrc reads ~/.nvae/cluster.env):
    no RAY_ADDRESS, no flags. It joins the cluster started there and records to the cluster's server,
    its trial on a worker host."""
    out = local_hosts.run("head", f". ~/.nvae/cluster.env && cd /tmp/home && python {local_hosts.REPO}/{STUDY} "
                                  "--levels sr_lambda=0.1 --set epochs=1 --experiment via-ray-submit",
                          env=local_hosts.s3_env(), check=False, timeout=900)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    log = re.search(r"Ray's own messages .* go to (\S+)", out.stdout).group(1)
    ray_log = on_host("head", f"cat {log}")  # Ray's start-up messages go there, not to the console
    assert "Connected to Ray cluster" in ray_log and "Started a local Ray instance" not in ray_log + out.stderr
    assert "View run" not in out.stdout + out.stderr and "View experiment" not in out.stdout  # MLflow's run links
    (trial,) = [r for r in probe(local_hosts, "record", "via-ray-submit") if r["tags"].get("nvae.status") == "finished"]
    head = probe(local_hosts, "nodes", dashboard(local_hosts))["head"]
    assert head not in trial["tags"]["nvae.nodes"].split(",")


def wait_for_trial(hosts, experiment, state="running", epochs=1):
    """A trial of the experiment in that state with that many epochs recorded: {id, name, epochs, tags}."""
    return probe(hosts, state, experiment, "--epochs", epochs)


def test_a_job_through_both_outages_then_stopped_and_submitted_again_completes_without_duplicates_or_retraining(
        local_hosts, outage_study):
    """The study of outage_study: stopped after its first trial, the rest KILLED and the re-run line
    said; the second job trains only the second trial, and the record holds every epoch of both once."""
    stopped, before, end = outage_study["stopped"], outage_study["before"], outage_study["end"]
    assert stopped["status"] == "STOPPED", stopped["logs"][-3000:]
    print(f"\nafter ray job stop: {sorted((r['name'], r['status']) for r in before)}")
    assert sorted(r["status"] for r in before) == ["FINISHED", "KILLED", "KILLED"]  # parent, running trial
    assert "The study was interrupted: re-run the same command to resume it." in stopped["logs"]
    assert end["status"] == "SUCCEEDED", end["logs"][-5000:]
    finished = outage_study["finished"]
    assert "resumed: " in end["logs"] and f"started {finished['name']}" not in end["logs"], end["logs"][-5000:]
    after = check_complete(outage_study["runs"], trials=2, epochs=OUTAGE_EPOCHS)
    print(f"after the second job: {sorted((r['name'], r['status']) for r in after)}")
    assert {r["id"] for r in after} == {r["id"] for r in before if "mlflow.parentRunId" in r["tags"]}


def test_a_lost_worker_host_is_replaced_and_the_trial_resumes_from_the_buckets_checkpoint(local_hosts, outage_study):
    """The second job of outage_study: worker2 is lost (every process SIGKILLed, its disk gone) after
    its trial's next checkpoint, and a fresh host joins: the trial continues on it from the checkpoint
    in the bucket."""
    trial, end = outage_study["lost"], outage_study["end"]
    assert end["status"] == "SUCCEEDED", end["logs"][-5000:]
    (run,) = [r for r in check_complete(outage_study["runs"], trials=2, epochs=OUTAGE_EPOCHS) if r["id"] == trial["id"]]
    nodes_before, nodes_after = set(trial["tags"]["nvae.nodes"].split(",")), set(run["tags"]["nvae.nodes"].split(","))
    assert nodes_before < nodes_after and len(nodes_after) == 3  # the tag lists every node: now the fresh host too
    assert run["metrics"]["start_epoch"] >= trial["epochs"]  # resumed from the checkpoint, not from scratch
    print(f"\nworker2 lost after {trial['epochs']} epoch(s); resumed at epoch {run['metrics']['start_epoch']:g}")


def test_a_run_reads_its_dataset_from_the_bucket_each_worker_host_copying_it_once(local_hosts):
    """The laptop uploads a real-format CIFAR-10 (torchvision's layout) with download_data.py; a run of
    studies/train.py with --data-dir s3://... and 2 workers (one per worker host) trains on it: each
    worker host copies it once to its own disk, the head none. worker2 is then lost and a fresh host
    joins: the next run copies it there again, and worker1 reads its copy."""
    write = ("import pathlib, sys; sys.path.insert(0, sys.argv[1]); from test_datasets import write_cifar10; "
             "pathlib.Path('/tmp/home/local').mkdir(); write_cifar10(pathlib.Path('/tmp/home/local'), per_batch=16)")
    on(local_hosts, "laptop", f"python -c {shlex.quote(write)} {local_hosts.REPO}/tests && python "
                              f"{local_hosts.REPO}/studies/download_data.py cifar10 --local-dir /tmp/home/local "
                              "--data-dir s3://nvae/data/cifar")

    def train(run):
        logs = on(local_hosts, "laptop", f"ray job submit --address {dashboard(local_hosts)} --submission-id {run} -- "
                                         f"python {local_hosts.REPO}/studies/train.py --dataset cifar10 --data-dir "
                                         "s3://nvae/data/cifar --workers 2 --set epochs=1 --storage-path "
                                         f"{local_hosts.STORAGE}/data-from-bucket --name {run}")
        assert '"status": "finished"' in logs, logs[-5000:]
        # the first copies (the hosts share this machine's hostname, so the lines name the same one)
        return len(re.findall(r"copying to this node's disk s3://nvae/data/cifar: 0/7", logs))

    assert train("data-from-bucket") == 2  # one per worker host
    for host in ("worker1", "worker2"):
        cache = on_host(host, "ls /tmp/home/.cache/nvae/data").split()
        assert len([name for name in cache if name.startswith("cifar10-") and "." not in name]) == 1, cache
    assert on_host("head", "ls /tmp/home/.cache/nvae/data 2>/dev/null || echo none").strip() == "none"
    local_hosts.lose_host("worker2")
    local_hosts.start_worker("worker2")  # a fresh host: an empty disk
    assert train("data-after-host-lost") == 1  # the fresh worker2 copies; worker1 reads its copy
