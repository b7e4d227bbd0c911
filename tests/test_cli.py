"""Acceptance: flags, bad input, a quiet import."""
import dataclasses
import json
import re
import subprocess
import sys

import pytest

from conftest import SCRIPT, shp

BAD_FLAGS = [
    ["--n-batches", "abc"], ["--drift-strength", "strong"], ["--n-batches", "0"], ["--batch-size", "0"],
    ["--fraud-ratio", "0"], ["--fraud-ratio", "1"], ["--fraud-ratio", "1.5"], ["--heal-steps", "-1"],
    ["--fidi-window", "0"], ["--health-window", "0"], ["--lr", "nan"], ["--supervision", "oracle"],
    ["--no-such-flag"], ["--thresholds", "missing.json"],
    ["--scenario", "drifty"], ["--heal-method", "magic"], ["--bench", "--shard", "3/3"], ["--bench", "--shard", "x"],
    ["--bench", "--shard", "1/0"], ["--bench", "--shard", "-1/3"], ["--shard", "0/2"], ["--merge"],
    ["--bench", "--merge", "--shard", "0/2"], ["--seeds", "2", "--scenario", "offset"],
    ["--bench", "--merge"],  # nothing to merge
    ["--seed", "-1"], ["--seed", "4294967296"], ["--seeds", "3", "--seed", "4294967294"], ["--lr", "1e20"],
    ["--heal-worker", "thread", "--heal-timeout", "1e10"], ["--heal-timeout", "5"], ["--async-apply"],
    ["--heal-timeout", "1e308"], ["--drift-strength", "1e308"], ["--fn-cost", "1e308"],
    ["--n-train", "1000000000"], ["--hidden-dim", "60000"], ["--fidi-window", "1e21"],
    ["--drift-strengths", "1.5,3"], ["--bench", "--drift-strengths", "1.5,x"], ["--bench", "--drift-strengths", "25"],
    ["--bench", "--drift-strengths", "1.5,,3"], ["--bench", "--drift-strengths", "nan"],
    ["--bench", "--shard", "0/2", "--drift-strengths", "2"], ["--select-z", "1"],
]
BAD_THRESHOLD_FILES = {
    "not_json.json": "{rollback_f1_drop: 0.1",
    "unknown_key.json": json.dumps({"rollback_f1_drop": 0.1, "retrain": True}),
    "wrong_type.json": json.dumps({"health_window": "five"}),
    "float_for_int.json": json.dumps({"conflict_min": 2.5}),
    "list.json": json.dumps([0.1]),
    "nan.json": '{"fidi_threshold": NaN}',
    "infinity.json": '{"fidi_threshold": Infinity}',
    "huge_window.json": '{"fidi_window": 1000000000000000000000}',
    "huge_float.json": '{"fidi_threshold": 1' + "0" * 400 + '}',
    "deep.json": "[" * 100_000 + "]" * 100_000,
    "many_keys.json": json.dumps({f"k{i}": i for i in range(10_000)}),
}
BAD_THRESHOLD_BYTES = {
    "latin1.json": '{"rule_threshold": -1.5} \xe9'.encode("latin-1"),
    "utf16.json": '{"rule_threshold": -1.5}'.encode("utf-16"),
    "big.json": b" " * (2 << 20) + b"{}",
}


def _run(args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _assert_user_error(proc, cwd):
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    written = {p.name for p in cwd.iterdir()} - set(BAD_THRESHOLD_FILES)
    assert not written, f"files written on bad input: {written}"


@pytest.mark.parametrize("args", BAD_FLAGS, ids=lambda a: " ".join(a))
def test_bad_flags_exit_2_in_one_line(args, tmp_path, capsys, monkeypatch):
    # In-process for speed: main() either returns 2 or argparse exits with 2.
    monkeypatch.chdir(tmp_path)  # restored after the test
    try:
        code = shp.main(args)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    assert not list(tmp_path.iterdir())


def _main_in(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)  # restored after the test
    before = sorted(tmp_path.iterdir())
    try:
        code = shp.main(args)
    except SystemExit as e:
        code = e.code
    assert sorted(tmp_path.iterdir()) == before, "nothing written"
    return code


@pytest.mark.parametrize("name", sorted(BAD_THRESHOLD_FILES) + sorted(BAD_THRESHOLD_BYTES))
def test_bad_threshold_files_exit_2_in_one_line(name, tmp_path, monkeypatch, capsys):
    path = tmp_path / name
    path.write_bytes(BAD_THRESHOLD_BYTES[name]) if name in BAD_THRESHOLD_BYTES else path.write_text(BAD_THRESHOLD_FILES[name])
    assert _main_in(tmp_path, monkeypatch, ["--thresholds", name]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and len(captured.err) < 400
    assert "Traceback" not in captured.err and "got nan" not in captured.err


def test_infinity_in_a_threshold_file_is_named_as_such(tmp_path, monkeypatch, capsys):
    (tmp_path / "t.json").write_text('{"fidi_threshold": Infinity}')
    assert _main_in(tmp_path, monkeypatch, ["--thresholds", "t.json"]) == 2
    assert "Infinity" in capsys.readouterr().err


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "folder"])
def test_special_threshold_files_never_block_and_exit_2(special, tmp_path, monkeypatch, capsys):
    import os
    if special == "fifo":
        os.mkfifo(tmp_path / "fifo")  # with no writer: opening it for reading the usual way blocks forever
    if special == "folder":
        (tmp_path / "folder").mkdir()
    assert _main_in(tmp_path, monkeypatch, ["--thresholds", special]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.slow
def test_non_number_exits_2_as_a_real_process(tmp_path):
    _assert_user_error(_run(["--n-batches", "abc"], tmp_path), tmp_path)
    _assert_user_error(_run(["--n-batches", "0"], tmp_path), tmp_path)


def _readme_flags():
    """flag -> (default, rule, help), from the README's flag tables."""
    text = (SCRIPT.parent / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(--[a-z0-9-]+)(?: FILE)?` \| ([^|]+?) \| ((?:[^|\\]|\\\|)*?) \| (.+?) \|$", text, flags=re.M)
    return {flag: (default, rule.replace("\\|", "|"), help_text) for flag, default, rule, help_text in rows}


def test_every_readme_flag_is_a_parser_flag_with_its_default_rule_and_help():
    readme = _readme_flags()
    assert len(readme) > 30 and "--drift-strength" in readme and "--rollback-f1-drop" in readme
    parser = shp.build_parser()
    parsed = {a.option_strings[0]: a.default for a in parser._actions if a.option_strings[0] != "-h"}
    assert sorted(parsed) == sorted(readme), set(parsed) ^ set(readme)
    for flag, default in parsed.items():
        assert readme[flag][0] == ("none" if default in (None, "") else str(default)), flag
    for f in shp.dataclasses.fields(shp.Config):
        default, rule, help_text = readme["--" + f.name.replace("_", "-")]
        words = ", ".join(f.metadata["choices"]) if f.metadata["choices"] else \
            "" if f.metadata["rule"] is None else shp.rule_words(f.metadata["rule"]).removeprefix("in ")
        assert (rule, help_text) == (words, f.metadata["help"]), f.name
    help_text = " ".join(parser.format_help().split())
    assert "(default: 2.2; in [-20, 20])" in help_text and "(default: 0.08; in [0, inf))" in help_text


def test_help_shows_the_flags_in_their_groups():
    """Each group of --help is one part's configuration class, titled by its docstring, and holds
    exactly the flags that class declares."""
    parser = shp.build_parser()
    groups = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups}
    titles = {c: c.__doc__.rstrip(".") for c in shp.CONFIG_GROUPS}
    assert len(shp.CONFIG_GROUPS) >= 4 and set(titles.values()) <= set(groups)
    for config_class, title in titles.items():
        declared = list(config_class.__annotations__) + (["thresholds"] if config_class is shp.Config else [])
        assert groups[title] == declared
    assert "drift_strength" in groups[titles[shp.ArticleConfig]] and "heal_worker" in groups[titles[shp.EngineConfig]]
    assert "scenario" in groups[titles[shp.MeasurementConfig]] and "out" in groups[titles[shp.Config]]


def test_flags_reach_the_config():
    cfg = shp.parse_config(["--drift-strength", "3.5", "--rollback-f1-drop", "0.03", "--no-plots", "--seed", "7"])
    assert (cfg.drift_strength, cfg.rollback_f1_drop, cfg.no_plots, cfg.seed) == (3.5, 0.03, True, 7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1


@pytest.mark.slow
def test_import_does_no_work(tmp_path):
    code = (
        "import numpy as np, torch, sys\n"
        "np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()\n"
        f"sys.path.insert(0, {str(SCRIPT.parent)!r})\n"
        "import self_healing_production_final\n"
        "assert (np.random.get_state()[1] == np_state).all(), 'numpy seeded'\n"
        "assert torch.equal(torch.get_rng_state(), torch_state), 'torch seeded or used'\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported before it is needed'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert not list(tmp_path.iterdir())
