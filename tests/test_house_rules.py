"""The house rules docs/architecture.md states, checked on the package's source: no function over 80 lines."""
import ast
from pathlib import Path

import mcsmoe_fast

PACKAGE = Path(mcsmoe_fast.__file__).parent


def test_no_function_is_over_80_lines():
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(PACKAGE.rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, "split these functions: " + "; ".join(long)
