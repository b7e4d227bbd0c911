"""SelfHealer, the public API: the README's example as it is, and other people's models (several
classes, one logit, a convolutional block) with labels that come late."""
import csv
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import ROOT, SCRIPT, shp

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _readme_example():
    section = README.split("## Use it on your own model", 1)[1]
    code, printed = re.findall(r"```(?:python)?\n(.*?)```", section, flags=re.S)[:2]
    return code, printed


def test_readme_example_runs_verbatim_from_another_folder(tmp_path):
    code, printed = _readme_example()
    assert len(code.splitlines()) <= 25 and "SelfHealer(" in code
    (tmp_path / "mine.py").write_text(code)
    run = subprocess.run([sys.executable, "mine.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert run.stdout == printed, "the README shows what the example prints"
    unhealed, healed = map(float, re.findall(r"\d\.\d+", run.stdout))
    assert healed > unhealed + 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.py"], "the import wrote nothing"


def _blobs(rng, n, classes, shift=0.0, dims=5):
    centres = np.random.RandomState(7).normal(0, 2.5, (classes, dims))
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(0, 1.0, (n, dims)) + shift).astype(np.float32), y


def _train(model, X, y, loss, steps=300):
    torch.manual_seed(0)
    optimizer = shp.Adam(model.parameters(), lr=0.01)
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(steps):
        optimizer.zero_grad()
        loss(model(X), y).backward()
        optimizer.step()
    return model


def _stream(healer, model, rng, make, delay, n_batches=40):
    """Serve n_batches drifted batches, their labels `delay` batches late: the accuracy of the healer's
    answers and of the untouched model on each."""
    served, frozen, waiting = [], [], []
    for _ in range(n_batches):
        X, y = make(rng)
        proba = healer.predict(X)
        i = healer.records[-1].batch
        with torch.no_grad():
            out = model(torch.from_numpy(X))
        served.append(np.mean((proba.argmax(1) if proba.ndim == 2 else proba > 0.5) == y))
        frozen.append(np.mean((out.argmax(1) if out.shape[1] > 1 else out[:, 0] > 0).numpy() == y))
        waiting.append((i, y))
        if len(waiting) > delay:
            healer.observe(*waiting.pop(0))
    return np.array(served), np.array(frozen)


@pytest.fixture(scope="module")
def four_classes():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    X, y = _blobs(np.random.default_rng(1), 4000, 4)
    return _train(model, X, y, nn.functional.cross_entropy)


def test_a_multi_class_model_heals_on_late_labels(four_classes):
    before = {k: v.clone() for k, v in four_classes.state_dict().items()}
    random_state = torch.get_rng_state()
    healer = shp.SelfHealer(four_classes, "3")
    assert torch.equal(torch.get_rng_state(), random_state), "wrapping draws nothing from the caller's stream"
    X, _ = _blobs(np.random.default_rng(2), 200, 4)
    with torch.no_grad():
        assert np.array_equal(healer.predict(X), four_classes(torch.from_numpy(X)).softmax(1).numpy()), \
            "a new adapter changes nothing before its first heal"
    served, frozen = _stream(healer, four_classes, np.random.default_rng(3),
                             lambda rng: _blobs(rng, 200, 4, shift=1.5), delay=3)
    assert served[-20:].mean() > frozen[-20:].mean() + 0.05, (served[-20:].mean(), frozen[-20:].mean())
    assert all(four_classes.state_dict()[k].equal(v) for k, v in before.items()), "the model handed in is untouched"
    records = list(healer.records)
    assert [r.batch for r in records] == list(range(1, 42))
    assert records[1].action == "await_labels" and records[1].served is not None, "labels came later, and scored it"
    assert sum(r.version_post is not None for r in records) == 40 - 3, "a heal per batch once labels flow"
    heals = [e for r in records for e in r.events if e["type"] == "heal"]
    assert all(e["learned_from_batch"] == e["batch"] - 3 for e in heals), "each heal names the labels it learned"


def test_wrong_labels_are_rolled_back_to_the_best_healed_version(four_classes):
    """From batch 16 on the labels handed in are wrong (each class named as the next): the heals learn
    them, the health window falls, and the best post-heal version comes back."""
    healer = shp.SelfHealer(four_classes, "3", keep_best=100, keep_last=100)
    rng = np.random.default_rng(4)
    for i in range(1, 31):
        X, y = _blobs(rng, 100, 4, shift=1.5)
        healer.predict(X)
        healer.observe(i, y if i <= 15 else (y + 1) % 4)
        if healer.records[-1].restored_version is not None:
            restored = healer.registry.snapshots[healer.records[-1].restored_version]
            served = healer.model.adapter().state_dict()
            assert restored.kind == "post_heal" and all(served[k].equal(v) for k, v in restored.state.items())
    rolled_back = [r.batch for r in healer.records if r.restored_version is not None]
    assert rolled_back and min(rolled_back) > 15, rolled_back
    assert {healer.registry.snapshots[r.restored_version].batch for r in healer.records if r.restored_version} \
        <= set(range(1, 16)), "restored: a version healed on the right labels"


def test_a_binary_model_with_one_logit_heals():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1))
    X, y = _blobs(np.random.default_rng(5), 3000, 2)
    _train(model, X, y.astype(np.float32), lambda out, t: nn.functional.binary_cross_entropy_with_logits(out[:, 0], t))
    healer = shp.SelfHealer(model, "1")
    towards_class_1 = 0.4 * np.diff(np.random.RandomState(7).normal(0, 2.5, (2, 5)), axis=0)[0]
    served, frozen = _stream(healer, model, np.random.default_rng(6),
                             lambda rng: _blobs(rng, 200, 2, shift=towards_class_1), delay=1)
    assert healer.predict(X[:7]).shape == (7,)
    assert served[-20:].mean() > frozen[-20:].mean() + 0.05, (served[-20:].mean(), frozen[-20:].mean())


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.block(x))


def test_an_adapter_after_a_convolutional_block():
    torch.manual_seed(3)
    model = SmallConvNet().eval()
    rng = np.random.default_rng(7)
    images = rng.normal(0, 1, (64, 3, 8, 8)).astype(np.float32)
    healer = shp.SelfHealer(model, "block")
    assert isinstance(healer.model.adapter(), shp.ReflexiveLayer) and healer.model.adapter().adapter[0].in_features == 8
    with torch.no_grad():
        assert np.allclose(healer.predict(images), model(torch.from_numpy(images)).softmax(1).numpy(), atol=1e-6)
    before = healer.predict(images)
    healer.observe(2, rng.integers(0, 3, 64))
    assert healer.records[-1].version_post is not None, "it healed"
    assert not np.array_equal(healer.predict(images), before), "and the heal changed what it serves"


def test_the_records_export_as_the_command_line_writes_them(four_classes, tmp_path):
    healer = shp.SelfHealer(four_classes, "3")
    _stream(healer, four_classes, np.random.default_rng(8), lambda rng: _blobs(rng, 50, 4, shift=1.5), delay=2,
            n_batches=6)
    with shp.Exports(tmp_path, healer.cfg) as exports:
        for record in healer.records:
            exports.write(record)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["batch"] for r in rows] == [str(k) for k in range(1, 7)]
    assert rows[0]["served_accuracy"] and rows[-1]["served_accuracy"] == "", "the last two await their labels"
    assert (tmp_path / "events.json").is_file() and (tmp_path / "threshold_config.json").is_file()


def test_mistakes_are_named():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match="heal_step"):
        shp.SelfHealer(model, "1", heal_step=3)
    for options, words in [(dict(keep_last=0), "keep_last must be in"), (dict(heal_steps="5"), "an integer"),
                           (dict(heal_lr=float("nan")), "a finite number"), (dict(supervision="rules"), "rule"),
                           (dict(max_pending=0), "max_pending")]:
        with pytest.raises(ValueError, match=words):
            shp.SelfHealer(model, "1", **options)
    for name in ("body", "", 2):
        with pytest.raises(ValueError, match="no child module"):
            shp.SelfHealer(model, name)
    with pytest.raises(ValueError, match="worker is one of"):
        shp.heals_in("bogus")
    healer = shp.SelfHealer(model, "1")
    with pytest.raises(ValueError, match="batch 1 has not been served"):
        healer.observe(1, [0])
    for X in (np.float32([0, 1]), np.zeros((0, 2), np.float32), np.zeros((3, 5), np.float32)):
        with pytest.raises((ValueError, RuntimeError)):
            healer.predict(X)
    assert healer.served == 0 and not healer.records, "a batch that was not served takes no number"
    healer.predict(np.float32([[0, 1], [1, 1]]))
    assert healer.predict(np.float32([[0, np.nan], [1, 1]])).shape == (2, 2), "quarantined: NaN answers, one per class"
    for labels, words in [([0, 1, 1], "2 class numbers"), ([0, 2], "in 0..1"), ([0, np.nan], "other values")]:
        with pytest.raises(ValueError, match=words):
            healer.observe(1, labels)
    healer.observe(1, torch.tensor([0, 1]))
    assert healer.records[0].served is not None
    assert healer.records[-1].state == "QUARANTINED", "labels arriving after it leave a quarantined batch as it was"


def test_a_reused_input_buffer_does_not_change_what_a_heal_learns(four_classes):
    """Loaders reuse one buffer per batch: the self-healer keeps its own copy of each batch it waits on."""
    rng = np.random.default_rng(10)
    batches = [_blobs(rng, 50, 4, shift=1.5) for _ in range(3)]
    fresh, reused = shp.SelfHealer(four_classes, "3"), shp.SelfHealer(four_classes, "3")
    buffer = np.empty_like(batches[0][0])
    for healer in (fresh, reused):
        for i, (X, y) in enumerate(batches, start=1):
            if healer is reused:
                buffer[:] = X
                X = buffer
            healer.predict(X)
        for i, (_, y) in enumerate(batches, start=1):
            healer.observe(i, y)
    assert all(a.state_dict()[k].equal(b.state_dict()[k]) for a, b in [(fresh.model, reused.model)]
               for k in a.state_dict())


def test_a_confident_binary_model_still_heals_on_its_logits():
    """A well-trained model's sigmoid rounds to exactly 0 on some rows; the heal works on the logits and
    is not rejected for a non-finite loss."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1))
    X, y = _blobs(np.random.default_rng(11), 2000, 2)
    _train(model, X, y.astype(np.float32), lambda out, t: nn.functional.binary_cross_entropy_with_logits(out[:, 0], t))
    with torch.no_grad():
        model[2].weight *= 20  # the same decisions, far more sure of them: logits in the hundreds
        assert (torch.sigmoid(model(torch.from_numpy(X))) == 0).any(), "the test needs saturated rows"
    healer = shp.SelfHealer(model, "1", heal_steps=20, heal_lr=0.01)
    towards_class_1 = 0.5 * np.diff(np.random.RandomState(7).normal(0, 2.5, (2, 5)), axis=0)[0]
    _stream(healer, model, np.random.default_rng(12), lambda rng: _blobs(rng, 200, 2, shift=towards_class_1),
            delay=0, n_batches=10)
    assert not [e for r in healer.records for e in r.events if e["type"] == "heal_failed"]


def test_a_model_that_cannot_go_to_a_worker_process_is_a_rejected_heal():
    def local_model():
        class Local(nn.Module):
            def __init__(self):
                super().__init__()
                self.body, self.head = nn.Linear(2, 4), nn.Linear(4, 2)

            def forward(self, x):
                return self.head(self.body(x))
        return Local()
    healer = shp.SelfHealer(local_model(), "body", healer=shp.heals_in("process"))
    healer.predict(np.float32([[0, 1], [1, 0]]))
    healer.observe(1, [0, 1])
    healer.close()
    events = healer.records[-1].events
    assert [e["type"] for e in events] == ["heal_failed"] and "cannot be sent" in events[0]["reason"]


def test_importing_the_script_does_no_work(tmp_path):
    code = "import self_healing_production_final as s; print(sorted(s.SelfHealer.__init__.__code__.co_varnames)[:1])"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(SCRIPT.parent), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0 and run.stderr == "" and run.stdout.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_heals_in_a_thread_or_a_process_serve_what_inline_heals_serve(four_classes):
    """Where heals run changes nothing served: the same answers, batch by batch, whichever healer."""
    answers = {}
    for worker in ("inline", "thread", "process"):
        healer = shp.SelfHealer(four_classes, "3", healer=shp.heals_in(worker, timeout=60))
        rng, answers[worker] = np.random.default_rng(9), []
        try:
            for i in range(1, 7):
                X, y = _blobs(rng, 100, 4, shift=1.5)
                answers[worker].append(healer.predict(X))
                healer.observe(i, y)
        finally:
            healer.close()
        assert sum(r.version_post is not None for r in healer.records) == 6, worker
    for worker in ("thread", "process"):
        assert all(np.array_equal(a, b) for a, b in zip(answers["inline"], answers[worker])), worker
