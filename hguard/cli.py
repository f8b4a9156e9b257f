"""The `hguard` command line: one subcommand per job, each a thin wrapper over the library."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hguard", description="Real-time hallucination guard for open LMs")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="guard a tiny random model (no download) and print the results")
    demo.add_argument("--action", default="flag", choices=["flag", "abstain", "dampen", "scale"])
    demo.add_argument("--threshold", type=float, default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"hguard: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
