"""Classification heads on a ViT encoder: finetuning and linear probing, as
the official MAE ``main_finetune.py`` / ``main_linprobe.py`` build them.

* ``pool="cls"``: the ``[CLS]`` token after the encoder's final norm.
* ``pool="avg"``: the mean of the patch tokens (``[CLS]`` excluded) taken
  *before* the encoder's final norm, then a LayerNorm ``fc_norm`` (eps 1e-6):
  the official finetuning with global pooling, whose model has no final norm.
  An encoder built with ``final_norm=True`` keeps its norm's weights, frozen
  and unused.
* finetuning (``linear_probe=False``) trains every encoder weight, the
  position table included (the official model, timm's ViT, learns it from
  the pretrained values; pretraining keeps it fixed): the classifier holds a
  copy of the given encoder with ``pos_embed_trainable=True``.
* ``linear_probe=True``: the encoder is frozen (``trainable=False``) and runs
  in inference mode; the head is BatchNorm without affine (eps 1e-6, torch's
  default momentum 0.1, i.e. Keras ``momentum=0.9``; synchronised over
  ``tf.distribute`` replicas, see :func:`probe_batch_norm`) then the linear
  layer.

Head initialisation follows the official scripts: weights drawn with std 0.01
(linear probe) or 2e-5 (finetune), bias 0. The official ``trunc_normal_``
truncates at +-2 in absolute value, which at these standard deviations never
happens, so the draw is a plain normal (Keras' ``TruncatedNormal`` would cut
at two standard deviations and shrink the spread).
"""

import os

import keras
from keras import ops

from keras_lcmae.encoder import ViTEncoder, check_pool
from keras_lcmae.layers import LAYER_NORM_EPSILON, layer_norm
from keras_lcmae.ops import resize_pos_embed, to_2tuple
from keras_lcmae.optim import CompilesFromConfig, ReleasesGradients

LINEAR_PROBE_HEAD_STD = 0.01
FINETUNE_HEAD_STD = 2e-5


def _check_num_classes(num_classes):
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")


def _check_geometry(found, patch_size, num_channels, source):
    """Compares an encoder's (or checkpoint's) patch size and channels with
    what the caller asks for (another image size is resampled instead, see
    :func:`rebuild_encoder`)."""
    asked = dict(
        patch_size=None if patch_size is None else int(patch_size),
        num_channels=None if num_channels is None else int(num_channels),
    )
    have = dict(patch_size=int(found["patch_size"]), num_channels=int(found["num_channels"]))
    wrong = [f"{k}={have[k]} (asked for {v})" for k, v in asked.items() if v is not None and v != have[k]]
    if wrong:
        raise ValueError(
            f"{source} is an encoder for other images: it has {', '.join(wrong)}. Use a checkpoint "
            f"trained for these images, or resize/re-channel the data to match the checkpoint."
        )


def _set_trainable(layer, value):
    """``layer.trainable = value``, propagated to its sublayers even when the
    flag already has that value: on the TensorFlow backend the attribute
    assignment is skipped when ``getattr(layer, "trainable") is value``, so
    an encoder deserialised with ``trainable=False`` would keep trainable
    blocks."""
    keras.layers.Layer.trainable.fset(layer, value)


def rebuild_encoder(encoder, image_size=None, drop_path_rate=None, pos_embed_trainable=None):
    """The same encoder (same weights) built with another input size,
    stochastic-depth rate or trainability of the position table; ``encoder``
    itself when nothing changes.

    A new ``image_size`` (same patch size) resamples the position table to
    the new grid as official MAE's finetuning does (bicubic, ``[CLS]`` row
    kept; :func:`keras_lcmae.ops.resize_pos_embed`).

    Example:
    >>> big = rebuild_encoder(ViTEncoder.from_preset("vit_test"), image_size=48)
    >>> big.grid_size, tuple(big.pos_embed.shape)
    ((6, 6), (1, 37, 32))
    """
    changes = {}
    if image_size is not None and to_2tuple(image_size, "image_size") != tuple(encoder.image_size):
        changes["image_size"] = to_2tuple(image_size, "image_size")
    if drop_path_rate is not None and float(drop_path_rate) != encoder.drop_path_rate:
        changes["drop_path_rate"] = float(drop_path_rate)
    if pos_embed_trainable is not None and bool(pos_embed_trainable) != encoder.pos_embed_trainable:
        changes["pos_embed_trainable"] = bool(pos_embed_trainable)
    if not changes:
        return encoder
    copy = ViTEncoder.from_config(dict(encoder.get_config(), **changes))
    for old, new in zip(encoder.weights, copy.weights):
        value = keras.ops.convert_to_numpy(old.value)
        if old is encoder.pos_embed:
            value = resize_pos_embed(value, encoder.grid_size, copy.grid_size)
        new.assign(value)
    return copy


def load_encoder(
    path, image_size=None, patch_size=None, num_channels=None, drop_path_rate=None, pos_embed_trainable=None
):
    """Loads a :class:`ViTEncoder` from a ``.keras`` file (the
    ``encoder.keras`` written by ``recipes/pretrain.py``, or a whole
    MAE/LC-MAE model file, whose ``.encoder`` is taken).

    ``patch_size`` and ``num_channels``, when given, must match the
    checkpoint (a ``ValueError`` says which differ); another ``image_size``
    (a multiple of the patch size) resamples the position table to the new
    grid, as official MAE's finetuning (:func:`rebuild_encoder`);
    ``drop_path_rate`` replaces the pretraining rate (0.1 for ViT-B
    finetuning); ``pos_embed_trainable`` (default: as saved) sets whether
    the position table trains. All of them together cost one rebuild.

    Example:
    >>> import tempfile
    >>> run = tempfile.TemporaryDirectory()
    >>> path = os.path.join(run.name, "encoder.keras")     # e.g. "runs/demo/encoder.keras"
    >>> ViTEncoder.from_preset("vit_test").save(path)       # 32 px images, 8 px patches
    >>> encoder = load_encoder(path, image_size=48, drop_path_rate=0.1)
    >>> encoder.grid_size, encoder.drop_path_rate
    ((6, 6), 0.1)
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"No encoder file at {path!r}.")
    import keras_lcmae  # noqa: F401  (registers the package's classes for deserialisation)

    loaded = keras.saving.load_model(path)
    encoder = loaded if isinstance(loaded, ViTEncoder) else getattr(loaded, "encoder", None)
    if not isinstance(encoder, ViTEncoder):
        raise ValueError(
            f"{path!r} holds a {type(loaded).__name__}, not a ViTEncoder (nor a model with one as "
            f"`.encoder`); pass the encoder.keras written by recipes/pretrain.py."
        )
    found = dict(patch_size=encoder.patch_size, num_channels=encoder.num_channels)
    _check_geometry(found, patch_size, num_channels, repr(path))
    return _rebuild_checked(encoder, image_size, drop_path_rate, repr(path), pos_embed_trainable)


def _rebuild_checked(encoder, image_size, drop_path_rate, source, pos_embed_trainable=None):
    """:func:`rebuild_encoder` with an error naming ``source`` when the new
    image size does not fit the patch size."""
    try:
        return rebuild_encoder(
            encoder, image_size=image_size, drop_path_rate=drop_path_rate, pos_embed_trainable=pos_embed_trainable
        )
    except ValueError as e:
        raise ValueError(f"{source}: cannot resize its encoder to image_size={image_size}: {e}") from None


def probe_batch_norm(name="head_norm"):
    """The probe's BatchNorm without affine (eps 1e-6, torch's momentum 0.1).

    Built inside a ``tf.distribute`` scope of several replicas it is
    synchronised (statistics of the global batch), so a distributed step
    equals the one-device step; JAX's DataParallel computes the global
    statistics by itself. Under gradient accumulation the statistics are
    those of each micro-batch, as official MAE's ``--accum_iter``."""
    from keras_lcmae.distribute import num_replicas

    synchronized = keras.backend.backend() == "tensorflow" and num_replicas() > 1
    return keras.layers.BatchNormalization(
        center=False, scale=False, epsilon=1e-6, momentum=0.9, synchronized=synchronized, name=name
    )


@keras.saving.register_keras_serializable(package="keras_lcmae")
class ViTClassifier(ReleasesGradients, CompilesFromConfig, keras.Model):
    """Image classifier on a :class:`ViTEncoder`: finetuning or linear probe.

    Returns logits ``(B, num_classes)``; compile with
    ``SparseCategoricalCrossentropy(from_logits=True)``.

    Args:
        encoder: a :class:`ViTEncoder` (pretrained). The probe uses it as
            given and freezes it; finetuning uses a copy (same weights) whose
            position table trains (``model.encoder``; see :func:`rebuild_encoder`).
        num_classes: integer >= 2.
        pool: ``"cls"`` (``[CLS]`` after the encoder's final norm; the
            official linear probe) or ``"avg"`` (mean patch token, then
            ``fc_norm``; the official finetuning).
        head_dropout: dropout rate before the linear head (official: 0).
        linear_probe: freeze the encoder and put a non-affine BatchNorm in
            front of the head (official ``main_linprobe.py``).

    Example:
    >>> encoder = ViTEncoder.from_preset("vit_test")
    >>> model = ViTClassifier(encoder, num_classes=10, pool="avg")
    >>> import numpy as np
    >>> tuple(model(np.zeros((2, 32, 32, 3), "float32")).shape)
    (2, 10)

    A linear probe on a saved encoder (e.g. the ``encoder.keras`` of
    ``recipes/pretrain.py``) trains the head only:

    >>> import tempfile
    >>> run = tempfile.TemporaryDirectory()
    >>> encoder.save(os.path.join(run.name, "encoder.keras"))
    >>> probe = ViTClassifier.from_encoder_file(os.path.join(run.name, "encoder.keras"), 10, linear_probe=True)
    >>> [w.path for w in probe.trainable_weights]
    ['vit_classifier/head/kernel', 'vit_classifier/head/bias']
    """

    def __init__(self, encoder, num_classes, pool="cls", head_dropout=0.0, linear_probe=False, **kwargs):
        kwargs.setdefault("name", "vit_classifier")
        super().__init__(**kwargs)
        if not isinstance(encoder, ViTEncoder):
            raise ValueError(
                f"`encoder` must be a ViTEncoder, got {type(encoder).__name__}; load one with "
                f"load_encoder(path) or ViTClassifier.from_encoder_file(path, num_classes)."
            )
        _check_num_classes(num_classes)
        check_pool(pool)
        if not 0.0 <= float(head_dropout) < 1.0:
            raise ValueError(f"`head_dropout` must be in [0, 1), got {head_dropout!r}.")
        if not linear_probe:  # the official finetuning learns the position table too
            encoder = rebuild_encoder(encoder, pos_embed_trainable=True)
        self.encoder = encoder
        self.num_classes = int(num_classes)
        self.pool = pool
        self.head_dropout = float(head_dropout)
        self.linear_probe = bool(linear_probe)
        if self.linear_probe:
            _set_trainable(encoder, False)
        if self.pool == "avg" and encoder.norm is not None:
            _set_trainable(encoder.norm, False)  # unused with global pooling (official: deleted)
        self.fc_norm = layer_norm("fc_norm", LAYER_NORM_EPSILON) if self.pool == "avg" else None
        if self.fc_norm is not None and self.linear_probe:
            _set_trainable(self.fc_norm, False)  # the official probe trains the head only
        self.head_norm = probe_batch_norm() if self.linear_probe else None
        self.head_drop = keras.layers.Dropout(self.head_dropout, name="head_drop")
        std = LINEAR_PROBE_HEAD_STD if self.linear_probe else FINETUNE_HEAD_STD
        self.head = keras.layers.Dense(
            self.num_classes,
            kernel_initializer=keras.initializers.RandomNormal(stddev=std),
            bias_initializer="zeros",
            name="head",
        )
        self.build()

    # compile()'s defaults: the official base lrs (the lr at batch 256)
    FINETUNE_LEARNING_RATE = 5e-4
    PROBE_LEARNING_RATE = 0.1

    def compile(self, optimizer="auto", loss="auto", metrics="auto", **kwargs):
        """As ``keras.Model.compile``, with the evaluation recipes' choices
        for what is left at ``"auto"`` (the defaults; keras-hub's tasks do
        the same):

        * ``optimizer``: finetuning gets :func:`keras_lcmae.optim.finetune_adamw`
          (AdamW, betas 0.9/0.999, weight decay 0.05 except on 1-D
          parameters, the ``[CLS]`` token and the position table, layer-wise
          lr decay 0.75) at ``FINETUNE_LEARNING_RATE`` (5e-4); a linear probe
          gets :class:`keras_lcmae.optim.LARS` without weight decay at
          ``PROBE_LEARNING_RATE`` (0.1). Both are the official base lrs (the
          lr at batch 256), constant: the recipes scale them by
          ``batch / 256`` and add warmup and cosine decay. ``None`` also
          means ``"auto"``.
        * ``loss``: sparse categorical cross-entropy on the logits (integer
          labels; pass your own loss for one-hot or mixed labels).
        * ``metrics``: top-1 accuracy, reported as ``top1``.

        Anything given explicitly (``None`` for no loss or metrics) is used as
        given.

        >>> import numpy as np
        >>> model = ViTClassifier(ViTEncoder.from_preset("vit_test"), num_classes=10, pool="avg")
        >>> model.compile()
        >>> type(model.optimizer).__name__, model.optimizer.beta_2
        ('LayerDecayAdamW', 0.999)
        >>> history = model.fit(np.random.rand(4, 32, 32, 3), np.arange(4), verbose=0)
        >>> sorted(history.history)
        ['loss', 'top1']
        """
        if optimizer is None or (isinstance(optimizer, str) and optimizer == "auto"):
            from keras_lcmae.optim import LARS, finetune_adamw

            if self.linear_probe:
                optimizer = LARS(self.PROBE_LEARNING_RATE, weight_decay=0.0)
            else:
                optimizer = finetune_adamw(self, self.FINETUNE_LEARNING_RATE)
        if isinstance(loss, str) and loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if isinstance(metrics, str) and metrics == "auto":
            metrics = [keras.metrics.SparseCategoricalAccuracy(name="top1")]
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def build(self, input_shape=None):
        if self.built:
            return
        d = self.encoder.hidden_dim
        for layer in (self.fc_norm, self.head_norm, self.head):
            if layer is not None:
                layer.build((None, d))
        self.built = True

    def forward_features(self, images, training=None):
        """The pooled features fed to the head (before the probe's BatchNorm):
        ``(B, hidden_dim)``."""
        encoder = self.encoder
        if self.linear_probe:
            training = False  # a frozen feature extractor
        if self.pool == "cls":
            return encoder(images, training=training)[:, 0, :]
        x = encoder.forward_intermediates(encoder.embed(images), training=training, norm=False)["output"]
        return self.fc_norm(ops.mean(x[:, 1:, :], axis=1))

    def call(self, images, training=None):
        x = self.forward_features(images, training=training)
        if self.head_norm is not None:
            x = self.head_norm(x, training=training)
        return self.head(self.head_drop(x, training=training))

    @classmethod
    def from_encoder_file(
        cls,
        path,
        num_classes,
        pool="cls",
        image_size=None,
        patch_size=None,
        num_channels=None,
        drop_path_rate=None,
        **kwargs,
    ):
        """A classifier on the encoder saved at ``path`` (see
        :func:`load_encoder` for the geometry checks and ``drop_path_rate``).
        Other keyword arguments go to the constructor."""
        _check_num_classes(num_classes)
        check_pool(pool)
        # finetuning trains the position table: set it in the one rebuild (the constructor then keeps the encoder)
        trainable = None if kwargs.get("linear_probe", False) else True
        encoder = load_encoder(
            path, image_size, patch_size, num_channels, drop_path_rate, pos_embed_trainable=trainable
        )
        return cls(encoder, num_classes, pool=pool, **kwargs)

    @classmethod
    def from_official_state_dict(
        cls,
        state_dict,
        num_classes,
        num_heads,
        pool="cls",
        image_size=None,
        patch_size=None,
        num_channels=None,
        drop_path_rate=None,
        **kwargs,
    ):
        """A classifier on an official MAE checkpoint (a state dict of
        ``facebookresearch/mae`` key names; see :mod:`keras_lcmae.convert`).

        Pretraining checkpoints load their encoder (the decoder is skipped).
        With ``pool="avg"`` the checkpoint's final ``norm`` is ignored (as
        the official finetuning, whose model has none). A finetuned
        checkpoint's ``fc_norm`` (``pool="avg"``) and ``head`` are loaded when
        their shapes fit (same number of classes), otherwise the head starts
        fresh, as the official script does for a new label set. ``num_heads``
        cannot be read off the weights' shapes.

        Example: with ``state = torch.load("mae_pretrain_vit_base.pth",
        weights_only=True)["model"]``, ``ViTClassifier.from_official_state_dict(state,
        1000, num_heads=12, pool="avg", drop_path_rate=0.1)`` is official MAE's
        ViT-B finetuning model. The same with a tiny exported checkpoint:

        >>> import numpy as np
        >>> from keras_lcmae import MAE, TransformerDecoder
        >>> from keras_lcmae.convert import export_official_state_dict
        >>> mae = MAE(ViTEncoder.from_preset("vit_test"), TransformerDecoder(hidden_dim=32, depth=1, num_heads=2))
        >>> state = export_official_state_dict(mae)               # official key names, numpy arrays
        >>> model = ViTClassifier.from_official_state_dict(state, 10, num_heads=2, pool="avg", drop_path_rate=0.1)
        >>> tuple(model(np.zeros((2, 32, 32, 3), "float32")).shape), model.encoder.drop_path_rate
        ((2, 10), 0.1)
        """
        from keras_lcmae.convert.official import (
            as_numpy,
            encoder_from_official_state_dict,
            encoder_kwargs_from_state_dict,
        )

        _check_num_classes(num_classes)
        check_pool(pool)
        if not hasattr(state_dict, "keys"):
            raise ValueError(
                f"state_dict must be a mapping of official key names to arrays, got {type(state_dict).__name__}."
            )
        state = dict(state_dict)
        found = encoder_kwargs_from_state_dict(state, num_heads)
        _check_geometry(found, patch_size, num_channels, "The state dict")
        if pool == "avg":
            state.pop("norm.weight", None)
            state.pop("norm.bias", None)
        overrides = {} if drop_path_rate is None else {"drop_path_rate": float(drop_path_rate)}
        if not kwargs.get("linear_probe", False):  # built trainable, so the constructor need not copy it
            overrides["pos_embed_trainable"] = True
        encoder = encoder_from_official_state_dict(state, num_heads, **overrides)
        encoder = _rebuild_checked(encoder, image_size, None, "The state dict")
        model = cls(encoder, num_classes, pool=pool, **kwargs)
        d = encoder.hidden_dim
        head_w, head_b = state.get("head.weight"), state.get("head.bias")
        if head_w is not None and head_b is not None and tuple(as_numpy(head_w).shape) == (num_classes, d):
            model.head.kernel.assign(as_numpy(head_w).T)
            model.head.bias.assign(as_numpy(head_b))
        if model.fc_norm is not None and "fc_norm.weight" in state and "fc_norm.bias" in state:
            gamma, beta = as_numpy(state["fc_norm.weight"]), as_numpy(state["fc_norm.bias"])
            if gamma.shape == beta.shape == (d,):
                model.fc_norm.gamma.assign(gamma)
                model.fc_norm.beta.assign(beta)
        return model

    def get_config(self):
        config = super().get_config()
        config.update(
            encoder=keras.saving.serialize_keras_object(self.encoder),
            num_classes=self.num_classes,
            pool=self.pool,
            head_dropout=self.head_dropout,
            linear_probe=self.linear_probe,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        return cls(**config)
