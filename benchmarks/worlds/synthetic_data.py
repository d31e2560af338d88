"""The synthetic track's data: translation into invented languages whose knowledge comes in
kinds that transfer differently (ARCHITECTURE.md, "Quality benchmark").

- Facts: every domain (language) has a lexicon of the same English words.
- Rules that apply to every item of a domain: a word order (a permutation of adjective,
  noun, verb), a suffix on adjectives, a particle after the verb.
- Who knows what, per domain and word: `both` (in the LLM's dictionary and in the devices'
  training data), `llm-only` (dictionary only: no training record uses it), `device-only`
  (training data only), `nowhere` (neither). The LLM's pretraining text states the lexicon
  in a neutral dictionary form (base forms, English word order, no rules, not the task's
  prompt format); the SLMs are pretrained on the task format in a public language
  ("common") that no device holds.
- Splits: a labelled pool of training items over `both` and `device-only` words, of which
  a random fifth is the server's auxiliary set (FedMKT, appendix D.2) and the rest is dealt
  to devices with Dirichlet(alpha) domain mixes; validation and test items are unseen
  combinations, each with one focus word of a declared kind (the other words `both`), so a
  score can be broken down by kind.

Only `random.Random` seeded with strings is used: the same seed gives the same files on
every machine. Every (domain, English phrase) pair occurs in at most one split.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from common.records import TaskRecord

DOMAINS: tuple[str, ...] = ("velish", "orkan", "miri", "tesh")
PUBLIC_DOMAIN = "common"
NOUNS = ("fox", "bird", "fish", "tree", "river", "stone", "house", "child", "moon", "sun", "boat", "wolf",
         "horse", "flower", "road", "king")
ADJECTIVES = ("red", "big", "small", "old", "young", "dark", "bright", "cold", "warm", "quick")
VERBS = ("runs", "sleeps", "sings", "falls", "grows", "swims", "flies", "waits", "burns", "hides")
POS = {"N": NOUNS, "A": ADJECTIVES, "V": VERBS}
KINDS = ("both", "llm-only", "device-only", "nowhere")
# Words of each kind per part of speech (N, A, V): half of every lexicon is known to both sides.
KIND_COUNTS = {"N": (8, 4, 3, 1), "A": (5, 2, 2, 1), "V": (5, 2, 2, 1)}
SHAPES = (("N",), ("A", "N"), ("N", "V"), ("A", "N", "V"))
SHAPE_WEIGHTS = (1, 2, 2, 3)
TEMPLATES = ("Translate to {lang}: {phrase}", 'How do you say "{phrase}" in {lang}?', "{lang} for: {phrase}")
ORDERS = ("ANV", "NAV", "VNA", "NVA", "AVN", "VAN")
SOUNDS = {
    "velish": (("v", "l", "s", "th", "r", "n", "f"), ("e", "i", "a", "ei")),
    "orkan": (("k", "r", "g", "d", "z", "b", "kr"), ("o", "a", "u")),
    "miri": (("m", "r", "n", "y", "p", "l", "w"), ("i", "a", "e", "u")),
    "tesh": (("t", "sh", "h", "b", "ch", "j", "s"), ("e", "u", "o", "ai")),
    PUBLIC_DOMAIN: (("c", "m", "n", "p", "d", "g", "f"), ("o", "e", "a")),
}
# The LLM's dictionary form: its own prompts (not the task's templates), base forms, English order.
DICTIONARY_PROMPT = "{lang} dictionary: {word}"
GLOSS_PROMPT = "{lang} gloss: {phrase}"
_MAX_TRIES = 100_000


@dataclass
class Grammar:
    """A domain's rules: relative order of A/N/V, the adjective suffix, the verb particle."""

    order: str
    suffix: str
    particle: str

    def render(self, roles: tuple[str, ...], forms: list[str]) -> str:
        by_role = dict(zip(roles, forms, strict=True))
        out: list[str] = []
        for role in self.order:
            if role not in by_role:
                continue
            form = by_role[role]
            if role == "A":
                form += self.suffix
            out.append(form)
            if role == "V" and self.particle:
                out.append(self.particle)
        return " ".join(out)


@dataclass
class SyntheticData:
    lexicons: dict[str, dict[str, str]]  # domain -> English word -> base form
    grammars: dict[str, Grammar]
    kinds: dict[str, dict[str, str]]  # domain -> English word -> kind (KINDS)
    pool: list[TaskRecord]  # every labelled training item (devices' data + aux)
    aux: list[TaskRecord]
    devices: list[list[TaskRecord]]
    validation: list[TaskRecord]
    test: list[TaskRecord]
    public_task: list[TaskRecord]  # the public language's task items (SLMs' format pretraining)
    public_aux: list[TaskRecord]  # more of them, disjoint: the `public-only` auxiliary set
    llm_corpus: list[TaskRecord]  # dictionary text and English sentences (prompt "")
    slm_corpus: list[TaskRecord]
    general_heldout: list[TaskRecord]  # English sentences the LLM never saw
    tags: dict[str, dict[str, str]] = field(default_factory=dict)  # validation/test prompt -> tags
    device_domains: list[dict[str, int]] = field(default_factory=list)


def _rng(seed: int, purpose: str) -> random.Random:
    return random.Random(f"cotune-bench-world:{seed}:{purpose}")


def _lexicons(seed: int) -> dict[str, dict[str, str]]:
    rng = _rng(seed, "lexicon")
    taken: set[str] = set()
    out: dict[str, dict[str, str]] = {}
    for domain in (*DOMAINS, PUBLIC_DOMAIN):
        onsets, vowels = SOUNDS[domain]
        lexicon: dict[str, str] = {}
        for word in (*NOUNS, *ADJECTIVES, *VERBS):
            for _ in range(_MAX_TRIES):
                form = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(2))
                if form not in taken:  # a form identifies its language and word
                    break
            taken.add(form)
            lexicon[word] = form
        out[domain] = lexicon
    return out


def _grammars(seed: int, lexicons: dict[str, dict[str, str]]) -> dict[str, Grammar]:
    rng = _rng(seed, "grammar")
    orders = rng.sample([o for o in ORDERS if o != "ANV"], len(DOMAINS))
    taken = {f for lex in lexicons.values() for f in lex.values()}
    grammars = {PUBLIC_DOMAIN: Grammar("ANV", "", "")}
    for domain, order in zip(DOMAINS, orders, strict=True):
        onsets, vowels = SOUNDS[domain]
        while True:
            suffix = rng.choice(vowels) + rng.choice(onsets)
            particle = rng.choice(onsets) + rng.choice(vowels)
            if particle not in taken:
                break
        taken.add(particle)
        grammars[domain] = Grammar(order, suffix, particle)
    return grammars


def _kinds(seed: int) -> dict[str, dict[str, str]]:
    rng = _rng(seed, "kinds")
    out: dict[str, dict[str, str]] = {}
    for domain in DOMAINS:
        kinds: dict[str, str] = {}
        for pos, words in POS.items():
            shuffled = rng.sample(list(words), len(words))
            start = 0
            for kind, count in zip(KINDS, KIND_COUNTS[pos], strict=True):
                kinds.update({w: kind for w in shuffled[start:start + count]})
                start += count
        out[domain] = kinds
    out[PUBLIC_DOMAIN] = {w: "both" for pos in POS.values() for w in pos}
    return out


def dirichlet(rng: random.Random, alpha: float, k: int) -> list[float]:
    # random.Random has no Dirichlet; normalised Gamma(alpha) draws are one.
    draws = [rng.gammavariate(alpha, 1.0) for _ in range(k)]
    total = sum(draws) or 1.0
    return [d / total for d in draws]


class _Items:
    """Draws fresh (domain, phrase) items; no pair is ever drawn twice, across all splits."""

    def __init__(self, lexicons: dict[str, dict[str, str]], grammars: dict[str, Grammar],
                 kinds: dict[str, dict[str, str]]) -> None:
        self.lexicons, self.grammars, self.kinds = lexicons, grammars, kinds
        self.used: set[tuple[str, tuple[str, ...]]] = set()

    def words(self, domain: str, pos: str, allowed: tuple[str, ...]) -> list[str]:
        return [w for w in POS[pos] if self.kinds[domain][w] in allowed]

    def record(self, rng: random.Random, domain: str, allowed: tuple[str, ...],
               focus: str | None = None) -> TaskRecord:
        """An item over words of the `allowed` kinds; with `focus`, exactly one word of that kind."""
        for _ in range(_MAX_TRIES):
            roles = rng.choices(SHAPES, weights=SHAPE_WEIGHTS)[0]
            focus_at = rng.randrange(len(roles)) if focus else -1
            words = []
            for i, role in enumerate(roles):
                pool = self.words(domain, role, (focus,) if i == focus_at else allowed)
                if not pool:
                    break
                words.append(rng.choice(pool))
            else:
                key = (domain, tuple(words))
                if key not in self.used:
                    self.used.add(key)
                    return self.render(rng, domain, roles, words)
        raise ValueError(f"ran out of distinct items for {domain!r} (focus {focus!r}); ask for fewer items")

    def render(self, rng: random.Random, domain: str, roles: tuple[str, ...], words: list[str]) -> TaskRecord:
        phrase = " ".join(words)
        prompt = rng.choice(TEMPLATES).format(lang=domain.capitalize(), phrase=phrase)
        forms = [self.lexicons[domain][w] for w in words]
        return TaskRecord(prompt, self.grammars[domain].render(roles, forms), domain)


def _tagged(items: _Items, rng: random.Random, per_domain: int) -> tuple[list[TaskRecord], dict[str, dict[str, str]]]:
    """`per_domain` items per domain, the focus kinds dealt evenly; prompt -> {"word": kind}."""
    records, tags = [], {}
    for domain in DOMAINS:
        for i in range(per_domain):
            kind = KINDS[i % len(KINDS)]
            record = items.record(rng, domain, ("both",), focus=kind if kind != "both" else None)
            records.append(record)
            tags[record.prompt] = {"word": kind}
    rng.shuffle(records)
    return records, tags


def _english(rng: random.Random, n: int, used: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        roles = rng.choices(SHAPES, weights=SHAPE_WEIGHTS)[0]
        words = [rng.choice(POS[r]) for r in roles]
        text = ("the " if rng.random() < 0.5 else "a ") + " ".join(words) + "."
        if text not in used:
            used.add(text)
            out.append(text)
    return out


def _llm_corpus(rng: random.Random, data: _Items, english: list[str]) -> list[TaskRecord]:
    """Dictionary entries for every word the LLM knows, word-by-word glosses of phrases over those
    words (base forms, English order: no rule of any domain), both under prompts of their own (not
    the task's templates), and English sentences as plain text."""
    records: list[TaskRecord] = []
    for domain in (*DOMAINS, PUBLIC_DOMAIN):
        lang = domain.capitalize()
        known = [w for w, k in data.kinds[domain].items() if k in ("both", "llm-only")]
        records += [TaskRecord(DICTIONARY_PROMPT.format(lang=lang, word=w), data.lexicons[domain][w], domain)
                    for w in known]
        for _ in range(3 * len(known)):
            roles = rng.choices(SHAPES, weights=SHAPE_WEIGHTS)[0]
            words = [rng.choice([w for w in POS[r] if w in known]) for r in roles]
            if (domain, tuple(words)) in data.used:  # never a held-out or training item, even glossed
                continue
            gloss = " ".join(data.lexicons[domain][w] for w in words)
            records.append(TaskRecord(GLOSS_PROMPT.format(lang=lang, phrase=" ".join(words)), gloss, domain))
    records += [TaskRecord("", line) for line in english]
    rng.shuffle(records)
    return records


def make_data(seed: int = 0, scale: float = 1.0, devices: int = 4, alpha: float = 0.5,
              records_per_device: tuple[int, int] = (100, 150), val_per_domain: int = 32,
              test_per_domain: int = 100) -> SyntheticData:
    lexicons = _lexicons(seed)
    grammars = _grammars(seed, lexicons)
    kinds = _kinds(seed)
    items = _Items(lexicons, grammars, kinds)
    # Held-out splits first, so they do not depend on the devices' sizes.
    test, test_tags = _tagged(items, _rng(seed, "test"), round(test_per_domain * scale))
    validation, val_tags = _tagged(items, _rng(seed, "validation"), round(val_per_domain * scale))
    rng = _rng(seed, "devices")
    lo, hi = (round(n * scale) for n in records_per_device)
    mixes = [dirichlet(rng, alpha, len(DOMAINS)) for _ in range(devices)]
    sizes = [rng.randint(lo, hi) for _ in range(devices)]
    dealt = [Counter(rng.choices(DOMAINS, weights=mix, k=n)) for mix, n in zip(mixes, sizes, strict=True)]
    # The pool is the devices' data plus a fifth for the server, drawn with the devices' overall mix.
    total = Counter()
    for counts in dealt:
        total.update(counts)
    n_aux = round(sum(sizes) / 4)
    aux_counts = Counter(rng.choices(DOMAINS, weights=[total[d] for d in DOMAINS], k=n_aux))
    train_kinds = ("both", "device-only")
    pool_rng = _rng(seed, "pool")
    device_data = [[items.record(pool_rng, d, train_kinds) for d in DOMAINS for _ in range(c[d])] for c in dealt]
    aux = [items.record(pool_rng, d, train_kinds) for d in DOMAINS for _ in range(aux_counts[d])]
    for records in (*device_data, aux):
        pool_rng.shuffle(records)
    public_rng = _rng(seed, "public")
    public_task = [items.record(public_rng, PUBLIC_DOMAIN, ("both",)) for _ in range(round(300 * scale))]
    public_aux = [items.record(public_rng, PUBLIC_DOMAIN, ("both",)) for _ in range(n_aux)]
    used: set[str] = set()
    english_rng = _rng(seed, "english")
    english = _english(english_rng, 400, used)
    general = _english(english_rng, 100, used)
    return SyntheticData(
        lexicons=lexicons, grammars=grammars, kinds=kinds, pool=[r for d in device_data for r in d] + aux,
        aux=aux, devices=device_data, validation=validation, test=test, public_task=public_task,
        public_aux=public_aux, llm_corpus=_llm_corpus(_rng(seed, "corpus"), items, english),
        slm_corpus=public_task + [TaskRecord("", s) for s in english],
        general_heldout=[TaskRecord("", s) for s in general], tags={**val_tags, **test_tags},
        device_domains=[{d: c[d] for d in DOMAINS} for c in dealt],
    )


def tokenizer_text(data: SyntheticData) -> list[str]:
    """What the tokenizer is trained on: everything but the test split."""
    records = [*data.pool, *data.validation, *data.public_task, *data.public_aux, *data.llm_corpus]
    return [t for r in records for t in (r.prompt, r.response) if t]
