"""Preprocess on a SLURM cluster: dask-jobqueue submits Dask workers as SLURM jobs, and
`ich preprocess` sends its per-file chunks to them (compute.scheduler).

    pip install 'ich[dask]'            # dask, distributed and dask-jobqueue
    python bench/slurm_preprocess.py --config configs/rsna.yaml --jobs 8 --cores 32 \\
        --memory 64GB --walltime 02:00:00 --partition cpu
    python bench/slurm_preprocess.py --dry-run ...     # print the SLURM job script, submit nothing

Run it on a login node of the cluster from a folder on the shared file system: paths.work_dir
must be the same path on every node (ich checks it and names the folder when a worker cannot see
it). Each job runs `--cores` single-threaded worker processes under nannies, so a decoder crash
costs one process, which restarts, and only the file that caused it is marked failed. Kill this
script and run it again to resume: finished chunks are in the journal.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def cluster(args):
    """A SLURMCluster whose jobs each hold `cores` one-thread worker processes."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(
        cores=args.cores, processes=args.cores, memory=args.memory, walltime=args.walltime,
        queue=args.partition, account=args.account, job_name="ich-preprocess",
        # Workers import ich from the same environment as this script.
        python=sys.executable,
        scheduler_options={"dashboard_address": ":8787"})


def main(argv=None) -> int:
    """Start the cluster, wait for its first workers, run `ich preprocess` on it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the ich config (paths.work_dir on shared storage)")
    parser.add_argument("--jobs", type=int, default=4, help="SLURM jobs (nodes) to start")
    parser.add_argument("--cores", type=int, default=32, help="worker processes per job")
    parser.add_argument("--memory", default="64GB", help="memory per job")
    parser.add_argument("--walltime", default="02:00:00")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--dry-run", action="store_true", help="print the job script and stop")
    args = parser.parse_args(argv)
    slurm = cluster(args)
    if args.dry_run:
        print(slurm.job_script())
        slurm.close()
        return 0
    from distributed import Client

    from machine import describe  # bench/machine.py, beside this script

    # The host that submits (the scheduler runs here); the workers' CPUs are the cluster's.
    print(f"submitting host {describe()}", flush=True)
    slurm.scale(jobs=args.jobs)
    with Client(slurm) as client:
        print(f"scheduler {slurm.scheduler_address}, dashboard {client.dashboard_link}", flush=True)
        client.wait_for_workers(1, timeout=3600)  # the queue may hold the jobs a while
        done = subprocess.run([sys.executable, "-m", "ich.cli", "preprocess", "--config", args.config,
                               "--set", f"compute.scheduler={slurm.scheduler_address}"])
    slurm.close()
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
