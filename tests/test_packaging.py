"""What `pip install` puts in site-packages: one package, the command, the built-in model."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_only_under_mlx_diffgemma(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("mlx_diffgemma-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"mlx_diffgemma", wheel.name.split("-py")[0] + ".dist-info"}
    assert "mlx_diffgemma/command/cli.py" in names and "mlx_diffgemma/convert/converter.py" in names
    assert {"mlx_diffgemma/sudoku_model/config.json", "mlx_diffgemma/sudoku_model/model.safetensors"} <= set(names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "mlx-diffgemma = mlx_diffgemma.command.cli:app" in entry_points


def test_no_generic_top_level_module_is_importable():
    code = "import importlib.util as u; print(u.find_spec('cli'), u.find_spec('convert'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.split() == ["None", "None"]
