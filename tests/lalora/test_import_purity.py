import subprocess
import sys


def test_lalora_imports_no_orchestration_or_io_framework():
    code = (
        "import sys, lalora, lalora.curvature, lalora.checkpoint, lalora.metrics\n"
        "bad = [m for m in ('prefect', 'mlflow', 'deepspeed', 'datasets') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"lalora pulled in: {out.stdout.strip()}"
