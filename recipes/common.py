"""What the three recipes (pretrain.py, finetune.py, linprobe.py) share, in
one place: the run flags (distribution, precision, accumulation, backups,
logging, the dry run) and their checks, the run folder, the batch plan and
learning-rate schedule, the callbacks that make a run resumable and
watchable, ``fit`` with its divergence handling, and, for the evaluation
recipes, the labelled data and the encoder. Library code lives in
``keras_lcmae``; this module maps flags onto it and turns its errors into
one-line flag errors.
"""

import contextlib
import json
import os
import sys
import textwrap

import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS
STRATEGIES = ("none", "mirrored", "multiworker", "tpu", "data_parallel")


# ---------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def flagfiles(script):
    """The names of the flagfiles in ``recipes/configs/`` written for
    ``script`` (e.g. ``"finetune.py"``): those whose header comment runs
    ``python recipes/<script> --flagfile=recipes/configs/<name>``; sorted."""
    names = []
    for name in sorted(os.listdir(CONFIGS)):
        if name.endswith(".flags"):
            with open(os.path.join(CONFIGS, name)) as f:
                header = "".join(line for line in f if line.startswith("#"))
            if f"python recipes/{script} --flagfile=recipes/configs/{name}" in header:
                names.append(name)
    return names


def usage(doc, script_file):
    """The recipe's module docstring (what absl's ``--help`` prints above the
    flags) with its flagfiles appended, listed from ``recipes/configs/`` at
    run time so that the list follows the folder."""
    names = flagfiles(os.path.basename(script_file))
    if not names:
        return doc
    line = (
        "Flagfiles in recipes/configs/ (--flagfile=recipes/configs/NAME; each opens with a comment on what "
        "it is for): " + ", ".join(names) + "."
    )
    return doc.rstrip() + "\n\n" + textwrap.fill(line, 78, break_on_hyphens=False, break_long_words=False) + "\n"


def define_run_flags(defaults):
    """The flags every recipe takes; ``defaults`` sets batch_size, epochs,
    blr, warmup_epochs, weight_decay and output_dir."""
    d = dict(min_lr=0.0, backup_every=0)
    d.update(defaults)
    flags.DEFINE_integer(
        "batch_size",
        d["batch_size"],
        lower_bound=1,
        help="Effective global batch of one optimizer update (the lr rule "
        "uses it); each device sees batch_size / (replicas x accum_steps) images per step.",
    )
    flags.DEFINE_integer(
        "accum_steps",
        1,
        lower_bound=1,
        help="Gradient accumulation: micro-batches per optimizer update (official "
        "MAE's --accum_iter). The lr schedule, warmup, backups and the step count are in updates.",
    )
    flags.DEFINE_integer("epochs", d["epochs"], "Epochs.", lower_bound=1)
    flags.DEFINE_integer(
        "steps_per_epoch", None, "Optimizer updates per epoch (default: images // batch_size).", lower_bound=1
    )
    flags.DEFINE_float("blr", d["blr"], "Base lr; lr = blr * batch_size / 256.", lower_bound=0)
    flags.DEFINE_float("min_lr", d["min_lr"], "Final lr of the cosine.", lower_bound=0)
    flags.DEFINE_float("warmup_epochs", d["warmup_epochs"], "Linear warmup epochs.", lower_bound=0)
    flags.DEFINE_float("weight_decay", d["weight_decay"], "Weight decay (not on 1-D parameters).", lower_bound=0)
    flags.DEFINE_enum(
        "strategy",
        "none",
        list(STRATEGIES),
        "Distribution: mirrored / multiworker (TF_CONFIG) / tpu on TensorFlow, data_parallel on JAX.",
    )
    flags.DEFINE_string("tpu", None, "TPU name or grpc:// address for --strategy=tpu ('local' on a TPU VM).")
    flags.DEFINE_integer(
        "host_devices",
        None,
        lower_bound=1,
        help="Split the CPU into this many logical devices (try distribution on a laptop).",
    )
    flags.DEFINE_enum(
        "mixed_precision",
        "none",
        ["none", "bf16", "fp16"],
        "Mixed precision: bf16, or fp16 with dynamic loss scaling; weights stay float32.",
    )
    flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"], "XLA compilation.")
    flags.DEFINE_integer(
        "backup_every",
        d["backup_every"],
        lower_bound=0,
        help="Optimizer updates between preemption backups (0: at each epoch end). Rerun the same command to resume.",
    )
    flags.DEFINE_integer(
        "log_every",
        0,
        lower_bound=0,
        help="Write step-level scalars (loss, metrics, lr) to TensorBoard every N "
        "optimizer updates (0: per epoch only).",
    )
    flags.DEFINE_bool(
        "dry_run",
        False,
        "Check the flags, build data and model, print the plan (replicas, "
        "micro-batch, accumulation, memory estimate); do not train.",
    )
    flags.DEFINE_float(
        "device_memory_gb",
        None,
        lower_bound=0,
        help="Memory of one device in GB: --dry_run warns when the estimate does not fit.",
    )
    flags.DEFINE_string("output_dir", d["output_dir"], "Run folder.")
    flags.DEFINE_integer("seed", 0, "Seed of data order, augmentation, masks and init.")
    define_keep_freed_memory_flag()


def check_numbers():
    """Registers, for every number flag defined so far, a check that it is
    finite (absl reads ``nan`` and ``inf`` as floats, and its bounds let a
    NaN through). Called by each script once its flags are defined; the
    bounds themselves are the ``lower_bound`` / ``upper_bound`` of each
    definition. A bad value then stops the parse with one line naming the
    flag (``flag --blr=nan: must be a finite number``)."""
    import math

    for name in list(FLAGS):
        flag = FLAGS[name]
        if name == flag.name and isinstance(flag.parser, flags.FloatParser) and name not in _FINITE:
            flags.register_validator(name, lambda v: v is None or math.isfinite(v), "must be a finite number")
            _FINITE.add(name)


_FINITE = set()


# Deprecated flag names: old name -> (the flag that replaces it, whether the
# old value moves there). Filled by define_alias(); applied by run().
_ALIASES = {}


def define_alias(old, new, copy=True):
    """Defines ``--old``, the former name of ``--new``, kept for one release
    (same type and range, no default). Before ``main`` runs (:func:`run`), a
    given ``--old`` prints ``WARNING: --old is deprecated; use --new`` to
    stderr and its value moves to ``--new``. Given both with different
    values, the command line overrides a flagfile, as for any flag; both on
    the command line (or both in flagfiles) is a one-line flag error.
    ``copy=False`` is for an old flag the recipe defines and reads itself
    because its meaning does not map one to one onto ``--new``: then it is
    only warned about."""
    if copy:
        flag = FLAGS[new]
        flags.DEFINE(flag.parser, old, None, f"Deprecated: use --{new}.", serializer=flag.serializer)
    _ALIASES[old] = (new, copy)


def on_command_line(name):
    """Whether ``--name`` was given on the command line itself (not only in a
    ``--flagfile``)."""
    args = sys.argv[1:]
    args = args[: args.index("--")] if "--" in args else args
    return any(a.lstrip("-") == name or a.lstrip("-").startswith(name + "=") for a in args if a.startswith("-"))


def resolve_aliases():
    """Applies the deprecated flag names the command line or a flagfile used
    (see :func:`define_alias`)."""
    for old, (new, copy) in _ALIASES.items():
        if not FLAGS[old].present:
            continue
        print(f"WARNING: --{old} is deprecated; use --{new}", file=sys.stderr, flush=True)
        if not copy:
            continue
        value = FLAGS[old].value
        if FLAGS[new].present and FLAGS[new].value != value:
            old_direct, new_direct = on_command_line(old), on_command_line(new)
            if old_direct == new_direct:
                raise app.UsageError(
                    f"{FLAGS[old].serialize()} and {FLAGS[new].serialize()} disagree: --{old} is the old name of "
                    f"--{new}; give --{new} only."
                )
            if new_direct:  # the command line's --new overrides a flagfile's --old
                value = FLAGS[new].value
        FLAGS[new].value = value
        FLAGS[old].value = None  # flags.txt and the HParams table then name the flag once, by its new name


# The recipe flag of a library argument (`keras_lcmae.errors.ArgumentError.argument`)
# whose name differs from it; any other argument is the flag of the same name
# (`val_data` -> --val_data). A call site whose argument comes from another
# flag says so with `arguments_from`.
ARGUMENT_FLAGS = {
    "root": "data",  # data.image_folder_dataset(root)
    "name": "data",  # data.tfds_dataset(name)
    "pattern_or_files": "data",  # data.tfrecord_dataset / data.count_tfrecords
    "path": "encoder",  # keras_lcmae.load_encoder(path)
    "checkpoint": "encoder",
}


@contextlib.contextmanager
def arguments_from(**flag_of):
    """Inside the block, a library ``ArgumentError`` about one of the given
    arguments names the given flag, e.g. ``arguments_from(pattern_or_files="val_data")``
    around the validation records' reader, where :data:`ARGUMENT_FLAGS` would
    say ``--data``."""
    from keras_lcmae.errors import ArgumentError

    try:
        yield
    except ArgumentError as e:
        if e.argument in flag_of and not hasattr(e, "flag"):
            e.flag = flag_of[e.argument]
        raise


def argument_error_line(error):
    """``flag --<flag>: <detail>`` for a library ``ArgumentError``: the flag
    set by :func:`arguments_from`, else :data:`ARGUMENT_FLAGS`' or the
    argument's own name."""
    flag = getattr(error, "flag", None) or ARGUMENT_FLAGS.get(error.argument, error.argument)
    return f"flag --{flag}: {error.detail}"


def run(main):
    """``absl.app.run(main)`` with the deprecated flag names the command line
    used applied first (:func:`resolve_aliases`), and a flag error raised by
    ``main`` printed as one line ``FATAL Flags error: ...`` (exit status 1,
    as absl's own parse errors) instead of absl's usage text or a traceback:
    a ``UsageError`` (a value the checks after parsing refuse: a missing
    file, flags that do not fit together) as it is, a library
    ``keras_lcmae.errors.ArgumentError`` as :func:`argument_error_line`."""

    def checked(argv):
        try:
            resolve_aliases()
            return main(argv)
        except app.UsageError as e:
            message = str(e)
        except ValueError as e:
            from keras_lcmae.errors import ArgumentError

            if not isinstance(e, ArgumentError):
                raise
            message = argument_error_line(e)
        print(f"FATAL Flags error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)

    app.run(checked)


def define_keep_freed_memory_flag():
    """``--keep_freed_memory``, which every recipe takes (see :func:`keep_freed_memory`)."""
    flags.DEFINE_bool(
        "keep_freed_memory",
        True,
        "Make glibc malloc keep and reuse freed memory "
        "(keras_lcmae.cpu.keep_freed_memory): a CPU step then stops page-faulting its activations in "
        "afresh; the process keeps its peak memory.",
    )


def define_eval_flags(defaults):
    """The flags of both evaluation recipes (data, encoder, head) plus the
    run flags; ``defaults`` overrides values."""
    d = dict(
        data="fashion_mnist",
        encoder="random",
        model="vit_base",
        image_size=224,
        patch_size=None,
        batch_size=256,
        epochs=10,
        blr=1e-3,
        warmup_epochs=1,
        weight_decay=0.0,
        pool="cls",
        output_dir="runs/eval",
    )
    d.update(defaults)
    flags.DEFINE_string(
        "data",
        d["data"],
        "fashion_mnist (offline), a folder with train/ and val/ class folders, "
        "tfds:NAME, or a TFRecord glob of training records (with --val_data).",
    )
    flags.DEFINE_string("val_data", None, "With a TFRecord --data: the TFRecord glob of the validation records.")
    flags.DEFINE_string(
        "encoder",
        d["encoder"],
        "encoder.keras of a pretraining run, a .keras MAE/LC-MAE model, "
        "or 'random' (a fresh encoder of --model: the baseline).",
    )
    flags.DEFINE_string("model", d["model"], "Encoder preset for --encoder=random.")
    flags.DEFINE_string(
        "architecture_of",
        None,
        "With --encoder=random: copy the architecture (not the weights) "
        "of this encoder.keras, so that the baseline matches a pretrained encoder exactly.",
    )
    flags.DEFINE_integer("hidden_dim", None, "Override the preset's width (--encoder=random).", lower_bound=1)
    flags.DEFINE_integer("depth", None, "Override the preset's depth (--encoder=random).", lower_bound=1)
    flags.DEFINE_integer("num_heads", None, "Override the preset's heads (--encoder=random).", lower_bound=1)
    flags.DEFINE_integer("image_size", d["image_size"], "Input side in pixels (must match the encoder).", lower_bound=1)
    flags.DEFINE_integer(
        "patch_size",
        d["patch_size"],
        lower_bound=1,
        help="Patch side for --encoder=random (default: the --model preset's: 14 for vit_huge, else 16).",
    )
    flags.DEFINE_integer("num_channels", None, "Image channels (default: 1 for fashion_mnist, else 3).", lower_bound=1)
    flags.DEFINE_integer(
        "num_classes",
        None,
        lower_bound=2,
        help="Classes of the head (default: read from the data; checked against it; needed for TFRecords).",
    )
    flags.DEFINE_enum("pool", d["pool"], ["cls", "avg"], "Features: the [CLS] token or the mean patch token.")
    flags.DEFINE_integer("train_limit", None, "Use only the first N training images (quick runs).", lower_bound=1)
    flags.DEFINE_integer(
        "val_limit", None, "Evaluate on the first N validation images only (quick runs).", lower_bound=1
    )
    define_alias("channels", "num_channels")
    define_run_flags(d)


# ---------------------------------------------------------------------------
# Checks and the run folder
# ---------------------------------------------------------------------------


def validate_run_flags():
    """The run flags' relations, checked before any work (each flag's own
    range is checked when the flags are parsed: :func:`check_numbers`)."""
    if FLAGS.device_memory_gb is not None and not FLAGS.device_memory_gb > 0:
        raise app.UsageError(f"--device_memory_gb must be > 0, got {FLAGS.device_memory_gb}.")
    if FLAGS.batch_size % FLAGS.accum_steps:
        raise app.UsageError(
            f"--batch_size={FLAGS.batch_size} is not divisible by --accum_steps={FLAGS.accum_steps}: "
            f"--batch_size is the effective batch of one update, split into --accum_steps micro-batches."
        )


def prepare_output_dir(path, flag="--output_dir"):
    """Creates the run folder and checks that a file can be written in it;
    one-line ``UsageError`` naming ``flag`` otherwise (a file in the way, a
    parent that is a file, no permission, a read-only file system)."""
    if os.path.isfile(path):
        raise app.UsageError(f"{flag}={path}: is a file, not a folder; give a folder path.")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        if isinstance(e, (FileExistsError, NotADirectoryError)):
            reason = "a parent of it is a file, not a folder"
        raise app.UsageError(f"{flag}={path}: cannot write there ({reason}).") from None
    return path


class Run:
    """What :func:`start_run` set up: ``dist`` (the
    :class:`keras_lcmae.distribute.Setup`), ``plan`` (the
    :class:`keras_lcmae.training.BatchPlan`), ``output_dir`` (this process's
    folder: the chief's is ``--output_dir``, other multi-worker tasks write
    under ``workers/``) and ``freed_memory_kept``."""

    def __init__(self, dist, plan, output_dir, freed_memory_kept):
        self.dist = dist
        self.plan = plan
        self.output_dir = output_dir
        self.freed_memory_kept = freed_memory_kept

    def scope(self):
        return self.dist.scope()


def start_run():
    """Distribution, batch plan, run folder, seed and precision policy, in
    the order they must happen (devices are split before any computation).
    Every problem is a one-line ``UsageError`` naming the flag."""
    validate_run_flags()
    from keras_lcmae import distribute
    from keras_lcmae.training import BatchPlan

    if FLAGS.host_devices:
        try:
            distribute.split_host_devices(FLAGS.host_devices)
        except (ValueError, RuntimeError) as e:
            raise app.UsageError(f"--host_devices: {e}") from None
    try:
        dist = distribute.setup(FLAGS.strategy, tpu=FLAGS.tpu)
    except ValueError as e:
        raise app.UsageError(f"--strategy={FLAGS.strategy}: {e}") from None
    try:
        plan = BatchPlan(FLAGS.batch_size, dist.num_replicas, FLAGS.accum_steps)
    except ValueError:
        raise app.UsageError(
            f"--batch_size={FLAGS.batch_size} is not divisible by the {dist.num_replicas} replicas of "
            f"--strategy={FLAGS.strategy} x --accum_steps={FLAGS.accum_steps} = "
            f"{dist.num_replicas * FLAGS.accum_steps}."
        ) from None
    output_dir = FLAGS.output_dir if dist.is_chief else os.path.join(FLAGS.output_dir, "workers", dist.worker)
    prepare_output_dir(output_dir)
    kept = keep_freed_memory()
    import keras

    keras.utils.set_random_seed(FLAGS.seed)
    set_precision()
    return Run(dist, plan, output_dir, kept)


def set_precision():
    """Applies ``--mixed_precision`` (warning on a CPU that emulates it)."""
    if FLAGS.mixed_precision == "none":
        return
    import keras

    from keras_lcmae import cpu

    keras.config.set_dtype_policy({"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[FLAGS.mixed_precision])
    slow = cpu.cpu_precision_warning(keras.config.dtype_policy())
    if slow:
        logging.warning("--mixed_precision=%s: %s", FLAGS.mixed_precision, slow)


def jit_compile():
    return {"auto": "auto", "true": True, "false": False}[FLAGS.jit_compile]


def keep_freed_memory():
    """Applies ``--keep_freed_memory``; whether freed memory is now kept
    (False where the flag is off or malloc is not glibc's)."""
    from keras_lcmae import cpu

    return bool(FLAGS.keep_freed_memory and cpu.keep_freed_memory())


# ---------------------------------------------------------------------------
# Schedule and plan
# ---------------------------------------------------------------------------


def lr_schedule(run, num_images):
    """``(updates_per_epoch, schedule, derived)``: lr = blr * batch_size / 256
    (the effective batch), linear warmup over ``--warmup_epochs`` then cosine
    to ``--min_lr``, per optimizer update."""
    from keras_lcmae import optim

    steps = FLAGS.steps_per_epoch or (num_images // FLAGS.batch_size if num_images else None)
    note = None
    if not steps and FLAGS.dry_run:  # a plan on a small sample of the data: one update per epoch
        steps = 1
        note = f"the data holds fewer than one --batch_size of images ({num_images}): planned with 1 update per epoch"
    if not steps:
        raise app.UsageError(
            f"--steps_per_epoch is needed: the dataset size is unknown or smaller than one --batch_size="
            f"{FLAGS.batch_size} ({num_images} images)."
        )
    lr = optim.scaled_lr(FLAGS.blr, FLAGS.batch_size)
    total = steps * FLAGS.epochs
    warmup = min(int(round(FLAGS.warmup_epochs * steps)), total)
    derived = dict(
        lr=lr,
        steps_per_epoch=steps,
        total_steps=total,
        warmup_steps=warmup,
        images=num_images,
        **run.plan.as_dict(),
        per_replica_batch=run.plan.per_device_micro_batch,
        freed_memory_kept=run.freed_memory_kept,
    )
    if note:
        derived["note"] = note
    return steps, optim.WarmupCosine(lr, warmup, total, FLAGS.min_lr), derived


def memory_plan(run, model, job=None):
    """The per-device memory estimate of one micro-batch (see
    :mod:`keras_lcmae.memory`) as a dict for the plan, with a warning naming
    the flags to change when ``--device_memory_gb`` is given and it does not
    fit. ``job`` is needed only when ``model`` is a bare encoder."""
    from keras_lcmae import memory

    try:
        estimate = memory.estimate_training_memory(
            model,
            run.plan.per_device_micro_batch,
            accum_steps=run.plan.accum_steps,
            **({"job": job} if job else {}),
        )
    except ValueError as e:  # a model the estimate does not know: plan without it
        logging.warning("no memory estimate: %s", e)
        return {}
    out = {f"memory_{k}_gb": round(v / 1e9, 3) for k, v in estimate.items()}
    if FLAGS.device_memory_gb:
        fits = memory.fits(estimate, FLAGS.device_memory_gb)
        out["fits_device_memory"] = bool(fits)
        if not fits:
            logging.warning(
                "the estimated memory of one micro-batch per device, %.1f GB, does not fit --device_memory_gb=%g: "
                "raise --accum_steps (now %d) or the number of devices, or lower --batch_size.",
                estimate["total"] / 1e9,
                FLAGS.device_memory_gb,
                FLAGS.accum_steps,
            )
    return out


def print_plan(run, derived, model, job=None, params=None):
    """Prints the ``{"plan": ...}`` line (and, for ``--dry_run``, the final
    ``{"dry_run": true, ...}`` line) and writes it to ``plan.json``."""
    plan = dict(derived)
    plan.update(memory_plan(run, model, job))
    if params:
        plan.update(params)
    with open(os.path.join(run.output_dir, "plan.json"), "w") as f:
        json.dump(plan, f, indent=1, default=str)
    print(json.dumps({"plan": plan}, default=str), flush=True)
    return plan


# ---------------------------------------------------------------------------
# Callbacks and fit
# ---------------------------------------------------------------------------


def run_callbacks(run, schedule, total_steps, before=(), after=()):
    """:func:`keras_lcmae.callbacks.training_callbacks` with the run's
    folder, micro-batch, accumulation, ``--backup_every`` and ``--log_every``."""
    from keras_lcmae.callbacks import training_callbacks

    return training_callbacks(
        run.output_dir,
        schedule,
        run.plan.global_micro_batch,
        total_steps,
        FLAGS.backup_every,
        run.plan.accum_steps,
        FLAGS.log_every,
        before,
        after,
    )


def fit(run, model, dataset, updates_per_epoch, callbacks, on_divergence=None, **kwargs):
    """``model.fit`` over ``--epochs`` of ``updates_per_epoch`` optimizer
    updates (``accum_steps`` micro-batches each), a progress bar on a
    terminal and one line per epoch otherwise. A run that diverged exits
    with status 1 and one line naming the step; ``on_divergence()`` may save
    what is still good first and returns a sentence saying what it did."""
    from keras_lcmae.callbacks import DivergenceGuard
    from keras_lcmae.distribute import prepare_fit
    from keras_lcmae.training import fit_verbosity

    history = prepare_fit(model).fit(
        dataset,
        epochs=FLAGS.epochs,
        steps_per_epoch=updates_per_epoch * run.plan.accum_steps,
        callbacks=callbacks,
        verbose=fit_verbosity(),
        **kwargs,
    )
    guard = next(c for c in callbacks if isinstance(c, DivergenceGuard))
    if guard.diverged:
        saved = on_divergence() if on_divergence else "nothing was written from the diverged weights"
        raise SystemExit(
            f"error: training diverged: {guard.message()}; {saved}. The backup in "
            f"{os.path.join(run.output_dir, 'backup')} holds the last finite weights: lower --blr and rerun the same "
            f"command to resume from it."
        )
    return history


def updates_done(model):
    import keras

    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def report(run, final, history=None, derived=None):
    """``metrics.json``, the final figures in TensorBoard's HParams
    dashboard (:func:`log_hparams`) and the final JSON line on stdout."""
    with open(os.path.join(run.output_dir, "metrics.json"), "w") as f:
        json.dump({"final": final, "history": history or {}, "derived": derived or {}}, f, indent=1, default=float)
    log_hparams(run, final)
    print(json.dumps(final, default=float), flush=True)


def write_run_files(run, config, derived):
    """``flags.txt``, ``model_config.json`` and the run's flags in
    TensorBoard's HParams dashboard (:func:`log_hparams`)."""
    with open(os.path.join(run.output_dir, "flags.txt"), "w") as f:
        f.write(FLAGS.flags_into_string())
    with open(os.path.join(run.output_dir, "model_config.json"), "w") as f:
        json.dump({"config": config, "derived": derived}, f, indent=1, default=str)
    log_hparams(run)


# ---------------------------------------------------------------------------
# TensorBoard HParams
# ---------------------------------------------------------------------------

FINAL_TAG = "final/"  # tag prefix of the final figures: the HParams table's metrics


def recipe_flags():
    """The flags of the running recipe, as its ``--help`` lists them: its own
    and the run flags of this module it adopts (absl's own and the
    libraries' are left out), by name."""
    main = sys.argv[0]  # absl files the __main__ module's flags under sys.argv[0]
    return sorted(FLAGS.get_key_flags_for_module(main), key=lambda flag: flag.name)


def hparams_values():
    """``{name: value}`` of the recipe's flags for HParams: str, int, float
    and bool as they are, lists joined by commas, unset flags (None) left
    out; plus ``recipe``, the script's name (``pretrain``, ``finetune``,
    ``linprobe``), so that runs of different recipes tell apart in one
    table."""
    values = {"recipe": os.path.splitext(os.path.basename(sys.argv[0]))[0]}
    for flag in recipe_flags():
        value = flag.value
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        if isinstance(value, (str, bool, int, float)):
            values[flag.name] = value
    return values


def log_hparams(run, final=None):
    """The run in TensorBoard's HParams dashboard, so that runs (LC-MAE
    settings a-g, a mask-ratio sweep, a pretrained encoder against a random
    one) compare in one table under ``tensorboard --logdir runs/``.

    Writes into ``<output_dir>/tensorboard``, the folder above the
    callbacks' ``train/``, ``validation/``, ``steps/`` and ``images/`` logs
    (one row of the HParams table per run folder): without ``final``, the
    run's start record, whose hparams are :func:`hparams_values`, so that a
    run shows in the table from its start; with ``final`` (the recipe's
    final figures), each number of it as a scalar ``final/<key>`` at the
    last step. No experiment config is written: TensorBoard then builds the
    table from all the runs under its log folder, with every recipe's flags
    as columns (those that differ between the runs shown first) and every
    scalar as a metric (``final/...``, and ``train/``, ``validation/`` and
    ``steps/`` ones), where one run's config would stand for all runs of
    the folder (TensorBoard reads one) and name only that run's flags and
    metrics. Only the chief writes (other multi-worker tasks and
    ``--dry_run`` write nothing); a resumed run writes its start record
    again, with the same values."""
    if not run.dist.is_chief or FLAGS.dry_run:
        return
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    writer = tf.summary.create_file_writer(os.path.join(run.output_dir, "tensorboard"))
    with writer.as_default():
        if final is None:
            hp.hparams(hparams_values())
        else:
            step = int(final.get("steps") or 0)
            for k, v in final.items():
                if isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_)):
                    tf.summary.scalar(FINAL_TAG + k, float(v), step=step)
    writer.close()


# ---------------------------------------------------------------------------
# Evaluation recipes: data and encoder
# ---------------------------------------------------------------------------


def is_tfrecord_pattern(value):
    return (
        "*" in value
        or "tfrecord" in os.path.basename(value).lower()
        or (os.path.isfile(value) and not value.endswith(".keras"))
    )


def validate_eval_flags():
    validate_run_flags()
    if FLAGS.architecture_of and not os.path.exists(FLAGS.architecture_of):
        raise app.UsageError(f"--architecture_of: {FLAGS.architecture_of!r} does not exist.")
    if FLAGS.encoder != "random" and not os.path.exists(FLAGS.encoder):
        raise app.UsageError(f"--encoder: {FLAGS.encoder!r} does not exist (give an encoder.keras or 'random').")
    data = FLAGS.data
    if data != "fashion_mnist" and not data.startswith("tfds:") and not os.path.isdir(data):
        if not is_tfrecord_pattern(data):
            raise app.UsageError(f"--data: {data!r} is not fashion_mnist, tfds:NAME, a folder or a TFRecord glob.")
        if not FLAGS.val_data:
            raise app.UsageError("--val_data is needed with TFRecord --data: the glob of the validation records.")
    elif FLAGS.val_data:
        raise app.UsageError("--val_data applies to TFRecord --data only (a folder holds train/ and val/).")


def _tfrecord_splits(channels):
    from keras_lcmae import data
    from keras_lcmae.errors import ArgumentError

    if FLAGS.num_classes is None:
        raise ValueError("--num_classes is needed with TFRecord --data (the records do not say how many classes).")
    train = data.tfrecord_dataset(FLAGS.data, channels=channels, need_labels=True)
    try:
        with arguments_from(pattern_or_files="val_data"):
            val = data.tfrecord_dataset(FLAGS.val_data, channels=channels, need_labels=True)
    except ArgumentError:
        raise
    except ValueError as e:
        raise ValueError(f"--val_data={FLAGS.val_data}: {e}") from None
    n_train = (
        FLAGS.train_limit
        if FLAGS.train_limit
        else (None if FLAGS.steps_per_epoch else data.count_tfrecords(FLAGS.data))
    )
    if FLAGS.train_limit:
        train = train.take(FLAGS.train_limit)
    if FLAGS.val_limit:
        val = val.take(FLAGS.val_limit)
    return train, val, FLAGS.num_classes, n_train


def labelled_data():
    """``(train_source, val_source, num_classes, n_train, channels, mean, std,
    crop_pct)``; sources yield ``(uint8 image, int label)``. A library
    ``ArgumentError`` goes to :func:`run` (it names its argument); any other
    failure to read the data is a ``UsageError`` naming ``--data``."""
    from keras_lcmae import data
    from keras_lcmae.errors import ArgumentError

    channels = FLAGS.num_channels
    try:
        if FLAGS.data == "fashion_mnist":
            channels = channels or 1
            sources = []
            for split in ("train", "test"):
                images, labels = data.load_fashion_mnist(
                    split, limit=FLAGS.train_limit if split == "train" else FLAGS.val_limit
                )
                images = images[..., None] if channels == 1 else np.repeat(images[..., None], channels, -1)
                sources.append((data.array_dataset(images, labels), len(images), labels))
            mean, std = data.FASHION_MNIST_MEAN * channels, data.FASHION_MNIST_STD * channels
            crop_pct = 1.0  # 28-px images whose objects fill the frame: resize, no crop
            (train, n_train, train_labels), (val, _, _) = sources
            num_classes = int(train_labels.max()) + 1
        elif FLAGS.data.startswith("tfds:"):
            channels = channels or 3
            train = data.tfds_dataset(FLAGS.data[5:], "train", channels=channels)
            try:
                val = data.tfds_dataset(FLAGS.data[5:], "validation", channels=channels)
            except ValueError:
                val = data.tfds_dataset(FLAGS.data[5:], "test", channels=channels)
            n_train = int(train.cardinality())
            if FLAGS.train_limit:
                train, n_train = train.take(FLAGS.train_limit), min(n_train, FLAGS.train_limit)
            if FLAGS.val_limit:
                val = val.take(FLAGS.val_limit)
            import tensorflow_datasets as tfds  # tfds_dataset above checked that it is installed

            num_classes = tfds.builder(FLAGS.data[5:]).info.features["label"].num_classes
            mean, std, crop_pct = data.IMAGENET_MEAN, data.IMAGENET_STD, 0.875
        elif not os.path.isdir(FLAGS.data):
            channels = channels or 3
            train, val, num_classes, n_train = _tfrecord_splits(channels)
            mean, std, crop_pct = _image_stats(channels) + (0.875,)
        else:
            channels = channels or 3
            folders = [os.path.join(FLAGS.data, s) for s in ("train", "val")]
            for f in folders:
                if not os.path.isdir(f):
                    raise ValueError(
                        f"--data: {FLAGS.data!r} needs train/ and val/ sub-folders of class folders; {f!r} is missing."
                    )
                if not any(os.path.isdir(os.path.join(f, e)) for e in os.listdir(f)):
                    raise ValueError(
                        f"--data: labels are missing: {f!r} holds no class sub-folders (one folder "
                        f"of images per class is how labels are given)."
                    )
            train, train_classes, _, n_train = data.image_folder_dataset(folders[0], channels=channels)
            val, val_classes, _, _ = data.image_folder_dataset(folders[1], channels=channels)
            if not train_classes or list(val_classes) != list(train_classes):
                raise ValueError(
                    f"--data: train/ and val/ must hold the same class folders (labels); got "
                    f"{list(train_classes)[:5]}... and {list(val_classes)[:5]}..."
                )
            num_classes = len(train_classes)
            if FLAGS.train_limit:
                train, n_train = train.take(FLAGS.train_limit), min(n_train, FLAGS.train_limit)
            if FLAGS.val_limit:
                val = val.take(FLAGS.val_limit)
            mean, std = _image_stats(channels)
            crop_pct = 0.875
    except ArgumentError:
        raise
    except (ValueError, OSError) as e:
        raise app.UsageError(flag_message("--data", FLAGS.data, e)) from None
    if num_classes is None or num_classes < 2:
        raise app.UsageError(f"--data: the training data has no usable labels (found {num_classes} classes).")
    if FLAGS.num_classes is not None and FLAGS.num_classes != num_classes:
        raise app.UsageError(f"--num_classes={FLAGS.num_classes} but the data has {num_classes} classes.")
    return train, val, num_classes, n_train, channels, mean, std, crop_pct


def _image_stats(channels):
    from keras_lcmae import data

    if channels == 3:
        return data.IMAGENET_MEAN, data.IMAGENET_STD
    return (0.5,) * channels, (0.5,) * channels


def flag_message(flag, value, error):
    """One line: the library's message, prefixed with ``flag=value`` unless
    it already names a flag."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return message if message.startswith("--") else f"{flag}={value}: {message}"


def load_encoder_or_fail(path, flag, **kwargs):
    """:func:`keras_lcmae.load_encoder` with any failure (a missing or
    corrupt file, one Keras' safe mode refuses, another geometry) as a
    one-line ``UsageError`` naming ``flag`` (a library ``ArgumentError``
    about the path names ``flag`` too, through :func:`run`)."""
    from keras_lcmae import load_encoder
    from keras_lcmae.errors import ArgumentError

    try:
        with arguments_from(path=flag.lstrip("-"), checkpoint=flag.lstrip("-")):
            return load_encoder(path, **kwargs)
    except ArgumentError:
        raise
    except Exception as e:  # Keras' loader raises many kinds, none of them meant for a user
        reason = f"{type(e).__name__}: {e}"
        raise app.UsageError(flag_message(flag, path, f"cannot load an encoder from it: {reason}")) from None


def build_encoder(channels, drop_path_rate=None):
    """The encoder of ``--encoder`` (checked against the data's geometry) or a
    fresh one of ``--model`` for ``--encoder=random``."""
    from keras_lcmae import ViTEncoder
    from keras_lcmae.errors import ArgumentError

    if FLAGS.encoder == "random" and FLAGS.architecture_of:
        template = load_encoder_or_fail(
            FLAGS.architecture_of, "--architecture_of", image_size=FLAGS.image_size, num_channels=channels
        )
        # from_config builds the same architecture with freshly initialised weights
        return ViTEncoder.from_config(dict(template.get_config(), drop_path_rate=drop_path_rate or 0.0, trainable=True))
    if FLAGS.encoder == "random":
        try:
            with arguments_from(name="model"):
                return ViTEncoder.from_preset(
                    FLAGS.model,
                    image_size=FLAGS.image_size,
                    patch_size=FLAGS.patch_size,
                    num_channels=channels,
                    hidden_dim=FLAGS.hidden_dim,
                    depth=FLAGS.depth,
                    num_heads=FLAGS.num_heads,
                    drop_path_rate=drop_path_rate or 0.0,
                )
        except ArgumentError:
            raise
        except ValueError as e:
            raise app.UsageError(flag_message("--model", FLAGS.model, e)) from None
    return load_encoder_or_fail(
        FLAGS.encoder, "--encoder", image_size=FLAGS.image_size, num_channels=channels, drop_path_rate=drop_path_rate
    )


def check_labels(labels, num_classes, where):
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() < 0:
        raise app.UsageError(f"--data: {where} images have no labels (label -1); a labelled dataset is needed.")
    if labels.max() >= num_classes:
        raise app.UsageError(f"--data: {where} has label {int(labels.max())} but the model has {num_classes} classes.")
