"""Perplexity and IPT: agree with transformers' own loss, rank records and CIFs, work through the CLI on a run."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from pymatgen.io.cif import CifWriter
from typer.testing import CliRunner

from crystal_cli import codec
from crystal_cli.cli import app
from crystal_cli.encode import EncodeOptions, encode
from crystal_cli.errors import CrystalError
from crystal_cli.finetune import finetune, resolve_config
from crystal_cli.models import load_trained
from crystal_cli.perplexity import load_items, perplexity
from tests.conftest import REPO, simple_structures, write_cdvae_csv

runner = CliRunner()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("records")
    csv = write_cdvae_csv(out / "train.csv", simple_structures())
    encode([(csv, "val")], out, EncodeOptions(tasks=("unconditional", "infill")))
    return out


def reference_perplexity(model, tokenizer, prompt: str, completion: str) -> float:
    """transformers' own causal-LM loss over the completion (+EOS), prompt positions masked."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labels = [-100] * len(prompt_ids) + ids[len(prompt_ids):]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    return math.exp(float(loss))


def test_perplexity_matches_transformers_loss_and_ipt_definition(records):
    report = perplexity("tiny", records, translations=2, seed=1, batch_size=3, device="cpu")
    items, _ = load_items(records)
    assert len(report.items) == len(items) == 9  # 5 unconditional + 4 infill (Si has one element)
    model, tokenizer = load_trained("tiny")
    for item, scored in zip(items, report.items):
        assert scored.perplexity == pytest.approx(reference_perplexity(model, tokenizer, item.prompt, item.completion), rel=1e-4)
        if item.task == "infill":  # an element answer is not a crystal: no translations, no IPT
            assert scored.ipt is None and scored.translated == []
        else:
            assert len(scored.translated) == 2
            assert scored.ipt == pytest.approx(sum(scored.translated) / 2 - min(scored.perplexity, *scored.translated))
            assert scored.ipt >= 0
    again = perplexity("tiny", records, translations=0, batch_size=4, device="cpu")  # other padding, same values
    assert [s.perplexity for s in again.items] == pytest.approx([s.perplexity for s in report.items], rel=1e-5)


def test_structures_are_scored_under_the_unconditional_prompt(tmp_path):
    cif_dir = tmp_path / "cifs"
    cif_dir.mkdir()
    for name, structure in simple_structures().items():
        CifWriter(structure).write_file(cif_dir / f"{name}.cif")
    (cif_dir / "broken.cif").write_text("data_broken\n_cell_length_a 3\n")
    items, skipped = load_items(cif_dir)
    assert len(items) == 5 and sum(skipped.values()) == 1
    assert all(i.prompt == codec.unconditional_prompt() and codec.parse_crystal(i.completion).ok for i in items)
    report = perplexity("tiny", cif_dir, translations=0, device="cpu")
    assert len(report.items) == 5 and report.mean_ipt is None and report.skipped
    with pytest.raises(CrystalError, match="no such file"):
        perplexity("tiny", tmp_path / "nothing.cif")


def test_cli_scores_a_finished_run(records, tmp_path):
    run = tmp_path / "run"
    own = tmp_path / "records"  # a copy: the module's records stay as the other tests read them
    shutil.copytree(records, own)
    (own / "train.jsonl").write_text((own / "val.jsonl").read_text())  # train on the same few records
    config = resolve_config(run, REPO / "training" / "tiny-test.toml", {
        "data.records": str(own), "train.max_steps": 2, "train.batch_size": 2, "train.grad_accum": 1,
        "data.val_records": 0, "data.max_length": 512})
    finetune(config, run)
    out = tmp_path / "scores.jsonl"
    result = runner.invoke(app, ["perplexity", str(records), "-m", str(run), "--translations", "2", "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 9 and [r["perplexity"] for r in rows] == sorted(r["perplexity"] for r in rows)
    assert "mean perplexity" in result.output and "mean IPT" in result.output
    bad = runner.invoke(app, ["perplexity", str(records), "-m", str(tmp_path / "no-run")])
    assert bad.exit_code == 2 and "not a known base" in bad.output
