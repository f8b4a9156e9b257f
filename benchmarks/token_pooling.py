"""Issue 20's per-token candidates: token-level targets pooled, and the token's own probability as an
input of the same sparse linear score.

The shipped probe is fitted on each response's mean CETT over its tokens. Here a per-token score is
fitted on single answer tokens instead (each labelled with its response's consistency label), on the
training side of the in-domain suite (each question weighted as identify's default balance does, its
weight shared by its tokens), and a response is scored by pooling its answer tokens' logits (mean, max,
sum). Three per-token scores, each one dot product per token, as the guard computes:

  token_probe   L1 logistic over every neuron's CETT at the token; C chosen on the validation side
                within identify's budget (1% of the neurons)
  token_logit   logistic over the token's log-probability and the entropy of the distribution it was
                drawn from (no neurons: what those two inputs give alone)
  token_fused   L1 logistic over both: the neurons' CETT and the two logit inputs, the L1 penalty on
                the neurons only (fit_l1's `free` columns; C chosen on the validation side, the neurons
                within the same budget); `token_fused_neurons` is its H-Neuron part alone (the same
                weights with the two logit inputs' set to zero)

Reported on the in-domain test side and on the held-out phrasing suites' test-side facts, beside the
answer-span maximum sequence probability (lm-polygraph's, as `hguard eval` reports it) of the same
responses, with the eval's controls (controls.py): AUROC within equal exposure and the forced answers
(known facts: the true value against a plausible wrong one, teacher-forced). Nothing is sampled: the
answers are read from an `hguard eval --work` directory (the eval's sampling settings and split).

    python benchmarks/token_pooling.py --organism runs/organism-v7 --work runs/v7-identify --json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hguard.batching import left_pad, pad_id
from hguard.hooks import HookSpec, hooked
from hguard.identify.collected import featurise
from hguard.identify.controls import forced_report, forced_sets, strata_report
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
POOLS = {"mean": np.mean, "max": np.max, "sum": np.sum}
ROUNDS = 200  # bootstrap rounds of the strata and forced intervals


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


def with_tokens(model, tokenizer, data, records: list[dict]):
    """`data` (featurise's, of `records`) with `tokens_x`: per row, [answer tokens, neurons + 2], every
    neuron's CETT then the token's log-probability and entropy."""
    examples, _ = examples_for(tokenizer, records)
    assert [e.key for e in examples] == data.keys
    cetts = answer_token_features(model, tokenizer, examples)
    data.tokens_x = [np.concatenate([c, np.stack([ll[a], en[a]], 1)], 1).astype(np.float32)
                     for c, ll, en, a in zip(cetts, data.log_likelihoods, data.entropies, data.answer_tokens)]
    return data


def suite(model, tokenizer, directory: Path, work: Path, name: str):
    items = read_suite(directory / "suites", name)
    if name != "in_domain":
        items = [item for item in items if fact_side(item) == "test"]
    items, answers = cached_answers(work / ("answers.jsonl" if name == "in_domain" else f"{name}.answers.jsonl"), items)
    kept, _ = consistency_labels(items, answers)
    data = with_tokens(model, tokenizer, featurise(model, tokenizer, kept, fact_side, desc=f"{name} features"), kept)
    held = data.where(data.side == "test")
    data.forced = {key: with_tokens(model, tokenizer, featurise(model, tokenizer, records, desc=f"{name} {key}"), records)
                   for key, records in forced_sets(held.records).items() if records}
    return data


def side(data, mask: np.ndarray):
    """`data`'s rows in `mask`, their token features with them."""
    kept = data.where(mask)
    kept.tokens_x = [t for t, keep in zip(data.tokens_x, mask) if keep]
    return kept


def rows_of(data, mask: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(token features, labels, per-token weights) of the rows in `mask`, ready for a per-token fit."""
    tokens = [t for t, keep in zip(data.tokens_x, mask) if keep]
    labels = data.labels[mask]
    # each question weighs the same whatever its answer's length, each class half (identify's "weight")
    per_question = question_weights(labels, "weight")
    return tokens, labels, np.concatenate([[w / len(t)] * len(t) for w, t in zip(per_question, tokens)])


class TokenScore:
    """One per-token linear score over the columns `columns` of the token features (the last two are the
    logit inputs), pooled per response."""

    def __init__(self, fitted, columns: np.ndarray, width: int, pool: str = "mean"):
        self.weight, self.bias, self.columns, self.pool = fitted.weight, fitted.bias, columns, POOLS[pool]
        self.logit_inputs = columns >= width - 2
        self.neurons = int((self.weight[~self.logit_inputs] != 0).sum())

    def pooled(self, pool: str) -> "TokenScore":
        return self._with(pool=POOLS[pool])

    def neurons_only(self) -> "TokenScore":
        """The same score with its logit inputs' weights set to zero: the H-Neuron part alone."""
        return self._with(weight=np.where(self.logit_inputs, 0.0, self.weight))

    def _with(self, **changes) -> "TokenScore":
        other = copy.copy(self)
        other.__dict__.update(changes)
        return other

    def __call__(self, data) -> np.ndarray:
        return np.array([self.pool(t[:, self.columns] @ self.weight + self.bias) for t in data.tokens_x])


def choose(data, columns: np.ndarray, budget: int, Cs=CS) -> tuple[TokenScore, list[dict]]:
    """Fit on the train side for each C, keep those within the neuron budget, pick the best on val (mean pool)."""
    tokens, labels, weights = rows_of(data, data.side == "train")
    x = np.concatenate([t[:, columns] for t in tokens])
    y = np.concatenate([[label] * len(t) for label, t in zip(labels, tokens)])
    val = side(data, data.side == "val")
    sweep = []
    for C in Cs:
        width = data.tokens_x[0].shape[1]
        score = TokenScore(fit_l1(x, y, C, weights=weights, free=columns >= width - 2), columns, width)
        sweep.append({"C": C, "neurons": score.neurons, "val_auroc": round(auroc(val.labels, score(val)), 4), "score": score})
    within = [row for row in sweep if row["neurons"] <= budget and np.any(row["score"].weight != 0)]
    if not within:
        raise SystemExit(f"no C in {Cs} keeps at most {budget} neurons: {sweep}")
    best = max(within, key=lambda row: row["val_auroc"])
    return best["score"], [{k: v for k, v in row.items() if k != "score"} for row in sweep]


def report_suite(data, methods: dict) -> dict:
    held = side(data, data.side == "test")
    held.forced = data.forced
    scores = {m: [s(held)] for m, s in methods.items()}
    entry = {"n": len(held.keys), "hallucinated": int(held.labels.sum()),
             "auroc": {m: round(auroc(held.labels, v[0]), 4) for m, v in scores.items()}}
    strata = strata_report(held, scores, ROUNDS, 0)
    entry["equal_exposure"] = {m: strata["equal_exposure"].get(m, {}).get("auroc") for m in methods}
    entry["equal_exposure_pairs"] = strata["equal_exposure"].get("pairs")
    forced = forced_report(held, {m: [s] for m, s in methods.items()}, ROUNDS, 0)
    entry["forced_known_wrong_higher"] = {m: forced.get("known", {}).get(m, {}).get("wrong_higher") for m in methods}
    entry["forced_known_pairs"] = forced.get("known", {}).get("pairs")
    return entry


def organism_suites(doc: str, argv: list[str] | None) -> tuple[argparse.Namespace, dict, float]:
    """The command line this script and answer_span_ceiling.py share (--organism, --work, --json), and
    every suite's data with its token features (`suite`); with the time it began."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--organism", type=Path, required=True, help="an organism build's directory")
    parser.add_argument("--work", type=Path, required=True, help="an `hguard eval --work` directory")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    began = time.perf_counter()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.organism / "instruct", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.organism / "instruct")
    return args, {name: suite(model, tokenizer, args.organism, args.work, name) for name in SUITES}, began


def main(argv: list[str] | None = None) -> int:
    args, suites, began = organism_suites(__doc__, argv)
    home = suites["in_domain"]
    width = home.tokens_x[0].shape[1]
    neurons, logit = np.arange(width - 2), np.arange(width - 2, width)
    budget = int(0.01 * (width - 2))
    probe, probe_sweep = choose(home, neurons, budget)
    logit_only, _ = choose(home, logit, budget, Cs=(1.0,))
    fused, fused_sweep = choose(home, np.arange(width), budget)
    methods = {"token_probe": probe, "token_probe_max": probe.pooled("max"), "token_logit": logit_only,
               "token_logit_sum": logit_only.pooled("sum"), "token_fused": fused, "token_fused_max": fused.pooled("max"),
               "token_fused_sum": fused.pooled("sum"),
               "token_fused_neurons": fused.neurons_only(),
               "max_sequence_probability_answer": logit_scorers(span=True)["max_sequence_probability_answer"]}
    report = {"command": "python benchmarks/token_pooling.py " + " ".join(argv or sys.argv[1:]), "budget": budget,
              "probe_sweep": probe_sweep, "fused_sweep": fused_sweep, "probe_neurons": probe.neurons,
              "fused_neurons": fused.neurons, "fused_logit_weights": [round(float(w), 4) for w in fused.weight[-2:]],
              "logit_weights": [round(float(w), 4) for w in logit_only.weight],
              "suites": {name: report_suite(data, methods) for name, data in suites.items()}}
    val = side(home, home.side == "val")
    report["val_auroc"] = {m: round(auroc(val.labels, s(val)), 4) for m, s in methods.items()}  # pools chosen here
    report["seconds"] = round(time.perf_counter() - began)
    print(json.dumps(report, indent=1) if args.json else report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
