"""The command line's front door: help everywhere, bad arguments refused in one line before anything loads."""

from __future__ import annotations

import socket
import time

import pytest

from hguard.cli import build_parser, main

COMMANDS = [[], ["demo"], ["serve"], ["identify"], ["eval"], ["organism"], ["organism", "build"], ["organism", "eval"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "hguard")
def test_every_help_exits_0_and_shows_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: hguard")
    if command == ["serve"]:
        assert "(default: 8000)" in text and "(default: 127.0.0.1)" in text and "(default: flag)" in text


def test_every_flag_has_help():
    def walk(parser):
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{parser.prog} {action.option_strings[0]} has no help"
            if isinstance(action.choices, dict):  # a subcommand's parsers
                for sub in action.choices.values():
                    yield from walk(sub)
        yield parser.prog

    assert len(list(walk(build_parser()))) >= 8


@pytest.mark.parametrize("argv, named", [
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--threshold", "1.5"], "--threshold"),
    (["serve", "--alpha", "-1"], "--alpha"),
    (["serve", "--model", "/no/such/dir"], "--model"),
    (["serve", "--probe", "/no/such/probe.safetensors"], "--probe"),
    (["serve", "--upstream", "localhost:9"], "--upstream"),
    (["eval", "--limit", "20"], "--limit"),
    (["identify", "--model", "organism", "--data", "/no/such.jsonl", "--out", "p.safetensors"], "--data"),
    (["eval", "--sampler", "sglang"], "--sampler"),
    (["eval", "--sampler", "vllm", "--sampler-args", "[1]"], "--sampler-args"),
])
def test_bad_arguments_are_one_line_before_anything_loads(argv, named, capsys):
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and time.perf_counter() - started < 5
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and named in error and "Traceback" not in error


def test_a_busy_port_is_refused_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.perf_counter()
        assert main(["serve", "--port", str(port)]) == 2
    assert time.perf_counter() - started < 5
    error = capsys.readouterr().err.strip()
    assert error.startswith("hguard: error: argument --port: cannot listen") and len(error.splitlines()) == 1


@pytest.mark.parametrize("argv, named", [
    (["serve", "--enforce-eager", "--port", "0"], "--enforce-eager"),
    (["serve", "--max-model-len", "64", "--port", "0"], "--max-model-len"),
    (["serve", "--engine", "vllm", "--upstream", "http://127.0.0.1:9", "--port", "0"], "--upstream"),
    (["serve", "--engine", "vllm", "--device-map", "auto", "--port", "0"], "--device-map"),
])
def test_engine_flags_that_do_not_go_together_are_one_line(argv, named, capsys):
    started = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - started < 5
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and named in error and "Traceback" not in error


def test_the_vllm_engine_without_vllm_says_how_to_install_it(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert main(["serve", "--engine", "vllm", "--port", "0"]) == 2
    error = capsys.readouterr().err.strip()
    assert "pip install 'hguard[vllm]'" in error and len(error.splitlines()) == 1


def test_a_bad_probe_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a probe")
    assert main(["serve", "--probe", str(bad), "--port", "0"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("hguard: error: ") and "bad.safetensors" in error[-1] and "Traceback" not in "".join(error)


def test_the_start_up_line_names_what_is_served(make_guard):
    from argparse import Namespace

    from hguard.cli import startup_line
    from hguard.server.app import ServerSettings

    guard = make_guard()  # a random probe: no file, no watch threshold of its own
    args = Namespace(probe=None, threshold=None, action="abstain", alpha=None, host="127.0.0.1", port=8123)
    line = startup_line(guard, ServerSettings(served_model_name="tiny"), args)
    assert line.startswith("serving tiny (llama) with probe given in code (12 neurons")
    assert "engine: hosted" in line and "action abstain" in line and line.endswith("http://127.0.0.1:8123/v1")


@pytest.mark.parametrize("argv, named", [
    (["eval", "--sampler-args", '{"dtype": "bfloat16"}'], "--sampler-args"),
    (["eval", "--sampler", "vllm", "--sampler-args", '{"gpu_memory_utilization": 0.5}'], "--sampler-args"),
])
def test_sampler_flags_that_do_not_go_together_are_one_line(argv, named, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec  # as if vLLM were installed: the flags are checked before it is imported
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    started = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - started < 5
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and named in error and "Traceback" not in error


@pytest.mark.parametrize("command", [["eval"], ["identify", "--data", __file__, "--out", "p.safetensors"]])
def test_the_vllm_sampler_without_vllm_says_how_to_install_it(command, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    argv = [command[0], "--model", "organism", *command[1:], "--sampler", "vllm"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "pip install 'hguard[vllm]'" in error and "--sampler" in error and len(error.splitlines()) == 1
