"""Seeded serving workloads for the benchmark report: token sequences and when they arrive.

Four shapes of traffic, each a list of ``Arrival`` in arrival order:

* ``chat``: sessions that resend their whole history every turn (system
  prompt, then every user message and reply so far, then the new message);
  turns of a session are a think time apart.
* ``rag``: requests that quote ``docs_per_request`` documents drawn from a
  shared pool with Zipf popularity (a few documents are in most requests),
  after a shared system prompt; Poisson arrivals.
* ``agent``: tasks that fan out many short sub-calls over one long system
  prompt and tool schema: a root call, then a burst of sub-calls a few
  milliseconds apart, each the task's context plus its own short step.
* ``no_reuse``: random prompts that share nothing (the control: a cache can
  only cost here, and the report shows how little).

Every token id and every arrival time comes from ``numpy``'s generator seeded
with ``seed`` (and the workload's name), so a seed gives the same workload on
any machine. Sizes are tokens; times are seconds from the first arrival.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True)
class Arrival:
    """One request: its prompt tokens, when it arrives (seconds), and how many leading tokens an earlier
    request already sent (``reusable_tokens``: the most any prefix cache could serve, before block rounding)."""

    workload: str
    name: str
    tokens: tuple[int, ...]
    arrival_seconds: float
    reusable_tokens: int


@dataclass(frozen=True)
class WorkloadSettings:
    """Sizes (tokens), counts, rates (requests per second) and the seed of every workload.

    The defaults fit a CPU run of the report's small model in a few minutes;
    ``scaled`` shrinks every size and count for a quick run.
    """

    seed: int = 0
    vocab_size: int = 8000
    system_tokens: int = 512
    # chat
    chat_sessions: int = 3
    chat_turns: int = 4
    chat_user_tokens: tuple[int, int] = (32, 128)
    chat_reply_tokens: tuple[int, int] = (32, 192)
    chat_think_seconds: float = 8.0
    # rag
    rag_requests: int = 12
    rag_documents: int = 16
    rag_document_tokens: int = 768
    rag_docs_per_request: int = 2
    rag_zipf_exponent: float = 1.2
    rag_question_tokens: int = 48
    rag_rate: float = 1.0
    # agent
    agent_tasks: int = 2
    agent_tool_tokens: int = 1536
    agent_task_tokens: int = 128
    agent_subcalls: int = 6
    agent_step_tokens: int = 48
    agent_burst_seconds: float = 0.005
    agent_task_gap_seconds: float = 10.0
    # no reuse
    no_reuse_requests: int = 8
    no_reuse_tokens: int = 1024
    no_reuse_rate: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"{f.name}: expected a number, got {value!r}")
            if f.name == "seed":
                if not isinstance(value, int) or value < 0:
                    raise ValueError(f"seed: expected an integer >= 0, got {value!r}")
            elif isinstance(value, tuple):
                if len(value) != 2 or not all(isinstance(v, int) for v in value) or not 1 <= value[0] <= value[1]:
                    raise ValueError(f"{f.name}: expected (least, most) integers with 1 <= least <= most, got {value!r}")
            elif f.type == "int" and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{f.name}: expected an integer >= 1, got {value!r}")
            elif f.type == "float" and value < 0:
                raise ValueError(f"{f.name}: expected a number >= 0, got {value!r}")
        if self.rag_docs_per_request > self.rag_documents:
            raise ValueError(f"rag_docs_per_request: expected <= rag_documents ({self.rag_documents}), "
                             f"got {self.rag_docs_per_request}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size: expected an integer >= 2, got {self.vocab_size}")

    def scaled(self, factor: float) -> "WorkloadSettings":
        """Every token size and request count times ``factor``: sizes stay >= 1 token, counts >= 2 (so
        every workload still repeats something), documents >= docs per request."""
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("seed", "vocab_size", "rag_docs_per_request") or f.type == "float":
                continue
            least = 1 if f.name.endswith("tokens") else 2
            if isinstance(value, tuple):
                changes[f.name] = tuple(max(least, round(v * factor)) for v in value)
            else:
                changes[f.name] = max(least, round(value * factor))
        changes["rag_documents"] = max(changes["rag_documents"], self.rag_docs_per_request)
        return WorkloadSettings(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


def _rng(settings: WorkloadSettings, workload: str) -> np.random.Generator:
    """One generator per (seed, workload): adding a workload never changes another's tokens."""
    return np.random.default_rng([settings.seed, zlib.crc32(workload.encode())])


def _tokens(rng: np.random.Generator, settings: WorkloadSettings, n: int) -> tuple[int, ...]:
    return tuple(int(t) for t in rng.integers(0, settings.vocab_size, n))


def _between(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def _in_order(workload: str, requests: list[tuple[float, str, tuple[int, ...]]]) -> list[Arrival]:
    """Sort by arrival and note, for each request, the longest prefix an earlier one sent."""
    out: list[Arrival] = []
    for at, name, tokens in sorted(requests, key=lambda r: (r[0], r[1])):
        reusable = max((_common_prefix(tokens, earlier.tokens) for earlier in out), default=0)
        out.append(Arrival(workload, name, tokens, round(at, 6), reusable))
    return out


def chat(settings: WorkloadSettings) -> list[Arrival]:
    """Sessions of ``chat_turns`` turns; each turn's prompt is the whole history plus the new message."""
    rng = _rng(settings, "chat")
    system = _tokens(rng, settings, settings.system_tokens)
    requests = []
    for session in range(settings.chat_sessions):
        at = float(rng.exponential(settings.chat_think_seconds))
        history = system
        for turn in range(settings.chat_turns):
            history += _tokens(rng, settings, _between(rng, settings.chat_user_tokens))
            requests.append((at, f"chat-{session}/turn-{turn}", history))
            history += _tokens(rng, settings, _between(rng, settings.chat_reply_tokens))  # the model's reply
            at += float(rng.exponential(settings.chat_think_seconds))
    return _in_order("chat", requests)


def zipf_weights(n: int, exponent: float) -> np.ndarray:
    """Popularity of ranks 1..n: proportional to ``1 / rank ** exponent``, summing to 1."""
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return weights / weights.sum()


def rag(settings: WorkloadSettings) -> list[Arrival]:
    """System prompt, ``rag_docs_per_request`` Zipf-popular documents (most relevant first), a question."""
    rng = _rng(settings, "rag")
    system = _tokens(rng, settings, settings.system_tokens)
    documents = [_tokens(rng, settings, settings.rag_document_tokens) for _ in range(settings.rag_documents)]
    weights = zipf_weights(settings.rag_documents, settings.rag_zipf_exponent)
    requests, at = [], 0.0
    for i in range(settings.rag_requests):
        drawn = rng.choice(settings.rag_documents, size=settings.rag_docs_per_request, replace=False, p=weights)
        prompt = system + sum((documents[d] for d in drawn), ()) + _tokens(rng, settings, settings.rag_question_tokens)
        requests.append((at, f"rag-{i}/docs-{'-'.join(str(int(d)) for d in drawn)}", prompt))
        at += float(rng.exponential(1.0 / settings.rag_rate))
    return _in_order("rag", requests)


def agent(settings: WorkloadSettings) -> list[Arrival]:
    """Per task: a root call over system prompt + tool schema + task, then a burst of sub-calls under it."""
    rng = _rng(settings, "agent")
    context = _tokens(rng, settings, settings.system_tokens) + _tokens(rng, settings, settings.agent_tool_tokens)
    requests = []
    for task in range(settings.agent_tasks):
        at = task * settings.agent_task_gap_seconds
        prompt = context + _tokens(rng, settings, settings.agent_task_tokens)
        requests.append((at, f"agent-{task}/root", prompt))
        for call in range(settings.agent_subcalls):
            at += float(rng.exponential(settings.agent_burst_seconds))
            requests.append((at, f"agent-{task}/call-{call}",
                             prompt + _tokens(rng, settings, settings.agent_step_tokens)))
    return _in_order("agent", requests)


def no_reuse(settings: WorkloadSettings) -> list[Arrival]:
    """Random prompts sharing nothing, Poisson arrivals: the control."""
    rng = _rng(settings, "no_reuse")
    requests, at = [], 0.0
    for i in range(settings.no_reuse_requests):
        requests.append((at, f"no_reuse-{i}", _tokens(rng, settings, settings.no_reuse_tokens)))
        at += float(rng.exponential(1.0 / settings.no_reuse_rate))
    return _in_order("no_reuse", requests)


WORKLOADS: dict[str, Callable[[WorkloadSettings], list[Arrival]]] = {
    "chat": chat, "rag": rag, "agent": agent, "no_reuse": no_reuse}


def generate(name: str, settings: WorkloadSettings | None = None) -> list[Arrival]:
    """The requests of workload ``name`` (one of ``WORKLOADS``) in arrival order."""
    if name not in WORKLOADS:
        raise ValueError(f"workload: expected one of {sorted(WORKLOADS)}, got {name!r}")
    return WORKLOADS[name](settings or WorkloadSettings())
