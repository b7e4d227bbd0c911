"""The file reads one way: Part I is the article and depends on nothing after it; every later part
calls into earlier ones, never the other way."""
import ast
import contextlib
import io
import os
import re
import sys

import pytest

from conftest import SCRIPT, shp

LINES = SCRIPT.read_text(encoding="utf-8").splitlines()
ROMAN = ("I", "II", "III", "IV", "V", "VI")
STARTS = [k + 1 for k, line in enumerate(LINES) if re.match(r"# Part [IVX]+\. ", line)]
TINY = ["--n-train", "600", "--n-test", "200", "--n-drift", "200", "--epochs", "1", "--n-batches", "4",
        "--batch-size", "50", "--no-plots", "--quiet"]
# The stream's parts, handed to Part I's loop by later parts: calls on them are the composition,
# not a dependency (Part I names none of them).
HANDED_IN = {"submit", "finished", "restore", "close", "check", "healer", "make_detector", "train_side_by_side"}
HANDED_IN |= {f.metadata["rule"][0].__name__ for f in shp.dataclasses.fields(shp.Config)  # the knobs' own rules,
              if isinstance(f.metadata["rule"], tuple)}  # which Part I's knob_problem applies


def part_of(line: int) -> int:
    """0 for the file's head (docstring and imports), else the part's number, 1 to 6."""
    return sum(line >= start for start in STARTS)


def test_the_file_has_six_parts_in_order():
    assert [re.match(r"# Part ([IVX]+)\.", LINES[s - 1])[1] for s in STARTS] == list(ROMAN)


def test_part_one_uses_no_name_defined_after_it():
    tree = ast.parse("\n".join(LINES))
    defined_later = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                     and part_of(node.lineno) > 1}
    defined_later |= {t.id for node in tree.body if isinstance(node, ast.Assign) and part_of(node.lineno) > 1
                      for t in node.targets if isinstance(t, ast.Name)}
    used_in_part_one = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)
                        and part_of(node.lineno) == 1}
    assert defined_later and used_in_part_one
    assert not used_in_part_one & defined_later


def part_one_lines() -> int:
    return STARTS[1] - STARTS[0]


def traced_default_run(tmp_path) -> tuple[int, int]:
    """Functions of the script that a default run with --no-plots calls (in this process: forking is
    turned off, so its children's work is traced too), and how many lines of the file they span."""
    codes = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == str(SCRIPT):
            codes.add(frame.f_code)
    fork, shp.FORK_IS_SAFE = shp.FORK_IS_SAFE, False
    cwd = os.getcwd()
    os.chdir(tmp_path)
    sys.setprofile(profile)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert shp.main(["--no-plots"]) == 0
    finally:
        sys.setprofile(None)
        os.chdir(cwd)
        shp.FORK_IS_SAFE = fork
    lines = set()
    for code in codes:
        lines.update(range(code.co_firstlineno, max(line for _, _, line in code.co_lines() if line) + 1))
    return len(codes), len(lines)


def test_part_one_is_short_and_starts_with_the_articles_knobs():
    first, last = STARTS[0], STARTS[1] - 1
    body = [line for line in LINES[first:last] if line and not line.startswith("#")]
    assert part_one_lines() <= 970, "Part I reads in one sitting"
    assert body[0].startswith("def knob(") and "class ArticleConfig" in "\n".join(body[:20])
    assert max(len(line) for line in LINES) <= 120
    assert len(LINES) <= 5660, ("the file does not grow (images and TorchServe took it from 4,150 to 5,160 lines; "
                                "a third hardening round, the bench's one run per method and the plot fixes to 5,350; "
                                "select with a regret guarantee, champion kept beside it and --drift-strengths to "
                                "5,660)")


@pytest.mark.slow
def test_a_default_run_calls_a_bounded_part_of_the_file(tmp_path):
    functions, lines = traced_default_run(tmp_path)
    # 1,395 before the third hardening round, whose closed-stream and pool-signal guards and outputs put in
    # place together are on every path; 1,460 before --drift-strengths, whose rule and refusal every run checks
    assert functions > 100 and lines <= 1470, (functions, lines)


def _calls_between_parts(args, monkeypatch, tmp_path):
    """Run main in this process under a profiler; every call between two functions of the script,
    as (caller's part, callee's part, callee's name)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shp, "FORK_IS_SAFE", False)  # forked children would escape the profiler
    script, calls = str(SCRIPT), set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == script and frame.f_back is not None \
                and frame.f_back.f_code.co_filename == script:
            calls.add((part_of(frame.f_back.f_code.co_firstlineno), part_of(frame.f_code.co_firstlineno),
                       frame.f_code.co_name))
    sys.setprofile(profile)
    try:
        code = shp.main(args)
    finally:
        sys.setprofile(None)
    assert code == 0
    return calls


@pytest.mark.parametrize("args", [[], ["--scenario", "offset", "--heal-method", "heal"],
                                  ["--supervision", "rules", "--heal-worker", "thread"]],
                         ids=["article", "offset-heal", "rules"])
def test_no_part_calls_into_a_later_one_but_through_what_it_was_handed(args, monkeypatch, tmp_path):
    calls = _calls_between_parts(TINY + args, monkeypatch, tmp_path)
    assert {(a, b) for a, b, _ in calls} >= {(6, 1), (1, 1)}, "the profiler saw the run"
    forward = {(a, b, name) for a, b, name in calls if 0 < a < b and a != 6}
    assert {name for _, _, name in forward} <= HANDED_IN, forward
    if "--heal-worker" in args:
        assert any(name == "submit" for _, _, name in forward), "the engine's healer ran inside Part I's loop"


if __name__ == "__main__":  # the figures: python tests/test_structure.py
    import tempfile
    functions, lines = traced_default_run(tempfile.mkdtemp())
    print(f"file: {len(LINES)} lines; Part I: {part_one_lines()} lines")
    print(f"a default run (--no-plots) calls {functions} of the file's functions, {lines} lines of them")
