"""`python -m oodscale ...`: the CLI where no `oodscale` script is installed (a GPU host that
runs the project from a wheel bundle on PYTHONPATH, bench/gpu_python.sh)."""

from oodscale.cli import main

raise SystemExit(main())
