"""Packaging: the repository keeps its top-level folders, the installed names live under
the `gauntlet` namespace (which has no folder of its own).

`pyproject.toml` holds the metadata; this file only maps `gauntlet.cluster` to
`cluster/` (and so on) for every subpackage, which the declarative `packages.find` cannot
express. Without the prefix, generic names like `db` and `workers` would land at the top
of site-packages and collide with other distributions.
"""

from setuptools import find_packages, setup

ROOTS = ("cluster", "db", "scheduler", "workers")

setup(
    packages=[f"gauntlet.{name}" for name in find_packages(include=[f"{r}*" for r in ROOTS])],
    package_dir={f"gauntlet.{root}": root for root in ROOTS},
)
