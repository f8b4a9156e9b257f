"""A real Prometheus scrapes a live hguard server; every PromQL expression of the dashboard must work."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from hguard import Guard, Probe
from hguard.server.app import ServerSettings, build_app

from conftest import load
from test_server import MESSAGES, LiveServer

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "hguard.json"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("HGUARD_REQUIRE_PROMETHEUS"):
            pytest.fail(f"{name} is not installed (apt-get install prometheus)")
        pytest.skip(f"{name} is not installed (apt-get install prometheus); CI installs it")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_promtool_accepts_the_shipped_config():
    result = subprocess.run([_binary("promtool"), "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_query_returns_data(tiny_dirs, tmp_path):
    prometheus = _binary("prometheus")
    model, tokenizer = load(tiny_dirs("llama"))
    guard = Guard(model, tokenizer, Probe.random(model, 12, seed=1))
    with LiveServer(build_app(ServerSettings(served_model_name="tiny"), guard=guard)) as server:
        port = _free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: hguard\n    static_configs:\n"
            f"      - targets: ['{server.url.removeprefix('http://')}']\n"
        )
        process = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        api = f"http://127.0.0.1:{port}/api/v1/query"
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    if httpx.get(api, params={"query": "up"}, timeout=2).json()["data"]["result"]:
                        break
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                time.sleep(0.5)
            for _ in range(3):  # flags, abstentions, dampening, streaming, an error, spread over a few scrapes
                client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6,
                                               extra_body={"guard": {"action": "flag", "threshold": 0.0}})
                client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6,
                                               extra_body={"guard": {"action": "abstain", "threshold": 0.0}})
                client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6,
                                               extra_body={"guard": {"action": "dampen", "threshold": 0.0}})
                list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, stream=True))
                with pytest.raises(openai.NotFoundError):
                    client.chat.completions.create(model="missing", messages=MESSAGES)
                time.sleep(1.5)
            time.sleep(3)
            failures = []
            for expr in _expressions():
                query = expr.replace("$model_name", "tiny").replace("$__rate_interval", "30s")
                body = httpx.get(api, params={"query": query}, timeout=10).json()
                if body.get("status") != "success" or not body["data"]["result"]:
                    failures.append((expr, body))
            assert not failures, failures
        finally:
            process.terminate()
            process.wait(timeout=30)
