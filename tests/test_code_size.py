"""Library code stays small enough to read: no function over 60 lines and no file over 400 lines in sensq/, cli/,
probes/ and kernels/ (tests and experiments are not library code). A function's lines are its signature and body,
comments and blank lines included, its docstring not (a command's docstring is its --help); a file's lines are all
of them. Run alone: ``python -m pytest tests/test_code_size.py``; it names every offender with its length."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ("sensq", "cli", "probes", "kernels")
FUNCTION_LINES = 60
FILE_LINES = 400


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the ``def`` (decorators not counted) to the end, less the docstring's."""
    length = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        length -= first.end_lineno - first.lineno + 1
    return length


def long_functions(source: str, limit: int = FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function or method in ``source`` longer than ``limit`` lines."""
    return [(node.name, node.lineno, _length(node)) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _length(node) > limit]


def _library_files() -> list[Path]:
    return sorted(path for root in LIBRARY for path in (REPO / root).rglob("*.py") if "__pycache__" not in path.parts)


def test_the_check_flags_a_long_function_and_passes_a_short_one():
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    assert long_functions(f"def long():\n{body}\n") == [("long", 1, 61)]
    assert long_functions(f"def short():\n{body[: body.rindex(chr(10))]}\n") == []
    documented = '    """One.\n\n    Two.\n    """\n'
    assert long_functions(f"def documented():\n{documented}{body[: body.rindex(chr(10))]}\n") == []


def test_no_library_function_is_over_60_lines():
    offenders = [f"{path.relative_to(REPO)}:{line} {name} ({length} lines)" for path in _library_files()
                 for name, line, length in long_functions(path.read_text())]
    assert not offenders, "functions over 60 lines:\n" + "\n".join(offenders)


def test_no_library_file_is_over_400_lines():
    offenders = [f"{path.relative_to(REPO)} ({n} lines)" for path in _library_files()
                 if (n := len(path.read_text().splitlines())) > FILE_LINES]
    assert not offenders, "files over 400 lines:\n" + "\n".join(offenders)
