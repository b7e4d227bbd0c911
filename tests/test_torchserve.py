"""The script as TorchServe's handler, served by a real TorchServe on ports of its own: predictions,
labels sent back as later requests, a heal inside the server, bad requests, the exports, and a stop
that leaves no process behind."""
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import SCRIPT, shp

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/predictions/fraud", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def torchserve(tmp_path):
    """TorchServe serving an archive made by --export-torchserve; stopped, with its workers, however the
    test ends."""
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 11 or newer, and this machine has no java")
    bin_dir = os.path.dirname(sys.executable)
    done = subprocess.run([sys.executable, str(SCRIPT), "--export-torchserve", "store/fraud.mar", "--out", "served"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ports = [free_port() for _ in range(3)]
    (tmp_path / "config.properties").write_text(
        f"inference_address=http://127.0.0.1:{ports[0]}\nmanagement_address=http://127.0.0.1:{ports[1]}\n"
        f"metrics_address=http://127.0.0.1:{ports[2]}\nmodel_store=store\nload_models=fraud.mar\n"
        "default_workers_per_model=1\ndisable_token_authorization=true\n")
    server = subprocess.Popen([os.path.join(bin_dir, "torchserve"), "--start", "--foreground", "--ncs",
                               "--ts-config", "config.properties"], cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]})
    try:
        deadline = time.monotonic() + 180
        while True:  # ready once the model's worker answers
            assert server.poll() is None and time.monotonic() < deadline, "TorchServe did not come up"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/models/fraud", timeout=5) as answer:
                    if json.loads(answer.read())[0]["workers"][0]["status"] == "READY":
                        break
            except (OSError, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.5)
        yield ports[0], tmp_path
    finally:
        stop_group(server)
        for port in ports:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))  # the ports are free again


def stop_group(server: subprocess.Popen) -> None:
    """SIGTERM to TorchServe's frontend and its worker (one session, one process group), SIGKILL to what
    is left after 30 s; returns once no process of the group is left."""
    for sig, seconds in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            server.poll()  # reaps the frontend, whose zombie would keep the group alive
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    raise AssertionError("TorchServe's processes outlived SIGKILL")


def test_torchserve_serves_heals_on_late_labels_refuses_bad_requests_and_exports(torchserve):
    port, folder = torchserve
    cfg = shp.Config()
    data, rng = shp.make_data(cfg)
    drifted = list(shp.drifted_batches(data.drift, cfg, rng))[:12]  # the article's stream: drifted from batch 1
    served, versions = [], []
    for X, y in drifted:
        status, answer = post(port, {"rows": X.tolist()})
        assert status == 200, answer
        served.append((answer["batch"], np.array(answer["probabilities"]), y))
        versions.append(answer["version"])
        if len(served) > 2:  # labels come back two requests later
            batch, _, labels = served[-3]
            status, answer = post(port, {"batch": batch, "labels": labels.astype(int).tolist()})
            assert status == 200 and answer["observed"], answer
    assert [b for b, _, _ in served] == list(range(1, 13))
    assert versions[:3] == [1, 1, 1] and versions[-1] > 1, "a heal inside the server changed what it serves"
    trained = shp.train_models(cfg)  # the same flags and seed: the model the archive holds, unhealed
    unhealed = [np.mean((shp.predict_proba(trained.model, X) > 0.5) == y) for X, y in drifted[-6:]]
    healed = [np.mean((p > 0.5) == y) for _, p, y in served[-6:]]
    assert np.mean(healed) > np.mean(unhealed), (healed, unhealed)

    bad = [b"{not json", {"rows": [[1.0, 2.0]]}, {"rows": [[float("nan")] * 10]}, {"batch": 99, "labels": [1]},
           {"batch": 1, "labels": [1] * 100}, {"batch": 12, "labels": [2] * 100}, ["rows"]]
    for body in bad:
        status, answer = post(port, body)
        assert status == 400 and len(answer["error"].splitlines()) == 1, (body, answer)
    status, answer = post(port, {"rows": drifted[0][0].tolist()})
    assert status == 200 and answer["batch"] == 13, "the worker serves on after bad requests"

    exports = folder / "served" / "monitoring_export"
    with open(exports / "metrics.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["batch"]) for r in rows] == list(range(1, 14))
    events = json.loads((exports / "events.json").read_text(encoding="utf-8"))
    assert any(e["type"] == "heal" for e in events)


def test_the_readmes_torchserve_commands_run_verbatim_and_print_what_it_shows(tmp_path):
    """The README's block, run by bash in a fresh clone (its pip line aside: the test runs in that
    environment already); its output is the README's, figure for figure, but for the clone's path."""
    if shutil.which("java") is None or shutil.which("curl") is None:
        pytest.skip("the README's TorchServe commands need java and curl")
    readme = (SCRIPT.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Serve it with TorchServe", 1)[1]
    commands = section.split("```bash\n", 1)[1].split("```", 1)[0]
    printed = section.split("TorchServe's own log lines left out):\n\n```\n", 1)[1].split("```", 1)[0]
    clone = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(SCRIPT.parent), str(clone)], check=True)
    script = "\n".join(line for line in commands.splitlines() if not line.startswith("pip install"))
    bin_dir = os.path.dirname(sys.executable)
    run = subprocess.Popen(["bash", "-e", "-c", script], cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True,
                           env={**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]})
    try:
        out, err = run.communicate(timeout=300)
    finally:
        subprocess.run([os.path.join(bin_dir, "torchserve"), "--stop"], cwd=clone, capture_output=True, timeout=60)
        stop_group(run)
    assert run.returncode == 0, err
    assert out.replace(str(clone), "/tmp/tsreadme/repo") == printed
