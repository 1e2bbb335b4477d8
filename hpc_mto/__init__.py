"""hpc-mto: DNN training over K data splits with knowledge transfer between the K tasks
(Zhang, Qin, Pan, Sellis, IJCNN 2020), locally under mpiexec or on SLURM via submitit."""

__version__ = "0.2.0"
