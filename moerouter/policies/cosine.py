"""Deprecated import path: this module moved to :mod:`moerouter.gates.cosine`.

Its functions stay in :mod:`moerouter.policies` and :mod:`moerouter` (no warning). ``import
moerouter.policies.cosine`` still works and gives the same module object (with a
:class:`DeprecationWarning`); import from :mod:`moerouter.gates.cosine` instead.
"""

from moerouter._moved import replace_module
from moerouter.gates import cosine

replace_module(__name__, cosine, deprecated=True)
