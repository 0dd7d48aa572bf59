"""gnnq export and gnnq bench: a trained A²Q GCN becomes a packed integer model that predicts
what the fake-quantized model predicts; damaged files are refused with a clear message; the
benchmark writes its report, JSON and plot, and logs to MLflow."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_gnnq
from gnnq.errors import GnnqError

TRAIN = ["train", "dataset=synthetic", "+quant=a2q", "quant.bit_budget=2.5", "runs=1",
         "trainer.epochs=30", "trainer.progress=none"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One A²Q GCN on the synthetic graph, tracked in a throwaway MLflow store."""
    root = tmp_path_factory.mktemp("export")
    store = f"sqlite:///{root}/mlflow.db"
    proc = run_gnnq(*TRAIN, f"tracking.uri={store}", f"hydra.run.dir={root}/out", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = proc.stdout.split("MLflow run id ")[1].split()[0].rstrip(",")
    checkpoint = root / "out" / "checkpoints" / "run0.pt"
    assert checkpoint.is_file()
    return {"root": root, "store": store, "run_id": run_id, "checkpoint": checkpoint}


@pytest.fixture(scope="module")
def exported(trained):
    from gnnq.export import export

    return export(str(trained["checkpoint"]), out=trained["root"] / "model.safetensors",
                  backend="cpu")


def fake_quant_logits(checkpoint: Path):
    from omegaconf import OmegaConf

    from gnnq.config import TrainConfig
    from gnnq.data import load_task
    from gnnq.models import build_model
    from gnnq.quant import build_quantizers

    ck = torch.load(checkpoint, weights_only=True)
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), ck["config"]))
    task = load_task(config.data, config.dataset)
    model = build_model(config.model, task, build_quantizers(config.quant))
    model.load_state_dict(ck["state_dict"])
    model.eval()
    with torch.no_grad():
        return model(task.graph.x, task.graph.edge_index), task.graph.x


def test_packed_model_predicts_like_the_fake_quantized_one(trained, exported):
    from gnnq.kernels import format as fmt
    from gnnq.kernels.backend import get_backend

    fake, x = fake_quant_logits(trained["checkpoint"])
    model = fmt.load(exported.path)
    layer = model.layers[1]
    assert layer.input is not None and layer.input.axis == "row"  # per-node A²Q bits
    assert layer.feature is not None and layer.feature.axis == "column"
    assert model.layers[0].weight.uniform_bits == 4
    for name in ("reference", "cpu"):
        logits = model.forward(x, get_backend(name))
        agreement = float((logits.argmax(1) == fake.argmax(1)).float().mean())
        assert agreement >= 0.995, (name, agreement)
        assert float((logits - fake).abs().max()) < 1e-3, name
    report = exported.report
    assert report["grid_mismatches"] and not any(report["grid_mismatches"].values())
    assert report["cpu"]["agreement"] >= 0.995 and report["reference"]["agreement"] >= 0.995
    header = model.header
    assert header["source"]["method"] == "a2q" and "verification" in header


def test_mixed_bitwidths_are_grouped_in_the_file(exported):
    from gnnq.kernels import format as fmt

    model = fmt.load(exported.path)
    grid = model.layers[1].input
    bits = torch.unique(grid.bits)
    assert bits.numel() >= 1 and int(bits.min()) >= 1 and int(bits.max()) <= 8


def _rewrite(src: Path, dst: Path, edit_metadata=None, edit_tensors=None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_metadata:
        edit_metadata(metadata)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


@pytest.mark.parametrize("damage, fragments", [
    ("flip", ["digest", "damaged"]),
    ("truncate", ["not a readable safetensors file"]),
    ("version", ["format version '99'", "reads version 1"]),
    ("format", ["format 'something-else'", "gnnq-packed"]),
    ("header", ["JSON header is damaged"]),
    ("missing", ["tensor 'layers.1.bias' is missing"]),
    ("dtype", ["'graph.col' has dtype int64", "int32"]),
    ("garbage", ["not a readable safetensors file"]),
])
def test_damaged_files_are_refused(exported, tmp_path, damage, fragments):
    from gnnq.kernels import format as fmt

    src, bad = exported.path, tmp_path / "bad.safetensors"
    data = src.read_bytes()
    if damage == "flip":
        header_len = struct.unpack("<Q", data[:8])[0]
        pos = 8 + header_len + 10
        bad.write_bytes(data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:])
    elif damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x00not a model" * 10)
    elif damage == "version":
        _rewrite(src, bad, edit_metadata=lambda m: m.update({"gnnq.version": "99"}))
    elif damage == "format":
        _rewrite(src, bad, edit_metadata=lambda m: m.update({"gnnq.format": "something-else"}))
    elif damage == "header":
        _rewrite(src, bad, edit_metadata=lambda m: m.update({"gnnq.header": "{oops"}))
    elif damage == "missing":
        def drop(t):
            t.pop("layers.1.bias")
        _rewrite(src, bad, edit_tensors=drop,
                 edit_metadata=lambda m: m.pop("gnnq.sha256"))
        with pytest.raises(GnnqError) as err:
            fmt.load(bad, verify_digest=False)
        for fragment in [str(bad), *fragments]:
            assert fragment in str(err.value)
        return
    elif damage == "dtype":
        def widen(t):
            t["graph.col"] = t["graph.col"].to(torch.int64)
        _rewrite(src, bad, edit_tensors=widen)
        with pytest.raises(GnnqError) as err:
            fmt.load(bad, verify_digest=False)
        for fragment in [str(bad), *fragments]:
            assert fragment in str(err.value)
        return
    with pytest.raises(GnnqError) as err:
        fmt.load(bad)
    message = str(err.value)
    assert str(bad) in message and "Expected" in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_cli_export_from_mlflow_run_id_and_inspect(trained, tmp_path):
    out = tmp_path / "from_run.safetensors"
    proc = run_gnnq("export", trained["run_id"], "--tracking-uri", trained["store"],
                    "--out", str(out), cwd=trained["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file()
    assert "same prediction as the fake-quantized model" in proc.stdout
    assert "max |logit difference|" in proc.stdout
    # --backend auto: the CUDA kernels where present, else the CPU ones after one notice.
    assert "CUDA kernels unavailable" in proc.stderr or "cuda:" in proc.stdout
    assert "Downloading artifacts" not in proc.stderr
    # A packed file given to gnnq export is checked and described, not re-exported.
    code, stdout, _ = in_process("export", str(out))
    assert code == 0 and "gnnq-packed version 1" in stdout and "a2q" in stdout, stdout
    assert "input 1" in stdout or "input 2" in stdout or "-bit per row" in stdout
    # A damaged one is a clean error naming the file.
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(out.read_bytes()[:100])
    code, _, stderr = in_process("export", str(bad))
    assert code == 2 and stderr.startswith("gnnq: error: ") and str(bad) in stderr
    assert "Expected" in stderr and "Traceback" not in stderr


def in_process(*args: str) -> tuple[int, str, str]:
    """``gnnq ARGS`` in this process (for the quick error paths): exit code, stdout, stderr."""
    import contextlib
    import io

    from gnnq.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_cli_export_bad_sources(tmp_path):
    code, _, stderr = in_process("export", str(tmp_path / "nothing-here"))
    assert code == 2 and "is not a checkpoint file" in stderr, stderr
    junk = tmp_path / "run0.pt"
    junk.write_bytes(b"junk")
    code, _, stderr = in_process("export", str(junk))
    assert code == 2 and str(junk) in stderr and "not a readable gnnq checkpoint" in stderr
    junk.write_bytes(b"garbage\n")  # an unpickling error, whose PyTorch text advises ...
    code, _, stderr = in_process("export", str(junk))
    assert code == 2 and "UnpicklingError" in stderr
    assert "weights_only" not in stderr  # ... weights_only=False: not the user's to change


def test_cli_bench_smoke_writes_report_and_logs_to_mlflow(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_gnnq("bench", "bench=smoke", "features=[24]", "repeats=2", "warmup=0",
                    "synthetic.synthetic_small.nodes=3000", f"out={tmp_path}/results",
                    "tracking.backend=mlflow", f"tracking.uri={store}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "results" / "bench_cpu.md").read_text()
    head = md.splitlines()[:8]
    assert "Regenerate with:" in head
    assert any(line.startswith("gnnq bench bench=smoke features=[24]") for line in head), head
    for label in ("FP32 torch.sparse CSR", "PyG propagate", "FP32 gnnq kernel", "INT4 packed",
                  "INT2 packed", "mixed", "2-layer GCN"):
        assert label in md, label
    results = json.loads((tmp_path / "results" / "bench_cpu.json").read_text())
    agg = results["graphs"][0]["runs"][0]
    assert agg["what"] == "aggregation" and agg["F"] == 24
    for row in agg["methods"]:
        assert len(row["times_ms"]) == 2
        if row["kind"] == "packed":
            assert row["max_rel_err"] < 1e-4
    assert (tmp_path / "results" / "bench_cpu.png").stat().st_size > 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("gnnq-bench").experiment_id])
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert any(k.endswith("int4.speedup_vs_torch_csr") for k in metrics)
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "bench")}
    assert {"bench/bench_cpu.md", "bench/bench_cpu.json", "bench/bench_cpu.png"} <= artifacts
    # A run measured elsewhere (a GPU machine without MLflow) is reported and logged from its
    # JSON; the regenerate command stays the original one.
    code, _, stderr = in_process("bench", "--from-json",
                                 str(tmp_path / "results" / "bench_cpu.json"),
                                 f"out={tmp_path}/again", "tracking.backend=none")
    assert code == 0, stderr
    assert (tmp_path / "again" / "bench_cpu.md").read_text() == md


def test_bench_keeps_finished_graphs_when_a_later_one_fails(tmp_path):
    """Cora is not under the empty data root: the synthetic graph's timings survive."""
    code, _, stderr = in_process("bench", "bench=smoke", "graphs=[synthetic_small,cora]",
                                 "features=[8]", "repeats=1", "warmup=0", "end_to_end=false",
                                 "synthetic.synthetic_small.nodes=500", f"out={tmp_path}",
                                 f"data_root={tmp_path}/empty", "tracking.backend=none")
    assert code == 2 and "Dataset 'cora' is not available" in stderr, stderr
    assert f"timings are saved in {tmp_path / 'bench_cpu.json'}" in stderr, stderr
    saved = json.loads((tmp_path / "bench_cpu.json").read_text())
    assert [g["graph"] for g in saved["graphs"]] == ["synthetic_small"]
    code, _, stderr = in_process("bench", "--from-json", str(tmp_path / "bench_cpu.json"),
                                 f"out={tmp_path}", "tracking.backend=none")
    assert code == 0 and "synthetic_small" in (tmp_path / "bench_cpu.md").read_text(), stderr


@pytest.mark.parametrize("content, fragment", [("{truncated", "not a readable JSON file"),
                                               ('{"graphs": []}', "lacks config, machine")])
def test_bench_from_json_refuses_what_bench_did_not_write(tmp_path, content, fragment):
    (tmp_path / "bench_cpu.json").write_text(content)
    code, _, stderr = in_process("bench", "--from-json", str(tmp_path / "bench_cpu.json"))
    assert code == 2 and fragment in stderr and "Traceback" not in stderr, stderr


def test_profile_script_profiles_every_gcn_method(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_packed_gcn.py"),
                           "synthetic_small", "16", "--device", "cpu", "--calls", "1",
                           "--precisions", "fp32,int2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("gcn_fp32", "gcn_int2"):
        assert f"=== {name} (synthetic_small, F=16)" in proc.stdout
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_packed_gcn.py"),
                           "nograph", "16", "--device", "cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("gnnq: error: Unknown bench graph "
                                                           "'nograph'"), proc.stderr


@pytest.mark.parametrize("args, fragments", [
    (["bench=nope"], ["bench preset", "cpu", "smoke"]),
    (["bench=smoke", "precisions=[int3]"], ["precision", "int3", "int4"]),
    (["bench=smoke", "repeats=0"], ["repeats", ">= 1"]),
    (["bench=smoke", "nosuchkey=1"], ["Invalid bench configuration", "nosuchkey"]),
    (["bench=smoke", "graphs=[nograph]", "tracking.backend=none"],
     ["bench graph", "nograph", "synthetic_small"]),
])
def test_cli_bench_bad_options(tmp_path, args, fragments):
    code, _, stderr = in_process("bench", *args, f"out={tmp_path}")
    assert code == 2 and stderr.startswith("gnnq: error: "), stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


@pytest.mark.parametrize("method, quant", [
    ("degree_quant", {"name": "degree_quant", "bits": 8}),
    ("smoothness", {"name": "smoothness", "bits": 4}),
])
def test_other_methods_grids_reproduce_their_quantizers(method, quant):
    """The Degree-Quant and smoothness-aware adapters give grids that reproduce every weight
    and activation of the model bit for bit, the per-edge message quantizers included, and the
    packed model predicts what the fake-quantized one does."""
    pytest.importorskip(f"gnnq.quant.{method}")
    from gnnq.config import DataRootConfig, DatasetConfig, ModelConfig
    from gnnq.data import load_task
    from gnnq.export import Capture, pack_model
    from gnnq.kernels.backend import get_backend
    from gnnq.models import build_model
    from gnnq.quant import build_quantizers

    task = load_task(DataRootConfig(), DatasetConfig(name="synthetic"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="gcn"), task, build_quantizers(quant))
    g = task.graph
    model.train()
    with torch.no_grad():
        model(g.x, g.edge_index)  # ranges / observers from one training pass
    model.eval()
    capture = Capture()
    handles = [m.register_forward_hook(capture.hook) for name, m in model.named_modules()
               if name.split(".")[-2:-1] == ["q"]]
    with torch.no_grad():
        fake = model(g.x, g.edge_index)
    for h in handles:
        h.remove()
    packed, mismatches = pack_model(model, g.edge_index, g.num_nodes, capture)
    assert any("message" in where for where in mismatches), mismatches
    assert mismatches and not any(mismatches.values()), mismatches
    for name in ("reference", "cpu"):
        logits = packed.forward(g.x, get_backend(name))
        # Per-edge requantization is reproduced; float summation order can move a value
        # that sits on a rounding boundary of a later grid by one step, rarely.
        assert float((logits.argmax(1) == fake.argmax(1)).float().mean()) >= 0.995, name
        assert float((logits - fake).abs().gt(1e-4).float().mean()) < 0.01, name
    approx, _ = pack_model(model, g.edge_index, g.num_nodes, capture, drop_roles=("message",))
    assert all(layer.message is None for layer in approx.layers)
    logits = approx.forward(g.x, get_backend("reference"))
    assert float((logits.argmax(1) == fake.argmax(1)).float().mean()) > 0.8


@pytest.mark.parametrize("preset", ["cpu", "gpu", "smoke"])
def test_bench_config_without_hydra_matches_hydra(preset, monkeypatch):
    """The GPU machines have no Hydra, OmegaConf or PyYAML: the fallback reader of the bench
    presets must give the same configuration."""
    import yaml

    from gnnq import bench
    from gnnq.cli import config_dir

    overrides = ["features=[32]", "synthetic.synthetic_small.nodes=500", "tracking.backend=none"]
    hydra_cfg = bench.compose_config([f"bench={preset}", *overrides])
    plain = bench._plain_config(preset, overrides, config_dir() / "bench")
    monkeypatch.setattr(yaml, "safe_load", bench._tiny_yaml)
    tiny = bench._plain_config(preset, overrides, config_dir() / "bench")
    hydra_cfg.command = plain.command = tiny.command = ""
    assert plain == hydra_cfg and tiny == hydra_cfg


def test_bench_refuses_an_output_folder_it_cannot_make_before_measuring(tmp_path):
    from gnnq import bench

    (tmp_path / "taken").write_text("")
    with pytest.raises(GnnqError, match=r"taken/results cannot be made.*Set out="):
        bench.compose_config(["bench=smoke", f"out={tmp_path}/taken/results"])


def test_bench_takes_tracking_none_as_gnnq_train_does():
    from gnnq import bench

    assert bench.compose_config(["bench=smoke", "tracking=none"]).tracking.backend == "none"
    with pytest.raises(GnnqError, match="Unknown bench tracking backend 'nope'.*mlflow, none"):
        bench.compose_config(["bench=smoke", "tracking=nope"])


def test_the_official_emp_baseline_is_refused_with_the_choices():
    from gnnq.config import DataRootConfig, DatasetConfig, ModelConfig
    from gnnq.data import load_task
    from gnnq.export import pack_model
    from gnnq.models import build_model
    from gnnq.quant import build_quantizers

    task = load_task(DataRootConfig(), DatasetConfig(name="synthetic"))
    model = build_model(ModelConfig(name="smp", steps=2, propagation="emp"), task,
                        build_quantizers({"name": "smoothness", "bits": 4}))
    with pytest.raises(GnnqError, match="propagation=emp.*smp and appnp"):
        pack_model(model, task.graph.edge_index, task.graph.num_nodes)


@pytest.mark.parametrize("propagation, sparse", [("smp", False), ("appnp", False),
                                                 ("smp", True)])
def test_smp_model_packs_and_predicts_like_the_fake_quantized_one(propagation, sparse, tmp_path,
                                                                 monkeypatch):
    """The smoothness-aware paper's own model: QLR INT4 on the MLP and on every propagation
    step's products, exported, saved, loaded and run; also with mostly-zero features, which
    the model takes as sparse CSR (Coauthor CS/Physics) and the packed model dense."""
    from gnnq.config import DataRootConfig, DatasetConfig, ModelConfig
    from gnnq.data import load_task
    from gnnq.export import Capture, pack_model
    from gnnq.kernels import format as fmt
    from gnnq.kernels.backend import get_backend
    from gnnq.models import build_model
    from gnnq.quant import build_quantizers
    from gnnq.quant.base import Quantizer

    task = load_task(DataRootConfig(), DatasetConfig(name="synthetic"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="smp", steps=3, propagation=propagation), task,
                        build_quantizers({"name": "smoothness", "bits": 4}))
    model.prop.multiplier_init = 0.5  # a correction large enough to matter in every logit
    model.prop.multiplier_bound = 0.3  # ... clipped from the first update on
    g = task.graph
    if sparse:
        from gnnq.quant import base

        monkeypatch.setattr(base, "SPARSE_MIN_ELEMENTS", 0)
        g.x = g.x * (torch.rand(g.x.shape, generator=torch.Generator().manual_seed(0)) < 0.01)
    model.train()
    with torch.no_grad():
        model(g.x, g.edge_index)  # observed ranges from one training pass
    model.eval()
    capture = Capture()
    handles = [m.register_forward_hook(capture.hook) for m in model.modules()
               if isinstance(m, Quantizer)]
    with torch.no_grad():
        fake = model(g.x, g.edge_index)
    for h in handles:
        h.remove()
    first_input = next(x for x, _ in capture.seen.values() if x.shape == g.x.shape)
    assert (first_input.layout != torch.strided) == sparse
    packed, mismatches = pack_model(model, g.edge_index, g.num_nodes, capture)
    assert any(k.startswith("prop.base.2.") for k in mismatches), sorted(mismatches)
    assert not any(mismatches.values()), mismatches
    assert (packed.architecture, packed.propagation.propagation) == ("smp", propagation)
    assert len(packed.propagation.gap) == (3 if propagation == "smp" else 0)
    fmt.save(packed, tmp_path / "smp.safetensors")
    loaded = fmt.load(tmp_path / "smp.safetensors")
    assert loaded.propagation.multiplier_bound == 0.3
    for name in ("reference", "cpu"):
        logits = loaded.forward(g.x, get_backend(name))
        assert torch.equal(logits, packed.forward(g.x, get_backend(name))), name
        assert float((logits.argmax(1) == fake.argmax(1)).float().mean()) >= 0.995, name
        assert float((logits - fake).abs().gt(1e-4).float().mean()) < 0.01, name
