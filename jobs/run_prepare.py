"""Ray job: the prepare stage.  ray job submit --working-dir . -- python jobs/run_prepare.py --config FILE [--set K=V]"""

from _entry import run

if __name__ == "__main__":
    run("prepare")
