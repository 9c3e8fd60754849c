"""Batch runs: many requests from one file, each into its own run folder, models loaded once.

    from sdstream.batch import run_batch
    result = run_batch("prompts.jsonl", "outputs/sweep", {"model": "tiny", "steps": 10})

parse.py reads the file, plan.py checks every line before anything runs (and matches it against what is on
disk), run.py runs the lines through the orchestrator and writes OUT/batch.json, distribute.py splits them over
the processes of `accelerate launch`, ray_pool.py over the workers of a Ray cluster (`--ray`).
"""

from .parse import BadLines, read_source
from .plan import BatchRun, plan
from .ray_pool import RayCluster
from .run import SUMMARY, BatchResult, run_batch

__all__ = ["BadLines", "BatchResult", "BatchRun", "RayCluster", "SUMMARY", "plan", "read_source", "run_batch"]
