"""The sizes an estimate reads: :class:`Geometry`, read off a model by
:func:`model_geometry` or given by hand, and the weights counted from it."""

import dataclasses
import math

from keras_lcmae.classifier import ViTClassifier
from keras_lcmae.decoders import ConvDecoder, GaussianAverageDecoder
from keras_lcmae.encoder import ViTEncoder
from keras_lcmae.masking import num_visible
from keras_lcmae.models import LCMAE, AutoEncoder, ReconstructionModel

PRETRAIN_JOBS = ("mae", "lcmae", "ae")
JOBS = PRETRAIN_JOBS + ("finetune", "linprobe")
DECODERS = ("transformer", "gaussian", "conv")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The sizes :func:`estimate_training_memory` reads, for a model that
    need not be built. :func:`model_geometry` reads them off a model.

    The defaults are ViT-B/16 at 224 px with MAE's 512 x 8 decoder (16
    heads), mask ratio 0.75, LC-MAE's 1024-wide projector and 1000 classes.
    ``trainable_params`` / ``total_params`` of ``None`` are counted from the
    sizes (:func:`count_params`); ``param_bytes`` is the bytes per weight
    (4: float32 variables, as under mixed precision; 2 for a model whose
    variables are 16-bit).

    Example:
    >>> g = Geometry(job="lcmae", image_size=224, decoder_depth=2)
    >>> g.num_patches, g.visible, g.prediction_dim
    (196, 49, 768)
    """

    job: str
    image_size: tuple = (224, 224)
    patch_size: int = 16
    num_channels: int = 3
    hidden_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    decoder: str = "transformer"
    decoder_hidden_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    decoder_kernel: int = 5
    output_dim: int = None  # values predicted per token (default: one patch, p*p*C)
    projector_dim: int = 1024
    projector_input: str = "pred"
    num_classes: int = 1000
    pool: str = "cls"
    trainable_params: int = None
    total_params: int = None
    param_bytes: int = 4

    def __post_init__(self):
        if self.job not in JOBS:
            raise ValueError(f"job must be one of {JOBS}, got {self.job!r}.")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}.")
        size = self.image_size
        size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(v) for v in size)
        object.__setattr__(self, "image_size", size)
        if size[0] % self.patch_size or size[1] % self.patch_size:
            raise ValueError(f"image_size={size} is not a multiple of patch_size={self.patch_size}.")
        if self.job in PRETRAIN_JOBS and self.job != "ae" and not 0.0 < float(self.mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {self.mask_ratio!r}.")

    @property
    def num_patches(self):
        return (self.image_size[0] // self.patch_size) * (self.image_size[1] // self.patch_size)

    @property
    def patch_dim(self):
        return self.patch_size * self.patch_size * self.num_channels

    @property
    def prediction_dim(self):
        return self.output_dim or self.patch_dim

    @property
    def visible(self):
        """``K``: the patches the encoder sees (all of them for AE and the classifiers)."""
        if self.job not in ("mae", "lcmae"):
            return self.num_patches
        return num_visible(self.num_patches, self.mask_ratio)


def _block_params(d, m):
    hidden = int(d * m)
    return 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)


def count_params(geometry):
    """``(trainable, total)`` weights of the model ``geometry`` describes,
    counted from its sizes as this package builds it: the position tables
    are fixed in pretraining and trained in finetuning; a classifier with
    ``pool="avg"`` keeps the encoder's final norm frozen and unused; the
    linear probe trains its head only (its BatchNorm has no affine
    weights, only its two moving statistics)."""
    g = geometry
    d, n, p = g.hidden_dim, g.num_patches, g.patch_dim
    pos = (1 + n) * d
    encoder = (p * d + d) + d + g.depth * _block_params(d, g.mlp_ratio) + 2 * d  # embed, [CLS], blocks, norm
    if g.job in PRETRAIN_JOBS:
        w, out = g.decoder_hidden_dim, g.prediction_dim
        decoder = (d * w + w) + w + 2 * w + (w * out + out)  # embed, mask token, norm, prediction
        if g.decoder == "transformer":
            decoder += g.decoder_depth * _block_params(w, g.decoder_mlp_ratio)
        elif g.decoder == "gaussian":
            hidden = int(w * g.decoder_mlp_ratio)
            decoder += 2 * w + (w * hidden + hidden) + (hidden * w + w)
        else:
            decoder += g.decoder_kernel**2 * w * w + w
        trainable = encoder + decoder
        if g.job == "lcmae":
            width = out if g.projector_input == "pred" else w
            trainable += width * g.projector_dim + g.projector_dim
        return trainable, trainable + pos + (1 + n) * w
    head = d * g.num_classes + g.num_classes
    if g.job == "linprobe":
        norms = 2 * d if g.pool == "avg" else 0  # fc_norm, frozen in the probe
        return head, encoder + pos + norms + 2 * d + head  # + BatchNorm's moving mean and variance
    if g.pool == "avg":  # the encoder's final norm frozen (unused), fc_norm trained: as many trained weights
        return encoder + pos + head, encoder + pos + 2 * d + head
    return encoder + pos + head, encoder + pos + head


def model_geometry(model, **overrides):
    """The :class:`Geometry` of a built model: an :class:`~keras_lcmae.MAE`,
    :class:`~keras_lcmae.LCMAE`, :class:`~keras_lcmae.AutoEncoder`,
    :class:`~keras_lcmae.ViTClassifier`, or a bare
    :class:`~keras_lcmae.ViTEncoder` with ``job=`` given. The weight counts
    and bytes are the model's own; ``overrides`` replace any field."""
    fields = {}
    if isinstance(model, ViTClassifier):
        encoder = model.encoder
        fields.update(
            job="linprobe" if model.linear_probe else "finetune", num_classes=model.num_classes, pool=model.pool
        )
    elif isinstance(model, ReconstructionModel):
        encoder = model.encoder
        job = "lcmae" if isinstance(model, LCMAE) else "ae" if isinstance(model, AutoEncoder) else "mae"
        decoder = model.decoder
        kind = (
            "gaussian"
            if isinstance(decoder, GaussianAverageDecoder)
            else "conv"
            if isinstance(decoder, ConvDecoder)
            else "transformer"
        )
        fields.update(
            job=job, decoder=kind, decoder_hidden_dim=decoder.hidden_dim, output_dim=model.decoder_output_dim()
        )
        if job != "ae":  # AE(k) masks nothing
            fields.update(mask_ratio=model.mask_ratio)
        if kind == "transformer":
            fields.update(
                decoder_depth=decoder.depth, decoder_num_heads=decoder.num_heads, decoder_mlp_ratio=decoder.mlp_ratio
            )
        elif kind == "gaussian":
            fields.update(decoder_depth=0, decoder_mlp_ratio=decoder.mlp_ratio)
        else:
            fields.update(decoder_depth=0, decoder_kernel=decoder.kernel_size)
        if job == "lcmae":
            fields.update(projector_dim=model.projector_dim, projector_input=model.projector_input)
    elif isinstance(model, ViTEncoder):
        encoder = model
        if "job" not in overrides:
            raise ValueError("A bare ViTEncoder needs job= (one of 'mae', 'lcmae', 'ae', 'finetune', 'linprobe').")
    else:
        raise ValueError(
            f"estimate_training_memory reads MAE, LCMAE, AutoEncoder, ViTClassifier or ViTEncoder models, got "
            f"{type(model).__name__}; pass a Geometry for anything else."
        )
    fields.update(
        image_size=tuple(encoder.image_size),
        patch_size=encoder.patch_size,
        num_channels=encoder.num_channels,
        hidden_dim=encoder.hidden_dim,
        depth=encoder.depth,
        num_heads=encoder.num_heads,
        mlp_ratio=encoder.mlp_ratio,
    )
    if not isinstance(model, ViTEncoder):
        weights = model.weights
        trainable = {id(v) for v in model.trainable_weights}
        fields["trainable_params"] = sum(_size(v) for v in weights if id(v) in trainable)
        fields["total_params"] = sum(_size(v) for v in weights)
        counted = sum(_size(v) * _itemsize(v.dtype) for v in weights)
        fields["param_bytes"] = counted / max(fields["total_params"], 1)
    fields.update(overrides)
    return Geometry(**fields)


def _size(v):
    return int(math.prod(int(s) for s in v.shape))


def _itemsize(dtype):
    name = str(getattr(dtype, "name", dtype)).replace("torch.", "")
    return {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4}.get(name, 4)
