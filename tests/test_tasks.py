"""Task records, the synthetic suite and the metrics: what data users train and score on."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from common.metrics import exact_match, normalize, rouge_l, score
from common.records import TaskRecord, read_jsonl, write_jsonl
from cotune.demo.synthetic import all_text, make_suite, write_suite


def _key(record: TaskRecord) -> tuple[str | None, str]:
    # Translation is word by word with unique invented words, so (domain, response)
    # identifies (domain, English phrase).
    return record.domain, record.response


def _words_of(suite, domain: str, public: bool) -> set[str]:
    lexicon = suite.lexicons[domain]
    chosen = set(suite.public_words[domain])
    return {form for word, form in lexicon.items() if (word in chosen) == public}


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    a = write_suite(make_suite(num_clients=2, seed=7), tmp_path / "a")
    b = write_suite(make_suite(num_clients=2, seed=7), tmp_path / "b")
    assert a.keys() == b.keys()
    assert {"public", "aux", "test", "client_0", "client_1", "client_0_test"} <= set(a)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    other = write_suite(make_suite(num_clients=2, seed=8), tmp_path / "c")
    assert other["test"].read_bytes() != a["test"].read_bytes()


def test_no_phrase_in_both_training_and_test() -> None:
    suite = make_suite(num_clients=4, seed=1)
    train = suite.public + suite.aux + [r for c in suite.clients for r in c]
    test = suite.test + [r for c in suite.client_tests for r in c]
    train_keys = {_key(r) for r in train}
    test_keys = {_key(r) for r in test}
    assert not train_keys & test_keys
    assert not {r.prompt for r in train} & {r.prompt for r in test}
    # aux is disjoint from the pretraining pool too (the server's data is new to the LLM).
    assert not {_key(r) for r in suite.public} & {_key(r) for r in suite.aux}


def test_splits_have_the_promised_content() -> None:
    suite = make_suite(num_clients=3, seed=0, per_client=100, test_per_domain=10)
    assert suite.domains == ["velish", "orkan", "miri", "tesh"]
    for record in suite.public + suite.aux:
        assert set(record.response.split()) <= _words_of(suite, record.domain, public=True)
    assert Counter(r.domain for r in suite.test) == dict.fromkeys(suite.domains, 10)
    test_words = {w for r in suite.test for w in r.response.split()}
    private = set().union(*(_words_of(suite, d, public=False) for d in suite.domains))
    assert test_words & private, "the test split must also ask for private words"
    for client in suite.clients:
        words = {w for r in client for w in r.response.split()}
        assert words & private and words - private
    # The language name is in the prompt, so the task is well defined.
    assert all(r.domain.capitalize() in r.prompt for r in suite.test)
    assert len(all_text(suite)) > 2 * len(suite.public)


@pytest.mark.parametrize("skew", [0.8, 0.5, 1.0])
def test_client_skew_is_respected(skew: float) -> None:
    suite = make_suite(num_clients=5, seed=3, skew=skew, per_client=200)
    for k, (train, test) in enumerate(zip(suite.clients, suite.client_tests, strict=True)):
        home = suite.domains[k % len(suite.domains)]
        for records in (train, test):
            counts = Counter(r.domain for r in records)
            assert counts[home] == round(skew * len(records))
            others = [counts[d] for d in suite.domains if d != home]
            assert max(others) - min(others) <= 1
        assert len(train) == 200


def test_too_many_records_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="ran out of distinct public phrases"):
        make_suite(public_size=20_000)


def test_jsonl_round_trip(tmp_path: Path) -> None:
    records = [TaskRecord("a “b”", "ç", "x"), TaskRecord("p", "r")]
    path = tmp_path / "d" / "r.jsonl"
    write_jsonl(path, records)
    assert read_jsonl(path) == records
    assert not [p for p in path.parent.iterdir() if p.name != "r.jsonl"], "temp file left"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": "p"}', 'missing "response"'),
        ('{"prompt": 3, "response": "r"}', '"prompt" must be a string'),
        ('["p", "r"]', "expected a JSON object"),
        ('{"prompt": "p", "response": "r", "domain": 1}', '"domain" must be a string'),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "p", "response": "r"})
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        read_jsonl(path)
    assert "bad.jsonl:3:" in str(info.value)


def test_jsonl_empty_or_missing_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no records"):
        read_jsonl(empty)
    with pytest.raises(ValueError, match="no such file"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_metrics() -> None:
    assert normalize("  Ses,  NELES! ") == "ses neles"
    assert exact_match("Ses neles.", "ses neles") == 1.0
    assert exact_match("ses", "ses neles") == 0.0
    assert rouge_l("ses neles", "ses neles") == 1.0
    # LCS 1 of 1 predicted and 2 reference words: P=1, R=1/2, F=2/3.
    assert rouge_l("ses", "ses neles") == pytest.approx(2 / 3)
    assert rouge_l("café noir", "café noir") == 1.0  # non-ASCII words count
    out = score(["a b", "x", "c"], ["a b", "y", "c d"], ["d1", "d2", "d1"])
    assert out["n"] == 3
    assert out["em"] == pytest.approx(1 / 3)
    assert out["rougeL"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert out["per_domain"]["d1"] == {"rougeL": pytest.approx(5 / 6), "em": 0.5, "n": 2}
    assert "per_domain" not in score(["a"], ["a"])
    with pytest.raises(ValueError):
        score(["a"], ["a", "b"])
