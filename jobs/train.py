"""Ray job: the `train` stage.

`ray job submit --working-dir . -- python jobs/train.py --config configs/digits.yaml`
"""

from oodscale.cli import job_main

if __name__ == "__main__":
    job_main("train")
