"""The scenario bench: ceilings, prequential methods, label-free methods, shards."""
import collections
import json
import math

import numpy as np
import pytest

from conftest import SMALL, shp


@pytest.mark.parametrize("scenario", shp.SCENARIOS)
def test_scenario_ceiling_matches_monte_carlo_from_its_generator(scenario):
    """Draw many rows per batch from the scenario's own generator; score them with the true posterior."""
    cfg = shp.Config(n_batches=8, recurring_period=2)
    rng = np.random.RandomState(17)
    labels, posteriors = [], []
    for t in range(1, cfg.n_batches + 1):
        law = shp.scenario_law(scenario, t, cfg)
        n_fraud = rng.binomial(40_000, law.fraud_share)
        rows = shp.draw_rows(rng, 40_000 - n_fraud, n_fraud, law)
        labels.append(rows.y)
        posteriors.append(shp.bayes_posterior(rows.X, law))
    y, p = np.concatenate(labels), np.concatenate(posteriors)
    ceiling = shp.scenario_ceiling(scenario, cfg)
    assert abs(ceiling.accuracy - np.mean((p > 0.5) == (y == 1))) < 0.005
    assert abs(ceiling.roc_auc - shp.roc_auc(y, p)) < 0.005
    flagged = p > shp.cost_threshold(cfg)
    mc_cost = 1000 * (cfg.fn_cost * np.sum(~flagged & (y == 1)) + cfg.fp_cost * np.sum(flagged & (y == 0))) / len(y)
    assert ceiling.cost == pytest.approx(mc_cost, rel=0.03)


def test_covariate_scenario_leaves_p_y_given_x_alone():
    """Its tilt changes P(x) and the fraud share, but the posterior at every V14 stays the clean one."""
    cfg = shp.Config()
    clean, tilted = shp.scenario_law("stationary", 1, cfg), shp.scenario_law("covariate", 1, cfg)
    v = np.linspace(-6, 4, 101)
    assert tilted.fraud_share > clean.fraud_share and tilted.noise_shift == cfg.drift_strength
    assert np.allclose(shp.fraud_log_odds(tilted, v), shp.fraud_log_odds(clean, v))


class Spy:
    """Wraps a method: checks that each batch is predicted before the method adapts on it, and that a
    prediction depends on no other row of its batch (nothing was learned from the batch first)."""

    def __init__(self, inner, log):
        self.inner, self.log, self.predicted = inner, log, set()  # batches predicted since the last adapt
        self.uses_labels = inner.uses_labels

    def predict(self, X):
        out = self.inner.predict(X)
        assert np.allclose(out, np.concatenate([self.inner.predict(X[:7]), self.inner.predict(X[7:])]), atol=1e-6), \
            "a prediction depends on the rest of its batch"
        self.log.append(("predict", id(X), out.copy()))
        self.predicted.add(id(X))
        return out

    def adapt(self, X, y):
        assert id(X) in self.predicted, "adapted on a batch before predicting it"
        assert y is None or self.uses_labels, "a label-free method was handed labels"
        self.inner.adapt(X, y)
        self.predicted.clear()

    def flag_threshold(self):
        return self.inner.flag_threshold()

    def close(self):
        self.inner.close()

    @property
    def adaptations(self):
        return self.inner.adaptations


def _predictions(monkeypatch, scenario, method, trained, cfg, scramble=False):
    """What the method served on each batch, every method run for it (select's candidates too) spied on;
    with scramble (True, or the batches' numbers), those labels of the stream are flipped."""
    real_make = shp.make_method
    monkeypatch.setattr(shp, "make_method", lambda *args: Spy(real_make(*args), []))
    scrambled = set(range(1, cfg.n_batches + 1)) if scramble is True else set(scramble or ())
    batches = [(X, 1 - y if t in scrambled else y)
               for t, (X, y) in enumerate(shp.scenario_batches(scenario, cfg, trained), start=1)]
    served = shp.stream_runs(batches, [method], trained, cfg)[method]
    monkeypatch.undo()
    return served.proba


@pytest.mark.parametrize("method", shp.HEAL_METHODS)
def test_every_method_predicts_each_batch_before_adapting_on_it(method, small_trained, monkeypatch):
    cfg = shp.bench_config(shp.Config(**SMALL))
    predictions = _predictions(monkeypatch, "offset", method, small_trained, cfg)
    assert len(predictions) == cfg.n_batches
    if method not in ("none", "rethreshold"):  # rethreshold moves its threshold, not its probabilities
        assert any(not np.array_equal(a, b) for a, b in zip(predictions, _predictions(
            monkeypatch, "offset", "none", small_trained, cfg))), "the method does adapt"


@pytest.mark.parametrize("method", ["none", "calibrated", "heal-rules", "restandardize", "tent", "em-prior"])
def test_label_free_methods_are_unchanged_when_every_label_is_scrambled(method, small_trained, monkeypatch):
    cfg = shp.bench_config(shp.Config(**SMALL))
    true = _predictions(monkeypatch, "article", method, small_trained, cfg)
    scrambled = _predictions(monkeypatch, "article", method, small_trained, cfg, scramble=True)
    assert all(np.array_equal(a, b) for a, b in zip(true, scrambled))


@pytest.mark.parametrize("method", ["heal", "rethreshold", "retrain"])
def test_labelled_methods_do_read_the_labels(method, small_trained, monkeypatch):
    cfg = shp.bench_config(shp.Config(**SMALL, label_delay=1))
    true = _predictions(monkeypatch, "article", method, small_trained, cfg)
    scrambled = _predictions(monkeypatch, "article", method, small_trained, cfg, scramble=True)
    if method == "rethreshold":  # it changes decisions, not probabilities
        return
    assert not all(np.array_equal(a, b) for a, b in zip(true, scrambled))


def test_restandardize_undoes_a_sensor_offset(default_trained):
    cfg = shp.bench_config(shp.Config())
    clean = shp.metrics_at(default_trained.data.test.y,
                           shp.predict_proba(default_trained.model, default_trained.data.test.X)).accuracy
    row, none = shp.bench_rows("offset", ["restandardize", "none"], default_trained, cfg,
                               shp.scenario_ceiling("offset", cfg))
    assert abs(row.accuracy - clean) < 0.02, (row.accuracy, clean)
    assert none.accuracy < clean - 0.3, "the offset does hurt the unadapted model"


def test_em_prior_finds_the_new_fraud_share(default_trained):
    cfg = shp.bench_config(shp.Config())
    method = shp.EMPrior(default_trained, cfg)
    for X, _ in shp.scenario_batches("prior", cfg, default_trained):
        method.predict(X)
        method.adapt(X, None)
    assert abs(method.share - cfg.shifted_fraud_ratio) < 0.05, method.share
    assert abs(method.train_share - cfg.fraud_ratio) < 1e-9


def test_tent_resets_a_collapsed_adapter(small_trained):
    cfg = shp.Config(**SMALL, tent_lr=0.5, tent_reset_entropy=0.05)
    method = shp.Tent(small_trained, cfg)
    for X, _ in shp.scenario_batches("stationary", cfg, small_trained):
        method.adapt(X, None)
    assert method.resets >= 1, "a huge learning rate drives the entropy to zero, and the adapter is reset"


def _bench_args(out, *extra):
    return ["--bench", "--seeds", "2", "--no-plots", "--out", str(out), *extra] + [
        f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]


@pytest.mark.slow
def test_sharded_bench_merges_to_the_unsharded_csv(tmp_path, monkeypatch, capsys):
    """Three shards, the second killed after three cells and resumed, then merged: the same bytes
    as the unsharded bench."""
    assert shp.main(_bench_args(tmp_path / "whole")) == 0
    shards = tmp_path / "shards"
    assert shp.main(_bench_args(shards, "--shard", "0/3")) == 0
    real_write, written = shp.write_cell, []

    def killed_after_three(*args):
        if len(written) == 3:
            raise KeyboardInterrupt
        real_write(*args)
        written.append(args[1])
    monkeypatch.setattr(shp, "write_cell", killed_after_three)
    assert shp.main(_bench_args(shards, "--shard", "1/3")) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert shp.main(_bench_args(shards, "--shard", "1/3")) == 0
    assert "3 already written" in capsys.readouterr().out
    assert shp.main(_bench_args(shards, "--merge")) == 2, "shard 2 has not run"
    assert "missing" in capsys.readouterr().err
    assert shp.main(_bench_args(shards, "--shard", "2/3")) == 0
    assert shp.main(_bench_args(shards, "--merge")) == 0
    whole = (tmp_path / "whole" / "monitoring_export" / "bench.csv").read_bytes()
    assert (shards / "monitoring_export" / "bench.csv").read_bytes() == whole
    assert len(whole.splitlines()) == 1 + 2 * len(shp.SCENARIOS) * len(shp.HEAL_METHODS)
    assert not list(shards.rglob("*.tmp")), "no temporary file survives"


def test_merge_refuses_cells_made_with_other_flags(tmp_path, capsys):
    assert shp.main(_bench_args(tmp_path, "--shard", "0/1", "--seeds", "1")) == 0
    assert shp.main(_bench_args(tmp_path, "--merge", "--seeds", "1", "--fn-cost", "1")) == 2
    assert "other flags" in capsys.readouterr().err
    assert not (tmp_path / "monitoring_export").exists()


def test_bench_cells_are_numbered_seed_then_scenario():
    cells = shp.bench_cells(42, 2)
    assert [c.index for c in cells] == list(range(2 * len(shp.SCENARIOS)))
    assert [(c.seed, c.scenario) for c in cells[:2]] == [(42, "article"), (42, "stationary")]
    assert cells[-1].seed == 43 and len({c.name for c in cells}) == len(cells)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong types", "renamed"])
def test_merge_refuses_a_corrupt_cell_file_in_one_line(damage, tmp_path, capsys):
    assert shp.main(_bench_args(tmp_path, "--shard", "0/1", "--seeds", "1")) == 0
    cells = sorted((tmp_path / "bench_cells").iterdir())
    victim = cells[5]
    if damage == "garbage":
        victim.write_bytes(b"\xff\x00 not json")
    elif damage == "truncated":
        victim.write_text(victim.read_text()[:40])
    elif damage == "wrong types":
        entry = json.loads(victim.read_text())
        entry["rows"][3]["accuracy"] = "high"
        victim.write_text(json.dumps(entry))
    else:
        victim.write_text(cells[6].read_text())  # another cell's content under this cell's name
    capsys.readouterr()
    assert shp.main(_bench_args(tmp_path, "--merge", "--seeds", "1")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and victim.name in err and "Traceback" not in err
    assert not (tmp_path / "monitoring_export").exists()


def test_shards_of_as_many_seeds_each_train_one_seed():
    cells = shp.bench_cells(42, 4)
    shards = [shp.shard_cells(cells, k, 4) for k in range(4)]
    assert [{c.seed for c in shard} for shard in shards] == [{42}, {43}, {44}, {45}]
    assert sorted(c.index for shard in shards for c in shard) == [c.index for c in cells]
    three = [shp.shard_cells(cells, k, 3) for k in range(3)]
    assert sorted(c.index for shard in three for c in shard) == [c.index for c in cells]
    assert max(len({c.seed for c in shard}) for shard in three) == 2


def _cells_of(folder, shard, n_cells, n_shards):
    first, last = shard * n_cells // n_shards, (shard + 1) * n_cells // n_shards
    return [p for p in folder.glob("cell-*.json") if first <= int(p.name.split("-")[1]) < last]


@pytest.mark.slow
def test_three_shards_at_once_into_one_out_merge_to_the_unsharded_csv(tmp_path):
    """Three shards started together share --out; while they run, a plain run and a bench with other
    flags are refused; one shard is killed (as a preempted job would be) and resumed; the merge
    equals the unsharded bench byte for byte."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import SCRIPT

    def start(*extra):
        return subprocess.Popen([sys.executable, str(SCRIPT), *_bench_args(tmp_path / "shared", *extra)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    n_cells = 2 * len(shp.SCENARIOS)
    shards = [start("--shard", f"{k}/3") for k in range(3)]
    cells = tmp_path / "shared" / "bench_cells"
    deadline = time.monotonic() + 120
    while len(_cells_of(cells, 1, n_cells, 3)) < 3:
        assert time.monotonic() < deadline and shards[1].poll() is None, "shard 1 never got going"
        time.sleep(0.005)
    for shard in shards:
        shard.send_signal(signal.SIGSTOP)  # frozen: they hold --out while the others knock
    try:
        for extra in ([], ["--fn-cost", "1", "--shard", "0/3"]):
            args = ["--out", str(tmp_path / "shared"), "--no-plots", "--quiet"] if not extra else \
                _bench_args(tmp_path / "shared", *extra)
            knock = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
            assert knock.returncode == 2 and "busy" in knock.stderr and len(knock.stderr.splitlines()) == 1, knock
        shards[1].kill()
    finally:
        for shard in shards:
            shard.send_signal(signal.SIGCONT)
    assert shards[1].wait(timeout=60) == -signal.SIGKILL
    written_before = len(_cells_of(cells, 1, n_cells, 3))
    assert 3 <= written_before < len(shp.shard_cells(shp.bench_cells(42, 2), 1, 3)), "killed midway"
    for k in (0, 2):
        assert shards[k].wait(timeout=120) == 0, shards[k].stderr.read()
    resumed = start("--shard", "1/3")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0 and f"{written_before} already written" in out, err
    assert shp.main(_bench_args(tmp_path / "shared", "--merge")) == 0
    assert shp.main(_bench_args(tmp_path / "whole")) == 0
    merged = (tmp_path / "shared" / "monitoring_export" / "bench.csv").read_bytes()
    assert merged == (tmp_path / "whole" / "monitoring_export" / "bench.csv").read_bytes()
    assert not list((tmp_path / "shared").rglob("*.tmp")), "no temporary file survives"


def test_a_bench_tells_its_progress_on_standard_error_only(tmp_path, capsys):
    assert shp.main(_bench_args(tmp_path, "--seeds", "1")) == 0
    captured = capsys.readouterr()
    n = 1 + len(shp.SCENARIOS)  # the seed's training, then its cells
    lines = captured.err.splitlines()
    assert lines[0].startswith(f"progress: bench 1 of {n} trainings and cells,")
    assert lines[-1].startswith(f"progress: bench {n} of {n}")
    assert all(line.startswith("progress: bench ") for line in lines)
    assert "progress" not in captured.out and "Scenario bench:" in captured.out


def test_progress_shows_at_most_every_few_seconds_then_when_done(monkeypatch, capsys):
    clock = iter([0.0, 0.0, 1.0, 2.0, 6.0, 7.0, 8.0])
    monkeypatch.setattr(shp.time, "monotonic", lambda: next(clock))
    progress = shp.Progress("bench", 5, "cells", first=0.0, every=5.0)
    for done in range(1, 6):  # at 0, 1, 2, 6 and 7 seconds
        progress(done)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["progress: bench 1 of 5 cells", "progress: bench 4 of 5 cells",
                                                       "progress: bench 5 of 5 cells"]
    assert "about 2 s left" in lines[1] and "6 s elapsed" in lines[1]


@pytest.mark.parametrize("selector", shp.SELECTORS)
def test_selectors_read_each_label_only_once_it_has_arrived(selector, small_trained, monkeypatch):
    """Labels arrive --label-delay batches late, for the selectors and every candidate they run: flipping
    the labels of the last K batches (which never arrive) changes nothing served, and flipping batch 3's
    changes nothing served before batch 3 + K + 1."""
    k = 2
    cfg = shp.bench_config(shp.Config(**SMALL, label_delay=k))
    true = _predictions(monkeypatch, "offset", selector, small_trained, cfg)
    late = _predictions(monkeypatch, "offset", selector, small_trained, cfg,
                        scramble=range(cfg.n_batches - k + 1, cfg.n_batches + 1))
    assert len(true) == cfg.n_batches and all(np.array_equal(a, b) for a, b in zip(true, late))
    third = _predictions(monkeypatch, "offset", selector, small_trained, cfg, scramble=[3])
    assert all(np.array_equal(a, b) for a, b in zip(true[:3 + k], third[:3 + k]))
    assert not all(np.array_equal(a, b) for a, b in zip(true, third)), "the labels it reads do count"


def test_champion_changes_only_on_evidence():
    """champion keeps serving its champion until one candidate is far cheaper batch after batch."""
    cfg = shp.bench_config(shp.Config(**{**SMALL, "n_batches": 12}, label_delay=1, champion_window=10,
                                      champion_z=2.0))
    champion = shp.Champion(cfg)
    champion.costs = {name: collections.deque([100.0, 101.0, 99.0], maxlen=10) for name in champion.costs}
    assert champion.best_challenger() is None, "no evidence: the champion stays"
    champion.costs["retrain"] = collections.deque([10.0, 12.0, 11.0], maxlen=10)
    assert champion.best_challenger() == "retrain"
    champion.costs["retrain"] = collections.deque([10.0, 190.0, 11.0], maxlen=10)
    assert champion.best_challenger() is None, "one cheap batch in three is noise"


def test_fixed_share_weights_match_a_hand_computed_case():
    """Two experts over four rounds: alpha = 1/4, C = 2 ln 8 + 4 ln(4/3). Round 1 follows the leader (no gap
    yet); round 2 is exponential weights at eta = C / Delta_1; each round ends with a share alpha spread evenly."""
    experts = shp.FixedShare(2, 4)
    c = 2 * math.log(8) + 4 * math.log(4 / 3)
    assert experts.share == 0.25 and experts.budget == pytest.approx(c) and experts.learning_rate == math.inf
    experts.update(np.array([0.0, 1.0]))
    assert experts.gap == pytest.approx(0.5)  # expected loss 1/2, mix loss 0 (the leader's)
    assert experts.weights == pytest.approx([0.75 + 0.125, 0.125])
    eta = c / 0.5
    experts.update(np.array([1.0, 0.0]))
    kept = np.array([0.875 * math.exp(-eta), 0.125])
    assert experts.gap == pytest.approx(0.5 + 0.875 + math.log(kept.sum()) / eta)
    assert experts.weights == pytest.approx(0.75 * kept / kept.sum() + 0.125)
    assert experts.learning_rate == pytest.approx(c / experts.gap)


def _forecast(costs: np.ndarray, delay: int) -> tuple[float, "shp.LateExperts"]:
    """LateExperts on a cost sequence (rounds x experts), each round's costs seen `delay` rounds late:
    the forecaster's expected total cost, and the forecaster."""
    experts, total = shp.LateExperts(costs.shape[1], len(costs), delay), 0.0
    for t, row in enumerate(costs):
        total += float(experts.weights(t) @ row)
        if t >= delay:
            experts.learn(t - delay, costs[t - delay])
    for t in range(max(0, len(costs) - delay), len(costs)):
        experts.learn(t, costs[t])
    return total, experts


def _adversarial_sequences():
    rng = np.random.RandomState(5)
    flip = np.array([[0.5, 0.0]] + [[0.0, 1.0], [1.0, 0.0]] * 100)  # fools follow-the-leader every round
    switch = np.vstack([np.tile([0.0, 1.0, 0.7], (100, 1)), np.tile([1.0, 0.0, 0.7], (100, 1))])
    noisy_switch = np.clip(switch + rng.normal(0, 0.4, switch.shape), 0, None) * 80_000
    return {"flip": flip, "switch": switch, "noisy switch": noisy_switch, "uniform": rng.rand(300, 9) * 500_000,
            "one good expert": np.tile(np.where(np.arange(9) == 4, 0.45, 0.5), (250, 1))}


@pytest.mark.parametrize("delay", [0, 1, 3])
@pytest.mark.parametrize("name", list(_adversarial_sequences()))
def test_the_regret_bound_holds_on_adversarial_costs_with_late_feedback(name, delay):
    """Against the best single expert and the best sequence with one switch, the expected cost exceeds
    theirs by no more than the bound from the gaps seen, which is within the worst case for that T and K."""
    costs = _adversarial_sequences()[name]
    total, experts = _forecast(costs, delay)
    best_single = costs.sum(axis=0).min()
    best_switching = shp.best_sequence_cost(costs, 1) * len(costs)
    assert best_switching <= best_single
    assert total - best_single <= experts.regret_bound(0) + 1e-9
    assert total - best_switching <= experts.regret_bound(1) + 1e-9
    assert experts.regret_bound(1) <= experts.worst_case_bound() + 1e-9
    if name == "switch":  # the best expert changes: the bound is not vacuous, and select beats the best single one
        assert total < best_single and experts.regret_bound(1) < 0.5 * best_single


def test_select_stays_within_its_bound_of_the_best_candidate_and_of_champion():
    """Select's two levels, driven by hand on costs whose best candidate changes midway, with labels three
    batches late: its expected cost exceeds the best candidate's, and the best one-switch sequence's, by no
    more than its bound; and champion's by no more than the upper level's part of it."""
    cfg = shp.bench_config(shp.Config(n_batches=120, label_delay=3))
    rng, k = np.random.RandomState(8), len(shp.CANDIDATES)
    costs = rng.rand(120, k) * 60_000 + 40_000
    costs[:60, 2] -= 30_000
    costs[60:, 5] -= 30_000
    select, champion, total, by_champion = shp.Select(cfg), shp.Champion(cfg), 0.0, 0.0
    for t, row in enumerate(costs):
        weights = select.weights(t)
        assert weights.sum() == pytest.approx(1.0) and np.all(weights >= 0)
        assert np.array_equal(select.picks[t], champion.weights(t)), "the upper level's rule is champion's"
        total, by_champion = total + weights @ row, by_champion + select.picks[t] @ row
        if t >= cfg.label_delay:
            select.learn(t - cfg.label_delay, costs[t - cfg.label_delay])
            champion.learn(t - cfg.label_delay, costs[t - cfg.label_delay])
    for t in range(len(costs) - cfg.label_delay, len(costs)):
        select.learn(t, costs[t])
    guarantee, n = select.guarantee(len(costs)), len(costs)
    assert total / n - costs.mean(axis=0).min() <= guarantee["regret_bound"]
    assert total / n - shp.best_sequence_cost(costs, 1) <= guarantee["regret_bound"] <= guarantee["worst_case_bound"]
    assert total - by_champion <= select.ways.regret_bound(0)
    assert total / n < costs.mean(axis=0).min(), "the best candidate changes: select follows it"


def test_best_sequence_cost_is_the_cheapest_path_with_that_many_switches():
    costs = np.array([[1.0, 5.0], [1.0, 5.0], [9.0, 0.0], [9.0, 0.0], [1.0, 5.0]])
    assert shp.best_sequence_cost(costs, 0) == pytest.approx(min(21, 15) / 5)
    assert shp.best_sequence_cost(costs, 1) == pytest.approx(min(2 + 0 + 0 + 5, 1 + 1 + 9 + 9 + 1) / 5)
    assert shp.best_sequence_cost(costs, 2) == pytest.approx((1 + 1 + 0 + 0 + 1) / 5)


def test_fixed_share_tracks_a_switch_within_the_rounds_the_theory_says():
    """After the better expert changes, its weight starts at least alpha / K and gains e^eta on the old one
    per round of unit lead: it leads within ln(K / alpha) / eta rounds, eta the rate at that time. Without
    the share (alpha = 0), exponential weights need about as many rounds as the old expert led."""
    costs = np.vstack([np.tile([0.0, 1.0, 1.0], (100, 1)), np.tile([1.0, 0.0, 1.0], (100, 1))])

    def rounds_to_lead(share=None):
        experts = shp.FixedShare(3, len(costs))
        if share is not None:
            experts.share = share
        for row in costs[:100]:
            experts.update(row)
        said = math.log(3 / experts.share) / experts.learning_rate if experts.share else math.inf
        for n, row in enumerate(costs[100:], start=1):
            experts.update(row)
            if experts.weights.argmax() == 1:
                return n, said
        return math.inf, said
    rounds, said = rounds_to_lead()
    assert rounds <= math.ceil(said) + 1 and rounds < 20
    assert rounds_to_lead(share=0.0)[0] > 50


def test_calibration_recovers_a_known_temperature_and_bias():
    rng = np.random.RandomState(4)
    z = rng.normal(0, 3, 20_000)
    y = (rng.rand(len(z)) < 1 / (1 + np.exp(-(0.4 * z - 1.2)))).astype(float)
    a, b = shp.fit_bcts(z, y)
    assert abs(a - 0.4) < 0.03 and abs(b + 1.2) < 0.06


def test_calibrated_serving_costs_less_than_the_raw_model_where_nothing_drifts(default_trained):
    cfg = shp.bench_config(shp.Config())
    ceiling = shp.scenario_ceiling("stationary", cfg)
    none, calibrated = shp.bench_rows("stationary", ["none", "calibrated"], default_trained, cfg, ceiling)
    assert calibrated.cost < none.cost and calibrated.adaptations_per_1000 == 0


@pytest.mark.parametrize("scenario", ["gradual", "recurring"])
def test_row_only_ceiling_matches_monte_carlo_of_the_pooled_law(scenario):
    """A scorer that sees rows but not their batch: the Bayes rule of the pooled law, no better."""
    cfg = shp.Config(n_batches=8, recurring_period=2)
    rng = np.random.RandomState(23)
    rows = [shp.draw_rows(rng, 17_000, 3_000, shp.scenario_law(scenario, t, cfg)) for t in range(1, 9)]
    X, y = np.concatenate([r.X for r in rows]), np.concatenate([r.y for r in rows])
    laws = [shp.scenario_law(scenario, t, cfg) for t in range(1, 9)]
    v = X[:, shp.V14].astype(np.float64)
    fraud = sum(law.fraud_share * np.exp(shp._log_pdf(v, law.fraud_v14)) for law in laws)
    normal = sum((1 - law.fraud_share) * np.exp(shp._log_pdf(v, law.normal_v14)) for law in laws)
    posterior = fraud / (fraud + normal)
    ceiling = shp.row_only_ceiling(laws, cfg)
    assert abs(ceiling.accuracy - np.mean((posterior > 0.5) == (y == 1))) < 0.005
    assert abs(ceiling.roc_auc - shp.roc_auc(y, posterior)) < 0.005
    assert ceiling.cost > shp.bayes_ceiling(laws, cfg).cost, "knowing the batch is worth something"
    single = [shp.scenario_law("article", 1, cfg)]
    assert shp.row_only_ceiling(single, cfg).cost == pytest.approx(shp.bayes_ceiling(single, cfg).cost, rel=1e-6)


def test_selectors_read_the_runs_of_the_candidates_named_and_nothing_runs_twice(small_trained, monkeypatch):
    """The candidates are bench methods, no selector among them. A cell runs each method once on its
    stream, and the selectors' heal once more, with late labels."""
    assert set(shp.CANDIDATES) <= set(shp.HEAL_METHODS) - set(shp.SELECTORS)
    assert "calibrated" in shp.CANDIDATES, "champion's first champion"
    cfg = shp.bench_config(shp.Config(**SMALL))
    real_make, made = shp.make_method, []
    monkeypatch.setattr(shp, "make_method", lambda name, trained, c: made.append((name, c)) or real_make(name, trained, c))
    batches = list(shp.scenario_batches("offset", cfg, small_trained))
    runs = shp.stream_runs(batches, shp.HEAL_METHODS, small_trained, cfg)
    assert list(runs) == list(shp.HEAL_METHODS)
    assert sorted(name for name, _ in made) == sorted([*set(shp.HEAL_METHODS) - set(shp.SELECTORS), "heal"])
    assert len({(name, c) for name, c in made}) == len(made), "no method runs twice with the same settings"
    assert {c.supervision for name, c in made if name == "heal"} == {"labels", "delayed"}
    assert np.array_equal(runs["champion"].proba[0], runs["calibrated"].proba[0]), "its first champion's answers"
    answers = np.stack([runs[name].proba[0] for name in shp.CANDIDATES if name != "heal"])
    assert np.all(np.any(answers == runs["select"].proba[0], axis=0)), "each row answered by a candidate"


def test_the_readme_prints_the_bench_table_of_the_committed_bench_csv():
    """The README's 25-batch table is what --bench printed: its report, made again from the rows it wrote."""
    from conftest import SCRIPT
    rows = [row for _, row in _bench_rows(SCRIPT.parent / "monitoring_export" / "bench.csv")]
    assert len(rows) == len(shp.SCENARIOS) * len(shp.HEAL_METHODS) * shp.BENCH_SEEDS
    printed = "\n".join(shp.bench_report(rows, shp.Config())[1:])
    assert f"```\n{printed}\n```" in (SCRIPT.parent / "README.md").read_text(encoding="utf-8")


def _bench_rows(path, extra=()):
    """The BenchRows of a bench CSV, each after the values of its `extra` leading columns."""
    import csv
    import dataclasses
    types = {f.name: {"str": str, "int": int, "float": float}[f.type] for f in dataclasses.fields(shp.BenchRow)}
    with open(path, encoding="utf-8") as f:
        return [(tuple(float(row.pop(name)) for name in extra),
                 shp.BenchRow(**{k: math.nan if v == "" else types[k](v) for k, v in row.items()}))
                for row in csv.DictReader(f)]


def _committed_sweep(cfg):
    """Drift strength -> the BenchRows the committed sweep of cfg.n_batches batches wrote at it."""
    from conftest import SCRIPT
    runs = {}
    for (strength,), row in _bench_rows(SCRIPT.parent / "monitoring_export" / shp.strengths_csv_name(cfg),
                                        ["drift_strength"]):
        runs.setdefault(strength, []).append(row)
    assert len(runs) >= 3 and cfg.drift_strength in runs
    assert all(len(rows) == len(shp.SCENARIOS) * len(shp.HEAL_METHODS) * shp.BENCH_SEEDS for rows in runs.values())
    return runs


@pytest.mark.parametrize("n_batches", [25, 200])
def test_the_readme_prints_the_drift_strength_sweeps_of_the_committed_csvs(n_batches):
    """The README's sweep tables are what --bench --drift-strengths printed, made again from the rows it wrote."""
    from conftest import SCRIPT
    cfg = shp.Config(n_batches=n_batches)
    printed = "\n".join(shp.strength_sweep_report(_committed_sweep(cfg), cfg)[1:])
    assert f"```\n{printed}\n```" in (SCRIPT.parent / "README.md").read_text(encoding="utf-8")


def test_the_readmes_200_batch_bench_table_is_the_200_batch_sweep_at_the_default_strength():
    """The README's 200-batch bench table (select's section) is the bench report of the sweep's rows at the
    default drift strength: the same rows a plain --bench --n-batches 200 writes."""
    from conftest import SCRIPT
    cfg = shp.Config(n_batches=200)
    printed = "\n".join(shp.bench_report(_committed_sweep(cfg)[cfg.drift_strength], cfg)[1:])
    assert f"```\n{printed}\n```" in (SCRIPT.parent / "README.md").read_text(encoding="utf-8")


def test_drift_strengths_run_the_whole_bench_at_each_strength(tmp_path, capsys):
    """One bench per strength, its rows written after their strength, the same as a plain bench's at that
    strength; the table has a row per scenario and strength, and a stronger drift costs the unadapted
    model more."""
    code = shp.main(["--bench", "--seeds", "1", "--n-batches", "4", "--drift-strengths", "1,3", "--no-plots",
                     "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0
    rows = _bench_rows(tmp_path / "monitoring_export" / "bench_strengths_4_batches.csv", ["drift_strength"])
    assert sorted({s for (s,), _ in rows}) == [1.0, 3.0]
    assert len(rows) == 2 * len(shp.SCENARIOS) * len(shp.HEAL_METHODS)
    none = {s: r.cost for (s,), r in rows if r.scenario == "offset" and r.method == "none"}
    assert none[3.0] > none[1.0]
    table = [line.split()[:2] for line in printed.splitlines() if line.split()[:1] and line.split()[0] in shp.SCENARIOS]
    assert table == [[s, strength] for s in shp.SCENARIOS for strength in ("1", "3")]
    assert not (tmp_path / "plots").exists()
    plain = tmp_path / "plain"  # the rows of one strength are, byte for byte, a plain bench's at that strength
    assert shp.main(["--bench", "--seeds", "1", "--n-batches", "4", "--drift-strength", "3", "--no-plots",
                     "--out", str(plain)]) == 0
    swept = (tmp_path / "monitoring_export" / "bench_strengths_4_batches.csv").read_text().splitlines()
    assert [line.split(",", 1)[1] for line in swept if line.startswith("3.000000,")] == \
        (plain / "monitoring_export" / "bench.csv").read_text().splitlines()[1:]
