"""The run layer every long command writes through: manifests, atomic writes and the one resume rule.

Each output gets a manifest: the stage that wrote it, its inputs with content hashes, the resolved options,
the keys the stage declares safe to change on --resume, package versions and the files it writes. A file
output (samples.cif + samples.jsonl, refined.jsonl + refined.steps.jsonl, a stability log) keeps it beside
itself as NAME.manifest.json; a directory output (flow pairs, a flow run, encoded records) as DIR/manifest.json.

The resume rule is the same for every stage: the saved manifest must equal the new one except for the safe
keys (e.g. generate's -n: a larger -n continues the run); any other difference is a CrystalError (exit 2)
naming each differing key with both values, so a resumed run never mixes work done under other settings.
Inputs are compared by content hash, not by path (a moved model is the same model).

Outputs written before manifests existed (by crystal 0.1.0 before this layer) stay readable and resumable: on
--resume the stage checks what its rows record (generate: the prompt and each sample's seed; refine: ids and
steps) and the run is adopted. The manifest then says so under "adopted" (with the row count and what could
not be checked), and the stage's summary reports it, so the unchecked rows stay visible.

Whole-file writes go through `atomic_path` (a temporary sibling renamed over the target on success): a killed
job leaves the old file or the new one, never half of either.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from crystal_cli import __version__
from crystal_cli.errors import CrystalError
from crystal_cli.files import sha256_file

FORMAT = "crystal-manifest"
VERSION = 1
MANIFEST_NAME = "manifest.json"  # inside a directory output
MANIFEST_SUFFIX = ".manifest.json"  # beside a file output
PACKAGES = ("torch", "transformers", "peft", "llama_cpp_python", "gguf", "pymatgen", "smact", "matminer",
            "chgnet", "matgl", "torch_geometric", "ase", "numpy", "scipy")
# Files that describe a model or a run but do not change what it computes: left out of fingerprints.
_NOT_CONTENT = ("README.md", "metrics.jsonl", "summary.json", MANIFEST_NAME)


# ------------------------------------------------------------------------------------------ atomic writes


def stop_on_terminate() -> None:
    """Make SIGTERM (`kill PID`, a batch scheduler's preemption, `docker stop`) stop a command as Ctrl-C does:
    the current SIGINT handler takes it (a training loop's stop-after-this-step, a deferred write's hold, or
    KeyboardInterrupt), and where SIGINT is ignored (a job started with `&` from a script inherits that) it
    raises KeyboardInterrupt, so a background job can still be stopped with its work saved. CLI only: a
    library does not take over its host process's signals."""

    def terminate(signum, frame) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signum, frame)
        else:
            raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT, or SIGTERM under stop_on_terminate) while one unit of output is written, e.g. a
    sample's sidecar row and its CIF block, and deliver it right after: an interrupted run's files then always
    agree with each other. Signals are handled on the main thread only; elsewhere (a library caller's worker
    thread) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, object]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signum, frame = caught[0]
            if callable(previous):
                previous(signum, frame)
            elif signum == signal.SIGTERM:
                raise KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling path that replaces `path` only if the block finishes without error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """`text` into `path`, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_json(path: str | Path, data: object) -> Path:
    """Indented JSON into `path`, atomically (values JSON cannot hold, such as paths, as strings)."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Rows as jsonl into `path`, atomically: how a resumed log drops a line torn by a kill."""
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ------------------------------------------------------------------------------------------ fingerprints


def fingerprint(path: str | Path) -> str:
    """Hex SHA-256 of what a path holds: a file's bytes, or a directory's files (relative names and bytes,
    recursively) leaving out hidden files, checkpoints/ and files that only describe it (_NOT_CONTENT)."""
    path = Path(path)
    if not path.exists():
        raise CrystalError(f"{path}: no such file or directory")
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts) or relative.parts[0] == "checkpoints":
            continue
        if file.name in _NOT_CONTENT or file.name.endswith(MANIFEST_SUFFIX):
            continue
        digest.update(f"{relative.as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def input_record(path: str | Path | None) -> dict | None:
    """How a manifest names an input: its resolved path and content hash (None for an absent input)."""
    if path is None:
        return None
    path = Path(path)
    return {"path": str(path.resolve()), "sha256": fingerprint(path)}


def package_versions() -> dict[str, str | None]:
    """crystal's version and those of the packages that decide its results."""
    versions: dict[str, str | None] = {"crystal": __version__}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_output(path: str | Path | None, option: str) -> Path | None:
    """An output file path checked before any work: not a directory, not inside a file."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise CrystalError(f"{path}: is a directory; {option} names a file to write")
    if any(parent.exists() and not parent.is_dir() for parent in path.parents):
        raise CrystalError(f"{path}: a parent of it is a file, not a directory ({option})")
    return path


def dir_output(path: str | Path | None, option: str) -> Path | None:
    """An output directory path checked before any work: not an existing file."""
    if path is None:
        return None
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CrystalError(f"{path}: not a directory ({option} names a directory to write into)")
    return path


# -------------------------------------------------------------------------------------------- manifests


def manifest_path(output: str | Path, directory: bool = False) -> Path:
    """DIR/manifest.json for a directory output; NAME.manifest.json beside a file output NAME.EXT."""
    output = Path(output)
    return output / MANIFEST_NAME if directory else output.with_name(output.with_suffix("").name + MANIFEST_SUFFIX)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _plain(value: object) -> object:
    """The value as JSON reads it back (paths as strings, tuples as lists), so saved and given compare."""
    return json.loads(json.dumps(value, default=str))


@dataclass
class Manifest:
    """What one output is: the stage, its inputs (name -> {path, sha256} or None), its resolved options, the
    option/input names a resume may change, the files it writes (names relative to the manifest's folder)."""

    stage: str
    options: dict
    inputs: dict[str, dict | None] = field(default_factory=dict)
    safe: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    versions: dict = field(default_factory=package_versions)
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)
    adopted: dict | None = None

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **_plain(asdict(self))}

    @classmethod
    def load(cls, path: str | Path) -> Manifest | None:
        """The manifest at `path`, None when there is none; a file that is not one is a CrystalError."""
        path = Path(path)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return cls(stage=data["stage"], options=data["options"], inputs=data.get("inputs", {}),
                       safe=tuple(data.get("safe", ())), outputs=tuple(data.get("outputs", ())),
                       versions=data.get("versions", {}), created=data.get("created", ""),
                       updated=data.get("updated", ""), adopted=data.get("adopted"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CrystalError(f"{path}: not a crystal manifest ({exc})") from None

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())


def _show(value: object) -> str:
    if isinstance(value, dict) and "sha256" in value:
        return f"{value.get('path')} (sha256 {str(value['sha256'])[:12]})"
    return "(none)" if value is None else json.dumps(value)


def differences(saved: Manifest, given: Manifest, defaults: dict | None = None) -> list[str]:
    """'key: saved → given' for every option and input that differs and is not declared safe. An option the
    saved manifest lacks (added to crystal later) counts as its default; inputs compare by content hash."""
    defaults = _plain(defaults or {})
    safe = set(given.safe)
    found = []
    if saved.stage != given.stage:
        found.append(f"stage: {saved.stage} → {given.stage}")
    options = _plain(given.options)
    for key in sorted(set(saved.options) | set(options)):
        if key in safe:
            continue
        old = saved.options.get(key, defaults.get(key))
        new = options.get(key, defaults.get(key))
        if old != new:
            found.append(f"{key}: {_show(old)} → {_show(new)}")
    for key in sorted(set(saved.inputs) | set(given.inputs)):
        if key in safe:
            continue
        old, new = saved.inputs.get(key), given.inputs.get(key)
        if (old or {}).get("sha256") != (new or {}).get("sha256"):
            found.append(f"{key}: {_show(old)} → {_show(new)}")
    return found


@dataclass
class Start:
    """The outcome of the resume rule; `commit()` writes the manifest once the stage is ready to write."""

    path: Path
    manifest: Manifest
    resumed: bool  # continuing work that is already on disk
    adopted_rows: int = 0  # rows of a pre-manifest output taken over by this start (0: none)

    def commit(self) -> Manifest:
        self.manifest.updated = _now()
        self.manifest.save(self.path)
        return self.manifest


def begin(
    path: str | Path,
    given: Manifest,
    *,
    resume: bool,
    existing: bool,
    exists_message: str,
    adopt: Callable[[], dict] | None = None,
    defaults: dict | None = None,
) -> Start:
    """The one resume rule. `existing`: the outputs already hold work. Without `resume` that is refused with
    `exists_message`; with it the saved manifest must match `given` (see `differences`), or, when there is
    none (a pre-manifest output), `adopt()` checks the rows and returns what the manifest records about them
    ({"rows": n, "unchecked": [...]}; it raises CrystalError when the rows contradict the given settings).
    Nothing is written here: the stage calls `commit()` when it starts writing."""
    path = Path(path)
    saved = Manifest.load(path)
    if not existing:
        return Start(path, given, resumed=False)
    if not resume:
        raise CrystalError(exists_message)
    if saved is None:
        if adopt is None:
            raise CrystalError(f"{path}: missing, so the existing output cannot be checked; write to another output")
        given.adopted = {**adopt(), "on": _now()}
        return Start(path, given, resumed=True, adopted_rows=int(given.adopted.get("rows", 0)))
    changed = differences(saved, given, defaults)
    if changed:
        raise CrystalError(f"{path}: --resume with settings other than the run it continues: " + "; ".join(changed)
                           + " (resume with the same settings, or write to another output)")
    given.created, given.adopted = saved.created, saved.adopted
    return Start(path, given, resumed=True)


def owned(path: str | Path) -> bool:
    """Did crystal write `path`? True when a manifest in its folder (or the folder above: plots/ inside an
    evaluate directory, POSCAR files inside a generate output directory) lists it, or a folder holding it,
    among the files its run writes."""
    path = Path(path).resolve()
    for folder in (path.parent, path.parent.parent):
        for candidate in (folder / MANIFEST_NAME, *sorted(folder.glob("*" + MANIFEST_SUFFIX))):
            try:
                manifest = Manifest.load(candidate)
            except CrystalError:
                continue
            listed = [(candidate.parent / name).resolve() for name in manifest.outputs] if manifest else []
            if any(entry == path or entry in path.parents for entry in listed):
                return True
    return False


def claim(paths, command: str, overwrite: bool = False) -> None:
    """Refuse (CrystalError, exit 2) to write over an existing file crystal did not write, unless overwrite:
    a user's own CIF or report never receives crystal's output by accident."""
    for path in paths:
        if path is not None and Path(path).exists() and not overwrite and not owned(path):
            raise CrystalError(f"{path}: exists and was not written by crystal {command}; pass --overwrite to "
                               "replace it, or choose another output")


def record_outputs(stage: str, files, options: dict, inputs: dict | None = None) -> None:
    """Mark files a command wrote as crystal's own (see `owned`): per folder, STAGE.manifest.json lists them,
    joined with what an earlier run of the stage wrote there."""
    groups: dict[Path, list[str]] = {}
    for file in files:
        groups.setdefault(Path(file).parent, []).append(Path(file).name)
    for folder, names in groups.items():
        path = folder / f"{stage.replace(' ', '-')}{MANIFEST_SUFFIX}"
        earlier = Manifest.load(path) if path.is_file() else None
        written = tuple(dict.fromkeys([*(earlier.outputs if earlier else ()), *names]))
        Manifest(stage, options, inputs=inputs or {}, outputs=written).save(path)


def discard(*paths: str | Path) -> None:
    """Remove an output and its manifest when a stage starts over (after its inputs were checked)."""
    for path in paths:
        Path(path).unlink(missing_ok=True)
