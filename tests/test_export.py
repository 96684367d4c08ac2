"""crystal export on the tiny base with a real PEFT LoRA adapter: llama.cpp must decode what transformers does."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from crystal_cli import codec
from crystal_cli.errors import CrystalError

GREEDY_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finetune-run directory (config.json + PEFT adapter/) on the tiny base, with non-zero LoRA weights."""
    from peft import LoraConfig, get_peft_model

    from crystal_cli.bases import resolve_base
    from crystal_cli.models import load_base

    base_dir = resolve_base("tiny")
    model, _ = load_base(base_dir, "cpu", torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which would make the adapter a no-op
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    run = tmp_path_factory.mktemp("run")
    peft_model.save_pretrained(run / "adapter")
    (run / "config.json").write_text(json.dumps({"base": str(base_dir), "base_spec": "tiny"}))
    return run


def _transformers_greedy(run, prompt: str) -> list[int]:
    from crystal_cli.models import load_trained

    model, tokenizer = load_trained(run)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, do_sample=False, max_new_tokens=GREEDY_TOKENS, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def _llama_greedy(gguf, prompt: str, adapter=None, parallel: int = 2) -> list[list[int]]:
    from crystal_cli.sampling.llama_backend import BatchedSampler, Job, LlamaModel, SamplingSettings

    with LlamaModel(gguf, adapter, threads=1) as model:  # the shared test host is oversubscribed
        settings = SamplingSettings(temperature=0.0, max_new_tokens=GREEDY_TOKENS, parallel=parallel)
        sampler = BatchedSampler(model, settings, None)
        finished = sorted(sampler.run(prompt, [Job(i, i) for i in range(parallel)]), key=lambda f: f.index)
        sampler.close()
        return [model.tokenize(f.text, add_special=False) for f in finished]


def test_f32_export_decodes_the_same_greedy_tokens_as_transformers(tiny_run, tmp_path):
    from crystal_cli.export import export

    prompt = codec.conditional_prompt({"formula": "NaCl"})
    result = export(tiny_run, tmp_path / "tiny.gguf", "f32")
    assert result.tensors > 0 and result.path.is_file()
    expected = _transformers_greedy(tiny_run, prompt)
    for tokens in _llama_greedy(result.path, prompt):  # two sequences in one batch
        assert tokens == expected[: len(tokens)] and len(tokens) >= GREEDY_TOKENS - 1


def test_adapter_only_export_applies_on_the_base_gguf(tiny_run, tmp_path):
    from crystal_cli.export import export

    prompt = codec.unconditional_prompt()
    base = export("tiny", tmp_path / "base.gguf", "f32")
    adapter = export(tiny_run, tmp_path / "run.lora.gguf", "f32", adapter_only=True)
    assert adapter.tensors == 2 * 7 * 4  # A and B for 7 projections x 4 layers
    expected = _transformers_greedy(tiny_run, prompt)
    (tokens,) = _llama_greedy(base.path, prompt, adapter=adapter.path, parallel=1)
    assert tokens == expected[: len(tokens)]
    (bare,) = _llama_greedy(base.path, prompt, parallel=1)
    assert bare != tokens  # the adapter really changes the model


def test_q8_0_export_survives_batched_multi_token_prompts(tiny_run, tmp_path):
    """The AMX trap: quantized matmuls over batches of >= 2 tokens (prompt and 4 parallel sequences)."""
    from crystal_cli.export import export

    result = export(tiny_run, tmp_path / "tiny-q8.gguf", "q8_0")
    f32 = export(tiny_run, tmp_path / "tiny-f32.gguf", "f32")
    assert result.bytes < f32.bytes
    runs = _llama_greedy(result.path, codec.conditional_prompt({"formula": "LiFePO4", "spacegroup": 62}), parallel=4)
    assert len(runs) == 4 and all(len(r) > 0 for r in runs)
    assert all(r == runs[0] for r in runs)  # greedy: batching must not change a sequence


def test_export_bad_input_is_one_line_exit_2(tiny_run, tmp_path):
    from crystal_cli.cli import app
    from crystal_cli.export import export

    runner = CliRunner()
    for args in (
        [str(tiny_run), "-o", str(tmp_path / "missing" / "x.gguf")],
        [str(tiny_run), "-o", str(tmp_path / "x.gguf"), "--quant", "q3"],
        [str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.gguf")],
        ["tiny", "-o", str(tmp_path / "x.gguf"), "--adapter-only"],
    ):
        result = runner.invoke(app, ["export", *args])
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(CrystalError):
        export(tiny_run, tmp_path / "x.bin", "f16")


def test_cached_export_is_reused(tiny_run):
    from crystal_cli.export import cached_export

    first = cached_export(tiny_run, "f16")
    stamp = first.stat().st_mtime_ns
    assert cached_export(tiny_run, "f16") == first and first.stat().st_mtime_ns == stamp
