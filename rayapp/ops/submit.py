"""`rayapp submit`: submit a command as a Ray job, stream its logs, and exit with its outcome.

    rayapp submit --address http://127.0.0.1:8265 -- python jobs/run_pipeline.py --config configs/tiny.yaml

A thin layer over Ray's JobSubmissionClient, as `ray job submit` is, with three differences: the
working dir is uploaded without local build outputs (.venv, runs/, .git), the exit status is the
job's (0 succeeded, 1 failed or stopped), and secrets are refused in the job's runtime_env (Ray
stores it in the job's metadata and the dashboard shows it): give keys to the cluster's
environment instead (a Kubernetes Secret, the nodes' env).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys

from rayapp.core.errors import ConfigError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".venv", "venv", "runs", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", "*.whl"]
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)", re.I)


class SubmitError(ConfigError):
    """A submission refused before it reaches the cluster (usage, secrets in the runtime env)."""


def build_runtime_env(working_dir: str | None, runtime_env_json: str | None) -> dict:
    try:
        env = json.loads(runtime_env_json) if runtime_env_json else {}
    except json.JSONDecodeError as exc:
        raise SubmitError(f"--runtime-env-json is not valid JSON: {exc.msg}") from None
    if not isinstance(env, dict):
        raise SubmitError("--runtime-env-json must be a JSON object")
    secrets = [k for k in (env.get("env_vars") or {}) if _SECRET_NAME.search(k)]
    if secrets:
        raise SubmitError(
            f"refusing to put {', '.join(secrets)} in the job's runtime_env: Ray stores it with the job and "
            "shows it on the dashboard. Set secrets in the cluster's environment (e.g. a Kubernetes Secret)")
    if working_dir:
        if not os.path.isdir(working_dir):
            raise SubmitError(f"--working-dir {working_dir}: not a folder")
        env.setdefault("working_dir", working_dir)
        env["excludes"] = sorted(set(env.get("excludes", [])) | set(EXCLUDES))
    return env


def submit(address: str, entrypoint: list[str], working_dir: str | None = ".", runtime_env_json: str | None = None,
           wait: bool = True, submission_id: str | None = None, out=sys.stdout) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    if not entrypoint:
        raise SubmitError("no entrypoint: put the command after --, e.g. -- python jobs/run_pipeline.py --config FILE")
    runtime_env = build_runtime_env(working_dir, runtime_env_json)
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env, submission_id=submission_id)
    print(f"[submit] job {job_id} submitted to {address}: {shlex.join(entrypoint)}", file=out, flush=True)
    if not wait:
        print(f"[submit] follow it with: ray job logs --address {address} --follow {job_id}", file=out)
        return 0

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(stream())
    except KeyboardInterrupt:
        print(f"\n[submit] stopped following; job {job_id} keeps running (ray job stop --address {address} {job_id})",
              file=out)
        return 130
    info = client.get_job_info(job_id)
    status = info.status
    if status == JobStatus.SUCCEEDED:
        print(f"[submit] job {job_id} succeeded", file=out)
        return 0
    print(f"[submit] job {job_id} {str(status.value).lower()}: {info.message or ''}".rstrip(), file=out)
    return 1
