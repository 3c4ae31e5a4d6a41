"""Data formats: detection from a record's fields, and strict per-row parsing into one common shape.

Every SFT format becomes ``(Prompt, response)`` and every preference format ``(Prompt, chosen,
rejected)``, where :class:`Prompt` is what :func:`fedllm.data.templates.apply_template` takes. Parsing
checks each row completely, so a bad row fails here with its file and row, never inside TRL.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from fedllm.data.records import DataFormatError, Row

# name -> (task, the fields that identify it); the order is the order of the error message hint.
FORMATS: dict[str, tuple[str, str]] = {
    "alpaca": ("sft", "instruction, output"),
    "dolly": ("sft", "instruction, response"),
    "conversations": ("sft", "conversations"),
    "messages": ("sft", "messages"),
    "text": ("sft", "text"),
    "prompt_completion": ("sft", "prompt, completion"),
    "dpo_pairs": ("dpo", "prompt, chosen, rejected"),
    "hh_rlhf": ("dpo", "chosen, rejected"),
    "llamafactory_dpo": ("dpo", "conversations or instruction, chosen, rejected"),
}

ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant",
}

HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def formats_hint(task: str | None = None) -> str:
    names = [name for name, (t, _) in FORMATS.items() if task in (None, t)]
    return "expected one of " + ", ".join(f"{name} ({FORMATS[name][1]})" for name in names)


@dataclass
class Prompt:
    """What the model is asked: arguments of ``apply_template``."""

    instruction: str
    input: str = ""
    history: list[dict[str, str]] = field(default_factory=list)


def _present(record: dict[str, Any]) -> set[str]:
    return {key for key, value in record.items() if value is not None}


def is_empty(record: dict[str, Any]) -> bool:
    return all(value is None or value == "" or value == [] or value == {} for value in record.values())


def _detect(record: dict[str, Any]) -> str | None:
    keys = _present(record)
    if {"chosen", "rejected"} <= keys:
        if keys & {"conversations", "messages", "instruction"}:
            return "llamafactory_dpo"
        if "prompt" in keys or isinstance(record["chosen"], list):
            return "dpo_pairs"  # a missing prompt with message lists is TRL's "implicit prompt" form
        return "hh_rlhf"
    for name, fields in (
        ("conversations", {"conversations"}),
        ("messages", {"messages"}),
        ("dolly", {"instruction", "response"}),
        ("alpaca", {"instruction", "output"}),
        ("prompt_completion", {"prompt", "completion"}),
        ("text", {"text"}),
    ):
        if fields <= keys:
            return name
    return None


def detect_format(record: dict) -> str:
    """The format of ``record``, one of :data:`FORMATS`, from its fields."""
    name = _detect(record)
    if name is None:
        raise DataFormatError("no known format", fields=list(record), hint=formats_hint())
    return name


# --- field readers: each raises the row's DataFormatError on a missing field or a wrong type ---


def _string(row: Row, key: str, *, required: bool = True) -> str:
    if key not in row.record or (row.record[key] is None and not required):
        if required:
            raise row.error(f"missing field {key!r}")
        return ""
    value = row.record[key]
    if not isinstance(value, str):
        raise row.error(f"field {key!r} must be a string, got {type(value).__name__} ({value!r:.40})")
    return value


def _messages(row: Row, value: Any, key: str) -> list[dict[str, str]]:
    """ShareGPT (from/value) or OpenAI (role/content) messages as role/content dicts with known roles."""
    if not isinstance(value, list) or not value:
        raise row.error(f"field {key!r} must be a non-empty list of messages, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(message, dict):
            raise row.error(f"{where} must be an object with role/content or from/value, got {type(message).__name__}")
        role, content = message.get("role", message.get("from")), message.get("content", message.get("value"))
        if role not in ROLES:
            raise row.error(f"{where} has unknown role {role!r}; known roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise row.error(f"{where} content must be a string, got {type(content).__name__}")
        if ROLES[role] == "system" and i > 0:
            raise row.error(f"{where}: a system message may only come first")
        messages.append({"role": ROLES[role], "content": content})
    return messages


def _with_system(row: Row, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Prepend a top-level ``system`` field (LLaMA-Factory) unless the messages start with one."""
    system = _string(row, "system", required=False)
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def _prompt_from_messages(row: Row, messages: list[dict[str, str]], key: str) -> Prompt:
    if not messages or messages[-1]["role"] != "user":
        raise row.error(f"the prompt in {key!r} must end with a user message")
    return Prompt(messages[-1]["content"], history=messages[:-1])


def _split_conversation(row: Row, messages: list[dict[str, str]], key: str) -> tuple[Prompt, str]:
    """Prompt = everything before the last assistant turn (which must follow a user turn); response = that turn."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise row.error(f"{key!r} has no assistant turn to learn from")
    if last == 0 or messages[last - 1]["role"] != "user":
        raise row.error(f"{key!r}: the last assistant turn must follow a user turn")
    return _prompt_from_messages(row, messages[:last], key), messages[last]["content"]


def _hh_turns(text: str) -> list[dict[str, str]] | None:
    """``"\\n\\nHuman: q\\n\\nAssistant: a ..."`` as messages, or None when ``text`` is no such transcript."""
    pieces = _HH_TURN.split(text)
    if len(pieces) < 3 or pieces[0].strip():
        return None
    roles, contents = pieces[1::2], pieces[2::2]
    return [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(roles, contents, strict=True)
    ]


def _prompt_value(row: Row, key: str) -> tuple[Prompt, bool]:
    """A prompt given as messages or a string, and whether the string was an HH-RLHF transcript.

    A string ending in 'Assistant:' that parses as a '\\n\\nHuman: ... \\n\\nAssistant:' transcript becomes
    its turns, so it gets the template like any conversation; any other string is the instruction.
    """
    value = row.record.get(key)
    if isinstance(value, list):
        return _prompt_from_messages(row, _with_system(row, _messages(row, value, key)), key), False
    text = _string(row, key)
    if text.rstrip().endswith(HH_ASSISTANT.strip()):
        turns = _hh_turns(text)
        if turns and len(turns) >= 2 and turns[-1] == {"role": "assistant", "content": ""}:
            return _prompt_from_messages(row, turns[:-1], key), True
    return Prompt(text), False


def _prompt_with_responses(row: Row, *keys: str) -> tuple[Any, ...]:
    """The 'prompt' field and the response fields ``keys``.

    After an HH transcript prompt the responses lose the whitespace the transcript puts around a turn
    (" No, sorry!"), exactly as the hh_rlhf format does, since the template supplies its own separator.
    """
    prompt, transcript = _prompt_value(row, "prompt")
    responses = [_response_value(row, key) for key in keys]
    return (prompt, *(response.strip() if transcript else response for response in responses))


def _response_value(row: Row, key: str) -> str:
    """A response given as a string, one message object, or a message list ending with the assistant."""
    value = row.record.get(key)
    if isinstance(value, dict | list):
        messages = _messages(row, [value] if isinstance(value, dict) else value, key)
        if messages[-1]["role"] != "assistant":
            raise row.error(f"the last message of {key!r} must be from the assistant")
        return messages[-1]["content"]
    return _string(row, key)


def _alpaca_prompt(row: Row, input_key: str) -> Prompt:
    """Alpaca/Dolly fields, with LLaMA-Factory's optional ``system`` and ``history`` ([[q, a], ...])."""
    history = row.record.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(t, str) for t in pair) for pair in history
    ):
        raise row.error("field 'history' must be a list of [instruction, response] string pairs")
    roles = ("user", "assistant")
    messages = [{"role": role, "content": text} for pair in history for role, text in zip(roles, pair, strict=True)]
    return Prompt(_string(row, "instruction"), _string(row, input_key, required=False), _with_system(row, messages))


# --- one parser per format ---


def _parse_sft(fmt: str, row: Row) -> tuple[Prompt, str] | str:
    """``(Prompt, response)``, or the plain text for the ``text`` format."""
    if fmt == "alpaca":
        return _alpaca_prompt(row, "input"), _string(row, "output")
    if fmt == "dolly":
        return _alpaca_prompt(row, "context"), _string(row, "response")
    if fmt in ("conversations", "messages"):
        messages = _with_system(row, _messages(row, row.record.get(fmt), fmt))
        return _split_conversation(row, messages, fmt)
    if fmt == "prompt_completion":
        return _prompt_with_responses(row, "completion")
    return _string(row, "text")


def _split_hh(row: Row) -> tuple[Prompt, str, str]:
    """OpenFedLLM's split_hh: the prompt is the transcripts' common prefix up to its last '\\n\\nAssistant:'."""
    chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    cut = os.path.commonprefix([chosen, rejected]).rfind(HH_ASSISTANT)
    if cut < 0:
        raise row.error("'chosen' and 'rejected' share no prefix ending in '\\n\\nAssistant:'")
    end = cut + len(HH_ASSISTANT)
    turns = _hh_turns(chosen[:end])
    if not turns or len(turns) < 2 or turns[-2]["role"] != "user":
        raise row.error("the shared prompt is not a '\\n\\nHuman: ... \\n\\nAssistant:' transcript")
    return _prompt_from_messages(row, turns[:-1], "chosen"), chosen[end:].strip(), rejected[end:].strip()


def _parse_dpo(fmt: str, row: Row) -> tuple[Prompt, str, str]:
    if fmt == "hh_rlhf":
        return _split_hh(row)
    if fmt == "llamafactory_dpo":
        key = next((k for k in ("conversations", "messages") if row.record.get(k) is not None), None)
        if key is None:
            prompt = _alpaca_prompt(row, "input")
        else:
            prompt = _prompt_from_messages(row, _with_system(row, _messages(row, row.record[key], key)), key)
        return prompt, _response_value(row, "chosen"), _response_value(row, "rejected")
    if row.record.get("prompt") is None and isinstance(row.record.get("chosen"), list):
        chosen = _messages(row, row.record["chosen"], "chosen")
        rejected = _messages(row, row.record.get("rejected"), "rejected")
        if chosen[:-1] != rejected[:-1] or {chosen[-1]["role"], rejected[-1]["role"]} != {"assistant"}:
            raise row.error("without a prompt, 'chosen' and 'rejected' must be the same conversation "
                            "up to a different last assistant message")
        prompt = _prompt_from_messages(row, _with_system(row, chosen[:-1]), "chosen")
        return prompt, chosen[-1]["content"], rejected[-1]["content"]
    return _prompt_with_responses(row, "chosen", "rejected")


def resolve_format(rows: list[Row], dataset_format: str | None, task: str) -> str:
    """The format to read ``rows`` with: ``dataset_format`` if given, else detected from the first non-empty row."""
    if dataset_format is not None:
        if dataset_format not in FORMATS:
            raise ValueError(f"unknown dataset_format {dataset_format!r}; choose one of {', '.join(FORMATS)}")
        fmt, first = dataset_format, rows[0]
    else:
        first = next((row for row in rows if not is_empty(row.record)), rows[0])
        if is_empty(first.record):
            raise first.error("every row is empty")
        fmt = _detect(first.record)
        if fmt is None:
            raise first.error("no known format", hint=formats_hint())
    if FORMATS[fmt][0] != task:
        other = "--task dpo" if task == "sft" else "--task sft"
        raise first.error(f"format {fmt!r} is {FORMATS[fmt][0].upper()} data (for {other})", hint=formats_hint(task))
    return fmt


def parse_rows(rows: list[Row], fmt: str) -> list[Any]:
    """Every row parsed with ``fmt`` (see :func:`_parse_sft` / :func:`_parse_dpo`); the first bad row raises."""
    parse = _parse_sft if FORMATS[fmt][0] == "sft" else _parse_dpo
    parsed = []
    for row in rows:
        if is_empty(row.record):
            raise row.error("empty row (every field is empty or missing)")
        parsed.append(parse(fmt, row))
    return parsed
