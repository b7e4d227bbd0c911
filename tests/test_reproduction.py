"""Acceptance: the default run reproduces the article's table, and runs reproduce themselves."""
import csv
import json
import re

import pytest

from conftest import shp, stream


def test_article_table_reproduced(default_run):
    result = default_run.run
    table = result.article_table()
    assert table["clean"].counts == "109/820/30/41"
    assert table["no_healing"].counts == "128/318/532/22"
    assert table["shadow"].counts == "128/318/532/22"
    assert table["healed"].counts == "51/673/177/99"
    # the honest evaluation scores the same models the same way
    assert {k: default_run.evaluation.drift_rows[k].metrics for k in ("no_healing", "shadow", "healed")} == \
        {k: table[k] for k in ("no_healing", "shadow", "healed")}
    assert result.log.counts["heal"] == 25 and result.log.counts["rollback"] == 0
    assert result.registry.saved == 51
    best = result.registry.best_post_heal()
    assert (best.version, best.batch, round(best.accuracy, 3), round(best.f1, 3)) == (21, 10, 0.710, 0.408)
    assert (round(result.fidi.mu, 3), round(result.fidi.sigma, 3)) == (-0.363, 1.323)
    assert result.log.first_drift_batch == 3
    assert result.log.lift.positive == 25
    assert (round(result.log.lift.min, 3), round(result.log.lift.max, 3)) == (0.05, 0.36)
    assert round(100 * result.log.lift.mean, 1) == 22.3


def test_every_article_figure_is_printed_and_matches(default_run):
    comparison = shp.article_comparison(default_run.run)
    assert len(comparison) == 31
    assert all(article == ours for _, article, ours in comparison), comparison
    text = "\n".join(default_run.lines)
    assert "31 of 31 figures match the article." in text
    assert re.search(r"Self-healed: TP/TN/FP/FN\s+51/673/177/99\s+51/673/177/99\s+match", text)
    assert "DIFFERS" not in text
    assert all(ord(c) < 128 for c in text), "console output is plain ASCII"


def test_a_run_with_other_flags_says_how_many_figures_match_instead_of_the_table(default_trained, tmp_path):
    lines = []
    run = stream(shp.Config(rollback_f1_drop=0.03, quiet=True), trained=default_trained, console=lines.append)
    e = shp.evaluate_run(run)
    short = "\n".join(shp.report(run, e))
    assert "DIFFERS" not in short and "match this run, which changes --rollback-f1-drop" in short
    matched = sum(a == o for _, a, o in shp.article_comparison(run))
    assert f"{matched} of its 31 figures" in short and 0 < matched < 31
    full = "\n".join(shp.report(run, e, full_table=True))
    assert "DIFFERS" in full and f"{matched} of 31 figures match the article." in full


def test_console_tells_the_pipeline_before_the_batch_table(default_run):
    lines = default_run.lines
    header = lines.index(shp.batch_header())
    stages = [line.split(":")[0] for line in lines[:header]]
    assert stages == ["Data", "Training", "FIDI calibrated on training V14", "Stream"]
    assert "-0.377, 18.8%" in lines[0] and "-2.261, 77.4%" in lines[0]
    assert "92.9%" in lines[1] and "mu -0.363, sigma 1.323" in lines[2]
    assert lines[header + 1].split()[:3] == ["1", "HEALING", "heal"]


def test_z_first_exceeds_threshold_at_batch_3_and_stays(default_run):
    z = [r.z for r in default_run.run.log.records]
    assert z[0] == z[1] == 0.0 and all(v > 1.0 for v in z[2:])


def committed(path: str) -> bytes:
    """The file as committed, whatever runs have written into the working tree since (the README's
    examples write into monitoring_export/); the working tree's copy outside a git checkout."""
    import subprocess
    from conftest import ROOT
    try:
        return subprocess.run(["git", "show", f"HEAD:{path}"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return (ROOT / path).read_bytes()


def test_default_metrics_csv_equals_the_committed_one_byte_for_byte(default_run):
    """The committed monitoring_export/ is the default run's: a fresh run writes the same bytes."""
    fresh = default_run.out / "monitoring_export" / "metrics.csv"
    assert fresh.read_bytes() == committed("monitoring_export/metrics.csv")


def test_metrics_csv_contents(default_run):
    result, out = default_run.run, default_run.out
    raw = (out / "monitoring_export" / "metrics.csv").read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf"), "no byte-order mark"
    rows = list(csv.DictReader(raw.decode("utf-8").splitlines()))
    assert list(rows[0]) == shp.CSV_COLUMNS
    assert [int(r["batch"]) for r in rows] == list(range(1, 26))
    assert {r["state"] for r in rows} == {"HEALING"}
    assert {r["action"] for r in rows} == {"heal"}
    assert rows[9]["healed_accuracy"] == "0.710000" and rows[9]["version_post"] == "21"
    lifts = [float(r["lift"]) for r in rows]
    assert (min(lifts), max(lifts)) == pytest.approx((0.05, 0.36), abs=1e-9)
    # every value under a column is the record's own, to the 6 decimals written
    for row, record in zip(rows, result.log.records):
        assert float(row["prequential_lift"]) == pytest.approx(shp.prequential_lift(record), abs=5e-7)
        assert float(row["served_f1"]) == pytest.approx(record.served.f1, abs=5e-7)
        assert row["restored_version"] == "" and int(row["conflicts"]) == record.conflicts


def test_events_json_is_strict_and_complete(default_run):
    out = default_run.out
    text = (out / "monitoring_export" / "events.json").read_text(encoding="utf-8")
    events = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(f"{c} in JSON")))
    assert [e["type"] for e in events] == ["heal"] * 25
    assert [e["version_post"] for e in events] == list(range(3, 52, 2))
    assert all({"batch", "time", "version_pre", "f1_after"} <= set(e) for e in events)


def test_threshold_config_written(default_run):
    out = default_run.out
    data = json.loads((out / "monitoring_export" / "threshold_config.json").read_text())
    run = data.pop("run")
    assert data == shp.threshold_dict(shp.Config())
    from conftest import SCRIPT
    assert run["command"] == f"python {SCRIPT} --out={out}" and run["config"]["seed"] == 42
    assert sorted(data) == sorted(["rollback_f1_drop", "rollback_acc_drop", "health_window", "conflict_thr",
                                   "min_batches_before_rollback", "conflict_min", "fidi_threshold",
                                   "fidi_window", "rule_threshold"])
    assert not list((out / "monitoring_export").glob(".*.tmp")), "no temporary files left"


def _metrics_csv(out):
    return (out / "monitoring_export" / "metrics.csv").read_bytes()


def test_same_flags_give_identical_metrics(tmp_path):
    """From scratch twice (seeding, training, stream): byte-identical metrics.csv."""
    cfg = shp.Config(n_train=1500, epochs=4, n_batches=10, rollback_f1_drop=0.02, quiet=True)
    for name in ("a", "b"):
        stream(cfg, console=lambda line: None, export_dir=tmp_path / name / "monitoring_export")
    assert _metrics_csv(tmp_path / "a") == _metrics_csv(tmp_path / "b")


def test_thresholds_file_reproduces_the_run_that_wrote_it(default_trained, tmp_path):
    flags = ["--rollback-f1-drop", "0.03", "--health-window", "4", "--conflict-min", "6", "--quiet"]
    first = shp.parse_config(flags + ["--out", str(tmp_path / "a")])
    stream(first, trained=default_trained, console=print, export_dir=tmp_path / "a" / "monitoring_export")
    again = shp.parse_config(["--thresholds", str(tmp_path / "a" / "monitoring_export" / "threshold_config.json"),
                              "--quiet", "--out", str(tmp_path / "b")])
    assert shp.threshold_dict(again) == shp.threshold_dict(first)
    stream(again, trained=default_trained, console=print, export_dir=tmp_path / "b" / "monitoring_export")
    assert _metrics_csv(tmp_path / "a") == _metrics_csv(tmp_path / "b")


def test_explicit_flag_wins_over_thresholds_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"rollback_f1_drop": 0.05, "health_window": 7}))
    cfg = shp.parse_config(["--thresholds", str(path), "--health-window", "3"])
    assert (cfg.rollback_f1_drop, cfg.health_window) == (0.05, 3)


@pytest.mark.slow
def test_end_to_end_cli_writes_plots_and_exports(tmp_path):
    import subprocess
    import sys
    from conftest import SCRIPT
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"51/673/177/99\s+51/673/177/99\s+match", proc.stdout)
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == sorted(shp.PLOTS)
    assert all((tmp_path / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    assert sorted(p.name for p in (tmp_path / "monitoring_export").iterdir()) == \
        ["events.json", "metrics.csv", "threshold_config.json"]


def test_the_committed_threshold_file_is_the_default_runs_with_this_code():
    """monitoring_export/threshold_config.json, as committed: the default run's thresholds and settings,
    with every field the configuration has now (a stale copy would lack the newer ones)."""
    from conftest import SCRIPT
    committed = json.loads((SCRIPT.parent / "monitoring_export" / "threshold_config.json").read_text())
    default = shp.Config()
    assert committed["run"]["config"] == json.loads(json.dumps(shp._json_safe(shp.dataclasses.asdict(default))))
    assert {k: v for k, v in committed.items() if k != "run"} == shp.threshold_dict(default)
