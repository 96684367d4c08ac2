"""`crystal finetune` on the tiny base with real records: learning, exact resume, clean adapter, recipes, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from crystal_cli import codec
from crystal_cli.cli import app
from crystal_cli.encode import EncodeOptions, encode
from crystal_cli.errors import CrystalError
from crystal_cli.finetune import finetune, load_recipe, resolve_config
from crystal_cli.finetune.data import (Example, OverlapDigits, collate, epoch_batches, make_examples, read_records,
                                       translated, with_overlaps)
from crystal_cli.finetune.model import LossVocab, completion_losses, completion_nll, crystal_vocab
from crystal_cli.recipes import parse_override
from crystal_cli.models import load_run, load_trained
from tests.conftest import REPO, shared, simple_structures, unavailable, write_cdvae_csv

runner = CliRunner()
STEPS = 16
# tiny-test recipe, shrunk to the test budget: short crystals, no accumulation, a checkpoint every 4 steps
OVERRIDES = {"train.max_steps": STEPS, "train.batch_size": 4, "train.grad_accum": 1, "train.eval_every": 8,
             "train.checkpoint_every": 4, "train.log_every": 4, "data.max_length": 160, "data.val_records": 12,
             "train.threads": 1, "train.snapshot_every": 8}


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """~60 real MP-20 materials (<= 6 sites) as unconditional + formula records with a seeded val split."""
    out = tmp_path_factory.mktemp("records")
    source = shared("mp_20", "train.csv.gz")
    if source is None:  # founders' data absent: the pymatgen-built cells, repeated under new ids
        source = write_cdvae_csv(out / "train.csv", {f"{k}{i}": s for i in range(12) for k, s in simple_structures().items()})
    encode([(source, "train")], out, EncodeOptions(tasks=("unconditional", "formula"), max_atoms=6,
                                                  max_rows=150, val_fraction=0.2, seed=1))
    return out


def config_for(records: Path, run: Path, resume: bool = False, **extra):
    return resolve_config(run, REPO / "training" / "tiny-test.toml",
                          OVERRIDES | {"data.records": str(records)} | extra, resume=resume)


@pytest.fixture(scope="module")
def full_run(records, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "full"
    return run, finetune(config_for(records, run), run)


DROPOUT = {"lora.dropout": 0.1}  # the tiny recipe has none; on a CPU this makes every adapter's a CpuDropout


@pytest.fixture(scope="module")
def dropout_run(records, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "dropout"
    return run, finetune(config_for(records, run, **DROPOUT), run)


def trainable_weights(run: Path, step: int) -> dict:
    return load_file(run / "checkpoints" / f"step-{step}" / "trainable.safetensors")


def test_tiny_finetune_lowers_val_loss(full_run):
    run, result = full_run
    assert result.steps == STEPS and not result.interrupted
    assert result.val_loss < result.first_val_loss - 0.1, (result.first_val_loss, result.val_loss)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [4, 8, 12, 16]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train_rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 8, 16]
    config = json.loads((run / "config.json").read_text())
    assert config["base_spec"] == "tiny" and Path(config["base"]).is_absolute()
    assert config["train"]["max_steps"] == STEPS and config["train"]["batch_size"] == 4  # overrides won
    assert config["lora"]["r"] == 8 and config["data"]["translate"] == 0.5  # recipe values kept
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-12", "step-16"]  # keep_checkpoints=2
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["step-16", "step-8"]  # snapshot_every=8, kept


def test_a_snapshot_is_the_run_at_its_step(full_run, records):
    """RUN/snapshots/step-8 reads as a run directory and gives the val loss the trainer logged at step 8."""
    run, result = full_run
    logged = {r["step"]: r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "val_loss" in r}
    val = None
    for step in (8, 16):
        model, tokenizer = load_trained(run / "snapshots" / f"step-{step}")
        if val is None:
            fitting, _ = make_examples(tokenizer, read_records(records / "val.jsonl"), 160)
            val = collate([fitting[i] for i in sorted(np.random.default_rng([0, 7]).permutation(len(fitting))[:12])],
                          tokenizer.pad_token_id)
        with torch.no_grad():
            nll, _ = completion_nll(model, val)
        assert float(nll.mean()) == pytest.approx(logged[step], abs=1e-4), step
    assert logged[8] != pytest.approx(logged[16], abs=1e-3)  # two different models, each its own step's


def test_adapter_loads_with_peft_and_has_no_embeddings(full_run, records):
    run, result = full_run
    info = load_run(run)
    tensors = load_file(info.adapter_dir / "adapter_model.safetensors")
    assert tensors and all("lora_" in name for name in tensors)
    assert not any("embed_tokens" in name or "lm_head" in name for name in tensors)
    adapter_config = json.loads((info.adapter_dir / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    model, tokenizer = load_trained(run)
    assert type(model).__name__ == "PeftModelForCausalLM"
    # the reloaded adapter reproduces the trainer's final val loss on the same val examples
    fitting, _ = make_examples(tokenizer, read_records(records / "val.jsonl"), 160)
    examples = [fitting[i] for i in sorted(np.random.default_rng([0, 7]).permutation(len(fitting))[:12])]
    with torch.no_grad():
        nll, _ = completion_nll(model, collate(examples, tokenizer.pad_token_id))
        merged, _ = load_trained(run, merge=True)  # what the transformers sampling backend runs
        merged_nll, _ = completion_nll(merged, collate(examples, tokenizer.pad_token_id))
    assert float(nll.mean()) == pytest.approx(result.val_loss, abs=1e-4)
    assert type(merged).__name__ == "LlamaForCausalLM" and float(merged_nll.mean()) == pytest.approx(result.val_loss, abs=1e-4)


def test_interrupted_run_resumes_exactly(full_run, records, tmp_path):
    reference, finished = full_run
    run = tmp_path / "interrupted"

    def interrupt_at_step_6(event):
        if event.step == 6 and event.loss is not None:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, caught by the trainer's handler

    stopped = finetune(config_for(records, run), run, on_event=interrupt_at_step_6)
    assert stopped.interrupted and stopped.steps == 6
    assert (run / "checkpoints" / "step-6" / "trainer_state.json").is_file()
    # the adapter of the last checkpoint is written with it: an interrupted run is usable as it stands
    saved = load_file(load_run(run).adapter_dir / "adapter_model.safetensors")
    at_stop = trainable_weights(run, 6)
    assert len(saved) == len(at_stop) and all(
        any(torch.equal(tensor, other) for other in at_stop.values()) for tensor in saved.values())
    resumed = finetune(config_for(records, run, resume=True), run, resume=True)
    assert resumed.steps == STEPS and not resumed.interrupted
    assert resumed.val_loss == pytest.approx(finished.val_loss, abs=1e-5)
    assert resumed.train_loss == pytest.approx(finished.train_loss, abs=1e-5)
    mine, theirs = trainable_weights(run, STEPS), trainable_weights(reference, STEPS)
    assert all(torch.allclose(mine[k], theirs[k], atol=1e-6) for k in theirs)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [4, 8, 12, 16]  # no duplicated lines after resume


def test_a_checkpoint_of_the_per_tensor_optimizer_resumes_with_it(full_run, records, tmp_path):
    """Runs checkpointed before finetune stepped AdamW with its fused kernel hold {"fused": None} in their
    optimizer state; resuming one keeps that optimizer (load_state_dict restores the group's kind) and ends
    where an uninterrupted run ends."""
    reference, finished = full_run
    run = tmp_path / "older"

    def interrupt_at_step_8(event):
        if event.step == 8 and event.loss is not None:
            os.kill(os.getpid(), signal.SIGINT)

    assert finetune(config_for(records, run), run, on_event=interrupt_at_step_8).steps == 8
    saved = run / "checkpoints" / "step-8" / "optimizer.pt"
    state = torch.load(saved, weights_only=True)
    assert [g["fused"] for g in state["optimizer"]["param_groups"]] == [True]  # what finetune writes now
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = None  # what it wrote before
    torch.save(state, saved)
    resumed = finetune(config_for(records, run, resume=True), run, resume=True)
    assert resumed.steps == STEPS and resumed.val_loss == pytest.approx(finished.val_loss, abs=1e-4)
    mine, theirs = trainable_weights(run, STEPS), trainable_weights(reference, STEPS)
    assert all(torch.allclose(mine[k], theirs[k], atol=1e-5) for k in theirs)
    resumed_state = torch.load(run / "checkpoints" / f"step-{STEPS}" / "optimizer.pt", weights_only=True)
    assert [g["fused"] for g in resumed_state["optimizer"]["param_groups"]] == [None]


def test_a_background_run_stopped_with_kill_checkpoints_and_resumes(records, tmp_path):
    """`crystal finetune ... &` from a script ignores Ctrl-C (SIGINT), and `kill PID` (SIGTERM, also what a
    batch scheduler sends before it preempts) used to end the process without a checkpoint. Now SIGTERM stops
    it as Ctrl-C does: after the current step, with a checkpoint and exit code 130, and --resume finishes it."""
    import subprocess
    import sys
    import time

    run = tmp_path / "killed"
    args = [sys.executable, "-m", "crystal_cli.cli", "finetune", "--recipe", str(REPO / "training" / "tiny-test.toml"),
            "--data", str(records), "-o", str(run), "--steps", "400", "--set", "data.max_length=160",
            "--set", "data.val_records=4", "--set", "train.threads=1", "--set", "train.log_every=1",
            "--set", "train.checkpoint_every=1000", "--set", "train.eval_every=1000", "--batch-size", "2"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and sum("loss" in line for line in metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, (out, err)
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir())
    assert "interrupted" in err and 2 <= checkpoints[-1] < 400, (checkpoints, err)
    resumed = finetune(resolve_config(run, overrides={"train.max_steps": checkpoints[-1] + 2}, resume=True), run, resume=True)
    assert resumed.steps == checkpoints[-1] + 2 and not resumed.interrupted


def test_resume_refuses_to_change_the_run(full_run, records):
    run, _ = full_run
    with pytest.raises(CrystalError, match="learning_rate"):
        config_for(records, run, resume=True, **{"train.learning_rate": 0.5})
    with pytest.raises(CrystalError, match="already holds a run"):
        config_for(records, run)
    assert config_for(records, run, resume=True, **{"train.max_steps": 20}).train.max_steps == 20
    assert config_for(records, run, resume=True, **{"train.snapshot_every": 4}).train.snapshot_every == 4


def test_batches_are_a_seeded_permutation():
    lengths = list(np.random.default_rng(0).integers(10, 300, size=203))
    batches = epoch_batches(lengths, 8, seed=3, epoch=1)
    assert sorted(i for b in batches for i in b) == list(range(203))
    assert batches == epoch_batches(lengths, 8, seed=3, epoch=1) != epoch_batches(lengths, 8, seed=3, epoch=2)
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    assert spread < 40  # length-bucketed: little padding inside a batch


def test_translation_keeps_the_crystal(full_run):
    from transformers import AutoTokenizer

    run, _ = full_run
    tokenizer = AutoTokenizer.from_pretrained(str(load_run(run).base_dir))
    structure = simple_structures()["LiFePO4-like"]
    text = codec.encode_structure(structure)
    example = Example([1, 2], text, [3], True)
    a = translated(example, tokenizer, np.random.default_rng(5))
    b = translated(example, tokenizer, np.random.default_rng(5))
    assert a == b and a.completion != text
    moved = codec.parse_crystal(a.completion).structure
    assert moved.composition == structure.composition and moved.lattice.abc == pytest.approx(structure.lattice.abc, abs=0.05)
    assert a.completion_ids[-1] == tokenizer.eos_token_id


def test_recipes_and_overrides(tmp_path):
    for recipe in ("tiny-test.toml", "smollm2-135m-mp20.toml", "smollm2-135m-mp20-cpu.toml"):
        load_recipe(REPO / "training" / recipe)  # the shipped finetune recipes validate
    default = load_recipe(REPO / "training" / "smollm2-135m-mp20.toml")
    assert default["base"] == "smollm2-135m" and default["data.records"] == "runs/data/mp20-open"
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nbatch_sise = 4\n')
    with pytest.raises(CrystalError, match="unknown key 'train.batch_sise'"):
        load_recipe(bad)
    bad.write_text('[train]\nbatch_size = "4"\n')
    with pytest.raises(CrystalError, match="train.batch_size: expected int"):
        load_recipe(bad)
    assert parse_override("train.learning_rate=1e-4") == ("train.learning_rate", 1e-4)
    assert parse_override("lora.target_modules=['q_proj']") == ("lora.target_modules", ["q_proj"])
    assert parse_override("base=tiny") == ("base", "tiny")
    config = resolve_config(tmp_path / "run", REPO / "training" / "tiny-test.toml", {"train.seed": 9, "lora.r": None})
    assert config.train.seed == 9 and config.lora.r == 8


def test_cli_steps_override_a_recipe_that_counts_epochs(tmp_path, records):
    """--steps N on a recipe with epochs = 2 trains N steps (it once silently trained 2 epochs instead)."""
    run = tmp_path / "run"
    result = runner.invoke(app, ["finetune", "--recipe", str(REPO / "training" / "smollm2-135m-mp20.toml"), "--base",
                                 "tiny", "--data", str(records), "-o", str(run), "--steps", "2", "--batch-size", "2",
                                 "--set", "data.val_records=2", "--set", "train.warmup_steps=1"])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["max_steps"] == 2 and config["train"]["epochs"] == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_cli_bad_input_is_one_line_exit_2(tmp_path, records, monkeypatch):
    cases = []
    cases.append((["--data", str(tmp_path / "missing"), "--base", "tiny"], "does not exist"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text("")
    cases.append((["--data", str(empty), "--base", "tiny"], "no records"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train.jsonl").write_text(json.dumps({"prompt": "p", "completion": "x"}) + "\n"
                                        + json.dumps({"prompt": "p", "task": "unconditional"}) + "\n")
    cases.append((["--data", str(broken), "--base", "tiny"], "train.jsonl:2: record has no completion"))
    cases.append((["--data", str(records), "--base", str(tmp_path)], "no config.json"))
    recipe = tmp_path / "r.toml"
    recipe.write_text("learning_rate = 1\n")
    cases.append((["--data", str(records), "--recipe", str(recipe)], "unknown key 'learning_rate'"))
    cases.append((["--data", str(records), "--base", "tiny", "--set", "train.precision=fp16"], "must be one of"))
    cases.append((["--data", str(records), "--base", "tiny", "--set", "train.overlap_unlikelihood=-1.0"],
                  "train.overlap_unlikelihood must be a finite weight >= 0"))
    cases.append((["--data", str(records), "--base", "tiny", "--set", "train.compile=yes"], "must be one of"))
    cases.append((["--data", str(records), "--base", "tiny", "--set", "train.compile=on"], "needs a C++ compiler"))
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)  # a machine without g++: "on" cannot compile
    for i, (args, message) in enumerate(cases):
        result = runner.invoke(app, ["finetune", "-o", str(tmp_path / f"run{i}"), *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) <= 2  # one message (the console may wrap it once)
        assert not (tmp_path / f"run{i}" / "metrics.jsonl").exists()


def test_whole_model_run_on_a_cut_base_with_crystal_vocab_and_a_time_budget(records, tmp_path):
    """train.method = full on tiny:2 (the tiny base cut to 2 of its 4 layers), the loss over the crystal
    vocabulary, stopped by max_minutes: RUN/model is a whole 2-layer model that llama.cpp decodes exactly as
    transformers does, and the restricted loss is the full-vocabulary loss renormalised over its tokens."""
    from crystal_cli.export import export
    from crystal_cli.finetune.model import LossVocab, crystal_vocab

    run = tmp_path / "whole"
    config = config_for(records, run, **{"base": "tiny:2", "train.method": "full", "train.loss_vocab": "crystal",
                                         "train.max_steps": 1000, "train.max_minutes": 0.002,
                                         "train.eval_every": 1000})
    result = finetune(config, run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "max_minutes"  # with max_steps = 1000 unreached: the budget stopped it
    assert 1 <= result.steps < 1000
    assert not result.interrupted
    assert summary["wall_s"] >= 0.002 * 60  # it stopped because the budget was spent, not before
    assert summary["counts"]["loss_vocab_size"] < 1000  # a few hundred of 49,152 rows
    info = load_run(run)
    assert info.adapter_dir is None and json.loads((info.base_dir / "config.json").read_text())["num_hidden_layers"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == result.steps and rows[-1]["examples"] == 4 * result.steps and "val_loss" in rows[-1]

    model, tokenizer = load_trained(run)
    examples, _ = make_examples(tokenizer, read_records(records / "val.jsonl")[:4], 160)
    batch = collate(examples, tokenizer.pad_token_id)
    vocab = LossVocab.of(crystal_vocab(tokenizer, examples), len(tokenizer), "cpu")
    with torch.no_grad():
        full, _ = completion_nll(model, batch)
        restricted, _ = completion_nll(model, batch, vocab)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    picked = logits[targets != -100]
    expected = -(picked.gather(1, targets[targets != -100][:, None])[:, 0] - picked[:, vocab.ids].logsumexp(1))
    assert torch.allclose(restricted, expected, atol=1e-4) and bool((restricted <= full + 1e-5).all())

    gguf = export(run, tmp_path / "whole.gguf", "f32").path
    from llama_cpp import Llama

    ids = tokenizer(codec.unconditional_prompt() + "3.5 3.5 3.5\n90 90 90\nNa\n")["input_ids"]
    llama = Llama(str(gguf), logits_all=True, verbose=False, n_threads=1)
    llama.eval(ids)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    assert np.allclose(llama.scores[: len(ids)], expected, atol=2e-3)  # the whole 2-layer model, every position
    llama.close()


def test_shipped_whole_model_is_its_delta_from_the_base(records, tmp_path):
    """training/ship.py stores a whole-model run as what differs from its base (the embedding as changed
    rows); models.load_run rebuilds it on the re-resolved base, with the run's logits to float16 precision."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ship", REPO / "training" / "ship.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    run = tmp_path / "whole"
    finetune(config_for(records, run, **{"base": "tiny", "train.method": "full", "train.loss_vocab": "crystal",
                                         "train.max_steps": 2}), run)
    shipped = tmp_path / "models" / "whole"
    ship.ship_whole(run, shipped)
    from safetensors.torch import load_file

    from crystal_cli.models import DELTA

    delta = load_file(shipped / "model" / DELTA)
    embedding_rows = delta["model.embed_tokens.weight.rows"]
    assert 0 < embedding_rows.shape[0] < 2000 and "model.layers.0.mlp.up_proj.weight" in delta
    rebuilt, tokenizer = load_trained(shipped)
    original, _ = load_trained(run)
    ids = tokenizer(codec.unconditional_prompt() + "3.5 3.5 3.5\n90 90 90\nNa\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(rebuilt(ids).logits, original(ids).logits, atol=2e-2)


def test_warm_start_from_a_whole_model_run_in_sorted_site_order(records, full_run, tmp_path):
    """train.init copies a finished whole-model run's weights into the base before training (the run records
    which, by fingerprint); data.site_order = "sorted" puts every crystal completion, translated or not, in
    codec.sorted_sites order. A LoRA run or a run of another shape is refused by name."""
    from crystal_cli.bases import resolve_base
    from crystal_cli.finetune.trainer import _load_init
    from crystal_cli.models import load_base, model_fingerprint

    first = tmp_path / "first"
    finetune(config_for(records, first, **{"base": "tiny", "train.method": "full", "train.max_steps": 2}), first)
    base, tokenizer = load_base(resolve_base("tiny"), "cpu", torch.float32)
    recorded = _load_init(base, str(first))
    trained, _ = load_trained(first)
    assert recorded == {"init": str(first.resolve()), "init_fingerprint": model_fingerprint(first)}
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), trained.state_dict().values()))

    second = tmp_path / "second"  # through the CLI: its summary table prints the init's path and fingerprint
    result = runner.invoke(app, ["finetune", "--recipe", str(REPO / "training" / "tiny-test.toml"), "--data", str(records),
                                 "-o", str(second), "--steps", "2", "--set", "train.method=full", "--set",
                                 f"train.init={first}", "--set", "data.site_order=sorted", "--set", "data.max_length=160",
                                 "--set", "data.val_records=12", "--set", "train.threads=1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((second / "summary.json").read_text())
    assert summary["counts"]["init_fingerprint"] == recorded["init_fingerprint"]
    first_rows = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    second_rows = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert second_rows[0]["val_loss"] < first_rows[0]["val_loss"]  # it starts where the first run ended

    val = read_records(records / "val.jsonl")[:6]
    examples, _ = make_examples(tokenizer, val, 4096, "sorted")
    assert [e.completion for e in examples] == [codec.sorted_sites(r["completion"]) for r in val]
    assert any(e.completion != r["completion"] for e, r in zip(examples, val))  # the order did change
    moved = translated(examples[0], tokenizer, np.random.default_rng(3), "sorted")
    assert moved.completion == codec.sorted_sites(moved.completion) != examples[0].completion

    lora_run, _ = full_run
    cut = tmp_path / "cut"
    finetune(config_for(records, cut, **{"base": "tiny:3", "train.method": "full", "train.max_steps": 1}), cut)
    for source, reason in ((lora_run, "a LoRA run"), (cut, "do not fit the base"), (tmp_path, "not a finetune run")):
        with pytest.raises(CrystalError, match=reason):
            _load_init(load_base(resolve_base("tiny"), "cpu", torch.float32)[0], str(source))


def test_warm_start_deepens_a_shallower_run_without_changing_what_it_computes(records, tmp_path):
    """A base with k times the init's layers takes it grown (trainer.grown_depth): each layer followed by
    copies whose output projections are zero, so the 4-layer model's logits are the 2-layer run's exactly and
    its first val loss is the init's last; the copies then train (their projections leave zero)."""
    from crystal_cli.bases import resolve_base
    from crystal_cli.finetune.trainer import _load_init
    from crystal_cli.models import load_base

    shallow = tmp_path / "shallow"
    finetune(config_for(records, shallow, **{"base": "tiny:2", "train.method": "full", "train.max_steps": 3}), shallow)
    deep, tokenizer = load_base(resolve_base("tiny"), "cpu", torch.float32)
    assert _load_init(deep, str(shallow))["init_growth"] == "2 -> 4 layers"
    trained, _ = load_trained(shallow)
    ids = tokenizer(codec.unconditional_prompt() + "3.5 3.5 3.5\n90 90 90\nNa\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(deep(ids).logits, trained(ids).logits, atol=1e-5)
    assert not deep.model.layers[1].mlp.down_proj.weight.any()
    assert torch.equal(deep.model.layers[1].mlp.up_proj.weight, trained.model.layers[0].mlp.up_proj.weight)

    grown = tmp_path / "grown"
    finetune(config_for(records, grown, **{"base": "tiny", "train.method": "full", "train.max_steps": 2,
                                           "train.init": str(shallow)}), grown)
    shallow_rows = [json.loads(line) for line in (shallow / "metrics.jsonl").read_text().splitlines()]
    grown_rows = [json.loads(line) for line in (grown / "metrics.jsonl").read_text().splitlines()]
    shallow_val = [r["val_loss"] for r in shallow_rows if "val_loss" in r]
    assert grown_rows[0]["val_loss"] == pytest.approx(shallow_val[-1], abs=1e-4)
    assert json.loads((grown / "summary.json").read_text())["counts"]["init_growth"] == "2 -> 4 layers"
    assert load_trained(grown)[0].model.layers[1].mlp.down_proj.weight.any()


def test_overlap_marks_exactly_the_digits_that_stack_two_atoms_and_the_unlikelihood_lowers_their_mass(full_run, records):
    """A 4 Å cube with a site at (½, ½, ½): writing a second site at (½, ½, z), the first z digits 4 and 5
    put it within 0.5 Å (|Δz| < 0.125) of the first one, 3 and 6 still leave free positions (0.30-0.37,
    0.63-0.69). The mark is the distance guard's; the true digit is never marked. Then the unlikelihood
    term alone, a few steps on a whole tiny model, moves probability off the marked digits."""
    run, _ = full_run
    model, tokenizer = load_trained(run)
    digits = OverlapDigits.of(tokenizer)
    text = "4.0 4.0 4.0\n90 90 90\nNa\n0.50 0.50 0.50\nCl\n0.50 0.50 0.00"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    marked = with_overlaps(Example(tokenizer(codec.unconditional_prompt())["input_ids"], text, ids, True), digits)
    rows = np.flatnonzero(marked.avoid.any(axis=1))
    assert len(rows) == 1 and tokenizer.decode(ids[: rows[0]]).endswith("Cl\n0.50 0.50 0.")
    assert np.flatnonzero(marked.avoid[rows[0]]).tolist() == [4, 5] and tokenizer.decode(ids[rows[0]]) == "0"
    assert with_overlaps(Example([1], "Na", [2, 3], False), digits).avoid is None  # not a crystal: nothing

    examples = [with_overlaps(e, digits) for e in make_examples(tokenizer, read_records(records / "train.jsonl"), 160)[0]]
    examples = [e for e in examples if e.avoid is not None][:4] + [marked]
    batch = collate(examples, tokenizer.pad_token_id, len(digits.ids))
    vocab = LossVocab.of(crystal_vocab(tokenizer, examples), len(tokenizer), "cpu")
    digit_ids = torch.from_numpy(digits.ids)
    nll, _, mass = completion_losses(model, batch, vocab, digit_ids)
    plain, _ = completion_nll(model, collate(examples, tokenizer.pad_token_id), vocab)
    assert torch.allclose(nll, plain) and len(mass) == int(batch["avoid"].any(dim=2).sum()) >= 1
    model.requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = float(mass.mean())
    for _ in range(5):
        _, _, mass = completion_losses(model, batch, vocab, digit_ids)
        optimizer.zero_grad()
        (-torch.log1p(-mass)).sum().backward()
        optimizer.step()
    with torch.no_grad():
        after = float(completion_losses(model, batch, vocab, digit_ids)[2].mean())
    assert after < 0.5 * before, (before, after)


def test_own_samples_are_marked_up_to_their_first_stacked_site_and_never_imitated(full_run, records, tmp_path):
    """data.negatives: a sample the model wrote with Cl on top of Na is marked where the guard would have
    masked (its own digit 5 included) and not after it; in a batch it adds nothing to the cross-entropy or
    its token count. Through `crystal finetune` the run reads a generate-style jsonl, counts what it skipped,
    records the file's fingerprint and logs overlap_mass; a negatives file without the unlikelihood is refused."""
    from crystal_cli.finetune.data import imitated_tokens, read_negatives
    from crystal_cli.runs import fingerprint

    run, _ = full_run
    model, tokenizer = load_trained(run)
    digits = OverlapDigits.of(tokenizer)
    prompt = codec.unconditional_prompt()
    stacked = "4.0 4.0 4.0\n90 90 90\nNa\n0.50 0.50 0.50\nCl\n0.50 0.50 0.50\nCl\n0.50 0.50 0.50"
    ids = tokenizer(stacked, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    own = with_overlaps(Example(tokenizer(prompt)["input_ids"], stacked, ids, True, imitate=False), digits)
    rows = np.flatnonzero(own.avoid.any(axis=1))
    assert len(rows) == 1 and tokenizer.decode(ids[: rows[0]]).endswith("Cl\n0.50 0.50 0.")
    assert np.flatnonzero(own.avoid[rows[0]]).tolist() == [4, 5] and tokenizer.decode(ids[rows[0]]) == "5"
    as_truth = with_overlaps(dataclasses.replace(own, imitate=True, avoid=None), digits)
    assert as_truth.avoid is None or not as_truth.avoid[rows[0]].any()  # true text: its own digit is never marked

    true = [with_overlaps(e, digits) for e in make_examples(tokenizer, read_records(records / "train.jsonl"), 160)[0][:3]]
    batch = collate(true + [own], tokenizer.pad_token_id, len(digits.ids))
    vocab = LossVocab.of(crystal_vocab(tokenizer, true + [own]), len(tokenizer), "cpu")
    nll, _, mass = completion_losses(model, batch, vocab, torch.from_numpy(digits.ids))
    plain, _ = completion_nll(model, collate(true, tokenizer.pad_token_id), vocab)
    assert torch.allclose(nll, plain) and imitated_tokens(batch) == len(plain) and len(mass) >= 1

    samples = tmp_path / "own.jsonl"
    fine = "4.0 4.0 4.0\n90 90 90\nNa\n0.50 0.50 0.50\nCl\n0.00 0.00 0.00"
    samples.write_text("\n".join([json.dumps({"prompt": prompt, "text": stacked}), "not json",
                                  json.dumps({"prompt": prompt, "text": "Na"}), json.dumps({"id": 3})]) + "\n")
    examples, counts = read_negatives(samples, tokenizer, digits, 160)
    assert len(examples) == 1 and counts == {"negatives_read": 4, "negatives": 1, "negatives_unreadable": 2,
                                             "negatives_too_long": 0, "negatives_unmarked": 1}
    neg_run = tmp_path / "neg"
    finetune(config_for(records, neg_run, **{"train.max_steps": 4, "train.overlap_unlikelihood": 5.0,
                                             "data.negatives": str(samples), "data.negatives_per_batch": 2}), neg_run)
    summary = json.loads((neg_run / "summary.json").read_text())
    assert summary["counts"]["negatives"] == 1 and summary["counts"]["negatives_sha256"] == fingerprint(samples)
    logged = [json.loads(line) for line in (neg_run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("overlap_mass") for r in logged)

    (tmp_path / "fine.jsonl").write_text(json.dumps({"prompt": prompt, "text": fine}) + "\n")
    for extra, message in (({"data.negatives": str(samples), "data.negatives_per_batch": 2}, "needs train.overlap_unlikelihood"),
                           ({"data.negatives_per_batch": 2}, "needs data.negatives"),
                           ({"data.negatives": str(tmp_path / "none.jsonl"), "data.negatives_per_batch": 1,
                             "train.overlap_unlikelihood": 1.0}, "is not a file")):
        with pytest.raises(CrystalError, match=message):
            config_for(records, tmp_path / "refused", **extra)
    with pytest.raises(CrystalError, match="no sample with a position the distance guard marks"):
        read_negatives(tmp_path / "fine.jsonl", tokenizer, digits, 160)


def test_own_valid_samples_are_imitated_at_weights_that_keep_the_models_atom_counts(full_run, records, tmp_path):
    """data.positives: of the model's own samples only the valid ones (structurally and compositionally) are
    kept; each is drawn with probability proportional to 1 / its atom-count bin's valid share, so the filter
    does not shift the sizes the model writes (here: one valid of three 2-3-atom samples, one valid 8-atom
    sample: 3 : 1). Through `crystal finetune` they are counted, fingerprinted and imitated (no imitate mask);
    a count without a file, or a file without a count, is refused."""
    from crystal_cli.finetune.data import read_positives, size_shares
    from crystal_cli.finetune.trainer import _Trainer
    from crystal_cli.runs import fingerprint

    run, _ = full_run
    _, tokenizer = load_trained(run)
    prompt = codec.unconditional_prompt()
    nacl = "4.0 4.0 4.0\n90 90 90\nNa\n0.00 0.00 0.00\nCl\n0.50 0.50 0.50"
    stacked = "4.0 4.0 4.0\n90 90 90\nNa\n0.50 0.50 0.50\nCl\n0.50 0.50 0.50\nCl\n0.00 0.00 0.00"
    uncharged = "4.0 4.0 4.0\n90 90 90\nNa\n0.00 0.00 0.00\nCl\n0.50 0.50 0.50\nCl\n0.00 0.50 0.00"
    sites = [("Na", "0.00 0.00 0.00"), ("Na", "0.50 0.50 0.00"), ("Na", "0.50 0.00 0.50"), ("Na", "0.00 0.50 0.50"),
             ("Cl", "0.50 0.00 0.00"), ("Cl", "0.00 0.50 0.00"), ("Cl", "0.00 0.00 0.50"), ("Cl", "0.50 0.50 0.50")]
    rocksalt = "5.6 5.6 5.6\n90 90 90\n" + "\n".join(f"{el}\n{xyz}" for el, xyz in sites)
    samples = tmp_path / "own.jsonl"
    samples.write_text("\n".join([json.dumps({"prompt": prompt, "text": t}) for t in (nacl, stacked, uncharged, rocksalt)]
                                 + ["not json"]) + "\n")
    examples, p, counts = read_positives(samples, tokenizer, 320)
    assert [e.completion for e in examples] == [nacl, rocksalt] and all(e.imitate for e in examples)
    assert np.allclose(p, [0.75, 0.25])
    assert np.allclose(size_shares(examples), [0.5, 0, 0.5, 0, 0, 0])  # data.positives_sizes = "train" draws so
    assert np.allclose(read_positives(samples, tokenizer, 320, np.array([0.6, 0, 0.4, 0, 0, 0]))[1], [0.6, 0.4])
    with pytest.raises(CrystalError, match="no valid crystal in an atom-count bin the train records have"):
        read_positives(samples, tokenizer, 320, np.array([0, 0, 0, 0, 0, 1.0]))
    assert counts == {"positives_read": 5, "positives": 2, "positives_unreadable": 1, "positives_invalid": 2,
                      "positives_too_long": 0, "positives_off_condition": 0}
    assert "imitate" not in collate(examples, tokenizer.pad_token_id)  # imitated like train records

    pos_run = tmp_path / "pos"
    config = config_for(records, pos_run, **{"train.max_steps": 4, "data.max_length": 320,
                                             "data.positives": str(samples), "data.positives_per_batch": 2})
    trainer = _Trainer(config, pos_run, 0, 1, 0)
    drawn = [e.completion for e in trainer._micro_batch(3)[-2:]]
    assert sorted(drawn) == sorted([nacl, rocksalt]) and drawn == [e.completion for e in trainer._micro_batch(3)[-2:]]
    by_train = _Trainer(dataclasses.replace(config, data=dataclasses.replace(
        config.data, positives_sizes="train", positives_per_batch=1)), tmp_path / "by-train", 0, 1, 0)
    assert np.allclose(by_train.positive_p, [1.0, 0.0])  # the <= 6-site train records are all in the 4-7 bin or below
    finetune(config, pos_run)
    summary = json.loads((pos_run / "summary.json").read_text())
    assert summary["counts"]["positives"] == 2 and summary["counts"]["positives_sha256"] == fingerprint(samples)
    saved = json.loads((pos_run / "config.json").read_text())["data"]
    assert saved["positives"] == str(samples.resolve()) and saved["positives_per_batch"] == 2
    for extra in ({"data.positives_per_batch": 2}, {"data.positives": str(samples)}):
        with pytest.raises(CrystalError, match="data.positives and data.positives_per_batch >= 1 go together"):
            config_for(records, tmp_path / "refused", **extra)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": prompt, "text": stacked}) + "\n")
    with pytest.raises(CrystalError, match="no valid crystal among 1 samples"):
        read_positives(tmp_path / "bad.jsonl", tokenizer, 320)


def test_relabelled_positives_are_imitated_under_the_conditions_they_truly_meet(full_run, records, tmp_path):
    """data.positives_relabel: a valid sample drawn under a space group it misses is imitated under the
    unconditional prompt, its own formula's and its own space group's (hindsight relabelling), never the one
    it was sampled under; its drawing probability is split evenly among the three, so the atom-count weights
    of the plain positives hold per sample. Relabelling without data.positives is refused."""
    from crystal_cli.finetune.data import read_positives
    from crystal_cli.finetune.trainer import _Trainer

    run, _ = full_run
    _, tokenizer = load_trained(run)
    cscl = "4.0 4.0 4.0\n90 90 90\nNa\n0.00 0.00 0.00\nCl\n0.50 0.50 0.50"
    sites = [("Na", "0.00 0.00 0.00"), ("Na", "0.50 0.50 0.00"), ("Na", "0.50 0.00 0.50"), ("Na", "0.00 0.50 0.50"),
             ("Cl", "0.50 0.00 0.00"), ("Cl", "0.00 0.50 0.00"), ("Cl", "0.00 0.00 0.50"), ("Cl", "0.50 0.50 0.50")]
    rocksalt = "5.6 5.6 5.6\n90 90 90\n" + "\n".join(f"{el}\n{xyz}" for el, xyz in sites)
    samples = tmp_path / "own.jsonl"
    wrong = codec.conditional_prompt({"spacegroup": 62})
    stacked = "4.0 4.0 4.0\n90 90 90\nNa\n0.50 0.50 0.50\nCl\n0.50 0.50 0.50"
    samples.write_text("\n".join(json.dumps({"prompt": wrong, "text": t}) for t in (cscl, stacked, rocksalt)) + "\n")
    examples, p, counts = read_positives(samples, tokenizer, 320, relabel=True)
    expected = [codec.unconditional_prompt(), codec.conditional_prompt({"formula": "NaCl"})]
    expected = expected + [codec.conditional_prompt({"spacegroup": 221})] \
        + expected + [codec.conditional_prompt({"spacegroup": 225})]
    assert [e.prompt_ids for e in examples] == [tokenizer(prompt)["input_ids"] for prompt in expected]
    assert [e.completion for e in examples] == [cscl] * 3 + [rocksalt] * 3 and all(e.imitate for e in examples)
    assert np.allclose(p, [2 / 9] * 3 + [1 / 9] * 3)  # 2 of the 3 samples read are 2-site cells: that bin keeps 2/3
    assert counts["positives"] == 2 and counts["positives_examples"] == 6
    with pytest.raises(CrystalError, match="2 valid ones miss their prompt's formula or space group"):
        read_positives(samples, tokenizer, 320)  # as sampled, neither meets space group 62: nothing to imitate

    config = config_for(records, tmp_path / "relabel", **{"data.max_length": 320, "data.positives": str(samples),
                                                          "data.positives_per_batch": 2, "data.positives_relabel": True})
    assert len(_Trainer(config, tmp_path / "relabel", 0, 1, 0).positives) == 6
    with pytest.raises(CrystalError, match="data.positives_relabel needs data.positives"):
        config_for(records, tmp_path / "refused", **{"data.positives_relabel": True})


def test_cpu_forwards_take_the_math_attention_path_with_the_same_loss_and_gradients(full_run, records):
    """compute_context, what every forward of `crystal finetune` runs in: on a CPU without AMX the flash-attention
    kernel is switched off for its duration only (and back after), and the math path gives the same completion
    loss and the same gradients on a padded batch, with and without bf16 autocast."""
    from crystal_cli.finetune.model import compute_context
    from crystal_cli.runtime import cpu_has_amx

    run, _ = full_run
    model, tokenizer = load_trained(run)
    model.eval().requires_grad_(True)  # loaded for inference; no dropout either way
    examples, _ = make_examples(tokenizer, read_records(records / "val.jsonl")[:6], 160)
    batch = collate(examples, tokenizer.pad_token_id)
    assert bool((batch["attention_mask"] == 0).any())  # padding: the attention mask matters

    def loss_and_grads(context):
        model.zero_grad(set_to_none=True)
        with context:
            loss = completion_nll(model, batch)[0].mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    assert torch.backends.cuda.flash_sdp_enabled()
    with compute_context(torch.device("cpu"), None):
        assert torch.backends.cuda.flash_sdp_enabled() == cpu_has_amx()
    with compute_context(torch.device("cpu"), None, math_attention=True):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()
    with compute_context(torch.device("cpu"), None, math_attention=False):
        assert torch.backends.cuda.flash_sdp_enabled()

    fused, fused_grads = loss_and_grads(compute_context(torch.device("cpu"), None, math_attention=False))
    math, math_grads = loss_and_grads(compute_context(torch.device("cpu"), None, math_attention=True))
    assert torch.allclose(fused, math, atol=1e-5) and len(fused_grads) == len(math_grads) > 0
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-3) for a, b in zip(fused_grads, math_grads))
    bf16, _ = loss_and_grads(compute_context(torch.device("cpu"), torch.bfloat16, math_attention=True))
    assert abs(float(bf16) - float(math)) < 0.05 * float(math)


def test_positives_as_sampled_are_imitated_only_where_they_meet_their_prompt(full_run, tmp_path):
    """Without relabelling, a valid sample is imitated under the prompt it was drawn under only if it has that
    prompt's space group and formula (a --spacegroup pool is then rejection-sampling self-training of the
    space-group task); the misses are counted, the size weights still see every sample read. codec's
    prompt_conditions reads back what conditional_prompt wrote, and nothing else."""
    from crystal_cli.finetune.data import read_positives

    run, _ = full_run
    _, tokenizer = load_trained(run)
    for conditions in ({}, {"formula": "LiFePO4"}, {"spacegroup": 225}, {"formula": "NaCl", "spacegroup": 221,
                                                                          "e_above_hull": 0.05, "band_gap": 1.25}):
        assert codec.prompt_conditions(codec.conditional_prompt(conditions)) == conditions
    assert codec.prompt_conditions(codec.infill_prompt(codec.parse_crystal(
        "4.0 4.0 4.0\n90 90 90\nNa\n0.00 0.00 0.00\nCl\n0.50 0.50 0.50").structure, "Na")) is None
    assert codec.prompt_conditions(codec.conditional_prompt({}).replace("bulk", "thin")) is None

    cscl = "4.0 4.0 4.0\n90 90 90\nNa\n0.00 0.00 0.00\nCl\n0.50 0.50 0.50"  # Pm-3m, 221
    rows = [({"spacegroup": 221}, cscl), ({"spacegroup": 225}, cscl), ({"formula": "KBr"}, cscl),
            ({"formula": "Na2Cl2", "spacegroup": 221}, cscl), ({"e_above_hull": 0.0}, cscl)]
    samples = tmp_path / "sg.jsonl"
    samples.write_text("".join(json.dumps({"prompt": codec.conditional_prompt(c), "text": t}) + "\n" for c, t in rows))
    examples, p, counts = read_positives(samples, tokenizer, 320)
    kept = [tokenizer(codec.conditional_prompt(c))["input_ids"] for c, _ in (rows[0], rows[3], rows[4])]
    assert [e.prompt_ids for e in examples] == kept and np.allclose(p, [1 / 3] * 3)
    assert counts["positives"] == 3 and counts["positives_off_condition"] == 2 and counts["positives_invalid"] == 0
    assert len(read_positives(samples, tokenizer, 320, relabel=True)[0]) == 5 * 3  # relabelled: all five, 3 prompts


def test_spacegroup_pool_draws_each_group_at_its_share_and_feeds_read_positives(tmp_path):
    """training/spacegroup_pool.py through the real sampler (the tiny base's GGUF): the samples are shared among
    the groups with enough train crystals in proportion to count**power, each drawn under its group's prompt;
    summary.json's hits are the samples whose space group is the one asked for (meets_prompt: the filter
    read_positives applies to pool.jsonl without relabelling)."""
    import subprocess
    import sys
    from collections import Counter

    from crystal_cli.export import cached_export
    from crystal_cli.finetune.data import meets_prompt
    from crystal_cli.structure_io import read_jsonl

    sys.path.insert(0, str(REPO / "training"))
    from spacegroup_pool import allocate

    assert allocate(Counter({225: 400, 62: 100, 1: 3}), 6, 0.5, 20) == {62: 2, 225: 4}
    assert allocate(Counter({225: 400, 62: 100, 1: 3}), 5, 1.0, 1) == {62: 1, 225: 4}
    records = tmp_path / "records"
    records.mkdir()
    rows = [{"task": "unconditional", "spacegroup": g} for g in [225] * 4 + [221]] + [{"task": "formula", "spacegroup": 2}]
    (records / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pool"
    done = subprocess.run([sys.executable, str(REPO / "training" / "spacegroup_pool.py"), "-m", str(cached_export("tiny", "f16")),
                           "-o", str(out), "-n", "6", "--records", str(records), "--min-train", "1", "--power", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    pool = read_jsonl(out / "pool.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert {g: v["samples"] for g, v in summary["groups"].items()} == {"221": 1, "225": 5} and len(pool) == 6
    assert Counter(r["prompt"] for r in pool) == {codec.conditional_prompt({"spacegroup": 225}): 5,
                                                  codec.conditional_prompt({"spacegroup": 221}): 1}
    structures = [codec.parse_crystal(r["text"]).structure for r in pool]
    hits = [s is not None and meets_prompt(r["prompt"], s) for r, s in zip(pool, structures)]
    assert summary["hits"] == sum(hits)


def test_even_formulas_give_each_composition_of_a_size_the_same_share(full_run, records, tmp_path):
    """data.positives_even_formulas: two valid NaCl cells and one KBr cell of the same size share their bin's
    probability by formula (NaCl's half split between its two samples) instead of by sample, so the model's
    favourite compositions are not amplified; the other bin is untouched. Without data.positives it is refused."""
    from crystal_cli.finetune.data import read_positives

    run, _ = full_run
    _, tokenizer = load_trained(run)
    prompt = codec.unconditional_prompt()
    pairs = [("4.0", "Na", "Cl"), ("4.1", "Na", "Cl"), ("4.3", "K", "Br")]
    texts = [f"{a} {a} {a}\n90 90 90\n{x}\n0.00 0.00 0.00\n{y}\n0.50 0.50 0.50" for a, x, y in pairs]
    sites = [("Na", "0.00 0.00 0.00"), ("Na", "0.50 0.50 0.00"), ("Na", "0.50 0.00 0.50"), ("Na", "0.00 0.50 0.50"),
             ("Cl", "0.50 0.00 0.00"), ("Cl", "0.00 0.50 0.00"), ("Cl", "0.00 0.00 0.50"), ("Cl", "0.50 0.50 0.50")]
    texts.append("5.6 5.6 5.6\n90 90 90\n" + "\n".join(f"{el}\n{xyz}" for el, xyz in sites))
    samples = tmp_path / "own.jsonl"
    samples.write_text("\n".join(json.dumps({"prompt": prompt, "text": t}) for t in texts) + "\n")
    assert np.allclose(read_positives(samples, tokenizer, 320)[1], [0.25] * 4)
    examples, p, counts = read_positives(samples, tokenizer, 320, even_formulas=True)
    assert [e.completion for e in examples] == texts and counts["positives"] == 4
    assert np.allclose(p, [0.1875, 0.1875, 0.375, 0.25])
    relabeled = read_positives(samples, tokenizer, 320, relabel=True, even_formulas=True)[1]
    assert np.allclose(relabeled.reshape(4, 3).sum(axis=1), [0.1875, 0.1875, 0.375, 0.25])
    with pytest.raises(CrystalError, match="data.positives_even_formulas needs data.positives"):
        config_for(records, tmp_path / "refused", **{"data.positives_even_formulas": True})


def test_task_repeats_draw_one_tasks_records_k_times_an_epoch(records, tmp_path):
    from collections import Counter

    from crystal_cli.finetune.data import load_splits, with_task_repeats

    train, _ = load_splits(records)
    tasks = Counter(r["task"] for r in train)
    repeated = with_task_repeats(train, {"formula": 3})
    assert Counter(r["task"] for r in repeated) == {"unconditional": tasks["unconditional"], "formula": 3 * tasks["formula"]}
    with pytest.raises(CrystalError, match="no train record: spacegroup"):
        with_task_repeats(train, {"spacegroup": 2})
    _, repeats = parse_override("data.task_repeats={formula = 2}")
    run = tmp_path / "run"
    finetune(config_for(records, run, **{"data.task_repeats": repeats, "train.max_steps": 1, "train.eval_every": 1000}), run)
    counts = json.loads((run / "summary.json").read_text())["counts"]
    assert counts["train_records"] == len(train)
    assert counts["train_examples"] + counts["train_too_long"] == tasks["unconditional"] + 2 * tasks["formula"]
    assert json.loads((run / "config.json").read_text())["data"]["task_repeats"] == {"formula": 2}
    for extra, message in (({"data.task_repeats": {"formula": 0}}, "count >= 1"),
                           ({"data.task_repeats": {"formula": 2}, "data.tasks": ["unconditional"]}, "kept by data.tasks"),
                           ({"data.task_repeats": {"formula": 1.5}}, "data.task_repeats: expected")):
        with pytest.raises(CrystalError, match=message):
            config_for(records, tmp_path / "bad", **extra)


def test_compiled_decoder_trains_as_the_eager_one_and_saves_the_same_keys(dropout_run, records, tmp_path, monkeypatch):
    """train.compile: the rule ("auto" compiles on a CPU with AMX and a C++ compiler; "on" without a compiler is a
    one-line error), and a run under torch.compile follows the eager run's losses step for step and saves an
    adapter with the same tensor names (Module.compile works in place: checkpoints stay readable both ways). Both
    runs have LoRA dropout: with the seeds drawn alike, the compiled CpuDropout masks as the eager one does.
    Compiled on a CPU, the attention is the model's matmul + softmax, not the eager run's SDPA kernel: the
    matching losses are that switch's check, and the switch is a runtime setting a saved config never holds."""
    import shutil

    from crystal_cli.bases import resolve_base
    from crystal_cli.finetune.model import compile_decoder, compiles
    from crystal_cli.models import load_base
    from crystal_cli.runtime import cpu_has_amx, has_cxx_compiler

    cpu = torch.device("cpu")
    has_compiler = has_cxx_compiler()
    assert not compiles("off", cpu) and compiles("auto", cpu) == (cpu_has_amx() and has_compiler)
    with monkeypatch.context() as patched:
        patched.setattr(shutil, "which", lambda name: None)
        with pytest.raises(CrystalError, match="C\\+\\+ compiler"):
            compiles("on", cpu)
        assert not compiles("auto", cpu)
    if not has_compiler:
        unavailable("no C++ compiler: inductor cannot build CPU kernels here",
                    "make install builds llama.cpp with one, so CI always has it")

    import torch._inductor.config as inductor

    eager_run, _ = dropout_run
    run = tmp_path / "compiled"
    with inductor.patch(fallback_random=True):  # the dropout seeds come from eager's generator
        finetune(config_for(records, run, **DROPOUT, **{"train.compile": "on"}), run)
    assert json.loads((run / "summary.json").read_text())["compiled"] is True
    assert json.loads((eager_run / "summary.json").read_text())["compiled"] is False

    def curve(path: Path) -> list[tuple[int, str, float]]:
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], key, r[key]) for r in rows for key in ("loss", "val_loss") if key in r]

    mine, theirs = curve(run), curve(eager_run)
    assert [m[:2] for m in mine] == [t[:2] for t in theirs] and len(mine) == 7  # 4 train rows, 3 val rows
    assert all(abs(m[2] - t[2]) < 1e-3 * t[2] for m, t in zip(mine, theirs)), (mine, theirs)
    assert sorted(load_file(run / "adapter" / "adapter_model.safetensors")) == sorted(
        load_file(eager_run / "adapter" / "adapter_model.safetensors"))

    switched, kept = (load_base(resolve_base("tiny"), cpu, torch.float32)[0] for _ in range(2))
    compile_decoder(switched, cpu)
    compile_decoder(kept, cpu, attention="sdpa")
    assert (switched.config._attn_implementation, kept.config._attn_implementation) == ("eager", "sdpa")
    switched.save_pretrained(tmp_path / "saved")
    assert "attn" not in (tmp_path / "saved" / "config.json").read_text()


def test_cpu_dropout_zeroes_each_element_independently_and_keeps_the_expectation():
    """CpuDropout is nn.Dropout's regulariser: a share p of the elements zeroed (within 4 standard errors), the
    rest scaled so the mean is the input's, nothing in eval mode, masks reproduced by torch.manual_seed and fresh
    at every call. Compiled, two dropouts of one input draw two masks (the seed is an input of the opaque op, so
    inductor cannot merge them as it may merge two calls with equal arguments)."""
    from crystal_cli.finetune.model import CpuDropout

    dropout = CpuDropout(0.1)
    ones = torch.ones(400_000)
    torch.manual_seed(3)
    first = dropout(ones)
    dropped = float((first == 0).float().mean())
    assert abs(dropped - 0.1) < 4 * (0.1 * 0.9 / ones.numel()) ** 0.5
    assert torch.all((first == 0) | (first == dropout.scale)) and float(first.mean()) == pytest.approx(1.0, abs=3e-3)
    torch.manual_seed(3)
    assert torch.equal(dropout(ones), first) and not torch.equal(dropout(ones), first)
    assert dropout.eval()(ones) is ones
    with pytest.raises(ValueError, match="dropout probability"):
        CpuDropout(1.0)

    other = CpuDropout(0.1)
    dropout.train()
    pair = torch.compile(lambda x: (dropout(x), other(x)), dynamic=True)
    a, b = pair(ones)
    assert not torch.equal(a == 0, b == 0)
    assert all(abs(float((m == 0).float().mean()) - 0.1) < 0.0025 for m in (a, b))


def test_a_lora_run_with_dropout_on_a_cpu_resumes_exactly(full_run, dropout_run, records, tmp_path):
    """On a CPU a LoRA run's dropouts are CpuDropout (the saved adapter holds the same tensors: dropout has no
    weights), they act (the losses differ from the dropout-free run's), and their seeds come from torch's
    generator, which a checkpoint saves: a run interrupted at step 6 and resumed ends with the uninterrupted run's
    weights."""
    from crystal_cli.bases import resolve_base
    from crystal_cli.finetune.model import CpuDropout, trainable
    from crystal_cli.models import load_base

    config = config_for(records, tmp_path / "probe", **DROPOUT)
    model, _ = trainable(config, load_base(resolve_base("tiny"), torch.device("cpu"), torch.float32)[0], torch.float32)
    dropouts = [m for m in model.modules() if isinstance(m, CpuDropout)]
    assert len(dropouts) == 4 * 7 and not any(type(m) is torch.nn.Dropout for m in model.modules())

    (straight, finished), interrupted = dropout_run, tmp_path / "interrupted"
    assert finished.train_loss != pytest.approx(full_run[1].train_loss, abs=1e-4)

    def interrupt_at_step_6(event):
        if event.step == 6 and event.loss is not None:
            os.kill(os.getpid(), signal.SIGINT)

    assert finetune(config_for(records, interrupted, **DROPOUT), interrupted, on_event=interrupt_at_step_6).steps == 6
    resumed = finetune(config_for(records, interrupted, resume=True, **DROPOUT), interrupted, resume=True)
    assert resumed.train_loss == pytest.approx(finished.train_loss, abs=1e-6)
    mine, theirs = trainable_weights(interrupted, STEPS), trainable_weights(straight, STEPS)
    assert sorted(mine) == sorted(theirs) == sorted(trainable_weights(full_run[0], STEPS))
    assert all(torch.allclose(mine[k], theirs[k], atol=1e-6) for k in theirs)
