"""The Python API: ``load_model``, ``quantize``, ``save``, ``evaluate``, ``compare``, ``inspect``,
``upload`` (and ``run_recipe``).

Thin wrappers that accept friendly arguments and delegate to the registered pieces.

Progress: every long call (``quantize``, ``save``, ``evaluate``,
``compare``, ``run_recipe``) shows it by default where it is read — a bar in a terminal, a
tqdm bar in a Jupyter notebook, one plain line per step (at most one every 5 s) in a log or a
pipe. ``progress=False`` silences one call; ``QUANTBENCH_PROGRESS=off`` silences all of them
(``plain`` or ``bar`` forces a style; ``progress=True`` shows it even when the variable says
``off``). See :mod:`quantbench.progress`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from quantbench.config import QuantizeConfig, TargetConfig
from quantbench.models.loader import Model, load_model


def _as_model(model: "Model | str | os.PathLike", trust_remote_code: bool = False,
              allow_non_finite: bool = False) -> Model:
    if isinstance(model, Model):
        if allow_non_finite:  # the caller's opt-in applies to the model it passed
            model.weights.allow_non_finite = True
        return model
    return load_model(model, trust_remote_code, allow_non_finite=allow_non_finite)


def quantize(model: "Model | str", method: str = "zeropoint", bits: int | None = None,
             group_size: int | None = None, symmetric: bool | None = None,
             targets: TargetConfig | None = None, config: QuantizeConfig | None = None,
             progress: bool | None = None, allow_non_finite: bool = False, **options: Any):
    """Quantize ``model`` (a ``Model`` or a source string): calibration and quantization run
    here (with progress, in blocks; ``progress=False`` silences it), and the
    ``QuantizedModel`` returned holds the result, so saving it in several formats does not
    quantize again.

    Without ``group_size`` the method's default is used where it divides every quantized row,
    else the largest of 64 or 32 that does (announced on the log; ``qmodel.config`` holds it).

    NaN/Inf in a source weight is refused; ``allow_non_finite=True`` (as
    ``load_model(..., allow_non_finite=True)``) keeps the tensors holding them unquantized,
    with a warning naming them.

    >>> q = quantize("sample:smollm2", method="zeropoint", bits=4, group_size=64)  # doctest: +SKIP
    """
    from quantbench.quant.run import make_config, quantize as run_quantize, quantize_progress

    if config is None:
        config = make_config(method, bits, group_size, symmetric, targets, **options)
    qmodel = run_quantize(_as_model(model, allow_non_finite=allow_non_finite), config)
    label = f"{config.method} {qmodel.config.grid.describe()}"  # the group size fitted
    with quantize_progress(qmodel, label, progress) as step:
        return qmodel.run(step)


def save(qmodel, out: "str | os.PathLike", format: str = "dense", overwrite: bool = False,
         progress: bool | None = None) -> Path:
    """Write a quantized model in ``format`` into the directory ``out`` (for ``gguf``, an ``out``
    ending in ``.gguf`` is that file, its manifest beside it as ``NAME.gguf.quantbench.json``);
    atomic: a failure leaves nothing behind. Progress (``progress=False`` silences it) counts
    the blocks written."""
    from quantbench.formats.io import write_artifact
    from quantbench.quant.run import quantize_progress

    with quantize_progress(qmodel, f"writing {format}", progress) as step:
        return write_artifact(qmodel, Path(out), format, overwrite=overwrite, on_step=step)


def evaluate(target, baseline=None, verify: bool = True, progress: bool | None = None,
             **kwargs: Any):
    """Perplexity, KLD and top-1 of an artifact (or source) against its FP baseline; a
    quantbench output is first checked against its manifest (``verify=False`` skips it).
    Progress counts the windows scored (``progress=False`` silences it). ``stream="on"``
    runs the models block by block (a model larger than memory), "off" whole, "auto" (the
    default) by the estimated memory; ``plan_eval`` takes the same arguments and returns
    that estimate."""
    from quantbench.eval.run import evaluate_one

    return evaluate_one(target, baseline=baseline, verify=verify, progress=progress, **kwargs)


def plan_eval(target, baseline=None, **kwargs: Any):
    """The estimated peak memory of :func:`evaluate` with these arguments, whole and
    block-streamed, and the mode it would run in (nothing is evaluated)."""
    from quantbench.eval.run import plan_eval as plan

    return plan(target, baseline=baseline, **kwargs)


def compare(source, methods=("absmax", "zeropoint"), bits=(8, 4),
            progress: bool | None = None, **kwargs: Any):
    """Quantize ``source`` with every method × bits, write, read back, evaluate, tabulate
    (with progress for each step; ``progress=False`` silences it)."""
    from quantbench.eval.compare import run_compare

    return run_compare(source, methods=methods, bits=bits, progress=progress, **kwargs)


def inspect(path: "str | os.PathLike", verify: bool = True) -> dict[str, Any]:
    """Format, config, tensors with dtypes/shapes/bits, total size and bits per weight, and
    ``files_ok``: whether the files match the manifest (``files_failed`` names those that do
    not; ``verify=False``: not checked, None)."""
    from quantbench.formats.inspect import inspect_artifact

    return inspect_artifact(Path(path), verify=verify)


def upload(path: "str | os.PathLike", repo_id: str, *, private: bool = False,
           revision: str | None = None, commit_message: str | None = None,
           token: str | None = None, dry_run: bool = False, card: bool = True,
           command: str | None = None, endpoint: str | None = None, verify: bool = True):
    """Upload an artifact directory to the Hugging Face Hub with a model card; returns an
    ``UploadResult`` (``dry_run``: the files and card, nothing sent). Its files are checked
    against its manifest first (``verify=False`` skips it).

    >>> qb.upload("out/w4g64", "me/model-w4g64", dry_run=True).files  # doctest: +SKIP
    """
    from quantbench.hub.upload import upload_artifact

    return upload_artifact(path, repo_id, private=private, revision=revision,
                           commit_message=commit_message, token=token, dry_run=dry_run,
                           card=card, command=command, endpoint=endpoint, verify=verify)
