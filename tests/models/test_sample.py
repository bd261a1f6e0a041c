import json
import time

import pytest

from quantbench.errors import ModelLoadError
from quantbench.models.sample import ensure_sample, resolve_sample

pytestmark = pytest.mark.slow


def test_sample_is_cached_checksummed_and_tokenizes():
    from transformers import AutoTokenizer

    path = ensure_sample()
    start = time.perf_counter()
    assert ensure_sample() == path
    assert time.perf_counter() - start < 10  # reuse: checksum only, no rebuild
    meta = json.loads((path / "quantbench_sample.json").read_text())
    assert meta["dequantized_from"] == "Q4_1" and meta["gguf_tensor_types"]["Q4_1"] == 210
    assert set(meta["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok("Hello world, the quick brown fox")["input_ids"] == [
        19556, 905, 28, 260, 2365, 6354, 16438]


def test_unknown_sample():
    with pytest.raises(ModelLoadError, match="sample:smollm2"):
        resolve_sample("sample:nope")
