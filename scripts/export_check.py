"""Regenerate results/export.md: do exported (packed integer) models predict what their
fake-quantized originals predict?

    python scripts/export_check.py            # every model below that has been trained

Each row exports every run's checkpoint of one trained job with `gnnq export` (in process:
gnnq.export.export) and runs the packed model on the integer reference and on the CPU
kernels. The jobs come from the other result scripts (scripts/a2q.py, scripts/comparison.py,
scripts/smoothness.py);
rows whose job has not run yet are listed as such.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import OUTPUTS, ROOT

from gnnq.errors import GnnqError
from gnnq.export import export

RESULTS = ROOT / "results"
# (label, job folder, quantizer roles left out, what that means)
_CORA = OUTPUTS / "comparison" / "gcn_cora"
_SMP = OUTPUTS / "smoothness"
MODELS = [
    ("A²Q GCN-Cora (mixed per-node bits)", OUTPUTS / "a2q" / "a2q_gcn_cora", ()),
    ("A²Q GCN-CiteSeer (mixed per-node bits)", OUTPUTS / "a2q" / "a2q_gcn_citeseer", ()),
    ("QLR INT4 GCN-Cora (smoothness-aware)", _CORA / "qlr-int4", ()),
    ("QLR INT4 GCN-Cora, messages dropped", _CORA / "qlr-int4", ("message",)),
    ("QLR INT2-BT* GCN-Cora (smoothness-aware)", _CORA / "qlr-int2-btstar", ()),
    ("QLR INT8 SMP-Cora (the paper's model)", _SMP / "smooth_smp_cora_int8", ()),
    ("QLR INT4 SMP-Cora (the paper's model)", _SMP / "smooth_smp_cora_int4", ()),
    ("QLR INT2 SMP-Cora (the paper's model)", _SMP / "smooth_smp_cora_int2", ()),
    ("DQ-INT8 GCN-Cora (Degree-Quant)", _CORA / "dq-int8", ()),
    ("DQ-INT4 GCN-Cora (Degree-Quant)", _CORA / "dq-int4", ()),
    ("DQ-INT4 GCN-Cora, messages dropped", _CORA / "dq-int4", ("message",)),
]


def check(folder: Path, drop: tuple[str, ...]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in sorted((folder / "checkpoints").glob("run*.pt"),
                           key=lambda p: int(p.stem[3:])):
            result = export(str(ckpt), Path(tmp) / f"{ckpt.stem}.safetensors", backend="cpu",
                            drop_roles=drop)
            rows.append(result.report)
    return rows


def main() -> None:
    lines = ["# Exported integer models vs their fake-quantized originals", "",
             "Regenerate: `python scripts/export_check.py` (each checkpoint through "
             "`gnnq export <checkpoint>`).", "",
             "Agreement: share of all nodes (train, val and test) where the packed model's "
             "predicted class equals the fake-quantized model's; min over the job's runs. "
             "Max |Δ logit|: largest absolute logit difference over nodes and runs. "
             "Reference = the PyTorch integer reference; CPU = the C++ kernels. Models with "
             "per-edge message quantizers (QLR, Degree-Quant) requantize every edge's product "
             "and sum the codes as integers (exact, but edge by edge in PyTorch ops); the "
             "'messages dropped' rows leave those quantizers out (`gnnq export --drop-role "
             "message`) so the layer runs on the packed SpMM kernels, an approximation whose "
             "cost the agreement shows.", "",
             "| model | runs | roles left out | agreement (reference) | agreement (CPU) | "
             "max \\|Δ logit\\| (reference) | max \\|Δ logit\\| (CPU) | test acc: fake-quant → "
             "packed (mean) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, folder, drop in MODELS:
        if not (folder / "checkpoints").is_dir():
            lines.append(f"| {label} | not trained yet (`{folder.relative_to(ROOT)}`) "
                         f"| | | | | | |")
            continue
        try:
            reports = check(folder, drop)
        except GnnqError as err:
            lines.append(f"| {label} | export refused: {err} | | | | | | |")
            continue
        ref = [r["reference"] for r in reports]
        cpu = [r["cpu"] for r in reports]
        fake_acc = sum(r.get("fake_quant_test_acc", float("nan")) for r in reports) / len(reports)
        packed_acc = sum(e.get("test_acc", float("nan")) for e in cpu) / len(cpu)
        lines.append(
            f"| {label} | {len(reports)} | {', '.join(drop) or 'none'} | "
            f"{100 * min(e['agreement'] for e in ref):.2f} % | "
            f"{100 * min(e['agreement'] for e in cpu):.2f} % | "
            f"{max(e['max_abs_logit_diff'] for e in ref):.2e} | "
            f"{max(e['max_abs_logit_diff'] for e in cpu):.2e} | "
            f"{fake_acc:.2f} → {packed_acc:.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    (RESULTS / "export.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
