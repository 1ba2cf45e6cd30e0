"""A trial's outcome file beside its checkpoints: the ledger that survives a killed driver.

The trial writes it when its Train run ends (finished, diverged or failed); a resumed study reads it
to report, rather than retrain, a trial Tune's saved state still shows as running, and to close
that trial's MLflow run.
"""
import json
import os

import pyarrow.fs

OUTCOME_FILE = "outcome.json"


def _location(trials_path, key):
    return pyarrow.fs.FileSystem.from_uri(f"{trials_path}/{key}/{OUTCOME_FILE}")


def read_outcome(trials_path, key):
    """The trial's outcome dict, or None if it has not ended."""
    filesystem, path = _location(trials_path, key)
    try:
        with filesystem.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None


def write_outcome(trials_path, key, outcome):
    filesystem, path = _location(trials_path, key)
    filesystem.create_dir(os.path.dirname(path), recursive=True)
    with filesystem.open_output_stream(path) as f:
        f.write(json.dumps(outcome, default=str).encode())
