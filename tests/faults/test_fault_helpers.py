"""The fault suite's helpers themselves: a refusal is recognised, an acceptance is not."""
import pytest

from tests.faults.conftest import assert_no_leftovers, assert_refused


def test_missing_source_is_refused_in_process(qb, tmp_path):
    result = qb("convert", tmp_path / "nope", "-o", tmp_path / "out")
    assert_refused(result, "does not exist")
    assert_no_leftovers(tmp_path)


def test_an_accepted_run_fails_the_contract(qb, fresh_llama, tmp_path):
    src = fresh_llama()
    result = qb("inspect", src)
    assert result.code == 0, result.stderr
    with pytest.raises(AssertionError):
        assert_refused(result)
