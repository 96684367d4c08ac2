"""Distributed fine-tuning on CPU: two gloo processes (the WORLD_SIZE/RANK environment torchrun sets) give the
same loss and the same gradients as one process on the same global batch (grad_accum 2 vs 1 per process).

Gradients are read where the optimizer sees them, through torch's global optimizer step hook, in worker
processes that run crystal_cli.finetune.finetune unchanged on the tiny base."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crystal_cli.encode import EncodeOptions, encode
from tests.conftest import REPO, simple_structures, write_cdvae_csv

STEPS = 2
WORKER = """
import sys
from pathlib import Path

from safetensors.torch import save_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from crystal_cli.runtime import configure_process

configure_process()
from crystal_cli.finetune import finetune, resolve_config

records, run, world, rank, recipe = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
seen = {}


def keep_gradients(optimizer, args, kwargs):  # called before every optimizer step, after clipping
    params = [p for group in optimizer.param_groups for p in group["params"]]
    step = len(seen) // len(params)
    for i, p in enumerate(params):
        seen[f"step{step}.{i}"] = p.grad.detach().clone()


register_optimizer_step_pre_hook(keep_gradients)
config = resolve_config(run, recipe, {
    "data.records": str(records), "train.max_steps": {steps}, "train.batch_size": 2, "train.grad_accum": 2 // world,
    "train.log_every": 1, "train.eval_every": 1000, "train.checkpoint_every": 1000, "train.max_grad_norm": 0.0,
    "data.val_records": 0, "data.translate": 0.0, "data.max_length": 256, "train.threads": 1})
finetune(config, run)
save_file(seen, str(run.parent / f"grads-{world}-{rank}.safetensors"))
""".replace("{steps}", str(STEPS))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: Path, records: Path, run: Path, world: int) -> list[subprocess.Popen]:
    port = str(_free_port())
    processes = []
    for rank in range(world):
        env = {**os.environ, "WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        if world == 1:
            for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key)
        processes.append(subprocess.Popen(
            [sys.executable, str(script), str(records), str(run), str(world), str(rank),
             str(REPO / "training" / "tiny-test.toml")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return processes


def _wait(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, output[-3000:]


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    records = tmp_path / "records"
    csv = write_cdvae_csv(tmp_path / "train.csv", simple_structures())
    encode([(csv, "train")], records, EncodeOptions(tasks=("unconditional", "formula")))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    single, ddp = tmp_path / "single" / "run", tmp_path / "ddp" / "run"
    for run in (single, ddp):
        run.parent.mkdir()
    _wait(_launch(script, records, single, 1))  # one after the other: the test host has two cores
    _wait(_launch(script, records, ddp, 2))

    losses = {name: [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                     if "loss" in row] for name, run in (("single", single), ("ddp", ddp))}
    assert len(losses["single"]) == STEPS and losses["ddp"] == pytest.approx(losses["single"], rel=1e-5)
    assert json.loads((ddp / "summary.json").read_text())["counts"]["world_size"] == 2

    one = load_file(tmp_path / "single" / "grads-1-0.safetensors")
    rank0, rank1 = (load_file(tmp_path / "ddp" / f"grads-2-{rank}.safetensors") for rank in (0, 1))
    assert set(one) == set(rank0) == set(rank1) and len(one) > STEPS
    for name, gradient in one.items():
        assert torch.equal(rank0[name], rank1[name]), name  # DDP hands every process the same average
        assert torch.allclose(rank0[name], gradient, rtol=1e-4, atol=1e-7), name
    assert any(float(g.abs().max()) > 0 for g in one.values())
