"""User errors and how the command lines report them.

A :class:`UserError` is bad input that its message explains (the key, flag or path, and the
fix): an invalid config, a missing dataset, an unusable checkpoint, a workdir held by
another process. Command lines built with :func:`run` print it as one line,
``error: <message>``, on stderr and exit with code 2; flag-parsing errors (unknown config
keys, values of the wrong type, a missing config file) get the same treatment. Everything
else is a bug and keeps its traceback.
"""

import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input; the message names what is wrong and the fix."""


class DatasetUnavailableError(UserError, RuntimeError):
    """A dataset cannot be found or read; the message names the path and the fix."""


def one_line(message: str) -> str:
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def fail(message: str) -> NoReturn:
    """Prints ``error: <message>`` (one line) on stderr and exits with code 2."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def unknown_key_message(e: BaseException, argv: Sequence[str]) -> str:
    """``--config.KEY=...: unknown config key 'KEY' (Did you mean ...?)`` from the error
    ml_collections raises (a ConfigDict ``KeyError`` wrapped in ``AttributeError``s)."""
    inner: BaseException = e
    while inner.args and isinstance(inner.args[0], BaseException):
        inner = inner.args[0]
    text = str(inner.args[0] if inner.args else inner).replace("\\n", "\n").strip("'\"")
    key, _, hint = (line.strip("'\" ") for line in text.partition("\n"))
    flag = next(
        (a.split("=")[0] for a in argv if a.startswith("--") and key in a.split("=")[0].split(".")),
        "--config",
    )
    return f"{flag}: unknown config key {key!r}" + (f" ({hint})" if hint else "")


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Parses ``argv`` into ``flag_values``; any parsing error (a config file that does not
    load included) is a one-line ``fail``."""
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        fail(str(e))
    except (AttributeError, KeyError) as e:  # ml_collections: an unknown config key
        fail(unknown_key_message(e, argv))
    for name in list(flag_values):
        try:  # a config file that failed to load raises on first use
            getattr(flag_values[name].value, "keys", None)
        except OSError as e:
            message = str(e).replace("Configuration is not available because of an earlier ", "")
            fail(f"--{name}: {message}")
    return rest


def run(main: Callable[[list[str]], Any]) -> None:
    """``absl.app.run(main)`` with user errors (and flag errors) as one-line ``error: ...``."""

    def guarded(argv: list[str]) -> Any:
        try:
            return main(argv)
        except UserError as e:
            fail(str(e))

    app.run(guarded, flags_parser=parse_flags)
