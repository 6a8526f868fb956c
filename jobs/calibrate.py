"""Ray job: the `calibrate` stage (detector thresholds on the ID validation split).

`ray job submit --working-dir . -- python jobs/calibrate.py --config configs/digits.yaml`
"""

from oodscale.cli import job_main

if __name__ == "__main__":
    job_main("calibrate")
