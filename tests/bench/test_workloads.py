"""The report's workload generators: deterministic for a seed, and shaped like the traffic they name."""

from __future__ import annotations

from collections import Counter

import pytest
from kvbench.workloads import WORKLOADS, Arrival, WorkloadSettings, generate, zipf_weights

SMALL = WorkloadSettings(vocab_size=1000, system_tokens=64, chat_user_tokens=(4, 8), chat_reply_tokens=(4, 8),
                         rag_documents=8, rag_document_tokens=32, rag_question_tokens=4, agent_tool_tokens=96,
                         agent_task_tokens=16, agent_step_tokens=8, no_reuse_tokens=64)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_a_seed_gives_the_same_workload_and_another_seed_another(name):
    first, again = generate(name, SMALL), generate(name, WorkloadSettings(**{**vars(SMALL)}))
    assert first == again and all(isinstance(a, Arrival) for a in first)
    other = generate(name, WorkloadSettings(**{**vars(SMALL), "seed": 1}))
    assert [a.tokens for a in other] != [a.tokens for a in first]


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_requests_come_in_arrival_order_with_their_reusable_prefix(name):
    requests = generate(name, SMALL)
    assert [a.arrival_seconds for a in requests] == sorted(a.arrival_seconds for a in requests)
    assert requests[0].reusable_tokens == 0
    for i, a in enumerate(requests):
        assert a.workload == name and all(0 <= t < SMALL.vocab_size for t in a.tokens)
        longest = 0
        for earlier in requests[:i]:
            n = 0
            while n < min(len(a.tokens), len(earlier.tokens)) and a.tokens[n] == earlier.tokens[n]:
                n += 1
            longest = max(longest, n)
        assert a.reusable_tokens == longest


def test_chat_turns_resend_the_whole_history():
    requests = generate("chat", SMALL)
    sessions: dict[str, list[Arrival]] = {}
    for a in requests:
        sessions.setdefault(a.name.split("/")[0], []).append(a)
    assert len(sessions) == SMALL.chat_sessions
    for turns in sessions.values():
        assert len(turns) == SMALL.chat_turns
        for before, after in zip(turns, turns[1:]):
            grown = len(after.tokens) - len(before.tokens)
            assert after.tokens[:len(before.tokens)] == before.tokens  # the previous prompt, then reply + message
            assert SMALL.chat_user_tokens[0] + SMALL.chat_reply_tokens[0] <= grown
            assert grown <= SMALL.chat_user_tokens[1] + SMALL.chat_reply_tokens[1]
            assert after.arrival_seconds > before.arrival_seconds


def test_rag_documents_follow_zipf_popularity():
    settings = WorkloadSettings(**{**vars(SMALL), "rag_requests": 400, "rag_docs_per_request": 1})
    drawn = Counter(int(a.name.split("docs-")[1]) for a in generate("rag", settings))
    weights = zipf_weights(settings.rag_documents, settings.rag_zipf_exponent)
    assert drawn.most_common(1)[0][0] == 0  # rank 1 is the most popular document
    for doc, expected in enumerate(weights):
        assert abs(drawn[doc] / 400 - expected) < 0.06
    assert zipf_weights(3, 1.0) == pytest.approx([6 / 11, 3 / 11, 2 / 11])


def test_rag_requests_quote_whole_documents_after_the_shared_system_prompt():
    requests = generate("rag", SMALL)
    doc = SMALL.rag_document_tokens
    first = requests[0]
    for a in requests:
        assert a.tokens[:SMALL.system_tokens] == first.tokens[:SMALL.system_tokens]
        assert len(a.tokens) == SMALL.system_tokens + SMALL.rag_docs_per_request * doc + SMALL.rag_question_tokens
        assert len(set(a.name.split("docs-")[1].split("-"))) == SMALL.rag_docs_per_request  # no document twice


def test_agent_subcalls_fan_out_in_a_burst_under_their_task():
    requests = generate("agent", SMALL)
    context = SMALL.system_tokens + SMALL.agent_tool_tokens
    roots = [a for a in requests if a.name.endswith("/root")]
    assert len(roots) == SMALL.agent_tasks
    for root in roots:
        task = root.name.split("/")[0]
        calls = [a for a in requests if a.name.startswith(task + "/call-")]
        assert len(calls) == SMALL.agent_subcalls
        for call in calls:
            assert call.tokens[:len(root.tokens)] == root.tokens
            assert len(call.tokens) == len(root.tokens) + SMALL.agent_step_tokens
            assert call.reusable_tokens >= len(root.tokens)
        assert calls[-1].arrival_seconds - root.arrival_seconds < 1.0
    assert roots[1].tokens[:context] == roots[0].tokens[:context] and roots[1].reusable_tokens == context


def test_no_reuse_shares_nothing():
    requests = generate("no_reuse", SMALL)
    assert len(requests) == SMALL.no_reuse_requests
    assert all(a.reusable_tokens <= 1 for a in requests)  # a first token may match by chance, nothing more


def test_scaled_settings_shrink_sizes_and_keep_repeats():
    quick = WorkloadSettings().scaled(0.1)
    assert quick.system_tokens == 51 and quick.chat_turns == 2 and quick.rag_documents >= quick.rag_docs_per_request
    assert quick.chat_user_tokens == (3, 13)
    assert all(len(generate(name, quick)) >= 2 for name in WORKLOADS)


@pytest.mark.parametrize("change, message", [
    ({"seed": -1}, "seed: expected an integer >= 0, got -1"),
    ({"chat_turns": 0}, "chat_turns: expected an integer >= 1, got 0"),
    ({"chat_user_tokens": (9, 3)}, r"chat_user_tokens: expected \(least, most\) integers with 1 <= least <= most, "
                                   r"got \(9, 3\)"),
    ({"rag_rate": -1.0}, "rag_rate: expected a number >= 0, got -1.0"),
    ({"rag_docs_per_request": 20}, r"rag_docs_per_request: expected <= rag_documents \(16\), got 20"),
    ({"system_tokens": "many"}, "system_tokens: expected a number, got 'many'"),
])
def test_bad_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        WorkloadSettings(**change)


def test_an_unknown_workload_is_refused():
    with pytest.raises(ValueError, match=r"^workload: expected one of \['agent', 'chat', 'no_reuse', 'rag'\], "
                                         r"got 'batch'$"):
        generate("batch")
