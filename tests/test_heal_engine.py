"""The heal engine: healing never blocks or corrupts inference, faults are contained, memory is bounded."""
import csv
import json
import threading
import time

import numpy as np
import pytest
import torch

from conftest import SMALL, shp, quiet, stream


def _finite(model):
    return all(torch.isfinite(p).all() for p in model.adapter().parameters())


def _events(directory):
    return json.loads((directory / "events.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["thread", "process"])
def test_predictions_never_mix_two_published_versions(kind, small_trained):
    """8 threads predict while 300 heals publish: each output is exactly one version's."""
    cfg = quiet(SMALL, heal_steps=1, heal_lr=0.05)
    model = shp.Adapted(shp.copy.deepcopy(small_trained.model), "reflexive")
    heals = {"thread": shp.ThreadHeals, "process": shp.ProcessHeals}[kind](model, cfg)
    X = small_trained.data.drift.X[:64]
    job = shp.HealJob(1, shp.HealBatch(X, small_trained.data.drift.y[:64], shp.rule_labels(X, cfg)), 2.0, None)
    published = {shp.predict_proba(model, X).tobytes()}
    seen, errors, done = [set() for _ in range(8)], [], threading.Event()

    def predict(out):
        try:
            while not done.is_set():
                out.add(shp.predict_proba(model, X).tobytes())
                time.sleep(0.002)  # a serving thread between requests
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=predict, args=(s,)) for s in seen]
    for t in threads:
        t.start()
    try:
        for _ in range(300):
            heals.start(job)
            model.serve(heals.result(timeout=60).layer)
            published.add(shp.predict_proba(model, X).tobytes())
    finally:
        done.set()
        for t in threads:
            t.join()
        heals.close()
    assert not errors
    observed = set().union(*seen)
    assert len(published) > 270, "the heals did change the weights"
    assert len(observed) > 30, "predictions overlapped the heals"
    strays = [np.frombuffer(o, dtype=np.float32) for o in observed - published]
    nearest = [min(np.abs(x - np.frombuffer(p, dtype=np.float32)).max() for p in published) for x in strays]
    assert not strays, f"{len(strays)} outputs match no published version; nearest differ by {nearest}"


def _run_with(trained, tmp_path, batches=None, **overrides):
    """One stream with the fault in place; it must finish, and within 10 seconds."""
    cfg = quiet(SMALL, **overrides)
    start = time.monotonic()
    result = stream(cfg, trained=trained, batches=batches, console=print, export_dir=tmp_path)
    assert time.monotonic() - start < 10
    return result


def _assert_contained(result, tmp_path, kind, reason_part):
    assert len(result.log.records) == SMALL["n_batches"]
    assert _finite(result.model)
    events = [e for e in _events(tmp_path) if e["type"] == kind]
    assert events and all(reason_part in e["reason"] for e in events), events
    return events


def test_heal_exception_is_contained(small_trained, tmp_path, monkeypatch):
    served_before = small_trained.model.reflexive.state_dict()

    def broken(*args):
        raise RuntimeError("injected fault")
    monkeypatch.setattr(shp, "heal_loss", broken)
    result = _run_with(small_trained, tmp_path)
    _assert_contained(result, tmp_path, "heal_failed", "injected fault")
    after = result.model.adapter().state_dict()
    assert all(after[k].equal(served_before[k]) for k in after), "served weights stay as they were"
    assert {r.action for r in result.log.records} <= {"heal_failed", "none"}


def test_nan_loss_is_rejected(small_trained, tmp_path, monkeypatch):
    real = shp.heal_loss
    monkeypatch.setattr(shp, "heal_loss", lambda *a: real(*a) * float("nan"))
    result = _run_with(small_trained, tmp_path)
    _assert_contained(result, tmp_path, "heal_failed", "non-finite loss")


def test_nan_features_are_quarantined(small_trained, tmp_path):
    cfg = quiet(SMALL)
    batches = list(shp.drifted_batches(small_trained.data.drift, cfg, np.random.RandomState(1)))
    X, y = batches[2]
    X = X.copy()
    X[3, 0], X[7, shp.V14] = np.nan, np.inf
    batches[2] = (X, y)
    result = _run_with(small_trained, tmp_path, batches=batches)
    events = _assert_contained(result, tmp_path, "batch_quarantined", "2 rows")
    assert events[0]["batch"] == 3
    assert result.log.records[2].state == "QUARANTINED"
    assert result.log.counts["heal"] >= 1, "the stream goes on healing after the bad batch"


def test_saturating_inputs_do_not_poison_the_adapter(small_trained, tmp_path):
    cfg = quiet(SMALL)
    batches = [(X.copy(), y) for X, y in shp.drifted_batches(small_trained.data.drift, cfg, np.random.RandomState(2))]
    for X, _ in batches:
        X[:, shp.V14] *= 10_000  # sigmoid outputs of exactly 0 and 1
    result = _run_with(small_trained, tmp_path, batches=batches)
    assert len(result.log.records) == len(batches) and _finite(result.model)
    # Saturated outputs make the article's logit infinite: every heal is rejected, none is served.
    events = _events(tmp_path)
    assert [e["type"] for e in events] == ["heal_failed"] * len(batches)
    assert all(e["reason"] == "non-finite loss at step 1" for e in events)
    served = result.model.adapter().state_dict()
    clean = small_trained.model.reflexive.state_dict()
    assert all(served[k].equal(clean[k]) for k in clean), "the served weights are still the clean ones"


@pytest.fixture
def slow_heals(monkeypatch):
    """Every heal first sleeps 0.5 s. Afterwards the test waits for the heal threads it left: an
    interpreter that exits under a heal still inside torch aborts."""
    real = shp.AdapterTrainer.heal

    def slow(self, *args):
        time.sleep(0.5)
        return real(self, *args)
    monkeypatch.setattr(shp.AdapterTrainer, "heal", slow)
    yield
    for thread in [t for t in threading.enumerate() if t.name == "heal"]:
        thread.join()


def test_a_hung_heal_times_out(small_trained, tmp_path, slow_heals):
    result = _run_with(small_trained, tmp_path, heal_worker="thread", heal_timeout=0.05)
    _assert_contained(result, tmp_path, "heal_failed", "did not finish within 0.05 s")


def test_async_apply_publishes_each_heal_at_the_next_batch_boundary(small_trained, tmp_path):
    """Batches arrive 0.2 s apart, far longer than a heal takes: each heal, started at its batch
    without waiting, is published when the next batch arrives; the last one would serve no batch."""
    cfg = quiet(SMALL)

    def paced():
        for batch in shp.drifted_batches(small_trained.data.drift, cfg, np.random.RandomState(3)):
            yield batch
            time.sleep(0.2)
            while any(t.name == "heal" and t.is_alive() for t in threading.enumerate()):  # a loaded machine
                time.sleep(0.01)
    result = _run_with(small_trained, tmp_path, batches=paced(), heal_worker="thread", async_apply=True)
    records = result.log.records
    assert len(records) == SMALL["n_batches"] and _finite(result.model)
    assert [r.action for r in records] == ["heal_started"] * len(records)
    # No batch is scored after a heal on itself: the stream never waited for one.
    assert all(r.healed is None and r.lift is None for r in records)
    heals = [e for e in _events(tmp_path) if e["type"] == "heal"]
    n = len(records)
    assert [(e["batch"], e["applied_at_batch"]) for e in heals] == [(b, b + 1) for b in range(1, n)]
    # and every heal published reaches metrics.csv on the batch where it was applied
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert [int(r["version_post"]) for r in rows[1:]] == [e["version_post"] for e in heals]


def test_a_failed_run_leaves_no_half_written_export(small_trained, tmp_path):
    (tmp_path / "metrics.csv").write_text("previous run\n")
    cfg = quiet(SMALL)

    def batches():
        yield from list(shp.drifted_batches(small_trained.data.drift, cfg, np.random.RandomState(1)))[:3]
        raise KeyboardInterrupt  # the run is killed mid-stream
    with pytest.raises(KeyboardInterrupt):
        stream(cfg, trained=small_trained, batches=batches(), console=print, export_dir=tmp_path)
    assert (tmp_path / "metrics.csv").read_text() == "previous run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


@pytest.mark.slow
def test_long_stream_keeps_no_history_when_plots_are_off(small_trained):
    cfg = quiet(SMALL, n_batches=300, keep_best=3, keep_last=4)
    result = stream(cfg, trained=small_trained, console=print, keep_records=False)
    assert result.log.records == [] and result.log.events == []
    assert result.registry.saved > 300 and len(result.registry.snapshots) <= 1 + 3 + 4


@pytest.mark.slow
def test_process_worker_gives_the_same_run_as_the_thread(default_trained, tmp_path):
    """Heals and a rollback (a restore sent to the worker) give byte-identical metrics either way."""
    results = {}
    for kind in ("thread", "process"):
        cfg = quiet(heal_worker=kind, rollback_f1_drop=0.03)
        results[kind] = stream(cfg, trained=default_trained, console=print, export_dir=tmp_path / kind)
    assert results["process"].log.counts["rollback"] == 1
    assert (tmp_path / "thread" / "metrics.csv").read_bytes() == (tmp_path / "process" / "metrics.csv").read_bytes()


@pytest.mark.slow
def test_a_process_worker_heals_within_a_timeout_shorter_than_its_start_up(small_trained, tmp_path):
    """Starting the worker (about 2 s: it imports torch) is not part of a heal: a 1 s timeout still
    lets every heal through, as with a thread."""
    results = {kind: stream(quiet(SMALL, heal_worker=kind, heal_timeout=1.0), trained=small_trained,
                            export_dir=tmp_path / kind) for kind in ("thread", "process")}
    assert results["process"].log.counts["heal_failed"] == 0
    assert results["process"].log.counts["heal"] == results["thread"].log.counts["heal"] > 0
    assert (tmp_path / "thread" / "metrics.csv").read_bytes() == (tmp_path / "process" / "metrics.csv").read_bytes()


def test_async_apply_says_which_heal_the_end_of_the_stream_left_unapplied(small_trained, tmp_path, slow_heals):
    """A heal still running after the last batch is never applied: the report says so, naming its batch."""
    result = _run_with(small_trained, tmp_path, heal_worker="thread", async_apply=True)
    assert [r.action for r in result.log.records] == ["heal_started"] + ["heal_busy"] * (SMALL["n_batches"] - 1)
    lines = shp.report(result, shp.evaluate_run(result))
    assert "The heal started at batch 1 was not applied: the stream ended first" in "\n".join(lines)
    assert not [e for e in _events(tmp_path) if e["type"] == "heal"]


def test_a_waited_for_heal_leaves_nothing_unapplied(small_trained, tmp_path):
    result = _run_with(small_trained, tmp_path)
    assert not any("was not applied" in line for line in shp.report(result, shp.evaluate_run(result)))
