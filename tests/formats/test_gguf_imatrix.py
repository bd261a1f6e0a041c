"""llama.cpp imatrix files and method ``imatrix``: a file from llama-imatrix quantizes our GGUF
exactly as ``llama-quantize --imatrix`` quantizes our F16 GGUF, and the ``imatrix.gguf`` a
calibrated run writes beside its model gives llama-quantize that same model.

"The same model" means: the same key-value pairs (``quantize.imatrix.*`` included), the same
tensors byte for byte (name, type, shape, data) and the same file size. Only the order differs:
llama-quantize lists tensors sorted by name within a block and moves ``general.file_type`` and
``general.quantization_version`` last, our writer keeps llama.cpp's converter's order.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from quantbench.api import quantize, save
from quantbench.calibration.data import BUNDLED_C4
from quantbench.calibration.imatrix_file import load_imatrix, write_imatrix
from quantbench.cli import main
from quantbench.formats.io import open_artifact
from quantbench.models.loader import load_model
from quantbench.quant.gguf.codec import get_codec
from tests.conftest import _wikitext_head


def gguf_contents(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    kvs = {k: ([int(t) for t in f.types], f.contents()) for k, f in reader.fields.items()}
    tensors = {t.name: (t.tensor_type.name, [int(d) for d in t.shape], t.data.tobytes())
               for t in reader.tensors}
    return kvs, tensors


def assert_same_gguf(ours: Path, theirs: Path) -> None:
    (kv_a, t_a), (kv_b, t_b) = gguf_contents(ours), gguf_contents(theirs)
    assert kv_a == kv_b, {k for k in kv_a.keys() | kv_b.keys() if kv_a.get(k) != kv_b.get(k)}
    assert t_a.keys() == t_b.keys()
    assert [n for n in t_a if t_a[n] != t_b[n]] == []
    assert ours.stat().st_size == theirs.stat().st_size


@pytest.fixture(scope="module")
def f16(tiny_llama_wide, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imatrix") / "f16"
    save(quantize(load_model(tiny_llama_wide), method="rtn", gguf_type="F16"), out,
         format="gguf")
    return out / "model.gguf"


@pytest.fixture(scope="module")
def llama_imatrix(f16, llamacpp) -> dict[str, Path]:
    """llama-imatrix on our F16 file, 4 chunks of 64 tokens, output.weight included, written
    in both layouts."""
    text = f16.parent.parent / "calib.txt"
    text.write_text(_wikitext_head(40_000))
    files = {}
    for fmt in ("gguf", "dat"):
        files[fmt] = f16.parent.parent / f"imatrix.{fmt}"
        llamacpp.run("llama-imatrix", "-m", f16, "-f", text, "-c", 64, "--chunks", 4,
                     "--no-ppl", "--process-output", "-t", 2, "--output-format", fmt,
                     "-o", files[fmt])
    return files


def convert(*args: str) -> None:
    try:
        main(["convert", *map(str, args)])
    except SystemExit as exc:  # main exits only on errors
        raise AssertionError(f"convert failed with {exc.code}") from exc


def test_llama_imatrix_files_read_and_rewritten_byte_for_byte(llama_imatrix, tmp_path):
    im, dat = load_imatrix(llama_imatrix["gguf"]), load_imatrix(llama_imatrix["dat"])
    blocks = [f"blk.{i}.{t}.weight" for i in range(3) for t in
              ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    assert sorted(im.entries) == sorted(dat.entries) == sorted(blocks + ["output.weight"])
    assert (im.chunk_count, im.chunk_size, im.datasets) == (4, 64, (str(
        llama_imatrix["gguf"].parent / "calib.txt"),))
    assert im.entries["blk.0.attn_q.weight"].counts.tolist() == [256]  # 4 × 64 rows
    for name, importance in im.importance().items():
        np.testing.assert_allclose(dat.importance()[name].numpy(), importance.numpy(),
                                   rtol=1e-6)
    raw = {n: (e.sums, e.counts) for n, e in im.entries.items()}
    for fmt in ("gguf", "dat"):
        ours = write_imatrix(tmp_path / f"ours.{fmt}", raw, datasets=im.datasets,
                             chunk_count=im.chunk_count, chunk_size=im.chunk_size,
                             legacy=fmt == "dat")
        assert ours.read_bytes() == llama_imatrix[fmt].read_bytes(), fmt


CASES = [("gguf", "Q4_0"), ("dat", "Q6_K"),
         pytest.param("gguf", "Q4_K_M", marks=pytest.mark.slow)]  # Q4_K with weights is slow


@pytest.mark.parametrize("fmt,gguf_type", CASES)
def test_llama_imatrix_file_quantizes_like_llama_quantize(tiny_llama_wide, f16, llama_imatrix,
                                                          llamacpp, tmp_path, fmt, gguf_type):
    imatrix = llama_imatrix[fmt]
    convert(tiny_llama_wide, "--type", gguf_type, "--imatrix", imatrix, "-o", tmp_path / "ours")
    theirs = tmp_path / "theirs.gguf"
    llamacpp.run("llama-quantize", "--imatrix", imatrix, f16, theirs, gguf_type, "2")
    assert_same_gguf(tmp_path / "ours" / "model.gguf", theirs)
    art = open_artifact(tmp_path / "ours")
    assert art.manifest["quantize"]["method"] == "imatrix"
    assert not (tmp_path / "ours" / "imatrix.gguf").exists()  # the file named is the user's
    model = load_model(tiny_llama_wide)
    for name in ("model.layers.2.mlp.down_proj.weight", "lm_head.weight"):  # lm_head: output
        qt = art.quantized(name)
        rtn = get_codec(qt.grid.type).quantize_rows(model.weights.get(name))
        assert not torch.equal(qt.codes, rtn), name  # the importance changed the search


@pytest.mark.parametrize("gguf_type", ["Q4_0", pytest.param("Q4_K_M", marks=pytest.mark.slow)])
def test_calibrated_run_writes_the_imatrix_llama_quantize_reproduces(tiny_llama_wide, f16,
                                                                      llamacpp, tmp_path,
                                                                      monkeypatch, gguf_type):
    out = tmp_path / "ours"
    convert(tiny_llama_wide, "--method", "imatrix", "--type", gguf_type, "--calib-samples", 2,
            "--calib-len", 64, "-o", out)
    im = load_imatrix(out / "imatrix.gguf")
    assert len(im.entries) == 21 and im.datasets == (BUNDLED_C4,)
    assert (im.chunk_count, im.chunk_size) == (2, 64)
    assert {e.counts.tolist()[0] for e in im.entries.values()} == {128}
    monkeypatch.chdir(out)  # llama-quantize records the path as given: imatrix.gguf
    llamacpp.run("llama-quantize", "--imatrix", "imatrix.gguf", f16, tmp_path / "theirs.gguf",
                 gguf_type, "2")
    assert_same_gguf(out / "model.gguf", tmp_path / "theirs.gguf")
    # replayed data-free from that file: the same tensors
    convert(tiny_llama_wide, "--type", gguf_type, "--imatrix", out / "imatrix.gguf", "-o",
            tmp_path / "replay")
    assert gguf_contents(tmp_path / "replay" / "model.gguf")[1] == \
        gguf_contents(out / "model.gguf")[1]


def test_imatrix_files_that_do_not_fit_are_refused(tiny_llama, tmp_path, capsys,
                                                   assert_nothing_written):
    """One line, exit 2, nothing written: another model's file, a wrong size, a broken file,
    calibration flags next to a file, no GGUF type, no file."""
    files = tmp_path / "files"
    files.mkdir()
    other = write_imatrix(files / "other.gguf", {"blk.5.attn_q.weight": (torch.ones(64), 8)},
                          datasets=["x"], chunk_count=1, chunk_size=8)
    size = write_imatrix(files / "size.gguf", {"blk.0.attn_q.weight": (torch.ones(32), 8)},
                         datasets=["x"], chunk_count=1, chunk_size=8)
    (files / "cut.gguf").write_bytes(size.read_bytes()[:-60])
    cases = [
        ([other, "--type", "Q4_K_M"], "tensors this model does not have"),
        ([size, "--type", "Q4_K_M"], "has 32 importance values but the model's tensor has 64"),
        ([files / "cut.gguf", "--type", "Q4_K_M"], "truncated or corrupted"),
        ([size, "--type", "Q4_K_M", "--calib-samples", "4"], "drop --calib-samples"),
        ([size], "--type Q4_K_M"),
        ([files / "missing.gguf", "--type", "Q4_K_M"], "does not exist"),
    ]
    for (imatrix, *args), match in cases:
        out = tmp_path / "outs" / "q"
        out.parent.mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as exc:
            main(["convert", str(tiny_llama), "--imatrix", str(imatrix), "-o", str(out), *args])
        assert exc.value.code == 2, match
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1, err
        assert_nothing_written(out)
