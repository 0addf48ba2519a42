"""ruff over the whole project, as part of the suite: the house style without arguing about it."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the test extra: pip install -e .[test]"
    proc = subprocess.run([ruff, "check", "dodo.py", "pipeline", "tests", "bench"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_readme_layout_names_every_module():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout") :].split("\n## ", 1)[0]
    modules = sorted(p.name for p in (ROOT / "pipeline").glob("*.py") if p.name != "__init__.py")
    assert [m for m in modules if m not in layout] == []
