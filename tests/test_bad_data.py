"""A broken names file or download is named in one line, and nothing is written: the library function and the
real workflow, which stops at the download."""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import threading

import pytest
from conftest import (
    NAMES_SHA256,
    files_under,
    output_of,
    snakemake,
    tiny_config,
    write_config,
)

from actgrad import data


def closed_port() -> int:
    """A loopback port that nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NamesServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, names: bytes):
        self.names = names
        self.hits: dict[str, int] = {}
        super().__init__(("127.0.0.1", 0), NamesHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class NamesHandler(http.server.BaseHTTPRequestHandler):
    server: NamesServer

    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, body: bytes, length: int | None = None, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def do_GET(self):
        self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1
        names = self.server.names
        half = names[: names.index(b"\n", len(names) // 2) + 1]  # cut at a line end: still valid names
        if self.path == "/names.txt":
            self._send(names)
        elif self.path == "/truncated":  # announces the whole file, sends half, hangs up
            self._send(half, length=len(names))
        elif self.path == "/half.txt":  # a complete response of half the file
            self._send(half)
        elif self.path == "/empty.txt":
            self._send(b"")
        elif self.path == "/page.html":  # a web page instead of the raw file (a wrong URL)
            self._send(b"<!DOCTYPE html>\n<html><body>names</body></html>\n")
        elif self.path == "/error500":
            self.send_error(500)
        else:
            self.send_error(404)


@pytest.fixture(scope="module")
def server(names_path):
    srv = NamesServer(names_path.read_bytes())
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


# A names file may be broken in many ways; each is reported as what it is, even when the
# configured checksum is the real file's (the content is checked before the checksum).
BAD_CONTENT = {
    "empty": (b"", "the file is empty"),
    "only newlines": (b"\n\n", "the file is empty"),
    "upper case": (b"emma\nOlivia\nava\n", "line 2 is 'Olivia': an upper-case letter"),
    "digits": (b"emma\nava\nmia2\n", "line 3 is 'mia2': a digit"),
    "spaces": (b"emma\nanna marie\n", "line 2 is 'anna marie': a space or tab"),
    "trailing space": (b"emma \nava\n", "line 1 is 'emma ': a space or tab"),
    "non-ASCII": ("emma\nzoë\n".encode(), "non-ASCII byte on line 2"),
    "blank line": (b"emma\n\nava\n", "line 2 is '': a blank line"),
    "Windows line ends": (b"emma\r\nava\r\n", "a Windows line ending"),
    "punctuation": (b"emma\nmary-jane\n", "line 2 is 'mary-jane': a character other than a-z"),
}


@pytest.mark.parametrize("case", list(BAD_CONTENT))
def test_bad_names_file_is_named_and_nothing_is_written(case, tmp_path):
    content, problem = BAD_CONTENT[case]
    source = tmp_path / "names.txt"
    source.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(data.DataError) as e:
        data.download_names(str(source), NAMES_SHA256, out / "names.txt")
    message = str(e.value)
    assert message.startswith(f"{source}: ") and problem in message, message
    assert "\n" not in message
    assert files_under(out) == []


def test_many_bad_lines_are_counted_and_the_first_few_listed(tmp_path):
    content = b"".join(b"Name%d\n" % i for i in range(12))
    source = tmp_path / "names.txt"
    source.write_bytes(content)
    with pytest.raises(data.DataError, match=r"12 line\(s\) .* at line 1, 2, 3, 4, 5 \(and 7 more\); line 1 is"):
        data.download_names(str(source), hashlib.sha256(content).hexdigest(), tmp_path / "out.txt")


def test_wrong_checksum_names_both_hashes(names_path, tmp_path):
    wrong = "ab" * 32
    with pytest.raises(data.DataError) as e:
        data.download_names(str(names_path), wrong, tmp_path / "out" / "names.txt")
    assert str(e.value) == (f"{names_path}: checksum mismatch: expected sha256 {wrong}, got {NAMES_SHA256} "
                            f"({names_path.stat().st_size} bytes, 32033 names)")
    assert files_under(tmp_path / "out") == []


def test_missing_local_file(tmp_path):
    with pytest.raises(data.DataError, match=r"nowhere\.txt: no such file$"):
        data.download_names(str(tmp_path / "nowhere.txt"), NAMES_SHA256, tmp_path / "out.txt")


def test_too_few_names_for_the_split_are_named(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("abcdefghijklm\nnopqrstuvwxyz\n")
    with pytest.raises(data.DataError, match=rf"^{re.escape(str(names))}: only 2 names; the 80/10/10 split"):
        data.save_splits(names, tmp_path / "splits.pt", tmp_path / "splits.json")
    names.write_text("emma\nava\n" * 20)
    with pytest.raises(data.DataError, match=r"names\.txt: the names use 4 distinct letters; the models expect"):
        data.save_splits(names, tmp_path / "splits.pt", tmp_path / "splits.json")
    assert not (tmp_path / "splits.pt").exists() and not (tmp_path / "splits.json").exists()


def test_written_files_get_the_usual_permissions(tmp_path):
    """mkstemp makes owner-only files; a finished output is as readable as any file the user makes."""
    data.atomic_write_bytes(tmp_path / "f.txt", b"x")
    (tmp_path / "g.txt").write_bytes(b"x")
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == (tmp_path / "g.txt").stat().st_mode & 0o777


def test_download_over_http(server, names_path, tmp_path):
    dest = tmp_path / "names.txt"
    info = data.download_names(f"{server.url}/names.txt", NAMES_SHA256, dest, retries=0)
    assert dest.read_bytes() == names_path.read_bytes() and info["names"] == 32033


HTTP_CASES = {
    # path: (what the message says, tries)
    "/truncated": (r"truncated download \(\d+ of {size} bytes\) after 2 tries", 2),
    "/half.txt": (r"checksum mismatch: expected sha256 " + NAMES_SHA256, 1),
    "/empty.txt": (r"the file is empty", 1),
    "/page.html": (r"line 1 is '<!DOCTYPE html>'", 1),
    "/missing": (r"HTTP 404 Not Found$", 1),
    "/error500": (r"HTTP 500 Internal Server Error after 2 tries$", 2),
}


@pytest.mark.parametrize("path", list(HTTP_CASES))
def test_bad_download_is_named_and_nothing_is_written(path, server, names_path, tmp_path):
    pattern, tries = HTTP_CASES[path]
    source = f"{server.url}{path}"
    before = server.hits.get(path, 0)
    with pytest.raises(data.DataError) as e:
        data.download_names(source, NAMES_SHA256, tmp_path / "out" / "names.txt", retries=1, backoff=0.01)
    message = str(e.value)
    assert message.startswith(f"{source}: ") and "\n" not in message, message
    assert re.search(pattern.format(size=names_path.stat().st_size), message), message
    assert server.hits[path] - before == tries  # transient failures are retried, the others are not
    assert files_under(tmp_path / "out") == []


def test_unreachable_host_is_retried_with_backoff(monkeypatch, tmp_path):
    waits = []
    monkeypatch.setattr(data.time, "sleep", waits.append)
    source = f"http://127.0.0.1:{closed_port()}/names.txt"
    with pytest.raises(data.DataError) as e:
        data.download_names(source, NAMES_SHA256, tmp_path / "out" / "names.txt", retries=3, backoff=0.5)
    assert re.fullmatch(re.escape(source) + r": unreachable \(offline or host down: .*refused.*\) after 4 tries; "
                        r"to use a local copy instead: --config names_url=/path/to/names\.txt", str(e.value)), e.value
    assert waits == [0.5, 1.0, 2.0]
    assert files_under(tmp_path / "out") == []


def test_malformed_url_and_unsupported_scheme(tmp_path):
    with pytest.raises(data.DataError, match=r"^ftp://example.org/names.txt: unsupported URL scheme 'ftp'"):
        data.download_names("ftp://example.org/names.txt", NAMES_SHA256, tmp_path / "out.txt")
    for url in ("http://127.0.0.1:notaport/names.txt", "http:///names.txt", "https://[::1/names.txt",
                "http://127.0.0.1:99999/names.txt"):
        with pytest.raises(data.DataError, match=rf"^{re.escape(url)}: not a valid URL \(.+\)$"):
            data.download_names(url, NAMES_SHA256, tmp_path / "out.txt", retries=0)


WORKFLOW_DATA_CASES = ["wrong checksum", "truncated download", "empty file", "upper case", "HTTP 404",
                       pytest.param("unreachable", marks=pytest.mark.slow)]


@pytest.mark.parametrize("case", WORKFLOW_DATA_CASES)
def test_workflow_stops_before_training_on_bad_data(case, server, names_path, tmp_path):
    sha = NAMES_SHA256
    if case == "wrong checksum":
        source, sha, problem = str(names_path), "0" * 64, "checksum mismatch: expected sha256 " + "0" * 64
    elif case == "truncated download":
        source, problem = f"{server.url}/truncated", "truncated download ("
    elif case == "empty file":
        (tmp_path / "empty.txt").write_bytes(b"")
        source, problem = str(tmp_path / "empty.txt"), "the file is empty"
    elif case == "upper case":
        (tmp_path / "upper.txt").write_bytes(b"emma\nOlivia\n")
        source, problem = str(tmp_path / "upper.txt"), "line 2 is 'Olivia': an upper-case letter"
    elif case == "HTTP 404":
        source, problem = f"{server.url}/missing", "HTTP 404 Not Found"
    else:  # connection refused, retried three times with backoff (1 + 2 + 4 s)
        source, problem = f"http://127.0.0.1:{closed_port()}/names.txt", "unreachable (offline or host down"
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = tiny_config(names_path, names_url=source, names_sha256=sha)
    proc = snakemake(workdir, write_config(workdir, config), check=False)
    out = output_of(proc)
    assert proc.returncode != 0
    lines = [line for line in out.splitlines() if line.startswith("error: ")]
    assert lines and all(line.startswith(f"error: download: {source}: ") and problem in line for line in lines), (
        out[-3000:])
    assert "Traceback" not in out
    # The step's log holds exactly that one line.
    assert (workdir / "logs" / "download.log").read_text().splitlines() == lines[:1]
    # Nothing downloaded, nothing trained.
    assert files_under(workdir / "data") == []
    assert not (workdir / "results").exists() and not (workdir / "logs" / "train").exists()
    assert not re.search(r"^\s*(local)?rule (splits|train\S*):$", out, re.M)
