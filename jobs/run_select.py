"""Ray job: the select stage.  ray job submit --working-dir . -- python jobs/run_select.py --config FILE [--set K=V]"""

from _entry import run

if __name__ == "__main__":
    run("select")
