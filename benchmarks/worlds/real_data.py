"""The real track's task: translating names of countries, currencies, languages and scripts
from English into four languages, from the gettext catalogues the `pycountry` package ships.

A domain is a target language; a record is "German name of the country Japan:" -> "Japan".
Every split is a pure function of the seed and the scale (stdlib random seeded by strings), so
the same call always writes the same files:

- public entities: a seeded fraction of the entities, in every language, kept out of every
  other split; the "public-only" aux mode draws from them.
- test and validation: per domain, facts whose translation differs from the English name (an
  item a model cannot answer by copying); disjoint from everything else in that domain.
- training pool: the rest (identical names included). Each device draws 100-150 records
  (times the scale) with a Dirichlet(0.5) mix over the domains; the "paper" aux is a further
  quarter of the devices' total with the devices' overall domain mix, so it is a random fifth
  of the task's training data. What is left is CrossLM's prompt pool.
- general text: English prose the task never uses (Python's reference manual, shipped with the
  standard library as pydoc_data, and sentences built from pycountry's English names), for the
  LLM's perplexity check; other manual sections are the text the pruned SLM is distilled on.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from common.records import TaskRecord

DOMAINS = ("de", "fr", "es", "it")
LANGUAGE_NAMES = {"de": "German", "fr": "French", "es": "Spanish", "it": "Italian"}
KINDS = ("country", "currency", "language", "script")
# gettext domain of each kind in pycountry's catalogues
_CATALOGUES = {"country": "iso3166-1", "currency": "iso4217", "language": "iso639-3", "script": "iso15924"}

DEVICE_SIZE = (100, 150)  # records per device at scale 1
DIRICHLET_ALPHA = 0.5
PUBLIC_FRACTION = 0.12  # of the entities: the public set (public-only aux)
# Greedy evaluation of the 270M model costs ~0.5 s per item on two busy CPU cores, so the test
# is 50 items per domain (200) at scale 1; scale 2 gives 100 per domain.
TEST_PER_DOMAIN = 50  # at scale 1, capped by what the data holds
VAL_PER_DOMAIN = 15
# Short names only: answers fit 10 tokens under both tokenizers, so generation stays cheap.
MAX_ANSWER_CHARS = 16
MAX_NAME_CHARS = 24
POOL_PER_DOMAIN = 100  # CrossLM prompt pool cap per domain, at scale 1
GENERAL_RECORDS = 120  # general held-out texts, at scale 1
GENERAL_CHARS = 400  # longest general text, so perplexity stays cheap


@dataclass(frozen=True)
class Fact:
    kind: str
    key: str  # the ISO code
    english: str
    domain: str
    answer: str

    @property
    def entity(self) -> str:
        return f"{self.kind}:{self.key}"

    @property
    def prompt(self) -> str:
        return f"{LANGUAGE_NAMES[self.domain]} name of the {self.kind} {self.english}:"

    @property
    def translated(self) -> bool:
        return self.answer != self.english

    def record(self, response: str | None = None) -> TaskRecord:
        return TaskRecord(self.prompt, self.answer if response is None else response, self.domain)


@dataclass
class RealSplits:
    devices: list[list[TaskRecord]]
    aux: dict[str, list[TaskRecord]]
    validation: list[TaskRecord]
    test: list[TaskRecord]
    general: list[TaskRecord]
    prompt_pool: list[TaskRecord]
    truth: dict[str, str]
    test_tags: dict[str, dict[str, str]]
    device_domains: list[dict[str, int]]
    stats: dict[str, Any] = field(default_factory=dict)


def _entities(kind: str) -> list[tuple[str, str]]:
    """(ISO code, English name) of every entity of a kind, sorted by code."""
    import pycountry

    if kind == "country":
        items = [(c.alpha_2, c.name) for c in pycountry.countries]
    elif kind == "currency":
        items = [(c.alpha_3, c.name) for c in pycountry.currencies]
    elif kind == "language":  # the ISO 639-1 ones: languages people have heard of
        items = [(c.alpha_2, c.name) for c in pycountry.languages if hasattr(c, "alpha_2")]
    elif kind == "script":
        items = [(c.alpha_4, c.name) for c in pycountry.scripts]
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    # one entity per English name (two bolívar codes share one): a prompt has one answer
    names: dict[str, str] = {}
    for key, name in sorted(items):
        names.setdefault(name, key)
    return sorted((key, name) for name, key in names.items())


def load_facts(domains: Sequence[str] = DOMAINS) -> dict[str, list[Fact]]:
    """Every (entity, language) fact with short names that pycountry's catalogues hold, per domain,
    in a fixed order."""
    import gettext

    try:
        import pycountry
    except ImportError:
        raise RuntimeError("the real track's data needs pycountry: pip install pycountry") from None
    facts: dict[str, list[Fact]] = {d: [] for d in domains}
    for kind in KINDS:
        entities = _entities(kind)
        for d in domains:
            catalogue = gettext.translation(_CATALOGUES[kind], pycountry.LOCALES_DIR, languages=[d])
            for key, english in entities:
                answer = catalogue.gettext(english).strip()
                if answer and "\n" not in answer and len(answer) <= MAX_ANSWER_CHARS \
                        and len(english) <= MAX_NAME_CHARS:
                    facts[d].append(Fact(kind, key, english, d, answer))
    return facts


def dirichlet(rng: random.Random, alpha: float, k: int) -> list[float]:
    draws = [rng.gammavariate(alpha, 1.0) for _ in range(k)]
    total = sum(draws) or 1.0
    return [x / total for x in draws]


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Integer counts summing to `total` in proportion to `weights` (largest remainder)."""
    raw = [total * w for w in weights]
    counts = [int(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _device_plan(rng: random.Random, n_devices: int, scale: float, room: dict[str, int],
                 domains: Sequence[str]) -> tuple[list[list[int]], int]:
    """Per device, records per domain; redrawn until the devices and the paper aux fit the pool.

    Returns the plan and how many draws it took; a scale too large for the data raises.
    """
    lo, hi = (max(1, round(scale * n)) for n in DEVICE_SIZE)
    for attempt in range(1, 201):
        sizes = [rng.randint(lo, hi) for _ in range(n_devices)]
        plan = [apportion(n, dirichlet(rng, DIRICHLET_ALPHA, len(domains))) for n in sizes]
        need = [sum(p[j] for p in plan) for j in range(len(domains))]
        if all(n + round(n / 4) <= room[d] for n, d in zip(need, domains, strict=True)):
            return plan, attempt
    raise ValueError(f"scale {scale} asks for more training records than pycountry holds per language "
                     f"({room}); use a smaller scale")


def _chunks(text: str, limit: int) -> list[str]:
    """Prose paragraphs of a manual section, cut at sentence ends to at most `limit` characters."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        # skip headings, code, grammar and tables: keep flush-left prose only
        if any(line.startswith(" ") for line in lines) or "::=" in para or para.strip().endswith("*"):
            continue
        prose = " ".join(line.strip() for line in lines).strip()
        # a paragraph that starts in lower case continues a code example: skip it too
        if len(prose) < 80 or prose.count('"') > 6 or not prose[0].isupper():
            continue
        piece = ""
        for sentence in re.split(r"(?<=[.!?])\s+", prose):
            if piece and len(piece) + 1 + len(sentence) > limit:
                out.append(piece)
                piece = ""
            piece = f"{piece} {sentence}".strip() if len(sentence) <= limit else piece
        if len(piece) >= 80:
            out.append(piece)
    return out


def manual_texts() -> tuple[list[str], list[str]]:
    """(distillation texts, held-out texts): prose of Python's reference manual, split by section.

    Fixed (seed-free), so the pruned SLM distilled on the first part is built once for every seed.
    """
    import hashlib
    from pydoc_data.topics import topics

    train: list[str] = []
    held: list[str] = []
    for name in sorted(topics):
        bucket = held if hashlib.sha256(name.encode()).digest()[0] % 4 == 0 else train
        bucket.extend(_chunks(topics[name], GENERAL_CHARS))
    return train, held


def _country_sentences(facts: dict[str, list[Fact]]) -> list[str]:
    import pycountry

    out = []
    for c in sorted(pycountry.countries, key=lambda c: c.alpha_2):
        official = getattr(c, "official_name", None)
        if official:
            out.append(f"The official name of {c.name} is the {official}. Its ISO code is {c.alpha_2}.")
    for c in sorted(pycountry.currencies, key=lambda c: c.alpha_3):
        out.append(f"The currency called the {c.name} has the ISO 4217 code {c.alpha_3}.")
    return out


def general_texts(seed: int, scale: float, facts: dict[str, list[Fact]]) -> list[TaskRecord]:
    """Held-out English text: manual prose and pycountry sentences, two to one."""
    rng = random.Random(f"real-world:{seed}:general")
    n = max(4, round(GENERAL_RECORDS * scale))
    _, held = manual_texts()
    sentences = _country_sentences(facts)
    rng.shuffle(held)
    rng.shuffle(sentences)
    n_sent = min(len(sentences), n // 3)
    texts = held[: n - n_sent] + [" ".join(sentences[i : i + 3]) for i in range(0, 3 * n_sent, 3)][:n_sent]
    return [TaskRecord("", t, None) for t in texts]


def split_real_task(facts: dict[str, list[Fact]], seed: int = 0, scale: float = 1.0,
                    n_devices: int = 4) -> RealSplits:
    """Every split of the real task; see the module docstring for what each holds."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    domains = list(facts)
    entities = sorted({f.entity for fs in facts.values() for f in fs})
    rng = random.Random(f"real-world:{seed}:public")
    rng.shuffle(entities)
    public = set(entities[: round(PUBLIC_FRACTION * len(entities))])

    n_test, n_val = max(1, round(TEST_PER_DOMAIN * scale)), max(1, round(VAL_PER_DOMAIN * scale))
    test: list[Fact] = []
    val: list[Fact] = []
    pools: dict[str, list[Fact]] = {}
    for d in domains:
        rng = random.Random(f"real-world:{seed}:heldout:{d}")
        private = [f for f in facts[d] if f.entity not in public]
        candidates = [f for f in private if f.translated]
        rng.shuffle(candidates)
        # never more than half the translated facts held out: devices need some to learn from
        k_test = min(n_test, len(candidates) // 3)
        k_val = min(n_val, len(candidates) // 6)
        test += candidates[:k_test]
        val += candidates[k_test : k_test + k_val]
        held = {f.entity for f in candidates[: k_test + k_val]}
        pools[d] = [f for f in private if f.entity not in held]
        rng.shuffle(pools[d])

    rng = random.Random(f"real-world:{seed}:devices")
    plan, attempts = _device_plan(rng, n_devices, scale, {d: len(pools[d]) for d in domains}, domains)
    devices: list[list[Fact]] = [[] for _ in range(n_devices)]
    paper: list[Fact] = []
    leftover: list[Fact] = []
    for j, d in enumerate(domains):
        pool, at = pools[d], 0
        for k in range(n_devices):
            devices[k] += pool[at : at + plan[k][j]]
            at += plan[k][j]
        n_aux = round(sum(p[j] for p in plan) / 4)
        paper += pool[at : at + n_aux]
        leftover += pool[at + n_aux :][: max(1, round(POOL_PER_DOMAIN * scale))]
    for k, dev in enumerate(devices):
        random.Random(f"real-world:{seed}:order:{k}").shuffle(dev)
    random.Random(f"real-world:{seed}:order:aux").shuffle(paper)

    public_facts = sorted((f for fs in facts.values() for f in fs if f.entity in public),
                          key=lambda f: (f.domain, f.entity))
    random.Random(f"real-world:{seed}:public-aux").shuffle(public_facts)
    public_aux = public_facts[: len(paper)]

    seen = {f.entity for dev in devices for f in dev}
    in_aux = {f.entity for f in paper}
    test_tags = {f.prompt: {"kind": f.kind, "word_seen": "yes" if f.entity in seen else "no",
                            "aux_seen": "yes" if f.entity in in_aux else "no"} for f in test}
    return RealSplits(
        devices=[[f.record() for f in dev] for dev in devices],
        aux={"paper": [f.record() for f in paper], "prompts": [f.record("") for f in paper],
             "public-only": [f.record() for f in public_aux]},
        validation=[f.record() for f in val],
        test=[f.record() for f in test],
        general=general_texts(seed, scale, facts),
        prompt_pool=[f.record("") for f in leftover],
        truth={f.prompt: f.answer for f in leftover},
        test_tags=test_tags,
        device_domains=[{d: plan[k][j] for j, d in enumerate(domains) if plan[k][j]} for k in range(n_devices)],
        stats={"domains": domains, "kinds": list(KINDS), "public_entities": len(public),
               "facts_per_domain": {d: len(facts[d]) for d in domains},
               "translated_per_domain": {d: sum(f.translated for f in facts[d]) for d in domains},
               "test_per_domain": {d: sum(f.domain == d for f in test) for d in domains},
               "validation_per_domain": {d: sum(f.domain == d for f in val) for d in domains},
               "device_sizes": [len(dev) for dev in devices], "aux_size": len(paper),
               "prompt_pool": len(leftover), "dirichlet_draws": attempts,
               "test_word_seen": sum(t["word_seen"] == "yes" for t in test_tags.values())},
    )
