"""Base models: the fixed SmolLM2 tokenizer matches llama.cpp token for token, the converted SmolLM2 base is a
plain trainable model that agrees with llama.cpp, the tiny base is deterministic, and bad bases fail in one line."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from crystal_cli import bases, codec
from crystal_cli.errors import CrystalError
from tests.conftest import shared, simple_structures

N_STRINGS = 240


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """>= 200 crystal texts: real MP-20 rows when ../shared/data is present, translated pymatgen cells otherwise,
    plus the prompts and a few hand-made strings with runs of spaces before digits (the case that broke)."""
    from crystal_cli.datasets import read_structures

    structures = []
    source = shared("mp_20", "val.csv.gz")
    if source is not None:
        for entry in read_structures(source):
            if entry.structure is not None:
                structures.append(entry.structure)
            if len(structures) == N_STRINGS:
                break
    rng = np.random.default_rng(0)
    while len(structures) < N_STRINGS:
        structures += [codec.translate(s, rng) for s in simple_structures().values()]
    texts = [codec.encode_structure(s) for s in structures[:N_STRINGS]]
    texts += [codec.unconditional_prompt(), codec.conditional_prompt({"formula": "LiFePO4", "spacegroup": 62})]
    texts += ["10.5  3.2   4.0\n90  90  120\nNa\n  0.50 0.25 0.75", "Fe2O3 123456 0.001  12"]
    return texts


@pytest.fixture(scope="module")
def tokenizers():
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(bases.smollm2_tokenizer()))
    llama = Llama(model_path=str(bases.smollm2_gguf()), vocab_only=True, verbose=False)
    return hf, llama


def test_transformers_and_llama_cpp_tokenize_crystals_identically(tokenizers, texts):
    hf, llama = tokenizers
    assert len(texts) >= 200
    mismatched = [t for t in texts if hf(t, add_special_tokens=False)["input_ids"] != llama.tokenize(t.encode(), add_bos=False, special=False)]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} differ, first: {mismatched[0]!r}"
    # the prompt exactly as training sees it (special tokens per the tokenizer's config) = llama.cpp's default
    prompt = codec.unconditional_prompt()
    assert hf(prompt)["input_ids"] == llama.tokenize(prompt.encode())
    assert hf.pad_token_id == hf.eos_token_id == llama.token_eos()


def test_the_digit_fix_is_what_makes_them_agree(tokenizers, texts):
    """Without the smollm pre-tokenizer (transformers' plain ByteLevel rebuild) crystal text tokenizes differently."""
    from tokenizers import pre_tokenizers

    hf, llama = tokenizers
    plain = hf.backend_tokenizer.__class__.from_str(hf.backend_tokenizer.to_str())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    differ = sum(plain.encode(t, add_special_tokens=False).ids != llama.tokenize(t.encode(), add_bos=False, special=False)
                 for t in texts)
    assert differ > 0


def test_smollm2_base_is_plain_trainable_and_matches_llama_cpp():
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    base = bases.resolve_base(None)
    assert base == bases.resolve_base("smollm2-135m") == bases.cache_dir() / "bases" / "smollm2-135m"
    config = json.loads((base / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    provenance = json.loads((base / bases.PROVENANCE).read_text())
    assert provenance["pre_tokenizer"] == "smollm" and bases.source_gguf(base) == bases.smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    assert getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    # next-token predictions of the dequantized model agree with llama.cpp running the Q4_1 GGUF
    text = codec.unconditional_prompt() + codec.encode_structure(simple_structures()["CsCl"])
    llama = Llama(model_path=str(bases.smollm2_gguf()), n_ctx=512, logits_all=True, verbose=False, use_extra_bufts=False)
    ids = llama.tokenize(text.encode())
    llama.eval(ids)
    cpp_top = np.argmax(np.asarray(llama.scores[: len(ids)]), axis=-1)
    with torch.no_grad():
        hf_top = model(torch.tensor([ids])).logits[0].argmax(-1).numpy()
    assert np.mean(cpp_top == hf_top) > 0.9


def test_tiny_base_is_deterministic_and_built_atomically(tmp_path, monkeypatch):
    from transformers import AutoConfig

    cached = bases.resolve_base("tiny")
    config = AutoConfig.from_pretrained(str(cached))
    assert config.model_type == "llama" and config.num_hidden_layers == 4 and config.vocab_size == 49152
    # a fresh cache (tokenizer copied in, not rebuilt): two concurrent resolutions, one identical build
    fresh = tmp_path / "cache"
    tokenizer_dir = bases.smollm2_tokenizer()
    shutil.copytree(tokenizer_dir, fresh / "bases" / tokenizer_dir.name)
    monkeypatch.setenv("CRYSTAL_CACHE", str(fresh))
    with ThreadPoolExecutor(2) as pool:
        built = list(pool.map(bases.resolve_base, ["tiny", "tiny"]))
    assert built[0] == built[1] == fresh / "bases" / "tiny"
    assert sorted(p.name for p in (fresh / "bases").iterdir() if not p.name.startswith(".")) == [tokenizer_dir.name, "tiny"]
    assert not [p for p in (fresh / "bases").iterdir() if p.is_dir() and p.name.startswith(".")]  # no temp dirs left
    mine, reference = load_file(built[0] / "model.safetensors"), load_file(cached / "model.safetensors")
    assert mine.keys() == reference.keys() and all(torch.equal(mine[k], reference[k]) for k in mine)


def test_bad_bases_fail_in_one_line(tmp_path):
    with pytest.raises(CrystalError, match="not a known base"):
        bases.resolve_base("llama-70b")
    with pytest.raises(CrystalError, match="no config.json"):
        bases.resolve_base(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CrystalError, match="not llama-family"):
        bases.resolve_base(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CrystalError, match="no model.safetensors"):
        bases.resolve_base(tmp_path)
    text_file = tmp_path / "weights.bin"
    text_file.write_text("x")
    with pytest.raises(CrystalError, match="must be a .gguf"):
        bases.resolve_base(text_file)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(CrystalError, match="not a readable GGUF"):
        bases.resolve_base(fake)
    assert bases.resolve_base(bases.resolve_base("tiny")) == bases.resolve_base("tiny")  # an HF dir is accepted


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CRYSTAL_CACHE", str(tmp_path))
    assert bases.cache_dir() == tmp_path
    monkeypatch.delenv("CRYSTAL_CACHE")
    assert bases.cache_dir().parts[-2:] == (".cache", "crystal")
