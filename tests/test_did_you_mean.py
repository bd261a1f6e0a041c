"""Unknown names get the near one they probably meant, in one wording
(``registry.did_you_mean``): methods, formats, GGUF types, method options (CLI flags are
click's own suggestion)."""
from __future__ import annotations

import pytest

from quantbench.errors import ConfigError
from tests.faults.conftest import _qb, assert_refused


@pytest.fixture
def qb(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    return lambda *args: _qb(capsys, *args)


@pytest.mark.parametrize("name, choices, hint", [
    ("gptw", ["gptq", "rtn"], "did you mean 'gptq'? "),
    ("q4km", ["Q4_K_M", "Q4_K_S"], "did you mean 'Q4_K_M'? "),      # case and _ ignored
    ("compressed_tensors", ["compressed-tensors", "dense"], "did you mean 'compressed-tensors'? "),
    ("zzz", ["gptq", "rtn"], ""),
])
def test_did_you_mean(name, choices, hint):
    from quantbench.registry import did_you_mean

    assert did_you_mean(name, choices) == hint


@pytest.mark.parametrize("args, needles", [
    (("-t", "q4km"), ("unknown GGUF type 'q4km'", "did you mean 'Q4_K_M'?")),
    (("-m", "gptw"), ("unknown method 'gptw'", "did you mean 'gptq'?")),
    (("-f", "compresed-tensors"), ("unknown format", "did you mean 'compressed-tensors'?")),
    (("-m", "gptq", "--calib-sample", "4"), ("--calib-samples",)),
])
def test_cli_suggests(qb, tiny_llama, tmp_path, args, needles):
    assert_refused(qb("convert", tiny_llama, *args, "-o", tmp_path / "o"), *needles)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_python_keywords_suggest(method):
    from quantbench.quant.run import make_config

    with pytest.raises(ConfigError, match="takes no calib_sample option; did you mean "
                                          "calib_samples?"):
        make_config(method, calib_sample=4)
