"""Feature-quality monitors of pretraining: kNN, linear probe refit each
epoch, and an online linear probe trained alongside."""

import keras
import numpy as np

from keras_lcmae.evaluation import OnlineLinearHead, extract_features, knn_accuracy, linear_probe_accuracy


class KNNMonitor(keras.callbacks.Callback):
    """Weighted kNN accuracy (cosine, ``k`` neighbours, votes
    ``exp(sim / temperature)``) of the encoder's features on a held-out
    labelled split, written into the epoch logs as ``knn_top1`` (place it
    before the TensorBoard callback). Features are the ``[CLS]`` token
    (``pool="cls"``) or the mean patch token of full, unmasked images.

    kNN understates MAE features (they are not linearly clustered until
    finetuned or probed), so the recipe shows it next to the online probe.
    """

    def __init__(
        self,
        bank_images,
        bank_labels,
        query_images,
        query_labels,
        num_classes,
        k=20,
        temperature=0.07,
        pool="cls",
        every=1,
        batch_size=256,
    ):
        super().__init__()
        self.bank = (np.asarray(bank_images, np.float32), np.asarray(bank_labels))
        self.query = (np.asarray(query_images, np.float32), np.asarray(query_labels))
        self.num_classes = int(num_classes)
        self.k, self.temperature, self.pool = int(k), float(temperature), pool
        self.every = max(int(every), 1)
        self.batch_size = int(batch_size)

    def accuracy(self):
        bank, _ = extract_features(self.model, self.bank[0], pool=self.pool, batch_size=self.batch_size)
        query, _ = extract_features(self.model, self.query[0], pool=self.pool, batch_size=self.batch_size)
        return knn_accuracy(
            bank, self.bank[1], query, self.query[1], self.num_classes, k=self.k, temperature=self.temperature
        )

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and (epoch + 1) % self.every == 0:
            logs["knn_top1"] = float(self.accuracy())


class LinearProbeMonitor(keras.callbacks.Callback):
    """A linear probe of the encoder's frozen features on a held-out labelled
    split, refit at the end of every ``every`` epochs and written into the
    logs as ``linprobe_top1``: features of full images (``[CLS]`` or mean
    patch token), standardised with the bank's statistics (BatchNorm without
    affine, as the official probe), then multinomial logistic regression by
    full-batch gradient descent on the bank, scored on the query set.

    It complements :class:`KNNMonitor`: MAE features are far better linearly
    than by nearest neighbours. It reads the encoder only (its weights are
    never touched) and costs two feature passes and a few hundred small
    matrix products per evaluation.
    """

    def __init__(
        self,
        bank_images,
        bank_labels,
        query_images,
        query_labels,
        num_classes,
        pool="cls",
        every=1,
        steps=300,
        learning_rate=0.5,
        l2=1e-4,
        batch_size=256,
    ):
        super().__init__()
        self.bank = (np.asarray(bank_images, np.float32), np.asarray(bank_labels))
        self.query = (np.asarray(query_images, np.float32), np.asarray(query_labels))
        self.num_classes = int(num_classes)
        self.pool = pool
        self.every = max(int(every), 1)
        self.steps, self.learning_rate, self.l2 = int(steps), float(learning_rate), float(l2)
        self.batch_size = int(batch_size)

    def accuracy(self):
        bank, _ = extract_features(self.model, self.bank[0], pool=self.pool, batch_size=self.batch_size)
        query, _ = extract_features(self.model, self.query[0], pool=self.pool, batch_size=self.batch_size)
        return linear_probe_accuracy(
            bank,
            self.bank[1],
            query,
            self.query[1],
            self.num_classes,
            steps=self.steps,
            learning_rate=self.learning_rate,
            l2=self.l2,
        )

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and (epoch + 1) % self.every == 0:
            logs["linprobe_top1"] = float(self.accuracy())


class OnlineLinearProbe(keras.callbacks.Callback):
    """An online linear probe: a linear head on stop-gradient encoder
    features, trained alongside pretraining (one SGD step every ``every``
    training steps on a labelled batch) and scored on a held-out split at each
    epoch end as ``online_probe_top1`` (place it before the TensorBoard
    callback). ``online_probe_train_top1`` is the head's accuracy on the
    batches it trained on during the epoch (before each step).

    The head (:class:`keras_lcmae.evaluation.OnlineLinearHead`: BatchNorm
    without affine, then linear, SGD with momentum) lives in numpy, so no
    gradient can reach the encoder; features are the ``[CLS]`` token or the
    mean patch token of full, unmasked images in inference mode. The labelled
    batches cycle through ``train_images`` in an order drawn from ``seed``.
    Cost: one encoder forward pass of ``batch_size`` full images per probe
    step. The head is not part of the backup: a resumed run starts it afresh.
    """

    def __init__(
        self,
        train_images,
        train_labels,
        query_images,
        query_labels,
        num_classes,
        pool="cls",
        every=1,
        batch_size=64,
        learning_rate=0.1,
        seed=0,
    ):
        super().__init__()
        self.train = (np.asarray(train_images, np.float32), np.asarray(train_labels).reshape(-1))
        self.query = (np.asarray(query_images, np.float32), np.asarray(query_labels).reshape(-1))
        if len(self.train[0]) < 2 or len(self.train[0]) != len(self.train[1]):
            raise ValueError("OnlineLinearProbe needs at least 2 labelled training images, one label each.")
        self.num_classes = int(num_classes)
        self.pool = pool
        self.every = max(int(every), 1)
        self.batch_size = int(min(batch_size, len(self.train[0])))
        self.learning_rate = float(learning_rate)
        self.rng = np.random.default_rng(seed)
        self.head = None
        self._order, self._pos, self._seen = None, 0, 0

    def _features(self, images):
        return extract_features(self.model, images, pool=self.pool, batch_size=256)[0]

    def _next_batch(self):
        n = len(self.train[0])
        if self._order is None or self._pos + self.batch_size > n:
            self._order, self._pos = self.rng.permutation(n), 0
        idx = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.train[0][idx], self.train[1][idx]

    def on_epoch_begin(self, epoch, logs=None):
        self._correct, self._count = 0.0, 0

    def on_train_batch_end(self, batch, logs=None):
        self._seen += 1
        if (self._seen - 1) % self.every:
            return
        x, y = self._next_batch()
        features = self._features(x)
        if self.head is None:
            self.head = OnlineLinearHead(features.shape[1], self.num_classes, self.learning_rate)
        self._correct += self.head.update(features, y) * len(y)
        self._count += len(y)

    def accuracy(self):
        """Top-1 of the current head on the held-out split."""
        if self.head is None:
            return float("nan")
        return float(np.mean(self.head.predict(self._features(self.query[0])) == self.query[1]))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs["online_probe_top1"] = self.accuracy()
        if self._count:
            logs["online_probe_train_top1"] = self._correct / self._count
