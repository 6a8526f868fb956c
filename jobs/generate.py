"""Ray job: the `generate` stage.

`ray job submit --working-dir . -- python jobs/generate.py --config configs/digits.yaml`
"""

from oodscale.cli import job_main

if __name__ == "__main__":
    job_main("generate")
