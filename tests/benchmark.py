"""Benchmarks of the heal engine and the stream (not collected by pytest).

    python tests/benchmark.py                 # latency, heal duration, stream scaling (about 3 minutes)
    python tests/benchmark.py --sizes 100000  # stream scaling at 100,000 batches (about 20 minutes)
    python tests/benchmark.py --startup       # the default run's wall time against the import floor
    python tests/benchmark.py --bench         # the full scenario bench: wall time and peak memory
    python tests/benchmark.py --bench --bench-batches 200   # the same at 200 batches a stream
    python tests/benchmark.py --bench-profile  # where one bench seed's time goes (--bench-batches too)
    python tests/benchmark.py --sweep         # --seeds 10 --no-plots: wall time and CPU time
    python tests/benchmark.py --images        # ResNet-18 speed per image, and --images: wall time and peak memory
    python tests/benchmark.py --images --images-flags "--resnet-width 64 --seeds 1 --corruptions contrast"

Every figure below is measured by this script and printed; nothing is assumed.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "self_healing_production_final.py"


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def latency(n_calls: int) -> None:
    """Predict latency idle and while heals run back to back, for both heal workers.

    The serving loop answers one request per call and, between calls, adopts a
    finished heal (the swap) and starts the next one, as the stream does at its
    batch boundaries. The time that adoption takes is reported on its own line.
    Idle and busy samples come from ten alternating blocks each.
    """
    sys.path.insert(0, str(ROOT))
    import torch
    import self_healing_production_final as shp
    torch.set_num_threads(1)  # one core serves; the other heals (worker process) or idles
    cfg = shp.Config(quiet=True)
    trained = shp.train_models(cfg)
    X, y = trained.data.drift.X[:cfg.batch_size], trained.data.drift.y[:cfg.batch_size]
    job = shp.HealJob(1, shp.HealBatch(X, y, shp.rule_labels(X, cfg)), 2.0, None)
    ms = lambda s: f"{1000 * s:.3f} ms"  # noqa: E731
    print(f"predict latency: {cfg.batch_size} rows per call, {n_calls} calls per sample, 1 torch thread serving")
    for kind, heals_class in (("thread", shp.ThreadHeals), ("process", shp.ProcessHeals)):
        model = shp.Adapted(shp.copy.deepcopy(trained.model), "reflexive")
        healer = heals_class(model, cfg)
        healer.start(job)
        model.serve(healer.result(120).layer)  # start the worker before timing anything
        predict, adopt, heals = [], [], []

        def serve(n, healing):
            for _ in range(n):
                if healing and not healer.busy():
                    start = time.perf_counter()
                    result = healer.result(120)
                    model.serve(result.layer)
                    healer.start(job)
                    adopt.append(time.perf_counter() - start)
                    heals.append(result.seconds)
                start = time.perf_counter()
                shp.predict_proba(model, X)
                predict.append(time.perf_counter() - start)

        serve(200, healing=False)  # warm-up
        idle, busy = [], []
        for _ in range(10):  # alternate idle and busy blocks, so that drift in the machine's speed cancels
            predict.clear()
            serve(n_calls // 10, healing=False)
            idle += predict
            predict.clear()
            healer.start(job)
            serve(n_calls // 10, healing=True)
            busy += predict
            healer.result(120)
        healer.close()
        print(f"  heals in a {kind}:")
        print(f"    idle:                p50 {ms(percentile(idle, 50))}  p99 {ms(percentile(idle, 99))}")
        print(f"    heals back to back:  p50 {ms(percentile(busy, 50))}  p99 {ms(percentile(busy, 99))}")
        print(f"    p99 ratio (busy / idle): {percentile(busy, 99) / percentile(idle, 99):.2f}")
        print(f"    heal duration ({cfg.heal_steps} steps, {len(heals)} heals): "
              f"p50 {ms(percentile(heals, 50))}  p99 {ms(percentile(heals, 99))}")
        print(f"    adopting a finished heal between two calls: "
              f"p50 {ms(percentile(adopt, 50))}  p99 {ms(percentile(adopt, 99))}")


def stream_child(n_batches: int) -> None:
    """Runs in a fresh process: one stream of n batches, plots off; prints JSON."""
    sys.path.insert(0, str(ROOT))
    import self_healing_production_final as shp
    shp.use_one_torch_thread()  # as the script runs it
    cfg = shp.Config(n_batches=n_batches, quiet=True, no_plots=True)
    trained = shp.train_models(cfg)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = shp.serve_and_write(shp.Run(cfg, trained, keep_records=False), lambda line: None, Path(out))
        seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": n_batches, "seconds": seconds, "peak_mib": peak_kib / 1024,
                      "heals": result.log.counts["heal"], "rollbacks": result.log.counts["rollback"],
                      "retained": len(result.registry.snapshots), "saved": result.registry.saved}))


def stream_scaling(sizes) -> None:
    print("stream, plots off, one fresh process per size (peak = the process's max RSS):")
    print(f"  {'batches':>8}  {'s/batch':>9}  {'total s':>8}  {'peak MiB':>8}  {'heals':>6}  {'rollbacks':>9}  "
          f"{'snapshots kept/saved':>20}")
    peaks = {}
    for n in sizes:
        proc = subprocess.run([sys.executable, __file__, "--child", str(n)], capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        peaks[n] = r["peak_mib"]
        print(f"  {n:>8}  {1000 * r['seconds'] / n:>6.3f} ms  {r['seconds']:>8.1f}  {r['peak_mib']:>8.1f}  "
              f"{r['heals']:>6}  {r['rollbacks']:>9}  {str(r['retained']) + '/' + str(r['saved']):>20}")
    if len(sizes) > 1:
        print(f"  peak at {sizes[-1]} vs {sizes[0]} batches: {peaks[sizes[-1]] / peaks[sizes[0]]:.3f}x")


def startup(repeats: int) -> None:
    """Median of paired runs: the default run (plots and exports) and the import floor."""
    env = {**os.environ, "MPLBACKEND": "Agg"}

    def timed(args, cwd):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start

    floor, full, no_plots = [], [], []
    with tempfile.TemporaryDirectory() as cwd:
        timed(["-c", "import torch, matplotlib.pyplot"], cwd)  # warm the file cache
        for _ in range(repeats):
            floor.append(timed(["-c", "import torch, matplotlib.pyplot"], cwd))
            full.append(timed([str(SCRIPT)], cwd))
            no_plots.append(timed([str(SCRIPT), "--no-plots"], cwd))
    f, a, b = (statistics.median(x) for x in (floor, full, no_plots))
    print(f"median of {repeats} paired runs:")
    print(f"  import floor (python -c 'import torch, matplotlib.pyplot'): {f:.2f} s")
    print(f"  default run (8 plots, 3 exports):  {a:.2f} s  = {a / f:.2f} x floor")
    print(f"  --no-plots:                        {b:.2f} s  = {b / f:.2f} x floor")


def _tree_rss_mib(root: int) -> float:
    """Resident memory of a process and all its descendants, from /proc, in MiB."""
    parents, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return sum(rss.get(pid, 0) for pid in tree) / 2 ** 20


def timed_run(name: str, flags: list, quiet: bool = False, keep: str = None) -> float:
    """A run of the script with plots off, timed, its memory sampled every 20 ms across all its processes;
    its wall time in seconds. keep: an --out folder for its outputs (else a temporary one)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = keep or scratch
        args = [sys.executable, str(SCRIPT), *flags, "--no-plots", "--out", out]
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, _tree_rss_mib(proc.pid))
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        output = proc.stdout.read()
        if proc.returncode:
            raise SystemExit(f"{' '.join(flags)} failed with exit status {proc.returncode}")
    if not quiet:
        print(output.splitlines()[0])
        print(f"{name} ({' '.join(flags[1:])}), plots off, {os.cpu_count()} cores: "
              f"{seconds:.1f} s wall, peak memory of all its processes together {peak:.0f} MiB")
    return seconds


def bench_against_default_run(n_batches: int, keep: str = None, repeats: int = 3) -> None:
    """The bench's wall time beside the default run's (both with plots off), measured one after the other."""
    default = statistics.median(timed_run("default run", [], quiet=True) for _ in range(repeats))
    bench = timed_run("scenario bench", ["--bench", "--n-batches", str(n_batches)], keep=keep)
    print(f"default run, plots off (median of {repeats}): {default:.1f} s wall; "
          f"the bench takes {bench / default:.1f} times that")


def resnet_speed(widths=(8, 16, 64), batch: int = 128, threads=(1, 2)) -> None:
    """Milliseconds per 32x32 image of the script's ResNet18: a training step (forward, backward, Adam) and
    inference, by width and torch threads, each the best of three timings after a warm-up."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F
    import self_healing_production_final as shp
    X, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for width in widths:
            model = shp.ResNet18(10, width)
            optimizer = shp.Adam(model.parameters(), lr=1e-3)

            def train_step():
                optimizer.zero_grad()
                F.cross_entropy(model(X), y).backward()
                optimizer.step()

            def infer():
                with torch.inference_mode():
                    model(X)
            timings = {}
            for name, step, mode in (("train", train_step, model.train), ("infer", infer, model.eval)):
                mode()
                step()
                runs = []
                for _ in range(3):
                    start = time.perf_counter()
                    step()
                    runs.append(time.perf_counter() - start)
                timings[name] = 1000 * min(runs) / batch
            print(f"ResNet18 width {width:2d}, {n_threads} thread{'s' if n_threads > 1 else ''}, batches of {batch}: "
                  f"train {timings['train']:.2f} ms, infer {timings['infer']:.2f} ms per image")


def bench_seed_profile(n_batches: int) -> None:
    """Where one seed of the bench spends its time, in one process: its training, its detectors' false
    alarms, and over its seven streams the detectors' delays, the ceilings and each method's stream."""
    sys.path.insert(0, str(ROOT))
    import self_healing_production_final as shp
    shp.use_one_torch_thread()
    cfg = shp.bench_config(shp.Config(n_batches=n_batches))
    seconds = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        return result
    trained = timed("training (both models)", shp.train_models, cfg)
    timed("false alarms (1,000 stationary batches)", shp.false_alarms, cfg, trained)
    runs = [(name, None) for name in shp.HEAL_METHODS if name not in shp.SELECTORS]
    runs += [(name, s) for name, s in shp.CANDIDATES.items() if s not in (None, cfg.supervision)]
    for scenario in shp.SCENARIOS:
        timed("detection delays", shp.detection_delays, scenario, cfg, trained)
        timed("Bayes ceilings", shp.scenario_ceiling, scenario, cfg)
        batches = list(shp.scenario_batches(scenario, cfg, trained))
        for name, supervision in runs:
            method = shp.make_method(name, trained, shp.dataclasses.replace(cfg, supervision=supervision or
                                                                             cfg.supervision))
            timed(f"stream: {name}" + (f" ({supervision}, for select)" if supervision else ""),
                  shp.serve_stream, method, batches)
    total = sum(seconds.values())
    print(f"one bench seed, --n-batches {n_batches}, one process: {total:.1f} s")
    for name, s in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"  {name:<45} {s:6.1f} s  {100 * s / total:4.1f}%")


def sweep(seeds: int) -> None:
    """A seed sweep with plots off, in a fresh process: wall time, and CPU time of it and its workers."""
    with tempfile.TemporaryDirectory() as out:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, str(SCRIPT), "--seeds", str(seeds), "--no-plots", "--out", out],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"--seeds {seeds} --no-plots, {os.cpu_count()} cores: {seconds:.1f} s wall (imports included), "
          f"{cpu:.1f} s CPU in all its processes")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000,
                        help="predict calls per latency sample (enough for heals to finish during it)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--startup", action="store_true", help="only the startup benchmark")
    parser.add_argument("--bench", action="store_true", help="only the scenario bench (5 seeds)")
    parser.add_argument("--bench-batches", type=int, default=25, help="stream batches of the bench's scenarios")
    parser.add_argument("--bench-profile", action="store_true", help="where one bench seed's time goes")
    parser.add_argument("--keep", metavar="DIR", help="with --bench: the --out of the bench run, kept")
    parser.add_argument("--sweep", action="store_true", help="only a sweep of 10 seeds")
    parser.add_argument("--images", action="store_true", help="only the ResNet-18's speed and an --images run")
    parser.add_argument("--images-flags", default="", help="flags added to that --images run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return stream_child(args.child)
    if args.startup:
        return startup(args.repeats)
    if args.bench_profile:
        return bench_seed_profile(args.bench_batches)
    if args.bench:
        return bench_against_default_run(args.bench_batches, args.keep)
    if args.images:
        resnet_speed()
        return timed_run("images", ["--images", *args.images_flags.split()])
    if args.sweep:
        return sweep(10)
    latency(args.calls)
    stream_scaling(args.sizes)


if __name__ == "__main__":
    main()
