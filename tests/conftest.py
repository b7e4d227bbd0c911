import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

import self_healing_production_final as shp  # noqa: E402

# As the script does: small tensors are fastest on one thread, and a loaded machine's other
# threads would make a fixture's training take minutes instead of seconds.
torch.set_num_threads(1)

SCRIPT = ROOT / "self_healing_production_final.py"

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes or races threads; `-m 'not slow'` skips them "
                                       "for a quick loop (the README's test command runs everything)")


# Small enough to train in a fraction of a second, large enough to exercise every path.
SMALL = dict(n_train=600, n_test=200, n_drift=200, epochs=2, n_batches=6, batch_size=50)


@pytest.fixture(scope="session")
def default_trained():
    """One training at the article's defaults, shared by the tests that stream it."""
    return shp.train_models(shp.Config())


def stream(cfg, trained=None, batches=None, console=None, export_dir=None, keep_records=True):
    """A run as main makes one (every part the flags ask for), served to the end: stage lines and
    batch lines go to console, rows and events to export_dir when given."""
    run = shp.Run(cfg, trained or shp.train_models(cfg), batches, keep_records)
    return shp.serve_and_write(run, console or (lambda line: None), export_dir)


@dataclass
class DefaultRun:
    run: shp.Run
    evaluation: shp.Evaluation
    lines: list  # everything it printed
    out: Path


@pytest.fixture(scope="session")
def default_run(default_trained, tmp_path_factory):
    """The article's run, exported, evaluated, with its printed lines."""
    out = tmp_path_factory.mktemp("default")
    lines = []
    run = stream(shp.Config(out=str(out)), trained=default_trained, console=lines.append,
                 export_dir=out / "monitoring_export")
    evaluation = shp.evaluate_run(run)
    return DefaultRun(run, evaluation, lines + shp.report(run, evaluation), out)


@pytest.fixture(scope="session")
def small_trained():
    return shp.train_models(shp.Config(**SMALL))


def quiet(cfg_or_kwargs=None, **kwargs):
    return shp.Config(**{**(cfg_or_kwargs or {}), **kwargs, "quiet": True})
