"""A server that ``python -m eval`` starts keeps its state under the run's folder (eval/server.py
``STATE_KEYS``, eval/context.py ``check_state_under``): the pure parts. The real-server run that
leaves a user's ``var/`` byte-identical is tests/integration/test_eval_state.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from alchemist_sgl.config import Config, config_to_dict, load_config
from eval.context import RunContext, check_state_under, resolve_config
from eval.server import STATE_KEYS, ManagedServer, with_state_dir

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "cpu-tiny.yaml"


def _string_defaults(obj: object, prefix: str = "") -> dict[str, str]:
    """Every string-valued field of the config's defaults, by dotted name."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out |= _string_defaults(value, f"{prefix}{f.name}.")
        elif isinstance(value, str):
            out[f"{prefix}{f.name}"] = value
    return out


def test_the_state_keys_are_every_var_path_of_the_config_but_the_model_cache() -> None:
    """A new config key that puts server state under var/ must join STATE_KEYS (or this fails)."""
    var_paths = {k for k, v in _string_defaults(Config()).items() if v.startswith("var/")}
    # server.cache_dir holds the prepared model folders: inputs shared by every server, not state.
    assert var_paths - {"server.cache_dir"} == set(STATE_KEYS)
    assert "server.cache_dir" in var_paths


def test_with_state_dir_adds_each_state_key_the_overrides_do_not_name(tmp_path: Path) -> None:
    state = tmp_path / "s"
    assert with_state_dir(["train.round_s=5"], state) == (
        "train.round_s=5", f"train.checkpoint_dir={state / 'checkpoints'}",
        f"feedback.db_path={state / 'feedback.sqlite'}")
    named = with_state_dir([" feedback.db_path = /x/f.sqlite"], state)
    assert named == (" feedback.db_path = /x/f.sqlite", f"train.checkpoint_dir={state / 'checkpoints'}")


def test_a_managed_server_with_a_state_dir_points_its_state_there(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    srv = ManagedServer(TINY, ("train.round_s=5",), state_dir=Path("run/state/server-0"))
    state = (tmp_path / "run" / "state" / "server-0").resolve()
    assert srv.state_dir == state, "made absolute: the path does not depend on the server's folder"
    config = load_config(TINY, list(srv.overrides))
    assert Path(config.train.checkpoint_dir) == state / "checkpoints"
    assert Path(config.feedback.db_path) == state / "feedback.sqlite"
    assert config.train.round_s == 5
    cmd = srv.command()
    assert f"train.checkpoint_dir={state / 'checkpoints'}" in cmd and "--set" in cmd
    assert srv.describe()["state_dir"] == str(state)
    # Without a state_dir, the config's own paths (tests/support/servers.py passes its own).
    plain = ManagedServer(TINY, ("train.round_s=5",))
    assert plain.overrides == ("train.round_s=5",) and plain.describe()["state_dir"] is None


def test_check_state_under_refuses_a_state_path_outside_the_run(tmp_path: Path) -> None:
    out = tmp_path / "results"
    inside = config_to_dict(load_config(TINY, [f"train.checkpoint_dir={out / 'a'}",
                                               f"feedback.db_path={out / 'b' / 'f.sqlite'}"]))
    check_state_under(inside, out)
    for key, value in (("train.checkpoint_dir", "var/checkpoints-tiny"),
                       ("feedback.db_path", str(tmp_path / "elsewhere.sqlite"))):
        other = "feedback.db_path" if key == "train.checkpoint_dir" else "train.checkpoint_dir"
        resolved = config_to_dict(load_config(TINY, [f"{key}={value}", f"{other}={out / 'x'}"]))
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            check_state_under(resolved, out)
    with pytest.raises(ValueError, match=r"train\.checkpoint_dir"):  # cpu-tiny's own: var/
        check_state_under(config_to_dict(load_config(TINY)), out)
    check_state_under(resolve_config(tmp_path / "missing.yaml"), out)  # unresolved: the server refuses it


@pytest.mark.parametrize("config", ["cpu-tiny.yaml", "cpu-smollm2.yaml", "cpu-smollm2-fp32.yaml"])
def test_every_server_of_a_run_gets_its_own_state_folder_under_out_dir(
        tmp_path: Path, monkeypatch, config: str) -> None:
    """``RunContext.server`` builds its servers this way; started ones are covered by the
    integration test. Here the start is replaced, to check the overrides of two servers in a run."""
    started: list[ManagedServer] = []

    def fake_start(self: ManagedServer) -> str:
        started.append(self)
        return self.base_url

    monkeypatch.setattr(ManagedServer, "start", fake_start)
    monkeypatch.setattr(ManagedServer, "stop", lambda self, grace_s=20.0: None)
    out = tmp_path / "results"
    ctx = RunContext("x", REPO / "configs" / config, None, None, out, True)
    with ctx.server():
        pass
    with ctx.server(overrides=["train.max_version_lag=1"]):
        pass
    with pytest.raises(ValueError, match="outside this run's folder"):
        with ctx.server(overrides=["feedback.db_path=var/feedback.sqlite"]):
            pass
    assert len(started) == 2, "the refused server was never started"
    folders = []
    for k, (srv, entry) in enumerate(zip(started, ctx.servers)):
        state = (out / "state" / f"server-{k}").resolve()
        resolved = entry["resolved_config"]
        assert Path(resolved["train"]["checkpoint_dir"]) == state / "checkpoints"
        assert Path(resolved["feedback"]["db_path"]) == state / "feedback.sqlite"
        assert entry["state_dir"] == str(state) and srv.state_dir == state
        folders.append(state)
    assert folders[0] != folders[1]
