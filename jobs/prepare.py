"""Ray job: the `prepare` stage.

`ray job submit --working-dir . -- python jobs/prepare.py --config configs/digits.yaml`
"""

from oodscale.cli import job_main

if __name__ == "__main__":
    job_main("prepare")
