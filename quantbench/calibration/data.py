"""Calibration text → N windows of L tokens, with a fixed seed.

Default text: the bundled C4 validation sample (never the evaluation text)."""
from __future__ import annotations

import gzip
import importlib.resources
import json
import random
from dataclasses import dataclass
from pathlib import Path

from quantbench.errors import QuantbenchError
from quantbench.eval.data import adds_bos, load_eval_text
from quantbench.lazy import torch

BUNDLED_C4 = "c4-validation-head1025.jsonl.gz"


@dataclass(frozen=True)
class CalibrationSpec:
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    data: str | None = None  # None: bundled C4; a .txt / .jsonl path; or hf:NAME[:CONFIG[:SPLIT]]
    chat_template: bool = False  # wrap each document as a chat turn with the tokenizer's template

    def __post_init__(self) -> None:
        from quantbench.config import CALIB_LEN, CALIB_SAMPLES

        CALIB_SAMPLES.check(self.n_samples, "--calib-samples")
        CALIB_LEN.check(self.seq_len, "--calib-len")


def load_hf_dataset_docs(spec: str, limit: int = 20000) -> list[str]:
    """``hf:NAME[:CONFIG[:SPLIT]]`` through the ``datasets`` package (online, or its cache);
    documents are the ``text`` field (or the first string field)."""
    import os

    parts = spec[3:].split(":")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        import datasets
    except ImportError as exc:
        raise QuantbenchError("calibration from a Hub dataset needs the datasets package: "
                              "pip install datasets (or pass a .txt/.jsonl file)") from exc
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        mode = "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
    else:
        mode = None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        docs = []
        for row in ds:
            field = row.get("text") if isinstance(row.get("text"), str) else next(
                (v for v in row.values() if isinstance(v, str)), None)
            if field and field.strip():
                docs.append(field)
            if len(docs) >= limit:
                break
    except Exception as exc:  # network, missing dataset, bad config/split
        why = mode or f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        raise QuantbenchError(f"cannot load calibration dataset {name!r} ({why}); go online, "
                              "or pass --calib-data FILE.txt/.jsonl") from exc
    if not docs:
        raise QuantbenchError(f"dataset {name!r} split {split!r} has no text documents")
    return docs


def load_calibration_docs(data: str | None = None) -> list[str]:
    if data is not None and data.startswith("hf:"):
        return load_hf_dataset_docs(data)
    if data is None:
        resource = importlib.resources.files("quantbench") / "data" / BUNDLED_C4
        with resource.open("rb") as fh:
            lines = gzip.decompress(fh.read()).decode("utf-8").splitlines()
        return [json.loads(line)["text"] for line in lines if line.strip()]
    text = load_eval_text(Path(data)).text  # same readers and one-line errors
    return [doc for doc in text.split("\n\n") if doc.strip()]


def sample_windows(tokenizer, spec: CalibrationSpec) -> torch.Tensor:
    """``[n_samples, seq_len]`` token windows at seeded random offsets of the shuffled text.

    A tokenizer that adds BOS (Gemma, Llama 2) gets it at the start of every window, then
    ``seq_len − 1`` text tokens: the statistics are taken on the activations the model has in
    use (and in evaluation, and in ``llama-imatrix``); without it Gemma's are far off."""
    docs = load_calibration_docs(spec.data)
    rng = random.Random(spec.seed)
    rng.shuffle(docs)
    need = spec.n_samples * spec.seq_len * 2
    ids: list[int] = []
    if spec.chat_template and not getattr(tokenizer, "chat_template", None):
        raise QuantbenchError("--calib-chat-template: this tokenizer has no chat template")
    for doc in docs:
        if spec.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": doc}],
                                                 tokenize=False)
            ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids += tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    if len(ids) < spec.seq_len:
        raise QuantbenchError(f"calibration text has {len(ids)} tokens, fewer than "
                              f"--calib-len {spec.seq_len}")
    stream = torch.tensor(ids, dtype=torch.long)
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    length = spec.seq_len - len(bos)
    starts = [rng.randrange(0, len(ids) - length + 1) for _ in range(spec.n_samples)]
    head = torch.tensor(bos, dtype=torch.long)
    return torch.stack([torch.cat([head, stream[s:s + length]]) for s in starts])
