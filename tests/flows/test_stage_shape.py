"""Stages have one shape (issue 28): every stage is a row of ``pipelines.stages.steps`` with typed inputs that own
their mapping from the config and a frozen, keyword-only result, and ``flows/`` runs each through the one Prefect
task, ``flows.tasks.stage_task``."""

import ast
import dataclasses
import inspect
import typing
from pathlib import Path

from pipelines.stages import steps

ROOT = Path(__file__).resolve().parents[2]


def _inputs_and_result(stage):
    fn = stage.run.body if stage.launched else stage.run
    hints = typing.get_type_hints(fn)
    first = next(iter(inspect.signature(fn).parameters))
    return (stage.run.inputs.__self__ if stage.launched else hints[first]), hints["return"]


def test_every_stage_maps_the_config_to_typed_inputs_and_returns_a_frozen_keyword_only_result():
    assert set(steps.STAGES) == {"base-model", "init-adapter", "precision", "finetune", "evaluate", "gate"}
    assert set(steps.STEPS) == {"precision", "finetune"}  # the two that may run on several ranks
    for name, stage in steps.STAGES.items():
        inputs, result = _inputs_and_result(stage)
        assert dataclasses.is_dataclass(inputs), name
        assert inputs.__dataclass_params__.frozen and all(f.kw_only for f in dataclasses.fields(inputs)), name
        assert callable(getattr(inputs, "from_config", None)), f"{name}: no from_config on {inputs.__name__}"
        if typing.get_origin(result) is dict:  # evaluation: a score per domain
            continue
        assert dataclasses.is_dataclass(result) and result.__dataclass_params__.frozen, name
        assert all(f.kw_only for f in dataclasses.fields(result)), name
        assert list(inspect.signature(stage.run if not stage.launched else stage.run.body).parameters)[1] == "tracker"


def _is_task(node: ast.expr) -> bool:
    """``task``, ``prefect.task``, ``task(...)`` or ``prefect.task(...)``."""
    if isinstance(node, ast.Call):
        node = node.func
    return (isinstance(node, ast.Name) and node.id == "task") or (
        isinstance(node, ast.Attribute) and node.attr == "task"
    )


def _tasks(path: Path) -> list[ast.AST]:
    """The functions a module makes Prefect tasks: decorated (bare or called), or wrapped as ``task(fn)``."""
    tree = ast.parse(path.read_text())
    decorated = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(_is_task(d) for d in node.decorator_list)
    ]
    wrapped = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and _is_task(node.func) and node.args]
    return decorated + wrapped


def test_flows_run_every_stage_through_the_one_prefect_task():
    wrong = []
    for path in sorted((ROOT / "flows").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipelines.stages"):
                # the table's rows, inputs, results and Job: no stage function, so nothing runs around the wrapper
                wrong += [
                    f"{path.name} imports {node.module}.{a.name}" for a in node.names if not (a.name[:1].isupper())
                ]
        for fn in _tasks(path):
            if path.name != "tasks.py":
                wrong.append(f"{path.name}: task {getattr(fn, 'name', ast.unparse(fn))} outside flows/tasks.py")
    stage_tasks = [
        getattr(fn, "name", ast.unparse(fn))
        for fn in _tasks(ROOT / "flows" / "tasks.py")
        if any(isinstance(n, ast.Attribute) and n.attr == "run" for n in ast.walk(fn))
    ]
    assert stage_tasks == ["_stage_task"], stage_tasks
    assert not wrong, "\n".join(wrong)
