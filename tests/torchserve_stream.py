"""A drifted stream of requests to a TorchServe serving the archive of --export-torchserve (README,
"Serve it with TorchServe"): the article's drifted batches, each batch's labels sent back `--delay`
requests later, one line per batch; then the served accuracy beside the unhealed model's on the same rows.

    python tests/torchserve_stream.py --url http://127.0.0.1:8080/predictions/fraud --batches 12 --delay 2
"""
import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import self_healing_production_final as shp  # noqa: E402


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{url} answered {e.code}: {e.read().decode().strip()}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080/predictions/fraud")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--delay", type=int, default=2, help="requests between a batch and its labels")
    args = parser.parse_args()
    cfg = shp.Config()  # the flags the archive was made with: the defaults
    trained = shp.train_models(cfg)  # the same model, unhealed, to compare with
    batches = list(shp.drifted_batches(trained.data.drift, cfg, trained.rng))[:args.batches]
    served, unhealed, waiting = [], [], []  # waiting: (batch number the server gave, labels)
    for X, y in batches:
        answer = post(args.url, {"rows": X.tolist()})
        waiting.append((answer["batch"], y))
        served.append(np.mean((np.array(answer["probabilities"]) > 0.5) == y))
        unhealed.append(np.mean((shp.predict_proba(trained.model, X) > 0.5) == y))
        print(f"batch {answer['batch']:2d}: served version {answer['version']:2d}, accuracy {served[-1]:.2f} "
              f"(unhealed {unhealed[-1]:.2f}), {answer['state']}")
        if len(waiting) > args.delay:
            batch, labels = waiting.pop(0)
            post(args.url, {"batch": batch, "labels": labels.astype(int).tolist()})
    half = len(batches) // 2
    print(f"accuracy over the last {len(batches) - half} batches: served {np.mean(served[half:]):.3f}, "
          f"unhealed {np.mean(unhealed[half:]):.3f}")


if __name__ == "__main__":
    main()
