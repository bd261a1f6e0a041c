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
from quantbench.models.arch import arch_of
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
        _check_settings(art, table)
        for name in art.quantized_names:
            shapes[name] = tuple(table[name]["shape"])
    if not config_checked:
        try:
            arch, ctx = arch_of(art.config), Context(str(art.path))
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
    from quantbench.formats.manifest import manifest_path

    where = manifest_path(art.path) or art.path / MANIFEST
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


# keys that name the writing tool or its version, not how the tensors are to be read
_PROVENANCE = frozenset({"meta", "quantizer"})


def _check_settings(art: Artifact, table: Mapping[str, Any]) -> None:
    """The format's settings files (``config.json``'s ``quantization_config``, GPTQ's
    ``quantize_config.json``) say what the manifest's ``quantize`` section implies: a runtime
    reads the files, so an edited ``sym``, ``desc_act`` or checkpoint format would have it load
    other weights than the ones quantbench wrote and scored. The expectation is regenerated by
    the format's own writer from the manifest; provenance keys are not compared."""
    from quantbench.config import QuantizeConfig
    from quantbench.registry import get_format

    quantize = art.manifest.get("quantize")
    if not quantize or not art.path.is_dir() or not (art.path / "config.json").is_file():
        return
    try:
        config = QuantizeConfig.from_dict(quantize)
        fmt = get_format(art.format)()
    except Exception as exc:  # noqa: BLE001  (an unknown method/grid: the manifest is damaged)
        raise FormatError(f"{art.path / MANIFEST}: its 'quantize' section does not describe a "
                          f"quantization ({type(exc).__name__}: {exc}); the manifest is "
                          "damaged: re-create the artifact") from exc
    targets = [name for name, row in table.items() if row.get("quantized")]
    arch = arch_of(art.config)
    expected = {"config.json": fmt.quantization_config(config, targets, arch)}
    for fname, text in fmt.extra_files(config, targets, arch).items():
        if fname.endswith(".json"):
            expected[fname] = _json(text)
    for fname, want in expected.items():
        if want is None:
            continue
        found = art.config.get("quantization_config") if fname == "config.json" else \
            _json((art.path / fname).read_text()) if (art.path / fname).is_file() else None
        where = f"{fname}'s quantization_config" if fname == "config.json" else fname
        problem = _first_difference(want, found, "")
        if problem is not None:
            raise FormatError(f"{art.path}: {where} {problem}, which is not what {MANIFEST} "
                              "records it was written with; a runtime would load other weights "
                              "than quantbench wrote: re-create the artifact")


def _json(text: str) -> Any:
    from quantbench.jsonfile import loads_strict

    try:
        return loads_strict(text)
    except ValueError:
        return None


def _first_difference(want: Any, found: Any, where: str) -> str | None:
    """``has KEY = FOUND, not WANT`` for the first key (depth first) whose value differs."""
    if isinstance(want, dict):
        if not isinstance(found, dict):
            return f"has {where or 'its settings'} = {found!r}, not an object"
        for key, value in want.items():
            if key in _PROVENANCE:
                continue
            path = f"{where}.{key}" if where else key
            if key not in found:
                return f"lacks {path!r} (expected {value!r})"
            problem = _first_difference(value, found[key], path)
            if problem is not None:
                return problem
        return None
    if _names(want) and _names(found):  # module lists: the manifest's order is not the writer's
        want, found = sorted(want), sorted(found)
    if want != found:
        return f"has {where!r} = {_short(found)}, not {_short(want)}"
    return None


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
