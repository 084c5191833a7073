"""One typed config for a whole vitray run.

The schema is a tree of pydantic models, one per section (``model``, ``data``, ``train``, ``deepspeed``,
``cluster``, ``tracking``, ``serve``, ``score``,
``kubernetes``). Every section forbids unknown keys, so a typo fails at load
with its dotted path instead of being silently ignored. The same object flows from the YAML file (plus
``--set a.b=c`` overrides) to every component, and the resolved config is written back as YAML next to the
checkpoints and logged to MLflow.

This module imports neither torch nor any vitray module but the torch-free task registry (``vitray.tasks``), so
tools that only render manifests (``vitray.deploy``) can read a config without the training stack. Checks that need the model
registry or the filesystem live in :func:`check_config`, which callers that are about to build a model run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vitray.tasks import TASKS, TaskError, get_task, task_names  # torch-free: the one list of tasks

__all__ = [
    "ConfigError", "RunConfig", "load_config", "parse_config", "apply_overrides", "dump_config",
    "check_config", "vitray_home", "is_model_uri", "MAX_PIXELS",
]


MAX_PIXELS = 64_000_000  # images with more pixels are refused everywhere by default (decompression bombs)


class ConfigError(ValueError):
    """A config that cannot be used. ``str(err)`` is the message the CLI prints (exit code 2)."""

    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = errors or [message]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------- model
class ModelConfig(_Section):
    name: str = Field("vit_tiny_patch4_32", description="timm ViT/DeiT name or a vitray-registered name")
    num_classes: int = Field(10, ge=0, description="0 builds a backbone without classifier")
    img_size: int | None = Field(None, gt=0, description="input size; default: the architecture's own")
    in_chans: int = Field(3, gt=0)
    pos_embed: Literal["learned", "sincos"] = "learned"
    global_pool: Literal["token", "avg"] = "token"
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    grad_checkpointing: bool = False
    checkpoint: str | None = Field(None, description="init weights: a .pth/.bin/.safetensors file or a models:/ runs:/ URI")


# ---------------------------------------------------------------------------------------------- data
class TrainTransforms(_Section):
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    randaugment: str | None = Field(None, description="timm RandAugment spec, e.g. 'rand-m9-mstd0.5-inc1'")

    @model_validator(mode="after")
    def _ordered(self):
        for name in ("scale", "ratio"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi):
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got ({lo}, {hi})")
        if self.scale[1] > 1.0:
            raise ValueError(f"scale high must be <= 1.0, got {self.scale[1]}")
        return self


class EvalTransforms(_Section):
    crop_pct: float = Field(0.875, gt=0.0, le=1.0)


class DataConfig(_Section):
    path: str | None = Field(None, description="packed shards (folder with manifest.json) or a raw source")
    format: Literal["shards", "webdataset", "parquet", "imagefolder"] = "shards"
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = Field(64, gt=0, description="micro batch per worker")
    eval_batch_size: int | None = Field(None, gt=0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    train_transforms: TrainTransforms = TrainTransforms()
    eval_transforms: EvalTransforms = EvalTransforms()
    mixup: float = Field(0.0, ge=0.0, description="Mixup alpha; 0 disables")
    cutmix: float = Field(0.0, ge=0.0, description="CutMix alpha; 0 disables")
    mix_prob: float = Field(1.0, ge=0.0, le=1.0)
    switch_prob: float = Field(0.5, ge=0.0, le=1.0)
    max_pixels: int = Field(MAX_PIXELS, gt=0, description="images with more pixels are refused (decompression bombs)")
    max_boxes: int = Field(100, gt=0, description="detection: boxes kept per image after augmentation (the rest of "
                                                  "a crowded image's boxes are dropped)")
    shuffle: bool = Field(True, description="shuffle file and block order each epoch; false: a fixed stream order "
                                            "(reproducible runs), mixed only by the seeded local shuffle buffer")
    shuffle_buffer: int | None = Field(None, ge=0, description="rows each trainer mixes in a local shuffle buffer "
                                                               "(decoded images); default: what fits in 256 MB, "
                                                               "between 4 micro batches and 4,096 rows; 0: none")
    cpus: float | None = Field(None, gt=0.0, description="CPUs Ray Data's read/decode tasks may use at once "
                                                          "(its resource limit); default: what the trainers leave")
    seed: int = 0


# --------------------------------------------------------------------------------------------- train
class EmaConfig(_Section):
    enabled: bool = False
    decay: float = Field(0.9998, gt=0.0, lt=1.0)
    warmup: bool = Field(False, description="the n-th update averages with min(decay, (1 + n) / (10 + n)): a short "
                                            "run's average forgets the initial weights")


class DistillationConfig(_Section):
    teacher: str | None = Field(None, description="teacher weights: a file or models:/ URI; None disables")
    teacher_model: str | None = Field(None, description="timm name of the teacher when `teacher` is a file")
    kind: Literal["auto", "hard", "soft"] = "auto"
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    tau: float = Field(1.0, gt=0.0)


def _task_with(layer: str, field: str):
    """A validator: the named task exists and has ``layer`` (the registry's message names what it can do)."""
    def check(value: str) -> str:
        try:
            get_task(value, layer)
        except TaskError as err:
            raise ValueError(str(err)) from None
        return value
    check.__name__ = f"_check_{field}"
    return check


class TrainConfig(_Section):
    task: str = Field("classification", description="what to train: " + ", ".join(task_names("train")))
    epochs: int | None = Field(10, gt=0)
    steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs when set")
    optimizer: Literal["adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0.0, description="base lr, scaled by lr_scaling to the global batch")
    lr_scaling: Literal["none", "linear", "sqrt"] = "linear"
    lr_base_batch_size: int = Field(256, gt=0)
    min_lr: float = Field(1e-6, ge=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0.0)
    warmup_steps: int | None = Field(None, ge=0)
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    linear_probe: bool = Field(False, description="freeze the backbone (model.checkpoint's encoder) and train only "
                                                  "a BatchNorm without affine + a linear head on its pooled "
                                                  "features (MAE's linear probing)")
    ema: EmaConfig = EmaConfig()
    distillation: DistillationConfig = DistillationConfig()
    eval_every_steps: int | None = Field(None, gt=0, description="evaluate every N steps (default: each epoch)")
    checkpoint_every_steps: int | None = Field(None, gt=0)
    log_every_steps: int = Field(50, gt=0)
    seed: int = 0

    _task = field_validator("task")(_task_with("train", "task"))

    @model_validator(mode="after")
    def _budget(self):
        if self.epochs is None and self.steps is None:
            raise ValueError("set train.epochs or train.steps")
        return self


# ----------------------------------------------------------------------------------------- deepspeed
class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = Field(1, gt=0)
    grad_clip: float = Field(0.0, ge=0.0, description="max grad norm; 0 disables")
    activation_checkpointing: bool = False
    offload_optimizer: Literal["none", "cpu"] = "none"


# ------------------------------------------------------------------------------------------- cluster
class ClusterConfig(_Section):
    address: str | None = Field(None, description="None: a local Ray instance; 'auto' or ray://host:10001")
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    storage_path: str | None = Field(None, description="run storage; default <vitray home>/runs")
    run_name: str | None = None
    max_failures: int = Field(2, ge=-1)
    resource_wait_s: float = Field(0.0, ge=0.0, description="a cluster that can grow (an autoscaler adds nodes): how "
                                                             "long to wait for the resources this run reserves before "
                                                             "failing; 0: a fixed-size cluster, fail at once")
    stall_timeout_s: float = Field(300.0, ge=0.0, description="a trainer that waits this long for one batch fails the "
                                                              "attempt with Ray's pending demands; 0 disables")
    checkpoints_to_keep: int | None = Field(2, gt=0)
    checkpoint_score_metric: str | None = Field("auto", description="auto: the task's primary metric (val/top1, "
                                                                    "val/miou); None: keep the latest checkpoints")
    checkpoint_score_mode: Literal["auto", "max", "min"] = "auto"


# ------------------------------------------------------------------------------------------ tracking
class TrackingConfig(_Section):
    """MLflow: where runs go, what the registry calls the model, and how a new version earns ``champion``."""

    enabled: bool = True
    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else a sqlite file "
                                              "under the vitray home (no server to start)")
    experiment: str = Field("vitray", min_length=1)
    artifact_location: str | None = Field(None, description="where a new experiment keeps its artifacts (models, "
                                                            "pictures, logs), e.g. s3://bucket/mlflow; default: "
                                                            "beside a sqlite store, or the server's own")
    registered_model: str | None = Field(None, min_length=1, description="register the trained model under this name")
    promotion_metric: str = Field("auto", min_length=1, description="auto: the task's primary metric")
    promotion_mode: Literal["auto", "max", "min"] = "auto"
    flush_interval_s: float = Field(10.0, gt=0.0, description="metrics are sent in batches this often (and at the end)")
    log_images: Literal["end", "epoch", "off"] = Field("end", description="the task's pictures (confusion matrix, "
                                                       "val predictions, reconstructions): at the end; each epoch "
                                                       "under pictures/epoch_NNN/ (the last under pictures/ too); "
                                                       "or none")
    image_grid: int = Field(16, ge=1, le=64, description="val images in the prediction grid")
    connect_timeout_s: float = Field(10.0, gt=0.0, description="a server that does not answer in this time fails the "
                                                               "command before training")


# ------------------------------------------------------------------------------------------ task options
class SegmentationConfig(_Section):
    """``train.task: segmentation``: the decoder on the ViT's patch grid (the backbone is ``model``)."""

    decoder: Literal["pup", "linear"] = Field("pup", description="pup: progressive upsampling (SETR-PUP: conv, norm, "
                                                                 "GELU, 2x upsample to the input size); linear: a 1x1 "
                                                                 "conv on the patch grid, bilinear upsampling")
    channels: int = Field(64, gt=0, description="PUP decoder width")


class DetectionConfig(_Section):
    """``train.task: detection``: ViTDet's simple feature pyramid on the ViT's last map and a CenterNet head."""

    channels: int = Field(64, gt=0, description="width of every pyramid level")
    head_channels: int = Field(64, gt=0, description="width of the CenterNet head's branches")
    max_detections: int = Field(100, gt=0, description="detections kept per image (evaluation, and the most a "
                                                       "served or scored answer can hold)")
    nms_iou: float | None = Field(0.7, gt=0.0, le=1.0, description="class-wise NMS of the decoded peaks at this IoU; "
                                                                    "null: none (CenterNet's peaks alone)")
    score_threshold: float = Field(0.25, ge=0.0, le=1.0, description="default minimum score of served, scored and "
                                                                     "pyfunc detections (requests may ask for another)")


class MaeConfig(_Section):
    """``train.task: mae``: masked-autoencoder pretraining of ``model`` (the encoder) on unlabeled images."""

    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0, description="share of each image's patches masked "
                                                                 "(round(ratio x patches) per image)")
    decoder_dim: int = Field(128, gt=0, description="decoder width (MAE's ViT-B recipe: 512)")
    decoder_depth: int = Field(2, gt=0, description="decoder blocks (MAE: 8)")
    decoder_heads: int = Field(4, gt=0, description="decoder attention heads (MAE: 16)")
    norm_pix_loss: bool = Field(True, description="regress each patch's pixels normalised by its own mean and "
                                                  "variance (MAE's better representation)")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.decoder_dim % self.decoder_heads or self.decoder_dim % 4:
            raise ValueError(f"decoder_dim {self.decoder_dim} must be divisible by decoder_heads "
                             f"({self.decoder_heads}) and by 4 (2-D sin-cos positions)")
        return self


class GenerationConfig(_Section):
    """``train.task: generation``: a diffusion transformer (DiT, shaped like the ViT ``model.name``) trained with
    rectified flow to turn a caption (or a class) into an image."""

    condition: Literal["caption", "label"] = Field("caption", description="caption: a frozen sentence encoder's "
                                                   "vector of the row's caption (a classification pack's rows use "
                                                   "their class name); label: the class id (model.num_classes)")
    text_encoder: str = Field("all-MiniLM-L6-v2", description="the frozen caption encoder (weights from a package)")
    cond_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="share of training rows whose condition is dropped "
                                                                  "(what classifier-free guidance needs)")
    sample_steps: int = Field(12, ge=1, le=1000, description="Euler steps of the sampler")
    guidance: float = Field(2.0, ge=0.0, le=20.0, description="classifier-free guidance scale (1: none, 0: ignore "
                                                              "the prompt)")
    grid_prompts: list[str] | None = Field(None, description="prompts of the sample grid logged at each evaluation "
                                                              "(default: the first val rows' captions)")
    grid_seed: int = Field(0, description="the seed of the grid's noise: the same images epoch after epoch")
    judge: str | None = Field(None, description="a classifier (models:/ URI, export folder) that judges samples: "
                                                "val/cond_acc (it recovers the prompted class) and val/fd (Frechet "
                                                "distance to real val images in its features; not FID)")
    judge_samples: int = Field(256, ge=1, description="val rows each worker samples for the judge per evaluation "
                                                       "(rows whose caption names one class)")


# --------------------------------------------------------------------------------------------- serve
class ServedModel(_Section):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="the name in the API")
    uri: str = Field(..., min_length=1, description="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/model or "
                                                      "an export folder")
    task: str | None = Field(None, description="the model's task (default: what its export says); when given, an "
                                              "export of another task is refused")

    @field_validator("task")
    @classmethod
    def _servable(cls, value):
        return None if value is None else _task_with("infer", "task")(value)


class ServeConfig(_Section):
    """Ray Serve: one deployment per model behind one FastAPI ingress. Batching, scaling and resources apply to
    each model deployment; ``vitray serve config`` renders the same settings as a Serve config file."""

    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 inside a cluster)")
    port: int = Field(8000, gt=0, lt=65536)
    models: list[ServedModel] = []
    max_batch_size: int = Field(16, gt=0)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    max_ongoing_requests: int | None = Field(None, gt=0, description="per replica; default 2 x max_batch_size")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, gt=0)
    target_ongoing_requests: float = Field(16.0, gt=0.0, description="autoscaling target per replica")
    cpus_per_replica: float = Field(1.0, gt=0.0)
    gpus_per_replica: float = Field(0.0, ge=0.0)
    runtime: Literal["torch", "onnx"] = Field(
        "torch", description="torch: the export's weights (CPU or GPU, bf16); onnx: its ONNX export (`vitray export "
                             "--format onnx`) on ONNX Runtime's CPU provider, no torch needed at run time")
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto", description="auto: bf16 where the hardware has it natively (GPU, CPU with AMX/AVX512-BF16), else fp32 "
                            "(onnx: fp32); int8: the ONNX export's int8 graph (runtime onnx)")
    colocate: bool = Field(True, description="one model: run it inside the ingress replica (no hop between "
                                             "replicas per request); several models: one deployment each")
    decode: Literal["replica", "ingress"] = Field(
        "replica", description="where images are decoded and resized: in the model replica's request path (threads, "
                               "outside the batch) or in the ingress replicas (a separate CPU stage; several "
                               "models or colocate=false)")
    decode_threads: int = Field(2, gt=0, description="decode threads per replica")
    ingress_replicas: int = Field(1, gt=0, description="router replicas (several models or colocate=false)")
    ingress_cpus: float = Field(0.5, ge=0.0, description="CPUs per router replica")
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0, description="larger request bodies get 413")
    max_pixels: int = Field(MAX_PIXELS, gt=0, description="images with more pixels get 413 (decompression bombs)")
    auth_token_env: str | None = Field(None, min_length=1, description="require 'Authorization: Bearer <token>', the "
                                                                       "token read from this environment variable")
    auth_token_file: str | None = Field(None, min_length=1, description="... or from this file (a Kubernetes Secret)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches are silently capped")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be unique, got {names}")
        if self.auth_token_env and self.auth_token_file:
            raise ValueError("set auth_token_env or auth_token_file, not both")
        _check_runtime(self.runtime, self.precision, self.gpus_per_replica > 0, "gpus_per_replica > 0")
        return self


# --------------------------------------------------------------------------------------------- score
class ScoreConfig(_Section):
    """``vitray score``: a model over a set of images into Parquet predictions (the CLI flags override these)."""

    model: str | None = Field(None, description="model URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/, a folder)")
    input: str | None = Field(None, description="packed shards, Parquet, WebDataset tars or an image folder")
    output: str | None = Field(None, description="output folder (part-<unit>.parquet + _job.json + _summary.json)")
    format: Literal["auto", "shards", "parquet", "webdataset", "images"] = "auto"
    image_column: str | None = Field(None, description="Parquet input: the encoded image column (default: image, "
                                                        "else the first binary column)")
    batch_size: int = Field(64, gt=0)
    concurrency: int = Field(1, gt=0, description="predictor actors (each loads the model once)")
    cpus_per_actor: float = Field(1.0, gt=0.0)
    use_gpu: bool = Field(False, description="one GPU per predictor actor")
    runtime: Literal["torch", "onnx"] = Field("torch", description="torch, or onnx: the model's ONNX export on ONNX "
                                                                    "Runtime's CPU provider (as serve.runtime)")
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto", description="as serve.precision: int8 is the ONNX export's int8 graph (runtime onnx)")
    top_k: int = Field(5, gt=0)
    files_per_unit: int = Field(1024, gt=0, description="image folders: files per output part")
    max_pixels: int = Field(MAX_PIXELS, gt=0, description="larger images become error rows (decompression bombs)")
    stall_timeout_s: float = Field(300.0, ge=0.0, description="no prediction batch for this long fails the job with "
                                                              "Ray's pending demands; 0 disables")


    @model_validator(mode="after")
    def _consistent(self):
        _check_runtime(self.runtime, self.precision, self.use_gpu, "use_gpu")
        return self


def _check_runtime(runtime: str, precision: str, gpu: bool, gpu_field: str) -> None:
    """What each runtime has: torch runs fp32/bf16 on CPU or GPU; onnx runs its fp32 or int8 graph on CPU."""
    if runtime == "onnx" and precision == "bf16":
        raise ValueError("precision bf16 needs runtime torch (the onnx runtime has fp32 and int8 graphs)")
    if runtime == "torch" and precision == "int8":
        raise ValueError("precision int8 needs runtime onnx (the int8 graph of `vitray export --format onnx --int8`)")
    if runtime == "onnx" and gpu:
        raise ValueError(f"runtime onnx runs on ONNX Runtime's CPU provider: unset {gpu_field} or use runtime torch")


# ---------------------------------------------------------------------------------------------- kubernetes
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


class WorkerGroupConfig(_Section):
    """One KubeRay worker group: identical pods, scaled between min_replicas and max_replicas."""

    name: str = Field(..., max_length=30, pattern=DNS_LABEL)
    replicas: int = Field(1, ge=0)
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(1, ge=0)
    cpu: str = Field("4", pattern=r"^[0-9]+(\.[0-9]+)?m?$", description="CPU request = limit (Kubernetes quantity)")
    memory: str = Field("16Gi", pattern=r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?)?$", description="memory request = limit")
    gpus: int = Field(0, ge=0, description="nvidia.com/gpu per pod (whole GPUs)")
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []

    @model_validator(mode="after")
    def _bounds(self):
        if not (self.min_replicas <= self.replicas <= self.max_replicas):
            raise ValueError(f"need min_replicas <= replicas <= max_replicas, got {self.min_replicas} <= "
                             f"{self.replicas} <= {self.max_replicas}")
        return self


class KubernetesConfig(_Section):
    """How ``vitray k8s render|submit|values`` turns this run into a KubeRay RayJob (train, score) or RayService
    (serve), and the Helm chart values for the same objects. Worker groups default to what the ``cluster``,
    ``score`` or ``serve`` section asks for."""

    name: str = Field("vitray", max_length=30, pattern=DNS_LABEL,
                      description="instance name: objects are <name>-<workload> (the Helm release name)")
    namespace: str | None = Field(None, pattern=DNS_LABEL, description="default: the kubeconfig context's namespace")
    workload: Literal["auto", "train", "score", "serve"] = Field(
        "auto", description="auto: serve when serve.models is set and nothing to train or score, score when "
                            "score.model is set, else train")
    image: str = Field("ghcr.io/vitray/vitray:0.1.0", min_length=1, description="image with vitray (Dockerfile)")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = []
    ray_version: str = Field("2.60.0", min_length=1)
    auth: Literal["token", "disabled"] = Field("token", description="Ray token authentication (KubeRay authOptions)")
    head_cpu: str = Field("2", pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    head_memory: str = Field("8Gi", pattern=r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?)?$")
    worker_cpu: str = Field("4", pattern=r"^[0-9]+(\.[0-9]+)?m?$", description="derived worker group: CPUs per pod")
    worker_memory: str = Field("16Gi", pattern=r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?)?$")
    worker_groups: list[WorkerGroupConfig] | None = Field(
        None, description="explicit groups; default one group sized from cluster/score/serve")
    gpu_node_selector: dict[str, str] = {}
    gpu_tolerations: list[dict[str, Any]] = Field(default_factory=lambda: [dict(t) for t in GPU_TOLERATIONS])
    autoscaling: bool = Field(True, description="KubeRay in-tree autoscaler (between min and max replicas)")
    shared_storage: bool = Field(True, description="mount a ReadWriteMany PVC on every Ray pod (shards, run storage "
                                                   "under $VITRAY_HOME); false: use s3:// or gs:// paths")
    storage_claim: str | None = Field(None, pattern=DNS_LABEL, description="that PVC; default <name>-data (the chart's)")
    storage_mount: str = Field("/mnt/vitray", pattern=r"^/")
    object_storage_secret: str | None = Field(None, pattern=DNS_LABEL, description="an existing Secret exposed as "
                                              "environment on every Ray pod: the object storage credentials "
                                              "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)")
    object_storage_endpoint: str | None = Field(None, pattern=r"^https?://", description="AWS_ENDPOINT_URL on every "
                                                "Ray pod: an S3-compatible store (MinIO, Ceph); default AWS itself")
    mlflow_uri: str | None = Field(None, description="tracking URI inside the cluster; default the chart's server "
                                                     "http://<name>-mlflow:5000")
    entrypoint: str | None = Field(None, min_length=1, description="the job's shell command; default the jobs/ "
                                                                     "script for the workload with the run config")
    submission_mode: Literal["K8sJobMode", "HTTPMode", "SidecarMode"] = "K8sJobMode"
    shutdown_after_job_finishes: bool = True
    ttl_seconds_after_finished: int = Field(600, ge=0)
    backoff_limit: int = Field(0, ge=0, description="retries of the whole RayJob (a new cluster each)")
    active_deadline_seconds: int | None = Field(None, gt=0)
    upgrade_strategy: Literal["NewCluster", "None"] = Field("NewCluster", description="RayService: a changed cluster "
                                                                                        "spec starts a new cluster")
    env: dict[str, str] = Field({}, description="extra environment on every Ray container")

    @field_validator("env", mode="before")
    @classmethod
    def _env_text(cls, value):
        if isinstance(value, dict):  # `--set kubernetes.env.X=1` parses as an int; the environment holds text
            return {k: (str(v).lower() if isinstance(v, bool) else str(v)) if isinstance(v, (int, float, bool)) else v
                    for k, v in value.items()}
        return value


# ------------------------------------------------------------------------------------------------ run
class RunConfig(_Section):
    """The whole run. Each section has working defaults: an empty YAML file is a valid config."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    detection: DetectionConfig = DetectionConfig()
    mae: MaeConfig = MaeConfig()
    generation: GenerationConfig = GenerationConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()
    serve: ServeConfig = ServeConfig()
    score: ScoreConfig = ScoreConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()

    @model_validator(mode="after")
    def _task_defaults(self):
        """``auto`` metrics become the task's primary metric and direction (checkpoint scoring, the gate)."""
        info = get_task(self.train.task)
        if self.train.linear_probe and not info.probes:
            raise ValueError(f"train.linear_probe: a {self.train.task} model has no linear head to probe with "
                             f"(tasks that do: {', '.join(n for n, t in TASKS.items() if t.probes)})")
        if self.cluster.checkpoint_score_metric == "auto":
            self.cluster.checkpoint_score_metric = info.primary_metric
        if self.cluster.checkpoint_score_mode == "auto":
            self.cluster.checkpoint_score_mode = info.mode
        if self.tracking.promotion_metric == "auto":
            self.tracking.promotion_metric = info.primary_metric
        if self.tracking.promotion_mode == "auto":
            self.tracking.promotion_mode = info.mode
        if info.ema_decay is not None and "ema" not in self.train.model_fields_set:
            # the task samples from averaged weights
            self.train.ema = EmaConfig(enabled=True, decay=info.ema_decay, warmup=True)
        return self

    def task_options(self):
        """The options section of ``train.task`` (None for a task without one)."""
        section = get_task(self.train.task).options
        return getattr(self, section) if section else None


# --------------------------------------------------------------------------------------------- loading
def vitray_home() -> Path:
    """Where embedded defaults live (MLflow sqlite file, run storage, packed demo data): $VITRAY_HOME or ~/.vitray."""
    return Path(os.environ.get("VITRAY_HOME", Path.home() / ".vitray")).expanduser()


def is_model_uri(value: str) -> bool:
    return value.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def _fmt_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _format_errors(err: ValidationError, source: str) -> ConfigError:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key (given {_fmt_value(e['input'])})")
        elif e["type"] == "missing":
            lines.append(f"{loc}: required field is missing")
        else:
            lines.append(f"{loc or '<root>'}: {msg} (given {_fmt_value(e['input'])})")
    return ConfigError(f"invalid config {source}: " + "; ".join(lines), lines)


def parse_config(data: dict[str, Any] | None, source: str = "<dict>") -> RunConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise _format_errors(err, source) from None


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a raw config dict. Values are parsed as YAML scalars/lists (``3``, ``true``,
    ``[0.5, 1.0]``, ``null``); the schema validates them afterwards, so a typo in the key is still rejected."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the embedded defaults when ``path`` is None) and apply ``--set`` overrides."""
    data: Any = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {source}: not found" if not p.exists() else f"config file {source}: not a file")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"config file {source}: malformed YAML{where}: {problem}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {source}: not a text file") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {source}: the top level must be a mapping of sections, got {type(data).__name__}")
    apply_overrides(data, overrides)
    return parse_config(data, source)


def dump_config(cfg: RunConfig, path: str | os.PathLike | None = None) -> str:
    """The resolved config as YAML (every field, defaults included); written to ``path`` when given."""
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).write_text(text)
    return text


def check_config(cfg: RunConfig, *, models: bool = True, files: bool = True) -> RunConfig:
    """Checks that need more than the schema: the model name exists in the zoo, local checkpoint files exist.
    Run by commands that are about to build models on this machine (not by manifest renderers)."""
    errors = []
    if models:
        from vitray.models.zoo import is_model  # lazy: the schema itself stays torch-free

        if not is_model(cfg.model.name):
            errors.append(f"model.name: unknown model {cfg.model.name!r} (see `vitray models zoo`)")
        teacher = cfg.train.distillation
        if teacher.teacher and teacher.teacher_model and not is_model(teacher.teacher_model):
            errors.append(f"train.distillation.teacher_model: unknown model {teacher.teacher_model!r}")
    if getattr(cfg.task_options(), "judge", None) and cfg.deepspeed.zero_stage == 3:
        errors.append(f"{get_task(cfg.train.task).options}.judge: each worker samples for the judge on its own; "
                      "use deepspeed.zero_stage <= 2 (under ZeRO-3 a forward is a collective)")
    if cfg.train.ema.enabled and cfg.deepspeed.zero_stage == 3:
        errors.append("train.ema.enabled: EMA needs the full weights on every rank: use deepspeed.zero_stage <= 2")
    if files:
        from vitray import storage

        for field, value in (("model.checkpoint", cfg.model.checkpoint),
                             ("train.distillation.teacher", cfg.train.distillation.teacher),
                             ("generation.judge", cfg.generation.judge)):
            if not value or is_model_uri(value):
                continue
            if storage.is_uri(value):
                try:
                    storage.check(value, field)
                    if not storage.exists(value):
                        errors.append(f"{field}: not found: {value}")
                except storage.StorageError as err:
                    errors.append(str(err))
            elif not Path(value).expanduser().exists():
                errors.append(f"{field}: file not found: {value}")
        # object storage: reachable, with credentials, the bucket there (and writable where vitray writes), before
        # any cluster work
        for field, value, write in (("data.path", cfg.data.path, False),
                                    ("cluster.storage_path", cfg.cluster.storage_path, True),
                                    ("tracking.artifact_location", cfg.tracking.artifact_location, True)):
            if value and storage.is_uri(value):
                try:
                    storage.check(value, field, write=write)
                except storage.StorageError as err:
                    errors.append(str(err))
    if errors:
        raise ConfigError("invalid config: " + "; ".join(errors), errors)
    return cfg
