"""`peftctl chat`'s conversation: the history, the model answering, and the slash commands.

A `ChatSession` sends the conversation so far, in the model's chat template, to the engine, the
same engine `peftctl serve` answers with, so a chat's reply is the server's reply to the same
messages. What reads the terminal or stdin and prints is the command line's (cli/chat_serve.py).
"""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Callable
from dataclasses import dataclass, field

from peftctl.data.tokenize import chat_prompt
from peftctl.serve.engine import Engine, Finished
from peftctl.serve.replies import Sampling

HELP = ("/adapter NAME  answer with that adapter      /base    answer with the base model\n"
        "/compare       the last prompt, answered by the base and every adapter\n"
        "/system TEXT   set the system message (empty: none)   /reset   forget the conversation\n"
        "/set KEY=VALUE ...  temperature, top_p, max_tokens, seed  /models   what can answer   /help")
SETTABLE = {"temperature": float, "top_p": float, "max_tokens": int, "seed": int}


@dataclass
class Said:
    """What a slash command answers: a line of text, or replies (`/compare`) by model name."""

    text: str = ""
    replies: list[tuple[str, Finished]] = field(default_factory=list)


@dataclass
class ChatSession:
    engine: Engine
    current: str  # the name answering: the base's, or an adapter's
    sampling: Sampling = Sampling(max_tokens=256)
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return list(self.engine.pool.served)

    def say(self, text: str, on_text: Callable[[str], None] = lambda piece: None) -> Finished:
        """The current model's reply to `text`, after the conversation so far; both join the history
        (a reply stopped by Ctrl-C as far as it got)."""
        finished = self.answer(self.current, [*self.history, {"role": "user", "content": text}], on_text)
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": finished.text}]
        return finished

    def answer(self, name: str, messages: list[dict[str, str]], on_text: Callable[[str], None]) -> Finished:
        """`name`'s reply to `messages` (the system message put first), streamed to `on_text`.
        Ctrl-C (KeyboardInterrupt) while it runs stops this reply only."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        ids = chat_prompt(self.engine.pool.tokenizer, system + messages)
        # A long conversation leaves less room for the reply; one that fills the context gets none.
        room = self.engine.context - len(ids) if self.engine.context else self.sampling.max_tokens
        if room < 1:
            return Finished("", "context", len(ids), 0)
        events: queue.Queue = queue.Queue()
        sampling = dataclasses.replace(self.sampling, max_tokens=min(self.sampling.max_tokens, room))
        job = self.engine.submit(name, ids, sampling, events.put)
        while True:
            try:
                event = events.get()
                if isinstance(event, Finished):
                    return event
                on_text(event)
            except KeyboardInterrupt:  # while waiting or while showing a piece: the engine ends it
                job.cancel()

    def command(self, line: str) -> Said:
        """Run one slash command; a mistake in it is said, not raised."""
        word, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if word == "/adapter":
            if rest not in self.engine.pool.served:
                return Said(f"no model named '{rest}'; these can answer: {', '.join(self.names)}")
            self.current = rest
            return Said(f"answering with {rest}")
        if word == "/base":
            self.current = self.engine.pool.base_name
            return Said(f"answering with the base model, {self.current}")
        if word == "/compare":
            return self.compare()
        if word == "/system":
            self.system = rest or None
            return Said("system message set" if rest else "no system message")
        if word == "/reset":
            self.history = []
            return Said("conversation forgotten")
        if word == "/set":
            return self.set(rest)
        if word == "/models":
            return Said(", ".join(f"{name}{' (answering)' if name == self.current else ''}" for name in self.names))
        if word == "/help":
            return Said(HELP)
        return Said(f"unknown command {word}; /help lists them")

    def compare(self) -> Said:
        """The last prompt answered again by every model, from the conversation before it."""
        if not self.history:
            return Said("nothing to compare yet: say something first")
        before, prompt = self.history[:-2], self.history[-2]
        return Said(replies=[(name, self.answer(name, [*before, prompt], lambda piece: None)) for name in self.names])

    def set(self, assignments: str) -> Said:
        changes = {}
        for item in assignments.split():
            key, _, value = item.partition("=")
            if key not in SETTABLE or not value:
                return Said(f"cannot set '{item}'; use KEY=VALUE with KEY one of {', '.join(SETTABLE)}")
            try:
                changes[key] = SETTABLE[key](value)
            except ValueError:
                return Said(f"{key} takes a number, not '{value}'")
        if changes.get("max_tokens", 1) < 1 or changes.get("temperature", 0) < 0 or not 0 < changes.get("top_p", 1) <= 1:
            return Said("max_tokens ≥ 1, temperature ≥ 0 and 0 < top_p ≤ 1")
        self.sampling = dataclasses.replace(self.sampling, **changes)
        return Said(", ".join(f"{key}={value}" for key, value in changes.items()) or "nothing to set")



def chat_names(folders: list) -> list[str]:
    """A name for each adapter folder: the folder's, or its run's for a run's `adapter` folder
    (runs/support/adapter is 'support'); a repeated name gets -2, -3, ..."""
    names: list[str] = []
    for folder in folders:
        folder = folder.resolve()
        name = folder.parent.name if folder.name == "adapter" and folder.parent.name else folder.name
        candidate, n = name, 1
        while candidate in names:
            n += 1
            candidate = f"{name}-{n}"
        names.append(candidate)
    return names


def open_chat(targets: list, sampling: Sampling, trust_remote_code: bool = False) -> ChatSession:
    """A chat with the first target (an adapter folder, or a model) and more adapters of its base;
    it answers with the first adapter, or with the base if the first target is a model."""
    from peftctl.core.errors import UserError
    from peftctl.serve.pool import ModelPool, spec_of

    spec, first = spec_of(str(targets[0]), trust_remote_code=trust_remote_code)
    folders = ([first] if first else []) + list(targets[1:])
    pool = ModelPool(spec)
    for name, folder in zip(chat_names(folders), folders):
        if name == pool.base_name:
            raise UserError(f"the adapter's name '{name}' is the base model's", file=folder, fix="rename its folder")
        pool.add(name, folder)
    engine = Engine(pool)
    engine.start()
    return ChatSession(engine, chat_names(folders)[0] if first else pool.base_name, sampling)
