"""The agent's source as shipped: every module of mnp/agent/ in the bundle, in an order
that loads, standard library only, python3.8 syntax, small rooms; and its one op table
is the one PROTOCOL.md documents."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from mnp.agent import MODULES, bundle_source
from mnp.agent.ops import OPS

AGENT = Path(__file__).parents[2] / "mnp" / "agent"
SOURCES = sorted(AGENT.glob("*.py"))


def _runtime_imports(tree: ast.Module) -> list[ast.stmt]:
    """Imports executed when the module loads (not those under `if TYPE_CHECKING:`)."""
    out: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
    return out


def test_every_agent_module_is_shipped_in_load_order() -> None:
    names = {p.stem for p in SOURCES} - {"__init__", "__main__"}
    assert set(MODULES) == names
    assert len(MODULES) == len(set(MODULES))
    for i, name in enumerate(MODULES):
        tree = ast.parse((AGENT / (name + ".py")).read_text())
        for node in _runtime_imports(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                # the bundle loads modules one after the other: a relative import at
                # load time must name one loaded before
                assert node.module in MODULES[:i], (name, node.module)


def test_agent_modules_import_the_standard_library_only() -> None:
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in _runtime_imports(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    continue
                names = [node.module or ""]
            else:
                assert isinstance(node, ast.Import)
                names = [a.name for a in node.names]
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top == "__future__", (path.name, name)


def test_agent_modules_parse_as_python_3_8() -> None:
    """The agent runs on hosts with python3 >= 3.8; annotations stay strings (the typing
    names are imported only for the type checker)."""
    for path in SOURCES:
        source = path.read_text()
        ast.parse(source, filename=str(path), feature_version=(3, 8))
        if path.stem != "__main__":
            assert "from __future__ import annotations" in source, path.name
        for method in ("removeprefix", "removesuffix"):  # str methods new in 3.9
            assert "." + method + "(" not in source, (path.name, method)
    ast.parse(bundle_source(compress=False), feature_version=(3, 8))


def test_agent_rooms_are_small() -> None:
    """No module of the agent over 700 lines, no class over 450."""
    for path in SOURCES:
        source = path.read_text()
        assert source.count("\n") <= 700, path.name
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                assert lines <= 450, (path.name, node.name, lines)


def _documented_ops() -> list[str]:
    text = (AGENT / "PROTOCOL.md").read_text()
    section = text.split("## Controller → agent", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, re.M)


def test_the_op_table_is_the_one_protocol_md_documents() -> None:
    documented = _documented_ops()
    assert len(documented) == len(set(documented))
    assert sorted(documented) == sorted(OPS)
    assert "spawn" in OPS and "stale" in OPS  # the table parsed, not an empty match
