"""The paper's evaluation of a trained model: importance-weighted test NLL (K = 1000), the KL of each
latent group, active units (both counts) and sample grids at several temperatures.

    python studies/evaluate.py RUN_ID                                  # a trial's run in ./mlflow.db
    python studies/evaluate.py RUN_ID --workers 8 --gpus-per-worker 1  # on a Ray cluster's GPUs
    python studies/evaluate.py runs/cifar10-smoke --iw-samples 100 --max-test-images 500

SOURCE is a trial's MLflow run id, a checkpoint folder, or a run folder (its latest checkpoint), local
or s3://. With a run id the figures (test_bpd_iw<K>, test_nats_iw<K>, test_kl_group_<i>,
test_active_units, test_active_units_kl, ...) and files (samples_T<t>.png, evaluation_iw<K>.json)
are logged to that run; with a folder they are written to --out.
"""
import argparse
import json
import os
import sys
import tempfile

from nvae_core import ConfigError
from nvae_core.datasets import DatasetNotFoundError
from nvae_core.paths import absolute
from nvae_core.training import check_precision
from nvae_platform.defaults import default_data_dir, default_tracking_uri
from nvae_platform.evaluate.run import EvaluationSettings, evaluate, record, write_files
from nvae_platform.evaluate.trained_model import load_trained
from nvae_platform.preflight import CommandLine, at_least
from nvae_platform.ray_cluster import add_ray_arguments, init_ray_for_run
from nvae_platform.ray_output import ray_log_path, send_ray_logs_to
from nvae_platform.record.tracking import check_tracking_uri
from nvae_platform.train.data_cache import check_data_dir
from nvae_platform.train.run_options import RunOptions

PAPER_READJUST_BATCHES = 500  # the authors' evaluate.py re-estimates BN statistics over 500 sampling batches


def build_parser():
    parser = CommandLine(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("source", metavar="RUN_ID_OR_CHECKPOINT", help="an MLflow run id, a checkpoint folder or a run folder")
    add("--tracking-uri", help="the MLflow store of the run id (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    add("--data-dir", default=default_data_dir(),
        help="where the run's dataset lives (default: $NVAE_DATA_DIR, else data)")
    add("--iw-samples", type=at_least(1), default=1000, help="K of the importance-weighted NLL (default: 1000)")
    add("--max-test-images", type=at_least(1), help="evaluate the first N images only (default: the whole split)")
    add("--temperatures", type=at_least(0, float, strictly=True), nargs="+", default=[1.0, 0.8, 0.7, 0.6],
        help="one sample grid per temperature (default: 1.0 0.8 0.7 0.6)")
    add("--readjust-batches", type=at_least(0),
        help="sampling batches that re-estimate BN statistics before each grid (default: the run's "
             f"run.bn_readjust_batches, else {PAPER_READJUST_BATCHES} as in the authors' evaluation)")
    add("--grid", type=at_least(1), default=8, help="each sample grid is N x N images (default: 8)")
    add("--out", help="folder for the grids and evaluation_iw<K>.json (default with a run id: logged to the run "
                      "only; else evaluation-<run name>)")
    add("--workers", type=at_least(1), default=1, help="Ray workers sharing the IW shards (default: 1)")
    add("--gpus-per-worker", type=at_least(0, float), default=0.0, help="0 evaluates on CPUs (default)")
    add("--cpus-per-worker", type=at_least(0, float, strictly=True), default=1.0)
    add_ray_arguments(parser)
    return parser


def settings_for(trained, args):
    """EvaluationSettings from the flags, with what the run recorded where no flag says."""
    recorded = trained.options
    readjust = args.readjust_batches
    if readjust is None:
        readjust = int(recorded.get("run.bn_readjust_batches", PAPER_READJUST_BATCHES))
    return EvaluationSettings(
        iw_samples=args.iw_samples, max_test_images=args.max_test_images or 0, temperatures=tuple(args.temperatures),
        readjust_batches=readjust, grid=args.grid, data_dir=absolute(args.data_dir), workers=args.workers,
        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        eval_batch_size=int(recorded.get("run.eval_batch_size", RunOptions.eval_batch_size)),
        iw_max_batch=int(recorded.get("run.iw_max_batch", RunOptions.iw_max_batch)))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    try:  # every check before Ray starts
        trained = load_trained(args.source, tracking_uri)
        cfg, settings = trained.config, settings_for(trained, args)
        check_precision(cfg.precision, "cuda" if settings.gpus_per_worker > 0 else "cpu")
        check_data_dir(cfg.dataset, settings.data_dir, seed=cfg.seed, image_size=cfg.image_size)
        if trained.run_id:
            check_tracking_uri(tracking_uri)
        out = args.out or (None if trained.run_id else
                           f"evaluation-{os.path.basename(os.path.dirname(trained.checkpoint.rstrip('/')))}")
        if out:
            try:
                os.makedirs(out, exist_ok=True)
            except OSError as error:
                raise ValueError(f"--out {out} cannot be created ({error.strerror}); choose a folder you can write")
        run_folder = os.path.dirname(trained.checkpoint.rstrip("/"))
        ray_log = ray_log_path(run_folder, os.path.basename(run_folder))
        send_ray_logs_to(ray_log)  # Ray's start-up lines included
        init_ray_for_run(args.address, args.num_cpus, settings.workers, settings.cpus_per_worker,
                         settings.gpus_per_worker, "--workers")
    except (ConfigError, ValueError, DatasetNotFoundError) as error:
        parser.error(str(error))
    print(f"[evaluate] {trained.checkpoint} (epoch {trained.epoch + 1}"
          f"{', run ' + trained.run_id if trained.run_id else ''}); Ray's own messages go to {ray_log}", flush=True)
    metrics, grids = evaluate(trained, settings, say=lambda line: print(line, flush=True))
    with tempfile.TemporaryDirectory() as scratch:
        paths = write_files(trained, settings, metrics, grids, out or scratch)
        if trained.run_id:
            record(trained.run_id, tracking_uri, metrics, paths, step=trained.epoch)
    print(json.dumps(metrics, indent=2))
    if trained.run_id:
        print(f"[evaluate] logged to run {trained.run_id}: mlflow ui --backend-store-uri {tracking_uri}")
    if out:
        print(f"[evaluate] wrote {', '.join(os.path.basename(p) for p in paths)} to {os.path.abspath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
