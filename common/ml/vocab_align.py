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
  The teacher's top-k probabilities are summed onto the mapped ids and renormalised; the
  student learns toward that support (common.ml.kd.kd_loss_sparse), never a vocabulary-wide copy.

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

    def teacher_top(self, teacher_logits: torch.Tensor, keep: torch.Tensor | None,
                    positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k (probabilities, ids), (B, positions, k) on the CPU, from its logits
        at the kept positions (None: every position); zero probability where not computed."""
        import torch

        probs = torch.softmax(teacher_logits.float(), dim=-1)
        k = min(self.top_k, probs.size(-1))
        # The top-k on the teacher's device, then to the CPU: the loop in targets() indexes CPU tensors.
        top_p, top_i = (t.cpu() for t in probs.topk(k, dim=-1))
        if keep is None:
            return top_p, top_i
        batch = top_p.size(0)
        full_p, full_i = torch.zeros((batch, positions, k)), torch.zeros((batch, positions, k), dtype=torch.long)
        full_p[:, keep.cpu()], full_i[:, keep.cpu()] = top_p, top_i
        return full_p, full_i

    def targets(
        self, top_p: torch.Tensor, top_i: torch.Tensor, records: Sequence[TaskRecord], want: torch.Tensor,
        teacher_lengths: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The student's targets as a support: (ids, probabilities) of shape (B, S, k) and an
        aligned mask (B, S), for the student positions `want` (B, S) asks for.

        Row b of `top_p`/`top_i` (teacher_top) is the teacher's right-padded encoding of records[b],
        position u predicting its token u + 1; `teacher_lengths` gives each row's real length.
        Teacher ids that map to one student id are summed into its first slot (the others get 0).
        """
        import torch

        batch, student_pos = want.shape
        k = top_p.size(-1)
        rows, cols, teacher_cols = [], [], []
        want_cpu = want.cpu()
        for b, record in enumerate(records):
            s_starts = self._record_starts(0, self.student_tokenizer, record)
            t_starts = self._record_starts(1, self.teacher_tokenizer, record)
            t_len = min(len(t_starts), teacher_lengths[b] if teacher_lengths else top_p.size(1) + 1)
            # Teacher position u predicts token u + 1: index it by where that token starts.
            by_start = {t_starts[u + 1]: u for u in range(min(t_len - 1, top_p.size(1)))}
            for t in range(min(student_pos, len(s_starts) - 1)):
                u = by_start.get(s_starts[t + 1]) if want_cpu[b, t] else None
                if u is not None and float(top_p[b, u].sum()) > 0:
                    rows.append(b)
                    cols.append(t)
                    teacher_cols.append(u)
        ids = torch.zeros((batch, student_pos, k), dtype=torch.long)
        probs = torch.zeros((batch, student_pos, k))
        aligned = torch.zeros((batch, student_pos), dtype=torch.bool)
        if rows:
            token_map = torch.tensor(self.token_map, dtype=torch.long)
            mapped = token_map[top_i[rows, teacher_cols]].clamp(max=self.student_width - 1)
            ids[rows, cols], probs[rows, cols], aligned[rows, cols] = mapped, top_p[rows, teacher_cols], True
        # Merge slots that map to one student id: slot j carries the mass of every slot with its id
        # when no earlier slot has that id, and nothing otherwise.
        same = ids.unsqueeze(-1) == ids.unsqueeze(-2)  # (B, S, k, k): same[j, i] = ids_j == ids_i
        merged = (same.float() * probs.unsqueeze(-2)).sum(-1)
        earlier = torch.ones((k, k), dtype=torch.bool).tril(-1)  # i < j
        first = ~(same & earlier).any(-1)
        probs = torch.where(first, merged, torch.zeros_like(merged))
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-30)
        return ids.to(want.device), probs.to(want.device), aligned.to(want.device)
