"""The exception the library raises for a bad argument.

:class:`ArgumentError` is a ``ValueError`` that names the argument it is
about, so a caller that exposes the argument under another name (the recipes'
command-line flags) can say which of its own inputs to fix.

Example:
>>> try:
...     raise ArgumentError("data", "no images found in /tmp/empty")
... except ValueError as e:
...     (e.argument, str(e))
('data', 'data: no images found in /tmp/empty')
"""


class ArgumentError(ValueError):
    """``ValueError`` about one argument: ``argument`` names it, ``detail``
    is the message without the name, ``str()`` is ``"<argument>: <detail>"``."""

    def __init__(self, argument, detail):
        self.argument = argument
        self.detail = detail
        super().__init__(f"{argument}: {detail}")
