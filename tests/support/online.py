"""HTTP helpers for online-loop tests: admin routes, status polling, scoring a fixed response."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import torch

from tests.support.servers import RunningServer


def post(server: RunningServer, path: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(f"{server.base_url}{path}", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def post_status(server: RunningServer, path: str, body: dict) -> tuple[int, dict]:
    """(HTTP status, JSON body) without raising on 4xx/5xx."""
    try:
        return 200, post(server, path, body)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def status(server: RunningServer) -> dict:
    with urllib.request.urlopen(f"{server.base_url}/alchemist/status", timeout=60) as resp:
        return json.loads(resp.read())


def wait_for(server: RunningServer, predicate: Callable[[dict], bool], timeout_s: float = 120,
             what: str = "condition") -> dict:
    deadline = time.monotonic() + timeout_s
    last: dict = {}
    while time.monotonic() < deadline:
        last = status(server)
        if predicate(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last status train={last.get('train')} "
                         f"publish={last.get('publish')}\n{server.log_tail()}")


def running_requests(server: RunningServer) -> int:
    """Requests in SGLang's running batch now (``/v1/loads``, asked of the scheduler)."""
    with urllib.request.urlopen(f"{server.base_url}/v1/loads?include=core", timeout=60) as resp:
        loads = json.loads(resp.read())["loads"]
    return sum(int(load["num_running_reqs"]) for load in loads)  # core fields are flat


def wait_running(server: RunningServer, n: int, timeout_s: float = 60) -> None:
    """Waits until at least ``n`` requests are in the running batch (admitted, prefilled or
    decoding); polls every 10 ms so a short decode is not missed."""
    deadline = time.monotonic() + timeout_s
    while running_requests(server) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {n} running requests after {timeout_s} s\n{server.log_tail()}")
        time.sleep(0.01)


def train_and_wait(server: RunningServer, samples: list[dict], publishes: int | None = None) -> dict:
    """Queues ``samples`` and waits until they are trained (and ``publishes`` more publishes)."""
    before = status(server)
    answer = post(server, "/alchemist/train/samples", {"samples": samples})
    assert answer["accepted"] == len(samples)
    want_trained = before["train"]["samples_trained"] + len(samples)
    want_pub = before["publish"]["publishes"] + before["publish"]["rejected"] + (publishes or 0)
    return wait_for(server, lambda s: s["train"]["samples_trained"] + s["train"]["nonfinite_skipped"]
                    >= want_trained and s["publish"]["publishes"] + s["publish"]["rejected"] >= want_pub
                    and s["train"]["state"] in ("idle", "paused") and s["train"]["writes_pending"] == 0,
                    what="training")


def chat(server: RunningServer, content: str, max_tokens: int = 8, **extra: Any) -> dict:
    return post(server, "/v1/chat/completions", {
        "model": server.model, "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "temperature": 0, **extra})


def response_logprobs(server: RunningServer, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
    """Served log-probs of ``response_ids`` after ``prompt_ids`` (SGLang's /generate input
    log-probs, one new token, radix cache bypassed from the prompt's last token on)."""
    out = post(server, "/generate", {
        "input_ids": prompt_ids + response_ids, "return_logprob": True,
        "logprob_start_len": len(prompt_ids) - 1,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
    vals = [v for v, _, _ in out["meta_info"]["input_token_logprobs"]]
    # Entry i is the log-prob of input token (logprob_start_len + i); the first is None.
    return [float(v) for v in vals[1:1 + len(response_ids)]]


def command(server: RunningServer, kind: str, payload: dict) -> Any:
    return post(server, f"/alchemist/commands/{kind}", payload)["result"]


def dump_files(dump: Path) -> set[Path]:
    """The recordings the scheduler has dumped so far (``ALCHEMIST_SGL_RECORD_DUMP_DIR``)."""
    return set(dump.glob("*.pt")) if dump.exists() else set()


def next_dump(dump: Path, before: set[Path], timeout_s: float = 60) -> dict:
    """The newest recording dumped since ``before`` (``dump_files`` taken before the request);
    fails if none appears within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = sorted(dump_files(dump) - before)
        if new:
            return torch.load(new[-1])
        time.sleep(0.2)
    raise AssertionError("no recording was dumped for the request")
