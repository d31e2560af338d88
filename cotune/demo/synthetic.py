"""A deterministic synthetic multi-domain task suite: word-by-word translation into
invented languages.

Why this task: it lets us control exactly what each model can know. Every language
(domain) has a lexicon of the same English words; about half of each lexicon is
"public" (in the pool the LLM is pretrained on and in the server's auxiliary data) and
the rest "private" (only in clients' data). So the LLM arrives knowing the public words,
the clients hold knowledge the LLM lacks, and Rouge-L / exact match measure both.

Only the stdlib `random.Random` is used, seeded with strings per split, so the same seed
gives byte-identical files on every machine and Python version since 3.2.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from common.records import TaskRecord, write_jsonl

DOMAINS: tuple[str, ...] = ("velish", "orkan", "miri", "tesh")

NOUNS = (
    "fox", "bird", "fish", "tree", "river", "stone", "house", "child",
    "moon", "sun", "boat", "wolf", "horse", "flower", "road", "king",
)
ADJECTIVES = (
    "red", "big", "small", "old", "young", "dark",
    "bright", "cold", "warm", "quick", "quiet", "green",
)
VERBS = (
    "runs", "sleeps", "sings", "falls", "grows", "swims",
    "flies", "waits", "burns", "shines", "hides", "eats",
)
WORDS: tuple[str, ...] = NOUNS + ADJECTIVES + VERBS

# Each language gets its own sounds so words look like they belong together.
_SOUNDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # onsets, vowels, optional codas
    "velish": (("v", "l", "s", "th", "r", "n", "f"), ("e", "i", "a", "ei"), ("l", "n", "s")),
    "orkan": (("k", "r", "g", "d", "z", "b", "kr"), ("o", "a", "u"), ("k", "r", "g")),
    "miri": (("m", "r", "n", "y", "p", "l", "w"), ("i", "a", "e", "u"), ("n", "m")),
    "tesh": (("t", "sh", "h", "b", "ch", "j", "s"), ("e", "u", "o", "ai"), ("sh", "t")),
}

# Phrase shapes, weighted toward longer ones: N, A N, N V, A N V.
_SHAPES: tuple[tuple[str, ...], ...] = (("N",), ("A", "N"), ("N", "V"), ("A", "N", "V"))
_SHAPE_WEIGHTS = (1, 2, 2, 3)
_CATEGORIES = {"N": NOUNS, "A": ADJECTIVES, "V": VERBS}

_TEMPLATES = (
    "Translate to {lang}: {phrase}",
    'How do you say "{phrase}" in {lang}?',
    "{lang} for: {phrase}",
)

_MAX_TRIES = 200_000

Phrase = tuple[str, ...]


@dataclass
class SyntheticSuite:
    """All splits of one synthetic world. Every (domain, English phrase) occurs once."""

    domains: list[str]
    public: list[TaskRecord]
    aux: list[TaskRecord]
    test: list[TaskRecord]
    clients: list[list[TaskRecord]]
    client_tests: list[list[TaskRecord]]
    # domain -> English word -> invented word; and each domain's public English words.
    lexicons: dict[str, dict[str, str]] = field(default_factory=dict)
    public_words: dict[str, list[str]] = field(default_factory=dict)


def _rng(seed: int, purpose: str) -> random.Random:
    # One stream per split: a split does not change when another split's size does.
    return random.Random(f"cotune-synthetic:{seed}:{purpose}")


def _make_lexicons(seed: int) -> dict[str, dict[str, str]]:
    rng = _rng(seed, "lexicon")
    taken: set[str] = set()
    lexicons: dict[str, dict[str, str]] = {}
    for domain in DOMAINS:
        onsets, vowels, codas = _SOUNDS[domain]
        lexicon: dict[str, str] = {}
        for word in WORDS:
            for _ in range(_MAX_TRIES):
                syllables = rng.choice((1, 2, 2, 3))
                form = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables))
                if rng.random() < 0.4:
                    form += rng.choice(codas)
                # Unique across all languages: a word identifies its language.
                if len(form) >= 3 and form not in taken:
                    break
            else:  # pragma: no cover - the sound inventories are far larger than needed
                raise RuntimeError(f"could not invent enough words for {domain}")
            taken.add(form)
            lexicon[word] = form
        lexicons[domain] = lexicon
    return lexicons


def _split_public(seed: int) -> dict[str, list[str]]:
    # Half of each category per language, so public-only phrases exist in every shape.
    rng = _rng(seed, "public-split")
    out: dict[str, list[str]] = {}
    for domain in DOMAINS:
        public: list[str] = []
        for words in (NOUNS, ADJECTIVES, VERBS):
            public.extend(rng.sample(list(words), len(words) // 2))
        chosen = set(public)
        out[domain] = [w for w in WORDS if w in chosen]
    return out


class _Sampler:
    """Draws fresh (domain, phrase) pairs; `used` is shared by all splits, so no pair
    ever lands in two splits (in particular never in both training and test)."""

    def __init__(self, lexicons: dict[str, dict[str, str]], public: dict[str, list[str]]):
        self.lexicons = lexicons
        self.public = {d: set(ws) for d, ws in public.items()}
        self.used: set[tuple[str, Phrase]] = set()

    def phrase(self, rng: random.Random, domain: str, public_only: bool) -> Phrase:
        for _ in range(_MAX_TRIES):
            shape = rng.choices(_SHAPES, weights=_SHAPE_WEIGHTS)[0]
            words: list[str] = []
            for cat in shape:
                pool = _CATEGORIES[cat]
                if public_only:
                    pool = tuple(w for w in pool if w in self.public[domain])
                words.append(rng.choice(pool))
            phrase = tuple(words)
            if (domain, phrase) not in self.used:
                self.used.add((domain, phrase))
                return phrase
        raise ValueError(
            f"ran out of distinct {'public ' if public_only else ''}phrases for domain "
            f"{domain!r}; ask for fewer records (per_client, public_size, aux_size, "
            "test_per_domain) or fewer clients."
        )

    def record(self, rng: random.Random, domain: str, public_only: bool) -> TaskRecord:
        phrase = self.phrase(rng, domain, public_only)
        template = rng.choice(_TEMPLATES)
        prompt = template.format(lang=domain.capitalize(), phrase=" ".join(phrase))
        response = " ".join(self.lexicons[domain][w] for w in phrase)
        return TaskRecord(prompt=prompt, response=response, domain=domain)

    def records(
        self, rng: random.Random, counts: dict[str, int], public_only: bool
    ) -> list[TaskRecord]:
        out = [
            self.record(rng, domain, public_only)
            for domain, n in counts.items()
            for _ in range(n)
        ]
        rng.shuffle(out)
        return out


def _even_counts(total: int, domains: list[str]) -> dict[str, int]:
    base, extra = divmod(total, len(domains))
    return {d: base + (1 if i < extra else 0) for i, d in enumerate(domains)}


def _client_counts(total: int, home: int, skew: float, domains: list[str]) -> dict[str, int]:
    # `skew` of the records from the home domain, the rest spread evenly over the others.
    n_home = round(skew * total)
    others = [domains[(home + i) % len(domains)] for i in range(1, len(domains))]
    counts = {domains[home]: n_home}
    counts.update(_even_counts(total - n_home, others))
    return {d: counts[d] for d in domains}


def make_suite(
    num_clients: int = 3,
    seed: int = 0,
    skew: float = 0.8,
    per_client: int = 300,
    public_size: int = 400,
    aux_size: int = 200,
    test_per_domain: int = 30,
) -> SyntheticSuite:
    """Build the synthetic world (see the module docstring).

    - `public`: public words only, all domains (pretraining pool for the LLM);
    - `aux`: public words only, phrases disjoint from `public` (server's auxiliary data);
    - `test`: `test_per_domain` phrases per domain over the full lexicon;
    - `clients[k]`: `per_client` records, a fraction `skew` from domain k % 4, full lexicon;
    - `client_tests[k]`: max(test_per_domain, per_client // 5) held-out records, same mix.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must be in [0, 1], got {skew}")
    for name, value in (
        ("per_client", per_client),
        ("public_size", public_size),
        ("aux_size", aux_size),
        ("test_per_domain", test_per_domain),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")

    domains = list(DOMAINS)
    lexicons = _make_lexicons(seed)
    public_words = _split_public(seed)
    sampler = _Sampler(lexicons, public_words)

    # Order matters only for which phrases are left: public/aux/test come first so they
    # do not depend on the number or size of clients.
    public = sampler.records(_rng(seed, "public"), _even_counts(public_size, domains), True)
    aux = sampler.records(_rng(seed, "aux"), _even_counts(aux_size, domains), True)
    test = sampler.records(
        _rng(seed, "test"), {d: test_per_domain for d in domains}, public_only=False
    )
    client_test_size = max(test_per_domain, per_client // 5)
    clients: list[list[TaskRecord]] = []
    client_tests: list[list[TaskRecord]] = []
    for k in range(num_clients):
        home = k % len(domains)
        rng = _rng(seed, f"client-{k}")
        clients.append(sampler.records(rng, _client_counts(per_client, home, skew, domains), False))
        client_tests.append(
            sampler.records(rng, _client_counts(client_test_size, home, skew, domains), False)
        )
    return SyntheticSuite(
        domains=domains,
        public=public,
        aux=aux,
        test=test,
        clients=clients,
        client_tests=client_tests,
        lexicons=lexicons,
        public_words=public_words,
    )


def write_suite(suite: SyntheticSuite, out_dir: str | Path) -> dict[str, Path]:
    """Write every split as JSONL under `out_dir`; returns split name -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[TaskRecord]] = {
        "public": suite.public,
        "aux": suite.aux,
        "test": suite.test,
    }
    for k, (train, test) in enumerate(zip(suite.clients, suite.client_tests, strict=True)):
        splits[f"client_{k}"] = train
        splits[f"client_{k}_test"] = test
    paths: dict[str, Path] = {}
    for name, records in splits.items():
        path = out_dir / f"{name}.jsonl"
        write_jsonl(path, records)
        paths[name] = path
    return paths


def all_text(suite: SyntheticSuite) -> list[str]:
    """Every prompt and response of the suite, plus the lexicons: tokenizer training text."""
    texts: list[str] = []
    splits = [suite.public, suite.aux, suite.test, *suite.clients, *suite.client_tests]
    for records in splits:
        for record in records:
            texts.append(record.prompt)
            texts.append(record.response)
    for lexicon in suite.lexicons.values():
        texts.append(" ".join(lexicon.values()))
    return texts
