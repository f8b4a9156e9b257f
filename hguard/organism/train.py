"""Training the organism: a small Llama pre-trained on the world's text, then instruction-tuned.

Pre-training packs documents (separated by the end-of-text token) into fixed-length rows and trains
on every token. Instruction tuning packs chat examples the same way but trains only on the
assistant's tokens. Both use AdamW with warmup and cosine decay, log to a callback, and are
deterministic for a seed on a given machine (a GPU runs the same schedule, to other rounding).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..progress import progress
from .checkpoint import load_checkpoint, save_checkpoint

IGNORE = -100


@dataclass
class ModelShape:
    hidden: int = 256
    layers: int = 6
    heads: int = 8
    intermediate: int = 768
    context: int = 256

    def config(self, tokenizer: PreTrainedTokenizerFast, end_id: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.context,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=[end_id, tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )


def pack(sequences: list[list[int]], labels: list[list[int]], width: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate token lists into rows of `width` (no sequence split across rows; long ones cut)."""
    rows_ids: list[list[int]] = []
    rows_labels: list[list[int]] = []
    ids: list[int] = []
    lab: list[int] = []
    for seq, seq_labels in zip(sequences, labels):
        seq, seq_labels = seq[:width], seq_labels[:width]
        if len(ids) + len(seq) > width:
            rows_ids.append(ids + [pad] * (width - len(ids)))
            rows_labels.append(lab + [IGNORE] * (width - len(lab)))
            ids, lab = [], []
        ids += seq
        lab += seq_labels
    if ids:
        rows_ids.append(ids + [pad] * (width - len(ids)))
        rows_labels.append(lab + [IGNORE] * (width - len(lab)))
    return torch.tensor(rows_ids), torch.tensor(rows_labels)


def document_rows(docs: list[str], tokenizer: PreTrainedTokenizerFast, width: int):
    eos = tokenizer.eos_token_id
    encoded = [ids + [eos] for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]
    return pack(encoded, encoded, width, tokenizer.pad_token_id)


def chat_rows(examples, tokenizer: PreTrainedTokenizerFast, width: int, end_token: str):
    """Rows of chat examples; labels only on the response and its closing end token."""
    prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m, _ in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([r + end_token for _, r in examples], add_special_tokens=False)["input_ids"]
    sequences = [p + r for p, r in zip(prompt_ids, response_ids)]
    labels = [[IGNORE] * len(p) + r for p, r in zip(prompt_ids, response_ids)]
    return pack(sequences, labels, width, tokenizer.pad_token_id)


@dataclass
class Schedule:
    steps: int
    lr: float
    batch: int = 32
    warmup: int = 100
    weight_decay: float = 0.05
    min_lr_ratio: float = 0.1

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: LlamaForCausalLM, schedule: Schedule) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": schedule.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=schedule.lr, betas=(0.9, 0.95),
    )


def train(
    model: LlamaForCausalLM,
    ids: torch.Tensor,
    labels: torch.Tensor,
    schedule: Schedule,
    seed: int,
    log: Callable[[dict], None] = lambda record: None,
    log_every: int = 50,
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
) -> list[dict]:
    """Train on rows (ids, labels) for `schedule.steps` steps, reshuffling every epoch, on the model's device.

    With `checkpoint` (a directory) and `checkpoint_every`, the whole training state is saved there every
    that many steps (checkpoint.py), and a call that finds one there goes on from it: an interrupted run
    continued this way ends with the weights of an uninterrupted one."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = _optimizer(model, schedule)
    device = model.get_input_embeddings().weight.device
    model.train()
    order: list[int] = []
    history = []
    start = time.time()
    running = 0.0
    first = 0
    saved = load_checkpoint(checkpoint, model, optimizer, rng) if checkpoint is not None else None
    if saved is not None:
        first, order, running, history = saved["step"], saved["order"], saved["running"], saved["history"]
        start -= saved["elapsed_s"]
        log({"resumed_at_step": first})
    for step in progress(range(first, schedule.steps), "training", unit="step"):
        if len(order) < schedule.batch:
            epoch = list(range(ids.shape[0]))
            rng.shuffle(epoch)
            order += epoch
        batch, order = order[: schedule.batch], order[schedule.batch:]
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        loss = model(input_ids=ids[batch].to(device), labels=labels[batch].to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.detach()  # no host sync per step: read at log time only
        if (step + 1) % log_every == 0 or step + 1 == schedule.steps:
            record = {"step": step + 1, "loss": round(float(running) / ((step % log_every) + 1), 4),
                      "lr": schedule.lr_at(step), "elapsed_s": round(time.time() - start, 1)}
            running = 0.0
            history.append(record)
            log(record)
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < schedule.steps:
            save_checkpoint(checkpoint, model, optimizer, rng, {
                "step": step + 1, "order": order, "running": running, "history": history,
                "elapsed_s": round(time.time() - start, 1)})
    model.eval()
    return history
