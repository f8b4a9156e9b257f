"""Log-probabilities of generated tokens under the model's raw distribution, recorded step by step.

A forward hook on the causal LM keeps the last position's log-softmax of each decoding step (the raw
logits, before any sampling warper or processor, as vLLM's default and transformers' `output_logits`)
only until that step's token is known; a stopping criterion, which transformers calls with every new
token, then keeps the token's own log-probability and the step's `top` best alternatives. What is
held per step is [batch, top + 1] numbers, never [batch, vocab], so streaming can emit each step's
entries at once and a long generation does not hoard logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import StoppingCriteria

# per token: (log-probability of the token, [(token id, log-probability)] of the `top` likeliest tokens)
Entry = tuple[float, list[tuple[int, float]]]

MAX_TOP = 20


def check_top(top) -> int | None:
    """`top` validated: None (no logprobs) or an integer in [0, MAX_TOP]."""
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP):
        raise ValueError(f"logprobs must be None or an integer in [0, {MAX_TOP}]; got {top!r}")
    return top


class LogprobRecorder(StoppingCriteria):
    """Hook the model with `attached()` and pass the recorder among the stopping criteria (it never
    stops a row); `step(s)` and `rows()` give host-side entries."""

    def __init__(self, model: nn.Module, top: int) -> None:
        self.model, self.top = model, check_top(top)
        self._pending: torch.Tensor | None = None  # [batch, vocab]: the step whose token is not known yet
        self._chosen: list[torch.Tensor] = []  # per step, [batch]
        self._alternatives: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step, ([batch, top], ids)

    @contextmanager
    def attached(self) -> Iterator["LogprobRecorder"]:
        handle = self.model.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()

    def _hook(self, module: nn.Module, args: tuple, output) -> None:
        logits = output.logits if hasattr(output, "logits") else output[0]
        self._pending = torch.log_softmax(logits[:, -1].float(), dim=-1)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self._pending is None:  # a token without its own forward: the entries would shift
            raise RuntimeError("logprobs need one forward per generated token (assisted decoding is not supported)")
        logp, self._pending = self._pending, None
        self._chosen.append(logp.gather(1, input_ids[:, -1:].to(logp.device))[:, 0])
        if self.top:
            values, ids = logp.topk(self.top, dim=-1)
        else:  # fresh empty tensors: a slice of logp would keep the whole [batch, vocab] alive
            values, ids = logp.new_empty(logp.shape[0], 0), torch.empty(logp.shape[0], 0, dtype=torch.long)
        self._alternatives.append((values, ids))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    @property
    def steps(self) -> int:
        return len(self._chosen)

    def step(self, s: int) -> list[Entry]:
        """Every row's entry for step `s` (one small device-to-host copy)."""
        values, ids = self._alternatives[s]
        packed = torch.cat([self._chosen[s][:, None], values], dim=1).cpu().tolist()
        return [(row[0], list(zip(i, row[1:]))) for row, i in zip(packed, ids.cpu().tolist())]

    def rows(self) -> list[list[Entry]]:
        """Per row, the entries of every recorded step (one device-to-host copy)."""
        if not self._chosen:
            return []
        chosen = torch.stack(self._chosen, dim=1).cpu().tolist()  # [batch, steps]
        values = torch.stack([v for v, _ in self._alternatives], dim=1).cpu().tolist()  # [batch, steps, top]
        ids = torch.stack([i.to(self._chosen[0].device) for _, i in self._alternatives], dim=1).cpu().tolist()
        return [[(c, list(zip(i, v))) for c, i, v in zip(row_c, row_i, row_v)]
                for row_c, row_i, row_v in zip(chosen, ids, values)]
