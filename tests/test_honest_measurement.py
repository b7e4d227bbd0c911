"""The honest twins of the article's headlines."""
import csv
import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import SMALL, shp, quiet, stream


def brute_force_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_force_average_precision(y, s):
    total, previous_recall = 0.0, 0.0
    for t in sorted(set(s), reverse=True):
        flagged = s >= t
        tp = np.sum(flagged & (y == 1))
        recall = tp / np.sum(y == 1)
        total += (recall - previous_recall) * tp / np.sum(flagged)
        previous_recall = recall
    return total


scores = st.lists(st.tuples(st.booleans(), st.integers(0, 6)), min_size=2, max_size=40).filter(
    lambda rows: any(r[0] for r in rows) and not all(r[0] for r in rows))


@settings(max_examples=200, deadline=None)
@given(scores)
def test_roc_auc_matches_pairwise_count(rows):
    y = np.array([r[0] for r in rows], dtype=float)
    s = np.array([r[1] / 6 for r in rows])  # few distinct values: many ties
    assert shp.roc_auc(y, s) == pytest.approx(brute_force_auc(y, s))


@settings(max_examples=200, deadline=None)
@given(scores)
def test_pr_auc_matches_brute_force_average_precision(rows):
    y = np.array([r[0] for r in rows], dtype=float)
    s = np.array([r[1] / 6 for r in rows])
    assert shp.pr_auc(y, s) == pytest.approx(brute_force_average_precision(y, s))


def test_roc_auc_on_random_scores():
    rng = np.random.RandomState(3)
    y, s = (rng.rand(300) < 0.2).astype(float), rng.rand(300)
    assert shp.roc_auc(y, s) == pytest.approx(brute_force_auc(y, s))


@pytest.mark.parametrize("drift", [0.0, 2.2, 3.5])
def test_bayes_accuracy_and_auc_match_monte_carlo(drift):
    cfg = shp.Config(drift_strength=drift)
    n = 400_000
    ds = shp.make_dataset(n, cfg, np.random.RandomState(11), drifted=True)
    law = shp.drifted_set_law(cfg, n)
    posterior = shp.bayes_posterior(ds.X, law)
    mc_accuracy = np.mean((posterior > 0.5) == (ds.y == 1))
    ceiling = shp.bayes_ceiling([law], cfg)
    assert abs(ceiling.accuracy - mc_accuracy) < 0.005
    assert abs(ceiling.roc_auc - shp.roc_auc(ds.y, posterior)) < 0.005
    assert ceiling.roc_auc >= shp.v14_threshold_auc(law) - 1e-9  # nothing beats the likelihood ratio


def test_default_run_prints_the_honest_rows(default_run):
    e, text = default_run.evaluation, "\n".join(default_run.lines)
    assert e.drift_rows["always_normal"].metrics.accuracy == 0.85
    assert round(e.bayes_accuracy, 3) == 0.850
    assert round(shp.v14_threshold_auc(shp.drifted_set_law(default_run.run.cfg, 1000)), 3) == 0.593
    rows = {tuple(line.split()[:3]): line.split() for line in default_run.lines if line.startswith(("drifted", "holdout"))}
    assert rows[("drifted", "Always", "answers")][4] == "85.0%"
    assert rows[("holdout", "Self-healed", "71.3%")][-1] == "595,000"
    assert rows[("drifted", "Self-healed", "72.4%")][-1] == "530,400"
    for needle in ("Mean prequential lift", "Same network, never healed", "accuracy 85.0%", "0.593",
                   "Forgetting: clean-test", "cost/1000", "Cost-optimal threshold", "more than $1,085"):
        assert needle in text, needle
    # the article's cost claim, checked on its own counts: healing costs more at $200 per false alarm
    assert e.drift_rows["healed"].cost > e.drift_rows["no_healing"].cost


def test_holdout_is_fresh_and_leaves_the_article_draws_alone(default_trained):
    data, holdout = default_trained.data, shp.holdout_set(shp.Config())
    assert not np.array_equal(holdout.X, data.drift.X)
    again, _ = shp.make_data(shp.Config())
    assert all(np.array_equal(getattr(again, s).X, getattr(data, s).X) for s in ("train", "test", "drift"))


def _stream_batches(trained, cfg):
    return list(shp.drifted_batches(trained.data.drift, cfg, np.random.RandomState(5)))


def test_prequential_metrics_use_pre_heal_predictions(default_trained):
    """Rebuild, for every batch, the model as it was before that batch's heal (the previous
    post-heal snapshot) and check that the served metrics are its metrics."""
    cfg = quiet(n_batches=8, keep_best=100, keep_last=100)
    batches = _stream_batches(default_trained, cfg)
    result = stream(cfg, trained=default_trained, batches=batches, console=print)
    model = shp.copy.deepcopy(default_trained.model)
    previous_version = 1
    for record, (X, y) in zip(result.log.records, batches):
        model.reflexive.load_state_dict(result.registry.snapshots[previous_version].state)
        assert record.served == shp.metrics_at(y, shp.predict_proba(model, X)), record.batch
        previous_version = record.restored_version or record.version_post or previous_version
    assert any(r.served != r.healed for r in result.log.records), "pre- and post-heal differ somewhere"


def _decisions(result):
    """Everything the engine decided, per batch (NaN made comparable)."""
    def same(v):
        return None if isinstance(v, float) and np.isnan(v) else v
    return [tuple(same(v) for v in (r.state, r.action, r.z, r.conflicts, r.pos_weight, r.monitor_accuracy,
                                    r.monitor_f1, r.version_post, r.restored_version))
            for r in result.log.records]


def test_rules_mode_reads_no_true_label(default_trained):
    """Scramble every label the stream sees: in rules mode no decision and no weight may change."""
    cfg = quiet(supervision="rules", n_batches=10, rollback_f1_drop=0.0)
    batches = _stream_batches(default_trained, cfg)
    scrambled = [(X, 1 - y) for X, y in batches]
    a = stream(cfg, trained=default_trained, batches=batches, console=print)
    b = stream(cfg, trained=default_trained, batches=scrambled, console=print)
    assert _decisions(a) == _decisions(b)
    assert a.log.counts["heal"] > 0
    wa, wb = a.model.adapter().state_dict(), b.model.adapter().state_dict()
    assert all(wa[k].equal(wb[k]) for k in wa)
    # ...whereas labels mode does read them
    labelled = quiet(n_batches=10)
    c = stream(labelled, trained=default_trained, batches=batches, console=print)
    d = stream(labelled, trained=default_trained, batches=scrambled, console=print)
    assert _decisions(c) != _decisions(d)


def test_delayed_mode_uses_labels_only_k_batches_late(default_trained):
    k = 3
    cfg = quiet(supervision="delayed", label_delay=k, n_batches=10)
    batches = _stream_batches(default_trained, cfg)
    # The last k batches' labels never arrive: scrambling them changes nothing.
    late_scrambled = batches[:-k] + [(X, 1 - y) for X, y in batches[-k:]]
    a = stream(cfg, trained=default_trained, batches=batches, console=print)
    b = stream(cfg, trained=default_trained, batches=late_scrambled, console=print)
    assert _decisions(a) == _decisions(b)
    assert all(r.action in ("none", "await_labels") for r in a.log.records[:k])
    assert any(r.action == "await_labels" for r in a.log.records[:k])
    assert any(r.action == "heal" for r in a.log.records[k:])
    # Labels of batch 1 do matter from batch k+1 on.
    early_scrambled = [(batches[0][0], 1 - batches[0][1])] + batches[1:]
    c = stream(cfg, trained=default_trained, batches=early_scrambled, console=print)
    assert _decisions(a)[:k] == _decisions(c)[:k] and _decisions(a) != _decisions(c)


def test_rules_mode_weighs_every_conflict_as_fraud(small_trained, tmp_path):
    """Every conflict is rule-fraud by definition: with the rule as target, the fraud share among
    conflicts is 1 and pos_weight sits at its cap of 4 on every batch that has conflicts."""
    cfg = quiet(SMALL, supervision="rules")
    result = stream(cfg, trained=small_trained, console=print, export_dir=tmp_path)
    with_conflicts = [r for r in result.log.records if r.conflicts > 0]
    assert with_conflicts and all((r.fraud_frac, r.pos_weight) == (1.0, 4.0) for r in with_conflicts)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert [r["pos_weight"] for r in rows if int(r["conflicts"]) > 0] == ["4.000000"] * len(with_conflicts)


def test_delayed_mode_heals_first_when_labels_arrive(small_trained, tmp_path):
    cfg = quiet(SMALL, supervision="delayed", label_delay=2)
    result = stream(cfg, trained=small_trained, console=print, export_dir=tmp_path)
    records = result.log.records
    assert [r.action for r in records[:2]] == ["await_labels"] * 2  # no labels yet, nothing to learn from
    assert all(np.isnan(r.pos_weight) and r.version_post is None for r in records[:2])
    assert records[2].action == "heal", "batch 1's labels arrive at batch 3"
    heals = [e for e in json.loads((tmp_path / "events.json").read_text()) if e["type"] == "heal"]
    assert heals[0]["batch"] == 3


@pytest.mark.slow
def test_seed_sweep_writes_csv_and_prints_intervals(tmp_path):
    lines = []
    cfg = shp.Config(**SMALL, seed=3, seeds=3, out=str(tmp_path), no_plots=True)
    summaries = shp.run_seed_sweep(cfg, console=lines.append, workers=2)
    assert [s["seed"] for s in summaries] == [3, 4, 5]
    text = (tmp_path / "monitoring_export" / "seed_sweep.csv").read_text()
    assert text.splitlines()[0] == ",".join(["seed", *shp.SWEEP_FIGURES, "heals", "rollbacks"])
    assert len(text.splitlines()) == 4
    assert any(line.startswith("recovery_pp") for line in lines)
    # the same seed alone gives the same figures as inside the sweep
    alone = shp.seed_summary(shp.Config(**SMALL, seed=4, quiet=True))
    assert alone == pytest.approx(summaries[1])


def test_bootstrap_interval_contains_the_mean():
    values = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    low, high = shp.bootstrap_interval(values)
    assert low < values.mean() < high and low >= 1.0 and high <= 10.0


@settings(max_examples=200, deadline=None)
@given(scores, st.sampled_from([0.0, 1.0, 200.0, 5000.0]), st.sampled_from([0.0, 1.0, 200.0]))
def test_cost_optimal_threshold_is_the_cheapest_candidate(rows, fn_cost, fp_cost):
    """The one-sort threshold equals trying every candidate, lowest on ties."""
    y = np.array([r[0] for r in rows], dtype=float)
    s = np.array([r[1] / 6 for r in rows])
    cfg = shp.Config(fn_cost=fn_cost, fp_cost=fp_cost)
    candidates = np.concatenate([[-np.inf], np.unique(s)])
    costs = [shp.cost_per_1000(shp.metrics_at(y, s, t), cfg) for t in candidates]
    assert shp.cost_optimal_threshold(y, s, cfg) == candidates[int(np.argmin(costs))]
