"""The profiles of the studies: one model, schedule and evaluation protocol
per scale, from which every study builds its runs.

``cpu``: each study in well under 45 minutes on 2 CPU cores: a 64-wide,
3-deep ViT on 32-px Fashion-MNIST (4-px patches, 64 tokens), 200 pretraining
steps of batch 128 (0.43 epoch), judged by a linear probe and a kNN on
cached features of 10,000 training / 5,000 test images (the CPU demo's
probe) and a 300-step finetune of batch 64 (lr 2.5e-3, crops keeping >= 80 %
of the image: with the demo's 150 steps and 35 % crops a ViT this small
reaches only 30-45 % and the finetune measures how fast it starts, not what
it learned).
``gpu``: the same studies with a ViT-Tiny (192 wide, 12 deep) pretrained 100
epochs, probed 90 epochs and finetuned 30 epochs on all of Fashion-MNIST.
``smoke``: either profile cut to a few steps of a 32-wide model, so the whole
machinery runs in seconds per run (the tests).
"""

import dataclasses

from studies.runner import Input, Run

PRETRAIN = "recipes/pretrain.py"
LINPROBE = "recipes/linprobe.py"
FINETUNE = "recipes/finetune.py"
ANALYZE = "tools/analyze.py"

DATA = dict(data="fashion_mnist", image_size=32)
PROFILES = {
    "cpu": dict(
        encoder=dict(model="vit_test", patch_size=4, hidden_dim=64, depth=3, num_heads=4),
        pretrain=dict(
            decoder_depth=2,
            decoder_hidden_dim=64,
            decoder_num_heads=4,
            projector_dim=128,
            mask_ratio=0.75,
            batch_size=128,
            epochs=2,
            steps_per_epoch=100,
            blr=1.5e-3,
            warmup_epochs=0.2,
            weight_decay=0.05,
            monitor_every=0,
        ),
        linprobe=dict(
            pool="avg",
            cache_features=True,
            knn_k=20,
            train_limit=10000,
            val_limit=5000,
            batch_size=256,
            epochs=20,
            blr=20,
            warmup_epochs=1,
            weight_decay=0.0,
        ),
        finetune=dict(
            pool="avg",
            train_limit=10000,
            val_limit=5000,
            batch_size=64,
            epochs=3,
            steps_per_epoch=100,
            blr=1e-2,
            min_lr=1e-6,
            warmup_epochs=0.3,
            weight_decay=0.05,
            layer_decay=0.75,
            drop_path_rate=0.0,
            smoothing=0.1,
            mixup_alpha=0,
            cutmix_alpha=0,
            reprob=0,
            randaug_magnitude=0,
            crop_min_scale=0.8,
        ),
        analyze=dict(num_images=64),
        seeds=3,
        few_seeds=2,
        speed=dict(tflops=0.05, min_step_s=0.02),  # measured: 2-core CPU, float32
        decoder_analysis_depth=8,
    ),
    "gpu": dict(
        encoder=dict(model="vit_tiny", patch_size=4, hidden_dim=192, depth=12, num_heads=3),
        pretrain=dict(
            decoder_depth=2,
            decoder_hidden_dim=128,
            decoder_num_heads=4,
            projector_dim=512,
            mask_ratio=0.75,
            batch_size=256,
            epochs=100,
            blr=1.5e-4 * 4,
            warmup_epochs=10,
            weight_decay=0.05,
            monitor_every=0,
            save_every=100,  # one whole-model checkpoint (with its optimizer state) per run, not 100
        ),
        linprobe=dict(
            pool="avg",
            cache_features=True,
            knn_k=20,
            batch_size=1024,
            epochs=90,
            blr=2,
            warmup_epochs=10,
            weight_decay=0.0,
        ),
        finetune=dict(
            pool="avg",
            batch_size=256,
            epochs=30,
            blr=1e-3,
            min_lr=1e-6,
            warmup_epochs=3,
            weight_decay=0.05,
            layer_decay=0.75,
            drop_path_rate=0.1,
            smoothing=0.1,
            mixup_alpha=0,
            cutmix_alpha=0,
            reprob=0.25,
            randaug_magnitude=0,
            crop_min_scale=0.35,
        ),
        analyze=dict(num_images=256),
        seeds=3,
        few_seeds=3,
        speed=dict(tflops=100.0, min_step_s=0.025),  # assumed, not measured: no GPU figure yet
        decoder_analysis_depth=8,
    ),
}
SMOKE = dict(
    encoder=dict(hidden_dim=32, depth=2, num_heads=2),
    pretrain=dict(
        decoder_hidden_dim=32,
        decoder_num_heads=2,
        projector_dim=32,
        batch_size=16,
        epochs=1,
        steps_per_epoch=2,
        warmup_epochs=0,
    ),
    linprobe=dict(train_limit=64, val_limit=32, batch_size=32, epochs=1, warmup_epochs=0),
    finetune=dict(train_limit=64, val_limit=32, batch_size=16, epochs=1, steps_per_epoch=2, warmup_epochs=0),
    analyze=dict(num_images=4),
    seeds=2,
    few_seeds=1,
    decoder_analysis_depth=3,
)
# Images per epoch of the gpu profile's data (all of Fashion-MNIST's training split)
FULL_TRAIN = 60000


def flag_list(values):
    """``{"epochs": 3, "cache_features": True}`` -> ``["--epochs=3", "--cache_features"]``."""
    out = []
    for name, value in values.items():
        if isinstance(value, bool):
            out.append(f"--{name}" if value else f"--no{name}")
        else:
            out.append(f"--{name}={value:g}" if isinstance(value, float) else f"--{name}={value}")
    return out


@dataclasses.dataclass
class Scale:
    """The runs of one profile. ``name``: ``cpu`` or ``gpu``; ``smoke``:
    cut to a few steps (:data:`SMOKE`)."""

    name: str
    smoke: bool = False

    def __post_init__(self):
        if self.name not in PROFILES:
            raise ValueError(f"unknown scale {self.name!r}; choose one of {', '.join(PROFILES)}")
        profile = PROFILES[self.name]
        self.encoder = dict(profile["encoder"])
        self.pretrain_flags = dict(profile["pretrain"])
        self.linprobe_flags = dict(profile["linprobe"])
        self.finetune_flags = dict(profile["finetune"])
        self.analyze_flags = dict(profile["analyze"])
        self.seeds = profile["seeds"]  # groups that are compared closely
        self.few_seeds = profile["few_seeds"]  # the others
        self.decoder_analysis_depth = profile["decoder_analysis_depth"]
        self.speed = dict(profile["speed"])
        if self.smoke:
            self.encoder.update(SMOKE["encoder"])
            self.pretrain_flags.update(SMOKE["pretrain"])
            self.linprobe_flags.update(SMOKE["linprobe"])
            self.finetune_flags.update(SMOKE["finetune"])
            self.analyze_flags.update(SMOKE["analyze"])
            self.seeds = SMOKE["seeds"]
            self.few_seeds = SMOKE["few_seeds"]
            self.decoder_analysis_depth = SMOKE["decoder_analysis_depth"]

    @property
    def label(self):
        return f"{self.name}{' (smoke)' if self.smoke else ''}"

    @property
    def epochs(self):
        return self.pretrain_flags["epochs"]

    # ------------------------------------------------------------------ runs
    def pretrain(self, label, seed, **flags):
        """A ``recipes/pretrain.py`` run: the profile's model and schedule,
        ``flags`` on top (``method``, ``loss_weights``, ``decoder``...)."""
        values = {**DATA, **self.encoder, **self.pretrain_flags, **flags, "seed": seed}
        return Run(f"pretrain_{label}_s{seed}", PRETRAIN, tuple(flag_list(values)))

    def _encoder_flags(self, encoder):
        """The evaluation recipes' encoder flags: a pretraining run's
        ``encoder.keras``, or a random encoder of the profile's architecture."""
        if encoder is None:
            return flag_list({"encoder": "random", **self.encoder}), (), "random"
        return ["--encoder={encoder}"], (Input("encoder", encoder, "encoder.keras"),), encoder.name[len("pretrain_") :]

    def linprobe(self, encoder, seed):
        """Linear probe (and kNN) of ``encoder`` (a pretraining :class:`Run`,
        or None: a random encoder)."""
        enc, inputs, label = self._encoder_flags(encoder)
        values = {**DATA, **self.linprobe_flags, "seed": seed}
        return Run(f"linprobe_{label}" + ("" if encoder else f"_s{seed}"), LINPROBE, (*enc, *flag_list(values)), inputs)

    def finetune(self, encoder, seed):
        """Short finetune of ``encoder`` (None: from a random encoder)."""
        enc, inputs, label = self._encoder_flags(encoder)
        values = {**DATA, **self.finetune_flags, "seed": seed}
        return Run(f"finetune_{label}" + ("" if encoder else f"_s{seed}"), FINETUNE, (*enc, *flag_list(values)), inputs)

    def checkpoint(self, pretrain_run):
        """The whole model a pretraining run saved after its last epoch."""
        return f"checkpoints/epoch_{int(pretrain_run.flag('epochs')):03d}.keras"

    def analyze(self, command, model, label, path=None, reference=None, **flags):
        """``tools/analyze.py <command>`` on ``model``'s ``path`` (default:
        its last checkpoint); ``reference``: ``(run, path)`` for
        semantic-similarity."""
        inputs = [Input("checkpoint", model, path or self.checkpoint(model))]
        args = [command, "--checkpoint={checkpoint}"]
        if reference is not None:
            inputs.append(Input("reference", *reference))
            args.append("--reference={reference}")
        values = {**self.analyze_flags, **flags}
        return Run(f"analyze_{command}_{label}", ANALYZE, (*args, *flag_list(values)), tuple(inputs))

    # ------------------------------------------------------------------ cost
    def estimated_hours(self, runs):
        """Expected hours of ``runs`` on the profile's machine, which
        sustains ``speed["tflops"]`` TFLOP/s of model FLOPs with each step
        taking at least ``speed["min_step_s"]`` (small models are bound by
        launch overhead): an estimate from the model FLOPs
        (``tools/bench/flops.py``'s count), not a measurement."""
        from bench.flops import forward_flops_per_image

        tflops, min_step_s = self.speed["tflops"], self.speed["min_step_s"]
        total = 0.0
        for run in runs:
            if run.script == ANALYZE:
                total += 60.0
                continue
            width, depth = int(self.encoder["hidden_dim"]), int(self.encoder["depth"])
            c = dict(
                image=32,
                patch=int(self.encoder["patch_size"]),
                width=width,
                depth=depth,
                dec_width=int(run.flag("decoder_hidden_dim", 1)),
                dec_depth=int(run.flag("decoder_depth", 1)),
            )
            batch = int(run.flag("batch_size"))
            epochs = int(run.flag("epochs"))
            steps = int(run.flag("steps_per_epoch") or max(1, int(run.flag("train_limit", FULL_TRAIN)) // batch))
            if run.script == PRETRAIN:
                per_image = 3 * forward_flops_per_image(c, run.flag("method", "lcmae"), float(run.flag("mask_ratio")))
            elif run.script == FINETUNE:
                per_image = 3 * forward_flops_per_image(c, "finetune")
            else:  # linear probe on cached features: one forward pass over its images, the head is free
                images = int(run.flag("train_limit", FULL_TRAIN)) + int(run.flag("val_limit", 10000))
                per_image, steps, epochs = forward_flops_per_image(c, "finetune"), max(1, images // batch), 1
            step = max(min_step_s, per_image * batch / (tflops * 1e12))
            total += steps * epochs * step + 30.0  # + start-up and evaluation
        return total / 3600.0
