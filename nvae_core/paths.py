"""One rule for paths given on a command line or in a config."""
import os


def absolute(path):
    """A local path made absolute (with ~ expanded): Ray workers do not start in this directory. A URI
    (s3://, gs://, file://, ...) is returned as it is."""
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))
