"""hmtrain: pretraining small language models with a hierarchical parametric memory."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_requirements(name: str) -> list[str]:
    lines = (HERE / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "-r"))]


setup(
    name="hmtrain",
    version="0.1.0",
    description="Distributed pretraining of small LMs with hierarchical parametric memories",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The kernels live in kernels/ but import as `hmtrain_kernels`: a top-level `kernels` would
    # collide with the PyPI project of that name.
    packages=find_packages(include=["hmtrain", "hmtrain.*"]) + ["hmtrain_kernels"],
    package_dir={"hmtrain_kernels": "kernels"},
    install_requires=read_requirements("requirements.txt"),
    extras_require={"dev": read_requirements("requirements-dev.txt")},
    entry_points={"console_scripts": ["hmtrain=hmtrain.cli:main"]},
)
