"""Self-healing neural network under data drift, reproduced and measured honestly.

The experiment of the article "Self-Healing Neural Networks in PyTorch: Fix Model
Drift in Real Time Without Retraining", as one script:

    data -> two models -> drift detection (FIDI, symbolic rule) -> healing of a
    small adapter (ReflexiveLayer) -> registry, health monitor, rollback

With default flags it reproduces the article's table exactly (torch 2.13, CPU).
Beside every headline it prints the honest twin: prequential lift, a fresh
holdout, trivial and Bayes-optimal references, costs and forgetting.

The file reads in six parts. Part I is the article and depends on nothing after it;
each later part calls into the earlier ones, never the other way: II the heal engine
(where heals run and what a service adds around them), III honest measurement and the
scenario bench, IV the console, exports and plots, V the work spread over processes,
VI the command line.

Run `python self_healing_production_final.py --help` for every knob.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime
import functools
import hashlib
import itertools
import io
import json
import math
import os
import pickle
import platform
import re
import shlex
import signal
import stat
import sys
import tempfile
import threading
import time
from collections import OrderedDict, deque
import concurrent.futures
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional


def _interrupted_before_main(signum, frame):
    sys.stderr.write("\nself_healing_production_final.py: error: interrupted\n")
    os._exit(130)


if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    # Ctrl-C while torch loads (a second or two) or before main starts: one line, as at any other moment.
    signal.signal(signal.SIGINT, _interrupted_before_main)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# Part I. The article
#
# The experiment as the article runs it, in the order the data flows: its knobs, data,
# models, training, metrics, detection, healing, registry and health, the stream, and the
# experiment that ties them together. It uses nothing defined after it.

def knob(default, help_text: str, rule=None, threshold: bool = False, role: str = "experiment", choices=None):
    """A configuration field that is also a command-line flag (Part VI makes the flag). rule: the values it
    accepts, as an interval ("[1, 1000]", "(0, 1]"); threshold: threshold_config.json holds it; role:
    "experiment" (it can change the article's figures), "cost" (it prices them), "timing" (it changes them
    only when a heal runs out of time) or "run" (it changes no number)."""
    return field(default=default, metadata=dict(help=help_text, rule=rule, threshold=threshold, role=role,
                                                 choices=choices))


@dataclass(frozen=True)
class ArticleConfig:
    """The article's knobs: data, model, training, detection, healing, registry and rollback."""
    seed: int = knob(42, "seed of numpy's and torch's streams", "[0, 4294967295]")
    # data
    n_train: int = knob(5000, "training rows (clean)", "[1, inf)")
    n_test: int = knob(1000, "clean test rows", "[1, inf)")
    n_drift: int = knob(1000, "drifted rows the stream samples from", "[1, inf)")
    fraud_ratio: float = knob(0.15, "share of fraud rows in every set", "(0, 1)")
    drift_strength: float = knob(2.2, "shift of normal rows' V14 mean in the drifted set", "[-20, 20]")
    # model and training
    hidden_dim: int = knob(64, "width of the hidden layers", "[1, 100000]")
    epochs: int = knob(20, "training epochs", "[1, 1000000]")
    batch_size: int = knob(100, "rows per training batch and per stream batch", "[1, 10000000]")
    lr: float = knob(1e-3, "Adam learning rate for training", "(0, 1]")
    # detection
    fidi_window: int = knob(10, "batch means in the FIDI window (z needs 3 of them)", "[3, 1000000]",
                            threshold=True)
    fidi_threshold: float = knob(1.0, "drifting when the FIDI z-score exceeds this", "[0, 1000000]",
                                 threshold=True)
    rule_threshold: float = knob(-1.5, "the symbolic rule calls a row fraud when V14 < this",
                                 "[-1000000, 1000000]", threshold=True)
    conflict_thr: float = knob(0.30, "a conflict: rule says fraud, model probability below this", "[0, 1]",
                               threshold=True)
    conflict_min: int = knob(5, "heal when a batch has at least this many conflicts", "[0, 1000000000]",
                             threshold=True)
    # stream and heal
    n_batches: int = knob(25, "stream batches", "[1, 1000000000]")
    heal_steps: int = knob(5, "Adam steps per heal", "[0, 1000000]")
    heal_lr: float = knob(0.003, "Adam learning rate of the heal", "(0, 1]")
    alpha: float = knob(0.70, "weight of the supervised BCE term", "[0, 1]")
    lambda_lag: float = knob(0.80, "weight of the rule BCE term, times (1 - alpha)", "[0, 1000000]")
    entropy_weight: float = knob(0.03, "weight of the mean binary entropy term", "[0, 1000000]")
    # registry, health and rollback
    rollback_f1_drop: float = knob(0.08, "roll back when the window's mean F1 falls this far below baseline",
                                   "[0, inf)", threshold=True)
    rollback_acc_drop: float = knob(0.10, "roll back when the window's mean accuracy falls this far below "
                                    "baseline", "[0, inf)", threshold=True)
    health_window: int = knob(5, "batches in the health monitor's window", "[1, 1000000]", threshold=True)
    min_batches_before_rollback: int = knob(3, "health updates needed before a rollback", "[0, 1000000000]",
                                            threshold=True)
    keep_best: int = knob(5, "post-heal snapshots with the best F1 kept in the registry", "[1, 1000000]",
                          role="run")
    keep_last: int = knob(10, "most recent snapshots kept in the registry", "[1, 1000000]", role="run")


INTERVAL = re.compile(r"([\[(])(-?[\d.e+]+|-inf), (-?[\d.e+]+|inf)([\])])")


def follows(rule, value) -> bool:
    """Whether value passes a field's rule: an interval such as "[1, 1000]" or "(0, 1]", or a
    (test, words) pair."""
    if not isinstance(rule, str):
        return rule[0](value)
    opening, low, high, closing = INTERVAL.fullmatch(rule).groups()
    low, high = float(low), float(high)
    return (low <= value if opening == "[" else low < value) and (value <= high if closing == "]" else value < high)


def rule_words(rule) -> str:
    return f"in {rule}" if isinstance(rule, str) else rule[1]


def knob_problem(f: dataclasses.Field, value) -> Optional[str]:
    """What a value must be to fit the knob, when it does not (its type, a finite number, its rule, its
    choices); None when it fits."""
    if f.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))
                                       or f.type == "int" and not isinstance(value, int)):
        return "an integer" if f.type == "int" else "a number"
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    if f.metadata["rule"] is not None and not follows(f.metadata["rule"], value):
        return rule_words(f.metadata["rule"])
    if f.metadata["choices"] is not None and value not in f.metadata["choices"]:
        return f"one of {', '.join(f.metadata['choices'])}"
    return None


# -- Data

V14 = 7  # column index of the drifting feature "V14"
N_FEATURES = 10
FRAUD_V14 = (-2.5, 0.8)  # mean and std of fraud rows' V14, which never drifts
NORMAL_V14_STD = 1.0     # normal rows' V14: mean 0, or -drift_strength when drifted


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


def article_law(cfg: ArticleConfig, drifted: bool) -> RowLaw:
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


def make_dataset(n: int, cfg: ArticleConfig, rng: np.random.RandomState, drifted: bool) -> Dataset:
    """n rows of the article's data, int(n * fraud_ratio) of them fraud."""
    n_fraud = int(n * cfg.fraud_ratio)
    return draw_rows(rng, n - n_fraud, n_fraud, article_law(cfg, drifted))


@dataclass(frozen=True)
class Data:
    train: Dataset
    test: Dataset   # clean
    drift: Dataset  # the stream samples from it; the article's final evaluation set


def make_data(cfg: ArticleConfig) -> tuple[Data, np.random.RandomState]:
    """The article's three sets, drawn in order from one stream, which is returned too:
    the stream's batch indices continue it."""
    rng = np.random.RandomState(cfg.seed)
    train_set = make_dataset(cfg.n_train, cfg, rng, drifted=False)
    test_set = make_dataset(cfg.n_test, cfg, rng, drifted=False)
    drift_set = make_dataset(cfg.n_drift, cfg, rng, drifted=True)
    return Data(train_set, test_set, drift_set), rng


# -- Models

class ReflexiveLayer(nn.Module):
    """Residual adapter x + scale * adapter(x): the only part that heals. On feature maps (n, C, H, W)
    it adapts the C channels of every position."""

    def __init__(self, dim: int, identity: bool = False):
        super().__init__()
        self.adapter = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))
        self.scale = nn.Parameter(torch.tensor(0.1))
        if identity:  # added to a model already trained: it changes nothing until a heal trains it
            nn.init.zeros_(self.adapter[2].weight)
            nn.init.zeros_(self.adapter[2].bias)

    def forward(self, x):
        if x.dim() == 2:
            return x + self.scale * self.adapter(x)
        return x + self.scale * self.adapter(x.movedim(1, -1)).movedim(-1, 1)


class SelfHealingMLP(nn.Module):
    """Frozen backbone and head around a swappable ReflexiveLayer. A heal publishes a new ReflexiveLayer
    by assigning `reflexive`; forward reads it once, so a prediction always uses one version."""

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


def output_width(model: nn.Module, child: nn.Module) -> int:
    """The width of a child's output: that of the last Linear, Conv or BatchNorm layer in it or before it,
    or else (a child that passes its input on) the input width of the first one after it."""
    modules = list(model.modules())
    end = next(k for k, m in enumerate(modules) if m is child) + len(list(child.modules()))
    for m, names in [(m, ("out_features", "out_channels", "num_features")) for m in modules[end - 1::-1]] + \
                    [(m, ("in_features", "in_channels", "num_features")) for m in modules[end:]]:
        width = next((getattr(m, name) for name in names if isinstance(getattr(m, name, None), int)), None)
        if width is not None:
            return width
    raise ValueError(f"cannot tell the width of {type(child).__name__}'s output: the model has no Linear, Conv or BN")


class Adapted(nn.Module):
    """A trained classifier with a ReflexiveLayer after its child `name`, everything else frozen, answering
    probabilities: n x 1 for one output (a sigmoid of it, unless the model ends in Sigmoid), n x C for C
    (a softmax, unless it ends in Softmax). serve(layer) swaps the adapter in one assignment, so that a
    prediction always runs one version."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model, self.path = model, name
        try:
            child = model.get_submodule(name) if isinstance(name, str) and name else None
        except AttributeError:
            child = None
        if child is None:
            names = ", ".join(repr(n) for n, _ in list(model.named_modules())[1:4])
            raise ValueError(f"the model has no child module {name!r}: name one by its dotted name ({names}, ...)")
        if not isinstance(child, ReflexiveLayer):  # the article's model trains its own; others get one
            self.path = name + ".1"
            with torch.random.fork_rng(devices=[]):  # the same adapter every time; the caller's stream untouched
                torch.manual_seed(0)
                layer = ReflexiveLayer(output_width(model, child), identity=True)
            self.serve(nn.Sequential(child, layer), name)
        leaves = [m for m in model.modules() if not list(m.children())]
        self.logits = not isinstance(leaves[-1], (nn.Sigmoid, nn.Softmax))
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.adapter().parameters():
            p.requires_grad_(True)
        model.eval()

    def adapter(self) -> ReflexiveLayer:
        return self.model.get_submodule(self.path)

    def serve(self, layer: nn.Module, path: str = None) -> None:
        parent, _, attribute = (path or self.path).rpartition(".")
        setattr(self.model.get_submodule(parent), attribute, layer)

    def raw(self, x):
        """The model's own outputs, n x 1 or n x C: logits, or probabilities if it ends in Sigmoid or Softmax."""
        out = self.model(x)
        return out[:, None] if out.dim() == 1 else out

    def forward(self, x):
        out = self.raw(x)
        if self.logits:
            out = torch.sigmoid(out) if out.shape[1] == 1 else out.softmax(1)
        return out


def predict_proba(model: nn.Module, X: np.ndarray) -> np.ndarray:
    """Probabilities: n for a model with one output, n x C for C."""
    with torch.inference_mode():
        return model(torch.from_numpy(X)).squeeze(1).numpy()


# -- Training

class Adam:
    """torch.optim.Adam's arithmetic on CPU (its single-tensor path), bit for bit, in torch's foreach
    kernels (the same arithmetic per tensor, in fewer calls). Not torch.optim.Adam itself because its
    first use imports torch._dynamo, 2-3 s, longer than this whole training."""

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
        by_step: dict = {}  # parameters with a gradient, by their own step count (one group, in practice)
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self.steps[i] += 1
                by_step.setdefault(self.steps[i], []).append(i)
        for t, group in by_step.items():
            params, grads = [self.params[i] for i in group], [self.params[i].grad for i in group]
            m, v = [self.exp_avg[i] for i in group], [self.exp_avg_sq[i] for i in group]
            torch._foreach_lerp_(m, grads, 1 - self.beta1)
            torch._foreach_mul_(v, self.beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - self.beta2)
            denom = torch._foreach_div(torch._foreach_sqrt(v), (1 - self.beta2 ** t) ** 0.5)
            torch._foreach_add_(denom, self.eps)
            torch._foreach_addcdiv_(params, m, denom, value=-(self.lr / (1 - self.beta1 ** t)))


def epoch_orders(cfg: ArticleConfig) -> list:
    """One torch.randperm(n_train) per epoch, from torch's global stream."""
    return [torch.randperm(cfg.n_train) for _ in range(cfg.epochs)]


def train(model: nn.Module, data: Dataset, cfg: ArticleConfig, orders: list) -> None:
    """Adam on mean BCE, walking each epoch's order in slices of batch_size."""
    optimizer = Adam(model.parameters(), lr=cfg.lr)
    X, y = torch.from_numpy(data.X), torch.from_numpy(data.y).unsqueeze(1)
    for perm in orders:
        for start in range(0, len(X), cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            optimizer.zero_grad()
            F.binary_cross_entropy(model(X[idx]), y[idx]).backward()
            optimizer.step()


def train_in_turn(model, baseline, data: Dataset, cfg: ArticleConfig, model_orders, baseline_orders) -> None:
    train(model, data, cfg, model_orders)
    train(baseline, data, cfg, baseline_orders)


@dataclass
class Trained:
    """Data and the two trained networks: everything before the stream."""
    data: Data
    rng: np.random.RandomState  # continues into the stream's batch draws
    model: SelfHealingMLP
    baseline: BaselineMLP


def train_models(cfg: ArticleConfig, train_both: Callable = train_in_turn) -> Trained:
    """Seed, draw the data, build both models and train them. Both epoch orders are drawn up front, in the
    article's order, so the trainings are independent and `train_both` may run them side by side."""
    torch.manual_seed(cfg.seed)
    data, rng = make_data(cfg)
    model = SelfHealingMLP(cfg.hidden_dim)
    baseline = BaselineMLP(cfg.hidden_dim)
    model_orders, baseline_orders = epoch_orders(cfg), epoch_orders(cfg)
    train_both(model, baseline, data.train, cfg, model_orders, baseline_orders)
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
    """Binary: predicted fraud above threshold. C classes (proba n x C): the most probable class; precision,
    recall and F1 averaged over the classes, counts summed over them (each class against the rest)."""
    if proba.ndim == 1:
        return classify(y, proba > threshold)
    predicted = proba.argmax(1)
    per_class = [classify(y == c, predicted == c) for c in range(proba.shape[1])]
    return Metrics(float(np.mean(predicted == y)),
                   *[float(np.mean([getattr(m, name) for m in per_class])) for name in ("precision", "recall", "f1")],
                   *[sum(getattr(m, name) for m in per_class) for name in ("tp", "tn", "fp", "fn")])


# -- Detection

MIN_FIDI_ENTRIES = 3  # the article computes z only once the window holds 3 means


class FIDIMonitor:
    """Feature-level drift index: z of the windowed batch mean of one input feature (V14 in the article)
    against that feature's training values."""

    def __init__(self, train_values: np.ndarray, window: int, threshold: float, feature: int = V14):
        self.mu = float(train_values.mean())
        self.sigma = float(train_values.std()) + 1e-8
        self.threshold, self.feature = threshold, feature
        self.means: deque = deque(maxlen=window)

    def check(self, X: np.ndarray, proba: np.ndarray) -> tuple[float, bool]:
        """What the self-healer asks of its drift detector at each batch: a score, and whether it drifts."""
        self.means.append(float(X[:, self.feature].mean()))
        z = abs(float(np.mean(self.means)) - self.mu) / self.sigma if len(self.means) >= MIN_FIDI_ENTRIES else 0.0
        return z, z > self.threshold


def rule_labels(X: np.ndarray, cfg: ArticleConfig) -> np.ndarray:
    """The symbolic rule: fraud when V14 is below the rule threshold."""
    return (X[:, V14] < cfg.rule_threshold).astype(np.float32)


def conflicts(rule: np.ndarray, proba: np.ndarray, cfg: ArticleConfig) -> np.ndarray:
    """Rows the rule calls fraud while the model is confident they are not (with C classes: rows to
    whose rule class the model gives a probability below conflict_thr)."""
    if proba.ndim == 2:
        return proba[np.arange(len(rule)), rule.astype(int)] < cfg.conflict_thr
    return (rule == 1) & (proba < cfg.conflict_thr)


def pos_weight(fraud_frac: float) -> float:
    """The article's schedule: 1 below 10% fraud among conflicts, then 2 rising to a cap of 4."""
    return 1.0 if fraud_frac < 0.10 else min(2 + (fraud_frac - 0.10) * 10, 4.0)


# -- Healing

@dataclass(frozen=True)
class HealBatch:
    """What a heal and the health monitor may see: features and their targets."""
    X: np.ndarray
    targets: np.ndarray  # the batch's true labels in the article; the rule's, when healing without labels
    rule: Optional[np.ndarray]
    batch: int = 0       # the served batch these are (not the one that asked for the heal, when labels are late)


def mean_binary_entropy(proba):
    """How unsure the model is, in nats (at most log 2), with the article's 1e-8 guards."""
    return -(proba * torch.log(proba + 1e-8) + (1 - proba) * torch.log(1 - proba + 1e-8)).mean()


def heal_loss(out, targets, rule, weight, cfg: ArticleConfig, logits: bool = False):
    """alpha * weighted BCE(targets) + (1 - alpha) * lambda * BCE(rule) + entropy term, on the model's
    probabilities (the article's) or, with `logits`, its raw outputs. Probabilities are turned back into
    logits the article's way; its 1e-8 guards are part of what reproduces its numbers. With C classes
    (out n x C) the same three terms are cross-entropies and the mean entropy."""
    if out.shape[1] == 1:
        proba = torch.sigmoid(out) if logits else out
        z = out if logits else torch.log(proba / (1 - proba + 1e-8))
        supervised = F.binary_cross_entropy_with_logits(z, targets[:, None], pos_weight=torch.tensor(weight))
        symbolic = torch.zeros(()) if rule is None else F.binary_cross_entropy_with_logits(z, rule[:, None]) \
            if logits else F.binary_cross_entropy(proba, rule[:, None])
        entropy = mean_binary_entropy(proba)
    else:
        log_proba = F.log_softmax(out, 1) if logits else torch.log(out + 1e-8)
        supervised = F.nll_loss(log_proba, targets.long())
        symbolic = F.nll_loss(log_proba, rule.long()) if rule is not None else torch.zeros(())
        entropy = -(log_proba.exp() * log_proba).sum(1).mean()
    return cfg.alpha * supervised + (1 - cfg.alpha) * cfg.lambda_lag * symbolic + cfg.entropy_weight * entropy


class HealRejected(RuntimeError):
    """A heal whose result must not be served (non-finite loss or weights, timeout, error)."""


@dataclass
class HealResult:
    layer: ReflexiveLayer  # a new object, never changed afterwards: safe to serve
    losses: list
    seconds: float


class AdapterTrainer:
    """A private copy of the model and one Adam optimizer over its ReflexiveLayer, kept across heals
    (as in the article; a rollback does not reset it). Each heal trains copies of the layer and the
    optimizer and commits them only when loss and weights stayed finite, so a rejected heal leaves
    nothing behind. The copy is its own: the served model answers requests meanwhile."""

    def __init__(self, model: Adapted, cfg: ArticleConfig):
        self.model, self.cfg = copy.deepcopy(model), cfg
        self.layer = self.model.adapter()
        self.optimizer = Adam(self.layer.parameters(), lr=cfg.heal_lr)

    def heal(self, batch: HealBatch, weight: float) -> HealResult:
        start = time.perf_counter()
        layer, optimizer = copy.deepcopy((self.layer, self.optimizer))
        self.model.serve(layer)
        X, targets = torch.from_numpy(batch.X), torch.from_numpy(batch.targets)
        rule = None if batch.rule is None else torch.from_numpy(batch.rule)
        losses = []
        for step in range(self.cfg.heal_steps):
            optimizer.zero_grad()
            loss = heal_loss(self.model.raw(X), targets, rule, weight, self.cfg, self.model.logits)
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


@dataclass(frozen=True)
class HealJob:
    """A heal asked for at one batch: what it learns from, and the served model's score there."""
    batch: int
    view: HealBatch
    weight: float    # pos_weight
    before: Metrics  # the served model on the view, saved with the pre-heal snapshot


@dataclass(frozen=True)
class HealOutcome:
    job: HealJob
    result: Optional[HealResult]  # None: rejected, for `reason`
    reason: str = ""


class InlineHealer:
    """The article's way: each heal runs at once, in the caller's thread. (Part II runs heals in a thread
    or a process instead, through the same three calls: submit a job and name the batch's action, hand
    back the finished heals, restore after a rollback.)"""

    def __init__(self, model: Adapted, cfg: ArticleConfig):
        self.trainer = AdapterTrainer(model, cfg)
        self.done: list[HealOutcome] = []

    def submit(self, job: HealJob) -> str:
        try:
            self.done.append(HealOutcome(job, self.trainer.heal(job.view, job.weight)))
        except HealRejected as e:  # the article's script hung here; the served weights stay
            self.done.append(HealOutcome(job, None, str(e)))
        except Exception as e:  # a fault in the heal is contained too: the stream serves on
            self.done.append(HealOutcome(job, None, f"heal raised {type(e).__name__}: {e}"))
        return "heal"

    def finished(self) -> list[HealOutcome]:
        done, self.done = self.done, []
        return done

    def restore(self, state: dict) -> None:
        self.trainer.restore(state)

    def close(self) -> None:
        pass


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
    """Versions of the ReflexiveLayer: the clean one, the keep_best post-heal snapshots with the highest F1
    and the keep_last most recent, so that memory is bounded however long the stream (the article keeps all)."""

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


MIN_HEALTH_ENTRIES = 3  # the article judges health only on 3 or more entries


class HealthMonitor:
    """Rolling accuracy and F1; degraded when the window's mean falls below the
    first post-heal result by more than the rollback thresholds."""

    def __init__(self, cfg: ArticleConfig):
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
        """After a rollback the window starts afresh (the article's script keeps it, and rolls back again
        on every following batch): its entries describe weights no longer served."""
        self.accuracy.clear()
        self.f1.clear()
        self.updates = 0


# -- The self-healer

@dataclass
class BatchRecord:
    """One served batch: what was decided, how each model scored on it, and its events."""
    batch: int
    state: str = "HEALTHY"  # HEALTHY, DRIFTING, HEALING, ROLLED_BACK or QUARANTINED
    action: str = "none"
    drifting: bool = False
    z: float = math.nan
    conflicts: int = 0
    fraud_frac: float = math.nan
    pos_weight: float = math.nan
    served: Optional[Metrics] = None    # the model that answered this batch, before any heal on it
    healed: Optional[Metrics] = None    # after this batch's heal, on this batch (the article's in-sample figure)
    shadow: Optional[Metrics] = None
    baseline: Optional[Metrics] = None
    monitor_accuracy: Optional[float] = None  # what the health monitor saw
    monitor_f1: Optional[float] = None
    version_pre: Optional[int] = None
    version_post: Optional[int] = None
    restored_version: Optional[int] = None
    events: list = field(default_factory=list)  # heals, rollbacks, rejections at this batch

    def event(self, kind: str, batch: int, **details) -> None:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        self.events.append({"type": kind, "batch": batch, "time": now, **details})

    @property
    def healed_here(self) -> bool:
        """Whether the heal asked for at this batch was published at this batch."""
        return any(e["type"] == "heal" and e["batch"] == self.batch for e in self.events)

    @property
    def lift(self) -> Optional[float]:
        """The article's lift: healed accuracy minus shadow accuracy, on the batch the heal trained on."""
        return None if self.healed is None or self.shadow is None else self.healed.accuracy - self.shadow.accuracy


def quarantined(X: np.ndarray) -> Optional[str]:
    """Why a batch must not be served: features that are NaN or infinite (its answers would mean nothing)."""
    bad = int((~np.isfinite(X)).any(axis=1).sum())
    return f"{bad} rows with NaN or infinite features" if bad else None


HEALER_OPTIONS = ("conflict_thr", "conflict_min", "heal_steps", "heal_lr", "alpha", "lambda_lag", "entropy_weight",
                  "rollback_f1_drop", "rollback_acc_drop", "health_window", "min_batches_before_rollback",
                  "keep_best", "keep_last")  # SelfHealer's keyword options: ArticleConfig's fields, its defaults


class SelfHealer:
    """Self-healing around a trained PyTorch classifier: the article's method for any model. In a copy of
    the model, a ReflexiveLayer goes after the child `name` (or that child heals, when it is one, as in
    the article's model) and everything else is frozen. predict(X) serves batch 1, 2, ... and returns
    probabilities (n, or n x C); observe(batch, y) hands in its labels, late or never.

    A heal is due when the detector (check(X, proba) -> (score, drifting)) says the stream drifts (every
    batch without one) or the rule (X -> a label per row) and the model disagree on conflict_min rows.
    With supervision "labels" it learns from the newest labelled batch; with "rules", at once, from the
    rule's. Heals are versioned in the registry and the best post-heal version comes back when the health
    window degrades. healer: where heals run (Part II has more than InlineHealer). Options: HEALER_OPTIONS.
    """

    def __init__(self, model: nn.Module, name: str, *, detector=None, rule: Callable = None,
                 supervision: str = "labels", healer: Callable = InlineHealer, max_pending: int = 100,
                 keep_records: int = 10_000, **options):
        fields = {f.name: f for f in dataclasses.fields(ArticleConfig) if f.name in HEALER_OPTIONS}
        for key, value in options.items():
            if key not in fields:
                raise TypeError(f"SelfHealer: unknown option {key!r}; the options are {', '.join(HEALER_OPTIONS)}")
            problem = knob_problem(fields[key], value)
            if problem:
                raise ValueError(f"SelfHealer: {key} must be {problem}, got {value!r}")
        if supervision not in ("labels", "rules") or (supervision == "rules" and rule is None):
            raise ValueError("SelfHealer: supervision is 'labels' or 'rules' (which needs a rule)")
        if not all(isinstance(n, int) and n >= 1 for n in (max_pending, keep_records)):
            raise ValueError("SelfHealer: max_pending and keep_records are whole numbers, at least 1")
        self.cfg = dataclasses.replace(ArticleConfig(), **options)
        self.model = Adapted(copy.deepcopy(model), name)
        self.detector, self.rule, self.supervision = detector, rule, supervision
        self.healer = healer(self.model, self.cfg)
        self.registry = ModelRegistry(self.cfg.keep_best, self.cfg.keep_last)
        self.registry.save(self.model.adapter(), 0, "clean", math.nan, math.nan)
        self.health = HealthMonitor(self.cfg)
        self.records: deque = deque(maxlen=keep_records)
        self.pending: dict = {}  # batch -> (X, served probabilities, rule labels, record) until labels arrive
        self.max_pending, self.served, self.wants_heal = max_pending, 0, False
        self.lock = threading.Lock()  # one batch at a time, from whichever thread serves it

    def predict(self, X) -> np.ndarray:
        """Serve the next batch: publish heals finished meanwhile, answer, then watch for drift. A batch
        that cannot be served (the model or the detector raises) takes no number."""
        X = np.array(X.detach().cpu().numpy() if torch.is_tensor(X) else X)  # its own copy: callers reuse buffers
        if X.ndim < 2 or len(X) == 0:
            raise ValueError(f"a batch is one or more rows of features, got shape {X.shape}")
        X = X.astype(np.float32, copy=False) if X.dtype.kind == "f" else X  # integer inputs stay (token ids)
        with self.lock:
            self.served += 1
            record = BatchRecord(self.served)
            self.records.append(record)
            try:
                return self.answer(record, X)
            except Exception:
                self.served, self.wants_heal = self.served - 1, False
                self.records.pop()
                if self.records:  # heals published at its start stay logged
                    self.records[-1].events.extend(record.events)
                raise

    def answer(self, record: BatchRecord, X: np.ndarray) -> np.ndarray:
        self.publish_finished(record)
        refused = quarantined(X)
        if refused:
            record.state, record.action, self.wants_heal = "QUARANTINED", "quarantined", False
            record.event("batch_quarantined", record.batch, reason=refused)
            return np.full_like(predict_proba(self.model, np.zeros_like(X)), np.nan)  # n or n x C
        proba = predict_proba(self.model, X)  # answered before anything learns from this batch
        record.z, record.drifting = self.detector.check(X, proba) if self.detector else (math.nan, False)
        rule = np.asarray(self.rule(X), dtype=np.float32) if self.rule else None
        record.conflicts = int(conflicts(rule, proba, self.cfg).sum()) if rule is not None else 0
        self.wants_heal = self.detector is None or record.drifting or record.conflicts >= self.cfg.conflict_min
        self.pending[record.batch] = (X, proba, rule, record)
        if len(self.pending) > self.max_pending:
            del self.pending[next(iter(self.pending))]  # the oldest: batches are added in the order served
        if self.supervision == "rules":
            self.learn(HealBatch(X, rule, rule, record.batch), proba)
        elif self.wants_heal:
            record.action = "await_labels"
        self.settle(record)
        return proba

    def observe(self, batch: int, y) -> None:
        """The labels of served batch number `batch` (class numbers): they score it and, with supervision
        "labels", feed the heal. Labels of a batch observed already, quarantined, or older than max_pending
        batches are dropped."""
        with self.lock:
            if not (isinstance(batch, int) and 1 <= batch <= self.served):
                raise ValueError(f"batch {batch!r} has not been served")
            if batch not in self.pending:
                return
            X, proba, rule, record = self.pending[batch]
            y = np.array(y.detach().cpu().numpy() if torch.is_tensor(y) else y, dtype=np.float32)
            classes = 2 if proba.ndim == 1 else proba.shape[1]
            if y.shape != (len(X),) or not np.isin(y, np.arange(classes)).all():
                raise ValueError(f"the labels of batch {batch} are {len(X)} class numbers in 0..{classes - 1}, "
                                 f"got an array of shape {y.shape}" + ("" if y.shape != (len(X),) else
                                                                        " with other values"))
            del self.pending[batch]
            if record.served is None:
                record.served = metrics_at(y, proba)
            if self.supervision == "labels":
                self.learn(HealBatch(X, y, rule, batch), proba if record is self.records[-1] else None)
                self.settle(self.records[-1])

    def learn(self, view: HealBatch, view_proba: Optional[np.ndarray]) -> None:
        """Heal on a labelled batch if the newest batch asked for one, else only tell the health monitor."""
        record, cfg = self.records[-1], self.cfg
        if view_proba is None:  # a late batch: scored by the model served now
            view_proba = predict_proba(self.model, view.X)
        record.pos_weight = 1.0  # the article's schedule below needs a rule and one output
        if view.rule is not None and view_proba.ndim == 1:
            hits = conflicts(view.rule, view_proba, cfg)
            record.fraud_frac = float(view.targets[hits].mean()) if hits.any() else 0.0
            record.pos_weight = pos_weight(record.fraud_frac)
        before = metrics_at(view.targets, view_proba)
        if self.wants_heal:
            self.wants_heal = False
            record.action = self.healer.submit(HealJob(record.batch, view, record.pos_weight, before))
        if not self.publish_finished(record):
            self.monitor(record, before, post_heal=False)

    def publish_finished(self, record: BatchRecord) -> bool:
        """Publish every heal the healer has finished, or log why it was rejected. True when one of
        them is this batch's own heal."""
        own = False
        for outcome in self.healer.finished():
            job = outcome.job
            if outcome.result is None:
                record.event("heal_failed", job.batch, reason=outcome.reason)
                record.action = "heal_failed" if job.batch == record.batch else record.action
                continue
            self.publish(record, job, outcome.result)
            self.roll_back_if_degraded(record, outcome.result.layer)
            own = own or job.batch == record.batch
        return own

    def publish(self, record: BatchRecord, job: HealJob, result: HealResult) -> None:
        """Version the heal (pre and post snapshots), serve it, and tell the health monitor."""
        before = job.before
        pre_snap = self.registry.save(self.model.adapter(), job.batch, "pre_heal", before.accuracy, before.f1)
        self.model.serve(result.layer)  # the atomic swap that publishes the heal
        after = metrics_at(job.view.targets, predict_proba(self.model, job.view.X))
        post_snap = self.registry.save(result.layer, job.batch, "post_heal", after.accuracy, after.f1)
        record.action, record.version_pre, record.version_post = "heal", pre_snap.version, post_snap.version
        self.monitor(record, after, post_heal=True)
        record.event("heal", job.batch, version_pre=pre_snap.version, version_post=post_snap.version,
                     applied_at_batch=record.batch, learned_from_batch=job.view.batch, pos_weight=job.weight,
                     accuracy_before=before.accuracy, accuracy_after=after.accuracy,
                     f1_before=before.f1, f1_after=after.f1,
                     loss_first=result.losses[0] if result.losses else None,
                     loss_last=result.losses[-1] if result.losses else None,
                     seconds=round(result.seconds, 6))

    def roll_back_if_degraded(self, record: BatchRecord, layer: ReflexiveLayer) -> None:
        """Restore the best post-heal snapshot when the health window has degraded."""
        reason = self.health.degradation()
        target = self.registry.best_post_heal() if reason else None
        if target is None:
            return
        restored = copy.deepcopy(layer)
        restored.load_state_dict(target.state)
        self.model.serve(restored)
        self.healer.restore(target.state)  # later heals start from the restored weights
        self.health.restart()
        record.action, record.restored_version = "heal+rollback", target.version
        record.event("rollback", record.batch, restored_version=target.version, restored_batch=target.batch,
                     restored_accuracy=target.accuracy, restored_f1=target.f1, reason=reason)

    def monitor(self, record: BatchRecord, m: Metrics, post_heal: bool) -> None:
        self.health.record(m.accuracy, m.f1, post_heal)
        record.monitor_accuracy, record.monitor_f1 = m.accuracy, m.f1

    @staticmethod
    def settle(record: BatchRecord) -> None:
        if record.state == "QUARANTINED":
            return
        record.state = ("ROLLED_BACK" if record.restored_version is not None else
                        "HEALING" if record.version_post is not None or record.action == "heal_started" else
                        "DRIFTING" if record.drifting else "HEALTHY")

    def close(self) -> None:
        """Stop the healer's worker, if it has one."""
        self.healer.close()


# -- The stream and the experiment

class LateArrivals:
    """Items that arrive `delay` batches after they were sent: push one per batch, get back the
    one that arrives now (None while the first ones are still on their way)."""

    def __init__(self, delay: int):
        self.delay = delay
        self.pending: deque = deque()

    def push(self, item):
        self.pending.append(item)
        return self.pending.popleft() if len(self.pending) > self.delay else None


def drifted_batches(data: Dataset, cfg: ArticleConfig, rng: np.random.RandomState) -> Iterator[tuple]:
    """The article's stream: batch_size rows drawn with replacement from the drifted set."""
    for _ in range(cfg.n_batches):
        idx = rng.choice(len(data.X), cfg.batch_size, replace=True)
        yield data.X[idx], data.y[idx]


class Experiment:
    """One run of the article on trained models: the self-healer around a copy of the trained model, and
    the frozen shadow and the unhealed baseline scored beside it. Iterating it serves the batches, one
    record each; a batch's labels follow its answers (or come label_delay batches later). The batches
    (the article's stream), the detector (FIDI) and the healer's other arguments can be handed in."""

    def __init__(self, cfg: ArticleConfig, trained: Trained, batches: Iterable = None, detector=None,
                 label_delay: int = 0, **healer_arguments):
        self.cfg, self.trained, self.data = cfg, trained, trained.data
        self.fidi = FIDIMonitor(trained.data.train.X[:, V14], cfg.fidi_window, cfg.fidi_threshold)
        detector = detector(trained, cfg) if detector else self.fidi
        self.healer = SelfHealer(trained.model, "reflexive", detector=detector, rule=lambda X: rule_labels(X, cfg),
                                 max_pending=label_delay + 1, keep_records=1, **healer_arguments,
                                 **{name: getattr(cfg, name) for name in HEALER_OPTIONS})
        self.model, self.registry = self.healer.model, self.healer.registry
        self.shadow = copy.deepcopy(trained.baseline)
        self.labels = LateArrivals(label_delay)
        self.batches = batches if batches is not None else \
            drifted_batches(trained.data.drift, cfg, copy.deepcopy(trained.rng))

    def __iter__(self) -> Iterator[BatchRecord]:
        try:
            for i, (X, y) in enumerate(self.batches, start=1):
                yield self.step(i, X, y)
        finally:
            self.healer.close()

    def step(self, i: int, X: np.ndarray, y: np.ndarray) -> BatchRecord:
        """serve -> score against the shadow and the baseline -> labels -> heal -> healed score."""
        proba = self.healer.predict(X)
        record = self.healer.records[-1]
        if record.state == "QUARANTINED":
            return record
        record.served = metrics_at(y, proba)
        record.shadow = metrics_at(y, predict_proba(self.shadow, X))
        record.baseline = metrics_at(y, predict_proba(self.trained.baseline, X))
        arrived = self.labels.push((i, y))
        if arrived is not None:
            self.healer.observe(*arrived)
        if record.healed_here:
            record.healed = metrics_at(y, predict_proba(self.model, X))
        return record

    def article_table(self) -> dict:
        """The article's four rows at threshold 0.5: the clean model on clean data, then the
        unhealed baseline, its frozen shadow and the healed model on the drifted set."""
        data = self.data
        return {"clean": metrics_at(data.test.y, predict_proba(self.trained.model, data.test.X)),
                **{name: metrics_at(data.drift.y, predict_proba(m, data.drift.X))
                   for name, m in (("no_healing", self.trained.baseline), ("shadow", self.shadow),
                                   ("healed", self.model))}}


# Part II. The heal engine
#
# Where a SelfHealer's heals run when a service cannot wait for them in its serving thread:
# in a thread or a worker process (never holding anything that inference needs), waited for
# at most --heal-timeout and with their faults contained, or applied when done without
# waiting. Each is a healer with the calls of Part I's InlineHealer. Uses Part I.

HEAL_WORKERS = ("inline", "thread", "process")


@dataclass(frozen=True)
class EngineConfig(ArticleConfig):
    """The heal engine: where heals run, how long one may take, whether the stream waits for them."""
    heal_worker: str = knob("inline", "where heals run: inline (in the serving thread, as the article; no "
                            "timeout), thread (starts at once) or process (no interpreter lock shared with "
                            "inference; about 2 s to start)", choices=HEAL_WORKERS, role="timing")
    heal_timeout: float = knob(30.0, "seconds to wait for one heal before rejecting it (thread or process worker)",
                               "(0, 86400]", role="timing")
    async_apply: bool = knob(False, "do not wait for a heal: serve on and apply it at the first batch boundary "
                             "after it finishes (thread or process worker; timing-dependent, so not reproducible)")


def die_with_parent(parent: int) -> None:
    """In a child process: end when the parent ends, however it ends (kill -9 gives it no chance to
    stop its children), so that no orphan keeps computing, writing or holding --out's lock (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before the request was made
        os._exit(1)


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


def running_wait(ready: Callable[[float], bool], timeout: float) -> bool:
    """Wait until ready(seconds), which waits up to that long for something, says it came, for at most
    `timeout` seconds of this process's running time: a wait that overran its slice by a second or more
    means the process was stopped (Ctrl-Z, SIGSTOP, a Slurm suspend), and that time does not count, so
    a suspended run rejects no heal it would have waited for."""
    left = timeout
    while True:  # ready is asked at least once: with no time left, whether it is there already
        asked, start = max(min(0.25, left), 0.0), time.monotonic()
        if ready(asked):
            return True
        took = time.monotonic() - start
        left -= asked if took > asked + 1.0 else took
        if left <= 0:
            return False


class ThreadHeals:
    """Heals in a daemon thread of this process. Starts at once; but the thread shares the
    interpreter lock with inference, which slows predictions (never stops them: no lock of
    ours is shared) while a heal runs."""

    def __init__(self, model: Adapted, cfg: ArticleConfig):
        self.model, self.cfg = model, cfg
        self.trainer = AdapterTrainer(model, cfg)
        self.future: Optional[Future] = None

    def start(self, job: HealJob) -> None:
        future, trainer = Future(), self.trainer

        def work():
            try:
                future.set_result(trainer.heal(job.view, job.weight))
            except BaseException as e:  # contained: reported by result()
                future.set_exception(e)

        self.future = future
        threading.Thread(target=work, name="heal", daemon=True).start()

    def busy(self) -> bool:
        return self.future is not None and not self.future.done()

    def result(self, timeout: float) -> HealResult:
        """The finished heal, or HealRejected after timeout seconds of running time (running_wait)."""
        future, self.future = self.future, None
        if not running_wait(lambda seconds: bool(concurrent.futures.wait([future], seconds).done), timeout):
            self.abandon()
            raise HealRejected(f"heal did not finish within {timeout:g} s")
        try:
            return future.result()
        except HealRejected:
            raise
        except Exception as e:
            raise HealRejected(f"heal raised {type(e).__name__}: {e}") from None

    def restore(self, state: dict) -> None:
        self.trainer.restore(state)

    def abandon(self) -> None:
        """Leave a hung heal to its (daemon) thread and start again from the served weights;
        the abandoned thread's trainer is never used again."""
        self.future = None
        self.trainer = AdapterTrainer(self.model, self.cfg)

    def close(self) -> None:
        self.future = None


def heal_thread_exists() -> bool:
    """Whether a heal thread runs or is starting (is_alive() is False then, but threading.enumerate() lists
    it): an interpreter that shuts down under one inside torch aborts ("terminate called ...")."""
    return any(t.name == "heal" for t in threading.enumerate())


def heal_worker_loop(conn, pickled_model: bytes, cfg: ArticleConfig, parent: int) -> None:
    """The heal worker process: heal or restore on request, reply with the outcome."""
    die_with_parent(parent)
    use_one_torch_thread()
    trainer = AdapterTrainer(pickle.loads(pickled_model), cfg)
    try:
        conn.send(("ready",))
        while True:
            message = conn.recv()
            if message[0] == "heal":
                try:
                    result = trainer.heal(message[1].view, message[1].weight)
                    conn.send(("ok", (to_arrays(result.layer.state_dict()), result.losses, result.seconds)))
                except Exception as e:
                    conn.send(("error", str(e) if isinstance(e, HealRejected)
                               else f"heal raised {type(e).__name__}: {e}"))
            elif message[0] == "restore":
                trainer.restore(from_arrays(message[1]))
            else:
                return
    except (EOFError, ConnectionError, KeyboardInterrupt):  # the parent has gone: leave quietly
        pass


class ProcessHeals:
    """Heals in a worker process, so that heal steps share nothing with inference. Starting
    one costs an import of torch (about 2 s); each heal ships the batch there and the new
    layer back (tens of kB). Its own process, not Part V's pool: a hung heal is killed."""

    STARTUP_TIMEOUT = 120.0  # seconds for a worker to import torch and build its model; not a heal's time

    def __init__(self, model: Adapted, cfg: ArticleConfig):
        self.model, self.cfg = model, cfg
        self.process, self.conn = None, None
        self.pending, self.failed = False, None

    def start(self, job: HealJob) -> None:
        if self.process is None:
            import multiprocessing
            try:
                pickled = pickle.dumps(self.model)
            except Exception as e:  # a class defined inside a function, a lambda hook, ...
                self.failed = f"the model cannot be sent to a heal worker process: {type(e).__name__}: {e}"
                return
            context = multiprocessing.get_context("spawn")  # safe beside running threads, unlike fork
            self.conn, theirs = context.Pipe()
            self.process = context.Process(target=heal_worker_loop, name="heal-worker", daemon=True,
                                           args=(theirs, pickled, self.cfg, os.getpid()))
            with ignoring_ctrl_c():
                self.process.start()
            theirs.close()
            try:  # wait for the worker to be ready, so that --heal-timeout bounds the heal alone
                ready = self.conn.poll(self.STARTUP_TIMEOUT) and self.conn.recv() == ("ready",)
            except (EOFError, OSError):
                ready = False
            if not ready:
                ended = self.process.exitcode
                self.abandon()
                self.failed = (f"heal worker did not start within {self.STARTUP_TIMEOUT:g} s" if ended is None else
                               f"heal worker process ended before it was ready (exit code {ended})")
                return
        self.conn.send(("heal", job))
        self.pending = True

    def busy(self) -> bool:
        return self.pending and not self.conn.poll()

    def result(self, timeout: float) -> HealResult:
        if self.failed:
            reason, self.failed = self.failed, None
            raise HealRejected(reason)
        self.pending = False
        try:
            if not running_wait(self.conn.poll, timeout):
                self.abandon()
                raise HealRejected(f"heal did not finish within {timeout:g} s")
            status, payload = self.conn.recv()
        except (EOFError, OSError) as e:
            self.abandon()
            raise HealRejected(f"heal worker died: {type(e).__name__}") from None
        if status != "ok":
            raise HealRejected(payload)
        arrays, losses, seconds = payload
        layer = copy.deepcopy(self.model.adapter())  # a new object to serve, built from the arrays
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


@contextlib.contextmanager
def ignoring_ctrl_c():
    """Children started here ignore Ctrl-C, which the terminal sends to every process of the run:
    the parent, which gets it too, stops them on its way out, and they print nothing."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        yield
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


class WaitForHeal:
    """Each heal is waited for, at most --heal-timeout seconds, and published at its own batch:
    deterministic, the article's behaviour. A heal that fails or hangs is rejected, never served."""

    def __init__(self, heals, timeout: float):
        self.heals, self.timeout, self.job = heals, timeout, None

    def submit(self, job: HealJob) -> str:
        self.heals.start(job)
        self.job = job
        return "heal"

    def finished(self) -> list[HealOutcome]:
        if self.job is None:
            return []
        job, self.job = self.job, None
        return [outcome_of(job, self.heals, self.timeout)]

    def restore(self, state: dict) -> None:
        self.heals.restore(state)

    def close(self) -> None:
        self.heals.close()


def outcome_of(job: HealJob, heals, timeout: float) -> HealOutcome:
    try:
        return HealOutcome(job, heals.result(timeout))
    except HealRejected as e:
        return HealOutcome(job, None, str(e))


class ApplyWhenDone(WaitForHeal):
    """--async-apply: the stream does not wait. A heal is published at the first batch boundary
    after it finishes; one heal at a time (a batch that arrives meanwhile is not healed:
    heal_busy), and one running past --heal-timeout is abandoned."""

    def __init__(self, heals, timeout: float):
        super().__init__(heals, timeout)
        self.started, self.late = 0.0, []

    def submit(self, job: HealJob) -> str:
        if self.job is not None:
            if time.monotonic() - self.started <= self.timeout:
                return "heal_busy"
            self.heals.abandon()
            self.late.append(HealOutcome(self.job, None, f"heal did not finish within {self.timeout:g} s"))
        self.heals.start(job)
        self.job, self.started = job, time.monotonic()
        return "heal_started"

    def finished(self) -> list[HealOutcome]:
        done, self.late = self.late, []
        if self.job is not None and not self.heals.busy():
            job, self.job = self.job, None
            done.append(outcome_of(job, self.heals, 0))
        return done


def heals_in(worker: str = "thread", timeout: float = 30.0, apply_when_done: bool = False) -> Callable:
    """A SelfHealer's healer argument: heals in a thread or a worker process ("inline": Part I's), each
    waited for at most `timeout` seconds, or with apply_when_done applied at the first batch after it ends."""
    if worker not in HEAL_WORKERS:
        raise ValueError(f"heals_in: worker is one of {', '.join(HEAL_WORKERS)}, got {worker!r}")

    def healer(model: Adapted, cfg: ArticleConfig):
        if worker == "inline":
            return InlineHealer(model, cfg)
        heals = (ProcessHeals if worker == "process" else ThreadHeals)(model, cfg)
        return (ApplyWhenDone if apply_when_done else WaitForHeal)(heals, timeout)
    return healer


# Part III. Honest measurement
#
# What the article's table leaves out: supervision with fewer labels, the prequential lift,
# threshold-free scores, costs, a fresh holdout, the trivial and Bayes-optimal references,
# forgetting, the spread over seeds; then the learner's next question, the scenario bench:
# kinds of drift, the methods measured against healing, each against its Bayes ceiling.
# Computation only: Part IV prints. Uses Parts I and II.

SUPERVISION_MODES = ("labels", "rules", "delayed")
SCENARIOS = ("article", "stationary", "offset", "gradual", "recurring", "prior", "covariate")
# The bench's two extension points, one table each, filled where their entries are defined below: a new
# method or detector is one entry there (the flags' choices are these tables).
HEAL_METHODS: dict = {}  # name -> the StreamMethod class, or a selector, which reads theirs ("Methods", below)
DETECTORS: dict = {}     # name -> (title, factory(trained, cfg)) ("Detectors that see every drift", below)


@dataclass(frozen=True)
class MeasurementConfig(EngineConfig):
    """Honest measurement and the bench: supervision, scenarios, the methods measured against healing, costs."""
    supervision: str = knob("labels", "what the heal learns from: labels (the article), rules (no ground truth "
                            "anywhere), delayed (labels K batches late)", choices=SUPERVISION_MODES)
    label_delay: int = knob(3, "K for --supervision delayed, rethreshold and retrain: batch i's labels usable "
                            "from batch i+K", "[0, 1000000]")
    scenario: str = knob("article", "which drift the stream has", choices=SCENARIOS)
    heal_method: str = knob("heal", "what serves the stream (heal-rules: the heal with --supervision rules)",
                            choices=HEAL_METHODS)
    shifted_fraud_ratio: float = knob(0.40, "fraud share of the prior scenario's stream", "[0.001, 0.999]")
    recurring_period: int = knob(5, "batches the recurring scenario's drift stays on, then off", "[1, 1000000]")
    covariate_tilt: float = knob(0.5, "covariate scenario: rows weighted by exp(-tilt * V14)", "[0, 5]")
    adapt_window: int = knob(5, "recent batches that restandardize, em-prior, rethreshold and retrain use",
                             "[1, 1000000]")
    tent_lr: float = knob(1e-3, "Adam learning rate of tent's one step per batch", "(0, 1]")
    tent_reset_entropy: float = knob(0.02, "tent resets the adapter when a batch's mean entropy falls below "
                                     "this", "[0, 1]")
    retrain_steps: int = knob(50, "Adam steps of each refit of the head by retrain", "[1, 1000000]")
    retrain_lr: float = knob(0.01, "Adam learning rate of retrain's refits", "(0, 1]")
    champion_window: int = knob(1000, "latest labelled batches over which champion compares each challenger's "
                                "cost with the champion's", "[3, 1000000]")
    champion_z: float = knob(1.0, "champion changes when a challenger is cheaper by more than this many standard "
                             "errors of the paired difference", "[0, 100]")
    detector: str = knob("fidi", "what triggers the heal: fidi (the article's), adwin (on each row's V14) or ks "
                         "(a KS test of the model's probabilities)", choices=DETECTORS)
    adwin_delta: float = knob(0.002, "ADWIN's confidence: the chance of a false alarm per check of its window",
                              "(0, 1)")
    ks_window: int = knob(3, "batches of model probabilities the KS detector tests at once", "[1, 1000000]")
    ks_level: float = knob(0.001, "the KS detector alarms when its p-value falls below this", "(0, 1)")
    fn_cost: float = knob(5000.0, "cost of a missed fraud", "[0, 1000000000]", role="cost")
    fp_cost: float = knob(200.0, "cost of a false alarm", "[0, 1000000000]", role="cost")


def stream_parts(cfg: MeasurementConfig) -> dict:
    """Everything the flags hand to Part I's experiment: the drift detector, what the heal learns from and
    when its labels arrive, and where heals run."""
    return dict(detector=make_detector, supervision="rules" if cfg.supervision == "rules" else "labels",
                label_delay=cfg.label_delay if cfg.supervision == "delayed" else 0,
                healer=heals_in(cfg.heal_worker, cfg.heal_timeout, cfg.async_apply))


# -- What a run logs

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


class StreamLog:
    """What a run keeps of its stream: event counts and running lifts, so that a summary needs no
    per-batch history, and the records and events themselves only when asked (plots need them)."""

    def __init__(self, keep: bool):
        self.keep = keep
        self.records: list[BatchRecord] = []
        self.events: list[dict] = []
        self.counts = {"heal": 0, "rollback": 0, "heal_failed": 0, "batch_quarantined": 0}
        self.lift, self.prequential, self.prequential_f1 = RunningStats(), RunningStats(), RunningStats()
        self.first_drift_batch: Optional[int] = None

    def add(self, r: BatchRecord) -> None:
        if r.drifting and self.first_drift_batch is None:
            self.first_drift_batch = r.batch
        self.lift.add(r.lift)
        self.prequential.add(prequential_lift(r))
        self.prequential_f1.add(prequential_f1_lift(r))
        for e in r.events:
            self.counts[e["type"]] += 1
        if self.keep:
            self.records.append(r)
            self.events.extend(r.events)


def prequential_lift(r: BatchRecord) -> Optional[float]:
    """The honest lift: accuracy of the model that served the batch, before any heal on it, minus the shadow's."""
    return None if r.served is None or r.shadow is None else r.served.accuracy - r.shadow.accuracy


def prequential_f1_lift(r: BatchRecord) -> Optional[float]:
    return None if r.served is None or r.shadow is None else r.served.f1 - r.shadow.f1


class Run(Experiment):
    """The article's experiment with every part the flags ask for (supervision, healer, gate),
    and the log of its stream, filled as its records go by."""

    def __init__(self, cfg: MeasurementConfig, trained: Trained, batches: Iterable = None, keep_records: bool = True):
        super().__init__(cfg, trained, batches, **stream_parts(cfg))
        self.log = StreamLog(keep_records)

    def __iter__(self) -> Iterator[BatchRecord]:
        for record in super().__iter__():
            self.log.add(record)
            yield record

    def to_the_end(self) -> Run:
        for _ in self:
            pass
        return self


# -- Scores, costs and ceilings

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


def cost_per_1000(m: Metrics, cfg: MeasurementConfig) -> float:
    return (m.fn * cfg.fn_cost + m.fp * cfg.fp_cost) / (m.tp + m.tn + m.fp + m.fn) * 1000


def cost_optimal_threshold(y: np.ndarray, scores: np.ndarray, cfg: MeasurementConfig) -> float:
    """The threshold (predict fraud when score > t) with the lowest cost on (y, scores), the lowest such
    threshold on ties. One sort: flagging above the k-th distinct score misses the frauds at or
    below it and alarms on the normal rows above it."""
    values, inverse = np.unique(scores, return_inverse=True)
    fraud = np.bincount(inverse, weights=y == 1, minlength=len(values))
    normal = np.bincount(inverse, weights=y != 1, minlength=len(values))
    missed = np.concatenate([[0.0], np.cumsum(fraud)])                    # at threshold -inf, then each value
    alarms = normal.sum() - np.concatenate([[0.0], np.cumsum(normal)])
    costs = (missed * cfg.fn_cost + alarms * cfg.fp_cost) / len(y) * 1000
    return float(np.concatenate([[-np.inf], values])[int(np.argmin(costs))])


@dataclass(frozen=True)
class Scored:
    """One model on one set: the metrics at 0.5, threshold-free AUCs and cost."""
    name: str
    metrics: Metrics
    roc_auc: float
    pr_auc: float
    cost: float


def score_model(name: str, y: np.ndarray, proba: np.ndarray, cfg: MeasurementConfig) -> Scored:
    m = metrics_at(y, proba)
    return Scored(name, m, roc_auc(y, proba), pr_auc(y, proba), cost_per_1000(m, cfg))


def fraud_prior(n: int, cfg: MeasurementConfig) -> float:
    return int(n * cfg.fraud_ratio) / n


def drifted_set_law(cfg: MeasurementConfig, n: int) -> RowLaw:
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


def cost_threshold(cfg: MeasurementConfig) -> float:
    """The Bayes decision for costs: flag fraud when P(fraud) > fp / (fp + fn)."""
    total = cfg.fn_cost + cfg.fp_cost
    return cfg.fp_cost / total if total > 0 else 0.5


@dataclass(frozen=True)
class Ceiling:
    """The best any model can do on a stream of rows, from the generator's known laws."""
    accuracy: float
    roc_auc: float  # of the likelihood ratio, the best score there is (Neyman-Pearson)
    cost: float     # expected cost per 1,000 rows, deciding at cost_threshold


LOG_ODDS_BINS = np.linspace(-60, 60, 1_200_001)  # beyond +-60 a posterior is 0 or 1 to double precision


def auc_of_masses(fraud: np.ndarray, normal: np.ndarray) -> float:
    """ROC-AUC from the fraud and normal mass in each score bin, highest scores last; rows in one bin
    count as ties, half a win each (as Mann-Whitney counts them)."""
    tpr_steps, fpr_steps = fraud[::-1], normal[::-1]
    tpr_before = np.cumsum(tpr_steps) - tpr_steps
    return float(np.sum(fpr_steps * (tpr_before + tpr_steps / 2)) / (tpr_steps.sum() * fpr_steps.sum()))


def bayes_ceiling(laws: list[RowLaw], cfg: MeasurementConfig) -> Ceiling:
    """The ceiling of a stream whose batches (of equal size) follow these laws, integrated on a
    fine V14 grid per distinct law. The AUC is that of the pooled stream, ranked by the true
    posterior of each row's own batch, from the masses gathered in fine bins of log-odds (memory
    stays flat however many distinct laws a long stream has)."""
    counts: dict[RowLaw, int] = {}
    for law in laws:
        counts[law] = counts.get(law, 0) + 1
    with np.errstate(divide="ignore"):
        flag_above = float(np.log(cost_threshold(cfg)) - np.log1p(-cost_threshold(cfg)))
    accuracy = cost = 0.0
    fraud_in_bin, normal_in_bin = np.zeros(len(LOG_ODDS_BINS) + 1), np.zeros(len(LOG_ODDS_BINS) + 1)
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
        bins = np.searchsorted(LOG_ODDS_BINS, odds)
        fraud_in_bin += np.bincount(bins, weights=weight * fraud, minlength=len(fraud_in_bin))
        normal_in_bin += np.bincount(bins, weights=weight * normal, minlength=len(normal_in_bin))
    return Ceiling(accuracy, auc_of_masses(fraud_in_bin, normal_in_bin), cost)


def score_set(cfg: MeasurementConfig, ds: Dataset, probabilities: dict) -> dict:
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


def holdout_set(cfg: MeasurementConfig) -> Dataset:
    """A fresh drifted set the stream never sees, from a generator of its own, so that the
    article's draws stay untouched."""
    return make_dataset(cfg.n_drift, cfg, np.random.RandomState([cfg.seed, 1]), drifted=True)


def evaluate_run(run: Run) -> Evaluation:
    """Every model on the drifted set and on the fresh holdout, against the references."""
    cfg, data, trained = run.cfg, run.data, run.trained
    holdout = holdout_set(cfg)
    models = {"no_healing": trained.baseline, "shadow": run.shadow, "healed": run.model,
              "never_healed": trained.model}
    rows = {name: score_set(cfg, ds, {k: predict_proba(m, ds.X) for k, m in models.items()})
            for name, ds in (("drift", data.drift), ("holdout", holdout))}
    threshold = cost_optimal_threshold(data.drift.y, predict_proba(run.model, data.drift.X), cfg)
    ceiling = bayes_ceiling([drifted_set_law(cfg, cfg.n_drift)], cfg)
    return Evaluation(rows["drift"], rows["holdout"],
                      score_model("clean", data.test.y, predict_proba(trained.model, data.test.X), cfg),
                      score_model("clean", data.test.y, predict_proba(run.model, data.test.X), cfg),
                      ceiling.accuracy, ceiling.roc_auc, threshold,
                      metrics_at(holdout.y, predict_proba(run.model, holdout.X), threshold))


# -- Seeds

# The per-seed figures a sweep aggregates, and how each is printed.
SWEEP_FIGURES = {"recovery_pp": "+.1f", "prequential_lift_pp": "+.1f", "holdout_accuracy": ".3f",
                 "holdout_auc": ".3f", "f1_change": "+.3f", "forgetting_pp": "+.1f", "cost_change": "+,.0f"}


def seed_summary(cfg: MeasurementConfig) -> dict:
    """One seed's run, reduced to the figures a sweep aggregates."""
    run = Run(cfg, train_models(cfg), keep_records=False).to_the_end()
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

DRIFTING_SCENARIOS = ("article", "offset", "gradual", "recurring", "prior", "covariate")  # from batch 1 on
SHIFTING_SCENARIOS = ("gradual", "recurring")  # each batch's law is not the one before
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


def scenario_law(name: str, t: int, cfg: MeasurementConfig) -> RowLaw:
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


def scenario_batches(name: str, cfg: MeasurementConfig, trained: Trained) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The scenario's production stream: fresh rows, batch by batch, from a generator of its own.
    `article` too: the article's own stream draws its rows with replacement from one set of 1,000,
    so that most rows come back with labels already revealed, and no ceiling for fresh rows holds."""
    rng = np.random.RandomState([cfg.seed, 2, SCENARIOS.index(name)])
    for t in range(1, cfg.n_batches + 1):
        law = scenario_law(name, t, cfg)
        n_fraud = rng.binomial(cfg.batch_size, law.fraud_share)
        rows = draw_rows(rng, cfg.batch_size - n_fraud, n_fraud, law)
        yield rows.X, rows.y


def row_only_ceiling(laws: list[RowLaw], cfg: MeasurementConfig) -> Ceiling:
    """What a scorer that sees a row but not which batch it came in can reach on a stream whose batches
    follow these laws: the Bayes rule of the pooled law (on a stream of one law, the Bayes ceiling)."""
    span = 12 * max(max(law.normal_v14[1], law.fraud_v14[1]) for law in laws)
    means = [m for law in laws for m in (law.normal_v14[0], law.fraud_v14[0])]
    v = np.linspace(min(means) - span, max(means) + span, 400_001)
    dv = v[1] - v[0]
    fraud = sum(law.fraud_share * np.exp(_log_pdf(v, law.fraud_v14)) for law in laws) * dv / len(laws)
    normal = sum((1 - law.fraud_share) * np.exp(_log_pdf(v, law.normal_v14)) for law in laws) * dv / len(laws)
    t = cost_threshold(cfg)
    flagged = fraud * (1 - t) > normal * t
    cost = 1000 * float(cfg.fn_cost * fraud[~flagged].sum() + cfg.fp_cost * normal[flagged].sum())
    with np.errstate(divide="ignore"):
        order = np.argsort(np.log(fraud) - np.log(normal), kind="stable")  # lowest posterior first
    return Ceiling(float(np.sum(np.maximum(fraud, normal))), auc_of_masses(fraud[order], normal[order]), cost)


def scenario_row_only_ceiling(name: str, cfg: MeasurementConfig) -> Ceiling:
    return row_only_ceiling([scenario_law(name, t, cfg) for t in range(1, cfg.n_batches + 1)], cfg)


@functools.lru_cache(maxsize=16)  # a bench asks for each scenario's once per seed
def scenario_ceiling(name: str, cfg: MeasurementConfig) -> Ceiling:
    return bayes_ceiling([scenario_law(name, t, cfg) for t in range(1, cfg.n_batches + 1)], cfg)


# -- Detectors that see every drift


class _Bucket:
    """A summary of consecutive values: how many, their sum, and their sum of squared
    deviations from their own mean (m2). Three numbers instead of the values is what lets
    ADWIN remember a window of n values in O(log n) memory."""

    __slots__ = ("count", "total", "m2")

    def __init__(self, count: int, total: float, m2: float):
        self.count = count
        self.total = total
        self.m2 = m2

    @property
    def mean(self) -> float:
        return self.total / self.count

    def merged_with(self, newer: _Bucket) -> _Bucket:
        """One bucket for both: m2 of a union is the two m2s plus a term for the gap between
        the two means (Chan, Golub and LeVeque's pairwise update)."""
        count = self.count + newer.count
        gap = newer.mean - self.mean
        m2 = self.m2 + newer.m2 + gap * gap * self.count * newer.count / count
        return _Bucket(count, self.total + newer.total, m2)


class ADWIN:
    """ADWIN (Bifet and Gavalda, 2007): an adaptive window over a stream of numbers that drops its older
    part when the means of the two parts differ by more than chance allows. This is ADWIN2: row i of the
    window holds up to max_buckets buckets of 2**i values, so a window of n values costs O(log n) memory
    and a check of every cut as much time.

    delta: the false alarm probability the bound allows for one check of the whole window. clock: check
    the cuts every `clock` values only (a change is seen up to clock - 1 values late). max_buckets:
    buckets per row before the row's two oldest merge into the next (more: finer cuts, more time).
    min_window_length: values each part of a cut must hold. grace_period: no check until the window
    holds more than this many values. After a change the window keeps its newer part and goes on, so a
    large change is usually reported a few more times while the last old values leave."""

    def __init__(self, delta: float = 0.002, clock: int = 32, max_buckets: int = 5,
                 min_window_length: int = 5, grace_period: int = 10):
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if clock < 1 or max_buckets < 1 or min_window_length < 1 or grace_period < 0:
            raise ValueError("clock, max_buckets and min_window_length must be >= 1, grace_period >= 0")
        self.delta = delta
        self.clock = clock
        self.max_buckets = max_buckets
        self.min_window_length = min_window_length
        self.grace_period = grace_period
        self._rows: list[list[_Bucket]] = [[]]  # _rows[i]: buckets of 2**i values, oldest first
        self._width = 0
        self._total = 0.0
        self._m2 = 0.0  # sum of squared deviations from the window's mean
        self._seen = 0  # values ever given, for the clock

    def update(self, x: float) -> bool:
        """Add one value; True when this value made the window drop its older part (a change)."""
        self._add(float(x))
        self._seen += 1
        if self._seen % self.clock != 0 or self._width <= self.grace_period:
            return False
        changed = False
        # Drop the oldest bucket while some cut still splits the window into two parts whose
        # means differ: what is left is the longest recent window that looks stationary.
        while self._has_significant_cut():
            self._drop_oldest_bucket()
            changed = True
        return changed

    @property
    def width(self) -> int:
        """How many values the window holds."""
        return self._width

    @property
    def estimation(self) -> float:
        """Mean of the window (0.0 while it is empty)."""
        return self._total / self._width if self._width else 0.0

    def _add(self, x: float) -> None:
        if self._width:
            gap = x - self._total / self._width
            self._m2 += gap * gap * self._width / (self._width + 1)
        self._width += 1
        self._total += x
        self._rows[0].append(_Bucket(1, x, 0.0))
        # A row that overflows merges its two oldest buckets into one of the next row, which
        # may overflow in turn: like carrying in binary addition.
        row = 0
        while len(self._rows[row]) > self.max_buckets:
            if row + 1 == len(self._rows):
                self._rows.append([])
            older, newer = self._rows[row].pop(0), self._rows[row].pop(0)
            self._rows[row + 1].append(older.merged_with(newer))
            row += 1

    def _has_significant_cut(self) -> bool:
        """Is there a boundary between two buckets where the older part's mean and the newer
        part's mean differ by more than epsilon? Cuts are only tried between buckets, which
        is what makes the check O(log n) instead of O(n)."""
        if self._width < 2:
            return False
        variance = max(self._m2 / self._width, 0.0)
        # Bernstein's bound, with delta shared over the ~ln(width) cuts that are tried:
        # delta' = delta / ln(width), and log_term = ln(2 / delta').
        log_term = math.log(2.0 * math.log(self._width) / self.delta)
        oldest_first = [bucket for row in reversed(self._rows) for bucket in row]
        n0, total0 = 0, 0.0
        for bucket in oldest_first[:-1]:  # after the newest bucket the newer part is empty
            n0 += bucket.count
            total0 += bucket.total
            n1 = self._width - n0
            if n0 < self.min_window_length or n1 < self.min_window_length:
                continue
            gap = abs(total0 / n0 - (self._total - total0) / n1)
            if gap > self._epsilon(n0, n1, variance, log_term):
                return True
        return False

    def _epsilon(self, n0: int, n1: int, variance: float, log_term: float) -> float:
        """How far apart two means of these sizes may lie by chance alone. The sizes enter as
        a harmonic mean m, shrunk by min_window_length - 1 to be careful with short parts."""
        inv_m = 1.0 / (n0 - self.min_window_length + 1) + 1.0 / (n1 - self.min_window_length + 1)
        return math.sqrt(2.0 * inv_m * variance * log_term) + 2.0 / 3.0 * inv_m * log_term

    def _drop_oldest_bucket(self) -> None:
        oldest_row = self._rows[-1]
        bucket = oldest_row.pop(0)
        while len(self._rows) > 1 and not self._rows[-1]:
            self._rows.pop()
        self._width -= bucket.count
        self._total -= bucket.total
        if self._width:
            # Undo the pairwise update: what is left's m2 is the old m2 minus the bucket's
            # m2 and minus the term for the gap between the bucket's mean and the rest's.
            gap = bucket.mean - self._total / self._width
            self._m2 -= bucket.m2 + gap * gap * bucket.count * self._width / (bucket.count + self._width)
        else:
            self._m2 = 0.0


def ks_two_sample(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D (the largest gap between the two empirical CDFs) and
    its p-value from Kolmogorov's limit law, with Stephens' (1970) correction for finite samples."""
    a, b = np.sort(a.astype(np.float64)), np.sort(b.astype(np.float64))
    pooled = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, pooled, side="right") / len(a)
                            - np.searchsorted(b, pooled, side="right") / len(b))))
    n = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    lam = (n + 0.12 + 0.11 / n) * d
    if lam < 0.2:  # the series converges slowly there, and the p-value is 1 to many places
        return d, 1.0
    k = np.arange(1, 101)
    return d, float(min(1.0, max(0.0, 2 * np.sum((-1.0) ** (k - 1) * np.exp(-2 * k ** 2 * lam ** 2)))))


class KSDetector:
    """Black-box shift detection (Rabanser et al., 2019): a two-sample KS test of a model's probabilities
    (of its most probable class, with several) on the last `window` batches against those on clean
    held-out inputs; drifting while the p-value is below `level`. One test on the model's output instead
    of one per input, and it sees the shifts the model is sensitive to; no labels. It watches the model
    as trained, not the served one, which healing moves on purpose."""

    def __init__(self, model: nn.Module, reference: np.ndarray, window: int, level: float):
        self.model, self.level = model, level
        self.reference = self.confidence(reference)
        self.recent: deque = deque(maxlen=window)

    def confidence(self, X: np.ndarray) -> np.ndarray:
        proba = predict_proba(self.model, X)
        return proba if proba.ndim == 1 else proba.max(1)

    def check(self, X: np.ndarray, proba: np.ndarray) -> tuple[float, bool]:
        self.recent.append(self.confidence(X))
        d, p_value = ks_two_sample(self.reference, np.concatenate(self.recent))
        return d, p_value < self.level


def ks_on_output(trained: Trained, cfg: MeasurementConfig) -> KSDetector:
    return KSDetector(trained.model, calibration_set(cfg).X, cfg.ks_window, cfg.ks_level)


class RowADWIN:
    """ADWIN on every row's V14, one row at a time, after the training rows': drifting at a batch in
    which it dropped part of its window. The window's mean of V14 is the score. V14, not the model's
    output, because it is the feature the article watches, and the model's output moves with every heal."""

    def __init__(self, trained: Trained, cfg: MeasurementConfig):
        self.adwin = ADWIN(delta=cfg.adwin_delta)
        for v in trained.data.train.X[:, V14]:  # the clean rows first: what "no change" looks like
            self.adwin.update(v)

    def check(self, X: np.ndarray, proba: np.ndarray) -> tuple[float, bool]:
        changed = [self.adwin.update(v) for v in X[:, V14]]
        return self.adwin.estimation, any(changed)


def fidi_on_v14(trained: Trained, cfg: MeasurementConfig) -> FIDIMonitor:
    return FIDIMonitor(trained.data.train.X[:, V14], cfg.fidi_window, cfg.fidi_threshold)


# Each detector also has two BenchRow fields, the bench's CSV columns NAME_delay and NAME_false_alarms.
DETECTORS.update({"fidi": ("FIDI", fidi_on_v14), "adwin": ("ADWIN (V14 rows)", RowADWIN),
                  "ks": ("KS (model output)", ks_on_output)})


def make_detector(trained: Trained, cfg: MeasurementConfig):
    """The detector --detector names, for Part I's experiment (FIDI is the article's)."""
    return DETECTORS[cfg.detector][1](trained, cfg)


def every_detector(trained: Trained, cfg: MeasurementConfig) -> dict:
    return {name: make_detector(trained, dataclasses.replace(cfg, detector=name)) for name in DETECTORS}


def detection_delays(scenario: str, cfg: MeasurementConfig, trained: Trained) -> dict:
    """Batches from the drift's onset (batch 1: every scenario but stationary drifts from its first
    batch on, gradual only a little at first) to each detector's first alarm; NaN if it never raises one."""
    detectors, first = every_detector(trained, cfg), {}
    for t, (X, _) in enumerate(scenario_batches(scenario, cfg, trained), start=1):
        for name, detector in detectors.items():
            if detector.check(X, None)[1] and name not in first:
                first[name] = t
    return {name: first[name] - 1.0 if scenario in DRIFTING_SCENARIOS and name in first else math.nan
            for name in DETECTORS}


def false_alarms(cfg: MeasurementConfig, trained: Trained, n_batches: int = 1000) -> dict:
    """Alarms per 1,000 batches of each detector on a long stream where nothing drifts (a batch with
    an alarm counts once), from a generator of its own."""
    detectors, alarms = every_detector(trained, cfg), dict.fromkeys(DETECTORS, 0)
    rng, law = np.random.RandomState([cfg.seed, 4]), scenario_law("stationary", 1, cfg)
    for _ in range(n_batches):
        n_fraud = rng.binomial(cfg.batch_size, law.fraud_share)
        X = draw_rows(rng, cfg.batch_size - n_fraud, n_fraud, law).X
        for name, detector in detectors.items():
            alarms[name] += detector.check(X, None)[1]
    return {name: 1000 * count / n_batches for name, count in alarms.items()}


# -- Methods: what to do about it

class StreamMethod:
    """One way to serve a drifting stream, and the baseline of all: the trained model, untouched.

    For each batch, predict() answers first; adapt() then sees the batch (prequential). Labels
    reach adapt() only for methods with uses_labels; the others are handed None.
    """
    uses_labels = False

    def __init__(self, trained: Trained, cfg: MeasurementConfig):
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
    """The article's self-healing stream (Part I) with the engine's parts, following --supervision,
    one batch at a time."""

    def __init__(self, trained: Trained, cfg: MeasurementConfig):
        super().__init__(trained, cfg)
        self.uses_labels = cfg.supervision != "rules"
        self.experiment, self.batches = Experiment(cfg, trained, batches=(), **stream_parts(cfg)), 0
        self.model = self.experiment.model

    def adapt(self, X, y):
        self.batches += 1
        # With rules, no label is handed over: the rule's own labels stand in for y in the stream's
        # per-batch scores, which decide nothing.
        record = self.experiment.step(self.batches, X, rule_labels(X, self.cfg) if y is None else y)
        self.adaptations += sum(e["type"] == "heal" for e in record.events)

    def close(self):
        self.experiment.healer.close()


class Restandardize(StreamMethod):
    """Map each feature of the stream back to the training mean and spread, with statistics of the
    last --adapt-window batches (no labels)."""

    def __init__(self, trained: Trained, cfg: MeasurementConfig):
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

    def __init__(self, trained: Trained, cfg: MeasurementConfig):
        super().__init__(trained, cfg)
        self.clean, self.model, self.resets = trained.model, copy.deepcopy(trained.model), 0
        self.reset()

    def reset(self) -> None:
        self.model.reflexive = copy.deepcopy(self.clean.reflexive)
        self.optimizer = Adam(self.model.reflexive.parameters(), lr=self.cfg.tent_lr)

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


def calibration_set(cfg: MeasurementConfig) -> Dataset:
    """Clean held-out rows, from a generator of their own: the stream never sees them."""
    return make_dataset(cfg.n_test, cfg, np.random.RandomState([cfg.seed, 3]), drifted=False)


def sigmoid(u: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0, -u))  # 1 / (1 + exp(-u)), without overflow


def logit(proba: np.ndarray) -> np.ndarray:
    p = np.clip(proba.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def fit_bcts(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Temperature scaling with a bias term (BCTS, Alexandari et al. 2020), which for two classes is
    sigmoid(a * z + b) on the logits z: the a and b of least log-loss, by Newton's method."""
    features = np.column_stack([z, np.ones_like(z)])

    def log_loss(params):
        u = features @ params
        return float(np.sum(np.logaddexp(0, u) - y * u))
    params = np.array([1.0, 0.0])
    for _ in range(100):
        p = sigmoid(features @ params)
        gradient = features.T @ (p - y)
        hessian = features.T @ (features * (p * (1 - p))[:, None]) + 1e-9 * np.eye(2)
        step, loss = np.linalg.solve(hessian, gradient), log_loss(params)
        while log_loss(params - step) > loss and np.abs(step).max() > 1e-12:  # damped: never a worse fit
            step = step / 2
        params = params - step
        if np.abs(step).max() < 1e-10:
            break
    a, b = params
    return (float(a), float(b)) if np.isfinite(params).all() else (1.0, 0.0)


class Calibrated(StreamMethod):
    """The trained model with its probabilities calibrated once, before the stream, on clean held-out
    rows (BCTS), and never adapted: the decision at fp/(fp+fn) is the Bayes rule only for calibrated
    probabilities, and the trained network's are not."""

    def __init__(self, trained: Trained, cfg: MeasurementConfig):
        super().__init__(trained, cfg)
        rows = calibration_set(cfg)
        self.a, self.b = fit_bcts(logit(predict_proba(trained.model, rows.X)), rows.y.astype(np.float64))

    def predict(self, X):
        return sigmoid(self.a * logit(super().predict(X)) + self.b)


class EMPrior(Calibrated):
    """Saerens et al. (2002): re-estimate the fraud share by EM from the calibrated probabilities on
    the last --adapt-window batches, and correct the posteriors to it (no labels). EM is exact only
    for calibrated probabilities, so it starts from `calibrated`'s."""

    def __init__(self, trained: Trained, cfg: MeasurementConfig):
        super().__init__(trained, cfg)
        self.train_share = self.share = fraud_prior(cfg.n_test, cfg)  # the share the calibration saw
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

    def __init__(self, trained: Trained, cfg: MeasurementConfig):
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

    def __init__(self, trained: Trained, cfg: MeasurementConfig):
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
        optimizer = Adam(head.parameters(), lr=self.cfg.retrain_lr)
        for _ in range(self.cfg.retrain_steps):
            optimizer.zero_grad()
            F.binary_cross_entropy(head(features), targets).backward()
            optimizer.step()
        self.model.head = head
        self.adaptations += 1


class HealRules(HealMethod):
    """The heal with the rule's labels alone (--supervision rules): the bench runs the heal both ways."""

    def __init__(self, trained: Trained, cfg: MeasurementConfig):
        super().__init__(trained, dataclasses.replace(cfg, supervision="rules"))


def make_method(name: str, trained: Trained, cfg: MeasurementConfig) -> StreamMethod:
    return HEAL_METHODS[name](trained, cfg)


@dataclass
class Served:
    """What a method served on one stream: on each batch its probabilities and the threshold above which
    it flagged fraud (one per row where select drew each row's answer from another candidate); and on how
    many batches it changed what it serves. A selector also keeps every candidate's cost on every batch
    (batches x candidates) and, for select, what its guarantee allows on this stream."""
    proba: list = field(default_factory=list)
    thresholds: list = field(default_factory=list)
    adaptations: int = 0
    candidate_costs: Optional[np.ndarray] = None
    guarantee: dict = field(default_factory=dict)  # select's: BenchRow's fixed_share_cost and bounds


def serve_stream(method: StreamMethod, batches: list) -> Served:
    """Prequential: each batch is answered before the method adapts on it (with its labels, if it uses any)."""
    served = Served()
    try:
        for X, y in batches:
            served.proba.append(method.predict(X))
            served.thresholds.append(method.flag_threshold())
            method.adapt(X, y if method.uses_labels else None)
    finally:
        method.close()
    served.adaptations = method.adaptations
    return served


# Select's candidates: name -> the --supervision it runs with, where not the bench's (select's heal gets its
# labels as late as select does). A method added to the bench is a candidate only once it is named here.
CANDIDATES = {"none": None, "calibrated": None, "heal": "delayed", "heal-rules": None, "restandardize": None,
              "tent": None, "em-prior": None, "rethreshold": None, "retrain": None}


def candidate_costs(runs: dict[str, Served], t: int, y: np.ndarray, cfg: MeasurementConfig) -> np.ndarray:
    """What each candidate's decisions on batch t cost, per 1,000 rows, once its labels y are known."""
    return np.array([cost_per_1000(classify(y, runs[name].proba[t] > runs[name].thresholds[t]), cfg)
                     for name in CANDIDATES])


class FixedShare:
    """Prediction with expert advice: exponential weights with fixed share, its learning rate AdaHedge's.

    After each round every expert's loss is seen. Each weight is multiplied by exp(-eta * loss), and
    then a share alpha of the whole is spread evenly over the experts (fixed share, Herbster and Warmuth
    1998), so that an expert which was poor keeps weight alpha / K and can take over within about
    ln(K / alpha) / (eta * its lead per round) rounds once it is the better one. alpha = 1 / T for a
    T-round stream. The learning rate needs neither T nor the range of the losses: eta = C / Delta
    (de Rooij, van Erven, Grunwald and Koolen 2014), Delta being the mixability gaps summed so far (what
    the forecaster's expected loss exceeded the mix loss by; infinite until the first gap: follow the
    leader), with C = 2 ln(K / alpha) + T ln(1 / (1 - alpha)).

    Guarantee, on any losses: against every sequence of experts with at most one switch (one expert
    throughout is such a sequence), the expected loss exceeds the sequence's by at most 2 Delta_T <=
    S sqrt(T (C + 4)), S the largest spread of the losses within a round. (Mirror descent with fixed
    share: each round, forecaster minus sequence = (KL(u || w) - KL(u || w'))/eta + delta; fixed share
    keeps every weight >= alpha / K, so the KL terms telescope to C / eta_T <= Delta_T as eta falls;
    and delta <= min(S, eta S^2 / 8) gives Delta_T^2 <= T S^2 (C / 4 + 1).) With m switches, C grows
    to (m + 1) ln(K / alpha) + T ln(1 / (1 - alpha)) and the bound to (C_m / C + 1) Delta_T."""

    def __init__(self, n_experts: int, n_rounds: int):
        self.n_experts, self.n_rounds = n_experts, max(1, n_rounds)
        self.share = min(1.0 / self.n_rounds, 0.5)
        self.budget = self.switch_budget(1)
        self.weights = np.full(n_experts, 1.0 / n_experts)
        self.gap, self.spread = 0.0, 0.0  # Delta, and S so far

    def switch_budget(self, switches: int) -> float:
        """C for sequences with this many switches."""
        return ((switches + 1) * math.log(self.n_experts / self.share)
                + self.n_rounds * math.log(1 / (1 - self.share)))

    @property
    def learning_rate(self) -> float:
        return self.budget / self.gap if self.gap > 0 else math.inf

    def update(self, losses: np.ndarray) -> None:
        eta, lowest = self.learning_rate, float(losses.min())
        if math.isinf(eta):  # follow the leader: the weight stays on the round's best
            kept, mix_loss = self.weights * (losses == lowest), lowest
        else:
            kept = self.weights * np.exp(-eta * (losses - lowest))
            mix_loss = lowest - math.log(kept.sum()) / eta
        self.gap += max(0.0, float(self.weights @ losses) - mix_loss)
        self.spread = max(self.spread, float(losses.max()) - lowest)
        self.weights = (1 - self.share) * kept / kept.sum() + self.share / self.n_experts

    def regret_bound(self, switches: int = 1) -> float:
        """What the guarantee allows, from the gaps seen: against sequences with this many switches."""
        return (self.switch_budget(switches) / self.budget + 1) * self.gap

    def worst_case_bound(self) -> float:
        """The guarantee for any losses whose spread within a round stays within the largest one seen."""
        return self.spread * math.sqrt(self.n_rounds * (self.budget + 4))


class LateExperts:
    """Experts whose losses arrive `delay` rounds late, by the black-box reduction of Joulani, Gyorgy and
    Szepesvari (2013): delay + 1 FixedShare forecasters take the rounds in turn, each learning only from
    its own rounds, whose losses have always arrived by its next turn. Its guarantee is the sum of theirs,
    each over about T / (delay + 1) rounds."""

    def __init__(self, n_experts: int, n_rounds: int, delay: int):
        self.forecasters = [FixedShare(n_experts, len(range(j, n_rounds, delay + 1))) for j in range(delay + 1)]

    def weights(self, t: int) -> np.ndarray:
        return self.forecasters[t % len(self.forecasters)].weights

    def learn(self, t: int, losses: np.ndarray) -> None:
        self.forecasters[t % len(self.forecasters)].update(losses)

    def regret_bound(self, switches: int = 1) -> float:
        return sum(f.regret_bound(switches) for f in self.forecasters)

    def worst_case_bound(self) -> float:
        return sum(f.worst_case_bound() for f in self.forecasters)


class Selector:
    """What select and champion share. The CANDIDATES run in shadow on every batch, and each row of a
    batch is answered by a candidate drawn by the selector's weights for that batch (champion's put all
    their weight on one). Labels arrive --label-delay batches late; then each candidate's own decisions
    on that batch, at its own threshold, are priced, and the selector learns from every candidate's cost:
    the full-information setting of prediction with expert advice.

    What a candidate learns from is the stream (labels or inputs), never what a selector serves, so a
    selector is read off its candidates' own runs on the same stream (serve): nothing runs twice."""
    turns = 1  # forecasters taking the batches in turn (what a change of favourite is counted within)

    def __init__(self, cfg: MeasurementConfig):
        self.cfg, self.draws = cfg, np.random.RandomState(cfg.seed)

    def serve(self, runs: dict[str, Served], labels: list) -> Served:
        """What the selector serves, given each candidate's run and each batch's labels (read only once
        they have arrived)."""
        names, labelled = list(CANDIDATES), LateArrivals(self.cfg.label_delay)
        served, favourites = Served(candidate_costs=np.zeros((len(labels), len(names)))), {}
        for t, y in enumerate(labels):
            weights, rows = self.weights(t), np.arange(len(runs[names[0]].proba[t]))
            drawn = self.draws.choice(len(names), size=len(rows), p=weights)
            served.proba.append(np.stack([runs[name].proba[t] for name in names])[drawn, rows])
            served.thresholds.append(np.array([runs[name].thresholds[t] for name in names])[drawn])
            turn, favourite = t % self.turns, int(weights.argmax())
            served.adaptations += favourites.setdefault(turn, favourite) != favourite
            favourites[turn] = favourite
            arrived = labelled.push((t, y))
            if arrived is not None:
                served.candidate_costs[arrived[0]] = candidate_costs(runs, *arrived, self.cfg)
                self.learn(arrived[0], served.candidate_costs[arrived[0]])
        for t, y in labelled.pending:  # after the stream: for the regret in hindsight, not served
            served.candidate_costs[t] = candidate_costs(runs, t, y, self.cfg)
            self.learn(t, served.candidate_costs[t])
        served.guarantee = self.guarantee(len(labels))
        return served

    def weights(self, t: int) -> np.ndarray:
        raise NotImplementedError

    def learn(self, t: int, costs: np.ndarray) -> None:
        raise NotImplementedError

    def guarantee(self, n_batches: int) -> dict:
        return {}


class Champion(Selector):
    """champion: select's rule before it had a guarantee. The champion's answers are served, `calibrated`
    first; a challenger takes over when, over the last --champion-window labelled batches (by default all
    of them), it cost less than the champion by more than --champion-z standard errors of the paired
    difference. The window and the margin were chosen on seeds 0-4 at the default drift strength; the
    rule has no guarantee."""

    def __init__(self, cfg: MeasurementConfig):
        super().__init__(cfg)
        self.champion = "calibrated"
        self.costs = {name: deque(maxlen=cfg.champion_window) for name in CANDIDATES}

    def weights(self, t: int) -> np.ndarray:
        return np.array([float(name == self.champion) for name in CANDIDATES])

    def learn(self, t: int, costs: np.ndarray) -> None:
        for name, cost in zip(CANDIDATES, costs):
            self.costs[name].append(cost)
        self.champion = self.best_challenger() or self.champion

    def best_challenger(self) -> Optional[str]:
        """The challenger most surely cheaper than the champion, if one is by more than champion_z."""
        champion = np.array(self.costs[self.champion])
        best, best_z = None, self.cfg.champion_z
        if len(champion) < 3:
            return None
        for name, costs in self.costs.items():
            saving = champion - np.array(costs)  # per labelled batch, paired
            se = saving.std(ddof=1) / math.sqrt(len(saving))
            z = saving.mean() / se if se > 0 else (math.inf if saving.mean() > 0 else 0.0)
            if name != self.champion and z > best_z:
                best, best_z = name, z
        return best


class Select(Selector):
    """The self-healer that picks the fix, with a guarantee: prediction with expert advice at two levels.

    Below, LateExperts weigh the CANDIDATES (fixed share, AdaHedge's learning rate). Above, LateExperts
    weigh two ways of serving: champion's pick, and a candidate drawn by those weights; each row is then
    answered by a candidate drawn by the combined weights. Hedging between a tuned rule and a forecaster
    with a guarantee is FlipFlop's idea (de Rooij et al. 2014: follow the leader if you can, hedge if you
    must): select costs about what the better of the two costs on the stream, and loses the guarantee of
    neither. Nothing here was tuned on the bench (champion's rule was chosen on seeds 0-4).

    The guarantee, in expected cost over T batches: against the best candidate, or the best sequence of
    candidates with one switch, select's regret is at most the upper level's against the lower plus the
    lower's against them: at most 2 sum_j Delta_j over the forecasters of both levels (FixedShare), which
    for any costs is at most the sum of their S sqrt(T_j (C_j + 4)), T_j ~ T / (d + 1), d the label delay,
    S the largest spread of costs on a batch. Against champion, the upper level's part alone."""

    def __init__(self, cfg: MeasurementConfig):
        super().__init__(cfg)
        self.candidates = LateExperts(len(CANDIDATES), cfg.n_batches, cfg.label_delay)
        self.ways = LateExperts(2, cfg.n_batches, cfg.label_delay)  # champion's pick, or the candidates' weights
        self.rule, self.picks, self.mixture = Champion(cfg), {}, []  # champion's pick on each batch
        self.turns = cfg.label_delay + 1

    def weights(self, t: int) -> np.ndarray:
        self.picks[t] = self.rule.weights(t)
        by_rule, by_weights = self.ways.weights(t)
        return by_rule * self.picks[t] + by_weights * self.candidates.weights(t)

    def learn(self, t: int, costs: np.ndarray) -> None:
        below = float(self.candidates.weights(t) @ costs)  # its weights are still batch t's until it learns
        self.mixture.append(below)
        self.ways.learn(t, np.array([float(self.picks[t] @ costs), below]))
        self.candidates.learn(t, costs)
        self.rule.learn(t, costs)

    def guarantee(self, n_batches: int) -> dict:
        """Per batch: the lower level's expected cost, and the bounds on select's regret to the best
        candidate or one-switch sequence, from this stream's gaps and for any costs as spread."""
        return dict(fixed_share_cost=float(np.mean(self.mixture)),
                    regret_bound=(self.ways.regret_bound(0) + self.candidates.regret_bound(1)) / n_batches,
                    worst_case_bound=(self.ways.worst_case_bound() + self.candidates.worst_case_bound()) / n_batches)


def best_sequence_cost(costs: np.ndarray, switches: int) -> float:
    """The mean cost per batch of the best sequence of candidates with at most this many switches, in
    hindsight (costs: batches x candidates)."""
    best = np.full((switches + 1, costs.shape[1]), np.inf)
    best[0] = costs[0]  # best[m, k]: the cheapest sequence so far with m switches, now on candidate k
    for row in costs[1:]:
        switched = np.concatenate([[np.inf], best[:-1].min(axis=1)])
        best = np.minimum(best, switched[:, None]) + row
    return float(best.min() / len(costs))


SELECTORS = {"select": Select, "champion": Champion}  # read their candidates' runs, run nothing themselves
HEAL_METHODS.update({"none": StreamMethod, "calibrated": Calibrated, "heal": HealMethod, "heal-rules": HealRules,
                     "restandardize": Restandardize, "tent": Tent, "em-prior": EMPrior, "rethreshold": Rethreshold,
                     "retrain": Retrain, **SELECTORS})  # in the bench's order


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
    bayes_accuracy: float
    bayes_auc: float
    bayes_cost: float
    # each detector on this seed's stream of the scenario (the same for every method): batches from a
    # sudden drift's onset to its first alarm (NaN if none), and its alarms per 1,000 batches of a
    # long stream where nothing drifts
    fidi_delay: float = math.nan
    adwin_delay: float = math.nan
    ks_delay: float = math.nan
    fidi_false_alarms: float = math.nan
    adwin_false_alarms: float = math.nan
    ks_false_alarms: float = math.nan
    # a selector's regret, per 1,000 rows (NaN for the other methods): in hindsight, the mean cost of the
    # best single candidate and of the best sequence of candidates with one switch; and what select's
    # guarantee allows its expected cost to exceed them by, on this stream's gaps and in the worst case
    best_single_cost: float = math.nan
    best_switching_cost: float = math.nan
    fixed_share_cost: float = math.nan  # select's lower level alone (expected)
    regret_bound: float = math.nan
    worst_case_bound: float = math.nan


BENCH_FIGURES = ("accuracy", "f1", "roc_auc", "cost", "kappa", "gap_closed", "adaptations_per_1000")
MIN_GAP = 0.05  # below 5% of no-adaptation's cost, the gap to the ceiling is too small to divide by


def detection_figures(delays: dict, alarms: dict) -> dict:
    """detection_delays' and false_alarms' figures, as BenchRow names them."""
    return {**{f"{name}_delay": delay for name, delay in delays.items()},
            **{f"{name}_false_alarms": rate for name, rate in alarms.items()}}


def stream_runs(batches: list, methods: Iterable[str], trained: Trained, cfg: MeasurementConfig) -> dict:
    """Method -> what it served on the batches, for `methods` and `none` (which every row is measured
    against). Each method runs once; the selectors are read off their candidates' runs, and a candidate
    runs once more only where they run it with other settings than the bench does."""
    runs: dict = {}

    def run(name: str, supervision: Optional[str] = None) -> Served:
        key = (name, supervision or cfg.supervision)
        if key not in runs:
            runs[key] = serve_stream(make_method(name, trained, dataclasses.replace(cfg, supervision=key[1])),
                                     batches)
        return runs[key]
    served = {name: run(name) for name in dict.fromkeys([*methods, "none"]) if name not in SELECTORS}
    for name in [name for name in methods if name in SELECTORS]:
        candidates = {candidate: run(candidate, supervision) for candidate, supervision in CANDIDATES.items()}
        served[name] = SELECTORS[name](cfg).serve(candidates, [y for _, y in batches])
    return served


def bench_rows(scenario: str, methods: Iterable[str], trained: Trained, cfg: MeasurementConfig, ceiling: Ceiling,
               detection: dict = None) -> list[BenchRow]:
    """Each method's row on the scenario's stream, every prediction scored before the method adapted on
    it. detection: the detectors' delays and false alarms on this stream (detection_delays, false_alarms)."""
    batches = list(scenario_batches(scenario, cfg, trained))
    served, y = stream_runs(batches, methods, trained, cfg), np.concatenate([y for _, y in batches])

    def cost(run: Served) -> float:
        flagged = np.concatenate([p > threshold for p, threshold in zip(run.proba, run.thresholds)])
        return cost_per_1000(classify(y, flagged), cfg)
    none_cost, normal_share = cost(served["none"]), 1 - float(y.mean())
    gap, rows = none_cost - ceiling.cost, []
    for method in methods:
        p = np.concatenate(served[method].proba)
        at_half, method_cost = metrics_at(y, p), cost(served[method])
        rows.append(BenchRow(
            scenario, method, cfg.seed, at_half.accuracy, at_half.f1, roc_auc(y, p), method_cost, none_cost,
            (at_half.accuracy - normal_share) / (1 - normal_share) if normal_share < 1 else math.nan,
            (none_cost - method_cost) / gap if gap > MIN_GAP * none_cost else math.nan,
            1000 * served[method].adaptations / cfg.n_batches, ceiling.accuracy, ceiling.roc_auc, ceiling.cost,
            **(detection or {}), **regret_figures(served[method])))
    return rows


def regret_figures(run: Served) -> dict:
    """A selector's comparators in hindsight and select's bounds, as BenchRow names them (none otherwise)."""
    if run.candidate_costs is None:
        return {}
    return dict(best_single_cost=float(run.candidate_costs.mean(axis=0).min()),
                best_switching_cost=best_sequence_cost(run.candidate_costs, 1), **run.guarantee)


@dataclass(frozen=True)
class BenchCell:
    """One seed's stream of one scenario, served by every method: the unit a shard runs and a merge collects."""
    index: int
    seed: int
    scenario: str

    @property
    def name(self) -> str:
        return f"cell-{self.index:04d}-{self.scenario}-seed{self.seed}"


def bench_config(cfg: MeasurementConfig) -> MeasurementConfig:
    """The bench's own settings: it runs the heal with labels and with the rule (heal-rules), and waits
    for each heal, so that it is reproducible."""
    return dataclasses.replace(cfg, supervision="labels", async_apply=False)


def bench_cells(first_seed: int, n_seeds: int) -> list[BenchCell]:
    """Every seed x scenario, numbered."""
    combos = [(first_seed + k, s) for k in range(n_seeds) for s in SCENARIOS]
    return [BenchCell(i, *combo) for i, combo in enumerate(combos)]


def shard_cells(cells: list[BenchCell], k: int, n: int) -> list[BenchCell]:
    """Shard k of n: a contiguous block of the seed-major order, so that a shard trains as few seeds'
    models as it can (with as many shards as seeds, one seed each)."""
    return cells[k * len(cells) // n:(k + 1) * len(cells) // n]


def bench_seed(cfg: MeasurementConfig, seed: int) -> tuple[Trained, dict]:
    """What every cell of a seed starts from: its trained models, and its detectors' false alarms."""
    seed_cfg = dataclasses.replace(bench_config(cfg), seed=seed)
    trained = train_models(seed_cfg)
    return trained, false_alarms(seed_cfg, trained)


def bench_cell(cfg: MeasurementConfig, seed_work: tuple[Trained, dict], cell: BenchCell) -> list[BenchRow]:
    """Every method's row on the cell's stream (seed_work: bench_seed's for the cell's seed)."""
    trained, alarms = seed_work
    seed_cfg = dataclasses.replace(bench_config(cfg), seed=cell.seed)
    detection = detection_figures(detection_delays(cell.scenario, seed_cfg, trained), alarms)
    return bench_rows(cell.scenario, HEAL_METHODS, trained, seed_cfg, scenario_ceiling(cell.scenario, cfg), detection)


def run_bench_cells(cfg: MeasurementConfig, cells: list[BenchCell],
                    done: Callable[[BenchCell, list], None] = None) -> list[BenchRow]:
    """Run cells in turn, each seed's models trained once; done(cell, rows), when given, is told of each
    cell as soon as it is finished."""
    rows, seed_work = [], {}
    for cell in cells:
        if cell.seed not in seed_work:
            seed_work = {cell.seed: bench_seed(cfg, cell.seed)}  # cells come seed by seed
        cell_rows = bench_cell(cfg, seed_work[cell.seed], cell)
        rows += cell_rows
        if done:
            done(cell, cell_rows)
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


# -- Images: does the adapter heal a ResNet-18?
#
# The same SelfHealer around a second model: a ResNet-18 (CIFAR form) that classifies printed digits
# the script renders itself, under the corruptions of CIFAR-10-C, beside what image practitioners do
# when test images are corrupted: normalise with the test batch's own batch-norm statistics (Schneider
# et al. 2020) and TENT (Wang et al. 2021). Every method answers each batch before it adapts on it.

IMAGE_SIZE = 32
GLYPH_SIZE = 64  # glyphs are rendered once at this size and resampled per sample
GLYPH_HEIGHT = 0.6  # digit height as a fraction of the glyph canvas, leaves room for thickening and rotation

# Fonts shipped with matplotlib whose ten digits render as ordinary lining figures (checked by eye).
# Left out: cmmi10 (old-style figures of uneven height), cmsy10/cmex10 and the STIX size/NonUni fonts (symbols).
FONTS = (
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
    "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic",
    "DejaVuSansMono", "DejaVuSansMono-Bold",
    "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic",
    "cmr10", "cmss10", "cmtt10", "cmb10", "cmti10",
)

def _font_path(font):
    import matplotlib  # imported where it is used: a run that draws no digit does not pay for it
    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", font + ".ttf")


@functools.lru_cache(maxsize=None)
def _glyph(font, digit):
    """One digit rasterised by Agg, centred and scaled to a fixed height so that fonts are comparable: a
    (GLYPH_SIZE, GLYPH_SIZE) coverage mask, drawn once per process."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath
    from matplotlib.transforms import Affine2D
    path = TextPath((0, 0), str(digit), size=1, prop=FontProperties(fname=_font_path(font)))
    box = path.get_extents()
    scale = GLYPH_HEIGHT * GLYPH_SIZE / box.height
    transform = (Affine2D().translate(-(box.x0 + box.x1) / 2, -(box.y0 + box.y1) / 2)
                 .scale(scale).translate(GLYPH_SIZE / 2, GLYPH_SIZE / 2))
    renderer = RendererAgg(GLYPH_SIZE, GLYPH_SIZE, 72)
    gc = renderer.new_gc()
    gc.set_linewidth(0)
    renderer.draw_path(gc, path, transform, (0.0, 0.0, 0.0))
    return np.asarray(renderer.buffer_rgba())[..., 3].astype(np.float32) / 255


def available_fonts():
    """The fonts of FONTS present in this matplotlib installation."""
    return tuple(font for font in FONTS if os.path.exists(_font_path(font)))


def _stroke_variants(fonts):
    """Glyph masks at four stroke weights (fonts, 10, 4, 32, 32): max-pooling the 64x64 glyph grows its strokes
    by a pixel a side, min-pooling shrinks them; average-pooled to 32x32, weights differ by half a pixel."""
    masks = torch.from_numpy(np.stack([[_glyph(font, d) for d in range(10)] for font in fonts]))
    flat = masks.reshape(-1, 1, GLYPH_SIZE, GLYPH_SIZE)
    thinner = -F.max_pool2d(-flat, 3, stride=1, padding=1)
    thicker = F.max_pool2d(flat, 3, stride=1, padding=1)
    thickest = F.max_pool2d(thicker, 3, stride=1, padding=1)
    variants = torch.stack([thinner, flat, thicker, thickest], dim=1).reshape(-1, 1, GLYPH_SIZE, GLYPH_SIZE)
    variants = F.avg_pool2d(variants, GLYPH_SIZE // IMAGE_SIZE)  # antialiased templates at output resolution
    return variants.reshape(len(fonts), 10, 4, IMAGE_SIZE, IMAGE_SIZE)


def _uniform(gen, n, low, high):
    return low + (high - low) * torch.rand(n, generator=gen)


def _affine_grid(theta, size):
    """Same as F.affine_grid(theta, (n, 1, size, size), align_corners=False), but several times faster on CPU."""
    coords = (torch.arange(size, dtype=theta.dtype) * 2 + 1) / size - 1
    x, y = coords[None, None, :], coords[None, :, None]
    t = theta[:, :, :, None, None]
    return torch.stack([t[:, 0, 0] * x + t[:, 0, 1] * y + t[:, 0, 2], t[:, 1, 0] * x + t[:, 1, 1] * y + t[:, 1, 2]], -1)


def _digit_masks(variants, labels, gen):
    """Coverage masks (n, 1, 32, 32): each glyph at a random font, stroke, size, aspect, rotation, position."""
    n = len(labels)
    font = torch.randint(len(variants), (n,), generator=gen)
    weight = _uniform(gen, n, 0.0, 3.0)  # continuous index into the four stroke variants
    height = _uniform(gen, n, 0.65, 0.85)  # digit height as a fraction of the output image
    aspect = _uniform(gen, n, 0.85, 1.15)
    angle = _uniform(gen, n, -15.0, 15.0) * math.pi / 180
    centre = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1 - height)[:, None] * 0.4

    low = weight.floor().clamp(max=2).long()
    frac = (weight - low)[:, None, None]
    glyphs = variants[font, labels, low] * (1 - frac) + variants[font, labels, low + 1] * frac

    # affine_grid maps output coordinates to input ones: p_in = R(angle) S^-1 (p_out - centre).
    sx = height * aspect / GLYPH_HEIGHT
    sy = height / GLYPH_HEIGHT
    cos, sin = torch.cos(angle), torch.sin(angle)
    linear = torch.stack([torch.stack([cos / sx, -sin / sy], 1), torch.stack([sin / sx, cos / sy], 1)], 1)
    shift = -(linear @ centre[:, :, None])
    theta = torch.cat([linear, shift], dim=2)
    grid = _affine_grid(theta, IMAGE_SIZE)
    return F.grid_sample(glyphs[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _textures(n, gen):
    """Background blend maps (n, 1, 32, 32) in [0, 1]: smooth value noise mixed with stripes at random angles."""
    coarse = F.interpolate(torch.rand(n, 1, 3, 3, generator=gen), size=IMAGE_SIZE, mode="bicubic",
                           align_corners=False)
    fine = F.interpolate(torch.rand(n, 1, 8, 8, generator=gen), size=IMAGE_SIZE, mode="bilinear",
                         align_corners=False)
    coords = (torch.arange(IMAGE_SIZE) + 0.5) / IMAGE_SIZE
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    direction = _uniform(gen, n, 0.0, math.pi)[:, None, None]
    frequency = _uniform(gen, n, 1.5, 5.0)[:, None, None]
    phase = _uniform(gen, n, 0.0, 2 * math.pi)[:, None, None]
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * frequency * (xx * torch.cos(direction) + yy * torch.sin(direction))
                                    + phase)
    mix = torch.rand(n, 3, generator=gen)
    mix = (mix / mix.sum(1, keepdim=True))[:, :, None, None, None]
    texture = mix[:, 0] * coarse + mix[:, 1] * fine + mix[:, 2] * stripes[:, None]
    return texture.clamp(0, 1)


def _colours(n, gen, min_contrast=0.3, tries=16):
    """Foreground and two background colours (each (n, 3)), the background's luminances min_contrast away from
    the foreground's: the first of `tries` candidate triples that qualifies (vectorised), else the best."""
    candidates = torch.rand(n, tries, 3, 3, generator=gen)
    lum = candidates @ torch.tensor([0.299, 0.587, 0.114])
    separation = torch.minimum((lum[..., 0] - lum[..., 1]).abs(), (lum[..., 0] - lum[..., 2]).abs())
    ok = separation >= min_contrast
    pick = torch.where(ok.any(1), ok.float().argmax(1), separation.argmax(1))
    chosen = candidates[torch.arange(n), pick]
    return chosen[:, 0], chosen[:, 1], chosen[:, 2]


def make_digit_images(n: int, seed: int, batch_size: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """A balanced, shuffled set of printed digits on textured backgrounds: X float32 (n, 3, 32, 32) in [0, 1],
    y int64 (n,), deterministic in seed, from a generator of its own (the global streams are left alone)."""
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=gen)]
    variants = _stroke_variants(available_fonts())
    X = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for start in range(0, n, batch_size):
        mask = _digit_masks(variants, labels[start:start + batch_size], gen)
        texture = _textures(len(mask), gen)
        fg, bg1, bg2 = (c[:, :, None, None] for c in _colours(len(mask), gen))
        background = bg1 * (1 - 0.5 * texture) + bg2 * 0.5 * texture
        X[start:start + batch_size] = (background * (1 - mask) + fg * mask).clamp(0, 1).numpy()
    return X, labels.numpy().astype(np.int64)


# Corruptions. Parameter lists are those of CIFAR-10-C, from hendrycks/robustness,
# ImageNet-C/create_c/make_cifar_c.py (commit ca360085d57889288c4143fddd8a707bbcae01bd); the implementations
# here are our own in numpy/torch. Unlike the original, results stay float (no rounding to uint8 except in jpeg).

def gaussian_noise(X, severity, rs):
    c = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]  # make_cifar_c.py gaussian_noise
    return X + rs.normal(scale=c, size=X.shape)


def shot_noise(X, severity, rs):
    c = [500, 250, 100, 75, 50][severity - 1]  # make_cifar_c.py shot_noise
    return rs.poisson(X * c) / c


def impulse_noise(X, severity, rs):
    """Salt and pepper on each value independently, half of each (skimage random_noise mode='s&p')."""
    c = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]  # make_cifar_c.py impulse_noise
    hit = rs.random_sample(X.shape) < c
    salt = rs.random_sample(X.shape) < 0.5
    return np.where(hit, salt.astype(X.dtype), X)


def _gaussian_weights(size, sigma):
    x = np.arange(size) - (size - 1) / 2
    w = np.exp(-x ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def _disk_kernel(radius, alias_blur):
    """Normalised disk of the given radius, smoothed by a small Gaussian to soften its aliased edge."""
    half, ksize = (8, 3) if radius <= 8 else (int(radius), 5)
    coords = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(coords, coords)
    disk = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    g = _gaussian_weights(ksize, alias_blur)
    disk = np.apply_along_axis(np.convolve, 0, disk, g, mode="same")
    disk = np.apply_along_axis(np.convolve, 1, disk, g, mode="same")
    rows, cols = np.nonzero(disk.sum(1))[0], np.nonzero(disk.sum(0))[0]  # crop the all-zero border
    return disk[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _filter_per_channel(X, kernel):
    """Correlate every channel with the same 2-D kernel, reflecting at the border (like cv2.filter2D)."""
    x = torch.from_numpy(X)
    k = torch.from_numpy(kernel.astype(np.float32))
    kh, kw = k.shape
    x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    weight = k.expand(x.shape[1], 1, kh, kw)
    return F.conv2d(x, weight, groups=x.shape[1]).numpy()


def defocus_blur(X, severity, rs):
    # make_cifar_c.py defocus_blur
    radius, alias_blur = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    return _filter_per_channel(X, _disk_kernel(radius, alias_blur))


def _shift_clamped(X, dy, dx):
    """Per-sample integer translation out[n, :, i, j] = X[n, :, i + dy[n], j + dx[n]], clamping at the edges."""
    n, c, h, w = X.shape
    rows = np.clip(np.arange(h)[None, :, None] + dy[:, None, None], 0, h - 1)
    cols = np.clip(np.arange(w)[None, None, :] + dx[:, None, None], 0, w - 1)
    index = torch.from_numpy((rows * w + cols).reshape(n, 1, h * w)).expand(n, c, h * w)
    return torch.gather(torch.from_numpy(X).reshape(n, c, h * w), 2, index).reshape(n, c, h, w).numpy()


def motion_blur(X, severity, rs):
    """ImageMagick's MotionBlurImage (the original calls it through Wand), at a random angle per image: a
    one-sided Gaussian trail of 2*ceil(radius)+1 taps, tap i reading the pixel i steps along the angle."""
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][severity - 1]  # make_cifar_c.py motion_blur
    angle = np.deg2rad(rs.uniform(-45, 45, size=len(X)))
    taps = np.arange(2 * math.ceil(radius) + 1)
    weights = np.exp(-taps ** 2 / (2 * sigma ** 2))
    weights /= weights.sum()
    out = np.zeros_like(X)
    for i, weight in zip(taps, weights):
        dx = np.ceil(i * np.cos(angle) - 0.5).astype(int)
        dy = np.ceil(i * np.sin(angle) - 0.5).astype(int)
        out += weight * _shift_clamped(X, dy, dx)
    return out


def _zoom_theta(size, factor):
    """affine_grid parameters (align_corners=True) of the original's centre zoom: crop the central
    ceil(size / factor) pixels, resize them to round(crop * factor) (scipy, order 1), trim back to size."""
    crop = math.ceil(size / factor)
    top = (size - crop) // 2
    zoomed = round(crop * factor)
    trim = (zoomed - size) // 2
    step = (crop - 1) / (zoomed - 1)
    start = top + trim * step
    offset = step - 1 + 2 * start / (size - 1)  # pixel positions mapped to the [-1, 1] grid coordinates
    return torch.tensor([[step, 0.0, offset], [0.0, step, offset]], dtype=torch.float32)


def zoom_blur(X, severity, rs):
    """Average of the image and its centre zooms by each factor in the list (bilinear, as scipy zoom order=1)."""
    factors = [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
               np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)][severity - 1]  # make_cifar_c.py zoom_blur
    n, _, h, w = X.shape
    if h != w:
        raise ValueError(f"zoom_blur needs square images, got {h}x{w}")
    x = torch.from_numpy(X)
    out = x.clone()
    for factor in factors:
        grid = F.affine_grid(_zoom_theta(h, factor)[None], (1, 1, h, w), align_corners=True).expand(n, h, w, 2)
        out += F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return (out / (len(factors) + 1)).numpy()


def contrast(X, severity, rs):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]  # make_cifar_c.py contrast
    means = X.mean(axis=(2, 3), keepdims=True)  # per image and channel, as in the original
    return (X - means) * c + means


def brightness(X, severity, rs):
    c = [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]  # make_cifar_c.py brightness
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
    hsv = rgb_to_hsv(np.clip(X, 0, 1).transpose(0, 2, 3, 1))
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return hsv_to_rgb(hsv).transpose(0, 3, 1, 2)


def _plasma_fractal(rs, n, size, decay):
    """n tileable diamond-square height maps (n, size, size) in [0, 1], size a power of two, with the original's
    noise amplitude: wibble * U(-wibble, wibble), wibble 100 divided by decay at each level."""
    maps = np.zeros((n, size, size))
    step, wibble = size, 100.0

    def mean_plus_noise(total):
        return total / 4 + wibble * rs.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = maps[:, ::step, ::step]
        square = corners + np.roll(corners, -1, axis=1)
        square = square + np.roll(square, -1, axis=2)
        maps[:, half::step, half::step] = mean_plus_noise(square)  # square step: centres of squares
        centres = maps[:, half::step, half::step]
        corners = maps[:, ::step, ::step]
        across = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        maps[:, ::step, half::step] = mean_plus_noise(across)  # diamond step: midpoints of horizontal edges
        down = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        maps[:, half::step, ::step] = mean_plus_noise(down)  # diamond step: midpoints of vertical edges
        step = half
        wibble /= decay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


def fog(X, severity, rs):
    c, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][severity - 1]  # make_cifar_c.py fog
    n, _, h, w = X.shape
    size = 2 ** math.ceil(math.log2(max(h, w, 2)))
    plasma = _plasma_fractal(rs, n, size, decay)[:, None, :h, :w]
    max_val = X.max(axis=(1, 2, 3), keepdims=True)
    return (X + c * plasma) * max_val / (max_val + c)


def _box_resize_matrix(n_in, n_out):
    """Pillow's 1-D BOX resampling as an (n_out, n_in) matrix, read off an identity image: pixelate is then
    the original's two resizes without a loop over the images."""
    from PIL import Image  # matplotlib's own dependency
    eye = Image.fromarray(np.eye(n_in, dtype=np.float32))
    return np.asarray(eye.resize((n_out, n_in), Image.Resampling.BOX), dtype=np.float64).T


def pixelate(X, severity, rs):
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]  # make_cifar_c.py pixelate
    _, _, h, w = X.shape
    rows = _box_resize_matrix(int(h * c), h) @ _box_resize_matrix(h, int(h * c))
    cols = _box_resize_matrix(int(w * c), w) @ _box_resize_matrix(w, int(w * c))
    return rows.astype(np.float32) @ X @ cols.T.astype(np.float32)


def jpeg(X, severity, rs):
    from PIL import Image
    quality = [80, 65, 58, 50, 40][severity - 1]  # make_cifar_c.py jpeg_compression
    out = np.empty_like(X)
    for i, image in enumerate(np.round(np.clip(X, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        out[i] = np.asarray(Image.open(buffer).convert("RGB")).transpose(2, 0, 1) / 255
    return out


CORRUPTIONS = {"gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
               "defocus_blur": defocus_blur, "motion_blur": motion_blur, "zoom_blur": zoom_blur, "contrast": contrast,
               "brightness": brightness, "fog": fog, "pixelate": pixelate, "jpeg": jpeg}


def corrupt(X: np.ndarray, name: str, severity: int, rng: np.random.RandomState) -> np.ndarray:
    """One CIFAR-10-C corruption at severity 1..5 of a batch (n, 3, H, W) in [0, 1]; the caller's array is kept."""
    if name not in CORRUPTIONS or severity not in range(1, 6):
        raise ValueError(f"corrupt: one of {', '.join(CORRUPTIONS)} at severity 1..5, got {name!r} {severity!r}")
    X = np.ascontiguousarray(np.clip(X, 0, 1), dtype=np.float32)
    return np.clip(CORRUPTIONS[name](X, severity, rng), 0, 1).astype(np.float32)


IMAGE_SEEDS = 3  # seeds of an --images run when --seeds is not given
IMAGES_USE = ("seed", *HEALER_OPTIONS, "label_delay", "tent_lr", "adapt_window", "retrain_steps", "retrain_lr",
              "ks_window", "ks_level")  # the other parts' knobs that --images uses
IMAGE_CLASSES = 10
IMAGE_SETS = ("train", "test", "stream", "reference")  # each seed's sets of digits, drawn apart


def digits(n: int, seed: int, which: str) -> tuple[np.ndarray, np.ndarray]:
    return make_digit_images(n, len(IMAGE_SETS) * seed + IMAGE_SETS.index(which))


def is_corruption_list(text: str) -> bool:
    """--corruptions' rule: all, or names of CORRUPTIONS separated by commas."""
    return text == "all" or bool(text) and all(name in CORRUPTIONS for name in text.split(","))


def chosen_corruptions(text: str) -> tuple:
    return CORRUPTIONS if text == "all" else tuple(dict.fromkeys(text.split(",")))


@dataclass(frozen=True)
class ImagesConfig(MeasurementConfig):
    """Images: a ResNet-18 on rendered digits under the corruptions of CIFAR-10-C (--images)."""
    images: bool = knob(False, "train a ResNet-18 on rendered digits and stream each corruption through every "
                        "image method over --seeds (3 unless given)", role="run")
    corruptions: str = knob("all", "the corruptions to stream, separated by commas, or all",
                            (is_corruption_list, "all or names of corruptions separated by commas"))
    severity: int = knob(5, "severity of the corruptions, as in CIFAR-10-C", "[1, 5]")
    image_drift: str = knob("sudden", "how the corruption sets in after the clean batches: sudden, or gradual (its "
                            "severity rising in steps to --severity)", choices=("sudden", "gradual"))
    resnet_width: int = knob(8, "channels of the ResNet-18's first stage (64: the standard network)", "[1, 512]")
    image_train: int = knob(4000, "rendered training images", "[10, 10000000]")
    image_test: int = knob(1000, "rendered clean test images", "[10, 10000000]")
    image_epochs: int = knob(2, "training epochs of the ResNet-18", "[1, 100000]")
    image_lr: float = knob(2e-3, "Adam learning rate of the ResNet-18's training (cosine decay to 0)", "(0, 1]")
    image_train_batch: int = knob(32, "images per training batch", "[2, 100000]")
    image_batch_size: int = knob(64, "images per stream batch", "[2, 100000]")
    image_clean_batches: int = knob(2, "clean stream batches before the corruption sets in", "[0, 100000]")
    image_batches: int = knob(8, "corrupted stream batches", "[1, 100000]")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, and the input (or its strided 1x1 projection) added back."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ResNet18(nn.Sequential):
    """ResNet-18 (He et al. 2016) in its CIFAR form: a 3x3 stem without max-pool, four stages of two
    BasicBlocks with width, 2, 4 and 8 times width channels, global average pooling, a linear head.
    Width 64 is the standard network. A Sequential, so that the layers up to an adapter are a prefix
    that runs once for all the methods that leave it alone."""

    def __init__(self, classes: int = IMAGE_CLASSES, width: int = 64):
        stages, c_in = {}, width
        for k, stride in enumerate((1, 2, 2, 2)):
            c_out = width * 2 ** k
            stages[f"layer{k + 1}"] = nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1))
            c_in = c_out
        stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        super().__init__(OrderedDict(stem=stem, **stages, pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                                     fc=nn.Linear(c_in, classes)))


def image_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_resnet(X: np.ndarray, y: np.ndarray, cfg: ImagesConfig) -> ResNet18:
    """Adam on cross-entropy with a cosine learning rate, from torch's global stream (seeded by the caller)."""
    device = image_device()
    model = ResNet18(IMAGE_CLASSES, cfg.resnet_width).to(device)
    optimizer = Adam(model.parameters(), lr=cfg.image_lr)
    X, y = torch.from_numpy(X).to(device), torch.from_numpy(y).to(device)
    steps, step = cfg.image_epochs * math.ceil(len(X) / cfg.image_train_batch), 0
    model.train()
    for _ in range(cfg.image_epochs):
        order = torch.randperm(len(X)).to(device)
        for start in range(0, len(X), cfg.image_train_batch):
            idx = order[start:start + cfg.image_train_batch]
            if len(idx) < 2:  # batch norm needs two images
                continue
            optimizer.lr = cfg.image_lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            optimizer.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            optimizer.step()
            step += 1
    return model.eval().cpu()


def image_accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray, chunk: int = 500) -> float:
    proba = np.concatenate([predict_proba(model, X[k:k + chunk]) for k in range(0, len(X), chunk)])
    return float(np.mean(proba.argmax(1) == y))


@dataclass(frozen=True)
class TrainedImages:
    """One seed's ResNet-18 (its weights, to send to other processes) and its clean test accuracy."""
    seed: int
    state: dict
    clean_accuracy: float


def train_image_model(cfg: ImagesConfig, seed: int) -> TrainedImages:
    torch.manual_seed(seed)
    X, y = digits(cfg.image_train, seed, "train")
    model = train_resnet(X, y, cfg)
    X_test, y_test = digits(cfg.image_test, seed, "test")
    return TrainedImages(seed, to_arrays(model.state_dict()), image_accuracy(model, X_test, y_test))


@functools.lru_cache(maxsize=1)
def stream_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The digits of a seed's stream, the same under every corruption: drawn once per process."""
    return digits(n, seed, "stream")


def image_stream(cfg: ImagesConfig, seed: int, corruption: str) -> list[tuple]:
    """(images, labels, severity) per batch: image_clean_batches clean ones (severity 0), then
    image_batches under the corruption, at --severity or rising to it. The images are the same for
    every corruption of a seed, so corruptions compare on the same digits."""
    n = cfg.image_batch_size
    X, y = stream_digits(n * (cfg.image_clean_batches + cfg.image_batches), seed)
    batches = []
    for t in range(cfg.image_clean_batches + cfg.image_batches):
        k = t - cfg.image_clean_batches + 1  # corrupted batch number, 1..image_batches
        severity = 0 if k < 1 else cfg.severity if cfg.image_drift == "sudden" else \
            math.ceil(cfg.severity * k / cfg.image_batches)
        images = X[t * n:(t + 1) * n]
        if severity:
            rng = np.random.RandomState([seed, list(CORRUPTIONS).index(corruption), t])
            images = corrupt(images, corruption, severity, rng)
        batches.append((images, y[t * n:(t + 1) * n], severity))
    return batches


def batch_norm_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]


def with_batch_statistics(model: nn.Module) -> nn.Module:
    """A copy whose batch-norm layers normalise each batch with its own mean and variance instead of the
    training set's (Schneider et al. 2020; Nado et al. 2020), and keep no running estimate."""
    model = copy.deepcopy(model)
    for bn in batch_norm_layers(model):
        bn.train()
        bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
    return model


def entropy_of_logits(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax, in nats."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()


class ImageMethod:
    """'none', and the protocol of all: predict(X, H) answers a batch from its images X or their features H
    (the pooled output of the convolutional layers, what the linear head reads: computed once for all the
    methods that leave those layers alone); adapt(X, H, y) then sees it, with its labels only if uses_labels."""
    uses_labels = False

    def __init__(self, model: ResNet18, tail: nn.Module, cfg: ImagesConfig, reference: np.ndarray):
        self.tail, self.adaptations = tail, 0

    def predict(self, X: np.ndarray, H: np.ndarray) -> np.ndarray:
        return predict_proba(self.tail, H)

    def adapt(self, X: np.ndarray, H: np.ndarray, y: Optional[np.ndarray]) -> None:
        pass


class BatchStatistics(ImageMethod):
    """bn-adapt: each batch normalised with its own batch-norm statistics (no labels)."""

    def __init__(self, model, tail, cfg, reference):
        super().__init__(model, tail, cfg, reference)
        self.model = with_batch_statistics(model)

    def predict(self, X, H):
        self.adaptations += 1
        return predict_proba(self.model, X)


class TentImages(ImageMethod):
    """tent (Wang et al. 2021): batch statistics, and one Adam step per batch on the mean entropy of the
    answers over the batch-norm layers' scales and shifts, at --tent-lr per 128 images (the paper's
    CIFAR setting) scaled to the batch. The answers are those computed before the step (no labels)."""

    def __init__(self, model, tail, cfg, reference):
        super().__init__(model, tail, cfg, reference)
        self.model = with_batch_statistics(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        affine = [p for bn in batch_norm_layers(self.model) for p in (bn.weight, bn.bias)]
        for p in affine:
            p.requires_grad_(True)
        self.optimizer = Adam(affine, lr=cfg.tent_lr * cfg.image_batch_size / 128)

    def predict(self, X, H):
        logits = self.model(torch.from_numpy(X))
        self.optimizer.zero_grad()
        entropy_of_logits(logits).backward()
        self.optimizer.step()
        self.adaptations += 1
        return logits.detach().softmax(1).numpy()


class HealImages(ImageMethod):
    """heal: the article's adapter between the pooled features and the linear head (where the article's sits
    in its MLP), healed by a SelfHealer with each batch's labels right after its answers, when the KS
    detector on the trained model's confidence alarms; with the registry and rollback."""
    uses_labels = True
    label_delay = 0

    def __init__(self, model, tail, cfg, reference, **options):
        super().__init__(model, tail, cfg, reference)
        detector = KSDetector(tail, reference, cfg.ks_window, cfg.ks_level)
        self.healer = SelfHealer(tail, "pool", detector=detector, max_pending=cfg.label_delay + 1, **options,
                                 **{name: getattr(cfg, name) for name in HEALER_OPTIONS})
        self.labels = LateArrivals(self.label_delay)

    def predict(self, X, H):
        return self.healer.predict(H)

    def adapt(self, X, H, y):
        arrived = self.labels.push((self.healer.served, y)) if self.uses_labels else None
        if arrived is not None:
            self.healer.observe(*arrived)
        self.adaptations += sum(e["type"] == "heal" for e in self.healer.records[-1].events)


class HealLate(HealImages):
    """heal-late: the same, with each batch's labels --label-delay batches late."""

    def __init__(self, model, tail, cfg, reference):
        self.label_delay = cfg.label_delay
        super().__init__(model, tail, cfg, reference)


class HealPseudo(HealImages):
    """heal-pseudo: the adapter healed with no label at all, on the frozen model's own answers as the
    rule's labels (pseudo-labels) and the entropy term."""
    uses_labels = False

    def __init__(self, model, tail, cfg, reference):
        frozen = copy.deepcopy(tail)
        super().__init__(model, tail, cfg, reference, supervision="rules",
                         rule=lambda H: predict_proba(frozen, H).argmax(1))


class RetrainHead(ImageMethod):
    """retrain-head: the linear head refitted from its trained weights on the pooled features of the last
    --adapt-window labelled batches (--retrain-steps Adam steps at --retrain-lr), labels --label-delay late."""
    uses_labels = True

    def __init__(self, model, tail, cfg, reference):
        super().__init__(model, tail, cfg, reference)
        self.cfg, self.trained_fc = cfg, tail.fc
        self.labelled, self.recent = LateArrivals(cfg.label_delay), deque(maxlen=cfg.adapt_window)

    def adapt(self, X, H, y):
        arrived = self.labelled.push((H, y))
        if arrived is None:
            return
        self.recent.append(arrived)
        pooled = torch.from_numpy(np.concatenate([b[0] for b in self.recent]))
        targets = torch.from_numpy(np.concatenate([b[1] for b in self.recent]))
        fc = copy.deepcopy(self.trained_fc).requires_grad_(True)
        optimizer = Adam(fc.parameters(), lr=self.cfg.retrain_lr)
        for _ in range(self.cfg.retrain_steps):
            optimizer.zero_grad()
            F.cross_entropy(fc(pooled), targets).backward()
            optimizer.step()
        self.tail.fc = fc.requires_grad_(False)
        self.adaptations += 1


IMAGE_METHODS = {"none": ImageMethod, "bn-adapt": BatchStatistics, "tent": TentImages, "heal": HealImages,
                 "heal-late": HealLate, "heal-pseudo": HealPseudo, "retrain-head": RetrainHead}
IMAGE_SELECT = "select"  # serves, on each batch, the candidate that has been right most often on labelled batches
IMAGE_ROWS = (*IMAGE_METHODS, IMAGE_SELECT)


class FollowTheLeader:
    """select: every other method answers each batch; serve the answers of the one with the most correct
    answers on the batches whose labels have arrived (--label-delay late), none until labels arrive."""

    def __init__(self, names: Iterable[str], delay: int):
        self.correct = dict.fromkeys(names, 0)
        self.leader, self.labels, self.switches = "none", LateArrivals(delay), 0

    def serve(self, answers: dict) -> np.ndarray:
        return answers[self.leader]

    def learn(self, answers: dict, y: np.ndarray) -> None:
        arrived = self.labels.push((answers, y))
        if arrived is None:
            return
        for name, proba in arrived[0].items():
            self.correct[name] += int(np.sum(proba.argmax(1) == arrived[1]))
        leader = max(self.correct, key=lambda name: (self.correct[name], name == self.leader))
        self.switches += leader != self.leader
        self.leader = leader


@dataclass(frozen=True)
class ImageRow:
    """One method on one seed's stream of one corruption: its prequential accuracy on the corrupted batches
    beside the trained model's, clean and corrupted."""
    corruption: str
    severity: int
    drift: str
    method: str
    seed: int
    clean_accuracy: float      # the trained model on clean test images
    corrupted_accuracy: float  # the trained model on the corrupted batches (none's accuracy)
    accuracy: float            # this method on the corrupted batches, each answered before adapting on it
    points_recovered: float    # 100 * (accuracy - corrupted_accuracy)
    adaptations: int           # heals, steps or refits; for select, how often what it serves changed


def image_cell(cfg: ImagesConfig, trained: TrainedImages, corruption: str) -> list[ImageRow]:
    """Stream one corruption through every image method for one seed, on the same batches."""
    model = ResNet18(IMAGE_CLASSES, cfg.resnet_width)
    model.load_state_dict(from_arrays(trained.state))
    model.eval()
    backbone = nn.Sequential(*list(model.children())[:6])  # stem .. pool: left alone but by bn-adapt and tent
    tail = nn.Sequential(OrderedDict(pool=nn.Identity(), fc=copy.deepcopy(model.fc))).eval()
    with torch.inference_mode():
        reference = backbone(torch.from_numpy(digits(4 * cfg.image_batch_size, trained.seed, "reference")[0]))
    methods = {name: kind(model, copy.deepcopy(tail), cfg, reference.numpy()) for name, kind in IMAGE_METHODS.items()}
    select = FollowTheLeader(methods, cfg.label_delay)
    correct, counted = dict.fromkeys([*methods, IMAGE_SELECT], 0), 0
    for X, y, severity in image_stream(cfg, trained.seed, corruption):
        with torch.inference_mode():
            H = backbone(torch.from_numpy(X)).numpy()
        answers = {}
        for name, method in methods.items():
            answers[name] = method.predict(X, H)
            method.adapt(X, H, y if method.uses_labels else None)
        answers[IMAGE_SELECT] = select.serve(answers)
        select.learn({k: v for k, v in answers.items() if k != IMAGE_SELECT}, y)
        if severity:
            counted += len(y)
            for name, proba in answers.items():
                correct[name] += int(np.sum(proba.argmax(1) == y))
    adaptations = {**{name: m.adaptations for name, m in methods.items()}, IMAGE_SELECT: select.switches}
    corrupted = correct["none"] / counted
    return [ImageRow(corruption, cfg.severity, cfg.image_drift, name, trained.seed, trained.clean_accuracy,
                     corrupted, correct[name] / counted, 100 * (correct[name] / counted - corrupted),
                     adaptations[name]) for name in correct]


# Part IV. Outputs
#
# What a person reads, made from the records the stream yields: the pipeline's stage lines and
# the per-batch table, the report under it, the rows and entries of the monitoring exports
# (metrics.csv, events.json, threshold_config.json), the bench's table and the figures. Text
# and figures only: Part V writes them. Uses Parts I to III.

def _num(value, spec: str) -> str:
    """A number formatted by spec, or '-' when missing or not finite; never "-0.00" for a value that
    rounds to zero."""
    if value is None or not math.isfinite(value):
        return "-"
    text = format(value, spec)
    return format(0.0, spec) if text.lstrip("+-").strip("0.,%") == "" else text


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 'es' if noun.endswith('s') else 's'}"


def _accuracy(m: Optional[Metrics]) -> Optional[float]:
    return None if m is None else m.accuracy


def v14_summary(ds: Dataset, cfg: MeasurementConfig) -> str:
    """V14's mean and the share of rows the rule would call fraud: how far the set has drifted."""
    v = ds.X[:, V14]
    return f"{v.mean():.3f}, {100 * np.mean(v < cfg.rule_threshold):.1f}%"


def pipeline_lines(run: Run) -> list[str]:
    """One line per stage before the stream, in the order Part I runs them."""
    cfg, data, fidi = run.cfg, run.data, run.fidi
    clean = metrics_at(data.test.y, predict_proba(run.trained.model, data.test.X))
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
    ("state", "<15", lambda r: r.state + ("" if r.restored_version is None else f" v{r.restored_version}")),
    ("action", "<13", lambda r: r.action),
    ("z", ">6", lambda r: _num(r.z, ".3f")),
    ("confl", ">5", lambda r: str(r.conflicts)),
    ("pos_w", ">5", lambda r: _num(r.pos_weight, ".2f")),
    ("served", ">6", lambda r: _num(_accuracy(r.served), ".3f")),
    ("healed", ">6", lambda r: _num(_accuracy(r.healed), ".3f")),
    ("shadow", ">6", lambda r: _num(_accuracy(r.shadow), ".3f")),
    ("lift", ">6", lambda r: _num(r.lift, "+.3f")),
    ("preq", ">6", lambda r: _num(prequential_lift(r), "+.3f")),
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


def article_comparison(run: Run) -> list[tuple[str, str, str]]:
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
         "none" if best is None else
         f"v{best.version} (batch {best.batch}, acc {best.accuracy:.3f}, F1 {best.f1:.3f})"),
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


def is_default_experiment(cfg: MeasurementConfig) -> bool:
    """True when every flag that shapes the article's numbers is at its default."""
    default = type(cfg)()
    return all(getattr(cfg, f.name) == getattr(default, f.name)
               for f in dataclasses.fields(cfg) if f.metadata["role"] == "experiment")


def text_table(header: list[str], rows: list[list], align: str) -> list[str]:
    """Columns as wide as their widest cell, aligned by `align` ('<' or '>' per column); a row of one
    cell is a section title, printed as it is."""
    widths = [max(len(str(row[k])) for row in [header, *rows] if len(row) > 1) for k in range(len(header))]

    def line(cells):
        if len(cells) == 1:
            return str(cells[0])
        return "  ".join(f"{c:<{w}}" if a == "<" else f"{c:>{w}}"
                         for c, w, a in zip(map(str, cells), widths, align)).rstrip()
    return [line(header), line(["-" * w for w in widths])] + [line(row) for row in rows]


def break_even_line(healed: Metrics, unhealed: Metrics, cfg: MeasurementConfig) -> str:
    """At which false-alarm cost healing starts to pay, from the two models' counts."""
    extra_misses, fewer_alarms = healed.fn - unhealed.fn, unhealed.fp - healed.fp
    if fewer_alarms == 0:
        return "Healing changed no false alarm: its cost depends on missed frauds alone."
    price = cfg.fn_cost * extra_misses / fewer_alarms
    side = "more" if fewer_alarms > 0 else "less"
    return (f"On the drifted set, healing costs less than no healing only when a false alarm costs {side} than "
            f"${price:,.0f} (it misses {extra_misses:+d} frauds and raises {-fewer_alarms:+d} false alarms, "
            f"at ${cfg.fn_cost:,.0f} per missed fraud).")


ROW_TITLES = {
    "no_healing": "Under drift, no healing",
    "shadow": "Shadow, frozen",
    "healed": "Self-healed",
    "never_healed": "Same network, never healed",
    "always_normal": "Always answers normal",
    "bayes": "Bayes-optimal (known densities)",
}


def report(run: Run, e: Evaluation, full_table: bool = False) -> list[str]:
    """What the run printed after its batches: the article's table beside this run's (or, for a run
    whose flags differ from the article's, a note, unless full_table), then the honest measurements."""
    cfg, log = run.cfg, run.log
    rows = [[label, a, o, "match" if a == o else "DIFFERS"] for label, a, o in article_comparison(run)]
    matched = sum(row[3] == "match" for row in rows)
    if is_default_experiment(cfg) or full_table:
        lines = ["", "Reproduction of the article's table (seed 42, default flags)"]
        if not is_default_experiment(cfg):
            lines.append("Note: flags differ from the article's defaults, so its figures are not expected here.")
        lines += text_table(["figure", "article", "this run", ""], rows, "<>><")
        lines.append(f"{matched} of {len(rows)} figures match the article.")
    else:
        differ = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(cfg) if f.metadata["role"] ==
                  "experiment" and getattr(cfg, f.name) != getattr(type(cfg)(), f.name)]
        lines = ["", f"The article's table: {matched} of its {len(rows)} figures match this run, which changes "
                     f"{', '.join(differ)}, so they need not (--article-table prints them all)."]

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
        + (f"(the article's in-sample lift: {_num(100 * log.lift.mean, '+.1f')} pp)." if log.lift.n else
           "(no heal was published at the batch it learned from, so there is no in-sample lift)."),
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
        f"Registry: {_count(run.registry.saved, 'snapshot')} saved, {len(run.registry.snapshots)} retained "
        f"(clean, best {cfg.keep_best}, last {cfg.keep_last}). Events: " +
        ", ".join(f"{v} {k}" for k, v in log.counts.items()) + ".",
    ]
    healer = run.healer.healer
    if isinstance(healer, ApplyWhenDone) and healer.job is not None:  # the stream ended, not the heal
        lines.append(f"The heal started at batch {healer.job.batch} was not applied: the stream ended first "
                     f"(--async-apply does not wait for heals).")
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


def csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        text = f"{value:.6f}"
        return "0.000000" if text == "-0.000000" else text  # a tiny negative is not a sign worth printing
    return str(value)


def _metric(model: str, name: str) -> Callable[[BatchRecord], Optional[float]]:
    return lambda r: None if getattr(r, model) is None else getattr(getattr(r, model), name)


def _attribute(name: str) -> Callable[[BatchRecord], object]:
    return lambda r: getattr(r, name)


# metrics.csv: each column and what a record writes under it.
CSV_TABLE = (
    [(name, _attribute(name)) for name in ("batch", "state", "action", "z", "conflicts", "fraud_frac", "pos_weight")]
    + [(f"{model}_{m}", _metric(model, m)) for model in ("healed", "served", "shadow", "baseline")
       for m in ("accuracy", "precision", "recall", "f1")]
    + [("lift", _attribute("lift")), ("prequential_lift", prequential_lift),
       ("prequential_f1_lift", prequential_f1_lift)]
    + [(name, _attribute(name)) for name in ("monitor_accuracy", "monitor_f1", "version_pre", "version_post",
                                             "restored_version")]
)
CSV_COLUMNS = [column for column, _ in CSV_TABLE]


def csv_row(r: BatchRecord) -> list[str]:
    return [csv_cell(value(r)) for _, value in CSV_TABLE]


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


def threshold_dict(cfg: MeasurementConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata["threshold"]}


def recorded_command(cfg: MeasurementConfig) -> str:
    default, words = type(cfg)(), ["python", str(Path(__file__).resolve())]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "out":
            words.append(f"{flag}={Path(value).resolve()}")
        elif value != getattr(default, f.name):
            words.append(flag if f.type == "bool" else f"{flag}={value}")  # = : a value may start with "-"
    return shlex.join(words)


# -- The bench's table

BENCH_COLUMNS = (  # title, figure, format
    ("acc", "accuracy", ".3f"), ("F1", "f1", ".3f"), ("ROC-AUC", "roc_auc", ".3f"), ("cost/1000", "cost", ",.0f"),
    ("kappa", "kappa", "+.2f"), ("gap closed", "gap_closed", "+.2f"), ("adapt/1000", "adaptations_per_1000", ".0f"),
)


def _mean_pm(s: Spread, spec: str) -> str:
    """'mean +-half', half the width of the 95% interval; '-' where the figure does not exist."""
    if not math.isfinite(s.mean):
        return "-"
    half = (s.high - s.low) / 2
    return f"{_num(s.mean, spec)} +-{_num(half, spec.lstrip('+'))}" if half > 0 else _num(s.mean, spec)


def _mean_interval(s: Spread, spec: str) -> str:
    """'mean [low, high]', the 95% interval itself (a ratio's bootstrap interval is lopsided)."""
    if not math.isfinite(s.mean):
        return "-"
    return f"{_num(s.mean, spec)} [{_num(s.low, spec)}, {_num(s.high, spec)}]" if s.high > s.low else _num(s.mean, spec)


def detector_report(rows: list[BenchRow]) -> list[str]:
    """Per scenario, each detector's batches from onset to its first alarm, then its false alarms on a
    stream where nothing drifts: means over the seeds (from the `none` rows, one per seed)."""
    def mean_over_seeds(values):
        seen = [v for v in values if math.isfinite(v)]
        text = _num(float(np.mean(seen)), ".1f") if seen else "never"
        return text + (f" ({len(seen)} of {len(values)} seeds)" if seen and len(seen) < len(values) else "")
    table = []
    for scenario in [s for s in DRIFTING_SCENARIOS if any(r.scenario == s for r in rows)]:
        seeds = [r for r in rows if r.scenario == scenario and r.method == "none"]
        table.append([scenario] + [mean_over_seeds([getattr(r, f"{d}_delay") for r in seeds]) for d in DETECTORS])
    per_seed = {r.seed: r for r in rows if r.method == "none"}.values()
    table.append(["false alarms per 1,000 batches"] + [
        _num(float(np.mean([getattr(r, f"{d}_false_alarms") for r in per_seed])), ".1f") for d in DETECTORS])
    return ["", "Detectors: batches from the drift's onset to the first alarm (0: at the first drifted batch), "
                "mean over the seeds; then alarms per 1,000 batches of a 1,000-batch stream where nothing drifts.",
            *text_table(["scenario"] + [title for title, _ in DETECTORS.values()], table, "<" + ">" * len(DETECTORS))]


def bench_report(rows: list[BenchRow], cfg: MeasurementConfig) -> list[str]:
    """One table: per scenario, every method's means over the seeds with their 95% intervals, then the ceiling."""
    spreads, seeds = bench_spread(rows), sorted({r.seed for r in rows})
    table = []
    for scenario in [s for s in SCENARIOS if (s, "none") in spreads]:
        first = next(r for r in rows if r.scenario == scenario)
        table.append([f"{scenario}: {SCENARIO_STORIES[scenario]}"])
        for method in [m for m in HEAL_METHODS if (scenario, m) in spreads]:
            s = spreads[(scenario, method)]
            table.append(["  " + method] + [_mean_interval(s[name], spec) if name == "gap_closed" else
                                            _mean_pm(s[name], spec) for _, name, spec in BENCH_COLUMNS])
        table.append(["  Bayes ceiling", f"{first.bayes_accuracy:.3f}", "-", f"{first.bayes_auc:.3f}",
                      f"{first.bayes_cost:,.0f}", "-", "+1.00", "-"])
        if scenario in SHIFTING_SCENARIOS:  # the law moves from batch to batch
            rows_only = scenario_row_only_ceiling(scenario, cfg)
            table.append(["  row-only ceiling", f"{rows_only.accuracy:.3f}", "-", f"{rows_only.roc_auc:.3f}",
                          f"{rows_only.cost:,.0f}", "-", "-", "-"])
    header = ["scenario / method"] + [title for title, _, _ in BENCH_COLUMNS]
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}..{seeds[-1]}"
    return ["", f"Scenario bench: {len(rows)} rows, {seed_text}, {cfg.n_batches} batches of "
                f"{cfg.batch_size} rows; prequential (each batch predicted before any adaptation on it);",
            "mean +- half the 95% bootstrap interval over the seeds (gap closed: the interval itself, which is "
            "lopsided). Accuracy, F1 and kappa (against always answering normal) at 0.5;",
            f"cost per 1,000 rows at ${cfg.fn_cost:,.0f} per missed fraud and ${cfg.fp_cost:,.0f} per false alarm, "
            f"flagging P(fraud) > {cost_threshold(cfg):.3f} = fp/(fp+fn) (rethreshold: its learned threshold);",
            f"gap closed = (cost of none - cost) / (cost of none - Bayes cost), costs averaged over the seeds; "
            f"'-' where none is within {100 * MIN_GAP:.0f}% of the Bayes cost.",
            *text_table(header, table, "<" + ">" * len(BENCH_COLUMNS)), *detector_report(rows),
            *regret_report(rows)]


def regret_report(rows: list[BenchRow]) -> list[str]:
    """Per scenario, select's regret to the best single candidate and to the best one-switch sequence, in
    hindsight, beside what its guarantee allows; then its lower level's and champion's: means over the seeds."""
    def mean(scenario, method, figure):
        group = [figure(r) for r in rows if r.scenario == scenario and r.method == method]
        return _num(float(np.mean(group)), "+,.0f") if group else "-"
    table = [[scenario] + [mean(scenario, "select", figure) for figure in (
        lambda r: r.cost - r.best_single_cost, lambda r: r.cost - r.best_switching_cost, lambda r: r.regret_bound,
        lambda r: r.worst_case_bound, lambda r: r.fixed_share_cost - r.best_single_cost)]
        + [mean(scenario, "champion", lambda r: r.cost - r.best_single_cost)]
        for scenario in SCENARIOS if any(r.scenario == scenario and r.method == "select" for r in rows)]
    return ["", "select's regret, per 1,000 rows, means over the seeds: its cost minus the best single candidate's "
                "and minus the best sequence of candidates",
            "with one switch, both in hindsight on each stream; what its guarantee allows its expected cost to "
            "exceed either by, from the stream's",
            "own mixability gaps and for any costs as spread as the stream's; and the regret to the best single "
            "candidate of fixed share alone",
            "(select's lower level, expected cost) and of champion.",
            *text_table(["scenario", "select - best", "- best 1-switch", "bound: this stream", "bound: any stream",
                         "fixed share - best", "champion - best"], table, "<>>>>>>")]


GOAL_EXCESS, GOAL_STATIONARY = 0.10, 0.01  # of none's gap to the ceiling; of calibrated's cost


def strength_sweep_report(runs: dict, cfg: MeasurementConfig) -> list[str]:
    """runs: drift strength -> its bench's rows. Per scenario and strength: the best single method (the
    lowest mean cost over the seeds, selectors aside), then select's and champion's excess over it, as a
    share of none's gap to the Bayes ceiling (stationary: over calibrated, as a share of its cost)."""
    table = []
    for scenario in SCENARIOS:
        for strength, rows in runs.items():
            cost = {m: float(np.mean([r.cost for r in rows if r.scenario == scenario and r.method == m]))
                    for m in HEAL_METHODS}
            bayes = next(r.bayes_cost for r in rows if r.scenario == scenario)
            best = min((m for m in HEAL_METHODS if m not in SELECTORS), key=cost.get)
            gap = cost["none"] - bayes
            if scenario == "stationary":
                excess = {m: (cost[m] - cost["calibrated"]) / cost["calibrated"] for m in SELECTORS}
                goal = "met" if excess["select"] <= GOAL_STATIONARY else "missed"
            elif gap > MIN_GAP * cost["none"]:
                excess = {m: (cost[m] - cost[best]) / gap for m in SELECTORS}
                goal = "met" if excess["select"] <= GOAL_EXCESS and (
                    scenario not in SHIFTING_SCENARIOS or cost["select"] < cost[best]) else "missed"
            else:
                excess, goal = {m: math.nan for m in SELECTORS}, "-"
            table.append([scenario, _num(strength, "g"), _num(gap / bayes, "+.1%"), best, _num(cost[best], ",.0f"),
                          _num(cost["select"], ",.0f"), _num(excess["select"], "+.0%"),
                          _num(excess["champion"], "+.0%"), goal])
    seeds = sorted({r.seed for rows in runs.values() for r in rows})
    return ["", f"Drift-strength sweep: seeds {seeds[0]}..{seeds[-1]}, {cfg.n_batches} batches of {cfg.batch_size} "
                f"rows; costs per 1,000 rows, means over the seeds.",
            f"excess: (cost - the best single method's) / (none's cost - the Bayes cost); on stationary, (cost - "
            f"calibrated's) / calibrated's.",
            f"goal: excess at most {GOAL_EXCESS:.0%} (on {' and '.join(SHIFTING_SCENARIOS)} also below the best "
            f"single method), {GOAL_STATIONARY:.0%} on stationary; '-' where none is within "
            f"{100 * MIN_GAP:.0f}% of the Bayes cost.",
            *text_table(["scenario", "strength", "none - Bayes", "best single", "its cost", "select",
                         "select excess", "champion excess", "goal"], table, "<>><>>>><")]


def bench_fingerprint(cfg: MeasurementConfig) -> dict:
    """The settings a bench cell's numbers depend on: a merge accepts only cells made with these."""
    varied_by_the_bench = {"scenario", "heal_method", "supervision", "async_apply"}
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.metadata["role"] != "run" and f.name not in varied_by_the_bench}


def possible(row: BenchRow, n_batches: int) -> bool:
    """Shares within [0, 1] (or missing), costs, rates and bounds not negative, kappa at most 1, detection delays
    within the stream (or missing), false alarms at most 1,000 per 1,000 batches."""
    shares = (row.accuracy, row.f1, row.roc_auc, row.bayes_accuracy, row.bayes_auc)
    amounts = (row.cost, row.none_cost, row.bayes_cost, row.adaptations_per_1000)
    delays = (row.fidi_delay, row.adwin_delay, row.ks_delay)
    alarms = (row.fidi_false_alarms, row.adwin_false_alarms, row.ks_false_alarms)
    regret = (row.best_single_cost, row.best_switching_cost, row.fixed_share_cost, row.regret_bound,
              row.worst_case_bound)
    return (all(math.isnan(v) or 0 <= v <= 1 for v in shares) and all(v >= 0 for v in amounts)
            and all(math.isnan(v) or v >= 0 for v in regret) and (math.isnan(row.kappa) or row.kappa <= 1)
            and all(math.isnan(v) or 0 <= v < n_batches for v in delays)
            and all(math.isnan(v) or 0 <= v <= 1000 for v in alarms))


# -- Plots

COLORS = {"healed": "#1f77b4", "served": "#2ca02c", "shadow": "#7f7f7f", "rollback": "#d62728",
          "heal": "#9467bd", "threshold": "#ff7f0e"}


def _series(records, attr, metric=None):
    """One value per record: record.attr (or attr(record)), and its .metric when given; NaN where missing."""
    values = []
    for r in records:
        v = attr(r) if callable(attr) else getattr(r, attr)
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
    """What the plots draw, gathered once from a run (plain data: Part V draws half the plots in
    another process)."""
    cfg: MeasurementConfig
    evaluation: Evaluation
    all_records: list  # every batch, quarantined ones too
    events: list
    snapshots_saved: int
    best: Optional[tuple]  # the rollback target's version, batch and F1 (not its weights)
    records: list = None  # batches that were served (quarantined ones are left out)

    def __post_init__(self):
        self.records = [r for r in self.all_records if r.served is not None]
        self.batches = np.array([r.batch for r in self.records])
        self.z = _series(self.records, "z")
        self.z[:MIN_FIDI_ENTRIES - 1] = np.nan  # FIDI has no z before its window holds 3 means: no point, not 0
        self.rollbacks = [r for r in self.records if r.restored_version is not None]

    @classmethod
    def of(cls, run: Run, evaluation: Evaluation) -> "PlotData":
        best = run.registry.best_post_heal()
        return cls(run.cfg, evaluation, run.log.records, run.log.events, run.registry.saved,
                   None if best is None else (best.version, best.batch, best.f1))


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
    ax.bar(d.batches + width / 2, _series(d.records, prequential_lift), width, color=COLORS["served"],
           label="prequential lift (model that served the batch)")
    ax.axhline(0, color="black", lw=0.8)
    ax.set(title="Accuracy lift over the frozen shadow", xlabel="stream batch", ylabel="accuracy minus shadow's")
    ax.grid(alpha=0.3, axis="y")
    _legend_below(ax, ncol=1)
    return fig


def plot_fidi(plt, d: PlotData):
    threshold = d.cfg.fidi_threshold
    fig, ax = plt.subplots(figsize=(10, 5.5), layout="constrained")
    ax.plot(d.batches, d.z, "o-", color=COLORS["healed"], label="FIDI z-score of V14")
    ax.axhline(threshold, color=COLORS["threshold"], ls="--", label=f"threshold {threshold:g}")
    if len(d.batches) >= MIN_FIDI_ENTRIES:
        ax.axvspan(d.batches[0] - 0.5, d.batches[MIN_FIDI_ENTRIES - 1] - 0.5, color=COLORS["shadow"], alpha=0.15,
                   label=f"no z yet (needs {MIN_FIDI_ENTRIES} batch means)")
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
    states = list(state_colors)
    for r in d.all_records:  # quarantined batches too
        ax.barh(states.index(r.state), 0.9, left=r.batch - 0.45, color=state_colors[r.state])
    ax.set_yticks(range(len(states)), states)
    ax.set(title="Engine state per batch", xlabel="stream batch", xlim=(0.4, max(d.batches, default=1) + 0.6),
           ylim=(-0.6, len(states) - 0.4))
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
    heals = [e for e in d.events if e["type"] == "heal"]
    ax.plot([e["version_pre"] for e in heals], [e["f1_before"] for e in heals], "o", color=COLORS["shadow"],
            label="pre-heal snapshot")
    ax.plot([e["version_post"] for e in heals], [e["f1_after"] for e in heals], "o", color=COLORS["healed"],
            label="post-heal snapshot")
    restored = {(e["restored_version"], e["restored_f1"]) for e in d.events if e["type"] == "rollback"}
    if restored:
        ax.plot(*zip(*sorted(restored)), "*", ms=20, color=COLORS["rollback"],
                label="restored by a rollback: " + ", ".join(f"v{v}" for v, _ in sorted(restored)))
    ax.axvline(1, color=COLORS["shadow"], ls=":", label="v1: the clean adapter (saved before any batch, no F1)")
    if d.best is not None:
        version, batch, f1 = d.best
        ax.plot([version], [f1], "*", ms=13, color=COLORS["threshold"],
                label=f"rollback target now v{version} (batch {batch}, F1 {f1:.3f})")
    ax.set(title=f"Registry: {_count(d.snapshots_saved, 'snapshot')} by version (F1 on their batch)",
           xlabel="version (v1 = clean)", ylabel="F1", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    _legend_below(ax, ncol=2)
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
        drawn = ax.bar(np.arange(4) + (k - (len(bars) - 1) / 2) * width, [getattr(m, n) for n in names], width,
                       label=label)
        ax.bar_label(drawn, fmt="%.2f", fontsize=7, padding=2)  # a bar of 0 is a label on the axis
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
    axes[1, 0].axhline(d.cfg.fidi_threshold, color=COLORS["threshold"], ls="--")
    axes[1, 0].set(title="FIDI z-score (dashed: threshold)", xlabel="stream batch", ylabel="z",
                   ylim=(0, 1.1 * np.nanmax(np.append(d.z, d.cfg.fidi_threshold))))
    axes[1, 1].bar(d.batches, _series(d.records, prequential_lift), color=COLORS["served"])
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
    """matplotlib, imported only when a plot is drawn (it costs about 0.3 s). Its backend is Agg
    whatever MPLBACKEND says (the plots are files), and its notes about a home folder it cannot
    write to are not shown (it works in a temporary one)."""
    import logging
    os.environ["MPLBACKEND"] = "agg"
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 12, "axes.titlesize": 14, "axes.labelsize": 12, "figure.dpi": 110})
    return plt


def plot_seed_sweep(plt, summaries: list[dict]):
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
    return fig


def plot_bench(plt, rows: list[BenchRow]):
    """Heatmap of the mean share of the cost gap each method closes, scenario by method, with its 95%
    interval. Colours run from -1 to +1; below -1 (worse than no adaptation by more than the whole
    gap) a cell is dark purple and its number says how much worse."""
    spreads = bench_spread(rows)
    cells = [[spreads[(s, m)]["gap_closed"] for m in HEAL_METHODS] for s in SCENARIOS]
    gap = np.array([[c.mean for c in row] for row in cells])
    cmap = plt.get_cmap("RdYlGn").with_extremes(under="#3f007d", bad="#eeeeee")
    fig, ax = plt.subplots(figsize=(13, 6.5), layout="constrained")
    image = ax.imshow(np.ma.masked_invalid(gap), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
    for (k, j), value in np.ndenumerate(gap):
        if np.isnan(value):
            ax.text(j, k, "no gap", ha="center", va="center", fontsize=10, color="#555555")
            continue
        r, g, b, _ = cmap((value + 1) / 2) if value >= -1 else cmap.get_under()
        ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"  # readable on the cell's colour
        interval = cells[k][j]
        ax.text(j, k - 0.12, f"{value:+.2f}", ha="center", va="center", fontsize=11, color=ink, weight="bold")
        if math.isfinite(interval.low) and math.isfinite(interval.high):
            ax.text(j, k + 0.22, f"[{interval.low:+.2f}, {interval.high:+.2f}]", ha="center", va="center",
                    fontsize=7.5, color=ink)
    ax.set_xticks(range(len(HEAL_METHODS)), list(HEAL_METHODS), rotation=30, ha="right")
    ax.set_yticks(range(len(SCENARIOS)), SCENARIOS)
    ax.set_title("Share of the cost gap to the Bayes ceiling closed, mean over seeds [95% interval]\n"
                 "(1 = Bayes, 0 = no adaptation; dark purple: below -1, worse than no adaptation by more than the gap)")
    fig.colorbar(image, ax=ax, label="gap closed", extend="min")
    return fig


# The example of TENT's public repository (Wang et al., ICLR 2021), which it calls an explanation, not a
# reproduction: CIFAR-10-C at severity 5, mean error over its 15 corruptions, a WRN-28-10; another dataset
# and network, for scale.
TENT_EXAMPLE_ERROR = {"none": 43.5, "bn-adapt": 20.4, "tent": 18.6}
REPORTED_POINTS = 27.8  # recovered by the system as reported, on its ResNet-18 after a simulated drift


def image_means(rows: list[ImageRow]) -> dict:
    """(corruption, method) -> Spread over the seeds of the accuracy, with (MEAN, method) the seeds' means
    over the corruptions."""
    per: dict = {}
    for r in rows:
        per.setdefault((r.corruption, r.method), {})[r.seed] = r.accuracy
    corruptions = list(dict.fromkeys(r.corruption for r in rows))
    for method in dict.fromkeys(r.method for r in rows):
        per[(MEAN_ROW, method)] = {seed: float(np.mean([per[(c, method)][seed] for c in corruptions]))
                                   for seed in per[(corruptions[0], method)]}
    return {key: spread_of(list(by_seed.values())) for key, by_seed in per.items()}


MEAN_ROW = "mean"


def images_report(rows: list[ImageRow], cfg) -> list[str]:
    """Accuracy per corruption and method (means over the seeds), the mean over corruptions with its
    interval and the points recovered, beside TENT's example figures and the reported 27.8 points."""
    spreads, methods = image_means(rows), list(dict.fromkeys(r.method for r in rows))
    corruptions, seeds = list(dict.fromkeys(r.corruption for r in rows)), sorted({r.seed for r in rows})
    clean = spread_of([next(r.clean_accuracy for r in rows if r.seed == s) for s in seeds])
    table = [[c, *[f"{spreads[(c, m)].mean:.3f}" for m in methods]] for c in [*corruptions, MEAN_ROW]]
    none = spreads[(MEAN_ROW, "none")]
    summary = [[m, _mean_pm(spreads[(MEAN_ROW, m)], ".3f"), f"{100 * (1 - spreads[(MEAN_ROW, m)].mean):.1f}",
                f"{100 * (spreads[(MEAN_ROW, m)].mean - none.mean):+.1f}"] for m in methods]
    drift = f"severity {cfg.severity}" if cfg.image_drift == "sudden" else f"severity rising 1..{cfg.severity}"
    error = {m: 100 * (1 - spreads[(MEAN_ROW, m)].mean) for m in methods}
    tent = TENT_EXAMPLE_ERROR
    return ["", f"Images: a width-{cfg.resnet_width} ResNet-18 on rendered digits, seeds {seeds[0]}..{seeds[-1]}; "
                f"clean test accuracy {_mean_pm(clean, '.3f')}.",
            f"Each corruption at {drift} after {cfg.image_clean_batches} clean batch(es): {cfg.image_batches} "
            f"batches of {cfg.image_batch_size} images, each answered before any adaptation on it (prequential);",
            f"accuracy on the corrupted batches, mean over the seeds (none: the trained model as it is).",
            *text_table(["corruption", *methods], table, "<" + ">" * len(methods)),
            "", f"Mean over the {len(corruptions)} corruptions: accuracy (mean +- half the 95% bootstrap interval "
                f"over the seeds), error and points recovered against none.",
            *text_table(["method", "accuracy", "error %", "points"], summary, "<>>>"),
            "", f"TENT's repository example on CIFAR-10-C (severity 5, 15 corruptions, WRN-28-10; another dataset and "
                f"network): "
                f"error {tent['none']}% unadapted, {tent['bn-adapt']}% with batch statistics "
                f"({tent['none'] - tent['bn-adapt']:.1f} points recovered), {tent['tent']}% with TENT "
                f"({tent['none'] - tent['tent']:.1f});",
            f"here: {error['none']:.1f}%, {error['bn-adapt']:.1f}% ({error['none'] - error['bn-adapt']:.1f}), "
            f"{error['tent']:.1f}% ({error['none'] - error['tent']:.1f}). The reported system recovers "
            f"{REPORTED_POINTS} points; the adapter heal here {error['none'] - error['heal']:+.1f} with each batch's "
            f"labels, {error['none'] - error['heal-late']:+.1f} with them {cfg.label_delay} batches late."]


def plot_images(plt, rows: list[ImageRow]):
    """Heatmap of the points each method recovers against none, corruption by method, mean over the seeds."""
    spreads, methods = image_means(rows), [m for m in dict.fromkeys(r.method for r in rows) if m != "none"]
    corruptions = [*dict.fromkeys(r.corruption for r in rows), MEAN_ROW]
    points = np.array([[100 * (spreads[(c, m)].mean - spreads[(c, "none")].mean) for m in methods]
                       for c in corruptions])
    limit = max(1.0, float(np.abs(points).max()))
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(corruptions) + 2.2), layout="constrained")
    image = ax.imshow(points, cmap="RdYlGn", vmin=-limit, vmax=limit, aspect="auto")
    for (k, j), value in np.ndenumerate(points):
        ax.text(j, k, f"{value:+.1f}", ha="center", va="center", fontsize=9, color="white" if
                abs(value) > 0.6 * limit else "black", weight="bold" if corruptions[k] == MEAN_ROW else "normal")
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_yticks(range(len(corruptions)), corruptions)
    ax.set_title("Points of accuracy recovered against the unadapted ResNet-18, mean over seeds")
    fig.colorbar(image, ax=ax, label="points recovered")
    return fig


# Part V. Files, signals and processes
#
# Everything that touches the file system, the terminal, signals or other processes, called by
# the command line: files written whole or not at all, the locks and temporaries they leave, small
# JSON files read back, the console and progress, stopping cleanly on a signal, the exports, bench
# cells and figures written, and work spread over processes without changing one number. Uses
# Parts I to IV.

# -- Files

def umask() -> int:
    """This process's umask, read without changing it (Linux); 022 where it cannot be read."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    return 0o022

@contextlib.contextmanager
def atomic_file(path: Path, binary: bool = False):
    """A file written under a temporary name beside its target (.NAME.PID.RANDOM.tmp) and renamed into
    place when the block ends without an error: readers never see half a file, and a failed run leaves
    the previous one as it was. The writer holds a lock on the temporary file while it lives, which is
    how a later run tells a dead writer's leftovers from a live one's (a PID can be reused)."""
    import fcntl
    path = Path(path)
    text = {} if binary else dict(encoding="utf-8", newline="")
    f = tempfile.NamedTemporaryFile("wb" if binary else "w", dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                                    suffix=".new", delete=False, **text)
    temporary = f.name
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        temporary = f.name[:-len(".new")] + ".tmp"  # locked before it has the name a cleaner looks for
        os.rename(f.name, temporary)
        os.chmod(temporary, 0o666 & ~umask())  # as an ordinary file would be, not tempfile's owner-only 0600
        yield f
        f.close()
        if HELD_BACK is not None:  # inside outputs_together: put in place with the others, at its end
            HELD_BACK.append((temporary, path))
        else:
            os.replace(temporary, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # a full disk fails the last flush too; the file goes all the same
            f.close()
        Path(temporary).unlink(missing_ok=True)
        if isinstance(e, OSError):  # name the file that could not be written, not its temporary
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise

HELD_BACK: Optional[list] = None  # (temporary, path) of files written inside outputs_together, not yet in place


@contextlib.contextmanager
def outputs_together():
    """The files this process writes in the block go in place at its end, all of them (stop signals held
    meanwhile) or none: a run stopped midway leaves the previous run's outputs, not a mix of two runs."""
    global HELD_BACK
    HELD_BACK = held = []
    try:
        yield
        with stop_signals_held():
            while held:
                os.replace(*held.pop(0))
    finally:
        HELD_BACK = None
        for temporary, _ in held:
            Path(temporary).unlink(missing_ok=True)

def write_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)

TEMPORARY_NAME = re.compile(r"\..+\.(\d+)\.[a-z0-9_]{8}\.tmp")  # atomic_file's: .NAME.PID.RANDOM.tmp

LOCK_NAME = ".self_healing.lock"  # in --out: every run that writes there holds it, shards of one bench together

def take_lock(path: Path, shared: bool = False, wait: bool = False, create: bool = True) -> int:
    """A lock on path (created if need be), held until its descriptor is closed; the kernel drops it
    when the process dies, however it dies. The file is opened for writing where it may be (where flock
    is emulated by fcntl locks, on NFS, an exclusive lock needs that), else for reading: a lock file
    that another user's run left must not shut out a user who may write the outputs. BlockingIOError
    when it is held elsewhere."""
    import fcntl
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    return fd

def held_elsewhere(path: Path) -> bool:
    try:
        os.close(take_lock(path))
    except BlockingIOError:
        return True
    return False

def abandoned(temporary: Path) -> bool:
    """Whether no process holds the lock its writer keeps on a temporary file: its writer is gone."""
    try:
        os.close(take_lock(temporary, create=False))
    except OSError:  # held (BlockingIOError), gone already, or not ours to open
        return False
    return True

def remove_stale_temporaries(directory: Path) -> int:
    """Remove what a killed run (kill -9 leaves no chance to clean up) left in directory: temporary
    files of atomic_file whose writer is gone. Returns how many."""
    removed = 0
    for path in directory.iterdir() if directory.is_dir() else ():
        if TEMPORARY_NAME.fullmatch(path.name) and abandoned(path):
            path.unlink(missing_ok=True)
            removed += 1
    return removed

class ConfigError(ValueError):
    """A user mistake (flags, a threshold file, bench cell files): reported in one line, exit status 2."""

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

    def bounded_int(digits):  # Python refuses ints of more than 4,300 digits with a ValueError of its own
        if len(digits) > 30:
            raise ConfigError(f"{what} {path} holds an integer of {len(digits):,} digits")
        return int(digits)

    def finite_float(text):  # 1e999 parses as infinity
        value = float(text)
        if not math.isfinite(value):
            no_constants(_short(text))
        return value

    def unique_keys(pairs):
        keys = [key for key, _ in pairs]
        if len(set(keys)) < len(keys):
            raise ConfigError(f"{what} {path} holds the key {next(k for k in keys if keys.count(k) > 1)!r} twice")
        return dict(pairs)
    try:
        return json.loads(raw.decode("utf-8-sig"), parse_constant=no_constants, parse_int=bounded_int,
                          parse_float=finite_float, object_pairs_hook=unique_keys)
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path} is not JSON: {e.msg} at line {e.lineno}") from None
    except RecursionError:
        raise ConfigError(f"{what} {path} is nested too deeply") from None


# -- The console and signals

class Progress:
    """Long work told as it goes, on standard error (standard output is left alone): done of total,
    elapsed, time left. On a terminal one line rewrites itself; elsewhere (a Slurm log, a pipe) each
    update is a line of its own. The first update comes after `first` seconds, then at most one every
    `every` seconds, and a last one when all is done if any was shown."""

    def __init__(self, what: str, total: int, unit: str, first: float = 0.0, every: float = 5.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.start = time.monotonic()
        self.due, self.shown = self.start + first, False
        try:
            self.rewrite = sys.stderr.isatty()
        except (AttributeError, ValueError):
            self.rewrite = False

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now < self.due and not (done >= self.total and self.shown):
            return
        self.due, self.shown = now + self.every, True
        elapsed = now - self.start
        estimable = max(2, self.total // 20) <= done < self.total  # the first pieces include start-up
        left = f", about {_duration(elapsed / done * (self.total - done))} left" if estimable else ""
        line = (f"progress: {self.what} {done:,} of {self.total:,} {self.unit}, {_duration(elapsed)} elapsed"
                f"{left}")
        end = "\n" if not self.rewrite or done >= self.total else ""
        with contextlib.suppress(OSError, ValueError):  # a closed standard error stops nothing
            sys.stderr.write(("\r\x1b[K" if self.rewrite else "") + line + end)
            sys.stderr.flush()

def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"

def open_closed_standard_streams() -> None:
    """A run started with standard output or error closed (`>&-`) still writes its files: the closed
    descriptor goes to /dev/null (no file opened later may take its number), and so does Python's stream."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        with contextlib.suppress(OSError):
            os.fstat(fd)
            continue
        null = os.open(os.devnull, os.O_WRONLY)  # the lowest free number: this one, or a lower closed one
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        setattr(sys, name, open(fd, "w", closefd=False))

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

class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised as an exception so that every finally block cleans up on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.status = 128 + signum

STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

def _stop(signum, frame):
    """The first of these signals stops the run; the next ones are ignored, so that they cannot cut
    its cleanup short (stopping workers, removing temporary files)."""
    for sig in STOPPING_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)

def _stop_again_if_swallowed(unraisable) -> None:
    """sys.unraisablehook while the run can be stopped. A stop raised where Python discards exceptions
    (an at-fork hook, a weakref callback during garbage collection) would leave the run going with every
    later stop ignored: send it again, to be raised where it can land."""
    stop = unraisable.exc_value
    if not isinstance(stop, KeyboardInterrupt) or threading.current_thread() is not threading.main_thread():
        return sys.__unraisablehook__(unraisable)
    for sig in STOPPING_SIGNALS:
        signal.signal(sig, _stop)
    signum = stop.status - 128 if isinstance(stop, Terminated) else signal.SIGINT
    again = threading.Timer(0.01, os.kill, (os.getpid(), signum))  # from outside this hook, which discards too
    again.daemon = True
    again.start()

@contextlib.contextmanager
def stop_signals_held():
    """Stop signals wait (blocked, not lost) while a pool starts a worker, which would otherwise be one the pool
    does not know of (and waits for); the worker starts with them blocked until worker_setup."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOPPING_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)

@contextlib.contextmanager
def stopping_cleanly():
    """SIGTERM and SIGHUP stop the run as Ctrl-C does (a finally block cleans up on the way out); once
    it is stopping, more of them are ignored, so that the cleanup is never cut short."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous, unraisable_hook = {}, sys.unraisablehook
    if in_main_thread:
        previous = {sig: signal.getsignal(sig) for sig in STOPPING_SIGNALS}
        for sig in STOPPING_SIGNALS:
            if previous[sig] is not signal.SIG_IGN:  # one started with Ctrl-C ignored keeps ignoring it
                signal.signal(sig, _stop)
        sys.unraisablehook = _stop_again_if_swallowed
    try:
        yield
    except KeyboardInterrupt:
        if in_main_thread:
            for sig in STOPPING_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
            if previous[signal.SIGINT] is _interrupted_before_main:  # the script is leaving: keep ignoring them
                previous = {}
        raise
    finally:
        sys.unraisablehook = unraisable_hook
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- Exports, bench cells and figures

def write_threshold_config(directory: Path, cfg: MeasurementConfig) -> None:
    """threshold_config.json: the thresholds an operator tunes (what --thresholds reads back), and
    under "run" where the numbers came from: every setting, the command that reproduces the run
    from any folder (the script's and --out's absolute paths, every flag not at its default), and
    the versions of Python, torch and numpy."""
    run = {"command": recorded_command(cfg),
           "config": dataclasses.asdict(cfg),
           "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}}
    entry = {**threshold_dict(cfg), RUN_KEY: run}
    write_atomic(directory / "threshold_config.json", json.dumps(_json_safe(entry), indent=2, allow_nan=False) + "\n")

class Exports:
    """metrics.csv and events.json, streamed record by record into temporary files (memory stays flat
    on long streams) and put in place, with threshold_config.json, only when the stream has ended (or,
    inside outputs_together, with the run's other outputs)."""

    def __init__(self, directory: Path, cfg: MeasurementConfig):
        self.dir, self.cfg, self.n_events = Path(directory), cfg, 0

    def __enter__(self) -> "Exports":
        self.dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as opened:  # discards the first file if the second cannot be opened
            self.metrics = csv.writer(opened.enter_context(atomic_file(self.dir / "metrics.csv")),
                                      lineterminator="\n")
            self.events = opened.enter_context(atomic_file(self.dir / "events.json"))
            self.files = opened.pop_all()
        self.metrics.writerow(CSV_COLUMNS)
        self.events.write("[")
        return self

    def write(self, r: BatchRecord) -> None:
        self.metrics.writerow(csv_row(r))
        for entry in r.events:
            self.events.write(("," if self.n_events else "") + "\n  " + json.dumps(_json_safe(entry), allow_nan=False))
            self.n_events += 1

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.events.write("\n]\n")
        self.files.__exit__(exc_type, exc, tb)  # renames both into place, or discards both
        if exc_type is None:
            write_threshold_config(self.dir, self.cfg)

def serve_and_write(run: Run, console: Callable[[str], None], export_dir: Optional[Path]) -> Run:
    """Print the stages so far, then serve every batch of the run: print its line (unless --quiet)
    and write its row and events (when export_dir is given)."""
    for line in pipeline_lines(run):
        console(line)
    if not run.cfg.quiet:
        console(batch_header())
    progress = Progress("stream", run.cfg.n_batches, "batches", first=5.0)  # shown only on long streams
    with Exports(export_dir, run.cfg) if export_dir is not None else contextlib.nullcontext() as exports:
        for record in run:
            if exports is not None:
                exports.write(record)
            if not run.cfg.quiet:
                console(batch_line(record))
            progress(record.batch)
    return run

def write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    """A small CSV written whole: a header, then each row's values under their columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([csv_cell(row[c]) for c in columns] for row in rows)
    return path

def write_sweep_csv(summaries: list[dict], directory: Path) -> Path:
    return write_csv(directory / "seed_sweep.csv", ["seed", *SWEEP_FIGURES, "heals", "rollbacks"], summaries)

def write_bench_csv(rows: list[BenchRow], directory: Path) -> Path:
    return write_csv(directory / "bench.csv", [f.name for f in dataclasses.fields(BenchRow)],
                     [dataclasses.asdict(r) for r in rows])

def strengths_csv_name(cfg: MeasurementConfig) -> str:
    return f"bench_strengths_{cfg.n_batches}_batches.csv"


def write_strengths_csv(runs: dict, directory: Path, cfg: MeasurementConfig) -> Path:
    """Every bench row of a --drift-strengths run, after the strength it ran at."""
    columns = ["drift_strength", *(f.name for f in dataclasses.fields(BenchRow))]
    rows = [{"drift_strength": strength, **dataclasses.asdict(r)} for strength, rows in runs.items() for r in rows]
    return write_csv(directory / strengths_csv_name(cfg), columns, rows)


def write_images_csv(rows: list[ImageRow], directory: Path) -> Path:
    return write_csv(directory / "images.csv", [f.name for f in dataclasses.fields(ImageRow)],
                     [dataclasses.asdict(r) for r in rows])

def write_cell(directory: Path, cell: BenchCell, rows: list[BenchRow], cfg: MeasurementConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    entry = {"cell": cell.index, "config": bench_fingerprint(cfg), "rows": [dataclasses.asdict(r) for r in rows]}
    write_atomic(directory / f"{cell.name}.json", json.dumps(_json_safe(entry), allow_nan=False) + "\n")

def read_cells(directory: Path, cells: list[BenchCell], cfg: MeasurementConfig) -> list[BenchRow]:
    """Every cell's rows, from the shards' files; ConfigError names what is missing or foreign."""
    missing = [c.name for c in cells if not (directory / f"{c.name}.json").is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        if (directory.parent / LOCK_NAME).is_file() and held_elsewhere(directory.parent / LOCK_NAME):
            raise ConfigError(f"--merge: {len(missing)} of {len(cells)} cells are missing, and shards (or another "
                              f"run) are still writing into {directory.parent}: merge once they are done")
        raise ConfigError(f"--merge: {len(missing)} of {len(cells)} cells missing in {directory}: {shown}")
    expected = {f"{c.name}.json" for c in cells}
    others = sorted(p.name for p in directory.glob("cell-*.json") if p.name not in expected)
    if others:
        raise ConfigError(f"--merge: {directory} also holds {len(others)} cells that these flags do not make "
                          f"(such as {others[0]}): give the --seed and --seeds the shards ran with")
    rows, fingerprint = [], _json_safe(bench_fingerprint(cfg))
    for c in cells:
        path = directory / f"{c.name}.json"
        entry = read_json_file(path, "--merge: bench cell")
        try:
            cell_rows = [BenchRow(**{k: math.nan if v is None else v for k, v in row.items()})
                         for row in entry["rows"]]
            same_cell = (entry["cell"] == c.index and [(r.scenario, r.method, r.seed) for r in cell_rows]
                         == [(c.scenario, method, c.seed) for method in HEAL_METHODS])
            same_flags = entry["config"] == fingerprint
            numbers = [getattr(r, f.name) for r in cell_rows for f in dataclasses.fields(BenchRow) if f.type == "float"]
            whole = [getattr(r, f.name) for r in cell_rows for f in dataclasses.fields(BenchRow) if f.type == "int"]
            if not all(type(v) in (int, float) for v in numbers) or not all(type(v) is int for v in whole):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"--merge: {path} is not a bench cell file") from None
        if not same_cell:
            raise ConfigError(f"--merge: {path} holds another cell than its name says")
        if not same_flags:
            raise ConfigError(f"--merge: {path} was made by a bench with other flags")
        if not all(possible(r, cfg.n_batches) for r in cell_rows):
            raise ConfigError(f"--merge: {path} holds figures no bench can produce")
        rows += cell_rows
    return rows

def foreign_cells(directory: Path, cells: list[BenchCell], cfg: MeasurementConfig) -> list[Path]:
    """The files of these cells that a bench with other flags wrote (a shard must not count them as done)."""
    fingerprint, foreign = _json_safe(bench_fingerprint(cfg)), []
    for c in cells:
        path = directory / f"{c.name}.json"
        if path.is_file():
            entry = read_json_file(path, "bench cell")
            if not isinstance(entry, dict) or entry.get("config") != fingerprint:
                foreign.append(path)
    return foreign

def save_figure(plt, fig, path: Path) -> Path:
    with atomic_file(path, binary=True) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path

def draw_plots(data: PlotData, directory: Path, names) -> list[Path]:
    plt = pyplot()
    return [save_figure(plt, PLOTS[name](plt, data), directory / name) for name in names]


def draw_plots_held_back(data: PlotData, directory: Path, names, hold: bool) -> tuple[list[Path], list]:
    """draw_plots in a forked worker; with hold, the files are left under their temporary names, which
    it returns with their paths, for the parent to put in place with its own (outputs_together)."""
    global HELD_BACK
    HELD_BACK = [] if hold else None
    return draw_plots(data, directory, names), HELD_BACK or []


def write_figure(build: Callable, directory: Path, name: str) -> Path:
    """One figure of Part IV's, drawn and saved as directory/name."""
    plt = pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    return save_figure(plt, build(plt), directory / name)


# -- Processes

WORKER_PROGRESS = None  # in a pool worker: where it tells each finished piece of work (a pipe's end)


def worker_setup(parent: int, progress=None) -> None:
    """Every pool worker: it dies with its parent, ignores Ctrl-C and the terminal's hang-up (the parent
    stops its workers), ends at once when the parent stops it (SIGTERM; the parent then removes what
    it left), uses one torch thread, and leaves without waiting for a heal it abandoned (which could
    abort it)."""
    global WORKER_PROGRESS
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPPING_SIGNALS)  # held since the parent started this worker
    use_one_torch_thread()
    WORKER_PROGRESS = progress
    import atexit
    atexit.register(leave_if_a_heal_is_running)


def leave_if_a_heal_is_running() -> None:
    """An interpreter that shuts down under a heal thread still inside torch aborts ("terminate called
    without an active exception"): leave at once instead; everything worth keeping is sent already."""
    if heal_thread_exists():
        os._exit(0)


class WorkerPool(ProcessPoolExecutor):
    """A ProcessPoolExecutor that starts its workers (which it does in submit) with the stop signals held."""

    def submit(self, fn, /, *args, **kwargs):
        with stop_signals_held():
            return super().submit(fn, *args, **kwargs)


@contextlib.contextmanager
def process_pool(workers: int, method: str, progress=None):
    """A ProcessPoolExecutor of `workers` processes (fork: they start in milliseconds with everything
    imported; spawn: fresh interpreters, safe beside threads), each handed `progress`, a queue. If the
    parent stops early (an error, Ctrl-C) its workers are stopped at once, which the pool alone does
    not do: it waits for them."""
    import multiprocessing
    pool = WorkerPool(workers, mp_context=multiprocessing.get_context(method), initializer=worker_setup,
                      initargs=(os.getpid(), progress))
    try:
        yield pool
    except BaseException:
        workers = list((pool._processes or {}).values())  # the pool has no public way to stop a task
        for process in workers:
            process.terminate()
        for process in workers:
            process.join(timeout=2)
            if process.is_alive():
                process.kill()
                process.join()
        # With its workers gone the pool winds up at once; waiting for that leaves nothing for the
        # interpreter's exit to trip over (a half-closed pool prints "Exception ignored" there).
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()


FORK_IS_SAFE = sys.platform == "linux"  # elsewhere the same work runs in turn, with the same results


def _train_baseline(arrays: dict, data: Dataset, cfg: ArticleConfig, orders: list) -> dict:
    """In a worker: the baseline from its initial weights, trained on these epoch orders. Weights and
    orders travel as numpy arrays: torch would send tensors through shared memory and a thread of
    ours, which a signal in between could leave printing a traceback."""
    baseline = BaselineMLP(cfg.hidden_dim)
    baseline.load_state_dict(from_arrays(arrays))
    train(baseline, data, cfg, [torch.from_numpy(order) for order in orders])
    return to_arrays(baseline.state_dict())


def train_side_by_side(model, baseline, data: Dataset, cfg: ArticleConfig, model_orders, baseline_orders) -> None:
    """Part I's train_in_turn, with the baseline trained in a forked process while this one trains
    the main model (saves about 0.45 s of 0.9)."""
    if not FORK_IS_SAFE:
        return train_in_turn(model, baseline, data, cfg, model_orders, baseline_orders)
    with process_pool(1, "fork") as pool:
        trained_baseline = pool.submit(_train_baseline, to_arrays(baseline.state_dict()), data, cfg,
                                       [order.numpy() for order in baseline_orders])
        train(model, data, cfg, model_orders)
        baseline.load_state_dict(from_arrays(trained_baseline.result()))


def make_plots(run: Run, evaluation: Evaluation, directory: Path) -> list[Path]:
    """The eight plots, half of them drawn in a forked process at the same time (saves about 0.5 s)."""
    directory.mkdir(parents=True, exist_ok=True)
    data, names = PlotData.of(run, evaluation), list(PLOTS)
    if not FORK_IS_SAFE:
        return draw_plots(data, directory, names)
    pyplot()  # imported before the fork, so that the child has it too
    with process_pool(1, "fork") as pool:
        other_half = pool.submit(draw_plots_held_back, data, directory, names[1::2], HELD_BACK is not None)
        paths = draw_plots(data, directory, names[0::2])
        paths_there, held_there = other_half.result()
        if HELD_BACK is not None:
            HELD_BACK.extend(held_there)
        return paths + paths_there


class CountHere:
    """Stands in for the workers' queue when the work runs in this process."""

    def __init__(self, progress: Progress):
        self.done, self.progress = 0, progress

    def put(self, pieces: int) -> None:
        self.done += pieces
        self.progress(self.done)


def map_in_processes(fn: Callable, items: list, workers: int, progress: Progress, then: Callable = None) -> list:
    """[fn(x) for x in items], spread over `workers` fresh processes, in order. With `then`, the result r of
    each item queues then(r), a list of (function, argument) pairs, as soon as r is ready, so that work which
    needs r starts while other items still run; their results follow, in the order they were queued. The
    functions call told_done for each piece of work they finish, and progress shows them."""
    global WORKER_PROGRESS
    in_turn, then = workers <= 1 or (len(items) <= 1 and then is None), then or (lambda result: [])
    if in_turn:
        WORKER_PROGRESS = CountHere(progress)
        try:
            results = [fn(x) for x in items]
            return results + [g(y) for r in results for g, y in then(r)]
        finally:
            WORKER_PROGRESS = None
    import multiprocessing
    finished, told, count = *multiprocessing.get_context("spawn").Pipe(duplex=False), CountHere(progress)
    try:
        with process_pool(workers, "spawn", told) as pool:
            futures, followed = [pool.submit(fn, x) for x in items], set()
            while True:
                for k, future in enumerate(futures[:len(items)]):
                    if k not in followed and future.done() and future.exception() is None:
                        followed.add(k)
                        futures += [pool.submit(g, y) for g, y in then(future.result())]
                failed = [f for f in futures if f.done() and f.exception() is not None]
                if failed or all(f.done() for f in futures):
                    return [f.result() for f in (failed or futures)]  # the first failure raises, at once
                concurrent.futures.wait(futures, timeout=0.2, return_when=concurrent.futures.FIRST_EXCEPTION)
                while finished.poll():
                    count.put(finished.recv())
    finally:
        finished.close()
        told.close()


def told_done(pieces: int = 1) -> None:
    """Tell whoever counts (the parent of a pool worker, or this process) that pieces of work are done."""
    if isinstance(WORKER_PROGRESS, CountHere):
        WORKER_PROGRESS.put(pieces)
    elif WORKER_PROGRESS is not None:
        WORKER_PROGRESS.send(pieces)  # a few bytes: one write, whole, however many workers share the pipe


def summarise_seed(cfg: MeasurementConfig) -> dict:
    summary = seed_summary(cfg)
    told_done()
    return summary


def train_images_job(job: tuple) -> TrainedImages:
    trained = train_image_model(*job)
    told_done()
    return trained


def image_cell_job(job: tuple) -> list:
    rows = image_cell(*job)
    told_done()
    return rows


def bench_seed_job(job: tuple) -> tuple:
    seed_work = bench_seed(*job)
    told_done()
    return job[1], seed_work


def bench_cell_job(job: tuple) -> list:
    rows = bench_cell(*job)
    told_done()
    return rows


def run_bench_in_processes(cfg: MeasurementConfig, cells: list[BenchCell], workers: int) -> list[BenchRow]:
    """The bench's cells over `workers` processes: each seed's models are trained once, and its cells
    start as soon as they are."""
    seeds = sorted({c.seed for c in cells})
    done = map_in_processes(bench_seed_job, [(cfg, seed) for seed in seeds], workers,
                            Progress("bench", len(seeds) + len(cells), "trainings and cells"),
                            then=lambda done_seed: [(bench_cell_job, (cfg, done_seed[1], cell))
                                                    for cell in cells if cell.seed == done_seed[0]])
    return sorted((row for rows in done[len(seeds):] for row in rows),
                  key=lambda r: (r.seed, SCENARIOS.index(r.scenario), list(HEAL_METHODS).index(r.method)))


# Part VI. The command line
#
# The run's own knobs, flags to a validated Config (each field's rule lives with its field),
# the threshold file, and main, which runs the article, a sweep, a scenario or the bench and
# writes the outputs. Uses everything above.

ARTICLE_RUN = ("article", "heal")  # (scenario, heal method) of the article's own run
BENCH_SEEDS = 5  # seeds of a --bench run when --seeds is not given
SEED_MAX = 2 ** 32 - 1  # numpy's RandomState takes seeds up to this


def parse_shard(text: str) -> Optional[tuple[int, int]]:
    """'K/N' -> (K, N) when 0 <= K < N, else None."""
    match = re.fullmatch(r"(\d{1,6})/(\d{1,6})", text, flags=re.ASCII)
    k, n = (int(match[1]), int(match[2])) if match else (0, 0)
    return (k, n) if k < n else None


def is_archive_name(text: str) -> bool:
    """--export-torchserve's rule: none, or a file name ending in .mar (TorchServe's model name is its stem)."""
    return text == "" or (text.endswith(".mar") and re.fullmatch(r"[A-Za-z][\w-]*", Path(text).stem) is not None)


def strengths(text: str) -> list[float]:
    """--drift-strengths as numbers, in the order given, each once; [] for none or a malformed list."""
    try:
        values = [number(part.strip()) for part in text.split(",")] if text else []
    except ValueError:
        return []
    return list(dict.fromkeys(values))


STRENGTH_RULE = ArticleConfig.__dataclass_fields__["drift_strength"].metadata["rule"]


def is_strength_list(text: str) -> bool:
    """--drift-strengths' rule: none, or numbers that --drift-strength takes."""
    return text == "" or bool(strengths(text)) and all(follows(STRENGTH_RULE, v) for v in strengths(text))


def is_shard(text: str) -> bool:
    """--shard's rule: none, or K/N."""
    return text == "" or parse_shard(text) is not None


@dataclass(frozen=True)
class Config(ImagesConfig):
    """The run: where its output goes, what it prints, how many seeds, the bench and its shards."""
    out: str = knob(".", "directory that receives plots/ and monitoring_export/", role="run")
    no_plots: bool = knob(False, "skip the plots", role="run")
    quiet: bool = knob(False, "do not print the per-batch table", role="run")
    article_table: bool = knob(False, "print the article's table beside this run's even when flags differ from the "
                               "article's (by default such a run prints how many of its figures match)", role="run")
    seeds: int = knob(1, f"run this many seeds (seed, seed+1, ...) and print their spread ({BENCH_SEEDS} with "
                      f"--bench, {IMAGE_SEEDS} with --images, unless given)", "[1, 10000]", role="run")
    bench: bool = knob(False, "run every scenario against every method over --seeds and print when "
                       "self-healing helps", role="run")
    shard: str = knob("", "with --bench, run only shard K of N (K/N): one file per cell, merged by --merge",
                      (is_shard, "K/N with 0 <= K < N <= 999999"), role="run")
    merge: bool = knob(False, "with --bench, collect the cell files of all shards into the table, CSV and plot",
                       role="run")
    drift_strengths: str = knob("", "with --bench, run the bench at each of these drift strengths (comma-separated) "
                                "and print select against the best single method at each",
                                (is_strength_list, f"numbers {rule_words(STRENGTH_RULE)}, comma-separated"), role="run")
    export_torchserve: str = knob("", "train as the article's run does, write a TorchServe archive of the model to "
                                  "this .mar file and stop (the handler is this script; see the README)",
                                  (is_archive_name, "a path ending in .mar"), role="run")


def sweep_configs(cfg: Config) -> list[Config]:
    """One config per seed of the sweep: seed, seed+1, ..., each a quiet single run."""
    return [dataclasses.replace(cfg, seed=cfg.seed + k, seeds=1, quiet=True, no_plots=True)
            for k in range(cfg.seeds)]


def run_kind(cfg: Config) -> str:
    """Which run the flags ask for: images, shard, strengths (benches over drift strengths), bench, sweep,
    scenario (one scenario and method) or article."""
    if cfg.export_torchserve or cfg.images:
        return "torchserve" if cfg.export_torchserve else "images"
    if cfg.bench:
        return "shard" if cfg.shard else "strengths" if cfg.drift_strengths else "bench"
    if cfg.seeds > 1:
        return "sweep"
    return "article" if (cfg.scenario, cfg.heal_method) == ARTICLE_RUN else "scenario"


PROCESS_BASE = 300 * 2 ** 20  # resident bytes of a Python process with torch imported


def memory_estimate(cfg: Config) -> tuple[float, int]:
    """Bytes one process will hold for the run's data and models at its peak, beyond PROCESS_BASE, and
    how many processes hold that, from constants measured here: drawing the data holds about 250 bytes
    per row (float64 draws, then float32); the network is copied about 16 times (two models,
    optimizers, heal copies) plus its snapshots; a batch's activations and their gradients are about
    24 float32 per row and hidden unit."""
    if cfg.images:
        return image_memory_estimate(cfg)
    h = cfg.hidden_dim
    parameters = 3 * h * h + 16 * h
    rows = cfg.n_train + cfg.n_test + 2 * cfg.n_drift + 4 * cfg.batch_size
    activations = 4 * 24 * cfg.batch_size * (h + N_FEATURES)
    per_process = 250 * rows + 4 * parameters * (16 + cfg.keep_best + cfg.keep_last) + activations
    return float(per_process), 1 + (min(cfg.seeds, os.cpu_count() or 1) if cfg.bench or cfg.seeds > 1 else 0)


def image_memory_estimate(cfg: Config) -> tuple[float, int]:
    """memory_estimate of --images: the network's copies (training, methods, optimizers), the training
    activations and the images."""
    w, streamed = cfg.resnet_width, cfg.image_batch_size * (cfg.image_clean_batches + cfg.image_batches)
    parameters = 2724 * w * w + 257 * w + 10  # of ResNet18(10, w): 11,173,962 at width 64
    per_process = 4 * (12 * parameters + 25_000 * w * max(min(cfg.image_train_batch, cfg.image_train),
                                                           cfg.image_batch_size)
                       + 128 * w * streamed) + 12_288 * (cfg.image_train + cfg.image_test + streamed)
    return float(per_process), 1 + min(cfg.seeds * len(chosen_corruptions(cfg.corruptions)), os.cpu_count() or 1)


def memory_limits() -> tuple[Optional[float], Optional[float]]:
    """What the machine has free now (Linux), and what this process may still add to its address
    space under `ulimit -v`; None where there is no such limit or it cannot be read."""
    free = room = None
    with contextlib.suppress(OSError, KeyError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            free = float(dict(line.split(":", 1) for line in f)["MemAvailable"].split()[0]) * 1024
    import resource
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open("/proc/self/statm") as f:
                room = limit - int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    return free, room


def validate(cfg: Config) -> Config:
    """Return cfg unchanged or raise ConfigError naming the first bad value."""
    def fail(name: str, rule: str):
        raise ConfigError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(cfg, name)!r}")

    for f in dataclasses.fields(cfg):
        problem = knob_problem(f, getattr(cfg, f.name))
        if problem:
            fail(f.name, problem)
    if not cfg.out.strip():
        fail("out", "a folder (empty names none)")
    for name in ("n_train", "n_test", "n_drift"):
        n = getattr(cfg, name)
        if not 0 < int(n * cfg.fraud_ratio) < n:
            fail(name, f"large enough to hold both classes at --fraud-ratio {cfg.fraud_ratio}")
    if cfg.export_torchserve and (cfg.bench or cfg.images or cfg.seeds > 1):
        raise ConfigError("--export-torchserve archives the article's model: drop --bench, --images and --seeds")
    if (cfg.shard or cfg.merge) and not cfg.bench:
        raise ConfigError("--shard and --merge go with --bench")
    if cfg.shard and cfg.merge:
        raise ConfigError("--shard runs cells and --merge collects them: give one of the two")
    if cfg.drift_strengths and (not cfg.bench or cfg.shard or cfg.merge):
        raise ConfigError("--drift-strengths goes with --bench, whole in one run: drop --shard and --merge"
                          if cfg.bench else "--drift-strengths goes with --bench")
    if not cfg.bench and not cfg.images and cfg.seeds > 1 and (cfg.scenario, cfg.heal_method) != ARTICLE_RUN:
        raise ConfigError("--seeds sweeps the article's run; for several seeds of --scenario or --heal-method, "
                          "use --bench")
    if cfg.bench and (cfg.async_apply or cfg.supervision != "labels"):
        raise ConfigError("--bench runs the heal with labels (heal) and with the rule (heal-rules), waiting for "
                          "each heal so that it reproduces: drop --async-apply and --supervision")
    if cfg.heal_worker == "inline" and (cfg.async_apply or cfg.heal_timeout != Config.heal_timeout):
        raise ConfigError(f"--{'async-apply' if cfg.async_apply else 'heal-timeout'} needs a heal that runs beside "
                          f"the stream: --heal-worker thread or process (inline heals are neither timed nor left "
                          f"running)")
    if cfg.seed + cfg.seeds - 1 > SEED_MAX:
        raise ConfigError(f"--seed {cfg.seed} with --seeds {cfg.seeds} runs past the largest seed, {SEED_MAX:,}")
    per_process, processes = memory_estimate(cfg)
    needed, (free, room) = (PROCESS_BASE + per_process) * processes, memory_limits()
    how = ("estimated: 300 MiB per process, 12 kB per image, 12 copies of the ResNet-18, 100 kB of activations per "
           "image and unit of width" if cfg.images else "estimated: 300 MiB per process, 250 bytes per data row, "
           "16 + --keep-best + --keep-last copies of the network, 96 bytes per batch row and hidden unit")
    if free and needed > 0.8 * free:
        raise ConfigError(f"these sizes need about {needed / 2 ** 30:,.1f} GiB ({how}), more than 80% of the "
                          f"{free / 2 ** 30:,.1f} GiB this machine has free")
    if room is not None and per_process > 0.8 * room:
        raise ConfigError(f"these sizes need about {per_process / 2 ** 30:,.1f} GiB more in this process ({how}), "
                          f"more than 80% of the {max(room, 0) / 2 ** 30:,.2f} GiB that its limit (ulimit -v) leaves")
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
        problem = knob_problem(next(f for f in dataclasses.fields(Config) if f.name == key), values[key])
        if problem:  # the file's mistake, not a flag's
            raise ConfigError(f"threshold file {path}: {key} must be {problem}, got {_short(json.dumps(value))}")
    return values


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line and exit status 2: a user mistake is no reason for a usage dump."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def integer(text: str) -> int:
    """A flag's integer: ASCII digits only (int() would also take '1_0' and other scripts' digits)."""
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ValueError(text)
    return int(text)


def number(text: str) -> float:
    """A flag's number, written as Python writes floats, in ASCII digits without underscores."""
    if not re.fullmatch(r"[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|inf(inity)?|nan)", text, re.IGNORECASE):
        raise ValueError(text)
    return float(text)


CONFIG_GROUPS = (ArticleConfig, EngineConfig, MeasurementConfig, ImagesConfig, Config)  # --help's groups, in this order


def flag_help(f: dataclasses.Field) -> str:
    """A field's help with its default and its rule, as --help and the README show them."""
    default = "none" if f.default == "" else f.default
    rule = f"; {rule_words(f.metadata['rule'])}" if f.metadata["rule"] is not None else ""
    return f"{f.metadata['help']} (default: {default}{rule})"


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """One flag per Config field, grouped by the class that declares it. With suppress_defaults the
    parse holds only flags given."""
    parser = _Parser(prog="self_healing_production_final.py", usage="%(prog)s [flags]", allow_abbrev=False,
                     description="Self-healing neural network under data drift: the article's experiment, "
                                 "reproduced and measured honestly. Flags by what they control:",
                     argument_default=argparse.SUPPRESS if suppress_defaults else None)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for group_class in CONFIG_GROUPS:
        group = parser.add_argument_group(group_class.__doc__.rstrip("."))
        for name in group_class.__annotations__:
            f = fields[name]
            default = {} if suppress_defaults else {"default": f.default}
            if f.type == "bool":
                group.add_argument("--" + name.replace("_", "-"), action="store_true", help=flag_help(f), **default)
            else:
                kind = {"int": integer, "float": number, "str": str}[f.type]
                group.add_argument("--" + name.replace("_", "-"), type=kind, choices=f.metadata["choices"],
                                   metavar=None if f.metadata["choices"] else name.upper(), help=flag_help(f),
                                   **default)
        if group_class is Config:
            group.add_argument("--thresholds", metavar="FILE", help="read thresholds from a threshold_config.json; "
                               "flags given explicitly win over the file")
    return parser


def check_image_flags(cfg: Config, explicit: dict) -> None:
    """--images' own refusals: its flags without it, another run's or another part's flags with it, and a
    label delay that no label would outlive."""
    image_flags = sorted(set(explicit) & set(ImagesConfig.__annotations__) - {"images"})
    if not cfg.images:
        raise ConfigError(f"--{image_flags[0].replace('_', '-')} goes with --images")
    other = next((name for name in ("bench", "shard", "merge") if getattr(cfg, name)), None)
    if other:
        raise ConfigError(f"--images and --{other} go with two different runs: give one of the two")
    unused = sorted(set(explicit) & {f.name for f in dataclasses.fields(MeasurementConfig)} - set(IMAGES_USE))
    if unused:
        raise ConfigError(f"--{unused[0].replace('_', '-')} does not apply to --images (it uses --seed, "
                          f"{', '.join('--' + n.replace('_', '-') for n in IMAGES_USE if n != 'seed')})")
    stream = cfg.image_clean_batches + cfg.image_batches
    if cfg.label_delay >= stream:
        raise ConfigError(f"--label-delay {cfg.label_delay} is as long as the whole image stream ({stream} "
                          f"batches): no label would arrive")


def parse_config(argv: list[str]) -> Config:
    """Flags -> validated Config. Raises ConfigError (argparse itself exits 2 on non-numbers)."""
    args = vars(build_parser().parse_args(argv))
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    thresholds = args.pop("thresholds")
    if thresholds is not None:
        args.update({k: v for k, v in read_thresholds(thresholds).items() if k not in explicit})
    if "seeds" not in explicit:
        args["seeds"] = BENCH_SEEDS if args["bench"] else IMAGE_SEEDS if args["images"] else 1
    cfg = validate(Config(**args))
    if cfg.images or set(explicit) & set(ImagesConfig.__annotations__):
        check_image_flags(cfg, explicit)
    return cfg


def seconds_since_process_start() -> Optional[float]:
    """Wall time since this process started (Linux), imports included; None where it cannot be read."""
    try:
        with open("/proc/self/stat") as stat_file, open("/proc/uptime") as uptime_file:
            started = int(stat_file.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
            return float(uptime_file.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


def run_article(cfg: Config, out: Path, console: Callable[[str], None]) -> int:
    """One seed: train, stream (printing and exporting each batch), evaluate, report, plot."""
    start = time.perf_counter()
    run = Run(cfg, train_models(cfg, train_side_by_side), keep_records=not cfg.no_plots)
    with outputs_together():  # the exports and the plots of one run, or none of them
        serve_and_write(run, console, out / "monitoring_export")
        evaluation = evaluate_run(run)
        for line in report(run, evaluation, cfg.article_table):
            console(line)
        if not cfg.no_plots:
            make_plots(run, evaluation, out / "plots")
    console(f"\nExported metrics.csv, events.json and threshold_config.json to {out / 'monitoring_export'}")
    if not cfg.no_plots:
        console(f"Wrote {len(PLOTS)} plots to {out / 'plots'}")
    since_start = seconds_since_process_start()
    console(f"Done in {time.perf_counter() - start:.1f} s"
            + (f" ({since_start:.1f} s with Python's start-up and imports)." if since_start else "."))
    return 0


def run_seed_sweep(cfg: Config, console: Callable[[str], None] = print, workers: int = None) -> list[dict]:
    """Seeds cfg.seed .. cfg.seed + seeds - 1, in parallel processes; prints and writes their spread."""
    configs = sweep_configs(cfg)
    workers = workers or min(len(configs), os.cpu_count() or 1)
    console(f"Running seeds {configs[0].seed}..{configs[-1].seed} in {_count(workers, 'process')}.")
    summaries = map_in_processes(summarise_seed, configs, workers, Progress("sweep", len(configs), "seeds"))
    report_and_write(sweep_report(summaries, sweep_spread(summaries)),
                     lambda folder: write_sweep_csv(summaries, folder), lambda plt: plot_seed_sweep(plt, summaries),
                     "seed_sweep.png", cfg, console)
    return summaries


def run_scenario(cfg: Config, console: Callable[[str], None]) -> int:
    """One seed of one scenario served by one method, beside no adaptation and the Bayes ceiling."""
    trained = train_models(cfg, train_side_by_side)
    ceiling = scenario_ceiling(cfg.scenario, cfg)
    methods = dict.fromkeys([cfg.heal_method, "none"])  # the method, then no adaptation beside it
    detection = detection_figures(detection_delays(cfg.scenario, cfg, trained), false_alarms(cfg, trained))
    rows = bench_rows(cfg.scenario, methods, trained, cfg, ceiling, detection)
    for line in bench_report(rows, cfg):
        console(line)
    console("(A run of one scenario and method writes no files; --bench writes the whole comparison.)")
    return 0


def run_bench(cfg: Config, out: Path, console: Callable[[str], None], merged: list = None) -> int:
    """Every scenario x method x seed; or one shard of the cells; or, given the merged rows of all
    shards' cells, their table, CSV and plot."""
    cells, cell_dir = bench_cells(cfg.seed, cfg.seeds), out / "bench_cells"
    if cfg.shard:
        k, n = parse_shard(cfg.shard)
        mine = shard_cells(cells, k, n)
        foreign = foreign_cells(cell_dir, mine, cfg)
        if foreign:
            raise ConfigError(f"{cell_dir} holds {len(foreign)} cells of a bench with other flags (such as "
                              f"{foreign[0].name}): merge them with those flags, or move them away, first")
        todo = [c for c in mine if not (cell_dir / f"{c.name}.json").is_file()]
        console(f"Shard {k}/{n}: {len(mine)} of {len(cells)} cells, {len(mine) - len(todo)} already written, "
                f"writing the rest to {cell_dir}")
        progress, written = Progress(f"shard {k}/{n}", len(todo), "cells"), []

        def done(cell, rows):
            write_cell(cell_dir, cell, rows, cfg)
            written.append(cell)
            progress(len(written))
        run_bench_cells(cfg, todo, done=done)
        console(f"Shard {k}/{n} done. Merge with the same flags and --merge once every shard is done.")
        return 0
    if merged is not None:
        rows = merged
    else:
        workers = min(cfg.seeds, os.cpu_count() or 1)
        console(f"Running {_count(len(cells), 'cell')} ({len(SCENARIOS)} scenarios x {_count(cfg.seeds, 'seed')}, each "
                f"stream served by {len(HEAL_METHODS)} methods) in {_count(workers, 'process')}.")
        rows = run_bench_in_processes(cfg, cells, workers)
    report_and_write(bench_report(rows, cfg), lambda folder: write_bench_csv(rows, folder),
                     lambda plt: plot_bench(plt, rows), "bench.png", cfg, console)
    return 0


def run_strengths(cfg: Config, console: Callable[[str], None]) -> int:
    """The whole bench at each drift strength in turn; select against the best single method at each."""
    runs, cells, workers = {}, bench_cells(cfg.seed, cfg.seeds), min(cfg.seeds, os.cpu_count() or 1)
    for strength in strengths(cfg.drift_strengths):
        console(f"Drift strength {strength:g}: {_count(len(cells), 'cell')} in {_count(workers, 'process')}.")
        runs[strength] = run_bench_in_processes(dataclasses.replace(cfg, drift_strength=strength), cells, workers)
    report_and_write(strength_sweep_report(runs, cfg), lambda folder: write_strengths_csv(runs, folder, cfg), None, "",
                     cfg, console)
    return 0


def report_and_write(lines: list[str], write_table: Callable, plot: Optional[Callable], figure: str, cfg: Config,
                     console: Callable[[str], None]) -> None:
    """A bench's, a sweep's or the images' report printed, then its CSV, the threshold file and its figure
    (if it has one) written together."""
    for line in lines:
        console(line)
    out, written = Path(cfg.out), []
    with outputs_together():
        written.append(write_table(out / "monitoring_export"))
        write_threshold_config(out / "monitoring_export", cfg)
        if plot and not cfg.no_plots:
            written.append(write_figure(plot, out / "plots", figure))
    for k, path in enumerate(written):
        console(("\n" if k == 0 else "") + f"Wrote {path}")


def run_images(cfg: Config, console: Callable[[str], None]) -> int:
    """Train a ResNet-18 per seed, stream every chosen corruption through every image method, report, write."""
    start = time.perf_counter()
    seeds, corruptions = [cfg.seed + k for k in range(cfg.seeds)], chosen_corruptions(cfg.corruptions)
    workers = min(len(seeds) * len(corruptions), os.cpu_count() or 1)
    console(f"Training a width-{cfg.resnet_width} ResNet-18 on {cfg.image_train:,} rendered digits for each of "
            f"{_count(len(seeds), 'seed')}, then streaming {_count(len(corruptions), 'corruption')} through "
            f"{len(IMAGE_METHODS) + 1} methods, in {_count(workers, 'process')} (training on the "
            f"{image_device().type}, streams on the cpu).")
    done = map_in_processes(train_images_job, [(cfg, seed) for seed in seeds], workers,
                            Progress("images", len(seeds) * (1 + len(corruptions)), "trainings and streams"),
                            then=lambda trained: [(image_cell_job, (cfg, trained, c)) for c in corruptions])
    order = {(seed, c, m): k for k, (seed, c, m) in enumerate(itertools.product(seeds, corruptions, IMAGE_ROWS))}
    rows = sorted((row for rows in done[len(seeds):] for row in rows), key=lambda r: order[r.seed, r.corruption,
                                                                                          r.method])
    report_and_write(images_report(rows, cfg), lambda folder: write_images_csv(rows, folder),
                     lambda plt: plot_images(plt, rows), "images.png", cfg, console)
    console(f"Done in {time.perf_counter() - start:.1f} s.")
    return 0


def output_plan(cfg: Config) -> dict:
    """Folder under --out -> the files this run will write there (none for a run of one scenario)."""
    kind = run_kind(cfg)
    if kind == "shard":
        return {"bench_cells": []}
    if kind in ("scenario", "torchserve"):
        return {}
    exports, plots = {"bench": (["bench.csv"], ["bench.png"]), "sweep": (["seed_sweep.csv"], ["seed_sweep.png"]),
                      "strengths": ([strengths_csv_name(cfg)], []),
                      "images": (["images.csv"], ["images.png"]),
                      "article": (["metrics.csv", "events.json"], list(PLOTS))}[kind]
    return {"monitoring_export": exports + ["threshold_config.json"], **({} if cfg.no_plots or not plots else
                                                                          {"plots": plots})}


OWNED_FOLDERS = ("monitoring_export", "plots", "bench_cells")  # every folder under --out a run may write in


def bench_lock_name(cfg: Config) -> str:
    """The shared lock of one bench's shards, named after the flags its cells depend on."""
    flags = json.dumps(_json_safe(bench_fingerprint(cfg)), sort_keys=True)
    return f".bench-{hashlib.sha256(flags.encode()).hexdigest()[:16]}.lock"


def claim_out(cfg: Config) -> list[int]:
    """Check, before any work, that --out can hold what this run writes, and hold it for this run, so
    that another run into the same place is refused ("busy"). Shards of one bench hold it together,
    each its own cells; a run of any other kind, or a bench with other flags, needs it alone.
    Leftovers of a killed run are removed. Returns the locks' descriptors (none for a run that
    writes nothing); raises ConfigError, having created nothing."""
    plan = output_plan(cfg)
    if not plan:
        return []
    out, created, locks = Path(cfg.out), [], []
    shard = run_kind(cfg) == "shard"
    try:
        missing_parents = [folder for folder in reversed(out.parents) if not folder.exists()]
        for folder in [*missing_parents, out, *(out / name for name in plan)]:
            try:
                folder.mkdir()
                created.append(folder)
            except FileExistsError:  # there already, or made this instant by a shard starting beside this one
                pass
            if not folder.is_dir():
                raise ConfigError(f"cannot write to --out {cfg.out}: {folder} is not a folder")
        for name, files in plan.items():
            for file in files:
                if (out / name / file).is_dir():
                    raise ConfigError(f"cannot write to --out {cfg.out}: {out / name / file} is a folder")
            with tempfile.NamedTemporaryFile(dir=out / name, prefix=".probe.", suffix=".tmp"):
                pass  # a file can be created there (and it is removed)
        admission = take_lock(out / (LOCK_NAME + ".admission"), wait=True)  # one run at a time decides
        try:
            locks.append(take_lock(out / LOCK_NAME, shared=shard))
            if shard:
                mine = out / "bench_cells" / bench_lock_name(cfg)
                if any(held_elsewhere(other) for other in mine.parent.glob(".bench-*.lock") if other != mine):
                    raise BlockingIOError
                locks.append(take_lock(mine, shared=True))
        finally:
            os.close(admission)
        for name in OWNED_FOLDERS:
            remove_stale_temporaries(out / name)
        return locks
    except BlockingIOError:
        for fd in locks:
            os.close(fd)
        raise ConfigError(f"--out {cfg.out} is busy: another run is writing there"
                          + (" (only shards of one bench, with the same flags, share it)" if shard else "")) from None
    except (ConfigError, OSError) as e:
        for fd in locks:
            os.close(fd)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot write to --out {cfg.out}: {e.strerror or e}") from None


# -- Served by TorchServe
#
# The script is the archive's handler: TorchServe imports it in its worker process and calls handle()
# with each batch of requests. One worker holds one SelfHealer, with its registry and health monitor;
# several workers would each heal on their own share of the requests, so the archive asks for one.

TORCHSERVE_STATE = "self_healing_state.pt"  # in the archive: the trained model, FIDI's training V14, the flags


def export_torchserve(cfg: Config, console: Callable[[str], None]) -> int:
    """Train as the article's run does and write a TorchServe archive (a .mar: a zip with a manifest) holding
    this script as its handler and the trained model, its adapter included."""
    import zipfile
    trained, path = train_models(cfg, train_side_by_side), Path(cfg.export_torchserve)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = io.BytesIO()
    torch.save({"model": trained.model.state_dict(), "v14": torch.from_numpy(trained.data.train.X[:, V14].copy()),
                "flags": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(MeasurementConfig)},
                "exports": str(Path(cfg.out).resolve() / "monitoring_export")}, state)
    manifest = {"createdOn": datetime.datetime.now().strftime("%d/%m/%Y %H:%M:%S"), "runtime": "python",
                "model": {"modelName": path.stem, "serializedFile": TORCHSERVE_STATE, "handler": Path(__file__).name,
                          "modelVersion": "1.0"}, "archiverVersion": "0.12.0"}
    with atomic_file(path, binary=True) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(TORCHSERVE_STATE, state.getvalue())
        archive.write(__file__, Path(__file__).name)
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest, indent=2))
    console(f"Wrote {path}: model {path.stem!r}; its worker writes metrics.csv and events.json to "
            f"{Path(cfg.out).resolve() / 'monitoring_export'}")
    return 0


SERVING: dict = {}  # this worker process's SelfHealer, its flags and its exports folder, made on the first call


def start_serving(model_dir: str) -> None:
    saved = torch.load(os.path.join(model_dir, TORCHSERVE_STATE), weights_only=True)
    cfg = MeasurementConfig(**saved["flags"])
    model = SelfHealingMLP(cfg.hidden_dim)
    model.load_state_dict(saved["model"])
    SERVING.update(cfg=cfg, exports=Path(saved["exports"]), healer=SelfHealer(
        model, "reflexive", detector=FIDIMonitor(saved["v14"].numpy(), cfg.fidi_window, cfg.fidi_threshold),
        rule=lambda X: rule_labels(X, cfg), healer=heals_in(cfg.heal_worker, cfg.heal_timeout, cfg.async_apply),
        **{name: getattr(cfg, name) for name in HEALER_OPTIONS}))


def serving_version(healer: SelfHealer) -> int:
    """The registry version the healer serves now: the last one published or restored (1: the clean one)."""
    for r in reversed(healer.records):
        if r.restored_version is not None or r.version_post is not None:
            return r.restored_version if r.restored_version is not None else r.version_post
    return 1


def serve_request(healer: SelfHealer, body) -> dict:
    """One request's JSON: {"rows": [[10 numbers], ...]} is served, {"batch": k, "labels": [0 or 1, ...]}
    hands in the labels of batch k. ValueError says what is wrong with a bad one."""
    if isinstance(body, (bytes, bytearray)):
        body = json.loads(body)  # a JSONDecodeError is a ValueError
    if isinstance(body, dict) and set(body) == {"rows"}:
        try:
            X = np.array(body["rows"], dtype=np.float32)
        except (TypeError, ValueError):
            X = np.zeros(0)
        if X.ndim != 2 or X.shape[1:] != (N_FEATURES,) or not len(X):
            raise ValueError(f"rows: a list of rows of {N_FEATURES} numbers each")
        if not np.isfinite(X).all():
            raise ValueError("rows: NaN or infinite values (the batch was not served)")
        proba = healer.predict(X)
        record = healer.records[-1]
        return {"batch": record.batch, "probabilities": [round(float(p), 6) for p in proba],
                "version": serving_version(healer), "state": record.state}
    if isinstance(body, dict) and set(body) == {"batch", "labels"}:
        batch = body["batch"]
        if not (type(batch) is int and 1 <= batch <= healer.served):
            raise ValueError(f"batch {batch!r} has not been served")
        if batch not in healer.pending:
            raise ValueError(f"the labels of batch {batch} came already, or after {healer.max_pending} later batches")
        healer.observe(batch, body["labels"])
        return {"batch": batch, "observed": True, "version": serving_version(healer)}
    raise ValueError('a request is a JSON object, {"rows": [...]} or {"batch": k, "labels": [...]}')


def handle(data, context):
    """TorchServe's entry point: answers in request order; a bad request gets status 400 and
    {"error": reason}, and the worker serves on. metrics.csv and events.json are rewritten whole after
    each call (the last keep_records batches), in the folder the archive names."""
    if not SERVING:
        start_serving(context.system_properties["model_dir"])
    if data is None:  # TorchServe's call at load time
        return None
    answers = []
    for k, request in enumerate(data):
        try:
            answers.append(serve_request(SERVING["healer"], request.get("body", request.get("data"))))
        except ValueError as e:
            context.set_response_status(400, str(e), idx=k)
            answers.append({"error": str(e)})
    with Exports(SERVING["exports"], SERVING["cfg"]) as exports:
        for record in SERVING["healer"].records:
            exports.write(record)
    return answers


def error_line(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"self_healing_production_final.py: error: {text}", file=sys.stderr, flush=True)


LEFT_AS_THEY_WERE = "exports and plots already in place are left as they were"


def main(argv: list[str] = None) -> int:
    """Exit status: 0 done (also when standard output was closed early, as by `| head`: the
    outputs are written all the same), 1 outputs or standard output could not be written, a worker
    died or memory ran out, 2 a user mistake, 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP."""
    open_closed_standard_streams()
    for stream in (sys.stdout, sys.stderr):  # a path or value the terminal cannot encode is escaped, not fatal
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    locks, console = [], Console()
    try:
        with stopping_cleanly():
            cfg = parse_config(sys.argv[1:] if argv is None else argv)
            # a merge checks every cell before it creates anything
            cells, out = bench_cells(cfg.seed, cfg.seeds), Path(cfg.out)
            merged = read_cells(out / "bench_cells", cells, cfg) if cfg.merge else None
            locks = claim_out(cfg)
            use_one_torch_thread()
            kind = run_kind(cfg)
            if kind == "torchserve":
                code = export_torchserve(cfg, console)
            elif kind == "images":
                code = run_images(cfg, console)
            elif kind in ("bench", "shard"):
                code = run_bench(cfg, out, console, merged)
            elif kind == "strengths":
                code = run_strengths(cfg, console)
            elif kind == "sweep":
                run_seed_sweep(cfg, console)
                code = 0
            elif kind == "scenario":
                code = run_scenario(cfg, console)
            else:
                code = run_article(cfg, out, console)
    except ConfigError as e:
        error_line(str(e))
        return 2
    except SystemExit as e:  # argparse's, having printed its one line (or --help)
        return e.code
    except Terminated as e:
        error_line(f"stopped by {signal.Signals(e.status - 128).name}: {LEFT_AS_THEY_WERE}")
        return e.status
    except KeyboardInterrupt:
        error_line(f"interrupted: {LEFT_AS_THEY_WERE}")
        return 130
    except concurrent.futures.process.BrokenProcessPool:
        error_line(f"a worker process died (killed, or out of memory?); {LEFT_AS_THEY_WERE}")
        return 1
    except (MemoryError, RuntimeError) as e:  # torch's allocator raises a RuntimeError
        if not isinstance(e, MemoryError) and "can't allocate memory" not in str(e):
            raise
        error_line(f"out of memory (smaller sizes, or fewer --seeds at once, need less); {LEFT_AS_THEY_WERE}")
        return 1
    except OSError as e:
        error_line(f"cannot write {e.filename or 'the outputs'}: {e.strerror or e}; {LEFT_AS_THEY_WERE}")
        return 1
    finally:
        if locks:  # what workers stopped on the way out left behind (the run's own files are discarded)
            for name in OWNED_FOLDERS:
                with contextlib.suppress(OSError):
                    remove_stale_temporaries(Path(cfg.out) / name)
        for fd in locks:
            os.close(fd)
    if console.failure is not None and not isinstance(console.failure, BrokenPipeError):
        error_line(f"cannot write to standard output: {console.failure.strerror or console.failure}; "
                   f"the outputs under --out are written")
        return 1
    return code


def exit_process(code: int) -> None:
    """Exit with code. A heal abandoned to its thread (timed out, or cut short by Ctrl-C) may still be
    inside torch, and an interpreter that shuts down under it aborts (exit 134): then leave at once."""
    if code >= 128:  # stopped by a signal: more of them must not cut the way out short
        for sig in STOPPING_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    if heal_thread_exists():
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
