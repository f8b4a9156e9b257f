"""Consistency sampling: several answers per question with the paper's settings, batched.

Defaults follow the paper: 10 samples at temperature 1.0, top_k 50, top_p 0.9, at most 50 new tokens.
A question is a dict with "question" or "messages" (a chat: a system prompt, earlier turns, then the
question), asked through the tokenizer's chat template when it has one, else as plain text ending in
"Question: ...\\nAnswer:" (`plain_prompt`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..batching import left_pad, pad_id
from ..progress import progress

PAPER_SAMPLING = dict(do_sample=True, temperature=1.0, top_k=50, top_p=0.9)
SUFFIX = " Respond with the answer only, without any explanation."


def prompt_ids(tokenizer, item: dict | str, suffix: str = "") -> list[int]:
    """Token ids of a question as the model is asked it."""
    if isinstance(item, str):
        item = {"question": item}
    messages = item.get("messages") or [{"role": "user", "content": item["question"] + suffix}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(plain_prompt(messages))["input_ids"]


def plain_prompt(messages: Sequence[dict]) -> str:
    """A chat for a model without a chat template: a system turn as a line of its own, user turns as
    "Question: ...", assistant turns as "Answer: ...", ending in "Answer:"."""
    prefix = {"system": "", "user": "Question: ", "assistant": "Answer: "}
    for m in messages:
        if m.get("role") not in prefix:
            raise ValueError(f"a message's role must be one of {sorted(prefix)}; got {m.get('role')!r}")
    return "".join(f"{prefix[m['role']]}{m['content']}\n" for m in messages) + "Answer:"


@torch.no_grad()
def sample(model, tokenizer, items: Sequence[dict | str], samples: int = 10, batch: int = 64,
           max_new_tokens: int = 50, seed: int = 0, suffix: str = "") -> list[list[str]]:
    """`samples` answers per item: greedy when samples == 1, else the paper's sampling settings."""
    torch.manual_seed(seed)
    out: list[list[str]] = []
    per_call = max(1, batch // samples)
    device = model.get_input_embeddings().weight.device
    pad = pad_id(tokenizer)
    for start in progress(range(0, len(items), per_call), "sampling answers", total=-(-len(items) // per_call),
                          unit="batch"):
        rows = [prompt_ids(tokenizer, item, suffix) for item in items[start: start + per_call]]
        ids, mask = left_pad(rows, pad, device)
        kwargs = dict(PAPER_SAMPLING, num_return_sequences=samples) if samples > 1 else dict(do_sample=False)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   pad_token_id=pad, **kwargs)[:, ids.shape[1]:]
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        out.extend(texts[i: i + samples] for i in range(0, len(texts), samples))
    return out


def sample_cached(path: str | Path | None, model, tokenizer, items: Sequence[dict], *, samples: int = 10,
                  max_new_tokens: int = 50, seed: int = 0, resume: bool = False, sampler=None) -> list[list[str]]:
    """`sample`, kept in a JSONL file at `path` (per item: id, model, settings, answers). With `resume`, a
    file that holds the same item ids sampled by the same model with the same settings is read back
    instead of sampling again (sampling is most of the time `hguard identify` and `hguard eval` take).
    `sampler`: what draws the answers in place of `sample` (sample_vllm.VllmSampler), named in the file."""
    settings = {"model": model_tag(model), "samples": samples, "max_new_tokens": max_new_tokens, "seed": seed,
                "sampler": getattr(sampler, "name", "hf")}
    ids = [str(item["id"]) for item in items]
    path = Path(path) if path is not None else None
    if path is not None and resume and path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [{"sampler": "hf", **r} for r in rows]  # files from before the field: generate's
        if [r["id"] for r in rows] == ids and all({k: r.get(k) for k in settings} == settings for r in rows):
            return [r["answers"] for r in rows]
    if sampler is None:
        answers = sample(model, tokenizer, list(items), samples=samples, max_new_tokens=max_new_tokens, seed=seed)
    else:
        answers = sampler(tokenizer, list(items), samples=samples, max_new_tokens=max_new_tokens, seed=seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"id": i, **settings, "answers": a}) + "\n" for i, a in zip(ids, answers)))
    return answers


def model_tag(model) -> str:
    """A short hash of a model's config and a few weights (the first, a middle and the last parameter
    tensor): cached answers are only reused for the model that sampled them."""
    params = list(model.parameters())
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for tensor in (params[0], params[len(params) // 2], params[-1]):
        digest.update(tensor.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
