"""A probe's token inputs (issue 20): the token's own log-probability and the entropy of the distribution
it was drawn from, read from the model's own logits at the position before it.

A probe with `token_weight` (u) adds u_0 * log p(x_t) + u_1 * H(p_(t-1)) to token t's logit, p_(t-1)
being the model's next-token distribution at position t - 1: the softmax of the logits the model
returns (after any final soft-capping), before any sampling processor, in fp32. Natural logs.

`TokenTerm` follows the forwards of one batch. The input embeddings' pre-hook sees each forward's token
ids; the model's own forward hook sees its logits. The term of a forward's first position comes from the
previous forward's last logits (`last`), so a decoding step knows its token's term before its layers
run, and abstain and dampen can act on it within the step; the terms of the later positions of a
multi-position forward (a prompt, teacher forcing, a proxied piece) come from the same forward's logits,
once they exist (passed to `on_full`). A row's very first position has no distribution before it: term 0 (a prompt's
first token, never scored). Generation computes the logits of the last position only, so a prompt's
other positions get 0 as well, and a forward that stops after the last hooked layer (the final token's)
needs none.
"""

from __future__ import annotations

import torch
from torch import nn

from .hooks import HookSpec


def distribution(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits) [..., V] and its entropy (nats) [...], in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp, -(logp.exp() * logp).sum(-1)


def log_probability_and_entropy(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(ids) and the entropy (nats) of softmax(logits), per position: logits [..., V], ids [...] -> two
    [...] fp32 tensors."""
    logp, entropy = distribution(logits)
    return logp.gather(-1, ids.unsqueeze(-1).to(logp.device)).squeeze(-1), entropy


def weighted(weight: torch.Tensor, log_p: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """The token inputs' term: weight [2] . (log p(token), entropy)."""
    return weight[0] * log_p + weight[1] * entropy


class TokenTerm:
    """u_0 * log p(token) + u_1 * entropy for the tokens of one batch's forwards (module docstring)."""

    def __init__(self, weight: torch.Tensor, model: nn.Module, on_full=None) -> None:
        self.weight = weight.float()  # [2]
        self.model = model
        self.on_full = on_full  # teacher forcing: called with each forward's [batch, positions] terms
        self.logits: torch.Tensor | None = None  # the last forward's logits, as the model returned them
        self.ids: torch.Tensor | None = None  # [batch, positions] this forward's token ids
        self.last: torch.Tensor | None = None  # [batch, V] the previous forward's last logits (fp32)

    def specs(self) -> list[HookSpec]:
        return [HookSpec(self.model.get_input_embeddings(), pre=self._see_ids),
                HookSpec(self.model, post=self._see_logits)]

    def _see_ids(self, module: nn.Module, args: tuple) -> None:
        self.ids = args[0]

    def _see_logits(self, module: nn.Module, args: tuple, output) -> None:
        logits = getattr(output, "logits", None)
        ids, self.ids = self.ids, None  # each forward's ids are its own (a forward fed embeddings has none)
        if logits is None:
            return
        if ids is not None and self.on_full is not None:  # decoding needs `last` only (`step`)
            self.on_full(self._terms(ids, logits))
        self.logits, self.last = logits, logits[:, -1].float()

    def _terms(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """[batch, positions] the terms of a forward's tokens `ids`, given its logits."""
        positions = ids.shape[1]
        terms = torch.zeros(ids.shape, dtype=torch.float32, device=logits.device)
        if self.last is not None:
            terms[:, 0] = self.of(self.last, ids[:, 0])
        # logits at position j predict the token at j + 1; only the last `kept` positions' logits exist
        kept = min(logits.shape[1], positions)
        if kept > 1:
            for row in range(logits.shape[0]):  # one row's [positions, V] at a time
                terms[row, positions - kept + 1:] = self.of(logits[row, -kept:-1], ids[row, positions - kept + 1:])
        return terms

    def of(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The term of tokens `ids` drawn from `logits` ([..., V], [...] -> [...] fp32)."""
        if self.weight.device != logits.device:  # once: the weights move to where the logits are
            self.weight = self.weight.to(logits.device)
        return weighted(self.weight, *log_probability_and_entropy(logits, ids))

    def step(self) -> torch.Tensor:
        """[batch] the term of this forward's last token, from the previous forward's logits: a decoding
        step's (whose single position follows the last one's), or a whole sequence's run again without a
        cache (generation kept the logits before its last token)."""
        if self.last is None or self.ids is None:
            raise RuntimeError("a probe's token inputs need this forward's token ids and the logits of the "
                               "forward before (a forward fed embeddings instead of ids has no token to score)")
        return self.of(self.last, self.ids[:, -1])
