"""Do the H-Neurons come from pre-training? The paper's two origin analyses, on the organism.

1. Transfer: the probe fitted on the instruction-tuned model, unchanged, scores the base model's own
   answers. The base is prompted in its completion format ("Question: ...\\nAnswer:", greedy, cut at
   the first newline); an answer is hallucinated when wrong, faithful when right (refusals dropped);
   its score is the probe's classifier on the base's CETT averaged as for the probe's training target
   (every response token, or the answer tokens). AUROC per
   suite (95% bootstrap interval), beside the same probe on the instruct model's own answers.
2. Parameter drift: per neuron, 1 - cosine between base and instruct of its up_proj row and of its
   down_proj column, each z-scored over all neurons, averaged. Neurons are ranked from most to least
   drift and the rank normalised to [0, 1], so a high normalised rank means little drift. Reported:
   the H-Neurons' (positive weight) mean normalised rank, and a one-sided Mann-Whitney test of H-Neuron
   ranks above all other neurons' ranks.

    python benchmarks/origins.py --json           # writes results/origins.{json,png}
"""

from __future__ import annotations

import numpy as np
import torch
from organism_common import arguments, emit, organism, pyplot, suite

from hguard.identify.evaluate import bootstrap, fact_side, probe_logits, probe_target
from hguard.identify.fit import whole_response
from hguard.identify.features import Example, cett_means
from hguard.identify.label import answer_span, judge, token_span
from hguard.identify.sample import prompt_ids
from hguard.sites import resolve

SUITES = ("in_domain", "paraphrase", "other_attribute")


@torch.no_grad()
def answers(model, tokenizer, items, batch: int, base: bool) -> list[tuple[list[int], str]]:
    """(prompt ids, answer text) per item, greedy; the base in "Question/Answer" form, cut at a newline."""
    from hguard.batching import left_pad

    prompts = [tokenizer(f"Question: {i['question']}\nAnswer:", add_special_tokens=False)["input_ids"] if base
               else prompt_ids(tokenizer, i) for i in items]
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start: start + batch]
        ids, mask = left_pad(chunk, tokenizer.pad_token_id)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
        for prompt, text in zip(chunk, tokenizer.batch_decode(generated, skip_special_tokens=True)):
            out.append((prompt, text.split("\n")[0]))
    return out


def transfer(model, tokenizer, probe, items, batch: int, base: bool, seed: int) -> dict:
    rows, labels = [], []
    for item, (prompt, text) in zip(items, answers(model, tokenizer, items, batch, base)):
        verdict = judge(text, item["aliases"])
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        span = answer_span(text, [item["answer"], *item.get("candidates", [])])
        tokens = token_span(encoded["offset_mapping"], span) if span else []
        if verdict == "refusal" or not tokens:
            continue
        rows.append(Example(str(item["id"]), prompt, encoded["input_ids"], tokens))
        labels.append(int(verdict == "wrong"))
    labels = np.array(labels)
    if len(set(labels.tolist())) < 2:
        return {"answers": len(rows), "note": "one class only"}
    parts = [cett_means(model, rows[i: i + 32], tokenizer.pad_token_id) for i in range(0, len(rows), 32)]
    answer, other = (np.concatenate([p[k].numpy() for p in parts]) for k in (0, 1))
    if probe_target(probe) == "response":
        answer = whole_response(answer, other, np.array([len(r.answer_tokens) for r in rows]),
                                np.array([len(r.response_ids) - len(r.answer_tokens) for r in rows]))
    scores = probe_logits(probe, resolve(model).intermediate_size, answer)
    result = bootstrap(labels, [scores], [float(np.median(scores))], rounds=1000, seed=seed)
    return {"auroc": result["auroc"], "auroc_ci": result["auroc_ci"], "answers": len(rows),
            "hallucinated": int(labels.sum())}


@torch.no_grad()
def drift(base, instruct) -> np.ndarray:
    """Per neuron (flat layer * intermediate + index): the averaged z-scored drift of up row and down column."""
    sites_b, sites_i = resolve(base), resolve(instruct)
    up, down = [], []
    for layer in range(sites_b.num_layers):
        up_b, up_i = sites_b.up_weight(layer).float(), sites_i.up_weight(layer).float()
        up.append(1 - torch.nn.functional.cosine_similarity(up_b, up_i, dim=1))
        d_b, d_i = sites_b.down_weight(layer).float(), sites_i.down_weight(layer).float()
        down.append(1 - torch.nn.functional.cosine_similarity(d_b, d_i, dim=0))
    up_all, down_all = torch.cat(up).numpy(), torch.cat(down).numpy()

    def z(x):
        return (x - x.mean()) / (x.std() + 1e-12)

    return (z(up_all) + z(down_all)) / 2


def main(argv: list[str] | None = None) -> int:
    from scipy.stats import mannwhitneyu, rankdata

    args = arguments(__doc__, limit=600).parse_args(argv)
    instruct, tokenizer, probe, directory, root = organism(args.tiny, probe=args.probe)
    from hguard.organism import load

    base, _ = load("base", root)
    sets = {name: suite(directory, name, args.limit, args.seed, lambda i: fact_side(i, args.seed) == "test")
            for name in SUITES}
    result = {"transfer": {}, "questions": {k: len(v) for k, v in sets.items()}}
    for name, items in sets.items():
        result["transfer"][name] = {
            "base": transfer(base, tokenizer, probe, items, args.batch, base=True, seed=args.seed),
            "instruct": transfer(instruct, tokenizer, probe, items, args.batch, base=False, seed=args.seed),
        }
    scores = drift(base, instruct)
    # rank 0 = most drift; normalised rank 1 = least drift
    normalised = (rankdata(-scores) - 1) / (scores.size - 1)
    flat = (probe.layer * resolve(instruct).intermediate_size + probe.neuron).numpy()
    h = flat[probe.weight.numpy() > 0]
    others = np.setdiff1d(np.arange(scores.size), h)
    test = mannwhitneyu(normalised[h], normalised[others], alternative="greater") if h.size else None
    result["drift"] = {
        "h_neurons": int(h.size), "neurons": int(scores.size),
        "mean_normalised_rank_h": round(float(normalised[h].mean()), 4) if h.size else None,
        "mean_normalised_rank_all": round(float(normalised.mean()), 4),
        "p_value_one_sided": float(test.pvalue) if test else None,
        "meaning": "normalised rank 1 = least drift between base and instruct; > 0.5 = H-Neurons drift less",
    }
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    names = list(sets)
    for k, model_name in enumerate(("base", "instruct")):
        values = [result["transfer"][n][model_name].get("auroc", np.nan) for n in names]
        axes[0].bar(np.arange(len(names)) + 0.38 * k, values, width=0.38, label=f"{model_name} answers")
    axes[0].axhline(0.5, color="grey", lw=0.8)
    axes[0].set_xticks(np.arange(len(names)) + 0.19, names)
    axes[0].set_ylabel("AUROC of the instruct probe")
    axes[0].legend(fontsize=8)
    axes[1].hist(normalised[others], bins=30, alpha=0.6, density=True, label="other neurons")
    if h.size:
        axes[1].hist(normalised[h], bins=15, alpha=0.6, density=True, label="H-Neurons")
    axes[1].set_xlabel("normalised drift rank (1 = least drift)")
    axes[1].legend(fontsize=8)
    emit("origins", {**result, "tiny": args.tiny}, args, figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
