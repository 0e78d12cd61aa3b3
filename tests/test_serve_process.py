"""`python cli.py serve` as a real process: start-up failures (no DB, a port in use, a DB whose encoder is gone,
a public address without a key) are one line and exit 1, checked before the model loads; SIGTERM lets a request
in flight finish, gives a stalled one at most --drain-s, and exits 0."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.index_support import REPO, make_folder

pytestmark = pytest.mark.slow
BOUNDARY = "b0undary"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dbs(tiny_run_dir, tmp_path_factory) -> dict:
    """A small DB, and one indexed with a copy of the encoder that was then deleted (it cannot load)."""
    pytest.importorskip("fastapi")
    from indexer.build.pipeline import IndexConfig, run_index

    root = tmp_path_factory.mktemp("serve-process")
    images = root / "images"
    make_folder(images, classes=2, per_class=3)
    gone_model = root / "model-copy"
    shutil.copytree(tiny_run_dir, gone_model)
    run_index(IndexConfig(folder=images, db_dir=root / "db", model=str(tiny_run_dir), workers=0))
    run_index(IndexConfig(folder=images, db_dir=root / "db-gone", model=str(gone_model), workers=0))
    shutil.rmtree(gone_model)
    return {"db": root / "db", "gone": root / "db-gone", "image": sorted(images.glob("*/*"))[0].read_bytes()}


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", "serve", "--device", "cpu", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_error_line(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 1, run
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), run.stderr
    return lines[0]


def test_start_up_failures_are_one_line_and_checked_before_the_model_loads(dbs, tmp_path):
    missing = tmp_path / "no-db"
    assert _one_error_line(_serve("--db", str(missing), "--port", str(_free_port()))) == \
        f"Error: no index DB at {missing} (create one with: python cli.py index FOLDER --db {missing})"
    # The DB whose encoder is gone fails only when the encoder loads: a port in use and a missing DB come first.
    assert "Error: no index DB" not in _one_error_line(_serve("--db", str(dbs["gone"]), "--port", str(_free_port())))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert _one_error_line(_serve("--db", str(dbs["gone"]), "--port", str(port))) == \
            f"Error: cannot listen on 127.0.0.1:{port}: Address already in use (another process uses it: stop it " \
            "or choose another --port)"


def test_a_public_host_without_a_key_is_refused_before_anything_loads(dbs, tmp_path):
    run = _serve("--db", str(dbs["db"]), "--host", "0.0.0.0", "--port", str(_free_port()))
    assert _one_error_line(run).startswith("Error: refusing to serve on 0.0.0.0 without an access key: ")
    assert "--no-auth" in run.stderr and "--api-key-file" in run.stderr
    empty = tmp_path / "key"
    empty.write_text("\n")
    assert _one_error_line(_serve("--db", str(dbs["db"]), "--api-key-file", str(empty))) == \
        f"Error: the key file {empty} is empty: put the key on its first line"


def _post_head(port: int, length: int) -> bytes:
    return (f"POST /api/search?k=3 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nExpect: 100-continue\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\r\n").encode()


def _form(image: bytes) -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n\r\n'.encode()
            + image + f"\r\n--{BOUNDARY}--\r\n".encode())


def _read_until(conn: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_sigterm_finishes_the_request_in_flight_bounds_a_stalled_one_and_exits_0(dbs, tmp_path):
    import httpx

    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "cli.py", "serve", "--db", str(dbs["db"]), "--port", str(port),
                                 "--device", "cpu", "--drain-s", "5"], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = _form(dbs["image"])
        busy = socket.create_connection(("127.0.0.1", port), timeout=60)
        stalled = socket.create_connection(("127.0.0.1", port), timeout=60)
        for conn in (busy, stalled):  # "100 Continue": the server is in the handler, reading the body
            conn.sendall(_post_head(port, len(body)))
            assert _read_until(conn, b"\r\n\r\n").startswith(b"HTTP/1.1 100"), log.read_text()
        proc.send_signal(signal.SIGTERM)
        while True:  # the listener closes first: new connections are refused while the old ones finish
            assert time.monotonic() < deadline, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                time.sleep(0.05)
            except ConnectionRefusedError:
                break
        busy.sendall(body)
        answer = _read_until(busy, b'"timings"')
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert answer.count(b'"rank"') == 3
        assert proc.wait(60) == 0, log.read_text()  # the stalled request was cut after --drain-s
        assert "Cancel 1 running task(s), timeout graceful shutdown exceeded" in log.read_text()  # uvicorn's words
        busy.close()
        stalled.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
