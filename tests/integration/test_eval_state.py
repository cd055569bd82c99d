"""After a server that ``python -m eval`` starts has trained, published and checkpointed, the user's
state (the ``var/`` paths ``make run`` resumes) is byte-identical, and the server's state is in the
run's folder (eval/context.py, eval/server.py ``STATE_KEYS``).

The test runs from a fake user checkout (``cwd``): the configs' relative state paths (``var/...``)
resolve there, as ``make run`` resolves them in the repository. The user's folder already holds
state under every default path of ``configs/cpu-smollm2.yaml`` (``make run``'s config) and
``configs/cpu-tiny.yaml`` (the config of the server started here). One tiny server, eager, about a
minute on 2 cores. The same run checks the context's bookkeeping: the server entry (overrides,
resolved config, log) and that leaving the context stops the server's whole process group.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path

import httpx
import psutil

from alchemist_sgl.config import load_config
from eval.context import RunContext

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "cpu-tiny.yaml"
MAKE_RUN = REPO / "configs" / "cpu-smollm2.yaml"


def _user_state(user: Path) -> list[Path]:
    """Creates state under every default state path of make run's config and the tiny one."""
    made = []
    for config in (MAKE_RUN, TINY):
        c = load_config(config)
        ckpt, db = user / c.train.checkpoint_dir, user / c.feedback.db_path
        ckpt.mkdir(parents=True)
        (ckpt / "versions.json.user").write_text('{"the user": "own state"}')
        db.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(db) as conn:  # a valid database: a server opening it would change it
            conn.execute("CREATE TABLE user_rows (x TEXT)")
            conn.execute("INSERT INTO user_rows VALUES ('mine')")
        conn.close()
        made += [ckpt, db]
    return made


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``: relative path -> sha256 of its bytes ("dir")."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _wait_for(url: str, predicate, timeout_s: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout_s
    last: dict = {}
    while time.monotonic() < deadline:
        last = httpx.get(f"{url}/alchemist/status", timeout=30).json()
        if predicate(last):
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out; last train={last.get('train')} publish={last.get('publish')}")


def test_an_eval_server_leaves_the_users_state_untouched(tmp_path: Path, monkeypatch) -> None:
    user, out = tmp_path / "user", tmp_path / "results"
    made = _user_state(user)
    before = _snapshot(user / "var")
    monkeypatch.chdir(user)  # the server inherits this folder: relative var/ paths land in user/
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]))
    ctx = RunContext("state-check", TINY, None, None, out, quick=True, progress=False)
    with ctx.server(overrides=["train.checkpoint_every_s=0"]) as url:  # a checkpoint every round
        pid = ctx._pids[url]
        group = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "tiny", "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": 8, "temperature": 0}).json()
        answer = httpx.post(f"{url}/v1/feedback", timeout=60,
                            json={"completion_id": reply["id"], "rating": "up"}).json()
        assert answer["status"] == "accepted", answer
        end = _wait_for(url, lambda s: s["train"]["samples_trained"] >= 1
                        and s["publish"]["publishes"] + s["publish"]["rejected"] >= 1
                        and s["train"]["state"] == "idle" and s["train"]["writes_pending"] == 0)

    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in group), "the context stopped its server's whole process group"
    assert _snapshot(user / "var") == before, "the user's var/ changed"
    assert all(p.exists() for p in made)
    state = (out / "state" / "server-0").resolve()
    (entry,) = ctx.servers
    assert entry["state_dir"] == str(state) and entry["ready_s"] > 0 and Path(entry["log"]).exists()
    assert entry["overrides"] == ["train.checkpoint_every_s=0", f"train.checkpoint_dir={state / 'checkpoints'}",
                                  f"feedback.db_path={state / 'feedback.sqlite'}"]
    assert entry["resolved_config"]["train"]["checkpoint_every_s"] == 0
    assert entry["resolved_config"]["train"]["checkpoint_dir"] == str(state / "checkpoints")
    ckpts = state / "checkpoints"
    assert (ckpts / "versions.json").is_file() and list(ckpts.glob("ckpt-*.pt")), sorted(ckpts.rglob("*"))
    if end["publish"]["publishes"] >= 1:
        assert any((ckpts / "adapters").iterdir()), "a published version's adapter is kept with it"
    with sqlite3.connect(state / "feedback.sqlite") as conn:
        rows = conn.execute("SELECT completion_id FROM feedback").fetchall()
        completions = conn.execute("SELECT COUNT(*) FROM completions").fetchone()[0]
    conn.close()
    assert (reply["id"],) in rows and completions >= 1
    assert (out / "logs").is_dir() and list((out / "logs").glob("server-*.log"))
