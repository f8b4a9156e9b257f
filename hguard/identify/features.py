"""CETT features of every neuron of every layer, from one teacher-forced pass per response.

CETT_{j,t} = |z_{j,t}| * ||W_down[:, j]|| / ||h_t||, z the down projection's input, h its output. For
each response the features are averaged over its answer tokens and, separately, over its other
response tokens, giving two [layers * intermediate] vectors. Hooks reduce each layer to those two
means as the layer runs, so no [tokens, neurons] tensor outlives its layer. Results are written to
disk in safetensors chunks, so datasets larger than memory work; `read_chunks` streams them back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..batching import left_pad
from ..hooks import HookSpec, hooked
from ..probe import cett
from ..sites import resolve
from ..token_inputs import log_probability_and_entropy


@dataclass(frozen=True)
class Example:
    """One response to featurise: prompt and response token ids, and which response tokens are the answer."""

    key: str
    prompt_ids: list[int]
    response_ids: list[int]
    answer_tokens: list[int]  # indices into response_ids


POOLS = ("answer", "other", "last_prompt")


@torch.no_grad()
def cett_pools(model: nn.Module, examples: Sequence[Example], pad_id: int,
               pools: Sequence[str] = ("answer", "other"), tokens: bool = False) -> tuple[torch.Tensor, ...]:
    """Per pool, [len(examples), layers * intermediate] mean CETT over its tokens, from one forward pass:
    `answer` and `other` the answer and the other response tokens, `last_prompt` the last prompt token
    (whose activations predict the response's first token: what the probe reads before any answer).
    With `tokens`, two more columns: the mean over the same tokens of each token's log-probability and of
    the entropy of the distribution it was drawn from (a probe's token inputs, token_inputs.py)."""
    unknown = [p for p in pools if p not in POOLS]
    if unknown:
        raise ValueError(f"pools must be among {POOLS}; got {unknown}")
    sites = resolve(model)
    rows = [e.prompt_ids + e.response_ids for e in examples]
    device = model.get_input_embeddings().weight.device
    ids, mask = left_pad(rows, pad_id, device)
    width = ids.shape[1]
    weights = torch.zeros(len(pools), len(rows), width, device=device)  # [pools, b, T], rows sum to 1
    for i, example in enumerate(examples):
        start = width - len(example.response_ids)
        answer = set(example.answer_tokens)
        for p, pool in enumerate(pools):
            if pool == "last_prompt":
                weights[p, i, start - 1] = 1.0
                continue
            for t in range(len(example.response_ids)):
                if (t in answer) == (pool == "answer"):
                    weights[p, i, start + t] = 1.0
    weights /= weights.sum(2, keepdim=True).clamp_min(1.0)
    out = torch.zeros(len(pools), len(rows), sites.num_layers, sites.intermediate_size)
    norms = [sites.all_column_norms(l) for l in range(sites.num_layers)]

    def hook(layer: int):
        def post(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            z = args[0]
            features = cett(z, output, norms[layer].to(z.device))
            out[:, :, layer] = torch.einsum("pbt,bti->pbi", weights.to(z.device), features).cpu()

        return post

    specs = [HookSpec(sites.down(l), post=hook(l)) for l in range(sites.num_layers)]
    with hooked(specs):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    if not tokens:
        return tuple(out.flatten(2))
    inputs = torch.zeros(len(rows), width, 2, device=device)  # [b, T, (log p, entropy)]; position 0: none
    for i in range(len(rows)):  # one row's [T, V] at a time
        inputs[i, 1:] = torch.stack(log_probability_and_entropy(logits[i, :-1], ids[i, 1:]), -1)
    pooled = torch.einsum("pbt,btc->pbc", weights, inputs).cpu()
    return tuple(torch.cat([out.flatten(2), pooled], dim=2))


def cett_means(model: nn.Module, examples: Sequence[Example], pad_id: int,
               tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer, other): [len(examples), layers * intermediate (+ 2 with `tokens`)] mean CETT over answer /
    other response tokens (`cett_pools`)."""
    return cett_pools(model, examples, pad_id, ("answer", "other"), tokens)


def extract(model: nn.Module, examples: Sequence[Example], pad_id: int, out: str | Path, batch: int = 16,
            chunk: int = 1024, progress: bool = True, tokens: bool = False) -> list[Path]:
    """Featurise `examples` in batches, writing chunks of at most `chunk` rows to `out` (`tokens`: with the
    token inputs' two columns last, `cett_pools`)."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    answers: list[torch.Tensor] = []
    others: list[torch.Tensor] = []
    keys: list[str] = []

    def flush() -> None:
        if not keys:
            return
        path = out / f"features-{len(paths):05d}.safetensors"
        save_file({"answer": torch.cat(answers).contiguous(), "other": torch.cat(others).contiguous()}, str(path),
                  metadata={"keys": json.dumps(keys)})
        paths.append(path)
        answers.clear(), others.clear(), keys.clear()

    bar = tqdm(total=len(examples), desc="features", disable=not progress, unit="resp")
    for start in range(0, len(examples), batch):
        part = examples[start: start + batch]
        answer, other = cett_means(model, part, pad_id, tokens)
        answers.append(answer), others.append(other), keys.extend(e.key for e in part)
        bar.update(len(part))
        if len(keys) >= chunk:
            flush()
    flush()
    bar.close()
    return paths


def read_chunks(paths: Sequence[Path]) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """(keys, answer, other) per chunk file."""
    from safetensors import safe_open

    for path in paths:
        with safe_open(str(path), framework="pt") as handle:
            keys = json.loads(handle.metadata()["keys"])
        tensors = load_file(str(path))
        yield keys, tensors["answer"], tensors["other"]
