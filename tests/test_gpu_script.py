"""training/gpu/: the prepared GPU job's recipe, its step planning and what it brings back. The job itself
runs end to end on a CPU with CRYSTAL_GPU_SMOKE=1 (training/gpu/README.md); that needs the carry built by
prepare.sh (wheels from PyPI), so it is documented there rather than run here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "training" / "gpu"
sys.path.insert(0, str(GPU))

import job  # noqa: E402


def test_recipe_resolves_with_the_jobs_overrides(tmp_path):
    from crystal_cli.finetune.config import resolve_config
    from crystal_cli.recipes import parse_overrides

    config = resolve_config(tmp_path / "run", job.RECIPE)
    assert config.train.method == "full" and config.base.startswith("scratch-")
    assert config.train.weight_decay == 0  # the returned delta relies on untouched embedding rows
    assert config.train.device == "auto" and config.train.precision == "auto"
    smoke = resolve_config(tmp_path / "run", job.RECIPE, parse_overrides(job.SMOKE_SET + ["train.max_steps=3"]))
    assert smoke.base == "tiny" and smoke.train.max_steps == 3


def test_the_recipes_model_fits_what_the_device_brings_back():
    """The shipped delta (float16 weights outside the embedding, plus a few hundred embedding rows and the
    tokenizer) must fit the tool's 64 MiB / 8 files next to job.log, job.json and metrics.jsonl."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from crystal_cli.bases import SCRATCH, TINY_SHAPE, scratch_shape
    from crystal_cli.finetune.config import resolve_config

    base = resolve_config(REPO / "no-such-run", job.RECIPE).base
    hidden, layers = map(int, SCRATCH.fullmatch(base).groups())
    shape = TINY_SHAPE | scratch_shape(hidden, layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, **shape))
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    delta = 2 * body + 2 * 2000 * hidden + 1.5 * 2**20  # + 2,000 embedding rows + gzipped tokenizer, generously
    assert delta <= job.RETURN_BYTES - 2 * 2**20
    assert -(-delta // job.PART_BYTES) <= job.RETURN_FILES - 3


def test_step_rate_uses_the_second_half_of_the_warmup():
    rows = [{"step": s, "elapsed_s": (5.0 if s > 10 else 0.0) + 0.1 * s, "loss": 1.0} for s in range(10, 210, 10)]
    assert job.step_rate(rows) == pytest.approx(10.0)  # the slow first rows (CUDA start-up) are left out
    with pytest.raises(job.JobError):
        job.step_rate(rows[:1])


def test_plan_steps_fits_the_time_left():
    assert job.plan_steps(200, 10.0, 300) == 200 + int(10 * 300 * 0.92)
    assert job.plan_steps(200, 10.0, 300, cap=250) == 250
    assert job.plan_steps(200, 10.0, -5) == 201  # at least one more step


def test_split_parts_join_back(tmp_path):
    data = bytes(range(256)) * 1000
    source = tmp_path / "run.tar.gz"
    source.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    parts = job.split_file(source, out, part_bytes=100_000)
    assert [p.name for p in parts] == ["run.tar.gz.00", "run.tar.gz.01", "run.tar.gz.02"]
    assert all(p.stat().st_size <= 100_000 for p in parts)
    assert b"".join(p.read_bytes() for p in parts) == data


def test_base_fingerprint_tells_weights_apart(tmp_path):
    import torch
    from safetensors.torch import save_file

    for name, value in (("a", 1.0), ("b", 1.0), ("c", 2.0)):
        (tmp_path / name).mkdir()
        save_file({"w": torch.full((3, 2), value)}, tmp_path / name / "model.safetensors")
    a, b, c = (job.base_fingerprint(tmp_path / n) for n in "abc")
    assert a == b != c


def test_shell_scripts_parse():
    for script in ("run.sh", "prepare.sh"):
        subprocess.run(["bash", "-n", str(GPU / script)], check=True)
