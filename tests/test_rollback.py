"""Acceptance: the rollback path, as it really behaves."""
import json

import pytest

from conftest import shp, quiet, stream


def _rollbacks(result):
    return [r for r in result.log.records if r.restored_version is not None]


def test_rollback_f1_drop_003_restores_v21_first(default_trained):
    result = stream(quiet(rollback_f1_drop=0.03), trained=default_trained, console=print)
    first = _rollbacks(result)[0]
    assert first.restored_version == 21
    event = next(e for e in result.log.events if e["type"] == "rollback")
    assert (event["restored_version"], event["restored_batch"], round(event["restored_f1"], 3)) == (21, 10, 0.408)


@pytest.fixture(scope="module")
def strong_drift_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("strong")
    cfg = shp.parse_config(["--drift-strength", "3.5", "--rollback-f1-drop", "0.03", "--quiet", "--out", str(out)])
    result = stream(cfg, console=print, export_dir=out / "monitoring_export")
    return result, out


def test_strong_drift_rolls_back_to_post_heal_snapshots(strong_drift_run):
    result, out = strong_drift_run
    rollbacks = _rollbacks(result)
    assert len(rollbacks) >= 1
    events = json.loads((out / "monitoring_export" / "events.json").read_text())
    restored = [e for e in events if e["type"] == "rollback"]
    assert [e["restored_version"] for e in restored] == [r.restored_version for r in rollbacks]
    post_heal_versions = {e["version_post"] for e in events if e["type"] == "heal"}
    assert all(e["restored_version"] in post_heal_versions for e in restored), "never the clean weights"
    assert all(e["restored_version"] != 1 for e in restored)


def test_strong_drift_never_rolls_back_on_consecutive_batches(strong_drift_run):
    result, _ = strong_drift_run
    batches = [r.batch for r in _rollbacks(result)]
    assert len(batches) >= 2, "the run must roll back more than once for the gaps to mean anything"
    # a rollback restarts the health window, which needs min_batches_before_rollback fresh updates
    gap = result.cfg.min_batches_before_rollback
    assert all(b - a >= gap for a, b in zip(batches, batches[1:])), batches


def test_rollback_restores_the_snapshot_weights(default_trained):
    result = stream(quiet(rollback_f1_drop=0.03, n_batches=22, keep_best=50, keep_last=60),
                                trained=default_trained, console=print)
    assert result.log.records[-1].restored_version == 21
    served = result.model.adapter().state_dict()
    target = result.registry.snapshots[21].state
    assert all(served[k].equal(target[k]) for k in target)
