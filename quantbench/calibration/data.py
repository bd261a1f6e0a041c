"""Calibration text → N windows of L tokens, with a fixed seed.

Default text: the bundled C4 validation sample (never the evaluation text)."""
from __future__ import annotations

import gzip
import importlib.resources
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from quantbench.errors import QuantbenchError
from quantbench.eval.data import load_eval_text

BUNDLED_C4 = "c4-validation-head1025.jsonl.gz"


@dataclass(frozen=True)
class CalibrationSpec:
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    data: str | None = None  # None: bundled C4; else a .txt / .jsonl path

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.seq_len < 8:
            raise QuantbenchError("calibration needs --calib-samples >= 1 and --calib-len >= 8")


def load_calibration_docs(data: str | None = None) -> list[str]:
    if data is None:
        resource = importlib.resources.files("quantbench") / "data" / BUNDLED_C4
        with resource.open("rb") as fh:
            lines = gzip.decompress(fh.read()).decode("utf-8").splitlines()
        return [json.loads(line)["text"] for line in lines if line.strip()]
    text = load_eval_text(Path(data)).text  # same readers and one-line errors
    return [doc for doc in text.split("\n\n") if doc.strip()]


def sample_windows(tokenizer, spec: CalibrationSpec) -> torch.Tensor:
    """``[n_samples, seq_len]`` token windows at seeded random offsets of the shuffled text."""
    docs = load_calibration_docs(spec.data)
    rng = random.Random(spec.seed)
    rng.shuffle(docs)
    need = spec.n_samples * spec.seq_len * 2
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    if len(ids) < spec.seq_len:
        raise QuantbenchError(f"calibration text has {len(ids)} tokens, fewer than "
                              f"--calib-len {spec.seq_len}")
    stream = torch.tensor(ids, dtype=torch.long)
    starts = [rng.randrange(0, len(ids) - spec.seq_len + 1) for _ in range(spec.n_samples)]
    return torch.stack([stream[s:s + spec.seq_len] for s in starts])
