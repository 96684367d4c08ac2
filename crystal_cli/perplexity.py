"""Per-structure perplexity of crystal text under a model, and Crystal-LLM's translation-symmetry metric.

Perplexity is exp(mean NLL) of the completion tokens (plus EOS) given the prompt, the quantity the model was
trained on, so candidates can be scored and ranked. IPT (increase in perplexity under translation, Gruver
et al. 2024) is the mean over random translations t of PPL(t(s)) minus the lowest perplexity seen among the
structure and its translations: 0 for a model that is perfectly translation invariant.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from crystal_cli import codec
from crystal_cli.errors import CrystalError
from crystal_cli.finetune.data import NON_CRYSTAL_TASKS, Example, collate, tokenize_completion
from crystal_cli.finetune.model import completion_nll
from crystal_cli.models import load_trained


@dataclass(frozen=True)
class Item:
    """One thing to score: a prompt and its completion (a crystal unless the task says otherwise)."""

    id: str
    task: str
    prompt: str
    completion: str
    crystal: bool


@dataclass
class Scored:
    id: str
    task: str
    tokens: int  # completion tokens incl. EOS
    perplexity: float
    ipt: float | None  # None when not a crystal or no translations were asked for
    translated: list[float] = field(default_factory=list)  # perplexities of the translated copies


@dataclass
class PerplexityReport:
    items: list[Scored]
    skipped: dict[str, int]
    translations: int

    @property
    def mean_perplexity(self) -> float | None:
        return float(np.mean([s.perplexity for s in self.items])) if self.items else None

    @property
    def mean_ipt(self) -> float | None:
        values = [s.ipt for s in self.items if s.ipt is not None]
        return float(np.mean(values)) if values else None


def _is_records_file(path: Path) -> bool:
    with path.open() as handle:
        first = handle.readline()
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and "prompt" in row and "completion" in row


def load_items(source: str | Path, split: str = "val", limit: int | None = None) -> tuple[list[Item], Counter]:
    """Records (a jsonl file, or SPLIT.jsonl of a records dir) or any structure dataset crystal reads
    (CIFs, csv, extxyz, samples.jsonl), the latter scored under the unconditional prompt."""
    from crystal_cli.datasets import read_structures

    source = Path(source)
    if not source.exists():
        raise CrystalError(f"{source}: no such file or directory")
    skipped: Counter = Counter()
    records_file = source / f"{split}.jsonl" if source.is_dir() else source
    if source.is_dir() and (source / "train.jsonl").is_file() and not records_file.is_file():
        raise CrystalError(f"{source}: records directory has no {split}.jsonl (choose --split)")
    items: list[Item] = []
    if records_file.is_file() and records_file.suffix == ".jsonl" and _is_records_file(records_file):
        from crystal_cli.finetune.data import read_records

        for record in read_records(records_file):
            if limit is not None and len(items) >= limit:
                break
            task = record.get("task", "unconditional")
            items.append(Item(str(record.get("id", len(items))), task, record["prompt"], record["completion"],
                              task not in NON_CRYSTAL_TASKS))
        return items, skipped
    prompt = codec.unconditional_prompt()
    for entry in read_structures(source):
        if limit is not None and len(items) >= limit:
            break
        if entry.structure is None:
            skipped[entry.error or "unreadable"] += 1
            continue
        try:
            text = codec.encode_structure(entry.structure)
        except ValueError:
            skipped["disordered"] += 1
            continue
        items.append(Item(entry.id, "unconditional", prompt, text, True))
    if not items:
        raise CrystalError(f"{source}: nothing to score" + (f" ({dict(skipped)})" if skipped else ""))
    return items, skipped


def variants(item: Item, translations: int, rng: np.random.Generator) -> list[str]:
    """The completion followed by `translations` randomly translated copies (crystals that parse only)."""
    if not item.crystal or translations == 0:
        return [item.completion]
    parsed = codec.parse_crystal(item.completion)
    if not parsed.ok:
        return [item.completion]
    return [item.completion] + [codec.encode_structure(codec.translate(parsed.structure, rng)) for _ in range(translations)]


def perplexity(
    model_spec: str | Path,
    source: str | Path,
    translations: int = 4,
    seed: int = 0,
    batch_size: int = 8,
    split: str = "val",
    limit: int | None = None,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityReport:
    """Score every item of `source` under a finished run directory (or a bare base spec)."""
    if translations < 0 or batch_size < 1:
        raise CrystalError("--translations must be >= 0 and --batch-size >= 1")
    items, skipped = load_items(source, split, limit)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_trained(model_spec, device=device)
    max_length = getattr(model.config, "max_position_embeddings", None) or 2048
    rng = np.random.default_rng(seed)
    examples: list[tuple[int, int, Example]] = []  # (item, variant, example)
    for index, item in enumerate(items):
        prompt_ids = tokenizer(item.prompt)["input_ids"]
        for variant, text in enumerate(variants(item, translations, rng)):
            example = Example(prompt_ids, text, tokenize_completion(tokenizer, text), item.crystal)
            if example.length <= max_length:
                examples.append((index, variant, example))
    per_variant: dict[int, dict[int, float]] = {}  # item -> variant -> perplexity
    token_counts: dict[int, int] = {}
    totals = summed_nll(model, [e for _, _, e in examples], tokenizer.pad_token_id, batch_size, device, progress)
    for (index, variant, example), total in zip(examples, totals):
        per_variant.setdefault(index, {})[variant] = math.exp(total / len(example.completion_ids))
        token_counts.setdefault(index, len(example.completion_ids))
    scored = []
    for index, item in enumerate(items):
        found = per_variant.get(index, {})
        if 0 not in found:
            skipped["longer_than_model_context"] += 1
            continue
        translated = [found[v] for v in sorted(found) if v > 0]
        ipt = float(np.mean(translated) - min(found.values())) if translated else None
        scored.append(Scored(item.id, item.task, token_counts[index], found[0], ipt, translated))
    return PerplexityReport(scored, dict(skipped), translations)


def summed_nll(model, examples: list[Example], pad_id: int, batch_size: int = 8, device: str = "cpu",
               progress: Callable[[int, int], None] | None = None) -> list[float]:
    """Each example's completion NLL (nats, its completion tokens and EOS summed; full-vocabulary softmax), in
    the examples' order, scored in batches of similar lengths."""
    order = sorted(range(len(examples)), key=lambda k: examples[k].length)
    totals = [0.0] * len(examples)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([examples[k] for k in chunk], pad_id).items()}
            nll, rows = completion_nll(model, batch)
            sums = torch.zeros(len(chunk), dtype=torch.float64, device=nll.device).index_add_(0, rows, nll.double())
            for k, total in zip(chunk, sums.tolist()):
                totals[k] = total
            if progress:
                progress(min(start + batch_size, len(order)), len(order))
    return totals


def check_output(path: str | Path | None, overwrite: bool = False) -> Path | None:
    """Where the scores may go: a file path, new or written by an earlier `crystal perplexity` (or overwrite)."""
    from crystal_cli.runs import claim, file_output

    path = file_output(path, "-o")
    if path is not None:
        claim((path,), "perplexity", overwrite)
    return path


def write_scores(ranked: list[Scored], path: str | Path, model: str, source: str | Path) -> Path:
    """Every score as one jsonl row, atomically, marked as crystal's own (runs.record_outputs)."""
    import dataclasses

    from crystal_cli.runs import input_record, record_outputs, write_jsonl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, [dataclasses.asdict(s) for s in ranked])
    record_outputs("perplexity", (path,), {"model": str(model)}, {"source": input_record(source)})
    return path
