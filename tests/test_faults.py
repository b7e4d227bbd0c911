"""Faults injected from outside (a full disk, a killed worker, signals, limits, a PID namespace, hostile
input): each ends as promised. One line on stderr containing 'error:' (no traceback), the right exit
status, files whole, nothing left behind (no *.tmp), no orphan processes.

The numbers in test names are the classes of the issue these tests come from."""
import contextlib
import csv
import dataclasses
import errno
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from conftest import SCRIPT, shp

TINY = ["--n-train", "600", "--n-test", "200", "--n-drift", "200", "--epochs", "1", "--n-batches", "3",
        "--no-plots", "--quiet"]
WITH_PLOTS = [flag for flag in TINY if flag != "--no-plots"]
LONG_STREAM = ["--n-batches", "200000"]  # long enough to be stopped mid-stream
A_STALE_PLOT = ".01_accuracy.png.999999.abcdefgh.tmp"  # atomic_file's name, of a PID no process can have


# -- Running the script

def _preexec(limits=()):
    """What the child does before exec: Ctrl-C as a terminal gives it (Python keeps SIGINT ignored in a
    child started with it ignored), then the resource limits asked for."""
    def setup():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        for which, value in limits:
            resource.setrlimit(which, (value, value))
    return setup


def _start(args, cwd, prefix=(), env=None, limits=(), new_session=False):
    """The script, running; standard output and error go to files in cwd (out.txt, err.txt), read by
    _stderr, so that nothing is lost between polling and waiting."""
    with open(Path(cwd) / "out.txt", "w") as out, open(Path(cwd) / "err.txt", "w") as err:
        run = subprocess.Popen([*prefix, sys.executable, str(SCRIPT), *args], cwd=cwd, stdout=out, stderr=err,
                               env=env, preexec_fn=_preexec(limits), start_new_session=new_session)
    run.cwd = cwd
    return run


def _stderr(cwd):
    return (Path(cwd) / "err.txt").read_text(errors="replace")


def _run(args, cwd, timeout=60, **kwargs):
    """The script, to its end: (exit status, stderr)."""
    run = _start(args, cwd, **kwargs)
    try:
        run.wait(timeout=timeout)
    finally:
        _stop(run)
    return run.returncode, _stderr(cwd)


def _stop(run):
    """Kill a run and whatever it started, if still there (a failed test leaves nothing running)."""
    leftovers = _descendants(run.pid)
    if run.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            run.kill()
        run.wait(timeout=10)
    _kill(leftovers)


def _main(argv, capsys):
    """main in this process: (exit status, stdout, stderr); anything main lets out is a traceback."""
    try:
        code = shp.main(argv)
    except SystemExit as e:  # argparse's refusal
        code = e.code
    except BaseException as e:  # noqa: B036 (Ctrl-C included: it must not escape main either)
        pytest.fail(f"main let {type(e).__name__} out, a traceback: {str(e)[:200]}")
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(stderr):
    """The one line a failure prints (progress lines aside), with 'error:' and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("progress:")]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _temporaries(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*.tmp"))


def _wait_for(condition, run, seconds=60, what="the moment to strike"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        if run.poll() is not None:
            raise AssertionError(f"the run ended (status {run.returncode}) before {what}: {_stderr(run.cwd)[-2000:]}")
        time.sleep(0.01)
    raise AssertionError(f"never saw {what}")


def _progress_shown(cwd):
    return lambda: "progress:" in _stderr(cwd)


def _being_written(folder, pattern):
    """Whether a file whose name matches pattern is being written in folder (under atomic_file's temporary
    name; claim_out's .probe.*.tmp, made at the start, does not count)."""
    return lambda: bool(list(Path(folder).glob(f".{pattern}.*.tmp")))


# -- Processes, as /proc shows them

def _start_time(pid):
    """The start time of a live process (None once it is gone or a zombie): with the PID, it names the
    process even if the PID is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields[19]


def _children(pid):
    kids = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
    return kids


def _descendants(pid):
    """[(pid, start time)] of every process below pid now."""
    found, todo = [], [pid]
    while todo:
        for kid in _children(todo.pop()):
            started = _start_time(kid)
            if started is not None:
                found.append((kid, started))
                todo.append(kid)
    return found


def _naming(text):
    """[(pid, start time)] of the processes whose command line holds text."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    started = _start_time(int(entry))
                    if started is not None:
                        found.append((int(entry), started))
    return found


def _alive(processes):
    return [(pid, started) for pid, started in processes if _start_time(pid) == started]


def _kill(processes):
    for pid, _ in _alive(processes):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _left_after(processes, seconds):
    """Which of processes are still alive after waiting up to seconds for them to go."""
    deadline = time.monotonic() + seconds
    while _alive(processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _alive(processes)


def _cmdline(pid):
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")[:150]
    return "?"


def _workers(run):
    return [pid for pid, _ in _descendants(run.pid) if "spawn_main" in _cmdline(pid)]


# -- Faults: a small tmpfs, a full one

@contextlib.contextmanager
def _tmpfs(path, size):
    """A tmpfs of size mounted at path (created), unmounted afterwards; skips where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(folder):
    """Fill the file system of folder to the last byte."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


# -- A bench's cell files, made once

SHARD_SEEDS = 2


@pytest.fixture(scope="module")
def made_cells(tmp_path_factory):
    """An --out holding every cell file of a tiny two-seed bench (one shard of one)."""
    out = tmp_path_factory.mktemp("cells")
    assert shp.main(TINY + ["--bench", "--shard", "0/1", "--seeds", str(SHARD_SEEDS), "--out", str(out)]) == 0
    return out


def _cells_copy(made_cells, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(made_cells, out)
    return out


def _merge(out, *flags):
    return TINY + ["--bench", "--merge", "--seeds", str(SHARD_SEEDS), "--out", str(out), *flags]


def _edit_cell(out, edit):
    """Rewrite the first cell file's text with edit(text)."""
    path = sorted((out / "bench_cells").glob("cell-0000-*.json"))[0]
    text = path.read_text()
    path.write_text(edit(text))
    assert path.read_text() != text
    return path


def _set_figure(name, value):
    return lambda text: re.sub(rf'"{name}": [^,}}]+', f'"{name}": {value}', text, count=1)


# 1. A failing child ends in a traceback

@pytest.mark.slow
def test_1_plots_failing_in_the_forked_child_on_a_full_disk_end_in_one_line(tmp_path):
    """A plot the forked child cannot write (ENOSPC): one line naming the file, exit 1, no temporary, no child left."""
    with _tmpfs(tmp_path / "mnt", "300k") as mnt:
        run = _start(WITH_PLOTS + ["--out", str(mnt)], tmp_path)
        try:
            run.wait(timeout=60)
            line = _one_error_line(_stderr(tmp_path))
            assert run.returncode == 1
            assert "No space left on device" in line
            assert re.search(r"\w\.(png|csv|json)\b", line) and ".tmp" not in line, "names the file: " + line
            assert _temporaries(mnt) == []
            assert _left_after(_naming(str(tmp_path)), 2) == []
        finally:
            _stop(run)
            _kill(_naming(str(tmp_path)))  # before the unmount: a child left would keep the tmpfs busy


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--seeds", "4"], ["--bench", "--seeds", "2"]], ids=["sweep", "bench"])
def test_1_a_pool_worker_killed_with_9_ends_in_one_line(flags, tmp_path):
    """kill -9 of one pool worker (what the OOM killer does): one line naming the worker, exit 1, none left."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one processor: the run has no pool of two workers")
    run = _start(TINY + flags, tmp_path)
    children = []
    try:
        _wait_for(lambda: len(_workers(run)) == 2, run, what="two workers")
        time.sleep(0.3)
        children = _descendants(run.pid)
        os.kill(_workers(run)[0], signal.SIGKILL)
        run.wait(timeout=30)
        line = _one_error_line(_stderr(tmp_path))
        assert run.returncode == 1
        assert re.search(r"worker|process", line), line
        assert _temporaries(tmp_path) == []
        assert _left_after(children, 2) == [], "the other worker is stopped too"
    finally:
        _stop(run)
        _kill(children)


# 2. Temporaries survive a failed commit, and the error line names no file

@pytest.mark.slow
def test_2_a_sweep_on_a_full_disk_names_seed_sweep_csv_and_leaves_no_temporary(tmp_path):
    """A full disk when the sweep's CSV is committed: exit 1, one line naming seed_sweep.csv, no temporary."""
    with _tmpfs(tmp_path / "mnt", "400k") as mnt:
        _fill(mnt)
        status, stderr = _run(TINY + ["--seeds", "2", "--out", str(mnt)], tmp_path)
        assert "seed_sweep.csv" in _one_error_line(stderr)
        assert status == 1
        assert _temporaries(mnt) == []


@pytest.mark.slow  # mounts a tmpfs
@pytest.mark.parametrize("flags, name", [(["--bench", "--seeds", "1"], "bench.csv"),
                                         (["--bench", "--shard", "0/1", "--seeds", "1"], "cell-0000-")],
                         ids=["bench.csv", "cell file"])
def test_2_a_bench_on_a_full_disk_names_its_file_and_leaves_no_temporary(flags, name, tmp_path, monkeypatch, capsys):
    """A full disk when a bench file is committed: exit 1, one line naming that file, no temporary."""
    monkeypatch.chdir(tmp_path)
    with _tmpfs(tmp_path / "mnt", "400k") as mnt:
        _fill(mnt)
        code, _, err = _main(TINY + flags + ["--out", str(mnt)], capsys)
        line = _one_error_line(err)
        assert code == 1
        assert name in line and ".tmp" not in line, line
        assert _temporaries(mnt) == []


def test_2_a_folder_in_the_way_of_a_cell_file_is_named_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    """A folder where a cell file goes: exit 1, one line naming the cell file (not its temporary), no temporary."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "o" / "bench_cells" / "cell-0000-article-seed42.json").mkdir(parents=True)
    code, _, err = _main(TINY + ["--bench", "--shard", "0/1", "--seeds", "1", "--out", "o"], capsys)
    line = _one_error_line(err)
    assert code == 1
    assert "cell-0000-article-seed42.json" in line and ".tmp" not in line, line
    assert _temporaries(tmp_path) == []


# 3. Orphans keep the lock and keep writing

def _plotting(out, run):
    return _being_written(out / "plots", "[0-9][0-9]_*.png")()


def _benching(out, run):
    return _progress_shown(run.cwd)()


def _healing(out, run):
    """The heal worker has used enough processor time to be past its imports and inside its (endless) heal:
    counted in processor time, not wall time, so that a loaded machine does not strike too early."""
    return any(_cpu_seconds(pid) > 2.0 for pid in _workers(run))


def _cpu_seconds(pid):
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


KILLED_PARENTS = {  # what the run has started when it is killed: its flags, and when to kill it
    "plot child": (WITH_PLOTS, _plotting),
    "bench workers": (TINY + ["--bench", "--seeds", "2", "--n-batches", "20"], _benching),
    "heal worker mid-heal": (TINY + LONG_STREAM + ["--heal-worker", "process", "--conflict-min", "0",
                                                   "--heal-steps", "1000000"], _healing),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", KILLED_PARENTS)
def test_3_kill_9_of_a_run_leaves_no_child_and_no_busy_out(case, tmp_path, monkeypatch, capsys):
    """kill -9 of the run: within 2 s none of its children is left, and the next run into --out is not busy."""
    flags, moment = KILLED_PARENTS[case]
    out = tmp_path / "o"
    run = _start(flags + ["--out", str(out)], tmp_path)
    children = []
    try:
        _wait_for(lambda: moment(out, run), run)
        children = _descendants(run.pid)
        assert children, "the run had started its children"
        run.kill()
        run.wait(timeout=10)
        left = _left_after(sorted(set(children + _naming(str(tmp_path)))), 2)
        assert left == [], f"{case}: left running: {[_cmdline(pid) for pid, _ in left]}"
        monkeypatch.chdir(tmp_path)
        code, _, err = _main(TINY + ["--out", str(out)], capsys)
        assert code == 0, err
    finally:
        _stop(run)
        _kill(children + _naming(str(tmp_path)))


@pytest.mark.slow
def test_3_sighup_while_plotting_is_status_129_one_line_and_no_temporary(tmp_path):
    """SIGHUP to the run's group while it plots: exit 129, one line, no temporary in plots/ or monitoring_export/."""
    run = _start(WITH_PLOTS + ["--out", "o"], tmp_path, new_session=True)
    try:
        _wait_for(_being_written(tmp_path / "o" / "plots", "[0-9][0-9]_*.png"), run)
        os.killpg(run.pid, signal.SIGHUP)
        run.wait(timeout=10)
        assert run.returncode == 129, _stderr(tmp_path)[-2000:]
        _one_error_line(_stderr(tmp_path))
        assert _temporaries(tmp_path / "o") == []
        assert _left_after(_naming(str(tmp_path)), 2) == []
    finally:
        _stop(run)
        _kill(_naming(str(tmp_path)))


# 4. Double Ctrl-C hangs

@pytest.mark.slow
@pytest.mark.parametrize("presses", [2, 3])
def test_4_repeated_ctrl_c_during_a_bench_stops_it_at_once(presses, tmp_path):
    """Ctrl-C pressed 2 or 3 times 10 ms apart mid-bench: exit 130 within 2 s, one line, no worker left."""
    run = _start(TINY + ["--bench", "--seeds", "6"], tmp_path, new_session=True)
    children = []
    try:
        _wait_for(_progress_shown(tmp_path), run)
        children = _descendants(run.pid)
        for _ in range(presses):
            os.killpg(run.pid, signal.SIGINT)
            time.sleep(0.01)
        pressed = time.monotonic()
        try:
            run.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("the run hangs after Ctrl-C")
        stopped_in = time.monotonic() - pressed
        stderr = _stderr(tmp_path)
        assert "Exception ignored" not in stderr, stderr[-3000:]
        assert "interrupted" in _one_error_line(stderr)
        assert run.returncode == 130
        assert stopped_in < 2, f"stopped {stopped_in:.1f} s after Ctrl-C"
        left = _left_after(children, 1)
        assert left == [], [_cmdline(pid) for pid, _ in left]
    finally:
        _stop(run)
        _kill(children)


# 5. Ctrl-C outside the guarded region

def test_5_ctrl_c_while_a_merge_reads_the_cells_is_status_130_and_one_line(made_cells, tmp_path, monkeypatch, capsys):
    """Ctrl-C while --merge reads the cell files: exit 130 and one line, not a traceback."""
    out = _cells_copy(made_cells, tmp_path)
    monkeypatch.chdir(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(shp, "read_cells", interrupted)
    code, _, err = _main(_merge(out), capsys)
    assert "interrupted" in _one_error_line(err)
    assert code == 130


# 6. Huge integers in JSON

HUGE = "1" + "0" * 4999  # 5,000 digits: more than Python converts from text by default


def test_6_a_threshold_file_with_a_5000_digit_integer_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """--thresholds with a 5,000-digit fidi_window: exit 2, one line."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.json").write_text('{"fidi_window": %s}' % HUGE)
    code, _, err = _main(TINY + ["--thresholds", "t.json"], capsys)
    assert len(_one_error_line(err)) < 500
    assert code == 2


def test_6_a_cell_file_with_a_5000_digit_integer_is_refused_by_merge(made_cells, tmp_path, monkeypatch, capsys):
    """--merge of a cell file holding a 5,000-digit integer: exit 2, one line naming the file."""
    out = _cells_copy(made_cells, tmp_path)
    path = _edit_cell(out, _set_figure("cost", HUGE))
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(_merge(out), capsys)
    line = _one_error_line(err)
    assert path.name in line and len(line) < 500, line[:500]
    assert code == 2


# 8. --async-apply loses events from the exports

ASYNC_RUNS = {  # what the run does with the flags, on tiny models: (added flags, it must roll back)
    "many heals": (["--fraud-ratio", "0.4"], False),  # 40% fraud: heals all along, rollbacks when timing allows
    # heals that overshoot, and so roll back when the timing of the asynchronous heals lets them
    "a heal, then its rollback": (["--heal-steps", "50", "--heal-lr", "0.05", "--n-batches", "2000"], False),
}


@pytest.mark.slow  # heals race the stream in a thread
@pytest.mark.parametrize("case", ASYNC_RUNS)
def test_8_every_async_heal_and_rollback_reaches_metrics_csv(case, tmp_path, monkeypatch, capsys):
    """--async-apply: each heal's version_post and each rollback's restored_version is in a metrics.csv row."""
    flags, rolls_back = ASYNC_RUNS[case]
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(TINY + ["--heal-worker", "thread", "--async-apply", "--drift-strength", "3.5",
                                 "--rollback-f1-drop", "0", "--min-batches-before-rollback", "0",
                                 "--n-batches", "200", *flags], capsys)
    assert code == 0, err
    export = tmp_path / "monitoring_export"
    events = json.loads((export / "events.json").read_text())
    rows = list(csv.DictReader((export / "metrics.csv").read_text().splitlines()))
    heals = [e for e in events if e["type"] == "heal"]
    rollbacks = [e for e in events if e["type"] == "rollback"]
    assert heals and (rollbacks or not rolls_back), f"the run heals{' and rolls back' * rolls_back}"
    versions = {row["version_post"] for row in rows}
    assert [e for e in heals if str(e["version_post"]) not in versions] == [], "heals missing from metrics.csv"
    restored = {(row["batch"], row["restored_version"]) for row in rows if row["state"] == "ROLLED_BACK"}
    assert [e for e in rollbacks if (str(e["batch"]), str(e["restored_version"])) not in restored] == [], \
        "rollbacks missing from metrics.csv"


# 9. Standard output that cannot encode

@pytest.mark.slow
def test_9_an_out_that_stdout_cannot_encode_is_no_traceback(tmp_path):
    """PYTHONIOENCODING=ascii and --out ünï: exit 0 (or one error line), no traceback."""
    status, stderr = _run(TINY + ["--out", str(tmp_path / "ünï")], tmp_path,
                          env={**os.environ, "PYTHONIOENCODING": "ascii"})
    if status != 0:
        _one_error_line(stderr)
    assert "Traceback" not in stderr, stderr[-2000:]
    assert _temporaries(tmp_path) == []


# 10. Resource limits

@pytest.mark.slow
def test_10_sizes_beyond_the_address_space_limit_are_refused_before_any_work(tmp_path):
    """ulimit -v 1200000 and --n-train 5000000: exit 2, one line about memory, before any work."""
    status, stderr = _run(TINY + ["--n-train", "5000000"], tmp_path,
                          limits=[(resource.RLIMIT_AS, 1_200_000 * 1024)])
    line = _one_error_line(stderr)
    assert "memory" in line.lower() or "GiB" in line, line
    assert status == 2
    assert not (tmp_path / "monitoring_export").exists(), "refused before any work"


def test_10_memory_running_out_mid_run_ends_in_one_line(tmp_path, monkeypatch, capsys):
    """A MemoryError during the run: exit 1 and one line about memory."""
    monkeypatch.chdir(tmp_path)

    def out_of_memory(*args, **kwargs):
        raise MemoryError()
    monkeypatch.setattr(shp, "train_models", out_of_memory)
    code, _, err = _main(TINY, capsys)
    assert "memory" in _one_error_line(err).lower()
    assert code == 1


# 11. Stale temporaries in containers

@pytest.mark.slow
def test_11_a_run_killed_as_pid_1_of_a_namespace_has_its_temporaries_removed(tmp_path):
    """Killed with -9 as PID 1 of a PID namespace; the next run, PID 1 of another, removes the leftovers."""
    namespace = ["unshare", "--pid", "--fork", "--mount-proc"]
    if subprocess.run([*namespace, "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a PID namespace here (unshare --pid --fork --mount-proc)")
    export = tmp_path / "o" / "monitoring_export"
    run = _start(TINY + LONG_STREAM + ["--out", "o"], tmp_path, prefix=namespace)
    try:
        _wait_for(_being_written(export, "metrics.csv"), run)
        (pid_1,) = _children(run.pid)  # the script, PID 1 inside
        os.kill(pid_1, signal.SIGKILL)
        run.wait(timeout=10)
    finally:
        _stop(run)
    left = _temporaries(export)
    assert [name for name in left if re.fullmatch(r"\.metrics\.csv\.1\.[a-z0-9_]{8}\.tmp", name)], left
    status, stderr = _run(TINY + ["--out", "o"], tmp_path, prefix=namespace)
    assert status == 0, stderr
    assert _temporaries(tmp_path / "o") == []


def test_11_a_no_plots_run_removes_stale_temporaries_in_plots(tmp_path, monkeypatch, capsys):
    """A --no-plots run into an --out whose plots/ holds a dead run's temporary removes it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / A_STALE_PLOT).write_bytes(b"half a png")
    code, _, err = _main(TINY, capsys)
    assert code == 0, err
    assert _temporaries(tmp_path) == []


# 12. Noise and impossible values

MATPLOTLIB_ENVIRONMENTS = {
    "MPLBACKEND=bogus": {"MPLBACKEND": "bogus"},
    "unwritable HOME": {"HOME": "/proc", "MPLCONFIGDIR": None, "XDG_CONFIG_HOME": None, "XDG_CACHE_HOME": None},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", MATPLOTLIB_ENVIRONMENTS)
def test_12_matplotlib_surroundings_make_no_noise(case, tmp_path):
    """A run that plots under a bogus MPLBACKEND or an unwritable HOME: success and a silent stderr, or one line."""
    env = {**os.environ, **MATPLOTLIB_ENVIRONMENTS[case]}
    env = {k: v for k, v in env.items() if v is not None}
    status, stderr = _run(WITH_PLOTS + ["--out", "o"], tmp_path, env=env)
    if status == 0:
        assert stderr == "", stderr[-2000:]
    else:
        _one_error_line(stderr)
    assert _temporaries(tmp_path) == []


@pytest.mark.parametrize("flag", ["--fidi-threshold", "--rule-threshold", "--conflict-thr"])
def test_12_a_threshold_of_1e308_is_refused_or_runs_without_warnings(flag, tmp_path, monkeypatch, capsys):
    """A threshold of 1e308: refused in one line, or a run with no numpy or runtime warning."""
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = _main(TINY + [flag, "1e308"], capsys)
    if code == 2:
        _one_error_line(err)
    else:
        assert code == 0 and err == "", err
        assert [str(w.message) for w in caught] == []


def test_12_a_vanishing_fraud_ratio_prints_no_nan(tmp_path, monkeypatch, capsys):
    """--shifted-fraud-ratio 5e-324 on the prior scenario: refused in one line, or a report without nan."""
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(TINY + ["--shifted-fraud-ratio", "5e-324", "--scenario", "prior", "--heal-method", "none"],
                           capsys)
    if code == 2:
        _one_error_line(err)
    else:
        assert code == 0, err
        assert [line for line in out.splitlines() if re.search(r"\bnan\b", line, re.I)] == []


@pytest.mark.parametrize("name, value", [("cost", "1e999"), ("accuracy", "-7.5")])
def test_12_merge_refuses_a_cell_with_an_impossible_figure(name, value, made_cells, tmp_path, monkeypatch, capsys):
    """--merge of a cell whose cost is 1e999 or accuracy -7.5: exit 2, one line naming the file."""
    out = _cells_copy(made_cells, tmp_path)
    path = _edit_cell(out, _set_figure(name, value))
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(_merge(out), capsys)
    assert code == 2, f"merged (exit {code})"
    assert path.name in _one_error_line(err)
    assert not (out / "monitoring_export" / "bench.csv").exists()


@pytest.mark.slow
def test_12_heals_abandoned_in_sweep_workers_do_not_abort_them(tmp_path):
    """--seeds 4 with heals timing out at once: no 'terminate called' from a worker that exits under a heal."""
    status, stderr = _run(TINY + ["--seeds", "4", "--heal-worker", "thread", "--heal-timeout", "0.000001",
                                  "--heal-steps", "2000"], tmp_path)
    assert "terminate called" not in stderr, stderr[-2000:]
    assert status == 0, stderr[-2000:]


# 14. Surprises, each fixed or refused in one line

REFUSED = {
    "--out ''": ["--out", ""],
    "--fidi-window 1": ["--fidi-window", "1"],
    "--fidi-window 2": ["--fidi-window", "2"],
    "Arabic-Indic digits": ["--n-batches", "\u0661\u0660"],
    "1_0": ["--n-batches", "1_0"],
}


@pytest.mark.parametrize("case", REFUSED)
def test_14_surprising_values_are_refused_in_one_line(case, tmp_path, monkeypatch, capsys):
    """An empty --out, a FIDI window that can never fire, non-ASCII digits: exit 2, one line, nothing written."""
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(TINY + REFUSED[case], capsys)
    assert code == 2, f"accepted (exit {code})"
    _one_error_line(err)
    assert list(tmp_path.iterdir()) == [], "nothing written"


def test_14_an_out_under_a_missing_folder_is_made_or_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """--out a/b without a: the exports written there, or exit 2 in one line with nothing created."""
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(TINY + ["--out", "a/b"], capsys)
    if code == 0:
        assert err == "" and (tmp_path / "a" / "b" / "monitoring_export" / "metrics.csv").is_file()
    else:
        _one_error_line(err)
        assert code == 2 and list(tmp_path.iterdir()) == []


def test_14_a_shard_resumed_with_other_flags_is_refused(made_cells, tmp_path, monkeypatch, capsys):
    """A shard resumed over cells made with other flags: exit 2 and one line, not a silent mix."""
    out = _cells_copy(made_cells, tmp_path)
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(TINY + ["--bench", "--shard", "0/1", "--seeds", str(SHARD_SEEDS), "--fn-cost", "1",
                                 "--out", str(out)], capsys)
    assert code == 2, f"exit {code}: {err}"
    _one_error_line(err)


def test_14_a_merge_with_fewer_seeds_than_the_shards_is_refused(made_cells, tmp_path, monkeypatch, capsys):
    """--merge with a smaller --seeds than the shards ran: exit 2 and one line, not a table of some seeds."""
    out = _cells_copy(made_cells, tmp_path)
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(TINY + ["--bench", "--merge", "--seeds", "1", "--out", str(out)], capsys)
    assert code == 2, f"exit {code}: {err}"
    _one_error_line(err)
    assert not (out / "monitoring_export" / "bench.csv").exists()


def test_14_one_snapshot_is_one_snapshot(tmp_path, monkeypatch, capsys):
    """A run that never heals keeps 1 registry snapshot and says '1 snapshot', never '1 snapshots'."""
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(TINY + ["--n-batches", "1", "--conflict-min", "1000000", "--fidi-threshold", "1000"],
                           capsys)
    assert code == 0, err
    registry = [line for line in out.splitlines() if line.startswith("Registry:")]
    assert registry and re.match(r"Registry: 1 snapshot\b", registry[0]), registry
    assert "1 snapshots" not in out


def test_14_a_bench_table_never_prints_minus_zero(made_cells):
    """A kappa of -1e-9 is printed as 0.00 (+0.00), never -0.00."""
    rows = []
    for path in sorted((made_cells / "bench_cells").glob("cell-*.json")):
        for row in json.loads(path.read_text())["rows"]:
            row = shp.BenchRow(**{k: math.nan if v is None else v for k, v in row.items()})
            rows.append(dataclasses.replace(row, kappa=-1e-9))
    table = shp.bench_report(rows, shp.Config())
    minus_zero = re.compile(r"(?<![+\d])-0\.0+(?!\d)")  # -0.00 or -0.000, but not a half-width such as +-0.006
    assert any("kappa" in line for line in table)
    assert [line for line in table if minus_zero.search(line)] == []
