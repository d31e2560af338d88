"""Carry a teacher's next-token distributions onto a student with another tokenizer.

Two steps, after FedMKT's token alignment (Fan et al., 2024):

- positions: both models read the same text, each in its own tokens. A student position
  and a teacher position are paired when the next token of each starts at the same
  character, i.e. both predict what follows the same prefix of the text. Positions where
  the two tokenizations have no common boundary are left out of the loss.
- ids: special tokens map by role (<bos>, <eos>, <pad>), identical texts to each other, and
  every other teacher token either to the student token at the minimum edit distance
  (FedMKT's rule; ties: a student token that is a prefix of the teacher token, then the
  longer) or, by default, to the first token of the student's own encoding of the teacher
  token's text, which is exactly the student's next token when the text goes on that way.
  The teacher's top-k probabilities are summed onto the mapped ids and renormalised.

Limits: character offsets come from the fast tokenizers' offset mappings, so both
tokenizers must report offsets into the original text without trimming spaces (true of
the byte-level BPE tokenizers cotune trains); text outside ASCII may align less often.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from common.ml.batching import _special_ids, format_prompt

if TYPE_CHECKING:
    import torch

    from common.records import TaskRecord

# Logit for ids the mapped teacher gives no mass: exp() of it is 0 without making NaNs.
_NEG = -1.0e4


def same_vocabulary(a: Any, b: Any) -> bool:
    """True when two tokenizers turn every text into the same ids."""
    if a is b:
        return True
    backend_a, backend_b = getattr(a, "backend_tokenizer", None), getattr(b, "backend_tokenizer", None)
    if backend_a is not None and backend_b is not None:
        return backend_a.to_str() == backend_b.to_str()
    return a.get_vocab() == b.get_vocab()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one character)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _token_texts(tokenizer: Any) -> list[str]:
    return [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for i in range(len(tokenizer))]


TOKEN_MAPS = ("first_token", "min_edit")


def token_map(teacher_tokenizer: Any, student_tokenizer: Any, method: str = "first_token") -> list[int]:
    """For every teacher id, the student id it maps to (see the module docstring)."""
    if method not in TOKEN_MAPS:
        raise ValueError(f"unknown token map {method!r}; choose one of {', '.join(TOKEN_MAPS)}")
    teacher_texts, student_texts = _token_texts(teacher_tokenizer), _token_texts(student_tokenizer)
    exact: dict[str, int] = {}
    for sid, text in enumerate(student_texts):
        exact.setdefault(text, sid)
    roles = {}
    for t_id, s_id in zip(_special_ids(teacher_tokenizer), _special_ids(student_tokenizer), strict=True):
        if t_id is not None and s_id is not None:
            roles[t_id] = s_id
    special_student = {s for s in _special_ids(student_tokenizer) if s is not None}
    candidates = [(sid, text) for sid, text in enumerate(student_texts) if sid not in special_student and text]
    mapping: list[int] = []
    for tid, text in enumerate(teacher_texts):
        if tid in roles:
            mapping.append(roles[tid])
        elif text in exact:
            mapping.append(exact[text])
        elif method == "first_token":
            first = student_tokenizer.encode(text, add_special_tokens=False)[:1]
            mapping.append(int(first[0]) if first else _special_ids(student_tokenizer)[1])
        else:
            best = min(candidates, key=lambda c, t=text: (edit_distance(t, c[1]), not t.startswith(c[1]),
                                                          -len(c[1]), c[0]))
            mapping.append(best[0])
    return mapping


def _char_starts(tokenizer: Any, record: TaskRecord) -> list[int]:
    """Character start of every token of the SFT sequence <bos> prompt response <eos>.

    <bos> gets -1 (it precedes the text); <eos> the text's length.
    """
    prompt_text = format_prompt(record.prompt)
    starts = [-1]
    for text, shift in ((prompt_text, 0), (record.response, len(prompt_text))):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts.extend(shift + begin for begin, _end in enc["offset_mapping"])
    starts.append(len(prompt_text) + len(record.response))
    return starts


class VocabAlignment:
    """Teacher logits (its tokens) -> target logits over the student's positions and ids."""

    _cache: ClassVar[dict[tuple[int, int, int, int, str], VocabAlignment]] = {}

    def __init__(self, teacher_tokenizer: Any, student_tokenizer: Any, top_k: int = 16,
                 student_width: int | None = None, method: str = "first_token") -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.teacher_tokenizer, self.student_tokenizer = teacher_tokenizer, student_tokenizer
        self.top_k = top_k
        self.token_map = token_map(teacher_tokenizer, student_tokenizer, method)
        self.student_width = student_width or len(student_tokenizer)
        self._starts: dict[tuple[int, str, str], list[int]] = {}

    @classmethod
    def cached(cls, teacher_tokenizer: Any, student_tokenizer: Any, top_k: int = 16,
               student_width: int | None = None, method: str = "first_token") -> VocabAlignment:
        """One alignment per tokenizer pair and setting: a min-edit token map takes seconds to build."""
        key = (id(teacher_tokenizer), id(student_tokenizer), top_k, student_width or 0, method)
        if key not in cls._cache:
            cls._cache[key] = cls(teacher_tokenizer, student_tokenizer, top_k, student_width, method)
        return cls._cache[key]

    def _record_starts(self, which: int, tokenizer: Any, record: TaskRecord) -> list[int]:
        key = (which, record.prompt, record.response)
        if key not in self._starts:
            self._starts[key] = _char_starts(tokenizer, record)
        return self._starts[key]

    def targets(
        self, teacher_logits: torch.Tensor, records: Sequence[TaskRecord], student_len: int,
        teacher_lengths: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(target logits (B, student_len - 1, student_width), aligned mask (B, student_len - 1)).

        Row b of `teacher_logits` is the teacher's right-padded encoding of records[b];
        `teacher_lengths` gives each row's real length (default: all of it).
        """
        import torch

        batch = len(records)
        width = self.student_width
        target = torch.zeros((batch, student_len - 1, width), dtype=torch.float32)
        aligned = torch.zeros((batch, student_len - 1), dtype=torch.bool)
        probs = torch.softmax(teacher_logits.float(), dim=-1)
        k = min(self.top_k, probs.size(-1))
        # The top-k on the teacher's device, then to the CPU: the loop below indexes CPU tensors.
        top_p, top_i = (t.cpu() for t in probs.topk(k, dim=-1))
        token_map = torch.tensor(self.token_map, dtype=torch.long)
        for b, record in enumerate(records):
            s_starts = self._record_starts(0, self.student_tokenizer, record)
            t_starts = self._record_starts(1, self.teacher_tokenizer, record)
            t_len = min(len(t_starts), teacher_lengths[b] if teacher_lengths else teacher_logits.size(1))
            # Teacher position u predicts token u + 1: index it by where that token starts.
            by_start = {t_starts[u + 1]: u for u in range(t_len - 1)}
            for t in range(min(student_len, len(s_starts)) - 1):
                u = by_start.get(s_starts[t + 1])
                if u is None:
                    continue
                mapped = torch.zeros(width, dtype=torch.float32)
                ids = token_map[top_i[b, u]].clamp(max=width - 1)
                mapped.index_add_(0, ids, top_p[b, u])
                target[b, t] = torch.where(mapped > 0, (mapped / mapped.sum()).log(), torch.full_like(mapped, _NEG))
                aligned[b, t] = True
        return target, aligned
