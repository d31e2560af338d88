"""Task records: the three JSONL forms a user may write, read strictly into one internal form.

Each line is one JSON object in one of these forms (each may add a "domain" string):

- prompt/response: `{"prompt": "...", "response": "..."}`
- chat (OpenAI style): `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`,
  ending with the assistant's reply (or with a user turn, for a prompt that has no answer yet);
  "developer" is read as "system", and a content may be a list of `{"type": "text", "text": ...}` parts.
- Alpaca: `{"instruction": "...", "input": "..." (optional), "output": "..."}`; a non-empty input
  follows the instruction after a blank line.

All become a TaskRecord: the final user turn (`prompt`), the final assistant turn (`response`,
the only text the model is trained to produce: the loss is on its tokens alone) and the turns
before them (`context`). How a conversation becomes model text is common.chat's job.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
# Roles other chat formats use for the same thing.
ROLE_ALIASES = {"developer": "system"}
FORMS_HINT = (
    'Each line must be a JSON object in one of three forms: {"prompt": "...", "response": "..."}, '
    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]} or '
    '{"instruction": "...", "input": "...", "output": "..."} (each may add a "domain" string)'
)


class RecordError(ValueError):
    """One record is malformed; the message says what is wrong with it."""


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class TaskRecord:
    """One supervised example: the loss is on `response` only (ARCHITECTURE.md, "Algorithms").

    `context` holds the turns before the final user turn (a system prompt, earlier exchanges);
    it is empty for a prompt/response record.
    """

    prompt: str
    response: str
    domain: str | None = None
    context: tuple[ChatMessage, ...] = ()

    def messages(self, with_response: bool = True) -> list[ChatMessage]:
        """The conversation: the context, the user's prompt and (unless told not to) the reply."""
        turns = [*self.context, ChatMessage("user", self.prompt)]
        return [*turns, ChatMessage("assistant", self.response)] if with_response else turns

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any]
        if self.context:
            out = {"messages": [m.to_dict() for m in self.messages(with_response=bool(self.response))]}
        else:
            out = {"prompt": self.prompt, "response": self.response}
        if self.domain is not None:
            out["domain"] = self.domain
        return out


def _string(obj: Mapping[str, Any], key: str, where: str = "") -> str:
    if key not in obj:
        raise RecordError(f'{where}missing "{key}"')
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(f'{where}"{key}" must be a string, got {type(value).__name__}')
    return value


def _content(message: Mapping[str, Any], where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    if content is None:
        raise RecordError(f'{where}missing "content"')
    raise RecordError(f'{where}"content" must be a string or a list of {{"type": "text", "text": ...}} parts, '
                      f"got {type(content).__name__}")


def _conversation(messages: Any) -> tuple[str, str, tuple[ChatMessage, ...]]:
    """(prompt, response, context) of an OpenAI-style message list."""
    if not isinstance(messages, list) or not messages:
        raise RecordError('"messages" must be a non-empty list of {"role": ..., "content": ...} objects')
    turns: list[ChatMessage] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]: "
        if not isinstance(message, dict):
            raise RecordError(f"{where}expected a JSON object, got {type(message).__name__}")
        role = message.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise RecordError(f"{where}role {role!r} is not one of {', '.join(ROLES)}; tool and function turns "
                              "are not trained on, so drop them or fold their text into a user turn")
        turns.append(ChatMessage(role, _content(message, where)))
    if turns[-1].role == "assistant":
        reply, turns = turns[-1].content, turns[:-1]
    else:
        reply = ""  # a prompt without an answer yet (e.g. auxiliary prompts a model will answer)
    if not turns or turns[-1].role != "user":
        raise RecordError("the final assistant reply must follow a user turn (the prompt it answers); "
                          "the conversation's last turns must be user, then assistant")
    return turns[-1].content, reply, tuple(turns[:-1])


# The keys that say which form an object is in ("input" is Alpaca's too, but optional).
FORMS = {"prompt/response": ("prompt", "response"), "messages": ("messages",), "alpaca": ("instruction", "output")}


def record_from_json(obj: Any) -> TaskRecord:
    """One record from a parsed JSON value in any of the three forms; RecordError says what is wrong."""
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    found = [name for name, keys in FORMS.items() if any(k in obj for k in keys)]
    if len(found) > 1:
        raise RecordError(f"the object mixes the {' and '.join(found)} forms; keep the keys of one")
    if not found:
        raise RecordError('no "prompt"/"response", "messages" or "instruction"/"output" keys')
    domain = obj.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise RecordError(f'"domain" must be a string, got {type(domain).__name__}')
    form = found[0]
    if form == "messages":
        prompt, response, context = _conversation(obj["messages"])
        return TaskRecord(prompt, response, domain, context)
    if form == "alpaca":
        instruction, output = _string(obj, "instruction"), _string(obj, "output")
        extra = obj.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RecordError(f'"input" must be a string, got {type(extra).__name__}')
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return TaskRecord(prompt, output, domain)
    return TaskRecord(_string(obj, "prompt"), _string(obj, "response"), domain)


def _bad(path: Path, line_no: int, what: str) -> ValueError:
    return ValueError(f"{path}:{line_no}: {what}. {FORMS_HINT}; fix or remove that line.")


def read_jsonl(path: str | os.PathLike[str]) -> list[TaskRecord]:
    """Read task records, one JSON object per line in any of the three forms; blank lines are skipped.

    Raises ValueError naming the file and line for any malformed record, so a user can
    fix their data instead of training on half of it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass the path of a JSONL file of task records.")
    records: list[TaskRecord] = []
    with path.open("r", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _bad(path, line_no, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            try:
                records.append(record_from_json(obj))
            except RecordError as exc:
                raise _bad(path, line_no, str(exc)) from None
    if not records:
        raise ValueError(f"{path}: the file holds no records; write at least one line. {FORMS_HINT}.")
    return records


def write_jsonl(path: str | os.PathLike[str], records: Iterable[TaskRecord]) -> None:
    """Write records as JSONL atomically: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            for record in records:
                handle.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
