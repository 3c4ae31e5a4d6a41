"""Prompt templates: the text a model sees before its response.

Multi-turn conversations are flattened into the single-turn templates the way their reference
implementations do it (LLaMA-Factory's ``alpaca`` template, FastChat's ``vicuna_v1.1``):

* alpaca: the header once, then ``### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}<eos>\\n\\n``
  for every earlier turn, then the final instruction block (with ``### Input:`` when there is an input).
* vicuna_v1.1: ``{system} USER: {user} ASSISTANT: {assistant}<eos>USER: ... ASSISTANT:``.

A leading system message replaces the template's default system text (the Alpaca header or the
Vicuna preamble). ``<eos>`` is the tokenizer's end-of-sequence token, so an earlier turn ends the way
the model learns to end a response; without a tokenizer it is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_SYSTEM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    # Text between the prompt and the response. Vicuna's prompt ends with "ASSISTANT:" and the response
    # follows after a space; keeping the space on the response side keeps the prompt a token-prefix of
    # prompt + response with byte-level BPE tokenizers (where the space belongs to the next word).
    response_prefix: str = ""


TEMPLATES: dict[str, Template] = {
    "alpaca": Template("alpaca", "Stanford Alpaca: ### Instruction / ### Input / ### Response"),
    "vicuna_v1.1": Template("vicuna_v1.1", "FastChat Vicuna v1.1: USER: ... ASSISTANT:", response_prefix=" "),
    "chat": Template("chat", "the tokenizer's own chat template (tokenizer.apply_chat_template)"),
}

Message = dict[str, str]


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def check_tokenizer(template: str, tokenizer: Any) -> None:
    """Fail early, before any data is read, when ``tokenizer`` cannot serve ``template``."""
    get_template(template)
    if tokenizer is None or not getattr(tokenizer, "eos_token", None):
        raise ValueError("the tokenizer has no eos_token; set one so responses can end")
    if template == "chat":
        _check_chat(tokenizer)


def _check_chat(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat' needs a tokenizer with a chat_template; use 'alpaca' or 'vicuna_v1.1'")


def _user_text(instruction: str, input: str) -> str:
    # Chat-style templates have no input slot; the input follows the instruction as LLaMA-Factory does.
    return f"{instruction}\n{input}" if input else instruction


def _split_system(history: list[Message]) -> tuple[str | None, list[Message]]:
    if history and history[0]["role"] == "system":
        return history[0]["content"], history[1:]
    return None, history


def _alpaca(instruction: str, input: str, history: list[Message], eos: str) -> str:
    system, turns = _split_system(history)
    parts = [(system or (ALPACA_SYSTEM_WITH_INPUT if input else ALPACA_SYSTEM)) + "\n\n"]
    for message in turns:
        if message["role"] == "user":
            parts.append(f"### Instruction:\n{message['content']}\n\n")
        else:
            parts.append(f"### Response:\n{message['content']}{eos}\n\n")
    parts.append(f"### Instruction:\n{instruction}\n\n")
    if input:
        parts.append(f"### Input:\n{input}\n\n")
    parts.append("### Response:\n")
    return "".join(parts)


def _vicuna(instruction: str, input: str, history: list[Message], eos: str) -> str:
    system, turns = _split_system(history)
    parts = [(system or VICUNA_SYSTEM) + " "]
    for message in turns:
        if message["role"] == "user":
            parts.append(f"USER: {message['content']} ")
        else:
            parts.append(f"ASSISTANT: {message['content']}{eos or ' '}")
    parts.append(f"USER: {_user_text(instruction, input)} ASSISTANT:")
    return "".join(parts)


def apply_template(
    template: str,
    instruction: str,
    input: str = "",
    *,
    tokenizer: Any = None,
    history: list[Message] | None = None,
) -> str:
    """The prompt for ``instruction`` (and optional ``input``), ending where the response begins.

    ``history`` holds the earlier turns as ``{"role": "system"|"user"|"assistant", "content": ...}``
    messages (a system message only first). ``template="chat"`` needs ``tokenizer`` with a chat template.
    """
    get_template(template)
    history = list(history or [])
    if template == "chat":
        _check_chat(tokenizer)
        messages = [*history, {"role": "user", "content": _user_text(instruction, input)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    eos = getattr(tokenizer, "eos_token", None) or ""
    render = _alpaca if template == "alpaca" else _vicuna
    return render(instruction, input, history, eos)


def format_response(template: str, response: str, tokenizer: Any) -> str:
    """The completion text for ``response``: the template's response prefix, the response, then eos."""
    eos = tokenizer.eos_token
    text = get_template(template).response_prefix + response
    return text if text.endswith(eos) else text + eos
