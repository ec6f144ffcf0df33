"""Frozen-feature evaluation: feature extraction and the weighted k-nearest
neighbour classifier of InstDisc (Wu et al., 2018) as DINO uses it.

The kNN vote: L2-normalise train and test features; for each test feature
take the ``k`` train features of highest cosine similarity ``s``; each
neighbour votes for its label with weight ``exp(s / temperature)``; the class
with the largest summed weight wins. Weights are computed as
``exp((s - s_max) / temperature)`` with ``s_max`` the test row's largest
similarity, a common factor per row that leaves the vote unchanged and keeps
small temperatures from overflowing float32.
"""

import keras
import numpy as np
from keras import ops

from keras_lcmae.encoder import check_pool, find_encoder


def _as_features(x, name):
    x = ops.convert_to_numpy(x) if ops.is_tensor(x) else np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty (num_samples, dim) array, got shape {x.shape}.")
    return x.astype("float32")


def _check_knn_args(train_features, train_labels, test_features, num_classes, k, temperature, batch_size):
    train = _as_features(train_features, "train_features")
    test = _as_features(test_features, "test_features")
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train features have dim {train.shape[1]} but test features dim {test.shape[1]}.")
    labels = (ops.convert_to_numpy(train_labels) if ops.is_tensor(train_labels) else np.asarray(train_labels)).reshape(
        -1
    )
    if labels.shape[0] != train.shape[0]:
        raise ValueError(f"{train.shape[0]} train features but {labels.shape[0]} train labels.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"`num_classes` must be a positive integer, got {num_classes!r}.")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"train labels must be integers in [0, {num_classes}), got dtype {labels.dtype} and range "
            f"[{labels.min()}, {labels.max()}]."
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= train.shape[0]:
        raise ValueError(f"`k` must be an integer in [1, {train.shape[0]}] (the number of train features), got {k!r}.")
    # A neighbour set is well defined unless the k-th and (k+1)-th similarities
    # tie exactly; which of the tied features is taken then depends on the backend.
    if not float(temperature) > 0:
        raise ValueError(f"`temperature` must be positive, got {temperature!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    return train, labels.astype("int32"), test


def knn_votes(train_features, train_labels, test_features, num_classes, k=20, temperature=0.07, batch_size=256):
    """Per-class vote weights ``(num_test, num_classes)`` of the weighted kNN
    (each row scaled by the common factor ``exp(-s_max / temperature)``).

    Test features are processed ``batch_size`` at a time, so memory holds one
    ``(batch_size, num_train)`` similarity block: 60 000 train features need
    about 60 MB per block of 256.
    """
    train, labels, test = _check_knn_args(
        train_features, train_labels, test_features, num_classes, k, temperature, batch_size
    )
    train = ops.normalize(ops.convert_to_tensor(train), axis=-1, order=2)
    labels = ops.convert_to_tensor(labels)
    votes = []
    for start in range(0, test.shape[0], batch_size):
        query = ops.normalize(ops.convert_to_tensor(test[start : start + batch_size]), axis=-1, order=2)
        similarity = ops.matmul(query, ops.transpose(train))  # (b, num_train)
        top, index = ops.top_k(similarity, k=int(k), sorted=True)  # (b, k), best first
        weights = ops.exp((top - top[:, :1]) / float(temperature))
        one_hot = ops.one_hot(ops.take(labels, index, axis=0), int(num_classes), dtype="float32")  # (b, k, C)
        votes.append(ops.convert_to_numpy(ops.sum(one_hot * weights[:, :, None], axis=1)))
    return np.concatenate(votes, axis=0)


def knn_classify(train_features, train_labels, test_features, num_classes, k=20, temperature=0.07, batch_size=256):
    """Predicted labels ``(num_test,)`` (int32, numpy) of the weighted kNN
    classifier (module docstring); DINO's defaults ``k=20``,
    ``temperature=0.07``. A tie in the summed votes goes to the lower class
    index.

    Example:
    >>> train = np.array([[1.0, 0.0], [0.0, 1.0]]); labels = np.array([0, 1])
    >>> knn_classify(train, labels, np.array([[0.9, 0.2]]), num_classes=2, k=1)
    array([0], dtype=int32)
    """
    votes = knn_votes(train_features, train_labels, test_features, num_classes, k, temperature, batch_size)
    return np.argmax(votes, axis=1).astype("int32")


def knn_accuracy(
    train_features, train_labels, test_features, test_labels, num_classes, k=20, temperature=0.07, batch_size=256
):
    """Top-1 accuracy (a fraction in [0, 1]) of :func:`knn_classify`.

    Example (features usually come from :func:`extract_features`):

    >>> train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]); labels = np.array([0, 0, 1, 1])
    >>> test = np.array([[0.8, 0.3], [0.2, 0.7]])
    >>> knn_accuracy(train, labels, test, np.array([0, 0]), num_classes=2, k=2)
    0.5
    """
    predictions = knn_classify(train_features, train_labels, test_features, num_classes, k, temperature, batch_size)
    truth = (ops.convert_to_numpy(test_labels) if ops.is_tensor(test_labels) else np.asarray(test_labels)).reshape(-1)
    if truth.shape[0] != predictions.shape[0]:
        raise ValueError(f"{predictions.shape[0]} test features but {truth.shape[0]} test labels.")
    return float(np.mean(predictions == truth))


def _batches(data, batch_size):
    """Yields ``(images, labels_or_None)`` numpy batches."""
    if isinstance(data, tuple) and len(data) in (1, 2) and not hasattr(data, "_fields"):
        images = data[0]
        labels = data[1] if len(data) == 2 else None
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size], None if labels is None else labels[start : start + batch_size]
        return
    if isinstance(data, np.ndarray) or ops.is_tensor(data):
        yield from _batches((data,), batch_size)
        return
    if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
        raise ValueError(
            f"Expected an image array, an (images, labels) tuple or an iterable of batches "
            f"(e.g. a batched tf.data.Dataset), got {type(data).__name__}."
        )
    iterator = data.as_numpy_iterator() if hasattr(data, "as_numpy_iterator") else iter(data)
    for batch in iterator:
        if isinstance(batch, (tuple, list)):
            yield batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            yield batch, None


def extract_features(encoder, data, pool="cls", batch_size=256):
    """Frozen features of ``data`` under ``encoder`` (inference mode).

    Args:
        encoder: a :class:`~keras_lcmae.ViTEncoder`, or a model holding one
            as ``.encoder`` (MAE, LCMAE, ViTClassifier).
        data: images ``(N, H, W, C)``; a tuple ``(images, labels)``; or an
            iterable of batches ``images`` or ``(images, labels, ...)`` such as
            a batched ``tf.data.Dataset`` (its own batching is kept).
        pool: ``"cls"`` (the ``[CLS]`` token of the encoder's output) or
            ``"avg"`` (the mean of the output's patch tokens; both after the
            encoder's final norm when it has one).
        batch_size: batch size for arrays.

    Returns:
        ``(features, labels)``: float32 ``(N, hidden_dim)`` and int
        ``(N,)`` numpy arrays; ``labels`` is ``None`` when the data has none.

    Example:
    >>> from keras_lcmae import ViTEncoder
    >>> encoder = ViTEncoder.from_preset("vit_test")
    >>> feats, labels = extract_features(encoder, (np.zeros((4, 32, 32, 3), "float32"), np.arange(4)))
    >>> feats.shape, labels.shape
    ((4, 32), (4,))
    """
    encoder = find_encoder(encoder, "extract_features")
    check_pool(pool)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    # A functional wrapper so that `predict_on_batch` runs compiled (jit on
    # JAX, tf.function on TensorFlow) rather than op by op.
    inputs = keras.Input(shape=(*encoder.image_size, encoder.num_channels))
    tokens = encoder(inputs, training=False)
    pooled = tokens[:, 0, :] if pool == "cls" else ops.mean(tokens[:, 1:, :], axis=1)
    feature_model = keras.Model(inputs, pooled)
    features, labels = [], []
    for images, batch_labels in _batches(data, int(batch_size)):
        images = np.asarray(ops.convert_to_numpy(images) if ops.is_tensor(images) else images, dtype="float32")
        features.append(np.asarray(feature_model.predict_on_batch(images), dtype="float32"))
        labels.append(None if batch_labels is None else np.asarray(batch_labels).reshape(-1))
    if not features:
        raise ValueError("`data` yielded no images.")
    if any(b is None for b in labels) and not all(b is None for b in labels):
        raise ValueError("Some batches have labels and some do not.")
    return np.concatenate(features), (None if labels[0] is None else np.concatenate(labels))


def linear_probe_accuracy(
    train_features, train_labels, test_features, test_labels, num_classes, steps=300, learning_rate=0.5, l2=1e-4
):
    """Top-1 accuracy of a linear classifier fit on frozen features (numpy).

    Features are standardised with the training set's mean and variance
    (eps 1e-6: BatchNorm without affine, as the official linear probe), then
    a multinomial logistic regression (softmax cross-entropy plus
    ``l2 * |W|^2 / 2``) is fit by full-batch gradient descent with Nesterov
    momentum 0.9 for ``steps`` steps from zero weights. Deterministic.

    Example:
    >>> x = np.eye(4, dtype="float32").repeat(5, 0); y = np.arange(4).repeat(5)
    >>> linear_probe_accuracy(x, y, x, y, 4)
    1.0
    """
    x = np.asarray(train_features, np.float64)
    q = np.asarray(test_features, np.float64)
    y = np.asarray(train_labels).reshape(-1)
    yq = np.asarray(test_labels).reshape(-1)
    if x.ndim != 2 or q.ndim != 2 or x.shape[1] != q.shape[1]:
        raise ValueError(f"features must be (n, d) with the same d, got {x.shape} and {q.shape}.")
    if len(x) != len(y) or len(q) != len(yq):
        raise ValueError(f"{len(x)} / {len(q)} features but {len(y)} / {len(yq)} labels.")
    if y.min() < 0 or y.max() >= num_classes or yq.min() < 0 or yq.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}).")
    mean, var = x.mean(0), x.var(0)
    x = (x - mean) / np.sqrt(var + 1e-6)
    q = (q - mean) / np.sqrt(var + 1e-6)
    onehot = np.eye(num_classes)[y]
    w = np.zeros((x.shape[1], num_classes))
    b = np.zeros(num_classes)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for _ in range(int(steps)):
        lw, lb = w + 0.9 * vw, b + 0.9 * vb  # Nesterov look-ahead
        logits = x @ lw + lb
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        grad = (p - onehot) / len(x)
        vw = 0.9 * vw - learning_rate * (x.T @ grad + l2 * lw)
        vb = 0.9 * vb - learning_rate * grad.sum(0)
        w, b = w + vw, b + vb
    return float(np.mean(np.argmax(q @ w + b, axis=1) == yq))


class OnlineLinearHead:
    """A linear classifier trained online, one mini-batch at a time, on
    frozen features (numpy): BatchNorm without affine (batch statistics while
    training, running statistics with momentum ``bn_momentum`` for
    prediction, eps 1e-6, as the official probe's head) then a linear layer
    trained by SGD with momentum 0.9 on the softmax cross-entropy.

    It is the head of :class:`keras_lcmae.callbacks.OnlineLinearProbe`; the
    features it sees carry no gradient back to the encoder.

    Example:
    >>> head = OnlineLinearHead(2, 2)
    >>> x = np.array([[1., 0.], [0., 1.]] * 8); y = np.array([0, 1] * 8)
    >>> for _ in range(20): _ = head.update(x, y)
    >>> head.predict(x)[:2].tolist()
    [0, 1]
    """

    def __init__(self, dim, num_classes, learning_rate=0.1, momentum=0.9, bn_momentum=0.9):
        if int(dim) < 1 or int(num_classes) < 2:
            raise ValueError(f"OnlineLinearHead needs dim >= 1 and num_classes >= 2, got {dim}, {num_classes}.")
        self.num_classes = int(num_classes)
        self.learning_rate, self.momentum, self.bn_momentum = float(learning_rate), float(momentum), float(bn_momentum)
        self.w = np.zeros((int(dim), self.num_classes))
        self.b = np.zeros(self.num_classes)
        self._vw, self._vb = np.zeros_like(self.w), np.zeros_like(self.b)
        self.running_mean = np.zeros(int(dim))
        self.running_var = np.ones(int(dim))
        self.steps = 0

    def update(self, features, labels):
        """One SGD step on a batch; returns the batch's accuracy before the step."""
        x = np.asarray(features, np.float64)
        y = np.asarray(labels).reshape(-1).astype(int)
        if x.ndim != 2 or x.shape[1] != self.w.shape[0] or len(x) != len(y) or len(x) < 2:
            raise ValueError(
                f"OnlineLinearHead.update needs (n >= 2, {self.w.shape[0]}) features and n labels, "
                f"got {x.shape} and {y.shape}."
            )
        if y.min() < 0 or y.max() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}).")
        mean, var = x.mean(0), x.var(0)
        m = self.bn_momentum
        self.running_mean = m * self.running_mean + (1 - m) * mean
        self.running_var = m * self.running_var + (1 - m) * x.var(0, ddof=1)  # unbiased, as BatchNorm's running var
        z = (x - mean) / np.sqrt(var + 1e-6)
        logits = z @ self.w + self.b
        accuracy = float(np.mean(np.argmax(logits, 1) == y))
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        grad = (p - np.eye(self.num_classes)[y]) / len(x)
        self._vw = self.momentum * self._vw + z.T @ grad
        self._vb = self.momentum * self._vb + grad.sum(0)
        self.w -= self.learning_rate * self._vw
        self.b -= self.learning_rate * self._vb
        self.steps += 1
        return accuracy

    def predict(self, features):
        z = (np.asarray(features, np.float64) - self.running_mean) / np.sqrt(self.running_var + 1e-6)
        return np.argmax(z @ self.w + self.b, axis=1)
