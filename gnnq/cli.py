"""The ``gnnq`` command: subcommands over Hydra's compose.

``gnnq train [hydra args]`` hands everything after the word ``train`` to a Hydra app whose
config is ``conf/train.yaml``, so ``-m``, ``--cfg job``, ``--help`` and ``hydra.run.dir=``
all behave as in any Hydra program. User mistakes print one paragraph and exit non-zero.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

from gnnq.errors import GnnqError, choice_error

CONF_DIR_ENV = "GNNQ_CONFIG_DIR"
EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a command ended by SIGPIPE

log = logging.getLogger("gnnq")


def config_dir() -> Path:
    """``conf/`` as an absolute path (Hydra turns a relative one into a module path)."""
    path = Path(os.environ.get(CONF_DIR_ENV) or Path(__file__).resolve().parent.parent / "conf")
    if not (path / "train.yaml").is_file():
        raise GnnqError(f"gnnq's config folder was not found at {path} (it needs train.yaml). "
                        f"Install gnnq from its source tree (pip install -e .) or set "
                        f"{CONF_DIR_ENV} to the folder holding train.yaml.")
    return path


def _quiet_third_party_noise() -> None:
    for pattern in ("torch.jit.script is deprecated", ".*Sparse CSR tensor support is in beta",
                    ".*noload.*"):
        warnings.filterwarnings("ignore", message=pattern)
    sys.modules.setdefault("outdated", None)  # ogb's import-time version check has no timeout
    # MLflow 3 phones home at import; offline clusters would wait on it.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")


def _train(args: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from gnnq.config import check_override_keys, validate
    from gnnq.tracking import sweep

    modes = [a for a in args if a in ("-m", "--multirun", "-c", "--cfg", "-i", "--info",
                                      "--shell-completion", "-sc")]
    if len(modes) > 1:
        raise GnnqError(f"gnnq train takes one of -m/--multirun, --cfg, --info at a time; got "
                        f"{' and '.join(modes)}. To see a sweep job's config, run it without -m: "
                        f"gnnq train --cfg job <overrides>.")
    check_override_keys([a for a in args if not a.startswith("-")], config_dir())
    if not modes or modes[0] in ("-m", "--multirun"):  # --cfg / --info make no folder
        _check_output_folder(args, multirun=bool(modes))

    @hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
    def train_job(cfg: DictConfig) -> float:
        from gnnq.train.experiment import run_experiment

        hydra_cfg = HydraConfig.get()
        output_dir = Path(hydra_cfg.runtime.output_dir)
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        try:
            config = validate(cfg)
            summary = run_experiment(
                config, output_dir,
                parent_run_id=sweep.parent_run_id_for(output_dir) if multirun else None,
                job_overrides=hydra_cfg.job.override_dirname if multirun else "")
        except GnnqError as err:
            print(f"gnnq: error: {err}", file=sys.stderr)
            if not multirun:
                raise SystemExit(EXIT_USER_ERROR) from None
            # Keep the sweep going: this job is marked failed, the others still run.
            (output_dir / sweep.FAILED_MARKER).write_text(str(err))
            return float("nan")
        metrics = summary["metrics"]
        _print_result(metrics, output_dir, summary["mlflow_run_id"])
        return metrics.get(config.optimized_metric, float("nan"))

    sys.argv = ["gnnq train", *args]
    train_job()
    if sweep.failed_jobs:
        print(f"gnnq: {len(sweep.failed_jobs)} job(s) of the sweep failed; their messages are "
              f"above and in the FAILED file of each: {', '.join(sweep.failed_jobs)}",
              file=sys.stderr)
        return 1
    return 0


def _resume(args: list[str]) -> int:
    """``gnnq resume FOLDER [overrides]``: the job's own ``gnnq train`` command again, into its
    folder, with ``resume=true``; later overrides (e.g. ``tracking=none``) are added."""
    if args and args[0] in ("-h", "--help"):
        print(RESUME_USAGE)
        return 0
    if not args or args[0].startswith("-") or "=" in args[0]:
        raise GnnqError(f"gnnq resume takes the output folder of a gnnq train job first (the "
                        f"folder its last line names: 'outputs in ...'), then any overrides; "
                        f"got {' '.join(args) or 'nothing'}. See gnnq resume --help.")
    folder, extra = Path(args[0]).expanduser().absolute(), args[1:]
    overrides = folder / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        raise GnnqError(f"{folder} is not the output folder of a gnnq train job: it has no "
                        f".hydra/overrides.yaml. Give the folder gnnq train printed ('outputs in "
                        f"...'); to resume a whole sweep, run its gnnq train -m command again "
                        f"with resume=true hydra.sweep.dir=<the sweep's folder>.")
    from omegaconf import OmegaConf

    try:
        saved = OmegaConf.to_container(OmegaConf.load(overrides))
    except Exception:  # noqa: BLE001 - YAML and OmegaConf errors of several types
        saved = None
    if not isinstance(saved, list) or not all(isinstance(o, str) for o in saved):
        raise GnnqError(f"{overrides} is damaged: it should be the YAML list of the job's "
                        f"overrides that Hydra writes. Resume with gnnq train <the job's "
                        f"overrides> hydra.run.dir={folder} resume=true.")
    replaced = ("hydra.run.dir", "resume")
    kept = [o for o in saved if o.lstrip("+~").split("=", 1)[0] not in replaced]
    return _train([*kept, *extra, f"hydra.run.dir={folder}", "resume=true"])


RESUME_USAGE = """usage: gnnq resume FOLDER [overrides]

Continue a gnnq train job that was stopped (killed, preempted, out of time) in its output
FOLDER, with the overrides it was started with: runs that finished are kept, an interrupted
run continues from its last snapshot (every trainer.snapshot_minutes, default 5) exactly as if
it had never stopped, and the runs not started yet train. Overrides after FOLDER are added,
e.g. tracking=none; any that change what a run computes are refused."""


def check_folder_can_be_made(folder: str, setting: str) -> None:
    """Fail before the work, not after it, when the output ``folder`` (its part before any
    ``${...}``) cannot be made; ``setting`` is the option that moves it (``out=``)."""
    static = Path(folder.split("${", 1)[0] or ".").expanduser().absolute()
    existing = next(p for p in (static, *static.parents) if p.exists())
    try:  # a real attempt: permission bits say nothing for root or on read-only mounts
        os.rmdir(tempfile.mkdtemp(prefix=".gnnq-probe-", dir=existing))
    except OSError as err:
        raise GnnqError(f"The output folder {folder} cannot be made: nothing can be created "
                        f"in {existing} ({err.strerror}). Set {setting}<a writable folder>, "
                        f"or run gnnq from one.") from None


def _check_output_folder(args: list[str], multirun: bool) -> None:
    """Hydra makes the job's folder before gnnq's code runs, and reports a failure there as a
    traceback."""
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = [a.split("=", 1)[1] for a in args if a.lstrip("+").startswith(key)]
    check_folder_can_be_made(given[-1] if given else "outputs", key)  # conf/train.yaml


def _print_result(metrics: dict[str, float], output_dir: Path, run_id: str | None) -> None:
    parts = []
    for key in ("test_acc", "test_mae", "val_acc", "val_mae", "best_test_acc", "best_test_mae"):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.2f} ± {metrics[key + '_std']:.2f}")
    parts.append(f"avg_bits {metrics.get('avg_bits', float('nan')):.2f}")
    parts.append(f"compression_ratio {metrics.get('compression_ratio', float('nan')):.2f}x")
    if run_id:
        parts.append(f"MLflow run id {run_id}")
    print("gnnq: " + ", ".join(parts) + f" (outputs in {output_dir})")


def _report(args: list[str]) -> int:
    from gnnq.report import main as report_main

    return report_main(args)


def _log(args: list[str]) -> int:
    from gnnq.tracking.log_job import main as log_main

    return log_main(args)


def _export(args: list[str]) -> int:
    from gnnq.export import main as export_main

    return export_main(args)


def _bench(args: list[str]) -> int:
    from gnnq.bench import main as bench_main

    return bench_main(args)


SUBCOMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "train": ("train and evaluate a configuration; Hydra overrides follow "
              "(gnnq train --help lists the config groups)", _train),
    "resume": ("continue a stopped gnnq train job in its output folder, from its last "
               "snapshot (gnnq resume --help)", _resume),
    "report": ("Markdown table + PNG plot of finished runs from an MLflow store, grouped by "
               "dataset/model/method/bits (gnnq report --help)", _report),
    "log": ("send finished jobs' output folders to an MLflow store (after a tracking outage, "
            "tracking=none, or to gather jobs into one store; gnnq log --help)", _log),
    "export": ("pack a trained quantized model (checkpoint, output folder or MLflow run id) "
               "into a .safetensors integer model and verify it (gnnq export --help)", _export),
    "bench": ("packed INT8/INT4/INT2/mixed aggregation and GCN inference vs FP32; Hydra "
              "overrides of conf/bench/<preset>.yaml follow (gnnq bench --help)", _bench),
}

USAGE = """usage: gnnq <command> [arguments]

Config-driven experiments for quantized graph neural networks.

commands:
{commands}

examples:
  gnnq train dataset=cora model=gcn
  gnnq train -m dataset=cora,citeseer model=gcn,gat runs=10
  gnnq train +experiment=fp32_gat_cora
  gnnq train --cfg job dataset=citeseer
  gnnq resume outputs/train/runs/<time>_cora_gcn
  gnnq report --experiment gnnq --out results/my_comparison
  gnnq log outputs/train/runs/<time>_cora_gcn --uri http://mlflow.example:5000
  gnnq export outputs/a2q_gcn_cora/runs/<time>_cora_gcn/checkpoints/run0.pt
  gnnq bench bench=cpu graphs=[coauthor_physics@128] precisions=[fp32,int4,int2]
"""


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [f"  {name:<{width}}  {help_}" for name, (help_, _) in SUBCOMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if not args or args[0] in ("-h", "--help", "help"):
            print(usage())
            code = 0 if args else EXIT_USER_ERROR
        elif args[0] not in SUBCOMMANDS:
            raise choice_error("command", args[0], SUBCOMMANDS)
        else:
            _quiet_third_party_noise()
            code = SUBCOMMANDS[args[0]][1](args[1:])
        sys.stdout.flush()  # a reader that stopped early shows here, not at interpreter exit
        return code
    except BrokenPipeError:  # `gnnq ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # quiets the last flush
        return EXIT_BROKEN_PIPE
    except GnnqError as err:
        print(f"gnnq: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:  # a path given on the command line: missing, unwritable, disk full
        where = f": {err.filename}" if err.filename else ""
        print(f"gnnq: error: {err.strerror or err}{where}. Check the path, its permissions and "
              f"the free space.", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("gnnq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
