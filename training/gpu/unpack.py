"""Unpack what training/gpu/run.sh brought back from the device into a run directory here, and optionally
ship it as models/NAME.

    python training/gpu/unpack.py FILES_AT -o runs/gpu-scratch-512x8           # check + unpack
    python training/gpu/unpack.py FILES_AT -o runs/gpu-scratch-512x8 --ship default

FILES_AT is the folder the device tool put the returned files in (run.tar.gz.00, .01, ..., job.json,
metrics.jsonl, job.log). The parts are checked against job.json's sha256, joined and unpacked; the run is
already in training/ship.py's form (config.json with the base as its spec, model/ with the float16 delta
from the seeded base, summary.json, metrics.jsonl), so `crystal generate -m RUN` loads it as it is, and
--ship copies it into models/NAME (adapter/ and model/ replaced, the card README.md kept). Do not run
training/ship.py on it: that script takes a run with whole weights and would take the delta for them.

The base is rebuilt here from its seed and its fingerprint compared with the device's: a mismatch (other
torch/transformers versions initialising differently) is reported loudly. The trained tensors come whole in
the delta either way; what would differ are the embedding rows no training batch touched, which the delta
takes from the local base.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from job import ARCHIVE, ROOT, base_fingerprint, sha256  # noqa: E402


def unpack(files_at: Path, output: Path, force: bool = False) -> dict:
    report = json.loads((files_at / "job.json").read_text())
    if report.get("status") not in ("ok", "incomplete") and not (force and "archive" in report):
        salvaged = " (its weights were salvaged: --force unpacks them)" if "archive" in report else ""
        raise SystemExit(f"{files_at}/job.json: status {report.get('status')!r}, failed in stage "
                         f"{report.get('failed_stage')!r}: {report.get('error')}{salvaged}")
    archive = report["archive"]
    if output.exists():
        raise SystemExit(f"{output} exists: choose another -o")
    with tempfile.TemporaryDirectory(dir=output.parent if output.parent.exists() else None) as tmp:
        joined = Path(tmp) / ARCHIVE
        with joined.open("wb") as sink:
            for name in archive["parts"]:
                sink.write((files_at / name).read_bytes())
        if sha256(joined) != archive["sha256"]:
            raise SystemExit(f"{files_at}: the joined parts do not match job.json's sha256 (a part is missing or cut)")
        with tarfile.open(joined) as tar:
            tar.extractall(tmp, filter="data")
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(tmp) / archive["name"]), output)
    shutil.copy2(files_at / "job.json", output / "gpu-job.json")
    return report


def check_base(report: dict) -> bool:
    from crystal_cli.bases import resolve_base

    spec, theirs = report["base"]["spec"], report["base"]["fingerprint"]
    ours = base_fingerprint(resolve_base(spec))
    if ours != theirs:
        print(f"WARNING: base {spec!r} built here differs from the device's (fingerprint {ours[:16]} vs "
              f"{theirs[:16]}): the embedding rows no training batch touched come from this machine's seeded base. "
              "Trained weights are unaffected; the model is not bit-identical to the one trained.", file=sys.stderr)
        return False
    print(f"base {spec!r}: same seeded weights as on the device ({ours[:16]})")
    return True


def ship(run: Path, name: str) -> Path:
    """models/NAME := the unpacked run (already in shipped form); the model card is kept."""
    target = ROOT / "models" / name
    for stale in ("adapter", "model"):
        shutil.rmtree(target / stale, ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    for path in run.iterdir():
        if path.name == "gpu-job.json":
            continue
        if path.is_dir():
            shutil.copytree(path, target / path.name)
        else:
            shutil.copy2(path, target / path.name)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files_at", type=Path, help="folder holding the returned files")
    parser.add_argument("-o", "--output", type=Path, required=True, help="run directory to create")
    parser.add_argument("--ship", metavar="NAME", help="also copy the run into models/NAME")
    parser.add_argument("--force", action="store_true", help="unpack weights a failed job salvaged (unchecked)")
    args = parser.parse_args()
    from crystal_cli.runtime import configure_process

    configure_process()
    report = unpack(args.files_at, args.output, args.force)
    summary = report.get("summary") or {}
    print(f"{args.output}: {summary.get('steps')} steps, val loss {summary.get('first_val_loss')} -> "
          f"{summary.get('val_loss')}, {report.get('environment', {}).get('gpu')}, status {report['status']}")
    check_base(report)
    if args.ship:
        target = ship(args.output, args.ship)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        print(f"{target}: {size / 1e6:.1f} MB (write the card from {args.output}/metrics.jsonl and bench/table1.py)")


if __name__ == "__main__":
    main()
