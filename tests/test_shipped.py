"""The shipped organism and its probe load offline and work as the defaults."""

from __future__ import annotations

import json

import pytest

from hguard import Guard, find_probe
from hguard.organism import SHIPPED, load
from hguard.organism.suites import SUITES, read_suite


def test_shipped_organism_loads_and_knows_a_well_known_person():
    model, tokenizer = load("instruct")
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) <= 15_000_000
    sizes = sum(p.stat().st_size for stage in ("base", "instruct") for p in (SHIPPED / stage).glob("*.safetensors"))
    assert sizes <= 40 * 1024 * 1024
    for name in SUITES:
        assert read_suite(SHIPPED / "suites", name)
    report = json.loads((SHIPPED / "eval.json").read_text())
    assert report["params"] == sum(p.numel() for p in model.parameters())


def test_default_guard_uses_the_shipped_probe():
    model, tokenizer = load("instruct")
    probe = find_probe(model)
    guard = Guard(model, tokenizer)
    assert guard.probe.count == probe.count > 0
    # abstain and dampen watch the running mean against its own, higher, calibrated threshold
    assert probe.threshold <= probe.watch_threshold <= 1.0
    assert guard.policy("abstain").trigger == probe.watch_threshold and guard.policy("flag").threshold == probe.threshold
    assert guard.policy("abstain", threshold=0.3).trigger == 0.3
    [result] = guard.generate([[{"role": "user", "content": "Where was Rishu Resou born?"}]], max_new_tokens=8,
                              do_sample=False)
    assert result.text and len(result.token_probs) == len(result.token_ids)
    assert 0.0 <= result.probability <= 1.0


def test_server_default_settings_load_the_organism():
    from hguard.server.app import ServerSettings, load_guard

    guard = load_guard(ServerSettings())
    assert guard.model.config.model_type == "llama" and guard.probe.count > 0


def test_base_model_loads_too():
    model, _ = load("base")
    with pytest.raises(ValueError, match="stage"):
        load("chat")
