"""Structured configs: the schema every composed ``conf/train.yaml`` is checked against.

Hydra composes YAML from ``conf/``; :func:`validate` then merges the result into these
dataclasses, so a wrong type fails in OmegaConf and a wrong range or choice fails in the
``__post_init__`` checks below, each with a message that names the key, the bad value and
what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from gnnq.errors import GnnqError, choice_error

DATASETS = (
    "cora", "citeseer", "pubmed",
    "coauthor_cs", "coauthor_physics", "amazon_computers", "amazon_photo",
    "ogbn_arxiv",
    "mutag", "proteins", "reddit_binary",
    "zinc",
    "synthetic", "synthetic_graphs",
)
MODELS = ("gcn", "gin", "gat", "smp")
SCHEDULERS = ("none", "step", "cosine", "plateau")
STRATEGIES = ("task_gradient", "local_gradient")
TRACKING_BACKENDS = ("mlflow", "none")


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise choice_error(f"value for {key}:", value, choices)


MAX_SEED = 2**32 - 1  # NumPy's limit (torch takes any 64-bit seed)


def check_range(key: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and value > high)
    if bad:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        rule = " and ".join(s for s in (lo, hi) if s)
        raise GnnqError(f"Invalid value for {key}: {value!r}. It must be {rule}.")


def parse_method_config(schema: type, quant: Any, method: str,
                        nested: Optional[dict[str, type]] = None) -> Any:
    """``quant`` (the composed ``quant`` group of ``+quant=<method>``) merged into the
    dataclass ``schema`` and instantiated, so its ``__post_init__`` checks run. ``nested``
    maps ``quant.<field>`` to the dataclass of a sub-section, so an unknown key there lists
    that section's valid options. Errors name the key, the bad value and what is valid."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), quant)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        key = f"quant.{err.full_key}"
        parent = key.rsplit(".", 1)[0]
        section = {"quant": schema, **(nested or {})}.get(parent)
        valid = ", ".join(sorted(f.name for f in dataclasses.fields(section))) if section else "?"
        raise GnnqError(f"Unknown config option {key!r} for quant={method}. Valid options under "
                        f"{parent}: {valid}.") from None
    except OmegaConfBaseException as err:
        raise GnnqError(f"Invalid config value for 'quant.{err.full_key}': "
                        f"{str(err).splitlines()[0]}.") from None


@dataclass
class DataRootConfig:
    """Where datasets live. ``root`` holds ``planetoid/``, ``coauthor/``, ``amazon/``, ``tu/``,
    ``ogb/`` and ``zinc/`` folders laid out as PyG/OGB expect."""

    root: str = "data"
    # "auto": download missing files only when the host answers within a few seconds.
    download: str = "auto"

    def __post_init__(self) -> None:
        check_choice("data.download", self.download, ("auto", "never"))


@dataclass
class DatasetConfig:
    name: str = "cora"
    # Planetoid: "public" (the fixed Yang et al. split) or "random" (20/class, 500 val, 1000 test).
    split: str = "public"
    # Random per-class splits (Coauthor, Amazon, Planetoid random): sizes per class / in total.
    train_per_class: int = 20
    val_per_class: int = 30
    num_val: int = 500
    num_test: int = 1000
    # Seed of the random split; null means the run's seed (a new split for every run).
    split_seed: Optional[int] = None
    # Cross-validation (TU datasets): number of folds and the fixed seed of the fold assignment.
    folds: int = 10
    fold_seed: int = 12345
    # Row-normalise node features (PyG's NormalizeFeatures); off by default like both papers.
    normalize_features: bool = False

    def __post_init__(self) -> None:
        check_choice("dataset.name", self.name, DATASETS)
        check_choice("dataset.split", self.split, ("public", "random"))
        for key in ("train_per_class", "val_per_class", "num_val", "num_test"):
            check_range(f"dataset.{key}", getattr(self, key), 1)
        check_range("dataset.folds", self.folds, 2)
        check_range("dataset.fold_seed", self.fold_seed, 0, MAX_SEED)
        if self.split_seed is not None:
            check_range("dataset.split_seed", self.split_seed, 0, MAX_SEED)


@dataclass
class ModelConfig:
    name: str = "gcn"
    hidden: int = 16
    layers: int = 2
    dropout: float = 0.5
    # GAT: attention heads of the hidden layers, of the output layer, attention dropout.
    heads: int = 8
    out_heads: int = 1
    attn_dropout: float = 0.6
    # Node-level GCN and GAT: drop each layer's input after its input quantizer, not before
    # (dropout's 1/(1-p) scaling then does not reach the grid the quantizer learns); false:
    # dropout first, as the official A2Q code does (gnnq/models/node.py).
    quantize_before_dropout: bool = False
    # GIN: learn the epsilon of (1 + eps) * x_i; MLP depth inside each GIN layer.
    train_eps: bool = False
    mlp_layers: int = 2
    # Graph-level models: readout over nodes and BatchNorm after each layer.
    pooling: str = "sum"
    batch_norm: bool = True
    # SMP (model=smp, node level): propagation steps K, teleport alpha (also the step size
    # eta_H), "smp", plain "appnp" propagation (multiplier held at 0) or "emp" (the official
    # code's APPNP baseline with its edge weights 1/deg_j, spec section 3.5), the correction
    # direction ("laplacian": the exact gradient L~Delta; "adjacency": the official code's
    # A~Delta), the change-energy budget per nonzero of A~ (c = threshold * nnz), and the
    # step sizes of the multiplier and the slack, and an optional bound |lambda| <= b
    # (None: unbounded, as in the paper; 1/(4 alpha) keeps deep propagation stable)
    # (gnnq/models/smp_prop.py).
    steps: int = 10
    alpha: float = 0.1
    propagation: str = "smp"
    correction: str = "laplacian"
    threshold: float = 0.1
    multiplier_lr: float = 1.0e-5
    slack_lr: float = 1.0e-5
    multiplier_bound: Optional[float] = None

    def __post_init__(self) -> None:
        check_choice("model.name", self.name, MODELS)
        check_range("model.steps", self.steps, 0)
        check_range("model.alpha", self.alpha, 0.0, 1.0, low_open=True)
        check_choice("model.propagation", self.propagation, ("smp", "appnp", "emp"))
        check_choice("model.correction", self.correction, ("laplacian", "adjacency"))
        for key in ("threshold", "multiplier_lr", "slack_lr"):
            check_range(f"model.{key}", getattr(self, key), 0.0)
        if self.multiplier_bound is not None:
            check_range("model.multiplier_bound", self.multiplier_bound, 0.0)
        check_range("model.hidden", self.hidden, 1)
        check_range("model.layers", self.layers, 1)
        check_range("model.dropout", self.dropout, 0.0, 1.0)
        check_range("model.attn_dropout", self.attn_dropout, 0.0, 1.0)
        check_range("model.heads", self.heads, 1)
        check_range("model.out_heads", self.out_heads, 1)
        check_range("model.mlp_layers", self.mlp_layers, 1)
        check_choice("model.pooling", self.pooling, ("sum", "mean", "max"))


@dataclass
class SchedulerConfig:
    name: str = "none"
    step_size: int = 50
    gamma: float = 0.5
    patience: int = 10

    def __post_init__(self) -> None:
        check_choice("trainer.scheduler.name", self.name, SCHEDULERS)
        check_range("trainer.scheduler.step_size", self.step_size, 1)
        check_range("trainer.scheduler.gamma", self.gamma, 0.0, 1.0, low_open=True)
        check_range("trainer.scheduler.patience", self.patience, 0)


#: ``trainer.val_ties``: keep the first of equal validation scores, or the better training score.
VAL_TIES = ("first", "train")


@dataclass
class TrainerConfig:
    epochs: int = 200
    lr: float = 0.01
    weight_decay: float = 5e-4
    batch_size: int = 128
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Stop a run when validation has not improved for this many epochs (null: never).
    early_stopping: Optional[int] = None
    # Select the epoch (both rules) among those whose avg_bits on the validation split is at
    # most this: a checkpoint over the bit budget is not a result. null: every epoch.
    select_max_bits: Optional[float] = None
    # Equal validation scores: "first" keeps the earlier epoch; "train" takes the later one
    # if its training score is better (the smoothness paper's code; graph-level tasks then
    # also score the training graphs every epoch).
    val_ties: str = "first"
    # "auto": a progress bar on a terminal, quiet log lines otherwise.
    progress: str = "auto"
    device: str = "cpu"
    # Keep each finished run's selected weights (checkpoints/run<r>.pt).
    checkpoint: bool = True
    # Save an unfinished run's whole training state at most this often (minutes), so that
    # resume=true continues it after a kill (checkpoints/run<r>.snapshot.pt). null: never.
    snapshot_minutes: Optional[float] = 5.0

    def __post_init__(self) -> None:
        check_range("trainer.epochs", self.epochs, 1)
        check_range("trainer.lr", self.lr, 0.0, low_open=True)
        check_range("trainer.weight_decay", self.weight_decay, 0.0)
        check_range("trainer.batch_size", self.batch_size, 1)
        if self.early_stopping is not None:
            check_range("trainer.early_stopping", self.early_stopping, 1)
        if self.select_max_bits is not None:
            check_range("trainer.select_max_bits", self.select_max_bits, 1)
        check_choice("trainer.val_ties", self.val_ties, VAL_TIES)
        if self.snapshot_minutes is not None:
            check_range("trainer.snapshot_minutes", self.snapshot_minutes, 0.0)
        check_choice("trainer.progress", self.progress, ("auto", "bar", "log", "none"))
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise choice_error("value for trainer.device:", self.device, ("cpu", "cuda", "cuda:N", "auto"))


@dataclass
class StrategyConfig:
    """How gradients are formed: the plain task gradient, or a method's own rule."""

    name: str = "task_gradient"

    def __post_init__(self) -> None:
        check_choice("strategy.name", self.name, STRATEGIES)


@dataclass
class TrackingConfig:
    backend: str = "mlflow"
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "gnnq"
    run_name: Optional[str] = None
    # Seconds to wait for a remote tracking server before giving up with a clear message.
    connect_timeout: float = 10.0
    log_checkpoint: bool = True

    def __post_init__(self) -> None:
        check_choice("tracking.backend", self.backend, TRACKING_BACKENDS)
        check_range("tracking.connect_timeout", self.connect_timeout, 0.0, low_open=True)


@dataclass
class TrainConfig:
    task_name: str = "train"
    seed: int = 0
    # Repeats with seeds seed, seed+1, ...; on cross-validated datasets repeat r uses fold r.
    runs: int = 1
    # Index of the first repeat: `first_run=5 runs=5` runs repeats 5..9 (seeds seed+5.., folds
    # 5..9), so one set of repeats can be split over jobs or machines and pooled afterwards.
    first_run: int = 0
    # Continue the job in the output folder (hydra.run.dir): runs with a checkpoint are taken
    # as they are, an interrupted run continues from its snapshot (trainer.snapshot_minutes)
    # exactly as if never stopped, the others train. Settings that change a run must match.
    resume: bool = False
    # What `gnnq train` returns to a Hydra sweeper (validation, never test: no tuning on test).
    optimized_metric: str = "val_acc"
    tags: dict[str, str] = field(default_factory=dict)
    data: DataRootConfig = field(default_factory=DataRootConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Absent (null) means full precision; a quantization method's own schema checks it.
    quant: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        check_range("runs", self.runs, 1)
        check_range("first_run", self.first_run, 0)
        # Repeat r seeds NumPy (32-bit seeds) with seed + r.
        check_range("seed", self.seed, 0, MAX_SEED - (self.first_run + self.runs - 1))
        allowed = ("val_acc", "test_acc", "val_mae", "test_mae", "val_metric")
        check_choice("optimized_metric", self.optimized_metric, allowed)
        if self.trainer.select_max_bits is not None and self.quant is None:
            raise GnnqError(f"trainer.select_max_bits={self.trainer.select_max_bits:g} selects "
                            f"epochs by their average bits, but without +quant the model is "
                            f"FP32 (32 bits): add a method, e.g. +quant=a2q, or drop the limit.")


def validate(cfg: DictConfig) -> TrainConfig:
    """Check a composed config against the schema; return the typed, validated object.

    Keys that Hydra adds (``hydra``) and keys a quantization method owns (``quant``) are
    checked elsewhere; everything else must match :class:`TrainConfig` exactly.
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), plain)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise GnnqError(_describe_omegaconf_error(err)) from None


def _describe_omegaconf_error(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    message = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        return unknown_option_message(key)
    return f"Invalid config value for {key!r}: {message}."


def _schema_at(path: list[str]) -> Optional[type]:
    """The dataclass that holds the options under ``path`` (``None`` if it is not one)."""
    node: Any = TrainConfig
    for part in path:
        fields_ = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields_:
            return None
        node = fields_[part].type
        node = globals().get(node, node) if isinstance(node, str) else node
    return node if dataclasses.is_dataclass(node) else None


def unknown_option_message(key: str) -> str:
    parts = key.split(".")
    schema = _schema_at(parts[:-1])
    where = ".".join(parts[:-1]) or "the top level"
    valid = ", ".join(sorted(f.name for f in dataclasses.fields(schema))) if schema else "?"
    return (f"Unknown config option {key!r}. Valid options under {where}: {valid}. "
            f"'gnnq train --cfg job' prints every option with its current value.")


def check_override_keys(overrides: list[str], conf_dir: Path) -> None:
    """Reject ``a.b=value`` overrides of options the schema does not have, listing the valid ones,
    and options of a config group's other choices (``model.steps`` is SMP's, not GCN's).

    Hydra would refuse them too, but without naming the choices. Group selections
    (``model=gat``) must name one of the group's files (:func:`check_group_choices`);
    additions (``+x=``), deletions (``~x``) and Hydra's own keys are left to Hydra, the values
    of ``quant.*`` to the method's own checks.
    """
    groups = sorted(p.name for p in conf_dir.iterdir() if p.is_dir())
    check_group_choices(overrides, conf_dir)
    top_level = {f.name for f in dataclasses.fields(TrainConfig)} | set(groups)
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" not in override or key.startswith(("+", "~", "hydra")):
            continue
        if "." not in key:
            if key not in top_level:
                raise GnnqError(f"Unknown config option or group {key!r}. Valid top-level "
                                f"options and groups: {', '.join(sorted(top_level))}.")
            continue
        parts = key.split(".")
        schema = _schema_at(parts[:-1])
        if schema is not None and parts[-1] not in {f.name for f in dataclasses.fields(schema)}:
            raise GnnqError(unknown_option_message(key))
        if parts[0] in groups:
            _check_group_option(parts[0], parts[1], overrides, conf_dir)


#: How the messages name a config group's choices.
GROUP_NOUNS = {"quant": "quantizer", "strategy": "training strategy",
               "tracking": "tracking backend", "experiment": "experiment preset"}


def group_choices(conf_dir: Path, group: str) -> list[str]:
    """The choices of a config group: its YAML files' names, sorted."""
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def check_group_choices(overrides: list[str], conf_dir: Path) -> None:
    """``group=choice`` (also ``+group=``, and each item of a sweep list ``a,b``) must name a
    file of the group. Hydra refuses the others too, but wraps the list of choices in its
    search path and a hint about stack traces."""
    for override in overrides:
        key, sep, value = override.partition("=")
        group = key.lstrip("+")
        if not sep or not group or not (conf_dir / group).is_dir() or "(" in value or "$" in value:
            continue  # deletions, options, Hydra's own groups, sweep functions, interpolations
        for choice in (c.strip().strip("'\"") for c in value.split(",")):
            if choice and choice != "null" and not (conf_dir / group / f"{choice}.yaml").is_file():
                raise choice_error(GROUP_NOUNS.get(group, group), choice,
                                   group_choices(conf_dir, group))


def _yaml_keys(path: Path, section: Optional[str] = None) -> set[str]:
    node = OmegaConf.load(path)
    if section is not None:
        node = node.get(section) or {}
    return set(node.keys()) - {"defaults"}


def _experiment_choices(path: Path) -> dict[str, str]:
    """What ``conf/experiment/<name>.yaml`` selects: ``{"model": "gin", ...}``."""
    choices = {}
    for entry in OmegaConf.load(path).get("defaults") or []:
        if isinstance(entry, (DictConfig, dict)):
            for target, option in entry.items():
                choices[str(target).removeprefix("override ").strip("/")] = str(option)
    return choices


def _check_group_option(group: str, option: str, overrides: list[str], conf_dir: Path) -> None:
    """``group.option=value`` must be an option of the group's selected choice (of every
    choice it may be, when an experiment and the command line name different ones)."""
    selections: dict[str, list[str]] = {}
    for override in overrides:
        key, _, value = override.partition("=")
        selections.setdefault(key.lstrip("+"), []).append(value)
    candidates, allowed = set(selections.get(group, [])[-1:]), set()
    for name in selections.get("experiment", []):
        path = conf_dir / "experiment" / f"{name}.yaml"
        if not path.is_file():
            return
        candidates |= {c for g, c in _experiment_choices(path).items() if g == group}
        allowed |= _yaml_keys(path, group)
    defaults = _experiment_choices(conf_dir / "train.yaml")
    plus = "" if group in defaults else "+"  # an optional group is added, not overridden
    if not candidates and group in defaults:
        candidates = {defaults[group]}
    if not candidates and not allowed:
        choices = "|".join(group_choices(conf_dir, group))
        raise GnnqError(f"Config option '{group}.{option}' belongs to a "
                        f"{GROUP_NOUNS.get(group, group)}, and none is selected. Select one "
                        f"first: gnnq train {plus}{group}=<{choices}> {group}.{option}=<value>.")
    paths = [conf_dir / group / f"{choice}.yaml" for choice in sorted(candidates)]
    if not paths or not all(p.is_file() for p in paths):  # sweep lists, typos: Hydra's turn
        return
    keys = [_yaml_keys(p) for p in paths]
    if any(option in k for k in keys) or option in allowed:
        return
    owners = [c for c in group_choices(conf_dir, group)
              if option in _yaml_keys(conf_dir / group / f"{c}.yaml")]
    owned = (f"it is an option of {', '.join(f'{group}={o}' for o in owners)}"
             if owners else f"no {GROUP_NOUNS.get(group, group)} has it")
    selected = " or ".join(f"{group}={p.stem}" for p in paths)
    raise GnnqError(f"Config option '{group}.{option}' does not apply to {selected}: {owned}. "
                    f"Options of {selected}: {', '.join(sorted(set.union(*keys)))}."
                    + (f" Select {'it' if len(owners) == 1 else 'one of those'} first, e.g. "
                       f"gnnq train {plus}{group}={owners[0]} {group}.{option}=<value>."
                       if owners else ""))
