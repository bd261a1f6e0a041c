"""Class 7: ``pytorch_model*.bin`` checkpoints.

Both torch layouts load with ``weights_only=True`` (zip: memory-mapped; the pre-zip legacy
layout: read whole, since it cannot be mapped) and give the same tensors as the safetensors
source. A pickle that would run code is refused in one line and never runs (a marker file its
``__reduce__`` would create never appears), in both layouts. A file that is not a flat state dict
(a list, a nested training checkpoint, non-tensor values), a damaged one, and a tensor in two
shards are refused with what to do.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.faults.conftest import assert_no_leftovers, assert_refused

MARKER = "pwned-marker"


def _state_dict(src: Path) -> dict[str, torch.Tensor]:
    from quantbench.models.loader import load_model

    model = load_model(src)
    return {name: model.weights.get(name).clone() for name in model.weights.names()}


def _bin_checkpoint(src: Path, dst: Path, payload, legacy: bool, name="pytorch_model.bin"):
    """``src``'s config and tokenizer with ``payload`` saved as its weights."""
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    torch.save(payload, dst / name, _use_new_zipfile_serialization=not legacy)
    return dst


LAYOUTS = pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])


@LAYOUTS
def test_both_layouts_load_the_same_tensors(fresh_llama, tmp_path, legacy):
    from quantbench.models.loader import load_model

    src = fresh_llama("src")
    tensors = _state_dict(src)
    ckpt = _bin_checkpoint(src, tmp_path / "bin", tensors, legacy)
    model = load_model(ckpt)
    assert sorted(model.weights.names()) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(model.weights.get(name), tensor), name


@LAYOUTS
def test_a_legacy_checkpoint_quantizes_like_its_source(qb, fresh_llama, tmp_path, legacy):
    src = fresh_llama("src")
    ckpt = _bin_checkpoint(src, tmp_path / "bin", _state_dict(src), legacy)
    assert qb("convert", src, "-o", tmp_path / "a", "-g", 32).code == 0
    result = qb("convert", ckpt, "-o", tmp_path / "b", "-g", 32)
    assert result.code == 0, result.stderr
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "model.safetensors").read_bytes()


class _RunsCommand:
    """Its unpickling would run a shell command that creates the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _WritesFile:
    """Its unpickling would write the marker through builtins."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('x')",))


class _Evaluates:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",))


HOSTILE = [_RunsCommand, _WritesFile, _Evaluates]


@LAYOUTS
@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda c: c.__name__)
@pytest.mark.parametrize("where", ["value", "nested", "beside tensors"])
def test_a_pickle_that_runs_code_is_refused_unexecuted(qb, fresh_llama, tmp_path, legacy,
                                                       hostile, where):
    src = fresh_llama("src")
    marker = tmp_path / MARKER
    evil = hostile(marker)
    payload = {"value": {"x": evil}, "nested": {"a": [evil]},
               "beside tensors": {**_state_dict(src), "extra": evil}}[where]
    ckpt = _bin_checkpoint(src, tmp_path / "bin", payload, legacy)
    for args in (("convert", ckpt, "-o", tmp_path / "out", "-g", 32),
                 ("convert", ckpt, "-o", tmp_path / "out", "-m", "gptq", "--plan"),
                 ("eval", ckpt, "--ctx", 64, "--max-tokens", 128, "--no-cache")):
        line = assert_refused(qb(*args), "refusing", "weights_only=True", "safetensors")
        assert "would run code" in line
        assert not marker.exists(), "the pickle ran"
    assert_refused(qb("inspect", ckpt), "no safetensors or GGUF weights")
    assert not marker.exists(), "the pickle ran"
    assert_no_leftovers(tmp_path, keep=("src", "bin"))


@pytest.mark.parametrize("payload,needle", [
    (lambda sd: list(sd.values()), "holds a Python list, not a state dict"),
    (lambda sd: next(iter(sd.values())), "holds a Python Tensor, not a state dict"),
    (lambda sd: 5, "holds a Python int"),
    (lambda sd: {"state_dict": sd, "epoch": 3}, "nests its weights (under 'state_dict')"),
    (lambda sd: {"model": sd, "optimizer": {"lr": torch.tensor(1.0)}}, "under 'model'"),
    (lambda sd: {**sd, "epoch": 3}, "entry 'epoch' holds a Python int, not a tensor"),
    (lambda sd: {**sd, "names": ["a"]}, "entry 'names' holds a Python list"),
    (lambda sd: {**sd, 7: torch.zeros(1)}, "key 7 is not a tensor name"),
])
@LAYOUTS
def test_not_a_flat_state_dict(qb, fresh_llama, tmp_path, payload, needle, legacy):
    src = fresh_llama("src")
    ckpt = _bin_checkpoint(src, tmp_path / "bin", payload(_state_dict(src)), legacy)
    line = assert_refused(qb("convert", ckpt, "-o", tmp_path / "out", "-g", 32), needle)
    assert "save the model's state dict" in line
    assert_no_leftovers(tmp_path, keep=("src", "bin"))


@pytest.mark.parametrize("damage,needle", [
    (lambda data: data[: len(data) // 2], "not a readable torch checkpoint"),
    (lambda data: data[:40], "not a readable torch checkpoint"),
    (lambda data: b"", "not a readable torch checkpoint"),
    (lambda data: b"not a pickle at all" * 10, "not a readable torch checkpoint"),
    (lambda data: None, "is a directory"),
])
@LAYOUTS
def test_damaged_bin(qb, fresh_llama, tmp_path, damage, needle, legacy):
    src = fresh_llama("src")
    ckpt = _bin_checkpoint(src, tmp_path / "bin", _state_dict(src), legacy)
    path = ckpt / "pytorch_model.bin"
    data = damage(path.read_bytes())
    path.unlink()
    if data is None:
        path.mkdir()
    else:
        path.write_bytes(data)
    assert_refused(qb("convert", ckpt, "-o", tmp_path / "out", "-g", 32), str(path), needle)
    assert_no_leftovers(tmp_path, keep=("src", "bin"))


def test_a_tensor_in_two_shards_is_refused(qb, fresh_llama, tmp_path):
    src = fresh_llama("src")
    tensors = _state_dict(src)
    ckpt = _bin_checkpoint(src, tmp_path / "bin", tensors, legacy=False,
                           name="pytorch_model-00001-of-00002.bin")
    torch.save({"model.norm.weight": tensors["model.norm.weight"]},
               ckpt / "pytorch_model-00002-of-00002.bin", _use_new_zipfile_serialization=False)
    assert_refused(qb("convert", ckpt, "-o", tmp_path / "out", "-g", 32),
                   "tensor model.norm.weight is in both", "stale shard")


def test_a_refused_bin_logs_nothing_else(qb, fresh_llama, tmp_path):
    """The 'no safetensors' notice comes after a successful read: a refusal is its line alone
    (assert_refused checks the single line even with -v)."""
    src = fresh_llama("src")
    ckpt = _bin_checkpoint(src, tmp_path / "bin", [1, 2], legacy=True)
    assert_refused(qb("convert", ckpt, "-o", tmp_path / "out"), "holds a Python list")
