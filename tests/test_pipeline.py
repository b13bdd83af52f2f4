"""The whole pipeline, as a user runs it on a cluster (a Ray job on three nodes), on real Alpaca rows."""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ALPACA, REPO, SHARED, tiny_config_dict

pytestmark = pytest.mark.slow  # not in `make test-fast`: a pipeline or training run


HOLDOUT = 16  # rows held out of selection and training; the fine-tuned models' eval loss is measured on them


def pipeline_config(tmp, limit: int = 160, name: str = "cfg.yaml", tracking: dict | None = None):
    cfg = tiny_config_dict(tmp, [{"path": str(ALPACA), "limit": limit}], data__shard_rows=64, data__max_length=128,
                           data__holdout_rows=HOLDOUT)
    cfg.pop("ray")  # inside a job the stages join the job's cluster (RAY_ADDRESS)
    cfg["reference"] = {"epochs": 3, "learning_rate": 2e-3, "per_device_batch_size": 16, "num_workers": 2,
                        "fsdp": False, "log_every_steps": 1}
    cfg["score"] = {"modes": ["prompted", "response_only"], "rows_per_task": 64,
                    "resources": {"num_cpus": 1, "min_actors": 2, "max_actors": 2, "resources": {"gpu_small": 1}}}
    cfg["select"] = {"budget": 0.25, "n_clusters": 4, "embed_max_tokens": 48}
    cfg["finetune"] = {"epochs": 1, "learning_rate": 2e-3, "per_device_batch_size": 8, "num_workers": 2,
                       "eval_rows": 16}
    cfg["evaluate"] = {"models": ["selected", "full"], "sets": ["sinstruct", "vicuna"], "max_prompts": 6,
                       "eval_dir": str(SHARED / "eval"),
                       "generation": {"max_new_tokens": 16, "batch_size": 12, "temperature": 0.7, "top_p": 0.9,
                                      "repetition_penalty": 1.2},
                       "judge": {"kind": "reference"}}
    if tracking:
        cfg["tracking"] = tracking
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def wait_for(predicate, timeout: float, what: str, job_id: str, client) -> None:
    t0 = time.time()
    while not predicate():
        status = client.get_job_status(job_id)
        if status.is_terminal():
            pytest.fail(f"job {job_id} ended ({status}) before {what}:\n{client.get_job_logs(job_id)[-3000:]}")
        if time.time() - t0 > timeout:
            pytest.fail(f"no {what} after {timeout}s")
        time.sleep(0.5)


def run_pipeline_job(tmp_path_factory, three_nodes, stop_first: bool, tracking: dict | None = None):
    """`rayapp run` as users run it on a cluster: submitted as a Ray job (jobs/run_pipeline.py,
    the repo uploaded as the working dir) to a three-node cluster, scoring pinned by a custom
    resource to the two 'GPU' nodes. With ``stop_first``, a first submission is stopped (`ray job
    stop`) once the reference model's first epoch checkpoint is committed, and the same command is
    then submitted again to finish the run."""
    from rayapp.ops.submit import submit
    from tests.conftest import wait_for_job_server

    _, address = three_nodes
    wait_for_job_server(address)
    tmp = tmp_path_factory.mktemp("pipeline")
    path = pipeline_config(tmp, tracking=tracking)
    # sys.executable: the venv's python (a cluster image's `python` is its own environment)
    entry = [sys.executable, "jobs/run_pipeline.py", "--config", str(path)]
    if stop_first:
        submit_and_stop(address, entry, tmp / "run")
    out = io.StringIO()
    rc = submit(address, entry, working_dir=str(REPO), out=out)
    return tmp / "run", subprocess.CompletedProcess(["rayapp submit"], rc, out.getvalue(), out.getvalue()), address


def submit_and_stop(address: str, entry: list[str], run) -> None:
    """Submit, and stop the job (`ray job stop`) once the reference model's first checkpoint is in."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    from rayapp.ops.submit import submit

    client = JobSubmissionClient(address)
    first = f"rayapp-test-{uuid.uuid4().hex[:8]}"
    submit(address, entry, working_dir=str(REPO), wait=False, submission_id=first, out=io.StringIO())
    ckpts = run / "reference" / "checkpoints"
    wait_for(lambda: any(ckpts.glob("step-*/rayapp_progress.json")), 600, "reference checkpoint", first, client)
    assert client.stop_job(first)
    t0 = time.time()
    while not client.get_job_status(first).is_terminal() and time.time() - t0 < 60:
        time.sleep(0.5)
    assert client.get_job_status(first) == JobStatus.STOPPED, client.get_job_logs(first)[-3000:]
    # Ray kills a stopped job's actors (here the training workers) a few seconds after its driver;
    # re-submit once they are gone, so two attempts never write the same checkpoints
    ray_job = client.get_job_info(first).job_id
    t0 = time.time()
    while [a for a in list_actors(address=address, filters=[("job_id", "=", ray_job)], limit=10_000)
           if a.state != "DEAD"] and time.time() - t0 < 60:
        time.sleep(0.5)
    assert not (run / "summary.json").exists()


# pipeline_run (conftest.py): this module's run, tracked to a real MLflow server for test_tracking


def test_run_finishes_with_a_summary(pipeline_run):
    out, proc, _ = pipeline_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rayapp run 'test' finished" in proc.stdout
    # the clustering started ahead did its work in its Ray worker, and the actor pools' Ray-internal
    # lines stayed in Ray's logs (core/datapools.py)
    assert "background clustering failed" not in proc.stdout
    assert "core_worker.cc" not in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["prepare", "reference", "score", "select", "finetune (selected)",
                                       "finetune (full)", "evaluate"]
    assert not any(s["skipped"] for s in summary["stages"].values())
    # ends with the win / tie / lose table of the LP selection against the full set
    table = proc.stdout.split("finished in")[-1]
    assert "| set (selected [" in table and " rows] vs full [144 rows]) | win | tie | lose |" in table


def test_stage_actors_ran_on_both_gpu_nodes(pipeline_run, three_nodes):
    from ray.util.state import list_actors

    out, proc, address = pipeline_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    worker_nodes = {n.node_id for n in three_nodes[0].worker_nodes}
    scorers = [a for a in list_actors(address=address, limit=10_000, detail=True) if "LossScorer" in a.class_name]
    assert {a.node_id for a in scorers} == worker_nodes  # one per 'gpu_small' node, none on the head


def test_evaluation_compares_selected_with_full(pipeline_run):
    out, proc, _ = pipeline_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = json.loads((out / "finetune" / "full" / "manifest.json").read_text())
    selected = json.loads((out / "finetune" / "selected" / "manifest.json").read_text())
    prepared = json.loads((out / "prepared" / "manifest.json").read_text())
    assert full["rows"] == prepared["rows"] == 160 - HOLDOUT > selected["rows"]
    # both models' eval loss is measured on the held-out rows, which neither trained on
    assert full["eval_rows"] == selected["eval_rows"] == HOLDOUT
    assert np.isfinite(full["metrics"]["eval_loss"]) and np.isfinite(selected["metrics"]["eval_loss"])
    results = json.loads((out / "evaluate" / "results.json").read_text())
    pair = results["pairs"]["selected vs full"]
    assert pair["sinstruct"]["judged"] + pair["sinstruct"]["unparseable"] == 6
    # Vicuna has no reference answers, so the reference judge cannot judge it: left out, and said so
    assert "vicuna" not in pair and results["judged_sets"] == ["sinstruct"] and results["sets"] == ["sinstruct", "vicuna"]
    assert "not judged (no reference answers for this judge): vicuna" in proc.stdout
    assert set(results["rouge_l"]) == {"selected", "full"}
    for m in ("selected", "full"):
        gens = pq.read_table(out / "evaluate" / "generations" / f"{m}.parquet").to_pylist()
        assert len(gens) == 6 and all(isinstance(g["answer"], str) for g in gens)
    assert (out / "evaluate" / "results.png").stat().st_size > 5000
    sized = f"selected [{selected['rows']} rows] vs full [{full['rows']} rows]"
    assert sized in (out / "evaluate" / "report.html").read_text()
    assert sized in proc.stdout  # every table states the sizes of the models it compares
    # the blind page for people: every pair's prompts, no model names on it; the key says which is which
    key = json.loads((out / "evaluate" / "human" / "key.json").read_text())
    assert len(key["items"]) == 6 and results["human_page"].endswith("human/index.html")
    page = (out / "evaluate" / "human" / "index.html").read_text()
    data = json.loads(page.split('id="data">')[1].split("</script>")[0])
    assert data["page_id"] == key["page_id"] and len(data["items"]) == 6
    assert all(set(it) == {"item", "set", "question", "left", "right"} for it in data["items"])  # no names


def test_trajectories_selection_and_provenance(pipeline_run):
    out, proc, _ = pipeline_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    prepared_ids = {i for f in sorted((out / "prepared").glob("shard-*.parquet"))
                    for i in pq.read_table(f, columns=["id"])["id"].to_pylist()}
    traj = pq.read_table(out / "scores" / "trajectories.parquet").to_pandas()
    assert list(traj.columns[:2]) == ["id", "n_tokens"] and {"P0", "P1", "P2", "P3", "ro_nll0"} <= set(traj.columns)
    assert set(traj.id) == prepared_ids and traj.id.is_unique
    assert (traj.P3 < traj.P0).mean() > 0.9  # the reference model learned
    manifest = json.loads((out / "select" / "manifest.json").read_text())
    main = manifest["selections"]["lp"]
    sel = pq.read_table(main["path"]).to_pandas()
    assert set(sel.id) <= prepared_ids and {"instruction", "output", "input_ids", "lp1", "cluster"} <= set(sel.columns)
    prov = json.loads((out / "select" / main["tag"] / "selection.json").read_text())
    for key in ("method", "budget", "seed", "cluster_settings", "config_digest", "input_manifest_sha256",
                "trajectories", "selected", "lp_app_p1_from"):
        assert key in prov
    assert prov["selected"] == len(sel) and prov["n_clusters"] == 4
    # the selection is the hardest chunk of each cluster
    for _, group in sel.groupby("cluster"):
        assert len(group) >= 1
    assert set(manifest["selections"]) >= {"clust_rand", "random", "ppl_high", "ppl_high:global", "ifd",
                                           "ifd_cherry", "longest", "longest:global"}
    # every compared subset is as large as LP's: clust_rand by its per-cluster counts, the global
    # ones (random among them) by drawing exactly LP's row count
    provs = {k: json.loads((out / "select" / e["tag"] / "selection.json").read_text())
             for k, e in manifest["selections"].items()}
    # ifd_cherry ranks only rows whole in max_length with IFD <= 1 (Cherry-LLM's rule): it may have
    # fewer than LP's count to give, and then gives them all
    cherry = manifest["selections"]["ifd_cherry"]["rows"]
    assert cherry == main["rows"] or (cherry < main["rows"] and provs["ifd_cherry"]["dropped_truncated"] > 0)
    assert {e["rows"] for k, e in manifest["selections"].items() if k != "ifd_cherry"} == {main["rows"]}
    assert provs["random"]["scope"] == "global" and provs["random"]["size_matched_to"] == main["rows"]
    assert provs["clust_rand"]["scope"] == provs["ppl_high"]["scope"] == "stratified"
    assert manifest["selections"]["ppl_high:global"]["tag"] == "ppl_high-global-low-25pct"
    # "Long Is More": the longest response texts, by characters, not by tokens left after truncation
    assert provs["longest:global"]["length_measure"] == "characters of the response text"
    shards = sorted((out / "prepared").glob("shard-*.parquet"))
    rows = pd.concat([pq.read_table(f, columns=["id", "output", "n_response_tokens"]).to_pandas() for f in shards])
    rows = rows[rows.n_response_tokens > 0]  # rows whose prompt fills max_length are not ranked
    chars = rows.set_index("id").output.str.len()
    longest = pq.read_table(manifest["selections"]["longest:global"]["path"])["id"].to_pylist()
    assert chars[longest].min() >= chars.sort_values().iloc[-len(longest)]


def test_finetuned_target_exists_and_reloads(pipeline_run):
    out, proc, _ = pipeline_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "finetune" / "selected" / "manifest.json").read_text())
    assert os.path.exists(os.path.join(m["export"], "model.safetensors"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(m["export"], use_safetensors=True)
    assert model.config.num_hidden_layers == 2 and np.isfinite(m["metrics"]["eval_loss"])


def test_finetune_on_a_selection_file(pipeline_run, tmp_path):
    """A selection made elsewhere (a Parquet of ids) trains the target on exactly those prepared
    rows; an id that is not a prepared training row is an error naming the file, row and field."""
    from rayapp.config import load_config
    from rayapp.core.errors import RayappError
    from tests.conftest import run_stage

    run_a, proc, _ = pipeline_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    x = tmp_path / "run"
    _copy_run(run_a, x)
    clust = json.loads((x / "select" / "manifest.json").read_text())["selections"]["clust_rand"]
    ids = pq.read_table(clust["path"])["id"].to_pylist()[:12][::-1]
    chosen = tmp_path / "my picks.parquet"
    pq.write_table(pa.table({"id": ids, "note": ["mine"] * len(ids)}), chosen)
    cfg = load_config(pipeline_config(tmp_path), [f"output_dir={x}", f"finetune.subset={chosen}",
                                                   "finetune.num_workers=0", "finetune.eval_rows=0"])
    m = run_stage("finetune", cfg)
    assert m.subset == str(chosen) and m.rows == 12 and "(12 rows)" in m.data
    trained = pq.read_table(x / "finetune" / "file-my_picks" / "data" / "selected.parquet")
    assert trained["id"].to_pylist() == ids and "input_ids" in trained.column_names
    pq.write_table(pa.table({"id": ids + ["no-such-row"]}), chosen)
    with pytest.raises(RayappError, match=r"my picks.parquet: row 12: field 'id': 'no-such-row' is not a prepared"):
        run_stage("finetune", cfg)


def test_ifd_from_the_untrained_target(pipeline_run, tmp_path):
    """score.ifd_model: target scores the untrained target too (the reference scores already
    committed are kept), and the IFD baselines use its losses, as Cherry-LLM scores with the model
    it selects for."""
    from rayapp.config import load_config
    from rayapp.ml.models.loading import load_causal_lm
    from rayapp.ml.models.losses import one_row_losses
    from tests.conftest import run_stage

    run_a, proc, _ = pipeline_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    x = tmp_path / "run"
    _copy_run(run_a, x)
    cfg = load_config(pipeline_config(tmp_path), [f"output_dir={x}", "score.ifd_model=target", "score.local=true",
                                                   "score.resources.resources={}"])
    run_stage("score", cfg)
    traj = pq.read_table(x / "scores" / "trajectories.parquet").to_pandas().set_index("id")
    shard = pq.read_table(sorted((x / "prepared").glob("shard-*.parquet"))[0]).to_pylist()[:4]
    target = load_causal_lm(str(x / "models" / "target-init")).eval()
    for row, (loss, n) in zip(shard, one_row_losses(target, [(r["input_ids"], r["labels"]) for r in shard])):
        if n:
            assert traj.loc[row["id"], "ifd_nll0"] == pytest.approx(loss / n, rel=1e-4)
    assert not np.allclose(traj.ifd_nll0, traj.nll0)  # not the reference's epoch-0 scores
    sel = run_stage("select", cfg)
    prov = json.loads((x / "select" / sel.selections["ifd_cherry"].tag / "selection.json").read_text())
    assert prov["ifd_scored_by"] == "the untrained target model"


def test_report_renders_in_headless_chromium(pipeline_run, tmp_path):
    out, proc, _ = pipeline_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out / "select" / "report" / "report.html"
    html = report.read_text()
    for png in ("lp_hist.png", "trajectories.png", "lengths.png", "clusters.png", "overlap.png"):
        assert png in html and (report.parent / png).stat().st_size > 5000  # real plots, not blanks
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (`make test` installs it where it can)")
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400",
                    f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape[0] >= 2000
    assert (img < 200).mean() > 0.02  # plots and text drawn, not an empty white page


def _copy_run(src, dst, parts=("models", "prepared", "reference", "scores", "select")):
    """A copy of a finished run's stage outputs, with the absolute paths in its manifests moved along."""
    for part in parts:
        shutil.copytree(src / part, dst / part)
    for manifest in dst.rglob("*.json"):
        manifest.write_text(manifest.read_text().replace(str(src), str(dst)))


def test_stages_refuse_inputs_from_another_run_or_data(pipeline_run, tmp_path, monkeypatch):
    """Each stage checks its inputs' manifests and refuses a mix: trajectories or a selected shard
    changed after they were written, scores of an older reference model, and scores, checkpoints or
    a selection made from other prepared data."""
    from rayapp.config import load_config
    from rayapp.core.errors import InputMismatchError
    from tests.conftest import run_stage

    run_a, proc, _ = pipeline_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    x = tmp_path / "run"
    _copy_run(run_a, x)
    cfg = load_config(pipeline_config(tmp_path), [f"output_dir={x}"])

    traj = x / "scores" / "trajectories.parquet"
    good = traj.read_bytes()
    pq.write_table(pq.read_table(traj).slice(1), traj)  # a row lost after scoring
    with pytest.raises(InputMismatchError, match="trajectories.parquet: content hashes do not match"):
        run_stage("select", cfg)
    traj.write_bytes(good)

    shard = pathlib.Path(json.loads((x / "select" / "manifest.json").read_text())["selections"]["lp"]["path"])
    original = shard.read_bytes()
    pq.write_table(pq.read_table(shard).slice(1), shard)
    with pytest.raises(InputMismatchError, match="selected.parquet: content hashes do not match"):
        run_stage("finetune", cfg)
    shard.write_bytes(original)

    # up to date: nothing runs; --force redoes the stage, its cached embeddings and clusters included
    from rayapp import pipeline

    emb = x / "select" / "clusters.parquet"
    before = emb.stat().st_mtime_ns
    assert pipeline.run("select", cfg).skipped and emb.stat().st_mtime_ns == before
    # (the embedding pool runs on this process's local Ray, which has no 'gpu_small' nodes)
    here = load_config(pipeline_config(tmp_path), [f"output_dir={x}", "score.resources.resources={}"])
    from rayapp.stages.select import stage as select_stage

    monkeypatch.setattr(select_stage, "SELECTION_WINDOW_ROWS", 4)  # each selection written 4 rows at a time
    redone = pipeline.run("select", here, force=True)
    assert not redone.skipped and emb.stat().st_mtime_ns != before
    # and it selects the same rows again, with the same columns: embeddings, k-means and the
    # ranking are deterministic, and a selection written in windows is the one written at once
    first = json.loads((run_a / "select" / "manifest.json").read_text())["selections"]
    for method, entry in redone.manifest.selections.items():
        assert pq.read_table(entry.path).equals(pq.read_table(first[method]["path"]))
        assert pq.ParquetFile(entry.path).num_row_groups == -(-entry.rows // 4)

    marker = x / "reference" / "exports" / "epoch-2" / "rayapp_checkpoint.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "uid": "retrained"}))
    with pytest.raises(InputMismatchError, match="reference checkpoints do not match.*re-run `rayapp score`"):
        run_stage("select", cfg)

    # other data: the same source cut at 150 rows, prepared into the copied run
    other = load_config(pipeline_config(tmp_path, limit=150, name="other.yaml"), [f"output_dir={x}"])
    assert run_stage("prepare", other).rows == 150 - HOLDOUT
    with pytest.raises(InputMismatchError, match="reference checkpoints in .* made from other prepared data"):
        run_stage("score", other)
    with pytest.raises(InputMismatchError, match="scores in .* made from other prepared data"):
        run_stage("select", other)
    with pytest.raises(InputMismatchError, match="the selection in .* made from other prepared data"):
        run_stage("finetune", other)


def test_a_rerun_evaluation_reuses_kept_answers_and_judgments(pipeline_run, tmp_path):
    """Answers and judgments are kept with the keys that made them (core/keyed.py): an evaluation
    run again reads them back, and makes again only a judgment file that lost a line."""
    from rayapp import pipeline
    from rayapp.config import load_config

    run_a, proc, _ = pipeline_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    x = tmp_path / "run"
    _copy_run(run_a, x, parts=("models", "prepared", "reference", "scores", "select", "finetune", "evaluate"))
    (x / "evaluate" / "manifest.json").unlink()
    cfg = load_config(pipeline_config(tmp_path), [f"output_dir={x}"])
    gens = sorted((x / "evaluate" / "generations").glob("*.parquet"))
    judgments = sorted((x / "evaluate" / "judgments").glob("*.jsonl"))
    assert len(gens) == 2 and len(judgments) == 1
    kept = {f: f.stat().st_mtime_ns for f in gens + judgments}
    lines = judgments[0].read_text().splitlines(keepends=True)
    judgments[0].write_text("".join(lines[1:]))  # a judgment lost
    kept.pop(judgments[0])

    again = pipeline.run("evaluate", cfg)
    assert not again.skipped
    assert all(f.stat().st_mtime_ns == t for f, t in kept.items())  # answers read back, not generated
    assert len(judgments[0].read_text().splitlines()) == len(lines)  # the torn file judged again
    first = json.loads((run_a / "evaluate" / "results.json").read_text())["pairs"]
    assert json.loads((x / "evaluate" / "results.json").read_text())["pairs"] == first
