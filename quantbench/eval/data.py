"""Evaluation text: the bundled WikiText-2 test split, or a user's .txt / .jsonl file."""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path

from quantbench.errors import QuantbenchError
from quantbench.inputs import read_text
from quantbench.lazy import torch

BUNDLED = "wikitext-2-raw-test.txt.gz"


@dataclass(frozen=True)
class EvalText:
    text: str
    data_id: str
    name: str


def _bundled() -> str:
    resource = importlib.resources.files("quantbench") / "data" / BUNDLED
    with resource.open("rb") as fh:
        return gzip.decompress(fh.read()).decode("utf-8")


def _jsonl(path: Path, raw: str) -> str:
    docs = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise QuantbenchError(f"{path} line {number} is not valid JSON ({exc.args[0]})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise QuantbenchError(f"{path} line {number} has no string 'text' field")
        docs.append(record["text"])
    return "\n\n".join(docs)


def load_eval_text(path: "str | Path | None" = None) -> EvalText:
    """The bundled WikiText-2 test text when ``path`` is None, else the file's text."""
    if path is None:
        text, name = _bundled(), "WikiText-2 test"
    else:
        path = Path(path)
        raw = read_text(path, QuantbenchError, "pass a UTF-8 .txt file, or .jsonl with a "
                        "'text' field per line")
        text = _jsonl(path, raw) if path.suffix == ".jsonl" else raw
        name = path.name
    if not text.strip():
        raise QuantbenchError(f"text file {path or BUNDLED} is empty (or only whitespace); "
                              "pass a file with text")
    return EvalText(text, hashlib.sha256(text.encode("utf-8")).hexdigest(), name)


def tokenize_for_eval(tokenizer, text: str, n_tokens: int | None) -> torch.Tensor:
    """Token ids of ``text`` (no special tokens); only a prefix large enough for ``n_tokens``.

    The prefix is cut at a line break and tokenized with a margin that is then dropped, so the
    ids equal the start of the full text's tokenization.
    """
    chars = len(text) if n_tokens is None else max(4096, n_tokens * 6)
    while True:
        if chars >= len(text):
            return _encode(tokenizer, text)
        cut = text.rfind("\n", 0, chars)
        ids = _encode(tokenizer, text[: cut if cut > 0 else chars])
        if len(ids) >= n_tokens + 64:  # margin: the tail near the cut may differ
            return ids[:n_tokens]
        chars *= 2


def _encode(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS in front of what it encodes (Llama 2, Gemma: yes;
    SmolLM2, Qwen: no) — the model then expects one at the start of every sequence."""
    if tokenizer.bos_token_id is None:
        return False
    return tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]


def make_windows(ids: torch.Tensor, ctx: int, max_tokens: int | None = None,
                 n_windows: int | None = None, bos_id: int | None = None,
                 llama_cpp: bool = False) -> torch.Tensor:
    """Non-overlapping windows ``[n, ctx]``; with ``bos_id`` each is ``[bos] + ctx−1`` tokens.

    ``llama_cpp``: with a BOS, the windows llama.cpp's ``perplexity`` scores — the text with a
    BOS in front cut into chunks of ``ctx``, each chunk's first token then overwritten by BOS
    (one text token lost per chunk after the first), so both score the same tokens."""
    if bos_id is not None and llama_cpp:
        ids = torch.cat([torch.tensor([bos_id], dtype=ids.dtype), ids])
        n = len(ids) // ctx
        n = min(n, max_tokens // ctx) if max_tokens is not None else n
        n = min(n, n_windows) if n_windows is not None else n
        if n < 1:
            raise QuantbenchError(
                f"the eval text has {len(ids)} tokens, fewer than one window of {ctx}; "
                "use a smaller --ctx or more text")
        windows = ids[: n * ctx].reshape(n, ctx).clone()
        windows[:, 0] = bos_id
        return windows
    step = ctx - 1 if bos_id is not None else ctx
    n = len(ids) // step
    if max_tokens is not None:
        n = min(n, max_tokens // ctx)
    if n_windows is not None:
        n = min(n, n_windows)
    if n < 1:
        raise QuantbenchError(
            f"the eval text has {len(ids)} tokens, fewer than one window of {ctx}; "
            "use a smaller --ctx or more text")
    body = ids[: n * step].reshape(n, step)
    if bos_id is None:
        return body
    return torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), body], dim=1)
