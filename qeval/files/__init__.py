"""Files qeval can trust, whatever it finds on disk:

* :mod:`qeval.files.checked` — reading: a regular file or one line naming what stands there
  instead (a directory, a FIFO, never waited on), and records sealed with their own checksum;
* :mod:`qeval.files.atomic` — writing: a synced temporary renamed into place, so a reader never
  sees half, a full disk changes nothing already written, and a directory in the way is moved
  aside rather than crashed on.

:mod:`qeval.results` builds a run's files and locks on these.
"""
