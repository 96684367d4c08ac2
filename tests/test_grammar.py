"""The crystal GBNF grammar on llama.cpp's real grammar engine and SmolLM2's real vocabulary."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from tests.conftest import shared, simple_structures

from crystal_cli import codec
from crystal_cli.errors import CrystalError
from crystal_cli.grammar import crystal_gbnf, element_order, formula_constraint, int_range
from crystal_cli.sampling.llama_ctypes import CandidateArray


@pytest.fixture(scope="module")
def vocab():
    from crystal_cli.bases import smollm2_gguf
    from crystal_cli.sampling.llama_backend import LlamaModel

    model = LlamaModel(smollm2_gguf(), vocab_only=True)
    yield model
    model.close()


def accepts(vocab, engine, text: str, finished: bool = True) -> bool:
    """Does the grammar take `text` token by token (and allow end of text after it)?"""
    sampler = engine.new_sampler()
    candidates = CandidateArray(len(engine.shortlist))
    zeros = np.zeros(vocab.n_vocab, dtype=np.float32)
    position = {int(t): i for i, t in enumerate(engine.shortlist)}
    try:
        for token in vocab.tokenize(text, add_special=False) + ([vocab.end_tokens[0]] if finished else []):
            if token not in position:
                return False
            masked = engine.mask(sampler, candidates, zeros)
            if not np.isfinite(masked[position[token]]):
                return False
            if token not in vocab.end_tokens:
                engine.accept(sampler, token)
        return True
    finally:
        import llama_cpp

        llama_cpp.llama_sampler_free(sampler)


def _texts():
    structures = list(simple_structures().values())
    real = shared("mp_20", "train.csv.gz")
    if real is not None:
        from crystal_cli.datasets import read_structures

        structures += [e.structure for e in itertools.islice(read_structures(real), 40) if e.structure is not None]
    return [s for s in structures if len(s) <= 20]


def test_training_text_is_grammatical_unconditionally_and_under_its_own_formula(vocab):
    engine = vocab.grammar(crystal_gbnf(20))
    for structure in _texts():
        text = codec.encode_structure(structure)
        assert accepts(vocab, engine, text), text
        own = vocab.grammar(crystal_gbnf(20, formula_constraint(structure.composition.reduced_formula, 20)))
        assert accepts(vocab, own, text), text
        own.close()
    engine.close()


def test_grammar_rejects_out_of_range_numbers_and_wrong_compositions(vocab):
    engine = vocab.grammar(crystal_gbnf(4))
    good = "4.0 4.0 4.0\n90 90 90\nNa\n0.00 0.00 0.00\nCl\n0.50 0.50 0.50"
    assert accepts(vocab, engine, good)
    for bad in (
        good.replace("90 90 90", "90 90 180"),  # angle out of (0, 180)
        good.replace("90 90 90", "170 170 170"),  # angles enclosing no volume
        good.replace("0.50 0.50 0.50", "1.00 0.50 0.50"),  # coordinate outside [0, 1)
        good.replace("4.0 4.0 4.0", "0.0 4.0 4.0"),  # zero length
        good.replace("Cl\n", "Xx\n"),  # not an element
        good + "\nNa\n0.1 0.2 0.3",  # malformed coordinate
        good + "\nNa\n0.10 0.20 0.30" * 3,  # 5 sites > max atoms 4
    ):
        assert not accepts(vocab, engine, bad), bad
    assert not accepts(vocab, engine, good[:-5], finished=True)  # cut short: no end of text allowed
    li2o = vocab.grammar(crystal_gbnf(6, formula_constraint("Li2O", 6)))
    site = {el: f"\n{el}\n0.10 0.20 0.30" for el in ("Li", "O")}
    lattice = "4.6 4.6 4.6\n90 90 90"
    assert accepts(vocab, li2o, lattice + site["Li"] * 2 + site["O"])
    assert accepts(vocab, li2o, lattice + site["Li"] * 4 + site["O"] * 2)
    assert not accepts(vocab, li2o, lattice + site["O"] + site["Li"] * 2)  # not the training order
    assert not accepts(vocab, li2o, lattice + site["Li"] * 3 + site["O"])  # not a multiple of Li2O
    assert not accepts(vocab, li2o, lattice + site["Li"] * 6 + site["O"] * 3)  # 9 atoms > 6
    engine.close()
    li2o.close()


def test_angle_triples_the_grammar_takes_always_enclose_a_volume(vocab):
    engine = vocab.grammar(crystal_gbnf(1))
    rng = random.Random(0)
    triples = [(rng.randint(1, 179), rng.randint(1, 179), rng.randint(1, 179)) for _ in range(150)]
    triples += [(90, 90, 90), (90, 90, 120), (60, 60, 60), (9, 9, 9), (90, 90, 164), (161, 161, 26), (90, 125, 90)]
    taken = valid = 0
    for a, b, g in triples:
        is_valid = a + b + g < 360 and a < b + g and b < a + g and g < a + b
        valid += is_valid
        if accepts(vocab, engine, f"3.0 3.0 3.0\n{a} {b} {g}\nSi\n0.00 0.00 0.00"):
            taken += 1
            assert is_valid, (a, b, g)
    assert taken >= 0.75 * valid  # most valid triples (85 % over the whole cube), and the real patterns below
    for triple in triples[-7:]:
        assert accepts(vocab, engine, "3.0 3.0 3.0\n{} {} {}\nSi\n0.00 0.00 0.00".format(*triple))
    engine.close()


def test_int_range_and_formula_constraint():
    import re

    def as_regex(gbnf: str) -> re.Pattern:
        body = re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), gbnf).replace(" ", "")
        return re.compile(f"^(?:{body})$")

    for lo, hi in [(1, 179), (0, 9), (7, 12), (95, 105), (100, 179), (19, 91), (5, 5), (123, 456)]:
        pattern = as_regex(int_range(lo, hi))
        assert [i for i in range(1000) if pattern.match(str(i))] == list(range(lo, hi + 1))
    c = formula_constraint("OLi2", 7)
    assert (c.formula, c.elements, c.counts, c.max_multiple) == ("Li2O", ("Li", "O"), (2, 1), 2)
    assert element_order(["O", "P", "Fe", "Li"]) == ["Li", "Fe", "P", "O"]
    for bad, max_atoms in (("Xx2O", 20), ("Li2O)(", 20), ("LiFePO4", 6), ("Li0.5O", 20), ("", 20)):
        with pytest.raises(CrystalError):
            formula_constraint(bad, max_atoms)
