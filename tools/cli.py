"""The command line of the tools in ``tools/``: absl flags, as the recipes,
with the recipes' one-line errors.

Each tool defines its flags on its own ``absl.flags.FlagValues`` (from
:func:`new_flags`), not absl's global ``FLAGS``: several tools can then be
loaded in one process (the tests do) although they share flag names such as
``--output_dir``, and a tool's ``main(argv)`` can be called more than once.
:func:`parse` reads a command line into it: ``--name=value`` or
``--name value``, flags and positional arguments in any order, ``--`` ends the
flags, ``--flagfile=FILE`` reads flags from a file (unless the tool has a
``--flagfile`` of its own: :func:`new_flags`). A bad command line prints
one line, ``FATAL Flags error: ...`` naming the flag, and exits with status 2
(the tools' status for a bad command line); ``--help`` prints the tool's
docstring and its flags.

Import it as ``from cli import ...`` after putting ``tools/`` on ``sys.path``
(:data:`TOOLS`), so that ``python tools/x.py`` works from any folder.
"""

import os
import sys

from absl import flags

TOOLS = os.path.dirname(os.path.abspath(__file__))
USAGE_ERROR = 2  # exit status of a bad command line
HELP = ("-h", "-?", "--help", "--helpfull", "--helpshort")


class _OwnFlagfile(flags.FlagValues):
    """Flags whose ``--flagfile`` is a flag of the tool (a file it passes on),
    not absl's "read flags from this file"."""

    def read_flags_from_files(self, argv, force_gnu=True):
        return list(argv)


def new_flags(own_flagfile=False):
    """A ``FlagValues`` of the tool's own, reading flags and positional
    arguments in any order. ``own_flagfile``: the tool defines ``--flagfile``
    itself (``tools/mask_ratio_sweep.py``: the recipe flagfile of its runs)."""
    flag_values = _OwnFlagfile() if own_flagfile else flags.FlagValues()
    flag_values.set_gnu_getopt(True)
    return flag_values


def fail(message):
    """Ends the tool with one line ``FATAL Flags error: <message>`` on stderr
    and exit status 2."""
    print(f"FATAL Flags error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


def usage(flag_values, doc, program):
    """The ``--help`` text: the tool's docstring, then its flags."""
    return (
        f"{doc.strip()}\n\nflags of {program} (--name=value or --name value; --help: this text):\n"
        f"{flag_values.get_help(include_special_flags=False)}\n"
    )


def parse(flag_values, args, doc):
    """Parses the command-line arguments ``args`` (``sys.argv[1:]`` when
    None) into ``flag_values``, each flag from its default; returns the
    positional arguments (those after ``--`` included). ``--help`` prints
    :func:`usage` and exits with status 0; a bad flag ends in :func:`fail`."""
    args = sys.argv[1:] if args is None else list(args)
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "tool"
    flag_values.unparse_flags()
    if any(a in HELP for a in (args[: args.index("--")] if "--" in args else args)):
        print(usage(flag_values, doc, program), flush=True)
        sys.exit(0)
    try:
        rest = flag_values([program, *args])
    except flags.Error as e:
        fail(str(e).strip().splitlines()[0])
    return rest[1:]
