"""A trained model, one call away from its run:

    trained = load_trained("3f2c...e1")                       # a trial's MLflow run id
    trained = load_trained("runs/digits-smoke")               # a run folder: its latest checkpoint
    trained = load_trained("s3://bucket/runs/x/checkpoint_2025-01-01_00-00-00.000000")

A run records where its final checkpoint is (the nvae.checkpoint tag), not a copy of the model: the
checkpoint already holds the weights and the config, so a model logged with mlflow.pytorch would
store every trial twice.
"""
import json
import os
import re
import tempfile
from dataclasses import dataclass, field

import pyarrow.fs

from nvae_core import NVAE, NVAEConfig
from nvae_core.paths import absolute
from nvae_platform.defaults import default_tracking_uri
from nvae_platform.record.store import StoreClient, sqlite_path
from nvae_platform.record.tracking import CHECKPOINT_TAG, CONFIG_ARTIFACT, STATUS_TAG, STORE_ERRORS
from nvae_platform.storage import open_storage
from nvae_platform.train.checkpoints import CHECKPOINT_FILE, CHECKPOINT_PREFIX, epoch_checkpoints, is_file, read_state

RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids
SOURCES = ("pass a trial's MLflow run id, a checkpoint folder (<storage>/<run>/checkpoint_<time>/) or a run "
           "folder (<storage>/<run>/, for its latest checkpoint)")


@dataclass
class TrainedModel:
    """A trained NVAE and where it came from."""

    model: NVAE  # in eval mode, on map_location
    config: NVAEConfig
    checkpoint: str  # the checkpoint folder it was read from (a URI stays a URI)
    epoch: int  # the last epoch trained into it, from 0
    run_id: str = None  # the MLflow run it was found through, if any
    options: dict = field(default_factory=dict)  # that run's {"run.<RunOptions field>": value}


def load_trained(source, tracking_uri=None, map_location="cpu"):
    """The trained model of `source`: an MLflow run id (looked up in tracking_uri; default
    $MLFLOW_TRACKING_URI, else ./mlflow.db), a checkpoint folder, or a run folder (its latest
    checkpoint), each a local path or a URI. Raises ValueError naming the problem and the fix."""
    run_id, options, recorded = None, {}, None
    if RUN_ID.fullmatch(source) and not os.path.exists(source):
        run_id = source
        folder, options, recorded = _from_run(run_id, tracking_uri or default_tracking_uri())
    else:
        folder = absolute(source)
    folder = _checkpoint_folder(folder)
    state = read_state(folder, map_location)
    values = state.get("config") or recorded
    if values is None:
        raise ValueError(f"checkpoint {folder} holds no model config (it was written before checkpoints "
                         "carried one): pass the MLflow run id that recorded it instead (its config.json "
                         "holds the config), or train the model again")
    cfg = NVAEConfig.from_dict(values)
    model = NVAE(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ValueError(f"checkpoint {folder}: its weights do not fit the NVAE its config builds in this "
                         f"version of the code ({first}); check out the commit that trained it") from None
    return TrainedModel(model.to(map_location).eval(), cfg, folder, state.get("epoch"), run_id, options)


def _from_run(run_id, tracking_uri):
    """(checkpoint folder, run options, config dict or None) as the MLflow run records them."""
    path = sqlite_path(tracking_uri)
    if path is not None and not os.path.exists(path):
        raise ValueError(f"run {run_id}: there is no MLflow store {tracking_uri}; pass the --tracking-uri "
                         "that recorded the run, or run this in the folder that holds its mlflow.db")
    try:
        client = StoreClient(tracking_uri)
        run = client.get_run(run_id)
    except STORE_ERRORS as error:
        if getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            raise ValueError(f"run {run_id} is not in the MLflow store {tracking_uri}; pass the --tracking-uri "
                             "that recorded it, or a checkpoint folder") from None
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ValueError(f"run {run_id}: the MLflow store {tracking_uri} cannot be read ({first}); fix "
                         "--tracking-uri, or pass a checkpoint folder") from None
    folder = run.data.tags.get(CHECKPOINT_TAG)
    if not folder:
        status = run.data.tags.get(STATUS_TAG) or run.info.status.lower()
        raise ValueError(f"run {run_id} ({run.info.run_name}, status {status}) records no trained model (no "
                         f"{CHECKPOINT_TAG} tag): a trial that diverged or failed before its first checkpoint, "
                         "one not finished yet, and a study's parent run have none; pick a finished trial's "
                         "run, or pass a checkpoint folder")
    recorded = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with open(client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)) as f:
                recorded = json.load(f)
        except (*STORE_ERRORS, ValueError):  # a run recorded before config.json: the checkpoint has the config
            pass
    return folder, recorded.get("options", {}), recorded.get("nvae")


def _filesystem(folder):
    try:
        return open_storage(folder)
    except (ValueError, OSError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{folder} cannot be opened ({error}); {SOURCES}") from None


def _checkpoint_folder(folder):
    """folder when it holds state.pt, else the latest checkpoint folder in it (a run folder)."""
    filesystem, path = _filesystem(folder)
    kind = filesystem.get_file_info(path).type
    if kind == pyarrow.fs.FileType.NotFound:
        raise ValueError(f"{folder} does not exist; {SOURCES}")
    if kind == pyarrow.fs.FileType.File and os.path.basename(path) == CHECKPOINT_FILE:
        return folder[: -len(CHECKPOINT_FILE)].rstrip("/")  # state.pt itself: its folder
    if kind != pyarrow.fs.FileType.Directory:
        raise ValueError(f"{folder} is a file; {SOURCES}")
    if is_file(filesystem, f"{path.rstrip('/')}/{CHECKPOINT_FILE}"):
        return folder
    latest = _latest_checkpoint(folder, filesystem, path)
    if latest is None:
        raise ValueError(f"{folder} holds neither {CHECKPOINT_FILE} nor {CHECKPOINT_PREFIX}* folders; {SOURCES}")
    if not is_file(filesystem, f"{_filesystem(latest)[1]}/{CHECKPOINT_FILE}"):
        raise ValueError(f"the latest checkpoint {latest} has no {CHECKPOINT_FILE} (an upload cut short?); "
                         "pass an earlier checkpoint folder of the run")
    return latest


def _latest_checkpoint(folder, filesystem, path):
    """The run folder's checkpoint of its last epoch, or, for checkpoints written before they carried
    their metrics, its newest checkpoint folder (Ray names them by time); None if it has none."""
    epochs = epoch_checkpoints(folder)
    if epochs:
        return epochs[-1].path
    entries = filesystem.get_file_info(pyarrow.fs.FileSelector(path))
    names = sorted(e.base_name for e in entries
                   if e.type == pyarrow.fs.FileType.Directory and e.base_name.startswith(CHECKPOINT_PREFIX))
    return f"{folder.rstrip('/')}/{names[-1]}" if names else None


__all__ = ["TrainedModel", "load_trained"]
