"""Training data of `crystal finetune`: records read from a `crystal encode` directory, tokenized into
examples (crystal completions in the run's site order), batched by length (a pure function of seed and
epoch, so a resumed run replays the same batches), randomly translated each time a crystal is drawn and,
for the overlap unlikelihood, marked with the continuations that would stack two atoms, on the true text and
on the model's own samples (data.negatives); and the model's own valid samples, to imitate (data.positives)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crystal_cli import codec
from crystal_cli.errors import CrystalError
from crystal_cli.sampling.guard import MIN_DISTANCE, DistanceGuard, GuardSettings

NON_CRYSTAL_TASKS = frozenset({"infill"})  # tasks whose completion is not a crystal (no translation)
IGNORE = -100  # label of prompt and padding positions: no loss there
BUCKET_BATCHES = 64  # length-bucketing window, in batches: sorts within it, shuffles batch order across it


@dataclass
class Example:
    prompt_ids: list[int]
    completion: str
    completion_ids: list[int]  # completion tokens followed by EOS
    crystal: bool  # completion is a crystal: eligible for random translation
    # train.overlap_unlikelihood: per completion position, the digit tokens (OverlapDigits.ids) that would put
    # the site being written too close to an earlier one; None: not computed, or no such token anywhere
    avoid: np.ndarray | None = None
    # False: the model's own sample (data.negatives), trained only through `avoid`, never imitated
    imitate: bool = True

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def read_records(path: Path, tasks: list[str] | None = None) -> list[dict]:
    """Records of one jsonl split; a line that is not a record with prompt and completion is an error."""
    records = []
    with path.open() as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CrystalError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise CrystalError(f"{path}:{lineno}: record has no prompt")
            if not isinstance(record.get("completion"), str) or not record["completion"].strip():
                raise CrystalError(f"{path}:{lineno}: record has no completion")
            if not tasks or record.get("task") in tasks:
                records.append(record)
    return records


def load_splits(records_dir: str | Path, tasks: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(train, val) records of a `crystal encode` output directory; val is empty without val.jsonl."""
    records_dir = Path(records_dir)
    if not str(records_dir) or not records_dir.is_dir():
        raise CrystalError(f"records directory {str(records_dir) or '(none given)'!r} does not exist (make one with crystal encode)")
    train_file = records_dir / "train.jsonl"
    if not train_file.is_file():
        raise CrystalError(f"{records_dir}: no train.jsonl (make one with crystal encode)")
    train = read_records(train_file, tasks)
    if not train:
        raise CrystalError(f"{train_file}: no records" + (f" for tasks {', '.join(tasks)}" if tasks else ""))
    val_file = records_dir / "val.jsonl"
    return train, read_records(val_file, tasks) if val_file.is_file() else []


def with_task_repeats(records: list[dict], repeats: dict[str, int]) -> list[dict]:
    """Train records with each record of a task in `repeats` k times (data.task_repeats): an epoch then draws it
    k times, each draw with its own seeded translation. A task named there with no record is an error, since
    the recipe would silently train as if it were not set."""
    missing = sorted(set(repeats) - {r.get("task") for r in records})
    if missing:
        raise CrystalError(f"data.task_repeats names task(s) with no train record: {', '.join(missing)}")
    return [r for r in records for _ in range(repeats.get(r.get("task"), 1))]


def tokenize_completion(tokenizer, completion: str) -> list[int]:
    return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def ordered(completion: str, crystal: bool, site_order: str) -> str:
    return codec.sorted_sites(completion) if crystal and site_order == "sorted" else completion


def make_examples(
    tokenizer, records: list[dict], max_length: int, site_order: str = "as-given"
) -> tuple[list[Example], int]:
    """Tokenized examples (prompt as the model sees it at generation, completion + EOS, crystal completions
    in `site_order`) and the too-long count."""
    if not records:
        return [], 0
    crystal = [r.get("task") not in NON_CRYSTAL_TASKS for r in records]
    texts = [ordered(r["completion"], c, site_order) for r, c in zip(records, crystal)]
    prompts = tokenizer([r["prompt"] for r in records])["input_ids"]
    completions = tokenizer(texts, add_special_tokens=False)["input_ids"]
    examples, too_long = [], 0
    for text, is_crystal, prompt_ids, completion_ids in zip(texts, crystal, prompts, completions):
        example = Example(prompt_ids, text, completion_ids + [tokenizer.eos_token_id], is_crystal)
        if example.length > max_length:
            too_long += 1
        else:
            examples.append(example)
    return examples, too_long


def translated(example: Example, tokenizer, rng: np.random.Generator, site_order: str = "as-given") -> Example:
    """The same example with its crystal shifted by a random fractional translation, its sites then put in
    `site_order` (unparseable: unchanged)."""
    parsed = codec.parse_crystal(example.completion)
    if not parsed.ok:
        return example
    text = ordered(codec.encode_structure(codec.translate(parsed.structure, rng)), True, site_order)
    return dataclasses.replace(example, completion=text, completion_ids=tokenize_completion(tokenizer, text))


@dataclass(frozen=True)
class OverlapDigits:
    """What marks the overlapping continuations of crystal text: the distance guard (sampling/guard.py, at
    its minimum distance) on the tokenizer's vocabulary and the ids of the ten digit tokens."""

    guard: DistanceGuard
    ids: np.ndarray

    @classmethod
    def of(cls, tokenizer, min_distance: float = MIN_DISTANCE) -> OverlapDigits:
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        ids = np.array([tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)], dtype=np.int64)
        if [pieces[i] for i in ids] != [str(d) for d in range(10)]:
            raise CrystalError("train.overlap_unlikelihood needs a tokenizer with one token per digit")
        return cls(DistanceGuard(GuardSettings(min_distance=min_distance), pieces), ids)


def with_overlaps(example: Example, digits: OverlapDigits) -> Example:
    """The example with `avoid` set: at every coordinate digit of its crystal, the digits the distance guard
    would mask there (each would leave the site no position min_distance from every earlier site, periodic
    images included), read on the text so far. Those are the continuations that make a structurally invalid
    crystal. On true text the real next token is never one of them (a real crystal whose own sites are too
    close marks nothing at that position). On the model's own sample (`imitate` False) its own digit may be
    one: that position is marked too and ends the marks, since what follows continues an invalid crystal."""
    if not example.crystal:
        return example
    state = digits.guard.new_state()
    pieces = digits.guard.pieces
    digit_set = set(digits.ids.tolist())
    avoid = None
    for position, token in enumerate(example.completion_ids[:-1]):  # the last one is EOS
        if token in digit_set and state.checking:
            masked = ~state.allowed(digits.ids)
            stacks = bool(masked[digits.ids == token].any())
            if masked.any() and (not stacks or not example.imitate):
                if avoid is None:
                    avoid = np.zeros((len(example.completion_ids), len(digits.ids)), dtype=bool)
                avoid[position] = masked
            if stacks and not example.imitate:
                break
        state.accept(pieces[token])
    return dataclasses.replace(example, avoid=avoid)


def _read_samples(path: Path) -> tuple[list[dict], int]:
    """The rows of a `crystal generate` jsonl that carry a prompt and a non-empty text, and how many did not."""
    rows, unreadable = [], 0
    with path.open() as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                unreadable += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("text"), str) \
                    and row["text"].strip():
                rows.append(row)
            else:
                unreadable += 1
    return rows, unreadable


def _own_example(tokenizer, row: dict, imitate: bool) -> Example:
    return Example(tokenizer(row["prompt"])["input_ids"], row["text"], tokenize_completion(tokenizer, row["text"]),
                   crystal=True, imitate=imitate)


def read_negatives(path: Path, tokenizer, digits: OverlapDigits, max_length: int) -> tuple[list[Example], dict]:
    """data.negatives: the model's own samples (a `crystal generate` jsonl, one row per sample with its prompt
    and text) as examples that are never imitated, marked by with_overlaps, and the counts of rows read, kept
    and skipped (unreadable, too long, or with no position to mark)."""
    rows, unreadable = _read_samples(path)
    examples, too_long, unmarked = [], 0, 0
    for row in rows:
        example = _own_example(tokenizer, row, imitate=False)
        if example.length > max_length:
            too_long += 1
            continue
        example = with_overlaps(example, digits)
        if example.avoid is None:
            unmarked += 1
        else:
            examples.append(example)
    if not examples:
        raise CrystalError(f"{path}: no sample with a position the distance guard marks "
                           f"({len(rows)} samples read; data.negatives needs `crystal generate --min-distance 0` output)")
    return examples, {"negatives_read": len(rows) + unreadable, "negatives": len(examples),
                      "negatives_unreadable": unreadable, "negatives_too_long": too_long,
                      "negatives_unmarked": unmarked}


ATOM_BINS = (4, 8, 12, 16, 20)  # atom-count bin edges (1-3, 4-7, 8-11, 12-15, 16-19, 20+) of data.positives' weights


def atom_bin(sites: int) -> int:
    return int(np.searchsorted(ATOM_BINS, sites, side="right"))


def size_shares(examples: list[Example]) -> np.ndarray:
    """The share of each atom-count bin among the crystal completions of `examples` (two lattice lines, then
    two lines a site: counted from the text, no parsing)."""
    bins = [atom_bin((e.completion.strip().count("\n") - 1) // 2) for e in examples if e.crystal]
    counts = np.bincount(bins, minlength=len(ATOM_BINS) + 1).astype(float)
    return counts / max(counts.sum(), 1.0)


def relabeled_prompts(structure) -> list[str]:
    """The prompts a valid sample answers truly, whatever it was sampled under: the unconditional one, its
    own reduced formula and, where spglib finds one, its own space group (codec.spacegroup_number, the
    reading the conditional bench checks). Hindsight relabelling (Andrychowicz et al. 2017): every valid own
    sample becomes a correct example of the formula and space-group tasks too, and a sample drawn under a
    condition it misses is never imitated under that condition."""
    prompts = [codec.unconditional_prompt(), codec.conditional_prompt({"formula": codec.reduced_formula(structure)})]
    group = codec.spacegroup_number(structure)
    if group is not None:
        prompts.append(codec.conditional_prompt({"spacegroup": group}))
    return prompts


def meets_prompt(prompt: str, structure) -> bool:
    """Whether a structure has the reduced formula and the space group (codec.spacegroup_number, the reading the
    conditional bench checks) its generation prompt asks for. Energy and band-gap conditions cannot be checked
    without a calculation and pass; a prompt that is not a generation prompt fails."""
    conditions = codec.prompt_conditions(prompt)
    if conditions is None:
        return False
    if "formula" in conditions:
        try:
            if codec.parse_formula(str(conditions["formula"])).reduced_formula != codec.reduced_formula(structure):
                return False
        except ValueError:
            return False
    return "spacegroup" not in conditions or codec.spacegroup_number(structure) == conditions["spacegroup"]


def read_positives(path: Path, tokenizer, max_length: int, shares: np.ndarray | None = None,
                   relabel: bool = False, even_formulas: bool = False) -> tuple[list[Example], np.ndarray, dict]:
    """data.positives: the model's own samples that are valid crystals (structurally and compositionally, as
    `crystal evaluate` counts them) as examples to imitate, the probability of drawing each, and counts.

    Validity filtering alone would teach smaller crystals: the model's small cells are valid far more often
    than its large ones. So each kept sample is drawn with probability proportional to (its atom-count bin's
    share in `shares`) / (the valid samples kept in that bin): in expectation the drawn positives have the
    atom-count distribution `shares` (size_shares of the train records: data.positives_sizes = "train"), or,
    with None, that of all the samples read ("own"), so that only the invalid ones within each bin are
    filtered out. A bin with no valid sample gets nothing and the others are renormalised.

    Without relabel a valid sample is imitated under the prompt it was sampled under, so it must meet that
    prompt's formula and space group (meets_prompt); one that misses them is skipped and counted
    (positives_off_condition): imitating it would teach the model to ignore the condition. This is what makes
    a pool drawn under --spacegroup prompts rejection-sampling self-training of the space-group task.

    relabel (data.positives_relabel): each valid sample is imitated under every prompt of relabeled_prompts
    instead of the one it was sampled under, its probability split evenly among them.

    even_formulas (data.positives_even_formulas): within each atom-count bin every reduced formula gets the same
    share, split among its samples, instead of every sample: imitating the valid samples as they come amplifies
    the compositions the model already repeats (a third round took LiPd from 2 to 12 of 200 samples)."""
    from crystal_cli.evaluate.validity import check

    rows, unreadable = _read_samples(path)
    kept, kept_bins, kept_shares, kept_keys, too_long, invalid, off_condition = [], [], [], [], 0, 0, 0
    read_bins = np.zeros(len(ATOM_BINS) + 1)
    for row in rows:
        parsed = codec.parse_crystal(row["text"])
        if not parsed.ok:
            invalid += 1
            continue
        size = atom_bin(len(parsed.structure))
        read_bins[size] += 1
        if not check(parsed.structure).valid:
            invalid += 1
            continue
        if not relabel and not meets_prompt(row["prompt"], parsed.structure):
            off_condition += 1
            continue
        prompts = relabeled_prompts(parsed.structure) if relabel else [row["prompt"]]
        examples = [_own_example(tokenizer, {**row, "prompt": prompt}, imitate=True) for prompt in prompts]
        if any(e.length > max_length for e in examples):
            too_long += 1
            continue
        kept.extend(examples)
        kept_bins.extend([size] * len(examples))
        kept_shares.extend([1 / len(examples)] * len(examples))
        kept_keys.extend([(size, parsed.structure.composition.reduced_formula)] * len(examples))
    if not kept:
        met = f" ({off_condition} valid ones miss their prompt's formula or space group)" if off_condition else ""
        raise CrystalError(f"{path}: no valid crystal among {len(rows)} samples{met} (data.positives needs "
                           "`crystal generate` jsonl output)")
    kept_bins, kept_shares = np.array(kept_bins), np.array(kept_shares)
    samples = round(kept_shares.sum())
    if even_formulas:  # each sample's share divided by its formula's sample count within the bin
        per_formula = Counter()
        for key, share in zip(kept_keys, kept_shares):
            per_formula[key] += share
        kept_shares = kept_shares / np.array([per_formula[key] for key in kept_keys])
    target = read_bins / read_bins.sum() if shares is None else np.asarray(shares, dtype=float)
    samples_in_bin = np.bincount(kept_bins, weights=kept_shares, minlength=len(read_bins))
    weights = target[kept_bins] * kept_shares / samples_in_bin[kept_bins]
    if weights.sum() <= 0:
        raise CrystalError(f"{path}: no valid crystal in an atom-count bin the train records have")
    counts = {"positives_read": len(rows) + unreadable, "positives": samples,
              "positives_unreadable": unreadable, "positives_invalid": invalid, "positives_too_long": too_long,
              "positives_off_condition": off_condition}
    if relabel:
        counts["positives_examples"] = len(kept)
    return kept, weights / weights.sum(), counts


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches of example indices, a pure function of (seed, epoch): shuffle, sort within
    windows of BUCKET_BATCHES batches (little padding), then shuffle the batch order."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), window):
        group = sorted(order[start:start + window].tolist(), key=lambda i: lengths[i])
        batches.extend(group[j:j + batch_size] for j in range(0, len(group), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


PAD_MULTIPLE = 32  # batch widths are rounded up to this: see collate


def collate(examples: list[Example], pad_id: int, n_digits: int = 0) -> dict:
    """Right-padded input_ids / attention_mask / labels (prompt and padding ignored by the loss); with
    `n_digits`, also `avoid` (batch, width, n_digits): each label position's overlapping digits; with any
    example not to imitate, also `imitate` (batch, width): the label positions the cross-entropy counts.

    The width is the longest example rounded up to PAD_MULTIPLE, so that batches share a dozen tensor sizes
    instead of each having its own: on CPU glibc's heap (kept, not trimmed: runtime.configure_process) then
    reuses freed blocks instead of fragmenting. Seen once on a 2-core Xeon (384x8 full fine-tune, 14 examples a
    batch): exact widths fell from 1,190 to 660 tokens/s in 15 minutes with RSS growing 0.2 GB a minute and 21 %
    of the time in _int_malloc; after this change, resumed, ~1,000 tokens/s and 0.05 GB a minute 20 minutes in
    (malloc still 16 %). Right padding changes no loss: causal attention keeps real tokens from seeing it and
    the labels ignore it."""
    width = -(-max(e.length for e in examples) // PAD_MULTIPLE) * PAD_MULTIPLE
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids = e.prompt_ids + e.completion_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(e.prompt_ids): len(ids)] = torch.tensor(e.completion_ids)
        attention[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if n_digits:
        avoid = torch.zeros((len(examples), width, n_digits), dtype=torch.bool)
        for row, e in enumerate(examples):
            if e.avoid is not None:
                avoid[row, len(e.prompt_ids): e.length] = torch.from_numpy(e.avoid)
        batch["avoid"] = avoid
    if not all(e.imitate for e in examples):
        batch["imitate"] = (labels != IGNORE) & torch.tensor([e.imitate for e in examples])[:, None]
    return batch


def imitated_tokens(batch: dict) -> int:
    """Label positions of a collated batch that the cross-entropy is taken over (the loss's normaliser)."""
    return int(batch["imitate"][:, 1:].sum() if "imitate" in batch else (batch["labels"][:, 1:] != IGNORE).sum())
