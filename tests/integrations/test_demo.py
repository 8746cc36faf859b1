"""``kvstore demo`` end to end on a tiny model, and the workload it replays."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from kvstore.cli import main  # noqa: E402
from kvstore.integrations.demo import RANDOM, DemoSettings, run_demo  # noqa: E402
from kvstore.integrations.demo_report import format_report  # noqa: E402
from kvstore.integrations.workload import AGENT, CHAT, RAG, Workload, WorkloadSettings  # noqa: E402
from conftest import real_model  # noqa: E402


def test_workload_shares_prefixes_the_way_real_traffic_does():
    settings = WorkloadSettings(vocab_size=100, system_tokens=10, document_tokens=20, documents=2, rag_requests=4,
                                question_tokens=3, chats=2, chat_turns=2, user_tokens=4, reply_tokens=2,
                                agent_calls=3, task_tokens=5)
    workload = Workload(settings)
    requests = []
    for request in workload:
        requests.append(request)
        workload.reply(request, (7,) * request.reply_tokens)
    kinds = [r.kind for r in requests]
    assert kinds == [CHAT, RAG, AGENT, CHAT, RAG, AGENT, CHAT, RAG, AGENT, CHAT, RAG]
    system = workload.system
    assert all(r.prompt[:10] == system for r in requests)
    rag = [r for r in requests if r.kind == RAG]
    assert rag[0].prompt[10:30] == rag[2].prompt[10:30] == workload.documents[0]
    assert rag[1].prompt[10:30] == workload.documents[1] != workload.documents[0]
    chats = [r for r in requests if r.conversation == 0]
    assert chats[1].prompt[:len(chats[0].prompt) + 2] == chats[0].prompt + (7, 7)  # history includes the reply
    again = [r.prompt for r in Workload(settings)]
    assert again[0] == requests[0].prompt and again[2] == requests[2].prompt  # seeded


def test_workload_settings_are_validated():
    with pytest.raises(ValueError, match="agent_calls: expected an integer >= 1, got 0"):
        WorkloadSettings(agent_calls=0)


def test_demo_settings_are_validated():
    with pytest.raises(ValueError, match="heads"):
        DemoSettings(hidden_size=100, heads=3)
    with pytest.raises(ValueError, match="prefix_tokens: expected an integer >= 1, got 0"):
        DemoSettings(prefix_tokens=0)


def test_quick_demo_loads_shared_prefixes_and_writes_a_chart(tmp_path):
    # A slow prefill rate (1 token/s) makes every stored token worth loading: exact counts, whatever the machine.
    settings = dataclasses.replace(DemoSettings.quick(RANDOM), prefill_tokens_per_second=1.0)
    figures = run_demo(settings, tmp_path)
    timings = figures["timings"]
    assert len(timings) == 6
    by_name = {t.request.name: t for t in timings}
    assert by_name["chat 1 turn 1"].loaded_tokens == 0  # the very first request is cold
    # the 40-token system prompt is 2 full 16-token blocks: every later request loads at least those
    assert all(t.loaded_tokens >= 32 for t in timings[1:])
    assert by_name["agent call 2"].loaded_tokens == 32
    assert by_name["chat 1 turn 2"].loaded_tokens == 48  # turn 1's prompt (48 tokens, 3 blocks) is reused
    assert all(t.with_store > 0 and t.without_store > 0 for t in timings)
    stats = figures["stats"]["store"]
    assert stats["prefill_tokens_saved"] >= sum(t.loaded_tokens for t in timings)
    prefix = figures["prefix"]
    assert list(prefix.ttft) == ["full prefill", "host hit", "disk hit", "disk hit, ec4", "disk hit, prefetched"]
    assert all(prefix.loaded_tokens[name] == settings.prefix_tokens for name in list(prefix.ttft)[1:])
    chart = figures["chart"]
    assert chart == tmp_path / "ttft.png" and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = format_report(figures, settings)
    assert "1. mixed workload" in report and "2. a 128-token shared prefix" in report
    assert "prefetch hiding" in report and "token hit rate" in report


def test_cli_demo_quick_random_model(tmp_path, capsys):
    assert main(["demo", "--quick", "--random-model", "--no-chart", "--no-progress", "--data-dir",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "host hit" in out and "prefill tokens saved" in out and "random-init Llama" in out
    assert not (tmp_path / "ttft.png").exists()


@pytest.fixture
def smollm2():
    return real_model()


def test_quick_demo_on_the_real_model_answers_the_same_with_and_without_kvstore(tmp_path, smollm2):
    settings = dataclasses.replace(DemoSettings.quick(), prefill_tokens_per_second=1.0)
    figures = run_demo(settings, tmp_path, chart=False, model=smollm2)
    timings = figures["timings"]
    assert [t.request.name for t in timings] == ["chat 1 turn 1", "rag doc 1 q1", "agent call 1", "chat 1 turn 2",
                                                 "rag doc 2 q1", "agent call 2"]
    assert all(t.identical for t in timings)  # greedy fp32: the same tokens with and without a hit
    assert timings[0].loaded_tokens == 0
    system_blocks = 272  # the chat template's system turn: 17 whole 16-token blocks every request shares
    assert all(t.loaded_tokens >= system_blocks for t in timings[1:])
    assert timings[3].loaded_tokens >= len(timings[0].request.prompt) // 16 * 16  # turn 2 reuses turn 1
    assert all(t.answer for t in timings)
    prefix = figures["prefix"]
    assert all(prefix.loaded_tokens[name] == settings.prefix_tokens for name in list(prefix.ttft)[1:])
    report = format_report(figures, settings)
    assert "SmolLM2-135M-Instruct" in report and "6 of 6 identical" in report
    # memory in proportion to the KV: host RAM sized to what the demo keeps, not a fixed pool
    kv_bytes = sum(len(t.request.prompt) + t.request.reply_tokens for t in timings) * 30 * 2 * 3 * 64 * 4
    assert figures["host_bytes"] < 3 * kv_bytes + 64 << 20
