"""Smoke runs of the organism studies in benchmarks/ on a tiny organism: each writes its JSON and plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, tmp_path: Path, *extra: str) -> dict:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--tiny", "--limit", "6", "--batch", "8",
                             "--out", str(tmp_path), "--json", *extra], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny models: threads only add overhead
    assert result.returncode == 0, result.stderr[-2000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    written = json.loads((tmp_path / script.replace(".py", ".json")).read_text())
    assert (tmp_path / script.replace(".py", ".png")).stat().st_size > 1000
    assert printed["command"] == written["command"] and written["tiny"] is True
    return written


def test_intervention(tmp_path):
    result = run("intervention.py", tmp_path)
    assert result["alphas"] == [0.0, 1.0, 3.0]
    for key in ("h_neurons", "random_neurons"):
        row = result["curves"][key]["1.0"]
        for name in ("false_premise", "sycophancy", "counterfactual", "hallucination_tail", "accuracy_known"):
            assert row[name]["n"] > 0 and 0.0 <= row[name]["rate"] <= 1.0
            low, high = row[name]["ci"]
            assert low <= row[name]["rate"] <= high


def test_origins(tmp_path):
    result = run("origins.py", tmp_path)
    drift = result["drift"]
    assert drift["neurons"] == 2 * 64 and 0.0 <= drift["mean_normalised_rank_all"] <= 1.0
    assert drift["mean_normalised_rank_all"] == pytest.approx(0.5, abs=1e-6)  # ranks spread evenly over [0, 1]
    assert set(result["transfer"]) == {"in_domain", "paraphrase", "other_attribute"}


def test_actions(tmp_path):
    result = run("actions.py", tmp_path)
    assert set(result) >= {"flag", "abstain", "dampen"}
    curves = result["abstain"]["risk_coverage"]["curves"]
    assert set(curves) == {"h_neuron_probe", "max_sequence_probability", "mean_token_entropy", "perplexity"}
    assert result["dampen"]["off"]["accuracy_known"]["n"] == result["dampen"]["dampen"]["accuracy_known"]["n"]


def test_answer_form(tiny_organism):
    directory = tiny_organism[0]
    result = subprocess.run([sys.executable, str(BENCHMARKS / "answer_form.py"), "--json", "--dir", str(directory)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["questions"] > 0
    assert set(report["accuracy"]) == {"base, plain", "base, chat", "instruct, chat", "instruct, chat_after_a_word"}
    for row in report["accuracy"].values():
        assert set(row) == {"city", "employer", "occupation", "year", "all"} and all(0 <= v <= 1 for v in row.values())


def test_sharpened_organism(tmp_path_factory):
    """benchmarks/sharpened_organism.py on a tiny v7 build: a tuned instruct model beside the build's suites."""
    from hguard.organism.build import BuildConfig, build

    directory = build(BuildConfig.tiny(seed=3, preset="v7"), tmp_path_factory.mktemp("tiny-v7"), echo=lambda m: None)
    out = tmp_path_factory.mktemp("sharpened") / "organism"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "sharpened_organism.py"), "--organism", str(directory),
                             "--out", str(out), "--steps", "2"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "sharpened.json").read_text())
    assert report["questions"] > 0 and len(report["loss"]) == 1
    assert (out / "instruct" / "model.safetensors").exists() and (out / "suites").is_dir()
    assert json.loads((out / "build.json").read_text()) == json.loads((directory / "build.json").read_text())


def test_sharpened_organism_refuses_a_v6_build(tiny_organism, tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "sharpened_organism.py"), "--organism",
                             str(tiny_organism[0]), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "v6 organism" in result.stderr and not (tmp_path / "out").exists()
