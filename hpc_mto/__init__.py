"""hpc-mto: DNN training over K data splits with knowledge transfer between the K tasks
(Zhang, Qin, Pan, Sellis, IJCNN 2020), locally under mpiexec or on SLURM via submitit."""

__version__ = "0.3.0"

__all__ = ["launch", "Run", "RunFailed"]


def __getattr__(name: str):
    # The API (hpc_mto.api) is imported on first use: the ranks and the CLI import this package too.
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'hpc_mto' has no attribute {name!r}")
