import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

import self_healing_production_final as shp  # noqa: E402

SCRIPT = ROOT / "self_healing_production_final.py"

# Small enough to train in a fraction of a second, large enough to exercise every path.
SMALL = dict(n_train=600, n_test=200, n_drift=200, epochs=2, n_batches=6, batch_size=50)


@pytest.fixture(scope="session")
def default_trained():
    """One training at the article's defaults, shared by the tests that stream it."""
    return shp.prepare(shp.Config())


@pytest.fixture(scope="session")
def default_run(default_trained, tmp_path_factory):
    """The article's run, exported, with its printed lines."""
    out = tmp_path_factory.mktemp("default")
    lines = []
    result = shp.run_experiment(shp.Config(out=str(out)), trained=default_trained, console=lines.append,
                                export_dir=out / "monitoring_export")
    return result, lines + shp.report(result), out


@pytest.fixture(scope="session")
def small_trained():
    return shp.prepare(shp.Config(**SMALL))


def quiet(cfg_or_kwargs=None, **kwargs):
    return shp.Config(**{**(cfg_or_kwargs or {}), **kwargs, "quiet": True})
