"""README.md's Python blocks run as written, against the organism, so the front door cannot drift from
the code. A block that talks to a server (it names http://127.0.0.1:8000) gets a live `hguard serve`
of the organism on a free port instead."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from hguard import Guard
from hguard.server.app import ServerSettings, build_app

from test_server import LiveServer

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
SERVER = re.compile(r"https?://(?:127\.0\.0\.1|localhost):8000")


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2, "README.md lost its library and server examples"


@pytest.fixture(scope="module")
def organism_server():
    guard = Guard.from_pretrained("organism")
    with LiveServer(build_app(ServerSettings(served_model_name="hguard-organism"), guard=guard)) as server:
        yield server


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(index, request, tmp_path, monkeypatch):
    code = BLOCKS[index]
    if SERVER.search(code):
        server = request.getfixturevalue("organism_server")
        code = SERVER.sub(server.url, code)
    monkeypatch.chdir(tmp_path)  # whatever a block writes stays in the test's own directory
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": f"readme_block_{index}"})
