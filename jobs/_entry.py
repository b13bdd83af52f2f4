"""Shared body of the Ray job entrypoints in this folder.

A job's driver runs in the uploaded working dir (``--working-dir .``) or in an image that holds the
repo; either way the repo root is put first on ``sys.path`` so the job runs the code it was
submitted with. Inside a job Ray sets RAY_ADDRESS, so every stage joins the job's cluster.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(command: str) -> None:
    sys.path.insert(0, REPO)
    from rayapp.cli import main

    raise SystemExit(main([command, *sys.argv[1:]]))
