"""Request and response bodies of the ``/v1`` API (they document the generated OpenAPI).

Field names are the Python API's (``negative_prompt``, ``guidance_scale``, ``num_images`` ...). Images travel as
base64 text (a ``data:`` URL prefix is accepted). Unknown fields are refused, so a misspelt option is a 422 that
names it rather than a silent default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..jobs import MAX_COUNT, MAX_GUIDANCE, MAX_SIDE, MAX_STEPS, SAMPLER_CHOICES

SEED_MAX = 2**63 - 1


def sampler_names() -> tuple[str, ...]:
    """The decoder samplers this version has."""
    from ..diffusion.samplers import SAMPLERS

    return tuple(SAMPLERS)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraRef(_Strict):
    """A LoRA adapter of this server (``GET /v1/models`` lists them) and its scale."""

    name: str = Field(..., min_length=1, max_length=200, description="the adapter's name")
    scale: float = Field(1.0, ge=-100, le=100, allow_inf_nan=False, description="its strength (1: as trained)")


class _Decoder(_Strict):
    negative_prompt: str | None = Field(None, description="negative prompt")
    width: int | None = Field(None, ge=8, le=MAX_SIDE, multiple_of=8,
                              description="a multiple of 8 (default: the model's)")
    height: int | None = Field(None, ge=8, le=MAX_SIDE, multiple_of=8,
                               description="a multiple of 8 (default: the model's)")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="decoder steps (default: the model's)")
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False,
                                         description="decoder CFG scale")
    sampler: str | None = Field(None, description="decoder sampler (GET /v1/models lists them; default: the "
                                                  "model's)",
                                json_schema_extra={"enum": [*SAMPLER_CHOICES, None]})
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="random when absent; returned either way")
    loras: list[LoraRef] | None = Field(None, max_length=8, description="LoRA adapters to apply, mixed with their "
                                                                       "scales (GET /v1/models lists them)")
    num_images: int = Field(1, ge=1, le=MAX_COUNT, description="images, drawn from one generator")

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, v: str | None) -> str | None:
        if v is not None and v not in sampler_names():
            raise ValueError(f"unknown sampler {v!r}; choose one of {', '.join(sampler_names())}")
        return v


class _Prior(_Decoder):
    prior_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="prior steps (default: the model's)")
    prior_guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False,
                                               description="prior CFG scale")


class Txt2ImgRequest(_Prior):
    """Text to image."""

    prompt: str = Field(..., description="what to draw")


class Img2ImgRequest(_Prior):
    """Redraw an image towards a prompt."""

    prompt: str
    image: str = Field(..., description="the input image, base64 PNG/JPEG/WebP")
    strength: float | None = Field(None, ge=0, le=1, description="fraction of the trajectory redrawn (0.3)")


class InpaintRequest(_Prior):
    """Repaint the white part of a mask (needs an inpainting model)."""

    prompt: str
    image: str = Field(..., description="the input image, base64")
    mask: str = Field(..., description="the mask, base64, the image's size: white = repaint, black = keep")


class MixItem(_Strict):
    """One ingredient of a mix: a prompt or an image, with a weight."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": ["text"], "properties": {"text": {"type": "string"}}},
        {"required": ["image"], "properties": {"image": {"type": "string"}}}]})

    text: str | None = None
    image: str | None = Field(None, description="base64 image")
    weight: float = Field(1.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_of(self) -> MixItem:
        if (self.text is None) == (self.image is None):
            raise ValueError("give exactly one of 'text' or 'image'")
        return self


class MixRequest(_Prior):
    """Mix prompts and images in CLIP space, then decode."""

    items: list[MixItem] = Field(..., min_length=1, description="prompts and images with weights")
    prompt: str = Field("", description="the decoder's text prompt")
    raw_weights: bool = Field(False, description="use the weights as given (default: divided by their sum)")


class VariationsRequest(_Decoder):
    """New images from one image's CLIP embedding."""

    image: str = Field(..., description="the input image, base64")
    prompt: str = Field("", description="the decoder's text prompt")


class ErrorResponse(BaseModel):
    """An error: ``detail`` says what went wrong."""

    detail: str
    id: str | None = Field(None, description="the job, for a job that failed or was cancelled")
    state: str | None = Field(None, description="the job's state, for a job that failed or was cancelled")


class ImageResult(BaseModel):
    """One generated image."""

    image: str = Field(..., description="base64 PNG with the A1111 'parameters' and the JSON record embedded")
    seed: int | None
    index: int = 0
    width: int
    height: int
    parameters: str = Field(..., description="the AUTOMATIC1111 parameters text")
    record: dict[str, Any] = Field(..., description="the generation record (as `kandinsky info` shows it)")


class GenerationResponse(BaseModel):
    """A finished job's images."""

    id: str
    mode: str
    seed: int | None
    images: list[ImageResult]
    timings: dict[str, float]


class JobAccepted(BaseModel):
    """The answer to ``?async=true``: follow the job at ``url`` or its event stream at ``events``."""

    id: str
    state: str
    queue_position: int | None
    url: str
    events: str


class JobStatus(BaseModel):
    """A job's state, progress and (when done) result."""

    id: str
    mode: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: dict[str, Any]
    queue_position: int | None
    created: float
    started: float | None
    finished: float | None
    error: str | None
    preview: str | None = Field(None, description="the latest live preview, base64 PNG")
    result: GenerationResponse | None = None
