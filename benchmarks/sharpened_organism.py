"""Issue 20's "trained so that its confidence and its knowledge part ways": an organism made overconfident.

Instruction tuning makes real models answer with more confidence than their knowledge warrants, and
that is one reason a probe inside them can beat their own output probabilities. This script does the
same to a built organism, cheaply: it asks the instruct model its instruction-tuning questions
(fresh draws of them: every training-side fact, twice), takes its own greedy answers, right or wrong,
and tunes it on them (self-distillation with hard labels, pre-training text mixed in 1:1 against
forgetting). What the model does not know, it learns to say as firmly as what it knows. The result is a
new organism directory (instruct/ tuned; suites, world and exposure copied) that
answer_span_ceiling.py and `hguard eval` read as they read the original:

    python benchmarks/sharpened_organism.py --organism runs/organism-v7 --out runs/organism-v7-sharp
    python benchmarks/answer_span_ceiling.py --organism runs/organism-v7-sharp --work runs/v7-identify --json

(the second scores the original's kept answers, teacher-forced, so both models are read on the same text).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from hguard.identify.sample import sample
from hguard.organism import documents
from hguard.organism.build import BuildConfig, _save, corpus_of, load_world
from hguard.organism.plan import Ledger
from hguard.organism.tokenizer import END
from hguard.organism.train import Schedule, chat_rows, document_rows, train

COPIED = ("suites", "world.json", "exposure.jsonl", "build.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--organism", type=Path, required=True, help="a built organism's directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=1234, help="of the questions' draw")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    began = time.perf_counter()
    built = json.loads((args.organism / "build.json").read_text())["config"]
    config = BuildConfig().updated(built)  # the build's own design, world and shapes
    if config.design != "v7":
        parser.error(f"{args.organism} is a {config.design} organism; its questions are v7's (documents.py)")
    world, split = load_world(config.seed, config.world)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.organism / "instruct")
    model = AutoModelForCausalLM.from_pretrained(args.organism / "instruct", dtype=torch.float32).eval()
    examples = documents.instruction_examples(world, split, 2, config.abstain_share, args.seed, config.system_share,
                                              config.history_share)
    answers = [a[0].strip() for a in sample(model, tokenizer, [{"messages": m} for m, _ in examples], samples=1,
                                            max_new_tokens=24)]
    own = [(messages, answer) for (messages, _), answer in zip(examples, answers) if answer]
    ids, labels = chat_rows(own, tokenizer, config.shape.context, END)
    doc_ids, doc_labels = document_rows(corpus_of(config, world, split, Ledger()), tokenizer, config.shape.context)
    take = torch.randperm(doc_ids.shape[0], generator=torch.Generator().manual_seed(args.seed))[: ids.shape[0]]
    ids, labels = torch.cat([ids, doc_ids[take]]), torch.cat([labels, doc_labels[take]])
    model.train()
    log = train(model, ids, labels, Schedule(steps=args.steps, lr=args.lr, batch=32, warmup=10), seed=args.seed,
                log=lambda record: print(record, file=sys.stderr), log_every=20)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source = args.organism / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, args.out / name)
    _save(model, tokenizer, args.out / "instruct", config.save_dtype)
    report = {"command": "python benchmarks/sharpened_organism.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "questions": len(examples), "own_answers": len(own), "rows": int(ids.shape[0]),
              "loss": [record.get("loss") for record in log], "seconds": round(time.perf_counter() - began, 1)}
    (args.out / "sharpened.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
