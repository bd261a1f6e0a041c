"""One definition of bits per weight (quantbench/bits_per_weight.py), both numbers labelled
wherever one is reported: convert's line, inspect, eval, compare, the card; GGUF and
safetensors layouts computing the same two quantities (manifest = inspect's read-back)."""
from __future__ import annotations

import json

import pytest

from tests.faults.conftest import _qb

EVAL = ("--ctx", "64", "--max-tokens", "64", "--no-cache")


@pytest.fixture
def qb(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    return lambda *args: _qb(capsys, *args)


def test_summarize_and_describe():
    from quantbench.bits_per_weight import describe, summarize

    rows = {"q": {"shape": [4, 8], "quantized": True, "bits_per_weight": 4.5},
            "e": {"shape": [16, 8], "quantized": False, "bits_per_weight": 16}}
    s = summarize(rows)
    assert s["bits_per_weight_quantized"] == 4.5
    assert s["bits_per_weight"] == round((32 * 4.5 + 128 * 16) / 160, 4)
    assert describe(s) == "4.50 bits/weight in quantized tensors, 13.70 over all weights"
    assert describe({}) == "? bits/weight in quantized tensors, ? over all weights"


@pytest.mark.parametrize("args", [("-f", "compressed-tensors", "-g", "32"), ("-t", "Q8_0")],
                         ids=["compressed-tensors", "gguf"])
def test_every_report_gives_both_numbers(qb, tiny_llama, tmp_path, args):
    out = tmp_path / "art"
    result = qb("convert", tiny_llama, *args, "-o", out)
    assert result.code == 0, result.stderr
    manifest = json.loads((out / "quantbench.json").read_text())
    s = manifest["summary"]
    q, every = s["bits_per_weight_quantized"], s["bits_per_weight"]
    flat = " ".join(result.stdout.split())  # lines wrap at the console's width
    assert f"{q:.2f} bits/weight in quantized tensors, {every:.2f} over all weights" in flat

    result = qb("inspect", out, "--json", tmp_path / "i.json")
    assert result.code == 0, result.stderr
    assert "bits/weight in quantized tensors" in result.stdout
    assert "bits/weight over all weights" in result.stdout
    info = json.loads((tmp_path / "i.json").read_text())  # read back from the files
    assert (info["bits_per_weight_quantized"], info["bits_per_weight"]) == (q, every)

    result = qb("eval", out, *EVAL, "--json", tmp_path / "e.json")
    assert result.code == 0, result.stderr
    assert f"art: {q:.2f} bits/weight in quantized tensors" in " ".join(result.stdout.split())
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["artifacts"]["art"] == {"bits_per_weight_quantized": q, "bits_per_weight": every}

    result = qb("upload", out, "--repo", "me/art", "--dry-run")
    assert result.code == 0, result.stderr
    assert f"| bits/weight in quantized tensors | {q:g} |" in result.stdout
    assert f"| bits/weight over all weights | {every:g} |" in result.stdout


def test_gguf_counts_its_quantized_embedding(qb, tiny_llama, tmp_path):
    """A GGUF type quantizes every 2-D tensor (the embedding too): both numbers then cover
    nearly the same weights; compressed-tensors keeps the embedding in 16-bit."""
    qb("convert", tiny_llama, "-t", "Q8_0", "-o", tmp_path / "g")
    qb("convert", tiny_llama, "-f", "compressed-tensors", "-g", "32", "-o", tmp_path / "c")
    g = json.loads((tmp_path / "g" / "quantbench.json").read_text())["summary"]
    c = json.loads((tmp_path / "c" / "quantbench.json").read_text())["summary"]
    assert g["quantized_weights"] > c["quantized_weights"]
    assert c["bits_per_weight"] > c["bits_per_weight_quantized"] + 1
    assert abs(g["bits_per_weight"] - g["bits_per_weight_quantized"]) < 0.5
