"""nvae_platform/storage.py: AWS_MAX_ATTEMPTS sets how many times each request to an S3 store is
tried, counted as connections to a loopback server that hangs up on each; bad values are refused."""
import socket
import threading

import pyarrow.fs
import pytest

from nvae_platform.preflight import check_storage
from nvae_platform.storage import open_storage


@pytest.fixture
def hangs_up(monkeypatch):
    """An S3 endpoint on loopback that closes every connection at once: (URI of a folder on it, a
    list holding the count of connections so far)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    server, connections = socket.create_server(("127.0.0.1", 0)), [0]

    def serve():
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # closed
            connections[0] += 1
            client.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"s3://nvae/runs?endpoint_override=127.0.0.1:{server.getsockname()[1]}&scheme=http", connections
    server.close()


@pytest.mark.parametrize("attempts", [1, 2])
def test_each_request_is_tried_aws_max_attempts_times(attempts, hangs_up, monkeypatch):
    uri, connections = hangs_up
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(attempts))
    filesystem, path = open_storage(uri)
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        filesystem.get_file_info(f"{path}/state.pt")
    assert connections[0] == attempts


@pytest.mark.parametrize("value", ["0", "three", "-2", "1.5"])
def test_a_bad_value_is_refused_naming_the_variable_and_the_fix(value, hangs_up, monkeypatch, tmp_path):
    uri, connections = hangs_up
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", value)
    with pytest.raises(ValueError, match=rf"AWS_MAX_ATTEMPTS='{value}' is not a count of tries: set it to 1 or more"):
        open_storage(uri)
    with pytest.raises(ValueError, match=r"^AWS_MAX_ATTEMPTS=") as refused:  # its own line, before the storage's
        check_storage(uri)
    assert "not writable" not in str(refused.value)
    assert connections[0] == 0  # refused before any request
    filesystem, path = open_storage(str(tmp_path))  # a local folder does not read it
    assert isinstance(filesystem, pyarrow.fs.LocalFileSystem) and path == str(tmp_path)
