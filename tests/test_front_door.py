"""Every entry point checks its input the same way, before Ray starts: each bad input below, run as a
command, exits 2 with one line on stderr that names the flag, starts no Ray session and writes
nothing to the tracking store. The commands are forked from a process that imported the entry points
once (tests/forked_commands.py); one case per entry point also runs as a plain subprocess and must
give the same answer."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.slow  # the whole module starts Ray, servers or commands

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {"study": "studies/ablation_sr.py", "norm": "studies/ablation_norm.py", "train": "studies/train.py"}
NO_GPUS = ["--gpus-per-worker", "64"]  # more than any machine this runs on

# (entry point, arguments, the flag the one line must name). {ro} is a read-only store file.
CASES = [
    ("study", ["--storage-path", "/proc/nvae-runs"], "--storage-path"),
    ("train", ["--storage-path", "/proc/nvae-runs"], "--storage-path"),
    ("study", ["--tracking-uri", "sqlite:///{ro}"], "--tracking-uri"),
    ("study", ["--tracking-uri", "http://127.0.0.1:9"], "--tracking-uri"),
    ("train", ["--tracking-uri", "postgresql://nobody@127.0.0.1:9/db"], "--tracking-uri"),
    ("study", ["--scale", "small", "--gpus-per-worker", "0", "--cpus-per-worker", "1", "--data-dir",
               "/nonexistent/nvae-data"], "--data-dir"),
    ("train", ["--dataset", "cifar10", "--data-dir", "/nonexistent/nvae-data"], "--data-dir"),
    ("train", ["--dataset", "mnist", "--data-dir", "/proc/version", "--download"], "--data-dir"),
    ("study", ["--max-concurrent", "-3"], "--max-concurrent"),
    ("study", ["--seeds", "0"], "--seeds"),
    ("study", ["--workers-per-trial", "0"], "--workers-per-trial"),
    ("study", ["--gpus-per-worker", "-1"], "--gpus-per-worker"),
    ("study", ["--num-cpus", "-2"], "--num-cpus"),
    ("train", ["--workers", "0"], "--workers"),
    ("train", ["--max-failures", "-1"], "--max-failures"),
    ("train", ["--iw-samples", "0"], "--iw-samples"),
    ("train", ["--cpus-per-worker", "0"], "--cpus-per-worker"),
    ("study", NO_GPUS, "--workers-per-trial x --gpus-per-worker"),
    ("train", NO_GPUS, "--workers x --gpus-per-worker"),
    ("study", ["--workers-per-trial", "64"], "--workers-per-trial x --cpus-per-worker"),  # more CPUs than here
    ("train", ["--workers", "64"], "--workers x --cpus-per-worker"),
    # every --set checked against the plan: unknown, wrong type, out of range, fixed by the study or
    # its scale, a factor's own field
    ("study", ["--set", "no_such_field=1"], "--set"),
    ("study", ["--set", "epochs=abc"], "--set"),
    ("study", ["--set", "epochs=0"], "--set"),
    ("study", ["--set", "learning_rate=-1"], "--set"),
    ("study", ["--set", "batch_size=0"], "--set"),
    ("study", ["--set", "kl_anneal_portion=1.5"], "--set"),
    ("study", ["--set", "dataset=mnist"], "--set dataset"),
    ("study", ["--set", "image_size=16"], "--set"),
    ("norm", ["--set", "num_latent_scales=2"], "--set num_latent_scales"),
    ("study", ["--set", "sr_lambda=1"], "--set sr_lambda"),
    ("train", ["--set", "dataset=mnist"], "--dataset"),
    ("train", ["--set", "epochs=0"], "epochs"),
    # a batch larger than the training images (digits: 1438), counted before Ray starts
    ("study", ["--set", "batch_size=100000"], "--set batch_size=100000"),
    ("train", ["--set", "batch_size=100000"], "--set batch_size=100000"),
    # a model whose training needs more memory than the machine (5.9 B parameters), counted on the meta device
    ("train", ["--set", "num_channels_enc=4096"], "--set"),
    # plans are bounded: refused before they are built, with their size
    ("study", ["--seeds", "1000000"], "--seeds 1000000"),
    # a cost budget: refused when the estimate is unknown (no earlier run, no --probe) or above it
    ("study", ["--budget-gpu-hours", "100"], "--budget-gpu-hours 100"),
    ("study", ["--budget-gpu-hours", "1e-6", "--probe", "--levels", "sr_lambda=0.0"], "--budget-gpu-hours 1e-06"),
    ("study", ["--budget-gpu-hours", "0"], "--budget-gpu-hours"),
    # names are labels, never paths
    ("train", ["--name", "../../escape"], "--name"),
    ("train", ["--name", ""], "--name"),
    ("train", ["--experiment", "a/b"], "--experiment"),
    ("study", ["--experiment", ""], "--experiment"),
    ("study", ["--experiment", "x\ty"], "--experiment"),
]


def _read_only_store(folder):
    """A real MLflow SQLite store whose file refuses writes even to root (immutable), or None."""
    from mlflow.tracking import MlflowClient

    path = folder / "readonly.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode != 0:
        if os.geteuid() == 0:
            return None
        path.chmod(0o444)
    return path


@pytest.fixture(scope="module")
def read_only_store(tmp_path_factory):
    path = _read_only_store(tmp_path_factory.mktemp("store"))
    yield path
    if path is not None:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)


def _command_env(tmp_path, **extra):
    env = dict(os.environ, RAY_TMPDIR=str(tmp_path / "ray"), PYTHONPATH=str(ROOT), **extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.parametrize("entry, args, flag", CASES, ids=[f"{e}:{' '.join(a)}" for e, a, _ in CASES])
def test_bad_input_is_one_line_naming_the_flag_before_ray_starts(entry, args, flag, tmp_path, read_only_store,
                                                                 commands):
    if "sqlite:///{ro}" in args and read_only_store is None:
        pytest.skip("no way to make a file read-only for root here (chattr)")
    args = [a.replace("{ro}", str(read_only_store)) for a in args]
    before = read_only_store.read_bytes() if read_only_store is not None else None
    result = commands.run(ROOT / ENTRY_POINTS[entry], args, cwd=tmp_path, env=_command_env(tmp_path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert flag in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ray").exists(), "a Ray session was started"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()
    if read_only_store is not None:
        assert read_only_store.read_bytes() == before


@pytest.mark.parametrize("entry, args", [("study", ["--set", "epochs=abc"]), ("norm", ["--set", "num_latent_scales=2"]),
                                         ("train", ["--dataset", "cifar10", "--data-dir", "/nonexistent/nvae-data"])])
def test_a_forked_command_answers_as_the_plain_command_does(entry, args, tmp_path, commands):
    forked = commands.run(ROOT / ENTRY_POINTS[entry], args, cwd=tmp_path, env=_command_env(tmp_path))
    plain = subprocess.run([sys.executable, str(ROOT / ENTRY_POINTS[entry]), *args], cwd=tmp_path,
                           env=_command_env(tmp_path), capture_output=True, text=True, timeout=120, check=False)
    assert (forked.returncode, forked.stdout, forked.stderr) == (plain.returncode, plain.stdout, plain.stderr)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1, plain.stderr


# A remote --data-dir (moto's S3): a prefix with nothing, a dataset missing a file, no images; a store
# that refuses the keys (a moto server that checks them), one that does not answer.
S3_CASES = [
    (["--dataset", "cifar10", "--data-dir", "s3://nvae/nothing"], None, "holds nothing of dataset 'cifar10'"),
    (["--dataset", "cifar10", "--data-dir", "s3://nvae/data"], None, "holds no data_batch_2"),
    (["--dataset", "image-folder", "--data-dir", "s3://nvae/data"], None, "holds 0 image file(s)"),
    (["--dataset", "cifar10", "--data-dir", "s3://nvae/data"], "keys refused", "INVALID_ACCESS_KEY_ID"),
    (["--dataset", "cifar10", "--data-dir", "s3://nvae/data"], "http://127.0.0.1:9", "cannot be listed"),
]


def _store_checking_keys():
    """moto's S3 server with its IAM checks on (it knows no key): (process, endpoint)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0"))
    for _ in range(100):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    return server, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("args, endpoint, said", S3_CASES, ids=[f"{' '.join(a)} {e or ''}" for a, e, _ in S3_CASES])
def test_a_remote_data_dir_without_the_dataset_is_one_line_before_ray_starts(args, endpoint, said, s3_store,
                                                                             tmp_path, commands):
    with s3_store.filesystem.open_output_stream("nvae/data/cifar-10-batches-py/data_batch_1") as f:
        f.write(b"x")
    server = None
    if endpoint == "keys refused":
        server, endpoint = _store_checking_keys()
    env = _command_env(tmp_path, AWS_ENDPOINT_URL=endpoint or s3_store.endpoint,
                       NVAE_DATA_CACHE=str(tmp_path / "cache"))
    try:
        result = commands.run(ROOT / ENTRY_POINTS["train"], args, cwd=tmp_path, env=env)
    finally:
        if server is not None:
            server.kill()
            server.wait()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"--data-dir {args[-1]}" in lines[0] and said in lines[0], lines[0]
    assert not (tmp_path / "ray").exists() and not (tmp_path / "cache").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_max_failures_help_says_why_minus_one_is_refused(tmp_path, commands):
    result = commands.run(ROOT / "studies/train.py", ["--help"], cwd=tmp_path, env=_command_env(tmp_path))
    assert result.returncode == 0
    assert "--max-failures" in result.stdout and "-1, unlimited, is refused" in " ".join(result.stdout.split())
