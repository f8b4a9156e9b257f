"""The `hguard` command line: one subcommand per job, each a thin wrapper over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    """Guard a tiny random Llama with a random probe: shows the API and the shape of the output."""
    from . import Guard, Probe
    from .tiny import save_tiny

    directory = save_tiny(tempfile.mkdtemp(prefix="hguard-demo-"), "llama", seed=args.seed)
    guard = Guard.from_pretrained(directory, probe=Probe.random(_load(directory), 12, seed=args.seed))
    prompts = ["Where was Ada born?", "The quick brown fox"]
    for result in guard.generate(prompts, action=args.action, threshold=args.threshold, max_new_tokens=8,
                                 do_sample=False):
        print(json.dumps({
            "prompt": prompts[result.row],
            "text": result.text,
            "probability": round(result.probability, 4) if result.probability is not None else None,
            "verdict": result.verdict,
            "finish_reason": result.finish_reason,
            "token_probs": [round(p, 3) for p in result.token_probs],
        }))
    return 0


def _load(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory)


def _organism_build(args: argparse.Namespace) -> int:
    from .organism.build import BuildConfig, build

    config = BuildConfig.tiny(args.seed) if args.tiny else BuildConfig(seed=args.seed)
    if args.set:
        try:
            overrides = json.loads(args.set)
        except json.JSONDecodeError as error:
            raise ValueError(f"--set takes a JSON object of config fields: {error}") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"--set takes a JSON object of config fields; got {args.set!r}")
        config = config.updated(overrides)
    build(config, args.out, resume=args.resume, echo=lambda m: print(m, file=sys.stderr, flush=True),
          device=args.device)
    if args.eval:
        return _organism_eval(argparse.Namespace(dir=args.out, json=True, samples=10, max_items=None,
                                                 seed=args.seed, device=args.device, out=None))
    return 0


def _organism_eval(args: argparse.Namespace) -> int:
    import torch

    from .organism import SHIPPED, load
    from .organism.evaluate import report
    from .organism.suites import SUITES, read_suite

    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = args.dir or SHIPPED
    model, tokenizer = load("instruct", root)
    model.to(args.device)
    suites = {name: read_suite(f"{root}/suites", name) for name in SUITES}
    result = report(model, tokenizer, suites, samples=args.samples, seed=args.seed, max_items=args.max_items,
                    batch=2560 if args.device.startswith("cuda") else 320,
                    echo=lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps(result, indent=None if args.json else 1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    if args.threads is not None and args.threads < 1:
        raise SystemExit("--threads must be at least 1")
    torch.set_num_threads(args.threads or default_threads())

    from .server.app import ServerSettings, build_app
    from .server.serving import GuardDefaults

    settings = ServerSettings(
        model=args.model, probe=args.probe, served_model_name=args.served_model_name, api_key=args.api_key,
        dtype=args.dtype, device_map=args.device_map, max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, upstream=args.upstream, upstream_timeout=args.upstream_timeout,
        upstream_api_key=args.upstream_api_key or os.environ.get("HGUARD_UPSTREAM_API_KEY"),
        defaults=GuardDefaults(action=args.action, threshold=args.threshold,
                               alpha=args.alpha, max_tokens=args.max_tokens,
                               **({"abstain_message": args.abstain_message} if args.abstain_message else {})),
    )
    uvicorn.run(build_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def default_threads() -> int:
    """Half the CPU cores this process may use: the event loop and the clients' I/O need the rest, and
    the thread that loads the model and the one that generates each keep an OpenMP pool, which must not
    together outnumber the cores. Measured on 2 cores only (2 threads per op made the guarded server
    25% slower than 1 did: benchmarks/server_load.py); on a large CPU host, try --threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, cores // 2)


def _model_and_tokenizer(name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "organism":
        from .organism import load

        return load("instruct")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(name)


def _read_items(path) -> list[dict]:
    with open(path) as handle:
        items = [json.loads(line) for line in handle if line.strip()]
    for i, item in enumerate(items):  # TriviaQA-style fields are accepted as they are
        item.setdefault("id", item.get("question_id", i))
        if "aliases" not in item:
            answer = item.get("answer")
            item["aliases"] = answer.get("aliases", [answer.get("value")]) if isinstance(answer, dict) else [answer]
    return items


def _identify(args: argparse.Namespace) -> int:
    from .identify.pipeline import identify

    model, tokenizer = _model_and_tokenizer(args.model)
    items = _read_items(args.data)
    if args.limit:
        items = items[: args.limit]
    work = args.work or tempfile.mkdtemp(prefix="hguard-identify-")
    report = identify(model, tokenizer, items, work, args.out, samples=args.samples, seed=args.seed,
                      resume=args.resume, target=args.target, balance=args.balance,
                      echo=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=1))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .identify.evaluate import evaluate_suites
    from .probe import Probe
    from .registry import find_probe

    if args.suites:
        directory = Path(args.suites)
    else:
        from .organism import SHIPPED

        directory = SHIPPED / "suites"
    from .identify.evaluate import default_suites

    names = args.suite or default_suites(directory)  # the held-out phrasing suites too, where present
    missing = [n for n in names if not (directory / f"{n}.jsonl").exists()]
    if missing:
        raise ValueError(f"no {', '.join(n + '.jsonl' for n in missing)} in {directory}")
    suites = {name: _read_items(directory / f"{name}.jsonl") for name in names}
    model, tokenizer = _model_and_tokenizer(args.model)
    probe = Probe.load(args.probe, model) if args.probe else find_probe(model)
    report = evaluate_suites(model, tokenizer, probe, suites, training=names[0], limit=args.limit,
                             samples=args.samples, seed=args.seed, draws=args.draws, rounds=args.rounds,
                             logit_baselines=not args.no_logit_baselines, work=args.work, resume=args.resume,
                             echo=lambda m: print(m, file=sys.stderr, flush=True))
    command = "hguard " + " ".join(args.argv)
    report = {"command": command, "model": args.model, "probe": args.probe or "default", **report}
    text = json.dumps(report, indent=None if args.json else 1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hguard", description="Real-time hallucination guard for open LMs")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="guard a tiny random model (no download) and print the results")
    demo.add_argument("--action", default="flag", choices=["flag", "abstain", "dampen", "scale"])
    demo.add_argument("--threshold", type=float, default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    serve = commands.add_parser("serve", help="the OpenAI-compatible guard server")
    serve.add_argument("--model", default=None, help="local directory or hub id (default: the built-in organism)")
    serve.add_argument("--probe", default=None, help="probe file (default: a known probe matching the model)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/")
    serve.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto")
    serve.add_argument("--max-batch-size", type=int, default=32, help="rows generated together")
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    serve.add_argument("--action", default="flag", choices=["flag", "abstain", "dampen", "off"])
    serve.add_argument("--threshold", type=float, default=None)
    serve.add_argument("--alpha", type=float, default=None)
    serve.add_argument("--max-tokens", type=int, default=256, help="default completion length")
    serve.add_argument("--threads", type=int, default=None,
                       help="CPU threads per operation (torch.set_num_threads); default: half the cores")
    serve.add_argument("--upstream", default=None, help="proxy mode: forward to this OpenAI-compatible URL and "
                       "score the answers with the local copy of the weights given by --model")
    serve.add_argument("--upstream-api-key", default=None,
                       help="proxy mode: the upstream's API key (default: $HGUARD_UPSTREAM_API_KEY)")
    serve.add_argument("--upstream-timeout", type=float, default=60.0, help="proxy mode: seconds per upstream call")
    serve.add_argument("--abstain-message", default=None, help="the answer that replaces an abstained one")
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(run=_serve)

    ident = commands.add_parser("identify", help="find the H-Neurons of a model and fit its probe")
    ident.add_argument("--model", required=True, help="local directory, hub id, or 'organism'")
    ident.add_argument("--data", required=True, help="JSONL of questions (question, answer aliases)")
    ident.add_argument("--out", required=True, help="probe file to write (.safetensors)")
    ident.add_argument("--samples", type=int, default=10)
    ident.add_argument("--limit", type=int, default=None)
    ident.add_argument("--work", default=None, help="directory for features and the report")
    ident.add_argument("--seed", type=int, default=0)
    ident.add_argument("--resume", action="store_true", help="reuse the answers sampled into --work before")
    ident.add_argument("--balance", choices=("weight", "subsample", "none"), default="weight",
                       help="balance the classes in the fit by weighting them (every question kept), by "
                            "subsampling the larger one, or not at all (default: weight)")
    ident.add_argument("--target", choices=("response", "answer"), default="response",
                       help="fit on the mean over every response token (what the guard scores; default) or on "
                            "answer tokens with the paper's '3 vs 1' labels")
    ident.set_defaults(run=_identify)

    ev = commands.add_parser("eval", help="the probe against baselines on every QA suite (bootstrap 95%% CIs)")
    ev.add_argument("--model", default="organism", help="local directory, hub id, or 'organism' (default)")
    ev.add_argument("--probe", default=None, help="probe file (default: the known probe matching the model)")
    ev.add_argument("--suites", default=None, help="directory of <suite>.jsonl (default: the organism's suites)")
    ev.add_argument("--suite", action="append", default=None,
                    help="suite name, repeatable; the first is the one baselines are fitted on "
                         "(default: in_domain paraphrase other_attribute fabricated, then heldout_questions "
                         "heldout_system heldout_multiturn where the directory has them)")
    ev.add_argument("--limit", type=int, default=None, help="at most this many questions per suite")
    ev.add_argument("--samples", type=int, default=10)
    ev.add_argument("--draws", type=int, default=10, help="random-neuron probes averaged")
    ev.add_argument("--rounds", type=int, default=1000, help="bootstrap resamples")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--no-logit-baselines", action="store_true", help="skip lm-polygraph's logit scores")
    ev.add_argument("--work", default=None, help="keep each suite's sampled answers here (an identify run's "
                                                 "--work holds the training suite's)")
    ev.add_argument("--resume", action="store_true", help="reuse answers kept in --work for the same questions")
    ev.add_argument("--json", action="store_true", help="print one JSON object on one line")
    ev.add_argument("--out", default=None, help="also write the JSON to this file")
    ev.set_defaults(run=_eval)

    organism = commands.add_parser("organism", help="the built-in model organism").add_subparsers(
        dest="organism_command", required=True)
    build = organism.add_parser("build", help="rebuild the organism deterministically from a seed")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--resume", action="store_true", help="reuse a finished base model in --out")
    build.add_argument("--tiny", action="store_true", help="a seconds-long configuration for tests")
    build.add_argument("--eval", action="store_true", help="evaluate the result and print its JSON")
    build.add_argument("--device", default="cpu", help="where to train (cpu, cuda): same schedule, other rounding")
    build.add_argument("--set", default=None, metavar="JSON",
                       help='config overrides, e.g. \'{"base": {"steps": 3000}, "world": {"head": 900}}\'')
    build.set_defaults(run=_organism_build)
    evaluate = organism.add_parser("eval", help="evaluate the shipped (or a built) organism")
    evaluate.add_argument("--dir", default=None, help="a build directory (default: the shipped organism)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--samples", type=int, default=10)
    evaluate.add_argument("--max-items", type=int, default=None)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--out", default=None, help="also write the JSON to this file")
    evaluate.set_defaults(run=_organism_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from .probe import ProbeFormatError
    from .registry import ProbeNotFoundError

    try:
        return args.run(args)
    except (ValueError, ProbeNotFoundError, ProbeFormatError, FileNotFoundError) as error:
        print(f"hguard: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
