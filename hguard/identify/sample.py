"""Consistency sampling: several answers per question with the paper's settings, batched.

Defaults follow the paper: 10 samples at temperature 1.0, top_k 50, top_p 0.9, at most 50 new tokens.
A question is a dict with "question" (asked through the tokenizer's chat template when it has one,
else as "Question: ...\\nAnswer:") or "messages" (a chat, used as is).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..guard import left_pad, pad_id

PAPER_SAMPLING = dict(do_sample=True, temperature=1.0, top_k=50, top_p=0.9)
SUFFIX = " Respond with the answer only, without any explanation."


def prompt_ids(tokenizer, item: dict | str, suffix: str = "") -> list[int]:
    """Token ids of a question as the model is asked it."""
    if isinstance(item, str):
        item = {"question": item}
    if getattr(tokenizer, "chat_template", None):
        messages = item.get("messages") or [{"role": "user", "content": item["question"] + suffix}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(f"Question: {item['question']}{suffix}\nAnswer:")["input_ids"]


@torch.no_grad()
def sample(model, tokenizer, items: Sequence[dict | str], samples: int = 10, batch: int = 64,
           max_new_tokens: int = 50, seed: int = 0, suffix: str = "") -> list[list[str]]:
    """`samples` answers per item: greedy when samples == 1, else the paper's sampling settings."""
    torch.manual_seed(seed)
    out: list[list[str]] = []
    per_call = max(1, batch // samples)
    device = model.get_input_embeddings().weight.device
    pad = pad_id(tokenizer)
    for start in range(0, len(items), per_call):
        rows = [prompt_ids(tokenizer, item, suffix) for item in items[start: start + per_call]]
        ids, mask = left_pad(rows, pad, device)
        kwargs = dict(PAPER_SAMPLING, num_return_sequences=samples) if samples > 1 else dict(do_sample=False)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   pad_token_id=pad, **kwargs)[:, ids.shape[1]:]
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        out.extend(texts[i: i + samples] for i in range(0, len(texts), samples))
    return out
