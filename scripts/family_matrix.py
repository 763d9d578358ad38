"""The family x recipe matrix: tiny random-weight models of the deployed families (tests/families.py)
through quantize -> export -> audit -> ONNX Runtime, in this process, printed as one table.

    python scripts/family_matrix.py                    # every family x its recipes
    python scripts/family_matrix.py --family gemma --recipe balanced --json out.json

Columns: quantize / export exit codes (`traceback` for a crash), the held-out cosine of the fake-quant
model against FP32, audit violations, and the worst per-block (else end-to-end) ONNX Runtime cosine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.families import FAMILIES, recipes_for, run_case  # noqa: E402


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.6f}" if isinstance(x, float) else str(x)


def _compiled(row: dict) -> str:
    """'sm89 built 1.2 MiB; sm120 not checked' from the row's compile check."""
    parts = []
    for sm, r in (row.get("compile") or {}).items():
        state = ("not checked" if r["not_checked"] else f"built {r['engine_bytes'] / 2**20:.1f} MiB" if r["built"]
                 else "parsed, build FAILED" if r["parsed"] else "parse FAILED")
        parts.append(f"{sm} {state}")
    return "; ".join(parts) or "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", action="append", choices=sorted(FAMILIES), help="only these families (repeatable)")
    p.add_argument("--recipe", action="append", help="only these recipes (repeatable)")
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    rows = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quantkit-matrix-") as tmp:
        for family in args.family or list(FAMILIES):
            for recipe in recipes_for(family):
                if args.recipe and recipe not in args.recipe:
                    continue
                t0 = time.perf_counter()
                row = run_case(family, recipe, Path(tmp) / f"{family}-{recipe}")
                row["seconds"] = round(time.perf_counter() - t0, 1)
                row.pop("plan", None)
                row.pop("audit_counts", None)
                rows.append(row)
                if args.json:  # written as the rows come: a long run leaves what it has done
                    Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
                print(f"  {family} {recipe}: quantize {row['quantize']} export {row.get('export', '-')} "
                      f"({row['seconds']} s)", file=sys.stderr, flush=True)
    header = ("family", "recipe", "quantize", "export", "cosine", "audit violations", "ORT worst", "basis",
              "TensorRT-RTX compile", "s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        per_block = r.get("ort_per_block") or {}
        e2e = r.get("ort_end_to_end") or {}
        worst = min(per_block.values()) if per_block else (min(e2e.values()) if e2e else None)
        basis = "per block" if per_block else ("end to end" if e2e else "-")
        violations = r.get("violations")
        lines.append("| " + " | ".join([
            r["family"], r["recipe"], _fmt(r["quantize"]), _fmt(r.get("export")), _fmt(r.get("cosine")),
            "-" if violations is None else str(len(violations)), _fmt(worst), basis, _compiled(r), _fmt(r["seconds"])]) + " |")
    print("\n".join(lines))
    failures = [r for r in rows if r["quantize"] != 0 or r.get("export") != 0 or r.get("violations")]
    for r in failures:
        msg = r.get("export_message") if r["quantize"] == 0 else r.get("quantize_message")
        print(f"{r['family']} x {r['recipe']}: {msg or (r.get('violations') or [''])[0]}")
    print("\nroles (layers per role) and protections, per family:")
    for family in dict.fromkeys(r["family"] for r in rows):
        r = next((r for r in rows if r["family"] == family and "roles" in r), None)
        if r is not None:
            print(f"  {family}: {r['roles']}; protected: {', '.join(r['protections']) or 'none'}")
    print(f"{len(rows)} cases, {len(rows) - len(failures)} through quantize/export/audit, "
          f"{time.perf_counter() - t_all:.0f} s")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
