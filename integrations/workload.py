"""A seeded mixed serving workload: growing chats, RAG over shared documents, and an agent's fan-out.

These are the three ways real traffic repeats prefixes: a chat resends its
whole history every turn, RAG requests quote the same few documents, and an
agent calls the model many times under one long system prompt. Token ids are
drawn from a seeded generator, so a run is reproducible; a chat turn's
history includes the reply the model actually generated on the previous
turn, which is why requests are produced one at a time as replies arrive.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kvstore.validation import check_counts

CHAT, RAG, AGENT = "chat", "rag", "agent"


@dataclass(frozen=True)
class WorkloadSettings:
    """Sizes in tokens, counts of requests; ``seed`` fixes every token id."""

    vocab_size: int = 8000
    system_tokens: int = 512
    document_tokens: int = 1536
    documents: int = 2
    rag_requests: int = 4
    question_tokens: int = 48
    chats: int = 2
    chat_turns: int = 3
    user_tokens: int = 64
    reply_tokens: int = 8
    agent_calls: int = 4
    task_tokens: int = 96
    seed: int = 0

    def __post_init__(self) -> None:
        check_counts(self, ("seed",), least=0)
        check_counts(self, ("vocab_size",), least=2)
        check_counts(self, (name for name in vars(self) if name not in ("seed", "vocab_size")))


def schedule(agent_calls: int, rag_requests: int, chats: int, chat_turns: int) -> list[tuple[str, int, int]]:
    """(kind, index, turn) in arrival order: the three kinds interleaved round-robin."""
    queues = {
        AGENT: [(AGENT, i, 0) for i in range(agent_calls)],
        RAG: [(RAG, i, 0) for i in range(rag_requests)],
        CHAT: [(CHAT, c, t) for t in range(chat_turns) for c in range(chats)],
    }
    order = []
    while any(queues.values()):
        for kind in (CHAT, RAG, AGENT):
            if queues[kind]:
                order.append(queues[kind].pop(0))
    return order


@dataclass(frozen=True)
class Request:
    """One request: what kind, a readable name, the prompt token ids, and how many tokens to generate."""

    kind: str
    name: str
    prompt: tuple[int, ...]
    reply_tokens: int
    conversation: int | None = None


class Workload:
    """Yields requests in arrival order; ``reply(request, tokens)`` feeds a chat turn's answer back."""

    def __init__(self, settings: WorkloadSettings = WorkloadSettings()):
        self.settings = settings
        self._generator = torch.Generator().manual_seed(settings.seed)
        self.system = self._tokens(settings.system_tokens)
        self.documents = [self._tokens(settings.document_tokens) for _ in range(settings.documents)]
        self._histories: dict[int, tuple[int, ...]] = {}

    def _tokens(self, count: int) -> tuple[int, ...]:
        return tuple(torch.randint(0, self.settings.vocab_size, (count,), generator=self._generator).tolist())

    def __iter__(self) -> Iterator[Request]:
        s = self.settings
        for kind, index, turn in schedule(s.agent_calls, s.rag_requests, s.chats, s.chat_turns):
            if kind == AGENT:
                yield Request(AGENT, f"agent call {index + 1}", self.system + self._tokens(s.task_tokens), 1)
            elif kind == RAG:
                document = self.documents[index % len(self.documents)]
                yield Request(RAG, f"rag doc {index % len(self.documents) + 1} q{index // len(self.documents) + 1}",
                              self.system + document + self._tokens(s.question_tokens), 1)
            else:
                history = self._histories.get(index, self.system)
                prompt = history + self._tokens(s.user_tokens)
                yield Request(CHAT, f"chat {index + 1} turn {turn + 1}", prompt, s.reply_tokens, index)

    def reply(self, request: Request, tokens: tuple[int, ...]) -> None:
        """The model answered ``request`` with ``tokens``: the chat's next turn resends it all."""
        if request.conversation is not None:
            self._histories[request.conversation] = request.prompt + tuple(tokens)
