"""Drift detectors beside FIDI: the hand-written ADWIN against river's, the KS test against brute force
and scipy, and each detector in the stream and the bench."""
import numpy as np
import pytest

from conftest import shp, quiet, stream

RNG = np.random.default_rng(2024)
STREAMS = {
    "stationary": RNG.normal(0.0, 1.0, 8_000),
    "abrupt shift": np.concatenate([RNG.normal(0.0, 1.0, 4_000), RNG.normal(0.8, 1.0, 4_000)]),
    "V14 of the article's drift": np.concatenate([RNG.normal(0.0, 1.0, 4_000), RNG.normal(-2.2, 1.0, 4_000)]),
    "bernoulli": np.concatenate([RNG.random(4_000) < 0.2, RNG.random(4_000) < 0.35]).astype(float),
}
PARAMETERS = [{}, {"delta": 0.05, "clock": 8, "max_buckets": 3, "min_window_length": 2, "grace_period": 0}]


def _detections(stream_values, new_detector, restart):
    detector, found, widths = new_detector(), [], []
    for i, x in enumerate(stream_values):
        changed = detector.update(float(x))
        widths.append(detector.width)
        if changed:
            found.append(i)
            if restart:
                detector = new_detector()
    return found, widths


@pytest.mark.parametrize("params", PARAMETERS, ids=["defaults", "others"])
@pytest.mark.parametrize("name", list(STREAMS))
def test_adwin_finds_the_changes_river_finds(name, params):
    """Same detections, same window widths after every value. river's ADWIN starts again from an empty
    window after a detection, ours keeps the newer part (as the paper's does): ours is restarted here."""
    river_drift = pytest.importorskip("river.drift")

    class River:
        def __init__(self):
            self.inner = river_drift.ADWIN(**params)

        def update(self, x):
            self.inner.update(x)
            return self.inner.drift_detected

        width = property(lambda self: self.inner.width)

    ours = _detections(STREAMS[name], lambda: shp.ADWIN(**params), restart=True)
    theirs = _detections(STREAMS[name], River, restart=False)
    assert ours == theirs
    assert bool(ours[0]) == (name != "stationary")


def test_ks_statistic_is_the_largest_gap_and_its_p_value_scipys():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    for shift in (0.0, 0.1, 0.3):
        a, b = rng.normal(0, 1, 1000), np.round(rng.normal(shift, 1, 300), 1)  # ties too
        d, p = shp.ks_two_sample(a, b)
        grid = np.concatenate([a, b])
        brute = max(abs(np.mean(a <= v) - np.mean(b <= v)) for v in grid)
        assert d == pytest.approx(brute, abs=1e-12)
        expected = stats.ks_2samp(a, b, method="asymp")
        assert d == pytest.approx(expected.statistic, abs=1e-12) and p == pytest.approx(expected.pvalue, abs=0.01)


def test_each_detector_sees_an_offset_at_once_and_nothing_where_nothing_drifts(default_trained):
    cfg = shp.bench_config(shp.Config(n_batches=8))
    delays = shp.detection_delays("offset", cfg, default_trained)
    assert delays == {"fidi": 2, "adwin": 0, "ks": 0}  # FIDI needs 3 batch means
    assert all(np.isnan(v) for v in shp.detection_delays("stationary", cfg, default_trained).values())
    alarms = shp.false_alarms(cfg, default_trained, n_batches=200)
    assert alarms["fidi"] == 0 and alarms["adwin"] <= 10 and alarms["ks"] <= 10


@pytest.mark.parametrize("detector", ["adwin", "ks"])
def test_the_detector_flag_decides_what_triggers_the_heal(detector, default_trained):
    """With no conflicts counted, only the detector can ask for a heal: FIDI waits for 3 batch means,
    ADWIN and KS see the article's drift at its first batch."""
    runs = {name: stream(quiet(n_batches=5, detector=name, conflict_min=10 ** 9), trained=default_trained)
            for name in ("fidi", detector)}
    first_heal = {name: next(r.batch for r in run.log.records if r.version_post) for name, run in runs.items()}
    assert first_heal == {"fidi": 3, detector: 1}
