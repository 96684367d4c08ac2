"""The run layer itself: the resume rule, manifests, fingerprints, atomic writes; plus the house rules it
stands for (no import cycles, no stage reaching into finetune's private names)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from crystal_cli import runs
from crystal_cli.errors import CrystalError

REPO = Path(__file__).resolve().parents[1]


def _manifest(**options) -> runs.Manifest:
    return runs.Manifest("generate", {"temperature": 0.7, "top_p": 0.9, "n": 10, **options},
                         inputs={"model": {"path": "/a/model.gguf", "sha256": "aa" * 32}}, safe=("n",))


def test_resume_rule_names_every_changed_key_with_both_values(tmp_path):
    path = tmp_path / "s.manifest.json"
    _manifest().save(path)
    given = _manifest(temperature=1.0, top_p=0.95)
    given.inputs["model"] = {"path": "/b/other.gguf", "sha256": "bb" * 32}
    with pytest.raises(CrystalError) as error:
        runs.begin(path, given, resume=True, existing=True, exists_message="exists")
    message = str(error.value)
    assert "\n" not in message
    assert "temperature: 0.7 → 1.0" in message and "top_p: 0.9 → 0.95" in message
    assert "model: /a/model.gguf (sha256 aaaaaaaaaaaa) → /b/other.gguf (sha256 bbbbbbbbbbbb)" in message
    assert "; n:" not in message and "continues: n:" not in message


def test_resume_rule_accepts_safe_keys_moved_inputs_and_new_options_at_their_default(tmp_path):
    path = tmp_path / "s.manifest.json"
    saved = _manifest()
    saved.save(path)
    given = _manifest(n=40, grammar=True)  # `grammar` did not exist when the run started
    given.inputs["model"]["path"] = "/moved/model.gguf"  # same content, other place
    start = runs.begin(path, given, resume=True, existing=True, exists_message="exists", defaults={"grammar": True})
    assert start.resumed and start.adopted_rows == 0 and start.manifest.created == saved.created
    start.commit()
    assert json.loads(path.read_text())["options"]["n"] == 40
    with pytest.raises(CrystalError, match="grammar: true → false"):
        runs.begin(path, _manifest(n=40, grammar=False), resume=True, existing=True, exists_message="e",
                   defaults={"grammar": True})


def test_existing_work_needs_resume_and_a_pre_manifest_output_is_adopted_or_refused(tmp_path):
    path = tmp_path / "s.manifest.json"
    with pytest.raises(CrystalError, match="already here"):
        runs.begin(path, _manifest(), resume=False, existing=True, exists_message="already here")
    fresh = runs.begin(path, _manifest(), resume=False, existing=False, exists_message="")
    assert not fresh.resumed and not path.exists()  # nothing is written before commit()
    adopted = runs.begin(path, _manifest(), resume=True, existing=True, exists_message="",
                         adopt=lambda: {"rows": 7, "unchecked": ["model"]})
    assert adopted.resumed and adopted.adopted_rows == 7
    adopted.commit()
    assert runs.Manifest.load(path).adopted["rows"] == 7
    with pytest.raises(CrystalError, match="cannot be checked"):
        runs.begin(tmp_path / "none.manifest.json", _manifest(), resume=True, existing=True, exists_message="")
    (tmp_path / "junk.manifest.json").write_text("[1, 2]")
    with pytest.raises(CrystalError, match="not a crystal manifest"):
        runs.Manifest.load(tmp_path / "junk.manifest.json")


def test_manifest_paths_and_fingerprints(tmp_path):
    assert runs.manifest_path(tmp_path / "samples.cif") == tmp_path / "samples.manifest.json"
    assert runs.manifest_path(tmp_path / "stability-t0.7.jsonl") == tmp_path / "stability-t0.7.manifest.json"
    assert runs.manifest_path(tmp_path / "pairs", directory=True) == tmp_path / "pairs" / "manifest.json"
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "weights.bin").write_bytes(b"\x00\x01")
    (run / "config.json").write_text("{}")
    first = runs.fingerprint(run)
    (run / "README.md").write_text("a model card")  # describes the model, does not change it
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step-1").write_text("x")
    assert runs.fingerprint(run) == first
    (run / "adapter" / "weights.bin").write_bytes(b"\x00\x02")
    assert runs.fingerprint(run) != first
    assert runs.input_record(None) is None and runs.input_record(run)["sha256"] == runs.fingerprint(run)


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "report.json"
    runs.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with runs.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names imported, line) of every import statement, function-level ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((a.name, [], node.lineno) for a in node.names)
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_a_ctrl_c_while_output_is_written_arrives_after_it():
    """generate writes a sample's sidecar row and its CIF block under runs.interrupts_deferred: a SIGINT in
    between (it once left a row without its block) is delivered when both are written, and the previous
    handler is back. Python's own Ctrl-C handler is installed for the test: a suite started with `&` from a
    script inherits SIGINT ignored, and an ignored Ctrl-C rightly stays ignored."""
    import signal

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert _deferred_write(signal.SIGINT) == ["row", "block"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        written = []
        with runs.interrupts_deferred():  # no signal: nothing raised
            written.append("next")
        assert written == ["next"]
    finally:
        signal.signal(signal.SIGINT, inherited)


def _deferred_write(signum: int) -> list[str]:
    """A row and its block written under interrupts_deferred with `signum` sent in between; the interrupt
    must arrive (KeyboardInterrupt) only after both are written."""
    import os

    written = []
    with pytest.raises(KeyboardInterrupt):
        with runs.interrupts_deferred():
            os.kill(os.getpid(), signum)
            written.append("row")
            written.append("block")
    return written


def test_a_sigterm_stops_like_ctrl_c_even_where_sigint_is_ignored():
    """runs.stop_on_terminate (the CLI installs it): a SIGTERM while output is written is held like a Ctrl-C and
    delivered after it, and where SIGINT is ignored (a job started with `&` from a script) it still stops the
    command with KeyboardInterrupt instead of being lost or killing the process mid-write."""
    import os
    import signal

    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        runs.stop_on_terminate()
        for sigint in (signal.default_int_handler, signal.SIG_IGN):
            signal.signal(signal.SIGINT, sigint)
            assert _deferred_write(signal.SIGTERM) == ["row", "block"] and signal.getsignal(signal.SIGINT) == sigint
            with pytest.raises(KeyboardInterrupt):  # outside a deferred write: at once
                os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


def test_no_module_imports_private_names_of_another():
    """The package and the benches use each other's public names only (tests may reach into a module)."""
    offenders = []
    for path in [*(REPO / "crystal_cli").rglob("*.py"), *(REPO / "bench").glob("*.py")]:
        for module, names, line in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if module.startswith("crystal_cli") and private:
                offenders.append(f"{path.relative_to(REPO)}:{line} imports {names} from {module}")
    assert not offenders, offenders


def test_crystal_cli_has_no_import_cycles():
    """Every import counts (lazy ones too), and importing a module imports its packages' __init__ first."""
    modules = {_module_name(p): p for p in (REPO / "crystal_cli").rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for module, names, _ in _imports(path):
            for target in [module, *(f"{module}.{n}" for n in names)]:
                if target in modules and target != name:
                    graph[name].add(target)
                    # importing crystal_cli.x.y from outside package x runs crystal_cli.x/__init__ first
                    package = target.rpartition(".")[0]
                    if package in modules and package != "crystal_cli" and not (name + ".").startswith(package + "."):
                        graph[name].add(package)
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle.extend(stack[stack.index(target):] + [node, target] if target in stack else [node, target])
                return True
            if target not in state and visit(target, [*stack, node]):
                return True
        state[node] = 2
        return False

    for node in sorted(graph):
        if node not in state and visit(node, []):
            break
    assert not cycle, " -> ".join(cycle)
