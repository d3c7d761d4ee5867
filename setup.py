"""Package layout only (metadata lives in pyproject.toml).

The top-level ``tokenizers/`` folder holds the tokenizer implementations and is installed as
``manifold_lab.tokenizers``. It must never be installed as a top-level ``tokenizers`` module:
that name belongs to Hugging Face's package. ``tests/test_packaging.py`` checks the wheel.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["manifold_lab", "manifold_lab.*"])
packages += ["manifold_lab.tokenizers"] + [
    f"manifold_lab.tokenizers.{name}" for name in find_packages(where="tokenizers")
]
package_dir = {"manifold_lab": "manifold_lab", "manifold_lab.tokenizers": "tokenizers"}

setup(packages=packages, package_dir=package_dir)
