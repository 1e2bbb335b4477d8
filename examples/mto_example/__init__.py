"""A user package for hpc-mto: your own network, named in the config as a factory.

    PYTHONPATH=examples hpc-mto launch --set model.factory=mto_example.models:residual_mlp \
        --set 'model.kwargs={hidden: 64, blocks: 2}'

hpc-mto imports ``mto_example.models`` in the launcher and in every rank, so it must be importable on
every node: on PYTHONPATH (as above; launches pass it on) or installed in the venv.
"""

__version__ = "0.1.0"
