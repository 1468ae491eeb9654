"""One writer per workdir: a second run on the same folder is refused, naming the first.

The lock is an OS file lock (`filelock`), which the kernel releases when its process
dies, so a killed run never leaves a stale lock behind; the owner's process id and host
sit beside it for the message.
"""

import contextlib
import os
import socket

import filelock
import jax

from smallfx.errors import UserError

LOCK = '.lock'
OWNER = '.lock.owner'


@contextlib.contextmanager
def lock(workdir: str):
  """Holds `workdir` for this run (process 0 of a multi-process run holds it for all)."""
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, LOCK)
  owner = os.path.join(workdir, OWNER)
  held = filelock.FileLock(path, timeout=0)
  try:
    held.acquire()
  except filelock.Timeout:
    try:
      with open(owner) as f:
        who = f.read().strip()
    except OSError:
      who = 'another process'
    raise UserError(f'{workdir} is in use by a run still going ({who}); wait for it, '
                    'or use another --workdir') from None
  try:
    with open(owner, 'w') as f:
      f.write(f'process {os.getpid()} on {socket.gethostname()}')
    yield
  finally:
    with contextlib.suppress(OSError):
      os.remove(owner)
    held.release()
