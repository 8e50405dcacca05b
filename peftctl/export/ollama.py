"""An Ollama Modelfile for a GGUF model or adapter: its chat template in Ollama's words.

Ollama does not run a model's Jinja chat template; it needs a Go template (`TEMPLATE`) and the
tokens at which a reply ends (`PARAMETER stop`). A template that does not match the one the
adapter was trained with is the most reported cause of a fine-tuned model that babbles, so the
translation is checked, not assumed: the tokenizer's own template renders a few probe
conversations, and it is translated only if a family below renders every one of them
identically. Families: ChatML (SmolLM2, Qwen) and Llama 3. A default system prompt that the
Jinja template inserts when a conversation has none becomes the Modelfile's `SYSTEM`, which
Ollama inserts the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from peftctl.core.errors import UserError

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class ChatFamily:
    name: str
    turn: Callable[[str, str], str]  # (role, content) → one rendered turn
    reply_start: str  # what add_generation_prompt appends
    end_of_turn: str  # the token that closes a turn: where a reply stops
    go_template: str  # Ollama's TEMPLATE doing the same over .Messages

    def render(self, messages: Messages, add_generation_prompt: bool) -> str:
        text = "".join(self.turn(m["role"], m["content"]) for m in messages)
        return text + (self.reply_start if add_generation_prompt else "")


# Each Go template renders every message as `turn` does, then opens the assistant's reply unless
# the last message is the assistant's own (Ollama then continues that message, left open).
CHATML = ChatFamily(
    "ChatML", lambda role, content: f"<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n",
    "<|im_end|>",
    """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<|im_start|>{{ .Role }}
{{ .Content }}{{ if not (and $last (eq .Role "assistant")) }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}""")

LLAMA3 = ChatFamily(
    "Llama 3", lambda role, content: f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
    "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>",
    """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}{{ if not (and $last (eq .Role "assistant")) }}<|eot_id|>{{ end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}""")

FAMILIES = (CHATML, LLAMA3)

# Probe conversations: (messages, add_generation_prompt). The first has no system message, so a
# default one the template inserts shows; the others cover a system turn, a multi-turn history
# and a conversation that ends with the assistant's reply.
USER_ONLY = ([{"role": "user", "content": "What is 2+2?"}], True)
PROBES = [
    USER_ONLY,
    ([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi."},
      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}], True),
    ([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}], False),
]


@dataclass(frozen=True)
class Translation:
    family: ChatFamily
    default_system: str | None
    stops: list[str]


def translate(tokenizer: Any) -> Translation:
    """The family whose rendering matches the tokenizer's chat template on every probe, the
    default system prompt it inserts, and the stop tokens (end of turn, EOS); refused otherwise."""
    for family in FAMILIES:
        default_system = _default_system(tokenizer, family)
        if all(family.render(_with_system(messages, default_system), prompt) in _renderings(tokenizer, messages, prompt)
               for messages, prompt in PROBES):
            stops = [family.end_of_turn] + ([tokenizer.eos_token] if tokenizer.eos_token != family.end_of_turn else [])
            return Translation(family, default_system, stops)
    raise UserError("cannot translate the base's chat template to an Ollama TEMPLATE: it renders like none of "
                    "the known families", where="--ollama",
                    expected=" or ".join(f.name for f in FAMILIES) + " chat templates",
                    fix="export without --ollama and write the Modelfile's TEMPLATE yourself, matching the "
                        "template the adapter was trained with")


def _renderings(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> list[str]:
    """The Jinja template's text, and that text less a leading BOS (which llama.cpp adds by itself
    where the tokenizer does: Llama 3); none where the template refuses the conversation."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError):
        return []  # a template may refuse a role order it does not support (its raise_exception)
    bos = tokenizer.bos_token
    return [text, text[len(bos):]] if bos and text.startswith(bos) else [text]


def _default_system(tokenizer: Any, family: ChatFamily) -> str | None:
    """The system prompt the template inserts into a conversation without one, if it does."""
    before, _, after = family.turn("system", "\0").partition("\0")
    for text in _renderings(tokenizer, *USER_ONLY):
        if text.startswith(before) and after in text[len(before):]:
            return text[len(before):text.index(after, len(before))]
    return None


def _with_system(messages: Messages, system: str | None) -> Messages:
    if system is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system}, *messages]


def modelfile(model: str, translation: Translation, adapter: str | None = None) -> str:
    """The Modelfile: FROM the model GGUF (and ADAPTER the LoRA GGUF), TEMPLATE, SYSTEM, stops."""
    for text in (translation.family.go_template, translation.default_system or ""):
        if '"""' in text:  # the Modelfile's own quoting
            raise UserError('the chat template or its system prompt contains """, which a Modelfile cannot quote',
                            where="--ollama", fix="write the Modelfile yourself")
    lines = [f"# Written by peftctl export: the {translation.family.name} chat template the adapter was trained with.",
             f"FROM {model}"]
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    lines.append(f'TEMPLATE """{translation.family.go_template}"""')
    if translation.default_system is not None:
        lines.append(f'SYSTEM """{translation.default_system}"""')
    lines += [f"PARAMETER stop {stop_value(stop)}" for stop in translation.stops]
    return "\n".join(lines) + "\n"


def stop_value(token: str) -> str:
    """A stop token as a Modelfile value: quoted, with quotes and backslashes escaped."""
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'
