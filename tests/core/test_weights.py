"""The weights folder: downloads from a local HTTP server (checked by hash, bounded in time, one at a time),
imports, the bucket, and ``ssd-service weights``. Nothing here reaches the internet."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.cli import main as service_cli
from core.layout import TEMP_SUFFIX
from core.s3 import Bucket, Location
from core.weights import WeightsFolder
from model.config import TrainConfig
from model.initialisation import WeightsUnavailable, plan_start
from model.pretrained import COCO_WEIGHTS, IMAGENET_WEIGHTS, WeightsError
from tests.support.pretrained_files import named_by_hash
from tests.support.processes import free_port
from tests.support.s3_server import s3_server


class FileServer:
    """A local HTTP server of ``folder``'s files that counts the GET requests per path, each file sent slowly
    enough (``delay`` seconds between 1 MiB blocks) for downloads to overlap."""

    def __init__(self, folder: Path, delay: float = 0.0):
        self.folder, self.delay, self.requests = folder, delay, Counter()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests[self.path] += 1
                super().do_GET()

            def copyfile(self, source, outputfile):
                while block := source.read(1 << 20):
                    outputfile.write(block)
                    time.sleep(server.delay)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    served = FileServer(tmp_path / "served")
    served.folder.mkdir()
    yield served
    served.close()


@pytest.fixture(scope="module")
def coco_file(published) -> Path:
    return published.path(COCO_WEIGHTS)


def serve(server: FileServer, source: Path, name: str) -> None:
    (server.folder / name).symlink_to(source)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX) or p.suffix == ".pth")


def test_a_download_is_checked_by_hash_then_renamed_into_place(server, coco_file, tmp_path):
    weights = named_by_hash(COCO_WEIGHTS, coco_file)  # torchvision's name, with this file's own hash
    serve(server, coco_file, weights.file_name)
    folder = WeightsFolder(tmp_path / "weights", base_url=server.url)
    assert folder.present(weights) is None
    with folder.published(weights, may_download=True) as path:
        assert path == folder.path(weights) and path.read_bytes() == coco_file.read_bytes()
    assert leftovers(folder.folder) == [weights.file_name]
    with folder.published(weights, may_download=True):  # present now: no second request
        pass
    assert server.requests == {f"/{weights.file_name}": 1}


def test_a_download_with_another_hash_is_not_used_and_leaves_nothing(server, coco_file, tmp_path):
    serve(server, coco_file, COCO_WEIGHTS.file_name)  # the published name: this file's hash is not b556d3b4
    folder = WeightsFolder(tmp_path / "weights", base_url=server.url)
    with pytest.raises(WeightsUnavailable, match=f"{server.url}/{COCO_WEIGHTS.file_name} gave a file whose SHA-256"):
        folder.fetch(COCO_WEIGHTS)
    assert leftovers(folder.folder) == []


def test_a_refused_download_names_the_url_and_leaves_nothing(server, tmp_path):
    folder = WeightsFolder(tmp_path / "weights", base_url=server.url)
    with pytest.raises(WeightsUnavailable, match=f"{server.url}/vgg16_bn-6c64b313.pth was refused: HTTP 404"):
        folder.fetch(IMAGENET_WEIGHTS["vgg16_bn"])
    assert leftovers(folder.folder) == []


def test_auto_with_no_server_to_reach_falls_back_at_once_saying_why(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    folder = WeightsFolder(tmp_path / "weights", base_url=closed)
    started = time.monotonic()
    start = plan_start(TrainConfig(), ["a"], folder)
    assert time.monotonic() - started < 5
    assert start.init.used == "scratch" and start.config.backbone == "vgg16_bn"
    assert f"downloading {closed}/{COCO_WEIGHTS.file_name} failed: ConnectError" in start.init.note
    assert "an earlier download could not reach its server" in start.init.note  # ImageNet's was not tried
    with pytest.raises(WeightsUnavailable, match="ConnectError"):  # asked for explicitly: the job fails
        plan_start(TrainConfig(init="coco"), ["a"], folder)
    assert leftovers(folder.folder) == []


def test_a_server_that_stops_answering_is_given_up_after_the_read_timeout(tmp_path):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections (the backlog), never answers
    try:
        base_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        folder = WeightsFolder(tmp_path / "weights", base_url=base_url, read_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(WeightsUnavailable, match="ReadTimeout"):
            folder.fetch(COCO_WEIGHTS)
        assert time.monotonic() - started < 5
    finally:
        silent.close()
    assert leftovers(folder.folder) == []


@pytest.mark.slow
def test_many_fetches_of_one_file_download_it_once(tmp_path, coco_file):
    server = FileServer(tmp_path / "served", delay=0.01)
    server.folder.mkdir()
    try:
        weights = named_by_hash(COCO_WEIGHTS, coco_file)
        serve(server, coco_file, weights.file_name)
        # One folder object per "worker": each takes the lock file on its own, as processes do.
        folders = [WeightsFolder(tmp_path / "weights", base_url=server.url) for _ in range(4)]
        paths, errors = [], []

        def fetch(folder: WeightsFolder) -> None:
            try:
                paths.append(folder.fetch(weights))
            except Exception as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=fetch, args=(folder,)) for folder in folders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors and len(paths) == 4 and len(set(paths)) == 1
        assert server.requests == {f"/{weights.file_name}": 1}
        assert paths[0].read_bytes() == coco_file.read_bytes()
    finally:
        server.close()


@pytest.mark.slow
def test_an_imported_file_is_recognised_by_its_hash_and_checked(published, coco_file, tmp_path):
    weights = named_by_hash(COCO_WEIGHTS, coco_file)
    copied = tmp_path / "from-a-usb-stick.pth"
    copied.symlink_to(coco_file)
    folder = WeightsFolder(tmp_path / "weights", download=False, catalogue=(weights, *IMAGENET_WEIGHTS.values()))
    assert folder.import_file(copied) == weights
    assert folder.path(weights).read_bytes() == coco_file.read_bytes()

    stranger = tmp_path / "other.pth"
    stranger.write_bytes(b"not any published file")
    with pytest.raises(WeightsError, match="is not that of any of"):
        folder.import_file(stranger)
    # The right hash for its name, but not the kind of file the name says: refused too.
    vgg = published.path(IMAGENET_WEIGHTS["vgg16_bn"])
    posing = named_by_hash(COCO_WEIGHTS, vgg)
    with pytest.raises(WeightsError, match=r"not ssd300_vgg16_coco-.*kind of file"):
        WeightsFolder(tmp_path / "other-weights", catalogue=(posing,)).import_file(vgg)
    assert not (tmp_path / "other-weights" / posing.file_name).exists()


@pytest.mark.process  # moto's S3 server
def test_with_a_bucket_each_file_is_downloaded_once_for_every_host(server, coco_file, tmp_path):
    weights = named_by_hash(COCO_WEIGHTS, coco_file)
    serve(server, coco_file, weights.file_name)
    with s3_server() as s3:
        url = s3.create_bucket("weights-test")
        first = WeightsFolder(tmp_path / "host-a", base_url=server.url, bucket=Bucket(Location.parse(f"{url}/svc")))
        first.fetch(weights)
        assert s3.keys("weights-test") == [f"svc/weights/{weights.file_name}"]
        # Another host, with downloads off: it copies the bucket's file, checked by hash like a download.
        other = WeightsFolder(tmp_path / "host-b", download=False, bucket=Bucket(Location.parse(f"{url}/svc")))
        with other.published(weights, may_download=True) as path:
            assert path.read_bytes() == coco_file.read_bytes()
    assert server.requests == {f"/{weights.file_name}": 1}


def test_the_weights_command_lists_fetches_and_imports(monkeypatch, capsys, tmp_path, coco_file):
    monkeypatch.setenv("SSD_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("SSD_WEIGHTS_DOWNLOAD", "never")
    monkeypatch.delenv("SSD_STORAGE_URL", raising=False)
    with pytest.raises(SystemExit) as exit_code:
        service_cli(["weights"])
    listed = capsys.readouterr().out
    assert exit_code.value.code == 0 and "downloads: never" in listed
    assert f"{COCO_WEIGHTS.file_name}" in listed and "missing" in listed
    assert "auto      scratch: no weights present and downloads are off" in listed

    with pytest.raises(SystemExit) as exit_code:
        service_cli(["weights", "fetch"])
    assert exit_code.value.code == 0 and "skipped: downloads are off" in capsys.readouterr().out

    # A copied file under its published name whose bytes are not the published ones: refused.
    with pytest.raises(SystemExit) as exit_code:
        service_cli(["weights", "import", str(coco_file)])
    assert exit_code.value.code == 1 and "is not that of any of" in capsys.readouterr().err
    assert not (tmp_path / "weights" / COCO_WEIGHTS.file_name).exists()

    (tmp_path / "weights").mkdir(exist_ok=True)
    (tmp_path / "weights" / COCO_WEIGHTS.file_name).symlink_to(coco_file)
    with pytest.raises(SystemExit):
        service_cli(["weights"])
    listed = capsys.readouterr().out
    assert f"auto      coco: {COCO_WEIGHTS.file_name}" in listed and "coco      ssd300" in listed
