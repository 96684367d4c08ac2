#!/usr/bin/env bash
# Build runs/gpu-carry here (not on the device): what training/gpu/run.sh needs there and the device lacks.
#   bash training/gpu/prepare.sh            # ~1 min: wheels from PyPI, records gzipped, tokenizer, size check
#   bash training/gpu/prepare.sh --check    # also rehearse the device's Python side (cp312 wheels, its
#                                           # transformers/tokenizers) in a Python 3.12 venv under /tmp (~4 min once)
# runs/ is git-ignored, so runs/gpu-carry may be named in the device tool's `carry` list as it is.
#   wheels/            cp312 manylinux wheels of pymatgen-core and what `import pymatgen.core` needs that the
#                      device image lacks (its package list: /work/.library/device/KINDS.md), the versions of .venv
#   records/           train.jsonl.gz, val.jsonl.gz of runs/data/mp20-open (46 MB of text -> ~2 MB)
#   tokenizer.tar.gz   SmolLM2's fixed tokenizer from the base cache (the 98 MB GGUF it comes from stays here)
#   manifest.json      sources, sha256 of the uncompressed records, wheel names, git HEAD
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RECORDS=${CRYSTAL_GPU_RECORDS:-runs/data/mp20-open}
CARRY=${CRYSTAL_GPU_CARRY:-runs/gpu-carry}
WHEELS="pymatgen-core monty ruamel.yaml orjson spglib uncertainties palettable"
LIMIT_MIB=62  # the device tool's 64 MiB for the working tree plus carried paths, less a margin

for f in train.jsonl val.jsonl; do
    [ -s "$RECORDS/$f" ] || { echo "prepare.sh: $RECORDS/$f missing (make corpus)" >&2; exit 1; }
done
tmp="$CARRY.tmp"
rm -rf "$tmp"
mkdir -p "$tmp/wheels" "$tmp/records"

pins=$($PY -c 'import importlib.metadata as m, sys; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $WHEELS)
echo "prepare.sh: cp312 wheels of $pins"
platforms=""
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_24 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
    platforms="$platforms --platform ${p}_x86_64"
done
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d "$tmp/wheels" $pins

for f in train val; do
    gzip -6 -c "$RECORDS/$f.jsonl" > "$tmp/records/$f.jsonl.gz"
done
[ -f "$RECORDS/stats.json" ] && cp "$RECORDS/stats.json" "$tmp/records/"

tokenizer=$($PY -c 'from crystal_cli.runtime import configure_process; configure_process()
from crystal_cli.bases import smollm2_tokenizer; print(smollm2_tokenizer())')
tar czf "$tmp/tokenizer.tar.gz" -C "$(dirname "$tokenizer")" "$(basename "$tokenizer")"

$PY - "$tmp" "$RECORDS" <<'EOF'
import hashlib, json, subprocess, sys, time
from pathlib import Path
tmp, records = Path(sys.argv[1]), sys.argv[2]
def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()
manifest = {
    "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "git_head": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "records": {"source": records, **{s: {"sha256": sha(f"{records}/{s}.jsonl"),
                                          "lines": sum(1 for _ in open(f"{records}/{s}.jsonl"))} for s in ("train", "val")}},
    "wheels": sorted(p.name for p in (tmp / "wheels").glob("*.whl")),
}
(tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
EOF
rm -rf "$CARRY"
mv "$tmp" "$CARRY"

# What travels: tracked and untracked-not-ignored files of the working tree, plus the carried paths.
tree=$(git ls-files -z --cached --others --exclude-standard | $PY -c 'import os, sys
print(sum(os.path.getsize(p) for p in sys.stdin.read().split("\0") if p and os.path.isfile(p)))')
carry=$(du -sb "$CARRY" | cut -f1)
total=$(( (tree + carry) / 1048576 ))
echo "prepare.sh: $CARRY is $((carry / 1024)) KiB; working tree $((tree / 1048576)) MiB; together $total MiB of the tool's 64"
if [ "$total" -gt "$LIMIT_MIB" ]; then
    echo "prepare.sh: over ${LIMIT_MIB} MiB: the run call would be refused (drop untracked files, or carry less)" >&2
    exit 1
fi

[ "${1:-}" = "--check" ] || exit 0

# Rehearse the device's Python side: Python 3.12 with packages the device image has (numpy, scipy, ...,
# transformers 5.17.0 / tokenizers 0.23.2 as KINDS.md lists them; no torch), the carried wheels installed as
# run.sh does, then the codec on real records and tokenisation compared with .venv's.
py312=${PY312:-$(command -v python3.12 || ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1 || true)}
[ -x "$py312" ] || { echo "prepare.sh --check: no python3.12 found (set PY312)" >&2; exit 1; }
venv=/tmp/crystal-gpu-py312
if [ ! -x "$venv/bin/python" ]; then
    "$py312" -m venv "$venv"
    "$venv/bin/pip" install -q numpy scipy networkx sympy tabulate tqdm pandas matplotlib joblib lxml requests \
        typing-extensions pyparsing transformers==5.17.0 tokenizers==0.23.2 huggingface_hub==1.33.0 safetensors
fi
site=$(mktemp -d /tmp/crystal-gpu-site.XXXX)
"$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$CARRY"/wheels/*.whl
check=$(mktemp /tmp/crystal-gpu-check.XXXX.py)
cat > "$check" <<'EOF'
import gzip, hashlib, json, sys
import numpy as np
from crystal_cli import codec, grammar  # noqa: F401  (pymatgen.core from the carried wheels)
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
records = [json.loads(line) for _, line in zip(range(600), gzip.open(sys.argv[2], "rt"))]
rng, digest, crystals = np.random.default_rng(0), hashlib.sha256(), 0
for r in records:
    if r.get("task") != "infill":
        parsed = codec.parse_crystal(r["completion"])
        assert parsed.ok, r["completion"][:60]
        codec.encode_structure(codec.translate(parsed.structure, rng))
        crystals += 1
    digest.update(json.dumps([tok(r["prompt"])["input_ids"], tok(r["completion"], add_special_tokens=False)["input_ids"]]).encode())
digest.update(json.dumps(tok.batch_decode([[i] for i in range(len(tok))])).encode())
import transformers
print(sys.version.split()[0], transformers.__version__, crystals, digest.hexdigest())
EOF
tokdir=$(mktemp -d /tmp/crystal-gpu-tok.XXXX)
tar xzf "$CARRY/tokenizer.tar.gz" -C "$tokdir"
here=$(PYTHONPATH=$PWD $PY "$check" "$tokdir/smollm2-135m-tokenizer" "$CARRY/records/train.jsonl.gz" | tail -1)
there=$(PYTHONPATH="$site:$PWD" "$venv/bin/python" "$check" "$tokdir/smollm2-135m-tokenizer" "$CARRY/records/train.jsonl.gz" | tail -1)
rm -rf "$site" "$check" "$tokdir"
echo "prepare.sh --check: .venv        $here"
echo "prepare.sh --check: device-like  $there"
[ -n "$there" ] && [ "${here##* }" = "${there##* }" ] || { echo "prepare.sh --check: FAILED (imports or tokenisation differ)" >&2; exit 1; }
echo "prepare.sh --check: ok (carried wheels import, codec round-trips, same token ids)"
