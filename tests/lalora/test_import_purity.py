import subprocess
import sys


def test_lalora_imports_no_orchestration_or_io_framework():
    code = (
        "import sys, lalora, lalora.curvature, lalora.checkpoint, lalora.metrics\n"
        "[getattr(lalora, name) for name in lalora.__all__]  # its names load on first use: load them all\n"
        "[getattr(lalora.curvature, name) for name in lalora.curvature.__all__]\n"
        "bad = [m for m in ('prefect', 'mlflow', 'deepspeed', 'datasets') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"lalora pulled in: {out.stdout.strip()}"


def _module_graph(package: str) -> dict[str, set[str]]:
    """Every module of ``package`` and the modules of it that it imports, at the top or inside a function."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / package
    paths = {
        ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in root.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
                # from lalora import kron: the module kron; from lalora.kron import X: lalora.kron
                subs = {f"{node.module}.{a.name}" for a in node.names} & paths.keys()
                found |= subs or {node.module}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith(package)}
        graph[name] = found - {name}
    return graph


def test_no_two_modules_of_lalora_import_each_other():
    """The package's modules form no cycle, lazy imports included (kron and kron_bind once did); a package's
    __init__ re-exporting its modules is not a cycle."""
    graph = _module_graph("lalora")
    for module, imports in graph.items():
        for other in imports:
            back = graph.get(other, set())
            if module in back and not (module.startswith(other + ".") or other.startswith(module + ".")):
                raise AssertionError(f"{module} and {other} import each other")
