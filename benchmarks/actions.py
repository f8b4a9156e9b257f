"""What each guard action buys, end to end through `Guard.generate`, on held-out organism questions.

Questions: the in-domain suite's held-out side (facts never fitted on), every tier. Truth per answer:
wrong = hallucination, right = faithful; the model's own refusals are neither, and rates over
"answers" leave them out (the probe never saw a refusal in training and scores them high).
  flag     precision and recall of the guard's flags against hallucinations
  abstain  at the probe's watch threshold (fitted to the running mean's peak; and, for comparison, at
           the flag threshold, what abstain used before): the hallucination rate among answers given, the share
           of the unguarded model's correct answers withheld, and the risk-coverage curve of the
           probe's response probability (risk = hallucinations among the answers kept when the least
           confident are withheld) with its area (AURC), against withholding by each logit score of
           lm-polygraph (maximum sequence probability, mean token entropy, perplexity) at the same
           coverage
  dampen   hallucination rate on the long tail (seen at most twice, or never) and accuracy on known
           people (the head), against the guard off
Rates come with 95% Wilson intervals.

    python benchmarks/actions.py --json           # writes results/actions.{json,png}
"""

from __future__ import annotations

import numpy as np
from organism_common import Guard, arguments, ask, emit, organism, pyplot, rate, suite, verdicts

from hguard.identify.evaluate import fact_side, response_stats
from hguard.identify.features import Example
from hguard.identify.logit_scores import logit_scores
from hguard.identify.sample import prompt_ids


def risk_coverage(scores: np.ndarray, wrong: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage k/n and risk (mean of `wrong` over the k lowest scores), k = 1..n."""
    order = np.argsort(scores, kind="stable")
    risk = np.cumsum(wrong[order]) / np.arange(1, wrong.size + 1)
    return np.arange(1, wrong.size + 1) / wrong.size, risk


def risk_at(coverage: np.ndarray, risk: np.ndarray, target: float) -> float:
    return float(risk[min(len(risk) - 1, max(0, int(np.ceil(target * len(risk))) - 1))])


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__, limit=800).parse_args(argv)
    model, tokenizer, probe, directory, _ = organism(args.tiny, probe=args.probe)
    items = suite(directory, "in_domain", args.limit, args.seed, lambda i: fact_side(i, args.seed) == "test")
    guard = Guard(model, tokenizer, probe)
    threshold = probe.threshold

    flagged = ask(guard, items, args.batch, action="flag", threshold=threshold)
    truth = verdicts(items, [r.text for r in flagged])
    wrong = np.array([v == "wrong" for v in truth])
    refused = np.array([v == "refusal" for v in truth])  # the model's own "I don't know"
    flags = np.array([r.verdict == "flagged" for r in flagged])
    flag = {"threshold": threshold, "precision": rate(wrong[flags & ~refused].tolist()),
            "recall": rate(flags[wrong].tolist()), "flag_rate_answers": rate(flags[~refused].tolist()),
            "refusals": int(refused.sum()), "refusals_flagged": rate(flags[refused].tolist()),
            "hallucination_rate_unguarded": rate(wrong[~refused].tolist())}

    correct = np.array([v == "correct" for v in truth])

    def abstain_at(threshold: float | None) -> tuple[dict, np.ndarray]:
        """Abstain with the probe's own thresholds (None) or one threshold for everything."""
        abstained = ask(guard, items, args.batch, action="abstain", threshold=threshold)
        withheld = np.array([r.finish_reason == "abstain" for r in abstained])
        given = [k for k, w in enumerate(withheld) if not w]
        kept_truth = verdicts([items[k] for k in given], [abstained[k].text for k in given])
        policy = guard.policy("abstain", threshold)
        return {"threshold": policy.threshold, "watch_threshold": policy.trigger,
                "withheld": rate(withheld.tolist()),
                "withheld_among_refusals": rate(withheld[refused].tolist()),
                "coverage_of_answers": rate((~withheld[~refused]).tolist()),
                "hallucination_rate_answered": rate([v == "wrong" for v in kept_truth if v != "refusal"]),
                "correct_lost": rate(withheld[correct].tolist()),
                "hallucinations_withheld": rate(withheld[wrong].tolist())}, withheld

    abstain, withheld = abstain_at(None)  # the default: the running mean against the watch threshold
    abstain_flag_threshold, _ = abstain_at(threshold)  # before watch thresholds: the flag threshold for both

    # risk-coverage over the unguarded answers that are not refusals
    answered = [k for k, v in enumerate(truth) if v != "refusal"]
    probs = np.array([flagged[k].probability for k in answered], dtype=float)
    risk_wrong = wrong[answered].astype(float)
    examples = []
    for k in answered:
        ids = flagged[k].token_ids or [tokenizer.eos_token_id]
        examples.append(Example(str(k), prompt_ids(tokenizer, items[k]), ids, list(range(len(ids)))))
    lls, ents = [], []
    for start in range(0, len(examples), 32):
        _, ll, en = response_stats(model, examples[start: start + 32], tokenizer.pad_token_id)
        lls += ll
        ents += en
    curves = {"h_neuron_probe": probs, **logit_scores(lls, ents)}
    coverage_guard = float((~withheld[~refused]).mean())
    rc = {}
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for name, score in curves.items():
        coverage, risk = risk_coverage(score, risk_wrong)
        rc[name] = {"aurc": round(float(risk.mean()), 4), "risk_at_guard_coverage": round(risk_at(coverage, risk, coverage_guard), 4)}
        axis.plot(coverage, risk, label=f"{name} (AURC {rc[name]['aurc']:.3f})")
    axis.axvline(coverage_guard, color="grey", lw=0.8, ls="--")
    axis.set_xlabel("coverage (share of answers kept)")
    axis.set_ylabel("risk (hallucinations among kept)")
    axis.legend(fontsize=7)
    best_logit = min((n for n in rc if n != "h_neuron_probe"), key=lambda n: rc[n]["aurc"])
    abstain["risk_coverage"] = {"answers": len(answered), "guard_coverage": round(coverage_guard, 4),
                                "curves": rc, "best_logit_score": best_logit}

    tail = [k for k, i in enumerate(items) if i["tier"] in ("tail", "unseen")]
    head = [k for k, i in enumerate(items) if i["tier"] == "head"]
    dampen = {}
    for name, kwargs in (("off", {"action": None}), ("dampen", {"action": "dampen"})):
        texts = [r.text for r in ask(guard, items, args.batch, **kwargs)]
        v = verdicts(items, texts)
        dampen[name] = {"hallucination_tail": rate([v[k] == "wrong" for k in tail]),
                        "accuracy_known": rate([v[k] == "correct" for k in head])}
    dampen["alpha"] = guard.policy("dampen", threshold, None).alpha
    emit("actions", {"questions": len(items), "neurons": probe.count, "flag": flag, "abstain": abstain,
                     "abstain_at_flag_threshold": abstain_flag_threshold, "dampen": dampen, "tiny": args.tiny},
         args, figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
