"""Launchers: where the K tasks run. ``local`` (mpiexec on this machine) and ``slurm`` (submitit)."""
