"""Real runtime: exllamav2 loads our exl2 files (its CUDA kernels unshuffle and dequantize
them) and its perplexity on the sample model matches the model our reader builds. Needs a
CUDA GPU and the exllamav2 package; skipped otherwise."""
import importlib.util

import pytest
import torch

from quantbench.api import quantize, save
from quantbench.config import EXL2GridConfig, QuantizeConfig
from quantbench.eval.evaluator import prepare_windows
from quantbench.eval.protocol import EvalProtocol
from quantbench.formats.io import open_artifact
from quantbench.models.torch_model import build_causal_lm
from quantbench.quant.methods.exl2 import EXL2Options

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="exllamav2 runs on CUDA only and torch sees no CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("exllamav2") is None,
                       reason="the exllamav2 package is not installed (pip install exllamav2)"),
]

MIXES = ["1:4b_128g", "0.05:8b_32g/0.1:6b_32g/0.85:4b_128g",
         "0.1:5b_64g/0.2:3b_64g/0.7:2b_32g"]


def _perplexity(logits_of, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for row in windows:
        ids = row.unsqueeze(0)
        logits = logits_of(ids).float().cpu()
        nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:],
                                                       reduction="sum"))
        count += ids.shape[1] - 1
    return float(torch.exp(torch.tensor(nll / count)))


def _our_perplexity(out, windows: torch.Tensor) -> float:
    art = open_artifact(out)
    net = build_causal_lm(art.config, art.dequantized(), torch.float32).cuda().eval()
    with torch.inference_mode():
        return _perplexity(lambda ids: net(ids.cuda()).logits, windows)


@pytest.mark.parametrize("desc", MIXES)
def test_exllamav2_perplexity_matches_ours(sample, tmp_path, desc):
    from exllamav2 import ExLlamaV2, ExLlamaV2Config

    config = QuantizeConfig(method="exl2", grid=EXL2GridConfig.from_desc(desc),
                            options=EXL2Options(calib_samples=16, calib_len=512))
    out = save(quantize(sample, config=config), tmp_path / "exl2", format="exl2")
    windows, _ = prepare_windows(sample.tokenizer(), EvalProtocol(ctx=512, n_windows=8))
    ours = _our_perplexity(out, windows)
    cfg = ExLlamaV2Config(str(out))
    theirs_model = ExLlamaV2(cfg)
    theirs_model.load()
    with torch.inference_mode():
        theirs = _perplexity(lambda ids: theirs_model.forward(ids), windows)
    assert theirs == pytest.approx(ours, rel=5e-3), (desc, ours, theirs)
