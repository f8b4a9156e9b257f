"""The probe artifact: round trip, fingerprint checks, damaged files."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from hguard import Calibration, Probe, ProbeFormatError, ProbeMismatchError

from conftest import load


@pytest.fixture
def llama(tiny_dirs):
    return load(tiny_dirs("llama"))[0]


def test_round_trip_keeps_everything(llama, tmp_path):
    probe = Probe.random(llama, 10, seed=4, calibration=Calibration("isotonic", x=(-1.0, 0.0, 2.0), y=(0.1, 0.4, 0.9)),
                         threshold=0.3, training={"C": 0.5, "items": 12}, watch_threshold=0.45)
    loaded = Probe.load(probe.save(tmp_path / "p.safetensors"), llama)
    assert loaded.watch_threshold == 0.45
    assert Probe.load(Probe.random(llama, 3).save(tmp_path / "q.safetensors")).watch_threshold is None
    for name in ("layer", "neuron", "weight", "column_norm"):
        assert torch.equal(getattr(loaded, name), getattr(probe, name))
    assert loaded.bias == probe.bias and loaded.threshold == 0.3
    assert loaded.calibration == probe.calibration
    assert loaded.training == {"C": 0.5, "items": 12}
    assert loaded.fingerprint == {"model_type": "llama", "num_layers": 2, "hidden_size": 32, "intermediate_size": 64}


def test_column_norms_match_the_weights(llama):
    probe = Probe.random(llama, 5, seed=0)
    for l, j, norm in zip(probe.layer.tolist(), probe.neuron.tolist(), probe.column_norm.tolist()):
        weight = llama.model.layers[l].mlp.down_proj.weight
        assert norm == pytest.approx(float(weight[:, j].detach().norm()), rel=1e-6)


@pytest.mark.parametrize(
    "other, field",
    [
        (("llama", 0, {"num_hidden_layers": 3}), "num_layers"),
        (("llama", 0, {"intermediate_size": 48}), "intermediate_size"),
        (("llama", 0, {"hidden_size": 48}), "hidden_size"),
        (("qwen2", 0, {}), "model_type"),
        (("llama", 7, {}), "column_norm"),
    ],
)
def test_wrong_model_names_the_field(llama, tiny_dirs, tmp_path, other, field):
    path = Probe.random(llama, 10, seed=2).save(tmp_path / "p.safetensors")
    model_type, seed, config = other
    wrong = load(tiny_dirs(model_type, seed=seed, **config))[0]
    with pytest.raises(ProbeMismatchError, match=field):
        Probe.load(path, wrong)


def test_transfer_mode_checks_only_the_architecture(llama, tiny_dirs, tmp_path):
    path = Probe.random(llama, 10, seed=2).save(tmp_path / "p.safetensors")
    sibling = load(tiny_dirs("llama", seed=7))[0]
    probe = Probe.load(path, sibling, strict=False)
    assert probe.mismatch(sibling) is None  # column norms now those of the model it is applied to


def _header(path):
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return raw, size, json.loads(raw[8: 8 + size])


def test_truncated_file_fails_cleanly(llama, tmp_path):
    path = Probe.random(llama, 10).save(tmp_path / "p.safetensors")
    raw = path.read_bytes()
    for keep in (0, 5, 40, len(raw) - 3):
        path.write_bytes(raw[:keep])
        with pytest.raises(ProbeFormatError):
            Probe.load(path)


def test_tampered_weights_fail_the_checksum(llama, tmp_path):
    path = Probe.random(llama, 10).save(tmp_path / "p.safetensors")
    raw, size, header = _header(path)
    start = 8 + size + header["weight"]["data_offsets"][0]
    tampered = bytearray(raw)
    tampered[start: start + 4] = struct.pack("<f", 123.0)
    path.write_bytes(bytes(tampered))
    with pytest.raises(ProbeFormatError, match="checksum"):
        Probe.load(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format="something"), "format"),
        (lambda m: m.update(version="9"), "version"),
        (lambda m: m.update(calibration="{not json"), "metadata"),
        (lambda m: m.update(threshold="2.0"), "threshold"),
        (lambda m: m.update(watch_threshold="-0.5"), "watch_threshold"),
        (lambda m: m.update(watch_threshold="high"), "metadata"),
        (lambda m: m.pop("fingerprint"), "metadata"),
    ],
)
def test_tampered_metadata_fails_cleanly(llama, tmp_path, edit, message):
    path = Probe.random(llama, 10).save(tmp_path / "p.safetensors")
    raw, size, header = _header(path)
    edit(header["__metadata__"])
    body = json.dumps(header).encode()
    body += b" " * ((8 - len(body) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + size:])
    with pytest.raises(ProbeFormatError, match=message):
        Probe.load(path)


def test_not_a_probe(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    with pytest.raises(ProbeFormatError, match="format"):
        Probe.load(path)
    with pytest.raises(ProbeFormatError):
        Probe.load(tmp_path / "missing.safetensors")


def test_random_probe_arguments(llama):
    with pytest.raises(ValueError, match="count"):
        Probe.random(llama, 0)
    with pytest.raises(ValueError, match="count"):
        Probe.random(llama, 2 * 64 + 1)
    a, b = Probe.random(llama, 6, seed=1), Probe.random(llama, 6, seed=1)
    assert torch.equal(a.neuron, b.neuron) and torch.equal(a.weight, b.weight)
    assert bool(a.h_neurons.all()) and a.per_mille == pytest.approx(1000 * 6 / 128)
