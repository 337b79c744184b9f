"""Print the pip requirements of one image, read from pyproject.toml (the one list of our dependencies).

    python requirements.py inference   # the serving base: everything in [project].dependencies
    python requirements.py gateway     # the same without onnxruntime: the gateway only decodes and forwards
    python requirements.py dicom       # the gateway's set plus the `dicom` extra (pynetdicom, highdicom)
    python requirements.py trainer     # the serving base plus the `train` extra (torch)

Why: pip cannot install "the dependencies of a project, less one", and installing the dependencies in their own
layer, before the source is copied, keeps image rebuilds after a code change to seconds.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# Packages an image leaves out, by name (before any version or marker).
EXCLUDE = {"inference": set(), "gateway": {"onnxruntime", "onnxruntime-gpu"}, "dicom": {"onnxruntime", "onnxruntime-gpu"},
           "trainer": set()}
EXTRAS = {"inference": [], "gateway": [], "dicom": ["dicom"], "trainer": ["train"]}


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0].lower()


def requirements(image: str, pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in EXTRAS[image]:
        wanted += project["optional-dependencies"][extra]
    return [r for r in wanted if requirement_name(r) not in EXCLUDE[image]]


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[1] not in EXCLUDE:
        print(f"usage: requirements.py {{{','.join(EXCLUDE)}}} [pyproject.toml]", file=sys.stderr)
        return 2
    pyproject = Path(argv[2] if len(argv) == 3 else "pyproject.toml")
    print("\n".join(requirements(argv[1], pyproject)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
