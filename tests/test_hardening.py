"""Hostile input, signals and neighbours: each ends in one clear line and valid files."""
import csv
import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import SCRIPT, shp

TINY = ["--n-train", "600", "--n-test", "200", "--n-drift", "200", "--epochs", "1", "--n-batches", "3",
        "--no-plots", "--quiet"]
LONG_STREAM = ["--n-batches", "200000"]  # long enough to be interrupted mid-stream


def _default_ctrl_c():
    """Python leaves Ctrl-C ignored in a child that starts with it ignored (a non-interactive shell's
    background job does): give the run the disposition a terminal gives it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args, cwd, python_flags=(), **kwargs):
    return subprocess.Popen([sys.executable, *python_flags, str(SCRIPT), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_ctrl_c, **kwargs)


def _run(args, cwd, **kwargs):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, **kwargs)


def _one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in stderr, stderr
    return lines[0]


def _temporaries(folder):
    return sorted(p.name for p in folder.rglob("*.tmp"))


def _valid_exports(folder):
    events = json.loads((folder / "events.json").read_text())
    rows = list(csv.reader((folder / "metrics.csv").read_text().splitlines()))
    assert isinstance(events, list) and len({len(r) for r in rows}) == 1 and len(rows) > 1
    return rows


def _wait_for_stream(out, process, seconds=60):
    """Until the run is streaming: its metrics.csv is being written under a temporary name."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if list((out / "monitoring_export").glob(".metrics.csv.*.tmp")):
            return
        time.sleep(0.05)
    raise AssertionError("the run never started streaming")


@pytest.mark.slow
def test_two_runs_into_one_out_one_completes_the_other_is_refused(tmp_path):
    first = _start(TINY + ["--n-batches", "250", "--out", "x", "--seed", "1"], tmp_path)
    _wait_for_stream(tmp_path / "x", first)
    second = _run(TINY + ["--out", "x", "--seed", "2"], tmp_path)
    assert second.returncode == 2 and "busy" in _one_error_line(second.stderr)
    assert first.wait(timeout=120) == 0, first.stderr.read()
    _valid_exports(tmp_path / "x" / "monitoring_export")
    assert _temporaries(tmp_path) == []


def test_temporary_names_never_collide(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with shp.atomic_file(tmp_path / "metrics.csv"), shp.atomic_file(tmp_path / "metrics.csv"):
            names = [p.name for p in tmp_path.iterdir()]
            assert len(set(names)) == 2 and all(shp.TEMPORARY_NAME.fullmatch(n) for n in names)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_seed_sweep_with_a_process_worker_and_async_apply(tmp_path):
    proc = _run(TINY + ["--seeds", "2", "--heal-worker", "process", "--async-apply"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [line.split(" of ")[0] for line in proc.stderr.splitlines()] == ["progress: sweep 1", "progress: sweep 2"]
    assert len((tmp_path / "monitoring_export" / "seed_sweep.csv").read_text().splitlines()) == 3


@pytest.mark.slow
def test_an_abandoned_heal_does_not_abort_the_exit(tmp_path):
    proc = _run(TINY + ["--n-batches", "2", "--conflict-min", "0", "--heal-steps", "100000", "--heal-worker", "thread",
                        "--heal-timeout", "0.5"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    events = json.loads((tmp_path / "monitoring_export" / "events.json").read_text())
    assert [e["reason"] for e in events if e["type"] == "heal_failed"][0] == "heal did not finish within 0.5 s"


@pytest.mark.slow
@pytest.mark.parametrize("sig, status, worker", [(signal.SIGINT, 130, "process"), (signal.SIGTERM, 143, "thread")])
def test_a_signal_mid_stream_cleans_up(sig, status, worker, tmp_path):
    assert _run(TINY + ["--out", "o"], tmp_path).returncode == 0
    before = (tmp_path / "o" / "monitoring_export" / "metrics.csv").read_bytes()
    run = _start(TINY + LONG_STREAM + ["--out", "o", "--heal-worker", worker], tmp_path, start_new_session=True)
    _wait_for_stream(tmp_path / "o", run)
    time.sleep(0.5 if worker == "thread" else 3)  # a process worker is up and healing
    os.killpg(run.pid, sig) if sig == signal.SIGINT else run.send_signal(sig)  # Ctrl-C reaches the group
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == status
    assert "left as they were" in _one_error_line(stderr)
    assert _temporaries(tmp_path) == []
    assert (tmp_path / "o" / "monitoring_export" / "metrics.csv").read_bytes() == before
    time.sleep(0.5)
    assert subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).stdout == b"", "no worker left"


@pytest.mark.slow
def test_ctrl_c_while_torch_loads_prints_one_line(tmp_path):
    # -X importtime reports each module as its import ends: once torch's modules show up, the script is
    # inside its imports, with hundreds of torch's modules still to come.
    run = _start(TINY, tmp_path, python_flags=["-X", "importtime"])
    for line in run.stderr:
        if re.search(r"\|\s+torch\.", line):
            break
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=60)
    ours = "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith("import time:"))
    assert run.returncode == 130 and "interrupted" in _one_error_line(ours)


@pytest.mark.slow
def test_a_killed_parent_leaves_no_worker_and_no_noise(tmp_path):
    run = _start(TINY + LONG_STREAM + ["--heal-worker", "process"], tmp_path)
    _wait_for_stream(tmp_path, run)
    time.sleep(3)
    run.kill()
    _, stderr = run.communicate(timeout=30)  # returns once the worker, which shares stderr, has gone too
    assert stderr == ""
    assert [p.name for p in tmp_path.rglob("*.tmp")], "kill -9 leaves its temporary files"
    assert _run(TINY, tmp_path).returncode == 0
    assert _temporaries(tmp_path) == [], "the next run removes them"


def test_stale_temporaries_are_told_by_their_writers_lock_not_their_pid(tmp_path):
    """A temporary whose writer is alive (it holds the lock) is kept; one nobody holds goes, whatever
    PID its name carries (in a container every run is PID 1, so a name can name a live process)."""
    dead = tmp_path / ".metrics.csv.1.0123abcd.tmp"
    dead.write_text("")
    (tmp_path / ".notes.tmp").write_text("")  # not ours
    with pytest.raises(KeyboardInterrupt):
        with shp.atomic_file(tmp_path / "events.json"):  # a live writer
            assert shp.remove_stale_temporaries(tmp_path) == 1
            left = sorted(p.name for p in tmp_path.iterdir())
            assert len(left) == 2 and ".notes.tmp" in left and any(shp.TEMPORARY_NAME.fullmatch(n) for n in left)
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == [".notes.tmp"]


@pytest.mark.slow
def test_head_stops_the_printing_not_the_run(tmp_path):
    run = _start(TINY[:-1] + ["--out", "o"], tmp_path)  # the batch table too
    assert run.stdout.readline() and run.stdout.readline()
    run.stdout.close()  # what `| head -2` does
    assert run.wait(timeout=120) == 0
    assert run.stderr.read() == ""
    _valid_exports(tmp_path / "o" / "monitoring_export")


@pytest.mark.slow
def test_full_standard_output_is_one_line_and_exit_1(tmp_path):
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, str(SCRIPT), *TINY], cwd=tmp_path, stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 1 and "No space left" in _one_error_line(proc.stderr)
    _valid_exports(tmp_path / "monitoring_export")


def test_a_full_disk_mid_stream_is_one_line_exit_1_and_leaves_earlier_exports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert shp.main(TINY) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "monitoring_export").iterdir()}
    written = []
    real = shp.Exports.write

    def fills_the_disk(self, record):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "metrics.csv")
        written.append(record)
        real(self, record)
    monkeypatch.setattr(shp.Exports, "write", fills_the_disk)
    capsys.readouterr()
    assert shp.main(TINY + ["--seed", "7"]) == 1
    assert "No space left on device" in _one_error_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in (tmp_path / "monitoring_export").iterdir()} == before
    assert _temporaries(tmp_path) == []


def test_a_discarded_file_goes_even_when_its_last_flush_fails(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with shp.atomic_file(tmp_path / "x.csv") as f:
            real_close = f.close

            def close_on_a_full_disk():
                real_close()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            f.close = close_on_a_full_disk
            raise KeyboardInterrupt  # the run stops: the file is discarded, and its close fails
    assert list(tmp_path.iterdir()) == []


def _deep_folder(tmp, length):
    """A folder that exists, whose path is so long that the exports' paths under it are not allowed."""
    folder = tmp
    while len(str(folder)) < length - 200:
        folder = folder / ("d" * 200)
    folder = folder / ("d" * (length - len(str(folder)) - 1))
    os.makedirs(folder)
    return str(folder)


BAD_OUTS = {
    "proc": lambda tmp: "/proc",
    "too long": lambda tmp: _deep_folder(tmp, os.pathconf(tmp, "PC_PATH_MAX") - 20),
    "a file named plots": lambda tmp: (tmp / "plots").write_text("") or str(tmp),
    "a folder named metrics.csv": lambda tmp: (tmp / "monitoring_export" / "metrics.csv").mkdir(parents=True) or str(tmp),
}


@pytest.mark.parametrize("case", sorted(BAD_OUTS))
def test_an_out_that_cannot_hold_the_exports_is_refused_before_any_work(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = BAD_OUTS[case](tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.setattr(shp, "train_models", lambda *a, **k: pytest.fail("trained before checking --out"))
    args = TINY + ["--out", out]
    assert shp.main(args if case != "a file named plots" else [a for a in args if a != "--no-plots"]) == 2
    assert "cannot write to --out" in _one_error_line(capsys.readouterr().err)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "nothing created"


@pytest.mark.parametrize("flags", [
    ["--drift-strength", "20"], ["--drift-strength", "-20"], ["--fn-cost", "1e9", "--fp-cost", "0"],
    ["--fn-cost", "0", "--fp-cost", "0"], ["--lr", "1", "--heal-lr", "1"], ["--fraud-ratio", "0.999", "--n-drift", "2000"],
])
def test_extreme_accepted_values_give_finite_readable_reports(flags, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert shp.main(TINY + flags) == 0
    text = capsys.readouterr().out
    for word in ("nan", "inf"):
        assert not [line for line in text.splitlines() if word in line.lower().replace("information", "")], word
    numbers = [t for t in (token.strip("%$().;:") for token in text.split()) if re.fullmatch(r"[+-]?[\d,.]+", t)]
    assert numbers and not [n for n in numbers if len(n) > 20], "no number hundreds of digits long"


@pytest.mark.slow
def test_the_recorded_command_reproduces_the_run_from_any_folder(tmp_path):
    """Recorded by a run in one folder, replayed as it stands from another: the script and --out are
    found, a negative value parses, and metrics.csv comes out byte for byte the same."""
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    flags = TINY + ["--seed", "7", "--heal-steps", "9", "--drift-strength=-0.00001", "--out", "a"]
    assert _run(flags, tmp_path / "here").returncode == 0
    written = tmp_path / "here" / "a" / "monitoring_export"
    entry = json.loads((written / "threshold_config.json").read_text())["run"]
    assert entry["config"]["seed"] == 7 and entry["config"]["heal_steps"] == 9
    assert set(entry["versions"]) == {"python", "torch", "numpy"}
    command = shlex.split(entry["command"])
    assert command[:2] == ["python", str(SCRIPT)] and f"--out={tmp_path / 'here' / 'a'}" in command
    first = (written / "metrics.csv").read_bytes()
    (written / "metrics.csv").unlink()
    replay = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path / "elsewhere", capture_output=True,
                            text=True, timeout=120)
    assert replay.returncode == 0, replay.stderr
    assert (written / "metrics.csv").read_bytes() == first


def test_main_can_run_in_a_thread_other_than_the_main_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    codes = []
    worker = threading.Thread(target=lambda: codes.append(shp.main(TINY)))
    worker.start()
    worker.join()
    assert codes == [0]


def test_shards_starting_together_both_make_the_out_folder(tmp_path, monkeypatch):
    """Two shards that find --out missing both create it; the one that comes second is not refused."""
    real_mkdir, made = shp.Path.mkdir, []

    def a_neighbour_was_faster(self, *args, **kwargs):
        if not made:
            made.append(self)
            real_mkdir(self, *args, **kwargs)  # the other shard makes it in between
            raise FileExistsError(17, "File exists", str(self))
        return real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(shp.Path, "mkdir", a_neighbour_was_faster)
    cfg = shp.parse_config(["--bench", "--shard", "0/2", "--out", str(tmp_path / "shared")])
    locks = shp.claim_out(cfg)
    try:
        assert made == [tmp_path / "shared"] and (tmp_path / "shared" / "bench_cells").is_dir()
    finally:
        for fd in locks:
            os.close(fd)


# Third round: no silent wrong result, no unstoppable run, no lock that shuts others out

RUN_ONLY = {"keep_best", "keep_last", "images", "out", "no_plots", "quiet", "article_table", "seeds", "bench",
            "shard", "merge", "drift_strengths",
            "export_torchserve"}  # reviewed: none of them can change a number of a bench cell


def test_every_flag_that_can_change_a_bench_cell_is_in_its_fingerprint():
    """The fingerprint is every field but those that change no number: a new flag is in it unless it says so."""
    fields = {f.name: f for f in shp.dataclasses.fields(shp.Config)}
    assert {name for name, f in fields.items() if f.metadata["role"] == "run"} == RUN_ONLY
    fingerprint = shp.bench_fingerprint(shp.Config())
    assert set(fingerprint) == set(fields) - RUN_ONLY - {"scenario", "heal_method", "supervision", "async_apply"}
    assert {"heal_timeout", "heal_worker"} <= set(fingerprint), "a heal that runs out of time changes a cell"


def test_cells_made_with_another_heal_timeout_are_refused_at_merge_and_at_resume(tmp_path, capsys):
    bench = TINY + ["--bench", "--seeds", "1", "--heal-worker", "thread", "--out", str(tmp_path)]
    assert shp.main(bench + ["--shard", "0/2", "--heal-timeout", "0.000001"]) == 0
    capsys.readouterr()
    assert shp.main(bench + ["--shard", "0/2"]) == 2, "resumed with other flags"
    assert "other flags" in _one_error_line(capsys.readouterr().err)
    assert shp.main(bench + ["--shard", "1/2"]) == 0
    capsys.readouterr()
    assert shp.main(bench + ["--merge"]) == 2
    assert "other flags" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "monitoring_export" / "bench.csv").exists()


def test_a_batch_too_large_for_memory_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert shp.main(TINY + ["--batch-size", "10000000", "--hidden-dim", "1024"]) == 2
    assert "per batch row and hidden unit" in _one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_torchs_allocator_failing_anywhere_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    def allocation_fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 40960000000 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shp, "train_models", allocation_fails)
    assert shp.main(TINY) == 1
    assert "out of memory" in _one_error_line(capsys.readouterr().err)


def test_time_a_run_spends_stopped_does_not_count_against_a_heal(monkeypatch):
    """A wait that overran its slice by seconds (the process was stopped) does not use up the timeout;
    one that did not, does."""
    clock = [0.0]
    monkeypatch.setattr(shp.time, "monotonic", lambda: clock[0])

    def suspended_once(seconds):
        clock[0] += 35.0 if clock[0] == 0.0 else seconds  # the first slice: stopped for 35 s
        return clock[0] > 40.0
    assert shp.running_wait(suspended_once, timeout=30.0), "35 s stopped, then ready 5 s of running later"

    def never(seconds):
        clock[0] += seconds
        return False
    clock[0] = 1.0
    assert not shp.running_wait(never, timeout=30.0) and clock[0] == pytest.approx(31.0)
    assert shp.running_wait(lambda seconds: True, timeout=0), "with no time left, what is there already counts"


@pytest.mark.slow
def test_a_run_suspended_during_a_heal_gives_the_same_metrics(tmp_path):
    """SIGSTOP for longer than --heal-timeout while heals run, then SIGCONT: metrics.csv as uninterrupted."""
    args = TINY + ["--n-batches", "8", "--heal-worker", "thread", "--heal-timeout", "4", "--heal-steps", "600"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert _run(args, tmp_path / "a").returncode == 0
    run = _start(args, tmp_path / "b")
    _wait_for_stream(tmp_path / "b", run)
    time.sleep(0.5)
    run.send_signal(signal.SIGSTOP)
    time.sleep(6)
    run.send_signal(signal.SIGCONT)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    metrics = [(tmp_path / d / "monitoring_export" / "metrics.csv").read_bytes() for d in ("a", "b")]
    assert metrics[0] == metrics[1]


@pytest.mark.slow
@pytest.mark.parametrize("closed, flags, written", [(1, [], "metrics.csv"), (2, ["--seeds", "2"], "seed_sweep.csv")],
                         ids=["stdout", "stderr with seeds"])
def test_a_closed_standard_stream_still_writes_the_files(closed, flags, written, tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), *TINY, *flags], cwd=tmp_path, timeout=120,
                         preexec_fn=lambda: os.close(closed), stdout=subprocess.DEVNULL if closed == 2 else None,
                         stderr=subprocess.DEVNULL if closed == 1 else None)
    assert run.returncode == 0
    assert (tmp_path / "monitoring_export" / written).is_file()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to act as another user")
def test_lock_files_another_user_left_do_not_shut_out_a_user_who_may_write(tmp_path):
    """Root's run left its lock files (0644) in a shared --out; another user who may write every output
    claims it all the same."""
    import tempfile
    shared = tempfile.mkdtemp(dir="/tmp")  # every folder on the way open to the other user
    try:
        os.chmod(shared, 0o1777)
        cfg = shp.Config(out=shared, no_plots=True)
        for fd in shp.claim_out(cfg):  # root's run, which leaves its lock files behind
            os.close(fd)
        os.chmod(os.path.join(shared, "monitoring_export"), 0o777)  # an output the other user may write
        child = os.fork()
        if child == 0:
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                code = 0 if shp.claim_out(cfg) else 4
            except BaseException:
                code = 5
            finally:
                os._exit(code)
        assert os.waitpid(child, 0)[1] >> 8 == 0
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_stop_swallowed_where_python_discards_exceptions_still_stops_the_run(tmp_path, monkeypatch, capsys):
    """SIGTERM handled inside a weakref callback (where Python discards what a handler raises, as in an
    at-fork hook): the run still stops, with one line and 143, not exit 0 with every later stop ignored."""
    import weakref

    class Thing:
        pass

    def callback(ref):
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # the handler runs here, inside the callback
            pass
    real_write, things = shp.Exports.write, []

    def write_then_collect(self, record):
        real_write(self, record)
        if not things:
            thing = Thing()
            things.append(weakref.ref(thing, callback))
            del thing  # the callback runs now
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shp.Exports, "write", write_then_collect)
    assert shp.main(TINY + ["--n-batches", "50"]) == 143
    assert "SIGTERM" in _one_error_line(capsys.readouterr().err)
    assert signal.getsignal(signal.SIGTERM) is not shp._stop, "main leaves the handlers as it found them"


def _mask_at_start():
    global _MASK_AT_START
    _MASK_AT_START = signal.pthread_sigmask(signal.SIG_BLOCK, [])


def _mask_seen():
    return _MASK_AT_START, signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_pool_workers_start_with_stop_signals_held_until_their_setup():
    """A stop in the window between a worker's fork and its set-up waits for worker_setup (which ignores
    Ctrl-C there) instead of landing in the pool's machinery."""
    import multiprocessing
    with shp.WorkerPool(1, mp_context=multiprocessing.get_context("fork"), initializer=_mask_at_start) as pool:
        at_start, _ = pool.submit(_mask_seen).result(timeout=60)
    assert set(shp.STOPPING_SIGNALS) <= set(at_start)
    with shp.process_pool(1, "fork") as pool:
        after_setup = pool.submit(signal.pthread_sigmask, signal.SIG_BLOCK, []).result(timeout=60)
    assert not set(shp.STOPPING_SIGNALS) & set(after_setup)
    assert not set(shp.STOPPING_SIGNALS) & set(signal.pthread_sigmask(signal.SIG_BLOCK, [])), "the parent's mask is back"


@pytest.mark.slow
def test_ctrl_c_while_pool_workers_start_always_stops_in_one_line(tmp_path):
    """Ctrl-C to the whole process group at moments spread over the start of a seed sweep's pool: each
    run ends within 60 s, 130, one line, no child traceback."""
    for delay in (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0):
        run = subprocess.Popen([sys.executable, str(SCRIPT), *TINY, "--seeds", "4", "--out", str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: (_default_ctrl_c(), os.setpgrp()))
        time.sleep(delay)
        os.killpg(run.pid, signal.SIGINT)
        try:
            _, err = run.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            raise AssertionError(f"hung after Ctrl-C at {delay} s")
        if run.returncode == 0:
            continue  # finished before the Ctrl-C
        assert run.returncode == 130, (delay, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (delay, err)


@pytest.mark.parametrize("flag", [["--n-batch", "3"], ["--drift", "3"]], ids=["--n-batch", "--drift"])
def test_an_abbreviated_flag_is_refused_in_one_line_and_main_returns_2(flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert shp.main(TINY + flag) == 2, "imported, main returns its status instead of raising SystemExit"
    assert "unrecognized arguments" in _one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_a_tiny_negative_is_written_as_zero_not_minus_zero():
    assert shp.csv_cell(-1e-9) == "0.000000" and shp.csv_cell(-0.0) == "0.000000" and shp.csv_cell(-0.5) == "-0.500000"


def test_a_threshold_file_with_a_key_twice_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.json").write_text('{"fidi_threshold": 1.0, "fidi_threshold": 5.0}')
    assert shp.main(TINY + ["--thresholds", "t.json"]) == 2
    assert "'fidi_threshold' twice" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("field, value", [("seed", "42.0"), ("fidi_delay", "1e300"), ("ks_false_alarms", "-3.0")])
def test_merge_refuses_a_cell_no_bench_could_write(field, value, tmp_path, capsys):
    bench = TINY + ["--bench", "--seeds", "1", "--out", str(tmp_path)]
    assert shp.main(bench + ["--shard", "0/1"]) == 0
    victim = sorted((tmp_path / "bench_cells").glob("cell-*.json"))[2]
    entry = json.loads(victim.read_text())
    entry["rows"][1][field] = json.loads(value)
    victim.write_text(json.dumps(entry))
    capsys.readouterr()
    assert shp.main(bench + ["--merge"]) == 2
    assert victim.name in _one_error_line(capsys.readouterr().err)


def test_a_merge_while_shards_run_says_so(tmp_path, capsys):
    bench = TINY + ["--bench", "--seeds", "1", "--out", str(tmp_path)]
    cfg = shp.parse_config(bench + ["--shard", "0/2"])
    locks = shp.claim_out(cfg)  # a shard, running
    try:
        assert shp.main(bench + ["--merge"]) == 2
        assert "still writing" in _one_error_line(capsys.readouterr().err)
    finally:
        for fd in locks:
            os.close(fd)


def test_a_shard_beyond_the_limit_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert shp.main(TINY + ["--bench", "--shard", "999999/1000000"]) == 2
    assert "N <= 999999" in _one_error_line(capsys.readouterr().err)


def test_a_run_without_heals_says_so_instead_of_a_blank_lift(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert shp.main(TINY + ["--conflict-min", "1000000", "--fidi-threshold", "1000"]) == 0
    out = capsys.readouterr().out
    assert "no in-sample lift" in out and "lift: - pp" not in out


def test_the_per_batch_line_names_the_version_a_rollback_restored():
    record = shp.BatchRecord(7, state="ROLLED_BACK", action="heal+rollback", restored_version=3)
    assert "ROLLED_BACK v3" in shp.batch_line(record)
    assert "HEALTHY " in shp.batch_line(shp.BatchRecord(8))


def test_the_bench_table_prints_gap_closeds_lopsided_interval_itself():
    spread = shp.Spread(0.74, 0.1, 0.53, 1.17, 0.5, 1.2)
    assert shp._mean_interval(spread, "+.2f") == "+0.74 [+0.53, +1.17]"


def test_the_plots_show_what_they_name(default_run):
    """Plot 7 labels every bar (a bar of 0 too), plot 6 draws v1 = clean, the dashboard's FIDI panel
    starts at 0 so that its threshold is never on the bottom edge."""
    plt = shp.pyplot()
    data = shp.PlotData.of(default_run.run, default_run.evaluation)
    bars = shp.plot_metric_bars(plt, data)
    assert len([t for t in bars.axes[0].texts if t.get_text()]) == 6 * 4
    registry = shp.plot_registry(plt, data)
    assert any(list(line.get_xdata()) == [1, 1] for line in registry.axes[0].lines)
    dashboard = shp.plot_dashboard(plt, data)
    low, high = dashboard.axes[2].get_ylim()
    assert low == 0 and high > default_run.run.cfg.fidi_threshold
    for fig in (bars, registry, dashboard):
        plt.close(fig)


def test_a_bad_value_in_a_threshold_file_is_blamed_on_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.json").write_text('{"fidi_threshold": -5}')
    assert shp.main(TINY + ["--thresholds", "t.json"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "threshold file t.json: fidi_threshold must be in [0, " in line and "--fidi-threshold" not in line


def test_a_heal_thread_started_but_not_yet_running_counts_as_running(monkeypatch):
    """Ctrl-C inside Thread.start leaves the heal thread listed but not alive yet: the exit must still
    leave at once rather than shut the interpreter down under it."""
    class Starting:
        name = "heal"

        def is_alive(self):
            return False
    monkeypatch.setattr(shp.threading, "enumerate", lambda: [Starting()])
    assert shp.heal_thread_exists()
    monkeypatch.setattr(shp.threading, "enumerate", lambda: [])
    assert not shp.heal_thread_exists()


@pytest.mark.slow
def test_ctrl_c_mid_stream_with_thread_heals_never_aborts(tmp_path):
    """Ctrl-C at 20 moments of a stream whose heals run in a thread: 130 and one line each time, never
    SIGABRT from an interpreter shut down under a heal thread."""
    import random
    rng = random.Random(5)
    for trial in range(20):
        out = tmp_path / str(trial)
        out.mkdir()
        run = _start(TINY + LONG_STREAM + ["--heal-worker", "thread", "--heal-steps", "20"], out)
        _wait_for_stream(out, run)
        time.sleep(rng.uniform(0.0, 0.5))
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
        assert run.returncode == 130 and "terminate called" not in err, (trial, run.returncode, err[-500:])
        _one_error_line(err)


def test_a_bench_stopped_while_writing_leaves_the_previous_outputs_whole(tmp_path, monkeypatch, capsys):
    """Ctrl-C after bench.csv and the threshold file are written but before the figure is: neither is put
    in place, so --out keeps the previous bench's outputs together, as the message says."""
    bench = TINY + ["--bench", "--seeds", "1", "--out", str(tmp_path)]
    assert shp.main(bench) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "monitoring_export").iterdir()}
    real_write_figure = shp.write_figure

    def interrupted(*args):
        real_write_figure(*args)
        raise KeyboardInterrupt
    monkeypatch.setattr(shp, "write_figure", interrupted)
    assert shp.main([flag for flag in bench if flag != "--no-plots"] + ["--fn-cost", "900"]) == 130
    assert {p: p.read_bytes() for p in (tmp_path / "monitoring_export").iterdir()} == before
    assert not (tmp_path / "plots" / "bench.png").exists()
    assert _temporaries(tmp_path) == []


def test_a_run_stopped_while_plotting_leaves_the_previous_exports_whole(tmp_path, monkeypatch, capsys):
    """The article run's exports and plots go in place together: Ctrl-C while the plots are drawn leaves
    the previous run's metrics.csv, events.json and threshold file, not this run's beside old plots."""
    monkeypatch.chdir(tmp_path)
    with_plots = [flag for flag in TINY if flag != "--no-plots"]
    assert shp.main(with_plots) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "monitoring_export").iterdir()}
    plots_before = {p.name: p.read_bytes() for p in (tmp_path / "plots").iterdir()}
    real_draw = shp.draw_plots

    def stopped_midway(data, directory, names):
        real_draw(data, directory, names[:1])
        raise KeyboardInterrupt
    monkeypatch.setattr(shp, "draw_plots", stopped_midway)
    assert shp.main(with_plots + ["--seed", "7"]) == 130
    assert {p.name: p.read_bytes() for p in (tmp_path / "monitoring_export").iterdir()} == before
    assert {p.name: p.read_bytes() for p in (tmp_path / "plots").iterdir()} == plots_before
    assert _temporaries(tmp_path) == []
