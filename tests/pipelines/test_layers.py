"""pipelines/ knows nothing of Prefect, MLflow or flows/, and its own folders import one way.

The order, bottom up: config, errors, safety, tracker, workspace; data and runtime; scoring; stages; lineage.
A module may import its own folder and anything below it, never above (lazy imports inside functions
included: ``pipelines.runtime.launch`` once reached up into ``pipelines.stages`` that way).
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RANK = {
    "config": 0,
    "errors": 0,
    "safety": 0,
    "tracker": 0,
    "workspace": 0,
    "data": 1,
    "runtime": 1,
    "scoring": 2,
    "stages": 3,
    "lineage": 4,
}


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return found


def test_every_import_inside_pipelines_points_down():
    wrong = []
    for path in (ROOT / "pipelines").rglob("*.py"):
        part = path.relative_to(ROOT / "pipelines").parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        for module in _imports(path):
            top = module.split(".")[0]
            if top in ("flows", "prefect", "mlflow"):
                wrong.append(f"{path.relative_to(ROOT)} imports {module}")
            elif top == "pipelines" and module.count(".") >= 1:
                other = module.split(".")[1]
                if RANK.get(other, 0) > RANK[part]:
                    wrong.append(f"{path.relative_to(ROOT)} ({part}) imports {module} ({other}), a layer above")
    assert not wrong, "\n".join(wrong)


def test_importing_the_stages_and_the_lineage_pulls_in_no_orchestration():
    code = (
        "import sys\nimport pipelines.stages.steps, pipelines.stages.evaluate, pipelines.stages.gate, "
        "pipelines.stages.pretrain, pipelines.lineage.plan, pipelines.lineage.auto\n"
        "print(','.join(m for m in ('prefect', 'mlflow', 'flows') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"pipelines pulled in: {out.stdout.strip()}"
