"""Self-healing neural network under data drift, reproduced and measured honestly.

The experiment of the article "Self-Healing Neural Networks in PyTorch: Fix Model
Drift in Real Time Without Retraining", as one script:

    data -> two models -> drift detection (FIDI, symbolic rule) -> healing of a
    small adapter (ReflexiveLayer) -> registry, health monitor, rollback ->
    evaluation -> monitoring exports -> plots

With default flags it reproduces the article's table exactly (torch 2.13, CPU).
Beside every headline it prints the honest twin: prequential lift, a fresh
holdout, trivial and Bayes-optimal references, costs and forgetting.

The file reads in six parts. Part I is the article itself and can be read alone;
II measures it honestly and asks which kinds of drift healing helps with (--bench);
III is the production heal engine; IV the console table, exports and plots; V the
speed work; VI the command line.

Run `python self_healing_production_final.py --help` for every knob.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import secrets
import shlex
import signal
import stat
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, TimeoutError as FuturesTimeoutError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

try:
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except KeyboardInterrupt:  # Ctrl-C while torch loads (a second or two): one line, as at any other moment
    if __name__ != "__main__":
        raise
    sys.stderr.write("\nself_healing_production_final.py: error: interrupted\n")
    raise SystemExit(130) from None


# Part I. The article
#
# The experiment as the article runs it, in the order the data flows: configuration,
# data, models, training, metrics, detection, healing, registry and health, the stream,
# and the experiment that ties them together. Read alone, it is the whole article.
# It uses only what it defines, except where a comment names a later part.

V14 = 7  # column index of the drifting feature "V14"
N_FEATURES = 10
FRAUD_V14 = (-2.5, 0.8)  # mean and std of fraud rows' V14, which never drifts
NORMAL_V14_STD = 1.0     # normal rows' V14: mean 0, or -drift_strength when drifted
MIN_FIDI_ENTRIES = 3  # the article computes z only once the window holds 3 means
MIN_HEALTH_ENTRIES = 3  # and judges health only on 3 or more entries
SUPERVISION_MODES = ("labels", "rules", "delayed")
HEAL_WORKERS = ("thread", "process")
SCENARIOS = ("article", "stationary", "offset", "gradual", "recurring", "prior", "covariate")  # Part II
HEAL_METHODS = ("none", "heal", "restandardize", "tent", "em-prior", "rethreshold", "retrain")  # Part II
STATES = ("HEALTHY", "DRIFTING", "HEALING", "ROLLED_BACK", "QUARANTINED")
BENCH_SEEDS = 5  # seeds of a --bench run when --seeds is not given


# -- Configuration

@dataclass(frozen=True)
class Check:
    """A flag's validation rule: a test on its value and the words that name it."""
    ok: Callable[[object], bool]
    words: str


def at_least(low) -> Check:
    return Check(lambda v: v >= low, f"at least {low}")


def within(low, high) -> Check:
    return Check(lambda v: low <= v <= high, f"between {low:,} and {high:,}")


def parse_shard(text: str) -> Optional[tuple[int, int]]:
    """'K/N' -> (K, N) when 0 <= K < N, else None."""
    match = re.fullmatch(r"(\d{1,6})/(\d{1,6})", text)
    k, n = (int(match[1]), int(match[2])) if match else (0, 0)
    return (k, n) if k < n else None


LEARNING_RATE = Check(lambda v: 0 < v <= 1, "in (0, 1]")  # Adam moves each weight by at most this per step
MAX_COUNT = 1_000_000  # windows, steps, periods, delays: beyond this a run would never end or never fill them
SEED_MAX = 2 ** 32 - 1  # numpy's RandomState takes seeds up to this
SHARE = Check(lambda v: 0 < v < 1, "between 0 and 1 (exclusive)")
WEIGHT = Check(lambda v: 0 <= v <= 1, "between 0 and 1")


def _flag(default, help_text: str, check: Check = None, choices: tuple = None, threshold: bool = False,
          role: str = "experiment"):
    """A config field that becomes one command-line flag.

    check:     the rule its value must pass (Part VI applies it);
    threshold: written to threshold_config.json and read back by --thresholds;
    role:      "experiment" (it can change the article's figures), "cost" (it prices them),
               or "run" (where and how the run goes: it changes no number).
    """
    return field(default=default, metadata=dict(help=help_text, check=check, choices=choices, threshold=threshold,
                                                 role=role))


@dataclass(frozen=True)
class Config:
    """The whole configuration. Each field is a kebab-case command-line flag."""

    # run
    seed: int = _flag(42, "seed of numpy's and torch's streams", within(0, SEED_MAX))
    out: str = _flag(".", "directory that receives plots/ and monitoring_export/", role="run")
    no_plots: bool = _flag(False, "skip the 8 plots", role="run")
    quiet: bool = _flag(False, "do not print the per-batch table", role="run")
    seeds: int = _flag(1, f"run this many seeds (seed, seed+1, ...) and print their spread ({BENCH_SEEDS} "
                       "with --bench unless given)", within(1, 10_000), role="run")
    bench: bool = _flag(False, "run every scenario against every method over --seeds (5 unless given) and "
                        "print when self-healing helps", role="run")
    shard: str = _flag("", "with --bench, run only the cells i with i mod N = K, given as K/N; one file per cell",
                       Check(lambda v: v == "" or parse_shard(v) is not None, "K/N with 0 <= K < N"), role="run")
    merge: bool = _flag(False, "with --bench, collect the cell files of all shards into the table, CSV and plot",
                        role="run")
    # data
    n_train: int = _flag(5000, "training rows (clean)", at_least(1))
    n_test: int = _flag(1000, "clean test rows", at_least(1))
    n_drift: int = _flag(1000, "drifted rows the stream samples from", at_least(1))
    fraud_ratio: float = _flag(0.15, "share of fraud rows in every set, in (0, 1)", SHARE)
    drift_strength: float = _flag(2.2, "shift of normal rows' V14 mean in the drifted set",
                                  within(-20, 20))
    # model and training
    hidden_dim: int = _flag(64, "width of the hidden layers", within(1, 100_000))
    epochs: int = _flag(20, "training epochs", within(1, MAX_COUNT))
    batch_size: int = _flag(100, "rows per training batch and per stream batch", within(1, 10_000_000))
    lr: float = _flag(1e-3, "Adam learning rate for training", LEARNING_RATE)
    # detection
    fidi_window: int = _flag(10, "batch means in the FIDI window (z needs 3 of them)", within(1, MAX_COUNT),
                            threshold=True)
    fidi_threshold: float = _flag(1.0, "drifting when the FIDI z-score exceeds this", threshold=True)
    rule_threshold: float = _flag(-1.5, "the symbolic rule calls a row fraud when V14 < this", threshold=True)
    conflict_thr: float = _flag(0.30, "a conflict: rule says fraud, model probability below this", threshold=True)
    conflict_min: int = _flag(5, "heal when a batch has at least this many conflicts", within(0, 10 ** 9),
                            threshold=True)
    # stream and heal
    n_batches: int = _flag(25, "stream batches", within(1, 10 ** 9))
    heal_steps: int = _flag(5, "Adam steps per heal", within(0, MAX_COUNT))
    heal_lr: float = _flag(0.003, "Adam learning rate of the heal", LEARNING_RATE)
    alpha: float = _flag(0.70, "weight of the supervised BCE term, in [0, 1]", WEIGHT)
    lambda_lag: float = _flag(0.80, "weight of the rule BCE term, times (1 - alpha)", within(0, 1e6))
    entropy_weight: float = _flag(0.03, "weight of the mean binary entropy term", within(0, 1e6))
    supervision: str = _flag("labels", "what the heal learns from: labels (the article), "
                             "rules (no ground truth anywhere), delayed (labels K batches late)",
                             choices=SUPERVISION_MODES)
    label_delay: int = _flag(3, "K for --supervision delayed: batch i's labels usable from batch i+K",
                            within(0, MAX_COUNT))
    heal_worker: str = _flag("thread", "where heals run: thread (starts at once) or process (no "
                             "interpreter lock shared with inference; about 2 s to start)",
                             choices=HEAL_WORKERS, role="run")
    async_apply: bool = _flag(False, "do not wait for a heal: serve on and apply it at the first batch "
                              "boundary after it finishes (timing-dependent, so not reproducible)")
    heal_timeout: float = _flag(30.0, "seconds to wait for one heal before rejecting it",
                                Check(lambda v: 0 < v <= 86_400, "in (0, 86,400]: at most a day"),
                                role="run")
    # scenarios and the methods measured against self-healing (Part II)
    scenario: str = _flag("article", "which drift the stream has: " + ", ".join(SCENARIOS), choices=SCENARIOS)
    heal_method: str = _flag("heal", "what serves the stream: " + ", ".join(HEAL_METHODS), choices=HEAL_METHODS)
    shifted_fraud_ratio: float = _flag(0.40, "fraud share of the prior scenario's stream, in (0, 1)", SHARE)
    recurring_period: int = _flag(5, "batches the recurring scenario's drift stays on, then off",
                               within(1, MAX_COUNT))
    covariate_tilt: float = _flag(0.5, "covariate scenario: rows weighted by exp(-tilt * V14)", within(0, 5))
    adapt_window: int = _flag(5, "recent batches that restandardize, em-prior, rethreshold and retrain use",
                              within(1, MAX_COUNT))
    tent_lr: float = _flag(1e-3, "Adam learning rate of tent's one step per batch", LEARNING_RATE)
    tent_reset_entropy: float = _flag(0.02, "tent resets the adapter when a batch's mean entropy falls below this",
                                      within(0, 1))
    retrain_steps: int = _flag(50, "Adam steps of each refit of the head by retrain", within(1, MAX_COUNT))
    retrain_lr: float = _flag(0.01, "Adam learning rate of retrain's refits", LEARNING_RATE)
    # registry, health and rollback
    rollback_f1_drop: float = _flag(0.08, "roll back when the window's mean F1 falls this far below baseline",
                                    at_least(0), threshold=True)
    rollback_acc_drop: float = _flag(0.10, "roll back when the window's mean accuracy falls this far below "
                                     "baseline", at_least(0), threshold=True)
    health_window: int = _flag(5, "batches in the health monitor's window", within(1, MAX_COUNT),
                               threshold=True)
    min_batches_before_rollback: int = _flag(3, "health updates needed before a rollback", within(0, 10 ** 9),
                                             threshold=True)
    keep_best: int = _flag(5, "post-heal snapshots with the best F1 kept in the registry", within(1, MAX_COUNT),
                           role="run")
    keep_last: int = _flag(10, "most recent snapshots kept in the registry", within(1, MAX_COUNT),
                           role="run")
    # costs
    fn_cost: float = _flag(5000.0, "cost of a missed fraud", within(0, 1e9), role="cost")
    fp_cost: float = _flag(200.0, "cost of a false alarm", within(0, 1e9), role="cost")


class ConfigError(ValueError):
    """A user mistake (flags, a threshold file, bench cell files): reported in one line, exit status 2."""


# -- Data

@dataclass(frozen=True)
class Dataset:
    X: np.ndarray  # float32, (n, 10)
    y: np.ndarray  # float32, (n,), 1 = fraud


@dataclass(frozen=True)
class RowLaw:
    """The generator's law of a set of rows: each class's V14 (mean, std), the fraud share, and a
    shift of the nine features that carry no signal (the same in both classes)."""
    normal_v14: tuple[float, float]
    fraud_v14: tuple[float, float]
    fraud_share: float
    noise_shift: float = 0.0


def article_law(cfg: Config, drifted: bool) -> RowLaw:
    """The article's data: normal V14 centred on 0, or on -drift_strength when drifted; fraud never moves."""
    return RowLaw((-cfg.drift_strength if drifted else 0.0, NORMAL_V14_STD), FRAUD_V14, cfg.fraud_ratio)


def draw_rows(rng: np.random.RandomState, n_normal: int, n_fraud: int, law: RowLaw) -> Dataset:
    """Draw rows in the article's order: normal V14, normal rest, fraud V14, fraud rest, shuffle."""
    v14_normal = rng.normal(*law.normal_v14, n_normal)
    rest_normal = rng.randn(n_normal, N_FEATURES - 1) + law.noise_shift
    v14_fraud = rng.normal(*law.fraud_v14, n_fraud)
    rest_fraud = rng.randn(n_fraud, N_FEATURES - 1) + law.noise_shift

    def assemble(v14, rest):
        return np.column_stack([rest[:, :V14], v14, rest[:, V14:]])

    X = np.vstack([assemble(v14_normal, rest_normal), assemble(v14_fraud, rest_fraud)]).astype(np.float32)
    y = np.concatenate([np.zeros(n_normal), np.ones(n_fraud)]).astype(np.float32)
    order = rng.permutation(n_normal + n_fraud)
    return Dataset(X[order], y[order])


def make_dataset(n: int, cfg: Config, rng: np.random.RandomState, drifted: bool) -> Dataset:
    """n rows of the article's data, int(n * fraud_ratio) of them fraud."""
    n_fraud = int(n * cfg.fraud_ratio)
    return draw_rows(rng, n - n_fraud, n_fraud, article_law(cfg, drifted))


@dataclass(frozen=True)
class Data:
    train: Dataset
    test: Dataset      # clean
    drift: Dataset     # the stream samples from it; the article's final evaluation set
    holdout: Dataset   # drifted too, never seen by the stream


def make_data(cfg: Config) -> tuple[Data, np.random.RandomState]:
    """The article's three sets from one stream, plus a holdout from a stream of its own.

    Returns the main stream too: the stream's batch indices continue it.
    """
    rng = np.random.RandomState(cfg.seed)
    train_set = make_dataset(cfg.n_train, cfg, rng, drifted=False)
    test_set = make_dataset(cfg.n_test, cfg, rng, drifted=False)
    drift_set = make_dataset(cfg.n_drift, cfg, rng, drifted=True)
    # A separate generator, so that adding the holdout leaves the article's draws untouched.
    holdout = make_dataset(cfg.n_drift, cfg, np.random.RandomState([cfg.seed, 1]), drifted=True)
    return Data(train_set, test_set, drift_set, holdout), rng


def v14_summary(ds: Dataset, cfg: Config) -> str:
    """V14's mean and the share of rows the rule would call fraud: how far the set has drifted."""
    v = ds.X[:, V14]
    return f"{v.mean():.3f}, {100 * np.mean(v < cfg.rule_threshold):.1f}%"


# -- Models

class ReflexiveLayer(nn.Module):
    """Residual adapter x + scale * adapter(x): the only part that heals."""

    def __init__(self, dim: int):
        super().__init__()
        self.adapter = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))
        self.scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, x):
        return x + self.scale * self.adapter(x)


class SelfHealingMLP(nn.Module):
    """Frozen backbone and head around a swappable ReflexiveLayer.

    A heal publishes a whole new ReflexiveLayer object by assigning `reflexive`;
    forward reads that attribute once, so a prediction always uses one version.
    """

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(N_FEATURES, hidden_dim), nn.ReLU(),
                                      nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
        self.reflexive = ReflexiveLayer(hidden_dim)
        self.head = nn.Sequential(nn.Linear(hidden_dim, 1), nn.Sigmoid())

    def forward(self, x):
        layer = self.reflexive  # one read: the version this prediction uses
        return self.head(layer(self.backbone(x)))

    def freeze_backbone_and_head(self):
        for p in [*self.backbone.parameters(), *self.head.parameters()]:
            p.requires_grad_(False)


class BaselineMLP(nn.Module):
    """The same MLP without an adapter: the no-healing model and the frozen shadow."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(N_FEATURES, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, 1), nn.Sigmoid())

    def forward(self, x):
        return self.net(x)


def predict_proba(model: nn.Module, X: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(X)).squeeze(1).numpy()


# -- Training

def epoch_orders(cfg: Config) -> list:
    """One torch.randperm(n_train) per epoch, from torch's global stream."""
    return [torch.randperm(cfg.n_train) for _ in range(cfg.epochs)]


def train(model: nn.Module, data: Dataset, cfg: Config, orders: list) -> None:
    """Adam on mean BCE, walking each epoch's order in slices of batch_size."""
    optimizer = Adam(model.parameters(), lr=cfg.lr)  # torch.optim.Adam's arithmetic; Part V says why
    X, y = torch.from_numpy(data.X), torch.from_numpy(data.y).unsqueeze(1)
    for perm in orders:
        for start in range(0, len(X), cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            optimizer.zero_grad()
            F.binary_cross_entropy(model(X[idx]), y[idx]).backward()
            optimizer.step()


@dataclass
class Trained:
    """Data and the two trained networks: everything before the stream."""
    data: Data
    rng: np.random.RandomState  # continues into the stream's batch draws
    model: SelfHealingMLP
    baseline: BaselineMLP


def train_models(cfg: Config, parallel: bool = False) -> Trained:
    """Seed, draw the data, build both models (in the article's order) and train them.

    Both trainings' epoch orders are drawn up front, in the article's order (the
    self-healing model's, then the baseline's), so the two trainings are
    independent: with parallel=True the baseline trains in a forked process (Part V).
    """
    torch.manual_seed(cfg.seed)
    data, rng = make_data(cfg)
    model = SelfHealingMLP(cfg.hidden_dim)
    baseline = BaselineMLP(cfg.hidden_dim)
    model_orders, baseline_orders = epoch_orders(cfg), epoch_orders(cfg)
    if parallel:
        train_side_by_side(model, baseline, data.train, cfg, model_orders, baseline_orders)  # Part V
    else:
        train(model, data.train, cfg, model_orders)
        train(baseline, data.train, cfg, baseline_orders)
    model.freeze_backbone_and_head()
    for p in baseline.parameters():
        p.requires_grad_(False)
    return Trained(data, rng, model, baseline)


# -- Metrics

@dataclass(frozen=True)
class Metrics:
    accuracy: float
    precision: float
    recall: float
    f1: float
    tp: int
    tn: int
    fp: int
    fn: int

    @property
    def counts(self) -> str:
        return f"{self.tp}/{self.tn}/{self.fp}/{self.fn}"


def classify(y: np.ndarray, predicted: np.ndarray) -> Metrics:
    """Confusion counts and the article's metrics, each denominator guarded by 1e-8."""
    y, predicted = y.astype(bool), predicted.astype(bool)
    tp, tn = int(np.sum(predicted & y)), int(np.sum(~predicted & ~y))
    fp, fn = int(np.sum(predicted & ~y)), int(np.sum(~predicted & y))
    precision = tp / (tp + fp + 1e-8)
    recall = tp / (tp + fn + 1e-8)
    f1 = 2 * precision * recall / (precision + recall + 1e-8)
    return Metrics((tp + tn) / len(y), precision, recall, f1, tp, tn, fp, fn)


def metrics_at(y: np.ndarray, proba: np.ndarray, threshold: float = 0.5) -> Metrics:
    return classify(y, proba > threshold)


# -- Detection

class FIDIMonitor:
    """Feature-level drift index: z of the windowed V14 batch mean against training."""

    def __init__(self, train_v14: np.ndarray, window: int, threshold: float):
        self.mu = float(train_v14.mean())
        self.sigma = float(train_v14.std()) + 1e-8
        self.threshold = threshold
        self.means: deque = deque(maxlen=window)

    def update(self, batch_v14: np.ndarray) -> float:
        self.means.append(float(batch_v14.mean()))
        if len(self.means) < MIN_FIDI_ENTRIES:
            return 0.0
        return abs(float(np.mean(self.means)) - self.mu) / self.sigma

    def drifting(self, z: float) -> bool:
        return z > self.threshold


def rule_labels(X: np.ndarray, cfg: Config) -> np.ndarray:
    """The symbolic rule: fraud when V14 is below the rule threshold."""
    return (X[:, V14] < cfg.rule_threshold).astype(np.float32)


def conflicts(rule: np.ndarray, proba: np.ndarray, cfg: Config) -> np.ndarray:
    """Rows the rule calls fraud while the model is confident they are not."""
    return (rule == 1) & (proba < cfg.conflict_thr)


def pos_weight(fraud_frac: float) -> float:
    """The article's schedule: 1 below 10% fraud among conflicts, then 2 rising to a cap of 4."""
    return 1.0 if fraud_frac < 0.10 else min(2 + (fraud_frac - 0.10) * 10, 4.0)


# -- Healing

@dataclass(frozen=True)
class HealBatch:
    """What a heal and the health monitor may see: features and their targets."""
    X: np.ndarray
    targets: np.ndarray  # true labels, or rule labels in `rules` mode
    rule: np.ndarray


class LabelSupervision:
    """What the heal learns from, in the article: each batch's own true labels.
    Part II adds the two modes that need fewer labels (rules, delayed)."""

    def view(self, X: np.ndarray, labels: Callable[[], np.ndarray], rule: np.ndarray) -> Optional[HealBatch]:
        # `labels` is a callable, so that a mode that must not read them never does (a test checks).
        return HealBatch(X, labels(), rule)


def mean_binary_entropy(proba):
    """How unsure the model is, in nats (at most log 2), with the article's 1e-8 guards."""
    return -(proba * torch.log(proba + 1e-8) + (1 - proba) * torch.log(1 - proba + 1e-8)).mean()


def heal_loss(proba, targets, rule, weight, cfg: Config):
    """alpha * weighted BCE(targets) + (1 - alpha) * lambda * BCE(rule) + entropy term.

    The probabilities are turned back into logits the article's way; the 1e-8
    guards are part of what reproduces its numbers.
    """
    logits = torch.log(proba / (1 - proba + 1e-8))
    supervised = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=torch.tensor(weight))
    symbolic = F.binary_cross_entropy(proba, rule)
    return (cfg.alpha * supervised + (1 - cfg.alpha) * cfg.lambda_lag * symbolic
            + cfg.entropy_weight * mean_binary_entropy(proba))


class HealRejected(RuntimeError):
    """A heal whose result must not be served (non-finite loss or weights, timeout, error)."""


@dataclass
class HealResult:
    layer: ReflexiveLayer  # a new object, never changed afterwards: safe to serve
    losses: list
    seconds: float


class AdapterTrainer:
    """The healing side: a private ReflexiveLayer and one Adam optimizer over it,
    kept across heals (as in the article; a rollback does not reset it).

    Each heal trains copies of layer and optimizer and commits them only when
    loss and weights stayed finite, so a rejected heal leaves nothing behind.
    The committed layer is handed out to be served and never changed again.
    """

    def __init__(self, model: SelfHealingMLP, cfg: Config):
        self.backbone, self.head, self.cfg = model.backbone, model.head, cfg
        self.layer = copy.deepcopy(model.reflexive)
        self.optimizer = Adam(self.layer.parameters(), lr=cfg.heal_lr)  # Part V

    def heal(self, batch: HealBatch, weight: float) -> HealResult:
        start = time.perf_counter()
        layer, optimizer = copy.deepcopy((self.layer, self.optimizer))
        with torch.no_grad():  # the backbone is frozen: its features are fixed
            features = self.backbone(torch.from_numpy(batch.X))
        targets = torch.from_numpy(batch.targets).unsqueeze(1)
        rule = torch.from_numpy(batch.rule).unsqueeze(1)
        losses = []
        for step in range(self.cfg.heal_steps):
            optimizer.zero_grad()
            loss = heal_loss(self.head(layer(features)), targets, rule, weight, self.cfg)
            if not torch.isfinite(loss):
                raise HealRejected(f"non-finite loss at step {step + 1}")
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if not all(torch.isfinite(p).all() for p in layer.parameters()):
            raise HealRejected("non-finite adapter weights")
        self.layer, self.optimizer = layer, optimizer
        return HealResult(layer, losses, time.perf_counter() - start)

    def restore(self, state: dict) -> None:
        """Continue from a registry snapshot (a rollback); Adam keeps its moments."""
        layer, optimizer = copy.deepcopy((self.layer, self.optimizer))
        layer.load_state_dict(state)
        self.layer, self.optimizer = layer, optimizer


# -- Registry and health

@dataclass
class Snapshot:
    version: int
    batch: int
    kind: str  # clean, pre_heal or post_heal
    accuracy: float
    f1: float
    state: dict


class ModelRegistry:
    """Versions of the ReflexiveLayer. Keeps the clean version, the keep_best
    post-heal snapshots with the highest F1 and the keep_last most recent, so
    its memory is bounded however long the stream runs."""

    def __init__(self, keep_best: int, keep_last: int):
        self.keep_best, self.keep_last = keep_best, keep_last
        self.snapshots: dict[int, Snapshot] = {}
        self.saved = 0

    def save(self, layer: nn.Module, batch: int, kind: str, accuracy: float, f1: float) -> Snapshot:
        self.saved += 1
        state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        snap = Snapshot(self.saved, batch, kind, accuracy, f1, state)
        self.snapshots[snap.version] = snap
        self._evict()
        return snap

    def best_post_heal(self) -> Optional[Snapshot]:
        """The rollback target: the post-heal snapshot with the highest F1 (earliest on ties).
        Never the clean weights: they are what drifted in the first place."""
        post = [s for s in self.snapshots.values() if s.kind == "post_heal"]
        return max(post, key=lambda s: (s.f1, -s.version)) if post else None

    def _evict(self) -> None:
        post = sorted((s for s in self.snapshots.values() if s.kind == "post_heal"),
                      key=lambda s: (-s.f1, s.version))
        keep = {1} | {s.version for s in post[:self.keep_best]} | set(sorted(self.snapshots)[-self.keep_last:])
        for version in [v for v in self.snapshots if v not in keep]:
            del self.snapshots[version]


class HealthMonitor:
    """Rolling accuracy and F1; degraded when the window's mean falls below the
    first post-heal result by more than the rollback thresholds."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.accuracy: deque = deque(maxlen=cfg.health_window)
        self.f1: deque = deque(maxlen=cfg.health_window)
        self.updates = 0
        self.baseline: Optional[tuple[float, float]] = None

    def record(self, accuracy: float, f1: float, post_heal: bool) -> None:
        self.accuracy.append(accuracy)
        self.f1.append(f1)
        self.updates += 1
        if post_heal and self.baseline is None:
            self.baseline = (accuracy, f1)

    def degradation(self) -> Optional[str]:
        """Why the model should roll back, or None."""
        if (self.baseline is None or self.updates < self.cfg.min_batches_before_rollback
                or len(self.f1) < MIN_HEALTH_ENTRIES):
            return None
        base_acc, base_f1 = self.baseline
        mean_acc, mean_f1 = float(np.mean(self.accuracy)), float(np.mean(self.f1))
        if base_f1 - mean_f1 > self.cfg.rollback_f1_drop:
            return f"window F1 {mean_f1:.3f} is {base_f1 - mean_f1:.3f} below baseline {base_f1:.3f}"
        if base_acc - mean_acc > self.cfg.rollback_acc_drop:
            return f"window accuracy {mean_acc:.3f} is {base_acc - mean_acc:.3f} below baseline {base_acc:.3f}"
        return None

    def restart(self) -> None:
        """After a rollback the window starts afresh: old entries describe weights no longer served,
        and keeping them would roll back again on every following batch."""
        self.accuracy.clear()
        self.f1.clear()
        self.updates = 0


# -- The stream

@dataclass
class BatchRecord:
    """One stream batch: what was decided and how each model scored on it."""
    batch: int
    state: str
    action: str
    z: float = math.nan
    conflicts: int = 0
    fraud_frac: float = math.nan
    pos_weight: float = math.nan
    served: Optional[Metrics] = None    # the model that answered this batch, before any heal on it
    healed: Optional[Metrics] = None    # after this batch's heal, on this batch (the article's in-sample figure)
    shadow: Optional[Metrics] = None
    baseline: Optional[Metrics] = None
    monitor_accuracy: Optional[float] = None  # what the health monitor saw (rule agreement in rules mode)
    monitor_f1: Optional[float] = None
    version_pre: Optional[int] = None
    version_post: Optional[int] = None
    restored_version: Optional[int] = None

    @property
    def lift(self) -> Optional[float]:
        """The article's lift: healed accuracy minus shadow accuracy, on the batch the heal trained on."""
        return None if self.healed is None else self.healed.accuracy - self.shadow.accuracy

    @property
    def prequential_lift(self) -> Optional[float]:
        """The honest lift: accuracy of the model that served the batch minus the shadow's."""
        return None if self.served is None else self.served.accuracy - self.shadow.accuracy

    @property
    def prequential_f1_lift(self) -> Optional[float]:
        return None if self.served is None else self.served.f1 - self.shadow.f1


class RunningStats:
    """Count, mean, min, max and positives of a stream of numbers (None is skipped)."""

    def __init__(self):
        self.n = self.positive = 0
        self.total, self.min, self.max = 0.0, math.inf, -math.inf

    def add(self, x: Optional[float]) -> None:
        if x is None:
            return
        self.n += 1
        self.positive += x > 0
        self.total += x
        self.min, self.max = min(self.min, x), max(self.max, x)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class StreamLog:
    """Collects batch records and events; keeps them in memory only when asked
    (plots need them) and otherwise hands them straight to its listeners
    (the console table and the exports of Part IV)."""

    def __init__(self, keep: bool):
        self.keep = keep
        self.records: list[BatchRecord] = []
        self.events: list[dict] = []
        self.record_listeners: list[Callable[[BatchRecord], None]] = []
        self.event_listeners: list[Callable[[dict], None]] = []
        self.counts = {"heal": 0, "rollback": 0, "heal_failed": 0, "batch_quarantined": 0}
        # Running aggregates, so that a summary needs no per-batch history.
        self.lift = RunningStats()
        self.prequential = RunningStats()
        self.prequential_f1 = RunningStats()
        self.first_drift_batch: Optional[int] = None

    def record(self, r: BatchRecord, drifting: bool) -> None:
        if drifting and self.first_drift_batch is None:
            self.first_drift_batch = r.batch
        self.lift.add(r.lift)
        self.prequential.add(r.prequential_lift)
        self.prequential_f1.add(r.prequential_f1_lift)
        if self.keep:
            self.records.append(r)
        for listener in self.record_listeners:
            listener(r)

    def event(self, kind: str, batch: int, **details) -> None:
        self.counts[kind] += 1
        entry = {"type": kind, "batch": batch, "time": now_iso(), **details}
        if self.keep:
            self.events.append(entry)
        for listener in self.event_listeners:
            listener(entry)


def drifted_batches(data: Dataset, cfg: Config, rng: np.random.RandomState) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The article's stream: batch_size rows drawn with replacement from the drifted set."""
    for _ in range(cfg.n_batches):
        idx = rng.choice(len(data.X), cfg.batch_size, replace=True)
        yield data.X[idx], data.y[idx]


class SelfHealingStream:
    """Serves each batch, watches for drift, heals, keeps versions, rolls back.

    This class heals in the serving thread, as the article's script in effect does;
    Part III's HealEngineStream runs the same step with heals in a worker, bounded
    waits, contained faults and quarantined batches.
    """

    def __init__(self, model: SelfHealingMLP, shadow: nn.Module, baseline: nn.Module,
                 fidi: FIDIMonitor, cfg: Config, log: StreamLog):
        self.model, self.shadow, self.baseline = model, shadow, baseline
        self.fidi, self.cfg, self.log = fidi, cfg, log
        self.trainer = AdapterTrainer(model, cfg)
        self.registry = ModelRegistry(cfg.keep_best, cfg.keep_last)
        self.registry.save(model.reflexive, 0, "clean", float("nan"), float("nan"))
        self.health = HealthMonitor(cfg)
        self.supervision = make_supervision(cfg)  # Part II: labels (the article), rules or delayed

    def serve_batches(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
        for i, (X, y) in enumerate(batches, start=1):
            self.step(i, X, y)

    def step(self, i: int, X: np.ndarray, y: np.ndarray) -> BatchRecord:
        """serve -> score -> detect -> heal -> version -> health -> rollback."""
        cfg = self.cfg
        served_proba = predict_proba(self.model, X)  # serve: answered before anything learns from it
        record = BatchRecord(i, "HEALTHY", "none", served=metrics_at(y, served_proba),
                             shadow=metrics_at(y, predict_proba(self.shadow, X)),
                             baseline=metrics_at(y, predict_proba(self.baseline, X)))
        record.z = self.fidi.update(X[:, V14])
        drifting = self.fidi.drifting(record.z)
        if drifting:
            record.state = "DRIFTING"
        rule = rule_labels(X, cfg)
        record.conflicts = int(conflicts(rule, served_proba, cfg).sum())
        wants_heal = drifting or record.conflicts >= cfg.conflict_min

        view = self.supervision.view(X, lambda: y, rule)  # what the heal may learn from
        if view is None:  # delayed labels have not arrived yet
            record.action = "await_labels" if wants_heal else "none"
        else:
            view_proba = served_proba if view.X is X else predict_proba(self.model, view.X)
            view_conflicts = conflicts(view.rule, view_proba, cfg)
            record.fraud_frac = float(view.targets[view_conflicts].mean()) if view_conflicts.any() else 0.0
            record.pos_weight = pos_weight(record.fraud_frac)
            before = metrics_at(view.targets, view_proba)
            result = self.heal(i, record, view, before) if wants_heal else None
            if result is None:
                self.monitor(record, before, post_heal=False)
            else:
                self.publish(i, record, view, before, result)
                self.roll_back_if_degraded(i, record, result.layer)
                record.healed = metrics_at(y, predict_proba(self.model, X))
        self.log.record(record, drifting)
        return record

    def heal(self, i: int, record: BatchRecord, view: HealBatch, before: Metrics) -> Optional[HealResult]:
        """Train a private copy of the adapter on the view (None: nothing to publish now)."""
        try:
            return self.trainer.heal(view, record.pos_weight)
        except HealRejected as e:  # the article's script hung here; the served weights stay
            self.reject(i, record, str(e))
            return None

    def reject(self, i: int, record: BatchRecord, reason: str) -> None:
        record.action = "heal_failed"
        self.log.event("heal_failed", i, reason=reason)

    def publish(self, i: int, record: BatchRecord, view: HealBatch, before: Metrics, result: HealResult,
                applied_at: int = None) -> None:
        """Version the heal (pre and post snapshots), serve it, and tell the health monitor."""
        pre_snap = self.registry.save(self.model.reflexive, i, "pre_heal", before.accuracy, before.f1)
        self.model.reflexive = result.layer  # the atomic swap that publishes the heal
        after = metrics_at(view.targets, predict_proba(self.model, view.X))
        post_snap = self.registry.save(result.layer, i, "post_heal", after.accuracy, after.f1)
        record.state, record.action = "HEALING", "heal"
        record.version_pre, record.version_post = pre_snap.version, post_snap.version
        self.monitor(record, after, post_heal=True)
        self.log.event("heal", i, version_pre=pre_snap.version, version_post=post_snap.version,
                       applied_at_batch=applied_at or i, pos_weight=record.pos_weight,
                       accuracy_before=before.accuracy, accuracy_after=after.accuracy,
                       f1_before=before.f1, f1_after=after.f1,
                       loss_first=result.losses[0] if result.losses else None,
                       loss_last=result.losses[-1] if result.losses else None,
                       seconds=round(result.seconds, 6))

    def roll_back_if_degraded(self, i: int, record: BatchRecord, layer: ReflexiveLayer) -> None:
        """Restore the best post-heal snapshot when the health window has degraded."""
        reason = self.health.degradation()
        target = self.registry.best_post_heal() if reason else None
        if target is None:
            return
        restored = copy.deepcopy(layer)
        restored.load_state_dict(target.state)
        self.model.reflexive = restored
        self.continue_from(target.state)
        self.health.restart()
        record.state, record.action, record.restored_version = "ROLLED_BACK", "heal+rollback", target.version
        self.log.event("rollback", i, restored_version=target.version, restored_batch=target.batch,
                       restored_accuracy=target.accuracy, restored_f1=target.f1, reason=reason)

    def continue_from(self, state: dict) -> None:
        """Later heals start from the restored weights."""
        self.trainer.restore(state)

    def monitor(self, record: BatchRecord, m: Metrics, post_heal: bool) -> None:
        self.health.record(m.accuracy, m.f1, post_heal)
        record.monitor_accuracy, record.monitor_f1 = m.accuracy, m.f1


# -- The experiment

@dataclass
class RunResult:
    cfg: Config
    trained: Trained       # the models as trained, before the stream
    fidi: FIDIMonitor
    log: StreamLog
    registry: ModelRegistry
    model: SelfHealingMLP  # as healed by the stream
    shadow: BaselineMLP

    @property
    def data(self) -> Data:
        return self.trained.data

    def article_table(self) -> dict:
        """The article's four rows at threshold 0.5: the clean model on clean data, then the
        unhealed baseline, its frozen shadow and the healed model on the drifted set."""
        data = self.data
        return {"clean": metrics_at(data.test.y, predict_proba(self.trained.model, data.test.X)),
                **{name: metrics_at(data.drift.y, predict_proba(m, data.drift.X))
                   for name, m in (("no_healing", self.trained.baseline), ("shadow", self.shadow),
                                   ("healed", self.model))}}


def run_experiment(cfg: Config, trained: Trained = None, batches: Iterable = None,
                   console: Callable[[str], None] = print, export_dir: Path = None,
                   keep_records: bool = True) -> RunResult:
    """Train (unless `trained` is given), stream the drifted batches through the
    self-healing engine, and return what happened. Tests pass `trained` (to reuse
    a training), `batches` (to inject faults) and their own `console`."""
    trained = trained or train_models(cfg)
    data = trained.data
    # Copies, so that one training can serve several runs (tests do this).
    model, rng = copy.deepcopy(trained.model), copy.deepcopy(trained.rng)
    shadow = copy.deepcopy(trained.baseline)
    fidi = FIDIMonitor(data.train.X[:, V14], cfg.fidi_window, cfg.fidi_threshold)
    for line in pipeline_lines(cfg, trained, fidi):  # Part IV: one line per stage so far
        console(line)

    log = StreamLog(keep_records)
    exporter = attach_outputs(log, cfg, console, export_dir)  # Part IV: the batch table and the exports
    try:
        stream = HealEngineStream(model, shadow, trained.baseline, fidi, cfg, log)  # Part III
        stream.serve_batches(batches if batches is not None else drifted_batches(data.drift, cfg, rng))
        result = RunResult(cfg, trained, fidi, log, stream.registry, model, shadow)
        if exporter:
            exporter.finish()
    except BaseException:
        if exporter:
            exporter.abort()
        raise
    return result


# Part II. Honest measurement
#
# What the article's table leaves out: threshold-free scores, costs, a fresh holdout, the
# trivial and Bayes-optimal references, forgetting, supervision with fewer labels, the
# spread over seeds; then the learner's next question, the scenario bench: kinds of drift,
# the methods measured against healing, each against its Bayes ceiling. Computation only:
# Part IV prints. Uses Part I, and Part V's Adam as Part I does (commented where it does).

class RuleSupervision(LabelSupervision):
    """No ground truth anywhere: the rule's labels stand in for the true ones."""

    def view(self, X, labels, rule):
        return HealBatch(X, rule, rule)


class LateArrivals:
    """Items that arrive `delay` batches after they were sent: push one per batch, get back the
    one that arrives now (None while the first ones are still on their way)."""

    def __init__(self, delay: int):
        self.delay = delay
        self.pending: deque = deque()

    def push(self, item):
        self.pending.append(item)
        return self.pending.popleft() if len(self.pending) > self.delay else None


class DelayedSupervision(LabelSupervision):
    """The true labels of batch i arrive K batches late: the heal at batch i learns from batch i-K."""

    def __init__(self, delay: int):
        self.labelled = LateArrivals(delay)

    def view(self, X, labels, rule):
        return self.labelled.push(HealBatch(X, labels(), rule))


def make_supervision(cfg: Config) -> LabelSupervision:
    if cfg.supervision == "rules":
        return RuleSupervision()
    if cfg.supervision == "delayed":
        return DelayedSupervision(cfg.label_delay)
    return LabelSupervision()


def roc_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a random fraud > score of a random normal), ties counted half (Mann-Whitney)."""
    y = y.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mid_ranks = np.cumsum(counts) - (counts - 1) / 2.0  # average 1-based rank of each tie group
    ranks = mid_ranks[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pr_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: precision at each distinct threshold, weighted by the recall it adds."""
    y = y.astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    values, inverse = np.unique(-scores, return_inverse=True)  # ascending -score: descending score
    tp = np.cumsum(np.bincount(inverse, weights=y, minlength=len(values)))
    seen = np.cumsum(np.bincount(inverse, minlength=len(values)))
    recall_gain = np.diff(np.concatenate([[0.0], tp])) / n_pos
    return float(np.sum(recall_gain * tp / seen))


def cost_per_1000(m: Metrics, cfg: Config) -> float:
    return (m.fn * cfg.fn_cost + m.fp * cfg.fp_cost) / (m.tp + m.tn + m.fp + m.fn) * 1000


def cost_optimal_threshold(y: np.ndarray, scores: np.ndarray, cfg: Config) -> float:
    """The threshold (predict fraud when score > t) with the lowest cost on (y, scores)."""
    candidates = np.concatenate([[-np.inf], np.unique(scores)])
    costs = [cost_per_1000(metrics_at(y, scores, t), cfg) for t in candidates]
    return float(candidates[int(np.argmin(costs))])


@dataclass(frozen=True)
class Scored:
    """One model on one set: the metrics at 0.5, threshold-free AUCs and cost."""
    name: str
    metrics: Metrics
    roc_auc: float
    pr_auc: float
    cost: float


def score_model(name: str, y: np.ndarray, proba: np.ndarray, cfg: Config) -> Scored:
    m = metrics_at(y, proba)
    return Scored(name, m, roc_auc(y, proba), pr_auc(y, proba), cost_per_1000(m, cfg))


def fraud_prior(n: int, cfg: Config) -> float:
    return int(n * cfg.fraud_ratio) / n


def drifted_set_law(cfg: Config, n: int) -> RowLaw:
    """The law of a drifted set of n rows, with the fraud share it really has."""
    return dataclasses.replace(article_law(cfg, drifted=True), fraud_share=fraud_prior(n, cfg))


def _log_pdf(v: np.ndarray, mean_std: tuple[float, float]) -> np.ndarray:
    mean, std = mean_std
    return -0.5 * ((v - mean) / std) ** 2 - math.log(std * math.sqrt(2 * math.pi))


def fraud_log_odds(law: RowLaw, v14: np.ndarray) -> np.ndarray:
    """log P(fraud | row) / P(normal | row) under the law. The other nine features have the same
    distribution in both classes, so V14 alone decides."""
    return (math.log(law.fraud_share) + _log_pdf(v14, law.fraud_v14)
            - math.log(1 - law.fraud_share) - _log_pdf(v14, law.normal_v14))


def bayes_posterior(X: np.ndarray, law: RowLaw) -> np.ndarray:
    """P(fraud | row) from the generator's known law: the best probability any model can give."""
    with np.errstate(over="ignore"):
        return 1 / (1 + np.exp(-fraud_log_odds(law, X[:, V14].astype(np.float64))))


def v14_threshold_auc(law: RowLaw) -> float:
    """ROC-AUC of the best score monotone in V14 (a threshold rule on V14, like the symbolic
    rule, in whichever direction is better), in closed form."""
    gap = law.normal_v14[0] - law.fraud_v14[0]
    auc = 0.5 * (1 + math.erf(gap / math.hypot(law.normal_v14[1], law.fraud_v14[1]) / math.sqrt(2)))
    return max(auc, 1 - auc)


def cost_threshold(cfg: Config) -> float:
    """The Bayes decision for costs: flag fraud when P(fraud) > fp / (fp + fn)."""
    total = cfg.fn_cost + cfg.fp_cost
    return cfg.fp_cost / total if total > 0 else 0.5


@dataclass(frozen=True)
class Ceiling:
    """The best any model can do on a stream of rows, from the generator's known laws."""
    accuracy: float
    roc_auc: float  # of the likelihood ratio, the best score there is (Neyman-Pearson)
    cost: float     # expected cost per 1,000 rows, deciding at cost_threshold


def bayes_ceiling(laws: list[RowLaw], cfg: Config) -> Ceiling:
    """The ceiling of a stream whose batches (of equal size) follow these laws, integrated on a
    fine V14 grid per distinct law. The AUC is that of the pooled stream, ranked by the true
    posterior of each row's own batch."""
    counts: dict[RowLaw, int] = {}
    for law in laws:
        counts[law] = counts.get(law, 0) + 1
    with np.errstate(divide="ignore"):
        flag_above = float(np.log(cost_threshold(cfg)) - np.log1p(-cost_threshold(cfg)))
    accuracy = cost = 0.0
    log_odds, fraud_mass, normal_mass = [], [], []
    for law, count in counts.items():
        weight, share = count / len(laws), law.fraud_share
        span = 12 * max(law.normal_v14[1], law.fraud_v14[1])  # 12 standard deviations beyond both means
        low, high = sorted((law.normal_v14[0], law.fraud_v14[0]))
        v = np.linspace(low - span, high + span, 400_001)
        dv = v[1] - v[0]
        fraud = share * np.exp(_log_pdf(v, law.fraud_v14)) * dv       # P(fraud, V14 in this cell)
        normal = (1 - share) * np.exp(_log_pdf(v, law.normal_v14)) * dv
        odds = fraud_log_odds(law, v)
        flagged = odds > flag_above
        accuracy += weight * float(np.sum(np.maximum(fraud, normal)))
        cost += weight * 1000 * float(cfg.fn_cost * fraud[~flagged].sum() + cfg.fp_cost * normal[flagged].sum())
        log_odds.append(odds)
        fraud_mass.append(weight * fraud)
        normal_mass.append(weight * normal)
    order = np.argsort(-np.concatenate(log_odds), kind="stable")
    tpr_steps, fpr_steps = np.concatenate(fraud_mass)[order], np.concatenate(normal_mass)[order]
    tpr_before = np.cumsum(tpr_steps) - tpr_steps
    auc = float(np.sum(fpr_steps * (tpr_before + tpr_steps / 2)) / (tpr_steps.sum() * fpr_steps.sum()))
    return Ceiling(accuracy, auc, cost)


ROW_TITLES = {
    "no_healing": "Under drift, no healing",
    "shadow": "Shadow, frozen",
    "healed": "Self-healed",
    "never_healed": "Same network, never healed",
    "always_normal": "Always answers normal",
    "bayes": "Bayes-optimal (known densities)",
}


def score_set(cfg: Config, ds: Dataset, probabilities: dict) -> dict:
    """Score every model's probabilities on one drifted set, with the trivial and Bayes references."""
    probabilities = dict(probabilities)
    probabilities["always_normal"] = np.zeros(len(ds.y), dtype=np.float32)
    probabilities["bayes"] = bayes_posterior(ds.X, drifted_set_law(cfg, len(ds.y)))
    return {name: score_model(name, ds.y, p, cfg) for name, p in probabilities.items()}


@dataclass
class Evaluation:
    drift_rows: dict       # name -> Scored, on the drifted set the stream sampled from
    holdout_rows: dict     # name -> Scored, on the fresh drifted holdout
    clean_before: Scored   # the self-healing MLP on the clean test set, before the stream
    clean_after: Scored    # and after it: forgetting
    bayes_accuracy: float
    bayes_auc: float
    cost_threshold: float  # cost-optimal threshold of the healed model, chosen on the drifted set
    healed_at_cost_threshold: Metrics  # the healed model at that threshold, on the holdout


def evaluate_run(run: RunResult) -> Evaluation:
    """Every model on the drifted set and on the fresh holdout, against the references."""
    cfg, data, trained = run.cfg, run.data, run.trained
    models = {"no_healing": trained.baseline, "shadow": run.shadow, "healed": run.model,
              "never_healed": trained.model}
    rows = {name: score_set(cfg, ds, {k: predict_proba(m, ds.X) for k, m in models.items()})
            for name, ds in (("drift", data.drift), ("holdout", data.holdout))}
    threshold = cost_optimal_threshold(data.drift.y, predict_proba(run.model, data.drift.X), cfg)
    ceiling = bayes_ceiling([drifted_set_law(cfg, cfg.n_drift)], cfg)
    return Evaluation(rows["drift"], rows["holdout"],
                      score_model("clean", data.test.y, predict_proba(trained.model, data.test.X), cfg),
                      score_model("clean", data.test.y, predict_proba(run.model, data.test.X), cfg),
                      ceiling.accuracy, ceiling.roc_auc, threshold,
                      metrics_at(data.holdout.y, predict_proba(run.model, data.holdout.X), threshold))


# -- Seeds

# The per-seed figures a sweep aggregates, and how each is printed.
SWEEP_FIGURES = {"recovery_pp": "+.1f", "prequential_lift_pp": "+.1f", "holdout_accuracy": ".3f",
                 "holdout_auc": ".3f", "f1_change": "+.3f", "forgetting_pp": "+.1f", "cost_change": "+,.0f"}


def seed_summary(cfg: Config) -> dict:
    """One seed's run, reduced to the figures a sweep aggregates."""
    run = run_experiment(cfg, console=lambda line: None, keep_records=False)
    e, log = evaluate_run(run), run.log
    d, h = e.drift_rows, e.holdout_rows
    return {
        "seed": cfg.seed,
        "recovery_pp": 100 * (d["healed"].metrics.accuracy - d["no_healing"].metrics.accuracy),
        "prequential_lift_pp": 100 * log.prequential.mean,
        "holdout_accuracy": h["healed"].metrics.accuracy,
        "holdout_auc": h["healed"].roc_auc,
        "f1_change": d["healed"].metrics.f1 - d["no_healing"].metrics.f1,
        "forgetting_pp": 100 * (e.clean_after.metrics.accuracy - e.clean_before.metrics.accuracy),
        "cost_change": d["healed"].cost - d["no_healing"].cost,
        "heals": log.counts["heal"],
        "rollbacks": log.counts["rollback"],
    }


def sweep_configs(cfg: Config) -> list[Config]:
    """One config per seed of the sweep: seed, seed+1, ..., each a quiet single run."""
    return [dataclasses.replace(cfg, seed=cfg.seed + k, seeds=1, quiet=True, no_plots=True)
            for k in range(cfg.seeds)]


def bootstrap_resamples(n: int, n_resamples: int = 10_000) -> np.ndarray:
    """Resampled indices of n seeds, from a fixed generator: percentile bootstrap intervals."""
    return np.random.RandomState(0).randint(0, n, (n_resamples, n))


def bootstrap_interval(values: np.ndarray) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    means = values[bootstrap_resamples(len(values))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@dataclass(frozen=True)
class Spread:
    """One figure across seeds."""
    mean: float
    sd: float  # NaN for a single seed
    low: float
    high: float
    min: float
    max: float


def spread_of(values: list[float]) -> Spread:
    """Mean, standard deviation, 95% bootstrap interval, min and max; NaN when any value is NaN."""
    values = np.array(values, dtype=float)
    if np.isnan(values).any():
        return Spread(*[math.nan] * 6)
    low, high = bootstrap_interval(values)
    sd = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return Spread(float(values.mean()), sd, low, high, float(values.min()), float(values.max()))


def sweep_spread(summaries: list[dict]) -> dict:
    """figure -> its Spread across the seeds."""
    return {name: spread_of([s[name] for s in summaries]) for name in SWEEP_FIGURES}


# -- Scenarios: which kind of drift

SUDDEN_SCENARIOS = ("article", "offset", "recurring", "prior", "covariate")  # drifted from batch 1 on
SCENARIO_STORIES = {
    "article": "only normal rows' V14 moves onto fraud's: P(y|x) changes and the classes overlap",
    "stationary": "no drift at all: the control",
    "offset": "every row's V14 moves by --drift-strength (a sensor offset): the classes keep their separation",
    "gradual": "the article's drift ramping in over the first half of the stream",
    "recurring": "the article's drift on and off, --recurring-period batches each",
    "prior": "the fraud share moves to --shifted-fraud-ratio: P(y) changes, the class densities do not",
    "covariate": "the nine signal-free features move by --drift-strength and rows tilt toward low V14: "
                 "P(x) changes, P(y|x) does not",
}


def scenario_law(name: str, t: int, cfg: Config) -> RowLaw:
    """The law of batch t (1-based) of a scenario's stream."""
    clean, drifted, d = article_law(cfg, drifted=False), article_law(cfg, drifted=True), cfg.drift_strength
    if name == "article":
        return drifted
    if name == "offset":
        return RowLaw((-d, NORMAL_V14_STD), (FRAUD_V14[0] - d, FRAUD_V14[1]), cfg.fraud_ratio)
    if name == "gradual":
        ramp = min(1.0, t / max(1, cfg.n_batches // 2))
        return RowLaw((-d * ramp, NORMAL_V14_STD), FRAUD_V14, cfg.fraud_ratio)
    if name == "recurring":
        return drifted if (t - 1) // cfg.recurring_period % 2 == 0 else clean
    if name == "prior":
        return dataclasses.replace(clean, fraud_share=cfg.shifted_fraud_ratio)
    if name == "covariate":
        # Rows resampled with weights exp(-tilt * V14), which depend on x alone, so P(y|x) stays. In
        # closed form: each class's Gaussian V14 moves by -tilt * std^2, and the fraud share follows
        # the ratio of the two classes' normalisers.
        tilt, (mn, sn), (mf, sf) = cfg.covariate_tilt, clean.normal_v14, clean.fraud_v14
        log_ratio = (-tilt * mn + (tilt * sn) ** 2 / 2) - (-tilt * mf + (tilt * sf) ** 2 / 2)
        share = 1 / (1 + (1 - clean.fraud_share) / clean.fraud_share * math.exp(log_ratio))
        return RowLaw((mn - tilt * sn ** 2, sn), (mf - tilt * sf ** 2, sf), share, noise_shift=d)
    return clean  # stationary


def scenario_batches(name: str, cfg: Config, trained: Trained) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The scenario's production stream. `article` is the article's (rows drawn with replacement
    from the drifted set); every other scenario draws fresh rows from its own generator."""
    if name == "article":
        yield from drifted_batches(trained.data.drift, cfg, copy.deepcopy(trained.rng))
        return
    rng = np.random.RandomState([cfg.seed, 2, SCENARIOS.index(name)])
    for t in range(1, cfg.n_batches + 1):
        law = scenario_law(name, t, cfg)
        n_fraud = rng.binomial(cfg.batch_size, law.fraud_share)
        rows = draw_rows(rng, cfg.batch_size - n_fraud, n_fraud, law)
        yield rows.X, rows.y


def scenario_ceiling(name: str, cfg: Config) -> Ceiling:
    return bayes_ceiling([scenario_law(name, t, cfg) for t in range(1, cfg.n_batches + 1)], cfg)


# -- Methods: what to do about it

class StreamMethod:
    """One way to serve a drifting stream, and the baseline of all: the trained model, untouched.

    For each batch, predict() answers first; adapt() then sees the batch (prequential). Labels
    reach adapt() only for methods with uses_labels; the others are handed None.
    """
    uses_labels = False

    def __init__(self, trained: Trained, cfg: Config):
        self.model, self.cfg = trained.model, cfg
        self.adaptations = 0  # batches on which the method changed what it serves

    def predict(self, X: np.ndarray) -> np.ndarray:
        return predict_proba(self.model, X)

    def flag_threshold(self) -> float:
        """Flag fraud above this probability when costs decide: the Bayes rule for a calibrated model."""
        return cost_threshold(self.cfg)

    def adapt(self, X: np.ndarray, y: Optional[np.ndarray]) -> None:
        pass

    def close(self) -> None:
        pass


class HealMethod(StreamMethod):
    """The article's self-healing stream (Part I), following --supervision."""

    def __init__(self, trained: Trained, cfg: Config):
        super().__init__(trained, cfg)
        self.uses_labels = cfg.supervision != "rules"
        self.model, self.log, self.batches = copy.deepcopy(trained.model), StreamLog(keep=False), 0
        fidi = FIDIMonitor(trained.data.train.X[:, V14], cfg.fidi_window, cfg.fidi_threshold)
        self.stream = SelfHealingStream(self.model, copy.deepcopy(trained.baseline), trained.baseline, fidi,
                                        cfg, self.log)

    def adapt(self, X, y):
        self.batches += 1
        # With rules, no label is handed over: the rule's own labels stand in for y in the stream's
        # per-batch scores, which decide nothing.
        self.stream.step(self.batches, X, rule_labels(X, self.cfg) if y is None else y)
        self.adaptations = self.log.counts["heal"]


class Restandardize(StreamMethod):
    """Map each feature of the stream back to the training mean and spread, with statistics of the
    last --adapt-window batches (no labels)."""

    def __init__(self, trained: Trained, cfg: Config):
        super().__init__(trained, cfg)
        self.train_mean, self.train_std = trained.data.train.X.mean(axis=0), trained.data.train.X.std(axis=0)
        self.recent: deque = deque(maxlen=cfg.adapt_window)

    def predict(self, X):
        if not self.recent:
            return super().predict(X)
        rows = np.concatenate(self.recent)
        mapped = (X - rows.mean(axis=0)) / (rows.std(axis=0) + 1e-8) * self.train_std + self.train_mean
        return super().predict(mapped.astype(np.float32))

    def adapt(self, X, y):
        self.recent.append(X)
        self.adaptations += 1


class Tent(StreamMethod):
    """Entropy minimisation (TENT) on the adapter: one Adam step per batch at --tent-lr. When the
    batch's mean entropy falls below --tent-reset-entropy the model has collapsed into
    overconfidence, and the adapter is reset to the clean one (as SAR does) (no labels)."""

    def __init__(self, trained: Trained, cfg: Config):
        super().__init__(trained, cfg)
        self.clean, self.model, self.resets = trained.model, copy.deepcopy(trained.model), 0
        self.reset()

    def reset(self) -> None:
        self.model.reflexive = copy.deepcopy(self.clean.reflexive)
        self.optimizer = Adam(self.model.reflexive.parameters(), lr=self.cfg.tent_lr)  # Part V

    def adapt(self, X, y):
        entropy = mean_binary_entropy(self.model(torch.from_numpy(X)))
        if not torch.isfinite(entropy) or entropy.item() < self.cfg.tent_reset_entropy:
            self.reset()
            self.resets += 1
            return
        self.optimizer.zero_grad()
        entropy.backward()
        self.optimizer.step()
        self.adaptations += 1


class EMPrior(StreamMethod):
    """Saerens et al. (2002): re-estimate the fraud share by EM from the model's probabilities on the
    last --adapt-window batches, and correct the posteriors to it (no labels)."""

    def __init__(self, trained: Trained, cfg: Config):
        super().__init__(trained, cfg)
        self.train_share = self.share = fraud_prior(cfg.n_train, cfg)
        self.recent: deque = deque(maxlen=cfg.adapt_window)

    def corrected(self, proba: np.ndarray, share: float) -> np.ndarray:
        fraud = share / self.train_share * proba
        return fraud / (fraud + (1 - share) / (1 - self.train_share) * (1 - proba))

    def predict(self, X):
        return self.corrected(super().predict(X).astype(np.float64), self.share)

    def adapt(self, X, y):
        self.recent.append(super().predict(X).astype(np.float64))
        proba, share = np.concatenate(self.recent), self.train_share
        for _ in range(1000):
            new = float(np.clip(self.corrected(proba, share).mean(), 1e-6, 1 - 1e-6))
            if abs(new - share) < 1e-9:
                break
            share = new
        self.adaptations += abs(share - self.share) > 1e-6
        self.share = share


class Rethreshold(StreamMethod):
    """Labels arrive --label-delay batches late; flag fraud above the cost-optimal threshold of the
    last --adapt-window labelled batches. The weights are never touched."""
    uses_labels = True

    def __init__(self, trained: Trained, cfg: Config):
        super().__init__(trained, cfg)
        self.labelled, self.recent = LateArrivals(cfg.label_delay), deque(maxlen=cfg.adapt_window)
        self.threshold = cost_threshold(cfg)

    def flag_threshold(self):
        return self.threshold

    def adapt(self, X, y):
        arrived = self.labelled.push((X, y))
        if arrived is None:
            return
        self.recent.append(arrived)
        threshold = cost_optimal_threshold(np.concatenate([b[1] for b in self.recent]),
                                           super().predict(np.concatenate([b[0] for b in self.recent])), self.cfg)
        self.adaptations += threshold != self.threshold
        self.threshold = threshold


class Retrain(StreamMethod):
    """Labels arrive --label-delay batches late; the head is refitted from its trained weights on the
    last --adapt-window labelled batches (--retrain-steps Adam steps at --retrain-lr)."""
    uses_labels = True

    def __init__(self, trained: Trained, cfg: Config):
        super().__init__(trained, cfg)
        self.model, self.trained_head = copy.deepcopy(trained.model), trained.model.head
        self.labelled, self.recent = LateArrivals(cfg.label_delay), deque(maxlen=cfg.adapt_window)

    def adapt(self, X, y):
        arrived = self.labelled.push((X, y))
        if arrived is None:
            return
        self.recent.append(arrived)
        rows = torch.from_numpy(np.concatenate([b[0] for b in self.recent]))
        with torch.no_grad():
            features = self.model.reflexive(self.model.backbone(rows))
        targets = torch.from_numpy(np.concatenate([b[1] for b in self.recent])).unsqueeze(1)
        head = copy.deepcopy(self.trained_head)
        for p in head.parameters():
            p.requires_grad_(True)
        optimizer = Adam(head.parameters(), lr=self.cfg.retrain_lr)  # Part V
        for _ in range(self.cfg.retrain_steps):
            optimizer.zero_grad()
            F.binary_cross_entropy(head(features), targets).backward()
            optimizer.step()
        self.model.head = head
        self.adaptations += 1


METHODS = dict(zip(HEAL_METHODS, (StreamMethod, HealMethod, Restandardize, Tent, EMPrior, Rethreshold, Retrain)))
# The bench runs the heal twice: with labels, as the article does, and with the rule alone.
BENCH_METHODS = ("none", "heal", "heal-rules", "restandardize", "tent", "em-prior", "rethreshold", "retrain")


def make_method(name: str, trained: Trained, cfg: Config) -> StreamMethod:
    if name == "heal-rules":
        return HealMethod(trained, dataclasses.replace(cfg, supervision="rules"))
    return METHODS[name](trained, cfg)


# -- The bench: every scenario against every method

@dataclass(frozen=True)
class BenchRow:
    """One method on one scenario's stream for one seed, prequential, beside the scenario's ceiling."""
    scenario: str
    method: str
    seed: int
    accuracy: float        # at 0.5
    f1: float
    roc_auc: float
    cost: float            # per 1,000 rows, at the method's flag_threshold
    none_cost: float       # of the unadapted model on the same stream
    kappa: float           # against always answering normal: (acc - acc_normal) / (1 - acc_normal)
    gap_closed: float      # (cost_none - cost) / (cost_none - cost_bayes); NaN when there is no gap
    adaptations_per_1000: float
    detection_delay: float  # batches from onset to the first DRIFTING (sudden scenarios; NaN if never)
    bayes_accuracy: float
    bayes_auc: float
    bayes_cost: float


BENCH_FIGURES = ("accuracy", "f1", "roc_auc", "cost", "kappa", "gap_closed", "adaptations_per_1000",
                 "detection_delay")
MIN_GAP = 0.05  # below 5% of no-adaptation's cost, the gap to the ceiling is too small to divide by


def bench_cell(scenario: str, method: str, trained: Trained, cfg: Config, ceiling: Ceiling) -> BenchRow:
    """Stream the scenario through the method; score every prediction made before adapting."""
    served = make_method(method, trained, cfg)
    fidi = FIDIMonitor(trained.data.train.X[:, V14], cfg.fidi_window, cfg.fidi_threshold)
    labels, proba, flagged, none_flagged, first_drift = [], [], [], [], None
    try:
        for t, (X, y) in enumerate(scenario_batches(scenario, cfg, trained), start=1):
            p = served.predict(X)
            labels.append(y)
            proba.append(p)
            flagged.append(p > served.flag_threshold())
            none_flagged.append(predict_proba(trained.model, X) > cost_threshold(cfg))
            served.adapt(X, y if served.uses_labels else None)
            if first_drift is None and fidi.drifting(fidi.update(X[:, V14])):
                first_drift = t
    finally:
        served.close()
    y, p = np.concatenate(labels), np.concatenate(proba)
    at_half = metrics_at(y, p)
    cost = cost_per_1000(classify(y, np.concatenate(flagged)), cfg)
    none_cost = cost_per_1000(classify(y, np.concatenate(none_flagged)), cfg)
    normal_share = 1 - float(y.mean())
    gap = none_cost - ceiling.cost
    return BenchRow(
        scenario, method, cfg.seed, at_half.accuracy, at_half.f1, roc_auc(y, p), cost, none_cost,
        (at_half.accuracy - normal_share) / (1 - normal_share) if normal_share < 1 else math.nan,
        (none_cost - cost) / gap if gap > MIN_GAP * none_cost else math.nan,
        1000 * served.adaptations / cfg.n_batches,
        first_drift - 1 if scenario in SUDDEN_SCENARIOS and first_drift else math.nan,
        ceiling.accuracy, ceiling.roc_auc, ceiling.cost)


@dataclass(frozen=True)
class BenchCell:
    index: int
    seed: int
    scenario: str
    method: str

    @property
    def name(self) -> str:
        return f"cell-{self.index:04d}-{self.scenario}-{self.method}-seed{self.seed}"


def bench_config(cfg: Config) -> Config:
    """The bench's own settings: its heals wait for each result, so that it is reproducible."""
    return dataclasses.replace(cfg, supervision="labels", async_apply=False)


def bench_cells(cfg: Config) -> list[BenchCell]:
    """Every seed x scenario x method, numbered: the unit a shard runs and a merge collects."""
    combos = [(cfg.seed + k, s, m) for k in range(cfg.seeds) for s in SCENARIOS for m in BENCH_METHODS]
    return [BenchCell(i, *combo) for i, combo in enumerate(combos)]


def run_bench_cells(cfg: Config, cells: list[BenchCell],
                    done: Callable[[BenchCell, BenchRow], None] = None) -> list[BenchRow]:
    """Run cells, training the models once per seed and computing each scenario's ceiling once;
    done(cell, row), when given, is told of each cell as soon as it is finished."""
    cfg = bench_config(cfg)
    rows, trained, ceilings = [], {}, {}
    for cell in cells:
        seed_cfg = dataclasses.replace(cfg, seed=cell.seed, seeds=1)
        if cell.seed not in trained:
            trained[cell.seed] = train_models(seed_cfg)
        if cell.scenario not in ceilings:
            ceilings[cell.scenario] = scenario_ceiling(cell.scenario, cfg)
        rows.append(bench_cell(cell.scenario, cell.method, trained[cell.seed], seed_cfg, ceilings[cell.scenario]))
        if done:
            done(cell, rows[-1])
    return rows


def gap_closed_spread(group: list[BenchRow]) -> Spread:
    """The share of the cost gap closed over all seeds together: mean saving over mean gap, with a
    bootstrap interval that resamples seeds (a single seed's gap can be too small to divide by)."""
    saved = np.array([r.none_cost - r.cost for r in group])
    gap = np.array([r.none_cost - r.bayes_cost for r in group])
    if gap.mean() <= MIN_GAP * np.mean([r.none_cost for r in group]):
        return Spread(*[math.nan] * 6)
    resamples = bootstrap_resamples(len(group))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = saved[resamples].mean(axis=1) / gap[resamples].mean(axis=1)
    per_seed = [r.gap_closed for r in group]
    return Spread(float(saved.mean() / gap.mean()), math.nan, float(np.nanpercentile(ratios, 2.5)),
                  float(np.nanpercentile(ratios, 97.5)), min(per_seed), max(per_seed))


def bench_spread(rows: list[BenchRow]) -> dict:
    """(scenario, method) -> figure -> its Spread over the seeds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.scenario, r.method), []).append(r)
    return {key: {name: gap_closed_spread(group) if name == "gap_closed" else
                  spread_of([getattr(r, name) for r in group]) for name in BENCH_FIGURES}
            for key, group in groups.items()}


# Part III. The heal engine
#
# The stream of Part I as a service would run it: heals in a worker thread or process,
# never holding a lock that inference needs; bounded waits; a failed or hung heal
# contained; bad batches quarantined; optionally, heals applied without waiting.
# Uses Parts I and II.

def use_one_torch_thread() -> None:
    """Tensors here are small: one thread per process is fastest, and leaves the other cores
    to the work that runs beside it (baseline training, plots, a heal worker, other seeds)."""
    torch.set_num_threads(1)


def to_arrays(state: dict) -> dict:
    """A state dict as numpy copies, to send to another process. Tensors sent there go
    by shared memory: torch moves their storage in place, under the feet of any thread
    computing with them, and it costs milliseconds; numpy copies go as plain bytes."""
    return {k: v.detach().numpy().copy() for k, v in state.items()}


def from_arrays(arrays: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def _worker_main(target: Callable, conn, *args) -> None:
    """Every child process starts here: one torch thread, then target(conn, *args).
    A parent that has gone away closes the pipe: the child then leaves quietly."""
    use_one_torch_thread()
    try:
        target(conn, *args)
    except (EOFError, ConnectionError, KeyboardInterrupt):
        pass


def start_worker(target: Callable, *args, method: str = "spawn", daemon: bool = True):
    """Start target(conn, *args) in a child process; return it and our end of a duplex pipe.
    The one way this file starts processes. spawn: a fresh interpreter (about 2 s to import
    torch), safe beside running threads; fork: starts in milliseconds with everything imported."""
    import multiprocessing
    context = multiprocessing.get_context(method)
    ours, theirs = context.Pipe()
    process = context.Process(target=_worker_main, args=(target, theirs, *args), daemon=daemon,
                              name=getattr(target, "__name__", "worker"))
    # Ctrl-C reaches every process of the terminal; a child that ignores it prints nothing, and
    # the parent, which gets it too, stops its children on the way out.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        process.start()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    theirs.close()
    return process, ours


class ThreadHealer:
    """Heals in a daemon thread of this process. Starts at once; but the thread
    shares the interpreter lock with inference, which slows predictions (never
    stops them: no lock of ours is shared) while a heal runs."""

    def __init__(self, model: SelfHealingMLP, cfg: Config):
        self.model, self.cfg = model, cfg
        self.trainer = AdapterTrainer(model, cfg)
        self.future: Optional[Future] = None
        self.started = 0.0

    def submit(self, batch: HealBatch, weight: float) -> None:
        future, trainer = Future(), self.trainer

        def work():
            try:
                future.set_result(trainer.heal(batch, weight))
            except BaseException as e:  # contained: reported by result()
                future.set_exception(e)

        self.future, self.started = future, time.monotonic()
        threading.Thread(target=work, name="heal", daemon=True).start()

    def busy(self) -> bool:
        return self.future is not None and not self.future.done()

    def result(self, timeout: float) -> HealResult:
        """The finished heal, or HealRejected; never waits longer than timeout."""
        future, self.future = self.future, None
        try:
            return future.result(timeout=timeout)
        except FuturesTimeoutError:
            self.abandon()
            raise HealRejected(f"heal did not finish within {timeout:g} s") from None
        except HealRejected:
            raise
        except Exception as e:
            raise HealRejected(f"heal raised {type(e).__name__}: {e}") from None

    def restore(self, state: dict) -> None:
        self.trainer.restore(state)

    def abandon(self) -> None:
        """Leave a hung heal to its (daemon) thread and start again from the served
        weights; the abandoned thread's trainer is never used again."""
        self.future = None
        self.trainer = AdapterTrainer(self.model, self.cfg)

    def close(self) -> None:
        self.future = None


def heal_worker_loop(conn, model_arrays: dict, cfg: Config) -> None:
    """The heal worker process: heal or restore on request, reply with the outcome."""
    model = SelfHealingMLP(cfg.hidden_dim)
    model.load_state_dict(from_arrays(model_arrays))
    model.freeze_backbone_and_head()
    trainer = AdapterTrainer(model, cfg)
    while True:
        message = conn.recv()
        if message[0] == "heal":
            try:
                result = trainer.heal(*message[1:])
                conn.send(("ok", (to_arrays(result.layer.state_dict()), result.losses, result.seconds)))
            except Exception as e:
                conn.send(("error", e if isinstance(e, HealRejected) else f"heal raised {type(e).__name__}: {e}"))
        elif message[0] == "restore":
            trainer.restore(from_arrays(message[1]))
        else:
            return


class ProcessHealer:
    """Heals in a worker process, so that heal steps share nothing with inference.
    Starting one costs an import of torch (about 2 s), and each heal ships the
    batch there and the new layer back (tens of kB). A hung worker is killed."""

    def __init__(self, model: SelfHealingMLP, cfg: Config):
        self.model, self.cfg = model, cfg
        self.process, self.conn = None, None
        self.pending = False
        self.started = 0.0

    def submit(self, batch: HealBatch, weight: float) -> None:
        if self.process is None:
            self.process, self.conn = start_worker(heal_worker_loop, to_arrays(self.model.state_dict()), self.cfg)
        self.conn.send(("heal", batch, weight))
        self.pending, self.started = True, time.monotonic()

    def busy(self) -> bool:
        return self.pending and not self.conn.poll()

    def result(self, timeout: float) -> HealResult:
        self.pending = False
        try:
            if not self.conn.poll(timeout):
                self.abandon()
                raise HealRejected(f"heal did not finish within {timeout:g} s")
            status, payload = self.conn.recv()
        except (EOFError, OSError) as e:
            self.abandon()
            raise HealRejected(f"heal worker died: {type(e).__name__}") from None
        if status != "ok":
            raise payload if isinstance(payload, HealRejected) else HealRejected(payload)
        arrays, losses, seconds = payload
        layer = copy.deepcopy(self.model.reflexive)  # a new object to serve, built from the arrays
        layer.load_state_dict(from_arrays(arrays))
        return HealResult(layer, losses, seconds)

    def restore(self, state: dict) -> None:
        if self.process is not None:  # applied before the next heal: the pipe keeps order
            self.conn.send(("restore", to_arrays(state)))

    def abandon(self) -> None:
        """Kill the worker; the next heal starts a new one from the served weights."""
        self.pending = False
        if self.process is not None:
            self.process.kill()
            self.process.join(timeout=5)
            self.conn.close()
        self.process = self.conn = None

    def close(self) -> None:
        if self.process is None:
            return
        if self.pending:
            self.abandon()
            return
        self.conn.send(("stop",))
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
        self.process = self.conn = None


HEALERS = dict(zip(HEAL_WORKERS, (ThreadHealer, ProcessHealer)))


@dataclass
class PendingHeal:
    """--async-apply: the heal in flight, with what publishing it will need."""
    batch: int
    view: HealBatch
    before: Metrics


class HealEngineStream(SelfHealingStream):
    """Part I's stream with its heals run by a worker (--heal-worker), waited for at most
    --heal-timeout seconds, and rejected, never served, when they fail. A batch with
    non-finite features is quarantined. With --async-apply the stream does not wait:
    a heal is published at the first batch boundary after it finishes."""

    def __init__(self, *args):
        super().__init__(*args)
        self.healer = HEALERS[self.cfg.heal_worker](self.model, self.cfg)
        self.pending: Optional[PendingHeal] = None

    def serve_batches(self, batches) -> None:
        i = 0
        try:
            for i, (X, y) in enumerate(batches, start=1):
                self.step(i, X, y)
            if self.pending is not None:  # account for the last heal too
                self.publish_pending(i, wait=True)
        finally:
            self.healer.close()

    def step(self, i: int, X: np.ndarray, y: np.ndarray) -> BatchRecord:
        if not np.isfinite(X).all():
            bad = int((~np.isfinite(X)).any(axis=1).sum())
            self.log.event("batch_quarantined", i, reason=f"{bad} rows with NaN or infinite features")
            record = BatchRecord(i, "QUARANTINED", "quarantined")
            self.log.record(record, drifting=False)
            return record
        if self.pending is not None and not self.healer.busy():
            self.publish_pending(i, wait=False)
        return super().step(i, X, y)

    def heal(self, i: int, record: BatchRecord, view: HealBatch, before: Metrics) -> Optional[HealResult]:
        if self.cfg.async_apply:
            self.start_async(i, record, view, before)
            return None
        self.healer.submit(view, record.pos_weight)
        try:
            return self.healer.result(self.cfg.heal_timeout)
        except HealRejected as e:
            self.reject(i, record, str(e))
            return None

    def continue_from(self, state: dict) -> None:
        self.healer.restore(state)

    def start_async(self, i: int, record: BatchRecord, view: HealBatch, before: Metrics) -> None:
        """Start a heal and serve on; one heal at a time, a late one abandoned."""
        if self.pending is not None:
            if time.monotonic() - self.healer.started <= self.cfg.heal_timeout:
                record.action = "heal_busy"  # this batch's heal is skipped
                return
            self.healer.abandon()
            self.log.event("heal_failed", self.pending.batch,
                           reason=f"heal did not finish within {self.cfg.heal_timeout:g} s")
        self.healer.submit(view, record.pos_weight)
        self.pending = PendingHeal(i, view, before)
        record.state, record.action = "HEALING", "heal_started"

    def publish_pending(self, i: int, wait: bool) -> None:
        """Publish the heal in flight at batch i's boundary (its own batch's row is already written)."""
        pending, self.pending = self.pending, None
        record = BatchRecord(pending.batch, "HEALING", "heal")  # bookkeeping only
        try:
            result = self.healer.result(self.cfg.heal_timeout if wait else 0)
        except HealRejected as e:
            self.log.event("heal_failed", pending.batch, reason=str(e))
            return
        self.publish(pending.batch, record, pending.view, pending.before, result, applied_at=i)
        self.roll_back_if_degraded(i, record, result.layer)


# Part IV. Outputs
#
# What a person reads: the pipeline's stage lines and the per-batch table on the console,
# the report under it, the monitoring exports (metrics.csv, events.json,
# threshold_config.json) and the plots. Every file is written whole or not at all.
# Uses Parts I to III.

def _num(value, spec: str) -> str:
    """A number formatted by spec, or '-' when missing or not finite."""
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _accuracy(m: Optional[Metrics]) -> Optional[float]:
    return None if m is None else m.accuracy


def pipeline_lines(cfg: Config, trained: Trained, fidi: FIDIMonitor) -> list[str]:
    """One line per stage before the stream, in the order Part I runs them."""
    data = trained.data
    clean = metrics_at(data.test.y, predict_proba(trained.model, data.test.X))
    return [
        f"Data: {cfg.n_train:,} training, {cfg.n_test:,} clean test and {cfg.n_drift:,} drifted rows, "
        f"{100 * fraud_prior(cfg.n_drift, cfg):.1f}% fraud; V14 mean and share < {cfg.rule_threshold:g}: "
        f"clean test {v14_summary(data.test, cfg)}, drifted {v14_summary(data.drift, cfg)}.",
        f"Training: {cfg.epochs} epochs; the self-healing MLP scores {100 * clean.accuracy:.1f}% on the clean "
        f"test set (TP/TN/FP/FN {clean.counts}).",
        f"FIDI calibrated on training V14: mu {fidi.mu:.3f}, sigma {fidi.sigma:.3f}; drifting when the z of the "
        f"last {cfg.fidi_window} batch means exceeds {cfg.fidi_threshold:g}.",
        f"Stream: {cfg.n_batches} batches of {cfg.batch_size} rows, drawn with replacement from the drifted set.",
    ]


# The per-batch console table: title, alignment and width, and what a record shows under it.
BATCH_COLUMNS = (
    ("batch", ">5", lambda r: str(r.batch)),
    ("state", "<11", lambda r: r.state),
    ("action", "<13", lambda r: r.action),
    ("z", ">6", lambda r: _num(r.z, ".3f")),
    ("confl", ">5", lambda r: str(r.conflicts)),
    ("pos_w", ">5", lambda r: _num(r.pos_weight, ".2f")),
    ("served", ">6", lambda r: _num(_accuracy(r.served), ".3f")),
    ("healed", ">6", lambda r: _num(_accuracy(r.healed), ".3f")),
    ("shadow", ">6", lambda r: _num(_accuracy(r.shadow), ".3f")),
    ("lift", ">6", lambda r: _num(r.lift, "+.3f")),
    ("preq", ">6", lambda r: _num(r.prequential_lift, "+.3f")),
)


def batch_header() -> str:
    return "  ".join(format(title, spec) for title, spec, _ in BATCH_COLUMNS)


def batch_line(r: BatchRecord) -> str:
    return "  ".join(format(show(r), spec) for _, spec, show in BATCH_COLUMNS)


# -- The report

# The article's published figures, as it prints them.
ARTICLE_ROWS = {
    "clean": ("Clean (self-healing MLP, clean test)", "92.9%", "0.784", "0.727", "0.754", "109/820/30/41"),
    "no_healing": ("Under drift, no healing", "44.6%", "0.194", "0.853", "0.316", "128/318/532/22"),
    "shadow": ("Shadow, frozen", "44.6%", "0.194", "0.853", "0.316", "128/318/532/22"),
    "healed": ("Self-healed", "72.4%", "0.224", "0.340", "0.270", "51/673/177/99"),
}


def _formatted(m: Metrics) -> tuple:
    return (f"{100 * m.accuracy:.1f}%", f"{m.precision:.3f}", f"{m.recall:.3f}", f"{m.f1:.3f}", m.counts)


def article_comparison(run: RunResult) -> list[tuple[str, str, str]]:
    """(figure, article, this run) for every number of the article's table and text."""
    log, table = run.log, run.article_table()
    rows = []
    for key, (title, *article) in ARTICLE_ROWS.items():
        for label, a, o in zip(("accuracy", "precision", "recall", "F1", "TP/TN/FP/FN"), article,
                               _formatted(table[key])):
            rows.append((f"{title}: {label}", a, o))
    best = run.registry.best_post_heal()
    lift = log.lift
    rows += [
        ("Batches healed", "25 of 25", f"{log.counts['heal']} of {run.cfg.n_batches}"),
        ("Rollbacks", "0", str(log.counts["rollback"])),
        ("Registry snapshots saved", "51", str(run.registry.saved)),
        ("Best post-heal snapshot", "v21 (batch 10, acc 0.710, F1 0.408)",
         "none" if best is None else f"v{best.version} (batch {best.batch}, acc {best.accuracy:.3f}, F1 {best.f1:.3f})"),
        ("Batches with positive lift", "25 of 25", f"{lift.positive} of {lift.n}"),
        ("Lift range", "+0.050 to +0.360", f"{lift.min:+.3f} to {lift.max:+.3f}" if lift.n else "-"),
        ("Mean lift (in-sample)", "+22.3 pp", f"{100 * lift.mean:+.1f} pp" if lift.n else "-"),
        ("FIDI mu, sigma", "-0.363, 1.323", f"{run.fidi.mu:.3f}, {run.fidi.sigma:.3f}"),
        ("z first above threshold", "batch 3", f"batch {log.first_drift_batch}" if log.first_drift_batch else "never"),
        (f"Clean test V14: mean, share < {run.cfg.rule_threshold:g}", "-0.377, 18.8%",
         v14_summary(run.data.test, run.cfg)),
        (f"Drifted V14: mean, share < {run.cfg.rule_threshold:g}", "-2.261, 77.4%",
         v14_summary(run.data.drift, run.cfg)),
    ]
    return rows


def is_default_experiment(cfg: Config) -> bool:
    """True when every flag that shapes the article's numbers is at its default."""
    default = Config()
    return all(getattr(cfg, f.name) == getattr(default, f.name)
               for f in dataclasses.fields(cfg) if f.metadata["role"] == "experiment")


def text_table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(f"{c:<{w}}" if a == "<" else f"{c:>{w}}" for c, w, a in zip(cells, widths, align)).rstrip()
    return [line(header), line(["-" * w for w in widths])] + [line([str(c) for c in row]) for row in rows]


def break_even_line(healed: Metrics, unhealed: Metrics, cfg: Config) -> str:
    """At which false-alarm cost healing starts to pay, from the two models' counts."""
    extra_misses, fewer_alarms = healed.fn - unhealed.fn, unhealed.fp - healed.fp
    if fewer_alarms == 0:
        return "Healing changed no false alarm: its cost depends on missed frauds alone."
    price = cfg.fn_cost * extra_misses / fewer_alarms
    side = "more" if fewer_alarms > 0 else "less"
    return (f"On the drifted set, healing costs less than no healing only when a false alarm costs {side} than "
            f"${price:,.0f} (it misses {extra_misses:+d} frauds and raises {-fewer_alarms:+d} false alarms, "
            f"at ${cfg.fn_cost:,.0f} per missed fraud).")


def report(run: RunResult, e: Evaluation) -> list[str]:
    cfg, log = run.cfg, run.log
    lines = ["", "Reproduction of the article's table (seed 42, default flags)"]
    if not is_default_experiment(cfg):
        lines.append("Note: flags differ from the article's defaults, so its figures are not expected here.")
    rows = [[label, a, o, "match" if a == o else "DIFFERS"] for label, a, o in article_comparison(run)]
    lines += text_table(["figure", "article", "this run", ""], rows, "<>><")
    matched = sum(row[3] == "match" for row in rows)
    lines.append(f"{matched} of {len(rows)} figures match the article.")

    lines += ["", "What the numbers mean: every model on the drifted set (in-sample: the stream drew its",
              f"labelled batches from these rows) and on a fresh drifted holdout it never saw ({cfg.n_drift:,} rows "
              f"each).", f"Cost per 1,000 rows at ${cfg.fn_cost:,.0f} per missed fraud and ${cfg.fp_cost:,.0f} "
              f"per false alarm."]
    header = ["set", "model", "acc", "prec", "recall", "F1", "TP/TN/FP/FN", "ROC-AUC", "PR-AUC", "cost/1000"]
    rows = []
    for set_name, scored in (("drifted", e.drift_rows), ("holdout", e.holdout_rows)):
        for key, s in scored.items():
            m = s.metrics
            rows.append([set_name, ROW_TITLES[key], f"{100 * m.accuracy:.1f}%", f"{m.precision:.3f}",
                         f"{m.recall:.3f}", f"{m.f1:.3f}", m.counts, _num(s.roc_auc, ".3f"),
                         _num(s.pr_auc, ".3f"), f"{s.cost:,.0f}"])
    lines += text_table(header, rows, "<<>>>>>>>>")
    lines += [
        "",
        f"Mean prequential lift (model that served each batch, before its heal, minus shadow): "
        f"{100 * log.prequential.mean:+.1f} pp accuracy, {100 * log.prequential_f1.mean:+.1f} pp F1 "
        f"(the article's in-sample lift: {_num(100 * log.lift.mean, '+.1f')} pp).",
        f"Bayes-optimal limits at drift {cfg.drift_strength:g}: accuracy {100 * e.bayes_accuracy:.1f}%, "
        f"ROC-AUC {e.bayes_auc:.3f} (likelihood ratio; a threshold on V14 alone reaches at most "
        f"{v14_threshold_auc(drifted_set_law(cfg, cfg.n_drift)):.3f}); always answering normal scores "
        f"{100 * e.drift_rows['always_normal'].metrics.accuracy:.1f}% on the drifted set.",
        f"Forgetting: clean-test accuracy {100 * e.clean_before.metrics.accuracy:.1f}% -> "
        f"{100 * e.clean_after.metrics.accuracy:.1f}%, ROC-AUC {e.clean_before.roc_auc:.3f} -> "
        f"{e.clean_after.roc_auc:.3f}.",
        f"Cost-optimal threshold for the healed model (chosen on the drifted set): "
        f"{'flag every row' if e.cost_threshold == -math.inf else format(e.cost_threshold, '.3f')}; "
        f"on the holdout it costs {cost_per_1000(e.healed_at_cost_threshold, cfg):,.0f} per 1,000 rows "
        f"(at 0.5: {e.holdout_rows['healed'].cost:,.0f}).",
        break_even_line(e.drift_rows["healed"].metrics, e.drift_rows["no_healing"].metrics, cfg),
        f"Registry: {run.registry.saved} snapshots saved, {len(run.registry.snapshots)} retained "
        f"(clean, best {cfg.keep_best}, last {cfg.keep_last}). Events: " +
        ", ".join(f"{v} {k}" for k, v in log.counts.items()) + ".",
    ]
    return lines


def sweep_report(summaries: list[dict], spreads: dict) -> list[str]:
    rows = []
    for name, spec in SWEEP_FIGURES.items():
        s = spreads[name]
        rows.append([name, format(s.mean, spec), _num(s.sd, spec.lstrip("+")),
                     f"[{format(s.low, spec)}, {format(s.high, spec)}]", format(s.min, spec), format(s.max, spec)])
    return ["", f"Across {len(summaries)} seeds (pp = percentage points; cost per 1,000 rows; 95% bootstrap "
                f"interval of the mean):",
            *text_table(["figure", "mean", "sd", "95% interval", "min", "max"], rows, "<>>>>>")]


# -- Exports

class AtomicFile:
    """A file written under a temporary name beside its target and renamed into place by
    commit(): readers never see half a file, and a failed run leaves the previous one
    as it was. The temporary name is unique, so two writers never share one."""

    def __init__(self, path: Path, binary: bool = False):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self.file = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="")

    def commit(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        try:
            self.file.close()
        except OSError:  # a full disk fails the last flush too; the file goes all the same
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_atomic(path: Path, text: str) -> None:
    with AtomicFile(path) as f:
        f.write(text)


TEMPORARY_NAME = re.compile(r"\..+\.(\d+)\.[0-9a-f]{8}\.tmp")  # AtomicFile's: .NAME.PID.RANDOM.tmp


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2 ** 22  # someone else's process (or a number no process can have)
    return True


def remove_stale_temporaries(directory: Path) -> int:
    """Remove what a killed run (kill -9 leaves no chance to clean up) left in directory: temporary
    files of AtomicFile whose process is gone. Returns how many."""
    removed = 0
    for path in directory.iterdir() if directory.is_dir() else ():
        match = TEMPORARY_NAME.fullmatch(path.name)
        if match and not _process_alive(int(match[1])):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


class Console:
    """Standard output that cannot stop the run: after the first failed write (a reader that went
    away, as `| head` does, or a full disk) it stays silent and keeps the error for main."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.failure: Optional[OSError] = None

    def __call__(self, line: str = "") -> None:
        if self.failure is not None:
            return
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except OSError as e:
            self.failure = e
            try:  # or the interpreter fails again flushing it at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            except (OSError, ValueError):
                pass


def csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}" if math.isfinite(value) else ""
    return str(value)


def _lookup(record: BatchRecord, path: str):
    """record.a.b, or None where a part is missing."""
    value = record
    for part in path.split("."):
        value = None if value is None else getattr(value, part)
    return value


# metrics.csv: each column and the record attribute written under it.
CSV_TABLE = (
    [(name, name) for name in ("batch", "state", "action", "z", "conflicts", "fraud_frac", "pos_weight")]
    + [(f"{model}_{m}", f"{model}.{m}") for model in ("healed", "served", "shadow", "baseline")
       for m in ("accuracy", "precision", "recall", "f1")]
    + [(name, name) for name in ("lift", "prequential_lift", "prequential_f1_lift", "monitor_accuracy",
                                 "monitor_f1", "version_pre", "version_post", "restored_version")]
)
CSV_COLUMNS = [column for column, _ in CSV_TABLE]


def csv_row(r: BatchRecord) -> list[str]:
    return [csv_cell(_lookup(r, path)) for _, path in CSV_TABLE]


def _json_safe(value):
    """Strict JSON: NaN and infinities become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


RUN_KEY = "run"  # threshold_config.json's record of the run; --thresholds reads past it


def threshold_dict(cfg: Config) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata["threshold"]}


def write_threshold_config(directory: Path, cfg: Config) -> None:
    """threshold_config.json: the thresholds an operator tunes (what --thresholds reads back), and
    under "run" where the numbers came from: every setting, the command that reproduces the run,
    and the versions of Python, torch and numpy."""
    default = Config()
    flags = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "out" or value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        flags += [flag] if f.type == "bool" else [flag, shlex.quote(str(value))]
    run = {"command": " ".join(["python", "self_healing_production_final.py", *flags]),
           "config": dataclasses.asdict(cfg),
           "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}}
    entry = {**threshold_dict(cfg), RUN_KEY: run}
    write_atomic(directory / "threshold_config.json", json.dumps(_json_safe(entry), indent=2, allow_nan=False) + "\n")


class Exporter:
    """metrics.csv and events.json, streamed row by row into temporary files (memory stays
    flat on long streams) and renamed into place only when the run has finished."""

    def __init__(self, directory: Path, cfg: Config):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.files = [AtomicFile(self.dir / "metrics.csv"), AtomicFile(self.dir / "events.json")]
        self._csv = csv.writer(self.files[0].file, lineterminator="\n")
        self._csv.writerow(CSV_COLUMNS)
        self._events = self.files[1].file
        self._events.write("[")
        self._n_events = 0

    def write_record(self, r: BatchRecord) -> None:
        self._csv.writerow(csv_row(r))

    def write_event(self, entry: dict) -> None:
        self._events.write(("," if self._n_events else "") + "\n  " + json.dumps(_json_safe(entry), allow_nan=False))
        self._n_events += 1

    def finish(self) -> None:
        self._events.write("\n]\n")
        for f in self.files:
            f.commit()
        write_threshold_config(self.dir, self.cfg)

    def abort(self) -> None:
        for f in self.files:
            f.discard()


def attach_outputs(log: StreamLog, cfg: Config, console: Callable[[str], None],
                   export_dir: Optional[Path]) -> Optional["Exporter"]:
    """Connect the console table and (when export_dir is given) the exporter to the stream's log."""
    exporter = Exporter(export_dir, cfg) if export_dir is not None else None
    if exporter:
        log.record_listeners.append(exporter.write_record)
        log.event_listeners.append(exporter.write_event)
    if not cfg.quiet:
        log.record_listeners.append(lambda r: console(batch_line(r)))
        console(batch_header())
    return exporter


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    """A small CSV written whole: a header, then each row's values under their columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(columns)] + [",".join(csv_cell(row[c]) for c in columns) for row in rows]
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def write_sweep_csv(summaries: list[dict], directory: Path) -> Path:
    return write_csv(directory / "seed_sweep.csv", ["seed", *SWEEP_FIGURES, "heals", "rollbacks"], summaries)


# -- The bench's table, CSV, cell files and plot

BENCH_COLUMNS = (  # title, figure, format
    ("acc", "accuracy", ".3f"), ("F1", "f1", ".3f"), ("ROC-AUC", "roc_auc", ".3f"), ("cost/1000", "cost", ",.0f"),
    ("kappa", "kappa", "+.2f"), ("gap closed", "gap_closed", "+.2f"), ("adapt/1000", "adaptations_per_1000", ".0f"),
)


def _mean_pm(s: Spread, spec: str) -> str:
    """'mean +-half', half the width of the 95% interval; '-' where the figure does not exist."""
    if not math.isfinite(s.mean):
        return "-"
    half = (s.high - s.low) / 2
    return f"{format(s.mean, spec)} +-{format(half, spec.lstrip('+'))}" if half > 0 else format(s.mean, spec)


def _detection_note(rows: list[BenchRow], scenario: str) -> str:
    """How soon FIDI saw a sudden drift, over the seeds."""
    if scenario not in SUDDEN_SCENARIOS:
        return ""
    delays = [r.detection_delay for r in rows if r.scenario == scenario and r.method == "none"]
    seen = [d for d in delays if math.isfinite(d)]
    if not seen:
        return "; FIDI never calls it DRIFTING"
    return (f"; FIDI calls it DRIFTING {np.mean(seen):.1f} batches after onset"
            + (f" (in {len(seen)} of {len(delays)} seeds)" if len(seen) < len(delays) else ""))


def bench_report(rows: list[BenchRow], cfg: Config) -> list[str]:
    """One table: per scenario, every method's means over the seeds with their 95% intervals, then the ceiling."""
    spreads, seeds = bench_spread(rows), sorted({r.seed for r in rows})
    table = []
    for scenario in [s for s in SCENARIOS if (s, "none") in spreads]:
        first = next(r for r in rows if r.scenario == scenario)
        table.append([f"{scenario}: {SCENARIO_STORIES[scenario]}{_detection_note(rows, scenario)}"])
        for method in [m for m in BENCH_METHODS if (scenario, m) in spreads]:
            s = spreads[(scenario, method)]
            table.append(["  " + method] + [_mean_pm(s[name], spec) for _, name, spec in BENCH_COLUMNS])
        table.append(["  Bayes ceiling", f"{first.bayes_accuracy:.3f}", "-", f"{first.bayes_auc:.3f}",
                      f"{first.bayes_cost:,.0f}", "-", "+1.00", "-"])
    header = ["scenario / method"] + [title for title, _, _ in BENCH_COLUMNS]
    widths = [max(len(r[k]) for r in [header] + table if len(r) > 1) for k in range(len(header))]

    def line(cells):
        if len(cells) == 1:
            return cells[0]
        return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths))).rstrip()
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}..{seeds[-1]}"
    return ["", f"Scenario bench: {len(rows)} cells, {seed_text}, {cfg.n_batches} batches of "
                f"{cfg.batch_size} rows; prequential (each batch predicted before any adaptation on it);",
            "mean +- half the 95% bootstrap interval over the seeds. Accuracy, F1 and kappa (against always "
            "answering normal) at 0.5;",
            f"cost per 1,000 rows at ${cfg.fn_cost:,.0f} per missed fraud and ${cfg.fp_cost:,.0f} per false alarm, "
            f"flagging P(fraud) > {cost_threshold(cfg):.3f} = fp/(fp+fn) (rethreshold: its learned threshold);",
            f"gap closed = (cost of none - cost) / (cost of none - Bayes cost), costs averaged over the seeds; "
            f"'-' where none is within {100 * MIN_GAP:.0f}% of the Bayes cost.",
            line(header), line(["-" * w for w in widths]), *[line(r) for r in table]]


def write_bench_csv(rows: list[BenchRow], directory: Path) -> Path:
    return write_csv(directory / "bench.csv", [f.name for f in dataclasses.fields(BenchRow)],
                     [dataclasses.asdict(r) for r in rows])


def bench_fingerprint(cfg: Config) -> dict:
    """The settings a bench cell's numbers depend on: a merge accepts only cells made with these."""
    varied_by_the_bench = {"scenario", "heal_method", "supervision", "async_apply"}
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.metadata["role"] != "run" and f.name not in varied_by_the_bench}


def write_cell(directory: Path, cell: BenchCell, row: BenchRow, cfg: Config) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    entry = {"cell": cell.index, "config": bench_fingerprint(cfg), "row": dataclasses.asdict(row)}
    write_atomic(directory / f"{cell.name}.json", json.dumps(_json_safe(entry), allow_nan=False) + "\n")


MAX_INPUT_BYTES = 1 << 20  # a threshold file or a bench cell is a few hundred bytes


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[:width] + "..."


def read_json_file(path, what: str):
    """A small JSON file of ours, read back: a regular file (never a FIFO or a device, which could
    block or never end), at most 1 MiB, UTF-8, strict JSON (no NaN or Infinity). Anything else is
    a ConfigError in one line."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{what} {path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        try:
            raw = f.read(MAX_INPUT_BYTES + 1)
        except OSError as e:
            raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(raw) > MAX_INPUT_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_INPUT_BYTES // 2 ** 20} MiB")

    def no_constants(name):
        raise ConfigError(f"{what} {path} holds {name}, which is not a finite number")
    try:
        return json.loads(raw.decode("utf-8-sig"), parse_constant=no_constants)
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path} is not JSON: {e.msg} at line {e.lineno}") from None
    except RecursionError:
        raise ConfigError(f"{what} {path} is nested too deeply") from None


def read_cells(directory: Path, cells: list[BenchCell], cfg: Config) -> list[BenchRow]:
    """Every cell's row, from the shards' files; ConfigError names what is missing or foreign."""
    missing = [c.name for c in cells if not (directory / f"{c.name}.json").is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"--merge: {len(missing)} of {len(cells)} cells missing in {directory}: {shown}")
    rows, fingerprint = [], _json_safe(bench_fingerprint(cfg))
    for c in cells:
        path = directory / f"{c.name}.json"
        entry = read_json_file(path, "--merge: bench cell")
        try:
            row = BenchRow(**{k: math.nan if v is None else v for k, v in entry["row"].items()})
            same_cell = (entry["cell"] == c.index
                         and (row.scenario, row.method, row.seed) == (c.scenario, c.method, c.seed))
            same_flags = entry["config"] == fingerprint
            numbers = [getattr(row, f.name) for f in dataclasses.fields(BenchRow) if f.type == "float"]
            if not all(type(v) in (int, float) for v in numbers):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"--merge: {path} is not a bench cell file") from None
        if not same_cell:
            raise ConfigError(f"--merge: {path} holds another cell than its name says")
        if not same_flags:
            raise ConfigError(f"--merge: {path} was made by a bench with other flags")
        rows.append(row)
    return rows


# -- Plots

COLORS = {"healed": "#1f77b4", "served": "#2ca02c", "shadow": "#7f7f7f", "rollback": "#d62728",
          "heal": "#9467bd", "threshold": "#ff7f0e"}


def _series(records, attr, metric=None):
    values = []
    for r in records:
        v = getattr(r, attr)
        if metric is not None:
            v = None if v is None else getattr(v, metric)
        values.append(np.nan if v is None else v)
    return np.array(values, dtype=float)


def _legend_below(ax, ncol=4):
    # Outside the axes, below them, so that no legend ever covers data.
    ax.figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=ncol, frameon=False)


def _metric_over_batches(ax, records, metric, title):
    batches = [r.batch for r in records]
    ax.plot(batches, _series(records, "healed", metric), "o-", color=COLORS["healed"],
            label="healed (after its heal, in-sample)")
    ax.plot(batches, _series(records, "served", metric), "s--", color=COLORS["served"],
            label="served (before its heal: prequential)")
    ax.plot(batches, _series(records, "shadow", metric), "^:", color=COLORS["shadow"], label="frozen shadow")
    for r in records:
        if r.restored_version is not None:
            ax.axvline(r.batch, color=COLORS["rollback"], alpha=0.5, lw=2)
    ax.set(title=title, xlabel="stream batch", ylabel=metric.replace("f1", "F1"), ylim=(0, 1.02))
    ax.grid(alpha=0.3)


@dataclass
class PlotData:
    """What the plots draw, gathered once from a run."""
    run: RunResult
    evaluation: Evaluation
    records: list       # batches that were served (quarantined ones are left out)
    batches: np.ndarray
    z: np.ndarray
    rollbacks: list

    @classmethod
    def of(cls, run: RunResult, evaluation: Evaluation) -> "PlotData":
        records = [r for r in run.log.records if r.served is not None]
        return cls(run, evaluation, records, np.array([r.batch for r in records]), _series(records, "z"),
                   [r for r in records if r.restored_version is not None])


def plot_accuracy(plt, d: PlotData):
    fig, ax = plt.subplots(figsize=(10, 5.5), layout="constrained")
    _metric_over_batches(ax, d.records, "accuracy", "Accuracy per stream batch")
    healed = [r.batch for r in d.records if r.version_post is not None]
    ax.plot(healed, np.full(len(healed), 0.03), "|", color=COLORS["heal"], ms=14, mew=2, label="heal")
    if d.rollbacks:
        ax.plot([r.batch for r in d.rollbacks], np.full(len(d.rollbacks), 0.08), "x", color=COLORS["rollback"],
                ms=10, mew=2, label="rollback")
    _legend_below(ax, ncol=3)
    return fig


def plot_lift(plt, d: PlotData):
    """The article's in-sample lift beside the prequential one."""
    fig, ax = plt.subplots(figsize=(10, 5.5), layout="constrained")
    width = 0.4
    ax.bar(d.batches - width / 2, _series(d.records, "lift"), width, color=COLORS["healed"],
           label="article's lift (after heal, on the batch it trained on)")
    ax.bar(d.batches + width / 2, _series(d.records, "prequential_lift"), width, color=COLORS["served"],
           label="prequential lift (model that served the batch)")
    ax.axhline(0, color="black", lw=0.8)
    ax.set(title="Accuracy lift over the frozen shadow", xlabel="stream batch", ylabel="accuracy minus shadow's")
    ax.grid(alpha=0.3, axis="y")
    _legend_below(ax, ncol=1)
    return fig


def plot_fidi(plt, d: PlotData):
    threshold = d.run.cfg.fidi_threshold
    fig, ax = plt.subplots(figsize=(10, 5.5), layout="constrained")
    ax.plot(d.batches, d.z, "o-", color=COLORS["healed"], label="FIDI z-score of V14")
    ax.axhline(threshold, color=COLORS["threshold"], ls="--", label=f"threshold {threshold:g}")
    ax.fill_between(d.batches, 0, np.nanmax(np.append(d.z, threshold)) * 1.1, where=d.z > threshold,
                    color=COLORS["rollback"], alpha=0.12, step="mid", label="drifting")
    ax.set(title="Feature drift: FIDI z-score (window mean of V14 vs training)", xlabel="stream batch",
           ylabel="z = |window mean - mu| / sigma")
    ax.grid(alpha=0.3)
    _legend_below(ax, ncol=3)
    return fig


def plot_states(plt, d: PlotData):
    fig, ax = plt.subplots(figsize=(10, 4), layout="constrained")
    state_colors = {"HEALTHY": "#2ca02c", "DRIFTING": "#ff7f0e", "HEALING": "#1f77b4", "ROLLED_BACK": "#d62728",
                    "QUARANTINED": "#7f7f7f"}
    for r in d.run.log.records:  # quarantined batches too
        ax.barh(STATES.index(r.state), 0.9, left=r.batch - 0.45, color=state_colors[r.state])
    ax.set_yticks(range(len(STATES)), STATES)
    ax.set(title="Engine state per batch", xlabel="stream batch", xlim=(0.4, max(d.batches, default=1) + 0.6),
           ylim=(-0.6, len(STATES) - 0.4))
    ax.grid(alpha=0.3, axis="x")
    return fig


def plot_f1(plt, d: PlotData):
    fig, ax = plt.subplots(figsize=(10, 5.5), layout="constrained")
    _metric_over_batches(ax, d.records, "f1", "F1 per stream batch, rollbacks annotated")
    for r in d.rollbacks:
        ax.annotate(f"rollback to v{r.restored_version}", (r.batch, 0.95), rotation=90, ha="right", va="top",
                    color=COLORS["rollback"], fontsize=10)
    _legend_below(ax, ncol=3)
    return fig


def plot_registry(plt, d: PlotData):
    """Every snapshot by version, with the rollback target."""
    fig, ax = plt.subplots(figsize=(10, 5.5), layout="constrained")
    heals = [e for e in d.run.log.events if e["type"] == "heal"]
    ax.plot([e["version_pre"] for e in heals], [e["f1_before"] for e in heals], "o", color=COLORS["shadow"],
            label="pre-heal snapshot")
    ax.plot([e["version_post"] for e in heals], [e["f1_after"] for e in heals], "o", color=COLORS["healed"],
            label="post-heal snapshot")
    best = d.run.registry.best_post_heal()
    if best is not None:
        ax.plot([best.version], [best.f1], "*", ms=20, color=COLORS["threshold"],
                label=f"rollback target v{best.version} (batch {best.batch}, F1 {best.f1:.3f})")
    ax.set(title=f"Registry: {d.run.registry.saved} snapshots by version (F1 on their batch)",
           xlabel="version (v1 = clean)", ylabel="F1", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    _legend_below(ax, ncol=3)
    return fig


def plot_metric_bars(plt, d: PlotData):
    e = d.evaluation
    bars = [("clean", e.clean_before.metrics), ("no healing", e.drift_rows["no_healing"].metrics),
            ("shadow", e.drift_rows["shadow"].metrics), ("healed", e.drift_rows["healed"].metrics),
            ("healed, holdout", e.holdout_rows["healed"].metrics),
            ("always normal", e.drift_rows["always_normal"].metrics)]
    names = ("accuracy", "precision", "recall", "f1")
    fig, ax = plt.subplots(figsize=(11, 5.5), layout="constrained")
    width = 0.8 / len(bars)
    for k, (label, m) in enumerate(bars):
        ax.bar(np.arange(4) + (k - (len(bars) - 1) / 2) * width, [getattr(m, n) for n in names], width, label=label)
    ax.set_xticks(range(4), ["accuracy", "precision", "recall", "F1"])
    ax.set(title="Clean, drifted, shadow and healed (drifted set unless marked)", ylabel="score", ylim=(0, 1.02))
    ax.grid(alpha=0.3, axis="y")
    _legend_below(ax, ncol=3)
    return fig


def plot_dashboard(plt, d: PlotData):
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), layout="constrained")
    _metric_over_batches(axes[0, 0], d.records, "accuracy", "Accuracy")
    _metric_over_batches(axes[0, 1], d.records, "f1", "F1")
    axes[1, 0].plot(d.batches, d.z, "o-", color=COLORS["healed"])
    axes[1, 0].axhline(d.run.cfg.fidi_threshold, color=COLORS["threshold"], ls="--")
    axes[1, 0].set(title="FIDI z-score (dashed: threshold)", xlabel="stream batch", ylabel="z")
    axes[1, 1].bar(d.batches, _series(d.records, "prequential_lift"), color=COLORS["served"])
    axes[1, 1].axhline(0, color="black", lw=0.8)
    axes[1, 1].set(title="Prequential lift over shadow", xlabel="stream batch", ylabel="accuracy difference")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    _legend_below(axes[0, 0], ncol=3)
    fig.suptitle("Self-healing monitor", fontsize=16)
    return fig


PLOTS = {"01_accuracy.png": plot_accuracy, "02_lift.png": plot_lift, "03_fidi_zscore.png": plot_fidi,
         "04_state_timeline.png": plot_states, "05_f1_rollbacks.png": plot_f1,
         "06_registry_snapshots.png": plot_registry, "07_metric_bars.png": plot_metric_bars,
         "08_dashboard.png": plot_dashboard}


def pyplot():
    """matplotlib, imported only when a plot is drawn (it costs about 0.3 s)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 12, "axes.titlesize": 14, "axes.labelsize": 12, "figure.dpi": 110})
    return plt


def save_figure(plt, fig, path: Path) -> Path:
    with AtomicFile(path, binary=True) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def draw_plots(data: PlotData, directory: Path, names) -> list[Path]:
    plt = pyplot()
    return [save_figure(plt, PLOTS[name](plt, data), directory / name) for name in names]


def plot_seed_sweep(summaries: list[dict], directory: Path) -> Path:
    plt = pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 5.5), layout="constrained")
    seeds = [s["seed"] for s in summaries]
    x = np.arange(len(seeds))
    ax.bar(x - 0.2, [s["recovery_pp"] for s in summaries], 0.4, label="recovery, in-sample (pp)")
    ax.bar(x + 0.2, [s["prequential_lift_pp"] for s in summaries], 0.4, label="mean prequential lift (pp)")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [str(s) for s in seeds])
    ax.set(title="Accuracy gain of healing, per seed", xlabel="seed", ylabel="percentage points")
    ax.grid(alpha=0.3, axis="y")
    _legend_below(ax, ncol=2)
    return save_figure(plt, fig, directory / "seed_sweep.png")


def plot_bench(rows: list[BenchRow], directory: Path) -> Path:
    """Heatmap of the mean share of the cost gap each method closes, scenario by method."""
    plt = pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    spreads = bench_spread(rows)
    gap = np.array([[spreads[(s, m)]["gap_closed"].mean for m in BENCH_METHODS] for s in SCENARIOS])
    fig, ax = plt.subplots(figsize=(12, 6), layout="constrained")
    image = ax.imshow(np.clip(gap, -1, 1), cmap="RdYlGn", vmin=-1, vmax=1, aspect="auto")
    for (k, j), value in np.ndenumerate(gap):
        ax.text(j, k, "no gap" if np.isnan(value) else f"{value:+.2f}", ha="center", va="center", fontsize=10,
                color="#555555" if np.isnan(value) else "black")
    ax.set_xticks(range(len(BENCH_METHODS)), BENCH_METHODS, rotation=30, ha="right")
    ax.set_yticks(range(len(SCENARIOS)), SCENARIOS)
    ax.set_title("Share of the cost gap to the Bayes ceiling closed (1 = Bayes, 0 = no adaptation; "
                 "colours clipped at -1)")
    fig.colorbar(image, ax=ax, label="gap closed")
    return save_figure(plt, fig, directory / "bench.png")


# Part V. Speed
#
# Work that makes the run fast without changing one number: an Adam without torch.optim's
# import, the baseline trained and half the plots drawn in forked processes, seeds spread
# over processes. Each piece says what it saves and which test pins it. Uses Parts I to IV.

class Adam:
    """torch.optim.Adam's arithmetic on CPU (its single-tensor path), bit for bit.

    Why not torch.optim.Adam itself: its first use imports torch._dynamo, which
    costs about 1.5 s, more than this whole experiment's training.
    Pinned by test_adam_matches_torch_optim_adam_bit_for_bit.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.steps = [0] * len(self.params)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad, m, v = p.grad, self.exp_avg[i], self.exp_avg_sq[i]
            self.steps[i] += 1
            m.lerp_(grad, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            bias_correction1 = 1 - self.beta1 ** self.steps[i]
            bias_correction2 = 1 - self.beta2 ** self.steps[i]
            denom = (v.sqrt() / bias_correction2 ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-(self.lr / bias_correction1))


def _send_result(conn, fn: Callable, *args) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))


class ChildProcess:
    """fn(*args) in a child process; .result() returns what fn returned. Forked children
    start in milliseconds with all imports done. Where fork is not safe to use (outside
    Linux), fn simply runs in this process when .result() is called."""

    def __init__(self, fn: Callable, *args, method: str = "fork", daemon: bool = True):
        self.fn, self.args, self.process = fn, args, None
        if method != "fork" or sys.platform == "linux":
            self.process, self.conn = start_worker(_send_result, fn, *args, method=method, daemon=daemon)

    def result(self):
        if self.process is None:
            return self.fn(*self.args)
        try:
            status, value = self.conn.recv()
        except EOFError:  # the child died without a word
            self.process.join()
            status, value = "error", f"exit code {self.process.exitcode}"
        self.process.join()
        if status != "ok":
            raise RuntimeError(f"{self.fn.__name__} failed in a child process: {value}")
        return value

    def stop(self) -> None:
        """Ask the child to stop (SIGTERM: a forked child cleans up its temporary files), then make it."""
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()


def _train_to_arrays(model: nn.Module, data: Dataset, cfg: Config, orders: list) -> dict:
    train(model, data, cfg, orders)
    return to_arrays(model.state_dict())


def train_side_by_side(model: nn.Module, baseline: nn.Module, data: Dataset, cfg: Config,
                       model_orders: list, baseline_orders: list) -> None:
    """Train the baseline in a forked process while this one trains the main model (saves
    about 0.45 s of 0.9). Pinned by test_end_to_end_cli_writes_plots_and_exports, which runs
    this path and checks the article's counts, trained in one process by the other tests."""
    trained_baseline = ChildProcess(_train_to_arrays, baseline, data, cfg, baseline_orders)
    train(model, data, cfg, model_orders)
    baseline.load_state_dict(from_arrays(trained_baseline.result()))


def make_plots(run: RunResult, evaluation: Evaluation, directory: Path) -> list[Path]:
    """The eight plots, half of them drawn in a forked process at the same time (saves about 0.5 s;
    the CLI test checks that all eight are written)."""
    directory.mkdir(parents=True, exist_ok=True)
    pyplot()  # imported before the fork, so that the child has it too
    data, names = PlotData.of(run, evaluation), list(PLOTS)
    other_half = ChildProcess(draw_plots, data, directory, names[1::2])
    try:
        return draw_plots(data, directory, names[0::2]) + other_half.result()
    finally:
        other_half.stop()  # a no-op once it has finished


def _apply_each(fn: Callable, items: list) -> list:
    return [fn(x) for x in items]


def map_in_processes(fn: Callable, items: list, workers: int) -> list:
    """[fn(x) for x in items], spread over `workers` fresh processes, in order. The processes
    are not daemons, so that fn may start processes of its own (a heal worker).
    Pinned by test_seed_sweep_writes_csv_and_prints_intervals (the same figures as one run)."""
    if workers <= 1 or len(items) <= 1:
        return _apply_each(fn, items)
    chunks = [items[k::workers] for k in range(min(workers, len(items)))]
    children = [ChildProcess(_apply_each, fn, chunk, method="spawn", daemon=False) for chunk in chunks]
    try:
        results = [child.result() for child in children]
    finally:
        for child in children:
            child.stop()
    ordered = [None] * len(items)
    for k, chunk_results in enumerate(results):
        ordered[k::len(chunks)] = chunk_results
    return ordered


def _run_cells(job: tuple) -> list:
    return run_bench_cells(*job)


def run_bench_in_processes(cfg: Config, cells: list[BenchCell], workers: int) -> list[BenchRow]:
    """The bench's cells, one process per seed at a time (each trains its seed's models once).
    Pinned by test_sharded_bench_merges_to_the_unsharded_csv (same bytes, run in one process)."""
    seeds = sorted({c.seed for c in cells})
    per_seed = map_in_processes(_run_cells, [(cfg, [c for c in cells if c.seed == s]) for s in seeds], workers)
    return sorted((row for rows in per_seed for row in rows),
                  key=lambda r: (r.seed, SCENARIOS.index(r.scenario), BENCH_METHODS.index(r.method)))


# Part VI. The command line
#
# Flags to a validated Config (each field's rule lives with the field in Part I), the
# threshold file, and main, which runs one seed or a sweep and writes the outputs.
# Uses everything above.

ARTICLE_RUN = ("article", "heal")  # (scenario, heal method) of the article's own run


def run_kind(cfg: Config) -> str:
    """Which run the flags ask for: shard, bench, sweep, scenario (one scenario and method) or article."""
    if cfg.bench:
        return "shard" if cfg.shard else "bench"
    if cfg.seeds > 1:
        return "sweep"
    return "article" if (cfg.scenario, cfg.heal_method) == ARTICLE_RUN else "scenario"


def memory_estimate(cfg: Config) -> float:
    """Bytes the run will hold at its peak, from measured constants: a process with torch imported
    takes about 300 MiB; drawing the data holds about 250 bytes per row (float64 draws, then float32);
    the network is copied about 16 times (two models, optimizers, heal copies) plus its snapshots."""
    h = cfg.hidden_dim
    parameters = 3 * h * h + 16 * h
    rows = cfg.n_train + cfg.n_test + 2 * cfg.n_drift + 4 * cfg.batch_size
    per_process = 300 * 2 ** 20 + 250 * rows + 4 * parameters * (16 + cfg.keep_best + cfg.keep_last)
    processes = 1 + (min(cfg.seeds, os.cpu_count() or 1) if cfg.bench or cfg.seeds > 1 else 0)
    return float(per_process * processes)


def available_memory() -> Optional[float]:
    """Bytes of memory this machine has free now (Linux), or None where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return float(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None


def validate(cfg: Config) -> Config:
    """Return cfg unchanged or raise ConfigError naming the first bad value."""
    def fail(name: str, rule: str):
        raise ConfigError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(cfg, name)!r}")

    for f in dataclasses.fields(cfg):
        value, check, choices = getattr(cfg, f.name), f.metadata["check"], f.metadata["choices"]
        if isinstance(value, float) and not math.isfinite(value):
            fail(f.name, "a finite number")
        if check is not None and not check.ok(value):
            fail(f.name, check.words)
        if choices is not None and value not in choices:
            fail(f.name, f"one of {', '.join(choices)}")
    for name in ("n_train", "n_test", "n_drift"):
        n = getattr(cfg, name)
        if not 0 < int(n * cfg.fraud_ratio) < n:
            fail(name, f"large enough to hold both classes at --fraud-ratio {cfg.fraud_ratio}")
    if (cfg.shard or cfg.merge) and not cfg.bench:
        raise ConfigError("--shard and --merge go with --bench")
    if cfg.shard and cfg.merge:
        raise ConfigError("--shard runs cells and --merge collects them: give one of the two")
    if not cfg.bench and cfg.seeds > 1 and (cfg.scenario, cfg.heal_method) != ARTICLE_RUN:
        raise ConfigError("--seeds sweeps the article's run; for several seeds of --scenario or --heal-method, "
                          "use --bench")
    if cfg.seed + cfg.seeds - 1 > SEED_MAX:
        raise ConfigError(f"--seed {cfg.seed} with --seeds {cfg.seeds} runs past the largest seed, {SEED_MAX:,}")
    needed, available = memory_estimate(cfg), available_memory()
    if available and needed > 0.8 * available:
        raise ConfigError(f"these sizes need about {needed / 2 ** 30:,.1f} GiB (estimated: 300 MiB per process, "
                          f"250 bytes per data row, 16 + --keep-best + --keep-last copies of the network), more "
                          f"than 80% of the {available / 2 ** 30:,.1f} GiB this machine has free")
    return cfg


def threshold_fields() -> dict:
    """name -> type name of the fields that threshold_config.json holds."""
    return {f.name: f.type for f in dataclasses.fields(Config) if f.metadata["threshold"]}


def read_thresholds(path: str) -> dict:
    """Read a threshold_config.json back: only known keys, each of its field's type."""
    data = read_json_file(path, "threshold file")
    if not isinstance(data, dict):
        raise ConfigError(f"threshold file {path} must hold one JSON object")
    data = {k: v for k, v in data.items() if k != RUN_KEY}
    types = threshold_fields()
    unknown = sorted(set(data) - set(types))
    if unknown:
        shown = ", ".join(_short(k) for k in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ConfigError(f"threshold file {path} has unknown keys: {shown} (known: {', '.join(types)})")
    values = {}
    for key, value in data.items():
        want = types[key]
        ok = (want == "int" and type(value) is int) or (want == "float" and type(value) in (int, float))
        try:
            values[key] = float(value) if ok and want == "float" else value
        except OverflowError:
            ok = False
        if not ok:
            raise ConfigError(f"threshold file {path}: {key} must be {'an integer' if want == 'int' else 'a number'}, "
                              f"got {_short(json.dumps(value))}")
    return values


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line and exit status 2: a user mistake is no reason for a usage dump."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """One flag per Config field. With suppress_defaults the parse holds only flags given."""
    parser = _Parser(prog="self_healing_production_final.py",
                     description="Self-healing neural network under data drift: the article's experiment, "
                                 "reproduced and measured honestly.",
                     argument_default=argparse.SUPPRESS if suppress_defaults else None)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        default = {} if suppress_defaults else {"default": f.default}
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=help_text, **default)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(flag, type=kind, metavar=f.name.upper(), choices=f.metadata["choices"],
                                help=help_text, **default)
    parser.add_argument("--thresholds", metavar="FILE", help="read thresholds from a threshold_config.json; "
                        "flags given explicitly win over the file")
    return parser


def parse_config(argv: list[str]) -> Config:
    """Flags -> validated Config. Raises ConfigError (argparse itself exits 2 on non-numbers)."""
    args = vars(build_parser().parse_args(argv))
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    thresholds = args.pop("thresholds")
    if thresholds is not None:
        args.update({k: v for k, v in read_thresholds(thresholds).items() if k not in explicit})
    if args["bench"] and "seeds" not in explicit:
        args["seeds"] = BENCH_SEEDS
    return validate(Config(**args))


def run_and_report(cfg: Config, out: Path, console: Callable[[str], None]) -> int:
    """One seed: train, stream, evaluate, print the report, write exports and plots."""
    start = time.perf_counter()
    run = run_experiment(cfg, trained=train_models(cfg, parallel=True), console=console,
                         export_dir=out / "monitoring_export", keep_records=not cfg.no_plots)
    evaluation = evaluate_run(run)
    for line in report(run, evaluation):
        console(line)
    console(f"\nExported metrics.csv, events.json and threshold_config.json to {out / 'monitoring_export'}")
    if not cfg.no_plots:
        make_plots(run, evaluation, out / "plots")
        console(f"Wrote {len(PLOTS)} plots to {out / 'plots'}")
    console(f"Done in {time.perf_counter() - start:.1f} s.")
    return 0


def run_seed_sweep(cfg: Config, console: Callable[[str], None] = print, workers: int = None) -> list[dict]:
    """Seeds cfg.seed .. cfg.seed + seeds - 1, in parallel processes; prints and writes their spread."""
    configs = sweep_configs(cfg)
    workers = workers or min(len(configs), os.cpu_count() or 1)
    console(f"Running seeds {configs[0].seed}..{configs[-1].seed} in {workers} processes.")
    summaries = map_in_processes(seed_summary, configs, workers)
    for line in sweep_report(summaries, sweep_spread(summaries)):
        console(line)
    exports = Path(cfg.out) / "monitoring_export"
    console(f"Wrote {write_sweep_csv(summaries, exports)}")
    write_threshold_config(exports, cfg)
    if not cfg.no_plots:
        plot_seed_sweep(summaries, Path(cfg.out) / "plots")
    return summaries


def run_scenario(cfg: Config, console: Callable[[str], None]) -> int:
    """One seed of one scenario served by one method, beside no adaptation and the Bayes ceiling."""
    trained = train_models(cfg, parallel=True)
    ceiling = scenario_ceiling(cfg.scenario, cfg)
    methods = dict.fromkeys([cfg.heal_method, "none"])  # the method, then no adaptation beside it
    rows = [bench_cell(cfg.scenario, method, trained, cfg, ceiling) for method in methods]
    for line in bench_report(rows, cfg):
        console(line)
    console("(A run of one scenario and method writes no files; --bench writes the whole comparison.)")
    return 0


def run_bench(cfg: Config, out: Path, console: Callable[[str], None], merged: list = None) -> int:
    """Every scenario x method x seed; or one shard of the cells; or, given the merged rows of all
    shards' cells, their table, CSV and plot."""
    cells, cell_dir = bench_cells(cfg), out / "bench_cells"
    if cfg.shard:
        k, n = parse_shard(cfg.shard)
        mine = [c for c in cells if c.index % n == k]
        todo = [c for c in mine if not (cell_dir / f"{c.name}.json").is_file()]
        console(f"Shard {k}/{n}: {len(mine)} of {len(cells)} cells, {len(mine) - len(todo)} already written, "
                f"writing the rest to {cell_dir}")
        run_bench_cells(cfg, todo, done=lambda cell, row: write_cell(cell_dir, cell, row, cfg))
        console(f"Shard {k}/{n} done. Merge with the same flags and --merge once every shard is done.")
        return 0
    if merged is not None:
        rows = merged
    else:
        workers = min(cfg.seeds, os.cpu_count() or 1)
        console(f"Running {len(cells)} cells ({len(SCENARIOS)} scenarios x {len(BENCH_METHODS)} methods x "
                f"{cfg.seeds} seeds) in {workers} processes.")
        rows = run_bench_in_processes(cfg, cells, workers)
    for line in bench_report(rows, cfg):
        console(line)
    console(f"\nWrote {write_bench_csv(rows, out / 'monitoring_export')}")
    write_threshold_config(out / "monitoring_export", cfg)
    if not cfg.no_plots:
        console(f"Wrote {plot_bench(rows, out / 'plots')}")
    return 0


def output_plan(cfg: Config) -> dict:
    """Folder under --out -> the files this run will write there (none for a run of one scenario)."""
    kind = run_kind(cfg)
    if kind == "shard":
        return {"bench_cells": []}
    if kind == "scenario":
        return {}
    exports, plots = {"bench": (["bench.csv"], ["bench.png"]), "sweep": (["seed_sweep.csv"], ["seed_sweep.png"]),
                      "article": (["metrics.csv", "events.json"], list(PLOTS))}[kind]
    return {"monitoring_export": exports + ["threshold_config.json"], **({} if cfg.no_plots else {"plots": plots})}


def claim_out(cfg: Config) -> Optional[int]:
    """Check, before any work, that --out can hold what this run writes, and hold it for this run: a
    lock on the folder (the kernel drops it when a run dies, however it dies), so that a second run
    into the same place is refused. Leftovers of a killed run are removed. Returns the lock's file
    descriptor, or None for a run that writes nothing; raises ConfigError, having created nothing."""
    plan = output_plan(cfg)
    if not plan:
        return None
    out, created, fd = Path(cfg.out), [], None
    try:
        for folder in [out, *(out / name for name in plan)]:
            if not folder.exists():
                folder.mkdir()
                created.append(folder)
            if not folder.is_dir():
                raise ConfigError(f"cannot write to --out {cfg.out}: {folder} is not a folder")
        fd = os.open(out, os.O_RDONLY)
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"--out {cfg.out} is busy: another run is writing there") from None
        except ImportError:  # no flock outside Unix: no protection, as before
            pass
        for name, files in plan.items():
            remove_stale_temporaries(out / name)
            for file in files:
                if (out / name / file).is_dir():
                    raise ConfigError(f"cannot write to --out {cfg.out}: {out / name / file} is a folder")
            AtomicFile(out / name / "probe").discard()  # a file can be created there, and removed
        return fd
    except (ConfigError, OSError) as e:
        if fd is not None:
            os.close(fd)
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot write to --out {cfg.out}: {e.strerror or e}") from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an exception so that every finally block cleans up on the way out."""


def _raise_terminated(signum, frame):
    raise Terminated()


def error_line(text: str) -> None:
    try:
        print(f"self_healing_production_final.py: error: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def main(argv: list[str] = None) -> int:
    """Exit status: 0 done (also when standard output was closed early, as by `| head`: the
    outputs are written all the same), 1 outputs or standard output could not be written,
    2 a user mistake, 130 Ctrl-C, 143 SIGTERM."""
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
        # a merge checks every cell before it creates anything
        merged = read_cells(Path(cfg.out) / "bench_cells", bench_cells(cfg), cfg) if cfg.merge else None
        lock = claim_out(cfg)
    except ConfigError as e:
        error_line(str(e))
        return 2
    use_one_torch_thread()
    console, out = Console(), Path(cfg.out)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_term = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        kind = run_kind(cfg)
        if kind in ("bench", "shard"):
            code = run_bench(cfg, out, console, merged)
        elif kind == "sweep":
            run_seed_sweep(cfg, console)
            code = 0
        elif kind == "scenario":
            code = run_scenario(cfg, console)
        else:
            code = run_and_report(cfg, out, console)
    except ConfigError as e:
        error_line(str(e))
        return 2
    except Terminated:
        error_line("terminated: exports and plots already in place are left as they were")
        return 143
    except KeyboardInterrupt:
        error_line("interrupted: exports and plots already in place are left as they were")
        return 130
    except OSError as e:
        error_line(f"cannot write {e.filename or 'the outputs'}: {e.strerror or e}; "
                   f"exports already in place are left as they were")
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_term)
        if lock is not None:
            os.close(lock)
    if console.failure is not None and not isinstance(console.failure, BrokenPipeError):
        error_line(f"cannot write to standard output: {console.failure.strerror or console.failure}; "
                   f"the outputs under --out are written")
        return 1
    return code


def exit_process(code: int) -> None:
    """Exit with code. A heal abandoned to its thread (timed out, or cut short by Ctrl-C) may still be
    inside torch, and an interpreter that shuts down under it aborts (exit 134): then leave at once."""
    if any(t.name == "heal" and t.is_alive() for t in threading.enumerate()):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
