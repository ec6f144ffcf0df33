"""Masking strategies.

A model takes its masking as a strategy object (``MAE(..., masking=RandomMasking())``
or ``masking=SelfGuidedMasking(...)``; the strings ``"random"`` and
``"self_guided"`` give the defaults of each). Both strategies end in
:func:`random_masking`, which follows the official MAE exactly: per-sample noise
``~ U(0, 1)``, ``ids_shuffle = argsort(noise)``, the first
``int(N * (1 - mask_ratio))`` shuffled positions stay visible,
``ids_restore = argsort(ids_shuffle)`` and the binary mask is 1 where a patch
is removed. Passing the same ``noise`` as another implementation gives the
same mask.
"""

import math

import keras
from keras import ops

from keras_lcmae.clustering import bipartition, main_object, object_scores
from keras_lcmae.distribute import replica_uniform
from keras_lcmae.ops import identity_ids, take_tokens


def num_visible(num_patches, mask_ratio):
    """``int(N * (1 - mask_ratio))``, the official count of visible patches,
    with a clear error when the ratio is out of range or leaves no visible or
    no masked patch.

    Example:
    >>> num_visible(196, 0.75)
    49
    """
    try:
        ratio = float(mask_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"mask_ratio must be a number in (0, 1), got {mask_ratio!r}.") from None
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio!r}.")
    keep = int(num_patches * (1 - ratio))
    if keep < 1:
        raise ValueError(
            f"mask_ratio={mask_ratio} leaves no visible patch out of {num_patches} "
            f"(int({num_patches} * (1 - {mask_ratio})) = 0); lower the ratio or use smaller patches."
        )
    if keep >= num_patches:
        raise ValueError(f"mask_ratio={mask_ratio} masks no patch out of {num_patches}; raise the ratio.")
    return keep


def random_masking(x, mask_ratio, noise=None, seed=None):
    """Per-sample random masking by argsort of uniform noise (official MAE).

    Args:
        x: ``(B, N, D)`` patch tokens.
        mask_ratio: fraction of patches to remove, in (0, 1).
        noise: optional ``(B, N)`` noise; the ``len_keep`` positions with the
            smallest noise stay visible. Drawn from ``U(0, 1)`` when omitted.
        seed: an int or ``keras.random.SeedGenerator`` used to draw noise.

    Returns:
        dict with ``x_masked`` ``(B, K, D)`` (visible tokens, in shuffled
        order), ``mask`` ``(B, N)`` float (1 = removed), ``ids_restore``
        ``(B, N)`` int32, ``ids_keep`` ``(B, K)`` int32 and ``ids_masked``
        ``(B, N - K)`` int32 (the removed positions, in shuffled order), where
        ``K = int(N * (1 - mask_ratio))``.

    Example:
    >>> x = keras.random.normal((2, 16, 8))
    >>> out = random_masking(x, 0.75, seed=0)
    >>> tuple(out["x_masked"].shape), tuple(out["mask"].shape)
    ((2, 4, 8), (2, 16))
    """
    n = x.shape[1]
    len_keep = num_visible(n, mask_ratio)
    if noise is None:
        noise = replica_uniform(ops.shape(x)[:2], seed)  # distinct per tf.distribute replica
    elif tuple(noise.shape[1:]) != (n,):
        raise ValueError(f"noise must have shape (batch, {n}) to mask {n} patches, got {tuple(noise.shape)}.")
    ids_shuffle = ops.cast(ops.argsort(noise, axis=1), "int32")
    ids_restore = ops.cast(ops.argsort(ids_shuffle, axis=1), "int32")
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = take_tokens(x, ids_keep)
    # Position i is kept iff its rank in the shuffle is < len_keep; this equals
    # the official "ones, zero the first len_keep, unshuffle" construction.
    mask = ops.cast(ops.greater_equal(ids_restore, len_keep), "float32")
    return {
        "x_masked": x_masked,
        "mask": mask,
        "ids_restore": ids_restore,
        "ids_keep": ids_keep,
        "ids_masked": ids_shuffle[:, len_keep:],
    }


def check_hint_ratio(hint_ratio):
    """``hint_ratio`` as a float in [0, 1) (a fraction of the masked patches);
    a clear error otherwise."""
    try:
        ratio = float(hint_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"hint_ratio must be a number in [0, 1), got {hint_ratio!r}.") from None
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"hint_ratio must lie in [0, 1) (a fraction of the masked patches), got {hint_ratio!r}.")
    return ratio


def num_hints(num_patches, mask_ratio, hint_ratio):
    """Hint tokens requested per image: ``round(hint_ratio * M)`` with
    ``M = N - int(N * (1 - mask_ratio))`` the masked budget.

    Example:
    >>> num_hints(64, 0.75, 0.05)
    2
    """
    ratio = check_hint_ratio(hint_ratio)
    masked = num_patches - num_visible(num_patches, mask_ratio)
    return int(round(ratio * masked))


def _ranks(values):
    """Rank of each entry along axis 1 (0 = smallest), int32 ``(B, N)``."""
    return ops.cast(ops.argsort(ops.argsort(values, axis=1), axis=1), "int32")


HINT_STRATEGIES = ("random", "similarity")
# SelfGuidedMasking(informed_start_epoch=None): informed masks from this fraction of the run on
# (the cluster gap of a small MAE run reaches 90 % of its peak by then, docs/self_guided.md)
AUTO_START_FRACTION = 0.25
SCORE_JITTER = 1e-6  # u * this breaks exact ties of the scores at random


def check_hint_strategy(hint_strategy):
    """``hint_strategy`` checked against :data:`HINT_STRATEGIES`."""
    if hint_strategy not in HINT_STRATEGIES:
        raise ValueError(f"hint_strategy must be one of {HINT_STRATEGIES}, got {hint_strategy!r}.")
    return hint_strategy


def hint_keys(scores, u):
    """Keys of the weighted draw of similarity hints, ``(B, N)``: the hints
    are the ``H`` cluster patches with the **largest** ``log(u) / w``, with
    ``w = clip((1 + score) / 2, 1e-3, 1)``. This is the Efraimidis-Spirakis
    draw (keys ``u ** (1 / w)``): ``H`` patches without replacement, each
    next one with probability proportional to its weight ``w`` among those
    left, so a patch twice as object-like is about twice as likely a hint."""
    w = ops.clip((1.0 + ops.cast(scores, "float32")) * 0.5, 1e-3, 1.0)
    uu = ops.clip(ops.cast(u, "float32"), 1e-12, 1.0)
    return ops.log(uu) / w


def informed_noise(
    assignments, mask_ratio, hint_ratio=0.05, noise=None, seed=None, scores=None, hint_strategy="random"
):
    """Noise that makes :func:`random_masking` produce a self-guided informed
    mask (Self-guided MAE, Shin et al. 2024): the patches of cluster **1** in
    ``assignments`` are masked first.

    With ``N`` patches, ``K = int(N * (1 - mask_ratio))`` visible, ``M = N - K``
    masked, ``C`` the cluster's size in the image and
    ``H = min(round(hint_ratio * M), C, K)`` hints:

    * ``H`` cluster patches are **hints**: always visible. ``hint_strategy
      ="random"`` draws them uniformly (the ``H`` smallest ``u``);
      ``"similarity"`` draws them with
      probability proportional to ``(1 + scores) / 2`` (:func:`hint_keys`;
      needs ``scores``);
    * the other ``C - H`` cluster patches are masked first; if they exceed
      ``M``, the rest stay visible; if they fall short, the rest of the
      budget is filled with non-cluster patches;
    * the order inside the cluster and inside the rest is the **descending**
      ``scores`` (the most object-like first, :func:`keras_lcmae.clustering.
      object_scores`; ties broken by ``u``), or random without ``scores``;
    * so every row has exactly ``K`` visible patches, ``min(M, C - H)`` masked
      cluster patches and ``max(H, C - M)`` visible cluster patches.

    The noise is ``level + rank / N`` with level 0 for hints, 1 for
    non-cluster patches and 2 for the other cluster patches, and ``rank`` the
    ascending rank of ``scores + 1e-6 u`` (of ``u`` without scores): sorting
    it keeps the hints first and the cluster last. ``u`` is one uniform draw
    per patch. No data-dependent Python control flow: it compiles on every
    backend.

    Args:
        assignments: ``(B, N)`` cluster ids in {0, 1}; 1 = mask first (e.g.
            :func:`keras_lcmae.clustering.main_object`).
        mask_ratio: fraction of patches removed, in (0, 1).
        hint_ratio: fraction of the masked budget ``M`` given back as visible
            hint patches of the cluster, in [0, 1).
        noise: optional ``(B, N)`` uniform noise ``u`` in [0, 1); drawn when
            omitted.
        seed: int or ``keras.random.SeedGenerator`` to draw ``u``.
        scores: optional ``(B, N)`` masking priority (higher = masked
            earlier), e.g. :func:`keras_lcmae.clustering.object_scores`.
        hint_strategy: ``"random"`` or ``"similarity"`` (see above).

    Returns:
        ``(B, N)`` float32 noise in ``[0, 3)``.

    Example:
    >>> import numpy as np
    >>> a = np.array([[1] * 4 + [0] * 12])
    >>> m = random_masking(np.zeros((1, 16, 2)), 0.5, noise=informed_noise(a, 0.5, 0.0, seed=0))["mask"]
    >>> np.asarray(m)[0, :4].tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    n = assignments.shape[1]
    keep = num_visible(n, mask_ratio)
    hints = num_hints(n, mask_ratio, hint_ratio)
    check_hint_strategy(hint_strategy)
    if hint_strategy == "similarity" and scores is None:
        raise ValueError('hint_strategy="similarity" draws hints by their similarity scores: pass `scores`.')
    assignments = ops.convert_to_tensor(assignments)
    if noise is None:
        noise = replica_uniform(ops.shape(assignments)[:2], seed)
    elif tuple(noise.shape[1:]) != (n,):
        raise ValueError(f"noise must have shape (batch, {n}) to match the assignments, got {tuple(noise.shape)}.")
    noise = ops.cast(noise, "float32")
    in_cluster = ops.cast(ops.equal(ops.cast(assignments, "int32"), 1), "float32")
    if scores is None:
        order = ops.cast(_ranks(noise), "float32") / float(n)  # in [0, 1), ties broken, any input scale
    else:
        scores = ops.cast(ops.convert_to_tensor(scores), "float32")
        if tuple(scores.shape[1:]) != (n,):
            raise ValueError(
                f"scores must have shape (batch, {n}) to match the assignments, got {tuple(scores.shape)}."
            )
        order = ops.cast(_ranks(scores + SCORE_JITTER * noise), "float32") / float(n)
    # hints: the H cluster patches with the largest key (random: the smallest u)
    key = hint_keys(scores, noise) if hint_strategy == "similarity" else -noise
    # rank of each cluster patch among the cluster by descending key (non-cluster patches sort after)
    cluster_rank = _ranks(ops.where(in_cluster > 0.5, -key, ops.max(ops.abs(key)) * 2.0 + 1.0))
    size = ops.cast(ops.sum(in_cluster, axis=1, keepdims=True), "int32")
    h = ops.minimum(ops.minimum(size, keep), hints)
    hint = ops.logical_and(ops.greater(in_cluster, 0.5), ops.less(cluster_rank, h))
    level = ops.where(hint, 0.0, 1.0 + in_cluster)
    return level + order


def informed_masking(
    x, mask_ratio, assignments, hint_ratio=0.05, noise=None, seed=None, scores=None, hint_strategy="random"
):
    """Self-guided informed masking: :func:`random_masking` with the noise of
    :func:`informed_noise`, so ``ids_restore``/``ids_keep``/``mask`` keep the
    official semantics and exactly ``int(N * (1 - mask_ratio))`` patches stay
    visible.

    Example:
    >>> import numpy as np
    >>> x = np.zeros((2, 16, 8), "float32")
    >>> a = np.array([[1] * 6 + [0] * 10] * 2)
    >>> out = informed_masking(x, 0.75, a, hint_ratio=0.0, seed=0)
    >>> float(np.asarray(out["mask"])[:, :6].min())
    1.0
    """
    noise = informed_noise(
        assignments, mask_ratio, hint_ratio, noise=noise, seed=seed, scores=scores, hint_strategy=hint_strategy
    )
    return random_masking(x, mask_ratio, noise=noise)


# -- strategies: what a model calls to mask its tokens ---------------------------


def _is_whole(value):
    return not isinstance(value, bool) and isinstance(value, (int, float)) and float(value).is_integer()


@keras.saving.register_keras_serializable(package="keras_lcmae")
class RandomMasking:
    """Official MAE masking: each image keeps a uniformly random subset of
    ``int(N * (1 - mask_ratio))`` patches (:func:`random_masking`).

    A strategy is called by its model as ``strategy(model, tokens, noise)``;
    ``mask_ratio`` and the seed generator belong to the model.

    Example:
    >>> from keras_lcmae import MAE, ViTEncoder
    >>> mae = MAE(ViTEncoder.from_preset("vit_test"), masking=RandomMasking())
    >>> out = mae.masking(mae, keras.random.normal((2, 16, 32)))
    >>> tuple(out["mask"].shape), float(ops.sum(out["mask"]))
    ((2, 16), 24.0)
    """

    name = "random"

    def build(self, model):
        """Binds the strategy to ``model`` (nothing to set up here)."""

    def __call__(self, model, x, noise=None, guide_tokens=None, views=1):
        """Masks tokens ``x`` ``(B, N, D)``; returns :func:`random_masking`'s dict."""
        return random_masking(x, model.mask_ratio, noise=noise, seed=model.seed_generator)

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(other) is type(self) and other.get_config() == self.get_config()

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="keras_lcmae")
class SelfGuidedMasking(RandomMasking):
    """Self-guided informed masking (Self-guided MAE, Shin et al. 2024).

    Once informed masking has started, each image's patches are split in two
    (:func:`keras_lcmae.clustering.bipartition`) on the model's own features
    of **all** patches, the side that is the main object is found by the
    boundary prior (:func:`keras_lcmae.clustering.main_object`) and masked
    first, each side in the order of the similarity score to the object's
    mean patch (:func:`keras_lcmae.clustering.object_scores`), with
    ``hint_ratio`` of the masked budget given back as visible hints
    (:func:`informed_noise`). Explicit ``noise`` always gives official random
    masking.

    Args:
        informed_start_epoch: first epoch (0-based) with informed masks;
            random masks before it. ``None`` (the default) waits for the
            patch clustering to form: :class:`keras_lcmae.callbacks.
            InformedMaskingSchedule` then starts at
            ``ceil(AUTO_START_FRACTION * epochs)`` of the ``fit`` call (the
            fraction of training after which the cluster gap of a small MAE
            run has reached 90 % of its peak, see ``docs/self_guided.md``).
            The switch is the model's non-trainable variable
            ``informed_active``, which :meth:`build` creates and the callback
            sets at each epoch start; ``MAE.fit`` / ``LCMAE.fit`` add the
            callback when it is missing (a custom loop without it keeps the
            initial value: 1 iff ``informed_start_epoch == 0``).
        hint_ratio: fraction of the masked patches given back as hints, in [0, 1).
        guide_layer: features guiding the partition: an encoder block index
            (``-1``, the default, is the last block; its output before the
            final norm) or ``"decoder"`` (the decoder's last hidden features
            with nothing masked). They are computed on all ``N`` patches in
            inference mode under ``stop_gradient``: one extra forward pass
            (encoder up to that block, or encoder + decoder) per step with no
            backward, about ``1/(1 - mask_ratio)`` times the cost of the
            visible-token encoder pass.
        hint_strategy: ``"similarity"`` (default: hints drawn with weights
            growing with their similarity score to the object) or
            ``"random"`` (uniform among the object's patches), the two
            strategies of the paper's ablation.

    For LC-MAE (``views=2``) the partition and the scores are computed once
    per image; both views mask the same patches in the same order and differ
    by their hints and by the ties broken at random.

    A strategy instance belongs to the one model it was built with.

    Example:
    >>> from keras_lcmae import MAE, TransformerDecoder, ViTEncoder
    >>> mae = MAE(ViTEncoder.from_preset("vit_test"), TransformerDecoder(32, depth=1, num_heads=2),
    ...           masking=SelfGuidedMasking(informed_start_epoch=1, guide_layer=0))
    >>> float(ops.convert_to_numpy(mae.informed_active))   # random masks until epoch 1
    0.0
    >>> mae.masking
    SelfGuidedMasking(informed_start_epoch=1, hint_ratio=0.05, guide_layer=0, hint_strategy='similarity')
    """

    name = "self_guided"

    def __init__(self, informed_start_epoch=None, hint_ratio=0.05, guide_layer=-1, hint_strategy="similarity"):
        if informed_start_epoch is not None and (not _is_whole(informed_start_epoch) or informed_start_epoch < 0):
            raise ValueError(
                f"informed_start_epoch must be an integer >= 0 (the first epoch with informed masks) or None "
                f"(start once the clustering has formed), got {informed_start_epoch!r}."
            )
        if guide_layer != "decoder" and (isinstance(guide_layer, bool) or not isinstance(guide_layer, int)):
            raise ValueError(f"guide_layer must be an encoder block index or 'decoder', got {guide_layer!r}.")
        self.informed_start_epoch = None if informed_start_epoch is None else int(informed_start_epoch)
        self.hint_ratio = check_hint_ratio(hint_ratio)
        self.guide_layer = guide_layer
        self.hint_strategy = check_hint_strategy(hint_strategy)
        self.informed_active = None
        self._model = None

    def start_epoch(self, epochs=None):
        """The first epoch with informed masks: ``informed_start_epoch``, or
        for ``None`` ``ceil(AUTO_START_FRACTION * epochs)`` (``epochs``: the
        length of the run; without it, no informed mask is planned and this
        returns ``None``).

        Example:
        >>> SelfGuidedMasking().start_epoch(100), SelfGuidedMasking(informed_start_epoch=3).start_epoch(100)
        (25, 3)
        """
        if self.informed_start_epoch is not None:
            return self.informed_start_epoch
        if epochs is None:
            return None
        return int(math.ceil(AUTO_START_FRACTION * int(epochs) - 1e-9))

    def build(self, model):
        """Checks the arguments against ``model``'s geometry and creates the
        model's ``informed_active`` variable."""
        if self._model is not None and self._model is not model:
            raise ValueError("This SelfGuidedMasking is already built for another model; give each model its own.")
        if self._model is model:
            return
        num_hints(model.encoder.num_patches, model.mask_ratio, self.hint_ratio)
        depth = model.encoder.depth
        if self.guide_layer != "decoder" and not -depth <= self.guide_layer < depth:
            raise ValueError(
                f"guide_layer must be an encoder block index in [-{depth}, {depth}) (-1: last block) or "
                f"'decoder', got {self.guide_layer!r}."
            )
        self._model = model
        self.informed_active = model.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(1.0 if self.informed_start_epoch == 0 else 0.0),
            trainable=False,
            name="informed_active",
        )

    def guide_features(self, model, tokens):
        """Features of **all** patches that guide the informed mask,
        ``(B, N, F)``: ``tokens`` from ``encoder.embed`` through the encoder
        up to block ``guide_layer`` (or the whole encoder and the decoder with
        nothing masked when ``guide_layer="decoder"``), in inference mode,
        without gradient."""
        x = ops.stop_gradient(tokens)
        encoder = model.encoder
        if self.guide_layer == "decoder":
            latent = encoder.forward_tokens(x, training=False)
            features = model.decoder(latent, identity_ids(x), training=False)["hidden"]
        else:
            out = encoder.forward_intermediates(x, indices=[self.guide_layer], training=False, stop_early=True)
            features = out["intermediates"][0][:, 1:]
        return ops.stop_gradient(features)

    def plan(self, model, tokens):
        """``(objects, scores)`` for tokens ``(B, N, D)`` from
        ``encoder.embed``: the main object of the split of the guide features
        (1 = object, masked first) and the object-oriented similarity scores
        (the masking order), both ``(B, N)``."""
        features = self.guide_features(model, tokens)
        objects = main_object(features, bipartition(features), model.encoder.grid_size)
        return objects, ops.stop_gradient(object_scores(features, objects))

    def __call__(self, model, x, noise=None, guide_tokens=None, views=1):
        """Informed masking of tokens ``x`` ``(B, N, D)``, blended by
        ``informed_active`` (0: exactly the random mask of the same draw; 1:
        informed); official random masking when ``noise`` is given. For
        ``views > 1`` ``x`` stacks ``views`` copies of ``guide_tokens`` on the
        batch axis: the partition is computed once and shared, the noise is
        independent per row."""
        if noise is not None:
            return random_masking(x, model.mask_ratio, noise=noise)
        u = replica_uniform(ops.shape(x)[:2], model.seed_generator)
        objects, scores = self.plan(model, x if guide_tokens is None else guide_tokens)
        if views > 1:
            objects = ops.concatenate([objects] * views, axis=0)
            scores = ops.concatenate([scores] * views, axis=0)
        informed = informed_noise(
            objects, model.mask_ratio, self.hint_ratio, noise=u, scores=scores, hint_strategy=self.hint_strategy
        )
        active = ops.greater(ops.convert_to_tensor(self.informed_active), 0.5)
        return random_masking(x, model.mask_ratio, noise=ops.where(active, informed, u))

    def get_config(self):
        return {
            "informed_start_epoch": self.informed_start_epoch,
            "hint_ratio": self.hint_ratio,
            "guide_layer": self.guide_layer,
            "hint_strategy": self.hint_strategy,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.setdefault("hint_strategy", "random")  # saved before hint strategies: random hints
        return cls(**config)


STRATEGIES = {"random": RandomMasking, "self_guided": SelfGuidedMasking}


def get_masking(masking):
    """A masking strategy from a strategy, a name (``"random"``,
    ``"self_guided"``) or a serialized strategy dict.

    Example:
    >>> get_masking("self_guided")
    SelfGuidedMasking(informed_start_epoch=None, hint_ratio=0.05, guide_layer=-1, hint_strategy='similarity')
    """
    if isinstance(masking, RandomMasking):
        return masking
    if isinstance(masking, dict):
        return keras.saving.deserialize_keras_object(masking)
    if isinstance(masking, str) and masking in STRATEGIES:
        return STRATEGIES[masking]()
    raise ValueError(
        f"masking must be a strategy (RandomMasking(), SelfGuidedMasking(...)) or one of {tuple(STRATEGIES)}, "
        f"got {masking!r}."
    )
