"""Ray job: the whole pipeline (each stage resumes from outputs already complete).

    ray job submit --working-dir . -- python jobs/run_pipeline.py --config FILE [--until STAGE] [--set K=V]
    rayapp submit --address http://127.0.0.1:8265 -- python jobs/run_pipeline.py --config FILE
"""

from _entry import run

if __name__ == "__main__":
    run("run")
