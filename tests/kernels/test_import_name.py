"""The kernels import as `hmtrain_kernels`, so an installed PyPI project named `kernels` cannot shadow them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_foreign_kernels_package_first_on_the_path_changes_nothing(tmp_path):
    foreign = tmp_path / "kernels"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("raise ImportError('this is the PyPI project named kernels')\n")
    code = ("import sys\n"
            "import hmtrain.model, hmtrain_kernels\n"
            "assert 'kernels' not in sys.modules, sorted(m for m in sys.modules if m.startswith('kernels'))\n"
            "from hmtrain.model import transformer\n"
            "assert transformer.memory_ffn.__module__ == 'hmtrain_kernels', transformer.memory_ffn.__module__\n"
            "print(hmtrain_kernels.__file__)\n")
    # run from outside the repository, with the foreign package ahead of everything else on the path
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()).resolve() == REPO / "kernels" / "__init__.py"
