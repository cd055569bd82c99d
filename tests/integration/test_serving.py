"""Serving through SGLang's own OpenAI-compatible server, with our plugin in the scheduler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import psutil
import pytest
from openai import OpenAI

from tests.support.servers import REPO, RunningServer


def _client(server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=120)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def test_openai_client_chat_completion(tiny_server: RunningServer) -> None:
    reply = _client(tiny_server).chat.completions.create(
        model=tiny_server.model, messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8, temperature=0)
    assert reply.id
    assert reply.choices[0].finish_reason in {"length", "stop"}
    assert reply.usage.completion_tokens > 0
    assert isinstance(reply.choices[0].message.content, str) and reply.choices[0].message.content


def test_openai_client_streaming_chat(tiny_server: RunningServer) -> None:
    stream = _client(tiny_server).chat.completions.create(
        model=tiny_server.model, messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 2
    assert len({c.id for c in chunks}) == 1, "every chunk of one completion carries the same id"
    assert text


def test_streaming_and_plain_agree_greedily(tiny_server: RunningServer) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    client = _client(tiny_server)
    plain = client.chat.completions.create(model=tiny_server.model, messages=messages, max_tokens=12, temperature=0)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=tiny_server.model, messages=messages, max_tokens=12,
                                                temperature=0, stream=True) if c.choices)
    assert streamed == plain.choices[0].message.content


def test_completions_and_models(tiny_server: RunningServer) -> None:
    client = _client(tiny_server)
    models = [m.id for m in client.models.list().data]
    assert tiny_server.model in models
    reply = client.completions.create(model=tiny_server.model, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert reply.choices[0].text


def test_status_comes_from_the_scheduler_process(tiny_server: RunningServer) -> None:
    status = _get_json(f"{tiny_server.base_url}/alchemist/status")
    for key in ("version", "model", "device", "scheduler_pid", "iterations"):
        assert key in status, key
    assert status["model"] == tiny_server.model
    assert status["device"] == "cpu"
    pid = status["scheduler_pid"]
    assert pid != tiny_server.proc.pid
    title = " ".join(psutil.Process(pid).cmdline()) or psutil.Process(pid).name()
    assert title.startswith("sglang::scheduler"), title
    assert pid in {p.pid for p in psutil.Process(tiny_server.proc.pid).children(recursive=True)}
    before = status["iterations"]
    _client(tiny_server).chat.completions.create(
        model=tiny_server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert _get_json(f"{tiny_server.base_url}/alchemist/status")["iterations"] > before


def test_sglang_benchmark_serving_runs_clean(tiny_server: RunningServer, tmp_path) -> None:
    out = tmp_path / "bench.jsonl"
    cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang-oai-chat",
           "--base-url", tiny_server.base_url, "--model", tiny_server.model,
           "--tokenizer", str(REPO / "var" / "models" / "tiny"),
           "--dataset-name", "random-ids", "--num-prompts", "6", "--random-input-len", "64",
           "--random-output-len", "8", "--random-range-ratio", "1.0", "--request-rate", "inf",
           "--output-file", str(out), "--output-details", "--seed", "1"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text().strip().splitlines()[-1])
    assert record["completed"] == 6, "failed requests = num_prompts - completed"
    assert not any(record["errors"]), record["errors"]
    assert all(n > 0 for n in record["output_lens"])


def test_control_command_round_trip_reaches_the_scheduler(tiny_server: RunningServer) -> None:
    req = urllib.request.Request(f"{tiny_server.base_url}/alchemist/commands/debug.ping",
                                 data=json.dumps({"hello": "scheduler"}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = json.loads(resp.read())
    status = _get_json(f"{tiny_server.base_url}/alchemist/status")
    assert body["result"] == {"pid": status["scheduler_pid"], "echo": {"hello": "scheduler"}}
    bad = urllib.request.Request(f"{tiny_server.base_url}/alchemist/commands/no.such", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=60)
    assert err.value.code == 404
