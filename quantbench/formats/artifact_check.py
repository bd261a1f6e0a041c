"""A quantized artifact used as input, checked against its manifest and its config before it
is evaluated, inspected or compared.

Against the manifest's ``tensors`` table (what the writer wrote): every listed tensor is in
the files with the listed shape, and the files hold no tensor it does not list. Against the
config: the tensors are exactly those the architecture implies (``models/validate.py``, the
same expectation as for a source). Names and plain tensors' shapes come from the headers; a
quantized tensor's logical shape is known only once decoded, so it is checked then
(``Artifact.quantized``) against the shape expected here.
"""
from __future__ import annotations

from typing import Any, Mapping

from quantbench.errors import FormatError, ModelLoadError
from quantbench.formats.base import MANIFEST, Artifact
from quantbench.models.arch import arch_for
from quantbench.models.validate import Context, check_tensors, expected_tensors


def check_artifact(art: Artifact, config_checked: bool = False) -> Artifact:
    """Refuse the first disagreement between the artifact's files, its manifest and its
    config (``config_checked``: the reader already compared the tensors with the config, as
    the GGUF reader does with its metadata); returns ``art`` ready to decode."""
    table = _manifest_table(art)
    shapes: dict[str, Any] = {name: tuple(art.weights.shape(name)) for name in art.plain_names}
    shapes.update({name: None for name in art.quantized_names})
    if table is not None:
        _check_table(art, table, shapes)
        for name in art.quantized_names:
            shapes[name] = tuple(table[name]["shape"])
    if not config_checked:
        try:
            arch, ctx = arch_for(art.config.get("model_type")), Context(str(art.path))
            skip = check_tensors(art.config, arch, shapes, ctx)
            implied = expected_tensors(art.config, arch, ctx)
        except ModelLoadError as exc:  # an artifact is a format's concern
            raise FormatError(str(exc)) from exc
        art.plain_names = [n for n in art.plain_names if n not in skip]
        for name in art.quantized_names:  # no manifest: the config says what it decodes to
            want = implied[name].shape if name in implied else None
            if shapes[name] is None and want is not None and None not in want:
                shapes[name] = want
    art.expected_shapes = {n: s for n, s in shapes.items() if s is not None}
    return art


def _manifest_table(art: Artifact) -> Mapping[str, Any] | None:
    """The manifest's ``tensors`` table (None without a manifest), checked for form."""
    if art.manifest is None:
        return None
    where = art.path / MANIFEST if art.path.is_dir() else art.path.parent / MANIFEST
    table = art.manifest.get("tensors") if isinstance(art.manifest, dict) else None
    if not isinstance(table, dict) or not all(
            isinstance(row, dict) and isinstance(row.get("shape"), list)
            and all(isinstance(d, int) for d in row["shape"]) for row in table.values()):
        raise FormatError(f"{where} has no valid 'tensors' table (name → shape); the manifest "
                          "is damaged: re-create the artifact")
    return table


def _check_table(art: Artifact, table: Mapping[str, Any], shapes: Mapping[str, Any]) -> None:
    from quantbench.registry import get_format

    codes = get_format(art.format).stores_codes  # dense writes quantized tensors dequantized
    for name, row in table.items():
        if name not in shapes:
            raise FormatError(f"{art.path}: the manifest lists tensor {name}, which the files do "
                              "not hold; the artifact is incomplete: re-create it")
        stored = name in art.quantized_names
        if codes and isinstance(row.get("quantized"), bool) and row["quantized"] != stored:
            raise FormatError(f"{art.path}: tensor {name} is stored "
                              f"{'quantized' if stored else 'unquantized'}, the manifest lists it "
                              f"as {'unquantized' if stored else 'quantized'}; the artifact was "
                              "altered: re-create it")
        if shapes[name] is not None and list(shapes[name]) != row["shape"]:
            raise FormatError(f"{art.path}: tensor {name} has shape {list(shapes[name])}, the "
                              f"manifest lists {row['shape']}; the artifact is damaged: "
                              "re-create it")
    extra = [n for n in art.quantized_names + art.plain_names if n not in table]
    if extra:
        kind = "quantized tensor" if extra[0] in art.quantized_names else "tensor"
        raise FormatError(f"{art.path}: the files hold {kind} {extra[0]}, which the manifest "
                          "does not list; the artifact was altered: re-create it")
