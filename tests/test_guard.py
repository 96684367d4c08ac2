"""The distance guard (sampling/guard.py) on real pieces: a tiny Llama trained to write overlapping atoms,
its llama.cpp export, the transformers backend, pymatgen's distances and llama.cpp's grammar engine."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from crystal_cli import codec
from crystal_cli.grammar import crystal_gbnf, formula_constraint, max_new_tokens
from crystal_cli.sampling import GenerateOptions, generate
from crystal_cli.sampling.guard import (
    VOLUME_PER_SITE, DistanceGuard, GuardSettings, lattice_volume, shortest_distance, stencil,
)
from crystal_cli.structure_io import read_jsonl

# What the steered model learns to write for each prompt: the same position four times, a site and its
# neighbour through the periodic boundary (0.01 vs 0.99 of 3 Å: 0.06 Å apart), a cell whose 1 Å lattice
# vectors leave no room at 1.2 Å, and NaCl stacked into a 1 Å cube.
REPEAT = codec.conditional_prompt({"spacegroup": 1})
IMAGE = codec.conditional_prompt({"spacegroup": 2})
TINY_CELL = codec.conditional_prompt({"spacegroup": 3})
NACL = codec.conditional_prompt({"formula": "NaCl"})
STEERED_TEXTS = {
    REPEAT: "4.0 4.0 4.0\n90 90 90" + "\nNa\n0.50 0.50 0.50" * 4,
    IMAGE: "3.0 3.0 3.0\n90 90 90\nNa\n0.01 0.50 0.50\nNa\n0.99 0.50 0.50",
    TINY_CELL: "1.0 1.0 1.0\n90 90 90\nNa\n0.00 0.00 0.00",
    NACL: "1.0 1.0 1.0\n90 90 90\nNa\n0.00 0.00 0.00\nCl\n0.50 0.50 0.50",
}
TOY_PIECES = [str(d) for d in range(10)] + [" ", ".", "\n", "Na", "Cl", "Li", "Fe"]
TOY = {piece: i for i, piece in enumerate(TOY_PIECES)}


@pytest.fixture(scope="module")
def steered_run(tmp_path_factory):
    """A whole-model run of the tiny Llama trained (full fine-tuning) until greedy decoding writes STEERED_TEXTS.
    The loss is over the grammar's shortlist of crystal tokens (nothing else can be sampled): seconds, not minutes."""
    from crystal_cli.bases import resolve_base, smollm2_gguf
    from crystal_cli.grammar import crystal_shortlist
    from crystal_cli.models import load_base
    from crystal_cli.sampling.llama_backend import LlamaModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared test host is oversubscribed
    torch.manual_seed(0)
    with LlamaModel(smollm2_gguf(), vocab_only=True) as vocab:
        shortlist = torch.as_tensor(crystal_shortlist(vocab.piece_texts(), vocab.end_tokens), dtype=torch.long)
    base = resolve_base("tiny")
    model, tokenizer = load_base(base, "cpu", torch.float32)
    examples = []
    for prompt, completion in STEERED_TEXTS.items():
        head = tokenizer(prompt)["input_ids"]
        tail = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((head + tail, [-100] * len(head) + tail))
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), tokenizer.eos_token_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros_like(ids)
    for i, (row, target) in enumerate(examples):
        ids[i, : len(row)], labels[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), torch.tensor(target), 1
    gold = labels[:, 1:]
    scored = gold != -100
    position = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    position[shortlist] = torch.arange(len(shortlist))
    target = position[gold[scored]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    try:
        for _ in range(600):
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            logits = hidden[scored] @ model.lm_head.weight[shortlist].T
            loss = torch.nn.functional.cross_entropy(logits, target)
            if loss.item() < 0.05 and bool((logits.argmax(-1) == target).all()):
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        else:
            pytest.fail(f"the tiny model did not learn the steering texts (loss {loss.item():.3f})")
    finally:
        torch.set_num_threads(threads)
    run = tmp_path_factory.mktemp("steered")
    model.eval().save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    (run / "config.json").write_text(json.dumps({"base": str(base), "base_spec": "tiny"}))
    return run


@pytest.fixture(scope="module")
def steered_gguf(steered_run):
    from crystal_cli.export import cached_export

    return cached_export(steered_run, "f32")


def _options(model, output, **overrides) -> GenerateOptions:
    settings = {"n": 4, "max_atoms": 6, "parallel": 4, "temperature": 0.0, "seed": 1, "threads": 1}
    settings.update(overrides)
    return GenerateOptions(model=str(model), output=output, **settings)


def _structures(sidecar) -> list:
    return [codec.parse_crystal(row["text"]).structure for row in read_jsonl(sidecar) if row["status"] == "ok"]


def _state(text: str, settings: GuardSettings):
    state = DistanceGuard(settings, TOY_PIECES).new_state()
    state.accept(text)
    return state


def _allowed(state, pieces: list[str]) -> dict[str, bool]:
    return dict(zip(pieces, state.allowed(np.array([TOY[p] for p in pieces])).tolist()))


# ------------------------------------------------------------------------------ the guard's geometry


def test_lookahead_is_exact_against_pymatgen_distances():
    """At every digit of a coordinate line, a digit is allowed exactly when some two-decimal completion is
    at least min_distance from every earlier site under pymatgen's periodic distances (skewed cells too)."""
    from pymatgen.core import Lattice

    rng = np.random.default_rng(7)
    cells = [((4.0, 4.0, 4.0), (90, 90, 90), 0.5), ((2.5, 6.1, 3.3), (70, 100, 115), 1.0),
             ((3.1, 3.1, 7.9), (90, 90, 120), 1.5), ((5.5, 2.2, 4.8), (62, 75, 58), 0.8)]
    for lengths, angles, distance in cells:
        lattice = Lattice.from_parameters(*lengths, *angles)
        sites = rng.integers(0, 100, (3, 3))
        text = "{} {} {}\n{} {} {}".format(*lengths, *angles) + "".join(
            "\nNa\n" + " ".join(f"0.{v:02d}" for v in site) for site in sites) + "\nNa\n"
        state = _state(text, GuardSettings(distance))
        line = " ".join(f"0.{v:02d}" for v in rng.integers(0, 100, 3))
        checked = 0
        for column, ch in enumerate(line):
            if column in (2, 3, 7, 8, 12, 13) and column >= 7:  # digit 3..6: at most 10^4 completions each
                digits = "".join(line[i] for i in (2, 3, 7, 8, 12, 13) if i < column)
                for digit in "0123456789":
                    prefix = digits + digit
                    rest = 6 - len(prefix)
                    codes = np.array([int(prefix + (f"{r:0{rest}d}" if rest else "")) for r in range(10**rest)])
                    frac = np.stack([codes // 10**4, codes // 100 % 100, codes % 100], axis=1) / 100
                    far = (lattice.get_all_distances(frac, sites / 100) >= distance).all(axis=1)
                    assert _allowed(state, [digit])[digit] == bool(far.any()), (lengths, angles, line[:column], digit)
                    checked += 1
            state.accept(ch)
        assert checked == 40


def test_periodic_image_is_caught():
    """0.99 and 0.01 of a 3 Å cell are 0.06 Å apart through the boundary: z must move off 0.5x."""
    from pymatgen.core import Lattice

    state = _state("3.0 3.0 3.0\n90 90 90\nNa\n0.01 0.50 0.50\nNa\n0.99 0.50 0.", GuardSettings(0.5))
    allowed = _allowed(state, list("0123456789"))
    assert allowed == {str(d): d not in (4, 5) for d in range(10)}  # 0.3x and 0.6x have far completions
    lattice = Lattice.cubic(3.0)
    site = [0.01, 0.5, 0.5]
    assert lattice.get_all_distances([[0.99, 0.5, 0.40], [0.99, 0.5, 0.59]], site).max() < 0.5
    assert lattice.get_all_distances([[0.99, 0.5, 0.33], [0.99, 0.5, 0.67]], site).min() >= 0.5


def test_stencil_counts_self_images_and_matches_the_ball():
    assert stencil((1.0, 1.0, 1.0), (90, 90, 90), 1.2).full  # a lattice vector is shorter than 1.2 Å
    assert not stencil((1.0, 1.0, 1.0), (90, 90, 90), 0.9).full
    cell = stencil((5.0, 5.0, 5.0), (90, 90, 90), 0.5)
    offsets = np.stack(cell.offsets, axis=1)
    offsets = np.where(offsets >= 50, offsets - 100, offsets)  # unfolded: a ball of 10 grid steps
    assert len(offsets) == sum(1 for d in itertools.product(range(-10, 11), repeat=3) if sum(x * x for x in d) < 100 + 1e-3)
    assert np.abs(offsets).max() == 10


def test_volume_floor_lookahead_follows_the_grammar():
    """With LiFePO4 (7 sites) the cell must reach 7 × 8.88 Å³; lengths and angles are cut exactly there."""
    formula = formula_constraint("LiFePO4", 20)
    settings = GuardSettings(0.5, formula)
    assert settings.site_volume() == VOLUME_PER_SITE
    floor = 7 * VOLUME_PER_SITE  # 62.16
    lengths = _allowed(_state("1.0 1.0 ", settings), list("56"))
    assert lengths == {"5": False, "6": True}  # c <= 59.9 cannot reach the floor, 6x.x can
    assert _allowed(_state("1.0 1.0 6", settings), list("12.")) == {"1": False, "2": True, ".": False}
    alpha = _allowed(_state("4.0 4.0 4.0\n", settings), list("39"))  # 64 Å³ × V/abc >= 62.16 needs ~90°
    assert alpha == {"3": False, "9": True}
    gamma = _allowed(_state("4.0 4.0 4.0\n90 90 ", settings), list("678"))
    assert gamma == {"6": False, "7": True, "8": True}  # sin 69° · 64 < 62.16 <= sin 79° · 64
    assert lattice_volume((4.0, 4.0, 4.0), (90, 90, 79)) >= floor > lattice_volume((4.0, 4.0, 4.0), (90, 90, 69))
    # a second formula unit must fit too: 14 sites need 124.3 Å³, so in a 100 Å³ cell the 2nd Li is refused
    state = _state("10.0 10.0 1.0\n90 90 90\nLi\n0.00 0.00 0.00\n", settings)
    assert _allowed(state, ["Li", "Fe"]) == {"Li": False, "Fe": True}
    assert GuardSettings(1.2, formula).site_volume() == VOLUME_PER_SITE  # 1.2³/√2 = 1.22 is below the floor
    assert GuardSettings(3.0, formula).site_volume() == pytest.approx(3.0**3 / 2**0.5)


def test_angle_table_is_the_grammars(tmp_path):
    """The guard's model of the grammar's angle triples agrees with llama.cpp's engine on the real GBNF."""
    from tests.test_grammar import accepts

    from crystal_cli.bases import smollm2_gguf
    from crystal_cli.sampling.guard import _angle_tables
    from crystal_cli.sampling.llama_backend import LlamaModel

    _, lo, hi, _, _ = _angle_tables()
    rng = np.random.default_rng(3)
    with LlamaModel(smollm2_gguf(), vocab_only=True) as vocab:
        engine = vocab.grammar(crystal_gbnf(1))
        for a, b, g in rng.integers(1, 180, (120, 3)).tolist() + [[90, 90, 90], [60, 60, 60], [90, 90, 164]]:
            taken = accepts(vocab, engine, f"3.0 3.0 3.0\n{a} {b} {g}\nSi\n0.00 0.00 0.00")
            assert taken == bool(lo[a, b] <= g <= hi[a, b]), (a, b, g)
        engine.close()


# ----------------------------------------------------------------------------- sampling, end to end


def test_model_steered_to_repeat_a_position_never_does_under_the_guard(steered_gguf, tmp_path):
    shortest = {}
    for distance in (0.0, 0.5, 1.2):
        out = tmp_path / f"d{distance}.cif"
        summary = generate(_options(steered_gguf, out, spacegroup=1, n=6, temperature=1.0, top_p=1.0, min_distance=distance))
        rows = read_jsonl(out.with_suffix(".jsonl"))
        structures = _structures(out.with_suffix(".jsonl"))
        assert summary.ok + summary.failures["no_room"] == 6 and len(structures) == summary.ok >= 3
        assert {r["min_distance"] for r in rows} == {distance}
        shortest[distance] = [shortest_distance(s) for s in structures]
        if distance:  # every finished sample keeps the distance (a cell too small for it ends as no_room)
            assert all(d is not None and d >= distance for d in shortest[distance]), shortest
            assert sum(r["guard_masked"] > 0 for r in rows) >= 4
            assert summary.guard_masked == sum(r["guard_masked"] for r in rows)
        else:
            assert all(r["guard_masked"] == 0 for r in rows) and summary.ok == 6
    assert sum(d is not None and d < 0.5 for d in shortest[0.0]) >= 4  # the steering works: unguarded, it stacks atoms


def test_periodic_neighbour_is_kept_away_when_sampling(steered_gguf, tmp_path):
    off = generate(_options(steered_gguf, tmp_path / "off.cif", spacegroup=2, n=1, min_distance=0))
    on = generate(_options(steered_gguf, tmp_path / "on.cif", spacegroup=2, n=1))
    assert off.ok == on.ok == 1
    (unguarded,), (guarded,) = _structures(tmp_path / "off.jsonl"), _structures(tmp_path / "on.jsonl")
    assert shortest_distance(unguarded) == pytest.approx(0.06)  # 0.01 vs 0.99 through the boundary
    assert shortest_distance(guarded) >= 0.5
    assert guarded[1].frac_coords[0] == pytest.approx(0.99)  # the guard moved z instead (x alone could not)


def test_cell_too_small_for_the_next_site_ends_as_no_room(steered_gguf, tmp_path):
    from crystal_cli.sampling.llama_backend import BatchedSampler, Job, LlamaModel, SamplingSettings

    # the first site: 1 Å lattice vectors put every position within 1.2 Å of its own image
    out = tmp_path / "tiny.cif"
    summary = generate(_options(steered_gguf, out, spacegroup=3, n=3, min_distance=1.2))
    rows = read_jsonl(out.with_suffix(".jsonl"))
    assert summary.ok == 0 and summary.failures == {"no_room": 3} and summary.generated == 3
    assert {r["status"] for r in rows} == {"no_room"} and all(r["text"].startswith("1.0 1.0 1.0\n90 90 90") for r in rows)
    # the formula's second site in the 1 Å cube the model wants (no volume floor): no position 0.9 Å away
    formula = formula_constraint("NaCl", 2)
    with LlamaModel(steered_gguf, threads=1) as model:
        sampler = BatchedSampler(model, SamplingSettings(0.0, 1.0, max_new_tokens(2), 2, 1), crystal_gbnf(2, formula),
                                 GuardSettings(0.9, formula, volume_per_site=None))
        finished = list(sampler.run(NACL, [Job(0, 1), Job(1, 2)]))
        sampler.close()
    assert [f.failure for f in finished] == ["no_room", "no_room"]
    assert all(f.text == "1.0 1.0 1.0\n90 90 90\nNa\n0.00 0.00 0.00" and not f.ended for f in finished)
    # with the volume floor (the default) the lattice lines make room for the formula instead
    out = tmp_path / "nacl.cif"
    summary = generate(_options(steered_gguf, out, formula="NaCl", max_atoms=2, n=2, min_distance=0.9))
    structures = _structures(out.with_suffix(".jsonl"))
    assert summary.ok == 2 and all(s.composition.reduced_formula == "NaCl" for s in structures)
    assert all(s.volume >= 2 * VOLUME_PER_SITE and shortest_distance(s) >= 0.9 for s in structures)


def test_guard_off_reproduces_the_unguarded_sampler(tmp_path):
    """--min-distance 0 draws exactly what the sampler without a guard draws, and where the guard never
    binds (the random tiny model writes big cells) the guarded samples are the same texts too."""
    from crystal_cli.export import cached_export
    from crystal_cli.sampling.llama_backend import BatchedSampler, Job, LlamaModel, SamplingSettings, job_seed

    gguf = cached_export("tiny", "f16")
    texts = {}
    for distance in (0.0, 0.5):
        out = tmp_path / f"g{distance}.jsonl"
        generate(_options(gguf, out, n=12, max_atoms=8, temperature=1.0, top_p=1.0, seed=5, min_distance=distance))
        texts[distance] = {r["index"]: (r["text"], r["guard_masked"]) for r in read_jsonl(out)}
    with LlamaModel(gguf, threads=1) as model:
        sampler = BatchedSampler(model, SamplingSettings(1.0, 1.0, max_new_tokens(8), 4, 1), crystal_gbnf(8))
        plain = {f.index: f.text for f in sampler.run(codec.unconditional_prompt(), [Job(i, job_seed(5, i)) for i in range(12)])}
        sampler.close()
    assert {i: t for i, (t, _) in texts[0.0].items()} == plain
    unmasked = [i for i, (_, masked) in texts[0.5].items() if masked == 0]
    assert len(unmasked) >= 10 and all(texts[0.5][i][0] == plain[i] for i in unmasked)


def test_llama_cpp_and_transformers_mask_the_same_tokens(steered_run, steered_gguf):
    """Greedy decoding of the same weights under the guard: identical texts, masked-token counts and failures."""
    from crystal_cli.bases import smollm2_gguf
    from crystal_cli.models import load_trained
    from crystal_cli.sampling.hf_backend import HFSampler, load_vocab_grammar
    from crystal_cli.sampling.llama_backend import BatchedSampler, Job, LlamaModel, SamplingSettings

    nacl = formula_constraint("NaCl", 2)
    cases = [(REPEAT, crystal_gbnf(6), GuardSettings(0.5)), (IMAGE, crystal_gbnf(6), GuardSettings(1.2)),
             (NACL, crystal_gbnf(2, nacl), GuardSettings(0.5, nacl)),
             (NACL, crystal_gbnf(2, nacl), GuardSettings(0.9, nacl, volume_per_site=None))]
    settings = SamplingSettings(0.0, 1.0, max_new_tokens(6), 1, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    hf_model, tokenizer = load_trained(steered_run)
    try:
        with LlamaModel(steered_gguf, threads=1) as model:
            for prompt, gbnf, guard in cases:
                sampler = BatchedSampler(model, settings, gbnf, guard)
                (llama,) = sampler.run(prompt, [Job(0, 1)])
                sampler.close()
                engine, vocab = load_vocab_grammar(smollm2_gguf(), gbnf)
                hf = HFSampler(hf_model, tokenizer, settings, engine, vocab.end_tokens, guard, vocab.piece_texts())
                (reference,) = hf.run(prompt, [Job(0, 1)])
                engine.close()
                vocab.close()
                assert (llama.text, llama.guard_masked, llama.failure) == (reference.text, reference.guard_masked,
                                                                          reference.failure), guard
                assert llama.guard_masked > 0
    finally:
        torch.set_num_threads(threads)
    assert reference.failure == "no_room"  # the last case: both backends end the sample the same way


# ------------------------------------------------------------------------------------ options, refine


def test_bad_min_distance_is_one_line_exit_2(steered_gguf, tmp_path):
    from crystal_cli.cli import app

    runner = CliRunner()
    out = str(tmp_path / "out.cif")
    cases = [
        ["generate", "-m", str(steered_gguf), "-o", out, "--min-distance", "-1"],
        ["generate", "-m", str(steered_gguf), "-o", out, "--min-distance", "nan"],
        ["generate", "-m", str(steered_gguf), "-o", out, "--min-distance", "inf"],
        ["generate", "-m", str(steered_gguf), "-o", out, "--no-grammar", "--min-distance", "1"],
        ["flow", "pairs", str(tmp_path), "-o", str(tmp_path / "pairs"), "--perturb", "--min-distance", "-1"],
        ["refine", str(tmp_path), "-o", str(tmp_path / "r.cif"), "--min-distance", "nan"],
    ]
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output and "--min-distance" in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_refine_reports_samples_the_flow_left_too_close(tmp_path, structures):
    from pymatgen.core import Lattice, Structure

    from crystal_cli.flow.ode import refine_file
    from crystal_cli.flow.train import load_model
    from crystal_cli.models import FLOW, resolve_model
    from crystal_cli.structure_io import write_structures

    stacked = Structure(Lattice.cubic(4.0), ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.52]])
    source = tmp_path / "in.cif"
    write_structures(source, [("nacl", structures["NaCl"]), ("stacked", stacked), ("si", structures["Si"])], "cif")
    stats = refine_file(source, tmp_path / "out.jsonl", load_model(resolve_model("flow-default", FLOW)), steps=4)
    rows = [r for r in read_jsonl(tmp_path / "out.steps.jsonl") if r["status"] == "refined"]
    refined = _refined_structures(tmp_path / "out.jsonl")
    expected = sum(shortest_distance(s) < 0.5 for s in refined)
    assert stats["refined"] == 3 and stats["too_close"] == expected and stats["min_distance"] == 0.5
    assert [r["shortest_distance"] for r in rows] == pytest.approx([shortest_distance(s) for s in refined], abs=1e-4)
    assert refine_file(source, tmp_path / "far.jsonl", load_model(resolve_model("flow-default", FLOW)), steps=4,
                       min_distance=100.0)["too_close"] == 3


def _refined_structures(path) -> list:
    from crystal_cli.datasets import read_structures

    return [e.structure for e in read_structures(path)]
