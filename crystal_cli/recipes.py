"""The one config system of both trainers (`crystal finetune`, `crystal flow train`) and their one LR schedule.

A trainer's configuration is a dataclass whose dataclass-typed fields are the recipe's tables (finetune:
lora, data, train; flow: model, train) and whose plain fields are top-level keys (finetune: base; flow:
pairs). A recipe is a TOML file of that shape; `--set section.key=VALUE` overrides any key of it. Every key
and type is checked with one line naming the key, so a typo in a recipe never trains silently with a
default.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from pathlib import Path
from typing import TypeVar

from crystal_cli.errors import CrystalError
from crystal_cli.files import read_toml

T = TypeVar("T")


def parse_override(text: str) -> tuple[str, object]:
    """`--set section.key=VALUE` with VALUE read as a TOML value (bare words are taken as strings)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise CrystalError(f"--set {text!r}: expected KEY=VALUE, e.g. train.learning_rate=1e-4")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def parse_overrides(texts: list[str] | None) -> dict[str, object]:
    """Every `--set` of a command line, later ones winning."""
    return dict(parse_override(text) for text in texts or [])


def _sections(kind: type) -> dict[str, type]:
    hints = typing.get_type_hints(kind)
    return {f.name: hints[f.name] for f in dataclasses.fields(kind) if dataclasses.is_dataclass(hints[f.name])}


def known_keys(kind: type) -> list[str]:
    """Every dotted key a config of `kind` accepts ("base", "train.learning_rate", ...)."""
    sections = _sections(kind)
    return [f.name for f in dataclasses.fields(kind) if f.name not in sections] + [
        f"{name}.{f.name}" for name, section in sections.items() for f in dataclasses.fields(section)]


def flatten(kind: type, nested: dict) -> dict[str, object]:
    """A recipe's tables -> dotted keys; a key that is neither a table of `kind` nor a top-level key stays as
    it is (and `build` names it)."""
    sections = _sections(kind)
    flat: dict[str, object] = {}
    for key, value in nested.items():
        if key in sections and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def as_flat(config: object) -> dict[str, object]:
    """A built config as dotted keys (what a manifest or a resume compares)."""
    return flatten(type(config), dataclasses.asdict(config))


def load(path: str | Path, kind: type) -> dict[str, object]:
    """A recipe file of config `kind` as dotted keys (unchecked: `build` checks them with the overrides)."""
    return flatten(kind, read_toml(path))


def _checked(value: object, annotation: object, where: str) -> object:
    """TOML value -> field value of the declared type; CrystalError naming the key otherwise."""
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is str and isinstance(value, str):
        return value
    if annotation == list[str] and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if annotation == dict[str, int] and isinstance(value, dict) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
        return dict(value)
    name = getattr(annotation, "__name__", str(annotation)) if typing.get_origin(annotation) is None else str(annotation)
    raise CrystalError(f"{where}: expected {name}, got {type(value).__name__} {value!r}")


def build(kind: type[T], settings: dict[str, object], where: str, start: T | None = None,
          choices: dict[str, tuple] | None = None) -> T:
    """A config of `kind` from dotted `settings` laid over `start` (default: the dataclass defaults).

    Unknown keys, wrong types and values outside `choices` raise a CrystalError naming the key and `where`
    (the recipe file or "overrides"); a required key that is still missing does too.
    """
    choices = choices or {}
    sections = _sections(kind)
    values = dataclasses.asdict(start) if start is not None else {}
    for key, value in settings.items():
        section, _, name = key.rpartition(".")
        target = typing.get_type_hints(sections[section]) if section in sections else (
            {f: t for f, t in typing.get_type_hints(kind).items() if f not in sections} if not section else {})
        if name not in target:
            raise CrystalError(f"{where}: unknown key {key!r}; known: {', '.join(known_keys(kind))}")
        value = _checked(value, target[name], f"{where}: {key}")
        if key in choices and value not in choices[key]:
            raise CrystalError(f"{where}: {key} must be one of {', '.join(choices[key])}, got {value!r}")
        (values.setdefault(section, {}) if section else values)[name] = value
    for f in dataclasses.fields(kind):  # a required top-level key (flow: pairs) that was never given
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise CrystalError(f"{where}: missing {f.name!r}")
    return kind(**{k: sections[k](**v) if k in sections else v for k, v in values.items()})


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """The learning-rate multiplier of both trainers: linear warm-up over `warmup_steps`, then a cosine from 1
    down to `min_ratio` at `total_steps` (held there after it)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
