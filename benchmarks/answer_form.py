"""Does the form of the answer change what the organism recalls? Greedy accuracy on well-known people.

Held-out in-domain questions about the head (people seen 16 to 40 times), per attribute, asked four
ways: the base model in the plain "Question: ...\\nAnswer:" format; the base and the instruct model
through the chat template; and the instruct model through the chat template with the first words of
an answer forced ("In" before a year, "Born in" before a city, "Worked for" before an employer, "A"
before an occupation), so that the value comes after a word, with the leading space it has in every
biography. This measurement is what changed the organism's instruction answers (v5).

    python benchmarks/answer_form.py --json                    # the shipped organism
    python benchmarks/answer_form.py --json --dir BUILD_DIR    # another build (base/ and instruct/)
"""

from __future__ import annotations

import argparse
import json

import torch

from hguard.batching import left_pad
from hguard.identify.label import judge
from hguard.identify.sample import prompt_ids
from hguard.organism import SHIPPED, load
from hguard.organism.suites import read_suite

PREFIX = {"year": "In", "city": "Born in", "employer": "Worked for", "occupation": "A"}


@torch.no_grad()
def correct(model, tokenizer, items: list[dict], form: str, batch: int = 64) -> list[bool]:
    """Per item: whether the greedy answer asked in `form` is right."""
    right = []
    for start in range(0, len(items), batch):
        chunk = items[start: start + batch]
        if form == "plain":
            rows = [tokenizer(f"Question: {i['question']}\nAnswer:", add_special_tokens=False)["input_ids"] for i in chunk]
            prefixes = [""] * len(chunk)
        else:
            prefixes = [PREFIX[i["attribute"]] if form == "chat_after_a_word" else "" for i in chunk]
            rows = [prompt_ids(tokenizer, i) + (tokenizer(p, add_special_tokens=False)["input_ids"] if p else [])
                    for i, p in zip(chunk, prefixes)]
        ids, mask = left_pad(rows, tokenizer.pad_token_id)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
        for item, prefix, text in zip(chunk, prefixes, tokenizer.batch_decode(out, skip_special_tokens=True)):
            right.append(judge(prefix + text.split("\n")[0], item["aliases"]) == "correct")
    return right


def rate(values: list[bool]) -> float:
    return round(sum(values) / max(1, len(values)), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="an organism build directory (default: the shipped one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    root = args.dir or SHIPPED
    items = [i for i in read_suite(f"{root}/suites", "in_domain") if i["tier"] == "head"]
    attributes = sorted({i["attribute"] for i in items})
    forms = {"base": ("plain", "chat"), "instruct": ("chat", "chat_after_a_word")}
    result = {"questions": len(items), "accuracy": {}}
    for stage, stage_forms in forms.items():
        model, tokenizer = load(stage, args.dir) if args.dir else load(stage)
        for form in stage_forms:
            right = correct(model, tokenizer, items, form)
            row = {a: rate([r for r, i in zip(right, items) if i["attribute"] == a]) for a in attributes}
            row["all"] = rate(right)
            result["accuracy"][f"{stage}, {form}"] = row
    print(json.dumps(result, indent=None if args.json else 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
