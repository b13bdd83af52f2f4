"""Ray job: the score stage.  ray job submit --working-dir . -- python jobs/run_score.py --config FILE [--set K=V]"""

from _entry import run

if __name__ == "__main__":
    run("score")
