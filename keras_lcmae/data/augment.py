"""Per-image augmentation and normalisation (RandomResizedCrop, flip,
resize and centre crop) and batch-level Mixup / CutMix, in TensorFlow."""

from keras_lcmae.backend import tf as _tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_resized_crop(image, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), seed=None):
    """RandomResizedCrop (area fraction ``scale``, aspect ``ratio``, bicubic) on
    one ``(H, W, C)`` image, as torchvision's; when 10 draws fail the whole
    image is used (``sample_distorted_bounding_box``'s fallback)."""
    tf = _tf()
    channels = image.shape[-1]
    shape = tf.shape(image)
    bbox = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
    kwargs = dict(
        bounding_boxes=bbox,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    if seed is None:
        begin, crop, _ = tf.image.sample_distorted_bounding_box(shape, **kwargs)
    else:
        begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(shape, seed=seed, **kwargs)
    image = tf.slice(image, begin, crop)
    image = tf.image.resize(tf.cast(image, tf.float32), (size, size), method="bicubic")
    image.set_shape([size, size, channels])
    return tf.clip_by_value(image, 0.0, 255.0)


def normalize(image, mean, std):
    """uint8-range float image -> ``(x / 255 - mean) / std`` per channel."""
    tf = _tf()
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def pretrain_transform(image_size, mean, std, scale=(0.2, 1.0)):
    """The MAE pretraining augmentation: RandomResizedCrop(scale 0.2-1, ratio
    3/4-4/3, bicubic), horizontal flip, mean/std normalisation. A function of
    ``(image, seed)`` for ``Dataset.map``; ``seed`` is a ``(2,)`` int tensor."""
    tf = _tf()

    def transform(image, seed):
        seeds = tf.random.experimental.stateless_split(seed, 2)
        image = random_resized_crop(image, image_size, scale=scale, seed=seeds[0])
        image = tf.image.stateless_random_flip_left_right(image, seeds[1])
        return normalize(image, mean, std)

    return transform


def eval_transform(image_size, mean, std, crop_pct=0.875):
    """Resize (shorter side to ``size / crop_pct``) and centre crop, then
    normalise (``crop_pct=1``: resize the shorter side to ``size``)."""
    tf = _tf()
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}.")

    def transform(image):
        image = tf.cast(image, tf.float32)
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        short = tf.cast(tf.minimum(h, w), tf.float32)
        resize = tf.cast(tf.math.ceil(image_size / crop_pct), tf.float32)
        new_h = tf.cast(tf.round(tf.cast(h, tf.float32) * resize / short), tf.int32)
        new_w = tf.cast(tf.round(tf.cast(w, tf.float32) * resize / short), tf.int32)
        image = tf.image.resize(image, (new_h, new_w), method="bicubic")
        image = tf.image.resize_with_crop_or_pad(image, image_size, image_size)
        return normalize(tf.clip_by_value(image, 0.0, 255.0), mean, std)

    return transform


def mixup_cutmix(
    images, labels, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, smoothing=0.1, seed=None
):
    """Batch-level Mixup / CutMix with label smoothing, as timm's ``Mixup``
    (batch mode) used by the official MAE finetuning.

    Each batch is mixed with itself reversed (``x[::-1]``): with probability
    ``switch_prob`` (when both are on) CutMix pastes a box of area fraction
    ``1 - lam``, ``lam ~ Beta(cutmix_alpha, cutmix_alpha)``, clipped to the image,
    and ``lam`` is corrected to the pasted area; otherwise Mixup blends with
    ``lam ~ Beta(mixup_alpha, mixup_alpha)``. Targets are smoothed one-hot
    vectors (``1 - smoothing + smoothing / C`` on the class, ``smoothing / C``
    elsewhere) mixed with the same ``lam``. An alpha of 0 turns a method off.

    Args:
        images: ``(B, H, W, C)`` float. labels: ``(B,)`` int.
        seed: a ``(2,)`` int tensor for the stateless draws.

    Returns ``(mixed_images, soft_targets (B, num_classes))``.
    """
    tf = _tf()
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}.")
    seed = tf.zeros([2], tf.int64) if seed is None else tf.cast(seed, tf.int64)
    seeds = tf.random.experimental.stateless_split(seed, 5)
    off = smoothing / num_classes
    targets = tf.one_hot(tf.cast(labels, tf.int32), num_classes, on_value=1.0 - smoothing + off, off_value=off)
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return images, targets

    def beta(alpha, s):
        s1, s2 = tf.unstack(tf.random.experimental.stateless_split(s, 2))
        a = tf.random.stateless_gamma([], s1, alpha=alpha)
        b = tf.random.stateless_gamma([], s2, alpha=alpha)
        return a / (a + b)

    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = tf.random.stateless_uniform([], seeds[0]) < switch_prob
    else:
        use_cutmix = tf.constant(cutmix_alpha > 0)
    images = tf.cast(images, tf.float32)
    other = images[::-1]
    h, w = tf.shape(images)[1], tf.shape(images)[2]

    def cutmix():
        lam = beta(cutmix_alpha, seeds[1])
        ratio = tf.sqrt(1.0 - lam)
        cut_h = tf.cast(tf.cast(h, tf.float32) * ratio, tf.int32)
        cut_w = tf.cast(tf.cast(w, tf.float32) * ratio, tf.int32)
        cy = tf.random.stateless_uniform([], seeds[2], 0, h, dtype=tf.int32)
        cx = tf.random.stateless_uniform([], seeds[3], 0, w, dtype=tf.int32)
        y0, y1 = tf.clip_by_value(cy - cut_h // 2, 0, h), tf.clip_by_value(cy + cut_h // 2, 0, h)
        x0, x1 = tf.clip_by_value(cx - cut_w // 2, 0, w), tf.clip_by_value(cx + cut_w // 2, 0, w)
        rows = tf.logical_and(tf.range(h) >= y0, tf.range(h) < y1)
        cols = tf.logical_and(tf.range(w) >= x0, tf.range(w) < x1)
        box = tf.cast(tf.logical_and(rows[:, None], cols[None, :]), tf.float32)[None, :, :, None]
        lam_area = 1.0 - tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(h * w, tf.float32)
        return images * (1.0 - box) + other * box, lam_area

    def mixup():
        lam = beta(mixup_alpha, seeds[4])
        return images * lam + other * (1.0 - lam), lam

    mixed, lam = tf.cond(use_cutmix, cutmix, mixup)
    return mixed, targets * lam + targets[::-1] * (1.0 - lam)
