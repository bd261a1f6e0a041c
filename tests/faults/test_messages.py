"""Class 6: a user-caused condition is one specific line saying what to do, never "internal
error" or a traceback.

Each class of bad input is generated here (several variants each) and run through every
command that takes it: JSON files that are not objects (config.json, quantbench.json, an EXL2
measurement), a manifest whose keys have the wrong types (generated from its schema), invalid
regular expressions (CLI, recipe, API), unreadable files (permissions), missing or broken
tokenizers, damaged recipes, imatrix files and eval/calibration texts, and a directory where a
file is expected. Every refusal leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.faults.conftest import assert_no_leftovers, assert_refused

EVAL = ("--ctx", 64, "--max-tokens", 128, "--no-cache")
CALIB = ("--calib-samples", 2, "--calib-len", 32, "-g", 32)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A dense int4 g32 artifact of a tiny llama (written once for the module)."""
    import quantbench as qb
    from tests.conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("messages")
    src = make_tiny_llama(root / "src")
    out = root / "art"
    qb.save(qb.quantize(str(src), method="zeropoint", group_size=32), out)
    return out


@pytest.fixture
def fresh_artifact(artifact, tmp_path):
    counter = iter(range(1000))

    def make() -> Path:
        dst = tmp_path / f"art{next(counter)}"
        shutil.copytree(artifact, dst)
        return dst
    return make


# -- JSON files that are not objects --------------------------------------------------------

NOT_AN_OBJECT = {
    "list": ("[1, 2]", "holds a list, not a JSON object"),
    "string": ('"llama"', "holds a string, not a JSON object"),
    "number": ("5", "holds a number, not a JSON object"),
    "null": ("null", "holds null, not a JSON object"),
    "bool": ("true", "not a JSON object"),
    "empty": ("", "is not valid JSON"),
    "truncated": ('{"model_type": "llama", "hid', "is not valid JSON"),
    "binary": (b"\x00\xff\xfe\x80", "is not UTF-8 text"),
    "nul": ('{"a": "\x00"}', "NUL bytes"),
    "directory": (None, "is a directory, not a file"),
}


def _damage(path: Path, content) -> None:
    if path.exists() and not path.is_dir():
        path.unlink()
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


@pytest.mark.parametrize("variant", sorted(NOT_AN_OBJECT))
@pytest.mark.parametrize("command", ["convert", "eval", "plan"])
def test_source_config_not_an_object(qb, fresh_llama, tmp_path, variant, command):
    src = fresh_llama("src")
    content, needle = NOT_AN_OBJECT[variant]
    _damage(src / "config.json", content)
    args = {"convert": ("convert", src, "-o", tmp_path / "out", "-g", 32),
            "plan": ("convert", src, "-o", tmp_path / "out", "-m", "gptq", "--plan"),
            "eval": ("eval", src, *EVAL)}[command]
    assert_refused(qb(*args), "config.json", needle)
    assert_no_leftovers(tmp_path, keep=("src",))


# upload reads quantbench.json; config.json it sends as a file (its checksum is checked)
ARTIFACT_JSON = [(name, command) for name in ("config.json", "quantbench.json")
                 for command in ("inspect", "eval", "upload")
                 if (name, command) != ("config.json", "upload")]


@pytest.mark.parametrize("variant", sorted(NOT_AN_OBJECT))
@pytest.mark.parametrize("name,command", ARTIFACT_JSON)
def test_artifact_json_not_an_object(qb, fresh_artifact, variant, name, command):
    art = fresh_artifact()
    content, needle = NOT_AN_OBJECT[variant]
    _damage(art / name, content)
    args = {"inspect": ("inspect", art), "eval": ("eval", art, *EVAL),
            "upload": ("upload", art, "--repo", "me/x", "--dry-run")}[command]
    if name == "config.json":  # its checksum refuses it first; past that, the reader does
        assert_refused(qb(*args), "config.json not as quantbench.json records")
        args = (*args, "--no-verify")
    assert_refused(qb(*args), name, needle)


# -- a manifest whose keys have the wrong types, generated from its schema ------------------

def _wrong_values(spec):
    """Values of another type than ``spec`` declares."""
    from quantbench.formats import manifest_schema as s

    if isinstance(spec, s.Maybe):
        return [v for v in _wrong_values(spec.inner) if v is not None]
    if isinstance(spec, (s.Obj, s.MapOf)):
        return [[1], "x"]
    if isinstance(spec, s.ListOf):
        return [{"a": 1}, "x"]
    return {s.STR: [5, ["x"]], s.INT: ["5", 2.5, True], s.NUM: ["x", None, [1]],
            s.BOOL: ["yes", 1], s.SCALAR: [[1], {"a": 1}], s.SHA256: ["abc", 5],
            s.ANY: []}[spec]


def _schema_cases(manifest):
    """(dotted key, path of keys, wrong value) for every key of the real manifest that the
    schema declares, down to the leaves (the first entry of maps)."""
    from quantbench.formats import manifest_schema as s

    cases = []

    def walk(value, spec, path):
        for wrong in _wrong_values(spec):
            cases.append((".".join(map(str, path)), tuple(path), wrong))
        if isinstance(spec, s.Maybe):
            spec = spec.inner
            if value is None:
                return
        if isinstance(spec, s.Obj):
            for key, inner in spec.keys.items():
                if key in value:
                    walk(value[key], inner, [*path, key])
        elif isinstance(spec, s.MapOf) and value:
            key = next(iter(value))
            walk(value[key], spec.value, [*path, key])
        elif isinstance(spec, s.ListOf) and value:
            walk(value[0], spec.item, [*path, 0])

    for key, inner in s.MANIFEST_SCHEMA.keys.items():
        if key in manifest:
            walk(manifest[key], inner, [key])
    return cases


# one of each kind of entry, named as in the tiny llama's artifact; keys the artifact lacks
# (``eval`` before an evaluation, ``command`` from the API) are filled in from here
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
EXAMPLE = {
    "manifest_version": 1, "tool": {"name": "quantbench", "version": "0"},
    "created": "2024", "format": "dense",
    "source": {"id": "x", "path": "/x", "architecture": "llama", "dtype": "float16"},
    "quantize": {"version": 1, "method": "zeropoint", "grid": {"kind": "int", "bits": 4},
                 "targets": {"include": ["a"], "exclude": ["b"], "embeddings": False,
                             "lm_head": False}, "options": {"device": "cpu"}},
    "summary": {"size_bytes": 1},
    "tensors": {Q_PROJ: {"shape": [1], "quantized": True, "bits": 4, "grid": "g",
                         "dtype": "f", "bits_per_weight": 4, "stats": {"a": 1}}},
    "files": {"model.safetensors": {"bytes": 1, "sha256": "0" * 64}},
    "eval": {"protocol": {}, "baseline_ppl": 1.0, "ppl": 1.0, "n_tokens": 1},
    "command": ["quantbench"]}
MANIFEST_CASES = _schema_cases(EXAMPLE)


def _set(manifest, path, value) -> None:
    """``manifest`` with the value at ``path`` replaced (missing parents from EXAMPLE)."""
    target, example = manifest, EXAMPLE
    for key in path[:-1]:
        example = example[key]
        if isinstance(target, dict) and target.get(key) in (None, [], {}):
            target[key] = copy.deepcopy(example)
        target = target[key]
    target[path[-1]] = value


def test_the_schema_walk_covers_every_declared_key():
    keys = {key for key, _, _ in MANIFEST_CASES}
    for expected in ("format", "files.model.safetensors.sha256", f"tensors.{Q_PROJ}.shape",
                     "quantize.targets.include.0", "source.id", "eval.ppl", "command"):
        assert expected in keys, sorted(keys)
    assert len(MANIFEST_CASES) > 60


@pytest.mark.parametrize("key,path,wrong", MANIFEST_CASES,
                         ids=[f"{k}={w!r}" for k, _, w in MANIFEST_CASES])
def test_manifest_key_of_the_wrong_type(qb, fresh_artifact, key, path, wrong):
    art = fresh_artifact()
    manifest = json.loads((art / "quantbench.json").read_text())
    _set(manifest, path, wrong)
    (art / "quantbench.json").write_text(json.dumps(manifest))
    for args in (("inspect", art), ("eval", art, *EVAL),
                 ("upload", art, "--repo", "me/x", "--dry-run")):
        assert_refused(qb(*args), "quantbench.json", "damaged")


@pytest.mark.parametrize("change,needle", [
    ({"files": {"../outside.txt": {"bytes": 1, "sha256": "0" * 64}}}, "not a plain file name"),
    ({"files": {"/etc/passwd": {"bytes": 1, "sha256": "0" * 64}}}, "not a plain file name"),
    ({"files": {"sub/model.safetensors": {"bytes": 1, "sha256": "0" * 64}}},
     "not a plain file name"),
    ({"files": {"": {"bytes": 1, "sha256": "0" * 64}}}, "not a plain file name"),
    ({"files": {"model.safetensors": {"bytes": 1}}}, "has no 'files.model.safetensors.sha256'"),
    ({"manifest_version": 99}, "newer than this quantbench reads"),
    ({"format": "nope"}, "'format' is 'nope'"),
    ({"quantize": {"method": "zeropoint", "grid": {"kind": "int", "bits": 99}}},
     "'quantize.grid' is not a grid"),
    ({"quantize": {"method": "zeropoint", "grid": {"kind": "spiral"}}}, "'quantize.grid'"),
    ({"format": None}, "'format' must be a string"),
])
@pytest.mark.parametrize("command", ["inspect", "eval", "upload"])
def test_manifest_values_that_cannot_be_right(qb, fresh_artifact, change, needle, command):
    art = fresh_artifact()
    manifest = json.loads((art / "quantbench.json").read_text())
    manifest.update(change)
    (art / "quantbench.json").write_text(json.dumps(manifest))
    args = {"inspect": ("inspect", art), "eval": ("eval", art, *EVAL),
            "upload": ("upload", art, "--repo", "me/x", "--dry-run")}[command]
    assert_refused(qb(*args), needle)


@pytest.mark.parametrize("missing", ["format", "manifest_version"])
def test_manifest_without_its_required_keys(qb, fresh_artifact, missing):
    art = fresh_artifact()
    manifest = json.loads((art / "quantbench.json").read_text())
    del manifest[missing]
    (art / "quantbench.json").write_text(json.dumps(manifest))
    assert_refused(qb("inspect", art), f"has no '{missing}'")


# -- invalid regular expressions -------------------------------------------------------------

BAD_PATTERNS = ["(", "[", "*", "+q_proj", "(?P<", "a{2,1}", "\\", "(?<=a+)b"]


@pytest.mark.parametrize("pattern", BAD_PATTERNS)
@pytest.mark.parametrize("flag", ["--include", "--exclude"])
def test_invalid_regex_on_the_command_line(qb, fresh_llama, tmp_path, pattern, flag):
    src = fresh_llama("src")
    for extra in ((), ("-m", "gptq", "--plan")):
        line = assert_refused(qb("convert", src, "-o", tmp_path / "out", "-g", 32, flag,
                                 pattern, *extra), f"{flag} pattern", repr(pattern),
                              "not a valid regular expression")
        assert "escape" in line
    assert_no_leftovers(tmp_path, keep=("src",))


@pytest.mark.parametrize("pattern", BAD_PATTERNS)
def test_invalid_regex_in_recipes_and_the_api(pattern):
    import quantbench as qb
    from quantbench.config import TargetConfig
    from quantbench.errors import ConfigError
    from quantbench.recipes import Recipe
    from quantbench.recipes.parts import RecipeError

    with pytest.raises(RecipeError, match=r"r\.yaml: jobs\[0\]\.targets: --exclude pattern"):
        Recipe.from_dict({"source": "x", "jobs": [{"method": "zeropoint", "group_size": 32,
                                                   "targets": {"exclude": [pattern]}}]},
                         origin="r.yaml")
    with pytest.raises(ConfigError, match="--include pattern"):
        TargetConfig(include=("mlp", pattern))
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        qb.quantize("not/loaded", targets=TargetConfig(exclude=(pattern,)))


def test_a_single_pattern_string_is_one_pattern():
    """``TargetConfig(include="q_proj")`` selects q_proj, not every name with a q, p, r ..."""
    from quantbench.config import TargetConfig
    from quantbench.errors import ConfigError

    assert TargetConfig(include="q_proj").include == ("q_proj",)
    with pytest.raises(ConfigError, match="regular expressions \\(strings\\), got 5"):
        TargetConfig(exclude=(5,))


# -- unreadable files (permissions) ----------------------------------------------------------

@pytest.fixture
def open_dir():
    """A folder anyone may enter (as root the CLI runs as nobody for these cases)."""
    path = Path(tempfile.mkdtemp(prefix="qb-perm-", dir="/tmp"))
    os.chmod(path, 0o777)
    yield path
    for p in [path, *path.rglob("*")]:
        with contextlib.suppress(OSError):
            os.chmod(p, 0o777)
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def unreadable(path: Path):
    """``path`` cannot be read: mode 000, and as root (who reads anything) nobody's uid."""
    mode = path.stat().st_mode & 0o777
    os.chmod(path, 0)
    root = os.geteuid() == 0
    if root:
        os.setegid(65534)
        os.seteuid(65534)
    try:
        yield
    finally:
        if root:
            os.seteuid(0)
            os.setegid(0)
        os.chmod(path, mode)


def _readable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        os.chmod(p, 0o777 if p.is_dir() else 0o666)
    return dst


@pytest.mark.parametrize("name,command", [
    ("config.json", "convert"), ("model.safetensors", "convert"), (".", "convert"),
    ("tokenizer.json", "gptq"), ("tokenizer_config.json", "eval"),
])
def test_unreadable_source_file(qb, fresh_llama, open_dir, name, command):
    src = _readable_copy(fresh_llama(), open_dir / "src")
    args = {"convert": ("convert", src, "-o", open_dir / "out", "-g", 32),
            "gptq": ("convert", src, "-o", open_dir / "out", "-m", "gptq", *CALIB),
            "eval": ("eval", src, *EVAL)}[command]
    with unreadable(src / name):
        result = qb(*args)
    line = assert_refused(result, "permission denied", "check its permissions")
    assert str(src / name if name != "." else src) in line
    assert_no_leftovers(open_dir, keep=("src",))


@pytest.mark.parametrize("name", ["quantbench.json", "config.json", "model.safetensors"])
def test_unreadable_artifact_file(qb, artifact, open_dir, name):
    art = _readable_copy(artifact, open_dir / "art")
    with unreadable(art / name):
        result = qb("inspect", art)
    assert_refused(result, str(art / name), "permission denied")


def test_unreadable_user_files(qb, fresh_llama, open_dir):
    src = _readable_copy(fresh_llama(), open_dir / "src")
    text = open_dir / "eval.txt"
    text.write_text("some text\n" * 500)
    os.chmod(text, 0o666)
    with unreadable(text):
        result = qb("eval", src, *EVAL, "--data", text)
    assert_refused(result, str(text), "permission denied")
    imatrix = open_dir / "im.dat"
    imatrix.write_bytes(b"\x00" * 64)
    with unreadable(imatrix):
        result = qb("convert", src, "-o", open_dir / "out", "-t", "Q4_K_M", "--imatrix",
                    imatrix)
    assert_refused(result, str(imatrix), "permission denied")
    assert_no_leftovers(open_dir, keep=("src", "eval.txt", "im.dat"))


def test_an_unexpected_permission_error_is_still_one_line(qb, fresh_artifact, monkeypatch):
    """The last resort in ``main``: a file-system refusal met where no reader expected it."""
    import quantbench.formats.inspect as inspect_module

    def denied(path, **kwargs):
        raise PermissionError(13, "Permission denied", str(path / "shard.bin"))
    monkeypatch.setattr(inspect_module, "inspect_artifact", denied)
    art = fresh_artifact()
    line = assert_refused(qb("inspect", art), "shard.bin", "permission denied")
    assert line.startswith("error: cannot use")

    def bug(path):
        raise KeyError("a real bug")
    monkeypatch.setattr(inspect_module, "inspect_artifact", bug)
    result = qb("inspect", art)
    assert result.code == 1 and "internal error" in result.stderr  # bugs stay bugs


# -- missing or broken tokenizers ------------------------------------------------------------

TOKENIZERS = {
    "missing": None, "garbage": "not json", "list": "[1]", "wrong object": '{"model": 5}',
    "empty": "", "binary": b"\x00\xff", "directory": "DIR", "config list": "CONFIG[1]",
}


@pytest.mark.parametrize("variant", sorted(TOKENIZERS))
@pytest.mark.parametrize("command", ["eval", "gptq"])
def test_missing_or_broken_tokenizer(qb, fresh_llama, tmp_path, variant, command):
    src = fresh_llama("src")
    value = TOKENIZERS[variant]
    tok = src / "tokenizer.json"
    if value is None:
        tok.unlink()
        (src / "tokenizer_config.json").unlink()
    elif value == "DIR":
        tok.unlink()
        tok.mkdir()
    elif isinstance(value, str) and value.startswith("CONFIG"):
        (src / "tokenizer_config.json").write_text(value[6:])
    else:
        _damage(tok, value)
    args = ("eval", src, *EVAL) if command == "eval" else \
        ("convert", src, "-o", tmp_path / "out", "-m", "gptq", *CALIB)
    assert_refused(qb(*args), f"no usable tokenizer in {src}", "tokenizer files")
    assert_no_leftovers(tmp_path, keep=("src",))


# -- recipes that are not what a recipe is ---------------------------------------------------

RECIPES = {
    "list": ("[1, 2]", "expected a mapping"),
    "string": ("hello", "expected a mapping"),
    "number": ("5", "expected a mapping"),
    "empty": ("", "expected a mapping"),
    "binary": (b"\xff\xfe\x00", "is not UTF-8 text"),
    "nul": ("jobs: []\x00", "NUL bytes"),
    "jobs not a list": ("jobs: x", "'jobs' must be a list"),
    "job not a mapping": ("source: s\njobs: [x]", "jobs[0]: expected a mapping"),
    "bits a word": ("source: s\njobs: [{method: zeropoint, bits: four}]", "expected an integer"),
    "targets a string": ("source: s\njobs: [{method: zeropoint, targets: x}]",
                         "targets: expected a mapping"),
    "eval a string": ("source: s\neval: x\njobs: [{method: zeropoint}]", "eval: expected"),
    "duplicate key": ("source: s\nsource: t\njobs: [{method: zeropoint}]", "given twice"),
    "duplicate job key": ("source: s\njobs: [{method: zeropoint, method: gptq}]",
                          "given twice"),
    "integer key": ("source: s\n5: x\njobs: [{method: zeropoint}]", "unknown key 5"),
    "tab indent": ("source: s\njobs:\n\t- method: zeropoint", "not valid YAML"),
    "directory": (None, "is a directory"),
    "python tag": ("jobs: !!python/object/apply:os.system ['true']", "not valid YAML"),
}


@pytest.mark.parametrize("variant", sorted(RECIPES))
def test_damaged_recipe(qb, tmp_path, variant):
    content, needle = RECIPES[variant]
    path = tmp_path / "recipe.yaml"
    _damage(path, content)
    assert_refused(qb("run", path), needle)
    assert_no_leftovers(tmp_path, keep=("recipe.yaml",))


@pytest.mark.parametrize("content,needle", [
    (b"\xff" * 100, "not UTF-8 text"), (b"", "is empty"), (None, "is a directory")])
def test_recipe_eval_text_checked_before_any_work(qb, fresh_llama, tmp_path, content, needle):
    src = fresh_llama("src")
    data = tmp_path / "eval.txt"
    _damage(data, content)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"source: {src}\noutput_dir: {tmp_path / 'out'}\n"
                      f"eval: {{data: {data}, ctx: 64, max_tokens: 128}}\n"
                      "jobs: [{method: zeropoint, group_size: 32}]\n")
    assert_refused(qb("run", recipe), "r.yaml: job zeropoint-w4-g32", needle)
    assert_no_leftovers(tmp_path, keep=("src", "eval.txt", "r.yaml"))


def test_merge_keys_still_work_beside_the_duplicate_check():
    from quantbench.recipes import Recipe

    recipe = Recipe.from_yaml("source: s\ndefaults: &d {group_size: 32}\n"
                              "jobs: [{<<: *d, method: zeropoint, group_size: 64}]")
    assert recipe.plan()[0].config.grid.group_size == 64


# -- eval and calibration texts --------------------------------------------------------------

def _texts(folder: Path) -> dict[str, tuple[Path, str]]:
    import gzip

    folder.mkdir()
    out = {}

    def add(name, data, needle):
        path = folder / name
        if data is None:
            path.mkdir()
        elif isinstance(data, bytes):
            path.write_bytes(data)
        elif data != "MISSING":
            path.write_text(data)
        out[name] = (path, needle)

    add("missing.txt", "MISSING", "does not exist")
    add("empty.txt", "", "is empty")
    add("blank.txt", " \n\n\t\n", "is empty")
    add("random.bin", bytes(range(256)) * 8, "not UTF-8 text")
    add("latin1.txt", "café au lait ".encode("latin-1") * 100, "not UTF-8 text")
    add("nul.txt", "hello\x00world " * 200, "NUL bytes")
    add("text.txt.gz", gzip.compress(b"hello world " * 500), "not UTF-8 text")
    add("folder.txt", None, "is a directory")
    add("short.txt", "hello world", "fewer than")
    add("bad.jsonl", '{"text": "a"}\n{bad\n', "line 2 is not valid JSON")
    add("list.jsonl", "[1, 2]\n", "no string 'text' field")
    add("notext.jsonl", '{"body": "a"}\n', "no string 'text' field")
    return out


@pytest.mark.parametrize("command", ["eval", "calibration"])
def test_damaged_texts(qb, fresh_llama, tmp_path, command):
    src = fresh_llama("src")
    for name, (path, needle) in _texts(tmp_path / "texts").items():
        args = ("eval", src, *EVAL, "--data", path) if command == "eval" else \
            ("convert", src, "-o", tmp_path / "out", "-m", "gptq", *CALIB, "--calib-data", path)
        assert_refused(qb(*args), needle)
    assert_no_leftovers(tmp_path, keep=("src", "texts"))


# -- imatrix files, EXL2 measurements, AWQ search files -------------------------------------

@pytest.mark.parametrize("content,needle", [
    (b"", "not a llama.cpp imatrix file"),
    (b"GGUF" + bytes(range(100)), "not a readable GGUF file"),
    (bytes(range(97, 123)) * 4, "not a llama.cpp imatrix file"),
    ((10**9).to_bytes(4, "little") + b"\x00" * 20, "not a llama.cpp imatrix file"),
    (None, "is a directory"),
])
def test_damaged_imatrix(qb, fresh_llama, tmp_path, content, needle):
    src = fresh_llama("src")
    path = tmp_path / "imatrix.dat"
    _damage(path, content)
    assert_refused(qb("convert", src, "-o", tmp_path / "out", "-t", "Q4_K_M", "--imatrix",
                      path), str(path), needle)
    assert_no_leftovers(tmp_path, keep=("src", "imatrix.dat"))


@pytest.mark.parametrize("content,needle", [
    *[(c, n) for c, n in NOT_AN_OBJECT.values() if c is not None],
    ('{"kind": "other"}', "not a quantbench EXL2 measurement"),
    ('{"kind": "quantbench-exl2-measurement", "version": "x"}', "damaged"),
    (None, "is a directory"),
])
def test_damaged_exl2_measurement(qb, fresh_llama, tmp_path, content, needle):
    from quantbench.quant.exl2.measure import KIND

    src = fresh_llama("src")
    path = tmp_path / "measurement.json"
    _damage(path, content.replace("quantbench-exl2-measurement", KIND)
            if isinstance(content, str) else content)
    assert_refused(qb("convert", src, "-o", tmp_path / "out", "-m", "exl2", "--bpw", 4,
                      "--measurement", path), "measurement", needle)
    assert_no_leftovers(tmp_path, keep=("src", "measurement.json"))


# -- a directory where a file is expected, and the other way round ---------------------------

def test_directory_where_a_file_is_expected(qb, fresh_llama, fresh_artifact, tmp_path):
    src = fresh_llama("src")
    folder = tmp_path / "folder"
    folder.mkdir()
    assert_refused(qb("eval", src, *EVAL, "--json", folder), "--json", "is a directory")
    assert_refused(qb("compare", src, "-m", "zeropoint", "-b", 4, "-g", 32, *EVAL[:4],
                      "--json", folder), "--json", "is a directory")
    assert_refused(qb("compare", src, "-m", "zeropoint", "-b", 4, "-g", 32, *EVAL[:4],
                      "--json", tmp_path / "c.json", "--plot", folder), "--plot",
                   "is a directory")
    assert_refused(qb("convert", src, "-o", tmp_path / "out", "-g", 32, "--json", folder),
                   "--json", "is a directory")
    assert_refused(qb("convert", src, "-o", tmp_path / "out", "-m", "awq", *CALIB,
                      "--search-file", folder), "--search-file", "is a directory")
    assert_refused(qb("run", folder), "is a directory")
    assert not any(folder.iterdir())
    assert_no_leftovers(tmp_path, keep=("src", "folder"))


def test_file_where_a_directory_is_expected(qb, fresh_llama, tmp_path):
    src = fresh_llama("src")
    config = src / "config.json"
    assert_refused(qb("convert", config, "-o", tmp_path / "out"), "is a file, not a model")
    assert_refused(qb("inspect", config), "not a directory")
    assert_refused(qb("eval", config, *EVAL), "is a file, not a model")
    assert_refused(qb("upload", config, "--repo", "me/x", "--dry-run"), "not a directory")
    assert_refused(qb("eval", src, *EVAL, "--baseline", config), "is a file")
    assert_no_leftovers(tmp_path, keep=("src",))


def test_json_of_eval_is_refused_before_any_work(qb, fresh_llama, tmp_path, monkeypatch):
    """The directory check comes first: no model is loaded for a run that cannot finish."""
    import quantbench.eval.run as run

    src = fresh_llama("src")
    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    (tmp_path / "r.json").mkdir()
    assert_refused(qb("eval", src, *EVAL, "--json", tmp_path / "r.json"), "is a directory")


# -- the Python API: options of the wrong type ------------------------------------------------

def _every_option():
    from quantbench.options import field_type, option_fields
    from quantbench.registry import get_method, method_names

    return [(m, f.name, field_type(f)[0]) for m in method_names()
            for f in option_fields(get_method(m).options_cls)]


WRONG_TYPE = {bool: ["no", 1, None], int: ["4", 2.5, True], float: ["0.1", [1]],
              str: [5, ["cpu"], True]}


@pytest.mark.parametrize("method,name,kind", _every_option(),
                         ids=[f"{m}-{n}" for m, n, _ in _every_option()])
def test_api_option_of_the_wrong_type(method, name, kind):
    """``qb.quantize(..., act_order="no")`` would be true: every option's type is checked,
    before the model is even looked for."""
    import quantbench as qb
    from quantbench.errors import ConfigError
    from quantbench.options import field_type, option_fields
    from quantbench.registry import get_method

    optional = {f.name: field_type(f)[1] for f in
                option_fields(get_method(method).options_cls)}[name]
    for wrong in WRONG_TYPE[kind]:
        if wrong is None and optional:
            continue
        with pytest.raises(ConfigError) as info:
            qb.quantize("not/loaded", method=method, **{name: wrong})
        assert "must be" in str(info.value) and repr(wrong) in str(info.value), str(info.value)


@pytest.mark.parametrize("value,needle", [
    ("q_proj", "targets must be a TargetConfig"),
    ({"include": ["mlp"]}, "targets must be a TargetConfig"),
])
def test_api_targets_and_grid_kind_of_the_wrong_type(value, needle):
    import quantbench as qb
    from quantbench.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        qb.quantize("not/loaded", group_size=32, targets=value)
    with pytest.raises(ConfigError, match="symmetric must be true, false or None"):
        qb.quantize("not/loaded", method="absmax", group_size=32, symmetric="yes")


# -- AWQ search files that are not this model's search -----------------------------------------

def test_search_file_that_is_not_an_awq_search(qb, fresh_llama, tmp_path):
    src = fresh_llama("src")
    assert_refused(qb("convert", src, "-o", tmp_path / "out", "-m", "awq", "-g", 32,
                      "--search-file", src / "model.safetensors"), "is not an AWQ search",
                   "lm_head.weight")
    empty = tmp_path / "empty.safetensors"
    from safetensors.torch import save_file
    save_file({}, str(empty))
    assert_refused(qb("convert", src, "-o", tmp_path / "out", "-m", "awq", "-g", 32,
                      "--search-file", empty), "it is empty")
    assert_no_leftovers(tmp_path, keep=("src", "empty.safetensors"))


@pytest.mark.parametrize("change,needle", [
    (lambda t: {k: v[:-1] for k, v in t.items()}, "rows"),
    (lambda t: {k.replace("layers.0.", "layers.9."): v for k, v in t.items()}, "has no"),
])
def test_search_file_of_another_model(qb, fresh_llama, tmp_path, change, needle):
    import torch
    from safetensors.torch import save_file

    src = fresh_llama("src")
    search = {"model.layers.0.input_layernorm.awq_scales": torch.ones(64),
              "model.layers.0.self_attn.q_proj.awq_clip": torch.ones(64, 2, 1)}
    path = tmp_path / "search.safetensors"
    save_file(change(search), str(path))
    assert_refused(qb("convert", src, "-o", tmp_path / "out", "-m", "awq", "-g", 32,
                      "--search-file", path), "search of another model", needle)
    assert_no_leftovers(tmp_path, keep=("src", "search.safetensors"))


@pytest.mark.parametrize("flag,typo,suggestion", [("-m", "gtpq", "gptq"), ("-m", "AWQ", "awq"),
                                                  ("-f", "compresed-tensors",
                                                   "compressed-tensors")])
def test_a_misspelled_name_gets_a_did_you_mean(qb, fresh_llama, tmp_path, flag, typo,
                                               suggestion):
    result = qb("convert", fresh_llama(), "-o", tmp_path / "out", flag, typo)
    assert_refused(result, f"did you mean {suggestion!r}")
    assert not (tmp_path / "out").exists()


def test_outputs_follow_the_umask(qb, fresh_llama, tmp_path):
    """Built private, published with the mode the user's umask gives any new file."""
    import os

    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert qb("convert", fresh_llama(), "-o", out, "-g", 32).code == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f.name
