import json

import pytest
import torch
from transformers import AutoTokenizer

from quantbench.errors import QuantbenchError
from quantbench.eval.data import load_eval_text, make_windows, tokenize_for_eval


def test_bundled_wikitext_is_the_official_file():
    text = load_eval_text()
    assert text.data_id == "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
    assert text.text.startswith(" \n = Robert Boulter = \n")


def test_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert load_eval_text(tmp_path / "a.txt").text == "hello world"
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" +
                                      json.dumps({"text": "two"}) + "\n")
    assert load_eval_text(tmp_path / "b.jsonl").text == "one\n\ntwo"


@pytest.mark.parametrize("content,needle", [
    ('{"text": "a"}\n{bad json}\n', "line 2 is not valid JSON"),
    ('{"txt": "a"}\n', "line 1 has no string 'text'"),
    ("   \n", "is empty"),
])
def test_bad_jsonl(tmp_path, content, needle):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(QuantbenchError, match=needle):
        load_eval_text(path)


def test_missing_and_binary(tmp_path):
    with pytest.raises(QuantbenchError, match="does not exist"):
        load_eval_text(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(QuantbenchError, match="not UTF-8"):
        load_eval_text(tmp_path / "bin.txt")


def test_windows_and_bos():
    ids = torch.arange(100)
    w = make_windows(ids, 10, max_tokens=35)
    assert w.shape == (3, 10) and torch.equal(w[1], torch.arange(10, 20))
    w = make_windows(ids, 10, n_windows=2, bos_id=7)
    assert w.shape == (2, 10) and torch.equal(w[:, 0], torch.tensor([7, 7]))
    assert torch.equal(w[1, 1:], torch.arange(9, 18))
    with pytest.raises(QuantbenchError, match="fewer than one window"):
        make_windows(torch.arange(5), 10)


def test_prefix_tokenization_equals_full(tiny_llama):
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    text = load_eval_text().text[:60_000]
    full = tok(text, add_special_tokens=False)["input_ids"]
    part = tokenize_for_eval(tok, text, 3000)
    assert part.tolist() == full[:3000]


def test_llama_cpp_windows_overwrite_each_chunk_start_with_bos():
    """llama.cpp's perplexity: BOS + text cut into chunks of ctx, BOS written over each chunk's
    first token; without a BOS, the same windows as full scoring."""
    ids = torch.arange(10, 30)
    w = make_windows(ids, 5, bos_id=1, llama_cpp=True)
    assert w.tolist() == [[1, 10, 11, 12, 13], [1, 15, 16, 17, 18], [1, 20, 21, 22, 23],
                          [1, 25, 26, 27, 28]]
    assert make_windows(ids, 5, max_tokens=10, bos_id=1, llama_cpp=True).shape == (2, 5)
    assert torch.equal(make_windows(ids, 5, llama_cpp=True), make_windows(ids, 5))
