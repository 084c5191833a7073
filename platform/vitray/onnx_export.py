"""``vitray export MODEL_URI --format onnx [--int8] [--opset N] -o DIR``: a model for ONNX Runtime, with its
preprocessing contract beside it, checked against PyTorch, and attached to its registered version.

The folder written::

    model.onnx          the model's forward as an ONNX graph: ``image`` float32 (N, 3, S, S), normalised as
                        ``preprocessing`` says, -> ``outputs`` (the task's raw outputs); N is a dynamic axis
    model.int8.onnx     (--int8) the same graph with its linear layers (MatMul/Gemm) dynamically quantized to int8
                        by ONNX Runtime's quantization tools (weights int8 per output channel, activations
                        quantized per batch at run time)
    vitray_model.json   the export's metadata (task, class names, preprocessing: input size, mean/std, crop_pct,
                        interpolation) and an ``onnx`` record: files, opset, exporter, parity with PyTorch

Pre- and post-processing (decode, resize/crop, softmax, mask resize, box decoding and NMS) stay outside the graph,
in the task's inference head, so the ONNX model answers exactly as the PyTorch one does on any runtime.

The exporter is torch's dynamo exporter (``torch.onnx.export(dynamo=True)``: ``torch.export`` then onnxscript),
which traces timm's ViTs with a symbolic batch dimension and fuses attention into ONNX ops; where it fails for a
model, the TorchScript exporter is tried and the record says which one wrote the graph and why.

A registry URI (``models:/NAME@ALIAS`` or ``models:/NAME/V``) gets the folder logged to the version's run as
``onnx/v<V>`` and the version tagged ``vitray.onnx`` with its URI, so ``models:/NAME@champion`` can be served and
scored either way (``serve.runtime: onnx``, ``vitray score --runtime onnx``).
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vitray.export_format import EXPORT_META, ExportError
from vitray.onnx_runtime import ONNX_FILES, ONNX_INPUT, ONNX_OUTPUT, OnnxModel

__all__ = ["export_onnx", "OnnxExport", "DEFAULT_OPSET", "attach_to_version"]

log = logging.getLogger("vitray.onnx")
DEFAULT_OPSET = 18
MAX_SINGLE_FILE_BYTES = 1_800_000_000  # protobuf's 2 GB limit: larger models keep their weights in a .data file


@dataclass
class OnnxExport:
    folder: str
    files: dict[str, int]               # file -> bytes
    exporter: str
    opset: int
    parity_max_abs_diff: float          # fp32 graph vs PyTorch, float32 outputs on the check batch
    int8_top1_agreement: float | None   # int8 vs PyTorch top-1 on the check batch (classifiers), or None
    source: dict = field(default_factory=dict)
    registered: str | None = None       # the artifact URI the registered version is tagged with

    def line(self) -> str:
        sizes = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in self.files.items())
        out = (f"[vitray] ONNX export in {self.folder} ({self.exporter} exporter, opset {self.opset}): {sizes}; "
               f"max |onnx - torch| = {self.parity_max_abs_diff:.2e}")
        if self.int8_top1_agreement is not None:
            out += f"; int8 top-1 agrees with torch on {self.int8_top1_agreement:.1%} of the check batch"
        return out + (f"; attached to {self.source.get('uri')} as {self.registered}" if self.registered else "")


def _export_graph(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> str:
    """Write ``model``'s forward to ``path``; returns the exporter that did ("dynamo" or "torchscript: <why>")."""
    import warnings

    large = sum(p.numel() * p.element_size() for p in model.parameters()) > MAX_SINGLE_FILE_BYTES
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                              opset_version=opset, dynamo=True, dynamic_shapes=({0: batch},), external_data=large,
                              verbose=False)
        return "dynamo"
    except Exception as err:  # noqa: BLE001 - the TorchScript exporter is the documented fallback
        why = str(err).strip().splitlines()[0][:200]
        log.warning("vitray: the dynamo ONNX exporter failed (%s); trying the TorchScript exporter", why)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          opset_version=opset, dynamo=False,
                          dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}})
    return f"torchscript (dynamo failed: {why})"


def _quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of the linear layers (MatMul, Gemm), weights per output channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="vitray-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"])


def _check_batch(meta: dict, images: list | None, n: int = 16) -> np.ndarray:
    """The normalised float32 batch parity is measured on: ``images`` (encoded bytes) prepared as serving does,
    else a fixed-seed standard normal batch (what normalised pixels look like)."""
    from vitray.predict import normalise_numpy, prepare

    if images:
        return normalise_numpy([prepare(im, meta)[0] for im in images], meta)
    s = int(meta["preprocessing"]["img_size"])
    return np.random.default_rng(0).standard_normal((n, 3, s, s)).astype(np.float32)


def attach_to_version(folder: Path, pin: dict, tracking_uri: str | None) -> str:
    """Log ``folder`` to the registered version's run as ``onnx/v<V>`` and tag the version with its URI."""
    from vitray.tracking.uris import ONNX_TAG, client_for, default_tracking_uri

    client = client_for(default_tracking_uri(tracking_uri))
    mv = client.get_model_version(pin["name"], pin["version"])
    if not mv.run_id:
        raise ValueError(f"model {pin['uri']} has no MLflow run to hold its ONNX export")
    path = f"onnx/v{pin['version']}"
    client.log_artifacts(mv.run_id, str(folder), artifact_path=path)
    uri = f"runs:/{mv.run_id}/{path}"
    client.set_model_version_tag(pin["name"], pin["version"], ONNX_TAG, uri)
    return uri


def export_onnx(source: str, output: str | Path, *, int8: bool = False, opset: int = DEFAULT_OPSET,
                tracking_uri: str | None = None, register: bool = True, check_images: list | None = None,
                overwrite: bool = False) -> OnnxExport:
    """Export ``source`` (any model URI) to ONNX in ``output``; see the module docstring."""
    from vitray.models.export import load_export
    from vitray.tracking.uris import pin_model_uri, resolve_model_uri

    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            raise ExportError(f"ONNX export needs {module}: pip install onnx onnxscript onnxruntime") from None
    out = Path(output).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output {output}: exists and is not empty (use --overwrite)")
    pin = pin_model_uri(source, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="vitray-onnx-src-") as tmp:
        folder = resolve_model_uri(pin["uri"], tracking_uri, dest=tmp)
        from vitray.export_format import read_export_meta
        from vitray.tasks import TASKS

        task = read_export_meta(folder)["task"]
        if task in TASKS and TASKS[task].inputs != "image":  # an image-in graph is what the ONNX runtimes run
            raise ExportError(f"model {source}: a {task} model takes {TASKS[task].inputs}s; ONNX export covers "
                              "models that take images")
        model, meta = load_export(folder)
    model = model.float().eval()
    s = int(meta["preprocessing"]["img_size"])
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.time()
    fp32 = out / ONNX_FILES["fp32"]
    exporter = _export_graph(model, torch.randn(2, 3, s, s), fp32, opset)
    files = {"fp32": fp32.name}
    if int8:
        _quantize_int8(fp32, out / ONNX_FILES["int8"])
        files["int8"] = ONNX_FILES["int8"]
    record = {"files": files, "opset": opset, "exporter": exporter, "input": ONNX_INPUT, "output": ONNX_OUTPUT,
              "dynamic_axes": {ONNX_INPUT: ["batch"], ONNX_OUTPUT: ["batch"]},
              "source": {k: pin[k] for k in ("source", "uri", "name", "version")},
              "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / EXPORT_META).write_text(json.dumps({**meta, "onnx": record}, indent=1))

    x = _check_batch(meta, check_images)  # parity, measured now and kept in the record
    with torch.no_grad():
        want = model(torch.from_numpy(x)).float().numpy()
    got = OnnxModel(out, "fp32", threads=None)(x)
    record["parity_max_abs_diff"] = float(np.abs(got - want).max())
    agreement = None
    if int8:
        q = OnnxModel(out, "int8")(x)
        record["int8_max_abs_diff"] = float(np.abs(q - want).max())
        if want.ndim == 2:  # one score per class: top-1 agreement says what int8 costs a classifier
            agreement = float((q.argmax(1) == want.argmax(1)).mean())
            record["int8_top1_agreement"] = agreement
    record["check_batch"] = f"{len(x)} {'images' if check_images else 'standard normal inputs'}"
    (out / EXPORT_META).write_text(json.dumps({**meta, "onnx": record}, indent=1))
    log.info("vitray: ONNX export of %s in %.1fs", pin["source"], time.time() - t0)
    result = OnnxExport(str(out), {f: (out / f).stat().st_size for f in sorted(p.name for p in out.iterdir())},
                        exporter, opset, record["parity_max_abs_diff"], agreement, source=pin)
    if register and pin.get("version"):
        result.registered = attach_to_version(out, pin, tracking_uri)
    return result
