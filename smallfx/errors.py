"""Errors a user can fix.

Anything raised as `UserError` reaches the command line as one line on stderr and
exit status 2 (see `smallfx.cli`), never as a traceback from deep inside JAX.
"""


class UserError(Exception):
  """A bad config, an unknown name, missing data or a corrupt file."""


def unknown(kind: str, name: str, valid) -> UserError:
  """The error for a name that is not in a registry, listing the valid names."""
  return UserError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}")
