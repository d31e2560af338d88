"""The quality benchmark: its synthetic world is deterministic and leak-free, its bootstrap is
right on toy cases, and a tiny end-to-end run reports every method, every claim, and reads the
test split exactly once per run."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import typer

from benchmarks.cotuning_claims import CLAIMS
from benchmarks.cotuning_stats import bootstrap, paired_difference, share
from benchmarks.worlds.synthetic_data import DOMAINS, POS, make_data, tokenizer_text


def _words(record) -> tuple[str, ...]:
    # The English phrase of a prompt: the text after ": ", or inside the quotes.
    text = record.prompt
    phrase = text.split('"')[1] if '"' in text else text.split(": ", 1)[1]
    return tuple(phrase.split())


# -- the synthetic world -------------------------------------------------------------------------


def test_same_seed_same_world_other_seed_other_world() -> None:
    a, b, c = make_data(3), make_data(3), make_data(4)
    assert [r.to_dict() for r in a.test] == [r.to_dict() for r in b.test]
    assert [r.to_dict() for r in a.devices[0]] == [r.to_dict() for r in b.devices[0]]
    assert [r.to_dict() for r in a.test] != [r.to_dict() for r in c.test]


def test_no_test_item_reaches_training_validation_or_the_tokenizer() -> None:
    data = make_data(0)
    test = {(r.domain, _words(r)) for r in data.test}
    seen = {(r.domain, _words(r)) for r in [*data.pool, *data.validation]}
    assert not test & seen
    assert len(test) == len(data.test)  # no test item twice
    texts = set(tokenizer_text(data))
    assert not any(r.prompt in texts for r in data.test)
    # A one-word answer is a dictionary entry by design; longer ones carry the item itself.
    assert not any(r.response in texts for r in data.test if " " in r.response)
    # Nor as a gloss in the LLM's pretraining text.
    glosses = {(r.domain, r.prompt.split(": ", 1)[1]) for r in data.llm_corpus if " gloss: " in r.prompt}
    assert not {(r.domain, " ".join(_words(r))) for r in data.test} & glosses


def test_knowledge_kinds_go_where_they_are_declared() -> None:
    data = make_data(1)
    corpus = {(r.domain, f) for r in data.llm_corpus for f in r.response.split()}
    for domain in DOMAINS:
        kinds, lexicon = data.kinds[domain], data.lexicons[domain]
        in_pool = {w for r in data.pool if r.domain == domain for w in _words(r)}
        # Training data uses exactly the words both sides or only devices know.
        assert in_pool == {w for w, k in kinds.items() if k in ("both", "device-only")}
        for word, kind in kinds.items():
            stated = (domain, lexicon[word]) in corpus
            assert stated == (kind in ("both", "llm-only")), (domain, word, kind)
    # Each test item has one focus word of its tag's kind and the rest known to both sides.
    for r in data.test:
        kind = data.tags[r.prompt]["word"]
        kinds = Counter(data.kinds[r.domain][w] for w in _words(r))
        if kind == "both":
            assert set(kinds) == {"both"}
        else:
            assert kinds[kind] == 1 and kinds["both"] == sum(kinds.values()) - 1


def test_rules_apply_to_every_item_and_the_llm_never_sees_them() -> None:
    data = make_data(0)
    for r in data.pool[:200]:
        grammar, words = data.grammars[r.domain], _words(r)
        forms = r.response.split()
        adjectives = [w for w in words if w in POS["A"]]
        verbs = [w for w in words if w in POS["V"]]
        for a in adjectives:
            assert data.lexicons[r.domain][a] + grammar.suffix in forms
        if verbs:
            assert forms[forms.index(data.lexicons[r.domain][verbs[0]]) + 1] == grammar.particle
    responses = " ".join(r.response for r in data.llm_corpus)
    for domain in DOMAINS:
        g = data.grammars[domain]
        assert f" {g.particle} " not in f" {responses} "
        assert not any(r.prompt.endswith(g.suffix) for r in data.llm_corpus if r.domain == domain)
    templates = [t.split("{")[0] for t in ("Translate to {lang}", "How do you say", "{lang} for:")]
    assert not any(r.prompt.startswith(t) for r in data.llm_corpus for t in templates if t)


def test_devices_hold_100_to_150_records_with_skewed_mixes() -> None:
    data = make_data(2)
    assert all(100 <= len(d) <= 150 for d in data.devices)
    assert len(data.aux) == round(sum(len(d) for d in data.devices) / 4)  # a fifth of the pool
    # Dirichlet(0.5): most devices lean on one domain.
    assert sum(max(c.values()) / sum(c.values()) > 0.4 for c in data.device_domains) >= 2
    assert len(data.test) == 100 * len(DOMAINS)


# -- the bootstrap -------------------------------------------------------------------------------


def test_bootstrap_of_a_constant_difference_is_that_constant() -> None:
    a = {"0": {"0": [0.5, 0.7, 0.9], "1": [0.4, 0.6, 0.8]}}
    b = {"0": {"0": [0.3, 0.5, 0.7], "1": [0.2, 0.4, 0.6]}}
    diff = paired_difference(a, b)
    assert diff.estimate == pytest.approx(0.2) and diff.lo == pytest.approx(0.2) and diff.hi == pytest.approx(0.2)


def test_bootstrap_interval_covers_the_mean_at_the_right_width() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 1.0, size=400)
    cells = {"0": {"0": list(values)}}
    iv = bootstrap([cells], lambda m: m, replicates=1000)
    se = values.std(ddof=1) / math.sqrt(len(values))
    assert iv.lo < values.mean() < iv.hi
    assert (iv.hi - iv.lo) == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_pairing_removes_the_shared_item_difficulty() -> None:
    rng = np.random.default_rng(1)
    difficulty = rng.uniform(0, 1, size=200)
    a = {"0": {"0": list(difficulty + 0.05)}}
    b = {"0": {"0": list(difficulty)}}
    paired = paired_difference(a, b)
    assert paired.hi - paired.lo < 1e-9 and paired.lo > 0
    # With the pairing broken (b's items shuffled), the same data give a wide interval.
    shuffled = {"0": {"0": list(rng.permutation(difficulty))}}
    unpaired = paired_difference(a, shuffled)
    assert unpaired.hi - unpaired.lo > 0.05


def test_share_is_the_part_of_the_reference_gain() -> None:
    base = {"0": {"0": [0.2] * 10}}
    ref = {"0": {"0": [0.6] * 10}}
    gain = {"0": {"0": [0.3] * 10}}
    assert share(gain, ref, base).estimate == pytest.approx(0.25)


# -- a tiny end-to-end run -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from benchmarks.cotuning_tune import SEARCH_START
    from benchmarks.worlds.synthetic import build_synthetic_world

    root = tmp_path_factory.mktemp("bench")
    world = build_synthetic_world(root / "world", seed=0, scale=0.2, steps_scale=0.02)
    settings = copy.deepcopy(SEARCH_START["synthetic"])
    settings.update(rounds=2)
    settings["crosslm"].update(prompts_per_domain=2, samples_per_prompt=1, max_new_tokens=6)
    return root, world, settings


@pytest.fixture(scope="module")
def results(tiny) -> tuple[dict, Path]:
    from benchmarks.cotuning import QualityConfig, run_quality_benchmark
    from benchmarks.cotuning_methods import METHODS

    root, world, settings = tiny
    cfg = QualityConfig(out_dir=root / "out", world_seeds=(0,), seeds=(0, 1), settings=settings, threads=1,
                        progress=False, methods=tuple(METHODS), curves=True)
    return run_quality_benchmark(cfg, worlds={0: world}), root / "out"


def test_prompts_only_aux_distils_along_the_slms_answers(tiny) -> None:
    from benchmarks.cotuning import QualityConfig, run_quality_benchmark

    root, world, settings = tiny
    cfg = QualityConfig(out_dir=root / "prompts", aux="prompts", world_seeds=(0,), seeds=(0,), settings=settings,
                        threads=1, progress=False, methods=("zero-shot", "fedcollm", "fedavg+aux"), curves=True)
    res = run_quality_benchmark(cfg, worlds={0: world})
    assert "fedavg+aux" not in res["runs"]  # nothing to tune the LLM on without answers
    distill = res["runs"]["fedcollm"]["0"]["0"]["rounds"][-1]["extra"]["distill"]
    assert distill["pseudo_labelled"] == len(world.aux["prompts"].read_text().splitlines())
    claim = next(c for c in res["claims"] if c["claim"] == "fedcollm_llm_over_aux_only")
    assert "zero-shot" in claim["note"]


def test_every_method_reports_validation_each_round_and_test_at_the_end(results) -> None:
    from benchmarks.cotuning_methods import METHODS

    res, _ = results
    assert set(res["runs"]) == set(METHODS)
    for name, by_world in res["runs"].items():
        for run in by_world["0"].values():
            rounds = run["rounds"]
            assert all("validation" in r for r in rounds)
            assert [("test" in r) for r in rounds] == [False] * (len(rounds) - 1) + [True]
            final = rounds[-1]["test"]
            assert 0.0 <= final["slm"]["rougeL"] <= 1.0
            assert {"word:both", "word:llm-only", "word:device-only", "word:nowhere"} <= set(final["slm"]["by"])
            assert (final["llm"] is not None) == METHODS[name].llm, name


def test_claims_have_the_interface_other_tools_read(results) -> None:
    res, out = results
    on_disk = json.loads((out / "cotuning.json").read_text())
    assert [c["claim"] for c in on_disk["claims"]] == [c for c, _ in CLAIMS]
    for c in on_disk["claims"]:
        assert set(c) >= {"claim", "difference", "ci95", "holds"}
        if c["claim"].endswith("share_of_centralized") and c["difference"] is None:
            continue  # the tiny world's Centralized may not move the LLM at all: no share to take
        assert isinstance(c["difference"], float) and len(c["ci95"]) == 2, c
        assert c["ci95"][0] <= c["difference"] <= c["ci95"][1] or c["claim"].endswith("share_of_centralized")
        assert isinstance(c["holds"], bool)
    md = (out / "cotuning.md").read_text()
    assert "fedcollm_slm_over_fedavg" in md and "| fedavg-ffa |" in md
    assert (out / "cotuning.png").stat().st_size > 10_000


def test_exact_aggregation_shows_no_factor_gap_and_factors_do(results) -> None:
    res, _ = results
    summary = res["summary"]
    assert summary["fedavg-ffa"]["factor_gap"]["mean"] < 1e-6
    assert summary["fedavg"]["factor_gap"]["mean"] > 1e-4


def test_bad_choices_are_refused_before_any_work(tmp_path) -> None:
    from cotune.cli.bench_quality import bench_quality

    with pytest.raises(typer.BadParameter, match="nope"):
        bench_quality(out=tmp_path, methods="fedavg,nope")
    with pytest.raises(typer.BadParameter, match="paper"):
        bench_quality(out=tmp_path, aux="all")
    with pytest.raises(typer.BadParameter, match="--tune"):
        bench_quality(out=tmp_path, settings=tmp_path / "missing.json")
    assert not any(tmp_path.iterdir())


def test_a_finished_run_is_kept_until_a_setting_it_reads_changes(tmp_path) -> None:
    from benchmarks.cotuning import QualityConfig, _finished, _keep, run_key
    from benchmarks.cotuning_methods import METHODS
    from benchmarks.cotuning_tune import SEARCH_START

    settings = copy.deepcopy(SEARCH_START["synthetic"])
    cfg = QualityConfig(out_dir=tmp_path, settings=settings)
    key = run_key(METHODS["fedavg"], cfg, 0, 1)
    _keep(tmp_path / "run", key, {"rounds": [], "wall_s": 1.0})
    assert _finished(tmp_path / "run", key) == {"rounds": [], "wall_s": 1.0}
    # FedAvg does not read the distillation settings; FedCoLLM does; both read the local training.
    settings["distill"]["lambda_kd"] = 0.9
    assert run_key(METHODS["fedavg"], cfg, 0, 1) == key
    fedcollm = run_key(METHODS["fedcollm"], cfg, 0, 1)
    settings["distill"]["lambda_kd"] = 0.1
    assert run_key(METHODS["fedcollm"], cfg, 0, 1) != fedcollm
    # A method that never reads the aux data is the same run in every aux mode; one that does is not.
    prompts = QualityConfig(out_dir=tmp_path, settings=settings, aux="prompts")
    assert run_key(METHODS["fedavg"], prompts, 0, 1) == key
    assert run_key(METHODS["crosslm"], prompts, 0, 1) == run_key(METHODS["crosslm"], cfg, 0, 1)
    assert run_key(METHODS["fedcollm"], prompts, 0, 1) != run_key(METHODS["fedcollm"], cfg, 0, 1)
    settings["train"]["lr"] = 0.5
    assert _finished(tmp_path / "run", run_key(METHODS["fedavg"], cfg, 0, 1)) is None
    assert run_key(METHODS["fedavg"], cfg, 0, 2) != key


def test_parallel_jobs_and_a_shared_runs_folder_make_each_run_once(tiny) -> None:
    from benchmarks.cotuning import QualityConfig, run_quality_benchmark

    root, world, settings = tiny
    shared = root / "shared-runs"
    common = dict(world_seeds=(0,), seeds=(0, 1), settings=settings, threads=1, progress=False,
                  methods=("zero-shot", "standalone", "fedcollm"), runs_dir=shared)
    paper = run_quality_benchmark(QualityConfig(out_dir=root / "par-paper", workers=2, **common), worlds={0: world})
    assert set(paper["runs"]["standalone"]["0"]) == {"0", "1"} and set(paper["runs"]["zero-shot"]["0"]) == {"0"}
    kept = {p.parent.name: p.stat().st_mtime_ns for p in shared.glob("*/result.json")}
    assert sorted(kept) == ["fedcollm-paper-w0-s0", "fedcollm-paper-w0-s1", "standalone-any-w0-s0",
                            "standalone-any-w0-s1", "zero-shot-any-w0-s0"]
    prompts = run_quality_benchmark(QualityConfig(out_dir=root / "par-prompts", aux="prompts", **common),
                                    worlds={0: world})
    # Standalone and zero-shot never read the aux data: the prompts mode takes the paper mode's runs.
    assert (paper["runs_kept"], prompts["runs_kept"], prompts["runs_total"]) == (0, 3, 5)
    assert all(run.pop("kept") for run in prompts["runs"]["standalone"]["0"].values())
    assert prompts["runs"]["standalone"] == paper["runs"]["standalone"]
    for name in ("standalone-any-w0-s0", "zero-shot-any-w0-s0"):
        assert (shared / name / "result.json").stat().st_mtime_ns == kept[name]
    assert (shared / "fedcollm-prompts-w0-s1" / "result.json").is_file()
