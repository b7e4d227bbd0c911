"""Each component on its own: FIDI, rule, pos_weight, registry, health monitor, frozen parts."""
import numpy as np
import pytest
import torch

from conftest import shp, quiet, stream


def test_fidi_needs_three_means_then_uses_the_window():
    fidi = shp.FIDIMonitor(np.array([-1.0, 1.0], dtype=np.float32), window=3, threshold=1.0)
    assert (fidi.mu, fidi.sigma) == (0.0, 1.0 + 1e-8)

    def check(v14):
        X = np.zeros((1, 10), dtype=np.float32)
        X[0, shp.V14] = v14
        return fidi.check(X, None)
    assert check(5.0) == (0.0, False)
    assert check(5.0) == (0.0, False)
    z, drifting = check(2.0)
    assert z == pytest.approx(4.0 / (1 + 1e-8)) and drifting
    # the first 5.0 leaves the window of 3: mean(5, 2, -1) = 2
    z, drifting = check(-1.0)
    assert z == pytest.approx(2.0 / (1 + 1e-8)) and drifting
    z, drifting = check(-1.0)  # mean(2, -1, -1) = 0: z is 0, not above the threshold
    assert z == pytest.approx(0.0) and not drifting
    fidi.threshold = 1.0 / (1.0 + 1e-8)  # the next z, mean(-1, -1, -1) = -1: drifting only strictly above
    assert check(-1.0) == (fidi.threshold, False)


def test_conflicts_are_rule_fraud_with_low_probability():
    cfg = shp.Config()
    X = np.zeros((4, 10), dtype=np.float32)
    X[:, shp.V14] = [-2.0, -2.0, -1.0, -1.5]
    rule = shp.rule_labels(X, cfg)
    assert rule.tolist() == [1, 1, 0, 0]  # -1.5 is not below -1.5
    proba = np.array([0.1, 0.3, 0.0, 0.0])
    assert shp.conflicts(rule, proba, cfg).tolist() == [True, False, False, False]  # 0.30 is not below 0.30


@pytest.mark.parametrize("frac, weight", [(0.0, 1.0), (0.0999, 1.0), (0.10, 2.0), (0.2, 3.0), (0.3, 4.0), (1.0, 4.0)])
def test_pos_weight_schedule(frac, weight):
    assert shp.pos_weight(frac) == pytest.approx(weight)


def _layer(value):
    layer = shp.ReflexiveLayer(4)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(value)
    return layer


def test_registry_rollback_target_is_best_post_heal_never_clean():
    reg = shp.ModelRegistry(keep_best=2, keep_last=2)
    reg.save(_layer(0), 0, "clean", float("nan"), float("nan"))
    assert reg.best_post_heal() is None
    reg.save(_layer(1), 1, "pre_heal", 0.5, 0.99)  # a pre-heal snapshot is never a target
    reg.save(_layer(2), 1, "post_heal", 0.6, 0.40)
    reg.save(_layer(3), 2, "post_heal", 0.7, 0.30)
    reg.save(_layer(4), 3, "post_heal", 0.9, 0.40)  # tie on F1: the earlier one wins
    best = reg.best_post_heal()
    assert (best.version, best.batch) == (3, 1)
    assert float(best.state["scale"]) == 2.0


def test_registry_is_bounded_and_keeps_clean_and_best():
    reg = shp.ModelRegistry(keep_best=3, keep_last=4)
    reg.save(_layer(0), 0, "clean", float("nan"), float("nan"))
    for i in range(1, 500):
        reg.save(_layer(i), i, "post_heal", 0.5, 0.999 if i == 7 else 0.1 + 1e-4 * (i % 50))
    assert reg.saved == 500
    assert len(reg.snapshots) <= 1 + 3 + 4
    assert 1 in reg.snapshots and reg.best_post_heal().version == 8  # batch 7 is version 8
    assert max(reg.snapshots) == 500


def test_health_monitor_degradation_rule_and_restart():
    monitor = shp.HealthMonitor(quiet(health_window=3, rollback_f1_drop=0.05, rollback_acc_drop=0.5,
                                      min_batches_before_rollback=3))
    monitor.record(0.8, 0.50, post_heal=False)   # pre-heal entries do not set the baseline
    assert monitor.baseline is None
    monitor.record(0.8, 0.40, post_heal=True)
    assert monitor.baseline == (0.8, 0.40)
    assert monitor.degradation() is None          # two entries only
    monitor.record(0.8, 0.30, post_heal=True)
    assert monitor.degradation() is None          # mean 0.40: no drop
    monitor.record(0.8, 0.30, post_heal=True)
    assert "F1" in monitor.degradation()          # mean(0.40, 0.30, 0.30) = 0.333: dropped 0.067 > 0.05
    monitor.restart()
    assert monitor.degradation() is None and monitor.baseline == (0.8, 0.40)
    for _ in range(3):
        monitor.record(0.2, 0.45, post_heal=True)
    assert "accuracy" in monitor.degradation()    # 0.8 - 0.2 > 0.5


def test_only_reflexive_layer_changes_in_a_stream(default_trained):
    before = {k: v.clone() for k, v in default_trained.model.state_dict().items()}
    result = stream(quiet(n_batches=8), trained=default_trained, console=print)
    after = result.model.model.state_dict()
    for name, value in before.items():
        if name.startswith("reflexive."):
            continue
        assert torch.equal(after[name], value), f"{name} changed"
    assert not all(torch.equal(after[k], before[k]) for k in before if k.startswith("reflexive.")), \
        "the adapter did heal"
    assert sum(v.numel() for k, v in after.items() if k.startswith("reflexive.")) == 8321
    assert sum(v.numel() for v in after.values()) == 13250


def test_dataset_matches_the_published_statistics(default_trained):
    clean, drift = default_trained.data.test.X[:, shp.V14], default_trained.data.drift.X[:, shp.V14]
    assert (round(float(clean.mean()), 3), round(float(np.mean(clean < -1.5)), 3)) == (-0.377, 0.188)
    assert (round(float(drift.mean()), 3), round(float(np.mean(drift < -1.5)), 3)) == (-2.261, 0.774)
    assert default_trained.data.drift.y.mean() == pytest.approx(0.15)


def test_adam_matches_torch_optim_adam_bit_for_bit():
    torch.manual_seed(0)
    ours_model, theirs_model = torch.nn.Linear(7, 3), torch.nn.Linear(7, 3)
    theirs_model.load_state_dict(ours_model.state_dict())
    ours = shp.Adam(ours_model.parameters(), lr=0.003)
    theirs = torch.optim.Adam(theirs_model.parameters(), lr=0.003)
    for _ in range(50):
        x = torch.randn(16, 7)
        for model, opt in ((ours_model, ours), (theirs_model, theirs)):
            opt.zero_grad()
            (model(x) ** 2).mean().backward()
            opt.step()
    for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
        assert torch.equal(a, b)
