"""The image experiment: the ResNet-18, the rendered digits, the corruptions of CIFAR-10-C, batch-norm
adaptation, TENT and the adapter heal on images, and --images from the command line."""
import csv
import dataclasses
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import SCRIPT, shp

# A ResNet-18 a quarter of the default width, trained briefly: seconds, and well above chance.
TINY_IMAGES = dict(resnet_width=4, image_train=2000, image_test=300, image_epochs=2, image_batch_size=64,
                   image_clean_batches=1, image_batches=5)


@pytest.fixture(scope="module")
def image_model():
    cfg = shp.Config(**TINY_IMAGES)
    trained = shp.train_image_model(cfg, 0)
    model = shp.ResNet18(10, cfg.resnet_width)
    model.load_state_dict(shp.from_arrays(trained.state))
    return cfg, trained, model.eval()


def test_resnet18_at_width_64_is_the_standard_network():
    model = shp.ResNet18(10, 64)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert sum(isinstance(m, shp.BasicBlock) for m in model.modules()) == 8


def test_digits_are_balanced_deterministic_and_leave_the_global_streams_alone():
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    X, y = shp.digits(203, 7, "train")
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    assert X.shape == (203, 3, 32, 32) and X.dtype == np.float32 and 0 <= X.min() and X.max() <= 1
    assert sorted(np.bincount(y, minlength=10)) == [20] * 7 + [21] * 3
    again, other = shp.digits(203, 7, "train"), shp.digits(203, 7, "test")
    assert again[0].tobytes() == X.tobytes() and other[0].tobytes() != X.tobytes()


@pytest.mark.parametrize("name", shp.CORRUPTIONS)
def test_each_corruption_is_deterministic_keeps_the_range_and_the_callers_array(name):
    X = shp.digits(40, 1, "stream")[0]
    kept = X.copy()
    a = shp.corrupt(X, name, 3, np.random.RandomState(5))
    assert a.tobytes() == shp.corrupt(X, name, 3, np.random.RandomState(5)).tobytes()
    assert a.shape == X.shape and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert np.abs(a - X).mean() > 1e-3 and np.array_equal(X, kept)


def true_class_probability(model, X, y) -> float:
    return float(shp.predict_proba(model, X)[np.arange(len(y)), y].mean())


def test_each_corruptions_damage_to_the_clean_model_grows_with_severity(image_model):
    """Damage: how much of the probability the trained model gives the true class a corruption takes
    away, on the same clean test digits, at severities 1 to 5."""
    _, trained, model = image_model
    X, y = shp.digits(300, 0, "test")
    clean = true_class_probability(model, X, y)
    for name in shp.CORRUPTIONS:
        damage = [clean - true_class_probability(model, shp.corrupt(X, name, s, np.random.RandomState(s)), y)
                  for s in range(1, 6)]
        assert damage[4] > damage[0] + 0.005, (name, damage)
        assert all(later >= earlier - 0.02 for earlier, later in zip(damage, damage[1:])), (name, damage)


def test_batch_statistics_normalise_with_the_batchs_own_mean_and_variance():
    model = nn.Sequential(nn.BatchNorm1d(2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([2.0, 1.0]))
        model[0].bias.copy_(torch.tensor([0.0, 1.0]))
    X = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # mean (2, 4), biased variance (1, 4)
    adapted = shp.with_batch_statistics(model)
    variance = torch.tensor([1.0, 4.0])
    normalised = torch.tensor([[-1.0, -1.0], [1.0, 1.0]]) * torch.sqrt(variance / (variance + 1e-5))
    expected = normalised * torch.tensor([2.0, 1.0]) + torch.tensor([0.0, 1.0])  # by hand: [[-2, 0], [2, 2]]
    assert torch.allclose(adapted(X), expected, atol=1e-6)
    assert torch.allclose(model(X), X / np.sqrt(1 + 1e-5) * torch.tensor([2.0, 1.0]) + torch.tensor([0.0, 1.0]))
    assert adapted[0].running_mean is None and model[0].running_mean is not None  # the original keeps its own


def test_tent_answers_first_then_takes_one_adam_step_on_the_entropy_over_the_batch_norm_affine_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 3)).eval()
    X = np.array([[1.0, 2.0], [3.0, 6.0], [0.0, 1.0], [2.0, -1.0]], dtype=np.float32)
    cfg = shp.Config(tent_lr=0.01, image_batch_size=128)  # the paper's rate per 128 images, unscaled here
    tent = shp.TentImages(model, None, cfg, None)
    weights = [p.detach().clone() for p in tent.model.parameters()]

    def entropy(gamma_beta: np.ndarray) -> float:  # the batch's mean entropy as a function of the affine, by hand
        x = X.astype(np.float64)
        normal = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) * gamma_beta[:2] + gamma_beta[2:]
        logits = normal @ model[1].weight.detach().double().numpy().T + model[1].bias.detach().double().numpy()
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return float(-(p * np.log(p)).sum(1).mean()), p

    affine = np.concatenate([model[0].weight.detach().numpy(), model[0].bias.detach().numpy()]).astype(np.float64)
    answers = tent.predict(X, None)
    assert np.allclose(answers, entropy(affine)[1], atol=1e-5)  # the answers come from before the step
    h = 1e-6
    gradient = np.array([(entropy(affine + h * e)[0] - entropy(affine - h * e)[0]) / (2 * h) for e in np.eye(4)])
    # Adam's first step moves each parameter by lr * g / (|g| + eps): lr times the sign of its gradient
    stepped = np.concatenate([tent.model[0].weight.detach().numpy(), tent.model[0].bias.detach().numpy()])
    assert np.allclose(stepped, affine - 0.01 * np.sign(gradient), atol=1e-5)
    assert torch.equal(tent.model[1].weight, weights[2]) and torch.equal(tent.model[1].bias, weights[3])


def test_the_heal_on_the_shared_features_is_the_heal_of_the_whole_resnet():
    """The bench heals the head on the frozen layers' output, computed once for all methods; that is exact:
    the same answers as a SelfHealer around the whole ResNet-18, before and after a heal."""
    torch.manual_seed(1)
    model = shp.ResNet18(10, 4).eval()
    backbone = nn.Sequential(*list(model.children())[:6])
    tail = nn.Sequential(OrderedDict(pool=nn.Identity(), fc=model.fc))
    whole, shared = shp.SelfHealer(model, "pool"), shp.SelfHealer(tail, "pool")
    X1, X2 = shp.digits(32, 0, "stream")[0], shp.digits(32, 1, "stream")[0]
    with torch.no_grad():
        H1, H2 = backbone(torch.from_numpy(X1)).numpy(), backbone(torch.from_numpy(X2)).numpy()
    assert np.allclose(whole.predict(X1), shared.predict(H1), atol=1e-5)
    labels = np.arange(32) % 10
    whole.observe(1, labels)
    shared.observe(1, labels)
    assert any(e["type"] == "heal" for e in whole.records[-1].events)
    healed = whole.predict(X2)
    assert np.allclose(healed, shared.predict(H2), atol=1e-5)
    assert not np.allclose(healed, shp.predict_proba(model, X2), atol=1e-4)  # the heal changed the answers


def test_the_adapter_heal_with_labels_beats_no_adaptation_on_a_tiny_image_stream(image_model):
    cfg, trained, _ = image_model
    rows = {r.method: r for r in shp.image_cell(cfg, trained, "contrast")}
    assert list(rows.values()) == shp.image_cell(cfg, trained, "contrast"), "the same flags, the same figures"
    assert set(rows) == {*shp.IMAGE_METHODS, shp.IMAGE_SELECT}
    assert rows["heal"].adaptations > 0
    assert rows["heal"].accuracy > rows["none"].accuracy, {m: r.accuracy for m, r in rows.items()}
    assert rows["none"].points_recovered == 0 and rows["none"].corrupted_accuracy == rows["none"].accuracy
    assert rows["bn-adapt"].accuracy > rows["none"].accuracy  # contrast moves every layer's statistics


def test_a_gradual_stream_raises_the_severity_to_the_chosen_one():
    cfg = shp.Config(**{**TINY_IMAGES, "image_drift": "gradual", "severity": 3, "image_batches": 6})
    severities = [s for _, _, s in shp.image_stream(cfg, 0, "fog")]
    assert severities == [0, 1, 1, 2, 2, 3, 3]
    sudden = [s for _, _, s in shp.image_stream(dataclasses.replace(cfg, image_drift="sudden"), 0, "fog")]
    assert sudden == [0] + [3] * 6


IMAGES_TINY_FLAGS = ["--images", "--seeds", "1", "--corruptions", "contrast,fog", "--resnet-width", "4",
                     "--image-train", "300", "--image-test", "100", "--image-epochs", "1", "--image-batches", "2",
                     "--image-clean-batches", "1", "--label-delay", "1"]


@pytest.mark.slow
def test_images_runs_end_to_end_and_writes_its_table_csv_and_plot(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), *IMAGES_TINY_FLAGS, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "monitoring_export" / "images.csv") as f:
        rows = list(csv.DictReader(f))
    methods = [*shp.IMAGE_METHODS, shp.IMAGE_SELECT]
    assert [(r["corruption"], r["method"]) for r in rows] == [(c, m) for c in ("contrast", "fog") for m in methods]
    assert (tmp_path / "plots" / "images.png").stat().st_size > 10_000
    for r in rows:  # the table prints each method's accuracy as the CSV holds it
        assert f"{float(r['accuracy']):.3f}" in done.stdout
    assert "TENT's repository example on CIFAR-10-C" in done.stdout and "27.8" in done.stdout


@pytest.mark.parametrize("flags, words", [
    (["--images", "--severity", "7"], "--severity must be in [1, 5], got 7"),
    (["--images", "--corruptions", "gaussian_noise,snow"], "--corruptions must be all or names of corruptions"),
    (["--images", "--resnet-width", "0"], "--resnet-width must be in [1, 512], got 0"),
    (["--severity", "3"], "--severity goes with --images"),
    (["--images", "--bench"], "--images and --bench go with two different runs"),
    (["--images", "--merge"], "--shard and --merge go with --bench"),
    (["--images", "--scenario", "offset"], "--scenario does not apply to --images"),
    (["--images", "--hidden-dim", "3"], "--hidden-dim does not apply to --images"),
    (["--images", "--label-delay", "10"], "--label-delay 10 is as long as the whole image stream (10 batches)"),
    (["--images", "--image-drift", "slow"], "argument --image-drift: invalid choice: 'slow'"),
])
def test_bad_image_flags_end_in_one_clear_line(flags, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = shp.main(flags)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and not list(tmp_path.iterdir())
    assert captured.err.count("\n") == 1 and words in captured.err, captured.err


def test_the_readme_prints_the_image_table_of_the_committed_images_csv():
    """The README's table is what --images printed: its report, made again from the rows it wrote."""
    types = {f.name: {"str": str, "int": int, "float": float}[f.type] for f in dataclasses.fields(shp.ImageRow)}
    with open(SCRIPT.parent / "monitoring_export" / "images.csv", encoding="utf-8") as f:
        rows = [shp.ImageRow(**{k: types[k](v) for k, v in row.items()}) for row in csv.DictReader(f)]
    assert len(rows) == len(shp.CORRUPTIONS) * len(shp.IMAGE_ROWS) * shp.IMAGE_SEEDS
    printed = "\n".join(shp.images_report(rows, shp.Config())[1:])
    assert f"```\n{printed}\n```" in (SCRIPT.parent / "README.md").read_text(encoding="utf-8")


def test_late_labels_reach_the_heal_and_select_label_delay_batches_late(image_model):
    cfg, trained, model = image_model
    cfg = dataclasses.replace(cfg, label_delay=2)
    backbone = nn.Sequential(*list(model.children())[:6])
    tail = nn.Sequential(OrderedDict(pool=nn.Identity(), fc=model.fc)).eval()
    with torch.no_grad():
        reference = backbone(torch.from_numpy(shp.digits(128, 0, "reference")[0])).numpy()
    late = shp.HealLate(model, tail, cfg, reference)
    late.healer.detector = None  # heal at every batch whose labels have arrived
    select = shp.FollowTheLeader(["none", "other"], cfg.label_delay)
    for X, y, _ in shp.image_stream(cfg, 0, "contrast"):
        with torch.no_grad():
            H = backbone(torch.from_numpy(X)).numpy()
        late.predict(X, H)
        late.adapt(X, H, y)
        wrong = np.full((len(y), 10), 0.1)
        wrong[np.arange(len(y)), (y + 1) % 10] = 1.0
        answers = {"none": wrong, "other": np.eye(10)[y]}  # "other" is always right
        select.learn(answers, y)
        if len(select.labels.pending) < cfg.label_delay:  # nothing has arrived yet
            assert select.leader == "none"
    heals = [e for r in late.healer.records for e in r.events if e["type"] == "heal"]
    assert heals and all(e["learned_from_batch"] == e["applied_at_batch"] - 2 for e in heals), heals
    assert select.leader == "other" and select.switches == 1
