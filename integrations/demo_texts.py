"""The demo's workload in real words: an agent's shared system prompt, RAG over real documents, and chats.

The same three ways traffic repeats prefixes as ``workload.Workload`` (same
request order, same ``Request`` objects), but rendered with the model's
chat template from English text: the system prompt and the questions are
written here, the documents are sections of the Python language reference
that ships with CPython (``pydoc_data``), and each chat turn resends the
history with the answer the model actually gave. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kvstore.integrations.workload import AGENT, CHAT, RAG, Request, schedule
from kvstore.validation import check_counts

SYSTEM = (
    "You are the assistant of a team that maintains a Python library used by many services. You answer "
    "questions from engineers about the language and the library, you review short pieces of code, and you "
    "write release notes. Keep answers short and precise. When a question is about the language itself, "
    "rely on the reference documentation you are given and quote the rule that applies. When you are not "
    "sure, say so and name what would settle it. Never invent an API. Prefer plain words to jargon, give one "
    "example where it helps, and end with the single most important point.\n\n"
    "House rules. Code in answers follows the project's style: type hints on every public function, "
    "docstrings that say why and give units, no global mutable state, locks used as context managers, and "
    "small frozen dataclasses for settings, validated with clear errors that name what was expected and what "
    "came. Errors are never swallowed: a failure is counted, logged once through the module's logger, and "
    "turned into the caller's documented outcome. Tests assert behaviour a user cares about, never "
    "wall-clock limits. Release notes start with the user-visible change, then the reason, then what to do "
    "when upgrading, each in one sentence. Reviews name the line, the problem and the fix, most serious "
    "first, and say when something is fine as it is.")
TASKS = (
    "Write a one-line release note for a fix that stops a cache from returning stale entries.",
    "Review this line and say what is wrong: if x == None: return",
    "Explain in one sentence why a library should not print to standard output.",
    "Name two ways to make a loop over a large list faster in Python.",
    "Suggest a clear name for a function that reads a block of bytes from a file at an offset.",
    "Say in one sentence what a context manager guarantees.",
)
DOCUMENTS = ("exceptions", "typesseq")  # sections of the language reference (pydoc_data.topics)
QUESTIONS = (
    "According to the document, what happens to an exception that no handler catches?",
    "What does the document say about the operations every sequence type supports?",
    "Summarise the document in one sentence.",
    "Which example in the document would you show a new engineer first, and why?",
)
CHATS = (
    ("What is a generator in Python?", "How is it different from a list?", "When should I prefer a list?"),
    ("What does the with statement do?", "Can I write my own?", "Give a short example."),
)


@dataclass(frozen=True)
class TextWorkloadSettings:
    """Counts of requests and sizes in tokens (documents are cut to ``document_tokens``)."""

    document_tokens: int = 1536
    rag_requests: int = 4
    chats: int = 2
    chat_turns: int = 3
    reply_tokens: int = 24
    agent_calls: int = 4

    def __post_init__(self) -> None:
        check_counts(self, vars(self))
        for name, most in (("agent_calls", len(TASKS)), ("chats", len(CHATS)), ("chat_turns", len(CHATS[0]))):
            if getattr(self, name) > most:
                raise ValueError(f"{name}: expected at most {most} (the texts written for the demo), "
                                 f"got {getattr(self, name)}")


def document(name: str, tokenizer: Any, max_tokens: int) -> str:
    """The language reference's section ``name``, cut to its first ``max_tokens`` tokens."""
    from pydoc_data.topics import topics

    ids = tokenizer(topics[name].strip(), add_special_tokens=False).input_ids[:max_tokens]
    return tokenizer.decode(ids)


class TextWorkload:
    """Yields requests in arrival order; ``reply(request, tokens)`` feeds a chat turn's answer back."""

    def __init__(self, tokenizer: Any, settings: TextWorkloadSettings = TextWorkloadSettings()):
        self.settings = settings
        self.tokenizer = tokenizer
        self.documents = [document(name, tokenizer, settings.document_tokens) for name in DOCUMENTS]
        self._histories: dict[int, list[dict[str, str]]] = {}
        self._pending: dict[int, list[dict[str, str]]] = {}

    def _prompt(self, messages: list[dict[str, str]]) -> tuple[int, ...]:
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)
        return tuple(rendered["input_ids"])

    def __iter__(self) -> Iterator[Request]:
        s = self.settings
        system = {"role": "system", "content": SYSTEM}
        for kind, index, turn in schedule(s.agent_calls, s.rag_requests, s.chats, s.chat_turns):
            if kind == AGENT:
                messages = [system, {"role": "user", "content": TASKS[index]}]
                yield Request(AGENT, f"agent call {index + 1}", self._prompt(messages), s.reply_tokens)
            elif kind == RAG:
                doc = index % len(self.documents)
                question = QUESTIONS[(index // len(self.documents)) % len(QUESTIONS)]
                content = f"Document:\n{self.documents[doc]}\n\nQuestion: {question}"
                yield Request(RAG, f"rag doc {doc + 1} q{index // len(self.documents) + 1}",
                              self._prompt([system, {"role": "user", "content": content}]), s.reply_tokens)
            else:
                messages = self._histories.get(index, [system]) + [{"role": "user", "content": CHATS[index][turn]}]
                self._pending[index] = messages
                yield Request(CHAT, f"chat {index + 1} turn {turn + 1}", self._prompt(messages), s.reply_tokens,
                              index)

    def reply(self, request: Request, tokens: tuple[int, ...]) -> None:
        """The model answered ``request`` with ``tokens``: the chat's next turn resends it all."""
        if request.conversation is not None:
            answer = self.tokenizer.decode(list(tokens), skip_special_tokens=True).strip()
            self._histories[request.conversation] = self._pending.pop(request.conversation) + [
                {"role": "assistant", "content": answer}]
