"""The pyarrow filesystem of a local path or a URI (s3://, gs://, file://): a run's or a study's
folder, a dataset's. Where AWS_MAX_ATTEMPTS is set, as the AWS CLI and boto3 read it, each request
to an S3 store is tried that many times: more for a flaky store, fewer to hear sooner that a store is
down (pyarrow's own retrying, otherwise, made 31 tries of one request to a closed port here). Ray
Tune's and Ray Train's own requests (their state, a checkpoint's upload) keep pyarrow's retrying."""
import os

import pyarrow.fs

ATTEMPTS_ENV = "AWS_MAX_ATTEMPTS"


def open_storage(path):
    """(pyarrow filesystem, path in it) of a local path or a URI."""
    filesystem, inner = pyarrow.fs.FileSystem.from_uri(path if "://" in path else os.path.abspath(path))
    attempts = request_attempts() if isinstance(filesystem, pyarrow.fs.S3FileSystem) else None
    if attempts is not None:
        _, (options,) = filesystem.__reduce__()  # the options the URI and the environment gave it
        strategy = pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=attempts)
        filesystem = pyarrow.fs.S3FileSystem(**options, retry_strategy=strategy)
    return filesystem, inner


class StorageSettingError(ValueError):
    """A storage setting in the environment that cannot be used; the message names the fix."""


def request_attempts():
    """AWS_MAX_ATTEMPTS as a count of tries (1 or more), or None where it is unset."""
    value = os.environ.get(ATTEMPTS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise StorageSettingError(f"{ATTEMPTS_ENV}={value!r} is not a count of tries: set it to 1 or more (each "
                                  "request to an S3 store is tried that many times), or unset it for pyarrow's "
                                  "own retrying")
    return int(value)
