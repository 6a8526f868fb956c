"""Ray job: the `evaluate` stage.

`ray job submit --working-dir . -- python jobs/evaluate.py --config configs/digits.yaml`
"""

from oodscale.cli import job_main

if __name__ == "__main__":
    job_main("evaluate")
