"""alchemist_* Prometheus text: parses with prometheus_client's own parser, values from status."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from alchemist_sgl.api.metrics_text import render_alchemist_metrics


def _families(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_status_and_feedback_counts_become_families() -> None:
    status = {"weight_version": "v3",
              "train": {"steps": 4, "samples_trained": 9, "tokens_trained": 300, "last_loss": 2.5,
                        "loss_ema": 2.7, "learning_rate": 1e-4, "last_grad_norm": 0.5,
                        "replayed_tokens": 200, "recomputed_tokens": 40, "stale_recomputes": 1,
                        "nonfinite_skipped": 0, "units_over_budget": 2, "samples_pending": 3,
                        "paused": True, "last_step_tokens": 100, "last_step_ms": 500.0},
              "store": {"bytes_stored": 1024, "pages": 2},
              "publish": {"publishes": 3, "rejected": 1, "guarded": 2, "last_publish_ms": 20.0,
                          "last_stall_ms": 0.5}}
    text = render_alchemist_metrics(status, {"up": 5, "down": 1}, {200: 6, 404: 2})
    fam = _families(text)
    assert [(s.labels, s.value) for s in fam["alchemist_feedback"]] == [
        ({"label": "down"}, 1.0), ({"label": "up"}, 5.0)]  # the parser strips _total
    assert {s.labels["code"]: s.value for s in fam["alchemist_feedback_answers"]} == {"200": 6.0, "404": 2.0}
    assert fam["alchemist_versions_published"][0].value == 3.0
    assert fam["alchemist_guard_rollbacks"][0].value == 2.0
    assert "# TYPE alchemist_guard_rollbacks_total counter" in text
    assert fam["alchemist_train_tokens_per_second"][0].value == 200.0
    assert fam["alchemist_train_paused"][0].value == 1.0
    assert fam["alchemist_serving_version"][0].labels == {"version": "v3"}
    assert text.count("# TYPE alchemist_feedback_total counter") == 1


def test_missing_status_still_renders_feedback() -> None:
    fam = _families(render_alchemist_metrics(None, {"up": 1}, {}))
    assert set(fam) == {"alchemist_feedback"}


def test_round_accounting_becomes_families() -> None:
    status = {"train": {"samples_by_fate": {"trained": 7, "deferred": 1, "dropped": 2, "expired": 0},
                        "samples_trained_by_lag": {"0": 6, "1": 1}, "samples_fed": 12,
                        "samples_in_round": 2}}
    fam = _families(render_alchemist_metrics(status, {}, {}))
    assert {s.labels["fate"]: s.value for s in fam["alchemist_train_samples_by_fate"]} == {
        "trained": 7.0, "deferred": 1.0, "dropped": 2.0, "expired": 0.0}
    assert {s.labels["lag"]: s.value for s in fam["alchemist_train_samples_by_lag"]} == {"0": 6.0, "1": 1.0}
    assert fam["alchemist_train_samples_fed"][0].value == 12.0
    assert fam["alchemist_train_samples_in_round"][0].value == 2.0
