"""A multi-host cluster on one machine (needs root): every host has its own network, PID and mount
namespace, its own IP on a private bridge, its own /tmp (tmpfs, home inside), and sees the code
tree and /root read-only, so no writable folder is shared between hosts. Hosts: `store` (moto's S3 server with the
bucket), `head` (ray start --head with cluster.yaml's head resources), `worker1`, `worker2` (1 CPU
each), `laptop` (the user's side). A host can be lost (all its processes SIGKILLed, its /tmp gone)
and a fresh one can join.

    python -m cluster.local_hosts up      # prints the addresses; state in /run/nvae-local-hosts.json
    python -m cluster.local_hosts exec head -- ray status
    python -m cluster.local_hosts down
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time

BRIDGE, SUBNET = "nvaebr0", "10.200.0"
ADDRESSES = {"store": 2, "head": 3, "worker1": 4, "worker2": 5, "worker3": 6, "worker4": 7, "laptop": 9}
STATE = "/run/nvae-local-hosts.json"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET, S3_PORT, RAY_PORT, DASHBOARD_PORT = "nvae", 9000, 6379, 8265
# Inside a host: a private tmpfs over every writable place a process would use (scratch, and
# PostgreSQL's folders: a head's database is its own); the code tree read-only. /root holds the
# interpreter (pyenv), so it is read-only too; HOME is under the host's /tmp.
PRIVATE = "/tmp /var/tmp /dev/shm /etc/postgresql /var/lib/postgresql /var/log/postgresql /run/postgresql"
HOST_INIT = ("mount --make-rprivate / && mount --bind {repo} {keep}"  # kept aside: the repo may lie under /tmp
             " && for d in {private}; do if [ -d $d ]; then mount -t tmpfs tmpfs $d; fi; done"
             " && (! id postgres >/dev/null 2>&1 || chown postgres:postgres /var/lib/postgresql /var/log/postgresql"
             " /run/postgresql) && mkdir -p /tmp/home {repo} && mount --bind {keep} {repo} && mount --bind /root /root"
             " && for d in {repo} /root; do mount -o remount,ro,bind $d; done && ip link set lo up"
             " && exec sleep infinity")
KEEP = "/run/nvae-local-hosts-repo"  # an empty folder; in each host's own mount namespace, the repo on it
STORAGE = f"s3://{BUCKET}/nvae"  # the head's NVAE_STORAGE_PATH, as cluster.yaml's setup_head.sh line gives it
TRACKING_PORT = 5000


def sh(command, check=True):
    """Run a command on this machine (the root namespaces), return its stdout."""
    return subprocess.run(command, shell=True, check=check, capture_output=True, text=True).stdout


def ip(name):
    """The host's address on the bridge."""
    return f"{SUBNET}.{ADDRESSES[name]}"


def load_state():
    """{host: pid of the host's PID 1 as seen from here}."""
    if not os.path.exists(STATE):
        return {}
    with open(STATE) as f:
        return json.load(f)


def save_state(state):
    with open(STATE, "w") as f:
        json.dump(state, f)


def host_env(extra=None):
    """The environment of a command on a host: this tree first on PYTHONPATH, the venv on PATH."""
    venv_bin = os.path.dirname(sys.executable)
    env = {"PATH": f"{venv_bin}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp/home", "PYTHONPATH": REPO,
           "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
           # the hosts share this machine's hostname, which resolves to loopback: gloo must use the bridge
           "GLOO_SOCKET_IFNAME": "eth0"}
    env.update(extra or {})
    return env


def veth_of(name):
    """The bridge's end of the host's network cable."""
    return f"nv-{name}"[:15]


def add_host(name):
    """Create host `name`: netns with a veth on the bridge, then a PID+mount namespace whose PID 1 waits."""
    netns, veth = f"nvae-{name}", veth_of(name)
    sh(f"ip netns add {netns}")
    sh(f"ip link add {veth} type veth peer name eth0 netns {netns}")
    sh(f"ip link set {veth} master {BRIDGE} up")
    sh(f"ip netns exec {netns} ip addr add {ip(name)}/24 dev eth0 && ip netns exec {netns} ip link set eth0 up")
    unshare = subprocess.Popen(
        ["ip", "netns", "exec", netns, "unshare", "--pid", "--fork", "--mount-proc", "--mount", "sh", "-c",
         HOST_INIT.format(private=PRIVATE, repo=shlex.quote(REPO), keep=KEEP)], start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):  # PID 1 of the host is unshare's child, once `sleep` runs
        children = sh(f"pgrep -P {unshare.pid}", check=False).split()
        if children and sh(f"cat /proc/{children[0]}/comm", check=False).strip() == "sleep":
            break
        time.sleep(0.1)
    else:
        raise RuntimeError(f"host {name} did not start")
    state = load_state()
    state[name] = int(children[0])
    save_state(state)
    return state[name]


def run(name, command, env=None, check=True, timeout=None, background=False, log=None):
    """Run a shell command on host `name` (in all its namespaces). background: don't wait; output to log."""
    pid = load_state()[name]
    argv = ["nsenter", "-t", str(pid), "-n", "-p", "-m", "--", "env", "-i",
            *[f"{k}={v}" for k, v in host_env(env).items()], "bash", "-c", command]
    if background:
        argv[-1] = f"setsid nohup bash -c {shlex.quote(command)} > {log or '/dev/null'} 2>&1 < /dev/null &"
    # a session of its own: daemons a command starts (ray start) never share the caller's process group
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout, start_new_session=True)


def wait_for(name, url, seconds=120):
    """Wait until url answers from host `name` (any HTTP status)."""
    probe = ("import sys, urllib.request, urllib.error\ntry: urllib.request.urlopen(sys.argv[1], timeout=2)\n"
             "except urllib.error.HTTPError: pass")
    deadline = time.time() + seconds
    while run(name, f"python -c {shlex.quote(probe)} {url}", check=False).returncode != 0:
        if time.time() > deadline:
            raise RuntimeError(f"{url} did not answer from {name} within {seconds} s")
        time.sleep(1)


def lose_host(name):
    """Every process of the host SIGKILLed at once (its PID 1 dies), its /tmp gone, its network removed."""
    pid = load_state().pop(name)
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.1)
    # the veth pair now, not when the kernel frees the namespace (after its last process has exited): a
    # fresh host of the same name needs the name at once
    sh(f"ip link del {veth_of(name)}", check=False)
    sh(f"ip netns del nvae-{name}", check=False)
    state = load_state()
    state.pop(name, None)
    save_state(state)


def start_store():
    """moto's S3 server on the store host, with the bucket."""
    run("store", f"python -m moto.server -H 0.0.0.0 -p {S3_PORT}", background=True, log="/tmp/moto.log")
    wait_for("store", f"http://{ip('store')}:{S3_PORT}/")
    make_bucket = (f"import boto3; boto3.client('s3', endpoint_url='{s3_endpoint()}', region_name='us-east-1', "
                   f"aws_access_key_id='test', aws_secret_access_key='test').create_bucket(Bucket='{BUCKET}')")
    run("store", f"python -c {shlex.quote(make_bucket)}")


def s3_endpoint():
    return f"http://{ip('store')}:{S3_PORT}"


def s3_env():
    """What every host needs to reach the bucket."""
    return {"AWS_ENDPOINT_URL": s3_endpoint(), "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1"}


def start_head():
    """The head as `ray up cluster-local.yaml` makes it: cluster/setup_head.sh (PostgreSQL, secrets,
    ~/.nvae/cluster.env), ray start --head in that environment with cluster.yaml's head resources (no
    CPUs, the trial drivers' resource) and the dashboard, then cluster/start_tracking_server.sh,
    served on the bridge (the laptop's stand-in for an SSH port-forward)."""
    version = max(os.listdir("/usr/lib/postgresql"), key=int)
    run("head", f"pg_createcluster {version} main", timeout=120)  # what Debian's postgresql package does at install
    run("head", f"bash {REPO}/cluster/setup_head.sh {STORAGE}", env=s3_env(), timeout=300)
    run("head", f". ~/.nvae/cluster.env && ray start --head --node-ip-address={ip('head')} --port={RAY_PORT} "
                f"--num-cpus=0 --resources='{{\"nvae_trial_driver\": 1000}}' --dashboard-host=0.0.0.0 "
                f"--dashboard-port={DASHBOARD_PORT} --include-dashboard=true", env=s3_env(), timeout=300)
    wait_for("head", f"http://{ip('head')}:{DASHBOARD_PORT}/api/version")
    start_tracking_server()


def start_tracking_server():
    """cluster/start_tracking_server.sh on the head (it replaces a running server)."""
    run("head", f"bash {REPO}/cluster/start_tracking_server.sh {TRACKING_PORT}",
        env={**s3_env(), "NVAE_TRACKING_HOST": "0.0.0.0"}, timeout=180)


def stop_tracking_server():
    """SIGKILL the tracking server's processes on the head (its database stays up)."""
    run("head", f"pkill -9 -f 'mlflow server --app-name basic-auth .*--port {TRACKING_PORT} '", check=False)


def refuse_store(refuse=True):
    """The store's S3 port refuses every connection (refuse=True), as a killed store does, or serves
    again. moto keeps the bucket in memory, so killing its process would lose what a real store's
    disk keeps; refusing its connections is the outage a client sees."""
    rule = f"INPUT -p tcp --dport {S3_PORT} -j REJECT --reject-with tcp-reset"
    run("store", f"iptables {'-I' if refuse else '-D'} {rule}")


def cluster_env():
    """The head's ~/.nvae/cluster.env (what setup_head.sh exported) as a dict, for the laptop's view
    of it: the tracking server at the head's bridge address, with the same credentials."""
    done = run("head", ". ~/.nvae/cluster.env && env -0")
    env = dict(item.split("=", 1) for item in done.stdout.split("\0") if "=" in item)
    names = ("NVAE_STORAGE_PATH", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    return {**{name: env[name] for name in names},
            "MLFLOW_TRACKING_URI": f"http://{ip('head')}:{TRACKING_PORT}"}


def start_worker(name):
    """A fresh worker host joining the head with 1 CPU."""
    add_host(name)
    run(name, f"ray start --address={ip('head')}:{RAY_PORT} --node-ip-address={ip(name)} --num-cpus=1",
        env=s3_env(), timeout=300)


def up(workers=2):
    """Bridge, store, head, workers, laptop."""
    down()
    sh(f"ip link add {BRIDGE} type bridge && ip link set {BRIDGE} up && mkdir -p {KEEP}")
    for name in ("store", "head", "laptop"):
        add_host(name)
    start_store()
    start_head()
    for i in range(1, workers + 1):
        start_worker(f"worker{i}")


def down():
    """Kill every host (its whole PID namespace) and remove the namespaces and the bridge."""
    for name in list(load_state()):
        lose_host(name)
    for netns in sh("ip netns list", check=False).split():
        if netns.startswith("nvae-"):
            sh(f"ip netns del {netns}", check=False)
    sh(f"ip link del {BRIDGE}", check=False)
    if os.path.exists(STATE):
        os.remove(STATE)


def unavailable():
    """Why namespaced hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "namespaced hosts need root (ip netns, unshare, mount)"
    for tool in ("ip", "unshare", "nsenter", "iptables", "pg_createcluster"):
        if not sh(f"command -v {tool}", check=False):
            return f"{tool} is not installed (.ci/run installs Debian's iproute2, util-linux, iptables, postgresql)"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("up", "down", "exec", "lose", "join"))
    parser.add_argument("host", nargs="?")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.action == "up":
        up(args.workers)
        print(f"store {s3_endpoint()} (bucket {BUCKET}); head {ip('head')} ray :{RAY_PORT} dashboard "
              f":{DASHBOARD_PORT}; hosts {', '.join(load_state())}")
    elif args.action == "down":
        down()
    elif args.action == "exec":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        done = run(args.host, " ".join(map(shlex.quote, command)), env=s3_env(), check=False)
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
        sys.exit(done.returncode)
    elif args.action == "lose":
        lose_host(args.host)
    elif args.action == "join":
        start_worker(args.host)


if __name__ == "__main__":
    main()
