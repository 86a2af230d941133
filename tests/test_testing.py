"""What the generated suites call, without a GPU: the choice of a case's seed."""
import pytest

from attngen import testing
from attngen.generate.cases import Case


def test_the_seed_variable_reproduces_a_case(monkeypatch):
    monkeypatch.setenv("ATTNGEN_TEST_SEED", "1234")
    assert [testing.case_seed() for _ in range(3)] == [1234] * 3
    monkeypatch.setenv("ATTNGEN_TEST_SEED", " 0 ")
    assert testing.case_seed() == 0
    for bad in ("seven", "-1", "1.5", str(2**63)):
        monkeypatch.setenv("ATTNGEN_TEST_SEED", bad)
        with pytest.raises(ValueError, match="ATTNGEN_TEST_SEED must be an integer"):
            testing.case_seed()


def test_without_the_variable_every_case_gets_a_fresh_seed(monkeypatch):
    monkeypatch.delenv("ATTNGEN_TEST_SEED", raising=False)
    seeds = {testing.case_seed() for _ in range(16)}
    assert len(seeds) > 1 and all(0 <= s < 2**31 for s in seeds)
    monkeypatch.setenv("ATTNGEN_TEST_SEED", "")
    assert len({testing.case_seed() for _ in range(16)}) > 1


def test_a_failure_names_the_setting_that_reproduces_it():
    where = testing._where(Case("one-token-b1-h1kv1-s1-w8-bhsd", 1, 1, 1), 42)
    assert "one-token-b1-h1kv1-s1-w8-bhsd" in where and "ATTNGEN_TEST_SEED=42" in where
