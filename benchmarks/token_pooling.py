"""Issue 20's candidate "token-level targets on the answer span, applied per token and pooled".

The shipped probe is fitted on each response's mean CETT over its tokens. Here the same L1 logistic
probe is fitted on single answer tokens instead (each labelled with its response's consistency label),
on the training side of the in-domain suite (each question weighted as identify's default balance does,
its weight shared by its tokens), with C chosen on the validation side under identify's
budget (1% of the neurons). A response is then scored by pooling its answer tokens' logits: mean, max,
and the mean of the top two. Reported on the in-domain test side and on the held-out phrasing suites'
test-side facts, beside the answer-span maximum sequence probability (lm-polygraph's, as `hguard eval`
reports it) of the same responses. Nothing is sampled: the answers are read from an `hguard eval --work`
directory (the eval's sampling settings and split).

    python benchmarks/token_pooling.py --organism runs/organism-v7 --work runs/v7-identify --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from hguard.batching import left_pad, pad_id
from hguard.hooks import HookSpec, hooked
from hguard.identify.collected import featurise
from hguard.identify.evaluate import auroc, fact_side, logit_scorers
from hguard.identify.features import Example
from hguard.identify.fit import fit_l1, question_weights
from hguard.identify.label import consistency_labels
from hguard.identify.pipeline import examples_for
from hguard.organism.suites import read_suite
from hguard.probe import cett
from hguard.sites import resolve

SUITES = ("in_domain", "heldout_questions", "heldout_system", "heldout_multiturn")
CS = (0.01, 0.015, 0.02, 0.025, 0.03, 0.1, 0.3, 1.0)  # finer where the 1% budget (61 neurons on v7) falls
POOLS = {"mean": lambda x: x.mean(), "max": lambda x: x.max(), "top2": lambda x: np.sort(x)[-2:].mean()}


def cached_answers(path: Path, items: list[dict]) -> tuple[list[dict], list[list[str]]]:
    """The items that `path` (an eval's `*.answers.jsonl`) holds answers for, and those answers."""
    rows = {r["id"]: r["answers"] for r in map(json.loads, path.read_text().splitlines()) if r}
    kept = [item for item in items if str(item["id"]) in rows]
    return kept, [rows[str(item["id"])] for item in kept]


@torch.no_grad()
def answer_token_features(model, tokenizer, examples: list[Example], batch: int = 16) -> list[np.ndarray]:
    """Per example, [answer tokens, layers * intermediate] CETT of every neuron at each answer token."""
    sites = resolve(model)
    norms = [sites.all_column_norms(l) for l in range(sites.num_layers)]
    out: list[np.ndarray] = []
    for start in range(0, len(examples), batch):
        part = examples[start: start + batch]
        ids, mask = left_pad([e.prompt_ids + e.response_ids for e in part], pad_id(tokenizer), "cpu")
        width = ids.shape[1]
        rows = [(i, width - len(e.response_ids) + t) for i, e in enumerate(part) for t in e.answer_tokens]
        index_b, index_t = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
        layers: list[torch.Tensor] = [None] * sites.num_layers

        def hook(layer: int):
            def post(module, args, output):
                z, h = args[0][index_b, index_t], output[index_b, index_t]
                layers[layer] = cett(z, h, norms[layer])
            return post

        with hooked([HookSpec(sites.down(l), post=hook(l)) for l in range(sites.num_layers)]):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        features = torch.cat(layers, dim=1).numpy()
        counts = np.cumsum([0] + [len(e.answer_tokens) for e in part])
        out.extend(features[a:b] for a, b in zip(counts[:-1], counts[1:]))
    return out


def suite(model, tokenizer, directory: Path, work: Path, name: str) -> dict:
    items = read_suite(directory / "suites", name)
    if name != "in_domain":
        items = [item for item in items if fact_side(item) == "test"]
    items, answers = cached_answers(work / ("answers.jsonl" if name == "in_domain" else f"{name}.answers.jsonl"), items)
    kept, _ = consistency_labels(items, answers)
    data = featurise(model, tokenizer, kept, fact_side, desc=f"{name} features")
    examples, _ = examples_for(tokenizer, data.records)
    msp = logit_scorers(span=True)["max_sequence_probability_answer"](data)
    return {"data": data, "tokens": answer_token_features(model, tokenizer, examples), "msp": msp}


def pooled(fitted, tokens: list[np.ndarray], pool) -> np.ndarray:
    return np.array([pool(fitted.logits(t)) for t in tokens])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--organism", type=Path, required=True, help="an organism build's directory")
    parser.add_argument("--work", type=Path, required=True, help="an `hguard eval --work` directory")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.organism / "instruct", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.organism / "instruct")
    suites = {name: suite(model, tokenizer, args.organism, args.work, name) for name in SUITES}
    home = suites["in_domain"]
    side = home["data"].side
    tokens_of = lambda s: [t for t, keep in zip(home["tokens"], side == s) if keep]  # noqa: E731
    labels_of = lambda s: home["data"].labels[side == s]  # noqa: E731
    x = np.concatenate(tokens_of("train"))
    y = np.concatenate([[label] * len(t) for label, t in zip(labels_of("train"), tokens_of("train"))])
    # each question weighs the same in the fit whatever its answer's length, each class half (identify's
    # "weight" balance), shared by its tokens
    per_question = question_weights(labels_of("train"), "weight")
    weights = np.concatenate([[w / len(t)] * len(t) for w, t in zip(per_question, tokens_of("train"))])
    budget = int(0.01 * x.shape[1])
    fits = [(C, fit_l1(x, y, C, weights=weights)) for C in CS]
    sweep = [{"C": C, "neurons": f.kept, "val_auroc_max": round(auroc(labels_of("val"), pooled(f, tokens_of("val"), POOLS["max"])), 4)}
             for C, f in fits]
    within = [(row, f) for row, (C, f) in zip(sweep, fits) if 0 < row["neurons"] <= budget]
    if not within:
        raise SystemExit(f"no C in {CS} keeps between 1 and {budget} neurons: {sweep}")
    row, best = max(within, key=lambda pair: pair[0]["val_auroc_max"])
    everything = max(zip(sweep, [f for _, f in fits]), key=lambda pair: pair[0]["val_auroc_max"])
    report = {"command": "python benchmarks/token_pooling.py " + " ".join(argv or sys.argv[1:]), "sweep": sweep,
              "chosen": row, "budget": budget, "best_any_budget": everything[0], "suites": {}}
    for name, entry in suites.items():
        data, test = entry["data"], entry["data"].side == "test"
        tokens = [t for t, keep in zip(entry["tokens"], test) if keep]
        labels = data.labels[test]
        scores = {f"token_probe_{pool}": round(auroc(labels, pooled(best, tokens, fn)), 4) for pool, fn in POOLS.items()}
        scores["token_probe_max_any_budget"] = round(auroc(labels, pooled(everything[1], tokens, POOLS["max"])), 4)
        scores["max_sequence_probability_answer"] = round(auroc(labels, entry["msp"][test]), 4)
        report["suites"][name] = {"n": int(test.sum()), "hallucinated": int(labels.sum()), **scores}
    print(json.dumps(report, indent=1) if args.json else report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
