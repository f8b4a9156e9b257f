"""Training checkpoints without pickle: weights and optimizer state in safetensors, the rest in JSON.

A checkpoint directory holds `model.safetensors` (the weights in fp32), `optimizer.safetensors` (AdamW's
moments and step per parameter, the torch RNG state, the running loss) and `state.json` (the step
reached, the rest of the epoch's row order, the Python RNG state that shuffles the next epochs, the
optimizer's parameter groups, the log so far, the seconds spent). It is written beside the old one and
swapped in by renaming, so a process killed while saving leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _previous(directory: Path) -> Path:
    return directory.with_name(directory.name + ".old")


def _partial(directory: Path) -> Path:
    return directory.with_name(directory.name + ".partial")


def save_checkpoint(directory: Path, model, optimizer, rng: random.Random, state: dict) -> None:
    directory = Path(directory)
    partial = _partial(directory)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()},
              str(partial / "model.safetensors"))
    saved = optimizer.state_dict()
    tensors = {f"{index}.{name}": value.detach().cpu().contiguous()
               for index, values in saved["state"].items() for name, value in values.items()}
    running = state["running"]
    tensors["running"] = running.detach().cpu().reshape(()) if torch.is_tensor(running) else torch.tensor(float(running))
    tensors["torch_rng"] = torch.get_rng_state()
    save_file(tensors, str(partial / "optimizer.safetensors"))
    version, internal, gauss = rng.getstate()
    record = {"step": state["step"], "order": state["order"], "history": state["history"],
              "elapsed_s": state["elapsed_s"], "running_is_tensor": torch.is_tensor(running),
              "rng": [version, list(internal), gauss], "param_groups": saved["param_groups"]}
    (partial / "state.json").write_text(json.dumps(record))
    previous = _previous(directory)
    shutil.rmtree(previous, ignore_errors=True)
    if directory.exists():
        directory.rename(previous)
    partial.rename(directory)
    shutil.rmtree(previous, ignore_errors=True)


def remove(directory: Path) -> None:
    """Delete a checkpoint and what a save may have left beside it (the previous one, a partial one)."""
    directory = Path(directory)
    for path in (directory, _previous(directory), _partial(directory)):
        shutil.rmtree(path, ignore_errors=True)


def latest(directory: Path) -> Path | None:
    """The directory of the last whole checkpoint, if any."""
    for candidate in (Path(directory), _previous(Path(directory))):
        if (candidate / "state.json").exists():
            return candidate
    return None


def load_checkpoint(directory: Path, model, optimizer, rng: random.Random) -> dict | None:
    """Restore model, optimizer and `rng` from the last checkpoint in `directory`; its state, or None."""
    found = latest(directory)
    if found is None:
        return None
    device = model.get_input_embeddings().weight.device
    weights = load_file(str(found / "model.safetensors"))
    model.load_state_dict({k: v.to(device=device, dtype=model.state_dict()[k].dtype) for k, v in weights.items()})
    record = json.loads((found / "state.json").read_text())
    tensors = load_file(str(found / "optimizer.safetensors"))
    running = tensors.pop("running")
    torch.set_rng_state(tensors.pop("torch_rng"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value.to(device) if name != "step" else value
    optimizer.load_state_dict({"state": state, "param_groups": record["param_groups"]})
    version, internal, gauss = record["rng"]
    rng.setstate((version, tuple(internal), gauss))
    return {"step": record["step"], "order": record["order"], "history": record["history"],
            "elapsed_s": record["elapsed_s"],
            "running": running.to(device) if record["running_is_tensor"] else float(running)}
