"""`crystal export`: a finetune run (base + LoRA adapter) or a base -> a GGUF that llama.cpp loads.

Written with the `gguf` package's GGUFWriter, no llama.cpp conversion scripts: tensor names through
gguf.TensorNameMap, the q/k rows permuted the way convert_hf_to_gguf.py does for llama (llama.cpp's rope
pairs rows differently from transformers'), and the tokenizer metadata copied from the GGUF the base was
built from, so llama.cpp tokenizes exactly as the base did. Quantized types are made from the float GGUF
with llama.cpp's own quantizer. `adapter_only` writes a GGUF LoRA adapter (general.type = adapter) that
llama.cpp applies at run time on the base GGUF.

Exports of run directories used by `crystal generate` are cached under cache_dir()/exports, keyed by a
hash of the adapter, the base's identity and the type, and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crystal_cli.errors import CrystalError
from crystal_cli.files import sha256_file
from crystal_cli.runs import atomic_path

QUANTS = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_k_m": 15}  # name -> llama_ftype
EXPORT_VERSION = 1  # bump when the written GGUF changes, so cached exports are rebuilt
AUTO_F32_MAX_BYTES = 2 * 1024**3  # base weights up to this size are exported as f32 by quant "auto"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    quant: str
    adapter_only: bool
    tensors: int
    bytes: int
    base_gguf: Path | None  # the GGUF an adapter applies to (adapter_only) / the tokenizer source


@dataclass(frozen=True)
class _Source:
    """What an export reads: a base directory and, for runs, the PEFT adapter directory."""

    base_dir: Path
    adapter_dir: Path | None
    tokenizer_gguf: Path


def _resolve_source(source: str | Path) -> _Source:
    from crystal_cli.bases import resolve_base, smollm2_gguf, source_gguf
    from crystal_cli.models import is_run_dir, load_run

    if is_run_dir(source):
        info = load_run(source)
        base_dir, adapter_dir = info.base_dir, info.adapter_dir
    elif Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise CrystalError(f"{source}: not a finetune run directory (no config.json naming its base) "
                           "nor a transformers model directory")
    else:
        base_dir, adapter_dir = resolve_base(source), None
    return _Source(base_dir, adapter_dir, source_gguf(base_dir) or smollm2_gguf())


def _check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise CrystalError(f"--quant {quant!r}: choose from {', '.join(QUANTS)}")


def export(source: str | Path, output: str | Path, quant: str = "f16", adapter_only: bool = False,
           overwrite: bool = False) -> ExportResult:
    """Write `output` (.gguf): merged model in `quant`, or with adapter_only the LoRA adapter alone. An existing
    file is replaced only when crystal wrote it (an export manifest beside it lists it), or with overwrite."""
    from crystal_cli.runs import claim, record_outputs

    _check_quant(quant)
    output = Path(output)
    claim((output,), "export", overwrite)
    if not output.parent.is_dir():
        raise CrystalError(f"{output}: directory {output.parent} does not exist")
    if output.suffix != ".gguf":
        raise CrystalError(f"{output}: the output name must end in .gguf")
    resolved = _resolve_source(source)
    if adapter_only and resolved.adapter_dir is None:
        raise CrystalError(f"{source}: --adapter-only needs a LoRA finetune run directory (config.json + adapter/)")
    with atomic_path(output) as tmp:
        if adapter_only:
            tensors = _write_adapter(resolved, tmp, "f32" if quant == "f32" else "f16")
        else:
            tensors = _write_model(resolved, tmp, quant)
    record_outputs("export", (output,), {"source": str(source), "quant": quant, "adapter_only": adapter_only})
    return ExportResult(output, quant, adapter_only, tensors, output.stat().st_size, resolved.tokenizer_gguf)


def auto_quant(source: _Source) -> str:
    """f32 for small models, q8_0 for large ones.

    Batched decoding of a small model on CPU is compute-bound, and llama.cpp's f32 GEMM outran its q8_0
    kernels (SmolLM2-135M, 32 sequences, 2 AVX2 cores: 0.72 vs 0.55 structures/s, bench/sampling.py); f32
    also keeps the exact weights the model was trained in. Large models need q8_0's memory savings.
    """
    size = sum(p.stat().st_size for p in source.base_dir.glob("*.safetensors"))
    return "f32" if size <= AUTO_F32_MAX_BYTES else "q8_0"


def resolve_quant(source: str | Path, quant: str = "auto") -> str:
    """The weight type cached_export writes for `source`: `quant` itself, or what "auto" picks for it."""
    return auto_quant(_resolve_source(source)) if quant == "auto" else quant


def cached_export(source: str | Path, quant: str = "auto") -> Path:
    """The merged GGUF of a run or base, exported once per content (cache_dir()/exports/KEY/model.gguf)."""
    from crystal_cli.bases import cache_dir

    resolved = _resolve_source(source)
    quant = auto_quant(resolved) if quant == "auto" else quant
    _check_quant(quant)
    target = cache_dir() / "exports" / _content_key(resolved, quant) / f"model-{quant}.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        export(source, target, quant)
    return target


def _content_key(source: _Source, quant: str) -> str:
    digest = hashlib.sha256(f"v{EXPORT_VERSION} {quant}".encode())
    for directory in (source.base_dir, source.adapter_dir):
        if directory is None:
            continue
        for path in sorted(directory.iterdir()):
            if path.suffix in (".json", ".safetensors") and path.is_file():
                digest.update(path.name.encode())
                digest.update(sha256_file(path).encode())
    return digest.hexdigest()[:24]


# ------------------------------------------------------------------------------------ tensors and names


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' rotate-half row order -> llama.cpp's interleaved rope order (convert_hf_to_gguf.py)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hparams(config) -> dict:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    return {
        "n_layer": config.num_hidden_layers,
        "n_head": config.num_attention_heads,
        "n_kv_head": config.num_key_value_heads,
        "head_dim": head_dim,
        "rope_theta": float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
    }


def _gguf_tensors(state: dict, config, name_map) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight of a llama-family state dict."""
    hp = _hparams(config)
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if "rotary_emb" in name:
            continue
        array = tensor.detach().to("cpu").float().numpy()
        if name.endswith("self_attn.q_proj.weight"):
            array = permute_qk(array, hp["n_head"])
        elif name.endswith("self_attn.k_proj.weight"):
            array = permute_qk(array, hp["n_kv_head"])
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise CrystalError(f"export: no GGUF name for tensor {name!r} (unsupported architecture?)")
        yield gguf_name, array


def _copy_tokenizer(writer, tokenizer_gguf: Path) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(tokenizer_gguf)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main, sub)


def _load_merged(source: _Source):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # library code never prints
    model = AutoModelForCausalLM.from_pretrained(str(source.base_dir), dtype=torch.float32)
    if source.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source.adapter_dir)).merge_and_unload()
    return model.eval()


def _write_model(source: _Source, path: Path, quant: str) -> int:
    import gguf

    model = _load_merged(source)
    config = model.config
    if config.model_type != "llama":
        raise CrystalError(f"export: model_type {config.model_type!r} is not supported (llama only)")
    hp = _hparams(config)
    float_type = "f32" if quant == "f32" else "f16"
    float_path = path if quant in ("f32", "f16") else path.with_name(path.name + ".f16")
    writer = gguf.GGUFWriter(str(float_path), "llama")
    writer.add_name(source.adapter_dir.parent.name if source.adapter_dir else source.base_dir.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(hp["n_layer"])
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_kv_head"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_key_length(hp["head_dim"])
    writer.add_value_length(hp["head_dim"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(QUANTS[float_type])
    _copy_tokenizer(writer, source.tokenizer_gguf)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["n_layer"])
    count = 0
    for name, array in _gguf_tensors(model.state_dict(), config, name_map):
        if float_type == "f16" and array.ndim == 2:
            array = array.astype(np.float16)
        writer.add_tensor(name, array)
        count += 1
    del model
    _finish(writer)
    if float_path != path:
        try:
            _quantize(float_path, path, quant)
        finally:
            float_path.unlink(missing_ok=True)
    return count


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _quantize(source: Path, target: Path, quant: str) -> None:
    from crystal_cli.runtime import quiet_llama_cpp

    llama_cpp = quiet_llama_cpp()

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant]
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise CrystalError(f"export: llama.cpp could not quantize to {quant}")


def _write_adapter(source: _Source, path: Path, float_type: str) -> int:
    """PEFT adapter -> GGUF LoRA: blk.N.<tensor>.weight.lora_a (r × in) and .lora_b (out × r, q/k permuted)."""
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    adapter_dir = source.adapter_dir
    lora_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if lora_config.get("use_rslora") or lora_config.get("use_dora"):
        raise CrystalError(f"{adapter_dir}: rsLoRA/DoRA adapters cannot be written as GGUF LoRA")
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise CrystalError(f"{adapter_dir}: no adapter_model.safetensors")
    config = AutoConfig.from_pretrained(str(source.base_dir))
    hp = _hparams(config)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["n_layer"])
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, array in load_file(str(weights_file)).items():
        if ".lora_A." in name or ".lora_B." in name:
            part = "lora_a" if ".lora_A." in name else "lora_b"
            base_name = name.replace("base_model.model.", "", 1).replace(".lora_A", "").replace(".lora_B", "")
            pairs.setdefault(base_name, {})[part] = array.astype(np.float32)
        else:
            raise CrystalError(f"{weights_file}: tensor {name!r} is not a LoRA A/B matrix (embeddings cannot be exported)")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora_config["lora_alpha"]))
    count = 0
    for base_name, parts in sorted(pairs.items()):
        a, b = parts["lora_a"], parts["lora_b"]
        if base_name.endswith("self_attn.q_proj.weight"):
            b = permute_qk(b, hp["n_head"])
        elif base_name.endswith("self_attn.k_proj.weight"):
            b = permute_qk(b, hp["n_kv_head"])
        gguf_name = name_map.get_name(base_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise CrystalError(f"{weights_file}: no GGUF name for {base_name!r}")
        for suffix, array in (("lora_a", a), ("lora_b", b)):
            writer.add_tensor(f"{gguf_name}.{suffix}", array.astype(np.float16) if float_type == "f16" else array)
            count += 1
    _finish(writer)
    return count


def gguf_quant(path: str | Path) -> str:
    """The weight type of a model GGUF by the names of --quant (its general.file_type), or "ftype N"."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return "unknown"
    ftype = int(field.contents())
    return next((name for name, value in QUANTS.items() if value == ftype), f"ftype {ftype}")


def check_gguf_model(path: str | Path) -> str:
    """general.type of a GGUF file ('model' or 'adapter'); CrystalError if it is not a GGUF at all."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise CrystalError(f"{path}: no such file")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError/struct errors on non-GGUF bytes
        raise CrystalError(f"{path}: not a GGUF file ({str(exc)[:80]})") from None
    field = reader.fields.get("general.type")
    kind = field.contents() if field is not None else "model"
    architecture = reader.fields.get("general.architecture")
    if architecture is None:
        raise CrystalError(f"{path}: GGUF without general.architecture, not a model")
    return str(kind)
