"""``hpc-mto export``: a finished run's output as a file other tools load without hpc-mto.

- ``safetensors``: the weights alone (an ensemble's as ``members.<t>.<name>``), for code that builds
  the network itself (model.json says how);
- ``torch-export``: ``torch.export`` program (``.pt2``, batch size free), loaded with
  ``torch.export.load(path).module()``; needs nothing beyond torch.
- ``onnx``: ONNX through torch's dynamo exporter; needs the optional extra ``hpc-mto[onnx]``.

The exported network takes preprocessed samples, like the network in ``model.safetensors`` (``model.json``
records the preprocessing; ``hpc-mto predict`` applies it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .model_io import Ensemble, load_output, write_weights
from .rundir import RunDir

FORMATS = {"safetensors": ".safetensors", "torch-export": ".pt2", "onnx": ".onnx"}


def export(run_dir: Path, fmt: str, out: Path | None = None, ensemble: bool | None = None) -> Path:
    run = RunDir(run_dir).require()
    info = run.model_record()
    net = load_output(run.path, ensemble)
    out = out or run.path / f"{'ensemble' if isinstance(net, Ensemble) else 'model'}{FORMATS[fmt]}"
    if fmt == "safetensors":
        if out.resolve() == run.model_file.resolve():
            return out  # the run's own output file already is that export
        write_weights(out, net.state_dict())
        return out
    # Two samples, not one: torch.export would specialise a batch dimension of size 1.
    example = (torch.zeros(2, *info.input_shape),)
    batch = ({0: torch.export.Dim("batch")},)
    if fmt == "torch-export":
        torch.export.save(torch.export.export(net, example, dynamic_shapes=batch), str(out))
    else:
        try:
            import onnx  # noqa: F401  (torch's exporter needs it; say so plainly when it is missing)
            import onnxscript  # noqa: F401
        except ImportError:
            raise UserError("--format onnx needs the onnx and onnxscript packages: pip install 'hpc-mto[onnx]'") \
                from None
        torch.onnx.export(net, example, str(out), dynamo=True, dynamic_shapes=batch)
    return out
