"""crystal generate on the tiny base (random weights): the grammar alone must make every sample a crystal."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from crystal_cli.errors import CrystalError
from crystal_cli.sampling import GenerateOptions, generate
from crystal_cli.structure_io import read_jsonl


@pytest.fixture(scope="module")
def tiny_gguf():
    from crystal_cli.export import cached_export

    return cached_export("tiny", "f16")


def _options(model, output, **overrides) -> GenerateOptions:
    settings = {"n": 20, "max_atoms": 8, "parallel": 8, "temperature": 1.0, "top_p": 1.0, "seed": 1, "threads": 1}
    settings.update(overrides)
    return GenerateOptions(model=str(model), output=output, **settings)


def _cif_blocks(path) -> list[str]:
    from pymatgen.io.cif import CifParser

    return list(CifParser(str(path)).as_dict())


def test_grammar_makes_every_sample_parse(tiny_gguf, tmp_path):
    from crystal_cli.datasets import read_structures

    out = tmp_path / "samples.cif"
    seen = []
    summary = generate(_options(tiny_gguf, out), on_sample=lambda row, s: seen.append(row["id"]))
    rows = read_jsonl(tmp_path / "samples.jsonl")
    assert summary.generated == 20 and summary.ok == 20 and len(seen) == 20
    assert {r["status"] for r in rows} == {"ok"} and len({r["text"] for r in rows}) == 20
    assert all(set(r) >= {"id", "prompt", "text", "status", "detail", "seconds", "seed"} for r in rows)
    assert len(_cif_blocks(out)) == 20
    entries = list(read_structures(tmp_path / "samples.jsonl"))  # what crystal evaluate reads
    assert len(entries) == 20 and all(e.structure is not None and len(e.structure) <= 8 for e in entries)


def test_formula_condition_is_exact(tiny_gguf, tmp_path):
    from crystal_cli import codec

    summary = generate(_options(tiny_gguf, tmp_path / "li2o.cif", n=12, formula="OLi2", max_atoms=9))
    rows = read_jsonl(tmp_path / "li2o.jsonl")
    assert summary.ok == 12 and "The chemical formula is Li2O. " in rows[0]["prompt"]
    for row in rows:
        structure = codec.parse_crystal(row["text"]).structure
        assert structure.composition.reduced_formula == "Li2O" and len(structure) in (3, 6, 9)


def test_resume_tops_up_without_duplicates_and_survives_interruption(tiny_gguf, tmp_path):
    out = tmp_path / "run.cif"

    def stop_after_three(row, summary):
        if summary.generated == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(_options(tiny_gguf, out, n=8, spacegroup=225), on_sample=stop_after_three)
    assert len(read_jsonl(tmp_path / "run.jsonl")) == 3 and len(_cif_blocks(out)) == 3  # valid partial CIF
    with pytest.raises(CrystalError):  # not silently overwritten
        generate(_options(tiny_gguf, out, n=8, spacegroup=225))
    with pytest.raises(CrystalError):  # resuming under other conditions
        generate(_options(tiny_gguf, out, n=8, spacegroup=62, resume=True))
    summary = generate(_options(tiny_gguf, out, n=8, spacegroup=225, resume=True))
    rows = read_jsonl(tmp_path / "run.jsonl")
    assert summary.existing == 3 and summary.generated == 5
    assert sorted(r["index"] for r in rows) == list(range(8)) and len({r["text"] for r in rows}) == 8
    assert sorted(_cif_blocks(out)) == sorted(f"run-{i:05d}" for i in range(8))
    assert generate(_options(tiny_gguf, out, n=8, spacegroup=225, resume=True)).generated == 0


def test_transformers_backend_is_grammar_constrained_too(tmp_path):
    summary = generate(_options("tiny", tmp_path / "hf.extxyz", n=4, parallel=4, max_atoms=4, backend="transformers"))
    assert summary.ok == 4
    from ase.io import read

    assert len(read(tmp_path / "hf.extxyz", index=":")) == 4


def test_infill_ranks_replacements(tiny_gguf, tmp_path, structures):
    from pymatgen.io.cif import CifWriter

    source = tmp_path / "nacl.cif"
    source.write_text(str(CifWriter(structures["NaCl"])))
    summary = generate(_options(tiny_gguf, tmp_path / "subs.cif", n=3, infill=source, mask="Na"))
    (ranking,) = summary.rankings
    probabilities = [p for _, p in ranking["ranked"]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0001
    rows = read_jsonl(tmp_path / "subs.jsonl")
    assert [r["rank"] for r in rows] == [1, 2, 3] and all("Na" not in r["text"].split("\n") for r in rows)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_gguf, tmp_path):
    from crystal_cli.cli import app

    not_a_model = tmp_path / "junk.gguf"
    not_a_model.write_bytes(b"GGUF but not really" * 10)
    out = str(tmp_path / "out.cif")
    runner = CliRunner()
    cases = [
        ["-m", str(tiny_gguf), "-o", out, "--formula", "Xx2O"],
        ["-m", str(tiny_gguf), "-o", out, "--formula", "Li2O)("],
        ["-m", str(tiny_gguf), "-o", out, "--formula", "LiFePO4", "--max-atoms", "5"],
        ["-m", str(tiny_gguf), "-o", out, "-n", "0"],
        ["-m", str(not_a_model), "-o", out],
        ["-m", str(tmp_path / "absent.gguf"), "-o", out],
        ["-m", str(tiny_gguf), "-o", str(tmp_path / "no" / "dir" / "out.cif")],
        ["-m", str(tiny_gguf), "-o", out, "--format", "pdb"],
        ["-m", str(tiny_gguf), "-o", out, "--quant", "q3"],
    ]
    for args in cases:
        result = runner.invoke(app, ["generate", *args])
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output and "error" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.gguf"]


def test_skipping_forced_tokens_changes_nothing_but_the_work(tiny_gguf):
    """Greedy samples are identical with and without appending grammar-forced tokens unsampled, and the
    fast path really takes forced tokens out of the sampler (fewer sampler calls than tokens)."""
    from crystal_cli import codec
    from crystal_cli.grammar import crystal_gbnf, max_new_tokens
    from crystal_cli.sampling.llama_backend import BatchedSampler, Job, LlamaModel, SamplingSettings

    jobs = [Job(i, i + 1) for i in range(6)]
    texts = {}
    with LlamaModel(tiny_gguf, threads=1) as model:
        for skip in (False, True):
            settings = SamplingSettings(0.0, 1.0, max_new_tokens(6), parallel=3, threads=1, skip_forced=skip)
            sampler = BatchedSampler(model, settings, crystal_gbnf(6))
            calls = 0
            sample = sampler._sample

            def counted(*args):
                nonlocal calls
                calls += 1
                return sample(*args)

            sampler._sample = counted
            finished = sorted(sampler.run(codec.unconditional_prompt(), jobs), key=lambda f: f.index)
            sampler.close()
            texts[skip] = [f.text for f in finished]
            tokens = sum(f.tokens for f in finished)
            assert (calls < 0.8 * tokens) if skip else (calls == tokens)
    assert texts[True] == texts[False]
    assert all(codec.parse_crystal(t).ok for t in texts[True])


def test_samples_do_not_depend_on_how_many_run_at_once(tiny_gguf):
    """Sample i depends only on (seed, i): one at a time and five at once (refilled slots, sequences of
    different lengths finishing out of order, emptied slots taken over by running ones) give the same texts."""
    from crystal_cli import codec
    from crystal_cli.grammar import crystal_gbnf, max_new_tokens
    from crystal_cli.sampling.llama_backend import BatchedSampler, Job, LlamaModel, SamplingSettings, job_seed

    jobs = [Job(i, job_seed(3, i)) for i in range(12)]
    texts = {}
    with LlamaModel(tiny_gguf, threads=1) as model:
        for parallel in (1, 5):
            settings = SamplingSettings(1.0, 1.0, max_new_tokens(6), parallel=parallel, threads=1)
            sampler = BatchedSampler(model, settings, crystal_gbnf(6))
            finished = list(sampler.run(codec.unconditional_prompt(), jobs))
            sampler.close()
            texts[parallel] = {f.index: f.text for f in finished}
            if parallel == 5:
                lengths = [f.tokens for f in finished]
                assert len(set(lengths)) > 3  # ragged: slots empty at different times
                assert [f.index for f in finished] != sorted(f.index for f in finished)  # out of order
    assert texts[1] == texts[5]
