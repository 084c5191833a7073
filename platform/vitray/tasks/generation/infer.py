"""A generator's answers: prompts in, PNG images out.

* HTTP ``POST /v1/generate``: a JSON body ``{prompt, seed?, steps?, guidance?}`` -> the PNG, with the seed
  (drawn at random when not given, so any image can be drawn again), the model version and the batch size in
  headers; requests with the same sampler settings are batched together (``@serve.batch``);
* MLflow pyfunc: ``prompt`` (and ``seed``) per row -> ``image`` (PNG bytes), ``prompt``, ``seed``
  (:meth:`vitray.tasks.generation.generator.Generator.frame`).

Torch-free (the HTTP ingress imports every head); the sampling itself is :mod:`vitray.tasks.generation.generator`.
This head has no image side: ``inputs = "prompt"`` tells the serving layer to read a JSON body instead of an image.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from vitray.tasks.infer_base import InferenceHead

__all__ = ["HEAD", "GenerateRequest", "MAX_SEED", "MAX_STEPS", "MAX_GUIDANCE", "MAX_PROMPT"]

MAX_SEED = 2**63 - 1
MAX_STEPS = 1000
MAX_GUIDANCE = 20.0
MAX_PROMPT = 500  # characters


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT, description="what to draw")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="the start noise's seed (default: a random one, "
                                                                  "returned in x-vitray-seed)")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Euler steps (default: the model's)")
    guidance: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE, description="classifier-free guidance (default: "
                                                                              "the model's; 0 ignores the prompt)")


class GenerationHead(InferenceHead):
    inputs = "prompt"
    Request = GenerateRequest
    Params = None
    Response = None
    summary = "Generate an image for a text prompt (PNG)"

    def describe(self, meta: dict) -> str:
        a = meta["model"]
        cond = f"captions via {a['text_encoder']}" if a.get("condition") == "caption" else \
            f"{len(meta.get('class_names') or [])} classes"
        return f"{a['img_size']} px from {cond}, {a.get('sample_steps')} steps, guidance {a.get('guidance'):g}"

    def summary_of(self, body: dict) -> str:
        return f"{body.get('bytes', 0):,} bytes of PNG (seed {body.get('seed')})"


HEAD = GenerationHead()
