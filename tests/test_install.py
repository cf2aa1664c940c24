"""`make install` installs what the committed dvc.lock was made with: constraints.txt pins every
dependency of pyproject.toml (and of the cpu and dev extras) to one version inside its range."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.pipeline_fixture import REPO_ROOT


def pins() -> dict[str, Version]:
    pinned = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not a name==version pin"
            pinned[canonicalize_name(name)] = Version(version)
    return pinned


def test_every_dependency_is_pinned_within_its_range() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [Requirement(r) for r in [*project["dependencies"], *extras["cpu"], *extras["dev"]]]
    pinned = pins()
    makefile = (REPO_ROOT / "Makefile").read_text()
    for req in wanted:
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        if name == "torch":  # pinned by the Makefile, whose CPU and CUDA builds differ
            version = Version(re.search(r'"torch==([^"]+)"', makefile).group(1))
        else:
            assert name in pinned, (
                f"constraints.txt pins no version of {req.name}: make constraints"
            )
            version = pinned[name]
        assert req.specifier.contains(version, prereleases=True), (
            f"constraints.txt pins {req.name}=={version}, outside pyproject.toml's {req}"
        )
    assert "torch" not in pinned and "-c constraints.txt" in makefile
