"""Deprecated import path: this module moved to :mod:`moerouter.gates.noise`.

Its functions stay in :mod:`moerouter.policies` and :mod:`moerouter` (no warning). ``import
moerouter.policies.noise`` still works and gives the same module object (with a
:class:`DeprecationWarning`); import from :mod:`moerouter.gates.noise` instead.
"""

from moerouter._moved import replace_module
from moerouter.gates import noise

replace_module(__name__, noise, deprecated=True)
