"""Imported first by every job: the checkout the job runs from (``platform/`` and the repo root, for
``twinflow`` and ``evals``) goes to the front of ``sys.path``, so ``ray job submit --working-dir .``
and a plain ``python jobs/<job>.py`` run the submitted code even on an image that has another copy of
the package installed. Ray workers get the same tree from ``twinflow.ray_env`` (py_modules)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT), str(ROOT / "platform")):  # platform/ ends up first
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)
