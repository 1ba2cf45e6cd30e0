"""A trial's outcome file beside its checkpoints: the ledger that survives a killed driver.

The trial writes it when its Train run ends (finished, diverged or failed); a resumed study reads it
to report, rather than retrain, a trial Tune's saved state still shows as running, and to close
that trial's MLflow run. Every invocation of a study shares its trials' folders, so a later one
that asks for more seeds or levels trains only the trials without an outcome, and pools the rest.
"""
import json
import os

import pyarrow.fs

from nvae_platform.storage import open_storage

OUTCOME_FILE = "outcome.json"


def _location(trials_path, key):
    return open_storage(f"{trials_path}/{key}/{OUTCOME_FILE}")


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


def ended_outcomes(trials_path):
    """{trial key: outcome} of every trial under trials_path that has ended, whichever invocation of
    its study ran it ({} when the folder does not exist yet or cannot be listed)."""
    try:
        filesystem, path = open_storage(trials_path)
        found = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except OSError:
        return {}
    outcomes = {info.base_name: read_outcome(trials_path, info.base_name) for info in found
                if info.type == pyarrow.fs.FileType.Directory}
    return {key: outcome for key, outcome in outcomes.items() if outcome is not None}
