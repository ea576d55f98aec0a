r"""Row formats: recognise the shape of a row and turn it into messages.

Every format becomes one `Conversation`: the prompt messages, the chosen response messages, and
the rejected response messages (None for SFT rows, which have one response). The chat template
then renders prompt + response; the response tokens are what enters the loss.

Preference formats:
  standard                 prompt, chosen, rejected are strings
  conversational           prompt, chosen, rejected are message lists (TRL's explicit prompt)
  conversational_implicit  chosen, rejected are whole conversations; the shared leading messages are the prompt
  implicit                 chosen, rejected are whole texts; the longest common prefix is the prompt
                           (Anthropic HH's "\\n\\nHuman: ... \\n\\nAssistant: ..." turns become messages)
  ultrafeedback            UltraFeedback-binarized: a prompt string, chosen/rejected whole conversations
SFT formats (method sft; one response):
  sft_messages             messages: a conversation; its last assistant message is the response
  sft_prompt_completion    prompt, completion: strings or message lists
  sft_text                 text: plain text, no chat template; every token after the first is trained on
"""

from __future__ import annotations

import re
from typing import NamedTuple

PREFERENCE = ("standard", "conversational", "conversational_implicit", "implicit", "ultrafeedback")
SFT = ("sft_messages", "sft_prompt_completion", "sft_text")
FORMATS = PREFERENCE + SFT
NEEDS = {  # what a forced data.format expects of every row (named in the error)
    "standard": "prompt, chosen, rejected as strings",
    "conversational": "prompt, chosen, rejected as message lists",
    "conversational_implicit": "chosen, rejected as message lists",
    "implicit": "chosen, rejected as strings",
    "ultrafeedback": "a prompt string and chosen, rejected as message lists",
    "sft_messages": "messages as a message list",
    "sft_prompt_completion": "prompt and completion (strings or message lists)",
    "sft_text": "text as a string",
}
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


class BadRow(ValueError):
    """A row that cannot become a training example; `reason` is the counted kind."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}{': ' + detail if detail else ''}")


class Conversation(NamedTuple):
    prompt: list[dict]  # messages before the response (empty only for sft_text)
    chosen: list[dict]  # the response messages (sft_text: one message holding the text)
    rejected: list[dict] | None  # None for SFT rows
    format: str


def _has(row: dict, key: str) -> bool:
    return row.get(key) is not None


def detect(row: dict) -> str:
    """The format of one row, from which fields it has and their types."""
    if _has(row, "chosen") or _has(row, "rejected"):
        chosen, prompt = row.get("chosen"), row.get("prompt")
        if isinstance(chosen, list) or isinstance(row.get("rejected"), list):
            if isinstance(prompt, list):
                return "conversational"
            if isinstance(prompt, str) and isinstance(chosen, list):
                whole = any(isinstance(m, dict) and m.get("role") != "assistant" for m in chosen)
                return "ultrafeedback" if whole else "conversational"
            return "ultrafeedback" if prompt is not None else "conversational_implicit"
        return "standard" if _has(row, "prompt") else "implicit"
    if _has(row, "messages"):
        return "sft_messages"
    if _has(row, "completion"):
        return "sft_prompt_completion"
    if _has(row, "text"):
        return "sft_text"
    return "standard"  # reported as a missing field below


def messages(value, key: str) -> list[dict]:
    """A non-empty list of {role, content} string messages (other keys dropped), or BadRow."""
    if not isinstance(value, list) or not value:
        raise BadRow("malformed_messages", f"{key} is not a non-empty message list")
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadRow("malformed_messages", f"{key} has a message without string role/content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(row: dict, key: str, kind: str) -> str:
    if row.get(key) is None:
        raise BadRow("missing_field", key)
    if not isinstance(row[key], str):
        raise BadRow(kind, f"{key} is {type(row[key]).__name__}")
    return row[key]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _prompt(value, key: str = "prompt") -> list[dict]:
    if value is None:
        raise BadRow("missing_field", key)
    if isinstance(value, list):
        return messages(value, key)
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    raise BadRow("non_string_prompt", f"{key} is {type(value).__name__}")


def _standard(row: dict) -> Conversation:
    for key in ("chosen", "rejected"):
        _text(row, key, "non_string_response")
    prompt = _prompt(row.get("prompt"))
    return Conversation(prompt, _assistant(row["chosen"]), _assistant(row["rejected"]), "standard")


def _conversational(row: dict) -> Conversation:
    prompt = _prompt(row.get("prompt"))
    chosen = _response_messages(row, "chosen")
    return Conversation(prompt, chosen, _response_messages(row, "rejected"), "conversational")


def _response_messages(row: dict, key: str) -> list[dict]:
    value = row.get(key)
    if value is None:
        raise BadRow("missing_field", key)
    if isinstance(value, str):
        return _assistant(value)
    return messages(value, key)


def _split_conversations(cm: list[dict], rm: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Whole conversations -> (shared leading messages, chosen rest, rejected rest)."""
    k = 0
    while k < min(len(cm), len(rm)) - 1 and cm[k] == rm[k]:
        k += 1
    if k == 0:
        raise BadRow("prompt_mismatch", "chosen and rejected conversations share no leading messages (the prompt)")
    return cm[:k], cm[k:], rm[k:]


def _conversational_implicit(row: dict) -> Conversation:
    cm, rm = (_response_messages(row, key) for key in ("chosen", "rejected"))
    return Conversation(*_split_conversations(cm, rm), "conversational_implicit")


def _ultrafeedback(row: dict) -> Conversation:
    cm, rm = (_response_messages(row, key) for key in ("chosen", "rejected"))
    if cm[-1]["role"] != "assistant" or rm[-1]["role"] != "assistant":
        raise BadRow("malformed_messages", "last message must be the assistant's response")
    if cm[:-1] != rm[:-1]:
        raise BadRow("prompt_mismatch", "chosen and rejected conversations differ before the response")
    prompt = cm[:-1]
    if not prompt and isinstance(row.get("prompt"), str):
        prompt = [{"role": "user", "content": row["prompt"]}]
    return Conversation(prompt, cm[-1:], rm[-1:], "ultrafeedback")


def hh_messages(text: str, first: str = "user") -> list[dict]:
    r"""'\\n\\nHuman: a\\n\\nAssistant: b...' -> [{user: a}, {assistant: b}, ...] (empty turns dropped).

    Text before the first marker is a message of role `first`.
    """
    parts = HH_TURN.split(text)
    out = [{"role": first, "content": parts[0].strip()}] if parts[0].strip() else []
    for who, content in zip(parts[1::2], parts[2::2]):
        if content.strip():
            out.append({"role": "user" if who == "Human" else "assistant", "content": content.strip()})
    return out


def _implicit(row: dict) -> Conversation:
    chosen, rejected = (_text(row, key, "non_string_response") for key in ("chosen", "rejected"))
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    marks = [m.end() for m in HH_TURN.finditer(chosen[:n]) if m.group(1) == "Assistant" and m.end() <= n]
    if marks:  # HH: the prompt ends with the last "\n\nAssistant:" both texts share
        cut = marks[-1]
        prompt = hh_messages(chosen[:cut])
    else:  # no turn markers: the shared prefix, cut back to a word boundary, is one user message
        cut = max(chosen.rfind(c, 0, n) for c in " \n") + 1 if n < min(len(chosen), len(rejected)) else n
        prompt = [{"role": "user", "content": chosen[:cut].strip()}] if chosen[:cut].strip() else []
    if not prompt:
        raise BadRow("missing_field", "prompt (and chosen/rejected share no prefix to take it from)")
    c, r = chosen[cut:].strip(), rejected[cut:].strip()
    if not marks:
        return Conversation(prompt, _assistant(c), _assistant(r), "implicit")
    return Conversation(prompt, hh_messages(c, "assistant"), hh_messages(r, "assistant"), "implicit")


def _sft_messages(row: dict) -> Conversation:
    msgs = messages(row.get("messages"), "messages")
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
    if last < 0:
        raise BadRow("malformed_messages", "messages has no assistant message (the response)")
    return Conversation(msgs[:last], msgs[last : last + 1], None, "sft_messages")


def _sft_prompt_completion(row: dict) -> Conversation:
    prompt = _prompt(row.get("prompt"))
    return Conversation(prompt, _response_messages(row, "completion"), None, "sft_prompt_completion")


def _sft_text(row: dict) -> Conversation:
    return Conversation([], _assistant(_text(row, "text", "non_string_text")), None, "sft_text")


READERS = {
    "standard": _standard,
    "conversational": _conversational,
    "conversational_implicit": _conversational_implicit,
    "implicit": _implicit,
    "ultrafeedback": _ultrafeedback,
    "sft_messages": _sft_messages,
    "sft_prompt_completion": _sft_prompt_completion,
    "sft_text": _sft_text,
}


def _check(conv: Conversation) -> Conversation:
    if conv.format != "sft_text" and not any(m["content"].strip() for m in conv.prompt):
        raise BadRow("empty_prompt")
    for key, msgs in (("chosen", conv.chosen), ("rejected", conv.rejected)):
        if msgs is not None and msgs and msgs[0]["role"] != "assistant":
            raise BadRow("malformed_messages", f"{key}: the response must start with an assistant message")
        if msgs is not None and not any(m["content"].strip() for m in msgs):
            raise BadRow("empty_response", key)
    if conv.rejected is not None and conv.chosen == conv.rejected:
        raise BadRow("identical_responses")
    return conv


def normalise(row: dict, fmt: str = "auto") -> Conversation:
    """Row -> Conversation in `fmt` (auto: the row's own shape), or raise BadRow."""
    got = detect(row)
    if fmt != "auto":
        fits = got == fmt or (fmt == "sft_messages" and _has(row, "messages"))
        fits = fits or (fmt in ("conversational", "sft_prompt_completion") and _has(row, "prompt"))
        if not fits:
            have = sorted(k for k, v in row.items() if v is not None)
            raise BadRow("wrong_format", f"data.format={fmt} expects {NEEDS[fmt]}; the row has {have}")
        got = fmt
    return _check(READERS[got](row))
